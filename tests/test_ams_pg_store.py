"""The PostgreSQL AMS store on a real server: schema, migrations, constraints, start errors,
configuration.  (The store-semantics tests of test_ams_service.py and test_ams_nss.py run on
both backends through the ``ams_db`` fixture; the cluster behaviour is in
test_ams_pg_cluster.py.)"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from xos_sshd.ams import AMS, VOPolicy
from xos_sshd.ams.store import SCHEMA_VERSION, PgSettings, SchemaTooNew, StoreOpenError, open_store
from xos_sshd.ams.store_pg import PG_MIGRATIONS, PgStore, connect_options, pg_sql
from xos_sshd.auth.identity import VOIdentity
from xos_sshd.config import ConfigError, check_store, parse_config

POL = {"atlas": VOPolicy("atlas", uid_range=(260000, 260999), gid_range=(360000, 360999))}


def ident(user: str, groups: tuple[str, ...] = ("atlas",)) -> VOIdentity:
    return VOIdentity(vo="atlas", user=user, groups=groups, role=None, serial=1,
                      not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                      key_fingerprint="SHA256:test")


async def connect(settings: PgSettings) -> asyncpg.Connection:
    """A plain connection of the store's role (as a second client or an admin's psql)."""
    return await asyncpg.connect(**connect_options(settings))


@pytest.fixture
async def db(tmp_path, pg_db):
    """A migrated database holding alice's and bob's mappings, and a plain connection to it."""
    async with await AMS.open(pg_db, POL, tmp_path / "nss") as ams:
        await ams.map_identity(ident("alice"))
        await ams.map_identity(ident("bob"))
    conn = await connect(pg_db)
    yield conn
    await conn.close()


async def insert_mapping(conn, **kw):
    row = dict(vo="atlas", vo_user="mallory", role="", kind="dynamic", name="atlas_mallory", uid=260500,
               gid=360500, home="/h", shell="/bin/sh", gecos="g", created_at=0.0, last_seen=0.0,
               lease_expires=1.0)
    row.update(kw)
    cols = ",".join(row)
    marks = ",".join(f"${i + 1}" for i in range(len(row)))
    await conn.execute(f"INSERT INTO mappings ({cols}) VALUES ({marks})", *row.values())


def test_placeholders_are_translated_outside_quotes():
    assert pg_sql("SELECT ? , '?', \"a?\", ?") == "SELECT $1 , '?', \"a?\", $2"
    assert pg_sql("WHERE a = 'it''s ?' AND b = ?") == "WHERE a = 'it''s ?' AND b = $1"


async def test_schema_version_and_tables(db):
    assert await db.fetchval("SELECT max(version) FROM xos_schema") == SCHEMA_VERSION
    tables = {r[0] for r in await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"mappings", "groups", "members", "mapping_history", "jobs", "node_uids",
            "xos_schema"} <= tables
    assert len(PG_MIGRATIONS) == SCHEMA_VERSION


async def test_schema_refuses_one_account_for_two_identities(db):
    alice_uid = await db.fetchval("SELECT uid FROM mappings WHERE name = 'atlas_alice'")
    with pytest.raises(asyncpg.UniqueViolationError, match="mappings_uid_key"):
        await insert_mapping(db, uid=alice_uid)
    with pytest.raises(asyncpg.UniqueViolationError, match="mappings_name_key"):
        await insert_mapping(db, name="atlas_alice")
    with pytest.raises(asyncpg.UniqueViolationError, match="mappings_vo_vo_user_role_key"):
        await insert_mapping(db, vo_user="alice")
    await insert_mapping(db)  # a fresh identity/uid/name goes in


async def test_schema_refuses_system_ids(db):
    for uid in (0, 999, 65534):
        with pytest.raises(asyncpg.CheckViolationError):
            await insert_mapping(db, uid=uid)


async def test_private_group_must_match_its_mapping(db):
    mid = await db.fetchval("SELECT id FROM mappings WHERE name = 'atlas_alice'")
    with pytest.raises(asyncpg.UniqueViolationError):  # second private group for alice
        await db.execute("INSERT INTO groups (gid, name, vo, kind, owner) VALUES (360900, 'x', 'atlas', 'private', $1)", mid)
    await db.execute("DELETE FROM groups WHERE owner = $1", mid)
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # gid differs from alice's
        await db.execute("INSERT INTO groups (gid, name, vo, kind, owner) VALUES (360900, 'x', 'atlas', 'private', $1)", mid)
    with pytest.raises(asyncpg.UniqueViolationError, match="groups_pkey"):  # gid of another group
        await db.execute("INSERT INTO groups (gid, name, vo, kind, vo_group) SELECT gid, 'y', 'atlas', 'vo', 'zz'"
                         " FROM groups WHERE kind = 'vo' LIMIT 1")


async def test_deleting_a_mapping_cascades(db):
    mid = await db.fetchval("SELECT id FROM mappings WHERE name = 'atlas_alice'")
    assert await db.fetchval("SELECT count(*) FROM members WHERE mapping_id = $1", mid) == 1
    await db.execute("DELETE FROM mappings WHERE id = $1", mid)
    assert await db.fetchval("SELECT count(*) FROM members WHERE mapping_id = $1", mid) == 0
    assert await db.fetchval("SELECT count(*) FROM groups WHERE owner = $1", mid) == 0


async def test_history_is_append_only(db):
    assert await db.fetchval("SELECT count(*) FROM mapping_history") == 2
    for sql in ("UPDATE mapping_history SET name = 'x'", "DELETE FROM mapping_history",
                "TRUNCATE mapping_history"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await db.execute(sql)
    assert await db.fetchval("SELECT count(*) FROM mapping_history") == 2


async def test_reopen_keeps_mappings_and_does_not_remigrate(tmp_path, pg_db):
    async with await AMS.open(pg_db, POL, tmp_path / "nss") as ams:
        a = await ams.map_identity(ident("alice"))
    async with await AMS.open(pg_db, POL, tmp_path / "nss2") as ams:
        assert await ams.find_mapping(ident("alice")) == a
        assert await ams.map_identity(ident("alice")) == a
    conn = await connect(pg_db)
    try:
        assert [r[0] for r in await conn.fetch("SELECT version FROM xos_schema ORDER BY version")] \
            == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await conn.close()


async def test_concurrent_first_opens_migrate_exactly_once(pg_db):
    """Eight gateways starting at once on an empty database: one migrates, the others wait for
    the write lock and find the schema done (a second run would fail on CREATE TABLE)."""
    stores = await asyncio.gather(*(PgStore.open(pg_db) for _ in range(8)))
    try:
        async with stores[0].read() as txn:
            rows = await txn.all("SELECT version, applied_at FROM xos_schema ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_newer_schema_is_refused(pg_db):
    store = await open_store(pg_db)
    async with store.write() as txn:
        await txn.execute("INSERT INTO xos_schema (version, applied_at, applied_by) VALUES (?, 0, 'future')",
                          (SCHEMA_VERSION + 1,))
    await store.close()
    with pytest.raises(SchemaTooNew, match="newer"):
        await open_store(pg_db)


async def test_failed_transaction_leaves_nothing(pg_db):
    store = await open_store(pg_db)
    try:
        with pytest.raises(RuntimeError):
            async with store.write() as txn:
                await txn.execute(
                    "INSERT INTO mappings (vo, vo_user, kind, name, uid, gid, home, shell, gecos, created_at,"
                    " last_seen, lease_expires) VALUES ('v','u','dynamic','n',5000,5000,'h','s','g',0,0,0)")
                raise RuntimeError("boom")
        async with store.read() as txn:
            assert await txn.scalar("SELECT count(*) FROM mappings") == 0
        # The write lock went with the rollback: the next writer gets it at once.
        t0 = time.monotonic()
        async with store.write() as txn:
            assert await txn.execute("UPDATE mappings SET pinned = 1") == 0
        assert time.monotonic() - t0 < 1
    finally:
        await store.close()


# -- start errors: one line naming the server and database, and why --------------------


async def test_unreachable_server_at_start_is_one_clear_line(pg_db):
    from gatewayproc import free_port
    port = free_port()  # nothing listens there
    settings = replace(pg_db, dsn=f"postgresql://xos@127.0.0.1:{port}/clusterdb", retry_seconds=0.5)
    t0 = time.monotonic()
    with pytest.raises(StoreOpenError) as ei:
        await open_store(settings)
    text = str(ei.value)
    assert text.startswith(f"AMS store postgresql://xos@127.0.0.1:{port}/clusterdb unreachable: ")
    assert "refused" in text and "\n" not in text
    assert time.monotonic() - t0 < 5


async def test_wrong_password_and_unknown_database_are_refusals(pg_db, pg_server, tmp_path):
    bad = tmp_path / "badpass"
    bad.write_text("not-the-password\n")
    with pytest.raises(StoreOpenError, match=r"refused the connection: password authentication failed"):
        await open_store(replace(pg_db, password_file=str(bad)))
    nodb = replace(pg_db, dsn=pg_db.dsn.rsplit("/", 1)[0] + "/no_such_db")
    with pytest.raises(StoreOpenError, match=r"/no_such_db refused the connection: .*does not exist"):
        await open_store(nodb)
    with pytest.raises(StoreOpenError, match="cannot read the password file"):
        await open_store(replace(pg_db, password_file=str(tmp_path / "missing")))


async def test_password_from_the_environment(pg_db, pg_server, monkeypatch):
    monkeypatch.setenv("XOS_TEST_AMS_PASSWORD", pg_server.password)
    store = await open_store(replace(pg_db, password_file=None, password_env="XOS_TEST_AMS_PASSWORD"))
    await store.close()


def test_gateway_start_against_a_dead_server_exits_with_one_line(tmp_path, dev_ca, uid_range, home_base):
    from conftest import dynamic_vo
    from gatewayproc import XOS_SSHD, GatewayProcess, free_port, run
    gw = GatewayProcess.configure(tmp_path, {"dev": dynamic_vo(dev_ca, uid_range, home_base)})
    port = free_port()
    (tmp_path / "pw").write_text("secret\n")
    gw.config.write_text(gw.config.read_text() + f'[ams]\nstore = "postgresql://xos@127.0.0.1:{port}/xos"\n'
                         f'password_file = "{tmp_path / "pw"}"\nretry_seconds = 1\n')
    res = run(XOS_SSHD, "--config", str(gw.config), "--check-config", check=False)
    assert res.returncode == 0, res.stderr
    assert f"AMS store: postgresql://xos@127.0.0.1:{port}/xos (password from {tmp_path / 'pw'})" in res.stdout
    res = run(XOS_SSHD, "--config", str(gw.config), check=False, timeout=30)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and f"AMS store postgresql://xos@127.0.0.1:{port}/xos unreachable: " in errors[0], res.stderr
    assert "Traceback" not in res.stderr


# -- configuration -------------------------------------------------------------------


def _raw(tmp_path: Path, ams: dict) -> dict:
    return {"state_dir": str(tmp_path), "host_keys": ["/k"], "ams": ams,
            "vo": {"dev": {"ca": "/ca.pem", "uid_range": [300000, 300999]}}}


def test_config_default_is_the_embedded_sqlite(tmp_path):
    cfg = parse_config(_raw(tmp_path, {}))
    assert cfg.ams_pg is None and cfg.ams_store == tmp_path / "ams.sqlite"
    assert cfg.describe_store() == f"sqlite {tmp_path / 'ams.sqlite'}"
    with pytest.raises(ConfigError, match="^ams.password_file: only for a PostgreSQL store"):
        parse_config(_raw(tmp_path, {"password_file": "/x"}))


def test_config_postgresql_store(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = parse_config(_raw(tmp_path, {"store": "postgresql://xos@db.example:5433/ams",
                                       "password_file": str(pw), "retry_seconds": 3,
                                       "nss_refresh_seconds": 30, "pool_size": 2}))
    assert cfg.ams_store == cfg.ams_pg
    assert cfg.ams_pg == PgSettings("postgresql://xos@db.example:5433/ams", password_file=str(pw),
                                    retry_seconds=3.0, nss_refresh_seconds=30.0, pool_size=2)
    assert cfg.ams_pg.password() == "s3cret"
    assert "s3cret" not in cfg.describe_store()
    check_store(cfg)
    pw.unlink()
    with pytest.raises(ConfigError, match="^ams.password_file: .*No such file"):
        check_store(cfg)
    sock = parse_config(_raw(tmp_path, {"store": "postgresql://xos@/ams?host=/run/postgresql"}))
    assert sock.ams_pg.describe() == "postgresql://xos@/run/postgresql:5432/ams"


@pytest.mark.parametrize("ams, key, text", [
    ({"store": "postgresql://xos:hunter2@db/ams"}, "ams.store", "must not hold the password"),
    ({"store": "postgresql://xos@db/ams?password=hunter2"}, "ams.store", "must not hold the password"),
    ({"store": "mysql://db/ams"}, "ams.store", 'must be "sqlite" or a postgresql:// URL'),
    ({"store": "postgresql://db/ams", "password_file": "relative"}, "ams.password_file", "absolute"),
    ({"store": "postgresql://db/ams", "password_env": "not a name"}, "ams.password_env", "not an environment"),
    ({"store": "postgresql://db/ams", "password_env": "A", "password_file": "/x"}, "ams.password_env", "not both"),
    ({"store": "postgresql://db/ams", "retry_seconds": -1}, "ams.retry_seconds", "between"),
    ({"store": "postgresql://db/ams", "pool_size": 1.5}, "ams.pool_size", "integer"),
    ({"store": "postgresql://db/ams", "typo": 1}, "ams.typo", "unknown key"),
])
def test_config_mistakes_name_the_key(tmp_path, ams, key, text):
    with pytest.raises(ConfigError) as ei:
        parse_config(_raw(tmp_path, ams))
    assert str(ei.value).startswith(f"{key}: ") and text in str(ei.value)


def test_check_store_needs_the_environment_variable(tmp_path, monkeypatch):
    cfg = parse_config(_raw(tmp_path, {"store": "postgresql://db/ams", "password_env": "XOS_NOPE_PW"}))
    monkeypatch.delenv("XOS_NOPE_PW", raising=False)
    with pytest.raises(ConfigError, match=r"^ams.password_env: \$XOS_NOPE_PW is not set"):
        check_store(cfg)
    monkeypatch.setenv("XOS_NOPE_PW", "x")
    check_store(cfg)


# -- xos-sshd doctor -------------------------------------------------------------------


def _doctor_line(config: Path) -> tuple[int, str]:
    from gatewayproc import XOS_SSHD, run
    res = run(XOS_SSHD, "doctor", "--config", str(config), check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln[5:].startswith("AMS store: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    return res.returncode, lines[0]


async def test_doctor_reports_the_shared_store(tmp_path, dev_ca, uid_range, home_base, pg_db):
    from conftest import dynamic_vo
    from gatewayproc import GatewayProcess, free_port
    gw = GatewayProcess.configure(tmp_path, {"dev": dynamic_vo(dev_ca, uid_range, home_base)})
    text = gw.config.read_text()
    gw.config.write_text(text + f'[ams]\nstore = "{pg_db.dsn}"\npassword_file = "{pg_db.password_file}"\n')
    where = pg_db.describe()
    code, line = await asyncio.to_thread(_doctor_line, gw.config)
    assert line.startswith(f"WARN AMS store: {where} (password from {pg_db.password_file}): reachable, "
                           f"schema version 0 (the gateway migrates it to {SCHEMA_VERSION} at start)"), line
    async with await AMS.open(pg_db, {"dev": VOPolicy("dev", uid_range=uid_range)}, tmp_path / "nss"):
        pass  # a gateway started once: migrated
    async with await AMS.open(pg_db, {"dev": VOPolicy("dev", uid_range=uid_range)}, tmp_path / "nss") as ams:
        await ams.map_identity(VOIdentity(vo="dev", user="alice", groups=("dev",), role=None, serial=1,
                                          not_after=datetime(2099, 1, 1, tzinfo=timezone.utc),
                                          issuer="CN=Test CA", key_fingerprint="SHA256:test"))
    code, line = await asyncio.to_thread(_doctor_line, gw.config)
    assert line == (f"OK   AMS store: {where} (password from {pg_db.password_file}): reachable, schema "
                    f"version {SCHEMA_VERSION}, 1 mapped account(s), no mapped uid or gid in /etc/passwd "
                    "or /etc/group"), line
    port = free_port()
    gw.config.write_text(text + f'[ams]\nstore = "postgresql://xos@127.0.0.1:{port}/xos"\n'
                         f'password_file = "{pg_db.password_file}"\n')
    code, line = await asyncio.to_thread(_doctor_line, gw.config)
    assert code == 1 and line.startswith(f"FAIL AMS store: postgresql://xos@127.0.0.1:{port}/xos ")
    assert "cannot read it:" in line and "fix: start the database server" in line


async def test_doctor_names_a_local_account_on_a_mapped_uid(tmp_path, pg_db, monkeypatch):
    """A node whose /etc/passwd got an account on a uid the cluster maps (the same uid would be
    two people): doctor fails the store check and names both."""
    from xos_sshd import doctor
    from xos_sshd.ams import ranges
    async with await AMS.open(pg_db, POL, tmp_path / "nss") as ams:
        acc = await ams.map_identity(ident("alice"))
    cfg = parse_config(_raw(tmp_path, {"store": pg_db.dsn, "password_file": pg_db.password_file}))
    real = ranges.read_system_ids()
    clash = ranges.SystemIds(real.users + (ranges.SystemEntry("localbob", acc.uid, "/etc/passwd"),), real.groups)
    monkeypatch.setattr(ranges, "read_system_ids", lambda *a: clash)
    [finding] = await asyncio.to_thread(lambda: list(doctor.check_store(cfg)))
    assert finding.level == "fail" and f"atlas_alice (uid {acc.uid})" in finding.detail, finding
    monkeypatch.setattr(ranges, "read_system_ids", lambda *a: real)
    [finding] = await asyncio.to_thread(lambda: list(doctor.check_store(cfg)))
    assert finding.level == "ok", finding


async def test_doctor_reports_the_sqlite_store(tmp_path):
    from xos_sshd import doctor
    cfg = parse_config(_raw(tmp_path, {}))
    [finding] = list(doctor.check_store(cfg))
    assert finding.level == "ok" and "not created yet" in finding.detail
    async with await AMS.open(cfg.ams_db, POL, tmp_path / "nss") as ams:
        await ams.map_identity(ident("alice"))
    [finding] = list(doctor.check_store(cfg))
    assert finding.line() == (f"OK   AMS store: sqlite {cfg.ams_db}: schema version {SCHEMA_VERSION}, "
                              "1 mapped account(s), no mapped uid or gid in /etc/passwd or /etc/group")


async def test_a_rotated_password_is_read_again_for_new_connections(pg_db, pg_server, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(pg_server.password + "\n")
    pw.chmod(0o600)
    store = await open_store(replace(pg_db, password_file=str(pw)))
    try:
        pg_server.psql(f"ALTER ROLE {pg_server.user} PASSWORD 'rotated-secret'")
        pw.write_text("rotated-secret\n")
        db = pg_db.dsn.rsplit("/", 1)[1]
        pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
                       " AND pid <> pg_backend_pid()")
        async with store.write() as txn:  # the pool reconnects with the new password
            assert await txn.scalar("SELECT count(*) FROM mappings") == 0
    finally:
        pg_server.psql(f"ALTER ROLE {pg_server.user} PASSWORD '{pg_server.password}'")
        await store.close()
