"""Pre-dump (iterative pre-copy) migration of a job, measured with the project's own CRIU
driver and privilege model.  Needs a kernel with soft-dirty tracking: run it in the VM,

    scripts/vm/xosvm.py run --mem 3072 --timeout 3000 --sysctl fs.pipe-user-pages-soft=0 -- \\
        .venv/bin/python tests/vm/predump_probe.py --caps checkpoint_restore,dac_override

(as root, from the checkout; ``--mb 200 --hot-mb 4 --rounds 3`` by default).  Not a pytest
module: an experiment whose output (a table and one ``RESULT {json}`` line) feeds the
design of the ``pre-dump`` migration mode; tests/vm/test_vm_predump.py asserts on it.

Each mode runs on a fresh job started with ``JobManager.start`` (own PID + mount
namespace, an unprivileged account from a claimed uid range): the job touches ``--mb``
MiB, then keeps rewriting ``--hot-mb`` MiB of it and appends a wall-clock heartbeat to
``~/hb`` after every sweep.  CRIU runs exactly as ``criu.dump`` runs it: inside the job's
namespaces (helper op ``enter``), as the account through ``setpriv`` with
``no_new_privs`` and only the ambient capabilities given (``--caps``, pre-dump modes; the
plain modes use ``criu.CAPS_DUMP``), ``--unprivileged``; page servers as
``criu.start_page_server`` runs them (the account as root of its own user namespace, no
host capability) over a socketpair (``--ps-socket``).  Restores go through
``JobManager.restore``.  The job's downtime is the largest heartbeat gap around the final
dump (frozen from the final dump until the restored copy runs).

Modes: ``dump`` (plain dump + restore), ``page-server`` (today's mode), ``pre-dump``
(local rounds, ``--prev-images-dir ../<previous round>``) and ``pre-dump+page-server``
(every round and the final dump into a page server of its own, each started with
``--prev-images-dir ../<previous round's dir>``; the restore dir = the final dump's
images without pages + the last page server's pagemap/pages + its ``parent`` link), and
``caps``: ``criu check --feature mem_dirty_track`` and a pre-dump as the account with
several capability sets.

Measured in the TCG guest (Debian 6.1 kernel, CRIU 4.1.1, 200 MiB job, 4 MiB hot; TCG
is ~20-25x slower than this host: a plain 200 MiB dump is frozen 170-215 ms natively):

    mode                  rounds (s / pages written)  final dump s  frozen ms  restore s  downtime s
    dump                  -                           7.55          4555       9.94       11.97
    page-server           -                           16.71         8659       8.04       20.04
    pre-dump              7.74/51873 3.46/1205        2.97          501        6.34       5.79
    pre-dump+page-server  11.36/51873 4.62/1516       3.42          712        9.30       8.63

Findings: as the account, soft-dirty needs CAP_DAC_OVERRIDE besides
CAP_CHECKPOINT_RESTORE (CRIU 4.1.1 opens /proc/PID/clear_refs, mode 0200, O_RDWR: EACCES
means "Dirty tracking is OFF"); a splice pre-dump of more than ~64 MiB needs
fs.pipe-user-pages-soft raised (0); ``--pre-dump-mode read`` into a page server restores a
job that dies of SIGSEGV; a page server without ``--prev-images-dir`` makes every round
and the final dump send the whole memory again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / 'tests')]

from xos_sshd.ams import LocalAccount  # noqa: E402
from xos_sshd.ams.store import Store  # noqa: E402
from xos_sshd.cr import criu  # noqa: E402
from xos_sshd.cr.jobs import JobManager, JobTable  # noqa: E402

HOG = r'''
import sys, time
size, hot = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20
buf = bytearray(size)
for i in range(0, size, 4096):
    buf[i] = 1
hb = open('hb', 'a', buffering=1)
hb.write('ready %.6f\n' % time.time())
n = 0
while True:
    n += 1
    for off in range(0, hot, 4096):
        buf[off] = n & 255
    hb.write('%.6f\n' % time.time())
    time.sleep(0.002)
'''

#: Capability sets tried for soft-dirty use as the account (--unprivileged).
CAPS_VARIANTS = (('checkpoint_restore',), ('checkpoint_restore', 'sys_ptrace'),
                 ('checkpoint_restore', 'dac_read_search'), ('checkpoint_restore', 'dac_override'),
                 ('dac_read_search',), ())

STAT_RE = re.compile(r'^\s*([A-Za-z][A-Za-z ()]*?)\s*:\s*([0-9.]+)', re.M)


def stats(log: str) -> dict[str, float]:
    """CRIU's ``--display-stats`` block: times in microseconds, page counts."""
    at = log.rfind('Displaying ')
    return {k: float(v) for k, v in STAT_RE.findall(log[at:])} if at >= 0 else {}


#: CRIU warnings that every run as the account logs, whatever happens (noise).
NOISE = ('XDG_RUNTIME_DIR not set', "Can't load /run/criu.kdat", 'tun: Unable to create tun',
         'Unable to open a socket file', 'Unable to get socket network namespace',
         'net: Unexpected error: -1(Operation not permitted)', 'TCP_NODELAY')


def errors(log: str) -> list[str]:
    """CRIU's error and warning lines (minus the usual noise), and its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    picked = [ln for ln in lines if ('Error (' in ln or 'Warn ' in ln)
              and not any(n in ln for n in NOISE)][:12]
    if lines and lines[-1] not in picked:
        picked.append(lines[-1])
    return picked


class Probe:
    def __init__(self, base: Path, mb: int, hot_mb: int, uid: int) -> None:
        self.base, self.mb, self.hot_mb = base, mb, hot_mb
        home = base / f'cr{uid}'
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        self.account = LocalAccount(name=f'cr{uid}', uid=uid, gid=uid, groups=(),
                                    home=str(home), shell='/bin/sh', gecos='', vo='dev',
                                    vo_user=f'user{uid}')
        self.criu = criu.find_criu()
        self.manager: JobManager | None = None
        self.pre_dump_mode = 'splice'
        #: Give the target's page servers --prev-images-dir (the previous round's dir).
        self.ps_prev = True
        self.log_files = False
        self.step_timeout = 1200.0
        #: Ambient capabilities of the pre-dump modes' CRIU (pre-dumps and the final dump).
        self.predump_caps: tuple[str, ...] = criu.CAPS_DUMP

    async def open(self) -> None:
        self.store = await Store.open(str(self.base / 'ams.sqlite'))
        self.manager = JobManager(JobTable(self.store), spool_dir=str(self.base / 'spool'),
                                  node='vm')

    # -- helpers --------------------------------------------------------------------------

    def hb_path(self) -> Path:
        return Path(self.account.home) / 'hb'

    async def start_job(self):
        assert self.manager is not None
        hb = self.hb_path()
        if hb.exists():
            hb.unlink()
        job = await self.manager.start(self.account, ['/usr/bin/python3', '-c', HOG,
                                                      str(self.mb), str(self.hot_mb)])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if hb.exists() and hb.read_text().count('\n') >= 5:
                return job
            await asyncio.sleep(0.1)
        raise RuntimeError('the job did not start touching its memory in time')

    def mkdir(self, name: str) -> str:
        assert self.manager is not None
        return self.manager._make_image_dir(self.account, name)

    async def enter(self, job, argv: list[str], pass_fds=(), caps=criu.CAPS_DUMP,
                    timeout: float = 1200) -> tuple[bool, float, str]:
        """Run a CRIU command inside the job's namespaces, as criu.dump does."""
        full = criu.as_user(self.account, caps, argv)
        started = time.monotonic()
        reply, log = await criu.run_helper(
            {'op': 'enter', 'target': job.pid, 'starttime': job.starttime,
             'uid': self.account.uid, 'argv': full, 'env': criu.CRIU_ENV,
             'fds': list(pass_fds)}, timeout, pass_fds)
        return bool(reply.get('ok')), time.monotonic() - started, log

    async def page_server(self, images_dir: str, prev: str | None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_dump, fd_ps = ours.detach(), theirs.detach()
        argv = [self.criu, 'page-server', '--ps-socket', str(fd_ps), '-D', images_dir, '-v4']
        if self.log_files:
            argv += ['-o', 'criu.log']
        if prev:
            argv += ['--prev-images-dir', prev]
        daemon = await criu._spawn_daemon(criu.own_userns(self.account, argv),
                                          'page-server', (fd_ps,))
        return daemon, fd_dump

    def gap(self, since: float) -> float:
        """The largest heartbeat gap after *since* (the job's downtime)."""
        stamps = [float(x) for x in self.hb_path().read_text().split('\n')
                  if x and not x.startswith('ready')]
        later = [t for t in stamps if t >= since - 5]
        prev = [t for t in stamps if t < since]
        seq = ([prev[-1]] if prev else []) + [t for t in later if t >= since]
        return max((b - a for a, b in zip(seq, seq[1:])), default=float('nan'))

    async def wait_beats(self, restored=None, count: int = 20, timeout: float = 300) -> None:
        n0 = self.hb_path().read_text().count('\n')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hb_path().read_text().count('\n') >= n0 + count:
                return
            if restored is not None and not criu.namespace_members(restored.namespace,
                                                                   self.account.uid):
                break  # the restored job is gone already
            await asyncio.sleep(0.05)
        raise RuntimeError('the restored job does not beat: ' + self.describe(restored))

    def describe(self, job) -> str:
        """The state of a job's processes and the tail of its stderr (a failed restore)."""
        if job is None:
            return '?'
        out = []
        for pid in criu.namespace_members(job.namespace, self.account.uid):
            try:
                stat = Path(f'/proc/{pid}/stat').read_text()
                wchan = Path(f'/proc/{pid}/wchan').read_text()
                out.append(f'pid {pid} state {stat[stat.rindex(")") + 2]} wchan {wchan} '
                           f'cmd {Path(f"/proc/{pid}/cmdline").read_bytes()[:60]!r}')
            except OSError as exc:
                out.append(f'pid {pid}: {exc}')
        for name in ('stdout', 'stderr', 'exit-status'):
            for d in {job.log_dir, job.job_dir}:
                p = Path(d) / name
                if p.exists():
                    out.append(f'{p}: {p.read_text()[-800:]!r}')
        return '; '.join(out) or 'no process left'

    async def finish(self, job, restored) -> None:
        criu.kill_namespace(job.namespace, self.account.uid)
        if restored is not None:
            criu.kill_namespace(restored.namespace, self.account.uid)
        await asyncio.sleep(0.5)

    async def restore(self, job, images_dir: str):
        assert self.manager is not None
        t = time.monotonic()
        restored = await self.manager.restore(images_dir, self.account, parent_job=job.id)
        return restored, time.monotonic() - t

    def assemble(self, src: str, pages: str, name: str) -> str:
        """A restore dir: the source's images except pages + the page server's pages and
        its ``parent`` link (the target side of a page-server migration)."""
        out = self.mkdir(name)
        for f in os.listdir(src):
            if f == 'parent' or f.startswith(('pagemap-', 'pages-')):
                continue
            shutil.copy2(os.path.join(src, f), os.path.join(out, f))
        for f in os.listdir(pages):
            p = os.path.join(pages, f)
            if f == 'parent':
                os.symlink(os.readlink(p) if os.readlink(p).startswith('/')
                           else os.path.normpath(os.path.join(pages, os.readlink(p))),
                           os.path.join(out, f))
            elif f.startswith(('pagemap-', 'pages-')):
                shutil.copy2(p, os.path.join(out, f))
        for f in os.listdir(out):
            if not os.path.islink(os.path.join(out, f)):
                os.chown(os.path.join(out, f), self.account.uid, self.account.gid)
        return out

    # -- modes ----------------------------------------------------------------------------

    async def mode_dump(self) -> dict:
        job = await self.start_job()
        d = self.mkdir('plain')
        t0 = time.time()
        res = await criu.dump(job.root_pid, d, self.account, leave_running=False,
                              namespace=job.namespace, keep_stopped=True)
        restored, rs = await self.restore(job, d)
        await self.wait_beats(restored)
        out = {'dump_s': res.seconds, 'restore_s': rs, 'downtime_s': self.gap(t0),
               'dump_stats': stats(res.log), 'files': sorted(os.listdir(d))}
        await self.finish(job, restored)
        return out

    async def mode_page_server(self) -> dict:
        job = await self.start_job()
        src, dst = self.mkdir('ps-src'), self.mkdir('ps-dst')
        daemon, fd = await self.page_server(dst, None)
        t0 = time.time()
        res = await criu.dump(job.root_pid, src, self.account, leave_running=False,
                              namespace=job.namespace, keep_stopped=True, pass_fds=[fd],
                              extra_args=['--page-server', '--ps-socket', str(fd)])
        pslog = await daemon.finish(120)
        ta = time.monotonic()
        rdir = self.assemble(src, dst, 'ps-restore')
        assemble_s = time.monotonic() - ta
        restored, rs = await self.restore(job, rdir)
        await self.wait_beats(restored)
        out = {'dump_s': res.seconds, 'assemble_s': assemble_s, 'restore_s': rs,
               'downtime_s': self.gap(t0), 'dump_stats': stats(res.log),
               'src_files': sorted(os.listdir(src)), 'dst_files': sorted(os.listdir(dst)),
               'page_server_errors': errors(pslog)}
        await self.finish(job, restored)
        return out

    async def rounds(self, job, max_rounds: int, server: bool, prefix: str) -> tuple[list, str | None, str | None]:
        """Pre-dump rounds; returns (per-round results, last source dir, last target dir)."""
        results, prev_src, prev_dst = [], None, None
        for i in range(1, max_rounds + 1):
            src = self.mkdir(f'{prefix}-src{i}')
            argv = [self.criu, 'pre-dump', '--unprivileged', '-t', str(job.root_pid), '-D', src,
                    '-v4', '--display-stats', '--track-mem', '--pre-dump-mode', self.pre_dump_mode]
            fds: tuple[int, ...] = ()
            daemon = None
            if prev_src:
                argv += ['--prev-images-dir', f'../{os.path.basename(prev_src)}']
            if server:
                dst = self.mkdir(f'{prefix}-dst{i}')
                daemon, fd = await self.page_server(
                    dst, f'../{os.path.basename(prev_dst)}' if prev_dst and self.ps_prev else None)
                argv += ['--page-server', '--ps-socket', str(fd)]
                fds = (fd,)
            if self.log_files:  # CRIU logs into the images dirs (survives a hang)
                argv += ['-o', 'criu.log']
            try:
                ok, secs, log = await self.enter(job, argv, fds, caps=self.predump_caps,
                                                 timeout=self.step_timeout)
            except criu.CriuError as exc:
                if daemon:
                    daemon.kill()
                for d in (src, dst if server else None):
                    if d and os.path.exists(f'{d}/criu.log'):
                        tail = open(f'{d}/criu.log').read().splitlines()[-40:]
                        print(f'--- {d}/criu.log, last lines:\n' + '\n'.join(tail), flush=True)
                raise RuntimeError(f'pre-dump round {i}: {exc.reason}') from None
            pslog = ''
            if daemon:
                try:
                    pslog = await daemon.finish(120)
                except criu.CriuError as exc:
                    pslog = exc.log
                    ok = False
            st = stats(log)
            results.append({'round': i, 'ok': ok, 'seconds': secs, 'stats': st,
                            'errors': errors(log) + errors(pslog),
                            'src_files': sorted(os.listdir(src)),
                            'dst_files': sorted(os.listdir(dst)) if server else None})
            if not ok:
                print(f'--- pre-dump round {i} failed; log tail:\n{criu.log_tail(log)}\n'
                      f'--- page server log tail:\n{criu.log_tail(pslog)}', flush=True)
                raise RuntimeError(f'pre-dump round {i} failed')
            prev_src = src
            prev_dst = dst if server else None
            written = st.get('Memory pages written', 0)
            if i > 1 and written <= 2 * (self.hot_mb << 8):
                break  # converged: only the hot set is left
            await asyncio.sleep(0.5)
        return results, prev_src, prev_dst

    async def mode_predump(self, max_rounds: int, server: bool) -> dict:
        job = await self.start_job()
        prefix = 'pps' if server else 'pd'
        rounds, last_src, last_dst = await self.rounds(job, max_rounds, server, prefix)
        src = self.mkdir(f'{prefix}-final')
        extra = ['--track-mem', '--prev-images-dir', f'../{os.path.basename(last_src)}']
        fds: list[int] = []
        daemon = None
        if server:
            dst = self.mkdir(f'{prefix}-finaldst')
            daemon, fd = await self.page_server(
                dst, f'../{os.path.basename(last_dst)}' if self.ps_prev else None)
            extra += ['--page-server', '--ps-socket', str(fd)]
            fds = [fd]
        t0 = time.time()
        saved, criu.CAPS_DUMP = criu.CAPS_DUMP, self.predump_caps  # criu.dump reads it
        try:
            res = await criu.dump(job.root_pid, src, self.account, leave_running=False,
                                  namespace=job.namespace, keep_stopped=True, pass_fds=fds,
                                  extra_args=extra)
        finally:
            criu.CAPS_DUMP = saved
        pslog = await daemon.finish(120) if daemon else ''
        ta = time.monotonic()
        rdir = self.assemble(src, dst, f'{prefix}-restore') if server else src
        assemble_s = time.monotonic() - ta
        restored, rs = await self.restore(job, rdir)
        await self.wait_beats(restored)
        out = {'rounds': rounds, 'dump_s': res.seconds, 'assemble_s': assemble_s,
               'restore_s': rs, 'downtime_s': self.gap(t0), 'dump_stats': stats(res.log),
               'final_src_files': sorted(os.listdir(src)),
               'final_dst_files': sorted(os.listdir(dst)) if server else None,
               'parent_link': os.readlink(os.path.join(rdir, 'parent'))
               if os.path.islink(os.path.join(rdir, 'parent')) else None,
               'page_server_errors': errors(pslog)}
        await self.finish(job, restored)
        return out

    async def caps_matrix(self) -> dict:
        """Who may use soft-dirty: ``criu check --feature mem_dirty_track`` and a pre-dump,
        with the project's capabilities and with none."""
        out: dict[str, object] = {}

        async def run(argv: list[str]) -> tuple[int, str]:
            rc, o, e = await criu._run(argv, 120)
            return rc, (o + e).strip().splitlines()[-1] if (o + e).strip() else ''

        out['check root'] = await run([self.criu, 'check', '--feature', 'mem_dirty_track'])
        for caps in CAPS_VARIANTS:
            argv = criu.as_user(self.account, caps, [self.criu, 'check', '--feature',
                                                      'mem_dirty_track', '--unprivileged'])
            out[f'check user caps={",".join(caps) or "none"}'] = await run(argv)
        job = await self.start_job()
        for caps in CAPS_VARIANTS:
            d = self.mkdir(f'caps-{"-".join(caps) or "none"}')
            ok, secs, log = await self.enter(
                job, [self.criu, 'pre-dump', '--unprivileged', '-t', str(job.root_pid),
                      '-D', d, '-v4', '--track-mem'], caps=caps)
            out[f'pre-dump caps={",".join(caps) or "none"}'] = {
                'ok': ok, 'seconds': round(secs, 3), 'errors': errors(log)[:4]}
        await self.finish(job, None)
        return out


def table(results: dict) -> str:
    rows = [('mode', 'rounds (s / pages written)', 'final dump s', 'frozen ms (criu)',
             'restore s', 'downtime s')]
    for mode, r in results.items():
        if not isinstance(r, dict) or 'dump_s' not in r:
            continue
        rounds = ' '.join(f'{x["seconds"]:.2f}/{int(x["stats"].get("Memory pages written", 0))}'
                          for x in r.get('rounds', [])) or '-'
        rows.append((mode, rounds, f'{r["dump_s"]:.2f}',
                     f'{r["dump_stats"].get("Frozen time", float("nan")) / 1000:.0f}',
                     f'{r["restore_s"]:.2f}', f'{r["downtime_s"]:.2f}'))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


async def amain(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit('run as root (in the VM: scripts/vm/xosvm.py run -- ...)')
    base = Path(tempfile.mkdtemp(prefix='xos-predump-', dir='/tmp'))
    base.chmod(0o755)
    if args.uid is None:
        from gatewayproc import free_uid_range
        args.uid = free_uid_range(start=390000)[0]
    probe = Probe(base, args.mb, args.hot_mb, args.uid)
    probe.pre_dump_mode = args.pre_dump_mode
    probe.ps_prev = not args.ps_no_prev
    probe.log_files = args.log_files
    probe.step_timeout = args.step_timeout
    if args.caps is not None:  # the capabilities of the pre-dump modes' CRIU runs
        probe.predump_caps = tuple(c for c in args.caps.split(',') if c)
    await probe.open()
    info = await criu.probe()
    print(f'kernel {os.uname().release}; criu {info.version_text}; features {info.features}',
          flush=True)
    results: dict[str, object] = {'kernel': os.uname().release, 'criu': info.version_text,
                                  'mb': args.mb, 'hot_mb': args.hot_mb,
                                  'caps_dump': criu.CAPS_DUMP,
                                  'caps_predump': probe.predump_caps,
                                  'pre_dump_mode': args.pre_dump_mode,
                                  'ps_prev': probe.ps_prev}
    steps = [('caps', probe.caps_matrix), ('dump', probe.mode_dump),
             ('page-server', probe.mode_page_server),
             ('pre-dump', lambda: probe.mode_predump(args.rounds, False)),
             ('pre-dump+page-server', lambda: probe.mode_predump(args.rounds, True))]
    only = set(args.only.split(',')) if args.only else None
    for name, step in steps:
        if only and name not in only:
            continue
        t = time.monotonic()
        print(f'== {name}', flush=True)
        try:
            results[name] = await step()
        except Exception as exc:  # noqa: BLE001 (report and go on with the next mode)
            results[name] = {'error': f'{type(exc).__name__}: {exc}'}
        print(json.dumps(results[name], indent=1, default=str)[:6000], flush=True)
        print(f'   ({time.monotonic() - t:.1f} s)', flush=True)
    print(table(results))
    print('RESULT ' + json.dumps(results, default=str))
    await probe.store.close()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(not (isinstance(v, dict) and 'error' in v) for v in results.values()) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--mb', type=int, default=200, help='memory the job touches (MiB)')
    p.add_argument('--hot-mb', type=int, default=4, help='memory it keeps rewriting (MiB)')
    p.add_argument('--rounds', type=int, default=3, help='pre-dump rounds at most')
    p.add_argument('--uid', type=int, help='the job account\'s uid (default: a free range, '
                                           'claimed as the tests do)')
    p.add_argument('--only', help='comma-separated: caps,dump,page-server,pre-dump,'
                                  'pre-dump+page-server')
    p.add_argument('--keep', action='store_true', help='keep the images under /tmp')
    p.add_argument('--caps', help='ambient capabilities of the pre-dump modes\' CRIU runs '
                                  '(comma-separated; default: criu.CAPS_DUMP)')
    p.add_argument('--pre-dump-mode', choices=('splice', 'read'), default='splice')
    p.add_argument('--log-files', action='store_true',
                   help='CRIU logs into files in the images dirs (shown when a round hangs)')
    p.add_argument('--step-timeout', type=float, default=1200.0,
                   help='seconds a pre-dump round may take')
    p.add_argument('--ps-no-prev', action='store_true',
                   help='start the target page servers without --prev-images-dir')
    sys.exit(asyncio.run(amain(p.parse_args())))


if __name__ == '__main__':
    main()
