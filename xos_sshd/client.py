"""ssh-xos: an OpenSSH-like client that logs in with an XOS-cert (RFC 6187 X.509 public-key auth).

Usage: ``ssh-xos -i PREFIX [-p PORT] [-l LOGIN] [-s] [-t|-T] [-n] [-o OPTION=VALUE] [--kbdint]
[-v] [LOGIN@]HOST [COMMAND...]``.

Why a separate client: stock ``ssh`` cannot offer an X.509 certificate, and the gateway's
primary login is the XOS-cert (``PREFIX.pem`` + ``PREFIX.key`` from ``xos-ca issue``). The
client offers exactly that certificate (``x509v3-ecdsa-sha2-nistp256`` for EC keys,
``x509v3-rsa2048-sha256`` for RSA keys, plus ``PREFIX-chain.pem`` if present) and nothing
else: no agent, no password, no ``~/.ssh`` keys. With ``--kbdint`` it also answers the
``pam_xos`` keyboard-interactive challenge (``xos_sshd.auth.challenge``) so it can log in
through a stock sshd.

Behaviour follows ssh where it matters to scripts: the exit status is the remote one
(a remote signal gives 128+signo), every local failure is one ``ssh-xos: ...`` line on
stderr with status 255, stdio is streamed as bytes with flow control in both directions,
and host keys are checked against ``~/.ssh/known_hosts`` with accept-new semantics.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import socket
import sys
import termios
import threading
import tty
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Sequence

import asyncssh
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from xos_sshd.auth.challenge import parse_prompt, sign_challenge
from xos_sshd.auth.errors import AuthRefused
from xos_sshd.auth.profile import parse_certificate
from xos_sshd.client_stdio import EXIT_FAILURE, Flow, Session, pump_stdin, term_size

PROG = "ssh-xos"
RSA_X509_ALG = b"x509v3-rsa2048-sha256"
HOST_KEY_MODES = {"yes": "yes", "ask": "yes", "accept-new": "accept-new", "no": "no", "off": "no"}


class ClientError(Exception):
    """A failure reported to the user as one ``ssh-xos: ...`` line and exit status 255."""


# --------------------------------------------------------------------------- identity


@dataclass
class Identity:
    """The XOS-cert credential: what is offered to the server and what signs challenges."""

    cert_path: Path
    leaf: x509.Certificate
    chain_pem: bytes  # leaf PEM followed by any CA certificates from PREFIX-chain.pem
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    keypair: asyncssh.SSHKeyPair  # the X.509 chain keypair, with its signature algorithm fixed

    @property
    def expired(self) -> bool:
        """True when the leaf certificate is past its notAfter (the server will refuse it)."""
        return self.leaf.not_valid_after_utc < datetime.now(timezone.utc)


def _resolve_prefix(prefix: str) -> str:
    """Accept ``-i PREFIX`` and, for convenience, ``-i PREFIX.pem`` / ``-i PREFIX.key``."""
    if not os.path.exists(prefix + ".pem"):
        for suffix in (".pem", ".key", "-cert.pub"):
            if prefix.endswith(suffix) and os.path.exists(prefix[: -len(suffix)] + ".pem"):
                return prefix[: -len(suffix)]
    return prefix


def _read_pem_certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ClientError(f"cannot read {what} {path}: not a PEM X.509 certificate") from None
    return certs


def _read_private_key(path: Path, prompt: bool) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # encrypted: ask like ssh does, but only on a terminal
            if not (prompt and sys.stdin.isatty()):
                raise ClientError(f"cannot read key {path}: it is encrypted and no passphrase "
                                  "can be asked for (stdin is not a terminal, or BatchMode)")
            secret = getpass.getpass(f"Enter passphrase for key '{path}': ")
            key = serialization.load_pem_private_key(data, password=secret.encode())
    except ValueError as exc:
        raise ClientError(f"cannot read key {path}: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ClientError(f"cannot read key {path}: only EC and RSA keys can hold an XOS-cert")
    return key


def load_identity(prefix: str, prompt: bool = True) -> Identity:
    """Load ``PREFIX.pem``, ``PREFIX.key`` and optional ``PREFIX-chain.pem``.

    Only the X.509 keypair is kept (asyncssh would also offer the bare key). For RSA the
    signature algorithm is pinned to ``x509v3-rsa2048-sha256``: asyncssh falls back to the
    SHA-1 ``x509v3-ssh-rsa`` when the server sends no ``server-sig-algs``.
    """
    prefix = _resolve_prefix(prefix)
    cert_path, key_path, chain_path = (Path(prefix + s) for s in (".pem", ".key", "-chain.pem"))
    certs = _read_pem_certs(cert_path, "certificate")
    if chain_path.exists():
        certs += _read_pem_certs(chain_path, "certificate chain")
    key = _read_private_key(key_path, prompt)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if certs[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ClientError(f"certificate {cert_path} does not match key {key_path}")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    try:
        ssh_key = asyncssh.import_private_key(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        ssh_certs = [asyncssh.import_certificate(c.public_bytes(serialization.Encoding.DER))
                     for c in certs]
        keypair = next(kp for kp in asyncssh.load_keypairs([(ssh_key, ssh_certs)])
                       if kp.has_x509_chain)
    except (asyncssh.KeyImportError, ValueError, StopIteration) as exc:
        raise ClientError(f"cannot read certificate {cert_path}: {str(exc) or 'unsupported key'}") from None
    if RSA_X509_ALG in keypair.sig_algorithms:
        keypair.set_sig_algorithm(RSA_X509_ALG)
        keypair.sig_algorithms = (RSA_X509_ALG,)
    return Identity(cert_path, certs[0], chain_pem, key, keypair)


def cert_login_name(cert: x509.Certificate) -> str | None:
    """The default login: the certificate's GlobalUserID, None for a service certificate.

    Read with the strict profile reader, so a malformed attribute is reported here (as
    `AuthRefused`) rather than as a bare "permission denied" from the server.
    """
    return parse_certificate(cert).user_id


# --------------------------------------------------------------------------- host keys


def known_hosts_name(host: str, port: int) -> str:
    """The known_hosts pattern for a host, as OpenSSH writes it (``[host]:port`` off 22)."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


class HostKeyPolicy:
    """OpenSSH-style host key checking: ``yes``, ``accept-new`` (the default) or ``no``.

    asyncssh asks `match` for the keys known for the host, and calls `check_unknown` for
    a key that is not among them. A new key is only written by `commit`, after the key
    exchange has proven the server holds the key.
    """

    def __init__(self, mode: str, files: Sequence[Path]) -> None:
        self.mode = mode
        self.files = list(files)
        self.error: str | None = None
        self._known = False
        self._pending: tuple[str, asyncssh.SSHKey] | None = None

    def _load(self) -> asyncssh.SSHKnownHosts:
        known = asyncssh.SSHKnownHosts()
        for path in self.files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                try:
                    known.load(line)
                except (ValueError, asyncssh.KeyImportError):
                    continue  # like OpenSSH: a bad line is skipped, not fatal
        return known

    def match(self, host: str, addr: str, port: int) -> tuple[Any, ...]:
        """Keys known for exactly this host and port (no fallback to port 22's entries)."""
        # SSHKnownHosts.match() would retry without the port; OpenSSH does not.
        result = self._load()._match(host.lower(), addr, None if port == 22 else port)
        self._known = bool(result[0] or result[1])
        return result[:3]  # trusted keys, CA keys, revoked keys

    def check_unknown(self, host: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Decide about a host key that known_hosts does not list for this host."""
        name = known_hosts_name(host, port)
        desc = f"{key.get_algorithm()} {key.get_fingerprint()}"
        files = ", ".join(str(p) for p in self.files)
        if self._known:
            self.error = (f"host key for {name} has changed (server offers {desc}) and differs from "
                          f"the one in {files}; refusing to connect (if the change is expected, "
                          f"remove the old entry: ssh-keygen -f '{self.files[0]}' -R '{name}')")
            return False
        if self.mode == "yes":
            self.error = (f"no host key is known for {name} ({desc}) and "
                          f"StrictHostKeyChecking=yes")
            return False
        self._pending = (name, key)
        return True

    def commit(self) -> None:
        """Append an accepted new host key to the first known_hosts file."""
        if self._pending is None or not self.files:
            return
        name, key = self._pending
        self._pending = None
        path = self.files[0]
        line = " ".join(key.export_public_key("openssh").decode().split()[:2])
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            with open(path, "a", encoding="ascii") as f:
                f.write(f"{name} {line}\n")
        except OSError as exc:
            _warn(f"cannot add the host key to {path}: {exc.strerror or exc}", notice=True)
            return
        _warn(f"permanently added '{name}' ({key.get_algorithm()}) to the list of known hosts",
              notice=True)


# --------------------------------------------------------------------------- SSH client


class _Client(asyncssh.SSHClient):
    """Connection callbacks: host key decisions, banner, and the XOS kbdint challenge."""

    def __init__(self, policy: HostKeyPolicy, identity: Identity, login: str, kbdint: bool) -> None:
        self._policy, self._identity, self._login, self._kbdint = policy, identity, login, kbdint
        self.kbdint_error: str | None = None
        self._answered = False
        self._rounds = 0
        self._kbdint_attempts = 0

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._policy.check_unknown(host, port, key)

    def auth_banner_received(self, msg: str, lang: str) -> None:
        sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        sys.stderr.flush()

    def kbdint_auth_requested(self) -> str | None:
        """Start keyboard-interactive; not again after an attempt that brought no challenge.

        A stock sshd whose pam_xos cannot reach xos-sshd fails keyboard-interactive without
        ever prompting; asyncssh would otherwise retry until sshd's MaxAuthTries and report
        only "Too many authentication failures".
        """
        if not self._kbdint or (self._kbdint_attempts and not self._answered):
            if self._kbdint and self.kbdint_error is None:
                self.kbdint_error = ("keyboard-interactive authentication failed without an XOS "
                                     "challenge (the server's pam_xos could not reach xos-sshd, "
                                     "or the server does not use pam_xos)")
            return None
        self._kbdint_attempts += 1
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: Sequence[tuple[str, bool]]) -> list[str] | None:
        """Answer only XOS-CHALLENGE prompts; anything else (a password prompt) aborts.

        One challenge is answered per connection: a refused answer would be refused again,
        and asyncssh would otherwise retry keyboard-interactive for ever.
        """
        self._rounds += 1
        if self._rounds > 8:
            self.kbdint_error = "too many keyboard-interactive rounds"
            return None
        if instructions:
            _warn(instructions.strip(), notice=True)
        answers = []
        for text, _echo in prompts:
            parsed = parse_prompt(text)
            if parsed is None:
                self.kbdint_error = f"keyboard-interactive asked {text.strip()!r}, not an XOS challenge"
                return None
            if self._answered:
                self.kbdint_error = "the server refused the answer to its XOS challenge"
                return None
            self._answered = True
            nonce, service = parsed
            answers.append(sign_challenge(self._identity.private_key, self._identity.chain_pem,
                                          nonce, service, self._login))
        return answers


@dataclass
class Options:
    """Parsed command line."""

    identity: str
    host: str
    port: int
    login: str | None
    command: list[str]
    subsystem: bool
    tty: int  # >0: request a PTY (2: even without a local terminal); -1: never; 0: default
    no_stdin: bool
    host_key_mode: str
    known_hosts: list[Path]
    connect_timeout: float | None
    keepalive: tuple[float, int]  # ServerAliveInterval (0: off), ServerAliveCountMax
    batch: bool  # BatchMode=yes: never prompt (for a key passphrase)
    kbdint: bool
    verbose: int


_RAW_MODE = False  # the local terminal is raw: a newline needs an explicit \r
_QUIET = False  # -o LogLevel=QUIET|FATAL|ERROR: no notices, only the final error


def _warn(msg: str, notice: bool = False) -> None:
    """One ``ssh-xos: ...`` line on stderr (a `notice` is dropped when quiet)."""
    if notice and _QUIET:
        return
    sys.stderr.write(f"{PROG}: {msg}\r\n" if _RAW_MODE else f"{PROG}: {msg}\n")
    sys.stderr.flush()


def _want_pty(opts: Options) -> bool:
    if opts.tty < 0 or opts.subsystem:
        return False
    if opts.tty == 0 and opts.command:
        return False
    if opts.tty < 2 and not os.isatty(0):
        if opts.tty == 1:
            _warn("pseudo-terminal will not be allocated because stdin is not a terminal", notice=True)
        return False
    return True


async def _run_session(conn: asyncssh.SSHClientConnection, opts: Options) -> int:
    """Open the shell/exec/subsystem channel, stream stdio, and return the exit code."""
    global _RAW_MODE
    loop = asyncio.get_running_loop()
    pty = _want_pty(opts)
    command: str | None = " ".join(opts.command) if opts.command else None
    flow = Flow()
    term_fd = 0 if os.isatty(0) else 1
    extra: dict[str, Any] = {}
    if pty:
        extra = {"request_pty": "force", "term_type": os.environ.get("TERM") or "dumb",
                 "term_size": term_size(term_fd)}
    env = {k: v for k, v in os.environ.items() if k == "LANG" or k.startswith("LC_")}
    try:
        _chan, session = await conn.create_session(
            lambda: Session(loop, flow), None if opts.subsystem else command,
            subsystem=command if opts.subsystem else None, env=env, encoding=None, **extra)
    except asyncssh.ChannelOpenError as exc:
        what = f"subsystem {command!r}" if opts.subsystem else "the session"
        raise ClientError(f"{opts.host} refused {what}: {exc.reason}") from None
    saved_tty = None
    if pty and os.isatty(0):
        saved_tty = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSADRAIN)
        _RAW_MODE = True
    killed: list[int] = []

    def on_signal(signo: int) -> None:
        killed.append(signo)
        if session.chan:
            session.chan.close()

    try:
        if pty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: session.chan and
                                    session.chan.change_terminal_size(*term_size(term_fd)))
        for signo in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signo, on_signal, signo)
        if opts.no_stdin:
            await session.send_eof()
        else:
            threading.Thread(target=pump_stdin, args=(loop, session),
                             name=f"{PROG}-stdin", daemon=True).start()
        await session.done
        for out in (session.stdout, session.stderr):
            await asyncio.to_thread(out.finish)
    finally:
        for signo in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signo)
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
            _RAW_MODE = False
    if killed:
        raise ClientError(f"killed by signal {killed[0]}")
    if (session.exit_status is None and session.exit_signal is None
            and isinstance(session.error, Exception)):
        raise ClientError(f"connection to {opts.host} closed: {session.error}")
    return session.exit_code()


async def connect(identity: Identity, host: str, port: int, login: str, policy: HostKeyPolicy, *,
                  kbdint: bool = False, connect_timeout: float | None = None,
                  keepalive: tuple[float, int] = (0, 3),
                  **options: Any) -> asyncssh.SSHClientConnection:
    """Connect and authenticate with the XOS-cert only; every failure is a `ClientError`.

    Shared by ``ssh-xos`` and ``xos-cr``'s remote mode; *options* go to asyncssh as they are
    (xos-cr prefers AES-GCM: its migration streams are bulk data).
    """
    client = _Client(policy, identity, login, kbdint)
    methods = ["publickey"] + (["keyboard-interactive"] if kbdint else [])
    where = f"{host}:{port}"
    try:
        conn = await asyncssh.connect(
            host, port, username=login, client_factory=lambda: client,
            client_keys=[identity.keypair], known_hosts=None if policy.mode == "no" else policy.match,
            agent_path=None, agent_forwarding=False, password=None, password_auth=False,
            kbdint_auth=kbdint, gss_auth=False, host_based_auth=False,
            preferred_auth=methods, config=None, x509_trusted_certs=[], x509_trusted_cert_paths=[],
            connect_timeout=connect_timeout, keepalive_interval=keepalive[0],
            keepalive_count_max=keepalive[1], **options)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise ClientError(policy.error or f"host key verification failed for {where}: {exc.reason}") from None
    except asyncssh.PermissionDenied:
        policy.commit()
        why = client.kbdint_error or (
            f"the server did not accept the XOS-cert {identity.cert_path} "
            f"({identity.keypair.get_algorithm()})")
        if identity.expired:
            why += f"; the certificate expired at {identity.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        raise ClientError(f"permission denied for {login}@{host}: {why}") from None
    except asyncssh.DisconnectError as exc:
        raise ClientError(f"connection to {where} failed: {exc.reason}") from None
    except socket.gaierror as exc:
        raise ClientError(f"cannot connect to {where}: {exc.strerror}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        errno = exc.errno if isinstance(exc, OSError) else None
        reason = os.strerror(errno) if errno else str(exc) or "timed out"
        raise ClientError(f"cannot connect to {where}: {reason}") from None
    policy.commit()
    return conn


def default_login(identity: Identity) -> str:
    """The certificate's GlobalUserID (`ClientError` for a service certificate)."""
    try:
        login = cert_login_name(identity.leaf)
    except AuthRefused as exc:
        raise ClientError(f"certificate {identity.cert_path}: {exc}") from None
    if not login:
        raise ClientError(f"no -l LOGIN given and {identity.cert_path} has no GlobalUserID "
                          "(a service certificate cannot log in)")
    return login


async def run(opts: Options) -> int:
    """Connect, authenticate with the XOS-cert, run the session; return the exit status."""
    identity = load_identity(opts.identity, prompt=not opts.batch)
    login = opts.login or default_login(identity)
    policy = HostKeyPolicy(opts.host_key_mode, opts.known_hosts)
    conn = await connect(identity, opts.host, opts.port, login, policy, kbdint=opts.kbdint,
                         connect_timeout=opts.connect_timeout, keepalive=opts.keepalive)
    async with conn:
        return await _run_session(conn, opts)


# --------------------------------------------------------------------------- command line


def _parser(after_host: bool = False) -> argparse.ArgumentParser:
    """The option parser; ``after_host`` builds the one for options between HOST and COMMAND."""
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, usage=None if not after_host else argparse.SUPPRESS,
        description="Log in to an xos-sshd gateway (or any SSH server that accepts RFC 6187 "
                    "X.509 keys) with an XOS-cert, like ssh. Exits with the remote status; "
                    "255 on connection or authentication failure.")
    p.exit = lambda status=0, message=None: (  # type: ignore[method-assign]
        sys.stderr.write(message or ""), sys.exit(EXIT_FAILURE if status else 0))
    p.add_argument("-i", dest="identity", metavar="PREFIX",
                   help="XOS-cert prefix: PREFIX.pem (certificate), PREFIX.key (key), "
                        "optional PREFIX-chain.pem (CA chain)")
    p.add_argument("-p", dest="port", type=int, metavar="PORT", help="port (default 22)")
    p.add_argument("-l", dest="login", metavar="LOGIN",
                   help="login name (default: the certificate's GlobalUserID)")
    p.add_argument("-s", dest="subsystem", action="store_true",
                   help="COMMAND is the name of a subsystem (e.g. sftp, xos-cr)")
    p.add_argument("-t", dest="tty", action="count", default=0,
                   help="request a PTY even for a COMMAND (-tt: even if stdin is not a terminal)")
    p.add_argument("-T", dest="no_tty", action="store_true", help="never request a PTY")
    p.add_argument("-n", dest="no_stdin", action="store_true", help="stdin from /dev/null")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION=VALUE",
                   help="StrictHostKeyChecking=yes|accept-new|no (default accept-new), "
                        "UserKnownHostsFile=FILE, Port=N, User=NAME, ConnectTimeout=SECONDS, "
                        "ServerAliveInterval=SECONDS, ServerAliveCountMax=N, "
                        "LogLevel=QUIET|ERROR|INFO, BatchMode=yes|no, IdentitiesOnly (ignored)")
    p.add_argument("--kbdint", action="store_true",
                   help="also answer the pam_xos keyboard-interactive XOS-CHALLENGE "
                        "(login through a stock sshd using pam_xos)")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="debug output (repeatable)")
    if not after_host:
        p.add_argument("destination", metavar="[LOGIN@]HOST")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="remote command (default: interactive shell)")
    return p


def _fail(msg: str) -> NoReturn:
    _warn(msg)
    sys.exit(EXIT_FAILURE)


def parse_args(argv: Sequence[str]) -> Options:
    """Turn argv into Options, the way ssh reads its command line.

    As in ssh, options may also follow HOST (up to the first word that is not an option),
    ``-o`` keywords are case-insensitive and the first value given for one wins.
    """
    a = _parser().parse_args(argv)
    if a.command and a.command[0].startswith("-") and a.command[0] != "--":
        a = _parser(after_host=True).parse_args(a.command, namespace=a)
    if a.command and a.command[0] == "--":
        a.command = a.command[1:]
    if not a.identity:
        _fail("-i PREFIX is required (the XOS-cert: PREFIX.pem and PREFIX.key)")
    settings: dict[str, str] = {}
    for item in a.options:
        key, sep, value = item.partition("=")
        if not sep:
            key, _, value = item.strip().partition(" ")
        settings.setdefault(key.strip().lower(), value.strip())
    global _QUIET
    known = {"stricthostkeychecking", "userknownhostsfile", "port", "user", "connecttimeout",
             "loglevel", "batchmode", "identitiesonly", "serveraliveinterval", "serveralivecountmax"}
    for key in settings.keys() - known:
        _fail(f"unsupported option -o {key}")
    _QUIET = settings.get("loglevel", "").lower() in ("quiet", "fatal", "error")
    mode = HOST_KEY_MODES.get(settings.get("stricthostkeychecking", "accept-new").lower())
    if mode is None:
        _fail(f"bad StrictHostKeyChecking value {settings['stricthostkeychecking']!r}")
    files = settings.get("userknownhostsfile", "~/.ssh/known_hosts").split()
    login, _, host = a.destination.rpartition("@")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = a.port or int(settings.get("port", 22))
        timeout = float(settings["connecttimeout"]) if "connecttimeout" in settings else None
        alive = (float(settings.get("serveraliveinterval", 0)),
                 int(settings.get("serveralivecountmax", 3)))
    except ValueError:
        _fail("bad Port, ConnectTimeout or ServerAlive* value")
    if not host or not 0 < port < 65536:
        _fail(f"bad destination {a.destination!r} or port {port}")
    if a.subsystem and not a.command:
        _fail("-s needs a subsystem name as COMMAND")
    return Options(identity=a.identity, host=host, port=port,
                   login=a.login or login or settings.get("user"), command=list(a.command),
                   subsystem=a.subsystem, tty=-1 if a.no_tty else a.tty, no_stdin=a.no_stdin,
                   host_key_mode=mode, known_hosts=[Path(f).expanduser() for f in files],
                   connect_timeout=timeout, keepalive=alive,
                   batch=settings.get("batchmode", "no").lower() == "yes",
                   kbdint=a.kbdint, verbose=a.verbose)


def _sanitise_stdfds() -> None:
    """Open /dev/null on any closed fd 0-2, as ssh does.

    Otherwise the SSH socket could become fd 1 or 2 and remote output would be written
    into the connection itself.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: never returns, never prints a traceback (unless -vvv)."""
    _sanitise_stdfds()
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.verbose:
        logging.basicConfig(stream=sys.stderr, format=f"{PROG}: %(name)s: %(message)s",
                            level=logging.DEBUG if opts.verbose > 1 else logging.INFO)
        asyncssh.set_debug_level(min(opts.verbose, 3))
    else:
        logging.getLogger("asyncssh").setLevel(logging.CRITICAL)
    try:
        status = asyncio.run(run(opts))
    except ClientError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    except Exception as exc:  # never a traceback for the user
        if opts.verbose > 2:
            raise
        _fail(f"unexpected error: {type(exc).__name__}: {exc}")
    sys.exit(status)


if __name__ == "__main__":
    main()
