"""Home directories: created on first login, mode 0700, owned by the account.

The path comes from the AMS (home_base + account name), never from the user.  The base is
root-owned and not writable by others, so nobody but root can place anything at that path;
the new directory is opened with O_NOFOLLOW and changed through its descriptor all the same.
An existing home is left exactly as it is (its owner may have changed its mode).
"""

from __future__ import annotations

import logging
import os
import stat
import time

from ..ams import LocalAccount

log = logging.getLogger(__name__)


class HomeError(Exception):
    """The home directory cannot be used safely; the message names the problem."""


def ensure_home(account: LocalAccount) -> bool:
    """Create *account*'s home if it is missing; return True when it was created."""
    base = os.path.dirname(account.home)
    _check_base(base)
    try:
        os.mkdir(account.home, 0o700)
    except FileExistsError:
        st = os.lstat(account.home)
        if not stat.S_ISDIR(st.st_mode):
            raise HomeError(f'{account.home} exists and is not a directory') from None
        if st.st_uid != account.uid:
            log.warning('home %s is owned by uid %d, not %s (%d)',
                        account.home, st.st_uid, account.name, account.uid)
        return False
    fd = os.open(account.home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, account.uid, account.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    log.info('created home %s for %s', account.home, account.name)
    return True


def _check_base(base: str) -> None:
    """Create the home base if missing; refuse one that others could write into."""
    try:
        os.makedirs(base, 0o755, exist_ok=True)
    except OSError as exc:
        raise HomeError(f'cannot create home base {base}: {exc.strerror}') from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise HomeError(f'home base {base} must be a root-owned directory not writable by others')


def archive_home(home: str) -> str | None:
    """Move a reclaimed account's home out of reach; return where it went (None: no home).

    A reclaimed uid or pool account is handed to the next person: their files must not be.
    The home is renamed (a root operation inside the root-owned base, nothing below it is
    opened) into ``<base>/.reclaimed/``, a root-only 0700 directory, for the admin to keep or
    delete.
    """
    base = os.path.dirname(home)
    _check_base(base)
    if not os.path.lexists(home):
        return None
    attic = os.path.join(base, '.reclaimed')
    os.makedirs(attic, 0o700, exist_ok=True)
    st = os.lstat(attic)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise HomeError(f'{attic} must be a root-owned 0700 directory')
    target = os.path.join(attic, f'{os.path.basename(home)}.{int(time.time())}')
    os.rename(home, target)
    log.info('archived home %s of a reclaimed account to %s', home, target)
    return target
