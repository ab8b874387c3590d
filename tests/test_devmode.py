"""`xos-sshd --dev` (what `make run` starts): prints commands that work as printed, and a
second start reuses everything the first one made."""

from __future__ import annotations

import hashlib
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from gatewayproc import XOS_SSHD, free_port, kill_uid_processes


def _start(state: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([XOS_SSHD, '--dev', '--state-dir', str(state), '--port', str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip('\n'))
        if line.startswith('  ') and 'xos-ca issue' in line:
            return proc, lines
    proc.kill()
    raise AssertionError(f'no banner: {lines}')


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dev_mode_banner_commands_work_and_restart_is_idempotent() -> None:
    state = Path(tempfile.mkdtemp(prefix='xos-devmode-'))
    port = free_port()
    proc, banner = _start(state, port)
    try:
        assert f'listening on 127.0.0.1:{port}' in banner[0]
        commands = [l.strip() for l in banner if l.strip().split(' ')[0].endswith(('ssh-xos', 'ssh'))]
        assert len(commands) == 2
        for command in commands:
            argv = shlex.split(command)
            argv[1:1] = ['-o', 'UserKnownHostsFile=/dev/null', '-o', 'StrictHostKeyChecking=no']
            res = subprocess.run(argv + ['id -u; echo $USER'], capture_output=True, text=True,
                                 timeout=30, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, (command, res.stderr)
            assert res.stdout.split()[1] == 'dev-alice'
            id_res = res
        # The local xos-cr the banner names runs as the mapped user inside a session (the
        # venv's interpreter must be one that user may execute).
        inside = next(l for l in banner if 'inside a session' in l).split(': ', 1)[1].rstrip(')')
        argv = shlex.split(commands[0])
        argv[1:1] = ['-o', 'UserKnownHostsFile=/dev/null', '-o', 'StrictHostKeyChecking=no']
        res = subprocess.run(argv + [inside], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 0, (inside, res.stdout, res.stderr)
        made = {p: _digest(state / p) for p in ('ca/ca.pem', 'ca/ca.key', 'hostkeys/ssh_host_ed25519_key')}
        uid = int(id_res.stdout.split()[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    proc, _ = _start(state, port)
    try:
        assert {p: _digest(state / p) for p in made} == made
        res = subprocess.run(shlex.split(commands[0]) + ['-o', 'StrictHostKeyChecking=no', 'id -u'],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 0 and int(res.stdout) == uid  # same mapping after restart
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        kill_uid_processes(uid, uid)
        subprocess.run(['rm', '-rf', str(state)])
