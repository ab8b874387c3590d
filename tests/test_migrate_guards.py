"""Guards of the migration streams that a hostile account could otherwise abuse: how many
may run at once, and cleaning up trees deeper than Python's recursion limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xos_sshd.cr import imagefs, migrate
from xos_sshd.cr.service import CRError


def test_concurrent_migrations_are_capped_per_account_and_per_gateway() -> None:
    live = migrate._live_by_uid
    saved = dict(live)
    live.clear()
    try:
        live[5001] = migrate.MAX_PER_ACCOUNT
        with pytest.raises(CRError) as info:
            migrate._check_concurrency(5001, live_included=False)
        assert info.value.reason == 'too-many-migrations' and 'this account' in str(info.value)
        migrate._check_concurrency(5001, live_included=True)  # the stream already counted
        migrate._check_concurrency(5002, live_included=False)  # another account may
        for uid in range(6000, 6000 + migrate.MAX_PER_GATEWAY):
            live[uid] = 1
        live.pop(5001)
        with pytest.raises(CRError) as info:
            migrate._check_concurrency(5002, live_included=False)
        assert 'this node' in str(info.value)
    finally:
        live.clear()
        live.update(saved)


def test_a_tree_deeper_than_the_recursion_limit_is_removed(tmp_path: Path) -> None:
    top = tmp_path / 'spool'
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir('w', dir_fd=fd)
        depth = 1500  # shutil.rmtree recurses: RecursionError near 1000
        cur = os.open('w', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        for _ in range(depth):
            os.mkdir('d', dir_fd=cur)
            nxt = os.open('d', os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        os.close(cur)
        imagefs.remove(fd, 'w')
        assert os.listdir(top) == []
    finally:
        os.close(fd)
