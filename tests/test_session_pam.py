"""``[session]``: PAM sessions through real Linux-PAM, and resource limits from the config.

Real gateway, real clients (``ssh-xos``, asyncssh), real PAM modules (pam_limits with a
private ``conf=``, pam_env with private ``conffile=``/``envfile=``, pam_exec logging
open/close, pam_deny).  The PAM stack is a file in a private root-owned directory
(``[session] pam_confdir``: ``pam_start_confdir``), so /etc/pam.d is never touched.  PAM
modules look the account up by name, so the PAM gateway runs in a private mount namespace
whose ``/etc/nsswitch.conf`` names ``xos`` (libnss_xos from ``native/build``, its tables from
the gateway's ``STATE/nss``), as on a real node.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dynamic_vo
from crhelpers import wait_for
from gatewayproc import XOS_SSHD, VOCA, GatewayProcess
from test_cr_e2e import ca, cr_env, make_gateway, xcr  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / 'native'
SERVICE = 'xos-pamtest'


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope='module')
def nss_module() -> Path:
    res = subprocess.run(['make', '-C', str(NATIVE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return NATIVE / 'build'


class NsGateway(GatewayProcess):
    """A gateway in its own mount namespace set up as the README says a node is: libnss_xos
    in the library directory, its tables in /var/lib/xos-sshd/nss (here: this gateway's
    ``STATE/nss``), ``passwd``/``group`` naming ``xos`` in nsswitch.conf.  Overlay mounts
    give the namespace those files; the host's are not touched.  Even the setgid
    ``unix_chkpwd`` that pam_unix runs (no LD_LIBRARY_PATH, no XOS_NSS_DIR for it) finds the
    accounts, as on a real node."""

    def start(self, debug: bool = True) -> 'NsGateway':
        ns = self.base / 'ns'
        for d in ('lib-up', 'lib-work', 'var-up/xos-sshd/nss', 'var-work'):
            (ns / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(NATIVE / 'build' / 'libnss_xos.so.2', ns / 'lib-up')
        (self.state / 'nss').mkdir(mode=0o755, exist_ok=True)
        lines = [l for l in Path('/etc/nsswitch.conf').read_text().splitlines()
                 if not re.match(r'\s*(passwd|group)\s*:', l)]
        nsswitch = ns / 'nsswitch.conf'
        nsswitch.write_text('\n'.join(lines + ['passwd: files xos', 'group: files xos']) + '\n')
        libdir = os.path.realpath('/lib/' + (sysconfig.get_config_var('MULTIARCH') or ''))
        script = (f'mount -t overlay overlay -o lowerdir={libdir},upperdir={ns}/lib-up,'
                  f'workdir={ns}/lib-work {libdir} && '
                  f'mount -t overlay overlay -o lowerdir=/var/lib,upperdir={ns}/var-up,'
                  f'workdir={ns}/var-work /var/lib && '
                  f'mount --bind {self.state}/nss /var/lib/xos-sshd/nss && '
                  f'mount --bind {nsswitch} /etc/nsswitch.conf && exec "$@"')
        # unshare and sh exec: the gateway keeps this pid (its /proc/PID/limits is read)
        super().start(debug, wrapper=['unshare', '-m', '--propagation', 'private',
                                      'sh', '-c', script, 'sh'])
        return self


@pytest.fixture
def pam_dir() -> Iterator[Path]:
    """Root-owned 0755: the PAM stack and its module files (the helper refuses others)."""
    d = Path(tempfile.mkdtemp(prefix='xos-pamtest-'))
    d.chmod(0o755)
    (d / 'limits.conf').write_text('dev-alice  -  nofile  777\n')
    (d / 'pam_env.conf').write_text('PAMTEST_CONF  DEFAULT=from-conffile\n')
    # the envfile also tries to replace what the session's identity is made of
    (d / 'environment').write_text('PAMTEST_ENVFILE=from-envfile\nHOME=/pam-home\n'
                                   'USER=pam-user\nXOS_VO=pam-vo\nSSH_CONNECTION=x\n')
    hook = d / 'hook.sh'
    hook.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER $PAM_TTY $PAM_RHOST" >> {d}/hook.log\n')
    hook.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def good_stack(d: Path) -> str:
    return (f'auth     required pam_deny.so\n'
            f'account  required pam_nologin.so\n'
            f'account  required pam_unix.so broken_shadow\n'
            f'session  required pam_limits.so conf={d}/limits.conf\n'
            f'session  required pam_env.so conffile={d}/pam_env.conf envfile={d}/environment\n'
            f'session  required pam_exec.so {d}/hook.sh\n'
            f'session  required pam_unix.so\n')


def write_stack(d: Path, text: str) -> None:
    path = d / SERVICE
    path.write_text(text)
    path.chmod(0o644)


def session_table(gw: GatewayProcess, lines: list[str]) -> None:
    gw.config.write_text(gw.config.read_text() + '\n[session]\n' + '\n'.join(lines) + '\n')


@pytest.fixture
def pam_gateway(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
                pam_dir: Path, nss_module: Path) -> Iterator[NsGateway]:
    write_stack(pam_dir, good_stack(pam_dir))
    gw = NsGateway.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')})
    session_table(gw, ['pam = true', f'pam_service = "{SERVICE}"', f'pam_confdir = "{pam_dir}"'])
    gw.start()
    yield gw
    gw.stop()


def nofile(pid: int) -> tuple[str, str]:
    """(soft, hard) 'Max open files' of *pid*."""
    for line in Path(f'/proc/{pid}/limits').read_text().splitlines():
        if line.startswith('Max open files'):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError('no Max open files line')


def limits_of(text: str, names: Any) -> dict[str, tuple[str, str]]:
    """(soft, hard) of the named lines of a /proc/PID/limits text."""
    found = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + ' '):
                soft, hard = line[len(name):].split()[:2]
                found[name] = (soft, hard)
    return found


def hook_log(d: Path) -> list[str]:
    path = d / 'hook.log'
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------- PAM on


async def test_pam_session_sets_limits_and_environment_and_is_closed(
        pam_gateway: NsGateway, dev_ca: VOCA, tmp_path: Path, pam_dir: Path) -> None:
    gw = pam_gateway
    assert gw.proc is not None
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    gateway_limits = nofile(gw.proc.pid)
    res = await asyncio.to_thread(
        gw.ssh_xos, alice, 'ulimit -Sn; ulimit -Hn; '
        'echo "$PAMTEST_CONF|$PAMTEST_ENVFILE|$HOME|$USER|$XOS_VO|${SSH_CONNECTION-unset}"; exit 7')
    assert res.returncode == 7, res.stderr + gw.log()[-3000:]
    soft, hard, env = res.stdout.splitlines()
    assert (soft, hard) == ('777', '777')
    conf, envfile, home, user, vo, ssh_conn = env.split('|')
    assert (conf, envfile) == ('from-conffile', 'from-envfile')
    # PAM may add to the environment, never replace who the session is (nor sshd's denylist)
    assert home.endswith('/home/dev-alice') and user == 'dev-alice' and vo == 'dev'
    assert ssh_conn == 'unset'
    # pam_limits acted on the per-session helper, never on the gateway itself
    assert nofile(gw.proc.pid) == gateway_limits and gateway_limits[0] != '777'
    # the session was opened and closed, with sshd's items (no pty: PAM_TTY "ssh")
    assert hook_log(pam_dir) == ['open_session dev-alice ssh 127.0.0.1',
                                 'close_session dev-alice ssh 127.0.0.1']

    # exit-signal propagates through the helper (ssh-xos: 128 + N)
    killed = await asyncio.to_thread(gw.ssh_xos, alice, 'kill -TERM $$')
    assert killed.returncode == 128 + 15, killed.stderr

    async with gw.connect(alice) as conn:
        # a client signal reaches the user's process through the helper
        proc = await conn.create_process('echo started; exec sleep 60', encoding=None)
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b'started\n'
        proc.send_signal('INT')
        result = await asyncio.wait_for(proc.wait(), 10)
        assert result.exit_signal is not None and result.exit_signal[0] == 'INT'
        # STOP is no SSH signal name (RFC 4254): ignored, as by sshd -- it would stop the
        # root helper itself, which could then never close the PAM session
        proc = await conn.create_process('echo started; exec sleep 60', encoding=None)
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b'started\n'
        proc.send_signal('STOP')
        proc.send_signal('TERM')
        result = await asyncio.wait_for(proc.wait(), 10)
        assert result.exit_signal is not None and result.exit_signal[0] == 'TERM'
        # KILL: the helper kills the user's process, closes the PAM session, dies of KILL too
        closes = hook_log(pam_dir).count('close_session dev-alice ssh 127.0.0.1')
        proc = await conn.create_process('echo $$; exec sleep 60', encoding=None)
        pid = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        proc.send_signal('KILL')
        result = await asyncio.wait_for(proc.wait(), 10)
        assert result.exit_signal is not None and result.exit_signal[0] == 'KILL'
        for _ in range(100):
            try:
                if Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] == 'Z':
                    break
            except FileNotFoundError:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f'user process {pid} outlived its killed PAM helper')
        for _ in range(100):  # the KILLed session was closed, like every other one
            if hook_log(pam_dir).count('close_session dev-alice ssh 127.0.0.1') > closes:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f'no close_session after KILL: {hook_log(pam_dir)}')
        # a pty session: PAM_TTY is the terminal; the tty is the process's controlling one
        proc = await conn.create_process(term_type='xterm', term_size=(80, 24), encoding=None)
        proc.stdin.write(b'echo "T=$(tty) N=$(ulimit -n)"; exit 3\n')
        result = await asyncio.wait_for(proc.wait(), 15)
        assert result.exit_status == 3
        shown = result.stdout.decode(errors='replace')
        tty = re.search(r'T=(/dev/pts/\d+) N=777', shown)
        assert tty, shown
    lines = hook_log(pam_dir)
    assert f'open_session dev-alice {tty.group(1)} 127.0.0.1' in lines
    assert f'close_session dev-alice {tty.group(1)} 127.0.0.1' in lines
    assert 'refused' not in gw.log()


async def test_a_pam_session_whose_process_ignores_the_hang_up_is_let_go(
        pam_gateway: NsGateway, dev_ca: VOCA, tmp_path: Path, pam_dir: Path) -> None:
    """The channel closes, the user's process ignores SIGHUP: the gateway keeps no descriptor
    of the session (pidfd, pty, the helper's status pipe); the root helper keeps the PAM
    session open while the process runs, closes it when it ends, and is reaped."""
    gw = pam_gateway
    assert gw.proc is not None
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    closed = 'close_session dev-alice'
    async with gw.connect(alice) as conn:
        assert (await conn.run('true')).exit_status == 0
        await asyncio.sleep(0.5)
        base, pids = gw.open_fds(), []
        for kw in ({}, {'term_type': 'xterm'}):
            proc = await conn.create_process('trap "" HUP; echo $$; exec sleep 600', **kw)
            pids.append(int(await asyncio.wait_for(proc.stdout.readline(), 10)))
            proc.close()
            await asyncio.wait_for(proc.wait_closed(), 10)
        await asyncio.to_thread(wait_for, lambda: gw.open_fds() == base, 30, 'fds at baseline')
    assert sum(closed in line for line in hook_log(pam_dir)) == 1  # the two still run
    for pid in pids:
        os.kill(pid, 9)
    wait_for(lambda: sum(closed in line for line in hook_log(pam_dir)) == 3, 20, 'PAM closes')

    gateway = str(gw.proc.pid)
    wait_for(lambda: not [p for p in os.listdir('/proc')
                          if p.isdigit() and _stat_of(p)[:2] == ['Z', gateway]], 30, 'reaped')


def _stat_of(pid: str) -> list[str]:
    """State, ppid, ... of /proc/PID/stat (empty when the process is gone)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return []


def test_failing_pam_stack_refuses_the_session_and_the_gateway_serves_on(
        pam_gateway: NsGateway, dev_ca: VOCA, tmp_path: Path, pam_dir: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    marker = tmp_path / 'ran'
    (pam_dir / 'nologin').write_text('node under maintenance until 6pm\n')
    for stack, call, pam_text in [
        (good_stack(pam_dir) + 'session required pam_deny.so\n', 'pam_open_session',
         'Cannot make/remove an entry for the specified session'),
        # as /etc/nologin would: the module's message reaches the client, then the refusal
        (f'account required pam_nologin.so file={pam_dir}/nologin\n' + good_stack(pam_dir),
         'pam_acct_mgmt', 'Authentication failure'),
    ]:
        write_stack(pam_dir, stack)
        res = gw.ssh_xos(alice, f'touch {marker}')
        assert res.returncode == 255 and res.stdout == '', res
        assert f'xos-sshd: session refused: {call}: {pam_text}' in res.stderr, res.stderr
        if call == 'pam_acct_mgmt':
            assert res.stderr.startswith('node under maintenance until 6pm\n'), res.stderr
        assert not marker.exists()  # the user's command never ran
        assert re.search(rf'PAM session \(service {SERVICE}\) for dev-alice refused: '
                         rf'{call}: {pam_text}', gw.log()), gw.log()[-3000:]
    # a stack writable by others is never run as root
    write_stack(pam_dir, good_stack(pam_dir))
    (pam_dir / SERVICE).chmod(0o666)
    res = gw.ssh_xos(alice, f'touch {marker}')
    assert res.returncode == 255 and 'must be root-owned' in res.stderr and not marker.exists()
    (pam_dir / SERVICE).chmod(0o644)
    # still serving, with the stack read afresh
    ok = gw.ssh_xos(alice, 'ulimit -n')
    assert ok.returncode == 0 and ok.stdout == '777\n', ok.stderr + gw.log()[-2000:]
    # the stack we ship (deploy/pam.d) admits a libnss_xos account (no shadow entry)
    write_stack(pam_dir, (REPO / 'deploy' / 'pam.d' / 'xos-sshd').read_text())
    shipped = gw.ssh_xos(alice, 'id -un; echo "$HOME"')
    assert shipped.returncode == 0, shipped.stderr + gw.log()[-2000:]
    assert shipped.stdout.split()[0] == 'dev-alice' and shipped.stdout.split()[1].endswith('/dev-alice')
    assert gw.alive()
    # the audit log: a refused session is one line, 'open' refused with the reason and PAM's
    # message (never an 'open' ok then a 'close' with status 255); the two that ran: open, close
    def sessions() -> list[dict[str, Any]]:
        return [e for e in gw.audit() if e['event'] == 'session' and e['route'] == 'ssh']
    refusals = [e for e in sessions() if e['outcome'] == 'refused']
    assert [(e['action'], e['reason'], e['kind']) for e in refusals] == [
        ('open', 'pam-refused', 'exec'), ('open', 'pam-refused', 'exec'),
        ('open', 'spawn-failed', 'exec')], refusals
    assert refusals[0]['message'] == ('pam_open_session: Cannot make/remove an entry for the '
                                      'specified session')
    assert refusals[1]['message'] == 'pam_acct_mgmt: Authentication failure'
    assert 'must be root-owned' in refusals[2]['message']
    assert all(isinstance(e['pid'], int) for e in refusals)
    opened = [e['session'] for e in sessions() if e['action'] == 'open' and e['outcome'] == 'ok']
    assert len(opened) == 2
    wait_for(lambda: sorted(e['session'] for e in sessions() if e['action'] == 'close')
             == sorted(opened), 10, 'the close lines of the two sessions that ran')
    assert [e['exit_status'] for e in sessions() if e['action'] == 'close'] == [0, 0]


# --------------------------------------------------------------------------- PAM off


def test_default_limits_without_pam(gateway: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    """No [session] table: nofile soft 1024 (systemd's for user services), hard 524288 or,
    without CAP_SYS_RESOURCE, no more than the gateway's own."""
    assert gateway.proc is not None
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    res = gateway.ssh_xos(alice, 'ulimit -Sn; ulimit -Hn')
    assert res.returncode == 0, res.stderr
    own_hard = nofile(gateway.proc.pid)[1]
    expected_hard = 524288 if own_hard == 'unlimited' else min(524288, int(own_hard))
    with open('/proc/self/status') as f:
        cap_resource = any(l.startswith('CapEff:') and int(l.split()[1], 16) >> 24 & 1 for l in f)
    if cap_resource:
        expected_hard = 524288
    assert res.stdout.split() == ['1024', str(expected_hard)]


def test_config_rlimits_apply_to_sessions_and_jobs(request: pytest.FixtureRequest) -> None:
    # test_cr_e2e's set-up for jobs (0755 base, claimed uids, job clean-up)
    env: dict[str, Any] = request.getfixturevalue('cr_env')
    vo_ca: VOCA = request.getfixturevalue('ca')
    gw = make_gateway(env, vo_ca, start=False)
    session_table(gw, ['rlimits = { nofile = [555, 8000], core = 0, nproc = [3000, 4000] }'])
    gw.start()
    assert gw.proc is not None
    gateway_limits = nofile(gw.proc.pid)
    alice = vo_ca.issue('alice', env['base'] / 'alice')
    wanted = {'Max open files': ('555', '8000'), 'Max core file size': ('0', '0'),
              'Max processes': ('3000', '4000')}
    res = gw.ssh_xos(alice, 'cat /proc/self/limits')
    assert res.returncode == 0, res.stderr + gw.log()[-2000:]
    assert limits_of(res.stdout, wanted) == wanted
    job = xcr(gw, alice, 'run', '--', 'cat', '/proc/self/limits').stdout.strip()
    deadline = time.monotonic() + 20
    while True:
        state = json.loads(xcr(gw, alice, 'list', '--json').stdout)
        if [j for j in state if j['id'] == job and j['state'] != 'running']:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    logs = xcr(gw, alice, 'logs', job).stdout
    assert limits_of(logs, wanted) == wanted, logs
    assert nofile(gw.proc.pid) == gateway_limits


# --------------------------------------------------------------------------- doctor


def test_doctor_checks_the_pam_stack(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                                     home_base: Path, pam_dir: Path) -> None:
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})
    session_table(gw, ['pam = true', f'pam_service = "{SERVICE}"', f'pam_confdir = "{pam_dir}"'])

    def doctor() -> str:
        res = subprocess.run([XOS_SSHD, 'doctor', '--config', str(gw.config)],
                             capture_output=True, text=True, timeout=60)
        assert 'Traceback' not in res.stderr, res.stderr
        found = [l for l in res.stdout.splitlines() if l[5:].startswith('PAM session')]
        assert len(found) == 1, res.stdout
        return found[0]

    line = doctor()  # no service file yet
    assert line.startswith('FAIL') and f'{pam_dir}/{SERVICE}' in line and 'fix:' in line, line
    write_stack(pam_dir, good_stack(pam_dir) + 'session required pam_nonexistent_xyz.so\n')
    line = doctor()
    assert line.startswith('FAIL') and 'pam_nonexistent_xyz.so' in line, line
    write_stack(pam_dir, good_stack(pam_dir))
    line = doctor()
    # the host's nsswitch.conf does not name xos here: PAM could not find the accounts
    nss = 'xos' in next((l for l in Path('/etc/nsswitch.conf').read_text().splitlines()
                         if l.startswith('passwd:')), '')
    if nss:
        assert line.startswith('OK') and SERVICE in line, line
    else:
        assert line.startswith('FAIL') and 'nsswitch.conf' in line, line
