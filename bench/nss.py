#!/usr/bin/env python3
"""getpwnam/getpwuid latency through libnss_xos against glibc's libnss_files.

For 1k, 10k and 100k accounts: the index is written with
xos_sshd.ams.nss_index.write_index, and the same accounts are appended to a
copy of /etc/passwd that is bind-mounted over /etc/passwd inside a private
mount namespace (unshare -m), together with an nsswitch.conf that selects
either `xos` or `files`.  The host's files are never changed.  A small C
driver (compiled here) does random lookups through the real glibc path and
reports ns per call.

Needs root (unshare/mount), gcc and `make -C native`.  Ends with
    RESULT nss_getpwnam_100k_ratio=<xos/files>
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xos_sshd.ams.nss_index import write_index  # noqa: E402

SIZES = (1_000, 10_000, 100_000)
UID_BASE = 3_000_000  # far above any host account
BUDGET_NS = 400_000_000  # per measurement

DRIVER = r"""
#define _GNU_SOURCE
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long long now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* driver name|uid N UID_BASE BUDGET_NS MAX_CALLS */
int main(int argc, char **argv)
{
	int by_name = strcmp(argv[1], "name") == 0;
	long n = atol(argv[2]), base = atol(argv[3]);
	long long budget = atoll(argv[4]), max = atoll(argv[5]), calls = 0;
	unsigned seed = 12345;
	char buf[4096], name[64];
	struct passwd pw, *res;

	/* Warm up: loads the module, maps the index / fills the page cache. */
	getpwnam_r("vo_u0", &pw, buf, sizeof(buf), &res);
	long long t0 = now(), t = t0;
	while (calls < max && t - t0 < budget) {
		long i = rand_r(&seed) % n;
		if (by_name) {
			snprintf(name, sizeof(name), "vo_u%ld", i);
			getpwnam_r(name, &pw, buf, sizeof(buf), &res);
		} else {
			getpwuid_r((uid_t)(base + i), &pw, buf, sizeof(buf), &res);
		}
		if (!res || pw.pw_uid != (uid_t)(base + i)) {
			fprintf(stderr, "lookup %ld failed\n", i);
			return 1;
		}
		calls++;
		if ((calls & 15) == 0 || calls < 64)
			t = now();
	}
	t = now();
	printf("%lld %.1f\n", calls, (double)(t - t0) / (double)calls);
	return 0;
}
"""


def run_in_ns(argv, nsswitch: Path, passwd: Path, nss_dir: Path) -> str:
    env = dict(os.environ, LD_LIBRARY_PATH=str(REPO / "native" / "build"), XOS_NSS_DIR=str(nss_dir))
    script = 'mount --bind "$1" /etc/nsswitch.conf && mount --bind "$2" /etc/passwd && shift 2 && exec "$@"'
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(nsswitch), str(passwd), *map(str, argv)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv))} failed: {r.stderr.strip()}")
    return r.stdout


def main() -> int:
    if os.geteuid() != 0:
        print("bench/nss.py: needs root (unshare -m, mount --bind)", file=sys.stderr)
        return 1
    subprocess.run(["make", "-s", "-C", str(REPO / "native")], check=True)
    host_passwd = Path("/etc/passwd").read_text()
    results: dict[tuple[int, str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="xos-nss-bench-") as tmp:
        tmp = Path(tmp)
        driver = tmp / "driver"
        (tmp / "driver.c").write_text(DRIVER)
        subprocess.run(["gcc", "-O2", "-o", str(driver), str(tmp / "driver.c")], check=True)
        confs = {}
        for db in ("xos", "files"):
            confs[db] = tmp / f"nsswitch.{db}"
            confs[db].write_text(f"passwd: {db}\ngroup: {db}\n")
        for n in SIZES:
            users = [(f"vo_u{i}", UID_BASE + i, UID_BASE + i, "", f"/home/vo_u{i}", "/bin/bash") for i in range(n)]
            nss_dir = tmp / f"nss{n}"
            write_index(nss_dir, users, [])
            passwd = tmp / f"passwd{n}"
            # The VO accounts after the host's, as an AMS that appended to
            # /etc/passwd would leave them.
            passwd.write_text(host_passwd + "".join(f"{u[0]}:x:{u[1]}:{u[2]}::{u[4]}:{u[5]}\n" for u in users))
            for db in ("xos", "files"):
                for mode in ("name", "uid"):
                    out = run_in_ns([driver, mode, n, UID_BASE, BUDGET_NS, 1_000_000], confs[db], passwd, nss_dir)
                    calls, ns = out.split()
                    results[(n, db, mode)] = float(ns)

    print(f"{'accounts':>9} | {'call':<9} | {'xos ns/call':>12} | {'files ns/call':>14} | {'xos/files':>10}")
    print("-" * 67)
    for n in SIZES:
        for mode, call in (("name", "getpwnam"), ("uid", "getpwuid")):
            x, f = results[(n, "xos", mode)], results[(n, "files", mode)]
            print(f"{n:>9} | {call:<9} | {x:>12.0f} | {f:>14.0f} | {x / f:>10.4f}")
    ratio = results[(100_000, "xos", "name")] / results[(100_000, "files", "name")]
    print(f"RESULT nss_getpwnam_100k_ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
