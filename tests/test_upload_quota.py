"""``xos-images`` uploads count against the account's byte quota with everything else it
stages on the node: its other uploads (any session), its incoming migrations and what its
images use -- one ledger per gateway (``CRService.migrations``).

Real gateway, real users, real SSH: asyncssh SFTP clients on the ``xos-images`` subsystem
for uploads held open at once, stock OpenSSH ``sftp -s xos-images`` and ``xos-cr put`` for
the uploads a user makes, a real ``migrate-in`` stream for the migration's share.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.sftp import start_sftp_client
from crhelpers import wait_for
from gatewayproc import GatewayProcess
from test_cr_e2e import (  # fixtures and helpers, shared with the other cr end-to-end tests
    alice,  # noqa: F401 (fixture)
    ca,  # noqa: F401 (fixture)
    cr_env,  # noqa: F401 (fixture)
    home_of,
    images_of,
    make_gateway,
    refused,
    sftp,
    write_images_table,
    xcr,
)
from test_cr_migrate import Stream, leftovers, staged_bytes

from xos_sshd.cr.cli import Settings

CHUNK = 32 << 10
REFUSAL = re.compile(
    r'quota-exceeded: image quota exceeded for uid (\d+): this upload would stage (\d+) bytes; '
    r'with (\d+) bytes in its images(?: and (\d+) bytes staged by (.+?))? that is (\d+) of '
    r'(\d+) allowed\Z')


def spooled(gw: GatewayProcess) -> list[str]:
    """Whatever lies in the upload spool and the store's import staging area."""
    return [str(p) for top in ('cr-uploads', 'images/.staging')
            for p in (gw.state / top).rglob('*') if not p.is_dir()]


def exported_image(gw: GatewayProcess, prefix: Path, work: Path) -> tuple[str, Path, int]:
    """A real image of a ``sleep`` job: (its id, its archive, the image's size)."""
    job = xcr(gw, prefix, 'run', '--', 'sleep', '600').stdout.strip()
    image = xcr(gw, prefix, 'checkpoint', job, '--stop').stdout.strip()
    archive = work / 'image.tar'
    xcr(gw, prefix, 'get', image, str(archive))
    size = next(i['size_bytes'] for i in json_images(gw, prefix) if i['id'] == image)
    return image, archive, size


def json_images(gw: GatewayProcess, prefix: Path) -> list[dict[str, Any]]:
    return json.loads(xcr(gw, prefix, 'images', '--json').stdout)


def with_quota(gw: GatewayProcess, quota: int) -> None:
    gw.stop()
    write_images_table(gw, {'quota_bytes': quota})
    gw.start()


class Uploader:
    """One SSH connection as a user; any number of ``xos-images`` SFTP sessions on it."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writers: list[Any] = []  # each session's channel, raw

    @classmethod
    async def open(cls, gw: GatewayProcess, prefix: Path) -> 'Uploader':
        settings = Settings(str(prefix), gw.port, None, ['StrictHostKeyChecking=no',
                                                         'UserKnownHostsFile=/dev/null'], None)
        return cls(await settings.transport('127.0.0.1', gw.port))

    async def session(self) -> Any:
        conn = self.transport.conn
        writer, reader, _ = await conn.open_session(subsystem='xos-images', encoding=None)
        self.writers.append(writer)
        return await start_sftp_client(conn, asyncio.get_running_loop(), 'strict', reader,
                                       writer, 'utf-8', 'strict', 3)

    async def close(self) -> None:
        await self.transport.close()


async def write_until_refused(f: Any, data: bytes) -> str | None:
    """Write *data* in chunks; the refusal's text, or None when all of it went in."""
    for at in range(0, len(data), CHUNK):
        try:
            await f.write(data[at:at + CHUNK], at)
        except asyncssh.SFTPFailure as exc:
            return exc.reason
    return None


def parse_refusal(text: str) -> dict[str, Any]:
    m = REFUSAL.match(text)
    assert m, text
    uid, this, used, others, by, total, quota = m.groups()
    got = {'uid': int(uid), 'this': int(this), 'used': int(used), 'others': int(others or 0),
           'by': by, 'total': int(total), 'quota': int(quota)}
    assert got['total'] == got['used'] + got['others'] + got['this'] > got['quota'], got
    return got


def test_concurrent_uploads_share_the_quota_with_the_images(cr_env: dict[str, Any],  # noqa: F811
                                                            ca: Any, alice: Path) -> None:  # noqa: F811
    """Uploads held open at once in several sessions may not stage more than the quota
    leaves beside the images; the one that would is refused with the numbers, the others
    go on, nothing stays in the spool, the gateway serves on, and a later upload within the
    quota is imported."""
    gw = make_gateway(cr_env, ca, 'uq')
    work = cr_env['base'] / 'work'
    work.mkdir()
    _image, archive, image_size = exported_image(gw, alice, work)
    size = archive.stat().st_size
    uid = os.stat(home_of(cr_env, 'alice')).st_uid
    quota = image_size + 2 * size  # the image is kept: 2 archives' worth are left
    with_quota(gw, quota)
    each = size * 4 // 5  # three of these pass what is left (not the quota itself)
    junk = [os.urandom(each) for _ in range(3)]

    async def scenario() -> tuple[list[str | None], list[str | None]]:
        up = await Uploader.open(gw, alice)
        try:
            sessions = [await up.session() for _ in range(3)]
            files = [await s.open(f'/upload/c{n}.tar', 'wb') for n, s in enumerate(sessions)]
            # the first two interleaved, chunk by chunk, all of theirs; then the third,
            # while both are still open
            refusals: list[str | None] = [None] * 3
            for at in range(0, each, CHUNK):
                for n in (0, 1):
                    await files[n].write(junk[n][at:at + CHUNK], at)
            assert len(spooled(gw)) == 3
            refusals[2] = await write_until_refused(files[2], junk[2])
            assert len(spooled(gw)) == 2, spooled(gw)  # the refused one is gone at once
            closes: list[str | None] = []
            for f in files:
                try:
                    await f.close()
                    closes.append(None)
                except asyncssh.SFTPFailure as exc:
                    closes.append(exc.reason)
            return refusals, closes
        finally:
            await up.close()

    refusals, closes = asyncio.run(scenario())
    assert refusals[:2] == [None, None], refusals
    got = parse_refusal(refusals[2] or '')
    assert got['uid'] == uid and got['quota'] == quota and got['used'] == image_size, got
    assert got['others'] == 2 * each and got['by'] == '2 other uploads', got
    assert got['this'] <= each  # refused on the way, before it was written
    # the junk is no archive: refused when closed; the refused one says its quota again
    assert closes[0].startswith('bad-archive: ') and closes[1].startswith('bad-archive: ')
    assert closes[2] == refusals[2], closes
    assert spooled(gw) == [] and gw.alive()
    # within the quota (the image and one archive): imported, by stock OpenSSH sftp
    res = sftp(gw, alice, 'alice', f'put {archive} upload/again.tar\n', work)
    assert res.returncode == 0, res.stderr + gw.log()[-3000:]
    assert len(images_of(gw, alice)) == 2 and spooled(gw) == []
    # xos-cr put shows a refusal with its numbers
    big = work / 'big.tar'
    big.write_bytes(os.urandom(2 * size))
    res = xcr(gw, alice, 'put', str(big), check=False)
    assert refused(res, 'quota-exceeded') and 'this upload would stage' in res.stderr \
        and f'of {quota} allowed' in res.stderr, res.stderr
    assert spooled(gw) == [] and len(images_of(gw, alice)) == 2
    assert 'Traceback' not in gw.log()


def test_a_dropped_connection_releases_its_uploads(cr_env: dict[str, Any],  # noqa: F811
                                                   ca: Any, alice: Path) -> None:  # noqa: F811
    """Uploads left open when the connection drops are abandoned: nothing imported, spool
    files removed, their bytes no longer charged."""
    gw = make_gateway(cr_env, ca, 'ud')
    work = cr_env['base'] / 'work'
    work.mkdir()
    image, archive, _ = exported_image(gw, alice, work)
    xcr(gw, alice, 'rm', image)
    size = archive.stat().st_size
    with_quota(gw, size * 3 // 2)
    data = archive.read_bytes()

    async def drop() -> list[str | None]:
        up = await Uploader.open(gw, alice)
        session = await up.session()
        # a whole archive (it would import) and a third of one: fits, until the drop
        first = await session.open('/upload/whole.tar', 'wb')
        second = await session.open('/upload/half.tar', 'wb')
        written = [await write_until_refused(first, data),
                   await write_until_refused(second, data[:len(data) // 3])]
        assert len(spooled(gw)) == 2
        up.transport.conn.abort()  # no close, no EOF: the connection is gone
        return written

    assert asyncio.run(drop()) == [None, None]
    wait_for(lambda: spooled(gw) == [], 30, 'the dropped uploads to be removed')
    assert images_of(gw, alice) == []  # abandoned, not imported
    assert 'abandoned' in gw.log()
    # their charge is gone with them: one archive fits again
    res = xcr(gw, alice, 'put', str(archive), check=False)
    assert res.returncode == 0, res.stderr + gw.log()[-3000:]
    assert len(images_of(gw, alice)) == 1 and spooled(gw) == []
    assert 'Traceback' not in gw.log()


def test_a_session_ended_by_a_bad_packet_releases_its_uploads(cr_env: dict[str, Any],  # noqa: F811
                                                              ca: Any, alice: Path) -> None:  # noqa: F811
    """A client that breaks the SFTP framing with uploads open: its session (and, as asyncssh
    does on a failed clean-up, its connection) ends; nothing it held stays behind."""
    gw = make_gateway(cr_env, ca, 'ub')
    work = cr_env['base'] / 'work'
    work.mkdir()
    image, archive, _ = exported_image(gw, alice, work)
    xcr(gw, alice, 'rm', image)
    size = archive.stat().st_size
    with_quota(gw, size * 3 // 2)

    async def scenario() -> None:
        up = await Uploader.open(gw, alice)
        try:
            session = await up.session()
            files = [await session.open(f'/upload/b{n}.tar', 'wb') for n in range(2)]
            for f in files:  # junk: refused by the import the clean-up tries first
                assert await write_until_refused(f, os.urandom(size // 3)) is None
            assert len(spooled(gw)) == 2
            up.writers[0].write(b'\xff\xff\xff\xff')  # a packet longer than SFTP allows
            await up.writers[0].drain()
            await asyncio.to_thread(wait_for, lambda: spooled(gw) == [], 30,
                                    'the uploads of the broken session to be removed')
        finally:
            try:
                await up.close()
            except Exception:  # noqa: BLE001 (the gateway may have dropped it)
                pass

    asyncio.run(scenario())
    assert images_of(gw, alice) == [] and gw.alive()
    res = xcr(gw, alice, 'put', str(archive), check=False)  # nothing is charged any more
    assert res.returncode == 0, res.stderr + gw.log()[-3000:]
    # (asyncssh's clean-up met the refused import of the first upload: it dropped the
    # connection, logging that at debug level; the session released the second upload)
    assert spooled(gw) == []


def test_uploads_and_incoming_migrations_share_one_budget(cr_env: dict[str, Any],  # noqa: F811
                                                          ca: Any, alice: Path) -> None:  # noqa: F811
    """An upload is refused when it would stage, with what an incoming migration of the same
    account has staged, more than the quota; once the migration is gone it fits."""
    gw = make_gateway(cr_env, ca, 'um')
    work = cr_env['base'] / 'work'
    work.mkdir()
    image, archive, image_size = exported_image(gw, alice, work)
    xcr(gw, alice, 'rm', image)
    uid = os.stat(home_of(cr_env, 'alice')).st_uid
    size = archive.stat().st_size
    quota = size * 3 // 2  # one archive fits, an archive and a migration's part do not
    with_quota(gw, quota)
    data = archive.read_bytes()
    hello = {'job': 'j0123456789', 'node': 'elsewhere', 'log_job': 'j0123456789'}

    async def scenario() -> tuple[str | None, str | None]:
        stream = await Stream.open(gw, alice, {'op': 'migrate-in', 'mode': 'page-server'})
        up = await Uploader.open(gw, alice)
        try:
            stream.message('hello', mode='page-server', **hello)
            stream.archive(data[:-512], end=False)  # every member is in; the archive goes on
            await stream.writer.drain()
            await asyncio.to_thread(wait_for, lambda: staged_bytes(gw, uid) >= image_size, 30,
                                    'the migration to stage its signed part')
            session = await up.session()
            f = await session.open('/upload/meanwhile.tar', 'wb')
            refusal = await write_until_refused(f, data)
            try:
                await f.close()
                closed = None
            except asyncssh.SFTPFailure as exc:
                closed = exc.reason
            return refusal, closed
        finally:
            await up.close()
            await stream.close()

    refusal, closed = asyncio.run(scenario())
    got = parse_refusal(refusal or '')
    assert got['by'] == '1 incoming migration' and got['others'] >= image_size, got
    assert got['used'] == 0 and got['quota'] == quota and closed == refusal
    wait_for(lambda: leftovers(gw, uid) == [], 30, 'the migration to remove what it staged')
    assert spooled(gw) == []
    res = sftp(gw, alice, 'alice', f'put {archive} upload/after.tar\n', work)
    assert res.returncode == 0, res.stderr + gw.log()[-3000:]
    assert len(images_of(gw, alice)) == 1 and spooled(gw) == []
    assert 'Traceback' not in gw.log()
