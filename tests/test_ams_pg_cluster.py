"""Several gateways on one PostgreSQL AMS store, as on a cluster: one mapping, uids that agree,
each node's NSS tables following every change, bans, node-local jobs, reclaim, outages and
crashes.  A real server (tests/pgserver.py) and real processes; no mocks.

Each "gateway" is an :class:`AMS` with its own node name and NSS directory (as each node has
its own ``/var/lib/xos-sshd/nss``); test_ams_pg_gateways.py runs real gateway processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from test_ams_concurrency import CHILD, Expect, first_logins_in_processes
from test_ams_service import Clock, ident
from test_nss import NSSWITCH, getent, nss_lib  # noqa: F401 (fixture: the built libnss_xos)

from xos_sshd.ams import AMS, MappingRefused, VOPolicy
from xos_sshd.ams.store import PgSettings
from xos_sshd.ams.store_pg import connect_options
from xos_sshd.cr.jobs import Job, JobError, JobManager, JobTable, reconcile
from xos_sshd.liveconn import LiveConnections

POL = {
    "atlas": VOPolicy("atlas", uid_range=(270000, 279999), gid_range=(370000, 379999), lease_hours=1),
    "cms": VOPolicy("cms", kind="pool", uid_range=(280000, 280099), gid_range=(380000, 380199),
                    pool=tuple(f"cmsq{i:02d}" for i in range(40))),
}


async def gateways(settings: PgSettings, base: Path, n: int = 2, **kw) -> list[AMS]:
    """*n* AMS instances on one database, each with its node name and NSS directory."""
    return list(await asyncio.gather(*(
        AMS.open(settings, POL, base / f"nss-{chr(97 + i)}", node=f"node-{chr(97 + i)}", **kw)
        for i in range(n))))


async def closing(*instances: AMS) -> None:
    await asyncio.gather(*(a.close() for a in instances))


def passwd_names(nss: Path) -> set[str]:
    try:
        return {ln.split(":")[0] for ln in (nss / "passwd").read_text().splitlines()}
    except FileNotFoundError:
        return set()


async def eventually(predicate, timeout: float = 5.0, what: str = "condition") -> float:
    """Wait until *predicate()* is true; return how long it took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def db_rows(settings: PgSettings, sql: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(**connect_options(settings))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# -- one mapping for the whole cluster ---------------------------------------------------


async def test_gateways_mapping_one_identity_at_once_get_one_account(pg_db, tmp_path):
    instances = await gateways(pg_db, tmp_path, n=6)
    try:
        for user, groups in (("alice", ("atlas", "higgs")), ("bob", ("atlas",))):
            accs = await asyncio.gather(*(a.map_identity(ident(user, groups=groups))
                                          for a in instances * 3))
            assert len(set(accs)) == 1, accs
        # Different people at once: distinct uids and names from the VO's range, no clash.
        accs = await asyncio.gather(*(a.map_identity(ident(f"p{i}")) for i, a in enumerate(instances * 4)))
        assert len({a.uid for a in accs}) == 24 and len({a.name for a in accs}) == 24
        assert all(270000 <= a.uid <= 279999 for a in accs)
    finally:
        await closing(*instances)
    rows = await db_rows(pg_db, "SELECT vo_user, uid FROM mappings ORDER BY uid")
    assert len(rows) == 26 and len({r["uid"] for r in rows}) == 26
    assert [r["vo_user"] for r in rows[:2]] == ["alice", "bob"]
    # Each VO group exists once for the whole cluster.
    assert [r[0] for r in await db_rows(pg_db, "SELECT vo_group FROM groups WHERE kind = 'vo' ORDER BY gid")] \
        == ["atlas", "higgs"]


async def test_pool_stampede_across_gateways_maps_nobody_twice(pg_db, tmp_path):
    pol = {"cms": VOPolicy("cms", kind="pool", uid_range=(280000, 280009), gid_range=(380000, 380019),
                           pool=("q1", "q2", "q3"))}
    instances = await asyncio.gather(*(AMS.open(pg_db, pol, tmp_path / f"nss{i}", node=f"n{i}")
                                       for i in range(8)))
    try:
        results = await asyncio.gather(
            *(a.map_identity(ident(f"u{i}", vo="cms", groups=("cms",))) for i, a in enumerate(instances)),
            return_exceptions=True)
    finally:
        await closing(*instances)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert sorted(a.name for a in ok) == ["q1", "q2", "q3"] and len({a.vo_user for a in ok}) == 3
    assert len(refused) == 5 and all(isinstance(r, MappingRefused) and r.reason == "pool-exhausted"
                                     for r in refused)


@pytest.mark.parametrize("same_identity", [True, False])
def test_first_logins_on_gateway_processes_at_once(pg_db, tmp_path, same_identity):
    """Six gateway processes (separate pools and connections) at a barrier."""
    n = 6
    results = first_logins_in_processes(
        pg_db, POL, [(str(tmp_path / f"nss{i}"), f"node{i}", "alice" if same_identity else f"u{i}")
                     for i in range(n)])
    rows = asyncio.run(db_rows(pg_db, "SELECT name, uid FROM mappings"))
    if same_identity:
        assert len(set(results)) == 1 and len(rows) == 1, results
    else:
        assert len({r[1] for r in results}) == n == len(rows)
    # Whoever created an account wrote it into its node's NSS tables before answering.
    names = {r["name"] for r in rows}
    assert set().union(*(passwd_names(tmp_path / f"nss{i}") for i in range(n))) == names


# -- every node's NSS tables follow every change -------------------------------------------


@pytest.mark.usefixtures("nss_lib")
async def test_changes_on_one_gateway_reach_the_other_nodes_nss_tables(pg_db, tmp_path):
    """Created on A: B's tables (read through the real libnss_xos) have it within a second;
    banned, unbanned, released alike.  B never made a change itself."""
    conf = tmp_path / "nsswitch.conf"
    conf.write_text(NSSWITCH)
    a, b = await gateways(pg_db, tmp_path)
    nss_b = tmp_path / "nss-b"
    try:
        rewrites = b.nss_rewrites
        acc = await a.map_identity(ident("alice", groups=("atlas", "higgs")))
        took = await eventually(lambda: acc.name in passwd_names(nss_b), 3, "alice on node b")
        res = await asyncio.to_thread(getent, nss_b, conf, "passwd", acc.name)
        assert res.returncode == 0 and res.stdout.split(":")[2] == str(acc.uid), res
        res = await asyncio.to_thread(getent, nss_b, conf, "group", "atlas_higgs")
        assert res.returncode == 0 and res.stdout.strip().endswith(f":{acc.name}"), res
        print(f"\ncreated on A, in B's NSS tables after {took * 1000:.0f} ms")
        # A renewal (the login hot path) is announced to nobody.
        before = b.nss_rewrites
        for _ in range(5):
            await a.map_identity(ident("alice", groups=("atlas", "higgs")))
        await asyncio.sleep(0.3)
        assert b.nss_rewrites == before

        await a.ban(acc.name)
        await eventually(lambda: acc.name not in passwd_names(nss_b), 3, "ban on node b")
        assert acc.name in b.banned_names
        assert (await asyncio.to_thread(getent, nss_b, conf, "passwd", str(acc.uid))).returncode == 2
        with pytest.raises(MappingRefused, match="banned"):
            await b.map_identity(ident("alice", groups=("atlas", "higgs")))
        await a.unban(acc.name)
        await eventually(lambda: acc.name in passwd_names(nss_b) and not b.banned_names, 3, "unban on b")
        await a.release(acc.name)
        await eventually(lambda: acc.name not in passwd_names(nss_b), 3, "release on node b")
        assert b.nss_rewrites > rewrites
    finally:
        await closing(a, b)


async def test_the_periodic_refresh_catches_a_change_nobody_announced(pg_db, pg_server, tmp_path):
    """The safety net: a change made with the notification triggers off (as if the NOTIFY
    were lost) still reaches B, at its next full refresh (nss_refresh_seconds)."""
    a = await AMS.open(pg_db, POL, tmp_path / "nss-a", node="node-a")
    b = await AMS.open(replace(pg_db, nss_refresh_seconds=1.0), POL, tmp_path / "nss-b", node="node-b")
    try:
        acc = await a.map_identity(ident("alice"))
        await eventually(lambda: acc.name in passwd_names(tmp_path / "nss-b"), 3, "alice on b")
        db = pg_db.dsn.rsplit("/", 1)[1]
        pg_server.psql("SET session_replication_role = replica; "  # no triggers: no NOTIFY
                       f"UPDATE mappings SET banned = 1 WHERE name = '{acc.name}'", db=db)
        await eventually(lambda: acc.name not in passwd_names(tmp_path / "nss-b"), 5, "the periodic refresh")
        assert acc.name in b.banned_names
    finally:
        await closing(a, b)


async def test_a_ban_anywhere_closes_live_connections_on_this_gateway(pg_db, tmp_path):
    """The live-connection sweep sees bans made through another gateway: LiveConnections of
    gateway B, fed by B's AMS as the gateway wires it (store_bans), closes the connection."""
    a, b = await gateways(pg_db, tmp_path)
    try:
        acc = await b.map_identity(ident("alice"))
        closed: list[tuple[str, str]] = []

        class Conn:  # what an asyncssh connection offers the registry, recording the close
            def disconnect(self, code: int, reason: str) -> None:
                closed.append(("disconnect", reason))

        class Audit:
            def write(self, event: str, **fields) -> None:
                closed.append((event, fields["reason"]))

        from xos_sshd.liveconn import LiveConnection
        live = LiveConnections(Audit())
        live.store_bans = lambda: b.banned_names
        live.add(LiveConnection(ident("alice"), acc, "127.0.0.1:1", "x509", Conn()))  # type: ignore[arg-type]
        assert live.close_store_banned() == 0
        await a.ban(acc.name)
        await eventually(lambda: acc.name in b.banned_names, 3, "the ban on b")
        assert live.close_store_banned() == 1 and live.close_store_banned() == 0
        assert closed == [("connection", "banned"),
                          ("disconnect", f"xos-sshd: account {acc.name} was banned by the administrator; "
                                         "connection closed")]
    finally:
        await closing(a, b)


# -- outages and crashes --------------------------------------------------------------------


async def test_database_outage_refuses_clearly_and_recovers(pg_db, pg_server, tmp_path):
    a, b = await gateways(pg_db, tmp_path)
    stopped = False
    try:
        alice = await a.map_identity(ident("alice"))
        await eventually(lambda: alice.name in passwd_names(tmp_path / "nss-b"), 3, "alice on b")
        pg_server.stop("fast")
        stopped = True
        t0 = time.monotonic()
        with pytest.raises(MappingRefused) as ei:
            await a.map_identity(ident("bob"))
        first = time.monotonic() - t0
        assert ei.value.reason == "store-unavailable"
        where = pg_db.describe()
        assert str(ei.value).startswith(f"AMS store {where} unavailable: "), str(ei.value)
        assert first < pg_db.retry_seconds + pg_db.connect_timeout + 1
        t0 = time.monotonic()  # known to be down: the next login is refused at once
        with pytest.raises(MappingRefused, match="store-unavailable|unavailable"):
            await a.map_identity(ident("alice"))
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(MappingRefused):
            await b.find_mapping(ident("alice"))
        # The nodes keep serving what they had: their NSS tables are untouched.
        assert alice.name in passwd_names(tmp_path / "nss-a") | passwd_names(tmp_path / "nss-b")
        print(f"\nrefused {first:.2f} s into the outage, then at once: {ei.value}")

        pg_server.start()
        stopped = False
        bob = await a.map_identity(ident("bob"))  # back: the pool reconnects by itself
        assert await a.map_identity(ident("alice")) == alice
        # B's watch reconnected too and follows A's changes again.
        await eventually(lambda: bob.name in passwd_names(tmp_path / "nss-b"), 10, "bob on b after restart")
    finally:
        if stopped:
            pg_server.start()
        await closing(a, b)


KILL_CHILD = textwrap.dedent('''
    import asyncio, json, sys, time
    from xos_sshd.ams.store import PgSettings
    from xos_sshd.ams.store_pg import PgStore

    async def main():
        store = await PgStore.open(PgSettings(**json.loads(sys.argv[1])))
        async with store.write() as txn:
            mid = await txn.scalar(
                "INSERT INTO mappings (vo, vo_user, kind, name, uid, gid, home, shell, gecos, created_at,"
                " last_seen, lease_expires) VALUES ('atlas','mallory','dynamic','atlas_mallory',270000,370000,"
                "'/h','/bin/sh','g',0,0,0) RETURNING id")
            await txn.execute("INSERT INTO groups (gid, name, vo, kind, owner) VALUES (370000, 'atlas_mallory',"
                              " 'atlas', 'private', ?)", (mid,))
            print("inserted", flush=True)
            time.sleep(3600)  # killed here, mid-transaction, holding the write lock

    asyncio.run(main())
''')


async def test_client_killed_mid_transaction_leaves_no_half_mapping(pg_db, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(pg_db.__dict__)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line == "inserted\n", (line, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ams = await AMS.open(pg_db, POL, tmp_path / "nss", node="node-a")
    try:
        t0 = time.monotonic()  # the server saw the socket close: lock released, transaction gone
        acc = await ams.map_identity(ident("mallory"))
        assert time.monotonic() - t0 < 3
        assert (acc.name, acc.uid) == ("atlas_mallory", 270000)  # the half one never existed
        assert [e.event for e in await ams.history()] == ["created"]
    finally:
        await ams.close()


def test_kill_9_of_gateways_loses_no_committed_mapping(pg_db, pg_server, tmp_path):
    """test_ams_concurrency's kill -9 loop on the shared store: a child maps, regroups and
    releases until SIGKILL at a random moment; every committed mapping is there, whole, and
    none that nobody asked for."""
    db, nss, log = pg_db.dsn, str(tmp_path / "nss"), str(tmp_path / "log")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    open(log, "w").close()
    env = {**os.environ, "PGPASSWORD": pg_server.password}
    seed = int(os.environ.get("XOS_TEST_SEED", time.time_ns() % 1_000_000))
    rnd = random.Random(seed)
    exp = Expect()
    offset = 0
    for rnd_no in range(6):
        proc = subprocess.Popen([sys.executable, str(script), db, nss, log, str(seed + rnd_no), f"k{rnd_no}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        time.sleep(rnd.uniform(0.2, 0.8) if rnd_no == 0 else rnd.uniform(0.6, 1.8))
        assert proc.poll() is None, f"child died by itself (seed {seed}): {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        with open(log) as fh:
            fh.seek(offset)
            text = fh.read()
        cut = text.rfind("\n") + 1
        offset += len(text[:cut].encode())
        exp.feed(text[:cut])
        try:
            asyncio.run(_check_pg(pg_db, exp))
        except AssertionError as exc:
            raise AssertionError(f"round {rnd_no}, seed {seed}: {exc}") from None
    assert exp.created_count >= 10, f"the child made too few mappings to mean anything ({exp.created_count})"


async def _check_pg(settings: PgSettings, exp: Expect) -> None:
    """check_db of test_ams_concurrency, on the PostgreSQL store."""
    conn = await asyncpg.connect(**connect_options(settings))
    try:
        if await conn.fetchval("SELECT to_regclass('mappings')") is None:
            assert not exp.committed  # killed before the schema committed
            return
        rows = await conn.fetch("SELECT id, vo, vo_user, name, uid, gid FROM mappings")
        assert len({r["uid"] for r in rows}) == len(rows), "duplicate uid"
        db_map = {}
        for r in rows:
            priv = await conn.fetchrow("SELECT gid, name FROM groups WHERE owner = $1 AND kind = 'private'", r["id"])
            assert priv is not None and (priv["gid"], priv["name"]) == (r["gid"], r["name"]), f"{r['name']}: {priv}"
            vo_groups = frozenset(x[0] for x in await conn.fetch(
                "SELECT g.vo_group FROM members m JOIN groups g ON g.gid = m.gid WHERE m.mapping_id = $1", r["id"]))
            assert vo_groups, f"{r['name']}: no VO groups"
            db_map[(r["vo"], r["vo_user"])] = (r["name"], r["uid"], vo_groups)
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await conn.close()
    for key, (name, uid, groups) in exp.committed.items():
        if key in exp.maybe_released and key not in db_map:
            continue
        assert key in db_map, f"committed mapping {key} -> {name} lost"
        assert db_map[key][:2] == (name, uid)
        assert db_map[key][2] in {groups} | ({exp.maybe_groups[key]} if key in exp.maybe_groups else set())
    for key in db_map:
        if key not in exp.committed:
            assert key in exp.maybe_created, f"mapping {key} nobody asked for"
            exp.committed[key] = db_map[key]
    exp.maybe_created.clear()
    for key in list(exp.maybe_groups):
        if key in db_map:
            exp.committed[key] = db_map[key]
    exp.maybe_groups.clear()
    for key in list(exp.maybe_released):
        if key not in db_map:
            exp.committed.pop(key, None)
    exp.maybe_released.clear()


# -- jobs are node-local; reclaim sees the whole cluster --------------------------------------


def _job(job_id: str, node: str, uid: int, state: str = "running", pid: int | None = None) -> Job:
    now = time.time()
    return Job(id=job_id, vo="atlas", vo_user="alice", role="", account="atlas_alice", uid=uid,
               node=node, state=state, command=("sleep", "1"), created=now, updated=now, ended=None,
               pid=pid, starttime=1 if pid else None, root_pid=2 if pid else None, job_dir="/nonexistent",
               log_dir="/nonexistent", exit_code=None, restored_from=None, parent_job=None,
               last_image=None, detail="")


async def test_a_gateway_reconciles_and_ends_only_its_own_nodes_jobs(pg_db, tmp_path):
    ams = await AMS.open(pg_db, POL, tmp_path / "nss", node="node-a")
    try:
        table = JobTable(ams.store)
        dead = 2 ** 22 + 12345  # above pid_max: no such process here
        for job in (_job("ja-run", "node-a", 270000, pid=dead), _job("jb-run", "node-b", 270000, pid=dead),
                    _job("jb-start", "node-b", 270000, state="starting"),
                    _job("ja-start", "node-a", 270000, state="starting")):
            await table.add(job)
        changed = await reconcile(table, "node-a")
        assert changed == {"ja-run": "lost", "ja-start": "failed"}
        assert (await table.get("jb-run")).state == "running"  # node b's: its own gateway decides
        assert (await table.get("jb-start")).state == "starting"
        # Acting on another node's job never marks it ended here either.
        manager = JobManager(table, spool_dir=str(tmp_path / "spool"), node="node-a")
        acc = await ams.map_identity(ident("alice"))
        assert acc.uid == 270000
        with pytest.raises(JobError):
            await manager.running("jb-run", acc)
        assert (await table.get("jb-run")).state == "running"
        assert {j.id for j in await table.list(uid=acc.uid)} == {"ja-run", "jb-run", "jb-start", "ja-start"}
        assert await table.counts(node="node-b") == {"running": 1, "starting": 1}
    finally:
        await ams.close()


async def test_reclaim_sees_jobs_and_processes_of_every_node(pg_db, tmp_path):
    clock = Clock()
    a = await AMS.open(pg_db, POL, tmp_path / "nss-a", node="node-a", clock=clock)
    b = await AMS.open(pg_db, POL, tmp_path / "nss-b", node="node-b", clock=clock)
    try:
        alice = await a.map_identity(ident("alice"))
        bob = await a.map_identity(ident("bob"))
        carol = await a.map_identity(ident("carol"))
        table = JobTable(b.store)
        await table.add(_job("jb-alice", "node-b", alice.uid, pid=os.getpid()))  # alice runs a job on B
        clock.t += 2 * 3600  # every lease expired
        # B's reclaim pass: bob has a process on node B; alice none, but a job running on B.
        assert await b.reclaim_expired(lambda uid: uid != bob.uid) == ["atlas_carol"]
        busy = await db_rows(pg_db, "SELECT node, uid FROM node_uids")
        assert [(r["node"], r["uid"]) for r in busy] == [("node-b", bob.uid)]
        # Node A sees no process of anybody, but keeps alice (job on B) and bob (process on B).
        assert await a.reclaim_expired(lambda uid: True) == []
        await table.update("jb-alice", state="exited", ended=time.time())
        assert await a.reclaim_expired(lambda uid: True) == ["atlas_alice"]
        # Bob's process on B ended: B's next pass finds him idle everywhere (A published nothing).
        assert await b.reclaim_expired(lambda uid: True) == ["atlas_bob"]
        assert await db_rows(pg_db, "SELECT * FROM node_uids") == []
        await eventually(lambda: not {alice.name, bob.name, carol.name} & passwd_names(tmp_path / "nss-a"),
                         3, "the reclaims on node a")
    finally:
        await closing(a, b)


async def test_job_operations_name_the_node_a_job_runs_on_and_poll_keeps_to_its_node(pg_db, tmp_path):
    """A running job of node B, seen by node A's JobManager: an operation on its processes
    is refused naming node B (not "ended"), and A's poll neither ends nor reports it, even
    though its pid is nobody's here; A's own such job is ended."""
    ams = await AMS.open(pg_db, POL, tmp_path / "nss", node="node-a")
    try:
        acc = await ams.map_identity(ident("alice"))
        table = JobTable(ams.store)
        dead = 2 ** 22 + 12345  # above pid_max: no such process here
        await table.add(_job("jb-run", "node-b", acc.uid, pid=dead))
        await table.add(_job("ja-run", "node-a", acc.uid, pid=dead))
        manager = JobManager(table, spool_dir=str(tmp_path / "spool"), node="node-a")
        for op in (manager.running("jb-run", acc), manager.kill("jb-run", acc),
                   manager.checkpoint("jb-run", acc)):
            with pytest.raises(JobError) as ei:
                await op
            assert ei.value.reason == "other-node"
            assert str(ei.value) == "job jb-run runs on node node-b; connect to that node"
        assert [j.id for j in await manager.poll()] == ["ja-run"]
        assert (await table.get("jb-run")).state == "running"
        assert (await table.get("ja-run")).state == "exited"
        assert [j.id for j in await table.list(node="node-b")] == ["jb-run"]
    finally:
        await ams.close()
