"""ssh-xos against a throwaway asyncssh server that accepts RFC 6187 X.509 client auth.

The server runs in the test's event loop; the client runs as a real process
(`python -m xos_sshd.client`) so exit codes, stdio and the terminal behave as for a user.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xos_sshd.auth.challenge import make_prompt, verify_challenge_answer
from xos_sshd.client import cert_login_name, load_identity

GUID_OID = x509.ObjectIdentifier("1.34.5.0.14.3")
HOST = "127.0.0.1"
# asyncssh 2.24 still calls pyOpenSSL's deprecated X509.get_subject()/get_issuer()
pytestmark = pytest.mark.filterwarnings("ignore:X509.get_:DeprecationWarning")


# ----------------------------------------------------------------------------- PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cn: str = "Test VO CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca, prefix: Path, *, user: str = "alice", cn: str | None = None, rsa_key: bool = False,
           guid_der: bytes | None = None) -> Path:
    """Write PREFIX.pem / PREFIX.key like `xos-ca issue` (GlobalUserID as DER OCTET STRING)."""
    ca_key, ca_cert = ca
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    guid = guid_der if guid_der is not None else b"\x04" + bytes([len(user)]) + user.encode()
    cert = (x509.CertificateBuilder().subject_name(_name(cn or user)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=12))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            )
    if guid:  # b"": a service certificate, without GlobalUserID
        cert = cert.add_extension(x509.UnrecognizedExtension(GUID_OID, guid), critical=False)
    cert = cert.sign(ca_key, hashes.SHA256())
    prefix.with_name(prefix.name + ".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    prefix.with_name(prefix.name + ".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return prefix


def _issue_with_xos_ca(d: Path) -> dict | None:
    """Prefer the real `xos-ca` when it is installed and works; None otherwise."""
    tool = Path(sys.executable).with_name("xos-ca")
    if not tool.exists():
        return None
    try:
        run = lambda *a: subprocess.run([tool, *a], check=True, capture_output=True, timeout=120)
        run("init", d / "xosca", "--vo", "test")
        run("issue", d / "xosca", "--user", "alice", "--out", d / "x-alice")
        run("issue", d / "xosca", "--user", "alice", "--key-type", "rsa", "--out", d / "x-alice-rsa")
        for prefix in ("x-alice", "x-alice-rsa"):
            load_identity(str(d / prefix))
        return {"ca": d / "xosca" / "ca.pem", "ec": d / "x-alice", "rsa": d / "x-alice-rsa"}
    except Exception:
        return None


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca()
    (d / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    ids = {"ec": _issue(ca, d / "alice"), "rsa": _issue(ca, d / "alice-rsa", rsa_key=True)}
    cas = [d / "ca.pem"]
    real = _issue_with_xos_ca(d)
    if real:  # the real CA's credentials become the main identities
        cas.append(real.pop("ca"))
        ids.update(real)
    rogue = _make_ca("Rogue CA")
    ids["rogue"] = _issue(rogue, d / "rogue")
    ids["mismatch"] = _issue(ca, d / "mismatch")
    ids["service"] = _issue(ca, d / "service", guid_der=b"")
    (d / "mismatch.key").write_bytes((d / "alice-rsa.key").read_bytes())
    return {"dir": d, "cas": cas, "xos_ca": bool(real), **ids}


# ----------------------------------------------------------------------------- server


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _exec(process: asyncssh.SSHServerProcess, cmd: str, env: dict) -> int:
    proc = await asyncio.create_subprocess_shell(
        cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)

    async def feed() -> None:
        try:
            while data := await process.stdin.read(65536):
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
            pass
        finally:
            proc.stdin.close()

    async def copy(src, dst) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    feeder = asyncio.create_task(feed())
    await asyncio.gather(copy(proc.stdout, process.stdout), copy(proc.stderr, process.stderr))
    rc = await proc.wait()
    feeder.cancel()
    return rc


async def _pty(process: asyncssh.SSHServerProcess, cmd: str | None, env: dict) -> int:
    master, slave = pty.openpty()
    cols, rows = process.term_size[:2]
    _set_winsize(master, rows, cols)
    argv = ["/bin/sh", "-c", cmd] if cmd else ["/bin/sh", "-i"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=slave, stdout=slave, stderr=slave, env={**env, "PS1": "$ "},
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if data:
            process.stdout.write(data)
        else:
            loop.remove_reader(master)
            eof.set()

    loop.add_reader(master, readable)

    async def feed() -> None:
        while True:
            try:
                data = await process.stdin.read(4096)
            except asyncssh.TerminalSizeChanged as exc:
                _set_winsize(master, exc.height, exc.width)
                continue
            if not data:
                return
            os.write(master, data)

    feeder = asyncio.create_task(feed())
    rc = await proc.wait()
    await asyncio.wait_for(eof.wait(), 10)
    feeder.cancel()
    os.close(master)
    return rc


async def _handle(process: asyncssh.SSHServerProcess) -> None:
    env = {**os.environ, "SSH_USER": process.get_extra_info("username")}
    try:
        if process.subsystem == "echo-sub":
            while data := await process.stdin.read(65536):
                process.stdout.write(data)
            process.exit(0)
            return
        if process.subsystem:
            process.exit(1)
            return
        if process.command == "__drop__":
            process.channel.get_connection().abort()
            return
        if process.term_type:
            rc = await _pty(process, process.command, env)
        else:
            rc = await _exec(process, process.command or "/bin/sh", env)
        if rc < 0:
            process.exit_with_signal(signal.Signals(-rc).name.removeprefix("SIG"))
        else:
            process.exit(rc)
    except Exception:  # pragma: no cover - surfaces as a missing exit status in the test
        process.exit(99)


class _KbdintServer(asyncssh.SSHServer):
    """Accepts only keyboard-interactive, with the pam_xos challenge (or a password prompt)."""

    def __init__(self, ca_certs: list[x509.Certificate], prompt: str | None) -> None:
        self._cas, self._prompt, self._nonce = ca_certs, prompt, b""
        self.challenges = 0

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username, lang, submethods):
        self._nonce = os.urandom(32)
        self.challenges += 1
        return "", "", "", [(self._prompt or make_prompt(self._nonce, "xos-test"), True)]

    def validate_kbdint_response(self, username, responses):
        try:
            answer = verify_challenge_answer(responses[0], self._nonce, "xos-test", username)
        except Exception:
            return False
        for ca in self._cas:
            try:
                answer.leaf.verify_directly_issued_by(ca)
                return True
            except Exception:
                continue
        return False


class Server:
    def __init__(self, pki, tmp: Path) -> None:
        self.pki, self.tmp = pki, tmp
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.servers: list = []
        self.port = 0

    async def start(self) -> None:
        ca_lines = "\n".join(
            'cert-authority,principals="*" ' + asyncssh.read_certificate(p).export_certificate().decode()
            for p in self.pki["cas"])
        srv = await asyncssh.listen(
            HOST, 0, server_host_keys=[self.host_key], process_factory=_handle, encoding=None,
            x509_trusted_certs=[str(p) for p in self.pki["cas"]], x509_purposes="any",
            authorized_client_keys=asyncssh.import_authorized_keys(ca_lines),
            # no x509v3-ssh-rsa (SHA-1): an RSA login must use x509v3-rsa2048-sha256
            signature_algs=["x509v3-ecdsa-sha2-nistp256", "x509v3-rsa2048-sha256", "ssh-ed25519"])
        self.servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        (self.tmp / "known_hosts").write_text(_known_hosts_line(self))

    async def start_kbdint(self, prompt: str | None = None, cas: list[Path] | None = None) -> int:
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in cas or self.pki["cas"]]
        self.kbdint_servers: list[_KbdintServer] = []

        def factory() -> _KbdintServer:
            self.kbdint_servers.append(_KbdintServer(certs, prompt))
            return self.kbdint_servers[-1]

        srv = await asyncssh.listen(
            HOST, 0, server_host_keys=[self.host_key], process_factory=_handle, encoding=None,
            server_factory=factory)
        self.servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    def args(self, ident: str = "ec", *extra: str, port: int | None = None) -> list[str]:
        return ["-i", str(self.pki[ident]), "-p", str(port or self.port),
                "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}", *extra]

    def env(self) -> dict:
        return {**os.environ, "HOME": str(self.tmp), "LANG": "C.UTF-8"}

    async def ssh(self, args: list[str], stdin: bytes | None = None, timeout: float = 120):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xos_sshd.client", *args,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env())
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        assert b"Traceback" not in err, err.decode()
        return proc.returncode, out, err


@pytest.fixture
async def server(pki, tmp_path):
    s = Server(pki, tmp_path)
    await s.start()
    yield s
    for srv in s.servers:
        srv.close()
        await srv.wait_closed()


# ----------------------------------------------------------------------------- identity


def test_identity_offers_x509_algorithms(pki):
    assert load_identity(str(pki["ec"])).keypair.get_algorithm() == "x509v3-ecdsa-sha2-nistp256"
    kp = load_identity(str(pki["rsa"])).keypair
    assert kp.get_algorithm() == "x509v3-rsa2048-sha256"
    assert kp.sig_algorithms == (b"x509v3-rsa2048-sha256",)


def test_identity_includes_chain_file(pki, tmp_path):
    prefix = tmp_path / "chained"
    for ext in (".pem", ".key"):
        prefix.with_name("chained" + ext).write_bytes(Path(str(pki["rsa"]) + ext).read_bytes())
    (tmp_path / "chained-chain.pem").write_bytes(pki["cas"][0].read_bytes())
    ident = load_identity(str(prefix))
    assert ident.chain_pem.count(b"BEGIN CERTIFICATE") == 2


def test_default_login_is_global_user_id(tmp_path):
    ca = _make_ca()
    for name, der, expected in [("a", None, "carol"), ("b", b"\x03\x06\x00carol", "carol")]:
        _issue(ca, tmp_path / name, user="carol", cn="Carol Example", guid_der=der)
        assert cert_login_name(load_identity(str(tmp_path / name)).leaf) == expected


def test_xos_ca_credentials_were_used(pki):
    if not Path(sys.executable).with_name("xos-ca").exists():
        pytest.skip("xos-ca not installed")
    assert pki["xos_ca"], "xos-ca is installed but its credentials did not load"


# ----------------------------------------------------------------------------- exec


async def test_exec_exit_status(server):
    rc, out, err = await server.ssh(server.args() + [HOST, "echo out; echo err >&2; exit 3"])
    assert (rc, out, err) == (3, b"out\n", b"err\n")


async def test_default_login_and_user_at_host(server):
    rc, out, _ = await server.ssh(server.args() + [HOST, "echo $SSH_USER"])
    assert (rc, out) == (0, b"alice\n")
    rc, out, _ = await server.ssh(server.args() + [f"bob@{HOST}", "echo $SSH_USER"])
    assert (rc, out) == (0, b"bob\n")
    rc, out, _ = await server.ssh(server.args("ec", "-l", "carol") + [f"bob@{HOST}", "echo $SSH_USER"])
    assert (rc, out) == (0, b"carol\n")


async def test_rsa_identity_logs_in_with_sha256(server):
    rc, out, err = await server.ssh(server.args("rsa") + [HOST, "echo rsa-ok"])
    assert (rc, out) == (0, b"rsa-ok\n"), err


async def test_shell_without_terminal_reads_stdin(server):
    rc, out, err = await server.ssh(server.args() + [HOST], stdin=b"echo from-script\nexit 4\n")
    assert (rc, out, err) == (4, b"from-script\n", b"")


async def test_broken_local_stdout_stops_the_remote(server):
    ssh = " ".join([sys.executable, "-m", "xos_sshd.client", *server.args(), HOST, "'seq 1 100000000'"])
    proc = await asyncio.create_subprocess_shell(
        f"{ssh} | head -n 2; echo status ${{PIPESTATUS[0]}}", executable="/bin/bash",
        stdout=asyncio.subprocess.PIPE, env=server.env())
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out == f"1\n2\nstatus {128 + signal.SIGPIPE}\n".encode()


async def test_closed_stdio_descriptors_are_sanitised(server):
    ssh = " ".join([sys.executable, "-m", "xos_sshd.client", *server.args(), HOST,
                    "'echo err >&2; echo out; exit 2'"])
    proc = await asyncio.create_subprocess_shell(
        f"{ssh} 2>&- <&-; echo status $?", stdout=asyncio.subprocess.PIPE, env=server.env())
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out == b"out\nstatus 2\n"


async def test_sigterm_restores_and_exits_255(server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xos_sshd.client", *server.args(), HOST, "sleep 60",
        stderr=asyncio.subprocess.PIPE, env=server.env())
    await asyncio.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 255 and err == b"ssh-xos: killed by signal 15\n"


async def test_connection_dropped_mid_session(server):
    rc, out, err = await server.ssh(server.args() + [HOST, "__drop__"])
    assert rc == 255 and err.startswith(b"ssh-xos: connection to 127.0.0.1 closed")


async def test_stdin_is_piped(server):
    rc, out, _ = await server.ssh(server.args() + [HOST, "cat"], stdin=b"hi\n")
    assert (rc, out) == (0, b"hi\n")


async def test_large_binary_in_and_out(server):
    data = os.urandom(10 * 1024 * 1024)
    rc, out, _ = await server.ssh(server.args() + [HOST, "cat"], stdin=data)
    assert rc == 0 and len(out) == len(data) and out == data


async def test_large_output_intact(server):
    rc, out, _ = await server.ssh(server.args() + [HOST, "seq 1 1500000"])
    expected = "".join(f"{i}\n" for i in range(1, 1500001)).encode()
    assert rc == 0 and len(expected) > 10_000_000
    assert out == expected


async def test_remote_signal_gives_128_plus_signo(server):
    rc, _, _ = await server.ssh(server.args() + [HOST, "kill -TERM $$"])
    assert rc == 128 + signal.SIGTERM
    rc, _, _ = await server.ssh(server.args() + [HOST, "kill -KILL $$"])
    assert rc == 128 + signal.SIGKILL


async def test_subsystem(server):
    rc, out, _ = await server.ssh(server.args("ec", "-s") + [HOST, "echo-sub"], stdin=b"sub data")
    assert (rc, out) == (0, b"sub data")
    # as with ssh, options may follow HOST
    rc, out, _ = await server.ssh(server.args() + [HOST, "-s", "echo-sub"], stdin=b"after host")
    assert (rc, out) == (0, b"after host")


async def test_command_words_are_not_options(server):
    rc, out, _ = await server.ssh(server.args() + [HOST, "echo", "-n", "a", "-t"])
    assert (rc, out) == (0, b"a -t")
    rc, out, _ = await server.ssh(server.args() + [HOST, "--", "echo", "-s"])
    assert (rc, out) == (0, b"-s\n")


async def test_no_pty_for_exec_and_pty_with_t(server):
    rc, out, _ = await server.ssh(server.args() + [HOST, "test -t 0 && echo tty || echo notty"])
    assert out == b"notty\n"
    rc, out, err = await server.ssh(server.args("ec", "-tt") + [HOST, "test -t 0 && echo tty || echo notty"])
    assert rc == 0 and out == b"tty\r\n", err


# ----------------------------------------------------------------------------- interactive PTY


class _Pty:
    """Runs ssh-xos on a local pty as its controlling terminal, like a user's terminal."""

    def __init__(self, args: list[str], env: dict, rows: int = 40, cols: int = 120) -> None:
        self.master, self.slave = pty.openpty()
        _set_winsize(self.master, rows, cols)
        self.saved = termios.tcgetattr(self.slave)
        self.buf = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xos_sshd.client", *args], stdin=self.slave, stdout=self.slave,
            stderr=self.slave, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.buf += data

    async def expect(self, needle: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            assert time.monotonic() < deadline, f"{needle!r} not in {bytes(self.buf)!r}"
            await asyncio.sleep(0.05)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    async def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, bytes(self.buf)
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.slave)
        os.close(self.master)


async def test_interactive_shell_with_pty(server):
    term = _Pty(server.args() + [HOST], server.env())
    try:
        await term.expect(b"$ ")
        term.type(b"echo hel''lo-$((6*7))\r")
        await term.expect(b"hello-42")  # typed text echoed by the remote pty, then the output
        assert b"echo hel''lo-$((6*7))" in term.buf
        term.type(b"stty size\r")
        await term.expect(b"40 120")
        _set_winsize(term.master, 33, 101)  # SIGWINCH to ssh-xos -> window-change request
        await asyncio.sleep(0.5)
        term.type(b"stty size\r")
        await term.expect(b"33 101")
        term.type(b"exit 7\r")
        assert await term.wait() == 7
        # the local terminal was put back the way it was
        assert termios.tcgetattr(term.slave) == term.saved
    finally:
        term.close()


# ----------------------------------------------------------------------------- host keys


def _known_hosts_line(server, key=None) -> str:
    key = key or server.host_key
    return f"[{HOST}]:{server.port} " + key.export_public_key().decode().split()[0] + " " + \
        key.export_public_key().decode().split()[1] + "\n"


async def test_accept_new_writes_default_known_hosts(server):
    args = ["-i", str(server.pki["ec"]), "-p", str(server.port), HOST, "true"]
    rc, _, err = await server.ssh(args)
    assert rc == 0, err
    assert b"permanently added" in err
    kh = server.tmp / ".ssh" / "known_hosts"
    assert kh.read_text() == _known_hosts_line(server)
    rc, _, err = await server.ssh(args)
    assert (rc, err) == (0, b"")
    assert kh.read_text() == _known_hosts_line(server)


async def test_loglevel_error_hides_the_notice(server):
    (server.tmp / "known_hosts").unlink()
    rc, _, err = await server.ssh(server.args("ec", "-o", "LogLevel=ERROR") + [HOST, "true"])
    assert (rc, err) == (0, b"")
    assert (server.tmp / "known_hosts").read_text() == _known_hosts_line(server)


async def test_changed_host_key_is_refused(server):
    other = asyncssh.generate_private_key("ssh-ed25519")
    (server.tmp / "known_hosts").write_text(_known_hosts_line(server, other))
    marker = server.tmp / "ran"
    rc, out, err = await server.ssh(server.args() + [HOST, f"touch {marker}"])
    assert rc == 255 and out == b""
    assert err.startswith(b"ssh-xos: host key for [127.0.0.1]:") and b"has changed" in err
    assert err.count(b"\n") == 1
    assert not marker.exists()
    rc, _, _ = await server.ssh(server.args("ec", "-o", "StrictHostKeyChecking=no") + [HOST, "true"])
    assert rc == 0


async def test_port_22_entry_does_not_apply_to_other_ports(server):
    other = asyncssh.generate_private_key("ssh-ed25519")
    (server.tmp / "known_hosts").write_text(
        f"{HOST} " + " ".join(other.export_public_key().decode().split()[:2]) + "\n")
    rc, _, err = await server.ssh(server.args() + [HOST, "true"])
    assert rc == 0, err
    assert _known_hosts_line(server) in (server.tmp / "known_hosts").read_text()


async def test_strict_yes_refuses_unknown_host(server):
    (server.tmp / "known_hosts").unlink()
    rc, _, err = await server.ssh(server.args("ec", "-o", "StrictHostKeyChecking=yes") + [HOST, "true"])
    assert rc == 255 and b"no host key is known for [127.0.0.1]" in err
    assert not (server.tmp / "known_hosts").exists()


# ----------------------------------------------------------------------------- failures


async def test_bad_certificate_path(server, tmp_path):
    rc, out, err = await server.ssh(["-i", str(tmp_path / "nope"), "-p", str(server.port), HOST, "true"])
    assert rc == 255 and out == b""
    assert err == f"ssh-xos: cannot read certificate {tmp_path / 'nope.pem'}: No such file or directory\n".encode()


async def test_service_certificate_needs_login(server):
    rc, _, err = await server.ssh(server.args("service") + [HOST, "true"])
    assert rc == 255 and b"has no GlobalUserID" in err


async def test_key_not_matching_certificate(server):
    rc, _, err = await server.ssh(server.args("mismatch") + [HOST, "true"])
    assert rc == 255 and b"does not match key" in err


async def test_connection_refused(server):
    import socket
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    rc, out, err = await server.ssh(server.args(port=port) + [HOST, "true"])
    assert rc == 255 and out == b""
    assert err == f"ssh-xos: cannot connect to {HOST}:{port}: Connection refused\n".encode()


async def test_untrusted_certificate_is_permission_denied(server):
    rc, _, err = await server.ssh(server.args("rogue", "-o", "StrictHostKeyChecking=no") + [HOST, "true"])
    assert rc == 255
    assert err.startswith(b"ssh-xos: permission denied for alice@127.0.0.1: ") and err.count(b"\n") == 1


async def test_usage_errors_exit_255(server):
    rc, _, err = await server.ssh(server.args("ec", "-o", "Bogus=1") + [HOST])
    assert rc == 255 and b"unsupported option" in err
    rc, out, _ = await server.ssh(["--help"])
    assert rc == 0 and b"-i PREFIX" in out and b"--kbdint" in out


# ----------------------------------------------------------------------------- kbdint


async def test_kbdint_challenge_login(server):
    port = await server.start_kbdint()
    rc, _, err = await server.ssh(server.args(port=port) + [HOST, "true"])
    assert rc == 255 and b"permission denied" in err  # publickey only without --kbdint
    rc, out, err = await server.ssh(server.args("ec", "--kbdint", port=port) + [HOST, "echo $SSH_USER"])
    assert (rc, out) == (0, b"alice\n"), err


async def test_kbdint_refused_answer_is_not_retried_for_ever(server, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(_make_ca()[1].public_bytes(serialization.Encoding.PEM))
    port = await server.start_kbdint(cas=[other_ca])
    rc, _, err = await server.ssh(server.args("ec", "--kbdint", port=port) + [HOST, "true"], timeout=30)
    assert rc == 255 and b"refused the answer to its XOS challenge" in err
    assert server.kbdint_servers[-1].challenges == 2


async def test_kbdint_never_answers_a_password_prompt(server):
    port = await server.start_kbdint("Password: ")
    rc, _, err = await server.ssh(server.args("ec", "--kbdint", port=port) + [HOST, "true"])
    assert rc == 255 and b"'Password:', not an XOS challenge" in err
