#!/usr/bin/env python3
"""Login latency: xos-sshd against a stock OpenSSH sshd, measured side by side in one run.

Both servers run on loopback; the same OpenSSH ``ssh`` client logs in and runs ``true`` with
the same algorithms (curve25519-sha256, aes128-gcm@openssh.com, ssh-ed25519 host key).
OpenSSH authenticates root with a plain public key from a private authorized_keys file;
xos-sshd takes the OpenSSH-certificate route with the full path: verifier, CRL check, AMS
lease renewal, fork + setuid into the mapped account.  Runs alternate so both see the same
machine noise.  Then N concurrent logins to xos-sshd.

Both are measured as they come.  OpenSSH's client keeps Nagle on for a non-interactive
session; stock sshd pays a delayed-ACK stall (~40 ms) after the client's NEWKEYS, and one of
its own Nagle (it sets TCP_NODELAY only for interactive sessions).  xos-sshd acknowledges
at once until authentication (``gateway.PreauthQuickAck``); without that it paid two such
stalls (p50 ~115 ms instead of ~37 ms on a 2-core VM).

Installs nothing (run `make test` once first, for openssh-server and the venv); run as root:
    .venv/bin/python bench/login.py [--runs 40] [--concurrent 100]
Ends with: RESULT login_p50_ratio=<xos/openssh> concurrent100_ok=<n>
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
from gatewayproc import GatewayProcess, VOCA, free_uid_range, kill_uid_processes  # noqa: E402
from openssh_ref import start_openssh  # noqa: E402

ALGS = ['-o', 'KexAlgorithms=curve25519-sha256', '-o', 'Ciphers=aes128-gcm@openssh.com',
        '-o', 'HostKeyAlgorithms=ssh-ed25519']
COMMON = ['-F', '/dev/null', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no',
          '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
          '-o', 'IdentitiesOnly=yes', *ALGS]


def timed(argv: list[str]) -> float | None:
    start = time.perf_counter()
    ok = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).returncode == 0
    return time.perf_counter() - start if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=40)
    ap.add_argument('--concurrent', type=int, default=100)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix='xos-bench-login-'))
    base.chmod(0o755)
    uid_range = free_uid_range(start=400000)
    sshd = gw = None
    try:
        client_key = base / 'client'
        subprocess.run(['ssh-keygen', '-q', '-t', 'ecdsa', '-N', '', '-f', str(client_key)],
                       check=True)
        sshd = start_openssh(base, authorized_keys=base / 'client.pub')
        ca = VOCA.create(base, 'bench')
        (base / 'home').mkdir(mode=0o755)
        gw = GatewayProcess.configure(base, {'bench': {
            'ca': str(ca.dir / 'ca.pem'), 'crl': str(ca.dir / 'crl.pem'), 'policy': 'dynamic',
            'uid_range': list(uid_range), 'account_prefix': 'bench-',
            'home_base': str(base / 'home')}}, log_level='warning')
        gw.start(debug=False)
        user = ca.issue('alice', base / 'alice')
        openssh = ['ssh', *COMMON, '-i', str(client_key), '-p', str(sshd.port),
                   'root@127.0.0.1', 'true']
        xos = ['ssh', *COMMON, '-i', f'{user}.key', '-o', f'CertificateFile={user}-cert.pub',
               '-p', str(gw.port), 'alice@127.0.0.1', 'true']
        for argv in (openssh, xos):  # warm up; the first xos login also creates the mapping
            if timed(argv) is None:
                raise SystemExit(f'login failed: {" ".join(argv)}\n{gw.log()[-2000:]}')
        times: dict[str, list[float]] = {'openssh': [], 'xos-sshd': []}
        for _ in range(args.runs):
            for name, argv in (('openssh', openssh), ('xos-sshd', xos)):
                t = timed(argv)
                if t is not None:
                    times[name].append(t)
        with ThreadPoolExecutor(args.concurrent) as pool:
            start = time.perf_counter()
            results = list(pool.map(lambda _: timed(xos), range(args.concurrent)))
            wall = time.perf_counter() - start
        ok = sum(r is not None for r in results)
    finally:
        if gw:
            gw.stop()
        if sshd:
            sshd.stop()
        kill_uid_processes(*uid_range)
        shutil.rmtree(base, ignore_errors=True)

    print(f'{"server":<10} {"runs":>5} {"p50 ms":>8} {"p90 ms":>8} {"min ms":>8}')
    for name, values in times.items():
        values.sort()
        print(f'{name:<10} {len(values):>5} {statistics.median(values) * 1000:>8.1f} '
              f'{values[int(len(values) * 0.9) - 1] * 1000:>8.1f} {values[0] * 1000:>8.1f}')
    ratio = statistics.median(times['xos-sshd']) / statistics.median(times['openssh'])
    print(f'login p50 ratio xos-sshd/openssh: {ratio:.3f}  (target <= 0.35)')
    print(f'{args.concurrent} concurrent xos-sshd logins: {ok} ok in {wall:.2f} s')
    print(f'RESULT login_p50_ratio={ratio:.3f} concurrent{args.concurrent}_ok={ok}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
