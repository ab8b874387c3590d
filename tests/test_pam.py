"""pam_xos.so through real Linux-PAM: against fake daemons, the real gateway, and a stock sshd.

Three layers:

* **Fake daemons.**  ``tests/pam_app.c`` is a tiny PAM application (real libpam,
  ``pam_start_confdir`` so its configuration is a file in the test's tmp dir and the host's
  /etc/pam.d is never read or changed).  A unix-socket server in the test plays the daemon
  and misbehaves on purpose (down, garbage, oversize, silent, half a frame, backlog full,
  not root, every refusal reason): the module must answer with the right PAM code within its
  timeout, never hang, never leak a descriptor, and be clean under valgrind.
* **The real gateway** (``xos-sshd``), driven through pam_app: auth/account/session ops,
  revocation seen by ``account``.
* **A stock OpenSSH sshd** (``/usr/sbin/sshd`` run through a symlink named ``sshd-xos-test``,
  which is its PAM service name) inside ``unshare -m`` with bind mounts over /etc/pam.d and
  /etc/nsswitch.conf (``passwd: files xos``): ``ssh-xos --kbdint`` logs a mapped VO user in
  through keyboard-interactive; another user's certificate, a revoked certificate, a
  replayed answer and a stopped gateway are refused.

Needs root (unshare, mounts, the control socket is root-only), gcc, libpam0g-dev,
openssh-server, valgrind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import dynamic_vo
from gatewayproc import SSH_XOS, VOCA, GatewayProcess, free_port, kill_uid_processes, stop_process

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / 'native'
PAM_MOD = NATIVE / 'build' / 'pam_xos.so'
NSS_BUILD = NATIVE / 'build'
APP_SRC = Path(__file__).with_name('pam_app.c')
SSHD = shutil.which('sshd') or '/usr/sbin/sshd'
SERVICE = 'xos-test'

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason='needs root'),
    pytest.mark.skipif(shutil.which('gcc') is None, reason='needs gcc'),
    pytest.mark.skipif(not Path('/usr/include/security/pam_appl.h').exists(),
                       reason='needs libpam0g-dev'),
]

PAM_CODES = {
    'PAM_SUCCESS': 0, 'PAM_PERM_DENIED': 6, 'PAM_AUTH_ERR': 7, 'PAM_CRED_INSUFFICIENT': 8,
    'PAM_AUTHINFO_UNAVAIL': 9, 'PAM_USER_UNKNOWN': 10, 'PAM_ACCT_EXPIRED': 13,
    'PAM_SESSION_ERR': 14,
}
NONCE = base64.b64encode(b'n' * 32).decode()


# ------------------------------------------------------------------------------ builds


@pytest.fixture(scope='session')
def pam_module() -> Path:
    r = subprocess.run(['make', '-C', str(NATIVE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert PAM_MOD.is_file()
    return PAM_MOD


@pytest.fixture(scope='session')
def pam_app(pam_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp('pamapp') / 'pam_app'
    r = subprocess.run(['gcc', '-Wall', '-Wextra', '-Werror', '-O1', '-g', '-o', str(out),
                        str(APP_SRC), '-lpam'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


# ------------------------------------------------------------------------------ pam_app


@dataclass
class AppResult:
    calls: list[tuple[str, str, int]]       # (op, PAM code name, milliseconds)
    prompts: list[tuple[int, str]]
    fds: list[int]                          # before pam_start, after round 1, after last, after pam_end
    stdout: str
    stderr: str
    returncode: int

    def codes(self) -> list[str]:
        return [c[1] for c in self.calls]


def _parse_app(stdout: str, stderr: str, returncode: int) -> AppResult:
    calls, prompts, fds = [], [], []
    for line in stdout.splitlines():
        parts = line.split(' ', 2)
        if parts[0] == 'prompt':
            prompts.append((int(parts[1]), parts[2] if len(parts) > 2 else ''))
        elif parts[0] == 'fds':
            fds = [int(x) for x in line.split()[1:]]
        elif len(line.split()) == 4:
            op, _rc, name, ms = line.split()
            calls.append((op, name, int(ms)))
    return AppResult(calls, prompts, fds, stdout, stderr, returncode)


def pam_conf(confdir: Path, socket_path: Path | str, timeout: float = 1.0,
             service: str = SERVICE, extra: str = 'debug') -> Path:
    confdir.mkdir(parents=True, exist_ok=True)
    args = f'socket={socket_path} timeout={timeout:g} {extra}'.strip()
    (confdir / service).write_text(
        f'auth     required {PAM_MOD} {args}\n'
        f'account  required {PAM_MOD} {args}\n'
        f'session  required {PAM_MOD} {args}\n'
        f'password required pam_deny.so\n')
    return confdir


def run_app(app: Path, confdir: Path, *ops: str, user: str | bytes = 'dev-alice',
            answer: str | None = 'QUFBQQ==', mode: str | None = None, rounds: int = 1,
            tty: str | bytes | None = None, rhost: str | bytes | None = None,
            service: str = SERVICE, wrapper: list[str] | None = None,
            timeout: float = 60) -> AppResult:
    argv: list[str | bytes] = [*(wrapper or []), str(app), '-C', str(confdir), '-s', service,
                               '-u', user, '-n', str(rounds)]
    if mode == 'conv-fail':
        argv.append('-c')
    elif mode == 'empty':
        argv.append('-e')
    elif answer is not None:
        argv += ['-a', answer]
    if tty is not None:
        argv += ['-t', tty]
    if rhost is not None:
        argv += ['-r', rhost]
    argv += list(ops)
    r = subprocess.run(argv, capture_output=True, timeout=timeout)
    return _parse_app(r.stdout.decode(errors='replace'), r.stderr.decode(errors='replace'),
                      r.returncode)


def run_app_interactive(app: Path, confdir: Path, *ops: str, user: str,
                        answer: Callable[[bytes, str], str | None],
                        service: str = SERVICE, timeout: float = 60) -> AppResult:
    """pam_app -i: each prompt is answered by ``answer(nonce, service)`` (None: empty line)."""
    proc = subprocess.Popen([str(app), '-C', str(confdir), '-s', service, '-u', user, '-i', *ops],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    out = []
    try:
        assert proc.stdout and proc.stdin
        for line in proc.stdout:
            out.append(line)
            m = re.match(r'prompt [12] XOS-CHALLENGE (\S+) (\S+)$', line.rstrip('\n'))
            if m:
                reply = answer(base64.b64decode(m.group(1)), m.group(2))
                proc.stdin.write((reply or '') + '\n')
                proc.stdin.flush()
        proc.wait()
        err = proc.stderr.read() if proc.stderr else ''
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                f.close()
    return _parse_app(''.join(out), err, proc.returncode)


# ------------------------------------------------------------------------------ fake daemon


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b''
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def frame(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack('>I', len(body)) + body


class FakeDaemon:
    """A unix-socket server playing xos-sshd.  Each connection runs ``script(conn, daemon)``;
    afterwards the server waits for the client to close its end (counted in ``closed``)."""

    def __init__(self, path: Path, script: Callable[[socket.socket, FakeDaemon], None],
                 backlog: int = 64, accept: bool = True):
        self.path = path
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.raw_requests: list[bytes] = []
        self.accepted = 0
        self.closed = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(backlog)
        self._threads: list[threading.Thread] = []
        if accept:
            t = threading.Thread(target=self._accept_loop, daemon=True)
            t.start()
            self._threads.append(t)

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                self.script(conn, self)
                while conn.recv(65536):     # until the module closes its end
                    pass
                with self.lock:
                    self.closed += 1
            except OSError:
                with self.lock:
                    self.closed += 1        # reset by the client: closed too

    def recv(self, conn: socket.socket) -> dict[str, Any] | None:
        hdr = _recv_exact(conn, 4)
        if hdr is None:
            return None
        (n,) = struct.unpack('>I', hdr)
        body = _recv_exact(conn, n)
        if body is None:
            return None
        self.raw_requests.append(body)
        req = json.loads(body)
        with self.lock:
            self.requests.append(req)
        return req

    def wait_closed(self, n: int, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.closed >= n:
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads[:1]:
            t.join(2)


def replies(*items: Any) -> Callable[[socket.socket, FakeDaemon], None]:
    """A script: read a request, send the next item (dict: a JSON frame; bytes: raw bytes;
    ('sleep', s); None: stop answering); then keep reading until the client closes."""
    def script(conn: socket.socket, d: FakeDaemon) -> None:
        for item in items:
            if isinstance(item, tuple) and item[0] == 'sleep':
                time.sleep(item[1])
                continue
            if isinstance(item, tuple) and item[0] == 'drip':
                for b in item[1]:
                    conn.sendall(bytes([b]))
                    time.sleep(item[2])
                continue
            if d.recv(conn) is None:
                return
            if item is None:
                return
            conn.sendall(frame(item) if isinstance(item, dict) else item)
    return script


def by_op(table: dict[str, Any]) -> Callable[[socket.socket, FakeDaemon], None]:
    """A script that answers each request by its op: ``table[op]`` (or ``table['*']``) is a
    dict (JSON frame), bytes (sent raw) or None (stop answering)."""
    def script(conn: socket.socket, d: FakeDaemon) -> None:
        while True:
            req = d.recv(conn)
            if req is None:
                return
            item = table.get(req.get('op'), table.get('*'))
            if item is None:
                return
            conn.sendall(frame(item) if isinstance(item, dict) else item)
    return script


OK_CHALLENGE = {'ok': True, 'nonce': NONCE}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """Socket paths must fit in sun_path: a short directory outside pytest's deep tmp."""
    d = Path(tempfile.mkdtemp(prefix='pamx-'))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir: Path) -> Iterator[Callable[..., FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(script: Callable[[socket.socket, FakeDaemon], None], **kw: Any) -> FakeDaemon:
        d = FakeDaemon(sockdir / f'd{len(made)}.sock', script, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()


# ------------------------------------------------------------------------------ build facts


def test_exports_only_pam_sm_entry_points(pam_module: Path) -> None:
    out = subprocess.run(['nm', '-D', '--defined-only', str(pam_module)],
                         capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert names == {'pam_sm_authenticate', 'pam_sm_setcred', 'pam_sm_acct_mgmt',
                     'pam_sm_open_session', 'pam_sm_close_session'}
    undef = subprocess.run(['nm', '-D', '--undefined-only', str(pam_module)],
                           capture_output=True, text=True, check=True).stdout
    # no crypto, no blocking connect helpers from elsewhere: libc + libpam only
    libs = subprocess.run(['objdump', '-p', str(pam_module)], capture_output=True, text=True,
                          check=True).stdout
    needed = set(re.findall(r'NEEDED\s+(\S+)', libs))
    assert needed == {'libpam.so.0', 'libc.so.6'}, needed
    assert 'pam_prompt' in undef and 'pam_syslog' in undef
    assert subprocess.run(['make', '-C', str(NATIVE), 'check-symbols'],
                          capture_output=True).returncode == 0


def test_make_install_puts_the_module_under_security(pam_module: Path, tmp_path: Path) -> None:
    work = tmp_path / 'native'
    shutil.copytree(NATIVE, work, ignore=shutil.ignore_patterns('build'))
    r = subprocess.run(['make', '-C', str(work), 'install', f'DESTDIR={tmp_path / "root"}'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    multiarch = subprocess.run(['gcc', '-print-multiarch'], capture_output=True,
                               text=True).stdout.strip()
    found = list((tmp_path / 'root').rglob('pam_xos.so'))
    assert len(found) == 1 and found[0].parent.name == 'security'
    assert not multiarch or f'/lib/{multiarch}/security/' in str(found[0])
    assert oct(found[0].stat().st_mode & 0o777) == '0o644'


# ------------------------------------------------------------------------------ daemon down


def test_daemon_down_no_socket_file(pam_app: Path, tmp_path: Path, sockdir: Path) -> None:
    conf = pam_conf(tmp_path / 'pam.d', sockdir / 'missing.sock', timeout=2)
    t0 = time.monotonic()
    res = run_app(pam_app, conf, 'auth', 'acct', 'open', 'close')
    assert time.monotonic() - t0 < 3
    assert res.codes() == ['PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR',
                           'PAM_SESSION_ERR'], res.stdout
    assert res.prompts == []                       # nothing asked when there is no daemon
    assert res.fds[0] == res.fds[3]


def test_daemon_down_stale_socket(pam_app: Path, tmp_path: Path, sockdir: Path) -> None:
    stale = sockdir / 'stale.sock'
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                       # the file stays, nobody listens
    conf = pam_conf(tmp_path / 'pam.d', stale, timeout=2)
    t0 = time.monotonic()
    res = run_app(pam_app, conf, 'auth')
    assert time.monotonic() - t0 < 3
    assert res.codes() == ['PAM_AUTHINFO_UNAVAIL']


def test_setcred_is_success_without_a_daemon(pam_app: Path, tmp_path: Path,
                                             sockdir: Path) -> None:
    conf = pam_conf(tmp_path / 'pam.d', sockdir / 'missing.sock')
    assert run_app(pam_app, conf, 'setcred').codes() == ['PAM_SUCCESS']


# ------------------------------------------------------------------------------ success path


def test_auth_success_and_request_encoding(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies(OK_CHALLENGE, {'ok': True, 'account': 'dev-alice', 'uid': 300001}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'auth', answer='QU5TV0VS', rhost='192.0.2.7')
    assert res.codes() == ['PAM_SUCCESS'], res.stdout
    assert res.prompts == [(2, f'XOS-CHALLENGE {NONCE} {SERVICE}')]   # 2 = PAM_PROMPT_ECHO_ON
    assert d.requests == [
        {'op': 'pam.challenge', 'service': SERVICE, 'user': 'dev-alice'},
        {'op': 'pam.auth', 'service': SERVICE, 'user': 'dev-alice', 'answer': 'QU5TV0VS',
         'rhost': '192.0.2.7'},
    ]
    assert d.accepted == 1                          # both requests on the same connection
    assert d.wait_closed(1)


def test_account_and_session_requests(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies({'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'acct', 'open', 'close', tty='/dev/pts/3', rhost='example.org')
    assert res.codes() == ['PAM_SUCCESS'] * 3
    assert d.requests == [
        {'op': 'pam.account', 'service': SERVICE, 'user': 'dev-alice'},
        {'op': 'pam.open_session', 'service': SERVICE, 'user': 'dev-alice',
         'tty': '/dev/pts/3', 'rhost': 'example.org'},
        {'op': 'pam.close_session', 'service': SERVICE, 'user': 'dev-alice',
         'tty': '/dev/pts/3', 'rhost': 'example.org'},
    ]
    assert d.wait_closed(3)
    # unset PAM_TTY / PAM_RHOST travel as null
    res = run_app(pam_app, conf, 'open')
    assert res.codes() == ['PAM_SUCCESS']
    assert d.requests[-1] == {'op': 'pam.open_session', 'service': SERVICE, 'user': 'dev-alice',
                              'tty': None, 'rhost': None}


def test_json_encoder_escapes_everything(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies({'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    nasty = 'a"b\\c\x01d\x1fe\x7ff\té\n"}, "op": "admin.ban'
    res = run_app(pam_app, conf, 'open', user=nasty, tty='t\x1b[31m',
                  rhost=b'h\xffst\xc3\x28')
    assert res.codes() == ['PAM_SUCCESS']
    raw = d.raw_requests[-1]
    assert not any(b < 0x20 or b == 0x7f for b in raw), raw
    req = json.loads(raw)
    assert req == {'op': 'pam.open_session', 'service': SERVICE, 'user': nasty,
                   'tty': 't\x1b[31m', 'rhost': 'h\ufffdst\ufffd('}


def test_invalid_utf8_user_is_refused_without_asking(pam_app: Path, tmp_path: Path,
                                                     fake) -> None:
    d = fake(by_op({'pam.challenge': OK_CHALLENGE, '*': {'ok': True}}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'auth', 'acct', 'open', user=b'dev-\xffalice')
    assert res.codes() == ['PAM_USER_UNKNOWN', 'PAM_USER_UNKNOWN', 'PAM_SESSION_ERR']
    assert d.accepted == 0 and res.prompts == []


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize('reason,auth,acct,session', [
    ('bad-signature', 'PAM_AUTH_ERR', 'PAM_PERM_DENIED', 'PAM_SESSION_ERR'),
    ('revoked', 'PAM_AUTH_ERR', 'PAM_PERM_DENIED', 'PAM_SESSION_ERR'),
    ('banned', 'PAM_AUTH_ERR', 'PAM_PERM_DENIED', 'PAM_SESSION_ERR'),
    ('expired', 'PAM_AUTH_ERR', 'PAM_ACCT_EXPIRED', 'PAM_SESSION_ERR'),
    ('lease-expired', 'PAM_AUTH_ERR', 'PAM_ACCT_EXPIRED', 'PAM_SESSION_ERR'),
    ('not-mapped', 'PAM_USER_UNKNOWN', 'PAM_USER_UNKNOWN', 'PAM_SESSION_ERR'),
    ('login-name-mismatch', 'PAM_AUTH_ERR', 'PAM_PERM_DENIED', 'PAM_SESSION_ERR'),
    ('no-challenge', 'PAM_AUTH_ERR', 'PAM_PERM_DENIED', 'PAM_SESSION_ERR'),
    # the daemon could not serve the request at all: like an unreachable daemon
    ('bad-request', 'PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR'),
    ('permission-denied', 'PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR'),
    ('internal-error', 'PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR'),
    ('busy', 'PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR'),
])
def test_refusal_reasons_map_to_pam_codes(pam_app: Path, tmp_path: Path, fake, reason: str,
                                          auth: str, acct: str, session: str) -> None:
    refusal = {'ok': False, 'reason': reason, 'error': f'refused: {reason}\x07'}
    d = fake(by_op({'pam.challenge': OK_CHALLENGE, '*': refusal}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'auth', 'acct', 'open', 'close')
    assert res.codes() == [auth, acct, session, session], res.stdout
    assert len(res.prompts) == 1                     # the prompt came, then pam.auth refused
    # refused at pam.challenge already: no prompt at all
    d2 = fake(replies(refusal))
    conf2 = pam_conf(tmp_path / 'pam2.d', d2.path)
    res2 = run_app(pam_app, conf2, 'auth')
    assert res2.codes() == [auth] and res2.prompts == []


def test_time_spent_answering_is_not_the_daemons(pam_app: Path, tmp_path: Path, fake) -> None:
    """timeout= bounds the waits on the daemon; a client slower than that still logs in."""
    d = fake(by_op({'pam.challenge': OK_CHALLENGE, 'pam.auth': {'ok': True}}))
    conf = pam_conf(tmp_path / 'pam.d', d.path, timeout=0.5)

    def slow(nonce: bytes, service: str) -> str:
        time.sleep(1.2)
        return 'QU5TV0VS'
    res = run_app_interactive(pam_app, conf, 'auth', user='dev-alice', answer=slow)
    assert res.codes() == ['PAM_SUCCESS'], res.stdout
    assert res.calls[0][2] >= 1200


def test_conversation_failure_and_empty_answer(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies(OK_CHALLENGE, {'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    assert run_app(pam_app, conf, 'auth', mode='conv-fail').codes() == ['PAM_CRED_INSUFFICIENT']
    assert run_app(pam_app, conf, 'auth', mode='empty').codes() == ['PAM_AUTH_ERR']
    assert d.wait_closed(2)
    assert [r['op'] for r in d.requests] == ['pam.challenge', 'pam.challenge']   # no pam.auth


def test_oversized_answer_is_not_sent(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies(OK_CHALLENGE, {'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'auth', answer='A' * (61 * 1024))
    assert res.codes() == ['PAM_AUTH_ERR']
    assert [r['op'] for r in d.requests] == ['pam.challenge']


def test_unusable_service_name(pam_app: Path, tmp_path: Path, fake) -> None:
    d = fake(replies(OK_CHALLENGE, {'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path, service='bad~service')
    res = run_app(pam_app, conf, 'auth', service='bad~service')
    assert res.codes() == ['PAM_AUTHINFO_UNAVAIL'] and d.accepted == 0


# ------------------------------------------------------------------------------ hostile daemons


MALFORMED_CHALLENGE_REPLIES = {
    'garbage-body': frame(b'hello, not json'),
    'raw-garbage': b'\x00\x00\x00\x05hel',          # promises 5 bytes, sends 3, then stalls
    'oversize': struct.pack('>I', 64 * 1024 + 1) + b'{' * 1000,
    'huge-length': b'\xff\xff\xff\xff',
    'zero-length': b'\x00\x00\x00\x00',
    'not-object': frame([True]),
    'ok-string': frame({'ok': 'true', 'nonce': NONCE}),
    'ok-missing': frame({'nonce': NONCE}),
    'ok-twice': frame(b'{"ok": false, "ok": true, "nonce": "%s"}' % NONCE.encode()),
    'nonce-twice': frame(b'{"ok": true, "nonce": "QUFB", "nonce": "%s"}' % NONCE.encode()),
    'trailing-data': frame(b'{"ok": true, "nonce": "%s"} x' % NONCE.encode()),
    'nonce-missing': frame({'ok': True}),
    'nonce-number': frame({'ok': True, 'nonce': 12345}),
    'nonce-injection': frame({'ok': True, 'nonce': 'QUFB\nXOS-CHALLENGE AAAA sshd'}),
    'nonce-space': frame({'ok': True, 'nonce': 'QUFB other'}),
    'nonce-too-long': frame({'ok': True, 'nonce': 'A' * 2000}),
    'nonce-nul-escape': frame(b'{"ok": true, "nonce": "QUFB\\u0000QUFB"}'),
    'deep-nesting': frame(b'{"ok": true, "nonce": "%s", "x": ' % NONCE.encode() + b'[' * 100
                          + b']' * 100 + b'}'),
    'bad-escape': frame(b'{"ok": true, "nonce": "%s", "x": "\\q"}' % NONCE.encode()),
    'lone-surrogate': frame(b'{"ok": true, "nonce": "%s", "x": "\\ud800"}' % NONCE.encode()),
    'raw-control-char': frame(b'{"ok": true, "nonce": "%s", "x": "a\x01"}' % NONCE.encode()),
    'bad-number': frame(b'{"ok": true, "nonce": "%s", "x": 01}' % NONCE.encode()),
    'unterminated': frame(b'{"ok": true, "nonce": "%s"' % NONCE.encode()),
    'truncated-literal': frame(b'{"ok": tru'),
}


@pytest.mark.parametrize('name', sorted(MALFORMED_CHALLENGE_REPLIES))
def test_malformed_replies_are_unavailable(pam_app: Path, tmp_path: Path, fake,
                                           name: str) -> None:
    d = fake(replies(MALFORMED_CHALLENGE_REPLIES[name], {'ok': True}))
    conf = pam_conf(tmp_path / 'pam.d', d.path, timeout=1)
    t0 = time.monotonic()
    res = run_app(pam_app, conf, 'auth')
    assert time.monotonic() - t0 < 2
    assert res.codes() == ['PAM_AUTHINFO_UNAVAIL'], res.stdout
    assert res.prompts == []
    assert d.wait_closed(1)


def test_tolerant_of_valid_json_shapes(pam_app: Path, tmp_path: Path, fake) -> None:
    """Escaped keys, nested ignored values, numbers, unicode, whitespace: all fine."""
    body = ('\n { "extra" : {"a": [1, -2.5e3, 0.0, true, false, null, "\\u00e9\\ud83d\\ude00"]},'
            ' "\\u006fk" : true , "nonce" : "%s", "error": null, "reason": "\\u00e9" } \n'
            % NONCE.replace('/', '\\/'))
    big = {'ok': True, 'pad': ''}
    big['pad'] = 'x' * (64 * 1024 - len(json.dumps(big)))
    assert len(json.dumps(big)) == 64 * 1024              # exactly at the limit: accepted
    d = fake(replies(frame(body.encode()), big))
    conf = pam_conf(tmp_path / 'pam.d', d.path)
    res = run_app(pam_app, conf, 'auth')
    assert res.codes() == ['PAM_SUCCESS'], res.stdout
    assert res.prompts == [(2, f'XOS-CHALLENGE {NONCE} {SERVICE}')]


def _close_at_once(conn: socket.socket, d: FakeDaemon) -> None:
    conn.shutdown(socket.SHUT_RDWR)


def _close_after_prompt(conn: socket.socket, d: FakeDaemon) -> None:
    d.recv(conn)
    conn.sendall(frame(OK_CHALLENGE))
    d.recv(conn)
    conn.shutdown(socket.SHUT_RDWR)


NO_HANG_SCRIPTS = {
    'silent': by_op({'*': None}),
    'half-frame': by_op({'*': frame(OK_CHALLENGE)[:10]}),
    # one byte every 0.3 s: each read makes progress, the call's total deadline still holds
    'drip': replies(('drip', frame(OK_CHALLENGE), 0.3)),
    'close': _close_at_once,
    # these two only make sense for auth (the second exchange fails)
    'silent-after-prompt': by_op({'pam.challenge': OK_CHALLENGE, '*': None}),
    'close-after-prompt': _close_after_prompt,
}


@pytest.mark.parametrize('case', sorted(NO_HANG_SCRIPTS))
def test_no_hang(pam_app: Path, tmp_path: Path, fake, case: str) -> None:
    """Whatever the daemon does, one PAM call takes at most about its timeout."""
    d = fake(NO_HANG_SCRIPTS[case])
    conf = pam_conf(tmp_path / 'pam.d', d.path, timeout=1)
    auth_only = case.endswith('-after-prompt')
    ops = ['auth'] if auth_only else ['auth', 'acct', 'open']
    t0 = time.monotonic()
    res = run_app(pam_app, conf, *ops)
    elapsed = time.monotonic() - t0
    expected = ['PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR'][:len(ops)]
    assert res.codes() == expected, res.stdout
    assert len(res.prompts) == (1 if auth_only else 0)
    for _op, _code, ms in res.calls:
        assert ms < 1000 + 500, res.calls
    assert elapsed < len(ops) * 1.5 + 1
    assert res.fds[0] == res.fds[3]
    assert d.wait_closed(d.accepted)


def test_backlog_full_connect_times_out(pam_app: Path, tmp_path: Path, fake) -> None:
    """A daemon that never accepts, with its listen queue full: connect() gives EAGAIN; the
    module retries until its deadline and gives up in time."""
    d = fake(replies(None), backlog=0, accept=False)
    fillers = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(d.path))
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    try:
        conf = pam_conf(tmp_path / 'pam.d', d.path, timeout=1)
        t0 = time.monotonic()
        res = run_app(pam_app, conf, 'auth')
        elapsed = time.monotonic() - t0
        assert res.codes() == ['PAM_AUTHINFO_UNAVAIL']
        assert 0.8 < elapsed < 2.5, elapsed
        assert res.fds[0] == res.fds[3]
    finally:
        for s in fillers:
            s.close()


def _runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, '-c', 'pass'], user=65534, group=65534,
                              capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def test_daemon_must_be_root(pam_app: Path, tmp_path: Path) -> None:
    """A socket served by a non-root process is never believed, even if it says ok."""
    base = Path(tempfile.mkdtemp(prefix='pamx-'))
    try:
        base.chmod(0o755)
        sdir = base / 's'
        sdir.mkdir(mode=0o777)
        sdir.chmod(0o777)
        path = sdir / 'evil.sock'
        code = ('import socket,struct,json,sys\n'
                's=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n'
                'print("ready", flush=True)\n'
                'while True:\n'
                '  c,_=s.accept()\n'
                '  try:\n'
                '    for r in ({"ok":True,"nonce":"QUFB"},{"ok":True}):\n'
                '      n=struct.unpack(">I",c.recv(4))[0]; c.recv(n)\n'
                '      b=json.dumps(r).encode(); c.sendall(struct.pack(">I",len(b))+b)\n'
                '  except Exception: pass\n'
                '  c.close()\n')
        # a Python nobody may execute (the venv's may live under /root)
        python = next((p for p in ('/usr/bin/python3', sys.executable)
                       if os.path.exists(p) and _runs_as_nobody(p)), None)
        if python is None:
            pytest.skip('no Python that uid 65534 can run')
        evil = subprocess.Popen([python, '-c', code, str(path)], user=65534, group=65534,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert evil.stdout and evil.stdout.readline().strip() == 'ready'
            conf = pam_conf(tmp_path / 'pam.d', path)
            res = run_app(pam_app, conf, 'auth', 'acct', 'open')
            assert res.codes() == ['PAM_AUTHINFO_UNAVAIL', 'PAM_AUTH_ERR', 'PAM_SESSION_ERR']
            assert res.prompts == []
        finally:
            evil.kill()
            evil.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


class SyslogCatcher:
    """A datagram socket playing /dev/log (bound over it in pam_app's own mount namespace)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode(errors='replace'))
            except (TimeoutError, BlockingIOError):
                return out

    def close(self) -> None:
        self.sock.close()


def run_app_with_syslog(app: Path, confdir: Path, catcher: SyslogCatcher, *ops: str,
                        **kw: Any) -> tuple[AppResult, list[str]]:
    """pam_app with a private /dev (a tmpfs holding null and our log socket), so syslog()
    reaches the test; the host's /dev is not touched."""
    script = ('mount -t tmpfs -o mode=755 xos-test-dev /dev && mknod -m 666 /dev/null c 1 3 '
              '&& touch /dev/log && mount --bind "$1" /dev/log && shift && exec "$@"')
    res = run_app(app, confdir, *ops, wrapper=['unshare', '-m', '--propagation', 'private',
                                               'sh', '-c', script, 'sh', str(catcher.path)], **kw)
    return res, catcher.messages()


def test_refusals_and_failures_are_logged(pam_app: Path, tmp_path: Path, fake,
                                          sockdir: Path) -> None:
    catcher = SyslogCatcher(sockdir / 'log')
    try:
        d = fake(by_op({'pam.challenge': OK_CHALLENGE,
                        '*': {'ok': False, 'reason': 'revoked',
                              'error': 'serial 42 is\non the CRL\x1b[2J'}}))
        conf = pam_conf(tmp_path / 'pam.d', d.path)
        res, logs = run_app_with_syslog(pam_app, conf, catcher, 'auth', 'acct')
        assert res.codes() == ['PAM_AUTH_ERR', 'PAM_PERM_DENIED'], res.stdout + res.stderr
        text = '\n'.join(logs)
        assert 'pam_xos(xos-test:auth): pam.auth refused for user dev-alice: revoked: ' \
               'serial 42 is?on the CRL?[2J' in text, logs
        assert 'pam_xos(xos-test:account): pam.account refused for user dev-alice: revoked' in text
        assert not any('\x1b' in m for m in logs)
        conf2 = pam_conf(tmp_path / 'pam2.d', sockdir / 'missing.sock')
        res, logs = run_app_with_syslog(pam_app, conf2, catcher, 'auth')
        assert res.codes() == ['PAM_AUTHINFO_UNAVAIL']
        assert any('cannot connect to xos-sshd at' in m and 'No such file or directory' in m
                   for m in logs), logs
    finally:
        catcher.close()


# ------------------------------------------------------------------------------ fd leaks, valgrind


@pytest.mark.parametrize('case', ['ok', 'refused', 'garbage', 'oversize', 'down'])
def test_no_fd_leak_over_many_calls(pam_app: Path, tmp_path: Path, fake, sockdir: Path,
                                    case: str) -> None:
    rounds = 150
    script = {
        'ok': by_op({'pam.challenge': OK_CHALLENGE, '*': {'ok': True}}),
        'refused': by_op({'pam.challenge': OK_CHALLENGE,
                          '*': {'ok': False, 'reason': 'revoked', 'error': 'x'}}),
        'garbage': by_op({'*': frame(b'\x00\xff garbage')}),
        'oversize': by_op({'*': struct.pack('>I', 10**6)}),
    }.get(case)
    path = fake(script).path if script else sockdir / 'none.sock'
    conf = pam_conf(tmp_path / 'pam.d', path, timeout=2, extra='')
    res = run_app(pam_app, conf, 'auth', 'acct', 'open', 'close', rounds=rounds)
    assert len(res.calls) == 4 * rounds
    want = {'ok': 'PAM_SUCCESS', 'refused': 'PAM_AUTH_ERR'}.get(case, 'PAM_AUTHINFO_UNAVAIL')
    assert res.codes()[-4] == want
    start, round1, last, end = res.fds
    assert round1 == last, res.fds                    # nothing accumulates call after call
    assert start == end, res.fds                      # nothing left after pam_end


VALGRIND = ['valgrind', '--quiet', '--error-exitcode=99', '--leak-check=full',
            '--errors-for-leak-kinds=definite,indirect', '--show-leak-kinds=definite,indirect',
            '--track-fds=yes']


@pytest.mark.skipif(shutil.which('valgrind') is None, reason='needs valgrind')
@pytest.mark.parametrize('case', ['ok', 'refused', 'malformed', 'oversize', 'silent', 'down'])
def test_valgrind_clean(pam_app: Path, tmp_path: Path, fake, sockdir: Path, case: str) -> None:
    script = {
        'ok': by_op({'pam.challenge': OK_CHALLENGE,
                     '*': {'ok': True, 'error': None, 'x': [1, {'y': 'z'}]}}),
        'refused': by_op({'pam.challenge': OK_CHALLENGE,
                          '*': {'ok': False, 'reason': 'revoked', 'error': 'é\n'}}),
        'malformed': by_op({'*': frame(b'{"ok": true, "nonce": "QUFB", "nonce": "x"}')}),
        'oversize': by_op({'*': struct.pack('>I', 70000) + b'x' * 100}),
        'silent': by_op({'pam.challenge': OK_CHALLENGE, '*': None}),
    }.get(case)
    path = fake(script).path if script else sockdir / 'none.sock'
    conf = pam_conf(tmp_path / 'pam.d', path, timeout=1)
    res = run_app(pam_app, conf, 'auth', 'acct', 'open', 'close', 'setcred', rounds=2,
                  tty='pts/1', rhost='h', wrapper=VALGRIND, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.calls) == 10, res.stdout
    # --track-fds: nothing but the standard descriptors may be open at exit
    leaked = [int(n) for n in re.findall(r'^==\d+== Open .*? (\d+):', res.stderr, re.MULTILINE)]
    assert all(n <= 2 for n in leaked), res.stderr
    assert res.fds[0] == res.fds[3]


# ------------------------------------------------------------------------------ the real gateway


@pytest.fixture
def pam_gateway(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                home_base: Path) -> Iterator[GatewayProcess]:
    """A gateway whose control socket path is short enough for sun_path."""
    sock_dir = Path(tempfile.mkdtemp(prefix='xosctl-'))
    sock_dir.chmod(0o755)
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
        control_socket=str(sock_dir / 'control.sock'))
    gw.start()
    yield gw
    gw.stop()
    kill_uid_processes(*uid_range)
    shutil.rmtree(sock_dir, ignore_errors=True)


def control_socket(gw: GatewayProcess) -> str:
    return str(gw.control_socket)


def signer(prefix: Path, login: str) -> Callable[[bytes, str], str]:
    from xos_sshd.auth.challenge import sign_challenge
    from xos_sshd.client import load_identity
    ident = load_identity(str(prefix))

    def answer(nonce: bytes, service: str) -> str:
        return sign_challenge(ident.private_key, ident.chain_pem, nonce, service, login)
    return answer


def mapped_uid(gw: GatewayProcess, prefix: Path) -> int:
    res = gw.ssh_xos(prefix, 'id -u')
    assert res.returncode == 0, res.stderr + gw.log()
    return int(res.stdout)


def test_real_gateway_auth_account_session(pam_app: Path, pam_gateway: GatewayProcess,
                                           dev_ca: VOCA, tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    uid = mapped_uid(gw, alice)
    conf = pam_conf(tmp_path / 'pam.d', control_socket(gw), timeout=5)
    res = run_app_interactive(pam_app, conf, 'auth', 'acct', 'open', 'close', user='dev-alice',
                              answer=signer(alice, 'dev-alice'))
    assert res.codes() == ['PAM_SUCCESS'] * 4, res.stdout + gw.log()
    audit = gw.audit()
    pam_logins = [e for e in audit if e.get('event') == 'login' and e.get('route') == 'pam']
    assert pam_logins and pam_logins[-1]['outcome'] == 'accepted'
    assert pam_logins[-1]['account'] == 'dev-alice'
    sessions = [e for e in audit if e.get('event') == 'session' and e.get('route') == 'pam']
    assert [s['action'] for s in sessions] == ['open', 'close']
    assert all(s['uid'] == uid for s in sessions)


def test_real_gateway_refusals(pam_app: Path, pam_gateway: GatewayProcess, dev_ca: VOCA,
                               tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    mapped_uid(gw, alice)
    mapped_uid(gw, bob)
    conf = pam_conf(tmp_path / 'pam.d', control_socket(gw), timeout=5)
    # bob's certificate for alice's account
    res = run_app_interactive(pam_app, conf, 'auth', user='dev-alice',
                              answer=signer(bob, 'dev-alice'))
    assert res.codes() == ['PAM_AUTH_ERR'], res.stdout
    # an answer signed for another account name (the signature covers the user)
    res = run_app_interactive(pam_app, conf, 'auth', user='dev-alice',
                              answer=signer(alice, 'dev-bob'))
    assert res.codes() == ['PAM_AUTH_ERR']
    # an account xos-sshd never mapped
    assert run_app(pam_app, conf, 'acct', user='dev-nobody').codes() == ['PAM_USER_UNKNOWN']
    # garbage answer
    res = run_app_interactive(pam_app, conf, 'auth', user='dev-alice',
                              answer=lambda n, s: 'bm90IGFuIGFuc3dlcg==')
    assert res.codes() == ['PAM_AUTH_ERR']
    reasons = [e['reason'] for e in gw.audit()
               if e.get('route') == 'pam' and e.get('outcome') == 'refused']
    assert 'bad-signature' in reasons and 'bad-encoding' in reasons, reasons


def test_real_gateway_account_sees_revocation(pam_app: Path, pam_gateway: GatewayProcess,
                                              dev_ca: VOCA, tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    mapped_uid(gw, alice)
    conf = pam_conf(tmp_path / 'pam.d', control_socket(gw), timeout=5)
    res = run_app_interactive(pam_app, conf, 'auth', 'acct', user='dev-alice',
                              answer=signer(alice, 'dev-alice'))
    assert res.codes() == ['PAM_SUCCESS', 'PAM_SUCCESS'], res.stdout
    dev_ca.revoke(alice)
    time.sleep(0.05)
    assert run_app(pam_app, conf, 'acct').codes() == ['PAM_PERM_DENIED']
    res = run_app_interactive(pam_app, conf, 'auth', user='dev-alice',
                              answer=signer(alice, 'dev-alice'))
    assert res.codes() == ['PAM_AUTH_ERR']


# ------------------------------------------------------------------------------ stock sshd


SSHD_SERVICE = 'sshd-xos-test'


class SystemSshd:
    """A stock OpenSSH sshd using pam_xos, in a private mount namespace.

    ``unshare -m`` gives sshd its own mount table: a copy of /etc/pam.d with the
    ``sshd-xos-test`` service added is bind-mounted over /etc/pam.d, and an nsswitch.conf with
    ``passwd: files xos`` over /etc/nsswitch.conf.  The host's files are never touched.
    """

    def __init__(self, base: Path, gw: GatewayProcess, pam_timeout: float = 3):
        self.base = base
        self.gw = gw
        base.mkdir(mode=0o755, exist_ok=True)
        self.port = free_port()
        key = base / 'ssh_host_ed25519_key'
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(key)], check=True)
        self.prog = base / SSHD_SERVICE                   # sshd's PAM service = its program name
        self.prog.symlink_to(SSHD)
        pamd = base / 'pam.d'
        shutil.copytree('/etc/pam.d', pamd, symlinks=True)
        args = f'socket={control_socket(gw)} timeout={pam_timeout:g} debug'
        (pamd / SSHD_SERVICE).write_text(
            f'auth     required {PAM_MOD} {args}\n'
            f'account  required {PAM_MOD} {args}\n'
            f'session  required {PAM_MOD} {args}\n'
            f'password required pam_deny.so\n')
        self.pamd = pamd
        nss = []
        for line in Path('/etc/nsswitch.conf').read_text().splitlines():
            if re.match(r'\s*(passwd|group)\s*:', line):
                continue
            nss.append(line)
        nss += ['passwd: files xos', 'group: files xos']
        self.nsswitch = base / 'nsswitch.conf'
        self.nsswitch.write_text('\n'.join(nss) + '\n')
        self.config = base / 'sshd_config'
        self.config.write_text(f'''\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {key}
PidFile {base}/sshd.pid
UsePAM yes
KbdInteractiveAuthentication yes
PasswordAuthentication no
PubkeyAuthentication no
AuthenticationMethods keyboard-interactive
StrictModes no
PermitRootLogin no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
AuthorizedKeysFile none
LoginGraceTime 30
LogLevel VERBOSE
''')
        self.log_path = base / 'sshd.log'
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SystemSshd:
        env = dict(os.environ, LD_LIBRARY_PATH=str(NSS_BUILD),
                   XOS_NSS_DIR=str(self.gw.state / 'nss'))
        script = ('mount --bind "$1" /etc/pam.d && mount --bind "$2" /etc/nsswitch.conf '
                  '&& shift 2 && exec "$@"')
        log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(
            ['unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'sh',
             str(self.pamd), str(self.nsswitch), str(self.prog), '-D', '-e', '-f', str(self.config)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f'sshd exited {self.proc.returncode}:\n{self.log()}')
            try:
                with socket.create_connection(('127.0.0.1', self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f'sshd did not listen:\n{self.log()}')

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors='replace') if self.log_path.exists() else ''

    def ssh_xos(self, prefix: Path, login: str, *command: str,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [SSH_XOS, '--kbdint', '-i', str(prefix), '-l', login, '-p', str(self.port),
                '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                '127.0.0.1', *command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def system_sshd(tmp_path: Path, pam_gateway: GatewayProcess, pam_module: Path) -> Iterator[SystemSshd]:
    if not Path(SSHD).exists():
        pytest.skip('needs openssh-server (/usr/sbin/sshd)')
    subprocess.run(['make', '-C', str(NATIVE)], check=True, capture_output=True)
    sshd = SystemSshd(tmp_path / 'sshd', pam_gateway).start()
    yield sshd
    sshd.stop()


def test_sshd_kbdint_login_as_mapped_account(system_sshd: SystemSshd,
                                             pam_gateway: GatewayProcess, dev_ca: VOCA,
                                             tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    uid = mapped_uid(gw, alice)
    res = system_sshd.ssh_xos(alice, 'dev-alice', 'id -u; echo $USER; echo $HOME')
    assert res.returncode == 0, res.stderr + '\n--- sshd:\n' + system_sshd.log() + gw.log()
    out_uid, user, home = res.stdout.split()
    assert int(out_uid) == uid and user == 'dev-alice' and home.endswith('/dev-alice')
    audit = gw.audit()
    assert any(e.get('route') == 'pam' and e.get('outcome') == 'accepted'
               and e.get('service') == SSHD_SERVICE for e in audit), audit
    opened = [e for e in audit if e.get('event') == 'session' and e.get('route') == 'pam']
    assert opened and opened[0]['action'] == 'open' and opened[0]['uid'] == uid


def _pam_refusals(gw: GatewayProcess) -> list[str]:
    return [e.get('reason', '') for e in gw.audit()
            if e.get('route') == 'pam' and e.get('outcome') == 'refused']


def test_sshd_refuses_another_users_certificate(system_sshd: SystemSshd,
                                                pam_gateway: GatewayProcess, dev_ca: VOCA,
                                                tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    mapped_uid(gw, alice)
    mapped_uid(gw, bob)
    res = system_sshd.ssh_xos(bob, 'dev-alice', 'id -u')
    assert res.returncode == 255 and res.stdout == '', res
    assert 'refused the answer to its XOS challenge' in res.stderr, res.stderr
    assert _pam_refusals(gw) == ['login-name-mismatch'], gw.audit()
    # bob through sshd as himself is fine: the refusal was about the account, not bob
    ok = system_sshd.ssh_xos(bob, 'dev-bob', 'id -un 2>/dev/null || id -u')
    assert ok.returncode == 0, ok.stderr + system_sshd.log()


def test_sshd_refuses_a_revoked_certificate(system_sshd: SystemSshd,
                                            pam_gateway: GatewayProcess, dev_ca: VOCA,
                                            tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    mapped_uid(gw, alice)
    assert system_sshd.ssh_xos(alice, 'dev-alice', 'true').returncode == 0, system_sshd.log()
    dev_ca.revoke(alice)
    res = system_sshd.ssh_xos(alice, 'dev-alice', 'true')
    assert res.returncode == 255, res
    assert 'revoked' in _pam_refusals(gw)


class _KbdintClient:
    """An asyncssh client answering the XOS challenge with whatever ``answer`` returns, once."""

    def __init__(self, answer: Callable[[bytes, str], str]):
        import asyncssh

        outer = self
        self.answered: list[str] = []

        class Client(asyncssh.SSHClient):
            def validate_host_public_key(self, host, addr, port, key):  # type: ignore[no-untyped-def]
                return True

            def kbdint_auth_requested(self) -> str:
                return ''

            def kbdint_challenge_received(self, name, instructions, lang, prompts):  # type: ignore[no-untyped-def]
                if not prompts:
                    return []
                if outer.answered:
                    return None          # one answer per connection
                m = re.match(r'XOS-CHALLENGE (\S+) (\S+)$', prompts[0][0])
                assert m, prompts
                reply = answer(base64.b64decode(m.group(1)), m.group(2))
                outer.answered.append(reply)
                return [reply]

        self.factory = Client

    async def run(self, port: int, login: str, command: str) -> tuple[bool, str]:
        import asyncssh
        try:
            async with asyncssh.connect(
                    '127.0.0.1', port, username=login, client_factory=self.factory,
                    known_hosts=None, client_keys=None, agent_path=None, password_auth=False,
                    kbdint_auth=True, preferred_auth=['keyboard-interactive'], config=None,
                    connect_timeout=20) as conn:
                r = await conn.run(command, check=False)
                return True, str(r.stdout)
        except asyncssh.PermissionDenied:
            return False, ''


def test_sshd_refuses_a_replayed_answer(system_sshd: SystemSshd, pam_gateway: GatewayProcess,
                                        dev_ca: VOCA, tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    uid = mapped_uid(gw, alice)
    first = _KbdintClient(signer(alice, 'dev-alice'))
    ok, out = asyncio.run(first.run(system_sshd.port, 'dev-alice', 'id -u'))
    assert ok and int(out) == uid, system_sshd.log()
    captured = first.answered[0]
    replay = _KbdintClient(lambda nonce, service: captured)
    ok, _ = asyncio.run(replay.run(system_sshd.port, 'dev-alice', 'id -u'))
    assert not ok
    assert replay.answered == [captured]              # it was offered, for a new nonce
    assert 'bad-signature' in _pam_refusals(gw)


def test_sshd_with_gateway_stopped_refuses_quickly(system_sshd: SystemSshd,
                                                   pam_gateway: GatewayProcess, dev_ca: VOCA,
                                                   tmp_path: Path) -> None:
    gw = pam_gateway
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    mapped_uid(gw, alice)
    gw.stop()
    t0 = time.monotonic()
    res = system_sshd.ssh_xos(alice, 'dev-alice', 'id -u', timeout=30)
    elapsed = time.monotonic() - t0
    assert res.returncode == 255 and res.stdout == '', res
    assert elapsed < 10, elapsed
    # ssh-xos says why, and does not retry keyboard-interactive until MaxAuthTries
    assert 'without an XOS challenge' in res.stderr, res.stderr
    assert system_sshd.log().count('Failed keyboard-interactive/pam for dev-alice') == 1, \
        system_sshd.log()
