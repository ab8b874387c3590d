"""A small blocking client of the control socket (``xos-ams``, tests, local tools).

It checks the daemon's credentials too (``SO_PEERCRED`` of the listening end must be root):
a client that talks to a socket someone else planted would otherwise believe its replies.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

from . import protocol
from .protocol import ControlError

DEFAULT_SOCKET = Path('/run/xos-sshd/control.sock')
SOCKET_ENV = 'XOS_CONTROL_SOCKET'
_PEERCRED = struct.Struct('3i')


def default_socket() -> Path:
    """``$XOS_CONTROL_SOCKET`` if set, else ``/run/xos-sshd/control.sock``."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


class Unreachable(ConnectionError):
    """The daemon cannot be reached (not running, wrong path, no permission)."""


class ControlClient:
    """One connection; several requests may share it (``with ControlClient(path) as c: ...``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                 require_root_server: bool = True):
        self.path = Path(path) if path else default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
            if require_root_server:
                _pid, uid, _gid = _PEERCRED.unpack(self.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                if uid != 0:
                    raise Unreachable(f'{self.path} is served by uid {uid}, not by root')
        except Unreachable:
            self.sock.close()
            raise
        except OSError as exc:
            self.sock.close()
            raise Unreachable(exc.strerror or str(exc)) from exc

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request, return the reply; raise :class:`ControlError` on ``ok: false``."""
        reply = self.request({'op': op, **fields})
        if not reply.get('ok'):
            raise ControlError(str(reply.get('reason', 'error')), str(reply.get('error', '')))
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send *message* as is, return the raw reply."""
        protocol.send_frame(self.sock, message)
        return protocol.recv_frame(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> 'ControlClient':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(op: str, path: str | os.PathLike[str] | None = None, timeout: float = 30.0,
         **fields: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    with ControlClient(path, timeout) as client:
        return client.call(op, **fields)
