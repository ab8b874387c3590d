"""The framing of the control protocol, both sides (asyncio reader and blocking socket), and
what hostile text does on either side: a peer's words reach replies, logs and the user's
terminal only through the one sanitiser, ``protocol.one_line``.  The hostile peers are real:
a mapped user's process on the gateway's users' socket (real gateway, real CRIU), and a fake
root-served socket that ``xos-cr`` trusts as its gateway."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cr_e2e import (  # fixtures and helpers of the cr end-to-end tests
    REPO,
    alice,  # noqa: F401 (fixture)
    ca,  # noqa: F401 (fixture)
    cr_env,  # noqa: F401 (fixture)
    gw,  # noqa: F401 (fixture)
    home_of,
    xcr,
)

from xos_sshd.control import protocol
from xos_sshd.control.protocol import (
    MAX_FRAME,
    ControlError,
    decode,
    encode,
    error_reply,
    read_frame,
    recv_frame,
    send_frame,
)

#: Terminal escapes (CSI, OSC with BEL, a C1 CSI), NUL, DEL, bidi override and isolate, a
#: zero-width space, line breaks: none may reach a reply, a log line or a terminal.
HOSTILE = 'a\x1b[2J\x1b]0;owned\x07b\x00c\x9b31md\u202eevil\u2066e\u200bf\r\ng\x7f'
SANITISED = 'a [2J ]0;owned b c 31md evil e f g'
#: The same without its NUL: it can be a command-line argument.
HOSTILE_ARG = HOSTILE.replace('\x00', ' ')


def on_one_terminal_line(text: str) -> bool:
    """No control or format character at all (a line break only at the end)."""
    return all(c.isprintable() for c in text.removesuffix('\n'))


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_encode_decode_round_trip_and_limit() -> None:
    frame = encode({'op': 'admin.list', 'text': 'é'})
    (length,) = struct.unpack('>I', frame[:4])
    assert length == len(frame) - 4 and decode(frame[4:]) == {'op': 'admin.list', 'text': 'é'}
    with pytest.raises(ValueError):
        encode({'pad': 'x' * MAX_FRAME})
    assert len(encode({'pad': 'x' * MAX_FRAME}, limit=2 * MAX_FRAME)) > MAX_FRAME


@pytest.mark.parametrize('body', [b'', b'\xff', b'[]', b'"x"', b'null', b'{"a":', b'[' * 5000])
def test_decode_refuses_anything_but_an_object(body: bytes) -> None:
    with pytest.raises(ControlError) as info:
        decode(body)
    assert info.value.reason == 'bad-request' and not info.value.fatal


async def test_read_frame_limits() -> None:
    assert await read_frame(_reader(encode({'op': 'x'}))) == {'op': 'x'}
    assert await read_frame(_reader(b'')) is None  # clean end of stream
    with pytest.raises(ControlError) as info:
        await read_frame(_reader(struct.pack('>I', MAX_FRAME + 1)))
    assert info.value.reason == 'frame-too-large' and info.value.fatal
    with pytest.raises(ControlError) as info:
        await read_frame(_reader(struct.pack('>I', 10) + b'{}'))
    assert info.value.reason == 'truncated-frame'
    with pytest.raises(ControlError) as info:  # a frame that stalls half-way
        await read_frame(_reader(struct.pack('>I', 10) + b'{', eof=False), frame_timeout=0.2)
    assert info.value.reason == 'frame-timeout' and info.value.fatal
    # silence is an idle connection, not an error
    assert await read_frame(_reader(b'', eof=False), idle_timeout=0.1) is None


def test_blocking_side() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {'op': 'ping'})
        assert recv_frame(b) == {'op': 'ping'}
        a.sendall(struct.pack('>I', 100))
        with pytest.raises(ControlError):
            recv_frame(b, limit=10)
        a.close()
        with pytest.raises(ConnectionError):
            recv_frame(b)


# --------------------------------------------------------------------------- the sanitiser


def test_refusals_carry_no_control_or_format_characters() -> None:
    from xos_sshd.cr import service
    assert service.one_line is protocol.one_line  # one sanitiser, shared
    for reply in (error_reply('x', HOSTILE), ControlError('x', HOSTILE).reply()):
        assert reply == {'ok': False, 'reason': 'x', 'error': SANITISED}
    assert len(error_reply('x', 'y' * 5000)['error']) == protocol.MAX_ERROR
    assert protocol.one_line(HOSTILE * 100, 40) == (SANITISED + ' ' + SANITISED)[:40]


# --------------------------------------------------------------------------- hostile user


_USER_CLIENT = textwrap.dedent('''
    import json, socket, struct, sys
    def ask(req):
        s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])
        body = json.dumps(req).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        head = b""
        while len(head) < 4:
            head += s.recv(4 - len(head))
        n, data = struct.unpack(">I", head)[0], b""
        while len(data) < n:
            data += s.recv(n - len(data))
        return json.loads(data)
    print(json.dumps([ask(req) for req in json.loads(sys.argv[2])]))
''')


def test_hostile_user_text_on_the_cr_socket(cr_env: dict[str, Any], gw: Any,  # noqa: F811
                                            alice: Path) -> None:  # noqa: F811
    """A mapped user's own client on the cr socket: what it sends comes back in refusals,
    and goes to the gateway's log, without a control or format character."""
    xcr(gw, alice, 'images')  # maps alice
    uid = os.stat(home_of(cr_env, 'alice')).st_uid
    requests = [
        {'op': 'cr.run', 'argv': [HOSTILE_ARG]},  # cannot execute HOSTILE_ARG: start-failed
        {'op': 'cr.kill', 'job': HOSTILE},
        {'op': 'cr.' + HOSTILE},
        {'op': 'cr.imported', 'upload': HOSTILE},
        {'op': 'cr.list'},
    ]
    res = subprocess.run(['setpriv', f'--reuid={uid}', f'--regid={uid}', '--clear-groups',
                          sys.executable, '-c', _USER_CLIENT, str(gw.state / 'cr.sock'),
                          json.dumps(requests)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    replies = json.loads(res.stdout)
    assert [r.get('reason', 'ok') for r in replies] == [
        'start-failed', 'no-such-job', 'unknown-op', 'bad-request', 'ok'], replies
    assert 'cannot execute' in replies[0]['error'] and SANITISED in replies[0]['error']
    for reply in replies[:4]:
        assert on_one_terminal_line(reply['error']), reply
    log = gw.log()
    assert '\x1b' not in log and '\u202e' not in log and '\x9b' not in log
    assert gw.alive() and xcr(gw, alice, 'list', '--json').returncode == 0


def test_xos_cr_shows_a_crafted_job_command_inertly(cr_env: dict[str, Any],  # noqa: F811
                                                     gw: Any, alice: Path) -> None:  # noqa: F811
    """A job whose command carries escapes: ``list`` and ``images`` show it inertly,
    ``--json`` keeps it exactly (escaped by JSON), ``logs`` gives the job's bytes as they
    are (the user's own output)."""
    script = 'printf "\\033[1mbold\\033[0m\\n"; exec sleep 600'
    job = xcr(gw, alice, 'run', '--', 'sh', '-c', script, HOSTILE_ARG).stdout.strip()
    table = xcr(gw, alice, 'list')
    assert job in table.stdout and 'a [2J' in table.stdout  # shown, inert (cut at 60)
    assert on_one_terminal_line(table.stdout.replace('\n', ' ')), repr(table.stdout)
    listed = xcr(gw, alice, 'list', '--json').stdout
    assert '\x1b' not in listed and json.loads(listed)[0]['command'] == ['sh', '-c', script,
                                                                          HOSTILE_ARG]
    image = xcr(gw, alice, 'checkpoint', job).stdout.strip()
    images = xcr(gw, alice, 'images')
    assert image in images.stdout and on_one_terminal_line(images.stdout.replace('\n', ' '))
    logs = xcr(gw, alice, 'logs', job)
    assert logs.stdout == '\x1b[1mbold\x1b[0m\n'
    refused = xcr(gw, alice, 'run', '--', HOSTILE_ARG, check=False)
    assert refused.returncode == 1 and 'cannot execute' in refused.stderr
    assert on_one_terminal_line(refused.stderr), repr(refused.stderr)
    xcr(gw, alice, 'kill', job, '-s', 'KILL')


# --------------------------------------------------------------------------- hostile gateway


EVIL = '\x1b[2J\x1b]0;owned\x07\x9b1m\u202eevil\x00'
_FAKE_REPLIES: dict[str, dict[str, Any]] = {
    'cr.list': {'ok': True, 'jobs': [{'id': 'j' + EVIL, 'state': EVIL, 'exit_code': EVIL,
                                      'created': 0, 'restored_from': EVIL,
                                      'command': ['sh', EVIL]}]},
    'cr.images': {'ok': True, 'images': [{'id': EVIL, 'created': 1, 'size_bytes': 10,
                                          'node': EVIL, 'job_id': EVIL, 'command': [EVIL]}]},
    'cr.caps': {'ok': True, 'caps': {'node': EVIL, 'criu': EVIL, 'best': EVIL, 'send': [EVIL],
                                     'receive': [EVIL], 'why': {EVIL: EVIL}}},
    'cr.run': {'ok': True, 'job': {'id': EVIL}},
    'cr.restart': {'ok': True, 'job': {'id': EVIL}},
    'cr.checkpoint': {'ok': True, 'image': {'id': EVIL}},
    'cr.kill': {'ok': True, 'job': {'state': EVIL}, 'ended': True},
    'cr.rm': {'ok': False, 'reason': EVIL, 'error': EVIL},
    'cr.logs': {'ok': True, 'stdout': 'raw \x1b[1mbytes\x1b[0m', 'stderr': 'err \x1b[2m',
                'truncated': {EVIL: True}, EVIL + '_size': EVIL},
}


@pytest.fixture
def fake_gateway(tmp_path: Path) -> Iterator[Path]:
    """A socket served by root (this test) that answers every ``cr.*`` op with hostile text:
    ``xos-cr`` trusts it as its gateway."""
    path = tmp_path / 'cr.sock'
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        op = recv_frame(conn).get('op')
                        conn.sendall(encode(_FAKE_REPLIES.get(op, error_reply('x', 'x')),
                                            protocol.MAX_REPLY))
                except (OSError, ConnectionError, ControlError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def _xos_cr(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, '-m', 'xos_sshd.cr.cli', '--socket', str(sock),
                           *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize('args', [('list',), ('images',), ('caps',), ('run', '--', 'x'),
                                  ('restart', 'i0123456789abcdef'), ('checkpoint', 'j0123456789'),
                                  ('kill', 'j0123456789'), ('rm', 'i0123456789abcdef')])
def test_xos_cr_never_writes_a_hostile_gateways_escapes(fake_gateway: Path,
                                                         args: tuple[str, ...]) -> None:
    res = _xos_cr(fake_gateway, *args)
    assert res.returncode == (1 if args[0] == 'rm' else 0), res.stderr
    out = res.stdout + res.stderr
    assert 'owned' in out and 'evil' in out, out  # shown, inert
    for line in out.splitlines():
        assert on_one_terminal_line(line), repr(line)


def test_xos_cr_json_and_logs_are_passed_as_they_are(fake_gateway: Path) -> None:
    listed = _xos_cr(fake_gateway, 'list', '--json')
    assert listed.returncode == 0 and '\x1b' not in listed.stdout and '\u202e' not in listed.stdout
    assert json.loads(listed.stdout)[0]['state'] == EVIL  # JSON escaped it, losing nothing
    logs = _xos_cr(fake_gateway, 'logs', 'j0123456789')
    assert logs.returncode == 0 and logs.stdout == 'raw \x1b[1mbytes\x1b[0m'
    err = logs.stderr.split('\n', 1)
    assert err[0].startswith('err \x1b[2m') and on_one_terminal_line(err[1]), repr(logs.stderr)
