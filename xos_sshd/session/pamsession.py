"""The per-session PAM helper: a root process that holds one PAM session around one user process.

Why a process of its own: PAM session modules act on the process that calls them --
pam_limits sets *its* rlimits, pam_systemd moves *it* into a logind scope, pam_loginuid
sets *its* loginuid, pam_env fills *its* PAM environment -- and what they set must reach the
user's process by inheritance, exactly as under sshd (whose per-connection monitor opens the
session and forks the shell).  The gateway is one long-lived process serving everyone, so
none of that may happen in it.  The gateway is also a threaded asyncio program where forking
and running Python in the child is not safe, so the helper is a fresh program (``python -I -S
-c BOOT PACKAGE_PARENT REQ_FD STATUS_FD``, :mod:`.pamhelper`: the standard library, the
package, libpam through ctypes; no site-packages, so it starts in a few tens of
milliseconds), started by :func:`launch` with vfork (no preexec step).

What the helper does, as root, in sshd's order (``UsePAM yes``):

1. set the ``[session] rlimits`` on itself (pam_limits then overrides what limits.conf names);
2. ``pam_start(service, account)`` (``pam_start_confdir`` with ``[session] pam_confdir``),
   ``PAM_RHOST`` = the client's address, ``PAM_TTY`` = the pty (``/dev/pts/N``) or ``ssh``
   (sshd's value without a pty); ``PAM_RUSER`` is not set (sshd does not either);
3. ``pam_acct_mgmt`` (sshd runs it for every login, public keys included: pam_nologin,
   pam_access, expiry);  ``pam_setcred(PAM_ESTABLISH_CRED)`` (through the ``auth`` stack; as
   in sshd after a non-PAM authentication, its failure is only logged, at debug level);
   ``pam_open_session``;
4. starts the user's process with :func:`.spawn.popen_as` -- the gateway's own drop, by the
   same exec shim (the gateway resolved its path): setgroups from the mapping, setresgid,
   setresuid, no_new_privs, new session and controlling tty, chdir home as the user, a
   parent-death signal -- with the session environment plus
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

import json
import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .execshim import PACKAGE_PARENT, RLimit, Stdio
# The helper's side (pamhelper.py): its constants, and what doctor and tests use from it.
from .pamhelper import (BOOT, DROPPED_ENV_PREFIXES, FORWARDED, KILL_CHILD,  # noqa: F401
                        MAX_REPORT, PAM_REFUSED, PROTECTED_ENV, REFUSED, SPAWN_FAILED,
                        merge_environment, unsafe_path)

if TYPE_CHECKING:
    import asyncio

    from ..ams import LocalAccount
    from ..config import SessionConfig

log = logging.getLogger(__name__)

#: The helper's own environment: a fixed PATH plus these, when the gateway has them (so PAM
#: modules resolve accounts through the same NSS setup as the gateway).
HELPER_ENV_PASS = ('LD_LIBRARY_PATH', 'XOS_NSS_DIR', 'LANG', 'LC_ALL', 'TZ')
HELPER_PATH = '/usr/sbin:/usr/bin:/sbin:/bin'


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
            while self._taken < 4 * MAX_REPORT:
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

    def detach(self) -> None:
        """The session's channel is gone and the helper runs on (its user process ignored
        the hang-up): log what it reported so far, close the status pipe, and tell nobody a
        verdict any more -- the gateway keeps no descriptor of a session it let go."""
        self._on_verdict = None
        if self.status_fd >= 0:
            self._unwatch()
            try:
                self._read()
            finally:
                os.close(self.status_fd)
                self.status_fd = -1

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
           take_tty: bool, rhost: str, rlimits: Sequence[RLimit], helper: str
           ) -> PamSessionProcess:
    """Start the helper for one session (gateway side); it gets *stdio* as its own, and
    starts the user's process through the exec shim *helper* (:func:`.spawn.exec_helper`).

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
        'rlimits': [list(r) for r in rlimits], 'exec_helper': helper,
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
        # Every signal blocked from before the helper's exec, without a preexec step (which
        # would make CPython fork this whole process instead of vforking): the child of a
        # vfork execs with the signal mask of the thread that called Popen.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            proc = PamSessionProcess(
                [sys.executable, '-I', '-S', '-c', BOOT, PACKAGE_PARENT, str(req_fd),
                 str(status_w)],
                executable=sys.executable, env=helper_env,
                stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                pass_fds=(req_fd, status_w), close_fds=True, process_group=0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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


