"""Crash-safe file publication, shared by the CA, the NSS tables and their index.

A reader (libnss_xos, getent, the verifier re-reading a CRL) must see either the old file or
the new one, never a torn one, and a crash must never leave a file with looser permissions
than intended: write a temp file in the same directory with the final mode, fsync it, rename
(or link) it over the target, fsync the directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Temp files are named ``.<target name>.tmp.<random>``: the marker lets a later writer
#: recognise and delete what a crashed one left (see ams.nss_tables.remove_stale_temps).
TMP_MARK = '.tmp.'


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in *directory* durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *,
                 overwrite: bool = True) -> None:
    """Publish *data* at *path* atomically with permissions *mode*.

    With ``overwrite=False`` the temp file is linked into place, which fails with
    ``FileExistsError`` when *path* exists (no window in which one could be replaced).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}{TMP_MARK}', dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp made it 0600 and the umask must not narrow it
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
