"""The AMS store: the interface every backend offers, and the embedded sqlite backend.

Two backends implement the same small interface (:class:`StoreLike`): ``read()`` and
``write()`` transactions yielding a :class:`Txn`-like object (``execute``, ``executemany``,
``one``, ``all``, ``scalar``; SQL with ``?`` placeholders; rows indexable by name and
position), ``close()``, ``describe()``.  :func:`open_store` picks the backend:

* a path: :class:`Store`, sqlite in WAL mode through aiosqlite (this module; the default,
  ``STATE/ams.sqlite``);
* :class:`PgSettings` (or a ``postgresql://`` URL): :class:`~xos_sshd.ams.store_pg.PgStore`,
  PostgreSQL through asyncpg, for a cluster of gateways sharing one mapping.

SQL that callers write must run on both: standard SQL, ``?`` placeholders, ids of new rows
through ``INSERT ... RETURNING`` (sqlite >= 3.35), a subquery in FROM with an alias.

Why the sqlite store looks like this:

* **WAL + ``synchronous=FULL``**: readers never block the writer, and a
  transaction that returned from ``COMMIT`` survives a ``kill -9`` (and a
  power cut).  sqlite's journal makes an interrupted transaction vanish
  whole, so a crash never leaves half a mapping.
* **``BEGIN IMMEDIATE`` for every change**: the write lock is taken at the
  start, so two gateways (or two processes, or two AMS instances in one
  process) that map the same identity at once are serialised; the second
  sees the first's committed row.  A deferred transaction would read first
  and fail to upgrade (``SQLITE_BUSY_SNAPSHOT``) instead.
* **busy timeout**: waiting writers sleep in sqlite's busy handler rather
  than failing.
* **Constraints in the schema** (``UNIQUE`` uid/name/key, foreign keys,
  ``CHECK``s, append-only history triggers) so that no code path, present
  or future, can make one account serve two identities.

The schema is versioned with ``PRAGMA user_version`` and upgraded by the
ordered :data:`MIGRATIONS` inside one ``BEGIN IMMEDIATE`` transaction, so
concurrent openers migrate exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator, Iterable, Protocol, Sequence
from urllib.parse import parse_qs, urlsplit

import aiosqlite

from .model import MappingRefused

#: Each migration is a list of single SQL statements (no ``executescript``:
#: it would COMMIT behind our back).  Migration ``i`` brings the schema
#: from version ``i`` to ``i + 1``.  Append only; never edit a released one.
MIGRATIONS: list[list[str]] = [
    [
        # One row per live mapping.  role is '' (not NULL) when roles are not
        # mapped, so that the UNIQUE key really is unique (NULLs are distinct).
        """CREATE TABLE mappings (
            id            INTEGER PRIMARY KEY,
            vo            TEXT    NOT NULL,
            vo_user       TEXT    NOT NULL,
            role          TEXT    NOT NULL DEFAULT '',
            kind          TEXT    NOT NULL CHECK (kind IN ('dynamic', 'pool', 'static')),
            name          TEXT    NOT NULL UNIQUE,
            uid           INTEGER NOT NULL UNIQUE CHECK (uid >= 1000 AND uid <> 65534),
            gid           INTEGER NOT NULL CHECK (kind = 'static' OR (gid >= 1000 AND gid <> 65534)),
            home          TEXT    NOT NULL,
            shell         TEXT    NOT NULL,
            gecos         TEXT    NOT NULL,
            created_at    REAL    NOT NULL,
            last_seen     REAL    NOT NULL,
            lease_expires REAL    NOT NULL,
            banned        INTEGER NOT NULL DEFAULT 0 CHECK (banned IN (0, 1)),
            pinned        INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
            UNIQUE (vo, vo_user, role),
            UNIQUE (id, gid)
        )""",
        # Local groups of dynamic/pool accounts: a private group per account
        # (owner = the mapping, gid = the mapping's gid, deleted with it) and
        # one group per VO group (shared, kept so its gid is never reused).
        """CREATE TABLE groups (
            gid      INTEGER PRIMARY KEY CHECK (gid >= 1000 AND gid <> 65534),
            name     TEXT    NOT NULL UNIQUE,
            vo       TEXT    NOT NULL,
            kind     TEXT    NOT NULL CHECK (kind IN ('private', 'vo')),
            owner    INTEGER UNIQUE,
            vo_group TEXT,
            CHECK ((kind = 'private') = (owner IS NOT NULL)),
            CHECK ((kind = 'vo') = (vo_group IS NOT NULL)),
            UNIQUE (vo, vo_group),
            FOREIGN KEY (owner, gid) REFERENCES mappings (id, gid) ON DELETE CASCADE
        )""",
        """CREATE TABLE members (
            mapping_id INTEGER NOT NULL REFERENCES mappings (id) ON DELETE CASCADE,
            gid        INTEGER NOT NULL REFERENCES groups (gid) ON DELETE CASCADE,
            PRIMARY KEY (mapping_id, gid)
        ) WITHOUT ROWID""",
        "CREATE INDEX members_by_gid ON members (gid)",
        "CREATE INDEX mappings_by_lease ON mappings (lease_expires)",
        """CREATE TABLE mapping_history (
            id      INTEGER PRIMARY KEY,
            at      REAL    NOT NULL,
            event   TEXT    NOT NULL CHECK (event IN
                        ('created', 'released', 'banned', 'unbanned', 'pinned', 'unpinned')),
            uid     INTEGER NOT NULL,
            name    TEXT    NOT NULL,
            vo      TEXT    NOT NULL,
            vo_user TEXT    NOT NULL,
            role    TEXT    NOT NULL DEFAULT '',
            detail  TEXT    NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX history_by_name ON mapping_history (name)",
        """CREATE TRIGGER mapping_history_append_only_u BEFORE UPDATE ON mapping_history
           BEGIN SELECT RAISE(ABORT, 'mapping_history is append-only'); END""",
        """CREATE TRIGGER mapping_history_append_only_d BEFORE DELETE ON mapping_history
           BEGIN SELECT RAISE(ABORT, 'mapping_history is append-only'); END""",
    ],
    [
        # 2: checkpoint/restart jobs (xos_sshd/cr/jobs.py).  One row per job, kept after it
        # ends (the lease reclaimer must see an account's jobs and images).  pid/starttime
        # name the job's init on this node (host pid + start time: a recycled pid never
        # passes for the job); root_pid is the job's root inside its PID namespace.
        # Lineage: restored_from is the image this job was restored from, parent_job the job
        # that image was taken of, last_image the latest checkpoint of this job.
        """CREATE TABLE jobs (
            id            TEXT    PRIMARY KEY,
            vo            TEXT    NOT NULL,
            vo_user       TEXT    NOT NULL,
            role          TEXT    NOT NULL DEFAULT '',
            account       TEXT    NOT NULL,
            uid           INTEGER NOT NULL CHECK (uid > 0),
            node          TEXT    NOT NULL DEFAULT '',
            state         TEXT    NOT NULL CHECK (state IN ('starting', 'running', 'checkpointed',
                                  'exited', 'killed', 'lost', 'failed')),
            command       TEXT    NOT NULL,
            created       REAL    NOT NULL,
            updated       REAL    NOT NULL,
            ended         REAL,
            pid           INTEGER,
            starttime     INTEGER,
            root_pid      INTEGER,
            job_dir       TEXT    NOT NULL,
            log_dir       TEXT    NOT NULL,
            exit_code     INTEGER,
            restored_from TEXT,
            parent_job    TEXT    REFERENCES jobs (id),
            last_image    TEXT,
            detail        TEXT    NOT NULL DEFAULT '',
            CHECK ((state IN ('running')) <= (pid IS NOT NULL AND starttime IS NOT NULL))
        )""",
        "CREATE INDEX jobs_by_uid ON jobs (uid, state)",
        "CREATE INDEX jobs_by_owner ON jobs (vo, vo_user, role)",
        "CREATE INDEX jobs_by_state ON jobs (state)",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer xos-sshd; refuse rather than corrupt it."""


class StoreOpenError(OSError):
    """The store cannot be opened at start (server unreachable, authentication refused, no
    such database).  ``str()`` is one line naming the store (host, database) and the reason;
    the gateway prints it and exits."""


class StoreUnavailable(MappingRefused):
    """The store stopped answering while the gateway runs (a database outage): the operation
    is refused with reason ``store-unavailable`` and the gateway keeps serving.  A
    :class:`MappingRefused`, so every login door (SSH, pam_xos, the control socket) refuses
    it as it refuses any mapping, with this message."""

    def __init__(self, message: str) -> None:
        super().__init__("store-unavailable", message)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (str(self),))


class OutageLog:
    """What a periodic task of the gateway says about a store outage: one warning when its
    passes start failing with :class:`StoreUnavailable`, one when a pass works again, and
    nothing in between (no traceback per pass).  ``failed(exc)`` / ``ok()`` after each pass."""

    def __init__(self, logger: logging.Logger, task: str) -> None:
        self._log = logger
        self.task = task
        self._since: float | None = None
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: StoreUnavailable) -> None:
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s paused: %s", self.task, exc)

    def ok(self) -> None:
        if self._since is not None:
            self._log.warning("%s resumed after %.1f s (%d passes skipped while the AMS store "
                              "was unavailable)", self.task, time.monotonic() - self._since,
                              self._failures)
            self._since, self._failures = None, 0


@dataclass(frozen=True)
class PgSettings:
    """Where the PostgreSQL store is and how to reach it (config ``[ams]``).

    ``dsn``: ``postgresql://USER@HOST[:PORT]/DB`` (libpq URL; ``?host=/run/postgresql`` for a
    socket directory, ``sslmode=...``), never with a password in it.  The password comes from
    ``password_file`` (its first line), else the environment variable ``password_env``, else
    what asyncpg finds itself (``PGPASSWORD``, ``~/.pgpass``).  ``connect_timeout``: per
    connection attempt; ``command_timeout``: per statement, including the wait for the write
    lock; ``retry_seconds``: how long one operation keeps retrying to reach the server (then
    it is refused ``store-unavailable``; at start the gateway gives up); ``pool_size``:
    connections per gateway; ``nss_refresh_seconds``: the periodic full refresh of the NSS
    tables (the safety net under LISTEN/NOTIFY).
    """

    dsn: str
    password_file: str | None = None
    password_env: str | None = None
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    retry_seconds: float = 10.0
    pool_size: int = 4
    nss_refresh_seconds: float = 60.0

    def describe(self) -> str:
        """``postgresql://USER@HOST:PORT/DB``: which server and database, never a password."""
        parts = urlsplit(self.dsn)
        query = parse_qs(parts.query)
        host = parts.hostname or (query.get("host") or [""])[0] or "localhost"
        try:
            port = parts.port or int((query.get("port") or ["5432"])[0])
        except ValueError:
            port = 5432
        user = parts.username or (query.get("user") or [""])[0]
        db = parts.path.lstrip("/") or (query.get("dbname") or [""])[0] or user
        host_text = f"[{host}]" if ":" in host else host
        return f"postgresql://{user + '@' if user else ''}{host_text}:{port}/{db}"

    def password(self) -> str | None:
        """The password from ``password_file`` or ``password_env`` (``None``: asyncpg's own
        defaults).  Raises ``OSError`` for an unreadable file."""
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        if self.password_env:
            return os.environ.get(self.password_env)
        return None


def is_pg_url(text: str) -> bool:
    """Whether *text* names a PostgreSQL store (``postgresql://`` or ``postgres://``)."""
    return text.startswith(("postgresql://", "postgres://"))


class StoreLike(Protocol):
    """What the AMS and the job table need of a store (both backends)."""

    path: str
    busy_timeout: float
    #: True for a store that several nodes share (PostgreSQL): the AMS then refreshes the NSS
    #: tables on other nodes' changes and publishes this node's busy uids.
    cluster: bool

    def write(self) -> AsyncContextManager[Any]: ...
    def read(self) -> AsyncContextManager[Any]: ...
    async def close(self) -> None: ...
    def describe(self) -> str: ...


async def open_store(where: "str | os.PathLike[str] | PgSettings", busy_timeout: float = 30.0) -> Any:
    """Open the store *where* names: a sqlite path, a ``postgresql://`` URL or :class:`PgSettings`."""
    if isinstance(where, str) and is_pg_url(where):
        where = PgSettings(where)
    if isinstance(where, PgSettings):
        from .store_pg import PgStore

        return await PgStore.open(where)
    return await Store.open(os.fspath(where), busy_timeout=busy_timeout)


class Txn:
    """A thin wrapper of the connection inside one transaction."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; return the rowcount (or lastrowid for an INSERT)."""
        cur = await self.conn.execute(sql, args)
        try:
            if sql.lstrip()[:6].upper() == "INSERT":
                return int(cur.lastrowid or 0)
            return cur.rowcount
        finally:
            await cur.close()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, rows)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self.conn.execute(sql, args) as cur:
            return await cur.fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self.conn.execute(sql, args) as cur:
            return list(await cur.fetchall())

    async def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = await self.one(sql, args)
        return None if row is None else row[0]


class Store:
    """One aiosqlite connection to the AMS database, with serialised transactions.

    One connection must not interleave two transactions, so every
    transaction (read or write) of this instance holds ``self._lock``.
    Separate :class:`Store` instances (other processes, other gateways)
    are serialised by sqlite's own locking.
    """

    #: One node's file: never shared by gateways of several nodes.
    cluster = False

    def __init__(self, conn: aiosqlite.Connection, path: str, busy_timeout: float) -> None:
        self._conn = conn
        self.path = path
        self.busy_timeout = busy_timeout
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str, busy_timeout: float = 30.0) -> "Store":
        """Open (creating and migrating if needed) the database at ``path``."""
        conn = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            await _set_wal(conn, busy_timeout)
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
            store = cls(conn, path, busy_timeout)
            await store._migrate()
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()

    def describe(self) -> str:
        """``sqlite PATH``."""
        return f"sqlite {self.path}"

    async def _migrate(self) -> None:
        async with self.write() as txn:
            version = int(await txn.scalar("PRAGMA user_version"))
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{self.path}: schema version {version} is newer than this xos-sshd supports ({SCHEMA_VERSION})"
                )
            for v in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[v]:
                    await txn.execute(stmt)
            if version != SCHEMA_VERSION:
                await txn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Txn]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on normal exit, rolled back on error."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Txn(self._conn)
            except BaseException:
                await _rollback(self._conn)
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Txn]:
        """A read transaction: every query inside sees the same snapshot."""
        async with self._lock:
            await self._conn.execute("BEGIN")
            try:
                yield Txn(self._conn)
            finally:
                await _rollback(self._conn)


def nss_snapshot(conn: sqlite3.Connection) -> tuple[list[tuple[str, int, int, str, str, str]],
                                                   list[tuple[str, int, list[str]]]]:
    """Read what the NSS tables must hold, in one read transaction (sync sqlite3).

    passwd: every dynamic/pool mapping that is not banned.  group: the
    private group of each of those, and every VO group with its non-banned
    members.  Static accounts are system accounts and appear in neither.
    """
    conn.execute("BEGIN")
    try:
        passwd = [
            (r[0], r[1], r[2], r[3], r[4], r[5])
            for r in conn.execute(
                "SELECT name, uid, gid, gecos, home, shell FROM mappings"
                " WHERE kind <> 'static' AND banned = 0 ORDER BY uid"
            )
        ]
        members: dict[int, list[str]] = {}
        for gid, name in conn.execute(
            "SELECT mb.gid, m.name FROM members mb JOIN mappings m ON m.id = mb.mapping_id"
            " WHERE m.banned = 0 AND m.kind <> 'static' ORDER BY mb.gid, m.name"
        ):
            members.setdefault(gid, []).append(name)
        group: list[tuple[str, int, list[str]]] = []
        for name, gid, kind, banned in conn.execute(
            "SELECT g.name, g.gid, g.kind, m.banned FROM groups g LEFT JOIN mappings m ON m.id = g.owner"
            " ORDER BY g.gid"
        ):
            if kind == "private" and banned:
                continue
            group.append((name, gid, members.get(gid, [])))
    finally:
        conn.execute("ROLLBACK")
    return passwd, group


async def nss_snapshot_async(store: StoreLike) -> tuple[list[tuple[str, int, int, str, str, str]],
                                                       list[tuple[str, int, list[str]]], frozenset[str]]:
    """:func:`nss_snapshot` through a store's read transaction (any backend), plus the names
    of the banned mappings (static ones too: a ban closes live connections on every node)."""
    async with store.read() as txn:
        passwd = [
            (r[0], r[1], r[2], r[3], r[4], r[5])
            for r in await txn.all(
                "SELECT name, uid, gid, gecos, home, shell FROM mappings"
                " WHERE kind <> 'static' AND banned = 0 ORDER BY uid"
            )
        ]
        members: dict[int, list[str]] = {}
        for gid, name in await txn.all(
            "SELECT mb.gid, m.name FROM members mb JOIN mappings m ON m.id = mb.mapping_id"
            " WHERE m.banned = 0 AND m.kind <> 'static' ORDER BY mb.gid, m.name"
        ):
            members.setdefault(gid, []).append(name)
        group: list[tuple[str, int, list[str]]] = []
        for name, gid, kind, banned in await txn.all(
            "SELECT g.name, g.gid, g.kind, m.banned FROM groups g LEFT JOIN mappings m ON m.id = g.owner"
            " ORDER BY g.gid"
        ):
            if kind == "private" and banned:
                continue
            group.append((name, gid, members.get(gid, [])))
        banned_names = frozenset(r[0] for r in await txn.all("SELECT name FROM mappings WHERE banned = 1"))
    return passwd, group, banned_names


async def _rollback(conn: aiosqlite.Connection) -> None:
    try:
        await conn.execute("ROLLBACK")
    except sqlite3.OperationalError:
        pass  # no transaction open (sqlite already rolled back after an error)


async def _set_wal(conn: aiosqlite.Connection, busy_timeout: float) -> None:
    """Switch to WAL; retry while another opener holds the lock the switch needs."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            async with conn.execute("PRAGMA journal_mode = WAL") as cur:
                row = await cur.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (journal_mode={row[0] if row else None})")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
