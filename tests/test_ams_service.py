"""Behaviour of the AMS: policies, groups, leases, admin actions, history.

Every test that opens a store runs on both backends (``ams_db``: sqlite, PostgreSQL).
"""

from __future__ import annotations

import os
import pwd
from datetime import datetime, timezone

import pytest

from xos_sshd.ams import AMS, LocalAccount, MappingRefused, UnknownMapping, VOPolicy, sanitise_name
from xos_sshd.auth.identity import VOIdentity

UID0 = 210000
GID0 = 310000


def ident(user: str, vo: str = "atlas", groups: tuple[str, ...] = ("atlas",), role: str | None = None) -> VOIdentity:
    return VOIdentity(vo=vo, user=user, groups=tuple(groups), role=role, serial=1,
                      not_after=datetime(2099, 1, 1, tzinfo=timezone.utc), issuer="CN=Test CA",
                      key_fingerprint="SHA256:test")


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, hours: float) -> None:
        self.t += hours * 3600


def policies() -> dict[str, VOPolicy]:
    return {
        "atlas": VOPolicy("atlas", uid_range=(UID0, UID0 + 999), gid_range=(GID0, GID0 + 999),
                          home_base="/home/xos", shell="/bin/sh", lease_hours=10),
        "cms": VOPolicy("cms", kind="pool", uid_range=(UID0 + 1000, UID0 + 1009),
                        gid_range=(GID0 + 1000, GID0 + 1099), pool=("cmspool01", "cmspool02", "cmspool03"),
                        lease_hours=1),
        "roles": VOPolicy("roles", uid_range=(UID0 + 2000, UID0 + 2999), map_roles=True, account_prefix="r_"),
        "bare": VOPolicy("bare", uid_range=(UID0 + 3000, UID0 + 3999), account_prefix=""),
        "stat": VOPolicy("stat", kind="static", static={"alice": _static_target(), "rooty": "root",
                                                       "ghost": "no-such-account-xyz", "nob": "nobody"}),
    }


def _static_target() -> str:
    for pw in pwd.getpwall():
        if 1000 <= pw.pw_uid < 65534:
            return pw.pw_name
    return "root"  # no usable account: the static success test skips


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ams(tmp_path, clock, ams_db):
    a = await AMS.open(ams_db, policies(), tmp_path / "nss", clock=clock)
    yield a
    await a.close()


def read_table(path) -> dict[str, list[str]]:
    with open(path) as fh:
        return {line.split(":")[0]: line.rstrip("\n").split(":") for line in fh}


# -- naming -------------------------------------------------------------------------


@pytest.mark.parametrize("raw,out", [
    ("Alice", "alice"), ("j.doe", "j_doe"), ("9lives", "_9lives"), ("-x", "_-x"), ("José", "jos_"), ("", "_"),
])
def test_sanitise(raw, out):
    assert sanitise_name(raw) == out


# -- dynamic ------------------------------------------------------------------------


async def test_dynamic_first_login_creates_account(ams, tmp_path):
    acc = await ams.map_identity(ident("Alice", groups=("atlas", "atlas-prod")))
    assert isinstance(acc, LocalAccount)
    assert acc.name == "atlas_alice"
    assert acc.uid == UID0
    assert GID0 <= acc.gid <= GID0 + 999
    assert acc.home == "/home/xos/atlas_alice" and acc.shell == "/bin/sh"
    assert acc.gecos == "Alice@atlas (xos)"
    assert (acc.vo, acc.vo_user, acc.role) == ("atlas", "Alice", None)
    assert [n for n, _ in acc.groups] == ["atlas_atlas", "atlas_atlas-prod"]
    assert acc.gid not in acc.gids and len(set(acc.gids)) == 2

    passwd = read_table(tmp_path / "nss" / "passwd")
    group = read_table(tmp_path / "nss" / "group")
    assert passwd["atlas_alice"] == ["atlas_alice", "x", str(UID0), str(acc.gid), "Alice@atlas (xos)",
                                     "/home/xos/atlas_alice", "/bin/sh"]
    assert group["atlas_alice"] == ["atlas_alice", "x", str(acc.gid), ""]
    assert group["atlas_atlas"][3] == "atlas_alice"
    assert oct(os.stat(tmp_path / "nss" / "passwd").st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "nss" / "group").st_mode & 0o777) == "0o644"


async def test_same_identity_same_account_and_lowest_free_uid(ams):
    a1 = await ams.map_identity(ident("alice"))
    b1 = await ams.map_identity(ident("bob"))
    a2 = await ams.map_identity(ident("alice"))
    assert a1 == a2
    assert (a1.uid, b1.uid) == (UID0, UID0 + 1)
    assert await ams.find_mapping(ident("alice")) == a1
    assert await ams.find_mapping(ident("carol")) is None
    assert await ams.find_mapping(ident("x", vo="unknown")) is None


async def test_vo_group_shared_and_memberships_follow_relogin(ams, tmp_path):
    a = await ams.map_identity(ident("alice", groups=("atlas", "higgs")))
    b = await ams.map_identity(ident("bob", groups=("atlas",)))
    assert dict(a.groups)["atlas_atlas"] == dict(b.groups)["atlas_atlas"]
    group = read_table(tmp_path / "nss" / "group")
    assert group["atlas_atlas"][3] == "atlas_alice,atlas_bob"
    assert group["atlas_higgs"][3] == "atlas_alice"

    a2 = await ams.map_identity(ident("alice", groups=("atlas", "susy")))
    assert [n for n, _ in a2.groups] == ["atlas_atlas", "atlas_susy"]
    assert (a2.name, a2.uid, a2.gid) == (a.name, a.uid, a.gid)
    group = read_table(tmp_path / "nss" / "group")
    assert group["atlas_higgs"][3] == ""  # group kept (gid never reused), alice gone
    assert group["atlas_susy"][3] == "atlas_alice"
    higgs_gid = dict(a.groups)["atlas_higgs"]
    a3 = await ams.map_identity(ident("alice", groups=("higgs",)))
    assert a3.groups == (("atlas_higgs", higgs_gid),)


async def test_map_roles_gives_one_account_per_role(ams):
    p = await ams.map_identity(ident("alice", vo="roles", groups=("roles",), role="prod"))
    d = await ams.map_identity(ident("alice", vo="roles", groups=("roles",), role=None))
    p2 = await ams.map_identity(ident("alice", vo="roles", groups=("roles",), role="prod"))
    assert p == p2 and p.role == "prod"
    assert p.name == "r_alice_prod" and d.name == "r_alice"
    assert p.uid != d.uid
    # Without map_roles the role is not part of the key.
    x = await ams.map_identity(ident("carl", role="a"))
    y = await ams.map_identity(ident("carl", role="b"))
    assert x == y and x.role is None


async def test_long_and_colliding_names_get_stable_hash_suffix(ams, tmp_path, clock):
    long_user = "a-very-long-user-name-that-does-not-fit-in-32-characters"
    acc = await ams.map_identity(ident(long_user))
    assert len(acc.name) <= 32 and acc.name.startswith("atlas_a-very-long-user")
    assert acc.name[-7] == "-"
    # Case collision: "Bob" takes atlas_bob, "bob" gets a suffixed name.
    b1 = await ams.map_identity(ident("Bob"))
    b2 = await ams.map_identity(ident("bob"))
    assert b1.name == "atlas_bob" and b2.name.startswith("atlas_bob-") and len(b2.name) == len("atlas_bob") + 7
    # Collision with a system account: user "root" in a VO without prefix.
    r = await ams.map_identity(ident("root", vo="bare", groups=()))
    assert r.name != "root" and r.name.startswith("root-")
    # Stable: after a reclaim the same person gets the same name back.
    clock.advance(11)
    freed = await ams.reclaim_expired(lambda uid: True)
    assert acc.name in freed
    acc2 = await ams.map_identity(ident(long_user))
    assert acc2.name == acc.name


async def test_range_exhaustion(tmp_path, ams_db):
    pol = {"tiny": VOPolicy("tiny", uid_range=(UID0, UID0 + 1), gid_range=(GID0, GID0 + 9))}
    async with await AMS.open(ams_db, pol, tmp_path / "nss") as ams:
        await ams.map_identity(ident("u1", vo="tiny", groups=()))
        await ams.map_identity(ident("u2", vo="tiny", groups=()))
        with pytest.raises(MappingRefused) as ei:
            await ams.map_identity(ident("u3", vo="tiny", groups=()))
        assert ei.value.reason == "range-exhausted" and "tiny" in str(ei.value)
        assert len(await ams.list_mappings()) == 2


async def test_unknown_vo(ams):
    with pytest.raises(MappingRefused) as ei:
        await ams.map_identity(ident("x", vo="nope"))
    assert ei.value.reason == "unknown-vo"


# -- pool ---------------------------------------------------------------------------


async def test_pool_leases_stable_uids_and_exhaustion(ams, tmp_path):
    accs = [await ams.map_identity(ident(u, vo="cms", groups=("cms",))) for u in ("u1", "u2", "u3")]
    assert [a.name for a in accs] == ["cmspool01", "cmspool02", "cmspool03"]
    assert [a.uid for a in accs] == [UID0 + 1000, UID0 + 1001, UID0 + 1002]
    assert [a.gid for a in accs] == [GID0 + 1000, GID0 + 1001, GID0 + 1002]
    assert accs[0].home == "/home/cmspool01" and accs[0].gecos == "u1@cms (xos)"
    assert all(g[0][1] >= GID0 + 1003 for g in (a.groups for a in accs))  # VO groups outside the block
    with pytest.raises(MappingRefused) as ei:
        await ams.map_identity(ident("u4", vo="cms"))
    assert ei.value.reason == "pool-exhausted"
    assert "'cms'" in str(ei.value) and "3 pool accounts" in str(ei.value)
    # Nobody got mapped twice, and the leases hold.
    recs = await ams.list_mappings()
    assert sorted(r.account.name for r in recs if r.kind == "pool") == ["cmspool01", "cmspool02", "cmspool03"]
    assert (await ams.map_identity(ident("u2", vo="cms", groups=("cms",)))).name == "cmspool02"
    passwd = read_table(tmp_path / "nss" / "passwd")
    assert {"cmspool01", "cmspool02", "cmspool03"} <= set(passwd)


async def test_pool_release_and_reclaim_make_accounts_available(ams, clock):
    for u in ("u1", "u2", "u3"):
        await ams.map_identity(ident(u, vo="cms"))
    await ams.release("cmspool02")
    n = await ams.map_identity(ident("u4", vo="cms"))
    assert (n.name, n.uid) == ("cmspool02", UID0 + 1001)
    clock.advance(2)  # cms leases are 1 h
    busy = {UID0 + 1000}
    with pytest.raises(MappingRefused, match="expired lease awaiting reclaim"):
        await ams.map_identity(ident("u5", vo="cms"))
    freed = await ams.reclaim_expired(lambda uid: uid not in busy)
    assert sorted(freed) == ["cmspool02", "cmspool03"]
    assert (await ams.map_identity(ident("u5", vo="cms"))).name == "cmspool02"
    assert (await ams.map_identity(ident("u1", vo="cms"))).name == "cmspool01"  # busy one kept


async def test_pool_exhaustion_reclaims_on_the_spot_with_is_idle(tmp_path, ams_db, clock):
    idle: set[int] = set()
    pol = {"cms": policies()["cms"]}
    async with await AMS.open(ams_db, pol, tmp_path / "nss", clock=clock,
                              is_idle=lambda uid: uid in idle) as ams:
        for u in ("u1", "u2", "u3"):
            await ams.map_identity(ident(u, vo="cms"))
        clock.advance(2)
        with pytest.raises(MappingRefused):
            await ams.map_identity(ident("u4", vo="cms"))  # expired but none idle
        idle.add(UID0 + 1001)
        assert (await ams.map_identity(ident("u4", vo="cms"))).name == "cmspool02"


# -- static -------------------------------------------------------------------------


async def test_static_policy(ams, tmp_path):
    target = _static_target()
    if target == "root":
        pytest.skip("no account with uid >= 1000 on this machine")
    pw = pwd.getpwnam(target)
    acc = await ams.map_identity(ident("alice", vo="stat"))
    assert (acc.name, acc.uid, acc.gid, acc.home) == (pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    assert acc == await ams.map_identity(ident("alice", vo="stat"))
    assert acc == await ams.find_mapping(ident("alice", vo="stat"))
    assert target not in read_table(tmp_path / "nss" / "passwd")  # system account: not in our tables
    assert target not in read_table(tmp_path / "nss" / "group")


@pytest.mark.parametrize("user,reason", [
    ("nobody-here", "not-in-static-table"),
    ("rooty", "invalid-static-account"),
    ("ghost", "invalid-static-account"),
    ("nob", "invalid-static-account"),
])
async def test_static_refusals(ams, user, reason):
    with pytest.raises(MappingRefused) as ei:
        await ams.map_identity(ident(user, vo="stat"))
    assert ei.value.reason == reason
    assert await ams.list_mappings() == []


async def test_static_account_serves_one_identity_only(tmp_path, ams_db):
    target = _static_target()
    if target == "root":
        pytest.skip("no account with uid >= 1000 on this machine")
    pol = {"stat": VOPolicy("stat", kind="static", static={"a": target, "b": target})}
    async with await AMS.open(ams_db, pol, tmp_path / "nss") as ams:
        await ams.map_identity(ident("a", vo="stat"))
        with pytest.raises(MappingRefused) as ei:
            await ams.map_identity(ident("b", vo="stat"))
        assert ei.value.reason == "invalid-static-account" and "already serves a@stat" in str(ei.value)


async def test_static_table_change_drops_old_mapping(tmp_path, ams_db):
    target = _static_target()
    if target == "root":
        pytest.skip("no account with uid >= 1000 on this machine")
    db, nss = ams_db, tmp_path / "nss"
    async with await AMS.open(db, {"stat": VOPolicy("stat", kind="static", static={"a": target})}, nss) as ams:
        await ams.map_identity(ident("a", vo="stat"))
    async with await AMS.open(db, {"stat": VOPolicy("stat", kind="static", static={})}, nss) as ams:
        with pytest.raises(MappingRefused) as ei:
            await ams.map_identity(ident("a", vo="stat"))
        assert ei.value.reason == "not-in-static-table"
        assert await ams.list_mappings() == []
        assert [e.event for e in await ams.history(target)] == ["created", "released"]


# -- leases -------------------------------------------------------------------------


async def test_lease_renewed_on_every_login(ams, clock):
    await ams.map_identity(ident("alice"))
    rec = await ams.get_mapping("atlas_alice")
    assert rec is not None
    assert (rec.lease_expires - rec.last_seen).total_seconds() == 10 * 3600
    clock.advance(9)
    await ams.map_identity(ident("alice"))
    clock.advance(9)  # 18 h after creation, 9 h after the renewal: still live
    assert await ams.reclaim_expired(lambda uid: True) == []
    rec2 = await ams.get_mapping("atlas_alice")
    assert rec2 is not None and rec2.lease_expires > rec.lease_expires
    assert rec2.created_at == rec.created_at


async def test_reclaim_only_idle_dynamic_deletes_and_uid_reused_after(ams, clock, tmp_path):
    a = await ams.map_identity(ident("alice"))
    b = await ams.map_identity(ident("bob"))
    clock.advance(11)
    assert await ams.reclaim_expired(lambda uid: False) == []
    assert await ams.reclaim_expired(lambda uid: uid == a.uid) == ["atlas_alice"]
    assert "atlas_alice" not in read_table(tmp_path / "nss" / "passwd")
    assert "atlas_alice" not in read_table(tmp_path / "nss" / "group")
    assert "atlas_bob" in read_table(tmp_path / "nss" / "passwd")
    c = await ams.map_identity(ident("carol"))
    assert c.uid == a.uid  # reused only now, after the reclaim
    assert (await ams.map_identity(ident("bob"))) == b  # expired but not reclaimed: still the same


async def test_reclaim_skips_banned_and_pinned(ams, clock):
    await ams.map_identity(ident("alice"))
    await ams.map_identity(ident("bob"))
    await ams.ban("atlas_alice")
    await ams.pin("atlas_bob")
    clock.advance(100)
    assert await ams.reclaim_expired(lambda uid: True) == []
    await ams.pin("atlas_bob", False)
    assert await ams.reclaim_expired(lambda uid: True) == ["atlas_bob"]


# -- admin --------------------------------------------------------------------------


async def test_ban_release_unban(ams, tmp_path):
    acc = await ams.map_identity(ident("alice", groups=("atlas",)))
    await ams.map_identity(ident("bob", groups=("atlas",)))
    await ams.ban("atlas_alice")
    with pytest.raises(MappingRefused) as ei:
        await ams.map_identity(ident("alice"))
    assert ei.value.reason == "banned"
    with pytest.raises(MappingRefused):
        await ams.find_mapping(ident("alice"))
    passwd = read_table(tmp_path / "nss" / "passwd")
    group = read_table(tmp_path / "nss" / "group")
    assert "atlas_alice" not in passwd and "atlas_alice" not in group
    assert group["atlas_atlas"][3] == "atlas_bob"
    recs = {r.account.name: r for r in await ams.list_mappings()}
    assert recs["atlas_alice"].banned and not recs["atlas_bob"].banned
    await ams.unban("atlas_alice")
    assert await ams.map_identity(ident("alice")) == acc
    assert "atlas_alice" in read_table(tmp_path / "nss" / "passwd")
    await ams.release("atlas_alice")
    assert await ams.find_mapping(ident("alice")) is None
    assert "atlas_alice" not in read_table(tmp_path / "nss" / "passwd")
    with pytest.raises(UnknownMapping):
        await ams.release("atlas_alice")
    with pytest.raises(UnknownMapping):
        await ams.ban("nobody-such")


async def test_history_is_recorded(ams, clock):
    acc = await ams.map_identity(ident("alice"))
    await ams.map_identity(ident("alice"))  # a renewal: not recorded
    await ams.ban("atlas_alice")
    await ams.unban("atlas_alice")
    await ams.release("atlas_alice")
    clock.advance(1)
    await ams.map_identity(ident("alice"))
    clock.advance(11)
    await ams.reclaim_expired(lambda uid: True)
    events = await ams.history("atlas_alice")
    assert [e.event for e in events] == ["created", "banned", "unbanned", "released", "created", "released"]
    assert all((e.uid, e.vo, e.vo_user) == (acc.uid, "atlas", "alice") for e in events)
    assert events[-1].detail == "lease expired, account idle"
    assert len(await ams.history(limit=2)) == 2


async def test_mapping_for_uid(ams):
    acc = await ams.map_identity(ident("alice"))
    rec = await ams.mapping_for_uid(acc.uid)
    assert rec is not None and rec.account == acc and rec.kind == "dynamic"
    assert await ams.mapping_for_uid(12345678) is None


async def test_cancelled_login_still_completes_cleanly(ams, tmp_path):
    """A client that disconnects mid-login: the mapping and its tables still complete."""
    import asyncio

    task = asyncio.create_task(ams.map_identity(ident("alice", groups=("atlas", "higgs"))))
    await asyncio.sleep(0.002)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the shielded work finishes in the background
        if "atlas_alice" in read_table(tmp_path / "nss" / "passwd"):
            break
        await asyncio.sleep(0.01)
    assert "atlas_alice" in read_table(tmp_path / "nss" / "passwd")
    acc = await ams.find_mapping(ident("alice"))
    assert acc is not None and len(acc.groups) == 2
    bob = await ams.map_identity(ident("bob"))  # the connection is not left mid-transaction
    assert bob.uid == acc.uid + 1
