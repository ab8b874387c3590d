"""xos-cr: run, checkpoint, restart and migrate jobs on xos-sshd gateways.

Usage::

    xos-cr [-i PREFIX [-p PORT] [-l LOGIN] [-o OPTION=VALUE]... HOST] COMMAND [ARGS]

    run [--env NAME=VALUE]... -- CMD...    start a job; prints its id
    list [--json]                          your jobs on the node
    logs JOB [--max-bytes N]               the job's stdout (on stdout) and stderr (on stderr)
    kill JOB [-s SIGNAL]                   signal the job (TERM; KILL, INT, HUP, QUIT, USR1, USR2)
    checkpoint JOB [--stop]                dump the job; prints the image id (job goes on
                                           unless --stop)
    restart IMAGE                          restore an image as a new job; prints its id
    images [--json]                        your images on the node
    rm IMAGE                               delete an image
    get IMAGE FILE                         download an image as one signed archive
    put FILE                               upload a signed archive; prints the new image id
    caps [--json]                          the migration modes the node supports
    migrate JOB --to HOST[:PORT] [--mode M] [--json]
                                           move a running job to another gateway (mode:
                                           auto, lazy-pages, page-server or dump-copy)

With a HOST, xos-cr logs in with the XOS-cert ``-i PREFIX`` (as ssh-xos does) and uses the
SSH subsystems ``xos-cr`` (JSON lines) and ``xos-images`` (SFTP: get, put).  Without one, it
talks to the local gateway's user socket (``$XOS_CR_SOCKET``, else
``/run/xos-sshd/cr.sock``) as the user it runs as; ``get``/``put`` then pass the open file
to the gateway (SCM_RIGHTS): the file is opened by xos-cr, as you.

Exit status: 0 on success; 1 when the gateway refuses (one ``xos-cr: ...`` line says why);
2 for a usage error; 255 when the gateway cannot be reached or the login fails.

The local mode needs only the standard library, so that any python3 on a node can run it
(``python3 -m xos_sshd.cr.cli``); the remote mode imports asyncssh.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import secrets
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from xos_sshd.control import protocol

PROG = 'xos-cr'
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 255
DEFAULT_SOCKET = '/run/xos-sshd/cr.sock'
SOCKET_ENV = 'XOS_CR_SOCKET'
COMMANDS = ('run', 'list', 'logs', 'kill', 'checkpoint', 'restart', 'images', 'rm', 'get',
            'put', 'migrate', 'caps')
#: The remote subsystem's reply lines may be large (logs: 2 MiB of text, JSON-escaped).
MAX_REPLY_LINE = 64 << 20
_PEERCRED = struct.Struct('3i')


class Refused(Exception):
    """The gateway said no (``ok: false``): exit 1 with its reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unreachable(Exception):
    """No gateway to talk to (socket, network, login): exit 255."""


class Usage(Exception):
    """A command-line mistake: exit 2."""


class StepFailed(Exception):
    """A step of a multi-step command (``migrate``) failed after it started: exit 1 with a
    message naming the step and the state it left (see :mod:`xos_sshd.cr.migclient`)."""


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, _src: Any, _dst: Any, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        pct = f'{100 * done // total:3d}%' if total else '   ?'
        sys.stderr.write(f'\r{self.label}: {pct} {_size(done)} / {_size(total)}   ')
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write('\n')
            sys.stderr.flush()


def _size(n: int) -> str:
    value = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if value < 1024 or unit == 'GiB':
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    return f'{n} B'


# --------------------------------------------------------------------------- transports


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise Unreachable('the gateway sent something that is not a reply')
    if not reply.get('ok'):
        raise Refused(str(reply.get('reason', 'error')), str(reply.get('error', 'refused')))
    return reply


class LocalTransport:
    """The gateway's user socket on this node (framed JSON, SO_PEERCRED, SCM_RIGHTS)."""

    def __init__(self, path: str, timeout: float = 900.0) -> None:
        self.where = 'this node'
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            _pid, uid, _gid = _PEERCRED.unpack(self.sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f'cannot reach the gateway at {path}: {exc.strerror or exc} '
                              f'(is xos-sshd running here? {SOCKET_ENV} names its socket)') from None
        if uid != 0:
            self.sock.close()
            raise Unreachable(f'{path} is served by uid {uid}, not by root: not trusted')

    def _exchange(self, request: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        frame = protocol.encode(request)
        try:
            if fds:
                sent = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array('i', fds).tobytes())])
                if sent < len(frame):
                    self.sock.sendall(frame[sent:])
            else:
                self.sock.sendall(frame)
            return protocol.recv_frame(self.sock)
        except (OSError, ConnectionError, protocol.ControlError) as exc:
            raise Unreachable(f'the gateway at {self.path} went away: {exc}') from None

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return _check(self._exchange({'op': f'cr.{op}', **fields}))

    async def get(self, image: str, dest: str) -> int:
        fd, created = _open_for_download(dest)
        try:
            reply = _check(self._exchange({'op': 'cr.get', 'image': image}, [fd]))
        except BaseException:
            os.close(fd)
            if created:
                _unlink_quietly(dest)
            raise
        os.close(fd)
        return int(reply.get('bytes', 0))

    async def put(self, src: str) -> dict[str, Any]:
        try:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Usage(f'cannot read {src}: {exc.strerror}') from None
        try:
            return _check(self._exchange({'op': 'cr.put'}, [fd]))['image']
        finally:
            os.close(fd)

    async def close(self) -> None:
        self.sock.close()


def _open_for_download(dest: str) -> tuple[int, bool]:
    """Open *dest* for writing as the invoking user (never by the gateway)."""
    created = not os.path.exists(dest)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Usage(f'cannot write {dest}: {exc.strerror}') from None
    return fd, created


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _bulk_ciphers() -> list[str]:
    """asyncssh's ciphers with AES-GCM first: images and migration streams are bulk data,
    and AES-GCM moves ~1.4x the bytes of asyncssh's first choice, chacha20-poly1305 (measured
    with 256 KiB packets)."""
    from asyncssh.encryption import get_default_encryption_algs
    algs = [a.decode() for a in get_default_encryption_algs()]
    return sorted(algs, key=lambda a: not a.startswith(('aes128-gcm', 'aes256-gcm')))


class RemoteTransport:
    """One SSH connection to a gateway: ``xos-cr`` lines for ops, ``xos-images`` for files."""

    def __init__(self, conn: Any, where: str) -> None:
        self.conn = conn
        self.where = where
        self._lines: tuple[Any, Any] | None = None
        self._sftp: Any = None

    @classmethod
    async def open(cls, settings: 'Settings', host: str, port: int) -> 'RemoteTransport':
        from xos_sshd.client import (
            ClientError,
            HostKeyPolicy,
            connect,
            default_login,
            load_identity,
        )
        assert settings.identity is not None
        try:
            identity = load_identity(settings.identity, prompt=not settings.batch)
            login = settings.login or default_login(identity)
            policy = HostKeyPolicy(settings.host_key_mode, settings.known_hosts)
            conn = await connect(identity, host, port, login, policy,
                                 connect_timeout=settings.connect_timeout,
                                 encryption_algs=_bulk_ciphers())
        except ClientError as exc:
            raise Unreachable(str(exc)) from None
        return cls(conn, f'{host}:{port}')

    async def _channel(self) -> tuple[Any, Any]:
        import asyncssh
        if self._lines is None:
            try:
                writer, reader, _ = await self.conn.open_session(subsystem='xos-cr', encoding=None)
            except asyncssh.ChannelOpenError as exc:
                raise Unreachable(f'{self.where} refused the xos-cr subsystem: {exc.reason}') from None
            self._lines = (writer, reader)
        return self._lines

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        import asyncssh
        writer, reader = await self._channel()
        try:
            writer.write(json.dumps({'op': op, **fields}).encode() + b'\n')
            line = await reader.readline()
        except (asyncssh.Error, OSError, asyncio.IncompleteReadError) as exc:
            raise Unreachable(f'connection to {self.where} lost: {exc}') from None
        if not line:
            raise Unreachable(f'{self.where} closed the xos-cr subsystem')
        try:
            reply = json.loads(line)
        except ValueError:
            raise Unreachable(f'{self.where} sent a reply that is not JSON') from None
        return _check(reply)

    async def _files(self) -> Any:
        import asyncssh
        from asyncssh.sftp import start_sftp_client
        if self._sftp is None:
            try:
                writer, reader, _ = await self.conn.open_session(subsystem='xos-images',
                                                                 encoding=None)
            except asyncssh.ChannelOpenError as exc:
                raise Unreachable(f'{self.where} refused the xos-images subsystem: '
                                  f'{exc.reason}') from None
            self._sftp = await start_sftp_client(self.conn, asyncio.get_running_loop(), 'strict',
                                                 reader, writer, 'utf-8', 'strict', 3)
        return self._sftp

    @staticmethod
    def _sftp_refusal(exc: Exception) -> Refused:
        import asyncssh
        text = str(getattr(exc, 'reason', '') or exc)
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            return Refused('no-such-image', text or 'no such image')
        reason, sep, rest = text.partition(': ')
        if sep and reason and ' ' not in reason:
            return Refused(reason, rest)
        return Refused('transfer-failed', text)

    async def get(self, image: str, dest: str) -> int:
        import asyncssh
        sftp = await self._files()
        progress = Progress(f'get {image}')
        created = not os.path.exists(dest)
        try:
            await sftp.get(f'/{image}.tar', dest, progress_handler=progress)
        except asyncssh.SFTPError as exc:
            if created:
                _unlink_quietly(dest)
            raise self._sftp_refusal(exc) from None
        except OSError as exc:
            raise Usage(f'cannot write {dest}: {exc.strerror or exc}') from None
        finally:
            progress.done()
        return os.path.getsize(dest)

    async def put(self, src: str) -> dict[str, Any]:
        import asyncssh
        if not os.path.isfile(src):
            raise Usage(f'cannot read {src}: not a file')
        sftp = await self._files()
        name = f'put-{secrets.token_hex(8)}.tar'
        progress = Progress(f'put {os.path.basename(src)}')
        try:
            await sftp.put(src, f'/upload/{name}', progress_handler=progress)
        except asyncssh.SFTPError as exc:
            raise self._sftp_refusal(exc) from None
        except OSError as exc:
            raise Usage(f'cannot read {src}: {exc.strerror or exc}') from None
        finally:
            progress.done()
        return (await self.call('imported', upload=name))['image']

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
        if self._lines is not None:
            self._lines[0].write_eof()
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass


# --------------------------------------------------------------------------- options


class Settings:
    """Connection settings from the command line (``-i -p -l -o``)."""

    def __init__(self, identity: str | None, port: int | None, login: str | None,
                 options: Sequence[str], socket_path: str | None) -> None:
        self.identity = identity
        self.login = login
        self.socket_path = socket_path
        values: dict[str, str] = {}
        for item in options:
            key, sep, value = item.partition('=')
            if not sep:
                key, _, value = item.strip().partition(' ')
            values.setdefault(key.strip().lower(), value.strip())
        known = {'stricthostkeychecking', 'userknownhostsfile', 'port', 'user', 'connecttimeout',
                 'batchmode', 'loglevel', 'identitiesonly'}
        for key in values.keys() - known:
            raise Usage(f'unsupported option -o {key}')
        modes = {'yes': 'yes', 'ask': 'yes', 'accept-new': 'accept-new', 'no': 'no', 'off': 'no'}
        mode = modes.get(values.get('stricthostkeychecking', 'accept-new').lower())
        if mode is None:
            raise Usage(f'bad StrictHostKeyChecking value {values["stricthostkeychecking"]!r}')
        self.host_key_mode = mode
        self.known_hosts = [Path(f).expanduser() for f in
                            values.get('userknownhostsfile', '~/.ssh/known_hosts').split()]
        self.login = self.login or values.get('user')
        self.batch = values.get('batchmode', 'no').lower() == 'yes'
        try:
            self.port = port or int(values.get('port', 22))
            self.connect_timeout = (float(values['connecttimeout'])
                                    if 'connecttimeout' in values else None)
        except ValueError:
            raise Usage('bad Port or ConnectTimeout value') from None

    async def transport(self, host: str | None, port: int | None = None) -> Any:
        if host is None:
            path = self.socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
            return LocalTransport(path)
        if not self.identity:
            raise Usage(f'-i PREFIX (the XOS-cert) is needed to reach {host}')
        return await RemoteTransport.open(self, host, port or self.port)


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith('['):
        host, _, rest = text[1:].partition(']')
        port = rest.removeprefix(':')
    elif text.count(':') == 1:
        host, _, port = text.partition(':')
    else:
        host, port = text, ''
    if not host:
        raise Usage(f'bad destination {text!r}')
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise Usage(f'bad port in {text!r}') from None
    if not 0 < number < 65536:
        raise Usage(f'bad port in {text!r}')
    return host, number


# --------------------------------------------------------------------------- output
#
# Whatever the gateway sends is shown through _safe (protocol.one_line: control and format
# characters -- terminal escapes, NUL, bidi overrides -- become spaces): a hostile gateway, or
# a job command made to look like something else, cannot drive the user's terminal.  Only the
# bytes of ``logs`` (the job's own output, the user's) and ``--json`` (escaped by JSON) are
# written as they come.


def _safe(value: Any, limit: int = 500) -> str:
    """*value* (text from the gateway) fit for one line of the user's terminal."""
    return protocol.one_line(value, limit)


def _when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return '-'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))


def _command(argv: Any, width: int = 60) -> str:
    text = _safe(' '.join(str(a) for a in argv or ()), width + 1) or '-'
    return text if len(text) <= width else text[:width - 3] + '...'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_safe(c, 200) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return '\n'.join(lines)


def print_jobs(jobs: list[dict[str, Any]]) -> None:
    rows = [(j['id'], j['state'], str(j.get('exit_code') if j.get('exit_code') is not None else '-'),
             str(j.get('node') or '-'), _when(j.get('created')), j.get('restored_from') or '-',
             _command(j.get('command')))
            for j in jobs]
    print(_table(('JOB', 'STATE', 'EXIT', 'NODE', 'CREATED', 'FROM IMAGE', 'COMMAND'), rows))


def print_images(images: list[dict[str, Any]]) -> None:
    rows = [(i['id'], _when(i.get('created')), _size(int(i.get('size_bytes') or 0)),
             str(i.get('node') or '-'), str(i.get('job_id') or '-'), _command(i.get('command'), 40))
            for i in images]
    print(_table(('IMAGE', 'CREATED', 'SIZE', 'NODE', 'JOB', 'COMMAND'), rows))


# --------------------------------------------------------------------------- commands


def _sub(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f'{PROG} {command}', allow_abbrev=False)
    p.exit = _parser_exit  # type: ignore[method-assign]
    if command == 'run':
        p.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                       help='set a variable in the job environment')
        p.add_argument('argv', nargs=argparse.REMAINDER, metavar='-- CMD...')
    elif command in ('list', 'images', 'caps'):
        p.add_argument('--json', action='store_true', help='JSON instead of a table')
    elif command == 'logs':
        p.add_argument('job')
        p.add_argument('--max-bytes', type=int, default=None,
                       help='at most this much of the end of each log (default 1 MiB)')
    elif command == 'kill':
        p.add_argument('job')
        p.add_argument('-s', '--signal', default='TERM',
                       help='TERM (default), KILL, INT, HUP, QUIT, USR1 or USR2')
    elif command == 'checkpoint':
        p.add_argument('job')
        p.add_argument('--stop', action='store_true', help='end the job after the dump')
        p.add_argument('--json', action='store_true', help='print the image as JSON')
    elif command == 'restart':
        p.add_argument('image')
        p.add_argument('--logs-of', metavar='JOB',
                       help='the job whose log files the image writes to (for an image '
                            'taken on another node of a job that was itself restarted)')
    elif command == 'rm':
        p.add_argument('image')
    elif command == 'get':
        p.add_argument('image')
        p.add_argument('file')
    elif command == 'put':
        p.add_argument('file')
    elif command == 'migrate':
        p.add_argument('job')
        p.add_argument('--to', required=True, metavar='HOST[:PORT]')
        p.add_argument('--mode', default='auto',
                       choices=('auto', 'lazy-pages', 'page-server', 'dump-copy'),
                       help='how: auto (default) takes the best mode both gateways support')
        p.add_argument('--json', action='store_true', help='print the outcome as JSON')
    return p


def _parser_exit(status: int = 0, message: str | None = None) -> NoReturn:
    if message:
        sys.stderr.write(message)
    sys.exit(EXIT_USAGE if status else 0)


async def execute(settings: Settings, host: str | None, command: str, args: argparse.Namespace) -> int:
    if command == 'migrate':
        from xos_sshd.cr.migclient import migrate
        return await migrate(settings, host, args.job, args.to, args.mode, args.json)
    t = await settings.transport(host)
    try:
        return await _execute(t, command, args)
    finally:
        await t.close()


async def _execute(t: Any, command: str, args: argparse.Namespace) -> int:
    if command == 'run':
        argv = list(args.argv)
        env = {}
        for item in args.env:
            name, sep, value = item.partition('=')
            if not sep:
                raise Usage(f'run: --env wants NAME=VALUE, not {item!r}')
            env[name] = value
        reply = await t.call('run', argv=argv, **({'env': env} if env else {}))
        print(_safe(reply['job']['id']))
    elif command == 'list':
        jobs = (await t.call('list'))['jobs']
        print(json.dumps(jobs, indent=2)) if args.json else print_jobs(jobs)
    elif command == 'images':
        images = (await t.call('images'))['images']
        print(json.dumps(images, indent=2)) if args.json else print_images(images)
    elif command == 'logs':
        fields = {'max_bytes': args.max_bytes} if args.max_bytes else {}
        reply = await t.call('logs', job=args.job, **fields)
        sys.stdout.write(reply['stdout'])
        sys.stdout.flush()
        sys.stderr.write(reply['stderr'])
        for name, cut in (reply.get('truncated') or {}).items():
            if cut:
                sys.stderr.write(f'{PROG}: only the last part of the {_safe(name, 20)} of '
                                 f'{args.job} was shown ({_safe(reply.get(name + "_size"), 20)} '
                                 f'bytes in all)\n')
    elif command == 'kill':
        reply = await t.call('kill', job=args.job, signal=args.signal)
        state = _safe(reply['job']['state'], 40)
        print(f'{args.job} {state if reply.get("ended") else "signalled (still running)"}')
    elif command == 'checkpoint':
        reply = await t.call('checkpoint', job=args.job, stop=args.stop)
        print(json.dumps(reply['image'], indent=2) if args.json else _safe(reply['image']['id']))
    elif command == 'restart':
        fields = {'logs_of': args.logs_of} if args.logs_of else {}
        print(_safe((await t.call('restart', image=args.image, **fields))['job']['id']))
    elif command == 'rm':
        await t.call('rm', image=args.image)
    elif command == 'caps':
        caps = (await t.call('caps'))['caps']
        if args.json:
            print(json.dumps(caps, indent=2))
        else:
            print(f'node {_safe(caps.get("node"), 200)} (CRIU {_safe(caps.get("criu") or "-", 80)}'
                  f'): migration mode {_safe(caps.get("best"), 40)}')
            print(f'  as a source: {_safe(" ".join(map(str, caps.get("send") or ()))) or "-"}')
            print(f'  as a target: {_safe(" ".join(map(str, caps.get("receive") or ()))) or "-"}')
            for mode, why in sorted((caps.get('why') or {}).items()):
                print(f'  {_safe(mode, 40)}: {_safe(why, 2000)}')
    elif command == 'get':
        await t.get(args.image, args.file)
    elif command == 'put':
        print(_safe((await t.put(args.file))['id']))
    return 0


# --------------------------------------------------------------------------- main


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f'{PROG} [-i PREFIX [-p PORT] [-l LOGIN] [-o OPTION=VALUE]... HOST] COMMAND [ARGS]',
        description='Run, checkpoint, restart and migrate jobs on xos-sshd gateways.',
        epilog=__doc__.split('COMMAND [ARGS]\n', 1)[1].split('With a HOST', 1)[0].strip('\n') + '\n\n'
        'Without HOST: the local gateway (socket $XOS_CR_SOCKET or /run/xos-sshd/cr.sock).\n'
        'Exit status: 0 ok, 1 refused, 2 usage, 255 unreachable or login failed.')
    p.exit = _parser_exit  # type: ignore[method-assign]
    p.add_argument('-i', dest='identity', metavar='PREFIX',
                   help='XOS-cert prefix (PREFIX.pem, PREFIX.key), as for ssh-xos')
    p.add_argument('-p', dest='port', type=int, metavar='PORT', help='SSH port (default 22)')
    p.add_argument('-l', dest='login', metavar='LOGIN', help='login name (default: the '
                   "certificate's GlobalUserID)")
    p.add_argument('-o', dest='options', action='append', default=[], metavar='OPTION=VALUE',
                   help='StrictHostKeyChecking, UserKnownHostsFile, ConnectTimeout, Port, '
                        'User, BatchMode (as ssh-xos)')
    p.add_argument('--socket', metavar='PATH', help='the local gateway socket')
    p.add_argument('words', nargs=argparse.REMAINDER, metavar='[HOST] COMMAND ARGS')
    return p


def parse(argv: Sequence[str]) -> tuple[Settings, str | None, str, argparse.Namespace]:
    top = _top_parser()
    a = top.parse_args(argv)
    words = list(a.words)
    if not words:
        top.print_usage(sys.stderr)
        raise Usage(f'a command is needed: {", ".join(COMMANDS)}')
    host = None
    if words[0] not in COMMANDS:
        if words[0].startswith('-'):
            raise Usage(f'unknown option {words[0]}')
        host, words = words[0], words[1:]
        if not words:
            raise Usage(f'a command is needed after {host}: {", ".join(COMMANDS)}')
        if '@' in host:
            login, _, host = host.rpartition('@')
            a.login = a.login or login
        if words[0] not in COMMANDS:
            raise Usage(f'unknown command {words[0]!r} (commands: {", ".join(COMMANDS)})')
    command = words[0]
    args = _sub(command).parse_args(words[1:])
    if command == 'run':
        if args.argv and args.argv[0] == '--':
            args.argv = args.argv[1:]
        if not args.argv:
            raise Usage('run: give the command after --, e.g. xos-cr run -- ./simulate --steps 100')
    settings = Settings(a.identity, a.port, a.login, a.options, a.socket)
    if host is not None:
        host = host.removeprefix('[').removesuffix(']')
    return settings, host, command, args


def _fail(message: str, status: int) -> NoReturn:
    """One line on stderr (the gateway's words through :func:`_safe`), exit *status*."""
    sys.stderr.write(f'{PROG}: {_safe(message, 8000)}\n')
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        settings, host, command, args = parse(sys.argv[1:] if argv is None else argv)
    except Usage as exc:
        _fail(str(exc), EXIT_USAGE)
    if host is not None:
        import logging
        logging.getLogger('asyncssh').setLevel(logging.CRITICAL)
    try:
        status = asyncio.run(execute(settings, host, command, args))
    except Refused as exc:
        _fail(f'{exc} [{exc.reason}]', EXIT_REFUSED)
    except StepFailed as exc:
        _fail(str(exc), EXIT_REFUSED)
    except Unreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except Usage as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:  # never a traceback for the user
        if os.environ.get('XOS_CR_DEBUG'):
            raise
        _fail(f'unexpected error: {type(exc).__name__}: {exc}', EXIT_UNREACHABLE)
    sys.exit(status)


if __name__ == '__main__':
    # ``python3 -m xos_sshd.cr.cli``: run the package's copy of this module, whose exception
    # classes are the ones the modules it imports on demand (migclient) raise.
    from xos_sshd.cr.cli import main as package_main
    package_main()
