"""The AMS's concurrency and crash guarantees, with real sqlite files and real processes.

(The in-process races run on both backends, ``ams_db``; the PostgreSQL forms of the process
and kill -9 tests are in test_ams_pg_cluster.py.)

* N parallel first logins of one identity (N AMS instances in one event loop,
  and N OS processes) get exactly one account.
* A pool under a stampede maps nobody twice and refuses the rest.
* kill -9 at random moments loses no committed mapping and leaves no half one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone

import pytest

from xos_sshd.ams import AMS, MappingRefused, VOPolicy
from xos_sshd.auth.identity import VOIdentity

POL = {
    "atlas": VOPolicy("atlas", uid_range=(240000, 249999), gid_range=(340000, 349999)),
    "cms": VOPolicy("cms", kind="pool", uid_range=(250000, 250099), gid_range=(350000, 350199),
                    pool=tuple(f"cmsp{i:02d}" for i in range(40))),
}


def ident(user: str, vo: str = "atlas", groups: tuple[str, ...] = ("atlas",)) -> VOIdentity:
    return VOIdentity(vo=vo, user=user, groups=groups, role=None, serial=1,
                      not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                      key_fingerprint="SHA256:test")


def db_mappings(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT vo, vo_user, name, uid, gid FROM mappings ORDER BY uid").fetchall()
    finally:
        conn.close()


# -- many AMS instances, one event loop ---------------------------------------------


async def stored(ams: AMS) -> list[tuple]:
    """(vo, vo_user, name, uid, gid) of every mapping, by uid (either backend)."""
    return [(r.account.vo, r.account.vo_user, r.account.name, r.account.uid, r.account.gid)
            for r in await ams.list_mappings()]


async def test_parallel_first_logins_across_instances_get_one_account(tmp_path, ams_db):
    db, nss = ams_db, tmp_path / "nss"
    n = 10
    instances = await asyncio.gather(*(AMS.open(db, POL, nss) for _ in range(n)))
    try:
        for user, groups in (("alice", ("atlas", "higgs")), ("bob", ("atlas",)), ("carol", ("susy", "atlas"))):
            accs = await asyncio.gather(*(a.map_identity(ident(user, groups=groups)) for a in instances))
            assert len(set(accs)) == 1, accs
        rows = await stored(instances[0])
        assert [r[1] for r in rows] == ["alice", "bob", "carol"]
        # The same race with different people: all distinct uids and names.
        accs = await asyncio.gather(*(a.map_identity(ident(f"p{i}")) for i, a in enumerate(instances)))
        assert len({a.uid for a in accs}) == n and len({a.name for a in accs}) == n
        rows = await stored(instances[0])
    finally:
        await asyncio.gather(*(a.close() for a in instances))
    names = [ln.split(":")[0] for ln in (nss / "passwd").read_text().splitlines()]
    assert sorted(names) == sorted(r[2] for r in rows)


async def test_pool_stampede_maps_nobody_twice(tmp_path, ams_db):
    db, nss = ams_db, tmp_path / "nss"
    pol = {"cms": VOPolicy("cms", kind="pool", uid_range=(250000, 250009), gid_range=(350000, 350019),
                           pool=("c1", "c2", "c3"))}
    instances = await asyncio.gather(*(AMS.open(db, pol, nss) for _ in range(8)))
    try:
        results = await asyncio.gather(
            *(a.map_identity(ident(f"u{i}", vo="cms", groups=("cms",))) for i, a in enumerate(instances)),
            return_exceptions=True,
        )
        rows = await stored(instances[0])
    finally:
        await asyncio.gather(*(a.close() for a in instances))
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert sorted(a.name for a in ok) == ["c1", "c2", "c3"]
    assert len({a.vo_user for a in ok}) == 3
    assert len(refused) == 5 and all(isinstance(r, MappingRefused) and r.reason == "pool-exhausted" for r in refused)
    assert len(rows) == 3


# -- many OS processes ---------------------------------------------------------------


def _mp_worker(store, policies, nss: str, node: str | None, user: str, barrier, out) -> None:
    async def run() -> tuple:
        ams = await AMS.open(store, policies, nss, node=node)
        try:
            barrier.wait(30)
            acc = await ams.map_identity(ident(user, groups=("atlas", "higgs")))
            return (acc.name, acc.uid, acc.gid, acc.groups)
        finally:
            await ams.close()

    try:
        out.put(asyncio.run(run()))
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", repr(exc)))


def first_logins_in_processes(store, policies, workers: list[tuple[str, str | None, str]]) -> list[tuple]:
    """One spawned process per ``(nss_dir, node, user)`` in *workers*, each opening its own
    AMS on *store* and mapping its user at a shared barrier: ``(name, uid, gid, groups)``
    of each, every process checked to have ended cleanly."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(workers))
    out = ctx.Queue()
    procs = [ctx.Process(target=_mp_worker, args=(store, policies, nss, node, user, barrier, out))
             for nss, node, user in workers]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert not [r for r in results if r[0] == "error"], results
    return results


@pytest.mark.parametrize("same_identity", [True, False])
def test_parallel_first_logins_across_processes(tmp_path, same_identity):
    db, nss = str(tmp_path / "ams.sqlite"), str(tmp_path / "nss")
    n = 6
    results = first_logins_in_processes(
        db, POL, [(nss, None, "alice" if same_identity else f"u{i}") for i in range(n)])
    rows = db_mappings(db)
    if same_identity:
        assert len(set(results)) == 1, results
        assert len(rows) == 1 and rows[0][2] == results[0][0]
    else:
        assert len({r[1] for r in results}) == n and len({r[0] for r in results}) == n
        assert len(rows) == n
    conn = sqlite3.connect(db)
    try:
        # Each VO group exists once, shared by everybody.
        assert conn.execute("SELECT count(*) FROM groups WHERE kind = 'vo'").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == 2 * len(rows)
    finally:
        conn.close()


# -- kill -9 -------------------------------------------------------------------------

CHILD = textwrap.dedent('''
    import asyncio, os, random, sys
    from datetime import datetime, timezone
    from xos_sshd.ams import AMS, MappingRefused, VOPolicy
    from xos_sshd.auth.identity import VOIdentity

    db, nss, log, rnd_seed, tag = sys.argv[1:6]
    POL = {
        "atlas": VOPolicy("atlas", uid_range=(240000, 249999), gid_range=(340000, 349999)),
        "cms": VOPolicy("cms", kind="pool", uid_range=(250000, 250099), gid_range=(350000, 350199),
                        pool=tuple(f"cmsp{i:02d}" for i in range(40))),
    }
    GROUPS = ["atlas", "higgs", "susy", "top", "exotics", "b-physics"]
    rnd = random.Random(int(rnd_seed))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(*words):
        os.write(fd, (" ".join(str(w) for w in words) + "\\n").encode())

    def ident(vo, user, groups):
        return VOIdentity(vo=vo, user=user, groups=tuple(groups), role=None, serial=1,
                          not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                          key_fingerprint="SHA256:test")

    async def main():
        ams = await AMS.open(db, POL, nss)
        note("open", tag)
        mine = []
        i = 0
        while True:
            i += 1
            vo = "cms" if i % 4 == 0 else "atlas"
            user = f"{tag}u{i}"
            groups = rnd.sample(GROUPS, rnd.randint(1, 3))
            note("m", vo, user, ",".join(groups))            # intent
            try:
                acc = await ams.map_identity(ident(vo, user, groups))
            except MappingRefused as exc:
                note("X", vo, user, exc.reason)
                continue
            note("M", vo, user, acc.name, acc.uid, acc.gid, ",".join(groups))  # committed
            mine.append((vo, user, acc.name))
            if i % 3 == 0 and mine:
                vo2, u2, _ = rnd.choice(mine)
                g2 = rnd.sample(GROUPS, rnd.randint(1, 3))
                note("g", vo2, u2, ",".join(g2))
                acc2 = await ams.map_identity(ident(vo2, u2, g2))
                note("G", vo2, u2, acc2.name, ",".join(g2))
            if i % 5 == 0 and mine:
                vo3, u3, name3 = mine.pop(rnd.randrange(len(mine)))
                note("r", vo3, u3, name3)
                await ams.release(name3)
                note("R", vo3, u3, name3)

    asyncio.run(main())
''')


class Expect:
    """What the child's log says must (or may) be in the database."""

    def __init__(self) -> None:
        self.committed: dict[tuple[str, str], tuple[str, int, frozenset[str]]] = {}
        self.maybe_created: dict[tuple[str, str], frozenset[str]] = {}  # intent without report
        self.maybe_groups: dict[tuple[str, str], frozenset[str]] = {}
        self.maybe_released: set[tuple[str, str]] = set()
        self.created_count = 0

    def feed(self, text: str) -> None:
        for line in text.splitlines():  # an unterminated last line was not fully written: ignore
            w = line.split(" ")
            if w[0] == "m":
                self.maybe_created = {(w[1], w[2]): frozenset(w[3].split(","))}
            elif w[0] == "M":
                key = (w[1], w[2])
                self.maybe_created.pop(key, None)
                self.committed[key] = (w[3], int(w[4]), frozenset(w[6].split(",")))
                self.created_count += 1
            elif w[0] == "g":
                self.maybe_groups = {(w[1], w[2]): frozenset(w[3].split(","))}
            elif w[0] == "G":
                key = (w[1], w[2])
                self.maybe_groups.pop(key, None)
                name, uid, _ = self.committed[key]
                self.committed[key] = (name, uid, frozenset(w[4].split(",")))
            elif w[0] == "r":
                self.maybe_released.add((w[1], w[2]))
            elif w[0] == "R":
                key = (w[1], w[2])
                self.maybe_released.discard(key)
                del self.committed[key]

    def round_over(self) -> None:
        """After a kill, in-flight operations of that child are settled by the DB check."""


def check_db(db: str, exp: Expect, nss: str) -> None:
    if not os.path.exists(db):  # killed before it created the store
        assert not exp.committed
        return
    conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # killed before the schema committed
            assert not exp.committed
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            return
        conn.execute("PRAGMA foreign_keys = ON")
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = conn.execute("SELECT id, vo, vo_user, name, uid, gid, kind FROM mappings").fetchall()
        uids = [r[4] for r in rows]
        assert len(uids) == len(set(uids)), "duplicate uid"
        assert len({r[3] for r in rows}) == len(rows), "duplicate name"
        db_map = {}
        for mid, vo, user, name, uid, gid, kind in rows:
            priv = conn.execute("SELECT gid, name FROM groups WHERE owner = ? AND kind = 'private'", (mid,)).fetchone()
            assert priv == (gid, name), f"{name}: private group missing or wrong: {priv}"
            vo_groups = frozenset(r[0] for r in conn.execute(
                "SELECT g.vo_group FROM members m JOIN groups g ON g.gid = m.gid WHERE m.mapping_id = ?", (mid,)))
            assert vo_groups, f"{name}: no VO groups"
            db_map[(vo, user)] = (name, uid, vo_groups)
    finally:
        conn.close()
    for key, (name, uid, groups) in exp.committed.items():
        if key in exp.maybe_released and key not in db_map:
            continue
        assert key in db_map, f"committed mapping {key} -> {name} lost"
        got_name, got_uid, got_groups = db_map[key]
        assert (got_name, got_uid) == (name, uid), f"{key}: {got_name}/{got_uid} != {name}/{uid}"
        allowed = {groups}
        if key in exp.maybe_groups:
            allowed.add(exp.maybe_groups[key])
        assert got_groups in allowed, f"{key}: groups {set(got_groups)} not in {allowed}"
    for key in db_map:
        if key not in exp.committed:
            assert key in exp.maybe_created, f"mapping {key} nobody asked for"
            assert db_map[key][2] == exp.maybe_created[key]
            # In-flight at the kill, and committed: it counts as committed from now on.
            name, uid, groups = db_map[key]
            exp.committed[key] = (name, uid, groups)
    exp.maybe_created.clear()
    # In-flight group changes and releases are settled by what the DB holds now.
    for key in list(exp.maybe_groups):
        if key in db_map:
            name, uid, _ = exp.committed[key]
            exp.committed[key] = (name, uid, db_map[key][2])
    exp.maybe_groups.clear()
    for key in list(exp.maybe_released):
        if key not in db_map:
            exp.committed.pop(key, None)
    exp.maybe_released.clear()
    # The tables a reader would open are whole.
    for table, nfields in (("passwd", 7), ("group", 4)):
        path = os.path.join(nss, table)
        if os.path.exists(path):
            data = open(path, "rb").read()
            assert data == b"" or data.endswith(b"\n"), f"{table} torn"
            assert all(len(ln.split(b":")) == nfields for ln in data.splitlines()), f"{table} malformed"


def test_kill_9_loses_no_committed_mapping(tmp_path):
    db, nss, log = str(tmp_path / "ams.sqlite"), str(tmp_path / "nss"), str(tmp_path / "log")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    open(log, "w").close()
    seed = int(os.environ.get("XOS_TEST_SEED", time.time_ns() % 1_000_000))
    rnd = random.Random(seed)
    exp = Expect()
    offset = 0
    rounds = 8
    for rnd_no in range(rounds):
        proc = subprocess.Popen([sys.executable, str(script), db, nss, log, str(seed + rnd_no), f"k{rnd_no}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Mostly after the child got going, sometimes while it opens (and migrates) the store.
        time.sleep(rnd.uniform(0.05, 0.8) if rnd_no == 0 else rnd.uniform(0.4, 1.6))
        assert proc.poll() is None, f"child died by itself (seed {seed}): {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        with open(log) as fh:
            fh.seek(offset)
            text = fh.read()
        # Only whole lines count (a line is written by one write(2) after the operation returned).
        cut = text.rfind("\n") + 1
        offset += len(text[:cut].encode())
        exp.feed(text[:cut])
        try:
            check_db(db, exp, nss)
        except AssertionError as exc:
            raise AssertionError(f"round {rnd_no}, seed {seed}: {exc}") from None
    assert exp.created_count >= 20, f"the child made too few mappings to mean anything ({exp.created_count})"

    # A fresh open brings the NSS tables in line with the database.
    async def reopen() -> None:
        async with await AMS.open(db, POL, nss):
            pass
    asyncio.run(reopen())
    names = sorted(ln.split(":")[0] for ln in open(os.path.join(nss, "passwd")).read().splitlines())
    assert names == sorted(r[2] for r in db_mappings(db))
