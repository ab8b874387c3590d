"""End to end: a VO user logs in with an XOS-cert and lands in a session as the mapped account.

Real xos-sshd process, real ``ssh-xos`` and OpenSSH ``ssh`` clients, real uids.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
import pytest

from gatewayproc import GatewayProcess, VOCA


def _lines(out: str) -> list[str]:
    return out.strip().splitlines()


def test_exec_runs_as_the_mapped_account(gateway: GatewayProcess, dev_ca: VOCA,
                                         uid_range: tuple[int, int], tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice', '--group', 'physics', '--group', 'cms')
    script = ('id -u; id -g; id -G; echo "$HOME"; echo "$USER"; echo "$XOS_VO:$XOS_USER"; pwd; '
              'grep NoNewPrivs /proc/self/status; env | cut -d= -f1 | sort | tr "\\n" " "')
    res = gateway.ssh_xos(alice, script)
    assert res.returncode == 0, res.stderr + gateway.log()
    uid, gid, groups, home, user, vo_user, cwd, nnp, env_names = _lines(res.stdout)
    assert uid_range[0] <= int(uid) <= uid_range[1]
    assert int(gid) != 0 and int(uid) != 0
    assert len(groups.split()) == 3  # private group + physics + cms
    assert user == 'dev-alice'
    assert home.endswith('/home/dev-alice') and cwd == home
    assert vo_user == 'dev:alice'
    assert nnp.split() == ['NoNewPrivs:', '1']
    assert 'SSH_AUTH_SOCK' not in env_names and 'PYTHONPATH' not in env_names
    st = os.stat(home)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == int(uid)
    accepted = [e for e in gateway.audit() if e['event'] == 'login' and e['outcome'] == 'accepted']
    assert accepted[-1]['account'] == 'dev-alice' and accepted[-1]['vo'] == 'dev'
    assert accepted[-1]['serial'] and accepted[-1]['source'].startswith('127.0.0.1:')


def test_exit_status_stdin_and_stderr_pass_through(gateway: GatewayProcess, dev_ca: VOCA,
                                                  tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    assert gateway.ssh_xos(alice, 'exit 7').returncode == 7
    res = gateway.ssh_xos(alice, 'cat; echo oops >&2', input='hello from stdin\n')
    assert res.stdout == 'hello from stdin\n' and 'oops' in res.stderr
    big = gateway.ssh_xos(alice, 'head -c 5000000 /dev/zero | tr "\\0" x')
    assert big.returncode == 0 and len(big.stdout) == 5_000_000


def test_openssh_certificate_route_maps_to_the_same_account(gateway: GatewayProcess,
                                                            dev_ca: VOCA, tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    via_xos = gateway.ssh_xos(alice, 'id -u')
    via_ssh = gateway.ssh(alice, 'alice', 'id -u; echo $USER')
    assert via_xos.returncode == 0 and via_ssh.returncode == 0, via_ssh.stderr
    uid, user = _lines(via_ssh.stdout)
    assert uid == via_xos.stdout.strip() and user == 'dev-alice'
    # the mapped account's own name is a valid login name too
    assert gateway.ssh(alice, 'dev-alice', 'id -u').stdout.strip() == uid
    routes = {e['route'] for e in gateway.audit() if e['outcome'] == 'accepted'}
    assert routes == {'x509', 'openssh'}


@pytest.mark.parametrize('login', ['root', 'bob', 'dev-bob', 'nobody'])
def test_login_name_must_be_the_user_or_its_account(gateway: GatewayProcess, dev_ca: VOCA,
                                                    tmp_path: Path, login: str) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    assert gateway.ssh_xos(bob, 'true').returncode == 0  # dev-bob now exists
    for client in ('ssh-xos', 'ssh'):
        res = (gateway.ssh_xos(alice, 'id -u', login=login) if client == 'ssh-xos'
               else gateway.ssh(alice, login, 'id -u'))
        assert res.returncode == 255 and res.stdout == '', (client, res)
    # OpenSSH also offers the bare key after the certificate: that one is 'not-a-certificate'.
    refusals = [e for e in gateway.audit() if e['outcome'] == 'refused' and e['user']]
    assert len(refusals) >= 2
    assert all(e['reason'] == 'login-name-mismatch' and e['login'] == login and e['user'] == 'alice'
               for e in refusals)
    assert gateway.ssh_xos(alice, 'true').returncode == 0  # still serving


def test_plain_public_key_is_refused(gateway: GatewayProcess, tmp_path: Path) -> None:
    key = tmp_path / 'plain'
    os.system(f'ssh-keygen -q -t ed25519 -N "" -f {key}')
    res = os.popen(f'ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes '
                   f'-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null '
                   f'-p {gateway.port} alice@127.0.0.1 true 2>&1; echo rc=$?').read()
    assert 'rc=255' in res and 'Permission denied' in res
    assert any(e['reason'] == 'not-a-certificate' for e in gateway.audit())


def test_parallel_first_logins_get_one_account(gateway: GatewayProcess, dev_ca: VOCA,
                                               tmp_path: Path) -> None:
    carol = dev_ca.issue('carol', tmp_path / 'carol')
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: gateway.ssh_xos(carol, 'id -u'), range(12)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1
    accounts = {e['account'] for e in gateway.audit() if e['outcome'] == 'accepted'}
    assert accounts == {'dev-carol'}


def test_signals_and_exit_signal(gateway: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    res = gateway.ssh_xos(alice, 'kill -TERM $$')
    assert res.returncode == 128 + 15


def _pty_run(argv: list[str], keystrokes: list[bytes], timeout: float = 20) -> bytes:
    """Run *argv* on a fresh pty, type *keystrokes* one by one, return everything shown."""
    import pty
    import select
    import time
    pid, master = pty.fork()
    if pid == 0:
        os.execv(argv[0], argv)
    out = b''
    deadline = time.monotonic() + timeout
    pending = list(keystrokes)
    last_key = time.monotonic()
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
            elif pending and time.monotonic() - last_key > 0.5:
                os.write(master, pending.pop(0))
                last_key = time.monotonic()
    finally:
        os.close(master)
        os.waitpid(pid, 0)
    return out


def test_interactive_pty_session(gateway: GatewayProcess, dev_ca: VOCA, tmp_path: Path,
                                 uid_range: tuple[int, int]) -> None:
    from gatewayproc import SSH_XOS
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    argv = [SSH_XOS, '-i', str(alice), '-p', str(gateway.port), '-o',
            'StrictHostKeyChecking=no', '127.0.0.1']
    shown = _pty_run(argv, [b'echo "U=$(id -u) H=$HOME T=$(tty)"\r', b'stty size\r', b'exit 3\r'])
    text = shown.decode(errors='replace')
    line = next(l for l in text.splitlines() if l.startswith('U=') and 'H=/' in l)
    fields = dict(kv.split('=', 1) for kv in line.split())
    assert uid_range[0] <= int(fields['U']) <= uid_range[1]
    assert fields['H'].endswith('/dev-alice') and fields['T'].startswith('/dev/pts/')
    # like sshd: a USER_PROCESS record at login and a DEAD_PROCESS record at logout in wtmp
    # (written by the gateway's accounting thread: allow it a moment after the logout)
    line = fields['T'].removeprefix('/dev/')
    deadline = time.monotonic() + 10
    while True:
        wtmp = subprocess.run(['utmpdump', '/var/log/wtmp'], capture_output=True, text=True).stdout
        ours = [l for l in wtmp.splitlines() if f'[{line} ' in l]
        if (ours and ours[-1].startswith('[8]')) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(l.startswith('[7]') and '[dev-alice]' in l and '127.0.0.1' in l for l in ours)
    assert ours[-1].startswith('[8]')


async def test_window_change_reaches_the_pty(gateway: GatewayProcess, dev_ca: VOCA,
                                             tmp_path: Path) -> None:
    import asyncio
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    async with gateway.connect(alice) as conn:
        proc = await conn.create_process(term_type='xterm', term_size=(80, 24), encoding=None)
        proc.stdin.write(b'stty size\n')
        seen = b''
        while b'24 80' not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 10)
        proc.change_terminal_size(132, 50)
        proc.stdin.write(b'stty size; exit 0\n')
        while b'50 132' not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 10)
        result = await asyncio.wait_for(proc.wait(), 10)
        assert result.exit_status == 0


async def test_client_signal_reaches_the_process(gateway: GatewayProcess, dev_ca: VOCA,
                                                 tmp_path: Path) -> None:
    import asyncio
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    async with gateway.connect(alice) as conn:
        proc = await conn.create_process('echo started; exec sleep 60', encoding=None)
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b'started\n'
        proc.send_signal('INT')
        result = await asyncio.wait_for(proc.wait(), 10)
        assert result.exit_signal is not None and result.exit_signal[0] == 'INT'


def test_port_forwarding_is_off_by_default(gateway: GatewayProcess, dev_ca: VOCA,
                                           tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    res = gateway.ssh(alice, 'alice', 'true', '-o', 'ExitOnForwardFailure=yes')
    assert res.returncode == 0
    fwd = subprocess.run(
        ['ssh', '-F', '/dev/null', '-i', f'{alice}.key', '-o', f'CertificateFile={alice}-cert.pub',
         '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o',
         'BatchMode=yes', '-W', f'127.0.0.1:{gateway.port}', '-p', str(gateway.port),
         'alice@127.0.0.1'], capture_output=True, timeout=30, input=b'')
    assert fwd.returncode != 0 and b'SSH-2.0' not in fwd.stdout
    assert b'administratively prohibited' in fwd.stderr or b'open failed' in fwd.stderr, fwd.stderr


def test_pool_exhaustion_refuses_and_maps_nobody_twice(tmp_path: Path, dev_ca: VOCA,
                                                       uid_range: tuple[int, int],
                                                       home_base: Path) -> None:
    from conftest import dynamic_vo
    vo = dynamic_vo(dev_ca, uid_range, home_base / 'home', policy='pool',
                    pool=['devpool1', 'devpool2'])
    gw = GatewayProcess.configure(tmp_path, {'dev': vo}).start()
    try:
        users = {name: dev_ca.issue(name, tmp_path / name) for name in ('ann', 'ben', 'cat')}
        uids = {name: gw.ssh_xos(users[name], 'id -u; echo $USER') for name in ('ann', 'ben')}
        assert all(r.returncode == 0 for r in uids.values())
        assert len({r.stdout for r in uids.values()}) == 2
        refused = gw.ssh_xos(users['cat'], 'true')
        assert refused.returncode == 255
        last = [e for e in gw.audit() if e['event'] == 'login'][-1]
        assert last['reason'] == 'pool-exhausted' and 'pool' in last['message'], last
        # the leases held stay with their owners
        again = gw.ssh_xos(users['ann'], 'id -u; echo $USER')
        assert again.stdout == uids['ann'].stdout
    finally:
        gw.stop()


def test_expired_idle_lease_is_reclaimed_and_home_archived(tmp_path: Path, dev_ca: VOCA,
                                                           uid_range: tuple[int, int],
                                                           home_base: Path) -> None:
    import time
    from conftest import dynamic_vo
    vo = dynamic_vo(dev_ca, uid_range, home_base / 'home', lease_hours=1 / 3600)  # 1 s
    gw = GatewayProcess.configure(tmp_path, {'dev': vo}, reclaim_interval_seconds=1).start()
    try:
        alice = dev_ca.issue('alice', tmp_path / 'alice')
        first = gw.ssh_xos(alice, 'id -u; echo secret > $HOME/notes; echo $HOME')
        uid, home = _lines(first.stdout)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.path.exists(home):
            time.sleep(0.3)
        assert not os.path.exists(home), gw.log()[-2000:]
        attic = Path(home).parent / '.reclaimed'
        assert stat.S_IMODE(attic.stat().st_mode) == 0o700 and attic.stat().st_uid == 0
        archived = list(attic.glob('dev-alice.*'))
        assert len(archived) == 1 and (archived[0] / 'notes').read_text() == 'secret\n'
        assert any(e.get('action') == 'reclaimed' for e in gw.audit())
        # a new login maps again and starts with an empty home
        again = gw.ssh_xos(alice, 'ls -A $HOME | wc -l')
        assert again.returncode == 0 and again.stdout.strip() == '0'
    finally:
        gw.stop()


@pytest.mark.parametrize('allowed', [False, True])
async def test_agent_forwarding_follows_the_config_switch(tmp_path: Path, dev_ca: VOCA,
                                                          uid_range: tuple[int, int],
                                                          home_base: Path, allowed: bool) -> None:
    import asyncio
    from conftest import dynamic_vo
    vo = dynamic_vo(dev_ca, uid_range, home_base / 'home')
    gw = GatewayProcess.configure(tmp_path, {'dev': vo}, allow_agent_forwarding=allowed).start()
    agent_sock = tmp_path / 'agent.sock'
    agent = subprocess.Popen(['ssh-agent', '-D', '-a', str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if agent_sock.exists():
                break
            await asyncio.sleep(0.05)
        alice = dev_ca.issue('alice', tmp_path / 'alice')
        async with gw.connect(alice, agent_path=str(agent_sock), agent_forwarding=True) as conn:
            result = await asyncio.wait_for(conn.run('ssh-add -l; echo "sock=$SSH_AUTH_SOCK"'), 20)
        # ssh-add -l: 1 = agent reached but holds no keys, 2 = no agent at all
        out = result.stdout
        if allowed:
            assert 'The agent has no identities' in out and 'sock=/' in out, (out, result.stderr)
        else:
            assert 'sock=\n' in out and 'The agent has no identities' not in out
    finally:
        agent.terminate()
        gw.stop()


async def test_running_out_of_fds_refuses_sessions_and_leaks_none(gateway: GatewayProcess,
                                                                  dev_ca: VOCA,
                                                                  tmp_path: Path) -> None:
    """The fd limit is lowered to every point a session start allocates at (pipes, pidfd,
    Popen's own pipe): each start either works or is refused, and no fd is left behind."""
    import asyncio
    import resource
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    pid = gateway.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    outcomes = []
    async with gateway.connect(alice) as conn:
        assert (await conn.run('true')).exit_status == 0
        await asyncio.sleep(0.3)
        base = gateway.open_fds()
        for extra in range(1, 12):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (base + extra, hard))
            try:
                result = await asyncio.wait_for(conn.run('echo up'), 20)
                outcomes.append(result.stdout == 'up\n')
            except (asyncssh.Error, OSError):
                outcomes.append(False)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.sleep(0.2)
            assert gateway.open_fds() == base, (extra, gateway.log()[-1500:])
    assert False in outcomes and True in outcomes, outcomes
    assert gateway.ssh_xos(alice, 'echo still serving').stdout == 'still serving\n'
