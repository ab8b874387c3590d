"""``xos-sshd --dev``: a complete single-node setup in one state directory, made idempotently.

It creates what is missing and reuses what exists: host keys, a CA for the VO ``dev``, a
demo user certificate (re-issued when it is about to expire), and a ``config.toml`` that is
exactly what an admin would write for the same setup, so the dev gateway runs the same code
path as a production one.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncssh
from cryptography import x509

from .ams.ranges import RangeError, read_system_ids
from .auth import ca

DEV_VO = 'dev'
DEMO_USER = 'alice'
DEV_RANGE_CANDIDATES = [(200000 + i * 10000, 209999 + i * 10000) for i in range(20)]


def prepare(state_dir: Path, port: int) -> Path:
    """Make *state_dir* ready for a dev gateway on 127.0.0.1:*port*; return the config path."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o755)  # sessions must traverse it to reach their homes
    ca_dir = state_dir / 'ca'
    if not (ca_dir / 'ca.pem').exists():
        ca.init_ca(ca_dir, DEV_VO)
    else:
        # The CRL has a next-update date; a dev CA restarted after a week must not lock
        # everybody out with crl-unavailable, so it is re-signed at every dev start.
        ca.refresh_crl(ca.CertificateAuthority.load(ca_dir))
    host_keys = [_host_key(state_dir / 'hostkeys', alg) for alg in ('ssh-ed25519', 'ecdsa-sha2-nistp256')]
    _demo_certificate(ca_dir, state_dir / 'users' / DEMO_USER)
    home_base = state_dir / 'home'
    home_base.mkdir(mode=0o755, exist_ok=True)
    config_path = state_dir / 'config.toml'
    first, last = _free_range()
    config_path.write_text(f'''# Written by `xos-sshd --dev`; rewritten at each dev start.
state_dir = "{state_dir}"
listen = ["127.0.0.1:{port}"]
host_keys = [{", ".join(f'"{k}"' for k in host_keys)}]
control_socket = "{state_dir / 'control.sock'}"

[vo.{DEV_VO}]
ca = "{ca_dir / 'ca.pem'}"
crl = "{ca_dir / 'crl.pem'}"
policy = "dynamic"
uid_range = [{first}, {last}]
gid_range = [{first}, {last}]
account_prefix = "{DEV_VO}-"
home_base = "{home_base}"
shell = "/bin/bash"
''')
    return config_path


def login_help(state_dir: Path, port: int) -> str:
    """The exact commands that log in to the dev gateway, for the start-up banner."""
    state_dir = state_dir.resolve()
    prefix = state_dir / 'users' / DEMO_USER
    bin_dir = Path(sys.executable).parent  # the venv's scripts, so the commands work as printed
    return (f'log in as the demo VO user {DEMO_USER!r} (VO {DEV_VO!r}):\n'
            f'  {bin_dir}/ssh-xos -i {prefix} -p {port} 127.0.0.1\n'
            f'  ssh -i {prefix}.key -o CertificateFile={prefix}-cert.pub '
            f'-o StrictHostKeyChecking=accept-new -p {port} {DEMO_USER}@127.0.0.1\n'
            f'jobs that outlive the session, checkpointed and restarted with CRIU:\n'
            f'  {bin_dir}/xos-cr -i {prefix} -p {port} 127.0.0.1 run -- sleep 600\n'
            f'  {bin_dir}/xos-cr -i {prefix} -p {port} 127.0.0.1 list\n'
            f'  (inside a session on the node: {bin_dir}/xos-cr list)\n'
            f'issue more users:\n'
            f'  {bin_dir}/xos-ca issue {state_dir / "ca"} --user bob --group physics --out bob\n')


def _host_key(directory: Path, algorithm: str) -> Path:
    """Generate a host key once (0600 in a 0700 directory); return its path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = 'ssh_host_' + ('ed25519' if algorithm == 'ssh-ed25519' else 'ecdsa') + '_key'
    path = directory / name
    if not path.exists():
        key = asyncssh.generate_private_key(algorithm)
        tmp = path.with_suffix('.tmp')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'wb') as f:
            f.write(key.export_private_key())
        os.replace(tmp, path)
        key.write_public_key(str(path) + '.pub')
    return path


def _demo_certificate(ca_dir: Path, prefix: Path) -> None:
    """Issue the demo user's certificate unless a valid one lasts at least another hour."""
    pem = prefix.with_name(prefix.name + '.pem')
    if pem.exists():
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        if cert.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(hours=1):
            return
    prefix.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    ca.issue(ca.CertificateAuthority.load(ca_dir), DEMO_USER, prefix, groups=['users'], hours=24)


def _free_range() -> tuple[int, int]:
    """The first candidate uid range that no /etc/passwd or /etc/group entry falls into."""
    system = read_system_ids()
    used = set(system.uids) | set(system.gids)
    for first, last in DEV_RANGE_CANDIDATES:
        if not any(first <= i <= last for i in used):
            return first, last
    raise RangeError('no free uid range for the dev VO between 200000 and 399999')
