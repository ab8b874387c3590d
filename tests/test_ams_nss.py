"""The NSS tables written by the AMS: content, atomicity, the index hook, the hot path."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from datetime import datetime, timezone

import pytest

from xos_sshd.ams import AMS, VOPolicy, rewrite_nss_sync
from xos_sshd.ams.nss_tables import atomic_write, render_group, render_passwd
from xos_sshd.auth.identity import VOIdentity

POL = {
    "atlas": VOPolicy("atlas", uid_range=(230000, 230999), gid_range=(330000, 330999)),
    "cms": VOPolicy("cms", kind="pool", uid_range=(231000, 231001), gid_range=(331000, 331099),
                    pool=("cms01", "cms02")),
}


def ident(user: str, groups: tuple[str, ...] = ("atlas",), vo: str = "atlas") -> VOIdentity:
    return VOIdentity(vo=vo, user=user, groups=groups, role=None, serial=1,
                      not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                      key_fingerprint="SHA256:test")


@pytest.fixture
async def ams(tmp_path, ams_db):
    a = await AMS.open(ams_db, POL, tmp_path / "nss")
    yield a
    await a.close()


def test_render_formats():
    assert render_passwd([("u", 5000, 5001, "a:b@c (xos)", "/h/u", "/bin/sh")]) == b"u:x:5000:5001:a_b@c (xos):/h/u:/bin/sh\n"
    assert render_group([("g", 6000, ["a", "b"]), ("e", 6001, [])]) == b"g:x:6000:a,b\ne:x:6001:\n"


def test_atomic_write_mode_and_no_leftovers(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(str(tmp_path / "passwd"), b"x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "passwd").read_bytes() == b"x\n"
    assert os.stat(tmp_path / "passwd").st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["passwd"]


async def test_open_writes_empty_tables_and_cleans_stale_temps(tmp_path, ams_db):
    nss = tmp_path / "nss"
    nss.mkdir()
    (nss / ".passwd.tmp.123.abcd").write_text("half")
    (nss / "passwd").write_text("stale:x:1:1::/:/bin/sh\n")
    async with await AMS.open(ams_db, POL, nss):
        pass
    assert (nss / "passwd").read_text() == ""
    assert (nss / "group").read_text() == ""
    assert not [n for n in os.listdir(nss) if ".tmp." in n]


async def test_tables_catch_up_at_open_after_a_lost_rewrite(tmp_path, ams_db):
    db, nss = ams_db, tmp_path / "nss"
    async with await AMS.open(db, POL, nss) as ams:
        await ams.map_identity(ident("alice"))
    (nss / "passwd").write_text("")  # as if we crashed between commit and rewrite
    async with await AMS.open(db, POL, nss):
        pass
    assert (nss / "passwd").read_text().startswith("atlas_alice:x:230000:")


async def test_renewal_does_not_rewrite_tables(ams, tmp_path):
    passwd = tmp_path / "nss" / "passwd"
    await ams.map_identity(ident("alice"))
    n, ino = ams.nss_rewrites, os.stat(passwd).st_ino
    for _ in range(20):
        await ams.map_identity(ident("alice"))
    assert ams.nss_rewrites == n and os.stat(passwd).st_ino == ino
    await ams.map_identity(ident("alice", groups=("atlas", "new")))  # a group change does rewrite
    assert ams.nss_rewrites == n + 1 and os.stat(passwd).st_ino != ino
    await ams.map_identity(ident("bob"))
    assert ams.nss_rewrites == n + 2


async def test_renewal_is_fast(ams):
    await ams.map_identity(ident("alice"))
    t0 = time.perf_counter()
    rounds = 100
    for _ in range(rounds):
        await ams.map_identity(ident("alice"))
    per_login = (time.perf_counter() - t0) / rounds
    assert per_login < 0.05, f"renewal took {per_login * 1000:.1f} ms"


async def test_index_hook_called_with_entries(ams, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("xos_sshd.ams.nss_index")
    fake.write_index = lambda d, p, g: calls.append((d, p, g))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xos_sshd.ams.nss_index", fake)
    acc = await ams.map_identity(ident("alice", groups=("atlas",)))
    await ams.map_identity(ident("p1", vo="cms", groups=()))
    d, passwd, group = calls[-1]
    assert d == str(tmp_path / "nss")
    assert (acc.name, acc.uid, acc.gid, acc.gecos, acc.home, acc.shell) in passwd
    assert [e[0] for e in passwd] == ["atlas_alice", "cms01"]
    assert ("atlas_alice", acc.gid, []) in group
    assert ("atlas_atlas", acc.groups[0][1], ["atlas_alice"]) in group
    assert all(isinstance(m, list) for _, _, m in group)


async def test_index_hook_absent_is_fine(ams, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xos_sshd.ams.nss_index", None)  # import raises ImportError
    await ams.map_identity(ident("alice"))
    assert "atlas_alice" in (tmp_path / "nss" / "passwd").read_text()


async def test_readers_never_see_a_torn_table(ams, tmp_path):
    passwd = tmp_path / "nss" / "passwd"
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        last = 0
        while not stop.is_set():
            data = passwd.read_bytes()
            reads[0] += 1
            lines = data.split(b"\n")
            if lines[-1] != b"":
                problems.append(f"no trailing newline: {data[-40:]!r}")
            body = [ln for ln in lines[:-1]]
            if any(len(ln.split(b":")) != 7 for ln in body):
                problems.append("malformed line")
            if len(body) < last:
                problems.append(f"table shrank from {last} to {len(body)} lines")
            last = len(body)
            time.sleep(0.0002)  # let the event loop thread have the GIL

    th = threading.Thread(target=reader)
    th.start()
    try:
        for i in range(100):
            await ams.map_identity(ident(f"user{i:03d}-" + "x" * 20, groups=("atlas", f"g{i % 7}")))
    finally:
        stop.set()
        th.join()
    assert not problems, problems[:5]
    assert reads[0] > 10
    assert len(passwd.read_text().splitlines()) == 100


async def test_two_instances_keep_tables_complete(tmp_path, ams_db):
    db, nss = ams_db, tmp_path / "nss"
    import asyncio

    a = await AMS.open(db, POL, nss)
    b = await AMS.open(db, POL, nss)
    try:
        await asyncio.gather(*(x.map_identity(ident(f"u{i}")) for i, x in enumerate([a, b] * 15)))
    finally:
        await a.close()
        await b.close()
    names = {ln.split(":")[0] for ln in (nss / "passwd").read_text().splitlines()}
    assert names == {f"atlas_u{i}" for i in range(30)}


def test_rewrite_nss_sync_standalone(tmp_path):
    import asyncio

    async def setup() -> None:
        async with await AMS.open(tmp_path / "ams.sqlite", POL, tmp_path / "nss") as ams:
            await ams.map_identity(ident("alice"))
    asyncio.run(setup())
    (tmp_path / "nss" / "passwd").unlink()
    rewrite_nss_sync(str(tmp_path / "ams.sqlite"), str(tmp_path / "nss"))
    assert (tmp_path / "nss" / "passwd").read_text().startswith("atlas_alice:")


async def test_odd_user_names_give_valid_tables(ams, tmp_path):
    acc = await ams.map_identity(ident("We:ird\nName"))
    assert acc.name == "atlas_we_ird_name"
    assert acc.gecos == "We_ird_Name@atlas (xos)"
    line = (tmp_path / "nss" / "passwd").read_text().splitlines()[0]
    assert line.split(":") == [acc.name, "x", str(acc.uid), str(acc.gid), acc.gecos, acc.home, acc.shell]
