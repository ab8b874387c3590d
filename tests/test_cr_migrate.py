"""Migration modes end to end: two real gateways on this machine (two state dirs, two ports,
each other's image keys trusted), the real xos-cr client relaying between them, real CRIU.

* page-server (what ``auto`` picks on a default kernel here) and forced dump-copy back;
* lazy-pages, with the sysctls it needs set for the test and restored after it (skipped only
  when the machine refuses to write them);
* refusals and failures: the job is left running at the source and the step is named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
    jobs_of,
    make_gateway,
    write_images_table,
    xcr,
)

from xos_sshd.cr.manifest import load_or_create_node_key
from xos_sshd.cr.migcaps import LAZY_PIPE_MAX_SIZE, read_sysctls

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
