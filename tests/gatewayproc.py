"""Start a real ``xos-sshd`` process for end-to-end tests, and issue certificates for it.

Everything a test makes lives under its tmp dir: the CA, the state dir, the homes.  Mapped
uids come from a range checked to be free on this machine; the gateway runs as root (the
tests are run as root), exactly as on a login node.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

VENV_BIN = Path(sys.executable).parent
XOS_CA = str(VENV_BIN / 'xos-ca')
XOS_SSHD = str(VENV_BIN / 'xos-sshd')
SSH_XOS = str(VENV_BIN / 'ssh-xos')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


UID_CLAIMS_DIR = Path('/tmp/xos-test-uid-claims')
_claims: dict[int, int] = {}


def free_uid_range(size: int = 1000, start: int = 300000) -> tuple[int, int]:
    """Claim a uid/gid range that no /etc/passwd or /etc/group entry falls into.

    Test runs clean their range up with SIGKILL, so two runs on one machine (CI, a developer,
    several helpers) must never share one: each range is claimed with an flock on a file in
    UID_CLAIMS_DIR, held until :func:`release_uid_range` or the end of the process.
    """
    used = set()
    for path, field_no in (('/etc/passwd', 2), ('/etc/group', 2), ('/etc/passwd', 3)):
        for line in Path(path).read_text().splitlines():
            parts = line.split(':')
            if len(parts) > field_no and parts[field_no].isdigit():
                used.add(int(parts[field_no]))
    UID_CLAIMS_DIR.mkdir(mode=0o700, exist_ok=True)
    first = start
    while first < 2_000_000_000:
        if first not in _claims and not any(first <= u < first + size for u in used):
            fd = os.open(UID_CLAIMS_DIR / str(first), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
            else:
                _claims[first] = fd
                return first, first + size - 1
        first += size
    raise AssertionError('no free uid range to claim')


def release_uid_range(first: int) -> None:
    """Give a claimed range back (after its processes were killed)."""
    fd = _claims.pop(first, None)
    if fd is not None:
        os.close(fd)


#: The ``[limits]`` table a test gateway gets unless the test passes ``limits=``: every
#: client of the suite connects from loopback, many tests make several refused logins in a
#: row and some log in a dozen times at once, so loopback is exempt from penalties and the
#: startup caps are far above what a test opens.  Tests of the limits pass their own table
#: (``limits={}`` = the gateway's defaults).
TEST_LIMITS: dict[str, Any] = {'penalty_exempt': ['127.0.0.0/8', '::1/128'],
                               'max_startups': '100:30:200', 'max_startups_per_source': 0}


def run(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault('capture_output', True)
    kw.setdefault('text', True)
    kw.setdefault('timeout', 60)
    proc = subprocess.run(list(argv), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f'{argv} failed ({proc.returncode}): {proc.stderr}')
    return proc


@dataclass
class VOCA:
    """A VO CA made with the real ``xos-ca``."""

    vo: str
    dir: Path

    @classmethod
    def create(cls, base: Path, vo: str) -> 'VOCA':
        run(XOS_CA, 'init', str(base / f'ca-{vo}'), '--vo', vo)
        return cls(vo, base / f'ca-{vo}')

    def issue(self, user: str, out: Path, *extra: str) -> Path:
        """Issue a cert for *user*; return PREFIX (PREFIX.pem, .key, -cert.pub exist)."""
        run(XOS_CA, 'issue', str(self.dir), '--user', user, '--out', str(out), *extra)
        return out

    def revoke(self, prefix: Path) -> None:
        run(XOS_CA, 'revoke', str(self.dir), f'{prefix}.pem')


@dataclass
class GatewayProcess:
    """A running xos-sshd with its own state dir and config."""

    base: Path
    port: int
    state: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default=Path('/dev/null'))
    control_socket: Path = field(default=Path('/dev/null'))

    @classmethod
    def configure(cls, base: Path, vos: dict[str, dict[str, Any]],
                  limits: dict[str, Any] | None = None, **top: Any) -> 'GatewayProcess':
        """Write a config with one table per VO (``ca``, ``crl``, policy fields) and a
        ``[limits]`` table (:data:`TEST_LIMITS` unless *limits* is given)."""
        state = base / 'state'
        state.mkdir(mode=0o755, exist_ok=True)
        keys = base / 'hostkeys'
        keys.mkdir(mode=0o700, exist_ok=True)
        host_key = keys / 'ssh_host_ed25519_key'
        if not host_key.exists():
            run('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(host_key))
        port = top.pop('port', None) or free_port()
        control = Path(top.pop('control_socket', None) or state / 'control.sock')
        lines = [f'state_dir = "{state}"', f'listen = ["127.0.0.1:{port}"]',
                 f'host_keys = ["{host_key}"]', f'control_socket = "{control}"']
        lines += [f'{k} = {_toml(v)}' for k, v in top.items()]
        for name, table in vos.items():
            lines.append(f'[vo.{name}]')
            lines += [f'{k} = {_toml(v)}' for k, v in table.items() if not isinstance(v, dict)]
            for k, v in table.items():
                if isinstance(v, dict):
                    lines.append(f'[vo.{name}.{k}]')
                    lines += [f'{kk} = {_toml(vv)}' for kk, vv in v.items()]
        lines.append('[limits]')
        lines += [f'{k} = {_toml(v)}' for k, v in (TEST_LIMITS if limits is None else limits).items()]
        config = base / 'config.toml'
        config.write_text('\n'.join(lines) + '\n')
        return cls(base, port, state, config, log_path=base / 'gateway.log',
                   control_socket=control)

    def start(self, debug: bool = True, wrapper: Sequence[str] = ()) -> 'GatewayProcess':
        """Start the gateway (under *wrapper*, a command that execs its arguments) and wait
        until it listens."""
        log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen([*wrapper, XOS_SSHD, '--config', str(self.config)]
                                     + (['--debug'] if debug else []),
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f'xos-sshd exited {self.proc.returncode}:\n{self.log()}')
            try:
                with socket.create_connection(('127.0.0.1', self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f'xos-sshd did not listen on {self.port}:\n{self.log()}')

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc:
            stop_process(self.proc, sig)

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f'/proc/{self.proc.pid}/fd'))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors='replace') if self.log_path.exists() else ''

    def audit(self) -> list[dict[str, Any]]:
        path = self.state / 'audit.log'
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def ssh_xos(self, prefix: Path, *command: str, login: str | None = None,
                check: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
        argv = [SSH_XOS, '-i', str(prefix), '-p', str(self.port),
                '-o', 'StrictHostKeyChecking=no']
        if login:
            argv += ['-l', login]
        return run(*argv, '127.0.0.1', *command, check=check, **kw)

    def connect(self, prefix: Path, login: str = 'alice', **kw: Any) -> Any:
        """An asyncssh client connection with the XOS-cert at *prefix* (async context manager)."""
        import asyncssh
        key = asyncssh.read_private_key(f'{prefix}.key')
        cert = asyncssh.read_certificate(f'{prefix}.pem')
        kw.setdefault('agent_path', None)
        return asyncssh.connect('127.0.0.1', self.port, username=login, known_hosts=None,
                                client_keys=[(key, cert)], **kw)

    def ssh(self, prefix: Path, login: str, *command: str, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Stock OpenSSH with the OpenSSH user certificate of the same key."""
        argv = ['ssh', '-F', '/dev/null', '-i', f'{prefix}.key',
                '-o', f'CertificateFile={prefix}-cert.pub', '-o', 'IdentitiesOnly=yes',
                '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR', '-p', str(self.port),
                f'{login}@127.0.0.1', *command]
        return run(*argv, check=check, **kw)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 10) -> None:
    """Send a running server *sig*, give it *timeout* s to end, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_toml(v) for v in value) + ']'
    return json.dumps(str(value))


def kill_uid_processes(first: int, last: int) -> None:
    """Clean-up: no process of a test's mapped accounts may outlive the test."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f'/proc/{entry}').st_uid
        except FileNotFoundError:
            continue
        if first <= uid <= last:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
