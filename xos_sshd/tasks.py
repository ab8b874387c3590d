"""Small asyncio helpers shared by the gateway's background loops."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel *task* and wait until it has really ended, whatever it ended with.

    Used at shutdown: the loop's own failure was already logged by the loop, and a close must
    not raise because a background task did.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass


async def wake_or_timeout(wake: asyncio.Event, seconds: float) -> None:
    """Wait until *wake* is set or *seconds* have passed, then clear it: the rhythm of a
    periodic loop that can also be told to run at once (SIGHUP, an event)."""
    try:
        await asyncio.wait_for(wake.wait(), seconds)
    except TimeoutError:
        pass
    wake.clear()
