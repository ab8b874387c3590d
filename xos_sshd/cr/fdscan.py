"""What a job holds that CRIU cannot carry: found before the dump, refused with a reason.

Run as root over ``/proc`` (kernel data, never a user's path).  A job is checkpointable when:

* every process of its PID namespace except the init is in the tree under the job's root
  (CRIU dumps one tree; a daemon re-parented to the init would be left behind);
* it holds no TCP, UDP or raw IP socket.  CRIU 4.1.1 cannot dump any of them on kernels
  >= 6.16 (the kernel restricts SO_PASSCRED; CRIU issues #2705/#2718, fixed after 4.1.1), and an
  established connection would not survive a migration anyway;
* no packet or netlink socket;
* every connected unix socket has its peer inside the tree (asked through sock_diag: a socket
  connected to a daemon outside the job, the gateway or another job, is external);
* every pipe has both its read and its write end inside the tree;
* every terminal it uses has its master inside the tree;
* no process runs under a seccomp filter: an unprivileged CRIU cannot suspend seccomp to
  dump it (PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN; measured: "suspending seccomp
  failed: Operation not permitted").  A filter can come from the job itself or be inherited
  from the gateway (systemd's SystemCallFilter=, RestrictAddressFamilies=, LockPersonality=,
  RestrictRealtime=, ProtectClock=, ProtectKernel*= all install one).

Regular files, deleted files, memfds, eventfds, timerfds, signalfds, epoll and pipes or
socketpairs between the job's own processes are fine.  Each problem is reported with the
kind of resource, its address or inode, and the process (pid, name) and fd holding it.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED = 1
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER = 0x1, 0x4
UNIX_DIAG_NAME, UNIX_DIAG_PEER = 0, 2
TCP_STATES = {1: 'ESTABLISHED', 2: 'SYN_SENT', 3: 'SYN_RECV', 4: 'FIN_WAIT1', 5: 'FIN_WAIT2',
              6: 'TIME_WAIT', 7: 'CLOSE', 8: 'CLOSE_WAIT', 9: 'LAST_ACK', 10: 'LISTEN',
              11: 'CLOSING'}
INET_REASON = ('CRIU cannot checkpoint TCP/UDP sockets on this kernel (>= 6.16 restricts '
               'SO_PASSCRED; CRIU issues #2705/#2718, fixed after 4.1.1) and a connection '
               'would not survive a restart or migration anyway: close it before checkpointing')


@dataclass(frozen=True)
class Holder:
    """One descriptor: which process holds it."""

    pid: int
    name: str
    fd: int

    def __str__(self) -> str:
        return f'pid {self.pid} ({self.name}) fd {self.fd}'


class NotCheckpointable(Exception):
    """The job holds something CRIU cannot carry; ``problems`` lists each, ``str`` all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__('; '.join(problems))
        self.problems = problems


def _ppid_and_name(pid: int) -> tuple[int, str] | None:
    try:
        with open(f'/proc/{pid}/stat') as f:
            stat = f.read()
    except OSError:
        return None
    name = stat[stat.index('(') + 1:stat.rindex(')')]
    fields = stat[stat.rindex(')') + 2:].split()
    if fields[0] in ('Z', 'X'):  # zombies hold nothing and are not dumped
        return None
    return int(fields[1]), name


def process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, name)`` for every live process (host pids)."""
    table = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            info = _ppid_and_name(int(entry))
            if info:
                table[int(entry)] = info
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """*root* and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def host_pid_of(init_pid: int, ns_pid: int, table: dict[int, tuple[int, str]]) -> int | None:
    """The host pid of the process that is *ns_pid* in the namespace led by *init_pid*."""
    for pid in descendants(init_pid, table):
        try:
            with open(f'/proc/{pid}/status') as f:
                for line in f:
                    if line.startswith('NSpid:'):
                        ids = line.split()[1:]
                        if len(ids) >= 2 and int(ids[-1]) == ns_pid:
                            return pid
                        break
        except OSError:
            continue
    return None


def _inet_table() -> dict[int, str]:
    """socket inode -> description, for TCP/UDP/raw over IPv4 and IPv6 (host namespace)."""
    out = {}
    for proto in ('tcp', 'tcp6', 'udp', 'udp6', 'raw', 'raw6', 'udplite', 'udplite6'):
        try:
            with open(f'/proc/net/{proto}') as f:
                next(f)
                for line in f:
                    p = line.split()
                    ino = int(p[9])
                    state = TCP_STATES.get(int(p[3], 16), p[3]) if proto.startswith('tcp') else ''
                    desc = f'{proto.upper().rstrip("6")} socket {_addr(p[1])} -> {_addr(p[2])}'
                    out[ino] = desc + (f' ({state})' if state else '')
        except (OSError, StopIteration):
            continue
    return out


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(':')
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc prints IPv6 as four host-order 32-bit words
        ip = '[' + socket.inet_ntop(socket.AF_INET6, b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4))) + ']'
    return f'{ip}:{int(port, 16)}'


def _other_sockets() -> dict[int, str]:
    out = {}
    for proto, label in (('packet', 'packet socket'), ('netlink', 'netlink socket')):
        try:
            with open(f'/proc/net/{proto}') as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p:
                        out[int(p[-1] if proto == 'netlink' else p[8])] = label
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return out


def unix_sockets() -> dict[int, tuple[int, str, bool]]:
    """Every unix socket of this network namespace:
    ``inode -> (peer inode, bound name, connected)``.  A connection not yet accepted has
    peer inode 0 (the listener's embryo socket has no inode)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        req = struct.pack('=BBHIIIII', socket.AF_UNIX, 0, 0, 0xffffffff, 0,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xffffffff, 0xffffffff)
        hdr = struct.pack('=IHHII', 16 + len(req), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.sendto(hdr + req, (0, 0))
        out: dict[int, tuple[int, str, bool]] = {}
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, _seq, _pid = struct.unpack_from('=IHHII', data, off)
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from('=i', data, off + 16)[0], 'sock_diag failed')
                if length < 16:
                    raise OSError(0, 'malformed sock_diag reply')
                _fam, _typ, state, _pad, ino = struct.unpack_from('=BBBBI', data, off + 16)
                peer, name = 0, ''
                a = off + 16 + 16  # after struct unix_diag_msg
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from('=HH', data, a)
                    if alen < 4:
                        break
                    payload = data[a + 4:a + alen]
                    if atype == UNIX_DIAG_PEER and len(payload) >= 4:
                        peer = struct.unpack_from('=I', payload)[0]
                    elif atype == UNIX_DIAG_NAME:
                        name = ('@' + payload[1:].decode(errors='replace') if payload[:1] == b'\0'
                                else payload.decode(errors='replace').rstrip('\0'))
                    a += (alen + 3) & ~3
                out[ino] = (peer, name, state == TCP_ESTABLISHED)
                off += (length + 3) & ~3
    finally:
        sock.close()


def _seccomp_mode(pid: int) -> int:
    """0 none, 1 strict, 2 filter (``Seccomp:`` of /proc/PID/status)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('Seccomp:'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _access_mode(pid: int, fd: int) -> int:
    """0 read-only, 1 write-only, 2 read-write (from fdinfo ``flags``)."""
    with open(f'/proc/{pid}/fdinfo/{fd}') as f:
        for line in f:
            if line.startswith('flags:'):
                return int(line.split()[1], 8) & 3
    return 2


def scan(init_pid: int, root_pid: int) -> list[str]:
    """Problems that keep the job (namespace led by host pid *init_pid*, tree rooted at host
    pid *root_pid*) from being checkpointed; empty when there is none."""
    table = process_table()
    tree = descendants(root_pid, table)
    problems = [f'process {pid} ({table[pid][1]}) is outside the job\'s process tree (it was '
                're-parented to the job\'s init, e.g. a daemon): CRIU would leave it behind'
                for pid in sorted(set(descendants(init_pid, table)) - set(tree) - {init_pid})]
    sockets: dict[int, list[Holder]] = {}
    pipes: dict[str, list[tuple[Holder, int]]] = {}
    ttys: dict[str, list[Holder]] = {}
    has_ptmx = False
    for pid in tree:
        seccomp = _seccomp_mode(pid)
        if seccomp:
            problems.append(f'process {pid} ({table[pid][1]}) runs under a seccomp '
                            f'{"filter" if seccomp == 2 else "strict mode"} (inherited from the '
                            'gateway\'s service unit or set by the job): an unprivileged CRIU '
                            'cannot suspend seccomp to dump it')
        try:
            fds = [int(n) for n in os.listdir(f'/proc/{pid}/fd')]
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError:
                continue
            holder = Holder(pid, table[pid][1], fd)
            if target.startswith('socket:['):
                sockets.setdefault(int(target[8:-1]), []).append(holder)
            elif target.startswith('pipe:['):
                try:
                    pipes.setdefault(target, []).append((holder, _access_mode(pid, fd)))
                except OSError:
                    continue
            elif target == '/dev/ptmx' or target.startswith('/dev/pts/ptmx'):
                has_ptmx = True
            elif target.startswith(('/dev/pts/', '/dev/tty')):
                ttys.setdefault(target, []).append(holder)
    if sockets:
        inet, other, unix = _inet_table(), _other_sockets(), unix_sockets()
        for ino, holders in sorted(sockets.items()):
            where = ', '.join(map(str, holders))
            if ino in inet:
                problems.append(f'{inet[ino]} held by {where}: {INET_REASON}')
            elif ino in other:
                problems.append(f'{other[ino]} (inode {ino}) held by {where}: CRIU cannot carry it')
            elif ino in unix:
                peer, name, connected = unix[ino]
                if connected and peer not in sockets:
                    peer_name = unix.get(peer, (0, '', False))[1] if peer else ''
                    label = name or peer_name or f'socket:[{ino}]'
                    peer_desc = f'peer inode {peer}' if peer else 'its connection not yet accepted'
                    problems.append(f'unix socket {label} held by {where} is connected to a '
                                    f'process outside the job ({peer_desc}): CRIU cannot '
                                    'carry external sockets')
    for target, ends in sorted(pipes.items()):
        modes = {m for _, m in ends}
        if 2 not in modes and len(modes) == 1:
            missing = 'write' if modes == {0} else 'read'
            where = ', '.join(str(h) for h, _ in ends)
            problems.append(f'{target} is held by {where} but its {missing} end is outside '
                            'the job: CRIU cannot carry external pipes')
    if ttys and not has_ptmx:
        for target, holders in sorted(ttys.items()):
            problems.append(f'terminal {target} held by {", ".join(map(str, holders))} belongs '
                            'to a session outside the job: CRIU cannot carry it')
    return problems


def check_checkpointable(init_pid: int, root_pid: int) -> None:
    """Raise :class:`NotCheckpointable` listing every problem :func:`scan` finds."""
    problems = scan(init_pid, root_pid)
    if problems:
        raise NotCheckpointable(problems)
