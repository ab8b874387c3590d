"""Shared fixtures: a VO CA and a running gateway, both real."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from gatewayproc import GatewayProcess, VOCA, free_uid_range, kill_uid_processes, release_uid_range
from pgserver import pg_db, pg_server  # noqa: F401 (fixtures: a real PostgreSQL server)


@pytest.fixture(scope='session', autouse=True)
def _must_be_root() -> None:
    if os.geteuid() != 0:
        pytest.exit('the xos-sshd test suite runs as root (it creates processes under real uids)')


@pytest.fixture(params=['sqlite', 'postgresql'])
def ams_db(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """Where a test's AMS store is, once per backend: a sqlite file, and a fresh database
    of the tests' PostgreSQL server (started only when a test asks for it)."""
    if request.param == 'sqlite':
        return tmp_path / 'ams.sqlite'
    return request.getfixturevalue('pg_db')


@pytest.fixture
def dev_ca(tmp_path: Path) -> VOCA:
    return VOCA.create(tmp_path, 'dev')


@pytest.fixture
def uid_range() -> Iterator[tuple[int, int]]:
    first, last = free_uid_range()
    yield first, last
    kill_uid_processes(first, last)
    release_uid_range(first)


def dynamic_vo(ca: VOCA, uid_range: tuple[int, int], home_base: Path, **extra: object) -> dict:
    home_base.mkdir(mode=0o755, exist_ok=True)
    return {'ca': str(ca.dir / 'ca.pem'), 'crl': str(ca.dir / 'crl.pem'),
            'policy': 'dynamic', 'uid_range': list(uid_range), 'gid_range': list(uid_range),
            'account_prefix': f'{ca.vo}-', 'home_base': str(home_base), **extra}


@pytest.fixture
def home_base() -> Iterator[Path]:
    """A root-owned 0755 directory for mapped homes (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix='xos-test-homes-'))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def gateway(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
            home_base: Path) -> Iterator[GatewayProcess]:
    """A gateway for VO ``dev`` with the dynamic policy."""
    gw = GatewayProcess.configure(
        tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')}).start()
    yield gw
    gw.stop()
    kill_uid_processes(*uid_range)
