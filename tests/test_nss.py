"""libnss_xos.so.2 and its index, tested through the real glibc NSS path.

Every program that resolves names runs inside a private mount namespace
(``unshare -m``) with its own /etc/nsswitch.conf bind-mounted over the host's,
``LD_LIBRARY_PATH=native/build`` so glibc loads the freshly built module, and
``XOS_NSS_DIR`` pointing at a temporary directory.  The host's files never
change.  Needs root (for unshare/mount).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xos_sshd.ams import nss_index as ni
from xos_sshd.ams.nss_index import NSSIndexError, build_index, fnv1a64, read_header, write_index

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "native"
BUILD = NATIVE / "build"
LIB = BUILD / "libnss_xos.so.2"
PYTHON = sys.executable

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare -m and mount --bind"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

ENTRY_POINTS = {
    "_nss_xos_getpwnam_r",
    "_nss_xos_getpwuid_r",
    "_nss_xos_setpwent",
    "_nss_xos_getpwent_r",
    "_nss_xos_endpwent",
    "_nss_xos_getgrnam_r",
    "_nss_xos_getgrgid_r",
    "_nss_xos_setgrent",
    "_nss_xos_getgrent_r",
    "_nss_xos_endgrent",
    "_nss_xos_initgroups_dyn",
}

USERS = [
    ("vo_alice", 70001, 70001, "Alice Example,,,", "/home/vo_alice", "/bin/bash"),
    ("vo_bob", 70002, 70002, "", "/home/vo_bob", "/bin/sh"),
    ("vo_zoe", 70003, 70100, "Zoë Ünïcode", "/home/vo_zoe", "/bin/bash"),
]
BIG_MEMBERS = [f"vo_m{i:03d}" for i in range(60)]
GROUPS = [
    ("vo_alice", 70001, []),
    ("vo_bob", 70002, []),
    ("vo_dev", 70100, ["vo_alice", "vo_bob", "vo_zoe"]),
    ("vo_admin", 70101, ["vo_alice"]),
    ("vo_big", 70102, ["vo_alice"] + BIG_MEMBERS),
]

NSSWITCH = "passwd: files xos\ngroup: files xos\nshadow: files\n"
NSSWITCH_XOS_ONLY = "passwd: xos\ngroup: xos\nshadow: files\n"


# ---------------------------------------------------------------- helpers


def passwd_line(e) -> str:
    name, uid, gid, gecos, home, shell = e
    return f"{name}:x:{uid}:{gid}:{gecos}:{home}:{shell}\n"


def group_line(e) -> str:
    name, gid, members = e
    return f"{name}:x:{gid}:{','.join(members)}\n"


def write_tables(nss_dir: Path, users=USERS, groups=GROUPS) -> None:
    """What the AMS does: text tables, then the index."""
    nss_dir.mkdir(parents=True, exist_ok=True)
    (nss_dir / "passwd").write_text("".join(passwd_line(e) for e in users))
    (nss_dir / "group").write_text("".join(group_line(e) for e in groups))
    write_index(nss_dir, list(users), list(groups))


def place_index(nss_dir: Path, data: bytes) -> None:
    """Puts raw bytes at nss_dir/nss.index the way the writer would (rename)."""
    tmp = nss_dir / ".test.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, nss_dir / ni.INDEX_NAME)


@pytest.fixture(scope="session")
def nss_lib() -> Path:
    r = subprocess.run(["make", "-C", str(NATIVE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert LIB.is_file()
    return LIB


@pytest.fixture
def conf(tmp_path) -> Path:
    p = tmp_path / "nsswitch.conf"
    p.write_text(NSSWITCH)
    return p


@pytest.fixture
def nss_dir(tmp_path) -> Path:
    d = tmp_path / "nss"
    write_tables(d)
    return d


def run_ns(argv, nss_dir, conf, *, timeout=30, input=None, env_extra=None):
    """Runs argv in a private mount namespace with conf as /etc/nsswitch.conf."""
    env = dict(os.environ)
    env.update(
        LD_LIBRARY_PATH=str(BUILD),
        XOS_NSS_DIR=str(nss_dir),
        PYTHONPATH=str(REPO),
        LC_ALL="C.UTF-8",
    )
    env.update(env_extra or {})
    script = 'mount --bind "$1" /etc/nsswitch.conf && shift && exec "$@"'
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(conf), *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, input=input)


def getent(nss_dir, conf, *args, **kw):
    return run_ns(["getent", "-s", "xos", *args], nss_dir, conf, **kw)


def run_py(code: str, nss_dir, conf, tmp_path, *args, **kw):
    prog = tmp_path / f"prog_{abs(hash(code))}.py"
    prog.write_text(CTYPES_HELPERS + textwrap.dedent(code))
    return run_ns([PYTHON, prog, *args], nss_dir, conf, **kw)


# ctypes view of glibc's reentrant calls, shared by the programs below.
CTYPES_HELPERS = r'''
import ctypes, errno, os, sys
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint32, c_void_p, byref
libc = ctypes.CDLL("libc.so.6", use_errno=True)

class Passwd(ctypes.Structure):
    _fields_ = [("pw_name", c_char_p), ("pw_passwd", c_char_p), ("pw_uid", c_uint32),
                ("pw_gid", c_uint32), ("pw_gecos", c_char_p), ("pw_dir", c_char_p),
                ("pw_shell", c_char_p)]

class Group(ctypes.Structure):
    _fields_ = [("gr_name", c_char_p), ("gr_passwd", c_char_p), ("gr_gid", c_uint32),
                ("gr_mem", POINTER(c_char_p))]

for fn, key, st in (("getpwnam_r", c_char_p, Passwd), ("getpwuid_r", c_uint32, Passwd),
                    ("getgrnam_r", c_char_p, Group), ("getgrgid_r", c_uint32, Group)):
    f = getattr(libc, fn)
    f.argtypes = [key, POINTER(st), c_void_p, c_size_t, POINTER(POINTER(st))]
    f.restype = c_int
libc.getpwent_r.argtypes = [POINTER(Passwd), c_void_p, c_size_t, POINTER(POINTER(Passwd))]
libc.getpwent_r.restype = c_int

def call(fn, key, st, buflen):
    """Returns (rc, struct or None) of a getXXbyYY_r call with a buflen buffer."""
    res = st()
    out = POINTER(st)()
    buf = ctypes.create_string_buffer(max(buflen, 1))
    if isinstance(key, str):
        key = key.encode()
    rc = getattr(libc, fn)(key, byref(res), buf, buflen, byref(out))
    return rc, (res if out else None), buf

def count_fds():
    return len(os.listdir("/proc/self/fd"))
'''


# ---------------------------------------------------------------- build


def test_build_exports_only_nss_entry_points(nss_lib):
    out = subprocess.run(["nm", "-D", "--defined-only", str(nss_lib)], capture_output=True, text=True, check=True)
    names = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert names == ENTRY_POINTS
    soname = subprocess.run(["objdump", "-p", str(nss_lib)], capture_output=True, text=True, check=True).stdout
    assert "SONAME               libnss_xos.so.2" in soname


def test_uses_secure_getenv_only(nss_lib):
    """XOS_NSS_DIR must be read through secure_getenv (ignored in setuid programs)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(nss_lib)], capture_output=True, text=True, check=True)
    names = {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}
    assert "secure_getenv" in names
    assert "getenv" not in names


def test_make_clean_and_rebuild(nss_lib, tmp_path):
    # Build in a copy so the session's library is not removed under other tests.
    work = tmp_path / "native"
    shutil.copytree(NATIVE, work, ignore=shutil.ignore_patterns("build"))
    assert subprocess.run(["make", "-C", str(work)], capture_output=True).returncode == 0
    assert (work / "build" / "libnss_xos.so.2").is_file()
    r = subprocess.run(["make", "-C", str(work), "install", f"DESTDIR={tmp_path / 'root'}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    installed = list((tmp_path / "root").rglob("libnss_xos.so.2"))
    assert len(installed) == 1 and (not multiarch or multiarch in str(installed[0]))
    assert oct(installed[0].stat().st_mode & 0o777) == "0o644"
    assert subprocess.run(["make", "-C", str(work), "clean"], capture_output=True).returncode == 0
    assert not (work / "build").exists()


# ---------------------------------------------------------------- writer


def test_fnv1a64_reference_values():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_writer_replaces_atomically(tmp_path):
    d = tmp_path / "nss"
    assert write_index(d, list(USERS), list(GROUPS)) == 1
    ino = (d / ni.INDEX_NAME).stat().st_ino
    assert write_index(d, list(USERS[:1]), list(GROUPS[:1])) == 2
    st = (d / ni.INDEX_NAME).stat()
    assert st.st_ino != ino  # a new file was renamed in, the old one never rewritten
    assert st.st_mode & 0o777 == 0o644
    assert sorted(p.name for p in d.iterdir()) == [ni.INDEX_NAME]  # no temp left behind
    h = read_header(d / ni.INDEX_NAME)
    assert h["generation"] == 2 and h["n_users"] == 1 and h["n_groups"] == 1
    assert h["file_size"] == st.st_size


@pytest.mark.parametrize(
    "users,groups",
    [
        ([("root", 70001, 70001, "", "/", "/bin/sh")], []),
        ([("vo_x", 0, 70001, "", "/", "/bin/sh")], []),
        ([("vo_x", 70001, 0, "", "/", "/bin/sh")], []),
        ([("vo_x", 2**32 - 1, 70001, "", "/", "/bin/sh")], []),
        ([("vo:x", 70001, 70001, "", "/", "/bin/sh")], []),
        ([("vo_x", 70001, 70001, "a\nb", "/", "/bin/sh")], []),
        ([("", 70001, 70001, "", "/", "/bin/sh")], []),
        ([("vo_x", 70001, 70001, "", "/", "/bin/sh")] * 2, []),
        ([], [("root", 70001, [])]),
        ([], [("vo_g", 0, [])]),
        ([], [("vo_g", 70001, ["root"])]),
        ([], [("vo_g", 70001, ["a,b"])]),
        ([], [("vo_g", 70001, []), ("vo_g", 70002, [])]),
    ],
)
def test_writer_rejects_what_nss_must_never_serve(tmp_path, users, groups):
    d = tmp_path / "nss"
    write_index(d, list(USERS), list(GROUPS))
    before = (d / ni.INDEX_NAME).read_bytes()
    with pytest.raises(NSSIndexError):
        write_index(d, users, groups)
    assert (d / ni.INDEX_NAME).read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == [ni.INDEX_NAME]


# ---------------------------------------------------------------- lookups


@pytest.mark.parametrize("key", ["vo_alice", "70001"])
def test_getent_passwd(nss_lib, nss_dir, conf, key):
    r = getent(nss_dir, conf, "passwd", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout == passwd_line(USERS[0])


def test_getent_passwd_utf8_and_other_primary_group(nss_lib, nss_dir, conf):
    r = getent(nss_dir, conf, "passwd", "vo_zoe")
    assert r.returncode == 0 and r.stdout == passwd_line(USERS[2])


@pytest.mark.parametrize("key", ["vo_dev", "70100"])
def test_getent_group(nss_lib, nss_dir, conf, key):
    r = getent(nss_dir, conf, "group", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "vo_dev:x:70100:vo_alice,vo_bob,vo_zoe\n"


def test_enumeration(nss_lib, nss_dir, conf):
    r = getent(nss_dir, conf, "passwd")
    assert r.returncode == 0 and r.stdout == "".join(passwd_line(e) for e in USERS)
    r = getent(nss_dir, conf, "group")
    assert r.returncode == 0 and r.stdout == "".join(group_line(e) for e in GROUPS)


def test_id_gets_supplementary_vo_groups(nss_lib, nss_dir, conf):
    r = run_ns(["id", "vo_alice"], nss_dir, conf)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        "uid=70001(vo_alice) gid=70001(vo_alice) "
        "groups=70001(vo_alice),70100(vo_dev),70101(vo_admin),70102(vo_big)"
    )
    r = run_ns(["id", "-G", "vo_zoe"], nss_dir, conf)  # primary is also a member group
    assert r.returncode == 0 and r.stdout.split() == ["70100"]
    r = run_ns(["id", "-Gn", "vo_m007"], nss_dir, conf)  # not a passwd entry: no such user
    assert r.returncode != 0


def test_initgroups_via_getgrouplist(nss_lib, nss_dir, conf, tmp_path):
    r = run_py(
        """
        print(sorted(os.getgrouplist("vo_alice", 70001)))
        print(sorted(os.getgrouplist("vo_m042", 12345)))   # member of a VO group, not a VO user
        print(sorted(os.getgrouplist("nobody_here", 12345)))
        """,
        nss_dir, conf, tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["[70001, 70100, 70101, 70102]", "[12345, 70102]", "[12345]"]


def test_files_still_first_and_root_untouched(nss_lib, nss_dir, conf):
    r = run_ns(["getent", "passwd", "root"], nss_dir, conf)
    assert r.returncode == 0 and r.stdout.startswith("root:x:0:0:")
    for args in (("passwd", "root"), ("passwd", "0"), ("group", "root"), ("group", "0")):
        assert getent(nss_dir, conf, *args).returncode == 2


@pytest.mark.parametrize(
    "args", [("passwd", "nosuchuser"), ("passwd", "99999"), ("group", "nosuchgroup"), ("group", "99999"),
             ("passwd", "vo_m001"), ("passwd", "x" * 300), ("passwd", "4294967295")]
)
def test_unknown_is_not_found(nss_lib, nss_dir, conf, args):
    r = getent(nss_dir, conf, *args)
    assert r.returncode == 2 and r.stdout == ""


def test_status_codes_via_ctypes(nss_lib, nss_dir, conf, tmp_path):
    """NOTFOUND -> rc 0 and NULL result; tables missing -> UNAVAIL, rc ENOENT."""
    r = run_py(
        """
        rc, res, _ = call("getpwnam_r", "nosuchuser", Passwd, 1024)
        print(rc, res is None)
        rc, res, _ = call("getpwnam_r", "vo_alice", Passwd, 1024)
        print(rc, res.pw_name.decode(), res.pw_passwd.decode())
        """,
        nss_dir, conf, tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["0 True", "0 vo_alice x"]
    conf.write_text(NSSWITCH_XOS_ONLY)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_py(
        """
        rc, res, _ = call("getpwnam_r", "vo_alice", Passwd, 1024)
        print(rc == errno.ENOENT, res is None)
        """,
        empty, conf, tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True True"


def test_many_accounts_all_found(nss_lib, tmp_path, conf):
    """Enough keys for long probe sequences and collisions; every one is found."""
    n = 5000
    users = [(f"vo_u{i}", 100000 + i, 100000 + i, "", f"/home/vo_u{i}", "/bin/sh") for i in range(n)]
    groups = [(f"vo_g{i}", 200000 + i, [f"vo_u{i}", f"vo_u{(i + 1) % n}"]) for i in range(n)]
    d = tmp_path / "nss"
    write_tables(d, users, groups)
    r = run_py(
        f"""
        import pwd, grp
        n = {n}
        for i in range(n):
            p = pwd.getpwnam(f"vo_u{{i}}"); assert p.pw_uid == 100000 + i, p
            assert pwd.getpwuid(100000 + i).pw_name == f"vo_u{{i}}"
            g = grp.getgrgid(200000 + i); assert g.gr_name == f"vo_g{{i}}", g
            assert grp.getgrnam(f"vo_g{{i}}").gr_mem == [f"vo_u{{i}}", f"vo_u{{(i + 1) % n}}"]
        for i in range(0, n, 97):
            assert sorted(os.getgrouplist(f"vo_u{{i}}", 1)) == sorted({{1, 200000 + i, 200000 + (i - 1) % n}})
        for i in range(n, n + 2000):
            try: pwd.getpwnam(f"vo_u{{i}}")
            except KeyError: pass
            else: raise AssertionError(i)
        assert sum(p.pw_name.startswith("vo_u") for p in pwd.getpwall()) == n
        print("ok")
        """,
        d, conf, tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# ---------------------------------------------------------------- ERANGE


def test_erange_when_buffer_too_small(nss_lib, nss_dir, conf, tmp_path):
    conf.write_text(NSSWITCH_XOS_ONLY)
    r = run_py(
        """
        for fn, key, st in (("getpwnam_r", "vo_alice", Passwd), ("getpwuid_r", 70001, Passwd),
                            ("getgrnam_r", "vo_big", Group), ("getgrgid_r", 70102, Group)):
            rc, res, _ = call(fn, key, st, 8)
            assert rc == errno.ERANGE and res is None, (fn, rc)
            size = 8
            while True:                      # what glibc's callers do
                rc, res, buf = call(fn, key, st, size)
                if rc != errno.ERANGE:
                    break
                size *= 2
            assert rc == 0 and res is not None, (fn, rc)
            if st is Group:
                mem = []
                i = 0
                while res.gr_mem[i]:
                    mem.append(res.gr_mem[i].decode()); i += 1
                assert len(mem) == 61 and mem[0] == "vo_alice", mem
            print(fn, size)
        # getpwent_r: ERANGE must not skip the entry
        libc.setpwent()
        res = Passwd(); out = POINTER(Passwd)()
        small = ctypes.create_string_buffer(4)
        assert libc.getpwent_r(byref(res), small, 4, byref(out)) == errno.ERANGE
        big = ctypes.create_string_buffer(1024)
        assert libc.getpwent_r(byref(res), big, 1024, byref(out)) == 0
        print("first", res.pw_name.decode())
        libc.endpwent()
        """,
        nss_dir, conf, tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "first vo_alice" in r.stdout


# ---------------------------------------------------------------- missing / corrupt


def patched(data: bytes, offset: int, fmt: str, *values, reseal=True) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    if reseal and offset < ni.CHECKSUM_OFFSET:
        hdr = bytearray(b[: ni.HEADER_SIZE])
        ni.seal_header(hdr)
        b[: ni.HEADER_SIZE] = hdr
    return bytes(b)


def section(data: bytes, n: int) -> tuple[int, int]:
    return struct.unpack_from("<QQ", data, ni.OFF_SECTIONS + 16 * n)


def corrupt_variants() -> dict[str, bytes]:
    good = build_index(USERS, GROUPS)
    size = len(good)
    rng = random.Random(1234)
    users_off, _ = section(good, ni.S_USERS)
    groups_off, _ = section(good, ni.S_GROUPS)
    members_off, _ = section(good, ni.S_MEMBERS)
    pwnam_off, pwnam_len = section(good, ni.S_H_PWNAM)
    v = {
        "empty": b"",
        "header-only-half": good[:100],
        "truncated-half": good[: size // 2],
        "truncated-one-byte": good[:-1],
        "garbage": bytes(rng.randrange(256) for _ in range(4096)),
        "garbage-with-magic": ni.MAGIC + bytes(rng.randrange(256) for _ in range(4088)),
        "zeros": bytes(size),
        "bad-checksum": patched(good, 40, "<I", 7, reseal=False),
        "bad-version": patched(good, ni.OFF_VERSION, "<I", 2),
        "file-size-lies": patched(good, ni.OFF_FILE_SIZE, "<Q", size + 4096),
        "users-count-lies": patched(good, ni.OFF_N_USERS, "<I", 1000),
        "users-count-huge": patched(good, ni.OFF_N_USERS, "<I", 0xFFFFFFFF),
        "groups-count-lies": patched(good, ni.OFF_N_GROUPS, "<I", len(GROUPS) + 1),
        "section-offset-past-end": patched(good, ni.OFF_SECTIONS + 16 * ni.S_USERS, "<Q", size + 8),
        "section-length-past-end": patched(good, ni.OFF_SECTIONS + 16 * ni.S_STRINGS + 8, "<Q", size),
        "section-offset-overflow": patched(good, ni.OFF_SECTIONS + 16 * ni.S_GIDS, "<QQ", 2**64 - 8, 16),
        "section-in-header": patched(good, ni.OFF_SECTIONS + 16 * ni.S_STRINGS, "<Q", 0),
        "hash-not-power-of-two": patched(good, ni.OFF_SECTIONS + 16 * ni.S_H_PWNAM + 8, "<Q", pwnam_len - 8),
        "max-probe-too-big": patched(good, ni.OFF_MAX_PROBE, "<I", 2**31),
        # Body corruption: the header is fine, records point anywhere.
        "user-name-offset-past-end": patched(good, users_off + 8, "<II", 0xFFFFFFF0, 0x20),
        "user-name-length-huge": patched(good, users_off + 12, "<I", 0xFFFFFFFF),
        "group-memrefs-past-end": patched(good, groups_off + 4 * len(GROUPS) * 5 - 8, "<II", 0xFFFFFFF0, 0x7FFFFFFF),
        "member-gids-past-end": patched(good, members_off + 8, "<II", 0xFFFFFFFF, 2),
        "bucket-refs-out-of-range": patched(good, pwnam_off, f"<{pwnam_len // 4}I", *([0xFFFFFFFF] * (pwnam_len // 4))),
    }
    # Every bucket full and max_probe = nb: a bounded walk, not a loop.
    full = v["bucket-refs-out-of-range"]
    v["buckets-all-full"] = patched(full, ni.OFF_MAX_PROBE, "<I", pwnam_len // 8)
    v["buckets-all-full-max-probe-huge"] = patched(full, ni.OFF_MAX_PROBE, "<I", 2**31)
    # Right tags, record indexes past the end of USERS.
    b = bytearray(good)
    for o in range(pwnam_off, pwnam_off + pwnam_len, 8):
        if struct.unpack_from("<I", b, o + 4)[0]:
            struct.pack_into("<I", b, o + 4, 0xFFFFFFFF - (o & 0xFF))
    v["bucket-tags-right-refs-out-of-range"] = bytes(b)
    # STRINGS claims to run past the file, and a name points out there.
    s_off, _ = section(good, ni.S_STRINGS)
    b = patched(good, ni.OFF_SECTIONS + 16 * ni.S_STRINGS + 8, "<Q", size - s_off + 4096)
    v["strings-past-end-name-there"] = patched(b, users_off + 8, "<II", size - s_off + 100, 8)
    return v


CORRUPT = corrupt_variants()


@pytest.mark.parametrize("variant", sorted(CORRUPT))
def test_corrupt_index_is_not_found_fast(nss_lib, tmp_path, conf, variant):
    d = tmp_path / "nss"
    d.mkdir()
    place_index(d, CORRUPT[variant])
    for args in (("passwd", "vo_alice"), ("passwd", "70001"), ("group", "vo_dev"), ("group", "70100"),
                 ("passwd",), ("group",)):
        t = time.monotonic()
        r = getent(d, conf, *args, timeout=10)
        elapsed = time.monotonic() - t
        assert r.returncode in (0, 2), (variant, args, r.returncode, r.stderr)  # never a signal
        assert elapsed < 1.0, (variant, args, elapsed)
        if variant.startswith(("user-", "group-", "member-", "bucket")):
            continue  # only the damaged record may be gone; nothing bad may appear
        assert r.returncode == 2 or (len(args) == 1 and r.stdout == ""), (variant, args, r.stdout)
    r = run_ns(["id", "vo_alice"], d, conf, timeout=10)
    assert r.returncode in (0, 1) and "uid=0" not in r.stdout


@pytest.mark.parametrize("kind", ["missing-dir", "missing-file", "fifo", "directory", "dev-zero"])
def test_tables_missing_or_not_a_file(nss_lib, tmp_path, conf, kind):
    d = tmp_path / "nss"
    if kind != "missing-dir":
        d.mkdir()
    idx = d / ni.INDEX_NAME
    if kind == "fifo":
        os.mkfifo(idx)  # opening a FIFO for reading would block without O_NONBLOCK
    elif kind == "directory":
        idx.mkdir()
    elif kind == "dev-zero":
        idx.symlink_to("/dev/zero")
    t = time.monotonic()
    r = getent(d, conf, "passwd", "vo_alice", timeout=10)
    assert r.returncode == 2 and time.monotonic() - t < 1.0
    r = run_ns(["getent", "passwd", "root"], d, conf, timeout=10)  # files still answers
    assert r.returncode == 0
    r = getent(d, conf, "passwd", timeout=10)
    assert r.returncode in (0, 2) and r.stdout == ""


def test_root_and_id_zero_never_served_even_if_in_file(nss_lib, tmp_path, conf):
    """A forged index with root / uid 0 / gid 0 entries: treated as not found."""
    users = [("xoot", 70001, 70001, "", "/root", "/bin/sh"), ("vo_zero", 70002, 70002, "", "/", "/bin/sh"),
             ("vo_ok", 70003, 70003, "", "/", "/bin/sh")]
    groups = [("xoot", 70001, ["xoot", "vo_ok"]), ("vo_zg", 70002, ["vo_ok"])]
    data = bytearray(build_index(users, groups))
    s_off, s_len = section(bytes(data), ni.S_STRINGS)
    strings = bytes(data[s_off : s_off + s_len])
    for i in range(strings.count(b"xoot")):  # rename xoot -> root everywhere
        j = strings.index(b"xoot")
        strings = strings[:j] + b"root" + strings[j + 4 :]
    data[s_off : s_off + s_len] = strings
    u_off, _ = section(bytes(data), ni.S_USERS)
    struct.pack_into("<I", data, u_off + 40 * 1, 0)  # vo_zero: uid 0
    g_off, _ = section(bytes(data), ni.S_GROUPS)
    struct.pack_into("<I", data, g_off + 20 * 1, 0)  # vo_zg: gid 0, also in vo_ok's initgroups list
    x_off, x_len = section(bytes(data), ni.S_GIDS)
    for o in range(x_off, x_off + x_len, 4):
        if struct.unpack_from("<I", data, o)[0] == 70002:
            struct.pack_into("<I", data, o, 0)
    d = tmp_path / "nss"
    d.mkdir()
    place_index(d, bytes(data))
    for args in (("passwd", "root"), ("passwd", "0"), ("passwd", "vo_zero"), ("group", "root"),
                 ("group", "0"), ("group", "vo_zg")):
        assert getent(d, conf, *args).returncode == 2, args
    r = getent(d, conf, "passwd")
    assert r.stdout == "vo_ok:x:70003:70003::/:/bin/sh\n"
    r = getent(d, conf, "group")
    assert r.stdout == ""  # root group and gid-0 group both hidden
    r = run_py('print(sorted(os.getgrouplist("root", 1)), sorted(os.getgrouplist("vo_ok", 1)))', d, conf, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1] [1, 70001]"  # 70001 is the (hidden) root group's gid: only by member list


def test_fuzzed_indexes_never_crash(nss_lib, tmp_path, conf):
    """Hundreds of mutated indexes through the real glibc path in one process."""
    conf.write_text(NSSWITCH_XOS_ONLY)
    d = tmp_path / "nss"
    write_tables(d)
    r = run_py(
        """
        import pwd, grp, random, struct
        from pathlib import Path
        from xos_sshd.ams import nss_index as ni
        d = Path(sys.argv[1])
        good = (d / ni.INDEX_NAME).read_bytes()
        rng = random.Random(int(sys.argv[2]))
        names = ["vo_alice", "vo_bob", "vo_zoe", "vo_dev", "vo_big", "vo_m001", "nope"]
        for it in range(int(sys.argv[3])):
            b = bytearray(good)
            k = rng.random()
            if k < 0.5:                                   # flip body bytes
                for _ in range(rng.randrange(1, 8)):
                    b[rng.randrange(ni.HEADER_SIZE, len(b))] = rng.randrange(256)
            elif k < 0.85:                                # rewrite a header field, re-seal
                off = rng.randrange(ni.OFF_FILE_SIZE, ni.CHECKSUM_OFFSET, 4)
                val = rng.choice([0, 1, 7, 8, 255, 256, len(b), len(b) - 8, 2**31, 2**32 - 1, rng.randrange(2**32)])
                struct.pack_into("<I", b, off, val)
                hdr = bytearray(b[:ni.HEADER_SIZE]); ni.seal_header(hdr); b[:ni.HEADER_SIZE] = hdr
            else:                                         # truncate or extend
                b = b[:rng.randrange(len(b))] if rng.random() < 0.5 else b + bytes(rng.randrange(1, 64))
            tmp = d / ".fz"; tmp.write_bytes(bytes(b)); os.replace(tmp, d / ni.INDEX_NAME)
            for n in names:
                for f in (pwd.getpwnam, grp.getgrnam):
                    try: f(n)
                    except KeyError: pass
                os.getgrouplist(n, 1)
            for i in (70001, 70002, 70003, 70100, 70102, 0, 1):
                for f in (pwd.getpwuid, grp.getgrgid):
                    try: f(i)
                    except KeyError: pass
            assert all(p.pw_uid != 0 for p in pwd.getpwall())
            assert all(g.gr_gid != 0 for g in grp.getgrall())
        print("ok")
        """,
        d, conf, tmp_path, d, 42, 600, timeout=300,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "ok"


# A C harness that links libnss_xos.c directly, with mmap replaced by a heap
# copy of exactly the file's size: AddressSanitizer then reports any read past
# the end of the index, and every too-small buffer write.
ASAN_HARNESS = r"""
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <nss.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

void *xos_test_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	(void)addr; (void)prot; (void)flags; (void)off;
	char *p = malloc(len ? len : 1);
	if (!p || pread(fd, p, len, 0) != (ssize_t)len) { free(p); return (void *)-1; }
	return p;
}
int xos_test_munmap(void *p, size_t len) { (void)len; free(p); return 0; }

#include "libnss_xos.c"

static const char *names[] = { "vo_alice", "vo_bob", "vo_zoe", "vo_dev", "vo_big", "vo_m001", "root", "", "nope" };
static const unsigned ids[] = { 0, 1, 70001, 70002, 70003, 70100, 70101, 70102, 4294967295u };

/* Every buffer size from 0 up, at an odd address: no write may go past it. */
static void sizes(int db, const char *name, unsigned id)
{
	for (size_t len = 0; len < 2600; len += (len < 300 ? 1 : 97)) {
		char *raw = malloc(len + 1), *buf = raw + 1;
		struct passwd pw; struct group gr; int err = 0;
		enum nss_status st;
		if (db == 0) st = name ? _nss_xos_getpwnam_r(name, &pw, buf, len, &err)
		                       : _nss_xos_getpwuid_r(id, &pw, buf, len, &err);
		else st = name ? _nss_xos_getgrnam_r(name, &gr, buf, len, &err)
		               : _nss_xos_getgrgid_r(id, &gr, buf, len, &err);
		if (st == NSS_STATUS_TRYAGAIN && err != ERANGE) abort();
		if (st == NSS_STATUS_SUCCESS && db == 0 && (pw.pw_uid == 0 || pw.pw_gid == 0 || !strcmp(pw.pw_name, "root"))) abort();
		if (st == NSS_STATUS_SUCCESS && db == 1) {
			if (gr.gr_gid == 0 || !strcmp(gr.gr_name, "root")) abort();
			for (char **m = gr.gr_mem; *m; m++) if (!strcmp(*m, "root")) abort();
		}
		free(raw);
		if (st != NSS_STATUS_TRYAGAIN) break;
	}
}

static void enumerate(void)
{
	char buf[4096]; struct passwd pw; struct group gr; int err;
	_nss_xos_setpwent(0);
	for (int i = 0; i < 100000 && _nss_xos_getpwent_r(&pw, buf, sizeof(buf), &err) == NSS_STATUS_SUCCESS; i++)
		if (pw.pw_uid == 0) abort();
	_nss_xos_endpwent();
	_nss_xos_setgrent(0);
	for (int i = 0; i < 100000 && _nss_xos_getgrent_r(&gr, buf, sizeof(buf), &err) == NSS_STATUS_SUCCESS; i++)
		if (gr.gr_gid == 0) abort();
	_nss_xos_endgrent();
}

static void try_initgroups(const char *name)
{
	long start = 1, size = 1; int err;
	gid_t *g = malloc(sizeof(gid_t));
	g[0] = 70001;
	_nss_xos_initgroups_dyn(name, 70001, &start, &size, &g, 0, &err);
	for (long i = 1; i < start; i++) if (g[i] == 0 || g[i] == 70001) abort();
	start = 1; size = 1;
	_nss_xos_initgroups_dyn(name, 70001, &start, &size, &g, 2, &err);   /* limit respected */
	if (size > 2 || start > 2) abort();
	free(g);
}

int main(int argc, char **argv)
{
	char target[4096];
	snprintf(target, sizeof(target), "%s/nss.index", getenv("XOS_NSS_DIR"));
	for (int a = 1; a < argc; a++) {
		if (rename(argv[a], target) != 0) { perror("rename"); return 2; }
		for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++) {
			sizes(0, names[i], 0); sizes(1, names[i], 0); try_initgroups(names[i]);
		}
		for (size_t i = 0; i < sizeof(ids) / sizeof(*ids); i++) { sizes(0, NULL, ids[i]); sizes(1, NULL, ids[i]); }
		enumerate();
	}
	publish(NULL);
	puts("ok");
	return 0;
}
"""


def test_fuzz_under_address_sanitizer(nss_lib, tmp_path):
    """Reads past the index or past the caller's buffer are caught by ASan."""
    exe = tmp_path / "harness"
    src = tmp_path / "harness.c"
    src.write_text(ASAN_HARNESS)
    r = subprocess.run(
        ["gcc", "-g", "-O1", "-std=gnu11", "-D_GNU_SOURCE", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-Dmmap=xos_test_mmap", "-Dmunmap=xos_test_munmap",
         "-I", str(NATIVE), "-o", str(exe), str(src), "-pthread"],
        capture_output=True, text=True,
    )
    if r.returncode != 0 and "sanitize" in r.stderr:
        pytest.skip("gcc cannot build with -fsanitize=address")
    assert r.returncode == 0, r.stderr
    d = tmp_path / "nss"
    d.mkdir()
    good = build_index(USERS, GROUPS)
    rng = random.Random(7)
    files = [d / "good0"]
    files[0].write_bytes(good)
    for name, data in CORRUPT.items():
        files.append(d / f"c-{name}")
        files[-1].write_bytes(data)
    for i in range(400):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 10)):
            b[rng.randrange(ni.HEADER_SIZE, len(b))] = rng.randrange(256)
        if i % 3 == 0:  # header fields too, re-sealed so validation is what is tested
            struct.pack_into("<I", b, rng.randrange(ni.OFF_N_USERS, ni.CHECKSUM_OFFSET, 4), rng.choice([0, 1, 8, 2**31, rng.randrange(2**32)]))
            hdr = bytearray(b[: ni.HEADER_SIZE])
            ni.seal_header(hdr)
            b[: ni.HEADER_SIZE] = hdr
        files.append(d / f"f{i}")
        files[-1].write_bytes(bytes(b))
    files.append(d / "good1")
    files[-1].write_bytes(good)
    env = dict(os.environ, XOS_NSS_DIR=str(d), ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1")
    r = subprocess.run([str(exe), *map(str, files)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip() == "ok"


# ---------------------------------------------------------------- replacement, threads, fds


def test_replaced_while_mapped(nss_lib, nss_dir, conf, tmp_path):
    """A process keeps its old mapping; the next lookup sees the new file."""
    conf.write_text(NSSWITCH_XOS_ONLY)
    r = run_py(
        """
        import pwd
        from pathlib import Path
        from xos_sshd.ams.nss_index import write_index
        d = Path(sys.argv[1])
        assert pwd.getpwnam("vo_alice").pw_uid == 70001
        try: pwd.getpwnam("vo_new"); raise SystemExit("vo_new too early")
        except KeyError: pass
        # An enumeration started on the old file continues on it.
        libc.setpwent()
        res = Passwd(); out = POINTER(Passwd)(); buf = ctypes.create_string_buffer(1024)
        assert libc.getpwent_r(byref(res), buf, 1024, byref(out)) == 0 and res.pw_name == b"vo_alice"
        write_index(d, [("vo_new", 71000, 71000, "", "/home/vo_new", "/bin/sh"),
                        ("vo_alice", 71001, 71001, "", "/home/vo_alice", "/bin/sh")], [])
        assert libc.getpwent_r(byref(res), buf, 1024, byref(out)) == 0 and res.pw_name == b"vo_bob"
        libc.endpwent()
        assert pwd.getpwnam("vo_new").pw_uid == 71000
        assert pwd.getpwnam("vo_alice").pw_uid == 71001
        try: pwd.getpwnam("vo_bob"); raise SystemExit("vo_bob survived")
        except KeyError: pass
        maps = [l for l in open("/proc/self/maps") if "nss.index" in l]
        assert len(maps) == 1 and "(deleted)" not in maps[0], maps   # the old map is gone
        print("ok")
        """,
        nss_dir, conf, tmp_path, nss_dir,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


STRESS = r"""
#include <errno.h>
#include <grp.h>
#include <pthread.h>
#include <pwd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int stop, bad;
static long rounds;

/* Index A has a_<i> with uid 80000+i, index B has b_<i> with uid 90000+i:
 * whatever version a lookup sees, its answer must be self-consistent. */
static void *reader(void *arg)
{
	char buf[2048], name[32];
	unsigned seed = (unsigned)(long)arg;
	while (!stop) {
		struct passwd pw, *pres; struct group gr, *gres;
		int i = rand_r(&seed) % 200, which = rand_r(&seed) % 2;
		snprintf(name, sizeof(name), "%c_%d", which ? 'b' : 'a', i);
		if (getpwnam_r(name, &pw, buf, sizeof(buf), &pres) == 0 && pres &&
		    (pw.pw_uid != (uid_t)((which ? 90000 : 80000) + i) || strcmp(pw.pw_name, name)))
			bad++;
		uid_t uid = (which ? 90000 : 80000) + i;
		if (getpwuid_r(uid, &pw, buf, sizeof(buf), &pres) == 0 && pres && strcmp(pw.pw_name, name))
			bad++;
		if (getgrgid_r(uid, &gr, buf, sizeof(buf), &gres) == 0 && gres &&
		    (strcmp(gr.gr_name, name) || !gr.gr_mem[0] || strcmp(gr.gr_mem[0], name)))
			bad++;
		gid_t groups[16]; int ng = 16;
		getgrouplist(name, 1, groups, &ng);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	const char *dir = getenv("XOS_NSS_DIR");
	char a[4096], b[4096], tmp[4096], target[4096];
	pthread_t t[4];
	rounds = argc > 1 ? atol(argv[1]) : 300;
	snprintf(a, sizeof(a), "%s/A", dir);
	snprintf(b, sizeof(b), "%s/B", dir);
	snprintf(tmp, sizeof(tmp), "%s/.swap", dir);
	snprintf(target, sizeof(target), "%s/nss.index", dir);
	int forks = !(argc > 2 && strcmp(argv[2], "nofork") == 0);
	/* Load glibc's NSS modules once before the threads start: glibc leaks a
	 * few bytes when two threads race to load the same module (not ours). */
	{
		char buf[1024]; struct passwd pw, *pres; struct group gr, *gres;
		gid_t g[4]; int ng = 4;
		getpwnam_r("a_0", &pw, buf, sizeof(buf), &pres);
		getpwuid_r(80000, &pw, buf, sizeof(buf), &pres);
		getgrgid_r(80000, &gr, buf, sizeof(buf), &gres);
		getgrouplist("a_0", 1, g, &ng);
	}
	for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, reader, (void *)(i + 1));
	for (long r = 0; r < rounds; r++) {
		unlink(tmp);
		if (link(r % 2 ? a : b, tmp) || rename(tmp, target)) { perror("swap"); return 2; }
		if (forks && r % 20 == 0) {
			/* fork while readers run: the child must not inherit a held lock. */
			pid_t pid = fork();
			if (pid == 0) {
				char buf[1024]; struct passwd pw, *res;
				alarm(10);
				getpwnam_r("a_1", &pw, buf, sizeof(buf), &res);
				getpwnam_r("b_1", &pw, buf, sizeof(buf), &res);
				_exit(0);
			}
			int status;
			if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
				fprintf(stderr, "forked child failed\n");
				bad++;
			}
		}
		usleep(1000);
	}
	stop = 1;
	for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
	printf("bad=%d\n", (int)bad);
	return bad ? 1 : 0;
}
"""


def stress_tables(d: Path) -> None:
    for tag, base in (("a", 80000), ("b", 90000)):
        users = [(f"{tag}_{i}", base + i, base + i, "", f"/home/{tag}_{i}", "/bin/sh") for i in range(200)]
        groups = [(f"{tag}_{i}", base + i, [f"{tag}_{i}"]) for i in range(200)]
        write_index(d / tag, users, groups)
        os.replace(d / tag / ni.INDEX_NAME, d / tag.upper())
        (d / tag).rmdir()


@pytest.fixture
def stress_exe(tmp_path) -> Path:
    src = tmp_path / "stress.c"
    src.write_text(STRESS)
    exe = tmp_path / "stress"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src), "-pthread"], check=True)
    return exe


def test_threads_while_file_is_replaced(nss_lib, tmp_path, conf, stress_exe):
    conf.write_text(NSSWITCH_XOS_ONLY)
    d = tmp_path / "nss"
    d.mkdir()
    stress_tables(d)
    r = run_ns([stress_exe, 400], d, conf, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "bad=0"


def test_no_fd_leak(nss_lib, nss_dir, conf, tmp_path):
    r = run_py(
        """
        import pwd, grp
        from pathlib import Path
        from xos_sshd.ams.nss_index import write_index
        d = Path(sys.argv[1])
        pwd.getpwnam("vo_alice")       # load the module and libc's own state first
        before = sorted(os.listdir("/proc/self/fd"))
        for i in range(1000):
            if i % 100 == 50:            # force remaps
                write_index(d, [("vo_alice", 70001, 70001, "", "/h", "/bin/sh"),
                                (f"vo_n{i}", 72000 + i, 72000 + i, "", "/h", "/bin/sh")], [("vo_dev", 70100, ["vo_alice"])])
            if i == 500:
                os.unlink(d / "nss.index")   # tables gone for a while
            if i == 600:
                write_index(d, [("vo_alice", 70001, 70001, "", "/h", "/bin/sh")], [])
            for f, k in ((pwd.getpwnam, "vo_alice"), (pwd.getpwuid, 70001), (grp.getgrnam, "vo_dev"),
                         (grp.getgrgid, 70100), (pwd.getpwnam, "nobody_x")):
                try: f(k)
                except KeyError: pass
            os.getgrouplist("vo_alice", 70001)
            if i % 100 == 0:
                pwd.getpwall(); grp.getgrall()
        after = sorted(os.listdir("/proc/self/fd"))
        assert before == after, (before, after)
        assert not any("nss.index" in os.readlink(f"/proc/self/fd/{f}") for f in after if os.path.exists(f"/proc/self/fd/{f}"))
        maps = [l for l in open("/proc/self/maps") if "nss.index" in l]
        assert len(maps) <= 1, maps
        print("ok", len(before))
        """,
        nss_dir, conf, tmp_path, nss_dir,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


# ---------------------------------------------------------------- valgrind


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_valgrind_clean(nss_lib, nss_dir, conf, tmp_path, stress_exe):
    vg = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect",
          "--track-fds=no", "-q"]
    bad = tmp_path / "bad"
    bad.mkdir()
    runs = [
        (nss_dir, ["getent", "-s", "xos", "passwd", "vo_alice"], 0),
        (nss_dir, ["getent", "-s", "xos", "passwd", "70003"], 0),
        (nss_dir, ["getent", "-s", "xos", "group", "vo_big"], 0),
        (nss_dir, ["getent", "-s", "xos", "passwd"], 0),
        (nss_dir, ["getent", "-s", "xos", "group"], 0),
        (nss_dir, ["getent", "-s", "xos", "passwd", "nosuchuser"], 2),
        (nss_dir, ["id", "vo_alice"], 0),
        (bad, ["getent", "-s", "xos", "passwd", "vo_alice"], 2),
    ]
    for variant in ("truncated-half", "garbage-with-magic", "user-name-offset-past-end", "buckets-all-full"):
        vd = tmp_path / variant
        vd.mkdir()
        place_index(vd, CORRUPT[variant])
        runs.append((vd, ["getent", "-s", "xos", "passwd", "vo_alice"], 2))
        runs.append((vd, ["getent", "-s", "xos", "group"], None))
    for d, argv, want in runs:
        r = run_ns(vg + argv, d, conf, timeout=120)
        assert r.returncode != 99, (argv, d, r.stderr)
        assert want is None or r.returncode == want, (argv, d, r.returncode, r.stderr)
        assert "Invalid read" not in r.stderr and "Invalid write" not in r.stderr, r.stderr
    # Threads + remaps under memcheck.
    conf.write_text(NSSWITCH_XOS_ONLY)
    sd = tmp_path / "stress-tables"
    sd.mkdir()
    stress_tables(sd)
    r = run_ns(vg + [stress_exe, 40, "nofork"], sd, conf, timeout=300)  # forked children would report the parent's threads' memory
    assert r.returncode == 0, r.stdout + r.stderr
