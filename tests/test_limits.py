"""``[limits]``: each limit bites with a clear message, the gateway keeps serving, and the
users the limit is not about are unaffected.

Real gateways and clients.  Every client of the suite connects from loopback; the kernel
accepts any 127.x.y.z as a source address, so "another source" is 127.0.0.2 and up.  Only
the penalty test runs without the loopback exemption the other test gateways get
(``gatewayproc.TEST_LIMITS``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from conftest import dynamic_vo
from gatewayproc import TEST_LIMITS, XOS_SSHD, GatewayProcess, VOCA, run

from gatewayproc import free_port
from test_cr_e2e import cr_env, jobs_of, xcr  # noqa: F401 (cr_env: fixture)
from test_cr_e2e import refused as cr_refused
from test_observability import scrape, value, with_metrics

import xos_sshd.admission as admission
from xos_sshd.admission import REFUSAL_REASONS, Admission, drop_probability, source_key
from xos_sshd.config import ConfigError, LimitsConfig, parse_max_startups

LOOPBACK_EXEMPT = ['127.0.0.0/8', '::1/128']


# --------------------------------------------------------------------------- helpers


def _gateway(tmp_path: Path, ca: VOCA, uid_range: tuple[int, int], home_base: Path,
             limits: dict[str, Any], **top: Any) -> GatewayProcess:
    return GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(ca, uid_range, home_base / 'home')},
                                    limits=limits, **top).start()


def _raw(gw: GatewayProcess, source: str = '127.0.0.1') -> socket.socket:
    """A TCP connection to the gateway from *source* that says nothing yet."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(('127.0.0.1', gw.port))
    return sock


def _banner(sock: socket.socket) -> bytes:
    """The server's first line, or b'' when it closed (or reset) without one."""
    data = b''
    try:
        while not data.endswith(b'\n'):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _refused(gw: GatewayProcess, source: str = '127.0.0.1') -> bool:
    """A new connection from *source* is closed before any SSH banner."""
    with _raw(gw, source) as sock:
        return _banner(sock) == b''


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.05)


# --------------------------------------------------------------------------- config


BAD_LIMITS = [
    ({'max_startups': '10:30'}, 'limits.max_startups'),
    ({'max_startups': '20:30:10'}, 'limits.max_startups'),
    ({'max_startups': '10:130:100'}, 'limits.max_startups'),
    ({'max_startups': True}, 'limits.max_startups'),
    ({'max_startups_per_source': -1}, 'limits.max_startups_per_source'),
    ({'max_sessions_per_connection': 0}, 'limits.max_sessions_per_connection'),
    ({'max_sessions_per_account': 'many'}, 'limits.max_sessions_per_account'),
    ({'max_jobs_per_account': 2.5}, 'limits.max_jobs_per_account'),
    ({'penalty_authfail': True}, 'limits.penalty_authfail'),
    ({'penalty_min': 60, 'penalty_max': 30}, 'limits.penalty_max'),
    ({'penalty_exempt': ['10.0.0.0/33']}, 'limits.penalty_exempt'),
    ({'penalty_exempt': '127.0.0.0/8'}, 'limits.penalty_exempt'),
    ({'penalties': 'yes'}, 'limits.penalties'),
    ({'revocation_check_seconds': 0}, 'limits.revocation_check_seconds'),
    ({'max_startup': 5}, 'limits.max_startup'),
]


def test_bad_limits_name_the_key(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                                 home_base: Path) -> None:
    """``xos-sshd --check-config``: exit 2, one line naming the key, for each bad value."""
    for n, (table, key) in enumerate(BAD_LIMITS):
        base = tmp_path / f'case{n}'
        base.mkdir()
        gw = GatewayProcess.configure(base, {'dev': dynamic_vo(dev_ca, uid_range, home_base)},
                                      limits=table)
        res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
        assert res.returncode == 2, (table, res.stdout, res.stderr)
        assert res.stderr.startswith(f'xos-sshd: configuration error: {key}: '), (table, res.stderr)
        assert res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr


def test_every_limit_key_is_accepted(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                                     home_base: Path) -> None:
    table = {'max_startups': '10:30:100', 'max_startups_per_source': 10, 'penalties': True,
             'penalty_authfail': 5, 'penalty_noauth': 1, 'penalty_grace_exceeded': 20,
             'penalty_min': 15, 'penalty_max': 600, 'penalty_exempt': ['10.0.0.0/8', '2001:db8::/32'],
             'max_sessions_per_connection': 10, 'max_sessions_per_account': 100,
             'max_auth_tries': 6, 'max_jobs_per_account': 20, 'revocation_check_seconds': 2,
             'keepalive_seconds': 60, 'keepalive_count_max': 3}
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)},
                                  limits=table)
    res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
    assert res.returncode == 0 and 'configuration OK' in res.stdout, res.stderr


def test_max_startups_rule_and_source_keys() -> None:
    assert parse_max_startups('10:30:100') == (10, 30, 100)
    assert parse_max_startups('7') == (7, 100, 7) == parse_max_startups(7)
    with pytest.raises(ConfigError):
        parse_max_startups('1:2:3:4')
    # OpenSSH's rule: nothing below start, rate% at start, rising linearly, all at full
    assert drop_probability(9, 10, 30, 100) == 0.0
    assert drop_probability(10, 10, 30, 100) == pytest.approx(0.30)
    assert drop_probability(55, 10, 30, 100) == pytest.approx(0.65)
    assert drop_probability(100, 10, 30, 100) == 1.0
    assert drop_probability(2, 2, 100, 2) == 1.0 and drop_probability(1, 2, 100, 2) == 0.0
    assert source_key('192.0.2.7') == '192.0.2.7'
    assert source_key('::ffff:192.0.2.7') == '192.0.2.7'
    assert source_key('2001:db8:1:2:3:4:5:6') == source_key('2001:db8:1:2::99') == '2001:db8:1:2::/64'


def test_penalty_book_is_capped_per_address_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of penalised IPv6 /64s fills only the IPv6 book: IPv4 sources are still
    penalised, and the full book is not scanned on each new source (the sweep prunes)."""
    monkeypatch.setattr(admission, 'MAX_PENALISED_SOURCES', 4)
    now = [1000.0]
    book = Admission(LimitsConfig(penalty_authfail=20, penalty_min=15), clock=lambda: now[0])

    def fail(host: str) -> None:
        book.finished(book.admit(host), 'authfail')

    for i in range(10):
        fail(f'2001:db8:{i}::1')
    assert sum(book.penalised(source_key(f'2001:db8:{i}::1')) > 0 for i in range(10)) == 4
    fail('192.0.2.1')
    assert book.penalised('192.0.2.1') == pytest.approx(20)
    with pytest.raises(admission.AdmissionRefused, match='penalised'):
        book.admit('192.0.2.1')
    now[0] += 21  # everything ran out; only the sweep makes room again
    fail('2001:db8:99::1')
    assert book.penalised('2001:db8:99::/64') == 0
    assert book.prune() == 5
    fail('2001:db8:99::1')
    assert book.penalised('2001:db8:99::/64') == pytest.approx(20)


# --------------------------------------------------------------------------- before authentication


@pytest.fixture
def startups_gw(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                home_base: Path) -> Iterator[tuple[GatewayProcess, int]]:
    """The gateway and its metrics port."""
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range,
                                                               home_base / 'home')},
                                  limits={'max_startups': '3', 'max_startups_per_source': 2,
                                          'penalty_exempt': LOOPBACK_EXEMPT})
    mport = free_port()
    with_metrics(gw, listen=f'127.0.0.1:{mport}')
    gw.start()
    yield gw, mport
    gw.stop()


def test_max_startups_and_per_source_refuse_before_the_banner(
        startups_gw: tuple[GatewayProcess, int], dev_ca: VOCA, tmp_path: Path) -> None:
    gw, mport = startups_gw
    refusals = 'xos_sshd_connections_refused_total'
    m0 = scrape(mport)  # every reason exported from the start (0)
    assert {r: m0.get((refusals, (('reason', r),))) for r in REFUSAL_REASONS} == {
        'max-startups': 0, 'max-startups-per-source': 0, 'penalty': 0}
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    held = [_raw(gw, '127.0.0.3'), _raw(gw, '127.0.0.3')]
    try:
        assert all(_banner(s).startswith(b'SSH-2.0-') for s in held)
        # a third unauthenticated connection from the same source: closed, no banner
        assert _refused(gw, '127.0.0.3')
        # another source is welcome, up to max_startups (3) in all
        held.append(_raw(gw, '127.0.0.4'))
        assert _banner(held[-1]).startswith(b'SSH-2.0-')
        assert _refused(gw, '127.0.0.5')
        assert gw.ssh_xos(alice, 'true').returncode == 255  # full: even a valid login waits
        # one pending connection goes away: there is room again
        held.pop(0).close()
        _wait(lambda: not _refused(gw, '127.0.0.5'), 5, 'a free startup slot')
    finally:
        for sock in held:
            sock.close()
    _wait(lambda: gw.ssh_xos(alice, 'echo in').stdout == 'in\n', 10, 'a login after the flood')
    log = gw.log()
    assert 'refused connection from 127.0.0.3: ' in log and 'max_startups_per_source = 2' in log
    assert 'refused connection from 127.0.0.5: ' in log and 'max_startups = 3:100:3' in log
    # every refusal is counted on the metrics endpoint, though none is an audit line
    metrics = scrape(mport)
    assert value(metrics, refusals, reason='max-startups-per-source') == 1
    assert value(metrics, refusals, reason='max-startups') >= 2  # 127.0.0.5, ssh-xos
    assert value(metrics, refusals, reason='penalty') == 0
    assert not [e for e in gw.audit() if e.get('reason') in REFUSAL_REASONS]
    # authenticated connections are not startups: three sessions at once are fine
    procs = [gw.ssh_xos(alice, 'echo $((1+1))') for _ in range(3)]
    assert all(p.stdout == '2\n' for p in procs)
    assert gw.alive()


async def test_penalised_source_is_refused_then_forgiven(tmp_path: Path, dev_ca: VOCA,
                                                         uid_range: tuple[int, int],
                                                         home_base: Path) -> None:
    """Two refused logins from 127.0.0.1 (3 s of penalty each, minimum 3.5 s) get the
    source refused before the banner, even with a valid certificate, until the penalty (at
    most 4 s) runs out; 127.0.0.2 logs in meanwhile.  Refusals are logged once, not each."""
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                  {'penalty_authfail': 3, 'penalty_min': 3.5, 'penalty_max': 4,
                   'max_startups': '100:30:200', 'max_startups_per_source': 0})
    try:
        alice = dev_ca.issue('alice', tmp_path / 'alice')
        mallory = dev_ca.issue('mallory', tmp_path / 'mallory')
        dev_ca.revoke(mallory)
        assert gw.ssh_xos(alice, 'true').returncode == 0  # a good login costs nothing
        for _ in range(2):
            assert gw.ssh_xos(mallory, 'true').returncode == 255
        _wait(lambda: any(e['event'] == 'penalty' for e in gw.audit()), 5, 'the penalty')
        penalty = [e for e in gw.audit() if e['event'] == 'penalty']
        assert len(penalty) == 1 and penalty[0]['source'] == '127.0.0.1'
        assert penalty[0]['cause'] == 'authfail' and 3.5 <= penalty[0]['seconds'] <= 4
        t0 = time.monotonic()
        for _ in range(4):
            assert _refused(gw, '127.0.0.1')
        refused = gw.ssh_xos(alice, 'echo SHOULD-NOT-RUN')
        assert refused.returncode == 255 and 'SHOULD-NOT-RUN' not in refused.stdout
        # another source is not concerned
        async with gw.connect(alice, local_addr=('127.0.0.2', 0)) as conn:
            assert (await conn.run('echo other source')).stdout == 'other source\n'
        lines = [line for line in gw.log().splitlines()
                 if 'refused connection from 127.0.0.1' in line]
        assert len(lines) == 1 and 'is penalised for' in lines[0], lines
        # forgiven once the penalty ran out (it never exceeds penalty_max = 4 s)
        _wait(lambda: gw.ssh_xos(alice, 'echo back').stdout == 'back\n', 8, 'the penalty to end')
        assert time.monotonic() - t0 <= 6
    finally:
        gw.stop()


def test_login_grace_drops_a_silent_client(tmp_path: Path, dev_ca: VOCA,
                                           uid_range: tuple[int, int], home_base: Path) -> None:
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base, TEST_LIMITS, login_grace_seconds=2)
    try:
        alice = dev_ca.issue('alice', tmp_path / 'alice')
        with _raw(gw) as sock:
            assert _banner(sock).startswith(b'SSH-2.0-')
            sock.sendall(b'SSH-2.0-silent_test_client\r\n')
            t0 = time.monotonic()
            try:
                while sock.recv(4096):  # the server's KEXINIT, then nothing until it hangs up
                    pass
            except ConnectionResetError:
                pass
            waited = time.monotonic() - t0
        assert 1.5 <= waited <= 5, waited
        assert 'not authenticated within login_grace_seconds (2 s)' in gw.log()
        assert gw.ssh_xos(alice, 'echo in time').stdout == 'in time\n'
    finally:
        gw.stop()


# --------------------------------------------------------------------------- sessions


@pytest.fixture
def sessions_gw(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                home_base: Path) -> Iterator[GatewayProcess]:
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                  {**TEST_LIMITS, 'max_sessions_per_connection': 2, 'max_sessions_per_account': 3})
    yield gw
    gw.stop()


async def _cat(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientProcess:
    proc = await conn.create_process('cat')
    proc.stdin.write('hi\n')
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == 'hi\n'
    return proc


async def _end(proc: asyncssh.SSHClientProcess) -> None:
    proc.stdin.write_eof()
    await asyncio.wait_for(proc.wait_closed(), 10)


def _session_refusals(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [e for e in gw.audit() if e['event'] == 'session' and e.get('outcome') == 'refused']


async def test_max_sessions_per_connection(sessions_gw: GatewayProcess, dev_ca: VOCA,
                                           tmp_path: Path) -> None:
    gw = sessions_gw
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    async with gw.connect(alice) as conn:
        first, second = await _cat(conn), await _cat(conn)
        with pytest.raises(asyncssh.ChannelOpenError) as refused:
            await conn.create_process('echo SHOULD-NOT-RUN')
        assert 'max_sessions_per_connection = 2' in refused.value.reason
        assert refused.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        # the open sessions go on; when one ends, there is room again
        second.stdin.write('still\n')
        assert await asyncio.wait_for(second.stdout.readline(), 10) == 'still\n'
        await _end(first)
        assert (await conn.run('echo room')).stdout == 'room\n'
        await _end(second)
    # OpenSSH's client tells the user which limit (ssh -N: no session; -W: no forwarding)
    ssh = gw.ssh(alice, 'alice', 'echo stock ssh')
    assert ssh.returncode == 0 and ssh.stdout == 'stock ssh\n'
    refusals = _session_refusals(gw)
    assert len(refusals) == 1 and refusals[0]['reason'] == 'too-many-sessions'
    assert refusals[0]['account'] == 'dev-alice' and 'max_sessions_per_connection' in refusals[0]['message']
    assert 'refused a session of dev-alice' in gw.log()


async def test_max_sessions_per_account_counts_every_connection(sessions_gw: GatewayProcess,
                                                               dev_ca: VOCA,
                                                               tmp_path: Path) -> None:
    gw = sessions_gw
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    async with gw.connect(alice) as one, gw.connect(alice) as two:
        held = [await _cat(one), await _cat(one), await _cat(two)]
        with pytest.raises(asyncssh.ChannelOpenError) as refused:
            await two.create_process('echo SHOULD-NOT-RUN')
        assert 'dev-alice has 3 sessions open already (max_sessions_per_account = 3)' \
            in refused.value.reason
        # bob is another account: his sessions do not count against alice's, nor hers his
        async with gw.connect(bob, login='bob') as conn_b:
            bobs = [await _cat(conn_b), await _cat(conn_b)]
            for proc in bobs:
                await _end(proc)
        # alice's first connection ends: its two sessions no longer count
        await _end(held[0])
        await _end(held[1])
        one.close()
        await one.wait_closed()
        assert (await two.run('echo room')).stdout == 'room\n'
        await _end(held[2])
    assert [e['reason'] for e in _session_refusals(gw)] == ['too-many-sessions']


# --------------------------------------------------------------------------- jobs


@pytest.fixture
def jobs_gw(cr_env: dict[str, Any]) -> tuple[GatewayProcess, VOCA, Path]:  # noqa: F811
    """A gateway with ``max_jobs_per_account = 1`` laid out as the checkpoint/restart tests
    need it (test_cr_e2e.cr_env, which also ends every job and the gateway afterwards)."""
    base = cr_env['base']
    ca = VOCA.create(base, 'dev')
    gw = GatewayProcess.configure(base, {'dev': dynamic_vo(ca, cr_env['uids'], cr_env['homes'] / 'home')},
                                  limits={**TEST_LIMITS, 'max_jobs_per_account': 1})
    cr_env['gateways'].append(gw)
    return gw.start(), ca, base


def test_max_jobs_per_account(jobs_gw: tuple[GatewayProcess, VOCA, Path]) -> None:
    """Through the real ``xos-cr`` over SSH: run and restart refuse at the limit, naming it;
    another account is not concerned; a killed job frees its slot."""
    gw, ca, base = jobs_gw
    alice, bob = ca.issue('alice', base / 'alice'), ca.issue('bob', base / 'bob')
    job = xcr(gw, alice, 'run', '--', 'sleep', '600').stdout.strip()
    second = xcr(gw, alice, 'run', '--', 'sleep', '600', check=False)
    assert cr_refused(second, 'too-many-jobs'), second.stderr
    assert 'max_jobs_per_account = 1' in second.stderr and 'dev-alice runs 1 jobs' in second.stderr
    assert xcr(gw, bob, 'run', '--', 'sleep', '600').returncode == 0  # bob's own slot
    image = xcr(gw, alice, 'checkpoint', job).stdout.strip()
    restart = xcr(gw, alice, 'restart', image, check=False)
    assert cr_refused(restart, 'too-many-jobs'), restart.stderr
    xcr(gw, alice, 'kill', job, '-s', 'KILL')  # frees the slot
    new = xcr(gw, alice, 'restart', image).stdout.strip()
    assert jobs_of(gw, alice)[new]['state'] == 'running'
    refusals = [(e['action'], e['reason'], e['user']) for e in gw.audit()
                if e['event'] == 'cr' and e['outcome'] == 'refused']
    assert refusals == [('run', 'too-many-jobs', 'alice'), ('restart', 'too-many-jobs', 'alice')]


async def test_max_auth_tries_disconnects_a_key_spraying_client(
        sessions_gw: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    """OpenSSH's MaxAuthTries (6): the 7th key on one connection is never looked at."""
    keys = [asyncssh.generate_private_key('ssh-ed25519') for _ in range(12)]
    with pytest.raises((asyncssh.DisconnectError, asyncssh.PermissionDenied)):
        async with asyncssh.connect('127.0.0.1', sessions_gw.port, username='alice',
                                    client_keys=keys, known_hosts=None, agent_path=None,
                                    preferred_auth='publickey'):
            pass
    refused = [e for e in sessions_gw.audit()
               if e['event'] == 'login' and e['outcome'] == 'refused']
    assert len(refused) == 6, [e['reason'] for e in refused]
    assert 'too many authentication failures' in sessions_gw.log()
    # the gateway serves on, and a real certificate still logs in
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    async with sessions_gw.connect(alice) as conn:
        assert (await conn.run('true')).exit_status == 0
