"""Homes in a cluster: a mapping released on one node must not leave its home to the next
lessee on another node.  A real PostgreSQL server (tests/pgserver.py), real directories owned
by real (unused) uids, the AMS's real NOTIFY refresh; no mocks.

"Node B's homes" are a second home base: the account's ``home`` with B's base put in front
(what the same path is on another machine).  test_ams_pg_nodes.py does the same with two
gateway processes, the second in a mount namespace of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from test_ams_pg_cluster import eventually, ident

from xos_sshd.ams import AMS, LocalAccount, VOPolicy
from xos_sshd.session.home import (
    OWNERS_DIR,
    archive_home,
    archive_released,
    ensure_home,
    list_owners,
)


@pytest.fixture
def bases(home_base: Path) -> tuple[Path, Path]:
    """Home bases of node A and node B (root-owned 0755, as a node's /home)."""
    a, b = home_base / 'a', home_base / 'b'
    for d in (a, b):
        d.mkdir(mode=0o755)
    return a, b


def policies(kind: str, uid_range: tuple[int, int], home_base: Path) -> dict[str, VOPolicy]:
    first = uid_range[0]
    if kind == 'pool':
        return {'cms': VOPolicy('cms', kind='pool', uid_range=(first, first + 9),
                                gid_range=(first, first + 99), pool=('cmsq0',),
                                home_base=str(home_base))}
    return {'atlas': VOPolicy('atlas', uid_range=(first, first + 99), gid_range=(first, first + 99),
                              home_base=str(home_base))}


def on(base: Path, account: LocalAccount) -> LocalAccount:
    """*account* as node *base* sees it: the same home path, on that node's disk."""
    return replace(account, home=str(base / os.path.basename(account.home)))


def markers(base: Path) -> list[str]:
    """The uids with an owner marker in *base* (the lock files beside them left out)."""
    return sorted(p.name for p in (base / OWNERS_DIR).iterdir() if p.name.isdigit())


def attic(base: Path) -> list[Path]:
    d = base / '.reclaimed'
    return sorted(d.iterdir()) if d.exists() else []


async def test_the_next_lessee_of_a_pool_account_never_gets_the_previous_ones_home(
        pg_db, tmp_path, uid_range, bases):
    """Node A releases; bob leases the same pool account and logs in on B at once, before B
    heard anything: the login itself archives alice's home there and makes bob a new one."""
    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('pool', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice', vo='cms', groups=('cms',)))
        assert alice.lease  # a shared store: the account carries its lease
        alice_b = on(base_b, alice)
        assert await asyncio.to_thread(ensure_home, alice_b) is True
        Path(alice_b.home, 'notes').write_text('alice private')
        # The same lease again (a renewal, another login): the same home, untouched.
        again = await a.map_identity(ident('alice', vo='cms', groups=('cms',)))
        assert again.lease == alice.lease
        assert await asyncio.to_thread(ensure_home, on(base_b, again)) is False
        assert Path(alice_b.home, 'notes').read_text() == 'alice private'

        await a.release(alice.name)
        bob = await a.map_identity(ident('bob', vo='cms', groups=('cms',)))
        assert (bob.name, bob.uid, bob.home) == (alice.name, alice.uid, alice.home)
        assert bob.lease != alice.lease
        bob_b = on(base_b, bob)
        assert await asyncio.to_thread(ensure_home, bob_b) is True
        assert os.listdir(bob_b.home) == []
        st = os.stat(bob_b.home)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (bob.uid, 0o700)
        [archived] = attic(base_b)
        assert (archived / 'notes').read_text() == 'alice private'
        marker = json.loads((base_b / OWNERS_DIR / str(bob.uid)).read_text())
        assert (marker['lease'], marker['vo_user'], marker['home']) == (bob.lease, 'bob', bob_b.home)
        assert stat.S_IMODE((base_b / OWNERS_DIR).stat().st_mode) == 0o700
    finally:
        await a.close()


async def test_a_reused_dynamic_uid_never_owns_the_previous_holders_home(pg_db, tmp_path, uid_range, bases):
    """alice (uid U) is released on node A; carol gets uid U.  When carol logs in on node B,
    alice's home there (owned by U) is archived first: uid U never reaches alice's files."""
    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('dynamic', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice'))
        alice_b = on(base_b, alice)
        await asyncio.to_thread(ensure_home, alice_b)
        Path(alice_b.home, 'notes').write_text('alice private')
        os.chown(Path(alice_b.home, 'notes'), alice.uid, alice.gid)
        await a.release(alice.name)
        carol = await a.map_identity(ident('carol'))
        assert carol.uid == alice.uid and carol.name != alice.name
        assert await asyncio.to_thread(ensure_home, on(base_b, carol)) is True
        assert not os.path.lexists(alice_b.home)
        [archived] = attic(base_b)
        assert archived.name.startswith(f'{alice.name}.')
        assert (archived / 'notes').read_text() == 'alice private'
        assert markers(base_b) == [str(carol.uid)]
    finally:
        await a.close()


async def test_every_node_archives_the_homes_of_mappings_released_elsewhere(pg_db, tmp_path, uid_range, bases):
    """Node B hears of the release (NOTIFY) and archives its home of that lease without any
    login; a home whose lease lives is left alone."""
    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('dynamic', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    b = await AMS.open(pg_db, policies('dynamic', uid_range, base_b), tmp_path / 'nss-b', node='node-b')
    try:
        alice = await a.map_identity(ident('alice'))
        bob = await a.map_identity(ident('bob'))
        for acc in (alice, bob):
            await asyncio.to_thread(ensure_home, on(base_b, acc))
        Path(on(base_b, alice).home, 'notes').write_text('alice private')
        await a.release(alice.name)
        took = await eventually(lambda: not os.path.lexists(on(base_b, alice).home), 5,
                                "node b archiving alice's home")
        print(f'\nreleased on A, home archived on B after {took * 1000:.0f} ms')
        [archived] = attic(base_b)
        assert (archived / 'notes').read_text() == 'alice private'
        assert os.path.isdir(on(base_b, bob).home)  # bob's lease lives
        assert markers(base_b) == [str(bob.uid)]
        # Nothing more to do at the next refresh.
        assert await b.archive_ended_homes() == []
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_the_refresh_never_undoes_a_login_that_took_the_uid_over(pg_db, tmp_path, uid_range, bases):
    """The markers were read, then a new lessee of the same pool account logged in, then the
    refresh acts on what it read: the new home stays (each marker is read again under the
    lock)."""
    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('pool', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice', vo='cms', groups=('cms',)))
        await asyncio.to_thread(ensure_home, on(base_b, alice))
        stale = await asyncio.to_thread(list_owners, [str(base_b)])
        assert [o.lease for o in stale] == [alice.lease]
        await a.release(alice.name)
        bob = await a.map_identity(ident('bob', vo='cms', groups=('cms',)))
        assert await asyncio.to_thread(ensure_home, on(base_b, bob)) is True
        Path(on(base_b, bob).home, 'mine').write_text('bob')
        assert await asyncio.to_thread(archive_released, stale) == []
        assert Path(on(base_b, bob).home, 'mine').read_text() == 'bob'
        assert len(attic(base_b)) == 1  # alice's, by bob's login
    finally:
        await a.close()


async def test_archiving_a_home_drops_its_marker_and_follows_no_link(pg_db, tmp_path, uid_range, bases):
    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('dynamic', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice'))
        alice_b = on(base_b, alice)
        await asyncio.to_thread(ensure_home, alice_b)
        # The account's own symlink inside its home is carried along, never followed.
        outside = tmp_path / 'outside'
        outside.mkdir()
        os.symlink(outside, Path(alice_b.home, 'link'))
        target = await asyncio.to_thread(archive_home, alice_b.home, alice_b)
        assert target and os.path.islink(Path(target, 'link')) and outside.is_dir()
        assert markers(base_b) == []
    finally:
        await a.close()


async def test_a_late_archive_of_the_released_lease_leaves_the_next_ones_home(pg_db, tmp_path, uid_range,
                                                                             bases):
    """The node that released archives the home after the release committed; a new lessee
    that logged in on that node in between keeps the home made for it."""
    base_a, _ = bases
    a = await AMS.open(pg_db, policies('pool', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice', vo='cms', groups=('cms',)))
        await asyncio.to_thread(ensure_home, alice)
        await a.release(alice.name)
        bob = await a.map_identity(ident('bob', vo='cms', groups=('cms',)))
        assert await asyncio.to_thread(ensure_home, bob) is True  # alice's archived by the login
        assert await asyncio.to_thread(archive_home, alice.home, alice) is None  # bob's stays
        assert os.path.isdir(bob.home) and len(attic(base_a)) == 1
        assert markers(base_a) == [str(bob.uid)]
    finally:
        await a.close()


async def test_a_home_without_a_marker_is_not_handed_to_a_lease(pg_db, tmp_path, uid_range, bases):
    """Whatever sits at the path without being recorded for this lease (a home from before
    markers, a crash between mkdir and marker) is archived, not handed out."""
    base_a, _ = bases
    a = await AMS.open(pg_db, policies('dynamic', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    try:
        alice = await a.map_identity(ident('alice'))
        os.mkdir(alice.home, 0o700)
        Path(alice.home, 'old').write_text('whose?')
        assert await asyncio.to_thread(ensure_home, alice) is True
        assert os.listdir(alice.home) == []
        [archived] = attic(base_a)
        assert (archived / 'old').read_text() == 'whose?'
    finally:
        await a.close()


async def test_the_sqlite_store_keeps_homes_as_before(tmp_path, uid_range, bases):
    """One node, sqlite: no lease, no marker; an existing home is used as it is (the node
    that frees a mapping archives the home itself, as before)."""
    base_a, _ = bases
    async with await AMS.open(tmp_path / 'ams.sqlite', policies('pool', uid_range, base_a),
                              tmp_path / 'nss', node='node-a') as a:
        alice = await a.map_identity(ident('alice', vo='cms', groups=('cms',)))
        assert alice.lease == ''
        assert await asyncio.to_thread(ensure_home, alice) is True
        Path(alice.home, 'notes').write_text('kept')
        assert await asyncio.to_thread(ensure_home, alice) is False
        assert Path(alice.home, 'notes').read_text() == 'kept'
        assert not (base_a / OWNERS_DIR).exists()
        assert await a.archive_ended_homes() == []
        target = await asyncio.to_thread(archive_home, alice.home)
        assert target and Path(target, 'notes').read_text() == 'kept'
        assert not (base_a / OWNERS_DIR).exists()


async def test_a_home_that_hangs_holds_up_neither_other_accounts_nor_the_nss_refresh(
        pg_db, tmp_path, uid_range, bases):
    """While alice's home locks are held (as by a call stuck on her home), bob's login and
    node B's NSS refresh go on; alice's home is archived once her locks are free."""
    import fcntl

    from test_ams_pg_cluster import passwd_names

    base_a, base_b = bases
    a = await AMS.open(pg_db, policies('dynamic', uid_range, base_a), tmp_path / 'nss-a', node='node-a')
    b = await AMS.open(pg_db, policies('dynamic', uid_range, base_b), tmp_path / 'nss-b', node='node-b')
    held: list[int] = []
    try:
        alice = await a.map_identity(ident('alice'))
        bob = await a.map_identity(ident('bob'))  # another uid: nothing of alice's to wait for
        await asyncio.to_thread(ensure_home, on(base_b, alice))
        for key in (f'uid-{alice.uid}', f'name-{alice.name}'):
            fd = os.open(base_b / OWNERS_DIR / f'.lock-{key}', os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)
        await a.release(alice.name)
        assert await asyncio.wait_for(asyncio.to_thread(ensure_home, on(base_b, bob)), 5) is True
        assert os.path.isdir(on(base_b, alice).home)  # waiting for its locks
        carol = await a.map_identity(ident('carol'))
        await eventually(lambda: carol.name in passwd_names(tmp_path / 'nss-b'), 5, 'carol on node b')
        for fd in held:
            os.close(fd)
        held.clear()
        await eventually(lambda: not os.path.lexists(on(base_b, alice).home), 5, "alice's home archived")
        assert os.path.isdir(on(base_b, bob).home)
    finally:
        for fd in held:
            os.close(fd)
        await asyncio.gather(a.close(), b.close())
