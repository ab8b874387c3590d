"""PID 1 of the xos-sshd test VM (see scripts/vm/xosvm.py).

The image's shim (/sbin/xos-vm-init) mounts /proc, /run and the run share (9p tag
``xosvm``) at /run/xos-vm, then execs ``/usr/bin/python3 -I -S /run/xos-vm/init.py``: this
file, copied there by the host for every run (so changing it never rebuilds the image).

It reads /run/xos-vm/job.json, mounts the rest of the system and the host's shares at their
host paths, runs the command with stdout/stderr on two virtio serial ports that the host
copies live, reaps every orphan while it runs, kills what is left when it ends, writes
/run/xos-vm/status.json and powers the VM off.  Any failure of its own is reported in
status.json too (``error``), and the VM is powered off whatever happens: a PID 1 that
returns would panic the kernel (``panic=-1`` + ``-no-reboot`` still stop QEMU, but with no
status).  Standard library only; runs without site (``-S``).
"""

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

RUN = '/run/xos-vm'
PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
T0 = time.monotonic()
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def log(msg):
    try:
        with open('/dev/console', 'w') as f:
            f.write(f'xos-vm-init: {msg}\n')
    except OSError:
        pass


def sh(*argv, check=True):
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env={'PATH': PATH}, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)}: exit {res.returncode}: {res.stderr.strip()}')
    return res


def mounted(path):
    with open('/proc/self/mounts') as f:
        return any(line.split()[1] == path for line in f)


def mount(fstype, source, target, opts=''):
    os.makedirs(target, exist_ok=True)
    if not mounted(target):
        sh('mount', '-t', fstype, *(['-o', opts] if opts else []), source, target)


def write_json(name, obj):
    tmp = f'{RUN}/.{name}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, f'{RUN}/{name}')


def port(name, wait=3.0):
    """The /dev node of the virtio serial port called *name* (virtserialport name=...);
    None if it does not show up within *wait* seconds (output then goes to files)."""
    base = '/sys/class/virtio-ports'
    deadline = time.monotonic() + wait
    while True:
        for entry in os.listdir(base) if os.path.isdir(base) else ():
            try:
                with open(f'{base}/{entry}/name') as f:
                    if f.read().strip() == name and os.path.exists(f'/dev/{entry}'):
                        return f'/dev/{entry}'
            except OSError:
                continue
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def system(job):
    if not mounted('/sys'):
        mount('sysfs', 'sysfs', '/sys', 'nosuid,nodev,noexec')
    mount('devtmpfs', 'devtmpfs', '/dev', 'mode=0755,nosuid')
    mount('devpts', 'devpts', '/dev/pts', 'gid=5,mode=620,ptmxmode=666,nosuid,noexec')
    mount('tmpfs', 'shm', '/dev/shm', 'mode=1777,nosuid,nodev')
    mount('tmpfs', 'tmpfs', '/tmp', f'mode=1777,nosuid,nodev,size={job.get("tmp_size", "75%")}')
    mount('cgroup2', 'cgroup2', '/sys/fs/cgroup', 'nosuid,nodev,noexec')
    for link, target in (('/dev/fd', '/proc/self/fd'), ('/dev/stdin', '/proc/self/fd/0'),
                         ('/dev/stdout', '/proc/self/fd/1'), ('/dev/stderr', '/proc/self/fd/2'),
                         ('/dev/ptmx', 'pts/ptmx')):
        if not os.path.lexists(link):
            os.symlink(target, link)
    # Modules the host kernel has built in and CRIU/the project expect: the serial ports
    # for the output, and tun (/dev/net/tun: ``criu check`` logs an error without it).
    sh('modprobe', '-q', '-a', 'virtio_console', 'tun', check=False)
    sh('ip', 'link', 'set', 'lo', 'up')
    try:
        with open('/proc/sys/kernel/hostname', 'w') as f:
            f.write('xosvm')
    except OSError:
        pass
    for i, share in enumerate(job.get('shares', ())):
        opts = f'trans=virtio,version=9p2000.L,msize=524288,cache={job.get("cache", "loose")},access=client'
        if share.get('ro'):
            opts += ',ro'
        mount('9p', share['tag'], share['path'], opts)
    for name, (soft, hard) in job.get('rlimits', {}).items():
        resource.setrlimit(getattr(resource, f'RLIMIT_{name}'), (soft, hard))
    for name, value in job.get('sysctls', {}).items():
        with open('/proc/sys/' + name.replace('.', '/'), 'w') as f:
            f.write(str(value))


def run(job):
    out = port('xos.stdout')
    err = port('xos.stderr')
    fout = open(out, 'wb', buffering=0) if out else open(f'{RUN}/stdout.txt', 'wb')
    ferr = open(err, 'wb', buffering=0) if err else open(f'{RUN}/stderr.txt', 'wb')
    env = {'PATH': PATH, 'HOME': '/root', 'LANG': 'C.UTF-8', 'TERM': 'dumb', 'USER': 'root',
           'LOGNAME': 'root', 'SHELL': '/bin/sh',
           'PYTHONDONTWRITEBYTECODE': '1'}
    env.update(job.get('env', {}))
    timeout = float(job.get('timeout', 600))
    started = time.monotonic()
    write_json('booted.json', {'boot_seconds': started - T0})
    try:
        child = subprocess.Popen(job['argv'], cwd=job.get('cwd') or '/', env=env,
                                 stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                 start_new_session=True)
    except OSError as exc:
        what = (f'the working directory {job.get("cwd")}' if not os.path.isdir(job.get('cwd') or '/')
                else job['argv'][0])
        ferr.write(f'xos-vm: cannot run {job["argv"][0]}: {what}: {exc.strerror}\n'.encode())
        return {'status': 127, 'seconds': 0.0, 'timed_out': False}
    timed_out = False

    def on_alarm(_sig, _frame):
        nonlocal timed_out
        timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    status = None
    while status is None:
        try:
            pid, wstatus = os.wait()  # reaps orphans too: we are PID 1
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(wstatus)
    signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.monotonic() - started
    child.returncode = status  # keep Popen from waiting on a reaped pid
    if status is None:
        status = 125
    elif status < 0:
        status = 128 - status
    if timed_out:
        ferr.write(f'\nxos-vm: command killed after {timeout:.0f} s\n'.encode())
        status = 124
    fout.close()
    ferr.close()
    return {'status': status, 'seconds': seconds, 'timed_out': timed_out}


def reap_all(seconds):
    """Reap children until none is left (True) or *seconds* passed (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            time.sleep(0.02)
    return False


def finish():
    """Kill what is left of the command (daemons it started...), reap it, sync."""
    for sig, seconds in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            break
        if reap_all(seconds):
            break
    os.sync()


def poweroff():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    finally:
        with open('/proc/sysrq-trigger', 'w') as f:
            f.write('o')
        time.sleep(10)


def main():
    result = {'status': 125}
    try:
        with open(f'{RUN}/job.json') as f:
            job = json.load(f)
        system(job)
        result = run(job)
    except BaseException as exc:  # PID 1 must never die: report and power off
        result = {'status': 125, 'error': f'{type(exc).__name__}: {exc}'}
        log(result['error'])
    try:
        finish()
        write_json('status.json', result)
    except BaseException as exc:
        log(f'cannot write the status: {exc}')
    finally:
        os.sync()
        poweroff()


if __name__ == '__main__':
    if os.getpid() != 1:
        sys.exit('guest_init.py is the VM\'s PID 1 (scripts/vm/xosvm.py)')
    main()
