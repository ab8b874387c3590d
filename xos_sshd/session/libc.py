"""The few libc calls the standard library does not bind: prctl and the utmpx writers.

cffi in ABI mode (no compiler needed at install time).  The struct layout is glibc's on
64-bit Linux, where ``struct utmpx`` is 384 bytes with 32-bit time fields
(``__WORDSIZE_TIME64_COMPAT32``); a size check at import refuses any other layout rather
than scribbling on /var/run/utmp.
"""

from __future__ import annotations

import cffi

_ffi = cffi.FFI()
_ffi.cdef("""
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);

    struct xos_exit_status { short e_termination; short e_exit; };
    struct xos_timeval32 { int32_t tv_sec; int32_t tv_usec; };
    struct utmpx {
        short ut_type;
        int ut_pid;
        char ut_line[32];
        char ut_id[4];
        char ut_user[32];
        char ut_host[256];
        struct xos_exit_status ut_exit;
        int32_t ut_session;
        struct xos_timeval32 ut_tv;
        int32_t ut_addr_v6[4];
        char __glibc_reserved[20];
    };
    void setutxent(void);
    struct utmpx *pututxline(const struct utmpx *ut);
    void endutxent(void);
    void updwtmpx(const char *wtmpx_file, const struct utmpx *utmpx);
""")
_libc = _ffi.dlopen('libc.so.6')

assert _ffi.sizeof('struct utmpx') == 384, 'unexpected struct utmpx layout'

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_GET_NO_NEW_PRIVS = 39
USER_PROCESS = 7
DEAD_PROCESS = 8
WTMP_FILE = b'/var/log/wtmp'


def set_child_subreaper(on: bool = True) -> None:
    """Adopt orphaned descendants (job inits, once their namespace helper exits) instead of
    letting them go to pid 1; they must then be reaped (:mod:`xos_sshd.cr.reaper`)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(_ffi.errno, 'prctl(PR_SET_CHILD_SUBREAPER) failed')


def utmp_record(kind: int, pid: int, line: str, user: str, host: str, now: float) -> None:
    """Write one utmpx record to utmp and wtmp, as sshd does at session start and end.

    *line* is the tty name without ``/dev/``; the id is its last four bytes, as login(1) does.
    """
    ut = _ffi.new('struct utmpx *')
    ut.ut_type = kind
    ut.ut_pid = pid
    line_b = line.encode()[:32]
    ut.ut_line = line_b
    ut.ut_id = line_b[-4:]
    if kind == USER_PROCESS:
        ut.ut_user = user.encode()[:32]
        ut.ut_host = host.encode()[:256]
    ut.ut_tv.tv_sec = int(now)
    ut.ut_tv.tv_usec = int((now % 1) * 1_000_000)
    _libc.setutxent()
    _libc.pututxline(ut)
    _libc.endutxent()
    _libc.updwtmpx(WTMP_FILE, ut)
