"""``tasks.BoundedThreads``, where the gateway prepares homes: one call per key, a global
cap, a time limit per caller, threads that never hold up an exit.

Real threads blocked on real events (test_gateway_hung_home.py drives the same code with a
FUSE home that never answers, through a real gateway).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections import Counter

import pytest

from xos_sshd.tasks import BoundedThreads, ThreadsBusy, Unresponsive


class Blocker:
    """A blocking function whose calls wait until released; counts its calls per key."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: Counter[str] = Counter()

    def __call__(self, key: str) -> str:
        self.calls[key] += 1
        self.release.wait(30)
        return f'done {key}'


async def test_one_call_per_key_and_a_stuck_key_is_refused_at_once() -> None:
    pool = BoundedThreads(4, 'test')
    block = Blocker()
    # three callers of one key at once: one thread, all three time out together
    results = await asyncio.gather(*(pool.run('a', 'tag', 0.3, block, 'a') for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unresponsive) for r in results), results
    assert block.calls == {'a': 1} and pool.running == 1 and pool.stuck(0.3) == ['a']
    # a later caller of the stuck key: refused without waiting, still one thread
    late = asyncio.ensure_future(pool.run('a', 'tag', 0.3, block, 'a'))
    await asyncio.sleep(0)  # one turn of the loop: it never waited
    assert late.done() and isinstance(late.exception(), Unresponsive)
    assert block.calls == {'a': 1}
    # another key is served meanwhile
    assert await pool.run('b', 'tag', 5, str.upper, 'b') == 'B'
    # the stuck call returns: the key is free again
    block.release.set()
    for _ in range(100):
        if not pool.running:
            break
        await asyncio.sleep(0.02)
    assert pool.running == 0
    assert await pool.run('a', 'tag', 5, block, 'a') == 'done a'
    assert block.calls == {'a': 2}


async def test_a_caller_with_another_tag_waits_for_the_keys_call_then_runs_its_own() -> None:
    pool = BoundedThreads(4, 'test')
    gate = threading.Event()
    order: list[str] = []

    def first() -> str:
        gate.wait(30)
        order.append('first')
        return 'first'

    def second() -> str:
        order.append('second')
        return 'second'

    one = asyncio.ensure_future(pool.run('k', 1, 5, first))
    await asyncio.sleep(0.05)
    two = asyncio.ensure_future(pool.run('k', 2, 5, second))
    await asyncio.sleep(0.1)
    assert order == [] and pool.running == 1  # the second waits: one call per key
    gate.set()
    assert (await one, await two) == ('first', 'second') and order == ['first', 'second']


async def test_the_cap_bounds_threads_whatever_the_keys() -> None:
    pool = BoundedThreads(3, 'test')
    block = Blocker()
    stuck = await asyncio.gather(*(pool.run(k, 'tag', 0.2, block, k) for k in 'xyz'),
                                 return_exceptions=True)
    assert all(isinstance(r, Unresponsive) for r in stuck) and pool.running == 3
    with pytest.raises(ThreadsBusy) as info:  # a fourth key: no thread within its time
        await pool.run('w', 'tag', 0.3, block, 'w')
    assert info.value.running == 3 and 'w' not in block.calls and pool.running == 3
    # a caller that waits for a thread gets one as soon as a call returns
    waiting = asyncio.ensure_future(pool.run('w', 'tag', 5, str.upper, 'w'))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    block.release.set()
    assert await waiting == 'W'


async def test_errors_reach_every_caller_of_the_call() -> None:
    pool = BoundedThreads(2, 'test')

    def fail() -> None:
        raise OSError(5, 'Input/output error')

    results = await asyncio.gather(*(pool.run('e', 'tag', 5, fail) for _ in range(2)),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [OSError, OSError] and pool.running == 0


def test_a_stuck_call_does_not_hold_up_the_exit() -> None:
    code = ('import asyncio, threading\n'
            'from xos_sshd.tasks import BoundedThreads, Unresponsive\n'
            'async def main():\n'
            '    pool = BoundedThreads(2, "t")\n'
            '    try:\n'
            '        await pool.run("k", 1, 0.2, threading.Event().wait)\n'
            '    except Unresponsive:\n'
            '        print("refused", flush=True)\n'
            'asyncio.run(main())\n')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=30)
    assert (res.returncode, res.stdout) == (0, 'refused\n'), res.stderr


async def test_calls_past_their_timeout_stop_counting_up_to_max_stuck() -> None:
    """Three keys hang for good: with max_stuck they no longer take the three threads from
    other keys, until max_stuck of them are stuck; then the cap holds again."""
    pool = BoundedThreads(3, 'test', max_stuck=2)
    block = Blocker()
    stuck = await asyncio.gather(*(pool.run(k, 'tag', 0.2, block, k) for k in 'xyz'),
                                 return_exceptions=True)
    assert all(isinstance(r, Unresponsive) for r in stuck) and pool.running == 3
    assert await pool.run('w', 'tag', 1, str.upper, 'w') == 'W'  # a thread, at once
    more = await asyncio.gather(*(pool.run(k, 'tag', 0.2, block, k) for k in 'uv'),
                                return_exceptions=True)
    assert all(isinstance(r, Unresponsive) for r in more) and pool.running == 5
    with pytest.raises(ThreadsBusy):  # 3 + 2 stuck: the ceiling
        await pool.run('t', 'tag', 0.3, str.upper, 't')
    block.release.set()
    assert await pool.run('t', 'tag', 5, str.upper, 't') == 'T'
