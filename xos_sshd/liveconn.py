"""The live, authenticated SSH connections of one gateway, and revocation that ends them.

Every connection that authenticated is registered here (:class:`LiveConnection`: identity,
account, source, the asyncssh connection, its open sessions) until it ends, so the gateway
can

* count sessions per account across connections (``limits.max_sessions_per_account``);
* end the connections of an identity whose certificate was revoked after it logged in:
  :class:`RevocationWatch` asks the verifier every ``limits.revocation_check_seconds``
  (and at once after SIGHUP) whether each live identity's serial is on its CA's CRL now,
  through the same CRL code path as a login; a connection is asked once more as it
  registers (its certificate was checked before the mapping and the home were prepared);
* end the connections of an account an admin bans (``admin.ban``), at once; and, on a
  cluster's shared store, those of an account banned through any other gateway, at the
  next sweep (:attr:`LiveConnections.store_bans`: the names the AMS read with its last NSS
  refresh, which every ban triggers on every gateway; a set lookup, no query per sweep).

Only a positive revocation closes a connection: a CRL that becomes unavailable (missing,
unreadable, badly signed) refuses new logins when the VO requires it, but leaves the live
connections open (logged once); certificate expiry does not end a connection either, as
with OpenSSH.  A closed connection gets an SSH disconnect message with the reason (OpenSSH
shows "Received disconnect ... 11: ..."), its sessions' process groups get SIGHUP
(:mod:`xos_sshd.session.channel`), and one audit line (event ``connection``, action
``closed``, ``reason`` ``revoked``/``banned``) plus a log line say who, from where and why.
Jobs (``xos-cr``) of the person keep running; sessions that came through the system sshd
and pam_xos are not the gateway's to close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncssh

from .ams import LocalAccount
from .auth.identity import VOIdentity
from .auth.verifier import RevocationStatus
from .tasks import cancel_and_wait, wake_or_timeout

log = logging.getLogger(__name__)


class AuditSink(Protocol):
    """What the registry needs of the audit log."""

    def write(self, event: str, **fields: Any) -> None: ...


#: (vo, issuer, serial) -> its revocation status now (``Verifier.revocation_status``).
StatusCheck = Callable[[str, str, int], RevocationStatus]


@dataclass(eq=False)
class LiveConnection:
    """One authenticated connection: who, as which account, from where, how many sessions."""

    identity: VOIdentity
    account: LocalAccount
    source: str  # "host:port"
    route: str  # 'x509' | 'openssh'
    conn: asyncssh.SSHServerConnection
    since: float = field(default_factory=time.time)
    #: The open session channels (session object -> its channel), to tell each why it ends.
    channels: dict[Any, asyncssh.SSHServerChannel[bytes]] = field(default_factory=dict)
    #: Why the gateway closed it (``revoked``, ``banned``), once it did.
    closed: str | None = None

    @property
    def sessions(self) -> int:
        """Open sessions on this connection.  A channel counts until a close was sent or
        received on it: asyncssh tells the session it is gone a loop turn later, and the
        client may already have asked for the next one."""
        return sum(1 for chan in self.channels.values() if not chan.is_closing())

    @property
    def serial_key(self) -> tuple[str, str, int]:
        """The certificate as the CRL knows it: (vo, issuer, serial)."""
        return (self.identity.vo, self.identity.issuer, self.identity.serial)


class LiveConnections:
    """The registry of live authenticated connections (one per gateway, one event loop)."""

    def __init__(self, audit: AuditSink, revocation_status: StatusCheck | None = None):
        self._audit = audit
        #: The verifier's revocation check (``Verifier.revocation_status``), asked once more
        #: when a connection registers: a revocation that landed between the certificate
        #: check and the registration (the mapping and the home take time) ends it at once
        #: rather than at the next sweep.
        self.revocation_status = revocation_status
        self._by_account: dict[str, set[LiveConnection]] = {}
        #: Accounts banned through this gateway (until unbanned): a login that raced the
        #: ban and registers after it is closed at once.
        self._banned: set[str] = set()
        #: Why some certificates could not be checked at the last sweep (logged on change).
        self._unknown: frozenset[str] = frozenset()
        #: The names banned in the (shared) store, as the AMS last read them
        #: (``AMS.banned_names``); set by the gateway.  Checked at each sweep and when a
        #: connection registers.
        self.store_bans: Callable[[], Set[str]] | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_account.values())

    def __iter__(self) -> Iterator[LiveConnection]:
        for entries in list(self._by_account.values()):
            yield from list(entries)

    def add(self, entry: LiveConnection) -> None:
        """Register a connection that just authenticated; close it at once if its account
        was banned or its certificate revoked since it was checked (the sweeps would not
        have seen it: it was not registered yet)."""
        self._by_account.setdefault(entry.account.name, set()).add(entry)
        if entry.account.name in self._banned or (
                self.store_bans is not None and entry.account.name in self.store_bans()):
            self.close(entry, 'banned', f'account {entry.account.name} is banned')
            return
        if self.revocation_status is None:
            return
        try:
            status = self.revocation_status(*entry.serial_key)
        except Exception:  # as a sweep: the next one checks it again
            log.exception('revocation check of a new connection failed; the next sweep '
                          'checks it')
            return
        if status.revoked:  # not known (CRL unavailable): open, as for a sweep
            self.close(entry, 'revoked', status.message)

    def remove(self, entry: LiveConnection) -> None:
        """Forget a connection that ended (no error when it was not registered)."""
        entries = self._by_account.get(entry.account.name)
        if entries is not None:
            entries.discard(entry)
            if not entries:
                del self._by_account[entry.account.name]

    def of_account(self, name: str) -> list[LiveConnection]:
        """The live connections of account *name*."""
        return list(self._by_account.get(name, ()))

    def sessions_of(self, name: str) -> int:
        """Open sessions of account *name* across all its live connections."""
        return sum(e.sessions for e in self._by_account.get(name, ()))

    # --- closing -------------------------------------------------------------------------

    def close(self, entry: LiveConnection, reason: str, message: str) -> bool:
        """Disconnect *entry* with *message* and audit it; False if it was closed already."""
        if entry.closed is not None:
            return False
        entry.closed = reason
        ident, account = entry.identity, entry.account
        self._audit.write(
            'connection', action='closed', outcome='ok', reason=reason, message=message,
            vo=ident.vo, user=ident.user, role=ident.role, serial=ident.serial,
            issuer=ident.issuer, key=ident.key_fingerprint, account=account.name,
            uid=account.uid, source=entry.source, route=entry.route,
            sessions=entry.sessions, since=round(entry.since, 3))
        log.warning('closed connection of %s@%s (account %s, serial %s) from %s with %d '
                    'session(s): %s: %s', ident.user, ident.vo, account.name, ident.serial,
                    entry.source, entry.sessions, reason, message)
        notice = f'xos-sshd: {message}; connection closed'
        for chan in list(entry.channels.values()):
            # OpenSSH's client ends on the channel close and never shows the disconnect
            # reason: each session's stderr says it (on a terminal, on a line of its own).
            try:
                chan.write_stderr(f'\r\n{notice}\r\n'.encode())
            except Exception:  # not started yet, or closing already
                pass
        try:
            entry.conn.disconnect(asyncssh.DISC_BY_APPLICATION, notice)
        except Exception:  # a half-dead transport: make sure it goes anyway
            log.exception('disconnect failed; aborting the connection')
            entry.conn.abort()
        return True

    def close_account(self, name: str, reason: str, message: str) -> int:
        """Close every live connection of account *name*; return how many."""
        return sum(self.close(e, reason, message) for e in self.of_account(name))

    def banned(self, name: str) -> int:
        """Account *name* was banned: close its connections now (and any that registers
        later, until :meth:`unbanned`); return how many were closed."""
        self._banned.add(name)
        return self.close_account(name, 'banned', f'account {name} was banned by the '
                                  f'administrator')

    def unbanned(self, name: str) -> None:
        self._banned.discard(name)

    def close_store_banned(self) -> int:
        """Close the live connections of the accounts :attr:`store_bans` names (banned through
        another gateway of the shared store); return how many."""
        if self.store_bans is None:
            return 0
        banned = self.store_bans()
        if not banned:
            return 0
        return sum(self.close_account(name, 'banned', f'account {name} was banned by the '
                                      f'administrator')
                   for name in [n for n in self._by_account if n in banned])

    def close_revoked(self, status: StatusCheck) -> int:
        """Close every live connection whose certificate *status* says is revoked now.

        Each distinct certificate is asked once; an answer that is not known (CRL
        unavailable) leaves its connections open.  Returns how many were closed.
        """
        answers: dict[tuple[str, str, int], RevocationStatus] = {}
        closed = 0
        for entry in self:
            if entry.closed is not None:
                continue
            key = entry.serial_key
            if key not in answers:
                answers[key] = status(*key)
            if answers[key].revoked:
                closed += self.close(entry, 'revoked', answers[key].message)
        self._note_unknown({a.message for a in answers.values() if not a.known})
        return closed

    def _note_unknown(self, messages: set[str]) -> None:
        """Log (once per change) that some live connections cannot be checked right now."""
        fresh = frozenset(messages)
        for message in fresh - self._unknown:
            log.warning('cannot check live connections for revocation (they stay open): %s',
                        message)
        if self._unknown and not fresh:
            log.info('live connections can be checked for revocation again')
        self._unknown = fresh


class RevocationWatch:
    """The sweep task: every *interval* seconds, or at once when :meth:`trigger`\\ ed, close
    the live connections whose certificates are revoked now; *also* runs ``on_sweep`` (the
    gateway prunes expired penalties there)."""

    def __init__(self, live: LiveConnections, status: StatusCheck, interval: float,
                 on_sweep: Callable[[], Any] | None = None):
        self._live = live
        self._status = status
        self._interval = interval
        self._on_sweep = on_sweep
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sweeps = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def trigger(self) -> None:
        """Sweep now (SIGHUP: CAs and CRLs were just re-read)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await wake_or_timeout(self._wake, self._interval)
            self.sweep_once()

    def sweep_once(self) -> int:
        """One sweep; never raises (a failure is logged and the next sweep tries again)."""
        self.sweeps += 1
        try:
            if self._on_sweep is not None:
                self._on_sweep()
            if not len(self._live):
                return 0
            banned = self._live.close_store_banned()
            return banned + self._live.close_revoked(self._status)
        except Exception:
            log.exception('revocation sweep failed; will retry')
            return 0

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
