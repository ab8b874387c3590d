"""The BLCR-style application API of jobs: checkpoint callbacks, critical sections, and a
checkpoint of oneself.

For programs running as a job (``xos-cr run``) that want to cooperate with checkpoints, as
the seed's BLCR ``libcr`` did.  Standard library only and no import of the rest of
xos-sshd, so any ``python3`` (>= 3.8) in a job can use it: ``from xos_sshd.cr import api``
with the gateway's venv, or by path, which every job gets in ``$XOS_CR_API``::

    import importlib.util, os
    spec = importlib.util.spec_from_file_location('xos_cr_api', os.environ['XOS_CR_API'])
    api = importlib.util.module_from_spec(spec); spec.loader.exec_module(api)

Usage::

    @api.on_checkpoint                 # or api.register(fn)
    def connection():
        conn.close()                   # runs before the checkpoint (CRIU cannot carry TCP)
        how = yield                    # 'continue', 'restart' or 'aborted'
        reconnect()                    # runs after it

    with api.critical_section('commit', timeout=5):
        ...                            # no checkpoint is taken while any thread is in here

    how = api.request_checkpoint()     # checkpoint me (the image goes to my images);
                                       # 'continue' here, 'restart' in a restored copy

A callback is a generator function (its code up to ``yield`` runs before the checkpoint, the
``yield`` returns how it went) or a plain function run before the checkpoint that may return
a callable, called after it with how it went.  Before-parts run in registration order,
after-parts in the reverse order, all in the API's own thread ("the API thread"), while the
program's other threads go on (use critical sections or locks to keep them off what a callback
touches).  *How it went*: ``'continue'`` (the checkpoint was taken, this is the original
process), ``'restart'`` (this process was restored from it), ``'aborted'`` (no checkpoint was
taken: refused by a critical section or a callback, or the dump failed).  An exception in a
before-part refuses the checkpoint (the reason names the callback); the callbacks already
prepared then hear ``'aborted'``.  Exceptions in after-parts are printed to stderr.

Critical sections: once a checkpoint request reaches the process, new critical sections wait
(a thread already inside one may nest further), the checkpoint waits for the open ones to
end, then the callbacks run and the dump happens; sections entered meanwhile wait until the
process hears how it went.  The wait is bounded by the checkpoint's own bound
(``JobManager.checkpoint(api_timeout=)``, 30 s by default) and by the section's ``timeout``
if it has one: when a section is still open at the bound, the checkpoint is refused with a
reason that names it (``critical section 'commit' (pid 2, thread MainThread) ...``) and the
job goes on untouched.

Mechanism (the root side is :mod:`xos_sshd.cr.apictl`, called by ``JobManager``):

* A process becomes a *participant* on its first use of the API: it makes two pipes of its
  own, ``cmd`` and ``reply`` (it holds both ends of both: CRIU carries such pipes, and no
  descriptor is shared with anything outside the job), and starts the API thread, whose kernel
  name (``/proc/PID/task/TID/comm``) is ``xcr:C.R`` -- C, R the hex numbers of the ``cmd``
  pipe's write end and of the ``reply`` pipe's read end -- plus ``+`` while the process asks
  for a checkpoint of itself, ``!`` when it asks for one that stops it.
* Before a dump, root lists the job tree's threads in ``/proc`` (kernel data: root never opens
  a path the user controls) and picks the participants out by that name.  With none, nothing
  else happens: a job that does not use the API pays for reading a few ``comm`` files.
* Otherwise root runs *this file* (opened by root, passed as a descriptor) as the
  *coordinator*, as the account (no capabilities, ``no_new_privs``), outside the job.  It
  reaches each participant's pipes through ``/proc/PID/fd/C`` and ``/proc/PID/fd/R`` (the
  kernel lets a process of the same uid open them), writes ``prepare SEQ TIMEOUT HOLD``, and
  collects ``ready SEQ`` or ``refused SEQ KIND REASON`` until TIMEOUT plus a grace for the
  callbacks.  It exits before the dump: the job holds nothing of it.
* On ``prepare`` the API thread clears the request mark, holds new critical sections, waits
  for the open ones (bounded), runs the before-parts, answers ``ready`` and waits for
  ``resume OUTCOME``.  Root then scans the job for what CRIU cannot carry (after the
  callbacks: a callback may close a TCP connection), dumps, and runs the coordinator again
  with ``resume continue`` (``resume aborted REASON`` after any refusal or failure).
* A restored participant wakes up where the dump froze it: waiting for its resume.
  ``JobManager.restore`` sends ``resume restart``; independently the thread checks every
  0.25 s while it waits whether its identity token (boot id, pid namespace inode, start time of
  the namespace's pid 1) changed, so a restore learns ``'restart'`` even without the message.
  A participant left without an answer for HOLD seconds (the gateway died mid-checkpoint)
  goes on with ``'continue'``.
* A checkpoint of oneself: the request mark in the thread name is what root's
  ``JobManager.checkpoint_requests()`` finds (again from ``/proc`` only); the gateway's periodic
  task then checkpoints the job as ``xos-cr checkpoint JOB [--stop]`` would, for its owner.
  No socket to the gateway is ever open in the job (CRIU refuses external sockets), and no
  file is involved (a restored copy running next to its original would share it).

Only checkpoints taken through the gateway run the callbacks; a process that starts using the
API while a checkpoint is under way joins at the next one.  After ``fork()`` the child starts
with no callbacks and no API state of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import stat
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ['ABORTED', 'CONTINUE', 'RESTART', 'CheckpointError', 'critical_section', 'enable',
           'job_dir', 'job_id', 'on_checkpoint', 'register', 'request_checkpoint', 'unregister']

CONTINUE = 'continue'
RESTART = 'restart'
ABORTED = 'aborted'
OUTCOMES = (CONTINUE, RESTART, ABORTED)

#: How often a participant waiting for its resume checks whether it was restored.
RESTART_POLL = 0.25
#: The API thread's kernel name: ``xcr:<cmd write fd>.<reply read fd>[+!]`` (hex, <= 15 chars).
COMM_RE = re.compile(r'^xcr:([0-9a-f]{1,5})\.([0-9a-f]{1,5})([+!]?)\Z')
MAX_REASON = 600


class CheckpointError(Exception):
    """A checkpoint asked for with :func:`request_checkpoint` did not happen (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _one_line(text: str, limit: int = MAX_REASON) -> str:
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


class _Held:
    """One open critical section."""

    __slots__ = ('name', 'since', 'thread', 'timeout')

    def __init__(self, name: str, thread: str, timeout: float | None) -> None:
        self.name, self.thread, self.since, self.timeout = name, thread, time.monotonic(), timeout


def _token() -> tuple[str, ...]:
    """What changes when this process is restored: the pid namespace (a restore makes a
    fresh one: its inode, and since inodes are reused, the start time of its pid 1) and the
    boot (a restore on another node)."""
    parts = []
    for path in ('/proc/sys/kernel/random/boot_id', '/proc/1/stat'):
        try:
            with open(path) as f:
                text = f.read()
            parts.append(text.strip() if 'boot_id' in path
                         else text[text.rindex(')') + 2:].split()[19])
        except (OSError, ValueError, IndexError):
            parts.append('?')
    try:
        parts.append(str(os.stat('/proc/self/ns/pid').st_ino))
    except OSError:
        parts.append('?')
    return tuple(parts)


class _Participant:
    """The API state of one process (module functions use the process's one instance)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.callbacks: list[Callable[[], Any]] = []
        self.held: dict[int, _Held] = {}
        self.depth: dict[int, int] = {}  # thread ident -> open critical sections
        self.pending = False  # between a prepare and its resume: new sections wait
        self.request = ''  # '', '+' (checkpoint me) or '!' (checkpoint and stop me)
        self.generation = 0  # checkpoint attempts finished (for request_checkpoint)
        self.last: tuple[str, str] = ('', '')  # (outcome, reason) of the latest attempt
        self.thread: threading.Thread | None = None
        self.ident: int | None = None  # the API thread's ident
        self.tid: int | None = None  # ... and its kernel thread id
        self.fds: tuple[int, int, int, int] | None = None  # cmd_r, cmd_w, reply_r, reply_w
        self._buf = b''
        self._started = threading.Event()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Become a participant (idempotent): pipes, API thread, thread name."""
        if self.thread is not None:
            return
        with self.cond:
            if self.thread is not None:
                return
            cmd_r, cmd_w = os.pipe2(os.O_CLOEXEC)
            reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(cmd_r, False)
            os.set_blocking(reply_r, False)
            self.fds = (cmd_r, cmd_w, reply_r, reply_w)
            if len(self._comm()) > 15:
                for fd in self.fds:
                    os.close(fd)
                self.fds = None
                raise RuntimeError('descriptor numbers too large to name the checkpoint API thread')
            if self is _P and not _fork_hook:
                os.register_at_fork(after_in_child=lambda: _P.after_fork_in_child())
                _fork_hook.append(True)
            self.thread = threading.Thread(target=self._run, name='xos-cr-api', daemon=True)
            self.thread.start()
        self._started.wait(5)

    def after_fork_in_child(self) -> None:
        """A forked child is not a participant: drop the parent's pipes and state."""
        fds = self.fds
        self.__init__()  # type: ignore[misc]
        for fd in fds or ():
            try:
                os.close(fd)
            except OSError:
                pass

    def _comm(self) -> str:
        assert self.fds is not None
        return f'xcr:{self.fds[1]:x}.{self.fds[2]:x}{self.request}'

    def _set_comm(self) -> None:
        if self.tid is None:
            return
        try:
            with open(f'/proc/self/task/{self.tid}/comm', 'w') as f:
                f.write(self._comm())
        except OSError:
            pass

    # -- critical sections -----------------------------------------------------

    def enter(self, name: str, timeout: float | None) -> _Held:
        self.start()
        me = threading.get_ident()
        entry = _Held(name, threading.current_thread().name, timeout)
        with self.cond:
            while self.pending and not self.depth.get(me) and me != self.ident:
                self.cond.wait()
            entry.since = time.monotonic()
            self.held[id(entry)] = entry
            self.depth[me] = self.depth.get(me, 0) + 1
        return entry

    def leave(self, entry: _Held) -> None:
        me = threading.get_ident()
        with self.cond:
            self.held.pop(id(entry), None)
            left = self.depth.get(me, 1) - 1
            if left:
                self.depth[me] = left
            else:
                self.depth.pop(me, None)
            self.cond.notify_all()

    # -- self-checkpoint -------------------------------------------------------

    def request_checkpoint(self, stop: bool, timeout: float | None) -> str:
        self.start()
        me = threading.get_ident()
        if me == self.ident:
            raise RuntimeError('request_checkpoint() cannot be called from a checkpoint callback')
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            if self.depth.get(me):
                raise RuntimeError('request_checkpoint() inside a critical section would wait '
                                   'for itself')
            generation = self.generation
            self.request = '!' if stop else '+'
            self._set_comm()
            while self.generation == generation:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.request = ''
                    self._set_comm()
                    raise TimeoutError(f'no checkpoint within {timeout:g} s of the request (does '
                                       'the gateway serve checkpoint requests of jobs?)')
                self.cond.wait(left)
            outcome, reason = self.last
        if outcome == ABORTED:
            raise CheckpointError(reason or 'the checkpoint was aborted')
        return outcome

    # -- the API thread --------------------------------------------------------

    def _run(self) -> None:
        self.ident = threading.get_ident()
        self.tid = threading.get_native_id()
        self._set_comm()
        self._started.set()
        while True:
            line = self._read_cmd(None)
            words = (line or '').split()
            if len(words) == 4 and words[0] == 'prepare':
                try:
                    self._checkpoint(words[1], float(words[2]), float(words[3]))
                except Exception:  # noqa: BLE001 (the API thread must survive anything)
                    traceback.print_exc()
            # anything else while idle (a late 'resume', garbage) is ignored

    def _read_cmd(self, timeout: float | None) -> str | None:
        """The next command line, or None after *timeout* seconds."""
        assert self.fds is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while b'\n' not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fds[0]], [], [], left)[0]:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            try:
                chunk = os.read(self.fds[0], 4096)
            except BlockingIOError:
                continue
            self._buf = (self._buf + chunk)[-65536:]
        line, self._buf = self._buf.split(b'\n', 1)
        return line.decode(errors='replace').strip()

    def _reply(self, text: str) -> None:
        assert self.fds is not None
        try:  # drop answers nobody read (a coordinator that gave up)
            while os.read(self.fds[2], 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        data = (_one_line(text, 3000) + '\n').encode()
        try:
            os.write(self.fds[3], data)
        except OSError:
            pass

    def _wait_for_sections(self, timeout: float) -> str | None:
        """With new sections held back: wait for the open ones; a refusal reason if one is
        still open at its bound."""
        started = time.monotonic()
        with self.cond:
            self.pending = True
            self.request = ''
            self._set_comm()
            while self.held:
                now = time.monotonic()
                bounds = [(started + timeout, timeout, None)]
                bounds += [(started + h.timeout, h.timeout, h) for h in self.held.values()
                            if h.timeout is not None]
                limit, bound, by = min(bounds, key=lambda b: b[0])
                if now >= limit:
                    held = [by] if by is not None else sorted(self.held.values(),
                                                              key=lambda h: h.since)
                    h = held[0]
                    others = len(self.held) - 1
                    reason = (f'critical section {h.name!r} (pid {os.getpid()}, thread '
                              f'{h.thread}, open for {now - h.since:.1f} s) did not end within '
                              f'{bound:g} s' + (f' ({others} more open)' if others else ''))
                    self.pending = False
                    self.cond.notify_all()
                    return reason
                self.cond.wait(limit - now)
        return None

    def _checkpoint(self, seq: str, timeout: float, hold: float) -> None:
        """One checkpoint, as the API thread sees it: prepare, answer, wait, resume."""
        reason = self._wait_for_sections(timeout)
        if reason is not None:
            self._finish(ABORTED, reason)
            self._reply(f'refused {seq} critical-section {reason}')
            return
        afters: list[tuple[Callable[[], Any], Callable[[str], Any] | None]] = []
        for cb in list(self.callbacks):
            try:
                afters.append((cb, _before(cb)))
            except Exception as exc:  # noqa: BLE001 (refuse with the reason)
                reason = (f'checkpoint callback {_name(cb)} (pid {os.getpid()}) raised '
                          f'{type(exc).__name__}: {exc}')
                self._afters(afters, ABORTED)  # the ones already prepared, then answer
                self._finish(ABORTED, reason)
                self._reply(f'refused {seq} callback {reason}')
                return
        token = _token()
        self._reply(f'ready {seq}')
        outcome, why = self._wait_for_resume(token, hold, seq)
        self._afters(afters, outcome)
        self._finish(outcome, why)

    def _wait_for_resume(self, token: tuple[str, ...], hold: float, seq: str) -> tuple[str, str]:
        deadline = time.monotonic() + hold
        while True:
            line = self._read_cmd(RESTART_POLL)
            if _token() != token:
                return RESTART, ''
            words = (line or '').split(None, 2)
            if words and words[0] == 'resume' and len(words) >= 2 and words[1] in OUTCOMES:
                return words[1], words[2] if len(words) > 2 else ''
            if len(words) >= 2 and words[0] == 'prepare':  # a new checkpoint: still ready
                self._reply(f'ready {words[1]}')
            if time.monotonic() > deadline:
                return CONTINUE, f'no word from the checkpointer within {hold:g} s'

    def _afters(self, afters: list[tuple[Callable[[], Any], Callable[[str], Any] | None]],
                outcome: str) -> None:
        for cb, after in reversed(afters):
            if after is None:
                continue
            try:
                after(outcome)
            except Exception:  # noqa: BLE001 (report, go on with the others)
                print(f'xos-cr api: checkpoint callback {_name(cb)} failed after the '
                      f'checkpoint ({outcome}):', file=sys.stderr)
                traceback.print_exc()

    def _finish(self, outcome: str, reason: str) -> None:
        with self.cond:
            self.pending = False
            self.generation += 1
            self.last = (outcome, reason)
            self.cond.notify_all()


def _name(cb: Callable[..., Any]) -> str:
    return getattr(cb, '__qualname__', None) or repr(cb)


def _before(cb: Callable[[], Any]) -> Callable[[str], Any] | None:
    """Run the before-part of *cb*; return its after-part (None if it has none)."""
    result = cb()
    if isinstance(result, types.GeneratorType):
        try:
            next(result)
        except StopIteration:
            return None

        def resume(how: str, gen: types.GeneratorType = result) -> None:
            try:
                gen.send(how)
            except StopIteration:
                return
            gen.close()  # a second yield: the callback had its one resume
        return resume
    return result if callable(result) else None


_P = _Participant()
_fork_hook = []  # registered on the first start (importing the module changes nothing)


# -- public API ------------------------------------------------------------------

def enable() -> None:
    """Make this process a participant now (done by every other call on first use)."""
    _P.start()


def register(callback: Callable[[], Any]) -> Callable[[], Any]:
    """Run *callback* at every checkpoint (see the module docstring); returns it, so it also
    works as a decorator."""
    if not callable(callback):
        raise TypeError('a checkpoint callback must be callable')
    _P.start()
    with _P.cond:
        _P.callbacks.append(callback)
    return callback


on_checkpoint = register


def unregister(callback: Callable[[], Any]) -> None:
    """Stop running *callback* at checkpoints (ValueError if it was not registered)."""
    with _P.cond:
        _P.callbacks.remove(callback)


@contextlib.contextmanager
def critical_section(name: str = 'critical section',
                     timeout: float | None = None) -> Iterator[None]:
    """No checkpoint is taken while a thread is inside: one that arrives waits for the section
    to end, up to its own bound and to *timeout* seconds (if given) after it arrived, and is
    refused with a reason naming the section (*name*) when it is still open then.  Sections
    nest.  Also usable as a decorator."""
    entry = _P.enter(str(name), timeout)
    try:
        yield
    finally:
        _P.leave(entry)


def request_checkpoint(stop: bool = False, timeout: float | None = 300.0) -> str:
    """Ask the gateway to checkpoint this job (the image is its owner's, as with
    ``xos-cr checkpoint``) and wait for it.  Returns ``'continue'`` in this process, or
    ``'restart'`` in a process restored from that checkpoint; with *stop* the job ends after
    the dump, so only restored copies return.  Raises :class:`CheckpointError` (with the
    reason) when the checkpoint was refused or failed, TimeoutError when none came within
    *timeout* seconds, RuntimeError inside a critical section or a callback."""
    return _P.request_checkpoint(bool(stop), timeout)


def _job_init_args() -> dict[str, str]:
    """``--job-id``/``--job-dir`` of the job init (pid 1 of a job's namespace)."""
    try:
        with open('/proc/1/cmdline', 'rb') as f:
            argv = f.read().decode(errors='replace').split('\0')
    except OSError:
        return {}
    out = {}
    for key in ('--job-id', '--job-dir'):
        if key in argv and argv.index(key) + 1 < len(argv):
            out[key] = argv[argv.index(key) + 1]
    return out


def job_id() -> str | None:
    """The id of the job this process runs in *now* (a restored process is in a new job,
    while its environment still says ``XOS_JOB_ID`` of the one that was checkpointed)."""
    return _job_init_args().get('--job-id') or os.environ.get('XOS_JOB_ID')


def job_dir() -> str | None:
    """The current job's directory (``~/.xos-jobs/<job id>``)."""
    return _job_init_args().get('--job-dir')


# -- the coordinator (run by root as the account: python3 -I -S api.py coordinate) --------

def _open_pipe(pid: int, fd: int, flags: int) -> int:
    f = os.open(f'/proc/{pid}/fd/{fd}', flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    if not stat.S_ISFIFO(os.fstat(f).st_mode):
        os.close(f)
        raise OSError(0, f'fd {fd} is not a pipe')
    return f


def _starttime(pid: int) -> int:
    with open(f'/proc/{pid}/stat') as f:
        text = f.read()
    return int(text[text.rindex(')') + 2:].split()[19])


def coordinate(req: dict[str, Any]) -> dict[str, Any]:
    """Op ``prepare`` (``seq``, ``timeout``, ``grace``, ``hold``) or ``resume`` (``outcome``,
    ``reason``) to every participant (``pid``, ``starttime``, ``cmd``, ``reply``)."""
    op = req['op']
    unreachable: list[dict[str, Any]] = []
    reached: dict[int, int | None] = {}  # pid -> reply fd (prepare) or None
    for p in req['participants']:
        pid, rfd, wfd = int(p['pid']), None, None
        try:
            if _starttime(pid) != int(p['starttime']):
                raise OSError(0, 'the process is gone')
            wfd = _open_pipe(pid, int(p['cmd']), os.O_WRONLY)
            if op == 'prepare':
                rfd = _open_pipe(pid, int(p['reply']), os.O_RDONLY)
                line = f'prepare {req["seq"]} {float(req["timeout"]):.3f} {float(req["hold"]):.0f}'
            else:
                line = f'resume {req["outcome"]} {_one_line(req.get("reason", ""))}'.rstrip()
            os.write(wfd, (line + '\n').encode())
            reached[pid] = rfd
        except (OSError, ValueError) as exc:
            if rfd is not None:
                os.close(rfd)
            unreachable.append({'pid': pid, 'error': exc.strerror or str(exc)})
        finally:
            if wfd is not None:
                os.close(wfd)
    result: dict[str, Any] = {'ok': True, 'ready': [], 'refused': [], 'silent': [],
                              'unreachable': unreachable}
    if op != 'prepare':
        result['resumed'] = sorted(reached)
        return result
    deadline = time.monotonic() + float(req['timeout']) + float(req.get('grace', 10))
    waiting = {fd: pid for pid, fd in reached.items() if fd is not None}
    bufs: dict[int, bytes] = {fd: b'' for fd in waiting}
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd in select.select(list(waiting), [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            bufs[fd] += chunk
            while b'\n' in bufs[fd] and fd in waiting:
                raw, bufs[fd] = bufs[fd].split(b'\n', 1)
                words = raw.decode(errors='replace').split(None, 3)
                if len(words) < 2 or words[1] != req['seq']:
                    continue  # an answer to an earlier checkpoint
                pid = waiting.pop(fd)
                os.close(fd)
                if words[0] == 'ready':
                    result['ready'].append(pid)
                else:
                    result['refused'].append({'pid': pid, 'kind': words[2] if len(words) > 2 else '',
                                              'reason': words[3] if len(words) > 3 else 'refused'})
    for fd, pid in waiting.items():
        os.close(fd)
        result['silent'].append(pid)
    return result


def _main() -> None:
    if sys.argv[1:] != ['coordinate']:
        sys.exit('usage: api.py coordinate < request.json')
    try:
        result = coordinate(json.load(sys.stdin))
    except Exception as exc:  # noqa: BLE001 (one JSON line whatever happens)
        result = {'ok': False, 'error': f'{type(exc).__name__}: {exc}'}
    sys.stdout.write(json.dumps(result) + '\n')


if __name__ == '__main__':
    _main()
