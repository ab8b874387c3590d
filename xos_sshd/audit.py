"""The audit log: one JSON object per line, one line per event an admin must be able to trace.

Lines are written whole with one ``write`` on an ``O_APPEND`` descriptor, so concurrent
writers never interleave and a log shipper never sees half a line.  ``reopen()`` (SIGHUP)
follows a rotation by logrotate.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON-lines audit log."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file, creating it 0600 root; used at start and after rotation."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def write(self, event: str, **fields: Any) -> None:
        """Record *event* with *fields*; ``time`` (UTC, ISO 8601) is added."""
        record = {'time': datetime.now(timezone.utc).isoformat(timespec='milliseconds'),
                  'event': event, **fields}
        line = (json.dumps(record, default=str, separators=(',', ':')) + '\n').encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
