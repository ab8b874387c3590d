"""Home directories: created on first login, mode 0700, owned by the account.

The path comes from the AMS (home_base + account name), never from the user.  The base is
root-owned and not writable by others, so nobody but root can place anything at that path;
the new directory is opened with O_NOFOLLOW and changed through its descriptor all the same.
An existing home is left exactly as it is (its owner may have changed its mode).

Homes are node-local.  On one node (the embedded sqlite store) the gateway that frees a
mapping archives the account's home at once (:func:`archive_home`), so the next holder of the
uid or pool account never sees it.  In a cluster (a shared store) a mapping freed by node A
leaves the homes it had on nodes B, C...  So there every home of a dynamic or pool account
records which lease it was made for (:attr:`~xos_sshd.ams.LocalAccount.lease`, the mapping's
never-reused id and creation time), and no node hands a home to any other lease:

* ``<base>/.xos-homes/`` (root, 0700) holds one marker per uid, ``<uid>``: the lease token
  and the name, home and identity the home was made for.  A marker and the homes it concerns
  change only under ``flock`` locks on lock files there: ``.lock-uid-<uid>`` (the marker),
  then ``.lock-name-<name>`` (the home ``<base>/<name>``); always a uid lock first and name
  locks in sorted order, so no two holders wait for each other, and a home that hangs (a FUSE
  mount over it) holds up logins of its own account and uid only, never another account's.
* :func:`ensure_home` (every login door) for an account with a lease, under its uid and name
  locks: a marker of its uid for another lease names the uid's previous holder, whose home
  (if the uid still owns it) is archived and the marker dropped; then anything at the
  account's home path that is not recorded as this lease's home (a previous lessee of the
  pool account or name, a home from before markers) is archived; only then is the home
  created and its marker written (after the ``mkdir``: a crash in between leaves an empty
  home without a marker, archived at the next login).  Check and creation are one critical
  section, so no login ever gets a home recorded for another lease, however soon after the
  release it comes and whichever node released.
* :func:`list_owners` + :func:`archive_released` (the AMS, after each refresh from the shared
  store: a NOTIFY or the periodic one): markers whose lease no longer exists get their homes
  archived, so a released account's files do not stay on the node until its next login
  there (a reused dynamic uid owns them).  The markers are listed *before* the live leases are
  read: a marker is written only after its mapping committed and lease ids are never reused,
  so a lease missing from the later snapshot is gone for good.  Under the locks each marker is
  read again: a login that meanwhile took the uid over is never undone.
* :func:`archive_home` (the node that released or reclaimed, right after the commit) with the
  released account: under its locks; a home already recorded for the uid's next lease (its
  login came in between) is left to it.

Root never opens anything below a home: homes are renamed inside their root-owned base, and
markers are read and written through a descriptor of the root-only marker directory with
``O_NOFOLLOW``.  Accounts without a lease (static accounts; every account on the sqlite
store) get exactly the first paragraph's behaviour: no marker, no lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..ams.model import LocalAccount

log = logging.getLogger(__name__)

#: The root-only directory of a home base that holds the owner markers (cluster).
OWNERS_DIR = '.xos-homes'
#: Where archived homes go (root-only), for the admin to keep or delete.
ATTIC_DIR = '.reclaimed'
_MARKER_MAX = 64 * 1024
#: The lease of a marker that cannot be read (never a live lease: its home is not handed out).
UNREADABLE = '?'


class HomeError(Exception):
    """The home directory cannot be used safely; the message names the problem."""


@dataclass(frozen=True)
class HomeOwner:
    """One owner marker: the home at ``home`` (in ``base``) was made for ``lease``."""

    base: str
    uid: int
    lease: str
    name: str = ''
    home: str = ''
    vo: str = ''
    vo_user: str = ''
    role: str = ''
    since: float = 0.0


def ensure_home(account: LocalAccount) -> bool:
    """Create *account*'s home if it is missing; return True when it was created.

    With a lease (a shared store), a home recorded for another lease, or for none, is
    archived first (module docstring)."""
    base = os.path.dirname(account.home)
    _check_base(base)
    if not account.lease:
        return _ensure(account)
    with _owners(base) as dfd, _locked(dfd, f'uid-{account.uid}'):
        mine = _read_owner(dfd, base, account.uid)
        previous: HomeOwner | None = None  # the uid's marker of another lease
        if mine is not None and mine.lease != account.lease:
            previous, mine = mine, None
        # The uid's previous holder under another name: that home here is the uid's too.
        elsewhere = previous is not None and previous.home not in ('', account.home)
        names = {os.path.basename(account.home)}
        if previous is not None and elsewhere:
            names.add(os.path.basename(previous.home))
        with _locked(dfd, *(f'name-{n}' for n in sorted(names))):
            if previous is not None:
                if elsewhere:
                    _archive_owned(previous, f'uid {account.uid} now serves {account.name} '
                                             f'({account.vo_user}@{account.vo})')
                _drop_owner(dfd, account.uid)
            if mine is None and _present(account.home):
                _archive(account.home, f'it is not recorded as the home of the current lease of '
                                       f'{account.name} ({account.vo_user}@{account.vo})')
            created = _ensure(account)
            if mine is None or created:
                _write_owner(dfd, account)
            return created


def _ensure(account: LocalAccount) -> bool:
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


def archive_home(home: str, account: LocalAccount | None = None) -> str | None:
    """Move a reclaimed account's home out of reach; return where it went (None: no home).

    A reclaimed uid or pool account is handed to the next person: their files must not be.
    The home is renamed (a root operation inside the root-owned base, nothing below it is
    opened) into ``<base>/.reclaimed/``, a root-only 0700 directory, for the admin to keep or
    delete.  *account* (the released one): where the base holds owner markers (a cluster),
    under the account's locks; a home recorded for another lease (a new lessee logged in here
    between the release and this call) is left to it, and the account's marker goes.
    """
    base = os.path.dirname(home)
    _check_base(base)
    if account is None or not account.lease or not os.path.lexists(os.path.join(base, OWNERS_DIR)):
        return _archive_released(home, account)
    with _owners(base) as dfd, _locked(dfd, f'uid-{account.uid}', f'name-{os.path.basename(home)}'):
        owner = _read_owner(dfd, base, account.uid)
        if owner is not None and owner.lease != account.lease and owner.home == home:
            return None  # the home of the uid's next lease already
        archived = _archive_released(home, account)
        if owner is not None and owner.lease == account.lease:
            _drop_owner(dfd, account.uid)  # only once the home is gone: a failure keeps it
        return archived


def _archive_released(home: str, account: LocalAccount | None) -> str | None:
    """Archive the released *account*'s home if it is there and still that uid's (a home
    the name's next holder made meanwhile, under another uid, is theirs)."""
    st = _present(home)
    if st is None:
        return None
    if account is not None and st.st_uid != account.uid:
        log.info('home %s belongs to uid %d now, not released %s (%d): left alone', home,
                 st.st_uid, account.name, account.uid)
        return None
    return _archive(home, 'its account was reclaimed or released', level=logging.INFO)


def _present(path: str) -> os.stat_result | None:
    """``lstat`` of *path*, None only when it does not exist.  Any other error (root gets
    EACCES on a user's FUSE mount over their home) is a :class:`HomeError`: a home that
    cannot be examined must never pass for an absent one, or it would outlive its lease
    and reach the account's next holder."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HomeError(f'cannot examine {path}: {exc.strerror} (a mount over it?)') from None


def _archive(home: str, why: str, level: int = logging.WARNING) -> str:
    """Rename *home* into its base's attic (root 0700); return the new path."""
    base = os.path.dirname(home)
    attic = os.path.join(base, ATTIC_DIR)
    os.makedirs(attic, 0o700, exist_ok=True)
    st = os.lstat(attic)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise HomeError(f'{attic} must be a root-owned 0700 directory')
    stem = os.path.join(attic, f'{os.path.basename(home)}.{int(time.time())}')
    target, n = stem, 0
    while os.path.lexists(target):  # two archives of one name within a second
        n += 1
        target = f'{stem}.{n}'
    os.rename(home, target)
    log.log(level, 'archived home %s to %s: %s', home, target, why)
    return target


def _archive_owned(owner: HomeOwner, why: str) -> str | None:
    """Archive the home a marker describes, if it is there and its uid still owns it."""
    if os.path.dirname(owner.home) != owner.base:  # markers only describe homes of their base
        return None
    try:
        st = os.lstat(owner.home)
    except FileNotFoundError:
        return None
    if st.st_uid != owner.uid:  # archived meanwhile, and the name is another uid's now
        return None
    return _archive(owner.home, why)


# -- owner markers (cluster) ------------------------------------------------------------


@contextmanager
def _owners(base: str, create: bool = True) -> Iterator[int]:
    """A descriptor of the base's marker directory (root, 0700) while inside.
    ``FileNotFoundError`` when it does not exist and *create* is false."""
    path = os.path.join(base, OWNERS_DIR)
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise HomeError(f'{path} must be a root-owned 0700 directory')
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _locked(dfd: int, *keys: str) -> Iterator[None]:
    """``flock`` the lock files ``.lock-KEY`` of the marker directory, in the order given
    (a ``uid-`` key before ``name-`` keys, names sorted: see the module docstring).  The lock
    files are never removed (an flock on a removed file would lock nothing)."""
    fds: list[int] = []
    try:
        for key in keys:
            fd = os.open(f'.lock-{key}', os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _read_owner(dfd: int, base: str, uid: int) -> HomeOwner | None:
    """The marker of *uid* (None: there is none; lease UNREADABLE: it is not a good one)."""
    try:
        fd = os.open(str(uid), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink or worse: not ours
        return HomeOwner(base, uid, UNREADABLE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            return HomeOwner(base, uid, UNREADABLE)
        data = os.read(fd, _MARKER_MAX + 1)
    finally:
        os.close(fd)
    try:
        d = json.loads(data)
        owner = HomeOwner(base, uid, str(d['lease']), str(d['name']), str(d['home']),
                          str(d['vo']), str(d['vo_user']), str(d.get('role') or ''),
                          float(d.get('since') or 0))
        if not owner.lease or int(d['uid']) != uid:
            raise ValueError('not this uid\'s marker')
    except (ValueError, TypeError, KeyError, AttributeError):
        return HomeOwner(base, uid, UNREADABLE)
    return owner


def _write_owner(dfd: int, account: LocalAccount) -> None:
    """Record *account*'s lease as the owner of its home (temp, fsync, rename)."""
    body = json.dumps({'uid': account.uid, 'lease': account.lease, 'name': account.name,
                       'home': account.home, 'vo': account.vo, 'vo_user': account.vo_user,
                       'role': account.role or '', 'since': time.time()}).encode()
    tmp = f'.{account.uid}.{secrets.token_hex(4)}.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dfd)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, str(account.uid), src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)


def _drop_owner(dfd: int, uid: int) -> None:
    try:
        os.unlink(str(uid), dir_fd=dfd)
    except FileNotFoundError:
        pass


def list_owners(bases: Iterable[str]) -> list[HomeOwner]:
    """Every owner marker of the home bases *bases* that have a marker directory (each read
    whole: markers are replaced by ``rename``)."""
    out: list[HomeOwner] = []
    for base in sorted(set(bases)):
        try:
            with _owners(base, create=False) as dfd:
                for name in os.listdir(dfd):
                    if name.isdigit():
                        owner = _read_owner(dfd, base, int(name))
                        if owner is not None:
                            out.append(owner)
        except FileNotFoundError:
            continue
        except (HomeError, OSError) as exc:
            log.error('cannot read the home owners of %s: %s', base, exc)
    return out


def archive_released(owners: Iterable[HomeOwner]) -> list[tuple[HomeOwner, str | None]]:
    """Archive the homes of *owners*, markers whose lease the caller found gone, and drop the
    markers; each is read again under its locks first (a marker that changed meanwhile is
    left alone).  Returns ``(marker, where its home went or None)`` for each one dropped."""
    done: list[tuple[HomeOwner, str | None]] = []
    for owner in owners:
        try:
            with _owners(owner.base, create=False) as dfd, _locked(dfd, f'uid-{owner.uid}'):
                now = _read_owner(dfd, owner.base, owner.uid)
                if now is None or now.lease != owner.lease:
                    continue
                names = [f'name-{os.path.basename(now.home)}'] if now.home else []
                with _locked(dfd, *names):
                    target = _archive_owned(now, f'the lease of {now.name} ({now.vo_user}@'
                                                 f'{now.vo}) ended') if now.home else None
                    _drop_owner(dfd, owner.uid)
                done.append((now, target))
        except FileNotFoundError:
            continue
        except (HomeError, OSError) as exc:  # the marker stays: tried again at the next refresh
            log.error('could not archive home %s of an ended lease: %s', owner.home, exc)
    return done
