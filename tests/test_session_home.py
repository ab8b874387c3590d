"""Homes of released accounts (session/home.py) on the embedded store: a home root cannot
examine never passes for an absent one, and a home the name's next holder made is theirs.

Real directories, a real FUSE mount (tests/fusehang.py), root's real permissions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fusehang import HungMount

from xos_sshd.ams import LocalAccount
from xos_sshd.session.home import HomeError, archive_home, ensure_home

POOL_UID = 64100


def _account(base: Path, uid: int = POOL_UID, name: str = 'pool01') -> LocalAccount:
    return LocalAccount(name=name, uid=uid, gid=uid, groups=(), home=str(base / name),
                        shell='/bin/sh', gecos='', vo='dev', vo_user='alice')


@pytest.fixture
def base(tmp_path: Path) -> Path:
    base = tmp_path / 'home'
    base.mkdir(mode=0o755)
    return base


def test_a_home_hidden_under_a_mount_is_not_taken_for_absent(base: Path) -> None:
    """A pool account's holder mounts FUSE (no allow_other) over the home: root gets EACCES.
    Reclaim must fail loudly, not report "no home" and leave the files for the next holder."""
    account = _account(base)
    assert ensure_home(account) is True
    (Path(account.home) / '.bashrc').write_text('echo planted\n')
    mount = HungMount(account.home, POOL_UID, POOL_UID)
    try:
        with pytest.raises(HomeError, match='cannot examine .*pool01'):
            archive_home(account.home, account)
        with pytest.raises((HomeError, OSError)):
            ensure_home(account)  # nor is it handed to anyone while it cannot be examined
    finally:
        mount.abort()
        mount.unmount()
    assert archive_home(account.home, account) is not None  # once visible again: archived
    assert not os.path.lexists(account.home)


def test_a_home_the_next_holder_made_is_left_to_them(base: Path) -> None:
    """Released dynamic account (uid 64100): before its home is archived, the same name is
    mapped again under another uid and its home made anew.  The late archive of the released
    account must leave the new holder's home alone."""
    released = _account(base, 64100, 'dev-alice')
    ensure_home(released)
    os.rename(released.home, str(base / 'old'))  # (archived by someone meanwhile)
    again = _account(base, 64101, 'dev-alice')
    assert ensure_home(again) is True
    (Path(again.home) / 'work').write_text('new\n')
    assert archive_home(released.home, released) is None
    assert (Path(again.home) / 'work').read_text() == 'new\n'
