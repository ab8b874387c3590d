"""The per-session PAM helper: a root process that holds one PAM session around one user process.

Why a process of its own: PAM session modules act on the process that calls them --
pam_limits sets *its* rlimits, pam_systemd moves *it* into a logind scope, pam_loginuid
sets *its* loginuid, pam_env fills *its* PAM environment -- and what they set must reach the
user's process by inheritance, exactly as under sshd (whose per-connection monitor opens the
session and forks the shell).  The gateway is one long-lived process serving everyone, so
none of that may happen in it.  The gateway is also a threaded asyncio program where forking
and running Python in the child is not safe, so the helper is a fresh program (``python -I -m
xos_sshd.session.pamsession REQ_FD STATUS_FD``), started by :func:`launch`.

What the helper does, as root, in sshd's order (``UsePAM yes``):

1. set the ``[session] rlimits`` on itself (pam_limits then overrides what limits.conf names);
2. ``pam_start(service, account)`` (``pam_start_confdir`` with ``[session] pam_confdir``),
   ``PAM_RHOST`` = the client's address, ``PAM_TTY`` = the pty (``/dev/pts/N``) or ``ssh``
   (sshd's value without a pty); ``PAM_RUSER`` is not set (sshd does not either);
3. ``pam_acct_mgmt`` (sshd runs it for every login, public keys included: pam_nologin,
   pam_access, expiry);  ``pam_setcred(PAM_ESTABLISH_CRED)`` (through the ``auth`` stack; as
   in sshd after a non-PAM authentication, its failure is only logged, at debug level);
   ``pam_open_session``;
4. starts the user's process with :func:`.spawn.popen_as` -- the gateway's own drop:
   setgroups from the mapping, setresgid, setresuid, no_new_privs, new session and
   controlling tty, chdir home as the user -- with the session environment plus
   ``pam_getenvlist`` (which may not replace ``HOME``, ``USER``, ``LOGNAME``, ``SHELL``,
   ``SSH_AUTH_SOCK`` nor any ``XOS_*``, and whose ``SSH_AUTH_INFO*``/``SSH_CONNECTION*`` are
   dropped, as sshd's denylist does);
5. waits for it, forwarding every signal it receives (``SIGHUP`` to its process group, as
   the gateway's hang-up does, the others to the process).  A ``SIGKILL`` (a client's
   ``KILL`` signal request) cannot be caught: it kills the helper, and the user's process
   dies with it (parent-death signal), without ``pam_close_session`` (logind still notices);
6. ``pam_close_session``, ``pam_setcred(PAM_DELETE_CRED)``, ``pam_end``;
7. exits with the process's status, or dies of the same signal (core dumps off), so the
   gateway's ``exit-status``/``exit-signal`` are the user's process's.

Any failure in 2-4 refuses the session: one line on the session's stderr (``xos-sshd:
session refused: pam_open_session: ...``), exit status 255, and the reason reported to the
gateway on the status pipe (``refused pam-refused TEXT`` for a PAM call, ``refused
spawn-failed TEXT`` otherwise), which logs it.  The gateway reads that pipe while the helper
runs (:meth:`PamSessionProcess.watch`), so its audit log has one ``session open`` line that
says whether the session opened (``started PID``) or was refused, never an ``open`` of a
session PAM refused.  What the helper trusts is what the gateway sends
on the request descriptor (the gateway's own data: account, command, environment), nothing
from the network; it never opens a path of the user's (PAM modules do what the admin's
stack tells them, as under sshd).

Credentials that ``pam_setcred`` gives the helper (pam_group's extra groups) are not carried
over: the user's process has exactly the mapping's groups (design.md), unlike sshd.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .spawn import RLimit, SpawnError, Stdio, apply_rlimits, popen_as

if TYPE_CHECKING:
    import asyncio

    from ..ams import LocalAccount
    from ..config import SessionConfig

log = logging.getLogger(__name__)

#: Exit status of a refused session (as when the gateway cannot start one).
REFUSED = 255
#: Audit reasons of a refused session: a PAM call failed; anything else failed.
PAM_REFUSED = 'pam-refused'
SPAWN_FAILED = 'spawn-failed'
#: Never replaced by the PAM environment; names with these prefixes are dropped from it.
PROTECTED_ENV = frozenset({'HOME', 'USER', 'LOGNAME', 'SHELL', 'SSH_AUTH_SOCK'})
DROPPED_ENV_PREFIXES = ('SSH_AUTH_INFO', 'SSH_CONNECTION')
#: The helper's own environment: a fixed PATH plus these, when the gateway has them (so PAM
#: modules resolve accounts through the same NSS setup as the gateway).
HELPER_ENV_PASS = ('LD_LIBRARY_PATH', 'XOS_NSS_DIR', 'LANG', 'LC_ALL', 'TZ')
HELPER_PATH = '/usr/sbin:/usr/bin:/sbin:/bin'
_MAX_REPORT = 2048
_MAX_MESSAGES = 8192
#: Every signal the helper takes over (blocked, waited for, forwarded).
_FORWARDED = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
#: What the gateway sends the helper for a client's KILL: the helper cannot take a SIGKILL
#: over, and dying of it would skip pam_close_session.  SSH cannot carry real-time signals,
#: so this one never means anything else.
KILL_CHILD = signal.SIGRTMIN + 1
_PR_SET_DUMPABLE = 4


# --- the gateway side -----------------------------------------------------------------------


class PamSessionProcess(subprocess.Popen):  # type: ignore[type-arg]
    """The helper, as the gateway sees it: a ``Popen`` whose status pipe is read (and logged:
    the PAM refusal, warnings from closing the session) as the helper writes it, and to its
    end once the helper has exited (:meth:`poll`, :meth:`wait`)."""

    status_fd = -1
    account = ''
    service = ''
    #: The user's process pid as the helper reported it (``started PID``), once it did.
    started = ''
    #: ``(reason, text)`` of a refused session (``refused REASON TEXT``), once reported.
    refusal: tuple[str, str] | None = None
    _pending = b''
    _taken = 0
    _watching: asyncio.AbstractEventLoop | None = None
    _on_verdict: Callable[[str, str, str], None] | None = None

    def poll(self) -> int | None:
        code = super().poll()
        if code is not None:
            self._collect()
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self._collect()
        return code

    def watch(self, loop: asyncio.AbstractEventLoop,
              on_verdict: Callable[[str, str, str], None]) -> None:
        """Call ``on_verdict(outcome, reason, text)`` once, as soon as the helper said how the
        session went: ``('ok', '', '')`` when the user's process runs, ``('refused', reason,
        text)`` when PAM (``pam-refused``) or the start (``spawn-failed``) refused it, or
        when the helper ended without a word.  Called from *loop*, or from :meth:`poll`."""
        self._on_verdict = on_verdict
        if self.status_fd >= 0:
            loop.add_reader(self.status_fd, self._readable)
            self._watching = loop
        else:
            self._verdict(ended=True)

    def _readable(self) -> None:
        ended = self._read()
        if ended or self.started or self.refusal is not None:
            self._unwatch()  # the rest is read when the helper has exited
        self._verdict()

    def _unwatch(self) -> None:
        if self._watching is not None:
            self._watching.remove_reader(self.status_fd)
            self._watching = None

    def _read(self) -> bool:
        """Take the lines the helper wrote so far (at most 8 KiB in all); True at EOF."""
        try:
            while self._taken < 4 * _MAX_REPORT:
                chunk = os.read(self.status_fd, 4096)
                if not chunk:
                    return True
                self._taken += len(chunk)
                *lines, self._pending = (self._pending + chunk).split(b'\n')
                for line in lines:
                    self._line(line.decode(errors='replace'))
        except BlockingIOError:
            return False
        return True  # enough: the rest is not read

    def _line(self, line: str) -> None:
        kind, _, text = line.partition(' ')
        if kind == 'refused':
            reason, _, rest = text.partition(' ')
            self.refusal = ((reason, rest) if reason in (PAM_REFUSED, SPAWN_FAILED)
                            else (PAM_REFUSED, text))
            log.error('PAM session (service %s) for %s refused: %s', self.service,
                      self.account, self.refusal[1])
        elif kind == 'warning':
            log.warning('PAM session (service %s) for %s: %s', self.service, self.account, text)
        elif kind == 'note':
            log.debug('PAM session (service %s) for %s: %s', self.service, self.account, text)
        elif kind == 'started':
            self.started = text

    def _verdict(self, ended: bool = False) -> None:
        callback = self._on_verdict
        if callback is None:
            return
        if self.refusal is not None:
            verdict = ('refused', *self.refusal)
        elif self.started:
            verdict = ('ok', '', '')
        elif ended:
            verdict = ('refused', SPAWN_FAILED, f'the PAM session helper ended (status '
                       f'{self.returncode}) before the session opened')
        else:
            return
        self._on_verdict = None
        callback(*verdict)

    def _collect(self) -> None:
        """Read the rest of what the (exited) helper wrote, log it, close the pipe."""
        if self.status_fd >= 0:
            self._unwatch()
            try:
                self._read()
                if self._pending:
                    self._line(self._pending.decode(errors='replace'))
                    self._pending = b''
            finally:
                os.close(self.status_fd)
                self.status_fd = -1
            if self.started:
                log.info('PAM session (service %s) for %s closed (user process %s)',
                         self.service, self.account, self.started)
        self._verdict(ended=True)


def launch(session: SessionConfig, account: LocalAccount, groups: Sequence[int],
           argv: Sequence[str], env: Mapping[str, str], stdio: Stdio, *, executable: str,
           take_tty: bool, rhost: str, rlimits: Sequence[RLimit]) -> PamSessionProcess:
    """Start the helper for one session (gateway side); it gets *stdio* as its own.

    The request goes through a memfd (any size, written before the helper runs), the report
    comes back on a pipe the gateway reads when the helper has exited.  The helper leads its
    own process group (the gateway's hang-up is ``killpg``) but not a session, so no tty can
    become its controlling terminal; every signal is blocked from before its exec.
    """
    tty = 'ssh'
    if take_tty:
        fd = stdio.stdin if isinstance(stdio.stdin, int) else stdio.stdin.fileno()
        tty = os.ttyname(fd)
    request = {
        'service': session.pam_service,
        'confdir': str(session.pam_confdir) if session.pam_confdir else None,
        'user': account.name, 'uid': account.uid, 'gid': account.gid, 'groups': list(groups),
        'home': account.home, 'rhost': rhost, 'tty': tty, 'take_tty': take_tty,
        'argv': list(argv), 'executable': executable, 'env': dict(env),
        'rlimits': [list(r) for r in rlimits],
    }
    req_fd = os.memfd_create('xos-pam-request', os.MFD_CLOEXEC)
    status_r = status_w = -1
    try:
        os.write(req_fd, json.dumps(request).encode())  # a memfd takes it all at once
        os.lseek(req_fd, 0, os.SEEK_SET)
        status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(status_w, True)
        helper_env = {'PATH': HELPER_PATH}
        helper_env.update({k: os.environ[k] for k in HELPER_ENV_PASS if k in os.environ})
        proc = PamSessionProcess(
            [sys.executable, '-I', '-m', __name__, str(req_fd), str(status_w)],
            executable=sys.executable, env=helper_env,
            stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
            pass_fds=(req_fd, status_w), close_fds=True, process_group=0,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED))
    except BaseException:
        if status_r >= 0:
            os.close(status_r)
        raise
    finally:
        os.close(req_fd)
        if status_w >= 0:
            os.close(status_w)
    proc.status_fd, proc.account, proc.service = status_r, account.name, session.pam_service
    return proc


# --- the helper side ------------------------------------------------------------------------


def merge_environment(base: Mapping[str, str], pam_env: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The session environment with the PAM environment over it, except the protected names
    (as sshd, PAM may set ``PATH``, locale and the like)."""
    env = dict(base)
    for name, value in pam_env:
        if (name in PROTECTED_ENV or name.startswith('XOS_')
                or name.startswith(DROPPED_ENV_PREFIXES) or '=' in name or not name):
            continue
        env[name] = value
    return env


class _Helper:
    """One run of the helper: the PAM transaction, the user's process, the report."""

    def __init__(self, req: dict[str, Any], status_fd: int):
        self.req = req
        self.status_fd = status_fd
        self.messages: list[str] = []
        self.pam: Any = None
        self.cred = self.opened = False

    def report(self, kind: str, text: str) -> None:
        line = ' '.join(f'{kind} {text}'.split())[:_MAX_REPORT] + '\n'
        try:
            os.write(self.status_fd, line.encode(errors='replace'))
        except OSError:
            pass  # the gateway is gone: nobody to tell

    def on_message(self, style: int, text: str) -> None:
        """PAM_TEXT_INFO / PAM_ERROR_MSG: shown on a terminal at once (motd, as sshd does),
        otherwise kept and shown only if the session is refused (exec output stays clean)."""
        if self.req['take_tty']:
            _write(1, text + '\n')
        elif sum(map(len, self.messages)) < _MAX_MESSAGES:
            self.messages.append(text)

    def open(self) -> subprocess.Popen[bytes]:
        """Steps 1-4 (module docstring); raises PamError/SpawnError/OSError."""
        from . import pamlib
        req = self.req
        try:
            apply_rlimits(req['rlimits'])
        except OSError as exc:
            raise SpawnError(f'cannot set resource limits: {exc}') from None
        try:
            pamlib.load()
        except OSError as exc:
            raise SpawnError(f'cannot load {pamlib.LIBPAM}: {exc}') from None
        if req['confdir']:  # the stack runs as root: nobody but root may have written it
            for path in (req['confdir'], os.path.join(req['confdir'], req['service'])):
                problem = unsafe_path(path)
                if problem:
                    raise SpawnError(f'session.pam_confdir: {problem}')
        self.pam = pamlib.PamHandle(self.on_message)
        self.pam.start(req['service'], req['user'], req['confdir'])
        if req['rhost']:
            self.pam.set_item(pamlib.PAM_RHOST, req['rhost'])
        self.pam.set_item(pamlib.PAM_TTY, req['tty'])
        self.pam.acct_mgmt()
        try:  # as sshd when PAM did not authenticate: a failure is only noted
            self.pam.setcred(pamlib.PAM_ESTABLISH_CRED)
            self.cred = True
        except pamlib.PamError as exc:
            self.report('note', str(exc))
        self.pam.open_session()
        self.opened = True
        env = merge_environment(req['env'], self.pam.getenvlist())
        try:
            return popen_as(req['uid'], req['gid'], req['groups'], req['home'], req['argv'],
                            env, Stdio(0, 1, 2), executable=req['executable'],
                            take_tty=req['take_tty'], die_with_parent=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SpawnError(f'cannot start {req["executable"]} as {req["user"]}: {exc}') from None

    def close(self) -> None:
        """Step 6, whatever was reached; failures are reported, never raised."""
        from . import pamlib
        if self.pam is None:
            return
        for done, call in ((self.opened, self.pam.close_session),
                           (self.cred, lambda: self.pam.setcred(pamlib.PAM_DELETE_CRED))):
            if done:
                try:
                    call()
                except pamlib.PamError as exc:
                    self.report('warning', str(exc))
        self.pam.end()


def unsafe_path(path: str) -> str | None:
    """Why *path* (a PAM service file or its directory) is not safe to run as root: not
    root-owned, writable by others, a symlink, missing; None when it is fine."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f'{path}: {exc.strerror}'
    if stat.S_ISLNK(st.st_mode):
        return f'{path} is a symlink'
    if st.st_uid != 0 or st.st_mode & 0o022:
        return (f'{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} '
                '(must be root-owned, not group/world-writable)')
    return None


def _refusal_reason(exc: BaseException) -> str:
    """``pam-refused`` for a failed PAM call, ``spawn-failed`` for anything else."""
    try:
        from .pamlib import PamError
    except ImportError:  # cffi missing: nothing PAM could have refused
        return SPAWN_FAILED
    return PAM_REFUSED if isinstance(exc, PamError) else SPAWN_FAILED


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode(errors='replace'))
    except OSError:
        pass


def _wait_forwarding(child: subprocess.Popen[bytes]) -> int:
    """Wait for *child*, forwarding every signal sent to the helper by another process."""
    me = os.getpid()
    waited = _FORWARDED | {signal.SIGCHLD}
    while True:
        code = child.poll()
        if code is not None:
            return code
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD or info.si_pid == me:
            continue
        try:
            if info.si_signo == signal.SIGHUP:
                os.killpg(child.pid, signal.SIGHUP)  # the hang-up, like the gateway's
            elif info.si_signo == KILL_CHILD:
                os.kill(child.pid, signal.SIGKILL)
            else:
                os.kill(child.pid, info.si_signo)
        except ProcessLookupError:
            pass


def _exit_like(code: int) -> None:
    """Exit with *code*, or die of signal ``-code`` without a core dump."""
    if code >= 0:
        os._exit(code)
    sig = -code
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # not even through a core pipe
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os._exit(128 + sig)  # a signal whose default is not to terminate


def main(argv: Sequence[str]) -> None:
    """The helper's entry point (root; stdio = the session's; every signal blocked)."""
    try:
        req_fd, status_fd = int(argv[1]), int(argv[2])
        os.set_inheritable(status_fd, False)
        with os.fdopen(req_fd, 'rb') as f:
            req = json.load(f)
    except (IndexError, ValueError, OSError) as exc:  # not started by launch()
        _write(2, f'xos-sshd: PAM session helper: bad invocation: {exc}\n')
        os._exit(REFUSED)
    helper = _Helper(req, status_fd)
    try:
        child = helper.open()
    except Exception as exc:  # noqa: BLE001 (PamError, SpawnError, OSError: refuse the session)
        text = str(exc)
        for message in helper.messages:
            _write(2, message + '\n')
        _write(2, f'xos-sshd: session refused: {text}\n')
        helper.report('refused', f'{_refusal_reason(exc)} {text}')
        helper.close()
        os._exit(REFUSED)
    helper.report('started', str(child.pid))
    code = _wait_forwarding(child)
    helper.close()
    _exit_like(code)


if __name__ == '__main__':
    main(sys.argv)
