"""Jobs end to end with real CRIU and real uids: start, checkpoint, kill, restore, refusals.

Nothing is skipped: if CRIU cannot work on this machine, these tests fail with CRIU's reason.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from crhelpers import ints, kill_tree_of, uid_processes, wait_for

from xos_sshd.ams import LocalAccount
from xos_sshd.ams.store import SCHEMA_VERSION, Store
from xos_sshd.cr import criu
from xos_sshd.cr import jobinit
from xos_sshd.cr.jobs import (
    LAZY_PULL_DETAIL,
    JobError,
    JobManager,
    JobTable,
    process_alive,
    reconcile,
)

pytest_plugins = ["crfixtures"]  # fixtures: account, other_account, manager, store, cr_base

COUNTER = 'i=0; while :; do i=$((i+1)); echo $i; echo $i >> count; sleep 0.05; done'


async def started(manager: JobManager, account: LocalAccount, argv: list[str],
                  ready: str | None = None, at_least: int = 3):
    job = await manager.start(account, argv)
    if ready:
        path = Path(account.home) / ready
        await asyncio.to_thread(wait_for, lambda: len(ints(path)) >= at_least, 15, f'{path}')
    return job


async def test_counting_job_checkpoint_kill_restore_continues(manager: JobManager,
                                                              account: LocalAccount) -> None:
    job = await started(manager, account, ['sh', '-c', COUNTER], ready='count', at_least=5)
    assert job.state == 'running' and job.root_pid == 2
    count = Path(account.home) / 'count'
    before = ints(count)[-1]
    ck = await manager.checkpoint(job.id, account)  # leave running
    after = ints(count)[-1]
    print(f'\ncheckpoint (dump, job left running): {ck.seconds * 1000:.0f} ms')
    await asyncio.to_thread(wait_for, lambda: ints(count)[-1] >= after + 20, 15, 'counting on')
    assert (await manager.table.get(job.id)).last_image == ck.image_id
    kill_tree_of(job.pid)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    killed_at = len(ints(count))
    last_before_kill = ints(count)[-1]
    t0 = time.monotonic()
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    print(f'restore: {(time.monotonic() - t0) * 1000:.0f} ms')
    assert new.state == 'running' and new.id != job.id
    assert (new.restored_from, new.parent_job, new.log_dir) == (ck.image_id, job.id, job.log_dir)
    assert new.command == job.command
    await asyncio.to_thread(wait_for, lambda: len(ints(count)) >= killed_at + 10, 15, 'restored counting')
    resumed = ints(count)[killed_at:]
    # It goes on from the checkpoint (not from 1, not from where the killed one stopped) ...
    assert before <= resumed[0] <= after + 1 < last_before_kill
    # ... one by one.
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    stdout = (Path(job.log_dir) / 'stdout').read_text().split()
    assert stdout[-1].isdigit() and int(stdout[-1]) >= resumed[0]


async def test_restore_while_the_original_still_runs(manager: JobManager,
                                                     account: LocalAccount) -> None:
    job = await started(manager, account, ['sh', '-c', COUNTER], ready='count')
    ck = await manager.checkpoint(job.id, account)
    twin = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    # Same pids inside, no clash: each lives in its own PID namespace.
    assert twin.root_pid == job.root_pid == 2 and twin.pid != job.pid
    assert process_alive(job.pid, job.starttime, job.uid)
    assert process_alive(twin.pid, twin.starttime, twin.uid)
    n = len(ints(Path(account.home) / 'count'))
    await asyncio.to_thread(wait_for, lambda: len(ints(Path(account.home) / 'count')) >= n + 20)
    # Both write: values below the original's latest reappear (the twin counts from the image).
    values = ints(Path(account.home) / 'count')[n:]
    assert len(set(values)) < len(values) or sorted(values) != values
    for j in (job, twin):
        await manager.kill(j.id, account, signal.SIGKILL)


async def test_pipe_between_two_processes(manager: JobManager, account: LocalAccount) -> None:
    script = ('i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done '
              '| while read x; do echo "got $x" >> piped; done')
    job = await started(manager, account, ['sh', '-c', script], ready='piped')
    ck = await manager.checkpoint(job.id, account, stop=True)
    assert (await manager.table.get(job.id)).state == 'checkpointed'
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    piped = Path(account.home) / 'piped'
    n = len(ints(piped))
    last = ints(piped)[-1]
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    await asyncio.to_thread(wait_for, lambda: len(ints(piped)) >= n + 10, 15, 'pipe flowing again')
    got = ints(piped)
    assert got[n] <= last + 1 and got[n:] == list(range(got[n], got[n] + len(got) - n))
    await manager.kill(new.id, account, signal.SIGKILL)


async def test_open_regular_file(manager: JobManager, account: LocalAccount) -> None:
    prog = ('import time\nf = open("data", "a")\ni = 0\nwhile True:\n'
            '    i += 1\n    f.write(f"{i}\\n")\n    f.flush()\n    time.sleep(0.05)\n')
    job = await started(manager, account, ['python3', '-c', prog], ready='data')
    ck = await manager.checkpoint(job.id, account, stop=True)
    data = Path(account.home) / 'data'
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    n, last = len(ints(data)), ints(data)[-1]
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    await asyncio.to_thread(wait_for, lambda: len(ints(data)) >= n + 10, 15, 'writes through the restored fd')
    assert ints(data)[n] == last + 1  # the same file object, same counter
    await manager.kill(new.id, account, signal.SIGKILL)


async def test_multithreaded_python(manager: JobManager, account: LocalAccount) -> None:
    prog = ('import threading, time\nlock = threading.Lock()\n'
            'def work(n):\n    i = 0\n    while True:\n        i += 1\n'
            '        with lock, open("threads", "a") as f:\n            f.write(f"{n} {i}\\n")\n'
            '        time.sleep(0.05)\n'
            'for n in range(3):\n    threading.Thread(target=work, args=(n,), daemon=True).start()\n'
            'while True:\n    time.sleep(1)\n')
    job = await started(manager, account, ['python3', '-c', prog], ready='threads', at_least=9)
    root = [p for p in uid_processes(account.uid) if Path(f'/proc/{p}/cmdline').read_bytes().startswith(b'python3\0-c')]
    assert len(root) == 1 and len(os.listdir(f'/proc/{root[0]}/task')) == 4
    ck = await manager.checkpoint(job.id, account, stop=True)
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    path = Path(account.home) / 'threads'
    lines = path.read_text().splitlines()
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    await asyncio.to_thread(wait_for, lambda: len(path.read_text().splitlines()) >= len(lines) + 15)
    resumed = [tuple(map(int, ln.split())) for ln in path.read_text().splitlines()[len(lines):]]
    assert {t for t, _ in resumed} == {0, 1, 2}  # every thread came back
    for t in range(3):
        last = max(i for tt, i in (tuple(map(int, ln.split())) for ln in lines) if tt == t)
        first_again = min(i for tt, i in resumed if tt == t)
        assert first_again <= last + 1  # each thread's own counter went on
    await manager.kill(new.id, account, signal.SIGKILL)


async def test_tcp_socket_is_refused_with_the_socket_named(manager: JobManager,
                                                           account: LocalAccount,
                                                           cr_base: Path) -> None:
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        prog = (f'import socket, time\ns = socket.create_connection(("127.0.0.1", {port}))\n'
                'open("connected", "w").write("1\\n")\ntime.sleep(600)\n')
        job = await started(manager, account, ['python3', '-c', prog], ready='connected', at_least=1)
        with pytest.raises(JobError) as info:
            await manager.checkpoint(job.id, account)
        msg = str(info.value)
        assert info.value.reason == 'not-checkpointable'
        assert f'-> 127.0.0.1:{port} (ESTABLISHED)' in msg and 'TCP socket' in msg
        assert 'SO_PASSCRED' in msg and '(python3) fd ' in msg
        assert process_alive(job.pid, job.starttime, job.uid)  # refused, not harmed
        assert not (cr_base / 'spool').exists()  # refused before any image was made
    finally:
        listener.close()


async def test_external_unix_socket_is_refused(manager: JobManager, account: LocalAccount) -> None:
    name = f'\0xos-test-{os.getpid()}-{time.monotonic_ns()}'
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(name)
    listener.listen()
    accepted: list[socket.socket] = []
    try:
        prog = (f'import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})\n'
                'open("connected", "w").write("1\\n")\ntime.sleep(600)\n')
        job = await started(manager, account, ['python3', '-c', prog], ready='connected', at_least=1)
        with pytest.raises(JobError) as info:  # connected, not yet accepted by the daemon
            await manager.checkpoint(job.id, account)
        assert 'unix socket' in str(info.value) and 'not yet accepted' in str(info.value)
        accepted.append(listener.accept()[0])  # now a real peer, named by the listener
        with pytest.raises(JobError) as info:
            await manager.checkpoint(job.id, account)
        assert info.value.reason == 'not-checkpointable'
        assert 'unix socket @xos-test-' in str(info.value) and 'outside the job' in str(info.value)
        # A socketpair inside the job is fine (CRIU carries it).
        pair = ('import socket, time\na, b = socket.socketpair()\nb.send(b"x")\n'
                'open("paired", "w").write("1\\n")\ntime.sleep(600)\n')
        inner = await started(manager, account, ['python3', '-c', pair], ready='paired', at_least=1)
        ck = await manager.checkpoint(inner.id, account)
        assert os.path.exists(os.path.join(ck.images_dir, 'inventory.img'))
    finally:
        listener.close()
        for s in accepted:
            s.close()


async def test_pipe_with_an_end_outside_is_refused(manager: JobManager, account: LocalAccount) -> None:
    prog = ('import os, time\nr, w = os.pipe()\nopen("fds", "w").write(f"{r} {w}\\n")\n'
            'while not os.path.exists("go"):\n    time.sleep(0.02)\nos.close(w)\n'
            'open("closed", "w").write("1\\n")\ntime.sleep(600)\n')
    job = await started(manager, account, ['python3', '-c', prog], ready='fds', at_least=1)
    home = Path(account.home)
    r, w = map(int, (home / 'fds').read_text().split())
    [root] = [p for p in uid_processes(account.uid) if p != job.pid]
    # Re-opening the job's write end through /proc gives this (outside) process the pipe.
    outside = os.open(f'/proc/{root}/fd/{w}', os.O_WRONLY)
    try:
        (home / 'go').touch()
        await asyncio.to_thread(wait_for, (home / 'closed').exists)
        with pytest.raises(JobError) as info:
            await manager.checkpoint(job.id, account)
        msg = str(info.value)
        assert f'(python3) fd {r} but its write end is outside the job' in msg and 'pipe:[' in msg
    finally:
        os.close(outside)


async def test_daemon_outside_the_tree_is_refused(manager: JobManager, account: LocalAccount) -> None:
    job = await started(manager, account, ['sh', '-c', '(sleep 600 &); echo 1 > forked; sleep 600'],
                        ready='forked', at_least=1)
    with pytest.raises(JobError) as info:
        await manager.checkpoint(job.id, account)
    assert '(sleep) is outside the job\'s process tree' in str(info.value)


async def test_job_runs_as_the_account_without_privileges(manager: JobManager, account: LocalAccount,
                                                          other_account: LocalAccount) -> None:
    prog = ('import os, json, time\nwith open("me.tmp", "w") as f:\n'
            '    json.dump({"env": dict(os.environ), "cwd": os.getcwd()}, f)\n'
            'os.rename("me.tmp", "me")\ntime.sleep(600)\n')
    job = await manager.start(account, ['python3', '-c', prog])
    await asyncio.to_thread(wait_for, lambda: (Path(account.home) / 'me').exists())
    me = json.loads((Path(account.home) / 'me').read_text())
    assert me['cwd'] == account.home
    assert me['env']['XOS_JOB_ID'] == job.id and me['env']['HOME'] == account.home
    assert me['env']['USER'] == account.name and 'PYTHONPATH' not in me['env']
    for pid in uid_processes(account.uid):
        status = dict(ln.split(':', 1) for ln in Path(f'/proc/{pid}/status').read_text().splitlines())
        assert status['Uid'].split() == [str(account.uid)] * 4
        assert status['Gid'].split() == [str(account.gid)] * 4
        assert status['Groups'].split() == [str(g) for g in account.gids]
        for key in ('CapInh', 'CapPrm', 'CapEff', 'CapAmb'):
            assert int(status[key], 16) == 0, (pid, key)
        assert status['NoNewPrivs'].strip() == '1'
        assert os.readlink(f'/proc/{pid}/fd/0') == '/dev/null'
        assert os.readlink(f'/proc/{pid}/ns/pid') != os.readlink('/proc/self/ns/pid')
    st = os.stat(job.job_dir)
    assert (st.st_uid, st.st_mode & 0o777) == (account.uid, 0o700)
    assert os.stat(Path(job.job_dir) / 'stdout').st_uid == account.uid
    # Another account cannot see, kill or checkpoint it.
    for op in (manager.kill(job.id, other_account), manager.checkpoint(job.id, other_account)):
        with pytest.raises(JobError) as info:
            await op
        assert info.value.reason == 'no-such-job'
    assert await manager.table.list(uid=other_account.uid) == []
    # The command gets default signal dispositions although its init is Python (which
    # ignores SIGPIPE and SIGXFSZ) and no blocked signals.
    # The parent leaves glibc's reserved signal 32 ignored (as a library may): the job's
    # command must still start with it at its default.
    ign = jobinit._KernelSigaction(1, 0, None, 0)  # SIG_IGN
    old = jobinit._KernelSigaction()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(13, 32, ctypes.byref(ign), ctypes.byref(old), 8)
    try:
        await manager.start(account, ['sh', '-c', 'cat /proc/self/status > sigs.tmp; mv sigs.tmp sigs'])
    finally:
        libc.syscall(13, 32, ctypes.byref(old), None, 8)
    sigs = Path(account.home) / 'sigs'
    await asyncio.to_thread(wait_for, sigs.exists)
    status = dict(ln.split(':', 1) for ln in sigs.read_text().splitlines())
    assert int(status['SigIgn'], 16) == 0 and int(status['SigBlk'], 16) == 0


async def test_sigterm_is_forwarded_and_exit_recorded(manager: JobManager, account: LocalAccount) -> None:
    job = await started(manager, account,
                        ['sh', '-c', ('trap "echo bye >> count; exit 7" TERM; echo 1 >> count; '
                                      'while :; do sleep 0.05; done')], ready='count', at_least=1)
    await manager.kill(job.id, account)  # SIGTERM: pid 1 forwards it to the command
    await asyncio.to_thread(wait_for, lambda: not process_alive(job.pid, job.starttime, job.uid))
    assert 'bye' in (Path(account.home) / 'count').read_text()
    assert [j.id for j in await manager.poll()] == [job.id]
    assert (await manager.table.get(job.id)).state == 'exited'
    assert json.loads((Path(job.job_dir) / 'exit-status').read_text()) == {'code': 7}


async def test_start_failure_has_the_reason(manager: JobManager, account: LocalAccount) -> None:
    with pytest.raises(JobError) as info:
        await manager.start(account, ['/no/such/program', 'x'])
    assert info.value.reason == 'start-failed'
    assert 'cannot execute /no/such/program: No such file or directory' in str(info.value)
    [job] = await manager.table.list(uid=account.uid)
    assert job.state == 'failed' and 'cannot execute' in job.detail
    assert uid_processes(account.uid) == []


async def test_reconcile_at_gateway_start(manager: JobManager, account: LocalAccount,
                                          store: Store) -> None:
    alive = await manager.start(account, ['sleep', '600'])
    gone = await manager.start(account, ['sleep', '600'])
    kill_tree_of(gone.pid)
    await asyncio.to_thread(wait_for, lambda: not process_alive(gone.pid, gone.starttime, gone.uid))
    half = manager._new_row(account, 'jhalfstart', ['true'])
    await manager.table.add(half)
    elsewhere = manager._new_row(account, 'jelsewhere', ['true'])
    await manager.table.add(elsewhere)
    await manager.table.update('jelsewhere', state='running', pid=1, starttime=1, node='other')
    changed = await reconcile(JobTable(store), node='test')
    assert changed == {gone.id: 'lost', 'jhalfstart': 'failed'}
    assert (await manager.table.get(alive.id)).state == 'running'
    assert (await manager.table.get('jelsewhere')).state == 'running'  # another node's business



async def test_reconcile_kills_a_job_whose_lazy_pull_never_completed(
        manager: JobManager, account: LocalAccount, store: Store) -> None:
    """A job restored with lazy pages whose gateway stopped mid-pull has holes in its memory:
    at the next start it is killed and failed, never left running on zero pages."""
    pulling = await manager.start(account, ['sleep', '600'])
    settled = await manager.start(account, ['sleep', '600'])
    await manager.table.update(pulling.id, detail=LAZY_PULL_DETAIL)
    changed = await reconcile(JobTable(store), node='test')
    assert changed == {pulling.id: 'failed'}
    row = await manager.table.get(pulling.id)
    assert row.state == 'failed' and 'lazy pages' in row.detail
    await asyncio.to_thread(
        wait_for, lambda: not process_alive(pulling.pid, pulling.starttime, pulling.uid))
    assert process_alive(settled.pid, settled.starttime, settled.uid)
    assert (await manager.table.get(settled.id)).state == 'running'

async def test_another_account_cannot_restore_an_image(manager: JobManager, account: LocalAccount,
                                                       other_account: LocalAccount) -> None:
    job = await started(manager, account, ['sh', '-c', COUNTER], ready='count')
    # Let the other account reach every file the image will name (before the dump, so the
    # modes CRIU records and checks are these): only the credentials stand in the way.
    for d in (account.home, Path(account.home) / '.xos-jobs', job.job_dir):
        os.chmod(d, 0o755)
    for f in ('stdout', 'stderr'):
        os.chmod(Path(job.job_dir) / f, 0o666)
    ck = await manager.checkpoint(job.id, account, stop=True)
    for f in [ck.images_dir, *(os.path.join(ck.images_dir, n) for n in os.listdir(ck.images_dir))]:
        os.chown(f, other_account.uid, other_account.gid)
    with pytest.raises(JobError) as info:
        await manager.restore(ck.images_dir, other_account)
    assert info.value.reason == 'restore-failed'
    assert 'criu log' in str(info.value)
    # The kernel refuses the credentials (groups first, then uids): CRIU has no CAP_SETUID/GID.
    assert ("Can't setgroups" in str(info.value)
            or 'Unable to set real, effective and saved user ID' in str(info.value))
    await asyncio.sleep(0.2)
    assert uid_processes(other_account.uid) == [] and uid_processes(account.uid) == []


async def test_jobs_table_is_migration_2(tmp_path: Path) -> None:
    import sqlite3

    from xos_sshd.ams.store import MIGRATIONS
    path = tmp_path / 'old.sqlite'
    conn = sqlite3.connect(path)
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute('PRAGMA user_version = 1')
    conn.commit()
    conn.close()
    st = await Store.open(str(path))  # a version-1 database is upgraded in place
    try:
        async with st.read() as txn:
            assert await txn.scalar('PRAGMA user_version') == SCHEMA_VERSION == 2
            cols = [r[1] for r in await txn.all('PRAGMA table_info(jobs)')]
        assert {'id', 'vo', 'vo_user', 'uid', 'state', 'command', 'created', 'pid',
                'restored_from', 'parent_job', 'last_image'} <= set(cols)
        with pytest.raises(sqlite3.IntegrityError):
            async with st.write() as txn:
                await txn.execute("INSERT INTO jobs (id, vo, vo_user, account, uid, state, command,"
                                  " created, updated, job_dir, log_dir) VALUES"
                                  " ('x', 'v', 'u', 'a', 5000, 'running', '[]', 0, 0, '/', '/')")
    finally:
        await st.close()


async def test_seccomp_filter_is_refused(manager: JobManager, account: LocalAccount) -> None:
    # An allow-all filter (BPF "ret SECCOMP_RET_ALLOW"), as systemd's sandboxing options
    # would install in the gateway and every job would inherit.
    prog = ('import ctypes, struct, time\nlibc = ctypes.CDLL(None, use_errno=True)\n'
            'insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0x7fff0000))\n'
            'class P(ctypes.Structure):\n'
            '    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]\n'
            'assert libc.prctl(22, 2, ctypes.byref(P(1, ctypes.addressof(insn))), 0, 0) == 0\n'
            'open("ready", "w").write("1\\n")\ntime.sleep(600)\n')
    job = await started(manager, account, ['python3', '-c', prog], ready='ready', at_least=1)
    with pytest.raises(JobError) as info:
        await manager.checkpoint(job.id, account)
    assert info.value.reason == 'not-checkpointable'
    assert '(python3) runs under a seccomp filter' in str(info.value)
    # What CRIU itself says without the pre-check (the job survives the failed dump).
    images = manager._make_image_dir(account, 'iseccomp')
    with pytest.raises(criu.CriuError) as cinfo:
        await criu.dump(job.root_pid, images, account, True, namespace=job.namespace)
    assert 'suspending seccomp failed: Operation not permitted' in str(cinfo.value)
    assert process_alive(job.pid, job.starttime, job.uid)
