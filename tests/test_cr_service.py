"""CRService, the one implementation of every cr op, with real CRIU, real uids, a real image
store; and the reaper that lets the gateway adopt job inits safely.

The transports (SSH subsystem, local socket, SFTP, xos-cr) are tested end to end in
test_cr_e2e.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from crhelpers import ints, wait_for

from xos_sshd.ams import LocalAccount
from xos_sshd.cr.images import ImageStore, Owner
from xos_sshd.cr.jobs import JobManager, process_alive
from xos_sshd.cr.reaper import Reaper
from xos_sshd.cr.service import LOG_CAP, Caller, CRService

pytest_plugins = ["crfixtures"]  # fixtures: account, other_account, manager, store, cr_base

COUNTER = 'i=0; while :; do i=$((i+1)); echo $i; echo $i >> count; sleep 0.05; done'


class Audit:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.lines.append({'event': event, **fields})

    def actions(self) -> list[tuple[str, str]]:
        return [(line['action'], line['outcome']) for line in self.lines if line['event'] == 'cr']


@pytest.fixture
def audit() -> Audit:
    return Audit()


@pytest.fixture
def images(cr_base: Path) -> ImageStore:
    return ImageStore.open(cr_base / 'state', node_name='node-a', quota_bytes=200 << 20,
                           quota_count=5)


@pytest.fixture
def service(manager: JobManager, images: ImageStore, audit: Audit) -> CRService:
    return CRService(manager, images, audit, criu_version='4.1.1')


def caller(account: LocalAccount, user: str | None = None) -> Caller:
    return Caller(Owner(account.vo, user or account.vo_user), account, 'test', 'pytest')


async def ok(service: CRService, who: Caller, op: str, **fields: Any) -> dict[str, Any]:
    reply = await service.handle(who, {'op': op, **fields})
    assert reply['ok'] is True, reply
    return reply


async def refused(service: CRService, who: Caller, op: str, **fields: Any) -> str:
    reply = await service.handle(who, {'op': op, **fields})
    assert reply['ok'] is False and set(reply) == {'ok', 'reason', 'error'}, reply
    assert reply['reason'] != 'internal-error', reply
    return reply['reason']


async def counting(service: CRService, who: Caller, at_least: int = 5) -> dict[str, Any]:
    job = (await ok(service, who, 'run', argv=['sh', '-c', COUNTER]))['job']
    count = Path(who.account.home) / 'count'
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= at_least, 15, 'counting')
    return job


async def test_counting_job_checkpoint_kill_restart(service: CRService, account: LocalAccount,
                                                    audit: Audit) -> None:
    me = caller(account)
    job = await counting(service, me)
    assert job['state'] == 'running' and job['command'] == ['sh', '-c', COUNTER]
    assert [j['id'] for j in (await ok(service, me, 'list'))['jobs']] == [job['id']]
    logs = await ok(service, me, 'logs', job=job['id'])
    assert logs['stdout'].split()[:3] == ['1', '2', '3'] and logs['stderr'] == ''
    count = Path(account.home) / 'count'
    before = ints(count)[-1]
    ck = await ok(service, me, 'checkpoint', job=job['id'])
    image = ck['image']
    after = ints(count)[-1]
    assert image['owner'] == {'vo': account.vo, 'user': account.vo_user}
    assert image['job_id'] == job['id'] and ck['job']['last_image'] == image['id']
    assert [i['id'] for i in (await ok(service, me, 'images'))['images']] == [image['id']]
    assert (await ok(service, me, 'image', image=image['id']))['image']['id'] == image['id']
    await asyncio.to_thread(wait_for, lambda: ints(count)[-1] >= after + 10, 15, 'running on')
    killed = await ok(service, me, 'kill', job=job['id'], signal='KILL')
    assert killed['ended'] is True and killed['job']['state'] == 'killed'
    n, last = len(ints(count)), ints(count)[-1]
    restarted = (await ok(service, me, 'restart', image=image['id']))['job']
    assert restarted['restored_from'] == image['id'] and restarted['parent_job'] == job['id']
    assert restarted['log_dir'] == job['log_dir'] and restarted['command'] == job['command']
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= n + 10, 15, 'counting on')
    resumed = ints(count)[n:]
    assert before <= resumed[0] <= after + 1 < last  # from the checkpoint, not from 1
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    # the restarted job writes to the original's logs, which logs of either shows
    assert int((await ok(service, me, 'logs', job=restarted['id']))['stdout'].split()[-1]) >= resumed[0]
    await ok(service, me, 'kill', job=restarted['id'], signal='KILL')
    await ok(service, me, 'rm', image=image['id'])
    assert (await ok(service, me, 'images'))['images'] == []
    assert audit.actions() == [('run', 'ok'), ('checkpoint', 'ok'), ('kill', 'ok'),
                               ('restart', 'ok'), ('kill', 'ok'), ('rm', 'ok')]
    line = next(a for a in audit.lines if a['action'] == 'checkpoint')
    assert (line['uid'], line['vo'], line['user'], line['job'], line['image']) == (
        account.uid, account.vo, account.vo_user, job['id'], image['id'])


async def test_isolation_between_accounts_and_identities(service: CRService, account: LocalAccount,
                                                         other_account: LocalAccount) -> None:
    alice = caller(account)
    job = await counting(service, alice, at_least=2)
    image = (await ok(service, alice, 'checkpoint', job=job['id']))['image']
    # Another account, and the same uid for another VO identity (a pool account re-leased):
    # nothing of alice's exists for them, whether the id was seen or guessed.
    for intruder in (caller(other_account), caller(account, user='mallory')):
        assert (await ok(service, intruder, 'list'))['jobs'] == []
        assert (await ok(service, intruder, 'images'))['images'] == []
        for op in ('logs', 'kill', 'checkpoint'):
            assert await refused(service, intruder, op, job=job['id']) == 'no-such-job'
        for op in ('restart', 'rm', 'image'):
            assert await refused(service, intruder, op, image=image['id']) == 'no-such-image'
        with pytest.raises(Exception) as exc:
            await service.export_archive(intruder, image['id'])
        assert getattr(exc.value, 'reason', '') == 'no-such-image'
        for guess in ('j0000000000', 'jffffffffff', '../' + job['id']):
            assert await refused(service, intruder, 'kill', job=guess) == 'no-such-job'
    # ... and alice's job and image are untouched
    assert process_alive(job['pid'], job['starttime'], account.uid)
    assert [i['id'] for i in (await ok(service, alice, 'images'))['images']] == [image['id']]
    await ok(service, alice, 'kill', job=job['id'], signal='KILL')


async def test_logs_are_read_as_the_user_and_capped(service: CRService, account: LocalAccount,
                                                    cr_base: Path) -> None:
    me = caller(account)
    big = 'import sys\nsys.stdout.write("x" * 3000000 + "END\\n")\nsys.stdout.flush()\nimport time\ntime.sleep(60)\n'
    job = (await ok(service, me, 'run', argv=['python3', '-c', big]))['job']
    out = Path(job['log_dir']) / 'stdout'
    await asyncio.to_thread(wait_for, lambda: out.exists() and out.stat().st_size > 3000000, 15)
    logs = await ok(service, me, 'logs', job=job['id'])
    assert len(logs['stdout']) == LOG_CAP and logs['stdout'].endswith('xEND\n')
    assert logs['truncated'] == {'stdout': True, 'stderr': False}
    assert logs['stdout_size'] == 3000004
    small = await ok(service, me, 'logs', job=job['id'], max_bytes=10)
    assert small['stdout'] == 'xxxxxxEND\n'
    # The user swaps the log for a link to a file only root may read: the reader (the
    # account) cannot follow it, so nothing of the secret comes back.
    secret = cr_base / 'secret'
    secret.write_text('root only')
    secret.chmod(0o600)
    os.unlink(out)
    os.symlink(secret, out)
    reply = await service.handle(me, {'op': 'logs', 'job': job['id']})
    assert reply['ok'] is False and reply['reason'] == 'logs-unavailable'
    assert 'root only' not in str(reply)
    await ok(service, me, 'kill', job=job['id'], signal='KILL')


async def test_bad_requests_never_crash(service: CRService, account: LocalAccount) -> None:
    me = caller(account)
    cases = [
        ({}, 'bad-request'), ({'op': 7}, 'bad-request'), ({'op': 'format'}, 'unknown-op'),
        ({'op': 'run'}, 'bad-request'), ({'op': 'run', 'argv': 'ls'}, 'bad-request'),
        ({'op': 'run', 'argv': []}, 'bad-request'), ({'op': 'run', 'argv': ['a\0b']}, 'bad-request'),
        ({'op': 'run', 'argv': ['true'], 'env': {'A=B': 'x'}}, 'bad-request'),
        ({'op': 'run', 'argv': ['true'], 'env': {'XOS_JOB_ID': 'j0'}}, 'bad-request'),
        ({'op': 'logs'}, 'bad-request'), ({'op': 'logs', 'job': 5}, 'bad-request'),
        ({'op': 'logs', 'job': 'j0123456789', 'max_bytes': -1}, 'bad-request'),
        ({'op': 'kill', 'job': 'j0123456789', 'signal': 'STOP'}, 'bad-request'),
        ({'op': 'checkpoint', 'job': 'j0123456789', 'stop': 'yes'}, 'bad-request'),
        ({'op': 'restart'}, 'bad-request'), ({'op': 'restart', 'image': '/etc'}, 'no-such-image'),
        ({'op': 'restart', 'image': 'i0', 'logs_of': '../x'}, 'bad-request'),
        ({'op': 'rm', 'image': ['x']}, 'bad-request'), ({'op': 'imported'}, 'bad-request'),
        ({'op': 'imported', 'upload': 'never.tar'}, 'no-such-upload'),
        ({'op': 'cr.kill', 'job': 'j0123456789'}, 'no-such-job'),
    ]
    for request, reason in cases:
        reply = await service.handle(me, request)
        assert (reply['ok'], reply['reason']) == (False, reason), (request, reply)
    assert (await service.handle(me, {'op': 'cr.list'}))['ok'] is True


async def test_without_criu_only_the_criu_ops_are_refused(manager: JobManager, images: ImageStore,
                                                          audit: Audit, account: LocalAccount) -> None:
    service = CRService(manager, images, audit, unavailable='no usable CRIU >= 4.0 found')
    me = caller(account)
    for op, fields in (('run', {'argv': ['true']}), ('checkpoint', {'job': 'j0123456789'}),
                       ('restart', {'image': 'i0123'})):
        reply = await service.handle(me, {'op': op, **fields})
        assert reply['reason'] == 'criu-unavailable' and 'no usable CRIU' in reply['error']
    assert (await service.handle(me, {'op': 'list'}))['ok'] is True
    assert (await service.handle(me, {'op': 'images'}))['ok'] is True


async def test_stop_checkpoint_over_quota_leaves_the_job_running(manager: JobManager,
                                                                 cr_base: Path, audit: Audit,
                                                                 account: LocalAccount) -> None:
    images = ImageStore.open(cr_base / 'state', node_name='node-a', quota_count=1)
    service = CRService(manager, images, audit, criu_version='4.1.1')
    me = caller(account)
    job = await counting(service, me, at_least=2)
    await ok(service, me, 'checkpoint', job=job['id'])
    assert await refused(service, me, 'checkpoint', job=job['id'], stop=True) == 'quota-exceeded'
    assert process_alive(job['pid'], job['starttime'], account.uid)  # not dumped, not stopped
    assert ('checkpoint', 'refused') in audit.actions()
    await ok(service, me, 'kill', job=job['id'], signal='KILL')


async def test_kill_with_term_ends_the_job_and_refresh_records_exit(service: CRService,
                                                                    account: LocalAccount) -> None:
    me = caller(account)
    job = (await ok(service, me, 'run', argv=['sh', '-c', 'sleep 0.3; exit 7']))['job']
    reaper = Reaper()
    deadline = time.monotonic() + 15
    while True:  # as the gateway's poll loop does
        await service.refresh(reaper.reap())
        row = await service.jobs.table.get(job['id'])
        if row.state != 'running' or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert (row.state, row.exit_code) == ('exited', 7)
    job = (await ok(service, me, 'run', argv=['sleep', '600']))['job']
    got = await ok(service, me, 'kill', job=job['id'])  # TERM, forwarded by the job init
    assert got['ended'] is True and got['job']['state'] == 'killed'


def _parent_of(pid: int) -> int:
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[1])


def _state(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
        return 'gone'


async def test_reaper_takes_adopted_zombies_only(manager: JobManager, account: LocalAccount) -> None:
    """The test process is a subreaper here (crfixtures), as the gateway is."""
    reaper = Reaper()
    # 1. a job init (re-parented to us when the namespace helper exited)
    job = await manager.start(account, ['sh', '-c', 'sleep 0.5; exit 3'])
    assert _parent_of(job.pid) == os.getpid()
    # 2. a direct child that its owner waits for later (as a session's Popen does)
    direct = subprocess.Popen(['true'], start_new_session=True)
    # 3. an orphan of a "session": its session leader exits, the child lives on, then ends
    session = subprocess.Popen([sys.executable, '-c', 'import subprocess; subprocess.Popen(["sleep", "0.77"])'],
                               start_new_session=True)
    session.wait()
    orphans = [int(p) for p in os.listdir('/proc') if p.isdigit() and _state(int(p)) != 'gone'
               and os.path.exists(f'/proc/{p}/cmdline')
               and open(f'/proc/{p}/cmdline', 'rb').read() == b'sleep\x000.77\x00']
    assert len(orphans) == 1 and _parent_of(orphans[0]) == os.getpid()
    await asyncio.to_thread(wait_for, lambda: _state(job.pid) == 'Z' and _state(orphans[0]) == 'Z'
                            and _state(direct.pid) == 'Z', 10, 'three zombies')
    assert reaper.reap() == {job.pid: 3}
    assert _state(job.pid) == 'gone' and _state(orphans[0]) == 'gone'
    assert _state(direct.pid) == 'Z'  # its status is its owner's
    assert direct.wait() == 0 and direct.returncode == 0
    # a zombie nobody waits for is taken after the linger time
    forgotten = subprocess.Popen(['true'], start_new_session=True)
    await asyncio.to_thread(wait_for, lambda: _state(forgotten.pid) == 'Z', 10)
    lazy = Reaper(linger=0.2)
    lazy.reap()
    assert _state(forgotten.pid) == 'Z'
    await asyncio.sleep(0.3)
    lazy.reap()
    assert _state(forgotten.pid) == 'gone'
    forgotten.returncode = 0  # (so Popen's destructor does not complain)
