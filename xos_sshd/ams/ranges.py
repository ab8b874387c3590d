"""Validation of the VOs' uid/gid ranges.

A VO account must never share a uid or gid with a system account or group,
nor with another VO's account: file ownership would silently cross the
boundary.  So every range is checked against ``/etc/passwd`` and
``/etc/group`` and against the other VOs' ranges before the AMS opens.

The system tables are read from the *files* on purpose, not through
``pwd.getpwall()``: with ``libnss_xos`` in ``nsswitch.conf`` the NSS view
also holds our own mapped accounts, which lie inside the ranges by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .model import NAME_MAX, NAME_RE, OVERFLOW_ID, RANGE_MAX, RANGE_MIN, RangeError, VOPolicy

PASSWD_PATH = "/etc/passwd"
GROUP_PATH = "/etc/group"


@dataclass(frozen=True)
class SystemEntry:
    """One line of /etc/passwd or /etc/group that matters for ranges."""

    name: str
    id: int
    source: str  # "/etc/passwd", "/etc/group", or "/etc/passwd (primary gid)"


@dataclass(frozen=True)
class SystemIds:
    """The uids, gids and names of the system tables (the files)."""

    users: tuple[SystemEntry, ...]
    groups: tuple[SystemEntry, ...]  # includes passwd primary gids

    @property
    def uids(self) -> frozenset[int]:
        return frozenset(e.id for e in self.users)

    @property
    def gids(self) -> frozenset[int]:
        return frozenset(e.id for e in self.groups)

    @property
    def user_names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.users)

    @property
    def group_names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.groups if e.source != f"{PASSWD_PATH} (primary gid)")


def _parse(path: str, id_field: int) -> list[tuple[str, int, list[str]]]:
    """Parse a colon-separated table; skip comments, NIS ``+``/``-`` lines and junk."""
    out: list[tuple[str, int, list[str]]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if not line or line.startswith(("#", "+", "-")):
                    continue
                fields = line.split(":")
                if len(fields) <= id_field:
                    continue
                try:
                    num = int(fields[id_field])
                except ValueError:
                    continue
                out.append((fields[0], num, fields))
    except FileNotFoundError:
        pass
    return out


def read_system_ids(passwd_path: str = PASSWD_PATH, group_path: str = GROUP_PATH) -> SystemIds:
    """Read the system users and groups from the given files."""
    users: list[SystemEntry] = []
    groups: list[SystemEntry] = []
    for name, gid, _ in _parse(group_path, 2):
        groups.append(SystemEntry(name, gid, group_path))
    for name, uid, fields in _parse(passwd_path, 2):
        users.append(SystemEntry(name, uid, passwd_path))
        try:
            groups.append(SystemEntry(name, int(fields[3]), f"{passwd_path} (primary gid)"))
        except (IndexError, ValueError):
            pass
    return SystemIds(tuple(users), tuple(groups))


def _check_bounds(vo: str, what: str, rng: tuple[int, int]) -> list[str]:
    lo, hi = rng
    errs = []
    if lo > hi:
        errs.append(f"VO {vo!r}: {what} range {lo}..{hi} is empty (first > last)")
        return errs
    if lo < RANGE_MIN or hi > RANGE_MAX:
        errs.append(f"VO {vo!r}: {what} range {lo}..{hi} must lie within {RANGE_MIN}..{RANGE_MAX}")
    if lo <= OVERFLOW_ID <= hi:
        errs.append(f"VO {vo!r}: {what} range {lo}..{hi} includes the overflow id {OVERFLOW_ID} (nobody)")
    return errs


def _check_system(vo: str, what: str, rng: tuple[int, int], entries: Iterable[SystemEntry]) -> list[str]:
    lo, hi = rng
    seen: dict[int, SystemEntry] = {}
    for e in entries:
        if lo <= e.id <= hi:
            seen.setdefault(e.id, e)
    hits = sorted(seen.values(), key=lambda e: e.id)
    if not hits:
        return []
    shown = ", ".join(f"{e.id} ({e.name} in {e.source})" for e in hits[:5])
    more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
    return [f"VO {vo!r}: {what} range {lo}..{hi} contains existing system {what} {shown}{more}"]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def validate_policies(
    policies: Mapping[str, VOPolicy],
    passwd_path: str = PASSWD_PATH,
    group_path: str = GROUP_PATH,
    system: SystemIds | None = None,
) -> None:
    """Check every VO policy's ranges and pool; raise :class:`RangeError` listing all problems.

    Rules: a dynamic/pool VO has a uid and gid range within
    ``RANGE_MIN..RANGE_MAX`` that excludes 65534; no range contains a uid
    (gid) of ``/etc/passwd`` (``/etc/group`` or a passwd primary gid); uid
    ranges of two VOs are disjoint, and so are gid ranges; a pool fits its
    ranges and its names are valid, unique and not system names.
    """
    if system is None:
        system = read_system_ids(passwd_path, group_path)
    errs: list[str] = []
    ranged: list[VOPolicy] = []
    for key, pol in policies.items():
        if key != pol.vo:
            errs.append(f"policy registered under {key!r} is for VO {pol.vo!r}")
        if pol.kind == "static":
            for rng, what in ((pol.uid_range, "uid"), (pol.gid_range, "gid")):
                if rng is not None:
                    errs += _check_bounds(pol.vo, what, rng)
            continue
        if pol.uid_range is None or pol.gid_range is None:
            errs.append(f"VO {pol.vo!r}: a {pol.kind} policy needs uid_range (and gid_range)")
            continue
        b_uid = _check_bounds(pol.vo, "uid", pol.uid_range)
        b_gid = _check_bounds(pol.vo, "gid", pol.gid_range)
        errs += _check_system(pol.vo, "uid", pol.uid_range, system.users)
        errs += _check_system(pol.vo, "gid", pol.gid_range, system.groups)
        errs += b_uid + b_gid
        if not b_uid and not b_gid:
            ranged.append(pol)
        if pol.kind == "pool":
            errs += _check_pool(pol, system)
        if not NAME_RE.match(pol.prefix + "a"):
            errs.append(f"VO {pol.vo!r}: account_prefix {pol.prefix!r} is not a valid name prefix")
    for i, a in enumerate(ranged):
        for b in ranged[i + 1:]:
            assert a.uid_range and b.uid_range and a.gid_range and b.gid_range
            if _overlap(a.uid_range, b.uid_range):
                errs.append(
                    f"uid ranges of VO {a.vo!r} ({a.uid_range[0]}..{a.uid_range[1]}) and "
                    f"VO {b.vo!r} ({b.uid_range[0]}..{b.uid_range[1]}) overlap"
                )
            if _overlap(a.gid_range, b.gid_range):
                errs.append(
                    f"gid ranges of VO {a.vo!r} ({a.gid_range[0]}..{a.gid_range[1]}) and "
                    f"VO {b.vo!r} ({b.gid_range[0]}..{b.gid_range[1]}) overlap"
                )
    if errs:
        raise RangeError("; ".join(errs))


def _check_pool(pol: VOPolicy, system: SystemIds) -> list[str]:
    assert pol.uid_range and pol.gid_range
    errs = []
    n = len(pol.pool)
    if n == 0:
        errs.append(f"VO {pol.vo!r}: pool policy with an empty pool")
    if n > pol.uid_range[1] - pol.uid_range[0] + 1:
        errs.append(f"VO {pol.vo!r}: pool of {n} accounts does not fit uid range {pol.uid_range[0]}..{pol.uid_range[1]}")
    if n >= pol.gid_range[1] - pol.gid_range[0] + 1:
        errs.append(
            f"VO {pol.vo!r}: gid range {pol.gid_range[0]}..{pol.gid_range[1]} leaves no gid for VO groups "
            f"after the {n} private pool groups"
        )
    if len(set(pol.pool)) != n:
        errs.append(f"VO {pol.vo!r}: pool names are not unique")
    for name in pol.pool:
        if not NAME_RE.match(name) or len(name) > NAME_MAX:
            errs.append(f"VO {pol.vo!r}: pool name {name!r} is not a valid account name")
        elif name in system.user_names or name in system.group_names:
            errs.append(f"VO {pol.vo!r}: pool name {name!r} already exists in /etc/passwd or /etc/group")
    return errs
