"""A real PostgreSQL server for the tests of the shared AMS store (no mocks).

``pg_server`` (session scope) runs Debian's ``initdb`` and ``pg_ctl`` (the newest
``/usr/lib/postgresql/*/bin``) as the ``postgres`` system user, in a private directory under
/tmp: data, a 0700 socket directory, a free TCP port on 127.0.0.1.  Password logins
(scram-sha-256) over TCP for the role ``xos``, whose password is in a 0600 file (the store
reads it through ``[ams] password_file``); the superuser ``postgres`` only over the private
socket (for the tests' own set-up).  Everything is stopped and removed at the end of the
session, also when tests failed.  ``pg_db`` (function scope) is a fresh database owned by
``xos`` for one test, dropped after it.

``scripts/system-deps.sh test`` installs the server (package ``postgresql``) without creating
or starting a system cluster.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import pytest
from gatewayproc import free_port

from xos_sshd.ams.store import PgSettings

#: Timeouts short enough that an outage test does not wait long (the defaults are for nodes).
TEST_TIMEOUTS = dict(connect_timeout=2.0, command_timeout=5.0, retry_seconds=2.0)


def pg_bindir() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/VERSION/bin)."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                   key=lambda p: int(p.split('/')[4]) if p.split('/')[4].isdigit() else 0)
    if not found:
        raise AssertionError('no PostgreSQL server installed (apt-get install postgresql; '
                             'make test does it through scripts/system-deps.sh)')
    return Path(found[-1]).parent


@dataclass
class PgServer:
    """One private PostgreSQL server (a cluster of its own) run by the tests."""

    base: Path
    port: int
    password: str
    bindir: Path
    user: str = 'xos'
    _dbs: Any = None

    @property
    def data(self) -> Path:
        return self.base / 'data'

    @property
    def sockdir(self) -> Path:
        return self.base / 'sock'

    @property
    def password_file(self) -> Path:
        return self.base / 'password'

    @property
    def log_path(self) -> Path:
        return self.base / 'server.log'

    @classmethod
    def create(cls) -> 'PgServer':
        bindir = pg_bindir()
        base = Path(tempfile.mkdtemp(prefix='xos-test-pg-'))
        pg = pwd.getpwnam('postgres')
        server = cls(base, free_port(), secrets.token_urlsafe(16), bindir)
        server._dbs = itertools.count(1)
        try:
            os.chown(base, pg.pw_uid, pg.pw_gid)
            os.chmod(base, 0o700)
            server.sockdir.mkdir(mode=0o700)
            os.chown(server.sockdir, pg.pw_uid, pg.pw_gid)
            server.password_file.write_text(server.password + '\n')
            server.password_file.chmod(0o600)
            server._as_postgres(str(bindir / 'initdb'), '-D', str(server.data), '-U', 'postgres',
                                '-E', 'UTF8', '--locale=C', '--no-sync', '--auth-local=trust',
                                '--auth-host=scram-sha-256')
            (server.data / 'pg_hba.conf').write_text(
                'local all postgres trust\n'
                'host  all all 127.0.0.1/32 scram-sha-256\n')
            server.start()
            server.psql(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        except BaseException:
            server.destroy()
            raise
        return server

    def _as_postgres(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(['runuser', '-u', 'postgres', '--', *argv], capture_output=True,
                              text=True, timeout=timeout, cwd=self.base)
        if proc.returncode != 0:
            raise AssertionError(f'{argv[0]} failed ({proc.returncode}): {proc.stderr}{proc.stdout}'
                                 f'\n{self.log_tail()}')
        return proc

    def log_tail(self, n: int = 20) -> str:
        try:
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-n:])
        except OSError:
            return ''

    def start(self) -> None:
        """Start (again) on the same port and socket directory."""
        options = (f'-c listen_addresses=127.0.0.1 -c port={self.port} '
                   f'-c unix_socket_directories={self.sockdir} -c fsync=off '
                   f'-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB')
        self._as_postgres(str(self.bindir / 'pg_ctl'), '-D', str(self.data), '-l',
                          str(self.log_path), '-w', '-t', '60', '-o', options, 'start')

    def stop(self, mode: str = 'fast') -> None:
        """Stop the server (``fast``: sessions are ended, as at a database outage)."""
        self._as_postgres(str(self.bindir / 'pg_ctl'), '-D', str(self.data), '-m', mode, '-w',
                          '-t', '60', 'stop')

    def running(self) -> bool:
        return subprocess.run(['runuser', '-u', 'postgres', '--', str(self.bindir / 'pg_ctl'),
                               '-D', str(self.data), 'status'], capture_output=True).returncode == 0

    def destroy(self) -> None:
        """Stop the server (if it runs) and remove everything."""
        try:
            if (self.data / 'postmaster.pid').exists():
                try:
                    self.stop('fast')
                except (AssertionError, subprocess.TimeoutExpired):
                    self.stop('immediate')
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, db: str = 'postgres') -> str:
        """Run *sql* as the superuser over the private socket; return the unaligned output."""
        proc = subprocess.run([str(self.bindir / 'psql'), '-X', '-q', '-A', '-t', '-v',
                               'ON_ERROR_STOP=1', '-h', str(self.sockdir), '-p', str(self.port),
                               '-U', 'postgres', '-d', db, '-c', sql],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f'psql {sql!r}: {proc.stderr}')
        return proc.stdout.strip()

    def new_database(self) -> str:
        name = f'xos_t{next(self._dbs)}_{secrets.token_hex(3)}'
        self.psql(f'CREATE DATABASE {name} OWNER {self.user} STRATEGY = FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        if self.running():
            self.psql(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')

    def settings(self, db: str, **kw: Any) -> PgSettings:
        """The store settings a gateway of the tests uses for database *db*."""
        return PgSettings(dsn=f'postgresql://{self.user}@127.0.0.1:{self.port}/{db}',
                          password_file=str(self.password_file), **{**TEST_TIMEOUTS, **kw})


@pytest.fixture(scope='session')
def pg_server() -> Iterator[PgServer]:
    server = PgServer.create()
    atexit.register(server.destroy)  # a session killed between the two still cleans up
    try:
        yield server
    finally:
        server.destroy()
        atexit.unregister(server.destroy)


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[PgSettings]:
    """A fresh, empty database for one test (the store migrates it at its first open)."""
    if not pg_server.running():  # a failed outage test left it stopped
        pg_server.start()
    name = pg_server.new_database()
    try:
        yield pg_server.settings(name)
    finally:
        pg_server.drop_database(name)


def with_settings(settings: PgSettings, **kw: Any) -> PgSettings:
    return replace(settings, **kw)
