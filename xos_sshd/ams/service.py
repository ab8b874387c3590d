"""The Account Mapping Service: VOIdentity -> LocalAccount, leases, admin actions.

:class:`AMS` is what the gateway, the control socket and the admin CLI use.
Every change is one ``BEGIN IMMEDIATE`` transaction of the store; after a
change that the NSS tables can see (new mapping, group change, release,
reclaim, ban) the tables are rewritten, off the event loop and serialised.
A renewal of a live mapping (the login hot path) is one short transaction
and never touches the tables.

Each committed change is reported once through the optional ``on_event``
callback (``on_event('mapping', action=..., account=..., ...)``, the
signature of :meth:`xos_sshd.audit.AuditLog.write`): ``created``,
``renewed``, ``released``, ``reclaimed``, ``banned``, ``unbanned``,
``pinned``, ``unpinned`` (docs/internals.md, "Audit events").  Events are
emitted after the commit, never for a rolled-back change, whoever caused it
(a login, PAM, an admin, the reclaimer).

The public coroutines that change state are shielded from cancellation: a
client that disconnects mid-login must not leave a committed mapping
without its NSS tables (nor a transaction half-way on the connection).

On a shared (PostgreSQL) store every gateway writes its own node's NSS tables:
besides rewriting them after its own changes, the AMS rewrites them when
another gateway's change is announced (LISTEN/NOTIFY, :mod:`.store_pg`) and
every ``nss_refresh_seconds`` (only when they differ), and keeps the set of
banned account names (:attr:`AMS.banned_names`) for the live-connection sweep.
The reclaimer publishes the uids busy on this node (``node_uids``) and keeps
every mapping whose uid is busy on another node or has a job that is starting
or running on any node (docs/internals.md, "AMS store").
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import sqlite3
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, TypeVar

from . import policy as P
from .model import (
    HistoryEvent,
    LocalAccount,
    MappingPreview,
    MappingRecord,
    MappingRefused,
    VOPolicy,
)
from .nss_tables import NSSLock, clean_passwd, remove_stale_temps, render_group, render_passwd, write_tables
from .ranges import GROUP_PATH, PASSWD_PATH, validate_policies
from ..tasks import start_daemon_call
from .store import PgSettings, StoreLike, StoreUnavailable, Txn, nss_snapshot, nss_snapshot_async, open_store

log = logging.getLogger(__name__)

T = TypeVar("T")
IsIdle = Callable[[int], bool]
#: ``on_event(event, **fields)``: :meth:`xos_sshd.audit.AuditLog.write` fits.
OnEvent = Callable[..., None]


class UnknownMapping(LookupError):
    """An admin action named an account that no mapping holds."""


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _static_groups(name: str, gid: int) -> tuple[tuple[str, int], ...]:
    """Supplementary groups of a system account, from the system's NSS."""
    try:
        gids = os.getgrouplist(name, gid)
    except OSError:
        return ()
    out = []
    for g in sorted(set(gids) - {gid}):
        try:
            out.append((grp.getgrgid(g).gr_name, g))
        except KeyError:
            out.append((str(g), g))
    return tuple(out)


def _account(row: sqlite3.Row, groups: tuple[tuple[str, int], ...], lease: str = "") -> LocalAccount:
    return LocalAccount(
        name=row["name"], uid=row["uid"], gid=row["gid"], groups=groups, home=row["home"],
        shell=row["shell"], gecos=row["gecos"], vo=row["vo"], vo_user=row["vo_user"],
        role=row["role"] or None, lease=lease,
    )


def lease_token(row: Any) -> str:
    """The token of one mapping (one lease): ``ID-CREATED_AT``.  A shared store's mapping ids
    come from an identity column and are never reused; the creation time is the backstop."""
    return f"{int(row['id'])}-{float(row['created_at'])!r}"


def rewrite_nss_sync(db_path: str, nss_dir: str, busy_timeout: float = 30.0, clean: bool = False) -> None:
    """Rewrite the NSS tables from the database (blocking; any process may call it).

    Takes the cross-process NSS lock first and reads the database after,
    so whoever writes last writes the newest committed state.
    """
    with NSSLock(nss_dir):
        if clean:
            removed = remove_stale_temps(nss_dir)
            if removed:
                log.info("removed stale NSS temp files: %s", ", ".join(removed))
        conn = sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None)
        try:
            passwd, group = nss_snapshot(conn)
        finally:
            conn.close()
        write_tables(nss_dir, passwd, group)


#: A mapping is not idle while its account has a job starting or running on any node (the
#: job table is shared in a cluster).  Appended to queries of ``mappings`` (same SQL on both
#: backends).
_NO_LIVE_JOB = (" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.uid = mappings.uid"
                " AND j.state IN ('starting', 'running'))")
#: ... nor while another node's gateway saw a process of its uid (shared store only).
_NOT_BUSY_ELSEWHERE = " AND NOT EXISTS (SELECT 1 FROM node_uids n WHERE n.uid = mappings.uid AND n.node <> ?)"


class AMS:
    """The account mapping service over one store (sqlite, or PostgreSQL for a cluster).

    Several instances (in one process or many, on one node or, with
    PostgreSQL, on many) may share a database and, on one node, an NSS
    directory; the store's write lock and the NSS flock keep them
    consistent.
    """

    def __init__(self, store: StoreLike, policies: Mapping[str, VOPolicy], nss_dir: str, *,
                 passwd_path: str, group_path: str, clock: Callable[[], float],
                 is_idle: IsIdle | None, on_event: OnEvent | None = None, node: str = "") -> None:
        self._store = store
        self.policies = dict(policies)
        self.nss_dir = nss_dir
        self.db_path = store.path
        self._paths = (passwd_path, group_path)
        self._clock = clock
        self._is_idle = is_idle
        self._reserved = P.pool_names(self.policies)
        self._nss_lock = asyncio.Lock()
        self._nss_want = 0
        self._nss_done = 0
        #: How many times this instance rewrote the NSS tables (for tests and metrics).
        self.nss_rewrites = 0
        #: Told of every committed mapping change (the audit log); may be set after open.
        self.on_event = on_event
        #: This gateway's node (the ``node_uids`` rows it publishes).
        self.node = node
        #: Names of the banned mappings as of the last NSS refresh (shared store only: the
        #: live-connection sweep closes their connections on every gateway; cheap to read).
        self.banned_names: frozenset[str] = frozenset()
        self._refresh = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Shared store: the archiving of ended leases' homes (archive_ended_homes), run after
        #: each refresh on a thread of its own: a home that hangs never stops the NSS refresh.
        self._homes_task: asyncio.Task[None] | None = None
        self._homes_again = False
        self._homes_since = 0.0
        self._homes_warned = False

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    async def open(cls, db_path: "str | os.PathLike[str] | PgSettings", policies: Mapping[str, VOPolicy],
                   nss_dir: str | os.PathLike[str], *, passwd_path: str = PASSWD_PATH,
                   group_path: str = GROUP_PATH, busy_timeout: float = 30.0,
                   clock: Callable[[], float] = time.time, is_idle: IsIdle | None = None,
                   on_event: OnEvent | None = None, node: str | None = None) -> "AMS":
        """Validate the policies' ranges, open/migrate the store, and bring the NSS tables up to date.

        ``db_path``: the sqlite file, or :class:`~xos_sshd.ams.store.PgSettings` (or a
        ``postgresql://`` URL) for the shared store; then the NSS tables also follow other
        gateways' changes until :meth:`close`.  ``node``: this node's name (default: the
        host name).  ``is_idle(uid)``, when given, lets a login that finds its pool
        exhausted reclaim expired, idle pool leases on the spot.
        ``on_event`` is told of each committed mapping change (module
        docstring).  ``clock`` (epoch seconds) is for tests.  Raises
        :class:`~xos_sshd.ams.model.RangeError` for bad ranges,
        :class:`~xos_sshd.ams.store.StoreOpenError` when the store cannot be reached.
        """
        validate_policies(policies, passwd_path, group_path)
        store = await open_store(db_path, busy_timeout=busy_timeout)
        ams = cls(store, policies, os.fspath(nss_dir), passwd_path=passwd_path, group_path=group_path,
                  clock=clock, is_idle=is_idle, on_event=on_event,
                  node=socket.gethostname() if node is None else node)
        try:
            # After a crash between a commit and its rewrite the tables lag: catch up now.
            await ams._sync_nss(clean=True)
        except BaseException:
            await store.close()
            raise
        if store.cluster:
            ams._start_watch()
        return ams

    async def close(self) -> None:
        """Stop following other gateways' changes; close the database connection(s)."""
        tasks, self._tasks = self._tasks, []
        if self._homes_task is not None:
            tasks.append(self._homes_task)
            self._homes_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:  # cancelled (or it had failed: logged already)
                pass
        await self._store.close()

    @property
    def store(self) -> StoreLike:
        """The underlying store (the job table of :mod:`xos_sshd.cr.jobs` lives in it too)."""
        return self._store

    def _account(self, row: sqlite3.Row, groups: tuple[tuple[str, int], ...]) -> LocalAccount:
        """The row's account; on a shared store a dynamic or pool account carries its lease
        token (the homes of other nodes' leases are told apart by it: session/home.py)."""
        lease = lease_token(row) if self._store.cluster and row["kind"] != "static" else ""
        return _account(row, groups, lease)

    async def __aenter__(self) -> "AMS":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- mapping -------------------------------------------------------------------

    def _policy(self, vo: str) -> VOPolicy:
        pol = self.policies.get(vo)
        if pol is None:
            raise MappingRefused("unknown-vo", f"VO {vo!r} has no account mapping policy on this node")
        return pol

    def _ctx(self) -> P.Context:
        return P.Context(self.policies, self._clock(), *self._paths, reserved_names=self._reserved)

    async def map_identity(self, identity: P.IdentityLike) -> LocalAccount:
        """The identity's account: renew its lease, or create/lease one on first login.

        One transaction.  Raises :class:`MappingRefused` (``banned``,
        ``pool-exhausted``, ``range-exhausted``, ``not-in-static-table``,
        ``invalid-static-account``, ``unknown-vo``).
        """
        return await _shielded(self._map_identity(identity))

    async def _map_identity(self, identity: P.IdentityLike) -> LocalAccount:
        pol = self._policy(identity.vo)
        try:
            return await self._map_once(pol, identity)
        except MappingRefused as exc:
            if exc.reason != "pool-exhausted" or self._is_idle is None:
                raise
            if not await self._reclaim(self._is_idle, vo=pol.vo, kind="pool"):
                raise
            return await self._map_once(pol, identity)

    async def _map_once(self, pol: VOPolicy, identity: P.IdentityLike) -> LocalAccount:
        ctx = self._ctx()
        static_pw, static_err = _static_account(pol, identity, ctx)
        key = (identity.vo, identity.user, P.role_key(pol, identity))
        changed = False
        refuse: MappingRefused | None = None
        account: LocalAccount | None = None
        events: list[tuple[str, sqlite3.Row, str]] = []
        async with self._store.write() as txn:
            row = await txn.one("SELECT * FROM mappings WHERE vo = ? AND vo_user = ? AND role = ?", key)
            if row is not None and row["banned"]:
                raise MappingRefused("banned", f"account {row['name']!r} of {identity.user}@{identity.vo} is banned")
            if row is not None and row["kind"] == "static" and (
                static_pw is None or (static_pw.pw_name, static_pw.pw_uid) != (row["name"], row["uid"])
            ):
                # The static table no longer says this: the old mapping goes
                # (static accounts are not in the NSS tables: nothing to rewrite).
                await self._delete(txn, ctx, row, "static table changed")
                events.append(("released", row, "static table changed"))
                row = None
            if row is not None:
                if row["kind"] == "static":
                    groups: tuple[tuple[str, int], ...] = ()
                else:
                    grp_changed, groups = await P.sync_groups(txn, ctx, pol, row["id"], identity.groups)
                    changed = changed or grp_changed
                await txn.execute(
                    "UPDATE mappings SET last_seen = ?, lease_expires = ? WHERE id = ?",
                    (ctx.now, ctx.now + pol.lease_seconds, row["id"]),
                )
                account = self._account(row, groups)
                events.append(("renewed", row, ""))
            elif static_err is not None:
                refuse = static_err
            else:
                if pol.kind in ("dynamic", "pool"):
                    mid = await P.create_leased(txn, ctx, pol, identity)
                else:
                    assert static_pw is not None
                    mid = await P.create_static(txn, ctx, pol, identity, static_pw)
                new = await txn.one("SELECT * FROM mappings WHERE id = ?", (mid,))
                assert new is not None
                events.append(("created", new, ""))
                groups = tuple((n, g) for n, g, _ in await P.member_groups(txn, mid))
                account = self._account(new, groups)
                changed = changed or pol.kind != "static"
        if changed or self._nss_want > self._nss_done:
            await self._sync_nss()
        for action, ev_row, detail in events:  # committed: now they happened
            self._emit(action, ev_row, detail=detail,
                       lease_expires=None if action == "released" else ctx.now + pol.lease_seconds)
        if refuse is not None:
            raise refuse
        assert account is not None
        if pol.kind == "static":
            account = _replace_groups(account, _static_groups(account.name, account.gid))
        return account

    async def find_mapping(self, identity: P.IdentityLike) -> LocalAccount | None:
        """The identity's current account, or ``None``; never creates, never renews.

        Raises ``MappingRefused('banned')`` for a banned mapping.
        """
        pol = self.policies.get(identity.vo)
        if pol is None:
            return None
        key = (identity.vo, identity.user, P.role_key(pol, identity))
        async with self._store.read() as txn:
            row = await txn.one("SELECT * FROM mappings WHERE vo = ? AND vo_user = ? AND role = ?", key)
            if row is None:
                return None
            if row["banned"]:
                raise MappingRefused("banned", f"account {row['name']!r} of {identity.user}@{identity.vo} is banned")
            groups = tuple((n, g) for n, g, _ in await P.member_groups(txn, row["id"]))
        if row["kind"] == "static":
            groups = _static_groups(row["name"], row["gid"])
        return self._account(row, groups)

    async def explain(self, identity: P.IdentityLike) -> MappingPreview:
        """What :meth:`map_identity` would do for ``identity`` now, without writing anything.

        The same policy code decides (name, uid and gid pickers, the static table, bans),
        inside a read transaction, so the preview is exact as of now; a later login may of
        course find other accounts taken by then.
        """
        pol = self.policies.get(identity.vo)
        vo_groups = tuple(P.unique_groups(identity.groups))
        if pol is None:
            return MappingPreview(identity.vo, identity.user, identity.role, None, "refused", None, "unknown-vo",
                                  f"VO {identity.vo!r} has no account mapping policy on this node",
                                  vo_groups=vo_groups)
        rk = P.role_key(pol, identity)
        ctx = self._ctx()
        static_pw, static_err = _static_account(pol, identity, ctx)

        def preview(outcome: str, account: LocalAccount | None, exc: MappingRefused | None = None,
                    message: str = "", record: MappingRecord | None = None) -> MappingPreview:
            return MappingPreview(identity.vo, identity.user, rk or None, pol.kind, outcome,  # type: ignore[arg-type]
                                  account, exc.reason if exc else None, str(exc) if exc else message,
                                  record, vo_groups)

        existing: str | None = None
        async with self._store.read() as txn:
            row = await txn.one("SELECT * FROM mappings WHERE vo = ? AND vo_user = ? AND role = ?",
                                (identity.vo, identity.user, rk))
            if row is not None and row["kind"] == "static" and not row["banned"] and (
                static_pw is None or (static_pw.pw_name, static_pw.pw_uid) != (row["name"], row["uid"])
            ):
                row = None  # map_identity would drop it: the static table no longer says this
            if row is not None:
                existing = row["name"]
            elif static_err is not None:
                return preview("refused", None, static_err)
            else:
                try:
                    if pol.kind == "dynamic":
                        name, uid, gid = await P.pick_dynamic(txn, ctx, pol, identity)
                        home, shell, gecos = f"{pol.home_base.rstrip('/')}/{name}", pol.shell, P.gecos_for(identity)
                    elif pol.kind == "pool":
                        name, uid, gid = await P.pick_pool(txn, ctx, pol, identity)
                        home, shell, gecos = f"{pol.home_base.rstrip('/')}/{name}", pol.shell, P.gecos_for(identity)
                    else:
                        assert static_pw is not None
                        await P.check_static_free(txn, pol, static_pw)
                        name, uid, gid = static_pw.pw_name, static_pw.pw_uid, static_pw.pw_gid
                        home, shell, gecos = static_pw.pw_dir, static_pw.pw_shell, static_pw.pw_gecos
                except MappingRefused as exc:
                    return preview("refused", None, exc)
                account = LocalAccount(name=name, uid=uid, gid=gid, groups=(), home=home, shell=shell,
                                       gecos=gecos, vo=identity.vo, vo_user=identity.user, role=rk or None)
                verb = "lease" if pol.kind == "pool" else "create" if pol.kind == "dynamic" else "map to"
                return preview("new", account, message=f"a first login would {verb} account {name!r} (uid {uid})")
        record = await self.get_mapping(existing)
        if record is None:  # released between the two reads: ask again
            return await self.explain(identity)
        if record.banned:
            return preview("refused", record.account, MappingRefused(
                "banned", f"account {existing!r} of {identity.user}@{identity.vo} is banned"), record=record)
        return preview("existing", record.account, message=f"holds account {existing!r} (uid {record.account.uid})",
                       record=record)

    async def renew(self, name: str) -> LocalAccount | None:
        """Renew the lease of account ``name`` (a session opened by PAM); ``None`` if unmapped.

        Raises ``MappingRefused('banned')`` for a banned mapping.  One short transaction;
        the NSS tables are not touched.
        """
        return await _shielded(self._renew(name))

    async def _renew(self, name: str) -> LocalAccount | None:
        now = self._clock()
        async with self._store.write() as txn:
            row = await txn.one("SELECT * FROM mappings WHERE name = ?", (name,))
            if row is None:
                return None
            if row["banned"]:
                raise MappingRefused("banned", f"account {name!r} of {row['vo_user']}@{row['vo']} is banned")
            pol = self.policies.get(row["vo"])
            if pol is not None:
                await txn.execute("UPDATE mappings SET last_seen = ?, lease_expires = ? WHERE id = ?",
                                  (now, now + pol.lease_seconds, row["id"]))
            groups = tuple((n, g) for n, g, _ in await P.member_groups(txn, row["id"]))
        if pol is not None:
            self._emit("renewed", row, lease_expires=now + pol.lease_seconds)
        if row["kind"] == "static":
            groups = _static_groups(row["name"], row["gid"])
        return self._account(row, groups)

    # -- leases --------------------------------------------------------------------

    async def reclaim_expired(self, is_idle: IsIdle) -> list[str]:
        """Free every mapping whose lease expired and whose account ``is_idle(uid)``.

        Pool accounts become free for the next login, dynamic accounts are
        deleted (their uid may then be reused), static mappings are
        forgotten.  Banned and pinned mappings are kept, and so are those
        whose account has a job starting or running (on any node).  A
        mapping renewed between the idle check and the delete is kept.
        ``is_idle`` runs on the event loop, outside any transaction.  On a
        shared store this node's busy uids are published first (and other
        nodes' published busy uids are kept).  Returns the names freed.
        """
        return await _shielded(self._reclaim(is_idle, publish=self._store.cluster))

    async def _publish_busy(self, is_idle: IsIdle) -> None:
        """Record which mapped uids have processes on this node (``node_uids``), for the
        reclaimers of the other nodes: a process on node B keeps its mapping on node A too."""
        async with self._store.read() as txn:
            uids = [int(r[0]) for r in await txn.all("SELECT uid FROM mappings")]
        busy = sorted({uid for uid in uids if not is_idle(uid)})
        now = self._clock()
        async with self._store.write() as txn:
            await txn.execute("DELETE FROM node_uids WHERE node = ?", (self.node,))
            if busy:
                await txn.executemany("INSERT INTO node_uids (node, uid, seen) VALUES (?, ?, ?)",
                                      [(self.node, uid, now) for uid in busy])

    async def busy_elsewhere(self, uid: int) -> dict[str, list[str]]:
        """Shared store: what keeps *uid* busy on the other nodes, by node: processes their
        gateways published (``node_uids``, as of their last reclaim pass) and jobs starting or
        running there (the shared job table).  ``{}`` when nothing does, and always on sqlite
        (one node: its own processes are the caller's to check)."""
        if not self._store.cluster:
            return {}
        now = self._clock()
        async with self._store.read() as txn:
            procs = await txn.all("SELECT node, seen FROM node_uids WHERE uid = ? AND node <> ?",
                                  (uid, self.node))
            jobs = await txn.all("SELECT node, id, state FROM jobs WHERE uid = ? AND node <> ?"
                                 " AND state IN ('starting', 'running') ORDER BY id", (uid, self.node))
        out: dict[str, list[str]] = {}
        for r in procs:
            ago = max(0, int(now - float(r["seen"])))
            out.setdefault(r["node"], []).append(f"processes, seen {ago} s ago")
        for r in jobs:
            out.setdefault(r["node"], []).append(f"job {r['id']} {r['state']}")
        return dict(sorted(out.items()))

    async def _reclaim(self, is_idle: IsIdle, vo: str | None = None, kind: str | None = None,
                       publish: bool = False) -> list[str]:
        if publish:
            await self._publish_busy(is_idle)
        now = self._clock()
        sql = "SELECT * FROM mappings WHERE lease_expires <= ? AND banned = 0 AND pinned = 0"
        args: list[Any] = [now]
        if vo is not None:
            sql, args = sql + " AND vo = ?", args + [vo]
        if kind is not None:
            sql, args = sql + " AND kind = ?", args + [kind]
        # The same conditions again in the write transaction below (they may change meanwhile).
        keep_sql, keep_args = _NO_LIVE_JOB, []  # type: str, list[Any]
        if self._store.cluster:
            keep_sql, keep_args = keep_sql + _NOT_BUSY_ELSEWHERE, [self.node]
        sql, args = sql + keep_sql, args + keep_args
        async with self._store.read() as txn:
            candidates = await txn.all(sql + " ORDER BY lease_expires", args)
        idle = [r for r in candidates if is_idle(r["uid"])]
        if not idle:
            return []
        freed: list[str] = []
        rows: list[sqlite3.Row] = []
        ctx = self._ctx()
        async with self._store.write() as txn:
            for cand in idle:
                row = await txn.one(
                    "SELECT * FROM mappings WHERE id = ? AND uid = ? AND lease_expires <= ?"
                    " AND banned = 0 AND pinned = 0" + keep_sql,
                    (cand["id"], cand["uid"], now, *keep_args),
                )
                if row is not None:
                    await self._delete(txn, ctx, row, "lease expired, account idle")
                    freed.append(row["name"])
                    rows.append(row)
        if freed:
            await self._sync_nss()
        for row in rows:
            self._emit("reclaimed", row, detail="lease expired, account idle")
        return freed

    @staticmethod
    async def _delete(txn: Txn, ctx: P.Context, row: sqlite3.Row, detail: str) -> None:
        await txn.execute("DELETE FROM mappings WHERE id = ?", (row["id"],))  # cascades groups/members
        await P.record_history(txn, ctx.now, "released", row["uid"], row["name"], row["vo"], row["vo_user"],
                               row["role"], detail)

    # -- admin ---------------------------------------------------------------------

    async def release(self, name: str) -> None:
        """Free the mapping of account ``name`` now (the caller checks it is idle)."""
        await _shielded(self._admin(name, "release"))

    async def ban(self, name: str) -> None:
        """Ban account ``name``: logins refuse ``banned``, NSS drops it; the mapping is kept."""
        await _shielded(self._admin(name, "ban"))

    async def unban(self, name: str) -> None:
        """Lift a ban."""
        await _shielded(self._admin(name, "unban"))

    async def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (or unpin) a mapping: a pinned mapping is never reclaimed."""
        await _shielded(self._admin(name, "pin" if pinned else "unpin"))

    async def _admin(self, name: str, action: str) -> None:
        ctx = self._ctx()
        nss = False
        happened = ""
        async with self._store.write() as txn:
            row = await txn.one("SELECT * FROM mappings WHERE name = ?", (name,))
            if row is None:
                raise UnknownMapping(f"no mapping for account {name!r}")
            hist = (row["uid"], row["name"], row["vo"], row["vo_user"], row["role"])
            if action == "release":
                await self._delete(txn, ctx, row, "released by admin")
                nss = row["kind"] != "static"
                happened = "released"
            elif action in ("ban", "unban"):
                flag = 1 if action == "ban" else 0
                if row["banned"] != flag:
                    await txn.execute("UPDATE mappings SET banned = ? WHERE id = ?", (flag, row["id"]))
                    await P.record_history(txn, ctx.now, f"{action}ned", *hist)
                    # Shared store: the refresh also renews banned_names (static accounts too).
                    nss = row["kind"] != "static" or self._store.cluster
                    happened = f"{action}ned"
            else:
                flag = 1 if action == "pin" else 0
                if row["pinned"] != flag:
                    await txn.execute("UPDATE mappings SET pinned = ? WHERE id = ?", (flag, row["id"]))
                    await P.record_history(txn, ctx.now, f"{action}ned", *hist)
                    happened = f"{action}ned"
        if nss:
            await self._sync_nss()
        if happened:
            self._emit(happened, row, detail="released by admin" if action == "release" else "")

    def _emit(self, action: str, row: sqlite3.Row, *, detail: str = "",
              lease_expires: float | None = None) -> None:
        """Report one committed change of *row*'s mapping to ``on_event`` (never raises)."""
        if self.on_event is None:
            return
        fields: dict[str, Any] = dict(
            action=action, outcome="ok", account=row["name"], uid=row["uid"], vo=row["vo"],
            user=row["vo_user"], role=row["role"] or None, kind=row["kind"])
        if lease_expires is not None:
            fields["lease_expires"] = _dt(lease_expires).isoformat(timespec="seconds")
        if detail:
            fields["detail"] = detail
        try:
            self.on_event("mapping", **fields)
        except Exception:  # the change is committed; reporting it must not undo a login
            log.exception("could not report mapping event %s of %s", action, row["name"])

    async def count_mappings(self) -> dict[tuple[str, str], int]:
        """How many mappings each (VO, policy kind) holds now, banned ones included (metrics)."""
        async with self._store.read() as txn:
            rows = await txn.all("SELECT vo, kind, COUNT(*) FROM mappings GROUP BY vo, kind", ())
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def get_mapping(self, name: str) -> MappingRecord | None:
        """The mapping of account ``name``, or ``None``."""
        recs = await self._records("WHERE m.name = ?", (name,))
        return recs[0] if recs else None

    async def mapping_for_uid(self, uid: int) -> MappingRecord | None:
        """The mapping that owns ``uid`` (e.g. a control-socket peer), or ``None``."""
        recs = await self._records("WHERE m.uid = ?", (uid,))
        return recs[0] if recs else None

    async def list_mappings(self) -> list[MappingRecord]:
        """Every mapping (banned ones included), by uid."""
        return await self._records("", ())

    async def _records(self, where: str, args: tuple[Any, ...]) -> list[MappingRecord]:
        async with self._store.read() as txn:
            rows = await txn.all(f"SELECT * FROM mappings m {where} ORDER BY m.uid", args)
            mem = await txn.all(
                "SELECT mb.mapping_id, g.name, g.gid FROM members mb JOIN groups g ON g.gid = mb.gid"
                " ORDER BY g.gid"
            ) if rows else []
        by_map: dict[int, list[tuple[str, int]]] = {}
        for r in mem:
            by_map.setdefault(r[0], []).append((r[1], r[2]))
        return [
            MappingRecord(
                account=self._account(r, tuple(by_map.get(r["id"], ()))), kind=r["kind"],
                created_at=_dt(r["created_at"]), last_seen=_dt(r["last_seen"]),
                lease_expires=_dt(r["lease_expires"]), banned=bool(r["banned"]), pinned=bool(r["pinned"]),
            )
            for r in rows
        ]

    async def history(self, name: str | None = None, limit: int | None = None, *,
                      uid: int | None = None) -> list[HistoryEvent]:
        """Events of ``mapping_history`` (all, of account ``name``, or of ``uid``), oldest first."""
        sql = "SELECT * FROM mapping_history"
        args: list[Any] = []
        if name is not None:
            sql, args = sql + " WHERE name = ?", [name]
        if uid is not None:
            sql, args = sql + (" AND" if args else " WHERE") + " uid = ?", args + [int(uid)]
        sql += " ORDER BY id"
        if limit is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) AS h ORDER BY id"
            args.append(int(limit))
        async with self._store.read() as txn:
            rows = await txn.all(sql, args)
        return [
            HistoryEvent(at=_dt(r["at"]), event=r["event"], name=r["name"], uid=r["uid"], vo=r["vo"],
                         vo_user=r["vo_user"], role=r["role"] or None, detail=r["detail"])
            for r in rows
        ]

    # -- NSS tables ----------------------------------------------------------------

    async def rewrite_nss(self) -> None:
        """Rewrite the NSS tables from the database now."""
        await _shielded(self._sync_nss())

    async def _sync_nss(self, clean: bool = False, remote: bool = False) -> None:
        """Rewrite the tables unless a rewrite that started after our change already did.

        Concurrent callers in this instance coalesce: each bumps ``want``;
        whoever gets the lock writes the state as of then and marks every
        ``want`` up to then done.  ``remote``: another gateway's change (or
        the periodic refresh) of a shared store: the tables are replaced
        only if they differ.
        """
        if remote:  # not a change of ours: the lag check of map_identity must not see it
            async with self._nss_lock:
                if await self._rewrite_from_store(clean, only_if_changed=True):
                    self.nss_rewrites += 1
            return
        self._nss_want += 1
        target = self._nss_want
        async with self._nss_lock:
            if self._nss_done >= target:
                return
            target = self._nss_want
            if self._store.cluster:
                wrote = await self._rewrite_from_store(clean, only_if_changed=False)
            else:
                await asyncio.to_thread(rewrite_nss_sync, self.db_path, self.nss_dir, self._store.busy_timeout,
                                        clean)
                wrote = True
            if wrote:
                self.nss_rewrites += 1
            self._nss_done = max(self._nss_done, target)

    async def _rewrite_from_store(self, clean: bool, only_if_changed: bool) -> bool:
        """The tables from a store read through the pool (shared store): the node's NSS lock
        first, the snapshot after, so the last writer writes the newest committed state."""
        lock = NSSLock(self.nss_dir)
        await _acquire(lock)
        try:
            if clean:
                removed = await asyncio.to_thread(remove_stale_temps, self.nss_dir)
                if removed:
                    log.info("removed stale NSS temp files: %s", ", ".join(removed))
            passwd, group, banned = await nss_snapshot_async(self._store)
            self.banned_names = banned
            return await asyncio.to_thread(_write_tables_if_changed, self.nss_dir, passwd, group,
                                           only_if_changed)
        finally:
            lock.release()

    # -- cluster: following the other gateways -----------------------------------------

    def _start_watch(self) -> None:
        interval = getattr(getattr(self._store, "settings", None), "nss_refresh_seconds", 60.0)
        self._tasks = [asyncio.create_task(self._store.watch(self._refresh.set, interval)),  # type: ignore[attr-defined]
                       asyncio.create_task(self._refresh_loop())]

    async def _refresh_loop(self) -> None:
        """Rewrite this node's tables when another gateway changed the mapping (coalesced)."""
        while True:
            await self._refresh.wait()
            await asyncio.sleep(0.02)  # a burst of notifications: one rewrite
            self._refresh.clear()
            self._archive_ended_homes_soon()
            try:
                await self._sync_nss(remote=True)
            except StoreUnavailable as exc:  # the watch calls again once the store is back
                log.debug("NSS refresh postponed: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("NSS refresh from the shared store failed; will retry")

    async def archive_ended_homes(self) -> list[str]:
        """Shared store: archive this node's homes of leases that ended on any node.

        Run at every refresh from the shared store (a change announced by another gateway, the
        periodic refresh, a reconnect): a mapping another node released or reclaimed leaves its
        homes here.  The owner markers of the configured home bases are read first, the live
        leases after (session/home.py says why that order is safe).  Returns the homes
        archived.  Logins never depend on this having run: ``ensure_home`` checks the marker.
        """
        from ..session import home as homes  # the session package's: imported when needed

        bases = {p.home_base.rstrip("/") or "/" for p in self.policies.values() if p.kind != "static"}
        owners = await _daemon_thread(homes.list_owners, bases)
        if not owners:
            return []
        async with self._store.read() as txn:
            live = {lease_token(r) for r in await txn.all(
                "SELECT id, created_at FROM mappings WHERE kind <> 'static'")}
        gone = [o for o in owners if o.lease not in live]
        if not gone:
            return []
        done = await _daemon_thread(homes.archive_released, gone)
        return [owner.home for owner, target in done if target is not None]  # logged there

    def _archive_ended_homes_soon(self) -> None:
        """Run :meth:`archive_ended_homes` in the background (once more after the current run
        when one is under way; a run stuck on a hung home is reported, and later ones wait)."""
        task = self._homes_task
        if task is not None and not task.done():
            self._homes_again = True
            if not self._homes_warned and time.monotonic() - self._homes_since > 60:
                self._homes_warned = True
                log.warning("archiving the homes of ended leases has not finished for %.0f s "
                            "(a home that does not respond?)", time.monotonic() - self._homes_since)
            return
        self._homes_task = asyncio.create_task(self._archive_homes_loop())

    async def _archive_homes_loop(self) -> None:
        while True:
            self._homes_again, self._homes_since, self._homes_warned = False, time.monotonic(), False
            try:
                await self.archive_ended_homes()
            except StoreUnavailable as exc:  # the next refresh (the watch reconnecting) retries
                log.debug("archiving the homes of ended leases postponed: %s", exc)
            except Exception:
                log.exception("archiving the homes of ended leases failed; will retry")
            if not self._homes_again:
                return


def _write_tables_if_changed(nss_dir: str, passwd: list[Any], group: list[Any], only_if_changed: bool) -> bool:
    """:func:`write_tables`, skipped (False) when *only_if_changed* and both text tables
    already hold exactly this (blocking; with the NSS lock held)."""
    if only_if_changed:
        try:
            with open(os.path.join(nss_dir, "passwd"), "rb") as fh:
                same = fh.read() == render_passwd(clean_passwd(passwd))
            if same:
                with open(os.path.join(nss_dir, "group"), "rb") as fh:
                    same = fh.read() == render_group(group)
        except FileNotFoundError:
            same = False
        if same:
            return False
    write_tables(nss_dir, passwd, group)
    return True


async def _daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a daemon thread of its own (homes may hang: such a call must neither
    hold an executor thread nor keep the gateway from exiting)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # the caller went away (cancelled)
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    start_daemon_call(loop, fn, args, "xos-homes", settle)
    return await future


async def _acquire(lock: NSSLock) -> None:
    """Take the NSS flock without blocking a thread: the holder may be another AMS of this
    process that needs the executor's threads to finish (a thread per waiter could starve it),
    and the wait stays cancellable."""
    delay = 0.002
    while not lock.try_acquire():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _replace_groups(acc: LocalAccount, groups: tuple[tuple[str, int], ...]) -> LocalAccount:
    from dataclasses import replace

    return replace(acc, groups=groups)


async def _shielded(coro: Awaitable[T]) -> T:
    """Run ``coro`` to completion even if the caller is cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # The caller goes away; the work finishes (and logs its own failure).
        task.add_done_callback(_log_failure)
        raise


def _log_failure(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("AMS operation failed after its caller was cancelled", exc_info=task.exception())


def _static_account(pol: VOPolicy, identity: P.IdentityLike,
                    ctx: P.Context) -> tuple[Any, MappingRefused | None]:
    """For a static VO: the system account the table names, or why it cannot be used
    (resolved before the transaction, since it reads the system's passwd database)."""
    if pol.kind != "static":
        return None, None
    try:
        return P.resolve_static(pol, identity, ctx), None
    except MappingRefused as exc:
        return None, exc
