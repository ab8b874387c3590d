"""Small asyncio helpers shared by the gateway's background loops, and
:class:`BoundedThreads` for blocking calls that may never return."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar('T')


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


class Unresponsive(Exception):
    """A blocking operation did not answer in time (it may still be running)."""

    def __init__(self, seconds: float):
        super().__init__(f'no answer for {seconds:.0f} s')
        self.seconds = seconds


class ThreadsBusy(Exception):
    """Every thread of a :class:`BoundedThreads` is taken (by calls that do not answer)."""

    def __init__(self, running: int):
        super().__init__(f'{running} earlier calls still have not answered')
        self.running = running


class _Call:
    __slots__ = ('tag', 'future', 'started', 'timeout')

    def __init__(self, tag: object, future: asyncio.Future[Any], timeout: float):
        self.tag = tag
        self.future = future
        self.started = time.monotonic()
        self.timeout = timeout


class BoundedThreads:
    """Blocking calls that may never return (a hung NFS or FUSE home) on threads of their
    own, so they never take the default executor's few threads from everything else.

    * at most one call per *key* at a time: a caller whose key has a call outstanding waits
      for that call when it is the same (equal *tag*), or after it for its own otherwise;
      a key whose call has been outstanding longer than *timeout* is refused at once
      (:class:`Unresponsive`), so retries never pile up threads behind it;
    * at most *max_threads* calls at once, whatever their keys; a caller waits for a free
      thread within its *timeout* (:class:`ThreadsBusy` after).  With *max_stuck*, calls
      past their timeout stop counting against *max_threads* (so a few hung homes cannot
      refuse everyone else's), up to *max_stuck* of them: beyond, they count again;
    * a caller waits at most *timeout* seconds in all (:class:`Unresponsive`); its call runs
      on, holding its key and its thread, until it returns (logged when that was late).

    The threads are daemon threads started per call: a call stuck in the kernel neither
    holds up the gateway's exit nor sits in a pool that must be joined.  One event loop.
    """

    def __init__(self, max_threads: int, name: str, max_stuck: int = 0):
        self.max_threads = max_threads
        self.max_stuck = max_stuck
        self.name = name
        self._calls: dict[Hashable, _Call] = {}
        #: Set when a call returned (its thread is free again).
        self._returned = asyncio.Event()

    @property
    def running(self) -> int:
        """Calls whose thread has not returned yet."""
        return len(self._calls)

    def _full(self) -> float | None:
        """None when a new call may start now; else how long to wait before looking again
        unless a call returns first (a live call passing its timeout stops counting)."""
        total = len(self._calls)
        if not self.max_stuck or total >= self.max_threads + self.max_stuck:
            return None if total < self.max_threads else float('inf')
        now = time.monotonic()
        left = [c.started + c.timeout - now for c in self._calls.values()
                if now - c.started < c.timeout]
        return None if len(left) < self.max_threads else max(0.01, min(left))

    def stuck(self, timeout: float) -> list[Hashable]:
        """The keys whose call has been running longer than *timeout*."""
        now = time.monotonic()
        return [k for k, c in self._calls.items() if now - c.started >= timeout]

    async def run(self, key: Hashable, tag: object, timeout: float,
                  fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread of this pool, for *key* (see the class)."""
        deadline = time.monotonic() + timeout
        while True:
            call = self._calls.get(key)
            wait = self._full() if call is None else None
            if wait is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ThreadsBusy(self.running)
                self._returned.clear()
                try:
                    await asyncio.wait_for(self._returned.wait(), min(remaining, wait))
                except TimeoutError:
                    pass
                continue  # look again: the key may have a call now, or a thread be free
            if call is None:
                call = self._start(key, tag, timeout, fn, args)
            elapsed = time.monotonic() - call.started
            if elapsed >= timeout:  # known not to answer: no second thread behind it
                raise Unresponsive(elapsed)
            limit = min(deadline, call.started + timeout) - time.monotonic()
            try:
                result = await asyncio.wait_for(asyncio.shield(call.future), max(0.0, limit))
            except TimeoutError:
                raise Unresponsive(time.monotonic() - call.started) from None
            except Exception:
                if call.tag == tag:
                    raise
                continue  # another caller's call of this key failed: now ours
            if call.tag == tag:
                return result  # type: ignore[no-any-return]

    def _start(self, key: Hashable, tag: object, timeout: float, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> _Call:
        loop = asyncio.get_running_loop()
        call = _Call(tag, loop.create_future(), timeout)
        # The outcome is read by whoever waits; with nobody left, it must not be reported
        # as "never retrieved".
        call.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._calls[key] = call

        def done(result: Any, exc: BaseException | None) -> None:
            del self._calls[key]
            self._returned.set()
            seconds = time.monotonic() - call.started
            if seconds >= call.timeout:
                log.warning('%s: the call for %s answered after %.0f s', self.name, key,
                            seconds)
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

        try:
            start_daemon_call(loop, fn, args, f'{self.name}-{key}', done)
        except BaseException:
            del self._calls[key]
            raise
        return call


def start_daemon_call(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
                      args: tuple[Any, ...], name: str,
                      done: Callable[[Any, BaseException | None], None]) -> None:
    """Run ``fn(*args)`` on a new daemon thread and hand ``(result, exception)`` to *done* on
    *loop*.  For calls that may hang for good (a home on a dead NFS server, a FUSE mount
    that never answers): such a call must hold no executor thread and must never keep the
    gateway from exiting."""

    def work() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the caller
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(done, result, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name=name, daemon=True).start()
