#!/usr/bin/env python3
"""Checkpoint/restart speed: CRIU dump and restore of jobs against plain file I/O of the same
bytes on the same filesystem, and the downtime of migrating a 1 GB job, in one run.

Jobs are real xos-sshd jobs (``JobManager``: own PID + mount namespace, a throw-away uid, CRIU
``--unprivileged`` as that uid), a Python program that allocates and touches N bytes (every
page written), then prints a heartbeat (``time.time()``) to its stdout file every 5 ms.

* **dump**: ``JobManager.checkpoint`` (CRIU's wall time, helper included), then ``fsync`` of
  every image file (CRIU does not sync): the durable rate is bytes / (dump + fsync).  The
  reference writes the same number of bytes (4 MiB writes) to a file next to the images and
  fsyncs it: bytes / (write + fsync).  Both without the sync are shown too.
* **restore**: the image files and the reference file are dropped from the page cache
  (``fsync`` + ``posix_fadvise(DONTNEED)``, checked with ``fincore``: only those files, nothing
  else of the machine's cache), then ``JobManager.restore`` (namespace, CRIU restore,
  credential checks, job init) against reading the reference file (4 MiB reads).  The two
  files are written and read on mirrored timelines, which goes first alternating between
  runs: this VM's disk reads a file back at very different speeds depending on how long ago it
  was written (the host caches it).  The restore is repeated from the page cache ("warm"):
  CRIU's own speed, without the disk.
* **migration downtime** of a 1 GB job: the largest gap between two consecutive heartbeats in
  its output, for (a) dump + copy + restore (the job stopped by the dump, the images copied
  to a second directory as a transfer would, restored from there), and (b) the best route
  this kernel allows an unprivileged CRIU: lazy pages need userfaultfd, which an unprivileged
  process gets only with ``vm.unprivileged_userfaultfd = 1`` (or access to
  ``/dev/userfaultfd``); when the probe says no, the page server route: ``criu page-server``
  as the account writing into the target directory, ``dump --page-server`` streaming the
  pages to it over loopback TCP, the few non-page images copied, restore.  Source and target
  are on this one machine: the copy and the page stream cost what they cost on loopback.

Ratios are rates: ``dump_vs_disk`` = durable dump rate / durable write rate (1 GB job),
``restore_vs_disk`` = restore rate / read rate (1 GB), ``migrate_downtime_ratio`` = best
route's downtime / dump + copy's.  Run as root after ``make test`` (venv and CRIU):
    .venv/bin/python bench/checkpoint.py [--runs 3] [--mig-runs 2] [--big-mb 1024] [--small-mb 100]
Everything it makes (processes, files under one temp dir) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
sys.path.insert(0, str(REPO))
from crhelpers import make_account, reap_zombie_children, uid_processes
from gatewayproc import free_port, free_uid_range, kill_uid_processes

from xos_sshd.ams import LocalAccount
from xos_sshd.ams.store import Store
from xos_sshd.cr import criu
from xos_sshd.cr.jobs import Job, JobManager, JobTable, process_alive

MB = 1 << 20
CHUNK = 4 * MB
HEARTBEAT = 0.005
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

JOB = r'''
import sys, time
n = int(sys.argv[1])
buf = bytearray(b'\x5a' * 4096) * (n // 4096)    # every page written
print('ready', flush=True)
while True:
    print(f'{time.time():.6f}', flush=True)
    time.sleep(HEARTBEAT)
'''.replace('HEARTBEAT', str(HEARTBEAT))


# -- helpers ------------------------------------------------------------------------------

def heartbeats(job: Job) -> list[float]:
    out = []
    for line in (Path(job.log_dir) / 'stdout').read_text().split('\n')[:-1]:
        try:
            out.append(float(line))
        except ValueError:
            continue
    return out


async def wait_beats(job: Job, more_than: int, timeout: float = 120) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beats = heartbeats(job)
        if len(beats) > more_than:
            return beats
        await asyncio.sleep(0.02)
    raise SystemExit(f'job {job.id}: no heartbeat after {timeout} s\n'
                     + (Path(job.log_dir) / 'stderr').read_text()[-2000:])


def max_gap(beats: list[float], after: float) -> float:
    """The longest pause between consecutive heartbeats from *after* on."""
    pairs = [(a, b) for a, b in itertools.pairwise(beats) if b >= after]
    return max(b - a for a, b in pairs)


def image_files(path: str) -> list[str]:
    return [os.path.join(path, n) for n in os.listdir(path)]


def size_of(path: str) -> int:
    return sum(os.lstat(f).st_size for f in image_files(path))


def sync_files(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(paths: list[str]) -> int:
    """Drop these files' pages from the page cache (after fsync: clean pages go); returns
    how many bytes of them are still cached (0 expected)."""
    left = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    out = subprocess.run(['fincore', '-b', '-n', '-o', 'RES', *paths], capture_output=True,
                         text=True, check=False)
    if out.returncode == 0:
        left = sum(int(x) for x in out.stdout.split())
    return left


def disk_write(path: Path, nbytes: int) -> tuple[float, float]:
    """(write seconds, write + fsync seconds) of *nbytes* in CHUNK writes."""
    block = (b'\x5a' * 4096) * (CHUNK // 4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, CHUNK)])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return t1 - t0, t2 - t0


def disk_read(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while os.read(fd, CHUNK):
            pass
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def user_dir(base: Path, account: LocalAccount, name: str) -> str:
    """A directory of the account's (under the root-owned base) for images it reads/writes."""
    path = base / 'targets' / name
    path.parent.mkdir(mode=0o711, exist_ok=True)
    path.mkdir(mode=0o700)
    os.chown(path, account.uid, account.gid)
    return str(path)


def copy_images(src: str, dst: str, account: LocalAccount) -> None:
    for f in image_files(src):
        target = os.path.join(dst, os.path.basename(f))
        shutil.copyfile(f, target)
        os.chown(target, account.uid, account.gid)


# -- measurements -------------------------------------------------------------------------

async def start_job(mgr: JobManager, account: LocalAccount, nbytes: int) -> Job:
    job = await mgr.start(account, ['python3', '-c', JOB, str(nbytes)])
    await wait_beats(job, 20)
    return job


async def kill(mgr: JobManager, job: Job, account: LocalAccount) -> None:
    with contextlib.suppress(Exception):  # already gone
        await mgr.kill(job.id, account, 9)
    deadline = time.monotonic() + 10
    while process_alive(job.pid, job.starttime, job.uid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    reap_zombie_children()


async def dump_restore(mgr: JobManager, account: LocalAccount, base: Path, nbytes: int,
                       reference_first: bool) -> dict[str, float]:
    """One job of *nbytes* and the plain file I/O of the same bytes, on mirrored timelines:
    dump + fsync and write + fsync one after the other, both files evicted from the page
    cache, restore and read one after the other (which goes first alternates between runs:
    how long ago a file was written changes how fast this VM's disk reads it back)."""
    ref_path = base / 'reference.bin'
    ref_bytes = nbytes + nbytes // 300  # the image is ~0.3% more than the touched memory
    job = await start_job(mgr, account, nbytes)
    if reference_first:
        write_s, write_sync_s = disk_write(ref_path, ref_bytes)
    ck = await mgr.checkpoint(job.id, account, stop=True)
    files = image_files(ck.images_dir)
    t0 = time.perf_counter()
    sync_files(files)
    sync_s = time.perf_counter() - t0
    if not reference_first:
        write_s, write_sync_s = disk_write(ref_path, ref_bytes)
    size = size_of(ck.images_dir)
    await kill(mgr, job, account)
    cached = evict([*files, str(ref_path)])
    if reference_first:
        read_s = disk_read(ref_path)
    n = len(heartbeats(job))
    t0 = time.perf_counter()
    new = await mgr.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    restore_s = time.perf_counter() - t0
    if not reference_first:
        read_s = disk_read(ref_path)
    ref_path.unlink()
    await wait_beats(new, n)  # it runs again
    await kill(mgr, new, account)
    t0 = time.perf_counter()  # again, the images now in the page cache: restore's own speed
    warm = await mgr.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    warm_s = time.perf_counter() - t0
    await kill(mgr, warm, account)
    shutil.rmtree(ck.images_dir)
    per_byte = size / ref_bytes  # the reference's times scaled to the image's size
    return {'bytes': size, 'dump': ck.seconds, 'dump_sync': ck.seconds + sync_s,
            'restore': restore_s, 'restore_warm': warm_s, 'cached_left': cached,
            'write': write_s * per_byte, 'write_sync': write_sync_s * per_byte,
            'read': read_s * per_byte}


async def migrate_dump_copy(mgr: JobManager, account: LocalAccount, base: Path,
                            nbytes: int) -> dict[str, float]:
    job = await start_job(mgr, account, nbytes)
    t_start = time.time()
    t0 = time.perf_counter()
    ck = await mgr.checkpoint(job.id, account, stop=True)
    t1 = time.perf_counter()
    target = user_dir(base, account, 'dump-copy')
    copy_images(ck.images_dir, target, account)
    t2 = time.perf_counter()
    n = len(heartbeats(job))
    new = await mgr.restore(target, account, image_id=ck.image_id, parent_job=job.id)
    t3 = time.perf_counter()
    beats = await wait_beats(new, n + 5)
    await kill(mgr, new, account)
    shutil.rmtree(ck.images_dir)
    shutil.rmtree(target)
    return {'downtime': max_gap(beats, t_start), 'dump': t1 - t0, 'copy': t2 - t1,
            'restore': t3 - t2, 'bytes': nbytes}


async def migrate_page_server(mgr: JobManager, account: LocalAccount, base: Path,
                              nbytes: int, criu_path: str) -> dict[str, float]:
    job = await start_job(mgr, account, nbytes)
    target = user_dir(base, account, 'page-server')
    port = free_port()
    pidfile = os.path.join(target, 'page-server.pid')
    # The target side: a page server as the account, writing into the target directory
    # (--daemon: it returns once it listens; it ends after serving one dump).
    argv = criu.as_user(account, criu.CAPS_DUMP,
                        [criu_path, 'page-server', '--unprivileged', '-D', target,
                         '--address', '127.0.0.1', '--port', str(port), '--daemon',
                         '--pidfile', pidfile, '-v2', '-o', 'page-server.log'])
    ps = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                 env=criu.CRIU_ENV, check=False)
    if ps.returncode != 0:
        raise RuntimeError(f'criu page-server as {account.name} failed: {ps.stderr.strip()[-500:]}')
    try:
        t_start = time.time()
        t0 = time.perf_counter()
        ck = await mgr.checkpoint(job.id, account, stop=True, extra_args=[
            '--page-server', '--address', '127.0.0.1', '--port', str(port)])
        t1 = time.perf_counter()
        copy_images(ck.images_dir, target, account)  # the non-page images (small)
        t2 = time.perf_counter()
        n = len(heartbeats(job))
        new = await mgr.restore(target, account, image_id=ck.image_id, parent_job=job.id)
        t3 = time.perf_counter()
        beats = await wait_beats(new, n + 5)
        await kill(mgr, new, account)
        small = size_of(ck.images_dir)
        shutil.rmtree(ck.images_dir)
    finally:
        try:
            pid = int(Path(pidfile).read_text())
            if uid_processes(account.uid) and pid in uid_processes(account.uid):
                os.kill(pid, 9)
        except (OSError, ValueError):
            pass
        shutil.rmtree(target, ignore_errors=True)
    return {'downtime': max_gap(beats, t_start), 'dump': t1 - t0, 'copy': t2 - t1,
            'restore': t3 - t2, 'bytes': nbytes, 'copied': small}


# -- main ---------------------------------------------------------------------------------

def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MB / seconds


async def run(args: argparse.Namespace, base: Path, account: LocalAccount) -> int:
    store = await Store.open(str(base / 'ams.sqlite'))
    try:
        mgr = JobManager(JobTable(store), spool_dir=str(base / 'spool'), node='bench')
        criu_path = criu.find_criu()
        info = await criu.probe(criu_path, account)
        uffd_sysctl = Path('/proc/sys/vm/unprivileged_userfaultfd').read_text().strip()
        print(f'CRIU {info.version_text} ({criu_path}), unprivileged as uid {account.uid}; '
              f'features for the account: {info.features}')
        sizes = [('small', args.small_mb * MB, args.runs), ('big', args.big_mb * MB, args.runs)]
        results: dict[str, list[dict[str, float]]] = {}
        for label, nbytes, runs in sizes:
            results[label] = []
            for i in range(runs):
                results[label].append(await dump_restore(mgr, account, base, nbytes, i % 2 == 1))
        best_name, why = 'dump+copy', ''
        if info.features.get('lazy_pages'):
            why = 'lazy pages usable but not driven by this bench yet: page server measured'
        else:
            why = (f'lazy pages impossible for an unprivileged CRIU here: '
                   f'vm.unprivileged_userfaultfd = {uffd_sysctl} and /dev/userfaultfd is '
                   f'{oct(os.stat("/dev/userfaultfd").st_mode & 0o777) if os.path.exists("/dev/userfaultfd") else "absent"} root')
        migs_a: list[dict[str, float]] = []
        migs_b: list[dict[str, float]] = []
        ps_failed = False
        for i in range(args.mig_runs):  # alternating: a b, b a, ...
            for route in ('ab' if i % 2 == 0 else 'ba'):
                if route == 'a':
                    migs_a.append(await migrate_dump_copy(mgr, account, base, args.big_mb * MB))
                elif not ps_failed:
                    try:
                        migs_b.append(await migrate_page_server(mgr, account, base,
                                                                args.big_mb * MB, criu_path))
                    except Exception as exc:  # noqa: BLE001 (report the route as unavailable)
                        why += f'; page server failed: {exc}'
                        ps_failed = True
        best_name = 'page server' if migs_b else 'dump+copy'
    finally:
        await store.close()

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    def mig(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    mig_a = mig(migs_a)
    mig_b = mig(migs_b) if migs_b else mig_a

    print()
    print(f'{"job memory":>10} {"image MB":>9} | {"dump s":>7} {"+fsync s":>8} {"MB/s":>7} | '
          f'{"write s":>7} {"+fsync s":>8} {"MB/s":>7} | {"restore s":>9} {"MB/s":>7} | '
          f'{"read s":>6} {"MB/s":>7} | {"warm restore MB/s":>17}')
    for label, nbytes, runs in sizes:
        b = med(label, 'bytes')
        print(f'{nbytes // MB:>7} MB {b / MB:>9.1f} | {med(label, "dump"):>7.3f} '
              f'{med(label, "dump_sync"):>8.3f} {rate(b, med(label, "dump_sync")):>7.0f} | '
              f'{med(label, "write"):>7.3f} {med(label, "write_sync"):>8.3f} '
              f'{rate(b, med(label, "write_sync")):>7.0f} | {med(label, "restore"):>9.3f} '
              f'{rate(b, med(label, "restore")):>7.0f} | {med(label, "read"):>6.3f} '
              f'{rate(b, med(label, "read")):>7.0f} | {rate(b, med(label, "restore_warm")):>17.0f}')
    print(f'(medians of {args.runs} runs, reference first in every other run; MB/s with the '
          'fsync; restore and read from a cold guest page cache (the host may still cache the '
          'virtual disk): '
          f'{max(r["cached_left"] for v in results.values() for r in v):.0f} bytes of the files '
          'were still cached after eviction)')
    for label, nbytes, _ in sizes:
        print(f'  {nbytes // MB} MB without sync: dump {rate(med(label, "bytes"), med(label, "dump")):.0f} MB/s, '
              f'write {rate(med(label, "bytes"), med(label, "write")):.0f} MB/s')
    print()
    print(f'migration of a {args.big_mb} MB job (downtime = longest heartbeat gap; medians of '
          f'{args.mig_runs} runs per route, alternating)')
    print(f'{"route":<12} {"downtime s":>10} {"dump s":>7} {"copy s":>7} {"restore s":>9}')
    for name, m in (('dump+copy', mig_a), (best_name, mig_b)) if migs_b else (('dump+copy', mig_a),):
        print(f'{name:<12} {m["downtime"]:>10.3f} {m["dump"]:>7.3f} {m["copy"]:>7.3f} '
              f'{m["restore"]:>9.3f}')
    print(f'best route: {best_name} ({why})')
    big = 'big'
    dump_vs = rate(med(big, 'bytes'), med(big, 'dump_sync')) / rate(med(big, 'bytes'), med(big, 'write_sync'))
    restore_vs = rate(med(big, 'bytes'), med(big, 'restore')) / rate(med(big, 'bytes'), med(big, 'read'))
    ratio = mig_b['downtime'] / mig_a['downtime']
    print(f'dump {dump_vs:.2f}x and restore {restore_vs:.2f}x the disk\'s rate (target >= 0.8); '
          f'downtime {ratio:.2f}x the dump+copy route\'s (target <= 0.1)')
    print(f'RESULT dump_vs_disk={dump_vs:.3f} restore_vs_disk={restore_vs:.3f} '
          f'migrate_downtime_ratio={ratio:.3f}')
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=3, help='dump/restore runs per size (default 3)')
    ap.add_argument('--mig-runs', type=int, default=2, help='migrations per route (default 2)')
    ap.add_argument('--small-mb', type=int, default=100)
    ap.add_argument('--big-mb', type=int, default=1024)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit('run as root (jobs run as a throw-away uid)')
    base = Path(tempfile.mkdtemp(prefix='xos-bench-cr-'))
    base.chmod(0o755)
    first, last = free_uid_range(start=450000)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # job inits are re-parented to us: reap
    try:
        account = make_account(base, first)
        return asyncio.run(run(args, base, account))
    finally:
        for _ in range(50):
            kill_uid_processes(first, last)
            reap_zombie_children()
            if not uid_processes(first):
                break
            time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
