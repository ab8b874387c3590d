"""The audit log: one JSON object per line, one line per event an admin must be able to trace.

Lines are written whole with one ``write`` on an ``O_APPEND`` descriptor, so concurrent
writers never interleave and a log shipper never sees half a line.  ``reopen()`` (SIGHUP)
follows a rotation by logrotate: the old descriptor is kept until the new file is open, so
no event is lost across a rotation.

This is the one way to report an event: whatever is audited is also what the Prometheus
metrics count (:mod:`xos_sshd.metrics` subscribes with :meth:`AuditLog.subscribe`), so the
log and the counters never disagree.  The events, their actions and fields are listed in
``docs/internals.md`` ("Audit events"); every line has ``time``, ``event`` and, by
convention, ``outcome`` (``ok`` | ``accepted`` | ``refused``) with ``reason`` + ``message``
when refused.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Called with each record (the dict that was written) after its line is written.
Listener = Callable[[dict[str, Any]], None]


class AuditLog:
    """Append-only JSON-lines audit log, with listeners that see every record."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self._listeners: list[Listener] = []
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file, creating it 0600 root; used at start and after rotation."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def subscribe(self, listener: Listener) -> None:
        """Call *listener* with every record written from now on (metrics).

        Listeners run in the writer's thread right after the line is written; they must be
        quick and must not write audit events themselves.  One that raises is logged and
        ignored: counting must never break what is counted.
        """
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling *listener* (no error if it was not subscribed)."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def write(self, event: str, **fields: Any) -> None:
        """Record *event* with *fields*; ``time`` (UTC, ISO 8601) is added."""
        record = {'time': datetime.now(timezone.utc).isoformat(timespec='milliseconds'),
                  'event': event, **fields}
        line = (json.dumps(record, default=str, separators=(',', ':')) + '\n').encode()
        with self._lock:
            os.write(self._fd, line)
        for listener in tuple(self._listeners):
            try:
                listener(record)
            except Exception:
                log.exception('audit listener failed on a %s event', event)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
