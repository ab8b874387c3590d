#!/usr/bin/python3
"""Run one command in a Debian 12 guest (its own kernel) with this checkout shared.

Why: this machine's kernel has no soft-dirty tracking (``# CONFIG_MEM_SOFT_DIRTY is not
set``: ``criu pre-dump`` fails "Dirty tracking is OFF"); Debian's kernels have it.  This
harness boots Debian bookworm's kernel (6.1) under QEMU and runs one command there, as root,
against *this* checkout (virtio-9p, same path), the CRIU bundle (``/opt/xos-criu``, same
path, read-only) and the host's ``.venv`` (its python is ``/usr/bin/python3``: the guest
has the same Debian 12 python 3.11, so the venv works unchanged).

Accelerators (``--accel``, or ``$XOS_VM_ACCEL``): ``kvm`` needs a /dev/kvm that runs a
stock kernel; ``tcg`` is QEMU's software emulation (always works, 20-70x slower: boot
~20-35 s, CPU-bound Python ~20x, imports over 9p ~35x); ``auto`` (default) takes KVM when
usable, else TCG with a warning.  On the Firecracker sandbox /dev/kvm exists and
KVM_CREATE_VM succeeds, but it is *kvm-pvm* (pagetable-based virtualisation, no hardware
virtualisation underneath): it runs only PVM guest kernels (CONFIG_PVM_GUEST +
CONFIG_X86_PIE); Debian's kernel hangs right after its real-mode setup.  ``check`` says
which one would be used and why.

Usage (as root; standard library only, run with the system python)::

    scripts/vm/xosvm.py check [--accel auto|kvm|tcg]   # 0 + what runs, or 77 + the reason
    scripts/vm/xosvm.py build [--force]       # build the cached guest if missing/outdated
    scripts/vm/xosvm.py run [OPTIONS] -- CMD [ARG...]
    scripts/vm/xosvm.py info                  # the cached image: recipe hash, versions
    scripts/vm/xosvm.py clean                 # remove the whole cache

    # e.g.
    scripts/vm/xosvm.py run -- /opt/xos-criu/bin/criu check --feature mem_dirty_track
    scripts/vm/xosvm.py run --timeout 3000 -- .venv/bin/pytest -q tests/test_criu.py
    scripts/vm/xosvm.py run --mem 3072 --timeout 3000 --sysctl fs.pipe-user-pages-soft=0 -- \
        .venv/bin/python tests/vm/predump_probe.py --caps checkpoint_restore,dac_override
    XOS_VM_TESTS=1 .venv/bin/pytest -q tests/vm      # the opt-in VM tests

``run`` options: ``--accel``, ``--cpus N`` (1 or 2, default 2), ``--mem MIB`` (256-4096,
default 2048), ``--timeout S`` (the command; default 600), ``--boot-timeout S`` (default
60 with KVM, 300 with TCG), ``--cwd DIR`` (default: the checkout, or / when it is not
shared), ``--env K=V``,
``--sysctl k=v`` (set before the command), ``--share PATH[:ro]`` (more host directories at
the same path; all three repeatable), ``--no-default-shares``, ``--tmp-size SIZE`` (the
guest's /tmp tmpfs, default 75%), ``--keep`` (keep the run directory under the cache),
``--quiet`` (no timing line).  The command's stdout and stderr come out live on ours, then
one line on stderr: ``xos-vm: boot 21.6 s, command 83.8 s, total 105.6 s, status 0``.  The
guest gets the host's RLIMIT_NOFILE, PATH/HOME/LANG, PYTHONDONTWRITEBYTECODE=1 and ``--env``.

Exit status of ``run``: the command's (128+N for a signal); 124 the command timed out (the
guest kills it); 125 the harness failed (build, QEMU, boot timeout, the guest died: the
console log's tail is printed); 77 the requested accelerator cannot run here (no /dev/kvm,
kvm-pvm, KVM_CREATE_VM fails, no QEMU): callers skip with the reason printed on stderr
(``xos-vm: skip: ...``).  ``run`` builds the image first when needed (~2 min); ``build``
does it explicitly.

The guest: Debian bookworm minbase + the project's test packages (parsed from
``scripts/system-deps.sh``: the image follows that list) + ``linux-image-amd64`` (6.1,
CONFIG_MEM_SOFT_DIRTY=y; ``XOS_VM_KERNEL=backports`` for bookworm-backports' 6.12),
debootstrapped into ``$XOS_VM_CACHE`` (default /var/cache/xos-sshd-vm, never the repo;
mirror: the system's, or ``$XOS_VM_MIRROR``) and packed into an ext4 image with
``mke2fs -d`` (no loop mount).  It is rebuilt only when its recipe changes (the package
list, suite, kernel choice, the in-image shim, RECIPE_VERSION); builds are serialised by an
flock, runs hold it shared until QEMU has the image open.  The disk is used with
``snapshot=on`` (writes go to a throw-away overlay in the run directory): runs never change
the image and can go in parallel.  Downloaded packages stay in the cache's ``debs/``.  No
network device (loopback only).  QEMU: ``-machine q35``, KVM with ``-cpu
host,-arch-capabilities`` (plain ``host`` aborts on MSR 0x10a in nested set-ups), TCG
multi-threaded with ``-cpu max``.

Boot: ``-kernel/-initrd/-append`` (no bootloader), a small initrd (``MODULES=list``: virtio
and ext4 only), no systemd: PID 1 is ``/usr/sbin/xos-vm-init`` (a shim baked into the
image) which mounts the per-run 9p share ``xosvm`` at /run/xos-vm and execs
``scripts/vm/guest_init.py`` copied there for the run (editing it needs no rebuild).  That
init mounts /sys, /dev, /dev/pts, /dev/shm, /tmp (tmpfs), cgroup2, the shares
(``cache=loose``: the VM lives for one command), brings ``lo`` up, sets the rlimits and
sysctls, runs the command (stdin /dev/null, stdout/stderr on two virtio serial ports that
QEMU writes to files the host copies live), reaps orphans, enforces the timeout, kills what
is left, writes ``status.json`` and powers off.  The host kills QEMU on every exit path
(exception, SIGINT/SIGTERM/SIGHUP, its own death through PR_SET_PDEATHSIG) and removes the
run directory.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get('XOS_VM_CACHE', '/var/cache/xos-sshd-vm'))
QEMU = os.environ.get('XOS_VM_QEMU', 'qemu-system-x86_64')
CRIU_PREFIX = os.environ.get('XOS_CRIU_PREFIX', '/opt/xos-criu')

EXIT_SKIP = 77
EXIT_TIMEOUT = 124
EXIT_HARNESS = 125

#: Bump to force a rebuild when the build procedure itself changes.
RECIPE_VERSION = 1
SUITE = 'bookworm'
#: Beyond scripts/system-deps.sh's test packages: the kernel, modprobe, and what the init uses.
EXTRA_PACKAGES = ['kmod', 'mount', 'iproute2', 'procps', 'psmisc', 'ca-certificates']
#: The initrd only has to find the root disk.
INITRD_MODULES = ['virtio_pci', 'virtio_blk', 'ext4']
#: PID 1 baked into the image: mount the run share and hand over to guest_init.py.
SHIM = r'''#!/bin/sh
# xos-sshd test VM (scripts/vm/xosvm.py): PID 1.  Mount /proc, /run and the run share,
# then exec the run's init (scripts/vm/guest_init.py, copied into the share by the host).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p /run/xos-vm
modprobe -q 9pnet_virtio 2>/dev/null; modprobe -q 9p 2>/dev/null
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none,access=client \
     xosvm /run/xos-vm && [ -f /run/xos-vm/init.py ]; then
  exec /usr/bin/python3 -I -S /run/xos-vm/init.py
fi
echo "xos-vm-init: cannot mount the run share (9p tag xosvm)" >/dev/console
echo o >/proc/sysrq-trigger
sleep 30
'''
KERNEL_LOG = os.environ.get('XOS_VM_KERNEL_LOG', 'quiet loglevel=4')
#: Seconds until the guest's init runs: measured 1-2 s with KVM, 17-35 s with TCG here.
BOOT_TIMEOUT = {'kvm': 60.0, 'tcg': 300.0}
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
PR_SET_PDEATHSIG = 1
#: Host directories a share may not be (the guest's own system lives there).
SYSTEM_DIRS = {'/', '/bin', '/boot', '/etc', '/lib', '/lib64', '/sbin', '/usr', '/var',
               '/root', '/home', '/tmp', '/opt', '/srv', '/mnt', '/media'}


class Skip(Exception):
    """This machine cannot run the VM (exit 77)."""


class HarnessError(Exception):
    """The harness failed (exit 125)."""


def say(msg: str) -> None:
    print(f'xos-vm: {msg}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ checks

def kvm_problem() -> str | None:
    """Why this machine cannot run a stock Linux guest under KVM, or None."""
    if not os.path.exists('/dev/kvm'):
        return 'no /dev/kvm (no KVM here: hardware virtualisation off or not nested)'
    try:
        fd = os.open('/dev/kvm', os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f'cannot open /dev/kvm: {exc.strerror}'
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != 12:
            return f'/dev/kvm API version {version}, expected 12'
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return f'KVM_CREATE_VM failed: {exc.strerror}'
        os.close(vm)
    finally:
        os.close(fd)
    if os.path.isdir('/sys/module/kvm_pvm') and not any(
            os.path.isdir(f'/sys/module/{m}') for m in ('kvm_intel', 'kvm_amd')):
        # Measured on the Firecracker sandbox: SeaBIOS runs, Debian's kernel then hangs
        # right after its real-mode setup ("Probing EDD ... ok"), at 100 % CPU.
        return ('/dev/kvm is kvm-pvm (pagetable-based virtualisation, no hardware '
                'virtualisation underneath): it runs only PVM guest kernels '
                '(CONFIG_PVM_GUEST, CONFIG_X86_PIE), not Debian\'s')
    return None


def qemu_problem() -> str | None:
    if not shutil.which(QEMU):
        return (f'{QEMU} not found (apt-get install -y --no-install-recommends '
                'qemu-system-x86)')
    return None


def choose_accel(accel: str) -> tuple[str, str | None]:
    """(``kvm`` or ``tcg``, why KVM is not used) for ``--accel auto|kvm|tcg``; Skip when
    the requested accelerator cannot run here."""
    problem = qemu_problem()
    if problem:
        raise Skip(problem)
    if accel == 'tcg':
        return 'tcg', None
    problem = kvm_problem()
    if problem is None:
        return 'kvm', None
    if accel == 'kvm':
        raise Skip(problem)
    return 'tcg', problem


def build_problem() -> str | None:
    if os.geteuid() != 0:
        return 'building the guest image needs root'
    for tool in ('debootstrap', 'mke2fs', 'chroot'):
        if not shutil.which(tool):
            return f'{tool} not found (apt-get install -y --no-install-recommends debootstrap)'
    return None


# ------------------------------------------------------------------------------ recipe

def project_packages() -> list[str]:
    """RUN_PKGS + TEST_PKGS of scripts/system-deps.sh (the host's test environment)."""
    text = (REPO / 'scripts' / 'system-deps.sh').read_text()
    found = {}
    for name in ('RUN_PKGS', 'TEST_PKGS'):
        m = re.search(rf'^{name}="([^"]*)"', text, re.M)
        if not m:
            raise HarnessError(f'cannot find {name}="..." in scripts/system-deps.sh')
        found[name] = m.group(1).replace('$RUN_PKGS', '').split()
    return sorted(set(found['RUN_PKGS']) | set(found['TEST_PKGS']))


def recipe() -> dict:
    kernel = os.environ.get('XOS_VM_KERNEL', 'stable')
    if kernel not in ('stable', 'backports'):
        raise HarnessError(f'XOS_VM_KERNEL must be stable or backports, not {kernel!r}')
    return {
        'version': RECIPE_VERSION,
        'suite': SUITE,
        'variant': 'minbase',
        'packages': sorted(set(project_packages()) | set(EXTRA_PACKAGES)),
        'kernel': kernel,
        'initrd_modules': INITRD_MODULES,
        'shim': SHIM,
    }


def recipe_hash(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]


def mirrors() -> tuple[str, str]:
    """The Debian mirror (and its security archive) the system's apt already uses."""
    mirror = os.environ.get('XOS_VM_MIRROR', '')
    security = os.environ.get('XOS_VM_SECURITY_MIRROR', '')
    texts = []
    for p in [Path('/etc/apt/sources.list'), *sorted(Path('/etc/apt/sources.list.d').glob('*'))]:
        try:
            texts.append(p.read_text())
        except OSError:
            pass
    urls = re.findall(r'(?:URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)', '\n'.join(texts), re.M)
    if not mirror:
        mirror = next((u for u in urls if re.search(r'/debian/?$', u)), 'http://deb.debian.org/debian')
    if not security:
        security = next((u for u in urls if re.search(r'/debian-security/?$', u)),
                        'http://deb.debian.org/debian-security')
    return mirror.rstrip('/'), security.rstrip('/')


# ------------------------------------------------------------------------------ build

class Lock:
    """flock on CACHE/lock: builds exclusive, runs shared (until QEMU has the image open)."""

    def __init__(self) -> None:
        CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.fd = os.open(CACHE / 'lock', os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def shared(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def exclusive(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


def image_dir(h: str) -> Path:
    return CACHE / 'images' / h


def image_ready(h: str) -> bool:
    d = image_dir(h)
    return all((d / f).is_file() for f in ('rootfs.ext4', 'vmlinuz', 'initrd.img', 'built.json'))


def _step(what: str, argv: list[str], logf, env: dict | None = None, timeout: float = 3600) -> str:
    logf.write(f'\n=== {what}: {" ".join(argv)}\n')
    logf.flush()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout,
                         check=False)
    logf.write(res.stdout)
    logf.flush()
    if res.returncode != 0:
        tail = '\n'.join(res.stdout.splitlines()[-25:])
        raise HarnessError(f'{what} failed (exit status {res.returncode}):\n{tail}')
    return res.stdout


def _link_all(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob('*.deb'):
        t = dst / f.name
        if not t.exists():
            try:
                os.link(f, t)
            except OSError:
                shutil.copy2(f, t)


def build(force: bool = False) -> str:
    """Build the image for the current recipe unless it is there; return its hash."""
    problem = build_problem()
    r = recipe()
    h = recipe_hash(r)
    lock = Lock()
    try:
        lock.exclusive()
        if image_ready(h) and not force:
            return h
        if problem:
            raise HarnessError(problem)
        _build(r, h)
        for old in (CACHE / 'images').iterdir():  # images of older recipes
            if old.name != h:
                shutil.rmtree(old, ignore_errors=True)
        return h
    finally:
        lock.close()


def _build(r: dict, h: str) -> None:
    started = time.monotonic()
    work = CACHE / 'build'
    shutil.rmtree(work, ignore_errors=True)
    root = work / 'root'
    root.mkdir(parents=True)
    debs = CACHE / 'debs'
    debs.mkdir(exist_ok=True)
    mirror, security = mirrors()
    say(f'building the guest image {h} ({r["suite"]}, kernel {r["kernel"]}) in {work}; '
        f'log: {work}/build.log')
    env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C.UTF-8',
           'DEBIAN_FRONTEND': 'noninteractive', 'HOME': '/root'}
    with open(work / 'build.log', 'w') as logf:
        _step('debootstrap', ['debootstrap', f'--variant={r["variant"]}', f'--cache-dir={debs}',
                              '--components=main', r['suite'], str(root), mirror], logf, env)
        suites = [r['suite'], f'{r["suite"]}-updates'] + (
            [f'{r["suite"]}-backports'] if r['kernel'] == 'backports' else [])
        (root / 'etc/apt/sources.list').write_text(
            f'deb {mirror} {" ".join(suites[:1])} main\n'
            + ''.join(f'deb {mirror} {s} main\n' for s in suites[1:])
            + f'deb {security} {r["suite"]}-security main\n')
        policy = root / 'usr/sbin/policy-rc.d'
        policy.write_text('#!/bin/sh\nexit 101\n')
        policy.chmod(0o755)
        conf = root / 'etc/initramfs-tools'
        (conf / 'conf.d').mkdir(parents=True, exist_ok=True)
        (conf / 'conf.d/xos-vm.conf').write_text('MODULES=list\nCOMPRESS=gzip\n')
        (conf / 'modules').write_text(''.join(m + '\n' for m in r['initrd_modules']))
        (root / 'etc/dpkg/dpkg.cfg.d/xos-vm-nodoc').write_text(
            'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\n'
            'path-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n'
            'path-include /usr/share/locale/locale.alias\n')
        archives = root / 'var/cache/apt/archives'
        _link_all(debs, archives)
        chroot = ['chroot', str(root)]
        _step('apt-get update', chroot + ['apt-get', 'update'], logf, env)
        _step('apt-get upgrade', chroot + ['apt-get', '-y', 'upgrade'], logf, env)
        _step('apt-get install', chroot + ['apt-get', 'install', '-y', '--no-install-recommends',
                                           *r['packages']], logf, env)
        kernel = ['-t', f'{r["suite"]}-backports'] if r['kernel'] == 'backports' else []
        _step('apt-get install (kernel)', chroot + ['apt-get', 'install', '-y',
                                                    '--no-install-recommends', *kernel,
                                                    'linux-image-amd64'], logf, env)
        _link_all(archives, debs)
        _step('apt-get clean', chroot + ['apt-get', 'clean'], logf, env)
        shutil.rmtree(root / 'var/lib/apt/lists', ignore_errors=True)
        (root / 'var/lib/apt/lists/partial').mkdir(parents=True)
        policy.unlink()
        versions = _step('versions', chroot + [
            'dpkg-query', '-W', '-f=${Package} ${Version}\\n', 'python3.11', 'libc6',
            'linux-image-amd64', 'openssh-server', 'libpam0g'], logf, env)
        (root / 'etc/hostname').write_text('xosvm\n')
        (root / 'etc/hosts').write_text('127.0.0.1 localhost xosvm\n::1 localhost ip6-localhost\n')
        (root / 'etc/fstab').write_text('# xos-sshd test VM: mounts are made by /sbin/xos-vm-init\n')
        shim = root / 'usr/sbin/xos-vm-init'
        shim.write_text(r['shim'])
        shim.chmod(0o755)
        boots = sorted((root / 'boot').glob('vmlinuz-*'))
        initrds = sorted((root / 'boot').glob('initrd.img-*'))
        if len(boots) != 1 or len(initrds) != 1:
            raise HarnessError(f'expected one kernel and one initrd in the guest /boot, found '
                               f'{[p.name for p in boots + initrds]}')
        shutil.copy2(boots[0], work / 'vmlinuz')
        shutil.copy2(initrds[0], work / 'initrd.img')
        used = int(subprocess.run(['du', '-sxm', str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        size = used + max(512, used // 2)
        img = work / 'rootfs.ext4'
        _step('mke2fs', ['mke2fs', '-q', '-t', 'ext4', '-L', 'xosvm', '-m', '0', '-d', str(root),
                         str(img), f'{size}M'], logf, env)
    built = {'hash': h, 'recipe': r, 'kernel': boots[0].name, 'initrd': initrds[0].name,
             'versions': dict(line.split(' ', 1) for line in versions.splitlines() if ' ' in line),
             'size_mib': size, 'build_seconds': round(time.monotonic() - started, 1),
             'mirror': mirror, 'built': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    (work / 'built.json').write_text(json.dumps(built, indent=1) + '\n')
    shutil.rmtree(root)
    dest = image_dir(h)
    dest.parent.mkdir(exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(work, dest)
    say(f'built {dest} in {built["build_seconds"]} s ({size} MiB image, {boots[0].name})')


# ------------------------------------------------------------------------------ run

class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def _pdeathsig() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)


def parse_shares(specs: list[str], defaults: bool) -> list[dict]:
    shares: list[tuple[str, bool]] = []
    if defaults:
        shares.append((str(REPO), False))
        if os.path.isdir(CRIU_PREFIX):
            shares.append((os.path.realpath(CRIU_PREFIX), True))
    for spec in specs:
        path, _, mode = spec.partition(':')
        if mode not in ('', 'ro', 'rw'):
            raise HarnessError(f'--share {spec}: the mode is ro or rw')
        shares.append((path, mode == 'ro'))
    out, seen = [], set()
    for path, ro in shares:
        real = os.path.realpath(path)
        if not os.path.isabs(path) or not os.path.isdir(real):
            raise HarnessError(f'--share {path}: not an absolute path to a directory')
        if real in SYSTEM_DIRS or any(real == d or real.startswith(d + '/')
                                      for d in ('/proc', '/sys', '/dev', '/run', '/boot')):
            raise HarnessError(f'--share {path}: the guest has its own {real}')
        if real in seen:
            continue
        seen.add(real)
        out.append({'tag': f's{len(out)}', 'path': real, 'ro': ro})
    return out


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors='replace')
    except OSError:
        return '(none)'
    return '\n'.join(text.splitlines()[-lines:]) or '(empty)'


def run(argv: list[str], *, cpus: int = 2, mem: int = 2048, timeout: float = 600,
        boot_timeout: float | None = None, cwd: str | None = None, env: dict | None = None,
        sysctls: dict | None = None, shares: list[dict] | None = None,
        tmp_size: str = '75%', keep: bool = False, quiet: bool = False,
        accel: str = 'auto') -> int:
    """Boot the guest, run *argv*, return its exit status (see the module doc)."""
    accel, why = choose_accel(accel)
    if why and not quiet:
        say(f'KVM unusable ({why}); using TCG (software emulation, 20-70x slower)')
    if boot_timeout is None:
        boot_timeout = BOOT_TIMEOUT[accel]
    if not 1 <= cpus <= 2 or not 256 <= mem <= 4096:
        raise HarnessError('--cpus is 1 or 2 and --mem 256..4096 MiB (a shared machine)')
    shares = parse_shares([], True) if shares is None else shares
    h = recipe_hash(recipe())
    lock = Lock()
    qemu = None
    rundir = None
    run_lock = None
    outs = []
    old_handlers = {s: signal.signal(s, _on_signal)
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        lock.shared()
        if not image_ready(h):
            lock.release()
            build()
            lock.shared()
            if not image_ready(h):
                raise HarnessError('the image vanished after it was built (a concurrent rebuild?)')
        img = image_dir(h)
        (CACHE / 'runs').mkdir(exist_ok=True)
        prune_runs()
        rundir = Path(tempfile.mkdtemp(prefix='run.', dir=CACHE / 'runs'))
        # Held while this run lives: a run directory whose lock is free was left by a
        # harness killed with SIGKILL (its QEMU died with it: PR_SET_PDEATHSIG).  Locked
        # before it appears in the directory, so prune_runs never sees it free.
        fd, tmp = tempfile.mkstemp(prefix='.lock.', dir=CACHE / 'runs')
        run_lock = fd
        fcntl.flock(run_lock, fcntl.LOCK_EX)
        os.rename(tmp, rundir / 'lock')
        shutil.copy2(HERE / 'guest_init.py', rundir / 'init.py')
        if cwd is None:  # the checkout when it is shared, else /
            cwd = str(REPO) if any(s['path'] == str(REPO) for s in shares) else '/'
        # The host's open-files limits: what the project's processes get here (CRIU's page
        # pipes need many descriptors; a guest init's default is 1024/4096).
        job = {'argv': argv, 'cwd': cwd, 'env': env or {}, 'timeout': timeout,
               'sysctls': sysctls or {}, 'shares': shares, 'tmp_size': tmp_size,
               'rlimits': {'NOFILE': resource.getrlimit(resource.RLIMIT_NOFILE)}}
        (rundir / 'job.json').write_text(json.dumps(job))
        for name in ('stdout', 'stderr'):
            (rundir / name).touch()
        if accel == 'kvm':
            cpu = ['-accel', 'kvm', '-cpu', 'host,-arch-capabilities']
        else:
            cpu = ['-accel', 'tcg,thread=multi,tb-size=256', '-cpu', 'max']
        cmd = [QEMU, '-name', 'xos-vm', *cpu, '-machine', 'q35',
               '-smp', str(cpus), '-m', str(mem), '-nodefaults', '-no-user-config',
               '-display', 'none', '-no-reboot', '-monitor', 'none',
               '-serial', f'file:{rundir}/console.log',
               '-kernel', str(img / 'vmlinuz'), '-initrd', str(img / 'initrd.img'),
               '-append', 'console=ttyS0 root=/dev/vda rw rootfstype=ext4 '
                          f'init=/usr/sbin/xos-vm-init panic=-1 {KERNEL_LOG}',
               '-drive', f'file={img}/rootfs.ext4,if=virtio,format=raw,snapshot=on,cache=unsafe',
               '-device', 'virtio-rng-pci',
               '-device', 'virtio-serial-pci,id=vser',
               '-chardev', f'file,id=out,path={rundir}/stdout',
               '-device', 'virtserialport,bus=vser.0,chardev=out,name=xos.stdout',
               '-chardev', f'file,id=err,path={rundir}/stderr',
               '-device', 'virtserialport,bus=vser.0,chardev=err,name=xos.stderr',
               '-virtfs', f'local,path={rundir},mount_tag=xosvm,security_model=passthrough,id=xosvm']
        for s in shares:
            cmd += ['-virtfs', f'local,path={s["path"]},mount_tag={s["tag"]},'
                               f'security_model=passthrough,id={s["tag"]}'
                               + (',readonly=on' if s['ro'] else '')]
        started = time.monotonic()
        with open(rundir / 'qemu.log', 'wb') as qlog:
            qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                    preexec_fn=_pdeathsig, env={**os.environ, 'TMPDIR': str(rundir)})
        outs = [(open(rundir / 'stdout', 'rb'), sys.stdout.buffer),
                (open(rundir / 'stderr', 'rb'), sys.stderr.buffer)]
        booted = None
        deadline = started + boot_timeout
        while qemu.poll() is None:
            _copy(outs)
            now = time.monotonic()
            if booted is None and (rundir / 'booted.json').exists():
                booted = now - started
                lock.release()
                deadline = now + timeout + 30  # the guest kills the command at timeout
            if now > deadline:
                what = (f'the guest did not boot within {boot_timeout:.0f} s' if booted is None
                        else f'the guest did not end within {timeout + 30:.0f} s')
                raise HarnessError(f'{what}; console:\n{_tail(rundir / "console.log")}')
            time.sleep(0.02)
        _copy(outs)
        for name, dst in (('stdout.txt', sys.stdout.buffer), ('stderr.txt', sys.stderr.buffer)):
            if (rundir / name).exists():  # the guest found no serial port: files instead
                dst.write((rundir / name).read_bytes())
                dst.flush()
        total = time.monotonic() - started
        try:
            status = json.loads((rundir / 'status.json').read_text())
        except (OSError, ValueError):
            raise HarnessError(
                f'the guest ended without a status (QEMU exit status {qemu.returncode}); '
                f'QEMU said:\n{_tail(rundir / "qemu.log", 10)}\n'
                f'console:\n{_tail(rundir / "console.log")}') from None
        if status.get('error'):
            raise HarnessError(f'the guest init failed: {status["error"]}; console:\n'
                               f'{_tail(rundir / "console.log")}')
        if not quiet:
            say(f'boot {booted or 0:.2f} s, command {status["seconds"]:.2f} s, total '
                f'{total:.2f} s, status {status["status"]}'
                + (' (timed out)' if status.get('timed_out') else ''))
        return int(status['status'])
    finally:
        if qemu is not None and qemu.poll() is None:
            try:
                os.killpg(qemu.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            qemu.wait()
        for f, _ in outs:
            f.close()
        lock.close()
        if run_lock is not None:
            os.close(run_lock)
        if rundir is not None:
            if keep:
                (rundir / 'lock').unlink(missing_ok=True)
                say(f'run directory kept: {rundir}')
            else:
                shutil.rmtree(rundir, ignore_errors=True)
        for s, handler in old_handlers.items():
            signal.signal(s, handler)


def prune_runs() -> None:
    """Remove the run directories of harnesses that died without cleaning up (their lock is
    free), except --keep ones (no lock file left)."""
    for d in (CACHE / 'runs').glob('run.*'):
        try:
            fd = os.open(d / 'lock', os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


def _copy(outs) -> None:
    for src, dst in outs:
        data = src.read()
        if data:
            dst.write(data)
            dst.flush()


# ------------------------------------------------------------------------------ CLI

def _kv(items: list[str], what: str) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition('=')
        if not sep or not k:
            raise HarnessError(f'{what} {item}: expected NAME=VALUE')
        out[k] = v
    return out


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='xosvm.py', description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('check', help='exit 0 if the guest can run here (with --accel), '
                                     'else 77 with the reason')
    c.add_argument('--accel', choices=('auto', 'kvm', 'tcg'),
                   default=os.environ.get('XOS_VM_ACCEL', 'auto'))
    b = sub.add_parser('build', help='build the cached guest image if missing or outdated')
    b.add_argument('--force', action='store_true')
    sub.add_parser('info', help='show the cached image')
    sub.add_parser('clean', help='remove the whole cache')
    r = sub.add_parser('run', help='run a command in the guest')
    r.add_argument('--cpus', type=int, default=2)
    r.add_argument('--mem', type=int, default=2048, help='MiB')
    r.add_argument('--timeout', type=float, default=600)
    r.add_argument('--boot-timeout', type=float)
    r.add_argument('--cwd')
    r.add_argument('--env', action='append', default=[])
    r.add_argument('--sysctl', action='append', default=[])
    r.add_argument('--share', action='append', default=[])
    r.add_argument('--no-default-shares', action='store_true')
    r.add_argument('--tmp-size', default='75%')
    r.add_argument('--keep', action='store_true')
    r.add_argument('--quiet', action='store_true')
    r.add_argument('--accel', choices=('auto', 'kvm', 'tcg'),
                   default=os.environ.get('XOS_VM_ACCEL', 'auto'))
    r.add_argument('argv', nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    try:
        if a.cmd == 'check':
            accel, why = choose_accel(a.accel)
            h = recipe_hash(recipe())
            print(f'ok: {accel}' + (f' (KVM unusable: {why})' if why else '')
                  + f'; image {h} ' + ('cached' if image_ready(h) else 'not built yet'))
            return 0
        if a.cmd == 'build':
            h = build(force=a.force)
            print(image_dir(h))
            return 0
        if a.cmd == 'info':
            h = recipe_hash(recipe())
            if not image_ready(h):
                print(f'image {h}: not built')
                return 1
            print((image_dir(h) / 'built.json').read_text(), end='')
            return 0
        if a.cmd == 'clean':
            lock = Lock()
            lock.exclusive()
            for name in ('images', 'build', 'debs', 'runs'):
                shutil.rmtree(CACHE / name, ignore_errors=True)
            lock.close()
            return 0
        argv = a.argv[1:] if a.argv[:1] == ['--'] else a.argv
        if not argv:
            p.error('run needs a command: run [OPTIONS] -- CMD [ARG...]')
        return run(argv, cpus=a.cpus, mem=a.mem, timeout=a.timeout,
                   boot_timeout=a.boot_timeout, cwd=a.cwd, env=_kv(a.env, '--env'),
                   sysctls=_kv(a.sysctl, '--sysctl'),
                   shares=parse_shares(a.share, not a.no_default_shares),
                   tmp_size=a.tmp_size, keep=a.keep, quiet=a.quiet, accel=a.accel)
    except Skip as exc:
        say(f'skip: {exc}')
        return EXIT_SKIP
    except HarnessError as exc:
        say(f'error: {exc}')
        return EXIT_HARNESS
    except Interrupted as exc:
        say(f'interrupted ({exc}); QEMU stopped')
        return 130


if __name__ == '__main__':
    sys.exit(main())
