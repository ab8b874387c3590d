"""Migration modes end to end: two real gateways on this machine (two state dirs, two ports,
each other's image keys trusted), the real xos-cr client relaying between them, real CRIU.

* page-server (what ``auto`` picks on a default kernel here) and forced dump-copy back;
* lazy-pages, with the sysctls it needs set for the test and restored after it (skipped only
  when the machine refuses to write them);
* refusals and failures: the job is left running at the source and the step is named.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from crhelpers import ints, wait_for
from gatewayproc import XOS_SSHD, VOCA, GatewayProcess, run
from test_cr_e2e import (  # fixtures and helpers, shared with the other cr end-to-end tests
    COUNTER,
    REPO,
    SSH_OPTS,
    XOS_CR,
    alice,  # noqa: F401 (fixture)
    ca,  # noqa: F401 (fixture)
    counted,
    cr_env,  # noqa: F401 (fixture)
    home_of,
    images_of,
    jobs_of,
    make_gateway,
    write_images_table,
    xcr,
)

from xos_sshd.cr import migclient
from xos_sshd.cr.cli import Settings
from xos_sshd.cr.manifest import load_or_create_node_key
from xos_sshd.cr.migcaps import LAZY_PIPE_MAX_SIZE, read_sysctls
from xos_sshd.cr.pagestream import HEADER, encode

VENV_LIB = next((Path(sys.prefix) / 'lib').glob('python3*/site-packages'))
#: A job with real memory (32 MiB touched) that counts into ``count`` and prints heartbeats.
MEMORY_JOB = r'''
import time
buf = bytearray(b'\x5a' * 4096) * (32 << 8)
i = 0
while True:
    i += 1
    with open('count', 'a') as f:
        f.write(f'{i}\n')
    assert buf[i * 4096 % len(buf)] == 0x5a, 'memory lost'
    time.sleep(0.05)
'''
#: xos-cr as the mapped user inside a session: the system python3 (the venv lives under
#: /root, 0700) with the repository and the venv's packages (asyncssh) on its path.
LOCAL_XOS_CR = (f'PYTHONPATH={REPO}:{VENV_LIB} /usr/bin/python3 -m xos_sshd.cr.cli')
LAZY_SYSCTLS = {'vm/unprivileged_userfaultfd': '1', 'fs/pipe-max-size': str(LAZY_PIPE_MAX_SIZE),
                'fs/pipe-user-pages-soft': '0'}


def two_nodes(env: dict[str, Any], vo_ca: VOCA, names: tuple[str, str] = ('a', 'b'),
              **images: Any) -> tuple[GatewayProcess, GatewayProcess]:
    """Two gateways trusting each other's image key (made before their first start)."""
    keys = {}
    for name in names:
        (env['base'] / name / 'state').mkdir(parents=True, mode=0o755, exist_ok=True)
        load_or_create_node_key(env['base'] / name / 'state', f'node-{name}')
        keys[name] = str(env['base'] / name / 'state' / 'image_key.pub')
    a, b = (make_gateway(env, vo_ca, n, images={'trusted_node_keys': [keys[o]],
                                             'node_name': f'node-{n}', **images})
            for n, o in (names, names[::-1]))
    return a, b


def migrate(src: GatewayProcess, dst: GatewayProcess, prefix: Path, job: str, *args: str,
            check: bool = True) -> Any:
    res = xcr(src, prefix, 'migrate', job, '--to', f'127.0.0.1:{dst.port}', *args, check=False,
              timeout=180)
    if check:
        assert res.returncode == 0, f'{res.stderr}\n--- source\n{src.log()[-4000:]}\n--- ' \
                                    f'target\n{dst.log()[-4000:]}'
    return res


def caps(gw: GatewayProcess, prefix: Path) -> dict[str, Any]:
    return json.loads(xcr(gw, prefix, 'caps', '--json').stdout)


def cr_events(gw: GatewayProcess, action: str) -> list[dict[str, Any]]:
    return [e for e in gw.audit() if e['event'] == 'cr' and e['action'] == action]


def leftovers(gw: GatewayProcess, uid: int) -> list[str]:
    """What a migration might leave behind in the gateway's state (nothing, once done)."""
    out = []
    for sub in (f'cr-spool/{uid}', f'cr-migrate/{uid}', f'cr-restore/{uid}'):
        d = gw.state / sub
        if d.exists():
            out += [f'{sub}/{n}' for n in os.listdir(d)]
    return out


def still_counting(count: Path, timeout: float = 15) -> None:
    n = ints(count)[-1]
    wait_for(lambda: ints(count)[-1] >= n + 10, timeout, 'the job to go on counting')


@pytest.fixture
def lazy_sysctls() -> Iterator[None]:
    """vm.unprivileged_userfaultfd=1 and the pipe limits a lazy dump needs, for this test
    only; the previous values are always written back."""
    old = {k: Path('/proc/sys', k).read_text().strip() for k in LAZY_SYSCTLS}
    try:
        for key, value in LAZY_SYSCTLS.items():
            Path('/proc/sys', key).write_text(value)
    except OSError as exc:
        for key, value in old.items():
            try:
                Path('/proc/sys', key).write_text(value)
            except OSError:
                pass
        pytest.skip(f'this machine refuses to set {key}: {exc}')
    try:
        yield
    finally:
        for key, value in old.items():
            Path('/proc/sys', key).write_text(value)
        assert {k: Path('/proc/sys', k).read_text().strip() for k in old} == old


# --------------------------------------------------------------------------- a hostile relay
# The user's xos-cr relays every frame between the two gateways, so the user can send either
# of them anything.  These helpers open the stream ops themselves (over the real SSH
# subsystem, with the user's XOS-cert, as xos-cr does) and speak frames, as a hostile
# client would.

#: Text a hostile peer slips into its messages: a forged log line, terminal escapes, bidi.
FORGED = 'x\nFAKE xos-sshd[1]: INFO login accepted for root\r\x1b[2J\x07\u202e\x00'
CONTROL = re.compile('[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]')


class Stream:
    """One migration stream op (``migrate-in``/``migrate-out``) opened by the test."""

    def __init__(self, transport: Any, reader: Any, writer: Any) -> None:
        self.transport, self.reader, self.writer = transport, reader, writer

    @classmethod
    async def open(cls, gw: GatewayProcess, prefix: Path, request: dict[str, Any]) -> 'Stream':
        """Open *request* on *gw* as the user of *prefix*; Refused if the gateway says no."""
        settings = Settings(str(prefix), gw.port, None, ['StrictHostKeyChecking=no',
                                                         'UserKnownHostsFile=/dev/null'], None)
        transport = await settings.transport('127.0.0.1', gw.port)
        try:
            reader, writer = await migclient._open_stream(transport, request)
        except BaseException:
            await transport.close()
            raise
        return cls(transport, reader, writer)

    def send(self, kind: bytes, payload: bytes = b'') -> None:
        self.writer.write(encode(kind, payload))

    def message(self, msg: str, **fields: Any) -> None:
        self.send(b'M', json.dumps({'msg': msg, **fields}).encode())

    def archive(self, data: bytes, end: bool = True) -> None:
        for at in range(0, len(data), 1 << 20):
            self.send(b'A', data[at:at + (1 << 20)])
        if end:
            self.send(b'a')

    async def frame(self, timeout: float = 60) -> tuple[bytes, bytes] | None:
        try:
            header = await asyncio.wait_for(self.reader.readexactly(HEADER.size), timeout)
        except asyncio.IncompleteReadError:
            return None
        kind, size = HEADER.unpack(header)
        return kind, await asyncio.wait_for(self.reader.readexactly(size), timeout)

    async def until(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """Read frames until the message *name* or a ``failed`` one; return it."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.frame(max(0.1, deadline - time.monotonic()))
            assert got is not None, f'the stream ended before {name!r}'
            if got[0] == b'M':
                msg = json.loads(got[1])
                if msg['msg'] in (name, 'failed'):
                    return msg

    async def close(self) -> None:
        try:
            self.writer.write_eof()
        except Exception:  # noqa: BLE001 (already closed)
            pass
        await self.transport.close()


async def pipe(src: Stream, dst: Stream, side: str, outcome: migclient.Outcome,
               hold: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Copy frames from *src* to *dst* as xos-cr does (noting the messages); *hold(msg)*, if
    given, is awaited before a message is passed on (the test acts meanwhile)."""
    try:
        while True:
            got = await src.frame(600)
            if got is None:
                break
            kind, payload = got
            if kind == b'M':
                msg = json.loads(payload)
                outcome.messages.append((side, msg))
                if hold is not None:
                    await hold(msg)
            dst.send(kind, payload)
            await dst.writer.drain()
    except Exception as exc:  # noqa: BLE001 (a gateway went away: recorded)
        outcome.broken.append(f'{side}: {exc!r}')
    finally:
        try:
            dst.writer.write_eof()
        except Exception:  # noqa: BLE001
            pass


async def relay(src: Stream, dst: Stream, hold: Callable[[dict[str, Any]], Any] | None = None
                ) -> migclient.Outcome:
    """Relay a migration both ways until both gateways are done (*hold*: the target's
    messages, see :func:`pipe`)."""
    outcome = migclient.Outcome()
    await asyncio.gather(pipe(src, dst, 'source', outcome),
                         pipe(dst, src, 'target', outcome, hold))
    return outcome


def deep_tree(top: Path, depth: int, uid: int) -> None:
    """``top/d/d/.../d`` *depth* levels deep, owned by *uid* (made by descriptor: too deep
    for paths and for Python's recursion)."""
    cur = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir('d', 0o700, dir_fd=cur)
            nxt = os.open('d', os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.fchown(nxt, uid, uid)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


def set_limit(gw: GatewayProcess, key: str, value: Any) -> None:
    """Restart *gw* with ``[limits] key = value``."""
    gw.stop()
    text = gw.config.read_text()
    gw.config.write_text(text.replace('[limits]\n', f'[limits]\n{key} = {json.dumps(value)}\n', 1))
    gw.start()


def staged_bytes(gw: GatewayProcess, uid: int) -> int:
    """Bytes of the account's files in what a migration stages on *gw*."""
    total = 0
    for sub in (f'cr-migrate/{uid}', f'cr-spool/{uid}', 'images/.staging'):
        for root, _dirs, files in os.walk(gw.state / sub):
            total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def exported(gw: GatewayProcess, prefix: Path, job: str, dest: Path) -> tuple[bytes, int]:
    """A checkpoint of *job* exported as its signed archive: (archive bytes, image bytes)."""
    image = xcr(gw, prefix, 'checkpoint', job).stdout.strip()
    size = next(i['size_bytes'] for i in json.loads(xcr(gw, prefix, 'images', '--json').stdout)
                if i['id'] == image)
    xcr(gw, prefix, 'get', image, str(dest))
    return dest.read_bytes(), size


# --------------------------------------------------------------------------- tests


def test_page_server_then_dump_copy_back(cr_env: dict[str, Any], ca: VOCA,  # noqa: F811
                                         alice: Path) -> None:  # noqa: F811
    a, b = two_nodes(cr_env, ca)
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    uid = jobs_of(a, alice)[job]['uid']
    counted(count, 5)
    ca_, cb = caps(a, alice), caps(b, alice)
    assert 'page-server' in ca_['send'] and 'page-server' in cb['receive']
    assert 'pre-dump' in ca_['why'] and ca_['sysctls']['vm.unprivileged_userfaultfd'] is not None
    lazy_possible = 'lazy-pages' in ca_['send'] and 'lazy-pages' in cb['receive']
    expected = 'lazy-pages' if lazy_possible else 'page-server'
    if read_sysctls()['vm.unprivileged_userfaultfd'] == 0:  # this machine's default
        assert expected == 'page-server' and 'vm.unprivileged_userfaultfd = 0' in \
            cb['why']['lazy-pages']
    if not lazy_possible:  # doctor says which sysctl would turn lazy pages on, and the cost
        doctor = run(XOS_SSHD, 'doctor', '--config', str(b.config), check=False).stdout
        line = next(ln for ln in doctor.splitlines() if ln[5:].startswith('migration:'))
        assert line.startswith('WARN migration: page-server (lazy pages off') \
            and 'fix: sysctl -w vm.unprivileged_userfaultfd=1' in line and 'trade-off' in line
    before = ints(count)[-1]
    t0 = time.monotonic()
    res = migrate(a, b, alice, job, '--json')
    print(f'\nmigrate auto ({expected}): {time.monotonic() - t0:.2f} s; {res.stderr.strip()}')
    out = json.loads(res.stdout)
    moved = out['job']
    assert out['mode'] == expected and f'using {expected}' in res.stderr
    assert out['frozen_seconds'] > 0 and out['source_job'] == job
    on_a, on_b = jobs_of(a, alice), jobs_of(b, alice)
    assert on_a[job]['state'] == 'killed' and f'migrated to node-b as {moved}' in on_a[job]['detail']
    assert on_b[moved]['state'] == 'running' and on_b[moved]['command'] == ['sh', '-c', COUNTER]
    assert on_b[moved]['log_dir'] == on_a[job]['log_dir'] and on_b[moved]['node'] == 'node-b'
    n = len(ints(count))
    resumed = counted(count, n + 10)[n:]
    # counting goes on from where it was frozen: no restart from 1, no gap, no repeat
    assert resumed[0] >= before and resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert int(xcr(b, alice, 'logs', moved).stdout.split()[-1]) >= resumed[0]
    out_a, in_b = cr_events(a, 'migrate-out'), cr_events(b, 'migrate-in')
    assert [(e['outcome'], e['mode'], e['job'], e['new_job'], e['target_node']) for e in out_a] \
        == [('ok', expected, job, moved, 'node-b')]
    assert [(e['outcome'], e['mode'], e['job'], e['source_node'], e['route']) for e in in_b] \
        == [('ok', expected, moved, 'node-a', 'ssh')]
    assert out_a[0]['frozen_seconds'] > 0 and out_a[0]['user'] == 'alice'
    assert 'migrated to node-b' in a.log() and cr_events(b, 'import') == []  # nothing stored
    assert leftovers(a, uid) == [] and leftovers(b, uid) == []

    # ... and back with the plain route, forced: the image goes through b's store
    res = migrate(b, a, alice, moved, '--mode', 'dump-copy')
    back = res.stdout.strip()
    assert 'using dump-copy' in res.stderr
    assert jobs_of(b, alice)[moved]['state'] == 'killed' and jobs_of(a, alice)[back]['state'] == 'running'
    still_counting(count)
    imported = cr_events(a, 'import')
    assert [(e['outcome'], e['image_node']) for e in imported] == [('ok', 'node-b')]
    assert [e['mode'] for e in cr_events(a, 'migrate-in')] == ['dump-copy']
    restarted = cr_events(a, 'restart')
    assert restarted[-1]['job'] == back and restarted[-1]['image'] == imported[0]['image']

    # ... and once more from inside a session on a: the source is the local socket (the
    # stream goes over a socketpair passed with SCM_RIGHTS), the target over SSH
    home = home_of(cr_env, 'alice')
    for suffix in ('.pem', '.key', '.key.pub'):
        copy = home / f'cert{suffix}'
        copy.write_bytes(Path(f'{alice}{suffix}').read_bytes())
        os.chown(copy, uid, uid)
        copy.chmod(0o600)
    script = (f'{LOCAL_XOS_CR} caps --json && {LOCAL_XOS_CR} -i $HOME/cert -o '
              f'StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null migrate {back} '
              f'--to 127.0.0.1:{b.port} --mode page-server')
    res = a.ssh_xos(alice, script, timeout=120)
    assert res.returncode == 0, res.stderr + a.log()[-3000:]
    local_caps, third = json.loads(res.stdout.rsplit('}', 1)[0] + '}'), res.stdout.split()[-1]
    assert local_caps['node'] == 'node-a' and 'page-server' in local_caps['send']
    assert 'using page-server' in res.stderr
    assert jobs_of(b, alice)[third]['state'] == 'running' and jobs_of(a, alice)[back]['state'] == 'killed'
    assert [(e['route'], e['mode']) for e in cr_events(a, 'migrate-out')][-1] == ('local', 'page-server')
    still_counting(count)
    xcr(b, alice, 'kill', third, '-s', 'KILL')


def test_lazy_pages(lazy_sysctls: None, cr_env: dict[str, Any], ca: VOCA,  # noqa: F811
                    alice: Path) -> None:  # noqa: F811
    a, b = two_nodes(cr_env, ca)
    for gw in (a, b):
        c = caps(gw, alice)
        assert c['best'] == 'lazy-pages' and c['send'][0] == c['receive'][0] == 'lazy-pages', c
    doctor = run(XOS_SSHD, 'doctor', '--config', str(b.config), check=False).stdout
    line = next(ln for ln in doctor.splitlines() if ln[5:].startswith('migration:'))
    assert line.startswith('OK') and 'lazy-pages' in line, line
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'python3', '-c', MEMORY_JOB).stdout.strip()
    counted(count, 5)
    before = ints(count)[-1]
    res = migrate(a, b, alice, job)
    moved = res.stdout.strip()
    print(f'\n{res.stderr.strip()}')
    assert 'using lazy-pages' in res.stderr
    assert jobs_of(a, alice)[job]['state'] == 'killed'
    assert jobs_of(b, alice)[moved]['state'] == 'running'
    # Once the pull completed the job is no longer marked as waiting for its memory (a
    # gateway restart would otherwise kill it: jobs.reconcile).
    assert 'memory still arriving' not in jobs_of(b, alice)[moved]['detail']
    n = len(ints(count))
    resumed = counted(count, n + 10)[n:]
    assert resumed[0] >= before and resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert xcr(b, alice, 'logs', moved).stderr == ''  # no 'memory lost'
    assert [(e['outcome'], e['mode']) for e in cr_events(a, 'migrate-out')] == [('ok', 'lazy-pages')]
    assert [(e['outcome'], e['mode']) for e in cr_events(b, 'migrate-in')] == [('ok', 'lazy-pages')]

    # The relay dies while the memory is still being pulled (xos-cr killed): the target must
    # kill its copy (its memory has holes) and the source thaw the original, which goes on.
    xcr(b, alice, 'kill', moved, '-s', 'KILL')
    n = len(ints(count))
    big = xcr(b, alice, 'run', '--', 'python3', '-c', MEMORY_JOB.replace('32 << 8', '512 << 8'),
              ).stdout.strip()
    wait_for(lambda: len(ints(count)) > n + 20, 30, 'the big job to start counting')
    client = subprocess.Popen([XOS_CR, '-i', str(alice), '-p', str(b.port), *SSH_OPTS,
                               '127.0.0.1', 'migrate', big, '--to', f'127.0.0.1:{a.port}'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pulling = 'migration (target, lazy-pages) of dev-alice: pull the memory to the target'
    wait_for(lambda: pulling in a.log() or client.poll() is not None, 60, 'the lazy pull')
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert pulling in a.log(), 'the migration ended before its memory could be cut off'
    refused_in = wait_for(lambda: [e for e in cr_events(a, 'migrate-in') if e['outcome'] == 'refused'],
                          30, 'the target to give up')
    refused_out = wait_for(lambda: [e for e in cr_events(b, 'migrate-out') if e['outcome'] == 'refused'],
                           30, 'the source to give up')
    assert refused_in[0]['step'] == 'pull the memory to the target', refused_in
    assert refused_out[0]['running'] is True, refused_out
    copy = next(j for j in jobs_of(a, alice).values() if j['restored_from'])
    assert copy['state'] == 'failed' and 'copy killed' in copy['detail'], copy
    assert jobs_of(b, alice)[big]['state'] == 'running'
    still_counting(count)  # the original, thawed at b
    xcr(b, alice, 'kill', big, '-s', 'KILL')


def test_failures_leave_the_job_running_at_the_source(cr_env: dict[str, Any], ca: VOCA,  # noqa: F811
                                                      alice: Path) -> None:  # noqa: F811
    a, b = two_nodes(cr_env, ca, quota_bytes=50000)  # b's quota is smaller than the pages
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    uid = jobs_of(a, alice)[job]['uid']
    counted(count, 5)
    # 1. the target cannot be reached: nothing is touched
    res = xcr(a, alice, 'migrate', job, '--to', '127.0.0.1:1', check=False)
    assert res.returncode == 1 and 'connect to 127.0.0.1:1' in res.stderr \
        and f'job {job} still runs' in res.stderr, res.stderr
    # 2. the target refuses on the way (quota): the job was frozen, then thawed
    res = migrate(a, b, alice, job, '--mode', 'page-server', check=False)
    assert res.returncode == 1 and 'receive the pages at the target' in res.stderr \
        and '[quota-exceeded]' in res.stderr and f'job {job} still runs' in res.stderr, res.stderr
    assert jobs_of(a, alice)[job]['state'] == 'running' and jobs_of(b, alice) == {}
    still_counting(count)
    # 3. lazy pages asked for where they are off: refused before anything starts
    if read_sysctls()['vm.unprivileged_userfaultfd'] == 0:
        res = migrate(a, b, alice, job, '--mode', 'lazy-pages', check=False)
        assert res.returncode == 1 and '[mode-unavailable]' in res.stderr \
            and 'vm.unprivileged_userfaultfd' in res.stderr, res.stderr
    # 4. the target does not trust the source's key: the signed part is refused after the
    #    pages were streamed; the job goes on where it was frozen
    b.stop()
    write_images_table(b, {'node_name': 'node-b'})
    b.start()
    n = ints(count)[-1]
    res = migrate(a, b, alice, job, '--mode', 'page-server', check=False)
    assert res.returncode == 1 and 'verify the image at the target' in res.stderr \
        and '[untrusted-node]' in res.stderr and f'job {job} still runs' in res.stderr, res.stderr
    resumed = counted(count, len(ints(count)) + 10)
    assert resumed == list(range(1, len(resumed) + 1)) and resumed[-1] > n  # thawed, no gap
    refused = cr_events(a, 'migrate-out')
    assert [(e['outcome'], e['reason'], e['failed_at']) for e in refused] == [
        ('refused', 'quota-exceeded', 'target'), ('refused', 'untrusted-node', 'target')]
    assert [e['reason'] for e in cr_events(b, 'migrate-in')] == ['quota-exceeded', 'untrusted-node']
    assert jobs_of(b, alice) == {} and leftovers(a, uid) == [] and leftovers(b, uid) == []
    xcr(a, alice, 'kill', job, '-s', 'KILL')


# --------------------------------------------------------------------------- hostile streams


def test_staged_bytes_are_charged_across_the_accounts_streams(cr_env: dict[str, Any],  # noqa: F811
                                                              ca: VOCA, alice: Path) -> None:  # noqa: F811
    """Two incoming streams of one account may not stage more than its image quota together
    (with what its images use): the second is refused as soon as its archive would pass it,
    while the first still holds its staged part."""
    a, b = two_nodes(cr_env, ca)
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    uid = jobs_of(a, alice)[job]['uid']
    counted(count, 3)
    data, size = exported(a, alice, job, cr_env['base'] / 'job.tar')
    quota = size * 3 // 2  # one image fits, two do not
    b.stop()
    write_images_table(b, {'node_name': 'node-b', 'quota_bytes': quota,
                           'trusted_node_keys': [str(a.state / 'image_key.pub')]})
    b.start()
    hello = {'job': job, 'node': 'node-a', 'log_job': job}

    async def scenario() -> tuple[dict[str, Any], int]:
        first = await Stream.open(b, alice, {'op': 'migrate-in', 'mode': 'page-server'})
        second = None
        try:
            first.message('hello', mode='page-server', **hello)
            first.archive(data[:-512], end=False)  # every member is in; the archive goes on
            await first.writer.drain()
            await asyncio.to_thread(wait_for, lambda: staged_bytes(b, uid) >= size, 30,
                                    'the first stream to stage its part')
            second = await Stream.open(b, alice, {'op': 'migrate-in', 'mode': 'dump-copy'})
            second.message('hello', mode='dump-copy', **hello)
            second.archive(data)
            answer = await second.until('restored')
            return answer, staged_bytes(b, uid)
        finally:
            for stream in (first, second):
                if stream is not None:
                    await stream.close()

    answer, staged = asyncio.run(scenario())
    assert answer['msg'] == 'failed' and answer['reason'] == 'quota-exceeded', answer
    assert 'staged by 1 other incoming migration' in answer['error'], answer
    assert staged <= quota, (staged, quota)
    assert jobs_of(b, alice) == {} and images_of(b, alice) == []
    wait_for(lambda: leftovers(b, uid) == [], 30, 'the target to remove what it staged')
    xcr(a, alice, 'kill', job, '-s', 'KILL')


def test_migrate_in_takes_the_job_start_lock_and_limit(cr_env: dict[str, Any],  # noqa: F811
                                                       ca: VOCA, alice: Path) -> None:  # noqa: F811
    """A migration's restore is a job start like run and restart: with the account at
    max_jobs_per_account when the restore comes (a job started after the target accepted the
    stream), it is refused and the job goes on at the source."""
    a, b = two_nodes(cr_env, ca)
    set_limit(b, 'max_jobs_per_account', 1)
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    counted(count, 3)

    async def scenario() -> tuple[str, migclient.Outcome]:
        dst = await Stream.open(b, alice, {'op': 'migrate-in', 'mode': 'page-server'})
        src = None
        try:  # accepted with no job at b; then the account starts one there
            other = (await asyncio.to_thread(xcr, b, alice, 'run', '--', 'sleep', '600')).stdout.strip()
            src = await Stream.open(a, alice, {'op': 'migrate-out', 'job': job,
                                               'mode': 'page-server'})
            return other, await asyncio.wait_for(relay(src, dst), 120)
        finally:
            for stream in (src, dst):
                if stream is not None:
                    await stream.close()

    other, outcome = asyncio.run(scenario())
    failed = outcome.failure()
    assert failed is not None and failed['reason'] == 'too-many-jobs', outcome
    assert failed['step'] == 'restart at the target' and 'max_jobs_per_account = 1' in failed['error']
    assert (outcome.first('source', 'aborted') or {}).get('running') is True, outcome
    assert [j for j, v in jobs_of(b, alice).items() if v['state'] == 'running'] == [other]
    assert jobs_of(a, alice)[job]['state'] == 'running'
    still_counting(count)
    xcr(a, alice, 'kill', job, '-s', 'KILL')


def _clean(value: Any, limit: int) -> bool:
    return isinstance(value, str) and not CONTROL.search(value) and len(value) <= limit


def test_peer_text_is_sanitised_in_logs_and_audit(cr_env: dict[str, Any],  # noqa: F811
                                                  ca: VOCA, alice: Path) -> None:  # noqa: F811
    """What the other end of a stream says (error messages, steps, reasons, node names, job
    ids) reaches this gateway's log and audit lines without control characters or line
    breaks, bounded, and a reason is a code."""
    a, b = two_nodes(cr_env, ca)
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    counted(count, 3)

    async def target_side(mode: str) -> None:  # b hears a forged failure from "the source"
        s = await Stream.open(b, alice, {'op': 'migrate-in', 'mode': 'dump-copy'})
        try:
            s.message('hello', job=FORGED, node=FORGED, mode=mode, log_job=FORGED)
            s.message('failed', side=f'source{FORGED}', step=FORGED * 50,
                      reason=f'bad{FORGED}', error=FORGED * 500)  # under MAX_MESSAGE
        finally:
            await s.close()

    async def source_side() -> dict[str, Any]:  # a hears a forged success from "the target"
        s = await Stream.open(a, alice, {'op': 'migrate-out', 'job': job, 'mode': 'dump-copy'})
        try:
            await s.until('hello')
            while (got := await s.frame()) is not None and got[0] != b'a':
                pass
            s.message('restored', job=f'j0123456789{FORGED}', node=FORGED * 50)
            s.message('complete')
            return await s.until('finished')
        finally:
            await s.close()

    asyncio.run(target_side('dump-copy'))
    refused = wait_for(lambda: cr_events(b, 'migrate-in'), 30, 'b to give up')
    asyncio.run(target_side(FORGED))  # a source that says it dumps in another mode
    refused = wait_for(lambda: cr_events(b, 'migrate-in')[1:] and cr_events(b, 'migrate-in'),
                       30, 'b to give up again')
    assert asyncio.run(source_side())['msg'] == 'finished'
    done = cr_events(a, 'migrate-out')
    assert [e['outcome'] for e in refused] == ['refused'] * 2 and [e['outcome'] for e in done] == ['ok']
    event = refused[0]
    assert event['reason'] == 'peer-failed' and event['failed_at'] == 'source', event
    assert _clean(event['step'], 200) and _clean(event['message'], 500), event
    assert (refused[1]['reason'], refused[1]['failed_at']) == ('bad-stream', 'target'), refused[1]
    assert _clean(refused[1]['message'], 500) and 'not dump-copy' in refused[1]['message']
    assert _clean(done[0]['target_node'], 200) and _clean(done[0]['new_job'], 64), done
    detail = jobs_of(a, alice)[job]['detail']
    assert _clean(detail, 1000) and 'migrated to' in detail, detail
    for gw in (a, b):
        forged = [ln for ln in gw.log().splitlines() if 'FAKE' in ln and not ln.startswith('20')]
        assert forged == [], forged  # every line that says FAKE is a whole log record


def test_a_migrating_job_is_busy_for_every_other_op(cr_env: dict[str, Any],  # noqa: F811
                                                    ca: VOCA, alice: Path) -> None:  # noqa: F811
    """While a job migrates (frozen at the source, restored at the target), a checkpoint, a
    kill or another migration of it is refused at once ("job is busy: migration in
    progress"); the migration then ends as it would have."""
    a, b = two_nodes(cr_env, ca)
    count = home_of(cr_env, 'alice') / 'count'
    job = xcr(a, alice, 'run', '--', 'sh', '-c', COUNTER).stdout.strip()
    counted(count, 3)
    tried: dict[str, subprocess.CompletedProcess[str]] = {}

    async def scenario() -> migclient.Outcome:
        dst = await Stream.open(b, alice, {'op': 'migrate-in', 'mode': 'page-server'})
        src = await Stream.open(a, alice, {'op': 'migrate-out', 'job': job, 'mode': 'page-server'})

        async def hold(msg: dict[str, Any]) -> None:
            if msg['msg'] != 'restored':
                return
            # Now the job is frozen at a and runs restored at b: everything else must wait.
            for name, args in (('checkpoint', ('checkpoint', job)),
                               ('migrate', ('migrate', job, '--to', f'127.0.0.1:{b.port}')),
                               ('kill', ('kill', job, '-s', 'KILL'))):
                tried[name] = await asyncio.to_thread(xcr, a, alice, *args, check=False,
                                                      timeout=120)
        try:
            return await asyncio.wait_for(relay(src, dst, hold), 300)
        finally:
            await src.close()
            await dst.close()

    outcome = asyncio.run(scenario())
    for name, res in tried.items():
        assert res.returncode == 1 and '[job-busy]' in res.stderr \
            and f'job {job} is busy: migration in progress' in res.stderr, (name, res.stderr)
    finished = outcome.first('source', 'finished')
    assert finished is not None, outcome
    moved = finished['new_job']
    assert jobs_of(a, alice)[job]['state'] == 'killed' and jobs_of(b, alice)[moved]['state'] == 'running'
    still_counting(count)
    assert [e['reason'] for e in cr_events(a, 'checkpoint') + cr_events(a, 'kill')] == ['job-busy'] * 2
    xcr(b, alice, 'kill', moved, '-s', 'KILL')


def test_stale_spool_entries_are_pruned_at_start(cr_env: dict[str, Any], ca: VOCA,  # noqa: F811
                                                 alice: Path) -> None:  # noqa: F811
    """What a gateway that stopped mid-way left in STATE/cr-spool (dumps, page-server and
    lazy work directories written by the account, with whatever the account put there) and
    in STATE/cr-migrate is removed at the next start, without following anything, and
    logged."""
    a = make_gateway(cr_env, ca)
    xcr(a, alice, 'list')  # maps alice
    uid = cr_env['uids'][0]
    a.stop()
    canary = cr_env['base'] / 'canary'
    canary.mkdir()
    (canary / 'keep').write_text('keep')
    spool = a.state / 'cr-spool' / str(uid)
    spool.mkdir(parents=True, mode=0o711, exist_ok=True)
    os.chmod(a.state / 'cr-spool', 0o711)
    left = {}
    for name in ('i0123456789abcdef', 'rfedcba9876543210', 'w00112233445566ff'):
        d = spool / name
        d.mkdir(mode=0o700)
        (d / 'pages-1.img').write_bytes(b'\0' * 4096)
        os.symlink(canary, d / 'link')
        os.symlink(canary / 'keep', d / 'core-1.img')
        os.mkfifo(d / 'fifo')
        for entry in os.listdir(d):
            os.lchown(d / entry, uid, uid)
        os.chown(d, uid, uid)
        deep_tree(d, 1200, uid)  # deeper than Python's recursion limit
        left[name] = d
    staged = a.state / 'cr-migrate' / str(uid) / '0123456789abcdef'
    staged.mkdir(parents=True)
    (staged / 'core-1.img').write_bytes(b'x')
    try:
        a.start()
        xcr(a, alice, 'list')  # the gateway serves
        assert os.listdir(spool) == [] and os.listdir(staged.parent) == []
        assert (canary / 'keep').read_text() == 'keep'
        line = next((ln for ln in a.log().splitlines() if 'stale' in ln and 'pruned' in ln), '')
        assert all(f'{uid}/{name}' in line for name in left) and f'cr-migrate/{uid}/' in line, line
    finally:  # too deep for the fixture's shutil.rmtree if the gateway left it
        run('rm', '-rf', '--one-file-system', str(spool), check=False)
