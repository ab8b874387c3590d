"""Root side of the application API (:mod:`xos_sshd.cr.api`): find the job's participants,
tell them a checkpoint is coming, tell them how it went, and find checkpoint requests.

Everything root does itself is reading kernel data in ``/proc`` (thread names, start times):
it never opens a path or descriptor the user controls.  Talking to the participants (through
their own pipes, reached as ``/proc/PID/fd/N``) is done by the *coordinator*, ``api.py``
itself run as the job's account with no capabilities and ``no_new_privs`` (``setpriv``, as
CRIU is run by :mod:`xos_sshd.cr.criu`), outside the job; its answer is treated as the
user's word (types checked, text shortened): nothing privileged depends on it.  See the
docstring of :mod:`xos_sshd.cr.api` for the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..ams import LocalAccount
from ..control.protocol import one_line
from . import criu
from .api import COMM_RE, MAX_REASON
from .fdscan import descendants, process_table
from .nsjob import start_time

#: Added to the critical-section bound for the participants' before-callbacks.
CALLBACK_GRACE = 10.0
#: How long a coordinator run may take beyond the protocol's own bounds.
COORDINATOR_SLACK = 15.0
#: The most the coordinator may write (its answer is a few hundred bytes per participant).
MAX_OUTPUT = 1 << 20
API_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'api.py')


@dataclass(frozen=True)
class Participant:
    """A process of a job that uses the API: host pid, start time, its pipes' fds, and what
    it asks for (``''``, ``'checkpoint'`` or ``'stop'``)."""

    pid: int
    starttime: int
    cmd: int
    reply: int
    request: str = ''


@dataclass(frozen=True)
class Prepared:
    """What the participants said to ``prepare``: ``ready`` pids, ``refused`` (pid, kind,
    reason) with kind ``critical-section`` or ``callback``, ``silent`` pids (no answer in
    time), and how long it took."""

    ready: tuple[int, ...]
    refused: tuple[tuple[int, str, str], ...]
    silent: tuple[int, ...]
    seconds: float
    unreachable: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.refused and not self.silent

    def reason(self, timeout: float) -> str:
        """One line naming what refused (critical sections first)."""
        parts = [r for _, kind, r in self.refused if kind == 'critical-section']
        parts += [r for _, kind, r in self.refused if kind != 'critical-section']
        parts += [f'process {pid} did not get ready within {timeout + CALLBACK_GRACE:g} s '
                  '(a checkpoint callback still running?)' for pid in self.silent]
        return '; '.join(parts)

    @property
    def kind(self) -> str:
        """``critical-section`` if a critical section refused, else ``refused-by-job``."""
        if any(kind == 'critical-section' for _, kind, _ in self.refused):
            return 'critical-section'
        return 'refused-by-job'


def _thread_names(pid: int) -> Iterable[str]:
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return
    for tid in tids:
        try:
            with open(f'/proc/{pid}/task/{tid}/comm') as f:
                yield f.read().strip()
        except OSError:
            continue


def participants(pids: Iterable[int]) -> list[Participant]:
    """The processes among *pids* (host pids) with an API thread (``xcr:C.R[+!]``)."""
    out = []
    for pid in pids:
        for name in _thread_names(pid):
            m = COMM_RE.match(name)
            if m:
                try:
                    st = start_time(pid)
                except (OSError, ValueError, IndexError):
                    break
                request = {'': '', '+': 'checkpoint', '!': 'stop'}[m.group(3)]
                out.append(Participant(pid, st, int(m.group(1), 16), int(m.group(2), 16), request))
                break
    return out


def job_participants(init_pid: int, table: dict[int, tuple[int, str]] | None = None
                     ) -> list[Participant]:
    """Participants among the processes of the job whose init has host pid *init_pid*."""
    table = process_table() if table is None else table
    return participants(p for p in descendants(init_pid, table) if p != init_pid)


async def _coordinator(account: LocalAccount, req: dict[str, Any], timeout: float,
                       python: str) -> dict[str, Any]:
    """Run ``api.py coordinate`` as *account* with one request; its JSON answer."""
    # The source is opened by root from the installed package and handed over as a
    # descriptor (as the job init's is): the account need not reach the installation.
    src = os.open(API_PATH, os.O_RDONLY | os.O_CLOEXEC)
    try:
        argv = criu.as_user(account, (), [python, '-I', '-S', f'/proc/self/fd/{src}',
                                          'coordinate'])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(src,), start_new_session=True, env=dict(criu.CRIU_ENV), cwd='/')
    finally:
        os.close(src)
    # The coordinator runs as the user, who may ptrace it: its output is read with a bound.
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(req).encode())
    proc.stdin.close()
    try:
        out, err, _ = await asyncio.wait_for(asyncio.gather(
            _read_bounded(proc.stdout, MAX_OUTPUT), _read_bounded(proc.stderr, MAX_OUTPUT),
            proc.wait()), timeout)
    except (TimeoutError, OverflowError) as exc:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        await proc.wait()
        what = 'wrote too much' if isinstance(exc, OverflowError) else \
            f'did not finish within {timeout:.0f} s'
        return {'ok': False, 'error': f'the API coordinator {what}'}
    try:
        reply = json.loads(out.decode(errors='replace').strip().splitlines()[-1])
    except (ValueError, IndexError):
        reply = None
    if not isinstance(reply, dict):
        tail = one_line(err.decode(errors='replace')[-1200:], 300)
        return {'ok': False, 'error': f'the API coordinator failed (exit status '
                                      f'{proc.returncode}): {tail or "no output"}'}
    return reply


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> bytes:
    data = b''
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > limit:
            raise OverflowError
    return data


def _text(value: Any) -> str:
    """Text a job's processes sent (their API coordinator's replies): made inert."""
    return one_line(value, MAX_REASON)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pids(value: Any, known: set[int]) -> tuple[int, ...]:
    return tuple(p for p in _list(value) if isinstance(p, int) and p in known)


async def prepare(account: LocalAccount, parts: Sequence[Participant], *, timeout: float,
                  hold: float, python: str = criu.DEFAULT_INIT_PYTHON) -> Prepared:
    """Tell *parts* a checkpoint is coming; wait (``timeout`` for critical sections, plus
    :data:`CALLBACK_GRACE` for the callbacks) for their answers."""
    started = time.monotonic()
    req = {'op': 'prepare', 'seq': secrets.token_hex(6), 'timeout': timeout,
           'grace': CALLBACK_GRACE, 'hold': hold,
           'participants': [p.__dict__ for p in parts]}
    reply = await _coordinator(account, req, timeout + CALLBACK_GRACE + COORDINATOR_SLACK, python)
    known = {p.pid for p in parts}
    if not reply.get('ok'):
        return Prepared((), ((0, 'coordinator', _text(reply.get('error'))),), (),
                        time.monotonic() - started)
    refused = tuple((r['pid'], _text(r.get('kind', '')), _text(r.get('reason', '')))
                    for r in _list(reply.get('refused')) if isinstance(r, dict)
                    and isinstance(r.get('pid'), int) and r['pid'] in known)
    unreachable = tuple(f'process {_text(u.get("pid"))}: {_text(u.get("error"))}'
                        for u in _list(reply.get('unreachable')) if isinstance(u, dict))
    return Prepared(_pids(reply.get('ready'), known), refused, _pids(reply.get('silent'), known),
                    time.monotonic() - started, unreachable)


async def resume(account: LocalAccount, parts: Sequence[Participant], outcome: str,
                 reason: str = '', python: str = criu.DEFAULT_INIT_PYTHON) -> dict[str, Any]:
    """Tell *parts* how the checkpoint went: ``continue``, ``restart`` or ``aborted``."""
    req = {'op': 'resume', 'outcome': outcome, 'reason': _text(reason),
           'participants': [p.__dict__ for p in parts]}
    return await _coordinator(account, req, COORDINATOR_SLACK, python)
