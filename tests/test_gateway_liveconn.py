"""A connection is checked once more as it registers among the live connections.

The certificate is checked when the client offers it; the mapping and the home are prepared
after that, and only then does the connection register (``LiveConnections.add``) where the
revocation sweeps see it.  A revocation that lands in between used to go unnoticed until
the next sweep (up to ``revocation_check_seconds``); it is now caught at registration, as a
ban racing a login is.

Real gateway, real ``xos-ca revoke``, a real asyncssh client.  The window is held open with
the AMS's own NSS lock (``nss/.lock``, the ``flock`` every AMS process takes to rewrite the
tables): alice's first login commits her mapping, then waits for the lock to write the
tables; the test sees the mapping committed (so the certificate was checked), revokes the
certificate and lets go of the lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from conftest import dynamic_vo
from crhelpers import wait_for
from gatewayproc import TEST_LIMITS, VOCA, GatewayProcess


@pytest.fixture
def gw_slow_sweep(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
                  home_base: Path) -> Iterator[GatewayProcess]:
    """No periodic revocation sweep within the test: only registration can catch it."""
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
        limits={**TEST_LIMITS, 'revocation_check_seconds': 300}).start()
    yield gw
    gw.stop()


def _mapped(gw: GatewayProcess, name: str) -> bool:
    db = sqlite3.connect(f'file:{gw.state / "ams.sqlite"}?mode=ro', uri=True)
    try:
        return db.execute('SELECT 1 FROM mappings WHERE name = ?', (name,)).fetchone() is not None
    finally:
        db.close()


async def _login_and_wait(gw: GatewayProcess, prefix: Path) -> str:
    """Log in; return how the connection ended within 10 s ('open' if it did not)."""
    try:
        async with gw.connect(prefix) as conn:
            try:
                await asyncio.wait_for(conn.wait_closed(), 10)
            except TimeoutError:
                return 'open'
            return 'closed'
    except (asyncssh.DisconnectError, asyncssh.ConnectionLost) as exc:
        return f'closed at login: {exc}'


async def test_a_revocation_between_check_and_registration_closes_the_login(
        gw_slow_sweep: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    gw = gw_slow_sweep
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    lock = os.open(gw.state / 'nss' / '.lock', os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        login = asyncio.create_task(_login_and_wait(gw, alice))
        await asyncio.to_thread(wait_for, lambda: _mapped(gw, 'dev-alice'), 20,
                                'the mapping of alice committed')
        assert not login.done()  # checked, mapped, not registered yet
        await asyncio.to_thread(dev_ca.revoke, alice)
    finally:
        os.close(lock)  # the login goes on: tables, home, registration
    outcome = await asyncio.wait_for(login, 60)
    assert outcome.startswith('closed'), (outcome, gw.log()[-3000:])
    events = gw.audit()
    logins = [e for e in events if e['event'] == 'login' and e.get('user') == 'alice']
    assert [(e['outcome'], e['reason']) for e in logins] == [('accepted', 'ok')], logins
    closed = [e for e in events if e['event'] == 'connection' and e.get('action') == 'closed']
    assert [(e['user'], e['reason'], e['account']) for e in closed] == \
        [('alice', 'revoked', 'dev-alice')], closed
    assert 'revoked' in closed[0]['message']
    # the check at registration closes nothing else: bob logs in and stays
    async with gw.connect(bob, login='bob') as conn:
        assert (await conn.run('echo bob')).stdout == 'bob\n'
    assert len([e for e in gw.audit() if e['event'] == 'connection']) == 1
    assert gw.alive()
