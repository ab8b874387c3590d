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
* **migration downtime** of a 1 GB job through the product: two real gateways on this
  machine (two state dirs, two ports, each other's image keys trusted), ``xos-cr migrate``
  relaying between them over the user's two SSH connections, once with ``--mode dump-copy``
  (dump, the signed image relayed, imported, restored) and once with the mode ``auto``
  picks (page-server on a default kernel here; lazy-pages with ``--enable-lazy-sysctls``,
  which sets ``vm.unprivileged_userfaultfd = 1``, ``fs.pipe-max-size = 4 MiB`` and
  ``fs.pipe-user-pages-soft = 0`` for the run and restores them after).  Downtime = the
  longest gap between two heartbeats from the start of ``migrate`` on (the source job is
  frozen by the dump and only runs again at the target); the source's own count of the
  frozen time is shown too.  Source and target are on this one machine: the streams cost
  what they cost on loopback, through three SSH hops (source, client, target).

Ratios are rates: ``dump_vs_disk`` = durable dump rate / durable write rate (1 GB job),
``restore_vs_disk`` = restore rate / read rate (1 GB), ``migrate_downtime_ratio`` = the
chosen mode's downtime / dump + copy's.  Run as root after ``make test`` (venv and CRIU):
    .venv/bin/python bench/checkpoint.py [--runs 3] [--mig-runs 2] [--big-mb 1024]
        [--small-mb 100] [--enable-lazy-sysctls]
Everything it makes (processes, files under one temp dir) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
sys.path.insert(0, str(REPO))
from conftest import dynamic_vo
from crhelpers import make_account, reap_zombie_children, uid_processes
from gatewayproc import VENV_BIN, VOCA, GatewayProcess, free_uid_range, kill_uid_processes

from xos_sshd.ams import LocalAccount
from xos_sshd.ams.store import Store
from xos_sshd.cr import criu
from xos_sshd.cr.jobs import Job, JobManager, JobTable, process_alive
from xos_sshd.cr.manifest import load_or_create_node_key

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


# -- migration through the product -------------------------------------------------------

LAZY_SYSCTLS = {'vm/unprivileged_userfaultfd': '1', 'fs/pipe-max-size': str(4 << 20),
                'fs/pipe-user-pages-soft': '0'}
SSH_OPTS = ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null']


@contextlib.contextmanager
def lazy_sysctls(enable: bool) -> Iterator[dict[str, str]]:
    """With *enable*: the sysctls lazy pages need, for the run only (restored after)."""
    old = {k: Path('/proc/sys', k).read_text().strip() for k in LAZY_SYSCTLS}
    try:
        if enable:
            for key, value in LAZY_SYSCTLS.items():
                Path('/proc/sys', key).write_text(value)
        yield old
    finally:
        for key, value in old.items():
            Path('/proc/sys', key).write_text(value)


class Nodes:
    """Two real gateways (a, b) trusting each other's image key, and alice's XOS-cert."""

    def __init__(self, base: Path, uids: tuple[int, int]) -> None:
        self.ca = VOCA.create(base, 'dev')
        self.alice = self.ca.issue('alice', base / 'alice')
        self.homes = base / 'homes'
        self.homes.mkdir(mode=0o755)
        keys = {}
        for name in ('a', 'b'):
            (base / name / 'state').mkdir(parents=True, mode=0o755)
            load_or_create_node_key(base / name / 'state', f'node-{name}')
            keys[name] = str(base / name / 'state' / 'image_key.pub')
        self.gws = {}
        for name, other in (('a', 'b'), ('b', 'a')):
            gw = GatewayProcess.configure(base / name, {'dev': dynamic_vo(self.ca, uids,
                                                                          self.homes / 'home')})
            gw.config.write_text(gw.config.read_text() + '[images]\n'
                                 f'trusted_node_keys = ["{keys[other]}"]\n'
                                 f'node_name = "node-{name}"\n')
            self.gws[name] = gw.start(debug=False)

    def xcr(self, gw: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(VENV_BIN / 'xos-cr'), '-i', str(self.alice), '-p',
                              str(self.gws[gw].port), *SSH_OPTS, '127.0.0.1', *args],
                             capture_output=True, text=True, timeout=900, check=False)
        if check and res.returncode != 0:
            raise SystemExit(f'xos-cr {" ".join(args)} on {gw} failed: {res.stderr}')
        return res

    def stop(self) -> None:
        for gw in self.gws.values():
            gw.stop()


def file_beats(path: Path) -> list[float]:
    out = []
    for line in path.read_text().split('\n')[:-1] if path.exists() else ():
        try:
            out.append(float(line))
        except ValueError:
            continue
    return out


def wait_file_beats(path: Path, more_than: int, timeout: float = 120) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beats = file_beats(path)
        if len(beats) > more_than:
            return beats
        time.sleep(0.02)
    raise SystemExit(f'no heartbeat in {path} after {timeout} s')


def migrate_once(nodes: Nodes, nbytes: int, mode: str) -> dict[str, Any]:
    """Run a heartbeat job of *nbytes* at a, migrate it to b with *mode* (``auto`` or a
    forced one), measure; the job and any imported image are removed after."""
    job = nodes.xcr('a', 'run', '--', 'python3', '-c', JOB, str(nbytes)).stdout.strip()
    log = nodes.homes / 'home' / 'dev-alice' / '.xos-jobs' / job / 'stdout'
    wait_file_beats(log, 20)
    t_start = time.time()
    t0 = time.perf_counter()
    res = nodes.xcr('a', 'migrate', job, '--to', f'127.0.0.1:{nodes.gws["b"].port}', '--mode',
                    mode, '--json')
    wall = time.perf_counter() - t0
    out = json.loads(res.stdout)
    n = len(file_beats(log))
    beats = wait_file_beats(log, n + 20)
    nodes.xcr('b', 'kill', out['job'], '-s', 'KILL')
    for image in json.loads(nodes.xcr('b', 'images', '--json').stdout):
        nodes.xcr('b', 'rm', image['id'])  # dump-copy stored one: keep b under its quota
    return {'mode': out['mode'], 'downtime': max_gap(beats, t_start),
            'frozen': float(out['frozen_seconds']), 'wall': wall}


def migration_bench(args: argparse.Namespace, base: Path,
                    uids: tuple[int, int]) -> tuple[dict[str, float], dict[str, float], str, str]:
    """Both routes, alternating; (dump+copy medians, chosen mode's medians, its name, why)."""
    nodes = Nodes(base / 'nodes', uids)
    try:
        caps = {n: json.loads(nodes.xcr(n, 'caps', '--json').stdout) for n in ('a', 'b')}
        why = (f'a sends {caps["a"]["send"]}, b receives {caps["b"]["receive"]}'
               + (f'; lazy pages: {caps["b"]["why"]["lazy-pages"]}'
                  if 'lazy-pages' in caps['b']['why'] else ''))
        runs: dict[str, list[dict[str, Any]]] = {'dump-copy': [], 'auto': []}
        for i in range(args.mig_runs):  # alternating: a b, b a, ...
            for mode in (('dump-copy', 'auto') if i % 2 == 0 else ('auto', 'dump-copy')):
                runs[mode].append(migrate_once(nodes, args.big_mb * MB, mode))
    finally:
        nodes.stop()
    chosen = runs['auto'][0]['mode']

    def med(rs: list[dict[str, Any]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rs) for k in ('downtime', 'frozen', 'wall')}
    return med(runs['dump-copy']), med(runs['auto']), chosen, why


# -- main ---------------------------------------------------------------------------------

def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MB / seconds


async def run(args: argparse.Namespace, base: Path,
              account: LocalAccount) -> tuple[dict[str, list[dict[str, float]]], list[Any]]:
    """The dump/restore measurements: (results by size label, the sizes)."""
    store = await Store.open(str(base / 'ams.sqlite'))
    try:
        mgr = JobManager(JobTable(store), spool_dir=str(base / 'spool'), node='bench')
        criu_path = criu.find_criu()
        info = await criu.probe(criu_path, account)
        print(f'CRIU {info.version_text} ({criu_path}), unprivileged as uid {account.uid}; '
              f'features for the account: {info.features}')
        sizes = [('small', args.small_mb * MB, args.runs), ('big', args.big_mb * MB, args.runs)]
        results: dict[str, list[dict[str, float]]] = {}
        for label, nbytes, runs in sizes:
            results[label] = []
            for i in range(runs):
                results[label].append(await dump_restore(mgr, account, base, nbytes, i % 2 == 1))
    finally:
        await store.close()

    return results, sizes


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]],
           sizes: list[Any], mig_a: dict[str, float], mig_b: dict[str, float], chosen: str,
           why: str) -> None:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

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
    print(f'migration of a {args.big_mb} MB job through xos-cr migrate between two gateways '
          f'(downtime = longest heartbeat gap; frozen = the source\'s count; medians of '
          f'{args.mig_runs} runs per route, alternating)')
    print(f'{"route":<22} {"downtime s":>10} {"frozen s":>9} {"migrate s":>10}')
    for name, m in (('dump-copy (forced)', mig_a), (f'{chosen} (auto)', mig_b)):
        print(f'{name:<22} {m["downtime"]:>10.3f} {m["frozen"]:>9.3f} {m["wall"]:>10.3f}')
    print(f'mode chosen by migrate: {chosen} ({why})')
    big = 'big'
    dump_vs = rate(med(big, 'bytes'), med(big, 'dump_sync')) / rate(med(big, 'bytes'), med(big, 'write_sync'))
    restore_vs = rate(med(big, 'bytes'), med(big, 'restore')) / rate(med(big, 'bytes'), med(big, 'read'))
    ratio = mig_b['downtime'] / mig_a['downtime']
    print(f'dump {dump_vs:.2f}x and restore {restore_vs:.2f}x the disk\'s rate (target >= 0.8); '
          f'downtime {ratio:.2f}x the dump+copy route\'s (target <= 0.1)')
    print(f'RESULT dump_vs_disk={dump_vs:.3f} restore_vs_disk={restore_vs:.3f} '
          f'migrate_downtime_ratio={ratio:.3f}')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=3, help='dump/restore runs per size (default 3)')
    ap.add_argument('--mig-runs', type=int, default=2, help='migrations per route (default 2)')
    ap.add_argument('--small-mb', type=int, default=100)
    ap.add_argument('--big-mb', type=int, default=1024)
    ap.add_argument('--enable-lazy-sysctls', action='store_true',
                    help='set vm.unprivileged_userfaultfd=1, fs.pipe-max-size=4 MiB and '
                         'fs.pipe-user-pages-soft=0 for the run (restored after), so that '
                         'migrate can choose lazy pages')
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit('run as root (jobs run as a throw-away uid)')
    base = Path(tempfile.mkdtemp(prefix='xos-bench-cr-'))
    base.chmod(0o755)
    first, last = free_uid_range(start=450000)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # job inits are re-parented to us: reap
    try:
        with lazy_sysctls(args.enable_lazy_sysctls) as before:
            if args.enable_lazy_sysctls:
                print(f'sysctls for this run: {LAZY_SYSCTLS} (restored after: {before})')
            account = make_account(base, first)
            results, sizes = asyncio.run(run(args, base, account))
            mig_a, mig_b, chosen, why = migration_bench(args, base, (first + 10, last))
        report(args, results, sizes, mig_a, mig_b, chosen, why)
        return 0
    finally:
        for _ in range(50):
            kill_uid_processes(first, last)
            reap_zombie_children()
            if not any(uid_processes(u) for u in (first, first + 10)):
                break
            time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
