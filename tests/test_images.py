"""The signed image store with real CRIU dumps under real uids: commit, restore, export/import,
and every refusal ("an unverified image is a root exploit").

Nothing is skipped: the dumps are CRIU's own (tests/crfixtures.py), the hostile inputs are
what an account or an uploader could really put in front of the store.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import io
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from crhelpers import ints, kill_tree_of, wait_for
from imagehelpers import (
    end,
    member,
    read_tar,
    rewrite_creds,
    signed_archive,
    tar_of,
    ustar_header,
)

from xos_sshd.ams import LocalAccount
from xos_sshd.cr import imagefs
from xos_sshd.cr.images import ImageError, ImageStore, Owner
from xos_sshd.cr.jobs import JobManager, process_alive
from xos_sshd.cr.manifest import load_trusted_keys, parse_manifest, verify

pytest_plugins = ["crfixtures"]  # fixtures: account, other_account, manager, store, cr_base

COUNTER = 'i=0; while :; do i=$((i+1)); echo $i; echo $i >> count; sleep 0.05; done'
QUOTA = 200 << 20


def owner_of(account: LocalAccount) -> Owner:
    return Owner(account.vo, account.vo_user)


@pytest.fixture
def images(cr_base: Path) -> ImageStore:
    return ImageStore.open(cr_base / 'state', node_name='node-a', quota_bytes=QUOTA, quota_count=5)


async def dump(manager: JobManager, account: LocalAccount, *, stop: bool = True,
               argv: list[str] | None = None):
    """A finished CRIU dump of a counting job (spool directory, as the jobs layer leaves it)."""
    job = await manager.start(account, argv or ['sh', '-c', COUNTER])
    count = Path(account.home) / 'count'
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= 3, 15, 'counting')
    return job, await manager.checkpoint(job.id, account, stop=stop)


async def committed(manager: JobManager, images: ImageStore, account: LocalAccount):
    job, ck = await dump(manager, account)
    info = await images.commit(ck.images_dir, account, owner_of(account), job.id,
                               job.command, '4.1.1')
    return job, ck, info


def as_user(account: LocalAccount, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), user=account.uid, group=account.gid, extra_groups=[],
                          capture_output=True, text=True, timeout=30, check=False)


def spawn_as(account: LocalAccount, code: str) -> subprocess.Popen[bytes]:
    """A Python process of *account* (stdin/stdout pipes) running *code*."""
    return subprocess.Popen(['python3', '-c', code], user=account.uid, group=account.gid,
                            extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def staging_empty(images: ImageStore) -> bool:
    return os.listdir(images.images_dir / '.staging') == []


def uid_images(images: ImageStore, uid: int) -> list[str]:
    path = images.images_dir / str(uid)
    return sorted(os.listdir(path)) if path.exists() else []


def tar_listing(path: Path) -> list[str]:
    """``tar -tvf`` (GNU tar) of an archive."""
    return subprocess.run(['tar', '-tvf', str(path)], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def export_bytes(path: Path) -> bytes:
    return path.read_bytes()


# -- commit ---------------------------------------------------------------------------------

async def test_commit_makes_a_root_owned_signed_image(manager: JobManager, images: ImageStore,
                                                      account: LocalAccount) -> None:
    job, ck, info = await committed(manager, images, account)
    assert info.id == ck.image_id == info.origin_id and info.uid == account.uid
    assert info.owner == owner_of(account) and info.job_id == job.id
    assert info.command == job.command and info.node == 'node-a'
    assert info.signed_by == images.fingerprint and info.file_count > 5
    assert not os.path.exists(ck.images_dir)  # moved, not copied
    json.dumps(info.as_dict())
    mode = lambda p: (os.lstat(p).st_uid, stat.S_IMODE(os.lstat(p).st_mode))
    d = images.images_dir / str(account.uid) / info.id
    assert mode(images.images_dir) == (0, 0o711)
    assert mode(d.parent) == (0, 0o711) and mode(d) == (0, 0o700)
    names = set(os.listdir(d))
    assert {'manifest.json', 'manifest.sig', 'inventory.img', 'pstree.img'} <= names
    assert all(mode(d / n) == (0, 0o400) for n in names)
    m = parse_manifest((d / 'manifest.json').read_bytes())
    assert set(m.files) == names - {'manifest.json', 'manifest.sig'}
    assert (m.uid, m.gid, m.owner, m.criu_version) == (account.uid, account.gid,
                                                      owner_of(account), '4.1.1')
    assert m.size_bytes == info.size_bytes
    # The signature is the node key's over the exact bytes.
    pub = load_trusted_keys([images.state_dir / 'image_key.pub'])
    assert verify(pub, (d / 'manifest.json').read_bytes(), (d / 'manifest.sig').read_bytes()) == m
    assert [i.id for i in await images.list(account.uid)] == [info.id]
    assert await images.get(account.uid, info.id) == info
    assert await images.usage(account.uid) == (info.size_bytes, 1)
    key = images.state_dir / 'image_key'
    assert mode(key) == (0, 0o600) and mode(str(key) + '.pub')[1] == 0o644
    again = ImageStore.open(images.state_dir, node_name='node-a')
    assert again.fingerprint == images.fingerprint  # the key is made once


async def test_restore_from_the_store_counts_on(manager: JobManager, images: ImageStore,
                                                account: LocalAccount) -> None:
    job = await manager.start(account, ['sh', '-c', COUNTER])
    count = Path(account.home) / 'count'
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= 5, 15, 'counting')
    before = ints(count)[-1]
    ck = await manager.checkpoint(job.id, account)  # left running
    after = ints(count)[-1]
    info = await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    await asyncio.to_thread(wait_for, lambda: ints(count)[-1] >= after + 10, 15, 'counting on')
    kill_tree_of(job.pid)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    killed_at, last = len(ints(count)), ints(count)[-1]
    rdir = await images.restore_dir(account, owner_of(account), info.id)
    assert Path(rdir).parent == images.restore_root / str(account.uid)
    new = await manager.restore(rdir, account, image_id=info.id, parent_job=job.id)
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= killed_at + 10, 15, 'restored')
    resumed = ints(count)[killed_at:]
    assert before <= resumed[0] <= after + 1 < last
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    await manager.kill(new.id, account, signal.SIGKILL)
    await images.release_restore_dir(rdir)
    assert not os.path.exists(rdir)
    assert len(os.listdir(images.images_dir / str(account.uid) / info.id)) == info.file_count + 2


async def test_restore_dir_is_readable_by_the_account_only(manager: JobManager, images: ImageStore,
                                                           account: LocalAccount,
                                                           other_account: LocalAccount) -> None:
    _, _, info = await committed(manager, images, account)
    rdir = Path(await images.restore_dir(account, owner_of(account), info.id))
    assert {p.name for p in rdir.iterdir()} == set(parse_manifest(
        (images.images_dir / str(account.uid) / info.id / 'manifest.json').read_bytes()).files)
    st = os.lstat(rdir)
    assert st.st_uid == 0 and not st.st_mode & 0o022
    f = rdir / 'inventory.img'
    original = f.read_bytes()
    assert as_user(account, 'cat', str(f)).returncode == 0
    assert as_user(account, 'ls', str(rdir)).returncode == 0
    for argv in (['sh', '-c', f'echo x >> {f}'], ['sh', '-c', f'echo x > {f}'],
                 ['rm', '-f', str(f)], ['mv', str(f), str(rdir / 'x')], ['chmod', '666', str(f)],
                 ['touch', str(rdir / 'new')], ['ln', '-s', '/etc/passwd', str(rdir / 'core-9.img')],
                 ['truncate', '-s', '0', str(f)], ['chmod', '777', str(rdir)]):
        assert as_user(account, *argv).returncode != 0, argv
    assert f.read_bytes() == original and sorted(os.listdir(rdir)) == sorted(
        p.name for p in rdir.iterdir())
    # Another account reads nothing: not the directory, not a file by name.
    assert as_user(other_account, 'cat', str(f)).returncode != 0
    assert as_user(other_account, 'ls', str(rdir)).returncode != 0
    # Nor the store itself.
    stored = images.images_dir / str(account.uid) / info.id / 'inventory.img'
    assert as_user(account, 'cat', str(stored)).returncode != 0


async def test_spool_on_another_filesystem(store, account: LocalAccount,
                                           images: ImageStore) -> None:
    """A spool that is not on the store's filesystem (/dev/shm is tmpfs): copied, then gone."""
    import tempfile

    from xos_sshd.cr.jobs import JobTable
    spool = tempfile.mkdtemp(prefix='xos-test-spool-', dir='/dev/shm')
    try:
        os.chmod(spool, 0o711)
        shm = JobManager(JobTable(store), spool_dir=spool, node='test')
        job, ck = await dump(shm, account)
        assert os.stat(ck.images_dir).st_dev != os.stat(images.images_dir).st_dev
        info = await images.commit(ck.images_dir, account, owner_of(account), job.id,
                                   job.command, '4.1.1')
        assert not os.path.exists(ck.images_dir) and staging_empty(images)
        rdir = await images.restore_dir(account, owner_of(account), info.id)
        assert len(os.listdir(rdir)) == info.file_count
    finally:
        shutil.rmtree(spool, ignore_errors=True)


async def test_restore_dir_without_acls(manager: JobManager, images: ImageStore,
                                        account: LocalAccount, other_account: LocalAccount,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem has no POSIX ACLs, the account's primary group gets read access."""
    _, _, info = await committed(manager, images, account)

    def no_acl(*_: object) -> None:
        raise OSError(errno.EOPNOTSUPP, 'Operation not supported')

    monkeypatch.setattr(os, 'setxattr', no_acl)
    rdir = Path(await images.restore_dir(account, owner_of(account), info.id))
    st = os.stat(rdir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, account.gid, 0o750)
    f = rdir / 'inventory.img'
    st = os.stat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, account.gid, 0o440)
    assert as_user(account, 'cat', str(f)).returncode == 0
    assert as_user(account, 'rm', '-f', str(f)).returncode != 0
    assert as_user(other_account, 'cat', str(f)).returncode != 0


# -- refusals at commit ---------------------------------------------------------------------

class Inotify:
    """Watch one file for any open, read or attribute change (a tripwire)."""

    IN_ACCESS, IN_ATTRIB, IN_OPEN = 0x1, 0x4, 0x20

    def __init__(self, path: str | Path, mask: int = IN_ACCESS | IN_ATTRIB | IN_OPEN) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert libc.inotify_add_watch(self.fd, str(path).encode(), mask) >= 0

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 4096) if select.select([self.fd], [], [], 0)[0] else b''
        finally:
            os.close(self.fd)


async def test_symlink_planted_in_the_spool_is_never_followed(manager: JobManager, images: ImageStore,
                                                              account: LocalAccount,
                                                              cr_base: Path) -> None:
    job, ck = await dump(manager, account)
    canary = cr_base / 'canary'
    canary.write_text('secret canary\n')
    canary.chmod(0o600)
    shadow = os.stat('/etc/shadow')
    # Planted by the account itself, in its own spool directory.
    assert as_user(account, 'ln', '-s', '/etc/shadow', f'{ck.images_dir}/aa-shadow.img').returncode == 0
    assert as_user(account, 'ln', '-s', str(canary), f'{ck.images_dir}/zz-canary.img').returncode == 0
    watch = Inotify(str(canary))
    with pytest.raises(ImageError) as info:
        await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert info.value.reason == 'bad-archive' and "'aa-shadow.img' is a symbolic link" in str(info.value)
    assert watch.events() == b''  # the canary was never opened, read or chmodded
    after = os.stat('/etc/shadow')
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_ctime_ns) == \
        (shadow.st_mode, shadow.st_uid, shadow.st_gid, shadow.st_ctime_ns)
    assert not os.path.exists(ck.images_dir) and uid_images(images, account.uid) == []
    secret = Path('/etc/shadow').read_bytes()
    for root, _, files in os.walk(images.state_dir):
        for name in files:
            data = (Path(root) / name).read_bytes()
            assert b'secret canary' not in data and (len(secret) < 8 or secret not in data)


@pytest.mark.parametrize('plant, what', [
    ('fifo', "'evil.img' is a fifo"),
    ('dir', "'evil.img' is a directory"),
    ('root-hardlink', "'evil.img' belongs to uid 0"),
    ('own-hardlink', "'evil.img' has 2 links"),
    ('bad-name', 'is not an image file name'),
    ('manifest', "'manifest.json' is not an image file name"),
])
async def test_odd_spool_entries_refuse_the_dump(manager: JobManager, images: ImageStore,
                                                 account: LocalAccount, cr_base: Path,
                                                 plant: str, what: str) -> None:
    job, ck = await dump(manager, account)
    spool = Path(ck.images_dir)
    canary = cr_base / 'canary'
    canary.write_text('secret\n')
    canary.chmod(0o640)
    if plant == 'fifo':
        os.mkfifo(spool / 'evil.img')
    elif plant == 'dir':
        (spool / 'evil.img').mkdir()
        (spool / 'evil.img' / 'x').write_text('x')
    elif plant == 'root-hardlink':  # as if fs.protected_hardlinks were 0
        os.link(canary, spool / 'evil.img')
    elif plant == 'own-hardlink':
        assert as_user(account, 'ln', f'{spool}/inventory.img', f'{spool}/evil.img').returncode == 0
    elif plant == 'bad-name':
        (spool / 'sp ace.img').write_text('x')
    else:
        (spool / 'manifest.json').write_text('{}')
    before = os.stat(canary)
    watch = Inotify(canary, Inotify.IN_OPEN | Inotify.IN_ACCESS)  # (unlinking a link is ATTRIB)
    with pytest.raises(ImageError) as info:
        await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert info.value.reason == 'bad-archive' and what in str(info.value), str(info.value)
    assert watch.events() == b''  # never opened
    after = os.stat(canary)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    assert not spool.exists() and uid_images(images, account.uid) == []


async def test_spool_is_locked_before_any_file_is_taken(manager: JobManager, images: ImageStore,
                                                       account: LocalAccount,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    job, ck = await dump(manager, account)
    seen: list[tuple[int, int, int]] = []
    real = imagefs._take_file

    def spy(dfd: int, name: str, acc: LocalAccount) -> tuple[int, str]:
        if not seen:  # the account tries to slip a file in as the first one is taken
            res = as_user(account, 'sh', '-c', f'echo x > {ck.images_dir}/zz-late.img')
            st = os.fstat(dfd)
            seen.append((res.returncode, st.st_uid, stat.S_IMODE(st.st_mode)))
        return real(dfd, name, acc)

    monkeypatch.setattr(imagefs, '_take_file', spy)
    info = await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert seen[0][0] != 0 and seen[0][1:] == (0, 0o700)
    assert 'zz-late.img' not in os.listdir(images.images_dir / str(account.uid) / info.id)


async def test_file_still_open_for_writing_is_refused(manager: JobManager, images: ImageStore,
                                                      account: LocalAccount) -> None:
    job, ck = await dump(manager, account)
    target = f'{ck.images_dir}/pstree.img'
    writer = spawn_as(account, f'import time\nf = open({target!r}, "r+b")\nprint(1, flush=True)\n'
                               'time.sleep(60)')
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b'1'
        with pytest.raises(ImageError) as info:
            await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
        assert info.value.reason == 'bad-archive'
        assert "'pstree.img' is still open for writing" in str(info.value)
    finally:
        writer.kill()
        writer.wait()


async def test_without_leases_the_files_are_copied(manager: JobManager, images: ImageStore,
                                                   account: LocalAccount,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    job, ck = await dump(manager, account)
    target = f'{ck.images_dir}/pstree.img'
    writer = spawn_as(account, f'import sys, time\nf = open({target!r}, "r+b")\n'
                               'print(1, flush=True)\nsys.stdin.readline()\n'
                               'f.write(b"EVIL" * 10); f.flush()\nprint(2, flush=True)\ntime.sleep(60)')
    monkeypatch.setattr(imagefs, 'no_writers', lambda fd: None)  # as where leases are off
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == b'1'
        info = await images.commit(ck.images_dir, account, owner_of(account), job.id,
                                   job.command, '4.1.1')
        writer.stdin.write(b'go\n')
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == b'2'  # it wrote into the old inode...
        rdir = await images.restore_dir(account, owner_of(account), info.id)  # ...not the image
        assert b'EVIL' not in (Path(rdir) / 'pstree.img').read_bytes()
    finally:
        writer.kill()
        writer.wait()


async def test_forged_credentials_in_the_spool_are_refused(manager: JobManager, images: ImageStore,
                                                           account: LocalAccount) -> None:
    job, ck = await dump(manager, account)
    core = Path(ck.images_dir) / 'core-2.img'
    core.write_bytes(rewrite_creds(core.read_bytes(), uid=0, euid=0, suid=0, fsuid=0))
    with pytest.raises(ImageError) as info:
        await images.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert info.value.reason == 'wrong-credentials'
    assert 'core-2.img has uids [0, 0, 0, 0]' in str(info.value)
    assert not os.path.exists(ck.images_dir) and uid_images(images, account.uid) == []


async def test_quota_count_and_bytes(manager: JobManager, account: LocalAccount, cr_base: Path) -> None:
    one = ImageStore.open(cr_base / 'state', node_name='n', quota_bytes=QUOTA, quota_count=1)
    _, _, first = await committed(manager, one, account)
    job, ck = await dump(manager, account)
    with pytest.raises(ImageError) as info:
        await one.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert info.value.reason == 'quota-exceeded'
    assert '2 images of 1 allowed' in str(info.value) and f'bytes of {QUOTA} allowed' in str(info.value)
    assert not os.path.exists(ck.images_dir) and uid_images(one, account.uid) == [first.id]
    small = ImageStore.open(cr_base / 'state', node_name='n', quota_bytes=first.size_bytes + 1000,
                            quota_count=10)
    job, ck = await dump(manager, account)
    with pytest.raises(ImageError) as info:
        await small.commit(ck.images_dir, account, owner_of(account), job.id, job.command, '4.1.1')
    assert info.value.reason == 'quota-exceeded'
    assert f'bytes of {first.size_bytes + 1000} allowed' in str(info.value)
    assert '2 images of 10 allowed' in str(info.value)
    assert not os.path.exists(ck.images_dir) and uid_images(small, account.uid) == [first.id]
    # Imports count against the same quota, and leave nothing behind either.
    archive = export_bytes(await one.export_archive(account.uid, first.id))
    for store in (one, small):
        with pytest.raises(ImageError) as info:
            await store.import_archive(account, owner_of(account), io.BytesIO(archive))
        assert info.value.reason == 'quota-exceeded', str(info.value)
        assert staging_empty(store) and uid_images(store, account.uid) == [first.id]


# -- other accounts -------------------------------------------------------------------------

async def test_another_accounts_image_does_not_exist(manager: JobManager, images: ImageStore,
                                                     account: LocalAccount,
                                                     other_account: LocalAccount) -> None:
    _, _, info = await committed(manager, images, account)
    other = owner_of(other_account)
    for op in (images.get(other_account.uid, info.id), images.remove(other_account.uid, info.id),
               images.restore_dir(other_account, other, info.id),
               images.export_archive(other_account.uid, info.id),
               images.get(account.uid, '../' + info.id), images.get(account.uid, 'inope'),
               images.restore_dir(account, owner_of(account), '..')):
        with pytest.raises(ImageError) as exc:
            await op
        assert exc.value.reason == 'no-such-image'
    assert await images.list(other_account.uid) == []
    # The same uid under another identity (a pool account re-leased): not its owner.
    with pytest.raises(ImageError) as exc:
        await images.restore_dir(account, Owner(account.vo, 'mallory'), info.id)
    assert exc.value.reason == 'not-owner'
    await images.remove(account.uid, info.id)
    assert await images.list(account.uid) == [] and staging_empty(images)
    with pytest.raises(ImageError) as exc:
        await images.get(account.uid, info.id)
    assert exc.value.reason == 'no-such-image'


# -- tampering with a stored image ----------------------------------------------------------

@pytest.mark.parametrize('change, reason', [
    ('byte', 'tampered'), ('extra', 'tampered'), ('missing', 'tampered'),
    ('manifest-uid', 'bad-signature'), ('unsigned', 'bad-signature'), ('symlink', 'tampered'),
])
async def test_tampered_store_is_refused_at_restore(manager: JobManager, images: ImageStore,
                                                    account: LocalAccount, change: str,
                                                    reason: str) -> None:
    _, _, info = await committed(manager, images, account)
    d = images.images_dir / str(account.uid) / info.id
    if change == 'byte':
        data = bytearray((d / 'pages-1.img').read_bytes())
        data[len(data) // 2] ^= 1
        (d / 'pages-1.img').write_bytes(bytes(data))
    elif change == 'extra':
        (d / 'core-99.img').write_bytes(b'x')
    elif change == 'missing':
        (d / 'stats-dump').unlink()
    elif change == 'manifest-uid':
        m = (d / 'manifest.json').read_bytes()
        (d / 'manifest.json').write_bytes(m.replace(f'"uid":{account.uid}'.encode(), b'"uid":0'))
    elif change == 'unsigned':
        (d / 'manifest.sig').unlink()
    else:
        (d / 'stats-dump').unlink()
        os.symlink('/etc/shadow', d / 'stats-dump')
    with pytest.raises(ImageError) as exc:
        await images.restore_dir(account, owner_of(account), info.id)
    assert exc.value.reason == reason, str(exc.value)
    leftovers = images.restore_root / str(account.uid)
    assert not leftovers.exists() or os.listdir(leftovers) == []
    if reason == 'tampered':
        with pytest.raises(ImageError) as exc:
            await images.export_archive(account.uid, info.id)
        assert exc.value.reason == 'tampered'


async def test_restore_rechecks_credentials_of_a_signed_image(manager: JobManager,
                                                              images: ImageStore,
                                                              account: LocalAccount) -> None:
    """Even a correctly signed stored image (say, signed before a bug was fixed) whose CRIU
    files would run as root is refused at restore."""
    import hashlib

    from xos_sshd.cr.manifest import FileEntry, sign
    _, _, info = await committed(manager, images, account)
    d = images.images_dir / str(account.uid) / info.id
    core = d / 'core-2.img'
    core.write_bytes(rewrite_creds(core.read_bytes(), uid=0, euid=0, suid=0, fsuid=0))
    m = parse_manifest((d / 'manifest.json').read_bytes())
    data = core.read_bytes()
    files = {**m.files, 'core-2.img': FileEntry(len(data), hashlib.sha256(data).hexdigest())}
    forged = type(m)(**{**m.__dict__, 'files': files}).to_bytes()
    (d / 'manifest.json').write_bytes(forged)
    (d / 'manifest.sig').write_bytes(sign(images.node_key, forged))
    with pytest.raises(ImageError) as exc:
        await images.restore_dir(account, owner_of(account), info.id)
    assert exc.value.reason == 'wrong-credentials' and 'core-2.img has uids [0' in str(exc.value)
    assert os.listdir(images.restore_root / str(account.uid)) == []


# -- export / import ------------------------------------------------------------------------

async def test_export_import_between_two_nodes(manager: JobManager, images: ImageStore,
                                               account: LocalAccount, cr_base: Path) -> None:
    job, _, info = await committed(manager, images, account)
    path = await images.export_archive(account.uid, info.id)
    assert path.parent == images.export_root / str(account.uid)
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    archive = path.read_bytes()
    again = await images.export_archive(account.uid, info.id)
    assert again.read_bytes() == archive  # deterministic
    await images.release_export(again)
    assert not again.exists()
    members = read_tar(archive)
    names = list(members)
    assert names[:2] == ['manifest.json', 'manifest.sig'] and names[2:] == sorted(names[2:])
    node_b = ImageStore.open(cr_base / 'state-b', node_name='node-b', quota_bytes=QUOTA,
                             trusted_keys=[images.state_dir / 'image_key.pub'])
    got = await node_b.import_archive(account, owner_of(account), io.BytesIO(archive))
    assert got.id != info.id and got.origin_id == info.id and got.node == 'node-a'
    assert got.signed_by == images.fingerprint != node_b.fingerprint
    assert (got.job_id, got.size_bytes, got.file_count) == (job.id, info.size_bytes, info.file_count)
    assert staging_empty(node_b) and [i.id for i in await node_b.list(account.uid)] == [got.id]
    rdir = await node_b.restore_dir(account, owner_of(account), got.id)
    assert sorted(os.listdir(rdir)) == sorted(n for n in names if not n.startswith('manifest.'))
    count = Path(account.home) / 'count'
    n = len(ints(count))
    restored = await manager.restore(rdir, account, image_id=got.id, parent_job=job.id)
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= n + 5, 15, 'counting on node b')
    await manager.kill(restored.id, account, signal.SIGKILL)
    # The re-exported image is the same archive: signature and provenance kept.
    assert (await node_b.export_archive(account.uid, got.id)).read_bytes() == archive
    # Once node-b stops trusting node-a, the image is listed and removable, never restored.
    distrust = ImageStore.open(cr_base / 'state-b', node_name='node-b', quota_bytes=QUOTA)
    assert (await distrust.get(account.uid, got.id)).signed_by == images.fingerprint
    with pytest.raises(ImageError) as exc:
        await distrust.restore_dir(account, owner_of(account), got.id)
    assert exc.value.reason == 'untrusted-node'
    await distrust.remove(account.uid, got.id)
    assert await distrust.list(account.uid) == []
    # A node that does not trust node-a refuses it.
    node_c = ImageStore.open(cr_base / 'state-c', node_name='node-c', quota_bytes=QUOTA)
    with pytest.raises(ImageError) as exc:
        await node_c.import_archive(account, owner_of(account), io.BytesIO(archive))
    assert exc.value.reason == 'untrusted-node' and images.fingerprint[:20] in str(exc.value)
    assert staging_empty(node_c) and await node_c.list(account.uid) == []


@pytest.fixture
async def exported(manager: JobManager, images: ImageStore, account: LocalAccount):
    """(archive members by name, info) of a real image."""
    _, _, info = await committed(manager, images, account)
    path = await images.export_archive(account.uid, info.id)
    return read_tar(path.read_bytes()), info


def files_of(members: dict[str, bytes]) -> dict[str, bytes]:
    return {n: d for n, d in members.items() if not n.startswith('manifest.')}


async def refused(store: ImageStore, account: LocalAccount, data: bytes,
                  owner: Owner | None = None) -> ImageError:
    before = await store.list(account.uid)
    with pytest.raises(ImageError) as exc:
        await store.import_archive(account, owner or owner_of(account), io.BytesIO(data))
    assert staging_empty(store) and await store.list(account.uid) == before
    return exc.value


async def test_import_refuses_changed_archives(images: ImageStore, account: LocalAccount,
                                               exported) -> None:
    members, _ = exported
    m, sig, files = members['manifest.json'], members['manifest.sig'], files_of(members)
    ordered = lambda fs: [('manifest.json', m), ('manifest.sig', sig), *sorted(fs.items())]
    flipped = dict(files)
    page = bytearray(flipped['pages-1.img'])
    page[100] ^= 0x40
    flipped['pages-1.img'] = bytes(page)
    assert (await refused(images, account, tar_of(ordered(flipped)))).reason == 'tampered'
    extra = {**files, 'core-77.img': b'x'}
    assert (await refused(images, account, tar_of(ordered(extra)))).reason == 'tampered'
    missing = {n: d for n, d in files.items() if n != 'stats-dump'}
    err = await refused(images, account, tar_of(ordered(missing)))
    assert err.reason == 'tampered' and 'stats-dump' in str(err)
    forged = json.loads(m)
    forged['uid'] = 0
    edited = json.dumps(forged, sort_keys=True, separators=(',', ':')).encode()
    data = tar_of([('manifest.json', edited), ('manifest.sig', sig), *sorted(files.items())])
    assert (await refused(images, account, data)).reason == 'bad-signature'
    unsigned = tar_of([('manifest.json', m), *sorted(files.items())])
    assert (await refused(images, account, unsigned)).reason == 'bad-signature'
    bare = tar_of(sorted(files.items()))
    assert (await refused(images, account, bare)).reason == 'bad-archive'
    junk_sig = tar_of([('manifest.json', m), ('manifest.sig', b'{"format":1}'), *sorted(files.items())])
    assert (await refused(images, account, junk_sig)).reason == 'bad-signature'
    # Untouched, the same members import fine (the checks above were the real reason).
    info = await images.import_archive(account, owner_of(account), io.BytesIO(tar_of(ordered(files))))
    assert info.file_count == len(files)


@pytest.mark.parametrize('bad, what', [
    (member('evil.img', kind=b'2', linkname=b'/etc/shadow'), 'is a symbolic link'),
    (member('evil.img', kind=b'1', linkname=b'inventory.img'), 'is a hard link'),
    (member('evil.img', kind=b'3'), 'is a character device'),
    (member('evil.img', kind=b'4'), 'is a block device'),
    (member('evil.img', kind=b'6'), 'is a fifo'),
    (member('evil', kind=b'5'), 'is a directory'),
    (member('../evil.img', b'x'), 'is not a plain file name'),
    (member('/etc/evil.img', b'x'), 'is not a plain file name'),
    (member('sub/evil.img', b'x'), 'is not a plain file name'),
    (member('..', b'x'), 'is not a plain file name'),
    (member('evil.img', b'x', prefix=b'/etc'), 'has a path prefix'),
    (member('pax', b'30 path=../../etc/cron.d/evil\n', kind=b'x'), 'is a pax extended header'),
    (member('pax', b'30 path=../../etc/cron.d/evil\n', kind=b'g'), 'is a pax global header'),
    (member('././@LongLink', b'../../etc/evil\0', kind=b'L', magic=b'ustar  \x00'), 'is a GNU long name'),
    (member('evil.img', b'x', kind=b'S'), 'is a GNU sparse file'),
    (member('inventory.img', b'x'), "'inventory.img' appears twice"),
    (ustar_header('evil.img', 0, size_field=b'\x80' + bytes(10) + b'\x01'), 'base-256'),
    (ustar_header('evil.img', 0)[:148] + b'0000000\0' + ustar_header('evil.img', 0)[156:],
     'bad header checksum'),
    (member('evil.img', b'x', magic=b'\0' * 8), 'not a ustar header'),
])
async def test_import_refuses_hostile_members(images: ImageStore, account: LocalAccount,
                                              cr_base: Path, bad: bytes, what: str) -> None:
    good = member('manifest.json', b'{}') + member('inventory.img', b'x' * 700)
    err = await refused(images, account, good + bad + end())
    assert err.reason == 'bad-archive' and what in str(err), str(err)
    assert not Path('/etc/evil.img').exists() and not (cr_base / 'evil.img').exists()


async def test_tar_bomb_is_refused_before_it_is_written(images: ImageStore, account: LocalAccount,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[str] = []
    real = imagefs.FileSink.__init__

    def spy(self, fd, name, done):  # type: ignore[no-untyped-def]
        created.append(name)
        real(self, fd, name, done)

    monkeypatch.setattr(imagefs.FileSink, '__init__', spy)
    huge = ustar_header('pages-1.img', 0o77777777777) + b'\0' * 4096  # declares 8 GiB
    src = io.BytesIO(huge)
    err = await refused(images, account, b'')
    assert err.reason == 'bad-archive'  # an empty upload has no manifest
    with pytest.raises(ImageError) as exc:
        await images.import_archive(account, owner_of(account), src)
    assert exc.value.reason == 'quota-exceeded' and f'bytes of {QUOTA} allowed' in str(exc.value)
    assert created == [] and src.tell() == 512 and staging_empty(images)
    many = b''.join(member(f'f{i}.img') for i in range(10003)) + end()
    err = await refused(images, account, many)
    assert err.reason == 'bad-archive' and 'more than 10002 members' in str(err)
    truncated = member('a.img', b'x' * 2000)[:1000]
    assert (await refused(images, account, truncated)).reason == 'bad-archive'


async def test_import_of_another_owners_image(images: ImageStore, account: LocalAccount,
                                              other_account: LocalAccount, exported) -> None:
    members, _ = exported
    data = b''.join(member(n, d) for n, d in members.items()) + end()
    err = await refused(images, other_account, data, owner_of(other_account))
    assert err.reason == 'not-owner' and account.vo_user in str(err)


async def test_image_of_another_uid_with_a_valid_signature(images: ImageStore, account: LocalAccount,
                                                           other_account: LocalAccount,
                                                           exported) -> None:
    """A correctly signed manifest naming B (its owner and uid) over CRIU files dumped from A's
    job: only the credentials inside the image tell, and they refuse it."""
    members, _ = exported
    data = signed_archive(images.node_key, files_of(members), owner=owner_of(other_account),
                          uid=other_account.uid, gid=other_account.gid)
    err = await refused(images, other_account, data, owner_of(other_account))
    assert err.reason == 'wrong-credentials'
    assert f'core-2.img has uids [{account.uid}' in str(err) and str(other_account.uid) in str(err)
    # The same forgery with the core files edited to B's ids still fails on the groups...
    files = files_of(members)
    cores = {n: rewrite_creds(d, **{k: other_account.uid for k in ('uid', 'euid', 'suid', 'fsuid')},
                              **{k: other_account.gid for k in ('gid', 'egid', 'sgid', 'fsgid')})
             for n, d in files.items() if n.startswith('core-')}
    data = signed_archive(images.node_key, {**files, **cores}, owner=owner_of(other_account),
                          uid=other_account.uid, gid=other_account.gid)
    err = await refused(images, other_account, data, owner_of(other_account))
    assert err.reason == 'wrong-credentials' and 'groups' in str(err)


async def test_uid_zero_is_never_stored(images: ImageStore, account: LocalAccount,
                                        exported) -> None:
    members, _ = exported
    root = LocalAccount(name='root', uid=0, gid=0, groups=(), home='/root', shell='/bin/sh',
                        gecos='', vo=account.vo, vo_user=account.vo_user)
    data = b''.join(member(n, d) for n, d in members.items()) + end()
    with pytest.raises(ImageError) as exc:
        await images.import_archive(root, owner_of(account), io.BytesIO(data))
    assert exc.value.reason == 'wrong-credentials'


async def test_export_is_a_plain_tar(images: ImageStore, account: LocalAccount, exported) -> None:
    _, info = exported
    path = await images.export_archive(account.uid, info.id)
    lines = tar_listing(path)
    assert len(lines) == info.file_count + 2
    assert all(ln.split()[:2] == ['-r--r--r--', 'root/root'] for ln in lines)
    assert lines[0].endswith(' manifest.json') and lines[1].endswith(' manifest.sig')


def test_open_refuses_a_loose_key(tmp_path: Path) -> None:
    ImageStore.open(tmp_path, node_name='n')
    (tmp_path / 'image_key').chmod(0o644)
    with pytest.raises(ValueError, match='0600'):
        ImageStore.open(tmp_path, node_name='n')
    (tmp_path / 'bad.pub').write_text('ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQ x\n')
    (tmp_path / 'image_key').chmod(0o600)
    with pytest.raises(ValueError, match='bad.pub'):
        ImageStore.open(tmp_path, node_name='n', trusted_keys=[tmp_path / 'bad.pub'])


async def test_awaitable_open_and_pruning(cr_base: Path) -> None:
    store = await ImageStore.open(cr_base / 's', node_name='n')
    old = store.restore_root / '123' / 'ix-old'
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    fresh = store.restore_root / '123' / 'ix-new'
    fresh.mkdir()
    ImageStore.open(cr_base / 's', node_name='n')
    assert not old.exists() and fresh.exists()
