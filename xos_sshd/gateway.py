"""The gateway: an asyncssh server whose only door is an XOS-cert, whose sessions run as the
mapped local account.

One :class:`Gateway` per process owns the verifier, the AMS, the audit log and the control
socket (:mod:`xos_sshd.control`: pam_xos and ``xos-ams`` go through the same verifier and
AMS calls); asyncssh creates one :class:`ConnectionHandler` per TCP connection.  A login
succeeds only when the certificate verifies, the key proves possession, the login name is
the VO user name or the account it maps to, and the AMS maps it; every attempt leaves one
audit line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import asyncssh

from .ams import AMS, LocalAccount, MappingRefused
from .audit import AuditLog
from .auth import sshhook
from .auth.errors import AuthRefused
from .auth.verifier import Verifier
from .config import Config
from .control import ControlServer, control_ops, cr_ops
from .session.channel import SessionContext, UserSession
from .session.home import HomeError, archive_home, ensure_home

log = logging.getLogger(__name__)

# Algorithms as OpenSSH 9 offers them; asyncssh's defaults already exclude the weak ones.
SERVER_OPTIONS: dict[str, Any] = dict(
    password_auth=False, kbdint_auth=False, host_based_auth=False, gss_host=None,
    x11_forwarding=False, line_editor=False, encoding=None, allow_scp=False,
    keepalive_interval=60, keepalive_count_max=3,
)


class Gateway:
    """Everything one running gateway shares between its connections."""

    def __init__(self, config: Config, verifier: Verifier, host_keys: list[asyncssh.SSHKey],
                 ams: AMS, audit: AuditLog):
        self.config = config
        self.verifier = verifier
        self.host_keys = host_keys
        self.ams = ams
        self.audit = audit
        self._servers: list[asyncssh.SSHAcceptor] = []
        self._reclaimer: asyncio.Task[None] | None = None
        self.control = ControlServer(config.control_socket, control_ops(), self)
        #: Checkpoint/restart (:mod:`xos_sshd.cr.runtime`): set by :meth:`open`.
        self.cr: Any = None
        self.cr_runtime: Any = None
        #: The users' socket: same server code, only ``cr.*`` ops (docs/internals.md).
        self.cr_server = ControlServer(config.cr_socket, cr_ops(), self, mode=0o666,
                                       max_fds=1, name='cr')

    @classmethod
    async def open(cls, config: Config, verifier: Verifier,
                   host_keys: list[asyncssh.SSHKey]) -> 'Gateway':
        """Open the AMS store, the audit log and the control socket around checked trust
        (no SSH port listens yet)."""
        from .cr.runtime import CRRuntime
        config.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        ams = await AMS.open(config.ams_db, config.policies, config.nss_dir)
        gateway = cls(config, verifier, host_keys, ams, AuditLog(config.audit_log))
        try:
            await gateway.control.start()
            gateway.cr_runtime = await CRRuntime.open(config, ams, gateway.audit,
                                                      cr_socket=str(gateway.cr_server.path))
            gateway.cr = gateway.cr_runtime.service
            await gateway.cr_server.start()
            gateway.cr_runtime.start()
        except BaseException:
            await gateway.cr_server.close()
            await gateway.control.close()
            if gateway.cr_runtime is not None:
                await gateway.cr_runtime.close()
            await ams.close()
            gateway.audit.close()
            raise
        return gateway

    async def listen(self) -> list[tuple[str, int]]:
        """Start listening on every configured address; return the bound (host, port)s."""
        bound = []
        for address in self.config.listen:
            server = await asyncssh.create_server(
                lambda: ConnectionHandler(self), address.host, address.port,
                server_host_keys=self.host_keys, reuse_address=True,
                login_timeout=self.config.login_grace_seconds,
                agent_forwarding=self.config.allow_agent_forwarding,
                **SERVER_OPTIONS)
            self._servers.append(server)
            for sock in server.sockets:
                bound.append(sock.getsockname()[:2])
        self._reclaimer = asyncio.create_task(self._reclaim_loop())
        return bound

    async def _reclaim_loop(self) -> None:
        """Free expired leases of idle accounts, now and then (design.md: leases)."""
        while True:
            await asyncio.sleep(self.config.reclaim_interval_seconds)
            try:
                await self.reclaim_once()
            except Exception:
                log.exception('lease reclaim failed; will retry')

    async def reclaim_once(self) -> list[str]:
        """One reclaim pass: an account is idle when no process runs under its uid."""
        homes = {r.account.name: r.account.home for r in await self.ams.list_mappings()
                 if r.kind != 'static'}
        busy = await asyncio.to_thread(running_uids)
        freed = await self.ams.reclaim_expired(lambda uid: uid not in busy)
        for name in freed:
            self.audit.write('mapping', action='reclaimed', account=name)
            if name in homes:
                try:
                    await asyncio.to_thread(archive_home, homes[name])
                except (HomeError, OSError) as exc:
                    log.error('could not archive the home of reclaimed %s: %s', name, exc)
        return freed

    async def authorize(self, username: str, identity: Any, *,
                        existing_only: bool = False) -> LocalAccount:
        """The login-name rule (design.md): the VO user name, or the account it maps to.

        Renews (or, for an SSH login, creates) the mapping.  ``existing_only`` (PAM): the
        identity must already hold a mapping and *username* must be that account.
        """
        if existing_only or username != identity.user:
            existing = await self.ams.find_mapping(identity)
            if existing is None and existing_only:
                raise LoginRefused('not-mapped',
                                   f'{identity.user}@{identity.vo} has no account on this node '
                                   f'yet (the first login must go through xos-sshd)')
            if existing is None or existing.name != username:
                raise LoginRefused('login-name-mismatch',
                                   f'certificate of {identity.user}@{identity.vo} may log in '
                                   f'only as {identity.user!r} or its mapped account, '
                                   f'not {username!r}')
        account = await self.ams.map_identity(identity)
        if existing_only and account.name != username:  # released and re-mapped meanwhile
            raise LoginRefused('login-name-mismatch',
                               f'{identity.user}@{identity.vo} now maps to {account.name!r}, '
                               f'not {username!r}')
        return account

    async def prepare_home(self, account: LocalAccount) -> bool:
        """Create the account's home on first login; True when it was created."""
        try:
            return await asyncio.to_thread(ensure_home, account)
        except (HomeError, OSError) as exc:
            raise LoginRefused('home-unavailable', str(exc)) from None

    def audit_login(self, username: str, identity: Any, route: str | None, source: str | None,
                    outcome: str, reason: str, message: str,
                    account: LocalAccount | None = None, **extra: Any) -> None:
        """The one audit line (and log line) of a login attempt, whichever door it came through."""
        self.audit.write(
            'login', outcome=outcome, reason=reason, message=message,
            login=username, source=source, route=route,
            vo=identity.vo if identity else None, user=identity.user if identity else None,
            role=identity.role if identity else None,
            serial=identity.serial if identity else None,
            key=identity.key_fingerprint if identity else None,
            account=account.name if account else None, uid=account.uid if account else None,
            **extra)
        level = logging.INFO if outcome == 'accepted' else logging.WARNING
        log.log(level, 'login %s for %r from %s%s: %s%s', outcome, username, source or 'local',
                f' via {route}' if route == 'pam' else '',
                reason, f' ({message})' if message and outcome != 'accepted' else '')

    def check_certificate(self, key_data: bytes) -> sshhook.CertificateCheck:
        """Verify an offered certificate blob with the one verifier."""
        return sshhook.check_certificate(self.verifier.verify_x509_chain,
                                         self.verifier.verify_openssh_cert, key_data)

    async def close(self) -> None:
        """Stop listening, close live connections, then the store and the log."""
        if self._reclaimer is not None:
            self._reclaimer.cancel()
        await self.cr_server.close()
        await self.control.close()
        if self.cr_runtime is not None:
            await self.cr_runtime.close()
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        await self.ams.close()
        self.audit.close()


class LoginRefused(Exception):
    """A verified certificate may still not log in under this name; ``reason`` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ConnectionHandler(asyncssh.SSHServer):
    """asyncssh's per-connection callbacks: authentication, then sessions."""

    def __init__(self, gateway: Gateway):
        self._gateway = gateway
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = ('', 0)
        self._identity = None
        self._account: LocalAccount | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info('peername') or ('', 0)
        self._peer = (str(peer[0]), int(peer[1]))
        sshhook.install(conn, self, self._gateway.check_certificate)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    # --- sshhook.LoginPolicy ------------------------------------------------------------

    def certificate_refused(self, username: str, exc: AuthRefused) -> None:
        self._audit_login(username, None, 'refused', exc.reason, str(exc))

    async def accept_login(self, username: str, check: sshhook.CertificateCheck) -> bool:
        identity = check.identity
        try:
            account = await self._authorize(username, identity)
        except (LoginRefused, MappingRefused) as exc:
            self._audit_login(username, check, 'refused', exc.reason, str(exc))
            return False
        self._identity, self._account = identity, account
        self._audit_login(username, check, 'accepted', 'ok', '', account)
        return True

    async def _authorize(self, username: str, identity: Any) -> LocalAccount:
        account = await self._gateway.authorize(username, identity)
        await self._gateway.prepare_home(account)
        return account

    def _audit_login(self, username: str, check: sshhook.CertificateCheck | None,
                     outcome: str, reason: str, message: str,
                     account: LocalAccount | None = None) -> None:
        self._gateway.audit_login(username, check.identity if check else None,
                                  check.route if check else None,
                                  f'{self._peer[0]}:{self._peer[1]}',
                                  outcome, reason, message, account)

    # --- after authentication -------------------------------------------------------------

    def session_requested(self) -> UserSession | bool:
        if self._account is None or self._identity is None:
            return False
        runtime = self._gateway.cr_runtime
        return UserSession(SessionContext(
            self._identity, self._account, self._peer[0],
            subsystems=runtime.subsystems(f'{self._peer[0]}:{self._peer[1]}') if runtime else None,
            env_extra={'XOS_CR_SOCKET': str(self._gateway.cr_server.path)}))

    def connection_requested(self, dest_host: str, dest_port: int,
                             orig_host: str, orig_port: int) -> bool:
        return self._gateway.config.allow_port_forwarding

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        # Remote forwarding binds as root: never below 1024, whatever the switch says.
        return self._gateway.config.allow_port_forwarding and listen_port >= 1024


def running_uids() -> set[int]:
    """The uids that own at least one process right now."""
    uids = set()
    for entry in os.scandir('/proc'):
        if entry.name.isdigit():
            try:
                uids.add(entry.stat().st_uid)
            except FileNotFoundError:
                pass
    return uids
