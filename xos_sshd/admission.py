"""Admission control before authentication: ``MaxStartups``, per-source limits and penalties.

asyncssh has no equivalent of OpenSSH's ``MaxStartups``, ``PerSourceMaxStartups`` or
``PerSourcePenalties``, so the gateway keeps its own book here (config ``[limits]``).  One
:class:`Admission` per gateway; :class:`~xos_sshd.gateway.ConnectionHandler` asks
:meth:`Admission.admit` in ``connection_made`` (before asyncssh sends its version line) and
reports the end of the unauthenticated phase with :meth:`Admission.finished`.

* **Startups**: connections that have not authenticated yet.  With ``max_startups =
  (start, rate, full)`` a new connection is refused when *full* are pending, and with
  probability ``rate + (100 - rate) * (n - start) / (full - start)`` % when ``n >= start``
  are (OpenSSH's formula).  ``max_startups_per_source`` caps the pending connections of one
  source.
* **Penalties**: when an unauthenticated connection ends, its source collects penalty
  seconds: ``penalty_authfail`` when an authentication attempt was refused,
  ``penalty_grace_exceeded`` when ``login_grace_seconds`` ran out, ``penalty_noauth`` when
  it simply went away.  A source's penalty runs down in real time; once it holds at least
  ``penalty_min`` seconds the source is refused until it has run down (it never holds more
  than ``penalty_max``).  An authenticated connection collects nothing: a client whose
  first key was refused and whose second was accepted is not penalised.

A *source* is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64);
IPv4-mapped IPv6 addresses count as IPv4.  ``penalty_exempt`` networks never collect a
penalty.  At most :data:`MAX_PENALISED_SOURCES` sources *per address family* are tracked
(OpenSSH's ``max-sources4``/``max-sources6``: an attacker holding many IPv6 /64s cannot push
IPv4 sources out of the book, nor the reverse): beyond that new sources of that family are
not penalised until the periodic sweep (:meth:`Admission.prune`) forgets expired ones
(OpenSSH's "permissive" overflow), so a flood of addresses can neither eat the gateway's
memory nor make each refused connection pay for a scan of the whole book.  Refusals are counted (:attr:`Admission.counters`) and logged at most once
per :data:`LOG_INTERVAL` seconds and kind, with the number suppressed; a source that starts
being refused for a penalty leaves one audit line (event ``penalty``).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .config import LimitsConfig

log = logging.getLogger(__name__)

#: Sources with a penalty kept in memory at most, per address family (then new ones of that
#: family go unpenalised).
MAX_PENALISED_SOURCES = 65536
#: One log line per kind of refusal at most this often (seconds); the rest are counted.
LOG_INTERVAL = 10.0
#: The reasons of :class:`AdmissionRefused` (keys of :attr:`Admission.counters`; the metrics
#: export each, 0 until it happens).
REFUSAL_REASONS = ('max-startups', 'max-startups-per-source', 'penalty')

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuditSink(Protocol):
    """What admission needs of the audit log."""

    def write(self, event: str, **fields: Any) -> None: ...


class AdmissionRefused(Exception):
    """A connection is refused before authentication; ``reason`` is a stable code
    (``max-startups``, ``max-startups-per-source``, ``penalty``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Ticket:
    """An admitted, not yet authenticated connection: its peer address and source key."""

    host: str
    key: str
    exempt: bool


@dataclass
class _Penalty:
    """One source's penalty: it runs out at ``expires`` (monotonic); refusing while
    ``active`` (it reached the minimum)."""

    expires: float
    active: bool = False


def source_key(host: str) -> str:
    """The penalty/limit key of a peer address: ``a.b.c.d`` or the IPv6 ``/64`` it is in.

    Anything that is not an IP address (a unix socket peer, an empty name) is its own key.
    """
    try:
        addr = ipaddress.ip_address(host.split('%', 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def source_family(key: str) -> str:
    """The penalty book a source key belongs to: ``ipv4``, ``ipv6`` (a /64) or ``other``."""
    if '/' in key:
        return 'ipv6'
    return 'ipv4' if key.count('.') == 3 and key.replace('.', '').isdigit() else 'other'


def drop_probability(pending: int, start: int, rate: int, full: int) -> float:
    """OpenSSH's ``MaxStartups`` rule: the probability (0..1) of refusing a new connection
    while *pending* unauthenticated ones exist."""
    if pending >= full:
        return 1.0
    if pending < start:
        return 0.0
    return (rate + (100 - rate) * (pending - start) / (full - start)) / 100.0


class _RateLimitedLog:
    """At most one log line per kind every ``interval`` seconds; the others are counted and
    reported with the next line."""

    def __init__(self, interval: float, clock: Callable[[], float]):
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, message: str) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.warning('%s%s', message,
                    f' ({more} more refused for {kind} in the last {now - last:.0f} s)'
                    if more and last is not None else '')


class Admission:
    """The gateway's book of unauthenticated connections and penalised sources."""

    def __init__(self, limits: LimitsConfig, audit: AuditSink | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random):
        self.limits = limits
        self._audit = audit
        self._clock = clock
        self._rand = rand
        self._exempt: tuple[Network, ...] = tuple(limits.penalty_exempt)
        self.pending = 0
        self._pending_by_source: Counter[str] = Counter()
        self._penalties: dict[str, _Penalty] = {}
        #: How many keys of :attr:`_penalties` each family holds (the per-family cap).
        self._tracked: Counter[str] = Counter()
        self._overflow_logged: set[str] = set()
        self._log = _RateLimitedLog(LOG_INTERVAL, clock)
        #: Refusals so far by reason (``max-startups``, ``max-startups-per-source``,
        #: ``penalty``), and penalties imposed by cause: for monitoring.
        self.counters: Counter[str] = Counter()

    # --- the connection's side -----------------------------------------------------------

    def admit(self, host: str) -> Ticket:
        """Admit a new connection from *host* or raise :class:`AdmissionRefused`.

        The caller must hand the ticket back with :meth:`finished` (exactly once) when the
        unauthenticated phase ends.
        """
        key = source_key(host)
        try:
            self._check(host, key)
        except AdmissionRefused as exc:
            self.counters[exc.reason] += 1
            self._log.warning(exc.reason, f'refused connection from {host}: {exc}')
            raise
        self.pending += 1
        self._pending_by_source[key] += 1
        return Ticket(host, key, self.exempt(host))

    def _check(self, host: str, key: str) -> None:
        limits = self.limits
        penalty = self._penalties.get(key)
        if penalty is not None:
            left = penalty.expires - self._clock()
            if left <= 0:
                self._forget(key)
            elif penalty.active:
                raise AdmissionRefused('penalty', f'source {key} is penalised for '
                                       f'{left:.0f} more s (failed or abandoned logins)')
        per_source = limits.max_startups_per_source
        if per_source and self._pending_by_source[key] >= per_source:
            raise AdmissionRefused('max-startups-per-source',
                                   f'{self._pending_by_source[key]} unauthenticated connections '
                                   f'from {key} already (max_startups_per_source = {per_source})')
        start, rate, full = limits.max_startups
        if self._rand() < drop_probability(self.pending, start, rate, full):
            raise AdmissionRefused('max-startups',
                                   f'{self.pending} unauthenticated connections already '
                                   f'(max_startups = {start}:{rate}:{full})')

    def finished(self, ticket: Ticket, outcome: str) -> None:
        """The unauthenticated phase of an admitted connection is over.

        *outcome*: ``authenticated``, or how it ended without: ``authfail`` (a refused
        authentication attempt), ``grace-exceeded``, ``noauth`` (went away).
        """
        self.pending = max(0, self.pending - 1)
        left = self._pending_by_source[ticket.key] - 1
        if left > 0:
            self._pending_by_source[ticket.key] = left
        else:
            self._pending_by_source.pop(ticket.key, None)
        if outcome != 'authenticated' and not ticket.exempt:
            self.penalise(ticket.key, outcome)

    # --- penalties -----------------------------------------------------------------------

    def penalise(self, key: str, cause: str) -> None:
        """Add the penalty of *cause* (``authfail``, ``grace-exceeded``, ``noauth``) to the
        source *key*, unless penalties are off (exempt sources never come here)."""
        limits = self.limits
        seconds = {'authfail': limits.penalty_authfail,
                   'grace-exceeded': limits.penalty_grace_exceeded,
                   'noauth': limits.penalty_noauth}[cause]
        if not limits.penalties or seconds <= 0:
            return
        now = self._clock()
        penalty = self._penalties.get(key)
        if penalty is None or penalty.expires <= now:
            if penalty is None:
                family = source_family(key)
                if self._tracked[family] >= MAX_PENALISED_SOURCES:
                    # No scan here: that would make every connection of a flood pay for the
                    # whole book.  The sweep prunes; until then new sources go unpenalised.
                    if family not in self._overflow_logged:
                        log.warning('%d %s sources are penalised already: new ones go '
                                    'unpenalised until some run out', MAX_PENALISED_SOURCES,
                                    family)
                        self._overflow_logged.add(family)
                    return
                self._tracked[family] += 1
            penalty = self._penalties[key] = _Penalty(expires=now)
        penalty.expires = min(penalty.expires + seconds, now + limits.penalty_max)
        held = penalty.expires - now
        if not penalty.active and held >= limits.penalty_min:
            penalty.active = True
            self.counters[f'penalty-imposed-{cause}'] += 1
            log.warning('source %s penalised: refused for %.0f s (last: %s)', key, held, cause)
            if self._audit is not None:
                self._audit.write('penalty', action='imposed', outcome='ok', source=key,
                                  cause=cause, seconds=round(held, 1))

    def exempt(self, host: str) -> bool:
        """Whether the peer address *host* is in a ``penalty_exempt`` network."""
        try:
            addr = ipaddress.ip_address(host.split('%', 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._exempt)

    def penalised(self, key: str) -> float:
        """Seconds *key* is still refused for (0 when it is not refused)."""
        penalty = self._penalties.get(key)
        if penalty is None or not penalty.active:
            return 0.0
        return max(0.0, penalty.expires - self._clock())

    def prune(self) -> int:
        """Forget penalties that ran out; return how many (the sweep calls this)."""
        now = self._clock()
        gone = [k for k, p in self._penalties.items() if p.expires <= now]
        for key in gone:
            self._forget(key)
        return len(gone)

    def _forget(self, key: str) -> None:
        """Drop *key*'s penalty and its place in its family's count."""
        del self._penalties[key]
        family = source_family(key)
        self._tracked[family] -= 1
        self._overflow_logged.discard(family)
