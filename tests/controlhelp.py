"""Helpers for the control socket tests: raw frames, PAM answers, a gateway whose socket
a non-root process can reach (pytest's tmp dirs are 0700)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from gatewayproc import VOCA, GatewayProcess

from xos_sshd.auth.challenge import sign_challenge
from xos_sshd.control.client import ControlClient


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack('>I', len(body)) + body


def connect(path: Path, timeout: float = 15.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f'closed after {len(data)} of {n} bytes')
        data += chunk
    return data


def reply(sock: socket.socket) -> dict[str, Any]:
    (length,) = struct.unpack('>I', recv_exactly(sock, 4))
    return json.loads(recv_exactly(sock, length))


def closed(sock: socket.socket) -> bool:
    """True when the server has closed its end (EOF or reset)."""
    try:
        return sock.recv(1) == b''
    except ConnectionResetError:
        return True


def ask(sock: socket.socket, obj: Any) -> dict[str, Any]:
    sock.sendall(frame(obj))
    return reply(sock)


def answer(prefix: Path, nonce_b64: str, service: str, user: str) -> str:
    """The pam_xos answer line that ``ssh-xos --kbdint`` would produce for PREFIX's cert."""
    key = serialization.load_pem_private_key(Path(f'{prefix}.key').read_bytes(), None)
    chain = Path(f'{prefix}.pem').read_bytes()
    return sign_challenge(key, chain, base64.b64decode(nonce_b64), service, user)  # type: ignore[arg-type]


def pam_auth(path: Path, prefix: Path, user: str, service: str = 'sshd',
             **extra: Any) -> dict[str, Any]:
    """challenge + auth on one connection, as pam_xos does; returns the raw auth reply."""
    with ControlClient(path) as client:
        nonce = client.call('pam.challenge', service=service, user=user)['nonce']
        return client.request({'op': 'pam.auth', 'service': service, 'user': user,
                               'answer': answer(prefix, nonce, service, user), **extra})


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp for a control socket others can try to reach."""
    d = Path(tempfile.mkdtemp(prefix='xos-ctl-'))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_gateway(tmp_path: Path, vo_table: dict[str, Any], control: Path | None = None,
                  **top: Any) -> GatewayProcess:
    if control is not None:
        top['control_socket'] = str(control)
    return GatewayProcess.configure(tmp_path, {'dev': vo_table}, **top).start()


def map_user(gw: GatewayProcess, ca: VOCA, user: str, tmp_path: Path, *extra: str) -> Path:
    """Issue a cert for *user* and log in once through the gateway (creates the mapping)."""
    prefix = ca.issue(user, tmp_path / user, *extra)
    res = gw.ssh_xos(prefix, 'true')
    assert res.returncode == 0, res.stderr + gw.log()
    return prefix
