"""The CRIU driver and its installation, with the real CRIU of this machine.

Nothing is skipped: a missing or broken CRIU fails these tests with the reason.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from crhelpers import ints, kill_tree_of, uid_processes, wait_for

from xos_sshd.ams import LocalAccount
from xos_sshd.cr import criu
from xos_sshd.cr.jobs import JobManager
from xos_sshd.cr.nsjob import _creds_problem

pytest_plugins = ["crfixtures"]  # fixtures: account, other_account, manager, store, cr_base

REPO = Path(__file__).resolve().parent.parent


def test_install_script_is_idempotent_and_quiet() -> None:
    first = subprocess.run(['sh', str(REPO / 'scripts/install-criu.sh'), '--print'],
                           capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip()
    assert os.access(path, os.X_OK)
    again = subprocess.run(['sh', str(REPO / 'scripts/install-criu.sh')],
                           capture_output=True, text=True, timeout=60, check=False)
    assert (again.returncode, again.stdout, again.stderr) == (0, '', '')
    out = subprocess.run([path, '--version'], capture_output=True, text=True, check=True).stdout
    assert out.startswith('Version: ') and int(out.split()[1].split('.')[0]) >= 4


def test_install_script_refuses_a_prefix_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / 'usr'
    foreign.mkdir()
    (foreign / 'precious').write_text('x')
    env = dict(os.environ, XOS_CRIU_PREFIX=str(foreign), PATH='/usr/sbin:/usr/bin:/sbin:/bin')
    res = subprocess.run(['sh', str(REPO / 'scripts/install-criu.sh')], capture_output=True,
                         text=True, timeout=60, env=env, check=False)
    if res.returncode == 0:  # a system criu >= 4.0 exists: it is preferred, nothing installed
        assert res.stdout == '' and (foreign / 'precious').exists()
    else:
        assert 'was not made by install-criu.sh' in res.stderr
        assert (foreign / 'precious').read_text() == 'x'


async def test_probe_as_root_and_as_the_account(account: LocalAccount) -> None:
    info = await criu.probe()
    assert info.version >= (4,) and info.check.startswith('Looks good')
    assert set(info.features) == {'lazy_pages', 'page_server', 'soft_dirty'}
    assert info.features['page_server'] is True
    print(f'\ncriu {info.version_text} at {info.path}: check {info.check!r}, features {info.features}')
    user = await criu.probe(account=account)
    assert user.unprivileged and user.check.startswith('Looks good')
    # CRIU 4.1.1 never uses userfaultfd in --unprivileged mode (its kerndat skips it, whatever
    # vm.unprivileged_userfaultfd says): lazy pages are probed from root's features and the
    # sysctls instead (cr/migcaps.py), and its daemons run in a user namespace of their own.
    assert user.features['lazy_pages'] is False
    print(f'as {account.name}: features {user.features}')


def test_find_criu_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(criu.CriuError) as info:
        criu.find_criu(str(tmp_path / 'nope'))
    assert 'cannot run' in str(info.value) and 'nope' in str(info.value)
    old = tmp_path / 'old-criu'
    old.write_text('#!/bin/sh\necho "Version: 3.17"\n')
    old.chmod(0o755)
    with pytest.raises(criu.CriuError) as info:
        criu.find_criu(str(old))
    assert 'CRIU 3.17' in str(info.value) and '4.0 or newer' in str(info.value)


def test_setpriv_command_grants_only_the_named_capabilities(account: LocalAccount) -> None:
    cmd = criu.as_user(account, ('checkpoint_restore', 'setpcap'), ['/x/criu', 'restore'])
    assert f'--reuid={account.uid}' in cmd and f'--regid={account.gid}' in cmd
    assert f'--groups={account.gids[0]}' in cmd and '--no-new-privs' in cmd
    assert '--ambient-caps=-all,+checkpoint_restore,+setpcap' in cmd
    assert '--inh-caps=-all,+checkpoint_restore,+setpcap' in cmd
    # What the jobs really get: CAP_CHECKPOINT_RESTORE only (enough for every test here).
    assert criu.CAPS_DUMP == criu.CAPS_RESTORE == ('checkpoint_restore',)
    assert cmd[-3:] == ['--', '/x/criu', 'restore']
    root = LocalAccount('root', 0, 0, (), '/root', '/bin/sh', '', 'v', 'u')
    with pytest.raises(criu.CriuError):
        criu.as_user(root, criu.CAPS_DUMP, ['criu'])


def test_restored_credentials_are_vetted() -> None:
    req = {'uid': 5000, 'gid': 5000, 'groups': [7000]}
    good = {'Uid': '5000\t5000\t5000\t5000', 'Gid': '5000\t5000\t5000\t5000', 'Groups': '7000',
            'CapInh': '0', 'CapPrm': '0', 'CapEff': '0', 'CapAmb': '0', 'NoNewPrivs': '1'}
    assert _creds_problem(good, req) is None
    for key, value, word in (('CapPrm', '0000000000080000', 'CapPrm'), ('Uid', '5000\t0\t5000\t5000', 'uids'),
                             ('Groups', '7000 0', 'groups'), ('NoNewPrivs', '0', 'no_new_privs'),
                             ('CapAmb', '0000010000000000', 'CapAmb')):
        assert word in (_creds_problem({**good, key: value}, req) or ''), key


async def test_dump_failure_carries_criu_log_tail(manager: JobManager, account: LocalAccount) -> None:
    job = await manager.start(account, ['sleep', '600'])
    images = manager._make_image_dir(account, 'ifailing')
    with pytest.raises(criu.CriuError) as info:  # no pid 4000 in the job's namespace
        await criu.dump(4000, images, account, True, namespace=job.namespace)
    msg = str(info.value)
    assert msg.startswith(f'criu dump of pid 4000 as {account.name} failed')
    assert '--- criu log, last lines ---' in msg and 'Error (' in msg
    assert 'exit status' in msg
    assert uid_processes(account.uid)  # the job is untouched


async def test_dump_into_a_directory_the_account_cannot_write(manager: JobManager, account: LocalAccount,
                                                             cr_base: Path) -> None:
    job = await manager.start(account, ['sleep', '600'])
    forbidden = cr_base / 'root-only'
    forbidden.mkdir(mode=0o700)
    with pytest.raises(criu.CriuError) as info:
        await criu.dump(job.root_pid, str(forbidden), account, True, namespace=job.namespace)
    assert 'Permission denied' in str(info.value) and str(forbidden) in str(info.value)
    assert not os.listdir(forbidden)


async def test_restore_failure_carries_criu_log_tail(manager: JobManager, account: LocalAccount) -> None:
    empty = manager._make_image_dir(account, 'iempty')
    with pytest.raises(criu.CriuError) as info:
        await criu.restore(empty, account, job_id='jx', job_dir=os.path.join(account.home, 'jx'))
    msg = str(info.value)
    assert msg.startswith(f'criu restore from {empty} as {account.name} failed')
    assert '--- criu log, last lines ---' in msg and 'Error (' in msg
    await asyncio.sleep(0.1)
    assert uid_processes(account.uid) == []  # the namespace is gone with its pid 1


async def test_dump_and_restore_timings(manager: JobManager, account: LocalAccount) -> None:
    """Not a benchmark (bench/checkpoint.py will be): the numbers of one small job, printed."""
    job = await manager.start(account, ['sh', '-c', 'while :; do date +%s%N >> ticks; sleep 0.05; done'])
    await asyncio.to_thread(wait_for, lambda: len(ints(Path(account.home) / 'ticks')) >= 3)
    ck = await manager.checkpoint(job.id, account, stop=True)
    stats = dict(ln.split(': ', 1) for ln in ck.log.splitlines() if ln.endswith(' us') and ': ' in ln)
    kill_tree_of(job.pid)
    new = await manager.restore(ck.images_dir, account, image_id=ck.image_id, parent_job=job.id)
    print(f'\ndump {ck.seconds * 1000:.0f} ms (frozen {int(stats["Frozen time"].split()[0]) / 1000:.1f} ms), '
          f'restore {new.detail}; image {sum(f.stat().st_size for f in Path(ck.images_dir).iterdir()) // 1024} KiB')
    assert ck.seconds < 10
