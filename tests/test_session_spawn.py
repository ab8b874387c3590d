"""Starting a session process never makes the gateway wait on anything the account controls.

The gateway used to fork, drop to the account and only then (still before exec) take the
tty and chdir home, while ``subprocess.Popen`` blocked its event loop until the exec: a user
who stopped their own processes (``kill -STOP -1`` in a loop) or whose home hung (a FUSE
mount of theirs, a dead NFS server) froze every login of every user.  Sessions now start
through the exec shim ``xos-session-exec`` (``native/xos_session_exec.c``), which the gateway
starts as root; the drop, the tty and the home come after the gateway's ``Popen`` returned.

Real gateway, real clients, real uids, a real FUSE mount that never answers.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import dynamic_vo
from crhelpers import wait_for
from gatewayproc import TEST_LIMITS, VOCA, XOS_SSHD, GatewayProcess, run

REPO = Path(__file__).resolve().parent.parent
SHIM = REPO / 'native' / 'build' / 'xos-session-exec'

#: The account stops every process it may signal, as fast as it can (never itself).
STOP_LOOP = ("python3 -c 'import os, signal\n"
             "while True:\n"
             "    try: os.kill(-1, signal.SIGSTOP)\n"
             "    except OSError: pass'")
#: Session starts raced against the loop (one stopped start froze the gateway for good).
ATTEMPTS = 60


@pytest.fixture(scope='module', autouse=True)
def shim() -> Path:
    """The exec shim, built as ``make test`` builds it."""
    res = subprocess.run(['make', '-C', str(REPO / 'native'), 'exec'], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return SHIM


def _gateway(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
             session: str = '', limits: dict[str, Any] | None = None,
             **vo: Any) -> GatewayProcess:
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home', **vo)},
        limits={**TEST_LIMITS, **(limits or {})})
    if session:
        gw.config.write_text(gw.config.read_text() + '\n[session]\n' + session + '\n')
    return gw.start()


async def _served(gw: GatewayProcess, prefix: Path, login: str) -> bool:
    """Whether a new connection of *login* gets a command run within 30 s (a liveness
    bound, not a speed one: a frozen gateway never answers)."""
    try:
        async with asyncio.timeout(30):
            async with gw.connect(prefix, login=login) as conn:
                return (await conn.run('echo served')).stdout == 'served\n'
    except (TimeoutError, OSError):
        return False


# --------------------------------------------------------------------------- the freeze


async def test_a_user_stopping_their_own_processes_never_freezes_the_gateway(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> None:
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                  limits={'max_sessions_per_connection': ATTEMPTS + 5})
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    started = 0
    try:
        assert await _served(gw, bob, 'bob')  # bob's account exists before the attack
        async with gw.connect(alice) as attacker, gw.connect(alice) as victim:
            await attacker.create_process(STOP_LOOP)
            await asyncio.sleep(0.5)
            for _ in range(ATTEMPTS):  # each start races the loop; stopped ones stay open
                try:
                    await asyncio.wait_for(victim.create_process('true'), 10)
                except TimeoutError:
                    break  # the gateway stopped answering
                started += 1
            other_user_served = await _served(gw, bob, 'bob')
            attacker.abort()
            victim.abort()
    finally:
        gw.stop()
    assert started == ATTEMPTS and other_user_served, (started, gw.log()[-2000:])


def _hang(home: str, uid: int, gid: int) -> int:
    """Mount a FUSE file system over *home* whose server never answers (the account's own,
    as ``user_id`` says, or a dead NFS server): any access to it as the account blocks.
    Returns the server's /dev/fuse descriptor; closing it aborts the file system."""
    fd = os.open('/dev/fuse', os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f'fd={fd},rootmode=40000,user_id={uid},group_id={gid}'.encode()
    if libc.mount(b'xos-hang', home.encode(), b'fuse', 0, opts) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        pytest.skip(f'cannot mount FUSE here: {os.strerror(err)}')
    return fd


@pytest.mark.skipif(not os.path.exists('/dev/fuse'), reason='no /dev/fuse')
async def test_a_home_that_hangs_never_freezes_the_gateway(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> None:
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base)
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    try:
        assert await _served(gw, bob, 'bob')
        async with gw.connect(alice) as conn:
            uid, gid, home = (await conn.run('id -u; id -g; echo $HOME')).stdout.split()
            fuse = _hang(home, int(uid), int(gid))
            try:
                # the session's chdir(home) hangs: only that session waits for it
                proc = await asyncio.wait_for(conn.create_process('pwd'), 30)
                other_user_served = await _served(gw, bob, 'bob')
            finally:
                os.close(fuse)  # the server is gone: the hung chdir fails (ENOTCONN)
                subprocess.run(['umount', '-l', home], check=True)
            result = await asyncio.wait_for(proc.wait(), 30)
        assert other_user_served, gw.log()[-2000:]
        assert (result.exit_status, result.stdout) == (0, '/\n')  # started in / instead
    finally:
        gw.stop()


# --------------------------------------------------------------------------- what it gets


def _status(pid: int) -> dict[str, str]:
    lines = Path(f'/proc/{pid}/status').read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(':') for line in lines)}


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f'/proc/{pid}/limits').read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def _member_gids(gw: GatewayProcess, account: str) -> set[int]:
    """The supplementary groups the AMS gives *account* (its NSS group table)."""
    gids = set()
    for line in (gw.state / 'nss' / 'group').read_text().splitlines():
        name, _, gid, members = line.split(':')
        if account in members.split(','):
            gids.add(int(gid))
    return gids


REPORT = ("printf 'PID %s\\n' $$; tr '\\0' '\\n' < /proc/$$/environ | sed 's/^/ENV /'; "
          "echo END; exec sleep 120")


@pytest.mark.parametrize('pty', [False, True], ids=['exec', 'pty'])
async def test_the_session_process_is_exactly_the_account(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
        pty: bool) -> None:
    """ids, groups, no_new_privs, signals, session, tty, limits, environment, cwd, fds."""
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                  session='rlimits = { nofile = [777, 888], core = 0 }')
    alice = dev_ca.issue('alice', tmp_path / 'alice', '--group', 'physics', '--group', 'cms')
    try:
        async with gw.connect(alice) as conn:
            uid, gid, home = (await conn.run('id -u; id -g; echo $HOME')).stdout.split()
            kw: dict[str, Any] = {'term_type': 'xterm', 'term_size': (80, 24)} if pty else {}
            proc = await conn.create_process(REPORT, **kw)
            out = ''
            while 'END' not in out:
                out += await asyncio.wait_for(proc.stdout.read(4096), 10)
            lines = [line.rstrip('\r') for line in out.splitlines()]
            pid = int(next(line for line in lines if line.startswith('PID '))[4:])
            env = dict(line[4:].split('=', 1) for line in lines if line.startswith('ENV '))
            # exec'd and asleep (comm changes before exec has closed the close-on-exec fds)
            wait_for(lambda: Path(f'/proc/{pid}/comm').read_text() == 'sleep\n'
                     and _status(pid)['State'].startswith('S'), 10, 'sleep')
            st = _status(pid)
            stat = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
            limits = _limits(pid)
            cwd = os.readlink(f'/proc/{pid}/cwd')
            fds = sorted(os.listdir(f'/proc/{pid}/fd'), key=int)
            links = {fd: os.readlink(f'/proc/{pid}/fd/{fd}') for fd in fds}
            proc.kill()
        assert st['Uid'].split() == [uid] * 4 and st['Gid'].split() == [gid] * 4
        groups = {int(g) for g in st['Groups'].split()}
        assert groups == _member_gids(gw, 'dev-alice') and len(groups) == 2
        assert st['NoNewPrivs'] == '1'
        assert int(st['SigBlk'], 16) == 0 and int(st['SigIgn'], 16) == 0
        pgrp, session, tty_nr, tpgid = (int(x) for x in stat[2:6])
        assert pgrp == session == pid  # a session leader
        if pty:
            assert tty_nr != 0 and tpgid == pid  # its controlling terminal, in the foreground
        else:
            assert tty_nr == 0
        assert limits['Max open files'] == ('777', '888')
        assert limits['Max core file size'] == ('0', '0')
        assert cwd == home
        assert fds == ['0', '1', '2'], links  # nothing of the gateway's or the shim's
        expected = {'HOME', 'USER', 'LOGNAME', 'SHELL', 'PATH', 'XOS_VO', 'XOS_USER', 'XOS_ROLE',
                    'XOS_CR_SOCKET'} | ({'TERM'} if pty else set())
        assert set(env) == expected, env
        assert (env['HOME'], env['USER'], env['XOS_USER']) == (home, 'dev-alice', 'alice')
    finally:
        gw.stop()


def test_an_unusable_home_starts_the_session_in_root(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> None:
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base)
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    try:
        home = gw.ssh_xos(alice, 'echo $HOME').stdout.strip()
        os.chmod(home, 0)  # its owner may do that; the chdir then fails (as the account)
        res = gw.ssh_xos(alice, 'pwd')
        assert (res.returncode, res.stdout, res.stderr) == (0, '/\n', '')
    finally:
        gw.stop()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize('shell, status, text', [
    ('/nonexistent/shell', 127, 'No such file or directory'),
    ('NOT-EXECUTABLE', 126, 'Permission denied'),
])
def test_a_program_that_cannot_run_is_told_on_stderr_with_a_shell_status(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
        shell: str, status: int, text: str) -> None:
    """The shim fails after the gateway returned: one line on the session's stderr, a
    shell's status (and the gateway audits that status, as any other)."""
    if shell == 'NOT-EXECUTABLE':
        shell = str(home_base / 'plain-file')
        Path(shell).write_text('#!/bin/sh\n')
        os.chmod(shell, 0o644)
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base, shell=shell)
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    try:
        for client in (gw.ssh_xos, lambda prefix, cmd: gw.ssh(prefix, 'alice', cmd)):
            res = client(alice, 'echo SHOULD-NOT-RUN')
            assert res.returncode == status, (res, gw.log()[-1500:])
            assert res.stdout == ''
            assert f'xos-sshd: cannot run {shell}: {text}' in res.stderr, res.stderr
        wait_for(lambda: len([e for e in gw.audit() if e['event'] == 'session'
                              and e['action'] == 'close']) == 2, 10, 'two close events')
        closes = [e for e in gw.audit() if e['event'] == 'session' and e['action'] == 'close']
        assert [e['exit_status'] for e in closes] == [status, status]
        assert gw.ssh_xos(alice, 'true').returncode == status and gw.alive()
    finally:
        gw.stop()


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A root-owned 0755 directory (pytest's tmp dirs are 0700, which is fine too, but
    here the mode is part of the test)."""
    d = Path(tempfile.mkdtemp(prefix='xos-test-shim-'))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_missing_or_unsafe_shim_refuses_the_session(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
        root_dir: Path, shim: Path) -> None:
    """``[session] exec_helper``: the shim runs as root at every session, so one that others
    could replace is never run; a missing one refuses sessions with the way out."""
    good = root_dir / 'good' / 'xos-session-exec'
    loose = root_dir / 'loose' / 'xos-session-exec'
    for copy, file_mode, dir_mode in ((good, 0o755, 0o755), (loose, 0o755, 0o777)):
        copy.parent.mkdir()
        shutil.copy(shim, copy)
        copy.chmod(file_mode)
        copy.parent.chmod(dir_mode)
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    cases = [(root_dir / 'missing', 'session exec helper not found'),
             (loose, 'must be root-owned, not group/world-writable'),
             (good, '')]
    for helper, refusal in cases:
        gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                      session=f'exec_helper = "{helper}"')
        try:
            doctor = run(XOS_SSHD, 'doctor', '--config', str(gw.config), check=False)
            line = next(l for l in doctor.stdout.splitlines() if 'session exec helper:' in l)
            assert line.startswith('FAIL' if refusal else 'OK'), line
            assert refusal.removeprefix('session exec helper ') in line
            assert ('fix: make -C native install' in line) == bool(refusal)
            res = gw.ssh_xos(alice, 'echo ran')
            if refusal:
                assert res.returncode == 255 and res.stdout == '', res
                assert refusal in res.stderr, res.stderr
                last = [e for e in gw.audit() if e['event'] == 'session'][-1]
                assert (last['outcome'], last['reason']) == ('refused', 'spawn-failed'), last
            else:
                assert (res.returncode, res.stdout) == (0, 'ran\n'), res
        finally:
            gw.stop()
        gw.config.unlink()
        (gw.state / 'audit.log').unlink(missing_ok=True)


def _shim(args: list[str], env: bytes) -> subprocess.CompletedProcess[str]:
    """Run the shim directly (as root) with *env* on a memfd; ``{fd}`` in *args* is its number."""
    fd = os.memfd_create('env')
    try:
        os.write(fd, env)
        os.lseek(fd, 0, os.SEEK_SET)
        return subprocess.run([str(SHIM), *(a.replace('{fd}', str(fd)) for a in args)],
                              pass_fds=(fd,), capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)


def test_the_shim_refuses_root_and_bad_requests_with_one_line() -> None:
    base = ['--gid', '65534', '--home', '/', '--env-fd', '{fd}']
    for args, env, text in [
        (['--uid', '0', *base, '--', '/bin/true', 'true'], b'', 'refusing to start a process '
         'as uid 0/gid 65534'),
        (['--uid', '65534', '--gid', '0', '--home', '/', '--env-fd', '{fd}', '--', '/bin/true',
          'true'], b'', 'refusing to start a process as uid 65534/gid 0'),
        (['--uid', '65534x', *base, '--', '/bin/true', 'true'], b'', "bad --uid value '65534x'"),
        (['--uid', '65534', *base], b'', 'usage: xos-session-exec'),
        (['--uid', '65534', '--bogus', '1', *base, '--', '/bin/true', 'x'], b'',
         "unknown option '--bogus'"),
        (['--uid', '65534', *base, '--', '/bin/true', 'true'], b'NOEQUALS\0',
         "bad environment entry 'NOEQUALS'"),
        (['--uid', '65534', *base, '--rlimit', '7:9:1', '--', '/bin/true', 'true'], b'',
         'cannot set resource limits: resource 7: Invalid argument'),
        (['--uid', '65534', *base, '--groups', '100,0', '--', '/bin/true', 'true'], b'',
         "bad --groups value '0'"),
        (['--uid', '65534', *base, '--groups', '100', '--groups', '1,2,3,4,5,6,7,8,9,10,11',
          '--', '/bin/true', 'true'], b'', '--groups given twice'),
    ]:
        res = _shim(args, env)
        assert res.returncode == 125 and res.stdout == '', (args, res)
        assert res.stderr.startswith('xos-sshd: ') and res.stderr.count('\n') == 1, res.stderr
        assert text in res.stderr, res.stderr
    ok = _shim(['--uid', '65534', '--groups', '', *base, '--', '/bin/sh', 'sh', '-c',
                'id -u; id -G; echo "$A"; ls /proc/$$/fd'], b'A=1\0')
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, '65534\n65534\n1\n0\n1\n2\n', '')


def test_the_users_process_dies_with_the_pam_helper(tmp_path: Path) -> None:
    """``die_with_parent`` (the PAM helper's child): SIGKILL the parent, the process dies."""
    code = ('import os, sys; from xos_sshd.session.spawn import Stdio, popen_as\n'
            'p = popen_as(65534, 65534, [], "/", ["sleep", "120"], {"PATH": "/bin"}, '
            'Stdio(0, 1, 2), executable="/bin/sleep", die_with_parent=True)\n'
            'print(p.pid, flush=True)\n'
            'os.read(0, 1)\n')
    parent = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=REPO)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        wait_for(lambda: Path(f'/proc/{pid}/comm').read_text() == 'sleep\n', 10, 'exec')
        assert _status(pid)['Uid'].split() == ['65534'] * 4
        parent.kill()
        parent.wait()
        wait_for(lambda: not Path(f'/proc/{pid}').exists()
                 or _status(pid)['State'].startswith('Z'), 10, 'the child to die')
    finally:
        parent.kill()
        parent.wait()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- hang-up


def _zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                fields = Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if fields[0] == 'Z' and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _running_as(uid: int, comm: str) -> list[int]:
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if (os.stat(f'/proc/{entry}').st_uid == uid
                        and Path(f'/proc/{entry}/comm').read_text().strip() == comm):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


#: A session whose processes ignore the hang-up; the pty one notes when its tty is gone.
IGNORING = ('trap "" HUP; echo ready; '
            'while sleep 0.2; do echo tick 2>/dev/null || break; done; '
            'touch "$HOME/hung-up-$N"; exec sleep 600')
SESSIONS = 6


async def test_sessions_that_ignore_the_hang_up_leave_nothing_in_the_gateway(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> None:
    """As under sshd, the channel's close closes the pty master (the process sees EIO) and
    the gateway lets the process go: no descriptor stays (pidfd, pty, pipes), the close is
    audited once, the session no longer counts, and the process is reaped when it ends."""
    from gatewayproc import kill_uid_processes
    gw = _gateway(tmp_path, dev_ca, uid_range, home_base,
                  limits={'max_sessions_per_account': 2})
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    try:
        async with gw.connect(alice) as conn:
            uid, home = (await conn.run('id -u; echo $HOME')).stdout.split()
            await asyncio.sleep(0.5)  # the first session's threads and timers have settled
            base = gw.open_fds()
            for n in range(SESSIONS):
                pty = n % 2 == 1
                kw: dict[str, Any] = {'term_type': 'xterm'} if pty else {}
                cmd = (IGNORING.replace('$N', str(n)) if pty
                       else 'trap "" HUP; echo ready; exec sleep 600')
                proc = await conn.create_process(cmd, **kw)
                assert 'ready' in await asyncio.wait_for(proc.stdout.readline(), 10)
                proc.close()  # the client closes the channel; the process runs on
                await asyncio.wait_for(proc.wait_closed(), 10)
            # the pty sessions' processes saw their tty hang up (EIO on write)
            wait_for(lambda: all(Path(home, f'hung-up-{n}').exists()
                                 for n in range(1, SESSIONS, 2)), 20, 'EIO on the hung-up ttys')
            wait_for(lambda: gw.open_fds() == base, 30, 'the gateway fds back to the baseline')
            assert len(_running_as(int(uid), 'sleep')) == SESSIONS  # left running, as orphans
            # they do not count: the account may open its two sessions
            two = [await conn.create_process('cat'), await conn.create_process('cat')]
            for proc in two:
                proc.stdin.write('x\n')
                assert await asyncio.wait_for(proc.stdout.readline(), 10) == 'x\n'
                proc.stdin.write_eof()
                await asyncio.wait_for(proc.wait_closed(), 10)
        closes = [e for e in gw.audit() if e['event'] == 'session' and e['action'] == 'close']
        left = [e for e in closes if e.get('running')]
        assert len(left) == SESSIONS and len({e['session'] for e in left}) == SESSIONS, closes
        # when they end, the gateway reaps them (it holds no pidfd any more)
        assert gw.proc is not None
        kill_uid_processes(*uid_range)
        wait_for(lambda: not _zombie_children(gw.proc.pid), 30, 'the orphans reaped')
        assert gw.open_fds() <= base and gw.alive()
    finally:
        gw.stop()
