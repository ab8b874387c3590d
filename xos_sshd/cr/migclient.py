"""``xos-cr migrate``: the client side of a migration between two gateways.

The user's xos-cr is logged in to both gateways with the user's XOS-cert (two SSH
connections).  It asks each for ``caps`` (the source for this job: its memory bounds lazy
pages), picks the best mode both support (``--mode auto``: lazy-pages, page-server,
dump-copy, in that order; or the one asked for), then opens ``migrate-in`` on the target and
``migrate-out`` on the source (one more ``xos-cr`` channel each) and copies the frames of
:mod:`xos_sshd.cr.pagestream` between them until both ends are done.  It reads the ``M``
frames on the way to tell the user what happened; it cannot forge anything that matters:
the image is signed by the source node and checked by the target, the pages are the user's
own memory, and the gateways only ever act for this user.

Output: the new job id on stdout (or ``--json``: the job, mode, frozen time, both nodes'
modes); one ``xos-cr:`` line on stderr saying which mode was used.  A failure names the step
and says whether the job still runs at the source (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from xos_sshd.cr.cli import (
    PROG,
    LocalTransport,
    Refused,
    Settings,
    StepFailed,
    Unreachable,
    Usage,
    _check,
    _safe,
    _split_host_port,
)
from xos_sshd.cr.migcaps import MODES

HEADER = struct.Struct('>cI')
MAX_FRAME = 4 << 20
#: The migration channels' window and packet size (asyncssh: 2 MiB, 32 KiB): 256 KiB
#: packets move ~2x the bytes per second through asyncssh (measured).
WINDOW = 16 << 20
PKTSIZE = 256 << 10


class MigrationFailed(StepFailed):
    """A step of ``migrate`` failed: the message names it and says where the job runs."""


def choose_mode(source: dict[str, Any], target: dict[str, Any], wanted: str) -> str:
    """The mode to use (:func:`xos_sshd.cr.migcaps.choose`); Refused ``mode-unavailable``."""
    from xos_sshd.cr.migcaps import choose
    mode, why = choose(source, target, wanted)
    if not mode:
        raise Refused('mode-unavailable', why)
    return mode


@dataclass
class Outcome:
    """What the frames said, in order."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def first(self, side: str, name: str) -> dict[str, Any] | None:
        return next((m for s, m in self.messages if s == side and m.get('msg') == name), None)

    def failure(self) -> dict[str, Any] | None:
        return next((m for _, m in self.messages if m.get('msg') == 'failed'), None)


async def _open_stream(t: Any, request: dict[str, Any]) -> tuple[Any, Any]:
    """One more ``xos-cr`` channel turned into a frame stream after its ok reply."""
    if isinstance(t, LocalTransport):
        return await _open_local_stream(t, request)
    import asyncssh
    try:
        writer, reader, _ = await t.conn.open_session(subsystem='xos-cr', encoding=None,
                                                      window=WINDOW, max_pktsize=PKTSIZE)
    except asyncssh.ChannelOpenError as exc:
        raise Unreachable(f'{t.where} refused the xos-cr subsystem: {exc.reason}') from None
    writer.write(json.dumps(request).encode() + b'\n')
    try:
        line = await reader.readline()
        reply = json.loads(line) if line else None
    except (asyncssh.Error, OSError, ValueError) as exc:
        raise Unreachable(f'{t.where} did not answer {request["op"]}: {exc}') from None
    if reply is None:
        raise Unreachable(f'{t.where} closed the channel instead of answering {request["op"]}')
    _check(reply)
    return reader, writer


async def _open_local_stream(t: LocalTransport, request: dict[str, Any]) -> tuple[Any, Any]:
    """The local socket: the stream is a socketpair whose other end goes to the gateway with
    the request (SCM_RIGHTS); the gateway runs the migration on it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _check(t._exchange({**request, 'op': f'cr.{request["op"]}'}, [theirs.fileno()]))
    finally:
        theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_FRAME * 2)
    return reader, writer


async def _pipe(reader: Any, writer: Any, side: str, outcome: Outcome) -> None:
    """Copy frames from one gateway to the other, noting the messages; EOF is passed on.
    When the other side is gone, this side is still read to its end: its last messages
    (``aborted``: where the job runs now) are what the user needs to hear."""
    forward = True
    try:
        while True:
            try:
                header = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    outcome.broken.append(f'{side} ended inside a frame')
                break
            kind, size = HEADER.unpack(header)
            if size > MAX_FRAME or len(kind) != 1 or kind not in b'PpAaMK':
                outcome.broken.append(f'{side} sent a bad frame')
                break
            payload = await reader.readexactly(size)
            if kind == b'M':
                try:
                    msg = json.loads(payload)
                except ValueError:
                    msg = None
                if isinstance(msg, dict):
                    outcome.messages.append((side, msg))
            if forward:
                try:
                    writer.write(header + payload)
                    await writer.drain()
                except Exception as exc:  # noqa: BLE001 (the other gateway went away)
                    forward = False
                    outcome.broken.append(f'the other side of {side}: {exc}')
    except Exception as exc:  # noqa: BLE001 (OSError, asyncssh errors: the connection is gone)
        outcome.broken.append(f'{side}: {type(exc).__name__}: {exc}')
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except Exception:  # noqa: BLE001 (already closed)
            pass


async def relay(src: tuple[Any, Any], dst: tuple[Any, Any]) -> Outcome:
    """Copy frames both ways until both gateways are done; what they said."""
    outcome = Outcome()
    await asyncio.gather(_pipe(src[0], dst[1], 'source', outcome),
                         _pipe(dst[0], src[1], 'target', outcome))
    for _reader, writer in (src, dst):
        try:
            writer.close()
        except (OSError, RuntimeError):
            pass
    return outcome


async def migrate(settings: Settings, host: str | None, job_id: str, target: str,
                  mode: str = 'auto', as_json: bool = False) -> int:
    """caps at both -> choose -> migrate-in at the target, migrate-out at the source ->
    relay.  Refused for a refusal before anything started, MigrationFailed after."""
    if not settings.identity:
        raise Usage('migrate: -i PREFIX (the XOS-cert) is needed to log in to the target')
    if mode != 'auto' and mode not in MODES:
        raise Usage(f'migrate: --mode must be auto or one of {", ".join(MODES)}')
    to_host, to_port = _split_host_port(target, settings.port)
    src = await settings.transport(host)
    dst = None
    step = 'find the job'
    try:
        source_caps = (await src.call('caps', job=job_id))['caps']
        step = f'connect to {to_host}:{to_port}'
        dst = await settings.transport(to_host, to_port)
        step = 'ask the target for its migration modes'
        target_caps = (await dst.call('caps'))['caps']
        chosen = choose_mode(source_caps, target_caps, mode)
        step = 'prepare the target'
        dst_stream = await _open_stream(dst, {'op': 'migrate-in', 'mode': chosen})
        step = 'start at the source'
        src_stream = await _open_stream(src, {'op': 'migrate-out', 'job': job_id,
                                              'mode': chosen})
    except (Refused, Unreachable, Usage) as exc:
        await src.close()
        if dst is not None:
            await dst.close()
        if isinstance(exc, Refused) and step in ('find the job', 'prepare the target') or \
                isinstance(exc, Refused) and exc.reason == 'mode-unavailable':
            if step == 'prepare the target':
                raise Refused(exc.reason, f'{exc} (the target refused; job {job_id} was not '
                              f'touched and runs on {src.where})') from None
            raise
        reason = f' [{exc.reason}]' if isinstance(exc, Refused) else ''
        raise MigrationFailed(f'migrate stopped at "{step}": {exc}{reason}; job {job_id} '
                              f'still runs on {src.where}') from None
    try:
        outcome = await relay(src_stream, dst_stream)
    finally:
        await src.close()
        await dst.close()
    return _report(outcome, job_id, chosen, src.where, dst.where, source_caps, target_caps,
                   as_json)


def _report(outcome: Outcome, job_id: str, mode: str, src: str, dst: str,
            source_caps: dict[str, Any], target_caps: dict[str, Any], as_json: bool) -> int:
    finished = outcome.first('source', 'finished')
    restored = outcome.first('target', 'restored')
    complete = outcome.first('target', 'complete')
    if finished is not None:
        new = _safe(finished.get('new_job') or (restored or {}).get('job') or '', 100)
        frozen = finished.get('frozen_seconds')
        if as_json:
            print(json.dumps({'job': new, 'source_job': job_id, 'mode': mode, 'source': src,
                              'target': dst, 'frozen_seconds': frozen,
                              'source_modes': source_caps.get('send'),
                              'target_modes': target_caps.get('receive')}, indent=2))
        else:
            print(new)
        sys.stderr.write(f'{PROG}: migrated {job_id} to {dst} as {new} using {mode} '
                         f'(job frozen {_safe(frozen, 20)} s)\n')
        return 0
    failed = outcome.failure()
    aborted = outcome.first('source', 'aborted')
    if failed is not None:
        where = f'stopped at "{failed.get("step")}" ({failed.get("side")}): ' \
                f'{failed.get("error")} [{failed.get("reason")}]'
    elif complete is not None and restored is not None:
        raise MigrationFailed(f'job {job_id} now runs as {restored.get("job")} on {dst} '
                              f'({mode}), but {src} did not confirm that it ended the original '
                              f'({"; ".join(outcome.broken) or "no answer"})')
    else:
        where = f'broke off: {"; ".join(outcome.broken) or "a gateway closed the stream"}'
    if aborted is not None and aborted.get('running'):
        state = f'job {job_id} still runs on {src}'
    elif aborted is not None:
        state = f'job {job_id} is not running on {src} any more'
    else:
        state = f'the state of job {job_id} on {src} is unknown (see xos-cr list there)'
    raise MigrationFailed(f'migrate ({mode}) {where}; {state}')
