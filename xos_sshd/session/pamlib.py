"""Linux-PAM, the application side, through cffi in ABI mode (``libpam.so.0``, no compiler).

Only what a login service needs for its *session* part, in the order sshd (``UsePAM yes``)
makes the calls: :meth:`PamHandle.start` (``pam_start`` or ``pam_start_confdir``),
``set_item`` (``PAM_RHOST``, ``PAM_TTY``), ``acct_mgmt``, ``setcred``, ``open_session``,
``getenvlist``, ``close_session``, ``end``.  There is no ``pam_authenticate``: the
certificate is the authentication, checked by the gateway before any of this.

This module is loaded in the per-session PAM helper only (:mod:`.pamsession`), never in the
gateway: PAM modules act on the *calling process* (pam_limits sets its rlimits, pam_systemd
moves it into a logind scope, pam_loginuid writes its loginuid), and that process must be
one that belongs to this session alone.

The conversation answers no prompt (there is nobody to ask: ``PAM_CONV_ERR``, as sshd's
session-time conversation does) and hands ``PAM_TEXT_INFO``/``PAM_ERROR_MSG`` texts to a
Python callback.
"""

from __future__ import annotations

from typing import Callable

import cffi

_CDEF = """
    struct pam_message { int msg_style; const char *msg; };
    struct pam_response { char *resp; int resp_retcode; };
    struct pam_conv {
        int (*conv)(int, const struct pam_message **, struct pam_response **, void *);
        void *appdata_ptr;
    };
    typedef struct pam_handle pam_handle_t;
    int pam_start(const char *service_name, const char *user,
                  const struct pam_conv *pam_conversation, pam_handle_t **pamh);
    int pam_start_confdir(const char *service_name, const char *user,
                          const struct pam_conv *pam_conversation, const char *confdir,
                          pam_handle_t **pamh);
    int pam_end(pam_handle_t *pamh, int pam_status);
    int pam_set_item(pam_handle_t *pamh, int item_type, const void *item);
    int pam_acct_mgmt(pam_handle_t *pamh, int flags);
    int pam_setcred(pam_handle_t *pamh, int flags);
    int pam_open_session(pam_handle_t *pamh, int flags);
    int pam_close_session(pam_handle_t *pamh, int flags);
    char **pam_getenvlist(pam_handle_t *pamh);
    const char *pam_strerror(pam_handle_t *pamh, int errnum);
    void *calloc(size_t nmemb, size_t size);
    void free(void *ptr);
"""

LIBPAM = 'libpam.so.0'

# <security/_pam_types.h>
PAM_SUCCESS = 0
PAM_NEW_AUTHTOK_REQD = 12
PAM_SERVICE, PAM_USER, PAM_TTY, PAM_RHOST = 1, 2, 3, 4
PAM_RUSER = 8
PAM_ESTABLISH_CRED = 0x0002
PAM_DELETE_CRED = 0x0004
PAM_REINITIALIZE_CRED = 0x0008
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_BUF_ERR = 5
PAM_CONV_ERR = 19
PAM_MAX_NUM_MSG = 32

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib = None
_libc = None


class PamError(Exception):
    """A PAM call failed: ``.call`` (``pam_open_session``, ...), ``.code``, and the message
    (``pam_strerror``'s text) as ``str(exc)``."""

    def __init__(self, call: str, code: int, text: str):
        super().__init__(f'{call}: {text}')
        self.call = call
        self.code = code
        self.text = text


def load() -> None:
    """dlopen libpam (once); ``OSError`` when it is not installed."""
    global _lib, _libc
    if _lib is None:
        _libc = _ffi.dlopen('libc.so.6')
        _lib = _ffi.dlopen(LIBPAM)


def has_confdir() -> bool:
    """Whether this libpam has ``pam_start_confdir`` (Linux-PAM >= 1.4)."""
    load()
    try:
        getattr(_lib, 'pam_start_confdir')
    except AttributeError:
        return False
    return True


class PamHandle:
    """One PAM transaction (``pam_handle_t``) for one session; not thread-safe, one per process.

    *on_message* gets ``(style, text)`` for each ``PAM_TEXT_INFO``/``PAM_ERROR_MSG`` a module
    sends (motd, "too many logins", ...).
    """

    def __init__(self, on_message: Callable[[int, str], None]):
        load()
        self._on_message = on_message
        self._pamh = _ffi.NULL
        self._status = PAM_SUCCESS
        # Kept referenced for the transaction's life: libpam holds pointers to both.
        self._conv_cb = _ffi.callback(
            'int(int, const struct pam_message **, struct pam_response **, void *)',
            self._converse, error=PAM_CONV_ERR)
        self._conv_struct = _ffi.new('struct pam_conv *')
        self._conv_struct.conv = self._conv_cb
        self._keep: list[object] = []

    def _converse(self, num: int, msgs: object, resp: object, _data: object) -> int:
        """The conversation: messages are passed on, prompts refused (nobody to ask)."""
        if num <= 0 or num > PAM_MAX_NUM_MSG:
            return PAM_CONV_ERR
        texts = []
        for i in range(num):
            msg = msgs[i]  # type: ignore[index]
            if msg.msg_style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                return PAM_CONV_ERR
            text = _ffi.string(msg.msg).decode(errors='replace') if msg.msg else ''
            texts.append((int(msg.msg_style), text))
        # libpam frees what we return (free() on the array and each non-NULL resp).
        replies = _libc.calloc(num, _ffi.sizeof('struct pam_response'))
        if replies == _ffi.NULL:
            return PAM_BUF_ERR
        resp[0] = _ffi.cast('struct pam_response *', replies)  # type: ignore[index]
        for style, text in texts:
            try:
                self._on_message(style, text)
            except Exception:  # noqa: BLE001 (never unwind through libpam)
                pass
        return PAM_SUCCESS

    def _check(self, call: str, code: int) -> None:
        self._status = code
        if code != PAM_SUCCESS:
            raise PamError(call, code, self.strerror(code))

    def strerror(self, code: int) -> str:
        """libpam's text for *code*."""
        text = _lib.pam_strerror(self._pamh, code)
        return _ffi.string(text).decode(errors='replace') if text else f'PAM error {code}'

    def start(self, service: str, user: str, confdir: str | None = None) -> None:
        """``pam_start`` (or ``pam_start_confdir`` when *confdir* is given)."""
        out = _ffi.new('pam_handle_t **')
        if confdir is None:
            code = _lib.pam_start(service.encode(), user.encode(), self._conv_struct, out)
        else:
            if not has_confdir():
                raise PamError('pam_start_confdir', -1, 'this libpam has no pam_start_confdir '
                               '(Linux-PAM >= 1.4 needed for session.pam_confdir)')
            code = _lib.pam_start_confdir(service.encode(), user.encode(), self._conv_struct,
                                          confdir.encode(), out)
        self._pamh = out[0]
        if code != PAM_SUCCESS:
            self._pamh = _ffi.NULL
            raise PamError('pam_start', code, f'PAM error {code} (service {service!r})')

    def set_item(self, item: int, value: str) -> None:
        """``pam_set_item`` for the string items (``PAM_RHOST``, ``PAM_TTY``, ...)."""
        data = _ffi.new('char[]', value.encode())
        self._keep.append(data)
        self._check('pam_set_item', _lib.pam_set_item(self._pamh, item, data))

    def acct_mgmt(self) -> None:
        """``pam_acct_mgmt``: is the account allowed in now (nologin, expiry, access rules)?"""
        self._check('pam_acct_mgmt', _lib.pam_acct_mgmt(self._pamh, 0))

    def setcred(self, flags: int) -> None:
        """``pam_setcred`` (``PAM_ESTABLISH_CRED``, ``PAM_DELETE_CRED``)."""
        self._check('pam_setcred', _lib.pam_setcred(self._pamh, flags))

    def open_session(self) -> None:
        """``pam_open_session``: pam_limits, pam_env, pam_systemd... act on this process."""
        self._check('pam_open_session', _lib.pam_open_session(self._pamh, 0))

    def close_session(self) -> None:
        """``pam_close_session``."""
        self._check('pam_close_session', _lib.pam_close_session(self._pamh, 0))

    def getenvlist(self) -> list[tuple[str, str]]:
        """The PAM environment (``pam_getenvlist``) as ``(name, value)`` pairs, in order."""
        envp = _lib.pam_getenvlist(self._pamh)
        if envp == _ffi.NULL:
            return []
        pairs = []
        try:
            i = 0
            while envp[i] != _ffi.NULL:
                entry = _ffi.string(envp[i]).decode(errors='surrogateescape')
                _libc.free(envp[i])
                name, sep, value = entry.partition('=')
                if sep and name:
                    pairs.append((name, value))
                i += 1
        finally:
            _libc.free(envp)
        return pairs

    def end(self) -> None:
        """``pam_end`` with the last call's status; the handle is unusable afterwards."""
        if self._pamh != _ffi.NULL:
            _lib.pam_end(self._pamh, self._status)
            self._pamh = _ffi.NULL
