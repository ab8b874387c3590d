"""The control socket itself: file mode, peer credentials, framing limits, hostile clients.

A real xos-sshd process, a real unix socket, real non-root processes (setpriv).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dynamic_vo
from controlhelp import (
    ask,
    closed,
    connect,
    frame,
    map_user,
    reachable_dir,
    reply,
)
from gatewayproc import VOCA, GatewayProcess

from xos_sshd.control.client import ControlClient
from xos_sshd.control.protocol import MAX_FRAME

NOBODY = ['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups']



@pytest.fixture
def ctl_gw(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
           home_base: Path) -> Iterator[GatewayProcess]:
    """A gateway whose control socket lives in a 0755 directory (reachable by path)."""
    with reachable_dir() as d:
        gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
                                      control_socket=str(d / 'run' / 'control.sock')).start()
        yield gw
        gw.stop()


def _still_serving(gw: GatewayProcess) -> None:
    assert gw.alive(), gw.log()
    with ControlClient(gw.control_socket) as client:
        assert client.call('admin.list')['mappings'] is not None


def test_socket_is_0600_root_in_a_0755_directory(ctl_gw: GatewayProcess) -> None:
    st = os.lstat(ctl_gw.control_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    parent = os.stat(ctl_gw.control_socket.parent)  # created by the gateway
    assert stat.S_IMODE(parent.st_mode) == 0o755 and parent.st_uid == 0
    _still_serving(ctl_gw)
    ctl_gw.stop()
    assert not ctl_gw.control_socket.exists()  # removed on a clean stop


def test_stale_socket_is_replaced_and_a_live_one_is_not(ctl_gw: GatewayProcess, tmp_path: Path,
                                                        dev_ca: VOCA, uid_range: tuple[int, int],
                                                        home_base: Path) -> None:
    # A second gateway on the same socket must not steal it from the live one.
    (tmp_path / 'other').mkdir()
    other = GatewayProcess.configure(tmp_path / 'other', {'dev': dynamic_vo(
        dev_ca, uid_range, home_base / 'home')}, control_socket=str(ctl_gw.control_socket))
    with pytest.raises(AssertionError, match='already serving'):
        other.start()
    _still_serving(ctl_gw)
    # A gateway killed hard leaves its socket behind: the next start replaces it.
    ctl_gw.stop(signal.SIGKILL)
    assert ctl_gw.control_socket.exists()
    ctl_gw.start()
    _still_serving(ctl_gw)


def test_a_regular_file_at_the_socket_path_is_never_removed(tmp_path: Path, dev_ca: VOCA,
                                                            uid_range: tuple[int, int],
                                                            home_base: Path) -> None:
    with reachable_dir() as d:
        victim = d / 'control.sock'
        victim.write_text('precious')
        gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
                                      control_socket=str(victim))
        with pytest.raises(AssertionError, match='not a socket'):
            gw.start()
        assert victim.read_text() == 'precious'


def test_peer_credentials_and_request_reply(ctl_gw: GatewayProcess, dev_ca: VOCA,
                                            tmp_path: Path) -> None:
    map_user(ctl_gw, dev_ca, 'alice', tmp_path)
    with connect(ctl_gw.control_socket) as sock:
        # several request/reply pairs share one connection
        first = ask(sock, {'op': 'admin.list'})
        assert first['ok'] is True and [m['name'] for m in first['mappings']] == ['dev-alice']
        assert ask(sock, {'op': 'admin.show', 'name': 'dev-alice'})['mapping']['vo_user'] == 'alice'
        assert ask(sock, {'op': 'admin.show', 'name': 'nobody-here'}) == {
            'ok': False, 'reason': 'not-mapped', 'error': "no mapping for account 'nobody-here'"}
    # the server saw our pid (audit of an admin change carries it)
    with ControlClient(ctl_gw.control_socket) as client:
        client.call('admin.pin', name='dev-alice')
    admin = [e for e in ctl_gw.audit() if e['event'] == 'admin']
    assert admin[-1]['action'] == 'pin' and admin[-1]['peer_uid'] == 0 and admin[-1]['pid'] == os.getpid()


def test_oversize_frame_is_refused_and_the_connection_closed(ctl_gw: GatewayProcess) -> None:
    with connect(ctl_gw.control_socket) as sock:
        sock.sendall(struct.pack('>I', MAX_FRAME + 1))
        got = reply(sock)
        assert got['ok'] is False and got['reason'] == 'frame-too-large'
        assert closed(sock)
    # exactly the limit is fine
    with connect(ctl_gw.control_socket) as sock:
        body = b'{"op":"admin.list","pad":"' + b'x' * (MAX_FRAME - 28) + b'"}'
        assert len(body) == MAX_FRAME
        sock.sendall(struct.pack('>I', len(body)) + body)
        assert reply(sock)['ok'] is True
    _still_serving(ctl_gw)


def test_garbage_bytes_and_bad_json(ctl_gw: GatewayProcess) -> None:
    # an HTTP request reads as a 1.2 GB length: refused, closed
    with connect(ctl_gw.control_socket) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert reply(sock)['reason'] == 'frame-too-large'
        assert closed(sock)
    # well-framed garbage: an error reply, and the connection stays usable
    with connect(ctl_gw.control_socket) as sock:
        for body in (b'\xff\xfe\x00garbage', b'{"op": "admin.list"', b'', b'[' * 30000 + b']' * 30000):
            sock.sendall(struct.pack('>I', len(body)) + body)
            got = reply(sock)
            assert got['ok'] is False and got['reason'] == 'bad-request', (body[:20], got)
        for doc in ([1, 2], 'admin.list', None, 42):
            got = ask(sock, doc)
            assert got['reason'] == 'bad-request' and 'not an object' in got['error']
        assert ask(sock, {'op': 7})['reason'] == 'bad-request'
        assert ask(sock, {'no': 'op'})['reason'] == 'bad-request'
        assert ask(sock, {'op': 'admin.show', 'name': ['x']})['reason'] == 'bad-request'
        assert ask(sock, {'op': 'admin.show', 'uid': -1})['reason'] == 'bad-request'
        assert ask(sock, {'op': 'admin.list'})['ok'] is True
    _still_serving(ctl_gw)


def test_unknown_op(ctl_gw: GatewayProcess) -> None:
    with connect(ctl_gw.control_socket) as sock:
        got = ask(sock, {'op': 'admin.format_disk'})
        assert got == {'ok': False, 'reason': 'unknown-op', 'error': "unknown op 'admin.format_disk'"}
        assert ask(sock, {'op': 'admin.list'})['ok'] is True


def test_slow_loris_is_cut_off_and_idle_connections_closed(ctl_gw: GatewayProcess) -> None:
    idle = connect(ctl_gw.control_socket, timeout=60)
    slow = connect(ctl_gw.control_socket, timeout=60)
    start = time.monotonic()
    slow.sendall(frame({'op': 'admin.list'})[:6])  # a frame that never completes
    # meanwhile everybody else is served at once
    t0 = time.monotonic()
    _still_serving(ctl_gw)
    assert time.monotonic() - t0 < 2
    got = reply(slow)  # the server gives up on the partial frame after 5 s
    assert got['reason'] == 'frame-timeout'
    assert closed(slow)
    assert 4.5 <= time.monotonic() - start < 10
    # a connection that says nothing is closed after 30 s of silence
    idle.settimeout(45)
    assert closed(idle)
    assert 29 <= time.monotonic() - start < 40
    slow.close()
    idle.close()
    _still_serving(ctl_gw)


def test_truncated_frame_and_abrupt_disconnects(ctl_gw: GatewayProcess) -> None:
    for _ in range(20):
        with connect(ctl_gw.control_socket) as sock:
            sock.sendall(struct.pack('>I', 100) + b'{"op":')
        with connect(ctl_gw.control_socket) as sock:
            sock.sendall(frame({'op': 'admin.list'}))  # and leave without reading the reply
    _still_serving(ctl_gw)


def test_concurrent_connections_are_bounded(ctl_gw: GatewayProcess) -> None:
    held = [connect(ctl_gw.control_socket) for _ in range(64)]
    try:
        for sock in held[:3]:
            assert ask(sock, {'op': 'admin.list'})['ok'] is True
        with connect(ctl_gw.control_socket) as extra:
            got = reply(extra)
            assert got['reason'] == 'busy' and closed(extra)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    _still_serving(ctl_gw)


_CLIENT = textwrap.dedent('''
    import json, os, socket, struct, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(json.dumps({"connect": exc.__class__.__name__}))
        sys.exit(0)
    out = {"connect": "ok", "uid": os.getuid()}
    for op in sys.argv[2:]:
        body = json.dumps({"op": op, "service": "sshd", "user": "dev-alice"}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        n = struct.unpack(">I", s.recv(4))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        out[op] = json.loads(data)
    print(json.dumps(out))
''')


def _as_nobody(path: Path, *ops: str) -> dict:
    import json
    res = subprocess.run(NOBODY + [sys.executable, '-c', _CLIENT, str(path), *ops], check=False,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_non_root_cannot_connect_nor_use_root_ops(ctl_gw: GatewayProcess) -> None:
    # 0600 root: a non-root process cannot even connect
    assert _as_nobody(ctl_gw.control_socket, 'admin.list') == {'connect': 'PermissionError'}
    # and if the file were ever opened wider, every root-only op still checks SO_PEERCRED
    os.chmod(ctl_gw.control_socket, 0o666)
    try:
        got = _as_nobody(ctl_gw.control_socket, 'admin.list', 'admin.ban', 'pam.challenge',
                         'pam.auth', 'pam.account', 'pam.open_session', 'no.such.op')
    finally:
        os.chmod(ctl_gw.control_socket, 0o600)
    assert got['connect'] == 'ok' and got['uid'] == 65534
    for op in ('admin.list', 'admin.ban', 'pam.challenge', 'pam.auth', 'pam.account',
               'pam.open_session'):
        assert got[op]['ok'] is False and got[op]['reason'] == 'permission-denied', (op, got[op])
    assert got['no.such.op']['reason'] == 'unknown-op'
    _still_serving(ctl_gw)


def test_client_refuses_a_socket_not_served_by_root(tmp_path: Path) -> None:
    """A planted socket (served by a non-root process) is not believed."""
    from xos_sshd.control.client import Unreachable
    with reachable_dir() as d:
        d.chmod(0o777)
        path = d / 'fake.sock'
        server = subprocess.Popen(NOBODY + [sys.executable, '-c', textwrap.dedent(f'''
            import socket, time, os
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind({str(path)!r}); os.chmod({str(path)!r}, 0o666); s.listen(1)
            c, _ = s.accept(); time.sleep(5)
        ''')])
        try:
            deadline = time.monotonic() + 10
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(Unreachable, match='not by root'):
                ControlClient(path)
        finally:
            server.kill()
            server.wait()


def test_logins_still_work_after_abuse(ctl_gw: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    for junk in (b'\x00' * 3, b'\xff' * 8, frame([1]) * 3):
        with connect(ctl_gw.control_socket) as sock:
            sock.sendall(junk)
    map_user(ctl_gw, dev_ca, 'alice', tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(ctl_gw.control_socket))
        sock.sendall(frame({'op': 'admin.show', 'name': 'dev-alice'}))
        assert reply(sock)['mapping']['name'] == 'dev-alice'
