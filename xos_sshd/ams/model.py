"""Data types of the Account Mapping Service.

The AMS turns a verified :class:`~xos_sshd.auth.identity.VOIdentity` into a
:class:`LocalAccount` under the rules of the VO's :class:`VOPolicy`.  These
types are plain frozen dataclasses so they can cross thread, process and
module boundaries (sessions, the control socket, the admin CLI) without
dragging the store along.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Mapping

#: Policy kinds understood by the AMS.
PolicyKind = Literal["dynamic", "pool", "static"]

#: Lowest uid/gid a VO range may use; below are the distribution's system ids.
RANGE_MIN = 1000
#: Highest uid/gid a VO range may use (2**31-1 is reserved by some tools, and
#: (uid_t)-1 means "no change" to setresuid()).
RANGE_MAX = 2**31 - 2
#: The overflow uid/gid ("nobody"/"nogroup"): never handed to a VO account.
OVERFLOW_ID = 65534

#: Local account and group names the AMS creates always match this (the
#: portable subset of what shadow-utils accepts, plus the 32 char limit).
NAME_RE = re.compile(r"[a-z_][a-z0-9_-]*\Z")
NAME_MAX = 32


class MappingRefused(Exception):
    """An identity cannot be mapped (or is no longer allowed to use its mapping).

    ``reason`` is a stable short code for logs, the control protocol and
    tests; ``str(exc)`` is the human message.  Codes: ``pool-exhausted``,
    ``range-exhausted``, ``not-in-static-table``, ``banned``,
    ``invalid-static-account``, ``unknown-vo``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # keep .reason across pickling
        return (type(self), (self.reason, str(self)))


class RangeError(ValueError):
    """A VO's uid/gid ranges (or pool) are unusable; the message says why."""


@dataclass(frozen=True)
class LocalAccount:
    """The local account an identity runs as.

    ``groups`` holds the supplementary groups as ``(name, gid)`` pairs,
    primary group excluded, sorted by gid.  ``vo``/``vo_user`` tell whom the
    account serves; ``role`` is the role only when the VO maps roles to
    separate accounts (else ``None``).

    ``lease``: on a shared (PostgreSQL) store, the token of the mapping this account was
    handed out under (``ID-CREATED_AT``: mapping ids are never reused), so that every node can
    tell this lease's home from a previous lessee's (:func:`xos_sshd.session.home.ensure_home`);
    ``""`` for static accounts and on the embedded sqlite store.  Not part of equality.
    """

    name: str
    uid: int
    gid: int
    groups: tuple[tuple[str, int], ...]
    home: str
    shell: str
    gecos: str
    vo: str
    vo_user: str
    role: str | None = None
    lease: str = field(default="", compare=False)

    @property
    def gids(self) -> tuple[int, ...]:
        """Supplementary gids, as ``setgroups``/``Popen(extra_groups=)`` want them."""
        return tuple(gid for _, gid in self.groups)


@dataclass(frozen=True)
class MappingRecord:
    """One row of the mapping table, for the admin CLI and the control socket."""

    account: LocalAccount
    kind: PolicyKind
    created_at: datetime
    last_seen: datetime
    lease_expires: datetime
    banned: bool
    pinned: bool

    def expired(self, now: datetime) -> bool:
        """Whether the lease has run out at ``now`` (pinned mappings never expire)."""
        return not self.pinned and self.lease_expires <= now


@dataclass(frozen=True)
class MappingPreview:
    """What :meth:`AMS.map_identity` would do for an identity now (``AMS.explain``; never writes).

    ``outcome``: ``existing`` (the identity holds ``account``; a login renews it), ``new`` (a
    first login would create or lease ``account``; name and ids as of now), or ``refused``
    (``reason`` is the :class:`MappingRefused` code a login would get; ``account`` is the
    banned mapping for ``banned``, else ``None``).  ``policy`` is the VO's policy kind
    (``None`` for a VO without a policy); ``record`` holds the lease of an existing mapping.
    """

    vo: str
    user: str
    role: str | None
    policy: PolicyKind | None
    outcome: Literal["existing", "new", "refused"]
    account: LocalAccount | None
    reason: str | None = None
    message: str = ""
    record: MappingRecord | None = None
    vo_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistoryEvent:
    """One entry of the append-only ``mapping_history`` table."""

    at: datetime
    event: str
    name: str
    uid: int
    vo: str
    vo_user: str
    role: str | None
    detail: str


@dataclass(frozen=True)
class VOPolicy:
    """How one VO's identities map to local accounts.

    Built by ``xos_sshd/config.py`` from a ``[vo.NAME]`` table.

    * ``kind``: ``dynamic`` (one account per person, created on first
      login, named ``account_prefix + user``), ``pool`` (lease one of the
      names in ``pool``; uid = ``uid_range[0] + index``), ``static``
      (``static`` maps VO user -> existing system account name; with
      ``map_roles`` a key ``"user/role"`` is tried before ``"user"``).
    * ``uid_range``/``gid_range``: inclusive ``(first, last)``; required for
      dynamic and pool.  ``gid_range`` defaults to ``uid_range``.  For a pool
      the first ``len(pool)`` gids are the pool accounts' private groups.
    * ``account_prefix``: prefix of account and group names; ``None`` means
      ``"<vo>_"`` (sanitised).
    * ``map_roles``: the role is part of the mapping key (one account per
      person *and* role).
    * ``lease_hours``: a mapping not used for that long may be reclaimed
      (once the account is idle).
    """

    vo: str
    kind: PolicyKind = "dynamic"
    uid_range: tuple[int, int] | None = None
    gid_range: tuple[int, int] | None = None
    account_prefix: str | None = None
    pool: tuple[str, ...] = ()
    static: Mapping[str, str] = field(default_factory=dict)
    map_roles: bool = False
    lease_hours: float = 168.0
    home_base: str = "/home"
    shell: str = "/bin/bash"

    def __post_init__(self) -> None:
        if self.kind not in ("dynamic", "pool", "static"):
            raise RangeError(f"VO {self.vo!r}: unknown policy kind {self.kind!r}")
        if self.uid_range is not None:
            object.__setattr__(self, "uid_range", (int(self.uid_range[0]), int(self.uid_range[1])))
        if self.gid_range is None:
            object.__setattr__(self, "gid_range", self.uid_range)
        else:
            object.__setattr__(self, "gid_range", (int(self.gid_range[0]), int(self.gid_range[1])))
        if self.account_prefix is None:
            from .policy import sanitise_name  # local import: policy imports model

            object.__setattr__(self, "account_prefix", sanitise_name(self.vo) + "_")
        object.__setattr__(self, "pool", tuple(self.pool))
        object.__setattr__(self, "static", dict(self.static))
        if self.lease_hours <= 0:
            raise RangeError(f"VO {self.vo!r}: lease_hours must be positive")

    @property
    def prefix(self) -> str:
        """``account_prefix`` after defaulting (never ``None``)."""
        return self.account_prefix or ""

    @property
    def lease_seconds(self) -> float:
        """The lease length in seconds."""
        return self.lease_hours * 3600.0
