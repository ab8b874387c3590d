"""Two real gateway processes as two nodes of a cluster on one PostgreSQL AMS store, each
with node-local homes: node B runs in a mount namespace of its own in which the configured
home base is another directory (as another machine's /home), so both nodes use the same
home paths on different disks.  No mocks: real gateways, ssh-xos, xos-ams, xos-cr, CRIU jobs,
a real server stopped for an outage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import dynamic_vo
from crhelpers import PR_SET_CHILD_SUBREAPER, _libc, reap_zombie_children
from gatewayproc import (
    VENV_BIN,
    VOCA,
    GatewayProcess,
    free_port,
    free_uid_range,
    kill_uid_processes,
    release_uid_range,
    run,
)

from xos_sshd.ams.store import PgSettings

XOS_AMS = str(VENV_BIN / 'xos-ams')
XOS_CR = str(VENV_BIN / 'xos-cr')
SSH_OPTS = ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null']
POOL = ['devq0', 'devq1', 'devq2']


@dataclass
class Nodes:
    base: Path
    homes: Path  # the configured home base: node A's homes
    homes_b: Path  # what node B sees at that path
    ca: VOCA
    uids: tuple[int, int]
    pg: PgSettings
    gateways: dict[str, GatewayProcess] = field(default_factory=dict)

    @property
    def a(self) -> GatewayProcess:
        return self.gateways['a']

    @property
    def b(self) -> GatewayProcess:
        return self.gateways['b']

    def start(self, name: str, **top: Any) -> GatewayProcess:
        root = self.base / name
        root.mkdir(mode=0o755)
        vo = dynamic_vo(self.ca, self.uids, self.homes, policy='pool', pool=POOL)
        gw = GatewayProcess.configure(root, {'dev': vo}, **top)
        gw.metrics_port = free_port()  # type: ignore[attr-defined]
        gw.config.write_text(gw.config.read_text() + (
            f'[ams]\nstore = "{self.pg.dsn}"\npassword_file = "{self.pg.password_file}"\n'
            f'retry_seconds = 2\nconnect_timeout = 2\ncommand_timeout = 5\n'
            f'[images]\nnode_name = "node-{name}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{gw.metrics_port}"\nrefresh_seconds = 1\n'))  # type: ignore[attr-defined]
        wrapper: list[str] = []
        if name == 'b':  # its own /home: the configured base is homes_b there
            wrapper = ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                       'mount --bind "$0" "$1" && shift && exec "$@"', str(self.homes_b),
                       str(self.homes)]
        self.gateways[name] = gw
        return gw.start(wrapper=wrapper)

    def user(self, name: str) -> Path:
        return self.ca.issue(name, self.base / name)


@pytest.fixture
def cluster_nodes(pg_db: PgSettings) -> Iterator[Callable[..., Nodes]]:
    """``cluster_nodes(**top)``: nodes a and b started with the top-level config keys *top*."""
    base = Path(tempfile.mkdtemp(prefix='xos-test-nodes-'))
    base.chmod(0o755)  # accounts traverse it (job inits, the CR socket)
    homes, homes_b = base / 'homes', base / 'homes-b'
    for d in (homes, homes_b):
        d.mkdir(mode=0o755)
    first, last = free_uid_range()
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # job inits of a stopped gateway come here
    made: list[Nodes] = []

    def make(**top: Any) -> Nodes:
        nodes = Nodes(base, homes, homes_b, VOCA.create(base, 'dev'), (first, last), pg_db)
        made.append(nodes)
        for name in ('a', 'b'):
            nodes.start(name, **top)
        return nodes

    try:
        yield make
    finally:
        kill_uid_processes(first, last)
        time.sleep(0.3)
        for nodes in made:
            for gw in nodes.gateways.values():
                gw.stop()
        kill_uid_processes(first, last)
        reap_zombie_children()
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        release_uid_range(first)
        shutil.rmtree(base, ignore_errors=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.05)


def ams(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run(XOS_AMS, '--socket', str(gw.control_socket), *args, check=False)


def xcr(gw: GatewayProcess, prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(XOS_CR, '-i', str(prefix), '-p', str(gw.port), *SSH_OPTS, '127.0.0.1', *args,
               check=False)


def release(gw: GatewayProcess, name: str, timeout: float = 10) -> str:
    """Release *name* through *gw*'s xos-ams (again while another node still reports the
    account busy from a session that just ended); return the reply line."""
    res = wait_for(lambda: (r := ams(gw, 'release', name)).returncode == 0 and r, timeout,
                   f'the release of {name}')
    return res.stdout


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


# -- 1: every node archives the homes of mappings that went away elsewhere ----------------


def test_a_release_on_one_node_leaves_no_home_for_the_next_lessee_on_another(cluster_nodes) -> None:
    nodes = cluster_nodes()
    a, b = nodes.a, nodes.b
    alice, bob, carol = nodes.user('alice'), nodes.user('bob'), nodes.user('carol')
    first = b.ssh_xos(alice, 'echo private > $HOME/notes; echo $USER; echo $HOME')
    assert first.returncode == 0, first.stderr + b.log()[-2000:]
    account, home = lines(first.stdout)
    assert home == str(nodes.homes / account)
    assert (nodes.homes_b / account / 'notes').read_text() == 'private\n'  # node B's disk
    assert not (nodes.homes / account).exists()  # nothing on node A's yet
    assert a.ssh_xos(alice, 'test ! -e $HOME/notes').returncode == 0  # A's own home

    assert 'home archived to' in release(a, account)  # A archives its own home ...
    wait_for(lambda: not (nodes.homes_b / account).exists(), 5,
             "node b archiving its home of the released lease")
    [kept] = (nodes.homes_b / '.reclaimed').glob(f'{account}.*')  # ... and B archives B's
    assert (kept / 'notes').read_text() == 'private\n'
    assert "the lease of" in b.log() and str(nodes.homes / account) in b.log()

    # bob leases the same pool account: on node B he starts with an empty home.
    second = b.ssh_xos(bob, 'echo $USER; ls -A $HOME | wc -l; cat $HOME/notes 2>/dev/null; true')
    assert second.returncode == 0, second.stderr
    assert lines(second.stdout) == [account, '0']

    # Again with no time for any refresh: released on A, carol logs in on B at once.
    assert b.ssh_xos(bob, 'echo bob > $HOME/notes').returncode == 0
    release(a, account)
    third = b.ssh_xos(carol, 'echo $USER; ls -A $HOME | wc -l')
    assert third.returncode == 0, third.stderr
    assert lines(third.stdout) == [account, '0']
    archived = sorted((nodes.homes_b / '.reclaimed').glob(f'{account}.*'))
    assert len(archived) == 2 and {(p / 'notes').read_text() for p in archived} == {'private\n', 'bob\n'}


# -- 2: xos-ams release consults the other nodes -------------------------------------------


def test_release_is_refused_while_another_node_uses_the_account(cluster_nodes, pg_server) -> None:
    nodes = cluster_nodes()
    a = nodes.a
    alice = nodes.user('alice')
    got = a.ssh_xos(alice, 'echo $USER; id -u')
    assert got.returncode == 0, got.stderr
    account, uid = lines(got.stdout)
    db = nodes.pg.dsn.rsplit('/', 1)[1]
    # What node C (another machine) put in the shared tables: a process of the uid at its
    # last reclaim pass, and a job of the account running there.
    now = time.time()
    pg_server.psql(f"INSERT INTO node_uids (node, uid, seen) VALUES ('node-c', {uid}, {now - 7})", db=db)
    pg_server.psql(
        "INSERT INTO jobs (id, vo, vo_user, account, uid, node, state, command, created, updated,"
        " pid, starttime, job_dir, log_dir) VALUES ('jc0ffee0001', 'dev', 'alice', "
        f"'{account}', {uid}, 'node-c', 'running', '[\"sleep\"]', {now}, {now}, 4242, 1, '/x', '/x')",
        db=db)
    refused = ams(a, 'release', account)
    assert refused.returncode == 1
    message = refused.stderr.strip()
    assert 'in use on other nodes' in message and 'node node-c:' in message, message
    assert re.search(r'processes, seen [0-9]+ s ago', message) and 'job jc0ffee0001 running' in message
    print(f'\n{message}')
    audit = [e for e in a.audit() if e['event'] == 'admin'][-1]
    assert (audit['outcome'], audit['reason'], audit['nodes']) == ('refused', 'account-busy', ['node-c'])
    pg_server.psql("DELETE FROM node_uids WHERE node = 'node-c'", db=db)
    again = ams(a, 'release', account)
    assert again.returncode == 1 and 'job jc0ffee0001 running' in again.stderr
    assert 'processes' not in again.stderr
    assert ams(a, 'show', account).returncode == 0  # still mapped
    forced = ams(a, 'release', account, '--force')
    assert forced.returncode == 0, forced.stderr


# -- 3: a job is operated on by the node it runs on ------------------------------------------


def test_another_nodes_job_is_refused_with_its_node(cluster_nodes) -> None:
    nodes = cluster_nodes()
    a, b = nodes.a, nodes.b
    alice = nodes.user('alice')
    started = xcr(b, alice, 'run', '--', 'sleep', '300')
    assert started.returncode == 0, started.stderr + b.log()[-3000:]
    job = started.stdout.strip()
    for op in (['kill', job], ['checkpoint', job], ['logs', job]):
        res = xcr(a, alice, *op)
        assert res.returncode == 1, (op, res.stdout, res.stderr)
        assert f'job {job} runs on node node-b; connect to that node' in res.stderr, (op, res.stderr)
    table = xcr(a, alice, 'list').stdout.splitlines()
    assert table[0].split()[:4] == ['JOB', 'STATE', 'EXIT', 'NODE']
    assert [ln.split()[:4] for ln in table[1:] if ln.startswith(job)] == [[job, 'running', '-', 'node-b']]
    listed = json.loads(xcr(a, alice, 'list', '--json').stdout)
    [row] = [j for j in listed if j['id'] == job]
    assert (row['node'], row['state']) == ('node-b', 'running')  # A neither ended nor marked it
    assert xcr(b, alice, 'kill', job).returncode == 0
    wait_for(lambda: json.loads(xcr(a, alice, 'list', '--json').stdout)[0]['state'] != 'running',
             10, 'the job ended by node b')


# -- 4: a store outage is said once per loop, not a traceback per pass ----------------------


def test_a_store_outage_is_logged_once_by_each_loop(cluster_nodes, pg_server) -> None:
    nodes = cluster_nodes(reclaim_interval_seconds=1)
    a = nodes.a
    alice = nodes.user('alice')
    assert a.ssh_xos(alice, 'true').returncode == 0
    time.sleep(1.5)  # every loop has run once against a working store
    offset = len(a.log())
    pg_server.stop('fast')
    try:
        time.sleep(6)  # the cr poll runs 6 times, reclaim and metrics about as often
    finally:
        pg_server.start()
    wait_for(lambda: 'reachable again' in a.log()[offset:], 15, 'the store back')
    time.sleep(3)  # every loop has had a pass against the store again
    text = a.log()[offset:]
    print('\n' + '\n'.join(ln for ln in text.splitlines() if ' WARNING ' in ln or ' ERROR ' in ln))
    assert text.count('Traceback') == 0, f"{text.count('Traceback')} tracebacks:\n{text[-3000:]}"
    for task in ('cr poll', 'lease reclaim', 'metrics refresh'):
        assert len(re.findall(rf'{task}[^\n]* paused: AMS store postgresql://', text)) == 1, (task, text[-4000:])
        assert len(re.findall(rf'{task}[^\n]* resumed after', text)) == 1, (task, text[-4000:])
    assert a.alive() and a.ssh_xos(alice, 'true').returncode == 0
