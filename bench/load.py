#!/usr/bin/env python3
"""Load on loopback: 1,000 sessions on xos-sshd, then 200 logins/s on it and on OpenSSH's sshd.

One real ``xos-sshd`` (started here, ``log_level = "warning"``, dynamic VO), one stock OpenSSH
``sshd`` (bench/openssh_ref.py: ``TrustedUserCAKeys`` = the same VO CA, the certificates'
principals mapped to root by ``AuthorizedPrincipalsFile``, no PAM, ``MaxStartups`` as the
gateway's) and asyncssh clients in this one process (uvloop), offering both servers the same
algorithms (:data:`CLIENT_ALGS`: curve25519-sha256, aes128-gcm, ssh-ed25519 host key):

Phase 1  open ``--sessions`` connections to xos-sshd (at most ``--open-concurrency``
         handshakes at a time), each with a session running ``cat`` as the mapped account; a
         session is *held* when, with all of them open at once, it echoes a line back.  Then
         close them all.
Phase 2  legs of ``--duration`` s each, every one starting logins at ``--rate``/s on an
         open-loop schedule (a start is skipped, and counted, when ``--max-inflight`` logins
         are already running), one after the other:
         * xos-sshd, mixed: 80 % valid (X.509 and OpenSSH-certificate routes, exec ``true``,
           exit status 0) and 20 % hostile (expired, foreign CA of the same VO name, revoked,
           tampered TBS, plain key, valid cert asking for ``root``).  A valid login must be
           accepted, a hostile one refused.
         * xos-sshd and OpenSSH sshd, same load: only the valid OpenSSH-certificate logins (the
           same key and certificate objects, exec ``true``, exit 0; as root on OpenSSH), in
           turn (which server goes first alternates by round).
         ``logins_per_s`` is the mixed leg's completed logins (accepted or refused) per second;
         ``logins_per_s_ratio`` compares the two same-load legs (``xos_cert_logins_per_s`` /
         ``openssh_logins_per_s``).  The offered 200/s is beyond what a 2-core machine
         completes for either server (the client shares the machine), so the rates measure
         capacity on this machine and are noisy; the ratio, taken minutes apart on the same
         machine with the same client, is the comparable figure.  The table also gives p50/p99
         latency and server CPU per login (the listening process and all its descendants: the
         per-connection sshd processes, the sessions; reaped children included).

The gateway's ``[limits]`` are set for a load test from one machine (see :data:`LIMITS`, printed
at start): every client connects from 127.0.0.1, so loopback is exempt from the per-source
penalties (the hostile logins would otherwise get 127.0.0.1 refused, valid logins with it),
``max_startups`` is far above ``--max-inflight`` + ``--open-concurrency``, there is no
per-source startup cap and no per-account session cap (``--users`` accounts share
``--sessions`` sessions).  The defaults (10:30:100, 10 per source, penalties) are for a
gateway facing the internet; tests/test_limits.py shows them bite.

Gateway RSS (VmRSS) and open fds are read from /proc before phase 1 (after a warm-up login of
every user, so the mappings exist), with the sessions held, after phase 1, and after phase 2
(after ``--settle`` s); ``--rounds N`` repeats phase 2 to tell a leak from a high-water
mark.  Exits 1 when a valid login was refused (by either server) or a hostile one accepted
(or a server died).  The fd limit is raised to the hard limit here and both servers inherit
it: the gateway needs about 5 fds per exec session (socket, pidfd, 3 pipes).

Installs nothing (run `make test` once first, for openssh-server and the venv); run as root:
    .venv/bin/python bench/load.py [--sessions 1000] [--rate 200] [--duration 30]
Ends with: RESULT sessions_held=<n> logins_per_s=<n> rss_growth_mb=<n> openssh_logins_per_s=<n>
           logins_per_s_ratio=<xos/openssh> xos_cert_logins_per_s=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import asyncssh
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
from auth_certs import make_ca, make_leaf, now_utc, split_certificate
from gatewayproc import (
    VOCA,
    GatewayProcess,
    free_uid_range,
    kill_uid_processes,
    release_uid_range,
)

from openssh_ref import OpenSSHServer, start_openssh

from xos_sshd.auth.ca import CertificateAuthority, issue

VO = 'load'
NOFILE_WANTED = 65536
LOGIN_TIMEOUT = 30.0  # one client login, handshake to exit status
#: What the client offers, to both servers: the reference's config (bench/openssh_ref.py)
#: allows only these, so xos-sshd is held to the same crypto.
CLIENT_ALGS = {'kex_algs': ['curve25519-sha256'], 'encryption_algs': ['aes128-gcm@openssh.com'],
               'server_host_key_algs': ['ssh-ed25519']}
#: The gateway's [limits] for this benchmark (module docstring: why not the defaults).
LIMITS = {'penalty_exempt': ['127.0.0.0/8', '::1/128'], 'max_startups': '2000:30:4000',
          'max_startups_per_source': 0, 'max_sessions_per_account': 0}


# --- credentials ------------------------------------------------------------------------------

@dataclass
class Cred:
    """One way to log in: a name, a login name, and prebuilt asyncssh client options."""

    kind: str
    login: str
    options: asyncssh.SSHClientConnectionOptions
    valid: bool


def _options(login: str, key: asyncssh.SSHKey, cert: object | None) -> asyncssh.SSHClientConnectionOptions:
    keys = [(key, cert)] if cert is not None else [key]
    # Built once per credential: asyncssh re-parses keys and config on every connect otherwise.
    return asyncssh.SSHClientConnectionOptions(
        username=login, known_hosts=None, agent_path=None, client_keys=keys, config=[],
        password=None, kbdint_auth=False, gss_host=None, host_based_auth=False,
        connect_timeout=LOGIN_TIMEOUT, **CLIENT_ALGS)


def _ssh_key(private) -> asyncssh.SSHKey:
    return asyncssh.import_private_key(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _x509(cert: x509.Certificate | bytes) -> object:
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return asyncssh.import_certificate(der)


def make_credentials(base: Path, ca_dir: VOCA, users: int) -> tuple[list[Cred], list[Cred]]:
    """Valid credentials (each user by both routes) and one credential per hostile kind."""
    ca = CertificateAuthority.load(ca_dir.dir)
    creds = base / 'creds'
    creds.mkdir()
    valid = []
    for n in range(users):
        user = f'u{n:03d}'
        cred = issue(ca, user, creds / user, groups=['staff'], hours=2)
        key = _ssh_key(cred.key)
        valid.append(Cred('valid-x509', user, _options(user, key, _x509(cred.cert)), True))
        ssh_cert = asyncssh.read_certificate(str(cred.ssh_cert_path))
        valid.append(Cred('valid-openssh', user, _options(user, key, ssh_cert), True))

    hostile = []
    # Expired a day ago (far beyond the clock skew tolerance).
    start = now_utc() - timedelta(days=2)
    cert, key = make_leaf(ca, user='u000', not_before=start, not_after=start + timedelta(days=1))
    hostile.append(Cred('expired', 'u000', _options('u000', _ssh_key(key), _x509(cert)), False))
    # A different CA that claims the same VO name and subject.
    rogue = make_ca(base, VO, name='rogue-ca')
    cert, key = make_leaf(rogue, user='u000')
    hostile.append(Cred('foreign-ca', 'u000', _options('u000', _ssh_key(key), _x509(cert)), False))
    # Properly issued, then revoked in the CRL before the gateway starts.
    revoked = issue(ca, 'revoked', creds / 'revoked', hours=2)
    ca_dir.revoke(creds / 'revoked')
    hostile.append(Cred('revoked', 'revoked',
                        _options('revoked', _ssh_key(revoked.key), _x509(revoked.cert)), False))
    # A valid certificate of "evil" whose TBS was edited to say "u000" (CN and XOS user
    # attribute), signature kept: impersonation of an existing, mapped user.
    cert, key = make_leaf(ca, user='evil', groups=('staff',))
    tbs, alg, sig = split_certificate(cert.public_bytes(serialization.Encoding.DER))
    assert tbs.count(b'evil') == 2, tbs.count(b'evil')
    body = tbs.replace(b'evil', b'u000') + alg + sig
    forged = b'\x30' + _der_len(len(body)) + body
    hostile.append(Cred('tampered', 'u000', _options('u000', _ssh_key(key), _x509(forged)), False))
    # No certificate at all.
    plain = ec.generate_private_key(ec.SECP256R1())
    hostile.append(Cred('plain-key', 'u000', _options('u000', _ssh_key(plain), None), False))
    # A valid certificate asking for root.
    u0 = valid[0]
    hostile.append(Cred('login-root', 'root', asyncssh.SSHClientConnectionOptions(
        options=u0.options, username='root'), False))
    return valid, hostile


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, 'big')
    return bytes([0x80 | len(body)]) + body


# --- gateway process facts --------------------------------------------------------------------

@dataclass
class Snapshot:
    label: str
    rss_kb: int
    fds: int
    threads: int
    children: int
    cpu_s: float
    fd_kinds: Counter[str] = field(default_factory=Counter)


def snapshot(label: str, pid: int, uid_range: tuple[int, int]) -> Snapshot:
    status = Path(f'/proc/{pid}/status').read_text()
    fields = dict(line.split(':', 1) for line in status.splitlines() if ':' in line)
    stat = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf('SC_CLK_TCK')
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
        except FileNotFoundError:
            continue
        kinds[target.split(':[')[0] if ':[' in target else target] += 1
    return Snapshot(label, int(fields['VmRSS'].split()[0]), sum(kinds.values()),
                    int(fields['Threads']), count_uid_processes(uid_range), cpu, kinds)


def tree_cpu(pid: int) -> float:
    """CPU seconds of *pid* and all its descendants, live ones and those already reaped
    (cutime and cstime: sshd and the gateway wait for their children at every level)."""
    tick = os.sysconf('SC_CLK_TCK')
    stats: dict[int, list[str]] = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path(f'/proc/{entry}/stat').read_text()
                stats[int(entry)] = stat.rsplit(')', 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                pass
    if pid not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for p, st in stats.items():
        children.setdefault(int(st[1]), []).append(p)
    total = sum(int(x) for x in stats[pid][11:15])
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        total += sum(int(x) for x in stats[p][11:15])
        todo += children.get(p, ())
    return total / tick


def count_descendants(pid: int) -> int:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                ppid = int(Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    n, todo = 0, list(kids.get(pid, ()))
    while todo:
        n += 1
        todo += kids.get(todo.pop(), ())
    return n


def count_uid_processes(uid_range: tuple[int, int]) -> int:
    n = 0
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                n += uid_range[0] <= os.stat(f'/proc/{entry}').st_uid <= uid_range[1]
            except FileNotFoundError:
                pass
    return n


def nofile_limit(pid: int) -> str:
    for line in Path(f'/proc/{pid}/limits').read_text().splitlines():
        if line.startswith('Max open files'):
            soft, hard = line.split()[3:5]
            return f'{soft}/{hard}'
    return '?'


def raise_nofile() -> tuple[int, int]:
    """Raise this process's fd limit (the gateway, started from here, inherits it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, NOFILE_WANTED)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root: CAP_SYS_RESOURCE
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def process_limits() -> list[str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return 'n/a'
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    cgroup = 'n/a'
    for line in read('/proc/self/cgroup').splitlines():
        parts = line.split(':', 2)
        if len(parts) == 3 and (parts[1] in ('pids', '')):
            for root in (f'/sys/fs/cgroup/pids{parts[2]}', f'/sys/fs/cgroup{parts[2]}'):
                if os.path.exists(f'{root}/pids.max'):
                    cgroup = read(f'{root}/pids.max')
                    break
            else:
                cgroup = 'none'
            if cgroup != 'n/a':
                break
    return [f'pid_max={read("/proc/sys/kernel/pid_max")}',
            f'threads-max={read("/proc/sys/kernel/threads-max")}',
            f'RLIMIT_NPROC={nproc[0]}', f'cgroup pids.max={cgroup}']


# --- phase 1: held sessions -------------------------------------------------------------------

@dataclass
class Held:
    conn: asyncssh.SSHClientConnection
    proc: asyncssh.SSHClientProcess


async def open_session(port: int, cred: Cred, n: int) -> Held:
    conn = await asyncio.wait_for(asyncssh.connect('127.0.0.1', port, options=cred.options),
                                  LOGIN_TIMEOUT)
    try:
        proc = await conn.create_process('cat')
        proc.stdin.write(f'hello {n}\n')
        line = await asyncio.wait_for(proc.stdout.readline(), LOGIN_TIMEOUT)
        if line != f'hello {n}\n':
            raise RuntimeError(f'session {n} echoed {line!r}')
        return Held(conn, proc)
    except BaseException:
        conn.abort()
        raise


async def ping(held: Held, n: int) -> bool:
    try:
        held.proc.stdin.write(f'still {n}\n')
        return await asyncio.wait_for(held.proc.stdout.readline(), 20) == f'still {n}\n'
    except (TimeoutError, OSError, asyncssh.Error):
        return False


async def close_session(held: Held) -> None:
    try:
        held.proc.stdin.write_eof()
        await asyncio.wait_for(held.proc.wait_closed(), 10)
    except (TimeoutError, OSError, asyncssh.Error):
        pass
    held.conn.close()
    try:
        await asyncio.wait_for(held.conn.wait_closed(), 10)
    except TimeoutError:
        held.conn.abort()


async def phase1(port: int, valid: list[Cred], sessions: int, concurrency: int,
                 budget: float, on_held) -> dict:
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + budget
    errors: Counter[str] = Counter()
    opened: list[tuple[int, Held]] = []
    t0 = time.monotonic()

    async def one(n: int) -> None:
        async with sem:
            if time.monotonic() > deadline:
                errors['not started (time budget)'] += 1
                return
            try:
                opened.append((n, await open_session(port, valid[n % len(valid)], n)))
            except asyncssh.PermissionDenied:
                errors['permission denied'] += 1
            except (TimeoutError, OSError, asyncssh.Error, RuntimeError) as exc:
                errors[f'{type(exc).__name__}: {exc}'[:90]] += 1

    await asyncio.gather(*(one(n) for n in range(sessions)))
    open_s = time.monotonic() - t0
    alive = await asyncio.gather(*(ping(h, n) for n, h in opened))
    held = sum(alive)
    extra = on_held()
    t1 = time.monotonic()
    await asyncio.gather(*(close_session(h) for _, h in opened))
    return dict(opened=len(opened), held=held, open_s=open_s, close_s=time.monotonic() - t1,
                errors=errors, **extra)


# --- phase 2: login rate ----------------------------------------------------------------------

@dataclass
class Tally:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    latency_valid: list[float] = field(default_factory=list)
    latency_hostile: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    started: int = 0
    max_lag: float = 0.0
    last_done: float = 0.0


async def login(port: int, cred: Cred) -> str:
    """'accepted' (the command ran, exit 0), 'refused' (auth failed) or raises."""
    async def attempt() -> str:
        try:
            conn = await asyncssh.connect('127.0.0.1', port, options=cred.options)
        except asyncssh.PermissionDenied:
            return 'refused'
        async with conn:
            result = await conn.run('true')
            if result.exit_status != 0:
                raise RuntimeError(f'exit status {result.exit_status}: {result.stderr!r}'[:80])
            return 'accepted'
    return await asyncio.wait_for(attempt(), LOGIN_TIMEOUT)


def mix(valid: list[Cred], hostile: list[Cred], hostile_every: int) -> Callable[[int], Cred]:
    """Slot i's credential: hostile in 1 slot of *hostile_every* (none when 0), else valid;
    each list taken in turn."""
    turn = {'valid': 0, 'hostile': 0}

    def pick(i: int) -> Cred:
        kind = 'hostile' if hostile_every and i % hostile_every == hostile_every - 1 else 'valid'
        creds = hostile if kind == 'hostile' else valid
        turn[kind] += 1
        return creds[(turn[kind] - 1) % len(creds)]
    return pick


async def phase2(port: int, pick: Callable[[int], Cred], rate: float, duration: float,
                 max_inflight: int, tally: Tally) -> float:
    """One leg: logins started at *rate*/s for *duration* s; seconds from the first start
    to the last completion."""
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()

    async def one(cred: Cred) -> None:
        t = time.monotonic()
        try:
            outcome = await login(port, cred)
        except (TimeoutError, OSError, asyncssh.Error, RuntimeError) as exc:
            outcome = 'error'
            tally.errors[f'{cred.kind}: {type(exc).__name__}: {exc}'[:100]] += 1
        dt = time.monotonic() - t
        tally.outcomes[(cred.kind, outcome)] += 1
        if outcome != 'error':
            (tally.latency_valid if cred.valid else tally.latency_hostile).append(dt)
        tally.last_done = time.monotonic()

    total = int(rate * duration)
    t_start = time.monotonic()
    start = loop.time()
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            tally.max_lag = max(tally.max_lag, -delay)
        if len(inflight) >= max_inflight:
            tally.skipped += 1
            continue
        task = asyncio.create_task(one(pick(i)))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        tally.started += 1
    t_schedule_end = time.monotonic()
    if inflight:
        await asyncio.wait(set(inflight), timeout=LOGIN_TIMEOUT + 5)
    return max(tally.last_done, t_schedule_end) - t_start


# --- the run ----------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float('nan')
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def warm_up(port: int, valid: list[Cred]) -> None:
    """One login per user, so every mapping and home exists before 'before' is measured."""
    seen: dict[str, Cred] = {}
    for cred in valid:
        seen.setdefault(cred.login, cred)
    sem = asyncio.Semaphore(8)

    async def one(cred: Cred) -> None:
        async with sem:
            outcome = await login(port, cred)
            if outcome != 'accepted':
                raise SystemExit(f'warm-up login of {cred.login} was {outcome}')
    await asyncio.gather(*(one(c) for c in seen.values()))
    for cred in (valid[0], valid[1]):  # both routes work
        if await login(port, cred) != 'accepted':
            raise SystemExit(f'warm-up {cred.kind} login refused')


async def settle(busy: Callable[[], int], seconds: float) -> None:
    """Wait until *busy* () counts no process left (at most *seconds*), then a little more."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and busy():
        await asyncio.sleep(0.2)
    await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


@dataclass
class Leg:
    """One server under one load in phase 2, summed over the rounds."""

    server: str
    load: str
    port: int
    pid: int  # the server's listening process
    pick: Callable[[int], Cred]
    idle: Callable[[], int]  # processes still busy (for settle)
    tally: Tally = field(default_factory=Tally)
    elapsed: float = 0.0
    own_cpu: float = 0.0  # the listening process alone
    server_cpu: float = 0.0  # it and every descendant (per-connection sshd, session processes)
    client_cpu: float = 0.0

    def count(self, valid: bool, outcome: str) -> int:
        return sum(n for (kind, o), n in self.tally.outcomes.items()
                   if kind.startswith('valid') == valid and o == outcome)

    @property
    def completed(self) -> int:
        return sum(n for (_, o), n in self.tally.outcomes.items() if o != 'error')

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0


def own_cpu(pid: int) -> float:
    stat = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf('SC_CLK_TCK')


async def run_leg(leg: Leg, args: argparse.Namespace) -> None:
    """One leg of phase 2, then settle; CPU is read after the settle, once every session
    process has been reaped (its CPU is then in the server's cutime)."""
    t0, o0, c0 = tree_cpu(leg.pid), own_cpu(leg.pid), sum(os.times()[:2])
    leg.elapsed += await phase2(leg.port, leg.pick, args.rate, args.duration, args.max_inflight,
                                leg.tally)
    leg.client_cpu += sum(os.times()[:2]) - c0
    await settle(leg.idle, args.settle)
    leg.server_cpu += tree_cpu(leg.pid) - t0
    leg.own_cpu += own_cpu(leg.pid) - o0


def ms(seconds: float) -> str:
    return '-' if seconds != seconds else f'{seconds * 1000:.0f}'  # NaN: no sample


async def run(args: argparse.Namespace, gw: GatewayProcess, sshd: OpenSSHServer,
              valid: list[Cred], hostile: list[Cred], reference: list[Cred],
              uid_range: tuple[int, int]) -> int:
    pid = gw.proc.pid
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    snaps: list[Snapshot] = []
    client_cpu0 = sum(os.times()[:2])
    await warm_up(gw.port, valid)
    for cred in reference[:2]:
        if (outcome := await login(sshd.port, cred)) != 'accepted':
            raise SystemExit(f'OpenSSH reference: warm-up login was {outcome}\n'
                             f'{sshd.log()[-2000:]}')
    gw_idle = lambda: count_uid_processes(uid_range)  # noqa: E731
    await settle(gw_idle, args.settle)
    snaps.append(snapshot('before', pid, uid_range))

    cpu_mark = {}

    def on_held() -> dict:
        snaps.append(snapshot('sessions held', pid, uid_range))
        return {}

    c0 = sum(os.times()[:2])
    p1 = await phase1(gw.port, valid, args.sessions, args.open_concurrency, args.open_budget,
                      on_held)
    cpu_mark['p1_client'] = sum(os.times()[:2]) - c0
    await settle(gw_idle, args.settle)
    snaps.append(snapshot('after phase 1', pid, uid_range))

    # Phase 2: per round the mixed load on xos-sshd, then the same valid OpenSSH-certificate
    # logins on both servers in turn (which one first alternates by round).
    certs = [c for c in valid if c.kind == 'valid-openssh']
    sshd_pid = sshd.proc.pid
    mixed = Leg('xos-sshd', f'mixed (1 in {args.hostile_every} hostile)', gw.port, pid,
                mix(valid, hostile, args.hostile_every), gw_idle)
    xos_same = Leg('xos-sshd', 'OpenSSH certs', gw.port, pid, mix(certs, [], 0), gw_idle)
    ref = Leg('OpenSSH sshd', 'OpenSSH certs', sshd.port, sshd_pid, mix(reference, [], 0),
              lambda: count_descendants(sshd_pid))
    for round_no in range(1, args.rounds + 1):
        for leg in (mixed, *((xos_same, ref) if round_no % 2 else (ref, xos_same))):
            await run_leg(leg, args)
        snaps.append(snapshot('after phase 2' + (f'.{round_no}' if args.rounds > 1 else ''),
                              pid, uid_range))
    tally, elapsed = mixed.tally, mixed.elapsed
    alive = gw.alive()
    audit = Counter((r.get('outcome'), r.get('reason')) for r in gw.audit()
                    if r.get('event') == 'login')

    # --- report ---
    print(f'\nphase 1: {args.sessions} sessions requested, {p1["opened"]} opened in '
          f'{p1["open_s"]:.1f} s ({p1["opened"] / p1["open_s"]:.0f}/s, '
          f'{args.open_concurrency} handshakes at a time), {p1["held"]} held '
          f'(echoed with all open), closed in {p1["close_s"]:.1f} s')
    for err, n in p1['errors'].most_common(5):
        print(f'  {n:>5} x {err}')

    print(f'\n{"snapshot":<16} {"RSS MB":>8} {"fds":>6} {"threads":>8} {"user procs":>11} '
          f'{"gw CPU s":>9}')
    for s in snaps:
        print(f'{s.label:<16} {s.rss_kb / 1024:>8.1f} {s.fds:>6} {s.threads:>8} {s.children:>11} '
              f'{s.cpu_s:>9.1f}')

    kinds = [c.kind for c in valid[:2]] + [c.kind for c in hostile]
    print(f'\nphase 2, xos-sshd, mixed load: {tally.started} logins started in {args.rounds} x '
          f'{args.duration:.0f} s at {args.rate:.0f}/s offered (1 in {args.hostile_every} '
          f'hostile), {tally.skipped} skipped at {args.max_inflight} in flight, '
          f'scheduler max lag {tally.max_lag * 1000:.0f} ms')
    print(f'{"kind":<14} {"accepted":>9} {"refused":>8} {"error":>6}')
    for kind in kinds:
        print(f'{kind:<14} {tally.outcomes[(kind, "accepted")]:>9} '
              f'{tally.outcomes[(kind, "refused")]:>8} {tally.outcomes[(kind, "error")]:>6}')
    for err, n in tally.errors.most_common(6):
        print(f'  {n:>5} x {err}')
    # asyncssh offers a refused certificate's bare key next: one more not-a-certificate line
    # per hostile attempt.
    print('audit log, login lines (whole run): ' + ', '.join(
        f'{o} {r}: {n}' for (o, r), n in sorted(audit.items(), key=lambda kv: -kv[1])))
    v_acc, v_ref, v_err = (mixed.count(True, o) for o in ('accepted', 'refused', 'error'))
    h_acc, h_ref, h_err = (mixed.count(False, o) for o in ('accepted', 'refused', 'error'))
    rate = mixed.rate
    before, after = snaps[0], snaps[-1]
    rss_growth = (after.rss_kb - before.rss_kb) / 1024
    fd_growth = after.fds - before.fds
    print(f'\n{"metric":<34} {"value":>12}')
    rows = [
        ('sessions_held', f'{p1["held"]}/{args.sessions}'),
        ('valid accepted', v_acc), ('valid_refused', v_ref), ('valid errored', v_err),
        ('hostile refused', h_ref), ('hostile_accepted', h_acc), ('hostile errored', h_err),
        ('logins completed per s', f'{rate:.1f}'),
        ('valid accepted per s', f'{v_acc / elapsed:.1f}' if elapsed > 0 else '-'),
        ('valid latency p50 ms', ms(pct(tally.latency_valid, 0.5))),
        ('valid latency p99 ms', ms(pct(tally.latency_valid, 0.99))),
        ('hostile latency p50 ms', ms(pct(tally.latency_hostile, 0.5))),
        ('hostile latency p99 ms', ms(pct(tally.latency_hostile, 0.99))),
        ('gateway CPU in phase 2 (cores)', f'{mixed.own_cpu / elapsed:.2f}'),
        ('client CPU in phase 2 (cores)', f'{mixed.client_cpu / elapsed:.2f}'),
        ('gateway CPU ms per login', f'{mixed.own_cpu / max(mixed.completed, 1) * 1000:.1f}'),
        ('rss growth MB (after2-before)', f'{rss_growth:.1f}'),
        ('rss growth MB (after2-after1)', f'{(after.rss_kb - snaps[2].rss_kb) / 1024:.1f}'),
        ('fd growth (after2-before)', fd_growth),
        ('gateway alive', alive),
    ]
    for name, value in rows:
        print(f'{name:<34} {value!s:>12}')

    # The reference.  "server CPU" is the listening process and all its descendants (the
    # per-connection sshd processes, the sessions' shells); "client" is this process.
    print(f'\nphase 2, both servers: each leg offers {args.rate:.0f} logins/s for '
          f'{args.duration:.0f} s (x {args.rounds}), at most {args.max_inflight} in flight; '
          f'"OpenSSH certs" = the valid OpenSSH-certificate logins only (exec true, exit 0), '
          f'the same key and certificate objects on both (OpenSSH maps their principals to '
          f'root)')
    print(f'{"server":<13} {"load":<24} {"started":>7} {"skipped":>7} {"accepted":>8} '
          f'{"refused":>7} {"error":>5} {"done/s":>7} {"p50 ms":>7} {"p99 ms":>7} '
          f'{"srv CPU ms/login":>16} {"srv cores":>9} {"client cores":>12}')
    for leg in (mixed, xos_same, ref):
        t = leg.tally
        accepted = leg.count(True, 'accepted') + leg.count(False, 'accepted')
        refused = leg.count(True, 'refused') + leg.count(False, 'refused')
        errors = leg.count(True, 'error') + leg.count(False, 'error')
        print(f'{leg.server:<13} {leg.load:<24} {t.started:>7} {t.skipped:>7} {accepted:>8} '
              f'{refused:>7} {errors:>5} {leg.rate:>7.1f} {ms(pct(t.latency_valid, 0.5)):>7} '
              f'{ms(pct(t.latency_valid, 0.99)):>7} '
              f'{leg.server_cpu / max(leg.completed, 1) * 1000:>16.1f} '
              f'{leg.server_cpu / max(leg.elapsed, 1e-9):>9.2f} '
              f'{leg.client_cpu / max(leg.elapsed, 1e-9):>12.2f}')
    for leg in (xos_same, ref):
        for err, n in leg.tally.errors.most_common(3):
            print(f'  {leg.server}: {n:>5} x {err}')
    ratio = xos_same.rate / ref.rate if ref.rate > 0 else float('nan')

    def quotient(a: float, b: float) -> str:
        return f'{a / b:.2f}' if b > 0 and a == a and b == b else '-'
    p50s = [pct(leg.tally.latency_valid, 0.5) for leg in (xos_same, ref)]
    cpus = [leg.server_cpu / max(leg.completed, 1) for leg in (xos_same, ref)]
    print(f'xos-sshd/OpenSSH, same load: logins/s {ratio:.3f}, p50 latency {quotient(*p50s)}, '
          f'server CPU per login {quotient(*cpus)}')

    total_client = sum(os.times()[:2]) - client_cpu0
    print(f'(client CPU total {total_client:.1f} s; phase 1 {cpu_mark["p1_client"]:.1f} s)')
    problems = []
    if v_ref:
        problems.append(f'{v_ref} valid login(s) refused')
    if h_acc:
        problems.append(f'{h_acc} hostile login(s) ACCEPTED')
    if n := xos_same.count(True, 'refused'):
        problems.append(f'{n} valid OpenSSH-certificate login(s) refused by xos-sshd')
    if n := ref.count(True, 'refused'):
        problems.append(f'{n} valid login(s) refused by the OpenSSH reference (its setup)')
    if not alive:
        problems.append('the gateway died')
    if not sshd.alive():
        problems.append('the OpenSSH reference died')
    if fd_growth > 0:
        extra = after.fd_kinds - before.fd_kinds
        print(f'WARNING: the gateway holds {fd_growth} more fds after the load than before: '
              + ', '.join(f'{n} x {kind}' for kind, n in extra.most_common()))
        errors = [line for line in gw.log().splitlines() if ' ERROR ' in line]
        for line in errors[:5]:
            print(f'  gateway log: {line[:200]}')
        if len(errors) > 5:
            print(f'  gateway log: ... {len(errors)} ERROR lines in all')
    print(f'RESULT sessions_held={p1["held"]} logins_per_s={rate:.1f} rss_growth_mb={rss_growth:.1f} '
          f'openssh_logins_per_s={ref.rate:.1f} logins_per_s_ratio={ratio:.3f} '
          f'xos_cert_logins_per_s={xos_same.rate:.1f}')
    if problems:
        print('FAIL: ' + '; '.join(problems), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sessions', type=int, default=1000)
    ap.add_argument('--open-concurrency', type=int, default=32,
                    help='phase 1 handshakes in flight at once')
    ap.add_argument('--open-budget', type=float, default=60,
                    help='phase 1: no new session after this many seconds')
    ap.add_argument('--rate', type=float, default=200, help='phase 2 logins started per second')
    ap.add_argument('--duration', type=float, default=30)
    ap.add_argument('--rounds', type=int, default=1,
                    help='repeat phase 2 (with a snapshot after each): growth that goes on '
                         'round after round is a leak, not a high-water mark')
    ap.add_argument('--max-inflight', type=int, default=200)
    ap.add_argument('--hostile-every', type=int, default=5, help='1 login in N is hostile')
    ap.add_argument('--users', type=int, default=50)
    ap.add_argument('--settle', type=float, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit('run as root (the gateway switches to mapped accounts)')

    def on_term(signum, frame):
        raise KeyboardInterrupt
    # Ctrl-C and SIGTERM stop the run and still clean up (SIGINT even when started in the
    # background by a shell that ignores it); inside the event loop both cancel the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    nofile = raise_nofile()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix='xos-bench-load-'))
    base.chmod(0o755)
    uid_range = free_uid_range(size=1000, start=400000)
    gw = sshd = None
    code = 1
    try:
        ca = VOCA.create(base, VO)
        (base / 'home').mkdir(mode=0o755)
        valid, hostile = make_credentials(base, ca, args.users)
        gw = GatewayProcess.configure(base, {VO: {
            'ca': str(ca.dir / 'ca.pem'), 'crl': str(ca.dir / 'crl.pem'), 'policy': 'dynamic',
            'uid_range': list(uid_range), 'account_prefix': f'{VO}-',
            'home_base': str(base / 'home')}}, limits=LIMITS, log_level='warning')
        gw.start(debug=False)
        # The reference: stock sshd trusting the same CA for OpenSSH user certificates, with the
        # same startup headroom; the VO users' principals log in as root.
        ca_line = CertificateAuthority.load(ca.dir).ssh_key().export_public_key('openssh')
        sshd = start_openssh(base, user_ca=ca_line.decode(),
                             principals=sorted({c.login for c in valid}),
                             max_startups=LIMITS['max_startups'])
        reference = [Cred(c.kind, 'root', asyncssh.SSHClientConnectionOptions(
            options=c.options, username='root'), True) for c in valid if c.kind == 'valid-openssh']
        print('gateway [limits] for a single-machine load test: '
              + ', '.join(f'{k} = {v}' for k, v in LIMITS.items())
              + ' (loopback exempt from penalties; see the docstring)')
        print(f'xos-sshd pid {gw.proc.pid} on 127.0.0.1:{gw.port}; fd limit client '
              f'{nofile[0]}/{nofile[1]}, gateway {nofile_limit(gw.proc.pid)}; '
              + ', '.join(process_limits()))
        print(f'reference: OpenSSH sshd pid {sshd.proc.pid} on 127.0.0.1:{sshd.port} '
              f'(TrustedUserCAKeys = the VO CA, AuthorizedPrincipalsFile u000.. -> root, '
              f'MaxStartups {LIMITS["max_startups"]}); client algorithms for both: '
              + ', '.join(a[0] for a in CLIENT_ALGS.values()))
        # The gateway holds ~5 fds per exec session (socket, pidfd, 3 pipes), the client 1.
        if nofile[0] < 6 * args.sessions + 200:
            print(f'WARNING: an fd limit of {nofile[0]} is too low for {args.sessions} sessions '
                  f'(raise the hard limit: ulimit -Hn, or prlimit)')
        code = uvloop.run(run(args, gw, sshd, valid, hostile, reference, uid_range))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print('interrupted', file=sys.stderr)
        code = 130
    finally:
        if gw:
            gw.stop()
            if code != 0:
                tail = gw.log()[-3000:]
                if tail:
                    print(f'--- gateway log (tail) ---\n{tail}', file=sys.stderr)
        if sshd:
            sshd.stop()
            if code != 0:
                tail = sshd.log()[-2000:]
                if tail:
                    print(f'--- OpenSSH reference log (tail) ---\n{tail}', file=sys.stderr)
        kill_uid_processes(*uid_range)
        release_uid_range(uid_range[0])
        shutil.rmtree(base, ignore_errors=True)
    print(f'(total {time.monotonic() - started:.0f} s)')
    return code


if __name__ == '__main__':
    sys.exit(main())
