"""A home that hangs costs one thread and refusals of its own account, nothing else.

``Gateway.prepare_home`` (every login, and pam_xos's session) checks the home as root.  It
used to do so on the default executor (``min(32, cores + 4)`` threads: 6 on 2 cores) with no
time limit: each login of an account whose home hangs (a dead NFS server, a FUSE mount with
``allow_other`` over it) took one of those threads for good, and a handful of them stopped
everything else that runs there: the AMS's NSS table rewrites (so every first login and
every admin change), image operations.  Homes are now prepared on threads of their own,
one outstanding call per account (retries join it, or are refused at once once it is known
hung), a few at most, each login waiting at most ``HOME_TIMEOUT_SECONDS`` before it is
refused ``home directory H does not respond`` (audited).  The threads are daemon threads:
a stuck one does not keep the gateway from exiting on SIGTERM either.

Real gateway, real asyncssh clients, real ``xos-ams``, a real FUSE mount that never answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import asyncssh
import pytest

from conftest import dynamic_vo
from crhelpers import wait_for
from fusehang import HungMount, threads_waiting_on_fuse
from gatewayproc import TEST_LIMITS, VENV_BIN, VOCA, GatewayProcess, run

XOS_AMS = str(VENV_BIN / 'xos-ams')
#: More logins of the hung account at once than the default executor has threads here.
ATTEMPTS = min(32, (os.cpu_count() or 1) + 4) + 2


async def _login(gw: GatewayProcess, prefix: Path, login: str) -> str:
    """'ok' when a command ran, 'refused' when the login was refused, 'dropped' when the
    gateway gave up on it (``login_grace_seconds``), 'hung' after 40 s."""
    try:
        async with asyncio.timeout(40):
            async with gw.connect(prefix, login=login) as conn:
                out = (await conn.run('echo served')).stdout
                return 'ok' if out == 'served\n' else f'odd output {out!r}'
    except TimeoutError:
        return 'hung'
    except asyncssh.PermissionDenied:
        return 'refused'
    except (asyncssh.DisconnectError, asyncssh.ConnectionLost):
        return 'dropped'


def _home_of(gw: GatewayProcess, account: str) -> tuple[int, int, str]:
    for line in (gw.state / 'nss' / 'passwd').read_text().splitlines():
        name, _, uid, gid, _, home, _ = line.split(':')
        if name == account:
            return int(uid), int(gid), home
    raise AssertionError(f'{account} not in the NSS passwd table')


def _ams(gw: GatewayProcess, *args: str) -> dict:
    res = run(XOS_AMS, '--socket', str(gw.control_socket), '--json', *args, check=False,
              timeout=45)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(not os.path.exists('/dev/fuse'), reason='no /dev/fuse')
async def test_a_hung_home_refuses_its_own_logins_and_blocks_nothing_else(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> None:
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
        limits=dict(TEST_LIMITS)).start()
    assert gw.proc is not None
    users = {u: dev_ca.issue(u, tmp_path / u) for u in ('alice', 'dave', 'bob', 'carol')}
    mounts: list[HungMount] = []
    try:
        for user in ('alice', 'dave', 'bob'):  # mapped, homes made
            assert await _login(gw, users[user], user) == 'ok', gw.log()[-3000:]
        alice_home = _home_of(gw, 'dev-alice')
        dave_home = _home_of(gw, 'dev-dave')
        for uid, gid, home in (alice_home, dave_home):
            mounts.append(HungMount(home, uid, gid, allow_other=True))

        # dave's home hangs for the rest of the test; alice logs in many times at once
        dave = asyncio.create_task(_login(gw, users['dave'], 'dave'))
        attempts = asyncio.gather(*(_login(gw, users['alice'], 'alice')
                                    for _ in range(ATTEMPTS)))
        await asyncio.to_thread(wait_for, lambda: threads_waiting_on_fuse(gw.proc.pid) >= 2,
                                20, 'the hung homes to be reached')
        await asyncio.sleep(1)  # the rest of alice's burst arrives

        # meanwhile everybody else is served, and the AMS changes things (it rewrites the
        # NSS tables on the default executor): a new mapping, a ban and an unban
        assert await _login(gw, users['bob'], 'bob') == 'ok'
        assert await _login(gw, users['carol'], 'carol') == 'ok', gw.log()[-3000:]
        assert 'dev-carol' in (gw.state / 'nss' / 'passwd').read_text()
        assert _ams(gw, 'ban', 'dev-bob')['mapping']['banned'] is True
        assert 'dev-bob:' not in (gw.state / 'nss' / 'passwd').read_text()
        assert _ams(gw, 'unban', 'dev-bob')['mapping']['banned'] is False
        assert 'dev-bob:' in (gw.state / 'nss' / 'passwd').read_text()
        assert await _login(gw, users['bob'], 'bob') == 'ok'

        # alice and dave are refused (after HOME_TIMEOUT_SECONDS), each on one stuck thread
        assert await attempts == ['refused'] * ATTEMPTS, gw.log()[-3000:]
        assert await dave == 'refused'
        # and once more: refused at once, no new thread behind the stuck one
        assert await _login(gw, users['alice'], 'alice') == 'refused'
        assert threads_waiting_on_fuse(gw.proc.pid) == 2  # one per hung home

        refusals = [e for e in gw.audit() if e['event'] == 'login' and e['outcome'] == 'refused'
                    and e['user'] is not None]  # (asyncssh also offers the bare key: refused)
        assert {(e['user'], e['reason'], e['message']) for e in refusals} == {
            ('alice', 'home-unavailable', f'home directory {alice_home[2]} does not respond'),
            ('dave', 'home-unavailable', f'home directory {dave_home[2]} does not respond')}
        assert len([e for e in refusals if e['user'] == 'alice']) == ATTEMPTS + 1

        # alice's home answers again (its server died, then the mount went): she is back
        mounts[0].unmount()
        await asyncio.to_thread(wait_for, lambda: threads_waiting_on_fuse(gw.proc.pid) == 1,
                                10, "alice's stuck call to return")
        assert await _login(gw, users['alice'], 'alice') == 'ok', gw.log()[-3000:]

        # dave's home still hangs: the gateway exits on SIGTERM all the same
        gw.stop()
        assert gw.proc.returncode == 0, gw.log()[-3000:]
    finally:
        for mount in mounts:
            mount.unmount()
        gw.stop()
