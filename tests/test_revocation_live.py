"""Revocation that bites: a revoked certificate or a banned account loses its live SSH
connections within seconds, each closure audited; everybody else stays connected.

Real gateways, real ``xos-ca revoke`` (rewrites the CRL the gateway reads), real
``xos-ams ban``, real clients: asyncssh with an interactive pty shell, OpenSSH ``ssh`` and
``ssh-xos`` running ``sleep 600``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509
from conftest import dynamic_vo
from gatewayproc import SSH_XOS, TEST_LIMITS, VENV_BIN, VOCA, GatewayProcess, run

XOS_AMS = str(VENV_BIN / 'xos-ams')


def _start(tmp_path: Path, ca: VOCA, uid_range: tuple[int, int], home_base: Path,
           **limits: Any) -> GatewayProcess:
    return GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(ca, uid_range, home_base / 'home')},
                                    limits={**TEST_LIMITS, **limits}).start()


@pytest.fixture
def gw_slow_sweep(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                  home_base: Path) -> Iterator[GatewayProcess]:
    """A gateway whose periodic check is far away: only SIGHUP or a ban can close anything."""
    gw = _start(tmp_path, dev_ca, uid_range, home_base, revocation_check_seconds=300)
    yield gw
    gw.stop()


def _openssh_sleeper(gw: GatewayProcess, prefix: Path, login: str) -> subprocess.Popen[str]:
    """Stock OpenSSH holding an exec session (``sleep 600``) with the OpenSSH certificate."""
    return subprocess.Popen(
        ['ssh', '-F', '/dev/null', '-i', f'{prefix}.key', '-o', f'CertificateFile={prefix}-cert.pub',
         '-o', 'IdentitiesOnly=yes', '-o', 'StrictHostKeyChecking=no', '-o',
         'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR',
         '-p', str(gw.port), f'{login}@127.0.0.1', 'echo up; exec sleep 600'],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _xos_sleeper(gw: GatewayProcess, prefix: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([SSH_XOS, '-i', str(prefix), '-p', str(gw.port), '-o',
                             'StrictHostKeyChecking=no', '127.0.0.1', 'echo up; exec sleep 600'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


async def _wait_up(proc: subprocess.Popen[str]) -> None:
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # type: ignore[union-attr]
    assert line == 'up\n', (line, proc.poll())


async def _shell(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientProcess:
    """An interactive login shell on a pty, proven alive."""
    proc = await conn.create_process(term_type='xterm', encoding=None)
    proc.stdin.write(b'echo "READY$((6*7))"\n')
    seen = b''
    while b'READY42' not in seen:
        seen += await asyncio.wait_for(proc.stdout.read(4096), 10)
    return proc


async def _echo(proc: asyncssh.SSHClientProcess, text: str) -> bool:
    """A ``cat`` session still answers."""
    proc.stdin.write(text + '\n')
    return await asyncio.wait_for(proc.stdout.readline(), 10) == text + '\n'


async def _exited(proc: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _uid_procs(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if os.stat(f'/proc/{entry}').st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


async def _no_processes(uid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _uid_procs(uid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def _closures(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [e for e in gw.audit() if e['event'] == 'connection' and e.get('action') == 'closed']


async def test_revoked_certificate_loses_its_live_sessions(gateway: GatewayProcess, dev_ca: VOCA,
                                                          tmp_path: Path) -> None:
    """xos-ca revoke rewrites the CRL; within the periodic check (2 s by default) both of
    alice's connections (asyncssh pty shell, OpenSSH exec) are closed, bob's stays."""
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    serial = x509.load_pem_x509_certificate(Path(f'{alice}.pem').read_bytes()).serial_number
    ssh_alice = _openssh_sleeper(gateway, alice, 'alice')
    try:
        async with gateway.connect(alice) as conn_a, gateway.connect(bob, login='bob') as conn_b:
            shell = await _shell(conn_a)
            cat = await conn_b.create_process('cat')
            assert await _echo(cat, 'before')
            await _wait_up(ssh_alice)
            uid = int((await conn_a.run('id -u')).stdout)
            assert _uid_procs(uid)
            t0 = time.monotonic()
            dev_ca.revoke(alice)
            await asyncio.wait_for(conn_a.wait_closed(), 6)
            assert await _exited(ssh_alice, 6), 'the OpenSSH session of alice was not closed'
            elapsed = time.monotonic() - t0
            assert elapsed <= 5.0, elapsed
            assert ssh_alice.returncode == 255
            stderr = ssh_alice.stderr.read()  # type: ignore[union-attr]
            assert 'revoked' in stderr and 'connection closed' in stderr, stderr
            assert shell.exit_status is None or shell.exit_status != 0
            # bob is untouched, on his open session and on new ones
            assert await _echo(cat, 'after')
            assert (await conn_b.run('echo bob-ok')).stdout == 'bob-ok\n'
            # alice's session processes (shell, sleep) were hung up
            assert await _no_processes(uid, 5), _uid_procs(uid)
    finally:
        ssh_alice.kill()
        ssh_alice.wait()
    closed = _closures(gateway)
    assert len(closed) == 2, closed
    for event in closed:
        assert event['reason'] == 'revoked' and event['user'] == 'alice' and event['vo'] == 'dev'
        assert event['account'] == 'dev-alice' and event['uid'] == uid
        assert event['source'].startswith('127.0.0.1:') and event['sessions'] >= 1
        assert event['serial'] == serial and 'revoked' in event['message']
    assert {e['route'] for e in closed} == {'x509', 'openssh'}
    assert gateway.log().count('closed connection of alice@dev') == 2
    # new logins of the revoked certificate are refused; the gateway goes on serving
    assert gateway.ssh_xos(alice, 'true').returncode == 255
    assert [e for e in gateway.audit() if e['event'] == 'login'][-1]['reason'] == 'revoked'
    assert gateway.ssh_xos(bob, 'echo fine', login='bob').stdout == 'fine\n'
    assert gateway.alive()


async def test_sighup_checks_live_connections_at_once(gw_slow_sweep: GatewayProcess,
                                                      dev_ca: VOCA, tmp_path: Path) -> None:
    gw = gw_slow_sweep
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    async with gw.connect(alice) as conn_a, gw.connect(bob, login='bob') as conn_b:
        sleeper = await conn_a.create_process('echo up; exec sleep 600')
        assert await asyncio.wait_for(sleeper.stdout.readline(), 10) == 'up\n'
        cat = await conn_b.create_process('cat')
        dev_ca.revoke(alice)
        await asyncio.sleep(1.0)  # no periodic check for 300 s: still open
        assert not conn_a.is_closed()
        assert await _echo(await conn_a.create_process('cat'), 'still here')
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await asyncio.wait_for(conn_a.wait_closed(), 3)
        assert time.monotonic() - t0 < 3
        assert await _echo(cat, 'bob still here')
    closed = _closures(gw)
    assert [(e['user'], e['reason'], e['sessions']) for e in closed] == [('alice', 'revoked', 2)]
    assert 'reloaded CAs and CRLs' in gw.log()


async def test_ban_closes_the_accounts_connections_immediately(gw_slow_sweep: GatewayProcess,
                                                               dev_ca: VOCA, tmp_path: Path) -> None:
    gw = gw_slow_sweep
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    xos_alice = _xos_sleeper(gw, alice)
    try:
        async with gw.connect(alice) as conn_a, gw.connect(bob, login='bob') as conn_b:
            await _shell(conn_a)
            await _wait_up(xos_alice)
            cat = await conn_b.create_process('cat')
            t0 = time.monotonic()
            res = run(XOS_AMS, '--socket', str(gw.control_socket), '--json', 'ban', 'dev-alice',
                      check=False)
            assert res.returncode == 0, res.stderr
            reply = json.loads(res.stdout)
            assert reply['mapping']['banned'] is True and reply['closed'] == 2, reply
            await asyncio.wait_for(conn_a.wait_closed(), 2)
            assert await _exited(xos_alice, 2), 'the ssh-xos session of alice was not closed'
            assert time.monotonic() - t0 < 2.5
            assert xos_alice.returncode != 0
            assert 'banned' in xos_alice.stderr.read()  # type: ignore[union-attr]
            assert await _echo(cat, 'bob still here')
    finally:
        xos_alice.kill()
        xos_alice.wait()
    closed = _closures(gw)
    assert sorted((e['user'], e['reason'], e['account']) for e in closed) == \
        [('alice', 'banned', 'dev-alice')] * 2
    assert gw.ssh_xos(alice, 'true').returncode == 255
    assert [e for e in gw.audit() if e['event'] == 'login'][-1]['reason'] == 'banned'
    # unban: alice is welcome again, and stays connected
    assert run(XOS_AMS, '--socket', str(gw.control_socket), 'unban', 'dev-alice').returncode == 0
    async with gw.connect(alice) as conn_a:
        assert (await conn_a.run('echo back')).stdout == 'back\n'
        gw.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        assert (await conn_a.run('echo still')).stdout == 'still\n'
    assert len(_closures(gw)) == 2


async def test_unavailable_crl_does_not_close_live_sessions(gateway: GatewayProcess,
                                                            dev_ca: VOCA, tmp_path: Path) -> None:
    """Only a positive revocation ends a live connection: a CRL that goes missing refuses
    new logins (crl_required) but leaves the open ones alone, and says so in the log."""
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    crl = dev_ca.dir / 'crl.pem'
    saved = crl.read_bytes()
    async with gateway.connect(alice) as conn:
        cat = await conn.create_process('cat')
        crl.unlink()
        try:
            deadline = time.monotonic() + 8
            while 'cannot check live connections for revocation' not in gateway.log():
                assert time.monotonic() < deadline, gateway.log()[-2000:]
                await asyncio.sleep(0.2)
            assert gateway.ssh_xos(alice, 'true').returncode == 255  # new logins refused
            assert await _echo(cat, 'still open')
            assert not conn.is_closed()
        finally:
            crl.write_bytes(saved)
        dev_ca.revoke(alice)  # a positive revocation does close it
        await asyncio.wait_for(conn.wait_closed(), 6)
    assert [e['reason'] for e in _closures(gateway)] == ['revoked']
