"""Which migration modes this node can do, probed at start, reported by ``caps`` and doctor.

Modes, best first (``docs/internals.md``, "cr: migration"):

``lazy-pages``  post-copy: the job is restored at the target from its small images at once and
                its memory follows on demand.  *Target*: the kernel has non-cooperative
                userfaultfd (``criu check --feature uffd-noncoop`` as root), an unprivileged
                process may open one (``vm.unprivileged_userfaultfd = 1``) and create a user
                namespace (the lazy-pages daemon runs as the user in one, see
                :func:`criu.start_lazy_pages`).  *Source*: the dump keeps the job's memory in
                pipes until it is pulled, as the user: ``fs.pipe-max-size`` >= 4 MiB (CRIU
                tees each 4 MiB page pipe into a pipe of that size, measured: 2 MiB fails)
                and the user's pipe budget ``fs.pipe-user-pages-soft`` (pages; 0 = no limit)
                must hold the job's memory (measured: a 100 MB job fails at the default
                16384 pages).
``page-server`` the pages stream to a CRIU page server at the target while the dump runs;
                needs only CRIU >= 4 at both ends.
``pre-dump``    iterative pre-copy needs soft-dirty tracking (``criu check --feature
                mem_dirty_track``) *usable by the job's own CRIU*: not implemented.  This
                project's kernels have none; on a kernel that has it (Debian's 6.1, run
                under ``scripts/vm/xosvm.py``) CRIU 4.1.1 opens ``/proc/PID/clear_refs``
                (mode 0200) read-write, so an unprivileged pre-dump works only with
                ``CAP_DAC_OVERRIDE``, which would let the CRIU that parses a user's job
                bypass every file permission on the node: never given (design.md: CRIU
                gets only the capabilities it needs *safely*).  Measured there: 2 rounds
                into a page server cut the freeze of a 200 MiB job 12x; lazy pages do better
                where the sysctls allow them.
``dump-copy``   dump, then the signed image is copied and restored: always possible.

The kernel features are probed once, in the background, when the gateway starts (three
``criu check`` runs); the sysctls are read again at every ``caps`` (a few small files), so an
admin's ``sysctl -w`` counts without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import criu

log = logging.getLogger(__name__)

MODES = ('lazy-pages', 'page-server', 'dump-copy')
ALL_MODES = ('lazy-pages', 'page-server', 'pre-dump', 'dump-copy')
PAGE = 4096
#: CRIU 4.1.1's page pipes grow to 1024 pages and are tee'd whole: below this the lazy dump
#: fails (``page-pipe: tee: 65536``), measured with a 100 MB job at 1, 2 and 4 MiB.
LAZY_PIPE_MAX_SIZE = 4 << 20
#: Headroom on the user's pipe budget: the job's memory must fit in this share of it.
LAZY_BUDGET_SHARE = 0.8

SYSCTLS = {
    'vm.unprivileged_userfaultfd': 'vm/unprivileged_userfaultfd',
    'fs.pipe-max-size': 'fs/pipe-max-size',
    'fs.pipe-user-pages-soft': 'fs/pipe-user-pages-soft',
    'user.max_user_namespaces': 'user/max_user_namespaces',
    # Debian's and Ubuntu's switches (absent on other kernels: None).
    'kernel.unprivileged_userns_clone': 'kernel/unprivileged_userns_clone',
    'kernel.apparmor_restrict_unprivileged_userns': 'kernel/apparmor_restrict_unprivileged_userns',
}



def read_sysctls(proc_sys: str = '/proc/sys') -> dict[str, int | None]:
    """The sysctls migration depends on (None: absent or unreadable)."""
    out: dict[str, int | None] = {}
    for name, rel in SYSCTLS.items():
        try:
            with open(os.path.join(proc_sys, rel)) as f:
                out[name] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            out[name] = None
    return out


def _userns_problem(s: Mapping[str, int | None]) -> str:
    if not s.get('user.max_user_namespaces'):
        return 'user.max_user_namespaces = 0 (unprivileged user namespaces are off)'
    if s.get('kernel.unprivileged_userns_clone') == 0:
        return 'kernel.unprivileged_userns_clone = 0'
    if s.get('kernel.apparmor_restrict_unprivileged_userns') == 1:
        return 'kernel.apparmor_restrict_unprivileged_userns = 1'
    return ''


def lazy_receive_problem(features: Mapping[str, bool] | None,
                         s: Mapping[str, int | None]) -> str:
    """Why this node cannot *receive* a lazy-pages migration ('' when it can)."""
    if features is None:
        return 'CRIU features not probed yet'
    if not features.get('lazy_pages'):
        return 'the kernel has no non-cooperative userfaultfd (criu check --feature uffd-noncoop)'
    if s.get('vm.unprivileged_userfaultfd') != 1:
        return (f'vm.unprivileged_userfaultfd = {s.get("vm.unprivileged_userfaultfd")}: '
                'users cannot open a userfaultfd')
    return _userns_problem(s)


def lazy_send_problem(s: Mapping[str, int | None], job_bytes: int | None = None) -> str:
    """Why this node cannot *send* a lazy-pages migration (of a job of *job_bytes*)."""
    max_size = s.get('fs.pipe-max-size') or 0
    if max_size < LAZY_PIPE_MAX_SIZE:
        return f'fs.pipe-max-size = {max_size} (a lazy dump needs >= {LAZY_PIPE_MAX_SIZE})'
    soft = s.get('fs.pipe-user-pages-soft')
    if soft is None:
        return 'fs.pipe-user-pages-soft is unreadable'
    if soft and job_bytes is not None and job_bytes > soft * PAGE * LAZY_BUDGET_SHARE:
        return (f'the job holds {job_bytes >> 20} MiB but fs.pipe-user-pages-soft = {soft} '
                f'lets a user keep only {soft * PAGE >> 20} MiB in pipes')
    return ''


def pre_dump_problem(features: Mapping[str, bool] | None) -> str:
    """Why ``pre-dump`` is not offered (it never is: see the module docstring)."""
    if features is not None and features.get('soft_dirty'):
        return 'not implemented (soft-dirty tracking is usable here: pre-dump rounds could be added)'
    return ('no soft-dirty tracking usable by a job\'s CRIU (criu: "Dirty tracking is OFF": '
            'the kernel has none, or CRIU 4.1.1 would need CAP_DAC_OVERRIDE to clear it, '
            'which jobs never get)')


@dataclass(frozen=True)
class Capabilities:
    """What one node can do: ``send`` (as the source) and ``receive`` (as the target) list
    the modes, best first; ``why`` says why each missing one is missing."""

    node: str
    criu: str
    send: tuple[str, ...]
    receive: tuple[str, ...]
    why: dict[str, str] = field(default_factory=dict)
    sysctls: dict[str, int | None] = field(default_factory=dict)
    job_bytes: int | None = None

    @property
    def best(self) -> str:
        """The best mode this node can do both ways (what doctor shows)."""
        both = [m for m in self.send if m in self.receive]
        return both[0] if both else 'none'

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {'node': self.node, 'criu': self.criu, 'send': list(self.send),
                             'receive': list(self.receive), 'best': self.best,
                             'why': dict(self.why), 'sysctls': dict(self.sysctls)}
        if self.job_bytes is not None:
            d['job_bytes'] = self.job_bytes
        return d


def evaluate(node: str, criu_version: str, unavailable: str,
             features: Mapping[str, bool] | None, sysctls: Mapping[str, int | None],
             job_bytes: int | None = None, probe_error: str = '') -> Capabilities:
    """The node's :class:`Capabilities` from its probed CRIU *features* and *sysctls*."""
    why: dict[str, str] = {}
    if unavailable:
        return Capabilities(node, criu_version, (), (), {m: unavailable for m in ALL_MODES},
                            dict(sysctls), job_bytes)
    send, receive = [], []
    recv_problem = probe_error or lazy_receive_problem(features, sysctls)
    send_problem = lazy_send_problem(sysctls, job_bytes)
    if not send_problem:
        send.append('lazy-pages')
    if not recv_problem:
        receive.append('lazy-pages')
    if send_problem or recv_problem:
        why['lazy-pages'] = '; '.join(
            p for p in (f'as a target: {recv_problem}' if recv_problem else '',
                        f'as a source: {send_problem}' if send_problem else '') if p)
    send += ['page-server', 'dump-copy']
    receive += ['page-server', 'dump-copy']
    why['pre-dump'] = pre_dump_problem(features)
    return Capabilities(node, criu_version, tuple(send), tuple(receive), why, dict(sysctls),
                        job_bytes)


def choose(source: Mapping[str, Any], target: Mapping[str, Any],
           wanted: str = 'auto') -> tuple[str, str]:
    """``(mode, '')`` for the best mode *source* can send and *target* receive (the ``caps``
    replies of the two gateways), or the one *wanted*; ``('', why)`` when there is none."""
    send = [m for m in source.get('send') or () if m in MODES]
    receive = [m for m in target.get('receive') or () if m in MODES]
    candidates = MODES if wanted == 'auto' else (wanted,)
    for mode in candidates:
        if mode in send and mode in receive:
            return mode, ''
    if wanted == 'auto':
        return '', 'the two gateways have no migration mode in common'
    reasons = []
    for side, caps, modes in (('source', source, send), ('target', target, receive)):
        if wanted not in modes:
            reason = (caps.get('why') or {}).get(wanted) or 'not offered'
            reasons.append(f'{side} {caps.get("node") or ""}: {reason}'.replace('  ', ' '))
    return '', f'mode {wanted} is not possible: ' + '; '.join(reasons)


def job_memory(ns: criu.JobNamespace, uid: int) -> int:
    """Bytes of anonymous and shared memory the job's processes hold (what a lazy dump keeps
    in pipes), from ``/proc/PID/status``."""
    total = 0
    for pid in criu.namespace_members(ns, uid)[1:]:  # the job init holds no user memory
        try:
            with open(f'/proc/{pid}/status') as f:
                for line in f:
                    if line.startswith(('RssAnon:', 'RssShmem:')):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class MigrationProbe:
    """The gateway's migration capabilities: CRIU's kernel features probed once, in the
    background (:meth:`start`), sysctls read at every :meth:`caps`."""

    def __init__(self, node: str, criu_path: str | None, criu_version: str,
                 unavailable: str = '') -> None:
        self.node = node
        self.criu_path = criu_path
        self.criu_version = criu_version
        self.unavailable = unavailable
        self.features: dict[str, bool] | None = None
        self.error = ''
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and not self.unavailable:
            self._task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        try:
            info = await criu.probe(self.criu_path)
        except criu.CriuError as exc:
            self.error = f'criu check failed: {exc.reason}'
            self.features = {}
            log.warning('migration: %s (lazy pages off)', self.error)
            return
        self.features = dict(info.features)
        caps = evaluate(self.node, self.criu_version, '', self.features, read_sysctls())
        log.info('migration: best mode %s (send %s, receive %s)%s', caps.best,
                 ', '.join(caps.send), ', '.join(caps.receive),
                 f'; lazy pages: {caps.why["lazy-pages"]}' if 'lazy-pages' in caps.why else '')

    async def caps(self, job_bytes: int | None = None) -> Capabilities:
        """This node's capabilities now (waits for the start-up probe if still running)."""
        self.start()
        if self._task is not None:
            await asyncio.shield(self._task)
        return evaluate(self.node, self.criu_version, self.unavailable, self.features,
                        read_sysctls(), job_bytes, self.error)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 (cancelled at shutdown)
                pass


def lazy_fix(features: Mapping[str, bool] | None, s: Mapping[str, int | None]) -> str:
    """The command that would turn lazy pages on here (both roles), with its trade-off;
    '' when nothing is missing or no sysctl can help (a kernel without userfaultfd)."""
    if features is not None and not features.get('lazy_pages'):
        return ''
    needed, costs = [], []
    if s.get('vm.unprivileged_userfaultfd') != 1:
        needed.append('vm.unprivileged_userfaultfd=1')
        costs.append('every local user may then handle page faults of their own processes '
                     'with userfaultfd, a known way to widen kernel race windows in exploits')
    if (s.get('fs.pipe-max-size') or 0) < LAZY_PIPE_MAX_SIZE:
        needed.append(f'fs.pipe-max-size={LAZY_PIPE_MAX_SIZE}')
        costs.append('users may make 4 MiB pipes')
    if s.get('fs.pipe-user-pages-soft'):
        needed.append('fs.pipe-user-pages-soft=0')
        costs.append('no limit on the pipe memory a user pins (else lazy pages only for jobs '
                     'that fit in it)')
    userns = [setting for setting, off in (
        ('user.max_user_namespaces=10000', not s.get('user.max_user_namespaces')),
        ('kernel.unprivileged_userns_clone=1', s.get('kernel.unprivileged_userns_clone') == 0),
        ('kernel.apparmor_restrict_unprivileged_userns=0',
         s.get('kernel.apparmor_restrict_unprivileged_userns') == 1)) if off]
    if userns:
        needed += userns
        costs.append('users may create user namespaces')
    if not needed:
        return ''
    return f'sysctl -w {" ".join(needed)} (trade-off: {"; ".join(costs)})'


def doctor_finding(features: Mapping[str, bool], sysctls: Mapping[str, int | None]
                   ) -> tuple[str, str, str]:
    """``(level, detail, fix)`` of doctor's ``migration`` line: OK when this node can send
    and receive lazy pages, else WARN with the mode it gets, why, and the sysctls to set."""
    caps = evaluate('', '', '', features, sysctls)
    soft = sysctls.get('fs.pipe-user-pages-soft') or 0
    if caps.best == 'lazy-pages':
        limit = (f'; as a source, jobs up to {int(soft * PAGE * LAZY_BUDGET_SHARE) >> 20} MiB '
                 f'(fs.pipe-user-pages-soft = {soft}; 0 lifts that)' if soft else '')
        return ('ok', f'lazy-pages (post-copy) both ways{limit}; page-server and dump-copy as '
                'fallbacks', '')
    lazy = caps.why.get('lazy-pages', '')
    fix = lazy_fix(features, sysctls)
    return ('warn', f'{caps.best} (lazy pages off: {lazy}); pre-dump: {caps.why["pre-dump"]}',
            f'{fix}; the same on the nodes it migrates with' if fix else
            'a kernel with userfaultfd (CONFIG_USERFAULTFD) for lazy pages')


async def caps_reply(service: Any, caller: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """The ``caps`` op (:class:`CRService`): ``{caps: Capabilities.as_dict()}``; with ``job``
    (the caller's running job), the lazy-pages check accounts for that job's memory."""
    from .service import JOB_ID, CRError
    probe: MigrationProbe | None = getattr(service, 'migration', None)
    if probe is None:  # a service without a runtime (tests): probe now, once
        probe = service.migration = MigrationProbe(service.jobs.node, service.jobs.criu_path,
                                                   service.criu_version, service.unavailable)
    job_bytes = None
    job_id = request.get('job')
    if job_id is not None:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise CRError('no-such-job', f'no job {str(job_id)[:80]!r}')
        job = await service.job_of(caller, job_id)
        job = await service.jobs.running(job.id, caller.account)
        job_bytes = await asyncio.to_thread(job_memory, job.namespace, job.uid)
    caps = await probe.caps(job_bytes)
    return {'caps': caps.as_dict()}
