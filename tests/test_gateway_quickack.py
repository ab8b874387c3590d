"""Before authentication the gateway acknowledges what a client sent at once.

OpenSSH's client leaves Nagle on for non-interactive sessions and sends two small packets
in a row twice during the key exchange (KEXINIT then KEX_ECDH_INIT; NEWKEYS then
SERVICE_REQUEST).  The second waits for the ACK of the first, and the gateway has nothing to
send back: with its socket in the kernel's delayed-ACK ("pingpong") mode, which a server
enters as soon as it answers quickly, that ACK waited for the 40 ms delayed-ACK timer, twice
per OpenSSH login (bench/login.py: p50 ~118 ms before, ~38 ms after, on a 2-core VM).

The fix sets ``TCP_QUICKACK`` on the accepted socket after each read until the connection
authenticated.  What this test checks is that option, on the gateway's own socket (taken
with ``pidfd_getfd``), not a time: after the gateway answered the client's version line
with its KEXINIT (which puts the socket into pingpong mode), the socket must be out of it.
A latency assertion would flake on a loaded machine; bench/login.py measures the effect.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time

import pytest

from gatewayproc import GatewayProcess

SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64
MSG_KEXINIT = 20


def _socket_inode(pid: int, local_port: int, remote_port: int) -> int:
    """The inode of *pid*'s TCP socket 127.0.0.1:local_port <-> 127.0.0.1:remote_port."""
    want_local, want_remote = f'0100007F:{local_port:04X}', f'0100007F:{remote_port:04X}'
    for line in open(f'/proc/{pid}/net/tcp').read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote:
            return int(fields[9])
    raise AssertionError(f'no socket {want_local} -> {want_remote} in /proc/{pid}/net/tcp')


def _their_socket(pid: int, inode: int) -> socket.socket:
    """A duplicate of the descriptor *pid* holds for socket *inode* (root: pidfd_getfd)."""
    fd_dir = f'/proc/{pid}/fd'
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f'{fd_dir}/{name}')
        except FileNotFoundError:
            continue
        if target == f'socket:[{inode}]':
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            pidfd = os.pidfd_open(pid)
            try:
                fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            finally:
                os.close(pidfd)
            if fd < 0:
                pytest.skip(f'pidfd_getfd: {os.strerror(ctypes.get_errno())}')
            return socket.socket(fileno=fd)
    raise AssertionError(f'xos-sshd holds no descriptor for socket {inode}')


def _read_packet_type(sock: socket.socket) -> int:
    """Read one unencrypted SSH binary packet; return its message type."""
    head = b''
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, 'the gateway closed the connection'
        head += chunk
    length = int.from_bytes(head[:4], 'big')
    rest = length + 4 - len(head)
    while rest > 0:
        chunk = sock.recv(min(rest, 65536))
        assert chunk, 'the gateway closed the connection'
        rest -= len(chunk)
    return head[5]


def test_preauth_socket_acknowledges_at_once(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    with socket.create_connection(('127.0.0.1', gateway.port), timeout=10) as client:
        banner = b''
        while not banner.endswith(b'\r\n'):
            chunk = client.recv(1)
            assert chunk, 'no version line'
            banner += chunk
        assert banner.startswith(b'SSH-2.0-')
        # The gateway answers our version line with its KEXINIT: a quick answer, the very
        # thing that puts a server socket into delayed-ACK mode.
        client.sendall(b'SSH-2.0-OpenSSH_9.2p1 quickack-test\r\n')
        assert _read_packet_type(client) == MSG_KEXINIT
        inode = _socket_inode(gateway.proc.pid, gateway.port, client.getsockname()[1])
        with _their_socket(gateway.proc.pid, inode) as theirs:
            # the option is set right after the gateway handled the read: allow it a moment
            deadline = time.monotonic() + 10
            while True:
                quick = theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)
                if quick or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert quick == 1, 'the pre-auth socket is in delayed-ACK mode'
    assert gateway.alive()
