"""Linux-PAM, the application side, through ctypes (``libpam.so.0``, no compiler).

Only what a login service needs for its *session* part, in the order sshd (``UsePAM yes``)
makes the calls: :meth:`PamHandle.start` (``pam_start`` or ``pam_start_confdir``),
``set_item`` (``PAM_RHOST``, ``PAM_TTY``), ``acct_mgmt``, ``setcred``, ``open_session``,
``getenvlist``, ``close_session``, ``end``.  There is no ``pam_authenticate``: the
certificate is the authentication, checked by the gateway before any of this.

This module is loaded in the per-session PAM helper only (:mod:`.pamsession`), never in the
gateway: PAM modules act on the *calling process* (pam_limits sets its rlimits, pam_systemd
moves it into a logind scope, pam_loginuid writes its loginuid), and that process must be
one that belongs to this session alone.

Why ctypes and not cffi: the helper is a fresh interpreter at every session start, and
cffi's ABI mode parsed the declarations with pycparser each time (importing cffi, pycparser
and its lexer tables cost most of a PAM session's start).  ctypes is in the standard library,
needs no parsing and no build step, and lets the helper run without site-packages at all.
The declarations below are the ``<security/pam_appl.h>`` prototypes, one by one.

The conversation answers no prompt (there is nobody to ask: ``PAM_CONV_ERR``, as sshd's
session-time conversation does) and hands ``PAM_TEXT_INFO``/``PAM_ERROR_MSG`` texts to a
Python callback.
"""

from __future__ import annotations

import ctypes

#: typing.TYPE_CHECKING without importing typing (type checkers read it as True).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

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


class _Message(ctypes.Structure):
    _fields_ = [('msg_style', ctypes.c_int), ('msg', ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [('resp', ctypes.c_char_p), ('resp_retcode', ctypes.c_int)]


#: int (*conv)(int, const struct pam_message **, struct pam_response **, void *)
_CONV = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Message)),
                         ctypes.POINTER(ctypes.POINTER(_Response)), ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = [('conv', _CONV), ('appdata_ptr', ctypes.c_void_p)]


_HANDLE = ctypes.c_void_p  # pam_handle_t * (opaque)
_S = ctypes.c_char_p
_I = ctypes.c_int
#: name -> (result type, argument types), as <security/pam_appl.h> declares them.
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    'pam_start': (_I, [_S, _S, ctypes.POINTER(_Conv), ctypes.POINTER(_HANDLE)]),
    'pam_end': (_I, [_HANDLE, _I]),
    'pam_set_item': (_I, [_HANDLE, _I, ctypes.c_void_p]),
    'pam_acct_mgmt': (_I, [_HANDLE, _I]),
    'pam_setcred': (_I, [_HANDLE, _I]),
    'pam_open_session': (_I, [_HANDLE, _I]),
    'pam_close_session': (_I, [_HANDLE, _I]),
    'pam_getenvlist': (ctypes.POINTER(ctypes.c_void_p), [_HANDLE]),
    'pam_strerror': (_S, [_HANDLE, _I]),
}
_START_CONFDIR = (_I, [_S, _S, ctypes.POINTER(_Conv), _S, ctypes.POINTER(_HANDLE)])

_lib: Any = None
_libc: Any = None


class PamError(Exception):
    """A PAM call failed: ``.call`` (``pam_open_session``, ...), ``.code``, and the message
    (``pam_strerror``'s text) as ``str(exc)``."""

    def __init__(self, call: str, code: int, text: str):
        super().__init__(f'{call}: {text}')
        self.call = call
        self.code = code
        self.text = text


def _declare(lib: Any, name: str, proto: tuple[Any, list[Any]]) -> None:
    func = getattr(lib, name)
    func.restype, func.argtypes = proto


def load() -> None:
    """dlopen libpam (once); ``OSError`` when it is not installed."""
    global _lib, _libc
    if _lib is None:
        libc = ctypes.CDLL('libc.so.6')
        libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t] * 2
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
        lib = ctypes.CDLL(LIBPAM)
        for name, proto in _PROTOTYPES.items():
            _declare(lib, name, proto)
        if hasattr(lib, 'pam_start_confdir'):
            _declare(lib, 'pam_start_confdir', _START_CONFDIR)
        _libc, _lib = libc, lib


def has_confdir() -> bool:
    """Whether this libpam has ``pam_start_confdir`` (Linux-PAM >= 1.4)."""
    load()
    return hasattr(_lib, 'pam_start_confdir')


class PamHandle:
    """One PAM transaction (``pam_handle_t``) for one session; not thread-safe, one per process.

    *on_message* gets ``(style, text)`` for each ``PAM_TEXT_INFO``/``PAM_ERROR_MSG`` a module
    sends (motd, "too many logins", ...).
    """

    def __init__(self, on_message: Callable[[int, str], None]):
        load()
        self._on_message = on_message
        self._pamh = _HANDLE()
        self._status = PAM_SUCCESS
        # Kept referenced for the transaction's life: libpam holds pointers to both.
        self._conv_cb = _CONV(self._conversation)
        self._conv_struct = _Conv(self._conv_cb, None)
        self._keep: list[object] = []

    def _conversation(self, num: int, msgs: Any, resp: Any, _data: Any) -> int:
        """The C callback: never lets an exception unwind through libpam."""
        try:
            return self._converse(num, msgs, resp)
        except Exception:  # noqa: BLE001
            return PAM_CONV_ERR

    def _converse(self, num: int, msgs: Any, resp: Any) -> int:
        """The conversation: messages are passed on, prompts refused (nobody to ask)."""
        if num <= 0 or num > PAM_MAX_NUM_MSG:
            return PAM_CONV_ERR
        texts = []
        for i in range(num):
            msg = msgs[i].contents  # Linux-PAM: an array of pointers
            if msg.msg_style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                return PAM_CONV_ERR
            texts.append((int(msg.msg_style),
                          msg.msg.decode(errors='replace') if msg.msg else ''))
        # libpam frees what we return (free() on the array and each non-NULL resp).
        replies = _libc.calloc(num, ctypes.sizeof(_Response))
        if not replies:
            return PAM_BUF_ERR
        resp[0] = ctypes.cast(replies, ctypes.POINTER(_Response))
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
        return text.decode(errors='replace') if text else f'PAM error {code}'

    def start(self, service: str, user: str, confdir: str | None = None) -> None:
        """``pam_start`` (or ``pam_start_confdir`` when *confdir* is given)."""
        out = _HANDLE()
        conv = ctypes.byref(self._conv_struct)
        if confdir is None:
            code = _lib.pam_start(service.encode(), user.encode(), conv, ctypes.byref(out))
        else:
            if not has_confdir():
                raise PamError('pam_start_confdir', -1, 'this libpam has no pam_start_confdir '
                               '(Linux-PAM >= 1.4 needed for session.pam_confdir)')
            code = _lib.pam_start_confdir(service.encode(), user.encode(), conv,
                                          confdir.encode(), ctypes.byref(out))
        if code != PAM_SUCCESS:
            raise PamError('pam_start', code, f'PAM error {code} (service {service!r})')
        self._pamh = out

    def set_item(self, item: int, value: str) -> None:
        """``pam_set_item`` for the string items (``PAM_RHOST``, ``PAM_TTY``, ...)."""
        data = ctypes.create_string_buffer(value.encode())
        self._keep.append(data)  # libpam copies it; kept anyway, as long as the handle
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
        if not envp:
            return []
        pairs = []
        try:
            i = 0
            while envp[i]:
                entry = ctypes.string_at(envp[i]).decode(errors='surrogateescape')
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
        if self._pamh:
            _lib.pam_end(self._pamh, self._status)
            self._pamh = _HANDLE()
