"""``xos-sshd doctor``: what an admin gets wrong, checked and explained, one line per check.

Each check returns a :class:`Finding`: ``ok``, ``warn`` (works, but will bite) or ``fail``
(logins or jobs will not work), with the fix.  The checks only read: nothing is created or
changed, so doctor is safe to run on a live node at any time.  Exit status 1 if any check
failed, else 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from cryptography import x509

from .ams.ranges import RangeError, validate_policies
from .config import Config
from .session import spawn

CRL_WARN_DAYS = 2
CA_WARN_DAYS = 30
NSS_LIBRARY = 'libnss_xos.so.2'
PAM_MODULE = 'pam_xos.so'


@dataclass(frozen=True)
class Finding:
    """The verdict of one check."""

    level: str  # 'ok' | 'warn' | 'fail'
    check: str
    detail: str
    fix: str = ''

    def line(self) -> str:
        text = f'{self.level.upper():<4} {self.check}: {self.detail}'
        return text + (f' -- fix: {self.fix}' if self.fix and self.level != 'ok' else '')


def _ok(check: str, detail: str) -> Finding:
    return Finding('ok', check, detail)


def check_ca_and_crl(config: Config, now: datetime) -> Iterable[Finding]:
    """CA certificates and CRLs: readable, valid now, not about to expire."""
    for name, vo in config.vos.items():
        check = f'vo {name} CA'
        try:
            ca = x509.load_pem_x509_certificate(vo.trust.ca_file.read_bytes())
        except (OSError, ValueError) as exc:
            yield Finding('fail', check, f'{vo.trust.ca_file}: {exc}',
                          f'point vo.{name}.ca at the VO CA certificate (PEM)')
            continue
        left = ca.not_valid_after_utc - now
        if left.total_seconds() <= 0:
            yield Finding('fail', check, f'expired {ca.not_valid_after_utc:%Y-%m-%d}',
                          'install the VO\'s renewed CA certificate')
        elif left.days < CA_WARN_DAYS:
            yield Finding('warn', check, f'expires in {left.days} days',
                          'ask the VO manager for the renewed CA certificate')
        else:
            yield _ok(check, f'{vo.trust.ca_file} valid until {ca.not_valid_after_utc:%Y-%m-%d}')
        yield from _check_crl(name, vo.trust.crl_file, vo.trust.crl_required, now)


def _check_crl(name: str, path: Path | None, required: bool, now: datetime) -> Iterable[Finding]:
    check = f'vo {name} CRL'
    level = 'fail' if required else 'warn'
    if path is None:
        yield Finding(level, check, 'no CRL configured', f'set vo.{name}.crl')
        return
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        yield Finding(level, check, f'{path}: {exc}',
                      'fetch the VO\'s current CRL (xos-ca crl DIR re-signs one)')
        return
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= now:
        yield Finding(level, check, f'stale since {next_update:%Y-%m-%d %H:%M} UTC',
                      'fetch the VO\'s current CRL; logins are refused with crl-unavailable')
    elif next_update is not None and (next_update - now).days < CRL_WARN_DAYS:
        yield Finding('warn', check, f'next update due {next_update:%Y-%m-%d %H:%M} UTC',
                      'make sure the CRL is refreshed before then (cron: xos-ca crl, or fetch)')
    else:
        yield _ok(check, f'{len(crl)} revoked, next update '
                  f'{next_update:%Y-%m-%d}' if next_update else f'{len(crl)} revoked')


def check_clock(now: datetime) -> Iterable[Finding]:
    """Certificates are hours long: a clock far off refuses everyone."""
    try:
        out = subprocess.run(['timedatectl', 'show', '-p', 'NTPSynchronized', '--value'],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ''
    if now.year < 2024:
        yield Finding('fail', 'clock', f'system time is {now:%Y-%m-%d}',
                      'set the clock (chrony or systemd-timesyncd)')
    elif out == 'yes':
        yield _ok('clock', 'synchronised (NTP)')
    else:
        yield Finding('warn', 'clock', 'NTP synchronisation not confirmed',
                      'run chrony or systemd-timesyncd: certificates allow only a few minutes of skew')


def check_ranges(config: Config) -> Iterable[Finding]:
    """uid/gid ranges against /etc/passwd, /etc/group and each other."""
    try:
        validate_policies(config.policies)
    except RangeError as exc:
        yield Finding('fail', 'uid ranges', str(exc),
                      'move the VO ranges away from local accounts and each other')
    else:
        yield _ok('uid ranges', 'no overlap with /etc/passwd, /etc/group or other VOs')


def check_permissions(config: Config) -> Iterable[Finding]:
    """Host keys and CA keys private; the state directory root-owned."""
    for path in config.host_keys:
        yield _mode_check(f'host key {path.name}', path, forbid=0o077,
                          fix=f'chown root:root {path}; chmod 600 {path}')
    yield _mode_check('state dir', config.state_dir, forbid=0o022,
                      fix=f'chown root:root {config.state_dir}; chmod 755 {config.state_dir}')
    db = config.ams_db
    if db.exists():
        yield _mode_check('AMS database', db, forbid=0o022, fix=f'chmod 644 {db}')


def _mode_check(check: str, path: Path, forbid: int, fix: str) -> Finding:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return Finding('fail', check, f'{path}: {exc.strerror}', 'create it or fix the config')
    if stat.S_ISLNK(st.st_mode):
        return Finding('fail', check, f'{path} is a symlink', fix)
    if st.st_uid != 0 or st.st_mode & forbid:
        return Finding('fail', check, f'{path} is owned by uid {st.st_uid} with mode '
                       f'{stat.S_IMODE(st.st_mode):o}', fix)
    return _ok(check, f'{path} mode {stat.S_IMODE(st.st_mode):o}, owner root')


def check_nss(config: Config) -> Iterable[Finding]:
    """libnss_xos installed and named in nsswitch.conf, so id/ls/ps show mapped accounts."""
    installed = [d for d in _library_dirs() if (Path(d) / NSS_LIBRARY).exists()]
    if not installed:
        yield Finding('warn', 'NSS module', f'{NSS_LIBRARY} not installed',
                      'make -C native install')
    else:
        yield _ok('NSS module', f'{Path(installed[0]) / NSS_LIBRARY}')
    try:
        lines = Path('/etc/nsswitch.conf').read_text().splitlines()
    except OSError:
        lines = []
    for db in ('passwd', 'group'):
        entry = next((l for l in lines if l.split(':')[0].strip() == db), '')
        if 'xos' in entry.split(':', 1)[-1].split():
            yield _ok(f'nsswitch {db}', entry.strip())
        else:
            yield Finding('warn', f'nsswitch {db}', f'"{entry.strip() or db + ": (missing)"}" '
                          'does not name xos', f'edit /etc/nsswitch.conf: "{db}: files xos"')
    default_dir = Path('/var/lib/xos-sshd/nss')
    if config.nss_dir != default_dir:
        yield Finding('warn', 'NSS tables', f'written to {config.nss_dir}, libnss_xos reads '
                      f'{default_dir}', f'set nss_dir = "{default_dir}" or symlink it')


def check_pam() -> Iterable[Finding]:
    """pam_xos installed and used by some PAM service (the fallback door through sshd)."""
    modules = [d for d in _library_dirs() if (Path(d) / 'security' / PAM_MODULE).exists()]
    users = []
    pam_d = Path('/etc/pam.d')
    if pam_d.is_dir():
        for f in sorted(pam_d.iterdir()):
            try:
                if PAM_MODULE in f.read_text(errors='replace'):
                    users.append(f.name)
            except OSError:
                pass
    if not modules:
        yield Finding('warn', 'PAM module', f'{PAM_MODULE} not installed (fallback through '
                      'the system sshd off)', 'make -C native install, then see README '
                      '"Fallback through the system sshd"')
    elif not users:
        yield Finding('warn', 'PAM stack', f'{PAM_MODULE} installed but no /etc/pam.d service '
                      'uses it', 'add the pam_xos lines of README to /etc/pam.d/sshd')
    else:
        yield _ok('PAM stack', f'{PAM_MODULE} used by {", ".join(users)}')


def check_pam_session(config: Config) -> Iterable[Finding]:
    """``[session] pam``: libpam loads, the service file is there, safe, and its modules
    exist, and PAM modules can look the mapped accounts up (one line)."""
    check, session = 'PAM session', config.session
    if not session.pam:
        yield _ok(check, 'off ([session] pam = false): sessions get the [session] rlimits')
        return
    from .session import pamlib
    from .session.pamsession import unsafe_path
    try:
        pamlib.load()
    except OSError as exc:
        yield Finding('fail', check, f'cannot load {pamlib.LIBPAM}: {exc}',
                      'apt-get install libpam0g libpam-modules')
        return
    path = (session.pam_confdir or Path('/etc/pam.d')) / session.pam_service
    if session.pam_confdir is not None and not pamlib.has_confdir():
        yield Finding('fail', check, 'this libpam has no pam_start_confdir (Linux-PAM < 1.4)',
                      f'remove session.pam_confdir and install the stack as /etc/pam.d/'
                      f'{session.pam_service}')
        return
    if not path.is_file():
        yield Finding('fail', check, f'{path} is missing: every session would be refused',
                      f'install -m 644 deploy/pam.d/xos-sshd {path}')
        return
    problem = unsafe_path(str(path)) or (
        unsafe_path(str(path.parent)) if session.pam_confdir is not None else None)
    if problem:
        yield Finding('fail', check, f'{problem}: sessions are refused',
                      f'chown root:root {path}; chmod 644 {path}')
        return
    missing = _missing_pam_modules(path)
    required = [m for m, needed in missing if needed]
    if required:
        yield Finding('fail', check, f'{path} needs modules that are not installed: '
                      f'{", ".join(required)}', 'install them (libpam-modules, libpam-systemd) '
                      'or remove their lines')
        return
    try:
        nss = Path('/etc/nsswitch.conf').read_text().splitlines()
    except OSError:
        nss = []
    passwd = next((l for l in nss if l.split(':')[0].strip() == 'passwd'), '')
    if 'xos' not in passwd.split(':', 1)[-1].split():
        yield Finding('fail', check, 'PAM modules look accounts up by name, but nsswitch.conf '
                      f'"{passwd.strip() or "passwd: (missing)"}" does not name xos',
                      'edit /etc/nsswitch.conf: "passwd: files xos", "group: files xos"')
    elif missing:
        yield Finding('warn', check, f'{path}: optional modules not installed: '
                      f'{", ".join(m for m, _ in missing)}', 'install them or remove their lines')
    else:
        yield _ok(check, f'service {session.pam_service} ({path}), modules present')


def _missing_pam_modules(path: Path) -> list[tuple[str, bool]]:
    """The modules *path* names that are not installed: (module, whether its control
    makes it needed: required, requisite or [...])."""
    dirs = [Path(d) / 'security' for d in _library_dirs()] + [Path('/usr/lib/security')]
    missing = []
    for line in path.read_text(errors='replace').splitlines():
        m = re.match(r'\s*(-?)(auth|account|session|password)\s+(\[[^\]]*\]|\S+)\s+(\S+)',
                     line.split('#', 1)[0])
        if not m or m.group(3) in ('include', 'substack'):
            continue
        module = m.group(4)
        found = (Path(module).is_file() if module.startswith('/')
                 else any((d / module).is_file() for d in dirs))
        if not found:
            needed = not m.group(1) and (m.group(3) in ('required', 'requisite')
                                         or m.group(3).startswith('['))
            missing.append((module, needed))
    return missing


def check_criu(config: Config) -> Iterable[Finding]:
    """CRIU present, new enough, and ``criu check`` passing; what migration can use."""
    from .cr import criu
    try:
        info = asyncio.run(criu.probe(getattr(config, 'criu_path', None)))
    except criu.CriuError as exc:
        yield Finding('fail', 'CRIU', exc.reason,
                      'install criu >= 4.0 (Debian trixie) or run scripts/install-criu.sh; '
                      'set criu_path')
        return
    features = ', '.join(f'{k}={"yes" if v else "no"}' for k, v in sorted(info.features.items()))
    yield _ok('CRIU', f'{info.path} {info.version_text}: criu check passed; {features}')
    # The mode xos-cr migrate gets with a node like this one (cr/migcaps.py: sysctls too).
    from .cr.migcaps import doctor_finding, read_sysctls
    level, detail, fix = doctor_finding(info.features, read_sysctls())
    yield Finding(level, 'migration', detail, fix)


def check_store(config: Config) -> Iterable[Finding]:
    """The AMS store: reachable (read only: nothing is created or migrated), its schema
    version, and that no uid or gid it maps (dynamic, pool) is used by /etc/passwd or
    /etc/group on this node (one line)."""
    from .ams.ranges import read_system_ids
    from .ams.store import SCHEMA_VERSION
    check, where = 'AMS store', config.describe_store()
    try:
        if config.ams_pg is None:
            if not config.ams_db.exists():
                yield _ok(check, f'{where}: not created yet (the gateway creates it at start)')
                return
            version, rows = _read_sqlite_store(config.ams_db)
        else:
            version, rows = asyncio.run(_read_pg_store(config.ams_pg))
    except Exception as exc:  # unreachable, refused, unreadable: say so, on one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        yield Finding('fail', check, f'{where}: cannot read it: {text}',
                      'start the database server or fix [ams] store/password_file'
                      if config.ams_pg is not None else f'check {config.ams_db}')
        return
    if version > SCHEMA_VERSION:
        yield Finding('fail', check, f'{where}: schema version {version} is newer than this '
                      f'xos-sshd ({SCHEMA_VERSION})', 'upgrade xos-sshd on this node')
        return
    system = read_system_ids()
    uids, gids = system.uids, system.gids
    clashes = [f'{name} (uid {uid})' for name, uid, gid in rows if uid in uids]
    clashes += [f'{name} (gid {gid})' for name, uid, gid in rows if gid in gids]
    if clashes:
        yield Finding('fail', check, f'{where}: mapped ids also used by local accounts or groups '
                      f'of this node: {", ".join(clashes[:5])}'
                      + (f' and {len(clashes) - 5} more' if len(clashes) > 5 else ''),
                      'move the local account or group out of the VO ranges (the same uid must '
                      'mean the same person on every node)')
        return
    state = (f'schema version {version}' if version == SCHEMA_VERSION else
             f'schema version {version} (the gateway migrates it to {SCHEMA_VERSION} at start)')
    reach = 'reachable, ' if config.ams_pg is not None else ''
    yield Finding('ok' if version == SCHEMA_VERSION else 'warn', check,
                  f'{where}: {reach}{state}, {len(rows)} mapped account(s), no mapped uid or gid '
                  'in /etc/passwd or /etc/group', 'start the gateway once to migrate the store')


def _read_sqlite_store(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    """(schema version, dynamic/pool (name, uid, gid)) of the sqlite store, opened read-only."""
    import sqlite3
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True, timeout=5)
    try:
        version = int(conn.execute('PRAGMA user_version').fetchone()[0])
        rows = conn.execute("SELECT name, uid, gid FROM mappings WHERE kind <> 'static'").fetchall() \
            if version else []
    finally:
        conn.close()
    return version, [(r[0], int(r[1]), int(r[2])) for r in rows]


async def _read_pg_store(settings: object) -> tuple[int, list[tuple[str, int, int]]]:
    """The same from the PostgreSQL store (one connection, read only)."""
    import asyncpg

    from .ams.store_pg import connect_options
    conn = await asyncpg.connect(**connect_options(settings))  # type: ignore[arg-type]
    try:
        async with conn.transaction(readonly=True):
            if await conn.fetchval("SELECT to_regclass('xos_schema')") is None:
                return 0, []
            version = int(await conn.fetchval('SELECT coalesce(max(version), 0) FROM xos_schema'))
            rows = await conn.fetch("SELECT name, uid, gid FROM mappings WHERE kind <> 'static'") \
                if version else []
    finally:
        await conn.close()
    return version, [(r[0], int(r[1]), int(r[2])) for r in rows]


def check_metrics(config: Config) -> Iterable[Finding]:
    """Where the Prometheus endpoint is, when ``[metrics] listen`` is set (one line)."""
    listen = getattr(getattr(config, 'metrics', None), 'listen', None)
    if listen is not None:
        host = f'[{listen.host}]' if ':' in listen.host else listen.host
        yield _ok('metrics', f'Prometheus endpoint http://{host}:{listen.port}/metrics '
                  '(loopback only)')


def _library_dirs() -> list[str]:
    return ['/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64', '/lib']


CHECKS: list[Callable[[Config, datetime], Iterable[Finding]]] = [
    lambda c, now: check_ca_and_crl(c, now),
    lambda c, now: check_clock(now),
    lambda c, now: check_ranges(c),
    lambda c, now: check_store(c),
    lambda c, now: check_permissions(c),
    lambda c, now: check_nss(c),
    lambda c, now: check_pam(),
    lambda c, now: check_pam_session(c),
    lambda c, now: [Finding(*spawn.exec_helper_status(c.session.exec_helper))],
    lambda c, now: check_criu(c),
    lambda c, now: check_metrics(c),
]


def run(config: Config, out: Callable[[str], None] = print) -> int:
    """Run every check, print one line each; return the exit status."""
    now = datetime.fromtimestamp(time.time(), timezone.utc)
    failed = False
    for check in CHECKS:
        for finding in check(config, now):
            out(finding.line())
            failed |= finding.level == 'fail'
    return 1 if failed else 0
