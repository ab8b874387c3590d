"""The mapping policies (dynamic, pool, static): naming and id allocation.

Everything here that touches the database runs inside the caller's write
transaction (:class:`~xos_sshd.ams.store.Txn`: sqlite's ``BEGIN IMMEDIATE``, or
PostgreSQL's cluster-wide write lock, :mod:`~xos_sshd.ams.store_pg`), so the
"is this uid/name free?" checks and the inserts that use the answer are
atomic with respect to every other AMS instance and process.  The schema's
UNIQUE constraints back this up: if a bug ever let two writers race, the
second insert would fail instead of handing out an account twice.
"""

from __future__ import annotations

import grp
import hashlib
import pwd
from functools import cached_property
from typing import Iterable, Iterator, Mapping, Protocol

from .model import NAME_MAX, NAME_RE, OVERFLOW_ID, RANGE_MIN, MappingRefused, VOPolicy
from .ranges import GROUP_PATH, PASSWD_PATH, SystemIds, read_system_ids
from .store import Txn

#: Length of the hash suffix that disambiguates long or colliding names.
SUFFIX_LEN = 6


class IdentityLike(Protocol):
    """The fields of ``xos_sshd.auth.identity.VOIdentity`` the AMS uses."""

    @property
    def vo(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def role(self) -> str | None: ...


def sanitise_name(raw: str) -> str:
    """Lower-case ``raw`` and force it into ``[a-z_][a-z0-9_-]*`` (not truncated).

    Every character outside the set becomes ``_``; a leading digit or ``-``
    gets a ``_`` in front.
    """
    out = "".join(c if ("a" <= c <= "z" or "0" <= c <= "9" or c in "_-") else "_" for c in raw.lower())
    if not out or not ("a" <= out[0] <= "z" or out[0] == "_"):
        out = "_" + out
    return out


def hash_suffix(key: str, salt: int = 0) -> str:
    """A short, stable hex digest of ``key`` (and ``salt`` for the rare re-collision)."""
    data = key if salt == 0 else f"{key}\0{salt}"
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:SUFFIX_LEN]


def name_candidates(base: str, key: str, max_tries: int = 64) -> Iterator[str]:
    """Candidate names for ``base``: itself if it fits, then ``base[:25] + '-' + hash``.

    The hash is of ``key`` (who the name is for), so the same person gets
    the same name again after a reclaim, and it differs between people.
    """
    base = sanitise_name(base)
    if len(base) <= NAME_MAX:
        yield base
    stem = base[: NAME_MAX - SUFFIX_LEN - 1]
    for salt in range(max_tries):
        yield f"{stem}-{hash_suffix(key, salt)}"


def role_key(pol: VOPolicy, identity: IdentityLike) -> str:
    """The role part of the mapping key: the role when the VO maps roles, else ``''``."""
    return (identity.role or "") if pol.map_roles else ""


def unique_groups(groups: Iterable[str]) -> list[str]:
    """VO group names in order, duplicates and empty names dropped."""
    seen: dict[str, None] = {}
    for g in groups:
        if g:
            seen.setdefault(g, None)
    return list(seen)


def pool_names(policies: Mapping[str, VOPolicy]) -> frozenset[str]:
    """Every pool account name of every VO: never used for anything else."""
    return frozenset(name for pol in policies.values() if pol.kind == "pool" for name in pol.pool)


class Context:
    """What allocation needs besides the transaction: all policies, the time, the system tables.

    The system tables are read from the files only when an allocation needs
    them (not on the renewal hot path).
    """

    def __init__(self, policies: Mapping[str, VOPolicy], now: float,
                 passwd_path: str = PASSWD_PATH, group_path: str = GROUP_PATH,
                 reserved_names: frozenset[str] | None = None) -> None:
        self.policies = policies
        self.now = now
        self._paths = (passwd_path, group_path)
        self.reserved_names = pool_names(policies) if reserved_names is None else reserved_names

    @cached_property
    def system(self) -> SystemIds:
        """The /etc/passwd and /etc/group entries, read on first use."""
        return read_system_ids(*self._paths)

    def in_managed_range(self, num: int, which: str) -> bool:
        """Whether ``num`` lies in some VO's uid (``which='uid'``) or gid range."""
        for pol in self.policies.values():
            rng = pol.uid_range if which == "uid" else pol.gid_range
            if pol.kind != "static" and rng is not None and rng[0] <= num <= rng[1]:
                return True
        return False

    def system_name_exists(self, name: str) -> bool:
        """Whether a user or group called ``name`` exists outside the AMS.

        The files are authoritative; the NSS lookup adds LDAP & co, but an
        entry whose id lies in a VO range is one of ours (served back by
        libnss_xos) and does not count.
        """
        if name in self.system.user_names or name in self.system.group_names:
            return True
        try:
            if not self.in_managed_range(pwd.getpwnam(name).pw_uid, "uid"):
                return True
        except KeyError:
            pass
        try:
            if not self.in_managed_range(grp.getgrnam(name).gr_gid, "gid"):
                return True
        except KeyError:
            pass
        return False


async def name_taken(txn: Txn, ctx: Context, name: str) -> bool:
    """Whether ``name`` is used by a mapping, a group, a pool or the system."""
    if name in ctx.reserved_names:
        return True
    row = await txn.one(
        "SELECT 1 FROM mappings WHERE name = ? UNION ALL SELECT 1 FROM groups WHERE name = ? LIMIT 1",
        (name, name),
    )
    return row is not None or ctx.system_name_exists(name)


async def pick_name(txn: Txn, ctx: Context, base: str, key: str) -> str:
    """The first free candidate of :func:`name_candidates`."""
    for cand in name_candidates(base, key):
        if NAME_RE.match(cand) and not await name_taken(txn, ctx, cand):
            return cand
    raise MappingRefused("range-exhausted", f"no free account name derived from {base!r}")


def _lowest_gap(used: Iterable[int], lo: int, hi: int, skip: set[int]) -> int | None:
    taken = set(used) | skip
    for num in range(lo, hi + 1):
        if num not in taken and num != OVERFLOW_ID:
            return num
    return None


async def lowest_free_uid(txn: Txn, ctx: Context, pol: VOPolicy) -> int:
    """Lowest uid of the VO's range used by no mapping and no /etc/passwd entry."""
    assert pol.uid_range is not None
    lo, hi = pol.uid_range
    rows = await txn.all("SELECT uid FROM mappings WHERE uid BETWEEN ? AND ? ORDER BY uid", (lo, hi))
    uid = _lowest_gap((r[0] for r in rows), lo, hi, set(ctx.system.uids))
    if uid is None:
        raise MappingRefused("range-exhausted", f"VO {pol.vo!r}: no free uid left in {lo}..{hi}")
    return uid


def _pool_gid_block(pol: VOPolicy) -> range:
    assert pol.gid_range is not None
    return range(pol.gid_range[0], pol.gid_range[0] + len(pol.pool)) if pol.kind == "pool" else range(0)


async def lowest_free_gid(txn: Txn, ctx: Context, pol: VOPolicy) -> int:
    """Lowest gid of the VO's range used by no group and no /etc/group entry.

    For a pool the first ``len(pool)`` gids are kept for the pool accounts'
    private groups and skipped here.
    """
    assert pol.gid_range is not None
    lo, hi = pol.gid_range
    rows = await txn.all("SELECT gid FROM groups WHERE gid BETWEEN ? AND ? ORDER BY gid", (lo, hi))
    gid = _lowest_gap((r[0] for r in rows), lo, hi, set(ctx.system.gids) | set(_pool_gid_block(pol)))
    if gid is None:
        raise MappingRefused("range-exhausted", f"VO {pol.vo!r}: no free gid left in {lo}..{hi}")
    return gid


async def _gid_free(txn: Txn, ctx: Context, gid: int) -> bool:
    if gid in ctx.system.gids:
        return False
    return await txn.one("SELECT 1 FROM groups WHERE gid = ?", (gid,)) is None


def gecos_for(identity: IdentityLike) -> str:
    """``"<user>@<vo> (xos)"``: who the account serves, visible to finger/ps/ls.

    Characters that would break a passwd line (``:``, NUL, line breaks) become ``_``.
    """
    text = f"{identity.user}@{identity.vo} (xos)"
    return "".join("_" if c in ":\0\n\r" else c for c in text)


async def _insert_mapping(
    txn: Txn, ctx: Context, pol: VOPolicy, identity: IdentityLike, kind: str,
    name: str, uid: int, gid: int, home: str, shell: str, gecos: str,
) -> int:
    now = ctx.now
    mid = await txn.scalar(
        "INSERT INTO mappings (vo, vo_user, role, kind, name, uid, gid, home, shell, gecos,"
        " created_at, last_seen, lease_expires) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (identity.vo, identity.user, role_key(pol, identity), kind, name, uid, gid, home, shell, gecos,
         now, now, now + pol.lease_seconds),
    )
    await record_history(txn, ctx.now, "created", uid, name, identity.vo, identity.user,
                         role_key(pol, identity), kind)
    return int(mid)


async def record_history(txn: Txn, at: float, event: str, uid: int, name: str, vo: str,
                         vo_user: str, role: str, detail: str = "") -> None:
    """Append one event to ``mapping_history`` (inside the caller's transaction)."""
    await txn.execute(
        "INSERT INTO mapping_history (at, event, uid, name, vo, vo_user, role, detail)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (at, event, uid, name, vo, vo_user, role, detail),
    )


async def pick_dynamic(txn: Txn, ctx: Context, pol: VOPolicy, identity: IdentityLike) -> tuple[str, int, int]:
    """The (name, uid, gid) a new dynamic account would get now (reads only)."""
    rk = role_key(pol, identity)
    base = pol.prefix + identity.user + (f"_{rk}" if rk else "")
    name = await pick_name(txn, ctx, base, f"{identity.vo}\0{identity.user}\0{rk}")
    uid = await lowest_free_uid(txn, ctx, pol)
    gid = await lowest_free_gid(txn, ctx, pol)
    return name, uid, gid


async def pick_pool(txn: Txn, ctx: Context, pol: VOPolicy, identity: IdentityLike) -> tuple[str, int, int]:
    """The (name, uid, gid) of the first free pool account (reads only); ``pool-exhausted`` if none."""
    assert pol.uid_range is not None and pol.gid_range is not None
    rows = await txn.all("SELECT name, uid FROM mappings")
    used_names = {r["name"] for r in rows}
    used_uids = {r["uid"] for r in rows}
    group_names = {r[0] for r in await txn.all("SELECT name FROM groups")}
    for idx, name in enumerate(pol.pool):
        uid = pol.uid_range[0] + idx
        if name in used_names or name in group_names or uid in used_uids or uid in ctx.system.uids:
            continue
        break
    else:
        leased = await txn.all(
            "SELECT lease_expires, pinned FROM mappings WHERE vo = ? AND kind = 'pool'", (pol.vo,)
        )
        expired = sum(1 for r in leased if not r["pinned"] and r["lease_expires"] <= ctx.now)
        note = f" ({expired} with an expired lease awaiting reclaim)" if expired else ""
        raise MappingRefused(
            "pool-exhausted",
            f"VO {pol.vo!r}: all {len(pol.pool)} pool accounts are leased{note}; "
            f"cannot map {identity.user!r}",
        )
    gid = pol.gid_range[0] + idx
    if not await _gid_free(txn, ctx, gid):
        gid = await lowest_free_gid(txn, ctx, pol)
    return name, uid, gid


async def create_leased(txn: Txn, ctx: Context, pol: VOPolicy, identity: IdentityLike) -> int:
    """Create a dynamic account or lease the first free pool account (per ``pol.kind``):
    the mapping, its private group and its VO groups; return the mapping id.
    A pool with none free is refused ``pool-exhausted`` (by :func:`pick_pool`)."""
    pick = pick_dynamic if pol.kind == "dynamic" else pick_pool
    name, uid, gid = await pick(txn, ctx, pol, identity)
    home = f"{pol.home_base.rstrip('/')}/{name}"
    mid = await _insert_mapping(txn, ctx, pol, identity, pol.kind, name, uid, gid, home, pol.shell,
                                gecos_for(identity))
    await txn.execute(
        "INSERT INTO groups (gid, name, vo, kind, owner) VALUES (?,?,?,'private',?)", (gid, name, pol.vo, mid)
    )
    await sync_groups(txn, ctx, pol, mid, identity.groups)
    return mid


def resolve_static(pol: VOPolicy, identity: IdentityLike, ctx: Context) -> pwd.struct_passwd:
    """Look up the system account the static table names for ``identity`` (pwd, at mapping time).

    Refuses ``not-in-static-table`` when the user has no entry, and
    ``invalid-static-account`` for a missing account, uid 0, uid < 1000,
    the overflow uid, or a uid inside a dynamic/pool range (that would be
    an AMS-managed account, not a system one).
    """
    account = None
    if pol.map_roles and identity.role:
        account = pol.static.get(f"{identity.user}/{identity.role}")
    if account is None:
        account = pol.static.get(identity.user)
    if account is None:
        raise MappingRefused(
            "not-in-static-table", f"VO {pol.vo!r}: user {identity.user!r} is not in the static mapping table"
        )
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        raise MappingRefused(
            "invalid-static-account", f"VO {pol.vo!r}: static account {account!r} does not exist"
        ) from None
    if pw.pw_uid == 0 or pw.pw_uid < RANGE_MIN or pw.pw_uid == OVERFLOW_ID:
        raise MappingRefused(
            "invalid-static-account",
            f"VO {pol.vo!r}: static account {account!r} has uid {pw.pw_uid} (must be >= {RANGE_MIN}, not {OVERFLOW_ID})",
        )
    if ctx.in_managed_range(pw.pw_uid, "uid"):
        raise MappingRefused(
            "invalid-static-account",
            f"VO {pol.vo!r}: static account {account!r} (uid {pw.pw_uid}) lies in a dynamic/pool uid range",
        )
    return pw


async def check_static_free(txn: Txn, pol: VOPolicy, pw: pwd.struct_passwd) -> None:
    """Refuse ``invalid-static-account`` when the system account already serves another identity."""
    holder = await txn.one("SELECT vo, vo_user FROM mappings WHERE uid = ? OR name = ?", (pw.pw_uid, pw.pw_name))
    if holder is not None:
        raise MappingRefused(
            "invalid-static-account",
            f"VO {pol.vo!r}: static account {pw.pw_name!r} already serves {holder['vo_user']}@{holder['vo']}",
        )


async def create_static(txn: Txn, ctx: Context, pol: VOPolicy, identity: IdentityLike,
                        pw: pwd.struct_passwd) -> int:
    """Record the static mapping (uid/name UNIQUE: one account, one identity)."""
    await check_static_free(txn, pol, pw)
    return await _insert_mapping(txn, ctx, pol, identity, "static", pw.pw_name, pw.pw_uid, pw.pw_gid,
                                 pw.pw_dir, pw.pw_shell, pw.pw_gecos)


async def ensure_vo_group(txn: Txn, ctx: Context, pol: VOPolicy, vo_group: str) -> int:
    """The gid of the local group for ``vo_group``, creating it on first use."""
    gid = await txn.scalar("SELECT gid FROM groups WHERE vo = ? AND vo_group = ?", (pol.vo, vo_group))
    if gid is not None:
        return int(gid)
    name = await pick_name(txn, ctx, pol.prefix + vo_group, f"{pol.vo}\0group\0{vo_group}")
    gid = await lowest_free_gid(txn, ctx, pol)
    await txn.execute(
        "INSERT INTO groups (gid, name, vo, kind, vo_group) VALUES (?,?,?,'vo',?)", (gid, name, pol.vo, vo_group)
    )
    return gid


async def member_groups(txn: Txn, mapping_id: int) -> list[tuple[str, int, str]]:
    """The mapping's VO groups as ``(local name, gid, VO group)``, by gid."""
    rows = await txn.all(
        "SELECT g.name, g.gid, g.vo_group FROM members m JOIN groups g ON g.gid = m.gid"
        " WHERE m.mapping_id = ? AND g.kind = 'vo' ORDER BY g.gid",
        (mapping_id,),
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def sync_groups(txn: Txn, ctx: Context, pol: VOPolicy, mapping_id: int,
                      vo_groups: Iterable[str]) -> tuple[bool, tuple[tuple[str, int], ...]]:
    """Make the mapping's VO group memberships equal ``vo_groups``.

    Returns whether anything changed and the resulting supplementary
    groups ``(name, gid)`` sorted by gid.  Unchanged memberships cost one
    SELECT (this runs on every login).
    """
    want = unique_groups(vo_groups)
    have_rows = await member_groups(txn, mapping_id)
    have = {vo_group: gid for _, gid, vo_group in have_rows}
    wanted = set(want)
    if wanted == set(have):
        return False, tuple((name, gid) for name, gid, _ in have_rows)
    for g in want:
        if g not in have:
            gid = await ensure_vo_group(txn, ctx, pol, g)
            await txn.execute("INSERT INTO members (mapping_id, gid) VALUES (?, ?)", (mapping_id, gid))
    for g, gid in have.items():
        if g not in wanted:
            await txn.execute("DELETE FROM members WHERE mapping_id = ? AND gid = ?", (mapping_id, gid))
    rows = await member_groups(txn, mapping_id)
    return True, tuple((name, gid) for name, gid, _ in rows)
