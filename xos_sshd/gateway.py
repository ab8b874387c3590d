"""The gateway: an asyncssh server whose only door is an XOS-cert, whose sessions run as the
mapped local account.

One :class:`Gateway` per process owns the verifier, the AMS, the audit log and the control
socket (:mod:`xos_sshd.control`: pam_xos and ``xos-ams`` go through the same verifier and
AMS calls); asyncssh creates one :class:`ConnectionHandler` per TCP connection.  A login
succeeds only when the certificate verifies, the key proves possession, the login name is
the VO user name or the account it maps to, and the AMS maps it; every attempt leaves one
audit line.

Before authentication a connection must pass :class:`~xos_sshd.admission.Admission`
(``MaxStartups``, per-source limits, penalties); once authenticated it is registered in
:class:`~xos_sshd.liveconn.LiveConnections` (sessions per account, revocation and bans end
it) until it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import asyncssh

from .admission import Admission, AdmissionRefused, Ticket
from .ams import AMS, LocalAccount, MappingRefused
from .ams.store import OutageLog, StoreUnavailable
from .audit import AuditLog
from .auth import sshhook
from .auth.errors import AuthRefused
from .auth.verifier import Verifier
from .config import Config
from .control import ControlServer, control_ops, cr_ops
from .liveconn import LiveConnection, LiveConnections, RevocationWatch
from .tasks import BoundedThreads, ThreadsBusy, Unresponsive
from .metrics import MetricsEndpoint
from .session.channel import SessionContext, UserSession
from .session.home import HomeError, archive_home, ensure_home

log = logging.getLogger(__name__)

# Algorithms as OpenSSH 9 offers them; asyncssh's defaults already exclude the weak ones.
# The keepalives are overridden by ``[limits] keepalive_seconds``/``keepalive_count_max``.
SERVER_OPTIONS: dict[str, Any] = dict(
    password_auth=False, kbdint_auth=False, host_based_auth=False, gss_host=None,
    x11_forwarding=False, line_editor=False, encoding=None, allow_scp=False,
    keepalive_interval=60, keepalive_count_max=3,
)

#: A home that has not answered within this many seconds refuses the login (a hung NFS
#: server, a FUSE mount over the home): ``home directory H does not respond``.
HOME_TIMEOUT_SECONDS = 10.0
#: Home preparation runs on threads of its own, at most this many at once (one per
#: account): hung homes never take the default executor's threads (NSS tables, images).
HOME_THREADS = 8
#: Home calls past their timeout that stop counting against HOME_THREADS (one per account at
#: most): a few users' hung homes must not refuse everyone else's logins.
HOME_STUCK_MAX = 64


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
        #: The Prometheus endpoint (:mod:`xos_sshd.metrics`) when ``[metrics] listen`` is set.
        self.metrics: MetricsEndpoint | None = None
        #: The users' socket: same server code, only ``cr.*`` ops (docs/internals.md).
        self.cr_server = ControlServer(config.cr_socket, cr_ops(), self, mode=0o666,
                                       max_fds=1, name='cr')
        #: Admission before authentication (``[limits]``: max_startups, penalties).
        self.admission = Admission(config.limits, audit)
        #: The live authenticated connections, and the sweep that ends revoked ones.
        self.live = LiveConnections(audit, revocation_status=verifier.revocation_status)
        self.revocation = RevocationWatch(self.live, verifier.revocation_status,
                                          config.limits.revocation_check_seconds,
                                          on_sweep=self.admission.prune)
        #: Where homes are prepared (:meth:`prepare_home`): bounded, one call per account.
        self.homes = BoundedThreads(HOME_THREADS, 'home', max_stuck=HOME_STUCK_MAX)

    @classmethod
    async def open(cls, config: Config, verifier: Verifier,
                   host_keys: list[asyncssh.SSHKey]) -> 'Gateway':
        """Open the AMS store, the audit log and the control socket around checked trust
        (no SSH port listens yet)."""
        from .cr.runtime import CRRuntime
        config.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        audit = AuditLog(config.audit_log)
        try:  # every committed mapping change becomes one audit event (and metric)
            # The store: STATE/ams.sqlite, or a cluster's PostgreSQL ([ams] store); node as
            # CRRuntime names it (the node_uids this gateway publishes for the reclaimers).
            ams = await AMS.open(config.ams_store, config.policies, config.nss_dir,
                                 on_event=audit.write,
                                 node=config.images.node_name or socket.gethostname())
        except BaseException:
            audit.close()
            raise
        log.info('AMS store: %s', config.describe_store())
        gateway = cls(config, verifier, host_keys, ams, audit)
        # A ban made on any gateway of a shared store closes the account's connections here
        # too, at the next live-connection sweep (the AMS keeps the banned names current).
        gateway.live.store_bans = lambda: ams.banned_names
        try:
            await gateway.control.start()
            gateway.cr_runtime = await CRRuntime.open(config, ams, gateway.audit,
                                                      cr_socket=str(gateway.cr_server.path))
            gateway.cr = gateway.cr_runtime.service
            gateway.cr.max_jobs = config.limits.max_jobs_per_account
            await gateway.cr_server.start()
            gateway.cr_runtime.start()
            gateway.metrics = await MetricsEndpoint.start(config, gateway.audit, ams,
                                                          gateway.cr.jobs, gateway.admission)
        except BaseException:
            if gateway.metrics is not None:
                await gateway.metrics.close()
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
        limits = self.config.limits
        options = {**SERVER_OPTIONS, 'keepalive_interval': limits.keepalive_seconds,
                   'keepalive_count_max': limits.keepalive_count_max}
        for address in self.config.listen:
            server = await asyncssh.create_server(
                lambda: ConnectionHandler(self), address.host, address.port,
                server_host_keys=self.host_keys, reuse_address=True,
                login_timeout=self.config.login_grace_seconds,
                agent_forwarding=self.config.allow_agent_forwarding,
                **options)
            self._servers.append(server)
            for sock in server.sockets:
                bound.append(sock.getsockname()[:2])
        self._reclaimer = asyncio.create_task(self._reclaim_loop())
        self.revocation.start()
        return bound

    def check_revocations(self) -> None:
        """Check the live connections against the CRLs now (after SIGHUP re-read them)."""
        self.revocation.trigger()

    def account_banned(self, name: str) -> int:
        """``admin.ban`` banned *name*: close its live connections now; return how many."""
        return self.live.banned(name)

    def account_unbanned(self, name: str) -> None:
        """``admin.unban``: logins of *name* may stay connected again."""
        self.live.unbanned(name)

    async def _reclaim_loop(self) -> None:
        """Free expired leases of idle accounts, now and then (design.md: leases)."""
        outage = OutageLog(log, 'lease reclaim')  # a store outage: said once, not per pass
        while True:
            await asyncio.sleep(self.config.reclaim_interval_seconds)
            try:
                await self.reclaim_once()
            except StoreUnavailable as exc:
                outage.failed(exc)
            except Exception:
                log.exception('lease reclaim failed; will retry')
            else:
                outage.ok()

    async def reclaim_once(self) -> list[str]:
        """One reclaim pass: an account is idle when no process runs under its uid."""
        homes = {r.account.name: r.account for r in await self.ams.list_mappings()
                 if r.kind != 'static'}
        busy = await asyncio.to_thread(running_uids)
        freed = await self.ams.reclaim_expired(lambda uid: uid not in busy)  # audited by the AMS
        for name in freed:
            if name in homes:
                try:
                    await self.archive_home(homes[name])
                except (HomeError, OSError, Unresponsive, ThreadsBusy) as exc:
                    log.error('could not archive the home of reclaimed %s: %s', name, exc)
        return freed

    async def archive_home(self, account: LocalAccount) -> str | None:
        """Archive a released account's home (:func:`archive_home`) on :attr:`homes`, like
        :meth:`prepare_home`: a home that hangs costs one thread and a
        :class:`~xos_sshd.tasks.Unresponsive` after :data:`HOME_TIMEOUT_SECONDS`, never the
        reclaim loop or an admin's release."""
        return await self.homes.run(account.name, ('archive', account.uid),
                                    HOME_TIMEOUT_SECONDS, archive_home, account.home, account)

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
        """Create the account's home on first login; True when it was created.

        A home may hang (a dead NFS server, a FUSE mount with ``allow_other`` over it): the
        check runs on :attr:`homes` (its own threads, one outstanding call per account,
        :data:`HOME_THREADS` at most) and a home that does not answer within
        :data:`HOME_TIMEOUT_SECONDS` refuses the login; later logins of that account are
        refused at once while the call is still stuck (no second thread behind it)."""
        try:
            return await self.homes.run(account.name, account, HOME_TIMEOUT_SECONDS,
                                        ensure_home, account)
        except (HomeError, OSError) as exc:
            raise LoginRefused('home-unavailable', str(exc)) from None
        except Unresponsive as exc:
            log.warning('home %s of %s has not answered for %.0f s', account.home,
                        account.name, exc.seconds)
            raise LoginRefused('home-unavailable',
                               f'home directory {account.home} does not respond') from None
        except ThreadsBusy as exc:
            log.warning('home %s of %s not prepared: %d homes of other accounts do not '
                        'respond', account.home, account.name, exc.running)
            raise LoginRefused('home-unavailable',
                               f'home directory {account.home} cannot be prepared now: '
                               f'{exc.running} other home directories do not respond') from None

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
        await self.revocation.close()
        await self.cr_server.close()
        await self.control.close()
        if self.cr_runtime is not None:
            await self.cr_runtime.close()
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        if self.metrics is not None:
            await self.metrics.close()
        await self.ams.close()
        self.audit.close()


class LoginRefused(Exception):
    """A verified certificate may still not log in under this name; ``reason`` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SessionRefused(asyncssh.ChannelOpenError):
    """A session channel refused by a ``[limits]`` cap; the client sees ``message``
    ("open failed: administratively prohibited: ...")."""

    def __init__(self, reason: str, message: str):
        super().__init__(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, message)
        self.reason_code = reason


class PreauthQuickAck(asyncio.Protocol):
    """Until a connection authenticated, acknowledge what the client sent at once.

    OpenSSH's client leaves Nagle on for non-interactive sessions and writes ``KEXINIT``
    then ``KEX_ECDH_INIT``, and ``NEWKEYS`` then ``SERVICE_REQUEST``, back to back: each
    second write waits for the ACK of the first.  The gateway has nothing to answer to the
    first of each pair, and its kernel, in delayed-ACK ("pingpong") mode since the gateway
    answered the client's earlier packets at once, held that ACK for its delayed-ACK timer
    (40 ms): every OpenSSH login paid it twice (stock sshd pays it after ``NEWKEYS``).
    ``TCP_QUICKACK`` is not sticky (the next quick reply re-enters pingpong mode), so it is
    set after each read, while the exchange is pre-auth: it sends a pending ACK now and
    leaves the socket out of pingpong mode for the next segment.  After authentication the
    transport talks to the connection directly again (bulk transfers keep delayed ACKs).

    asyncssh has no hook for this: the protocol sits between the transport and the
    connection (``transport.set_protocol``: uvloop caches the protocol's ``data_received``,
    so replacing the method would not do); ``conn._transport`` is the one private attribute
    used (asyncssh is pinned, see :mod:`xos_sshd.auth.sshhook`; without it nothing is set).
    """

    def __init__(self, conn: asyncssh.SSHServerConnection, transport: asyncio.Transport,
                 sock: Any):
        self._conn = conn
        self._transport = transport
        self._sock = sock

    @classmethod
    def install(cls, conn: asyncssh.SSHServerConnection) -> 'PreauthQuickAck | None':
        transport = getattr(conn, '_transport', None)  # noqa: SLF001 - see the docstring
        sock = conn.get_extra_info('socket')
        if (transport is None or sock is None or not hasattr(transport, 'set_protocol')
                or sock.family not in (socket.AF_INET, socket.AF_INET6)):
            return None
        hook = cls(conn, transport, sock)
        transport.set_protocol(hook)
        return hook

    def remove(self) -> None:
        """Hand the transport back to the connection (authenticated)."""
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._conn)

    def data_received(self, data: bytes) -> None:
        self._conn.data_received(data)
        if not self._transport.is_closing():
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def eof_received(self) -> bool | None:
        return self._conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()


class ConnectionHandler(asyncssh.SSHServer):
    """asyncssh's per-connection callbacks: admission, authentication, then sessions."""

    def __init__(self, gateway: Gateway):
        self._gateway = gateway
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = ('', 0)
        self._identity = None
        self._account: LocalAccount | None = None
        self._route = ''
        #: Admitted and not authenticated yet (handed back to admission exactly once).
        self._ticket: Ticket | None = None
        self._started = time.monotonic()
        self._auth_failed = False
        self._auth_refusals = 0
        self._live: LiveConnection | None = None
        self._quickack: PreauthQuickAck | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info('peername') or ('', 0)
        self._peer = (str(peer[0]), int(peer[1]))
        try:
            self._ticket = self._gateway.admission.admit(self._peer[0])
        except AdmissionRefused:
            # asyncssh sends its version line right after this returns: aborting here closes
            # the socket before a byte of SSH was sent (as sshd does past MaxStartups).
            conn.abort()
            return
        sshhook.install(conn, self, self._gateway.check_certificate)
        self._quickack = PreauthQuickAck.install(conn)

    def auth_completed(self) -> None:
        if self._quickack is not None:
            self._quickack.remove()
            self._quickack = None
        self._end_startup('authenticated')
        if self._identity is None or self._account is None or self._conn is None:
            return
        self._live = LiveConnection(self._identity, self._account,
                                    f'{self._peer[0]}:{self._peer[1]}', self._route, self._conn)
        self._gateway.live.add(self._live)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticket is not None:
            grace = self._gateway.config.login_grace_seconds
            if 'login timeout' in str(exc).lower() or time.monotonic() - self._started >= grace:
                log.info('connection from %s:%d closed: not authenticated within '
                         'login_grace_seconds (%g s)', *self._peer, grace)
                self._end_startup('grace-exceeded')
            else:
                self._end_startup('authfail' if self._auth_failed else 'noauth')
        if self._live is not None:
            self._gateway.live.remove(self._live)

    def _end_startup(self, outcome: str) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self._gateway.admission.finished(ticket, outcome)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    # --- sshhook.LoginPolicy ------------------------------------------------------------

    def certificate_refused(self, username: str, exc: AuthRefused) -> None:
        self._auth_failed = True
        self._audit_login(username, None, 'refused', exc.reason, str(exc))
        self._count_refusal()

    def _count_refusal(self) -> None:
        """OpenSSH's MaxAuthTries: a client offering key after refused key is cut off (each
        try costs a chain check and an audit line)."""
        self._auth_refusals += 1
        limit = self._gateway.config.limits.max_auth_tries
        if self._auth_refusals >= limit and self._conn is not None:
            log.warning('too many authentication failures from %s:%d (max_auth_tries = %d): '
                        'disconnected', self._peer[0], self._peer[1], limit)
            self._conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                  f'too many authentication failures (max_auth_tries = {limit})')

    async def accept_login(self, username: str, check: sshhook.CertificateCheck) -> bool:
        identity = check.identity
        try:
            account = await self._authorize(username, identity)
        except (LoginRefused, MappingRefused) as exc:
            self._auth_failed = True
            self._audit_login(username, check, 'refused', exc.reason, str(exc))
            self._count_refusal()
            return False
        self._identity, self._account, self._route = identity, account, check.route
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

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], UserSession] | bool:
        if (self._account is None or self._identity is None or self._live is None
                or self._conn is None):
            return False
        if self._live.closed:  # revoked or banned: requests already in flight get nothing
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f'this connection is being closed ({self._live.closed})')
        self._check_session_limits(self._live)
        runtime = self._gateway.cr_runtime
        session = UserSession(SessionContext(
            self._identity, self._account, self._peer[0], on_close=self._session_closed,
            subsystems=runtime.subsystems(f'{self._peer[0]}:{self._peer[1]}') if runtime else None,
            env_extra={'XOS_CR_SOCKET': str(self._gateway.cr_server.path)},
            on_event=self._gateway.audit.write, source=f'{self._peer[0]}:{self._peer[1]}',
            session=self._gateway.config.session))
        # The channel made here (as asyncssh would) is kept with the session: counted for
        # the limits, and told why when the gateway ends the connection (liveconn).
        # 256 KiB packets (asyncssh's default is 32 KiB): a migration stream (cr/pagestream.py)
        # relayed by xos-cr runs ~2x faster; the window (how much a client may send unread)
        # stays asyncssh's default.
        chan: asyncssh.SSHServerChannel[bytes] = self._conn.create_server_channel(
            max_pktsize=256 << 10)
        self._live.channels[session] = chan
        return chan, session

    def _session_closed(self, session: UserSession) -> None:
        if self._live is not None:
            self._live.channels.pop(session, None)

    def _check_session_limits(self, live: LiveConnection) -> None:
        """Refuse a new session channel over ``max_sessions_per_connection`` (OpenSSH
        MaxSessions) or ``max_sessions_per_account`` (across connections): audited, logged,
        and the client is told which limit."""
        limits = self._gateway.config.limits
        account = live.account.name
        per_account = self._gateway.live.sessions_of(account)
        if live.sessions >= limits.max_sessions_per_connection:
            refusal = SessionRefused('too-many-sessions', (
                f'{live.sessions} sessions open on this connection already '
                f'(max_sessions_per_connection = {limits.max_sessions_per_connection})'))
        elif limits.max_sessions_per_account and per_account >= limits.max_sessions_per_account:
            refusal = SessionRefused('too-many-sessions', (
                f'{account} has {per_account} sessions open already '
                f'(max_sessions_per_account = {limits.max_sessions_per_account})'))
        else:
            return
        self._gateway.audit.write(
            'session', action='open', outcome='refused', reason=refusal.reason_code,
            message=refusal.reason, route='ssh', source=live.source, vo=live.identity.vo,
            user=live.identity.user, account=account, uid=live.account.uid)
        log.warning('refused a session of %s from %s: %s', account, live.source, refusal.reason)
        raise refusal

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
