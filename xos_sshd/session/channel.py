"""One SSH session channel running a shell or a command as the mapped account.

The channel's bytes go to the child's pty master (interactive) or to its three pipes (exec),
the child's exit status or signal goes back with ``exit-status``/``exit-signal``, window-size
changes reach the pty, and client signals reach the child.  The root process only ever
touches descriptors here; the child was started by :func:`spawn_as`.

Each session leaves an ``open`` and a ``close`` audit event (``SessionContext.on_event``;
docs/internals.md, "Audit events"): kind ``shell``, ``exec`` or ``subsystem`` (with its
name), pid, tty, exit status or signal, duration.  A session refused before its process ran
leaves one ``open`` event with outcome ``refused`` instead (with ``[session] pam``: written
once the PAM helper said whether PAM opened the session).  Like sshd, never the command
text: a command line may carry secrets, and the account, time and pid are what an admin
traces.

When the channel closes, the session is hung up as sshd does it: its pty master is closed
at once (the process sees hangup, SIGHUP and EIO on its tty), its pipes are closed, and its
process group gets SIGHUP.  The ``close`` event then waits up to :data:`CLOSE_AUDIT_WAIT`
for the exit status; a process still running then (it ignores SIGHUP: ``nohup``, ``trap ''
HUP``) goes on as an orphan, as under sshd: the gateway closes its pidfd (and the PAM
helper's status pipe), audits ``close`` with ``running: true``, and leaves the reaping to
:data:`.orphans.ORPHANS`, which holds no descriptor.  From the channel's close on, the
session does not count against ``[limits]`` either.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import signal
import struct
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import asyncssh

from ..ams import LocalAccount
from ..auth.identity import VOIdentity
from ..config import SessionConfig
from . import libc
from .environment import session_environment
from .fdio import FdReader, FdWriter
from .orphans import ORPHANS
from .pamsession import KILL_CHILD, PamSessionProcess
from .spawn import SpawnError, Stdio, spawn_as

log = logging.getLogger(__name__)

#: After the channel closes, the ``close`` event waits this long for the hung-up process's
#: exit status (it is logged without one, ``running: true``, if it is not gone by then, and
#: the gateway stops watching the process).
CLOSE_AUDIT_WAIT = 5.0


@dataclass(frozen=True)
class SessionContext:
    """Who the session is for and where it comes from, fixed at authentication."""

    identity: VOIdentity
    account: LocalAccount
    peer_host: str
    on_close: Callable[['UserSession'], None] | None = None
    #: Subsystems served inside the gateway (``xos-cr``, ``xos-images``): name -> factory
    #: of the asyncssh session that takes the channel over (:mod:`xos_sshd.cr.subsystem`).
    subsystems: Mapping[str, Callable[['SessionContext'], Any]] | None = None
    #: Added to every session's environment (``XOS_CR_SOCKET``: where this node's xos-cr
    #: local socket is).
    env_extra: Mapping[str, str] | None = None
    #: Told of the session's ``open`` and ``close`` (``on_event('session', **fields)``, the
    #: signature of :meth:`xos_sshd.audit.AuditLog.write`).
    on_event: Callable[..., None] | None = None
    #: The client's ``host:port`` for the audit log (``peer_host`` when unset).
    source: str | None = None
    #: ``[session]``: PAM and resource limits of the session's process (defaults when unset).
    session: SessionConfig | None = None


#: The signal names an SSH client may send (RFC 4254 section 6.10), as sshd accepts them.
SSH_SIGNALS = frozenset({'ABRT', 'ALRM', 'FPE', 'HUP', 'ILL', 'INT', 'KILL', 'PIPE', 'QUIT',
                         'SEGV', 'TERM', 'USR1', 'USR2'})

class UserSession(asyncssh.SSHServerSession[bytes]):
    """An asyncssh session whose other end is a process running as the mapped account."""

    def __init__(self, ctx: SessionContext):
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._command: str | None = None
        self._term: tuple[str, tuple[int, int, int, int]] | None = None
        self._proc = None
        self._pidfd = -1
        self._pty_master = -1
        self._tty_line = ''
        self._readers: list[FdReader] = []
        self._writer: FdWriter | None = None
        self._exit_sent = False
        #: An in-gateway subsystem's session: every channel event goes to it.
        self._delegate: Any = None
        #: For the audit log: what was asked (never the command text) and since when.
        self._kind = 'shell'
        self._subsystem: str | None = None
        self._session_id = secrets.token_hex(4)
        self._opened_at: float | None = None
        self._close_audited = False
        self._close_timer: asyncio.TimerHandle | None = None

    # --- requests before the session starts ---------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self._term = (term_type or 'dumb', term_size)
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        self._kind = 'exec'
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        factory = (self._ctx.subsystems or {}).get(subsystem)
        self._kind, self._subsystem = 'subsystem', subsystem[:64]
        if factory is None or self._chan is None:
            log.info('refused unknown subsystem %r for %s', subsystem, self._ctx.account.name)
            self._audit('open', 'refused', reason='unknown-subsystem',
                        message=f'no subsystem {subsystem[:64]!r} on this gateway')
            return False
        self._delegate = factory(self._ctx)
        self._delegate.connection_made(self._chan)
        self._opened()
        log.info('subsystem %s started for %s (%s)', subsystem, self._ctx.account.name,
                 self._ctx.peer_host)
        return True

    def session_started(self) -> None:
        if self._delegate is not None:
            self._delegate.session_started()
            return
        try:
            self._start_child()
        except (SpawnError, OSError) as exc:
            log.error('session for %s failed to start: %s', self._ctx.account.name, exc)
            self._audit('open', 'refused', reason='spawn-failed', message=str(exc))
            assert self._chan is not None
            self._chan.write_stderr(f'xos-sshd: {exc}\r\n'.encode())
            self._send_exit(255)

    # --- data and control while it runs ---------------------------------------------------

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data, datatype)
            return
        if self._writer is not None:
            self._writer.write(data)

    def eof_received(self) -> bool:
        if self._delegate is not None:
            return bool(self._delegate.eof_received())
        if self._writer is not None and self._pty_master < 0:
            self._writer.close_when_drained()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._delegate is not None:
            return
        if self._pty_master >= 0:
            _set_window_size(self._pty_master, (width, height, pixwidth, pixheight))

    def break_received(self, msec: int) -> bool:
        return False

    def signal_received(self, signame: str) -> None:
        if self._delegate is not None:
            return
        if signame not in SSH_SIGNALS:  # as sshd: RFC 4254's names only (no STOP, no CONT)
            log.info('ignored signal %r from client (not an SSH signal name)', signame[:32])
            return
        signum = signal.Signals['SIG' + signame]
        if isinstance(self._proc, PamSessionProcess) and signum == signal.SIGKILL:
            signum = KILL_CHILD  # the PAM helper kills the process, then closes the session
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, signum)

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
        for reader in self._readers:
            reader.pause()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
        for reader in self._readers:
            reader.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        """The channel is gone: hang up the child's session, like a closed terminal (module
        docstring); nothing of the session's is read or written any more."""
        self._chan = None
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
        running = self._proc is not None and self._proc.returncode is None
        if running:
            try:
                os.killpg(self._proc.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        self._close_io()  # pty master, or the pipes
        if running:
            # the close event waits a little for its exit status (_child_exited), then the
            # gateway lets the process go (_let_go)
            self._close_timer = self._loop.call_later(CLOSE_AUDIT_WAIT, self._let_go)
        else:
            self._audit_close()
        if self._ctx.on_close is not None:
            self._ctx.on_close(self)

    # --- starting the child ---------------------------------------------------------------

    def _start_child(self) -> None:
        assert self._chan is not None
        account = self._ctx.account
        shell = account.shell or '/bin/sh'
        base = os.path.basename(shell)
        argv = ['-' + base] if self._command is None else [base, '-c', self._command]
        env = session_environment(self._ctx.identity, account, self._chan.get_environment(),
                                  self._term[0] if self._term else None)
        env.update(self._ctx.env_extra or {})
        agent_path = self._chan.get_agent_path()  # set only when the config allows forwarding
        if agent_path:
            _hand_over_agent_socket(agent_path, account)
            env['SSH_AUTH_SOCK'] = agent_path
        if self._term is not None:
            self._start_with_pty(shell, argv, env)
        else:
            self._start_with_pipes(shell, argv, env)
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except OSError:
            # cannot watch it: do not leave it running; never wait for it here (it may be
            # the account's by now, in a hung chdir): it is reaped when it is gone
            self._proc.kill()
            ORPHANS.adopt(self._loop, self._proc, self._ctx.account.name)
            raise
        self._loop.add_reader(self._pidfd, self._child_exited)
        log.info('session started for %s (%s) pid %d: %s', account.name, self._ctx.peer_host,
                 self._proc.pid, 'shell' if self._command is None else 'exec')
        if isinstance(self._proc, PamSessionProcess):  # opened once PAM said so
            self._proc.watch(self._loop, self._pam_verdict)
        else:
            self._opened(pid=self._proc.pid, tty=self._tty_line or None)

    def _pam_verdict(self, outcome: str, reason: str, text: str) -> None:
        """The PAM helper said how the session went: one ``open`` line, ok or refused (a
        refused session has no ``close`` line; its exit status 255 goes to the client)."""
        assert self._proc is not None
        fields = {'pid': self._proc.pid, 'tty': self._tty_line or None}
        if outcome == 'ok':
            self._opened(**fields)
        else:
            self._audit('open', 'refused', reason=reason, message=text, **fields)

    def _start_with_pty(self, shell: str, argv: list[str], env: dict[str, str]) -> None:
        assert self._term is not None
        master, slave = os.openpty()
        try:
            _set_window_size(master, self._term[1])
            self._tty_line = os.ttyname(slave).removeprefix('/dev/')
            self._proc = spawn_as(self._ctx.account, argv, env, Stdio(slave, slave, slave),
                                  executable=shell, take_tty=True, session=self._ctx.session,
                                  rhost=self._ctx.peer_host)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._pty_master = master
        self._writer = FdWriter(self._loop, master, self._apply_pressure, close_fd=False)
        self._readers = [FdReader(self._loop, master, self._to_stdout, lambda: None,
                                 close_fd=False)]
        self._utmp(libc.USER_PROCESS)

    def _start_with_pipes(self, shell: str, argv: list[str], env: dict[str, str]) -> None:
        fds: list[int] = []
        try:
            for _ in range(3):  # out of fds on the 2nd or 3rd pipe must not leak the 1st
                fds.extend(os.pipe2(os.O_CLOEXEC))
            in_r, in_w, out_r, out_w, err_r, err_w = fds
            self._proc = spawn_as(self._ctx.account, argv, env, Stdio(in_r, out_w, err_w),
                                  executable=shell, session=self._ctx.session,
                                  rhost=self._ctx.peer_host)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):  # the child's ends
            os.close(fd)
        self._writer = FdWriter(self._loop, in_w, self._apply_pressure)
        self._readers = [FdReader(self._loop, out_r, self._to_stdout, self._maybe_finish),
                         FdReader(self._loop, err_r, self._to_stderr, self._maybe_finish)]

    # --- output, exit ---------------------------------------------------------------------

    def _to_stdout(self, data: bytes) -> None:
        if self._chan is not None and not self._exit_sent:
            self._chan.write(data)

    def _to_stderr(self, data: bytes) -> None:
        if self._chan is not None and not self._exit_sent:
            self._chan.write_stderr(data)

    def _apply_pressure(self, full: bool) -> None:
        if self._chan is not None:
            (self._chan.pause_reading if full else self._chan.resume_reading)()

    def _child_exited(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is None:
            return
        self._stop_watching()
        log.info('session process %d of %s exited with %d', self._proc.pid,
                 self._ctx.account.name, self._proc.returncode)
        if self._pty_master >= 0:
            # Background jobs may keep the slave open: take what is buffered, then end,
            # as sshd does when the session's shell exits.
            self._readers[0].drain()
            self._close_io()
        self._maybe_finish()
        if self._chan is None:  # the channel went first (hang-up): now the close is complete
            self._audit_close()

    def _stop_watching(self) -> None:
        """Close the pidfd (the process has exited, or the gateway lets it go)."""
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _let_go(self) -> None:
        """:data:`CLOSE_AUDIT_WAIT` after the hang-up: a process still running ignores it.
        As under sshd it goes on, an orphan: the gateway keeps no descriptor of it (pidfd,
        the PAM helper's status pipe), audits the close (``running: true``), and leaves the
        reaping to :data:`ORPHANS`."""
        self._close_timer = None
        proc = self._proc
        assert proc is not None
        if proc.poll() is None:
            self._stop_watching()
            if isinstance(proc, PamSessionProcess):
                proc.detach()
            ORPHANS.adopt(self._loop, proc, self._ctx.account.name)
            log.info('session process %d of %s ignored the hang-up: left running',
                     proc.pid, self._ctx.account.name)
            self._audit_close()
        else:
            self._child_exited()

    def _maybe_finish(self) -> None:
        """Send the exit status once the child is reaped and (exec) its output fully read."""
        if self._proc is None or self._proc.returncode is None or self._pidfd >= 0:
            return
        if any(not reader.at_eof for reader in self._readers):
            return
        code = self._proc.returncode
        if code < 0:
            self._send_exit_signal(-code)
        else:
            self._send_exit(code)

    def _send_exit(self, status: int) -> None:
        if self._exit_sent or self._chan is None:
            return
        self._exit_sent = True
        self._close_pipes()
        self._chan.exit(status)

    def _send_exit_signal(self, signum: int) -> None:
        if self._exit_sent or self._chan is None:
            return
        self._exit_sent = True
        self._close_pipes()
        name = signal.Signals(signum).name.removeprefix('SIG')
        self._chan.exit_with_signal(name, False, '', '')

    def _close_pipes(self) -> None:
        for reader in self._readers:
            reader.close()

    def _close_io(self) -> None:
        """Close every descriptor of the session's I/O: the pipes, or the pty master (the
        slave side hangs up) with the logout record in utmp/wtmp, as sshd writes it then."""
        self._close_pipes()
        if self._writer is not None:
            self._writer.close()
        if self._pty_master >= 0:
            os.close(self._pty_master)
            self._pty_master = -1
            self._utmp(libc.DEAD_PROCESS)

    # --- audit ---------------------------------------------------------------------------------

    def _opened(self, **fields: Any) -> None:
        self._opened_at = time.monotonic()
        self._audit('open', **fields)

    def _audit_close(self) -> None:
        """The one ``close`` event of an opened session: duration, exit status or signal."""
        if self._close_audited or self._opened_at is None:
            return
        self._close_audited = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        fields: dict[str, Any] = {'seconds': round(time.monotonic() - self._opened_at, 3)}
        if self._proc is not None:
            fields['pid'] = self._proc.pid
            code = self._proc.returncode
            if code is None:
                fields['running'] = True
            elif code < 0:
                try:
                    fields['exit_signal'] = signal.Signals(-code).name.removeprefix('SIG')
                except ValueError:
                    fields['exit_signal'] = str(-code)
            else:
                fields['exit_status'] = code
        self._audit('close', **fields)

    def _audit(self, action: str, outcome: str = 'ok', **fields: Any) -> None:
        ctx = self._ctx
        if ctx.on_event is None:
            return
        if self._subsystem is not None:
            fields['subsystem'] = self._subsystem
        try:
            ctx.on_event('session', action=action, outcome=outcome, route='ssh',
                         session=self._session_id, source=ctx.source or ctx.peer_host,
                         vo=ctx.identity.vo, user=ctx.identity.user, account=ctx.account.name,
                         uid=ctx.account.uid, kind=self._kind,
                         **{k: v for k, v in fields.items() if v is not None})
        except Exception:  # accounting must never break a session
            log.exception('could not audit session %s of %s', action, ctx.account.name)

    def _utmp(self, kind: int) -> None:
        # Off the event loop, in order: glibc waits up to 10 s for the file lock of utmp and
        # of wtmp, and any user may hold a read lock on those world-readable files.
        _UTMP_WRITER.submit(_write_utmp, kind, self._proc.pid if self._proc else 0,
                            self._tty_line, self._ctx.account.name, self._ctx.peer_host,
                            time.time())


#: One thread writes every utmp/wtmp record, so a session's records keep their order.
_UTMP_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix='xos-utmp')


def _write_utmp(kind: int, pid: int, line: str, user: str, host: str, when: float) -> None:
    try:
        libc.utmp_record(kind, pid, line, user, host, when)
    except Exception as exc:  # accounting must never break a login
        log.warning('utmp/wtmp update failed: %s', exc)


def _set_window_size(fd: int, size: tuple[int, int, int, int]) -> None:
    """TIOCSWINSZ takes rows, columns, x pixels, y pixels; SSH sends columns first."""
    width, height, pixwidth, pixheight = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', height, width, pixwidth, pixheight))


def _hand_over_agent_socket(path: str, account: LocalAccount) -> None:
    """Give the forwarded-agent socket asyncssh made (root, mkdtemp 0700) to the account.

    Both paths were created by root moments ago with unguessable names; the socket is
    chowned before its directory, so the user never holds a directory root still works in.
    """
    os.chown(path, account.uid, account.gid, follow_symlinks=False)
    os.chown(os.path.dirname(path), account.uid, account.gid, follow_symlinks=False)
