"""The AMS store: WAL, migrations, and the schema's own guarantees (constraints, not code)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest

from xos_sshd.ams import AMS, VOPolicy
from xos_sshd.ams.store import SCHEMA_VERSION, SchemaTooNew, Store
from xos_sshd.auth.identity import VOIdentity

POL = {"atlas": VOPolicy("atlas", uid_range=(220000, 220999), gid_range=(320000, 320999))}


def ident(user: str, groups: tuple[str, ...] = ("atlas",)) -> VOIdentity:
    return VOIdentity(vo="atlas", user=user, groups=groups, role=None, serial=1,
                      not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                      key_fingerprint="SHA256:test")


@pytest.fixture
async def db(tmp_path):
    path = tmp_path / "ams.sqlite"
    async with await AMS.open(path, POL, tmp_path / "nss") as ams:
        await ams.map_identity(ident("alice"))
        await ams.map_identity(ident("bob"))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    yield conn
    conn.close()


def insert_mapping(conn, **kw):
    row = dict(vo="atlas", vo_user="mallory", role="", kind="dynamic", name="atlas_mallory", uid=220500,
               gid=320500, home="/h", shell="/bin/sh", gecos="g", created_at=0, last_seen=0, lease_expires=1)
    row.update(kw)
    cols = ",".join(row)
    conn.execute(f"INSERT INTO mappings ({cols}) VALUES ({','.join('?' * len(row))})", list(row.values()))


def test_wal_and_version(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_schema_refuses_one_account_for_two_identities(db):
    alice_uid = db.execute("SELECT uid FROM mappings WHERE name = 'atlas_alice'").fetchone()[0]
    with pytest.raises(sqlite3.IntegrityError, match="mappings.uid"):
        insert_mapping(db, uid=alice_uid)
    with pytest.raises(sqlite3.IntegrityError, match="mappings.name"):
        insert_mapping(db, name="atlas_alice")
    # Two accounts for one identity: refused too.
    with pytest.raises(sqlite3.IntegrityError, match="mappings.vo, mappings.vo_user, mappings.role"):
        insert_mapping(db, vo_user="alice")
    # Sanity: a fresh identity/uid/name goes in.
    insert_mapping(db)


def test_schema_refuses_system_ids(db):
    for uid in (0, 999, 65534):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            insert_mapping(db, uid=uid)


def test_private_group_must_match_its_mapping(db):
    mid, gid = db.execute("SELECT id, gid FROM mappings WHERE name = 'atlas_alice'").fetchone()
    with pytest.raises(sqlite3.IntegrityError):  # second private group for alice
        db.execute("INSERT INTO groups (gid, name, vo, kind, owner) VALUES (320900, 'x', 'atlas', 'private', ?)", (mid,))
    db.execute("DELETE FROM groups WHERE owner = ?", (mid,))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):  # gid differs from alice's
        db.execute("INSERT INTO groups (gid, name, vo, kind, owner) VALUES (320900, 'x', 'atlas', 'private', ?)", (mid,))
    with pytest.raises(sqlite3.IntegrityError, match="groups.gid"):  # gid shared with another group
        db.execute(
            "INSERT INTO groups (gid, name, vo, kind, vo_group) SELECT gid, 'y', 'atlas', 'vo', 'zz' FROM groups"
            " WHERE kind = 'vo' LIMIT 1")


def test_deleting_a_mapping_cascades(db):
    mid = db.execute("SELECT id FROM mappings WHERE name = 'atlas_alice'").fetchone()[0]
    assert db.execute("SELECT count(*) FROM members WHERE mapping_id = ?", (mid,)).fetchone()[0] == 1
    db.execute("DELETE FROM mappings WHERE id = ?", (mid,))
    assert db.execute("SELECT count(*) FROM members WHERE mapping_id = ?", (mid,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM groups WHERE owner = ?", (mid,)).fetchone()[0] == 0


def test_history_is_append_only(db):
    assert db.execute("SELECT count(*) FROM mapping_history").fetchone()[0] == 2
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE mapping_history SET name = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM mapping_history")


async def test_reopen_keeps_mappings_and_does_not_remigrate(tmp_path):
    path = tmp_path / "ams.sqlite"
    async with await AMS.open(path, POL, tmp_path / "nss") as ams:
        a = await ams.map_identity(ident("alice"))
    async with await AMS.open(path, POL, tmp_path / "nss") as ams:
        assert await ams.find_mapping(ident("alice")) == a
        assert await ams.map_identity(ident("alice")) == a


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ams.sqlite"
    store = await Store.open(str(path))
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew):
        await Store.open(str(path))


async def test_failed_transaction_leaves_nothing(tmp_path):
    store = await Store.open(str(tmp_path / "s.sqlite"))
    try:
        with pytest.raises(RuntimeError):
            async with store.write() as txn:
                await txn.execute(
                    "INSERT INTO mappings (vo, vo_user, kind, name, uid, gid, home, shell, gecos, created_at,"
                    " last_seen, lease_expires) VALUES ('v','u','dynamic','n',5000,5000,'h','s','g',0,0,0)")
                raise RuntimeError("boom")
        async with store.read() as txn:
            assert await txn.scalar("SELECT count(*) FROM mappings") == 0
    finally:
        await store.close()
