"""The per-session PAM helper's own side: what runs in the root helper :mod:`.pamsession`
starts for one session (module docstring there: the steps, the reports, why a process).

Started as ``python -I -S -c BOOT PACKAGE_PARENT REQ_FD STATUS_FD`` (:data:`BOOT` puts the
directory holding ``xos_sshd`` on ``sys.path`` and calls :func:`main`): a fresh interpreter
at every PAM session start, without site-packages, so this module and what it imports are
kept to the standard library's cheapest modules (no logging, typing, cffi): that start is
most of a PAM session's cost.  libpam comes through ctypes (:mod:`.pamlib`), the user's
process through the exec shim (:mod:`.execshim`).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess

from .execshim import SpawnError, Stdio, apply_rlimits, popen_as, unsafe_path

#: typing.TYPE_CHECKING without importing typing (type checkers read it as True).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping, Sequence

#: The helper's ``-c`` program: argv = PACKAGE_PARENT REQ_FD STATUS_FD.
BOOT = ('import sys; sys.path.insert(0, sys.argv[1]); '
        'from xos_sshd.session.pamhelper import main; main(sys.argv[1:])')
#: Exit status of a refused session (as when the gateway cannot start one).
REFUSED = 255
#: Audit reasons of a refused session: a PAM call failed; anything else failed.
PAM_REFUSED = 'pam-refused'
SPAWN_FAILED = 'spawn-failed'
#: Never replaced by the PAM environment; names with these prefixes are dropped from it.
PROTECTED_ENV = frozenset({'HOME', 'USER', 'LOGNAME', 'SHELL', 'SSH_AUTH_SOCK'})
DROPPED_ENV_PREFIXES = ('SSH_AUTH_INFO', 'SSH_CONNECTION')
MAX_REPORT = 2048
_MAX_MESSAGES = 8192
#: Every signal the helper takes over (blocked from before its exec, waited for, forwarded).
FORWARDED = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
#: What the gateway sends the helper for a client's KILL: the helper cannot take a SIGKILL
#: over, and dying of it would skip pam_close_session.  SSH cannot carry real-time signals,
#: so this one never means anything else.
KILL_CHILD = signal.SIGRTMIN + 1
_PR_SET_DUMPABLE = 4


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
        line = ' '.join(f'{kind} {text}'.split())[:MAX_REPORT] + '\n'
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
        """Steps 1-4 (:mod:`.pamsession`'s docstring); raises PamError/SpawnError/OSError."""
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
                            take_tty=req['take_tty'], die_with_parent=True,
                            helper=req['exec_helper'])
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
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


def _refusal_reason(exc: BaseException) -> str:
    """``pam-refused`` for a failed PAM call, ``spawn-failed`` for anything else."""
    try:
        from .pamlib import PamError
    except ImportError:  # pamlib not loadable: nothing PAM could have refused
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
    waited = FORWARDED | {signal.SIGCHLD}
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
    import ctypes  # only here: a helper that dies of a signal
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # not even through a core pipe
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os._exit(128 + sig)  # a signal whose default is not to terminate


def main(argv: Sequence[str]) -> None:
    """The helper's entry point (root; stdio = the session's; every signal blocked);
    *argv*: anything, REQ_FD, STATUS_FD."""
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

