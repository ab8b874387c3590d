"""Two real gateway processes sharing one PostgreSQL AMS store, as two nodes of a cluster:
the same person gets the same uid on both, a ban made through one gateway closes the live
connection on the other, and a database outage refuses logins clearly while both go on
serving and recover by themselves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dynamic_vo
from gatewayproc import TEST_LIMITS, VENV_BIN, VOCA, GatewayProcess, run

from xos_sshd.ams.store import PgSettings

XOS_AMS = str(VENV_BIN / 'xos-ams')


@pytest.fixture
def cluster(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
            pg_db: PgSettings) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Gateways ``node-a`` and ``node-b``: own state, NSS tables and homes, one store."""
    gws = []
    try:
        for name in ('a', 'b'):
            base = tmp_path / name
            base.mkdir()
            gw = GatewayProcess.configure(base, {'dev': dynamic_vo(dev_ca, uid_range, home_base / name)},
                                          limits={**TEST_LIMITS, 'revocation_check_seconds': 0.5})
            gw.config.write_text(gw.config.read_text() + (
                f'[ams]\nstore = "{pg_db.dsn}"\npassword_file = "{pg_db.password_file}"\n'
                f'retry_seconds = 2\nconnect_timeout = 2\ncommand_timeout = 5\n'
                f'[images]\nnode_name = "node-{name}"\n'))
            gws.append(gw.start())
        yield gws[0], gws[1]
    finally:
        for gw in gws:
            gw.stop()


def _logins(gw: GatewayProcess) -> list[dict]:
    return [e for e in gw.audit() if e['event'] == 'login']


def test_the_same_person_gets_the_same_uid_on_every_gateway(cluster, dev_ca: VOCA, tmp_path: Path) -> None:
    a, b = cluster
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    on_b = b.ssh_xos(bob, 'id -u')  # bob first on b: uids are the cluster's, not a node's
    on_a = a.ssh_xos(alice, 'id -u')
    again_b = b.ssh_xos(alice, 'id -u')
    assert on_a.returncode == again_b.returncode == on_b.returncode == 0, (on_a.stderr, again_b.stderr)
    assert on_a.stdout == again_b.stdout != on_b.stdout
    accounts = {(e['account'], e['uid']) for gw in cluster for e in _logins(gw) if e['user'] == 'alice'}
    assert len(accounts) == 1 and accounts.pop()[1] == int(on_a.stdout)
    # Node b's NSS tables know alice although she was mapped on node a.
    deadline = time.monotonic() + 5
    while 'dev-alice:' not in (b.state / 'nss' / 'passwd').read_text():
        assert time.monotonic() < deadline, 'node b never wrote alice into its NSS tables'
        time.sleep(0.05)
    assert 'AMS store: postgresql://' in a.log()


async def test_a_ban_on_one_gateway_closes_the_connection_on_the_other(cluster, dev_ca: VOCA,
                                                                      tmp_path: Path) -> None:
    a, b = cluster
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    async with b.connect(alice) as conn:
        assert (await conn.run('echo on b')).stdout == 'on b\n'
        t0 = time.monotonic()
        res = run(XOS_AMS, '--socket', str(a.control_socket), '--json', 'ban', 'dev-alice', check=False)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)['closed'] == 0  # nothing of hers on node a
        await asyncio.wait_for(conn.wait_closed(), 5)
        took = time.monotonic() - t0
    print(f'\nbanned on node a, connection on node b closed after {took:.2f} s')
    closed = [e for e in b.audit() if e['event'] == 'connection']
    assert [(e['reason'], e['account']) for e in closed] == [('banned', 'dev-alice')]
    assert b.ssh_xos(alice, 'true').returncode == 255
    assert _logins(b)[-1]['reason'] == 'banned'
    assert run(XOS_AMS, '--socket', str(a.control_socket), 'unban', 'dev-alice').returncode == 0
    deadline = time.monotonic() + 5
    while b.ssh_xos(alice, 'true').returncode != 0:  # b hears of the unban as it heard of the ban
        assert time.monotonic() < deadline, b.log()[-2000:]
        time.sleep(0.1)


def test_database_outage_refuses_logins_clearly_and_recovers(cluster, dev_ca: VOCA, tmp_path: Path,
                                                             pg_server) -> None:
    a, b = cluster
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    assert a.ssh_xos(alice, 'true').returncode == 0
    pg_server.stop('fast')
    try:
        t0 = time.monotonic()
        res = a.ssh_xos(alice, 'true')
        took = time.monotonic() - t0
        assert res.returncode == 255
        refused = _logins(a)[-1]
        assert refused['outcome'] == 'refused' and refused['reason'] == 'store-unavailable', refused
        assert 'AMS store postgresql://' in refused['message'] and 'unavailable' in refused['message']
        assert took < 10, took
        assert a.alive() and b.alive()
        assert b.ssh_xos(alice, 'true').returncode == 255
        assert _logins(b)[-1]['reason'] == 'store-unavailable'
    finally:
        pg_server.start()
    deadline = time.monotonic() + 15
    for gw in (a, b):  # both recover without a restart
        while gw.ssh_xos(alice, 'true').returncode != 0:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.2)
    assert a.alive() and b.alive()
    assert 'unreachable: connection refused' in a.log() and 'reachable again' in a.log()
