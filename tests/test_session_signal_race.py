"""A user's signals to their own not-yet-exec'd session process never reach the gateway.

The process a session starts is a fork of the gateway until it execs; after the privilege
drop the account may signal it.  It once still carried the gateway's signal wake-up socket,
so a user looping ``kill(-1, SIGTERM)`` stopped the gateway (SIGHUP reloaded it) within a
few session starts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import dynamic_vo
from gatewayproc import TEST_LIMITS, VOCA, GatewayProcess

KILL_LOOP = ("python3 -c 'import os, signal\n"
             "while True:\n"
             "    try: os.kill(-1, signal.SIG{sig})\n"
             "    except OSError: pass'")


@pytest.mark.parametrize('sig', ['TERM', 'HUP', 'INT'])
async def test_signals_from_the_account_during_spawns_do_not_reach_the_gateway(
        tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path,
        sig: str) -> None:
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
        limits={**TEST_LIMITS, 'max_sessions_per_connection': 100}).start()
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    try:
        async with gw.connect(alice) as killer, gw.connect(alice) as victim:
            loop = await killer.create_process(KILL_LOOP.format(sig=sig))
            await asyncio.sleep(0.5)
            spawns, deadline = 0, time.monotonic() + 8
            while time.monotonic() < deadline and gw.alive():
                try:
                    await asyncio.wait_for(victim.run('true'), 10)
                except (asyncio.TimeoutError, OSError, Exception):  # noqa: BLE001 (killed sessions)
                    pass
                spawns += 1
            loop.kill()
        assert spawns >= 10, spawns
        assert gw.alive(), gw.log()[-2000:]
        assert 'shutting down' not in gw.log()
        assert 'reloaded CAs' not in gw.log()
    finally:
        gw.stop()
