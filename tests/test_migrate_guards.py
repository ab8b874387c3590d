"""Guards of the migration streams that a hostile account could otherwise abuse: how many
may run at once, cleaning up trees the account wrote (deeper than Python's recursion limit,
or changed while root removes them), and when a lazy dump counts as complete.  Real CRIU,
real uids (crfixtures)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from crhelpers import wait_for
from test_cr_migrate import lazy_sysctls  # noqa: F401 (fixture)

from xos_sshd.ams import LocalAccount
from xos_sshd.cr import criu, imagefs, migimage, migrate
from xos_sshd.cr.images import ImageError, ImageStore
from xos_sshd.cr.jobs import JobError, JobManager
from xos_sshd.cr.service import CRError, CRService

pytest_plugins = ["crfixtures"]  # fixtures: account, manager, store, cr_base


def test_concurrent_migrations_are_capped_per_account_and_per_gateway(
        manager: JobManager, cr_base: Path) -> None:
    images = ImageStore.open(cr_base / 'state', node_name='n', quota_bytes=1 << 20, quota_count=5)
    service = CRService(manager, images, None)
    ledger = service.migrations
    tokens = [ledger.enter(5001) for _ in range(migrate.MAX_PER_ACCOUNT)]
    with pytest.raises(CRError) as info:
        migrate.check_concurrency(service, 5001, live_included=False)
    assert info.value.reason == 'too-many-migrations' and 'this account' in str(info.value)
    migrate.check_concurrency(service, 5001, live_included=True)  # the stream already counted
    migrate.check_concurrency(service, 5002, live_included=False)  # another account may
    for token in tokens:
        ledger.leave(token)
    tokens = [ledger.enter(uid) for uid in range(6000, 6000 + migrate.MAX_PER_GATEWAY)]
    with pytest.raises(CRError) as info:
        migrate.check_concurrency(service, 5002, live_included=False)
    assert 'this node' in str(info.value)


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


# ------------------------------------------------------------------ cleaning up user-written trees

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def _remove_swapping(path: str, dir_fd: int, pairs: int) -> None:
    """``migimage.discard(path)`` while "the account" swaps each (directory ``sN``, symlink
    ``lN``) pair of the tree (renameat2 RENAME_EXCHANGE, as it may at any time) right before
    every ``os.open`` root makes: the worst moment for whoever checks an entry and then
    opens it by name.  (A process of the account swapping in a loop wins that race about
    one time in twenty here; this makes it every time.)"""

    def swap(frame: Any, event: str, arg: Any) -> None:
        if event == 'c_call' and arg is os.open:
            for i in range(pairs):
                _libc.renameat2(dir_fd, f's{i}'.encode(), dir_fd, f'l{i}'.encode(),
                                RENAME_EXCHANGE)

    sys.setprofile(swap)
    try:
        migimage.discard(path)
    finally:
        sys.setprofile(None)


def test_removing_a_tree_the_account_is_changing_never_opens_what_it_points_to(
        manager: JobManager, account: LocalAccount, cr_base: Path) -> None:
    """The migration's clean-up of a directory the account can write (a lazy work
    directory, a page server's directory, a failed dump) never follows a link the account
    swaps in while root walks the tree: it opens nothing but directories, without following,
    and still removes everything."""
    fifo = cr_base / 'fifo'
    os.mkfifo(fifo, 0o600)
    tree = Path(manager._make_image_dir(account, 'w' + secrets.token_hex(8)))
    pairs = 20
    for i in range(pairs):
        (tree / f's{i}').mkdir()
        (tree / f's{i}' / 'core-1.img').write_bytes(b'x')
        os.symlink(fifo, tree / f'l{i}')
    for entry in [*tree.iterdir(), *tree.glob('s*/*')]:
        os.lchown(entry, account.uid, account.gid)
    dfd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    remover = threading.Thread(target=_remove_swapping, args=(str(tree), dfd, pairs))
    opened = 0
    try:
        remover.start()
        while remover.is_alive():
            try:  # succeeds only while root holds the fifo open for reading (and frees it)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                opened += 1
            except OSError:
                pass
            remover.join(0.005)
    finally:
        os.close(dfd)
    assert opened == 0, f'root opened the account\'s fifo {opened} times while removing its tree'
    assert not tree.exists() and fifo.exists()


# ------------------------------------------------------------------ lazy-dump readiness

#: A job that keeps open a file whose name is what CRIU logs when a lazy dump is ready.
FAKE_READY = r'''
import os, time
f = open(os.path.expanduser('~/Starting lazy pages server'), 'w')
f.write('x'); f.flush()
open(os.path.expanduser('~/opened'), 'w').close()
time.sleep(600)
'''


async def test_lazy_dump_readiness_cannot_be_faked_by_the_job(
        lazy_sysctls: None, manager: JobManager, account: LocalAccount) -> None:  # noqa: F811
    """The images of a lazy dump are taken over (sealed) only once CRIU itself says they are
    complete: no text the job puts in CRIU's log (a file name here) can start it early."""
    job = await manager.start(account, ['/usr/bin/python3', '-c', FAKE_READY])
    await asyncio.to_thread(wait_for, lambda: (Path(account.home) / 'opened').exists(), 15,
                            'the job to open its file')
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[list[str]] = []

    def ready(images_dir: str) -> None:
        seen.append(sorted(os.listdir(images_dir)))
        ours.shutdown(socket.SHUT_RDWR)  # no lazy-pages daemon here: the dump ends

    work = manager._make_image_dir(account, 'w' + secrets.token_hex(8))
    fd = theirs.detach()
    try:
        try:  # its page server loses its peer at once: the dump may end either way
            await manager.checkpoint(
                job.id, account, extra_args=['--lazy-pages', '--ps-socket', str(fd),
                                             '--work-dir', work],
                dump_options={'keep_stopped': True, 'pass_fds': [fd], 'images_ready': ready})
        except JobError:
            pass
    finally:
        criu.thaw_namespace(job.namespace, job.uid)
        ours.close()
        migimage.discard(work)
    assert len(seen) == 1 and 'inventory.img' in seen[0] and 'pstree.img' in seen[0], seen


# ------------------------------------------------------------------ state per gateway


def test_migration_counters_belong_to_each_gateway(manager: JobManager, cr_base: Path) -> None:
    """Two gateways in one process count their own streams: one at its limits does not
    refuse the other's."""
    images = ImageStore.open(cr_base / 'state', node_name='n', quota_bytes=1 << 20, quota_count=5)
    one, two = (CRService(manager, images, None) for _ in range(2))
    tokens = [one.migrations.enter(5001) for _ in range(migrate.MAX_PER_ACCOUNT)]
    with pytest.raises(CRError) as info:
        migrate.check_concurrency(one, 5001, live_included=False)
    assert info.value.reason == 'too-many-migrations'
    migrate.check_concurrency(two, 5001, live_included=False)
    for token in tokens:
        one.migrations.leave(token)
    migrate.check_concurrency(one, 5001, live_included=False)


def test_a_stale_usage_read_never_lowers_the_figure_while_other_entries_live(
        manager: JobManager, cr_base: Path) -> None:
    """An upload that read its account's image usage before another entry's import noted
    the new figure must not put the older, lower one back (that would let the account stage
    past its quota by up to one image)."""
    images = ImageStore.open(cr_base / 'state', node_name='n', quota_bytes=1 << 20, quota_count=5)
    ledger = CRService(manager, images, None).migrations
    importing = ledger.enter(5001, 'upload')
    ledger.note_stored(5001, 100)
    late = ledger.enter(5001, 'upload')
    ledger.note_stored(5001, 900_000)  # the first one's import landed
    ledger.note_stored(5001, 100)   # the second's read, made before it
    with pytest.raises(ImageError, match='quota'):
        ledger.charge(late, 200_000, images)
    ledger.leave(importing)
    ledger.note_stored(5001, 100)   # alone again: the figure follows the store (an rm)
    ledger.charge(late, 200_000, images)
    ledger.leave(late)
