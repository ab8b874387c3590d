"""Reaping what the gateway adopts as a child subreaper, without stealing anyone's status.

The gateway sets ``PR_SET_CHILD_SUBREAPER`` (:func:`xos_sshd.session.libc.set_child_subreaper`)
so that a job's init, orphaned when the namespace helper that forked it exits, becomes the
gateway's child instead of pid 1's (which, in containers, may never reap).  The gateway then
has three kinds of children:

1. **direct children**, each waited for by whoever started it: session processes
   (``subprocess.Popen`` + a pidfd, reaped by ``Popen.poll`` as soon as the pidfd is
   readable; one still running when its channel closed is handed to
   :mod:`xos_sshd.session.orphans`, which waits for that pid alone), subprocesses of the event loop (libuv waits for its own pids only, never
   ``waitpid(-1)``) and blocking ``subprocess.run`` calls.  Reaping one of these would steal
   its status (``Popen`` reports ECHILD as exit status 0): never done here.
2. **job inits**: the init of a PID namespace (``NSpid`` has two or more levels, the last
   being 1).  The gateway never creates a PID namespace itself (the helper that unshares it
   is a direct child; the namespace's pid 1 is the helper's child), so no direct child is one.
3. **other orphans**, adopted from user sessions (``nohup cmd &`` outliving its login): they
   belong to a session whose leader is neither themselves nor the gateway's session (every
   direct child that runs user code leads its own session).

Zombies of kinds 2 and 3 are reaped at once.  A zombie that looks like a direct child but
that nobody reaps for :data:`LINGER` seconds (a user daemon that called ``setsid`` itself) is
reaped then: a direct child's waiter is event-driven and takes its zombie within
milliseconds.  ``waitid(WNOWAIT)`` first tells, without reaping, whether any child is a
zombie at all; only then is ``/proc`` scanned (this kernel has no
``/proc/PID/task/*/children``), and only the pids found are waited for.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

LINGER = 60.0


def _stat(pid: str) -> list[str] | None:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None


def _is_namespace_init(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('NSpid:'):
                    levels = line.split()[1:]
                    return len(levels) >= 2 and levels[-1] == '1'
    except OSError:
        pass
    return False


class Reaper:
    """Call :meth:`reap` now and then (the gateway's cr poll loop)."""

    def __init__(self, linger: float = LINGER) -> None:
        self.linger = linger
        self._me = os.getpid()
        self._my_sid = os.getsid(0)
        self._first_seen: dict[int, float] = {}

    def zombies(self) -> list[tuple[int, int]]:
        """``(pid, session id)`` of every zombie child of this process."""
        me = str(self._me)
        found = []
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            fields = _stat(entry)
            if fields and fields[0] == 'Z' and fields[1] == me:
                found.append((int(entry), int(fields[3])))
        return found

    def reap(self) -> dict[int, int]:
        """Reap adopted zombies; return ``{pid: exit code}`` of the job inits among them
        (128 + signal when one was killed)."""
        try:  # is any child waitable at all?  (WNOWAIT: looks, reaps nothing)
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                self._first_seen.clear()
                return {}
        except ChildProcessError:
            return {}
        now = time.monotonic()
        jobs: dict[int, int] = {}
        seen = set()
        for pid, sid in self.zombies():
            seen.add(pid)
            job = _is_namespace_init(pid)
            adopted = sid not in (pid, self._my_sid)
            if not (job or adopted):
                first = self._first_seen.setdefault(pid, now)
                if now - first < self.linger:
                    continue
                log.info('reaping pid %d, a zombie nobody waited for in %.0f s', pid, now - first)
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # somebody else's waitpid won the race: fine
                continue
            if got == pid and job:
                jobs[pid] = os.waitstatus_to_exitcode(status)
                if jobs[pid] < 0:
                    jobs[pid] = 128 - jobs[pid]
        for pid in list(self._first_seen):
            if pid not in seen:
                del self._first_seen[pid]
        return jobs
