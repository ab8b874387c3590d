"""Session processes that outlive their channel: reaped without holding anything for them.

When an SSH channel closes, the gateway hangs the session up (its pty master closed, its
pipes closed, ``SIGHUP`` to its process group) and waits a little for its exit status
(:data:`.channel.CLOSE_AUDIT_WAIT`).  A process that ignores the hang-up (``nohup``, ``trap ''
HUP``) then simply goes on, as an orphan does under sshd.  It is still the gateway's child,
so someone must reap it when it ends, but without a descriptor (pidfd), a loop reader or a
pipe per process: an account could otherwise pile up gateway descriptors by leaving
processes behind.  :class:`Orphans` keeps only the ``Popen`` objects (no descriptor: the
channel gave their pipes to the child) and ``waitpid(pid, WNOHANG)``\\s them every
:data:`POLL_SECONDS` while there are any; an unreaped child's pid cannot be reused, so the
pid stays theirs until then.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess

log = logging.getLogger(__name__)

#: How often the processes left behind are checked (a zombie in between, like any child).
POLL_SECONDS = 5.0


class Orphans:
    """The session processes whose channel closed while they ran on."""

    def __init__(self, poll_seconds: float = POLL_SECONDS) -> None:
        self.poll_seconds = poll_seconds
        self._procs: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._procs)

    def adopt(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes],
              account: str) -> None:
        """Reap *proc* (a session process of *account*) once it ends."""
        self._procs[proc.pid] = (proc, account)
        if self._timer is None:
            self._timer = loop.call_later(self.poll_seconds, self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        for pid, (proc, account) in list(self._procs.items()):
            if proc.poll() is not None:  # waitpid(pid, WNOHANG): no descriptor needed
                del self._procs[pid]
                log.info('session process %d of %s, left running when its channel closed, '
                         'exited with %d', pid, account, proc.returncode)
        if self._procs:
            self._timer = loop.call_later(self.poll_seconds, self._poll, loop)


#: The gateway's one set (it has one event loop).
ORPHANS = Orphans()
