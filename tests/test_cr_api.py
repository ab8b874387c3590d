"""The application API (xos_sshd.cr.api): real jobs using it, under real uids, real CRIU.

The jobs are Python programs that load the API by path (``$XOS_CR_API``, as any python3 in a
job can) and log what happens to them as JSON lines in ``~/events``; the file is opened per
line, so the image names no open file the test later changes.  The first tests drive the
protocol in this process (no CRIU) for what is easier to see there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from crhelpers import wait_for

from xos_sshd.ams import LocalAccount
from xos_sshd.cr import api, apictl
from xos_sshd.cr.jobs import JobError, JobManager, process_alive

pytest_plugins = ["crfixtures"]  # fixtures: account, manager, cr_base

PRELUDE = r'''
import importlib.util, json, os, sys, threading, time
spec = importlib.util.spec_from_file_location('xos_cr_api', os.environ['XOS_CR_API'])
api = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api)
state = {'n': 0, 'cs_done': False}

def event(what, **kw):
    with open('events', 'a') as f:
        f.write(json.dumps({'what': what, 't': time.time(), 'pid': os.getpid(),
                            'job': api.job_id(), **kw}) + '\n')

def idle():
    while True:
        state['n'] += 1
        time.sleep(0.02)

def wait_file(name):
    while not os.path.exists(name):
        time.sleep(0.01)
'''


def events(account: LocalAccount) -> list[dict[str, Any]]:
    try:
        text = (Path(account.home) / 'events').read_text()
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in text.split('\n')[:-1] if ln.strip()]


def named(account: LocalAccount, what: str) -> list[dict[str, Any]]:
    return [e for e in events(account) if e['what'] == what]


async def until(account: LocalAccount, what: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    await asyncio.to_thread(wait_for, lambda: len(named(account, what)) >= count, timeout,
                            f'{count} {what!r} event(s)')
    return named(account, what)


async def start(manager: JobManager, account: LocalAccount, body: str):
    job = await manager.start(account, ['python3', '-c', PRELUDE + body])
    await until(account, 'ready')
    return job


# -- the protocol in this process (coordinator called directly, no CRIU) ------------------

def _me(p: api._Participant) -> dict[str, Any]:
    """The participant entry root would make for *p* (this process may hold several)."""
    comm = Path(f'/proc/self/task/{p.tid}/comm').read_text().strip()
    m = api.COMM_RE.match(comm)
    assert m, comm
    return {'pid': os.getpid(), 'starttime': api._starttime(os.getpid()),
            'cmd': int(m.group(1), 16), 'reply': int(m.group(2), 16)}


def test_thread_name_and_protocol_in_process() -> None:
    p = api._Participant()
    p.start()
    log: list[str] = []

    def gen_cb():
        log.append('before gen')
        how = yield
        log.append(f'after gen {how}')

    def plain_cb():
        log.append('before plain')
        return lambda how: log.append(f'after plain {how}')

    def no_after():
        log.append('before no-after')

    p.callbacks += [gen_cb, plain_cb, no_after]
    comm = Path(f'/proc/self/task/{p.tid}/comm').read_text().strip()
    assert api.COMM_RE.match(comm) and comm == f'xcr:{p.fds[1]:x}.{p.fds[2]:x}'
    me = _me(p)
    r = api.coordinate({'op': 'prepare', 'seq': 's1', 'timeout': 2, 'grace': 2, 'hold': 30,
                        'participants': [me]})
    assert r['ready'] == [os.getpid()] and not r['refused'] and not r['silent']
    assert log == ['before gen', 'before plain', 'before no-after']
    # Pending: a new critical section waits until the resume.
    entered = threading.Event()

    def enter():
        with p_section(p, 'late'):
            entered.set()
    t = threading.Thread(target=enter)
    t.start()
    assert not entered.wait(0.3)
    api.coordinate({'op': 'resume', 'outcome': 'continue', 'participants': [me]})
    assert entered.wait(5)
    t.join()
    wait_for(lambda: len(log) == 5, 5, 'after-parts')
    assert log[3:] == ['after plain continue', 'after gen continue']  # reverse order


class p_section:
    """api.critical_section for a private participant instance."""

    def __init__(self, p: api._Participant, name: str, timeout: float | None = None) -> None:
        self.p, self.name, self.timeout = p, name, timeout

    def __enter__(self) -> None:
        self.entry = self.p.enter(self.name, self.timeout)

    def __exit__(self, *exc: object) -> None:
        self.p.leave(self.entry)


def test_refusals_in_process() -> None:
    p = api._Participant()
    p.start()
    me = _me(p)
    log: list[str] = []

    def first():
        log.append('before first')
        how = yield
        log.append(f'after first {how}')

    def broken():
        raise ValueError('no database connection')

    p.callbacks += [first, broken]
    r = api.coordinate({'op': 'prepare', 'seq': 's2', 'timeout': 2, 'grace': 2, 'hold': 30,
                        'participants': [me]})
    [ref] = r['refused']
    assert ref['kind'] == 'callback' and 'test_refusals_in_process.<locals>.broken' in ref['reason']
    assert 'ValueError: no database connection' in ref['reason']
    assert log == ['before first', 'after first aborted']  # the prepared one hears 'aborted'
    p.callbacks.remove(broken)
    # A section with its own, shorter timeout; sections nest within a thread.
    inside, release = threading.Event(), threading.Event()

    def hold():
        with p_section(p, 'outer'), p_section(p, 'index rebuild', timeout=0.3):
            inside.set()
            release.wait(10)
    t = threading.Thread(target=hold, name='rebuilder')
    t.start()
    inside.wait(5)
    t0 = time.monotonic()
    r = api.coordinate({'op': 'prepare', 'seq': 's3', 'timeout': 5, 'grace': 2, 'hold': 30,
                        'participants': [me]})
    assert time.monotonic() - t0 < 2
    [ref] = r['refused']
    assert ref['kind'] == 'critical-section'
    assert "critical section 'index rebuild'" in ref['reason'] and 'thread rebuilder' in ref['reason']
    assert 'did not end within 0.3 s (1 more open)' in ref['reason']
    release.set()
    t.join()
    assert log == ['before first', 'after first aborted']  # callbacks never ran for s3


def test_import_alone_changes_nothing_and_request_times_out() -> None:
    # This process imported api (through apictl) without using it: no thread, no pipes.
    assert api._P.thread is None and api._P.fds is None
    p = api._Participant()
    with pytest.raises(TimeoutError, match='does the gateway serve'):
        p.request_checkpoint(stop=True, timeout=0.3)
    comm = Path(f'/proc/self/task/{p.tid}/comm').read_text().strip()
    assert not comm.endswith(('+', '!'))  # the request mark is taken back
    with p_section(p, 'x'), pytest.raises(RuntimeError, match='would wait for itself'):
        p.request_checkpoint(False, 1)


# -- real jobs ------------------------------------------------------------------------------

CALLBACKS = r'''
@api.on_checkpoint
def first():
    event('before', cb='first', n=state['n'])
    how = yield
    event('after', cb='first', how=how, n=state['n'])

def second():
    event('before', cb='second')
    return lambda how: event('after', cb='second', how=how)
api.register(second)
event('ready')
idle()
'''


async def test_callbacks_before_and_continue_then_restart(manager: JobManager,
                                                          account: LocalAccount) -> None:
    job = await start(manager, account, CALLBACKS)
    t0 = time.time()
    ck = await manager.checkpoint(job.id, account)  # left running
    t1 = time.time()
    assert ck.api_participants == 1
    before = named(account, 'before')
    assert [e['cb'] for e in before] == ['first', 'second'] and t0 <= before[0]['t'] <= t1
    after = await until(account, 'after', 2)
    continued_at = after[1]['n']
    # After-parts in reverse order, told 'continue', in the original job.
    assert [(e['cb'], e['how'], e['job']) for e in after] == [('second', 'continue', job.id),
                                                             ('first', 'continue', job.id)]
    assert after[0]['t'] <= t1 + 2.0  # the resume is sent before checkpoint() returns
    await manager.kill(job.id, account, signal.SIGKILL)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    after = await until(account, 'after', 4)
    # The restored process runs the after-parts again, from the image: told 'restart', and
    # api.job_id() names the job it runs in now.
    assert [(e['cb'], e['how'], e['job']) for e in after[2:]] == [('second', 'restart', new.id),
                                                                 ('first', 'restart', new.id)]
    # The counter comes from the image: from between the callbacks and the resume.
    assert before[0]['n'] <= after[3]['n'] <= continued_at + 10
    assert len(named(account, 'before')) == 2  # the before-parts did not run again
    # A second checkpoint of the restored job works the same way.
    ck2 = await manager.checkpoint(new.id, account)
    assert ck2.api_participants == 1
    after = await until(account, 'after', 6)
    assert [(e['how'], e['job']) for e in after[4:]] == [('continue', new.id)] * 2
    await manager.kill(new.id, account, signal.SIGKILL)


async def test_restart_is_noticed_without_the_message(manager: JobManager,
                                                      account: LocalAccount,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A restore that sends no 'resume restart' (e.g. images restored by hand): the API
    # thread sees its pid namespace change while it waits and resumes with 'restart'.
    job = await start(manager, account, CALLBACKS)
    ck = await manager.checkpoint(job.id, account, stop=True)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))

    async def no_resume(*_a: object, **_k: object) -> dict[str, Any]:
        return {'ok': True}
    monkeypatch.setattr(apictl, 'resume', no_resume)
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    after = await until(account, 'after', 2, timeout=5)
    assert [(e['how'], e['job']) for e in after] == [('restart', new.id)] * 2
    await manager.kill(new.id, account, signal.SIGKILL)


CRITICAL = r'''
@api.on_checkpoint
def cb():
    event('before', cs_done=state['cs_done'])
    how = yield
    event('after', how=how, cs_done=state['cs_done'])
event('ready')
wait_file('go')
with api.critical_section('commit'):
    event('cs-enter')
    time.sleep(1.5)
    state['cs_done'] = True
    event('cs-leave')
idle()
'''


async def test_critical_section_delays_the_dump(manager: JobManager, account: LocalAccount) -> None:
    job = await start(manager, account, CRITICAL)
    (Path(account.home) / 'go').touch()
    [enter] = await until(account, 'cs-enter')
    t0 = time.time()
    ck = await manager.checkpoint(job.id, account, stop=True)
    [leave] = named(account, 'cs-leave')
    [before] = named(account, 'before')
    # The checkpoint arrived inside the section and waited for its end: the callbacks ran
    # after it, and the dump (which follows the callbacks) saw the section's result.
    assert enter['t'] <= t0 < leave['t'] <= before['t']
    assert before['cs_done'] is True
    assert ck.api_wait >= leave['t'] - t0 - 0.05
    assert ck.api_wait < leave['t'] - t0 + 1.0
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    [after] = await until(account, 'after')
    assert after['how'] == 'restart' and after['cs_done'] is True  # the image has it
    assert len(named(account, 'cs-leave')) == 1  # and the section did not run again
    await manager.kill(new.id, account, signal.SIGKILL)


LONG_CRITICAL = r'''
@api.on_checkpoint
def cb():
    event('before')
    how = yield
    event('after', how=how)
event('ready')
with api.critical_section('long commit'):
    event('cs-enter')
    wait_file('release')
event('cs-leave')
idle()
'''


async def test_critical_section_longer_than_the_timeout_refuses(manager: JobManager,
                                                                account: LocalAccount,
                                                                cr_base: Path) -> None:
    job = await start(manager, account, LONG_CRITICAL)
    await until(account, 'cs-enter')
    t0 = time.monotonic()
    with pytest.raises(JobError) as info:
        await manager.checkpoint(job.id, account, api_timeout=1.0)
    waited = time.monotonic() - t0
    assert info.value.reason == 'critical-section'
    msg = str(info.value)
    assert "critical section 'long commit'" in msg and 'did not end within 1 s' in msg
    assert 'thread MainThread' in msg and f'job {job.id} refused by the job' in msg
    assert 1.0 <= waited < 3.0
    # Unharmed: still running, no image made, its callbacks never ran; it goes on counting
    # and a later checkpoint (once the section ended) works.
    assert process_alive(job.pid, job.starttime, job.uid)
    assert not (cr_base / 'spool').exists()
    assert named(account, 'before') == [] and named(account, 'after') == []
    (Path(account.home) / 'release').touch()
    await until(account, 'cs-leave')
    ck = await manager.checkpoint(job.id, account, api_timeout=1.0)
    [after] = await until(account, 'after')
    assert after['how'] == 'continue' and ck.api_participants == 1
    await manager.kill(job.id, account, signal.SIGKILL)


async def test_job_without_the_api_is_unaffected(manager: JobManager, account: LocalAccount) -> None:
    # A Python job that imports the API but never uses it, and a shell job.
    body = 'event("ready")\nidle()\n'
    py = await start(manager, account, body)
    sh = await manager.start(account, ['sh', '-c', 'while :; do sleep 0.05; done'])
    for job in (py, sh):
        t0 = time.monotonic()
        parts = apictl.job_participants(job.pid)
        find = time.monotonic() - t0
        assert parts == [] and find < 0.1  # a few comm files read
        t0 = time.monotonic()
        ck = await manager.checkpoint(job.id, account)
        total = time.monotonic() - t0
        assert ck.api_participants == 0 and ck.api_wait == 0.0
        # Everything besides CRIU's own time (pre-scan, image dir, table) stays small.
        assert total - ck.seconds < 1.0, (total, ck.seconds)
        assert process_alive(job.pid, job.starttime, job.uid)
        await manager.kill(job.id, account, signal.SIGKILL)


REQUEST = r'''
event('ready')
how = api.request_checkpoint()
event('returned', how=how, n=1)
how = api.request_checkpoint(stop=True)
event('returned', how=how, n=2)
idle()
'''


async def test_request_checkpoint_of_oneself(manager: JobManager, account: LocalAccount) -> None:
    job = await start(manager, account, REQUEST)

    async def requests() -> list:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = await manager.checkpoint_requests()
            if got:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError('no checkpoint request seen')
    # What the gateway's periodic task does: find the request, checkpoint as asked.
    [req] = await requests()
    assert (req.job.id, req.stop) == (job.id, False)
    await manager.checkpoint(req.job.id, account, stop=req.stop)
    [ret] = await until(account, 'returned')
    assert (ret['how'], ret['n'], ret['job']) == ('continue', 1, job.id)
    [req] = await requests()
    assert (req.job.id, req.stop) == (job.id, True)
    ck = await manager.checkpoint(req.job.id, account, stop=req.stop)
    assert await manager.checkpoint_requests() == []  # served (and the job is gone)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    assert len(named(account, 'returned')) == 1  # stopped: the original never returned
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    rets = await until(account, 'returned', 2)
    assert (rets[1]['how'], rets[1]['n'], rets[1]['job']) == ('restart', 2, new.id)
    assert await manager.checkpoint_requests() == []
    await manager.kill(new.id, account, signal.SIGKILL)


async def test_callback_closes_a_tcp_connection_so_the_job_can_be_checkpointed(
        manager: JobManager, account: LocalAccount) -> None:
    # The pre-dump scan comes after the callbacks: a job may drop what CRIU cannot carry.
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(listener.accept()[0])
            except OSError:
                continue
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    body = f'''
import socket
conn = [socket.create_connection(('127.0.0.1', {port}))]

@api.on_checkpoint
def reconnect():
    conn[0].close()
    how = yield
    conn[0] = socket.create_connection(('127.0.0.1', {port}))
    event('after', how=how)
event('ready')
idle()
'''
    try:
        job = await start(manager, account, body)
        ck = await manager.checkpoint(job.id, account)
        [after] = await until(account, 'after')
        assert after['how'] == 'continue' and ck.api_participants == 1
        await asyncio.to_thread(wait_for, lambda: len(conns) >= 2, 5, 'the reconnection')
        await manager.kill(job.id, account, signal.SIGKILL)
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for c in conns:
            c.close()


async def test_the_coordinators_answer_is_the_users_word(monkeypatch: pytest.MonkeyPatch,
                                                         account: LocalAccount) -> None:
    # The coordinator runs as the user (who may ptrace it): whatever it says is checked.
    parts = [apictl.Participant(4242, 1, 3, 4)]
    answers = [
        {'ok': True, 'ready': 'all', 'refused': {'pid': 1}, 'silent': [[1]], 'unreachable': 7},
        {'ok': True, 'ready': [4242, 99], 'refused': [{'pid': [4242]}, {'pid': 99, 'reason': 'x'},
                                                      {'pid': 4242, 'kind': 'callback',
                                                       'reason': 'a\nb' * 1000}]},
    ]

    async def fake(*_a: object, **_k: object) -> dict[str, Any]:
        return answers.pop(0)
    monkeypatch.setattr(apictl, '_coordinator', fake)
    first = await apictl.prepare(account, parts, timeout=1, hold=5)
    assert (first.ready, first.refused, first.silent, first.unreachable) == ((), (), (), ())
    second = await apictl.prepare(account, parts, timeout=1, hold=5)
    assert second.ready == (4242,) and not second.ok
    [(pid, kind, reason)] = second.refused
    assert (pid, kind) == (4242, 'callback') and '\n' not in reason
    assert len(reason) <= api.MAX_REASON
    assert second.kind == 'refused-by-job'
    # A real coordinator run (as the account) whose output is over the bound is cut off.
    monkeypatch.undo()
    monkeypatch.setattr(apictl, 'MAX_OUTPUT', 10)
    got = await apictl._coordinator(account, {'op': 'resume', 'outcome': 'continue',
                                              'participants': []}, 10, '/usr/bin/python3')
    assert got == {'ok': False, 'error': 'the API coordinator wrote too much'}
