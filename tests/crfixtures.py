"""Fixtures of the checkpoint/restart tests, loaded with ``pytest_plugins = ["crfixtures"]``.

See crhelpers.py for why the test process is a child subreaper while a test runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from crhelpers import (
    PR_SET_CHILD_SUBREAPER,
    _libc,
    make_account,
    reap_zombie_children,
    uid_processes,
)
from gatewayproc import free_uid_range, kill_uid_processes, release_uid_range

from xos_sshd.ams import LocalAccount
from xos_sshd.ams.store import Store
from xos_sshd.cr.jobs import JobManager, JobTable


@pytest.fixture
def cr_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix='xos-test-cr-'))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cr_uids() -> Iterator[tuple[int, int]]:
    first, last = free_uid_range(start=310000)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield first, last
    finally:
        for _ in range(40):
            kill_uid_processes(first, last)
            reap_zombie_children()
            if not any(uid_processes(u) for u in (first, first + 1)):
                break
            time.sleep(0.05)
        reap_zombie_children()
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        release_uid_range(first)


@pytest.fixture
def account(cr_base: Path, cr_uids: tuple[int, int]) -> LocalAccount:
    """The main test account: with a supplementary group, as a VO member's account has."""
    return make_account(cr_base, cr_uids[0], groups=(('crvo', cr_uids[0] + 500),))


@pytest.fixture
def other_account(cr_base: Path, cr_uids: tuple[int, int]) -> LocalAccount:
    return make_account(cr_base, cr_uids[0] + 1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    st = await Store.open(str(tmp_path / 'ams.sqlite'))
    yield st
    await st.close()


@pytest.fixture
def manager(store: Store, cr_base: Path) -> JobManager:
    return JobManager(JobTable(store), spool_dir=str(cr_base / 'spool'), node='test')
