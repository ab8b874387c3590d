"""The reference server of the benchmarks: a stock OpenSSH ``sshd`` on loopback.

One way to start it, shared by bench/login.py and bench/load.py: a private config under
``BASE/openssh`` (ed25519 host key, a free port on 127.0.0.1, no PAM, no passwords, the same
kex and cipher the benchmarks' clients ask for), run in the foreground (``-D -e``, log in
``sshd.log``).  Root logs in, by one of two routes:

* ``authorized_keys=PATH``: a plain public key (bench/login.py);
* ``user_ca=LINE`` and ``principals=[...]``: an OpenSSH user certificate signed by that CA key
  (``TrustedUserCAKeys``) whose principal is one of *principals*
  (``AuthorizedPrincipalsFile``) -- the same ``PREFIX-cert.pub`` files ``xos-ca issue`` writes
  for xos-sshd's OpenSSH-certificate route (bench/load.py).

No local account is made: the certificates name VO users (``u000``) that do not exist on this
machine, so they are mapped onto root by the principals file.  Root's sessions get
``HOME=BASE/openssh/home``, an empty directory (``SetEnv``): bash started by sshd sources
``~/.bashrc`` (Debian builds it so), and root's own can cost anything (``pyenv init`` on the
dev VMs: about 0.3 s of CPU per login); xos-sshd's mapped accounts start with empty homes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / 'tests')
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from gatewayproc import free_port, stop_process  # noqa: E402


@dataclass
class OpenSSHServer:
    """A running reference sshd (the listener; it forks one sshd per connection)."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        path = self.dir / 'sshd.log'
        return path.read_text(errors='replace') if path.exists() else ''

    def stop(self) -> None:
        stop_process(self.proc)


def start_openssh(base: Path, *, authorized_keys: Path | None = None, user_ca: str | None = None,
                  principals: Sequence[str] = (), max_startups: str = '200') -> OpenSSHServer:
    """Start sshd for root with *authorized_keys* or with certificates of *user_ca* (an
    OpenSSH public key line) naming one of *principals*; return once it listens."""
    if (authorized_keys is None) == (user_ca is None):
        raise ValueError('give exactly one of authorized_keys and user_ca')
    sshd = shutil.which('sshd') or '/usr/sbin/sshd'
    work = base / 'openssh'
    work.mkdir(mode=0o755)
    port = free_port()
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(work / 'host')],
                   check=True)
    if authorized_keys is not None:
        shutil.copy(authorized_keys, work / 'authorized_keys')
        auth = f'AuthorizedKeysFile {work}/authorized_keys\n'
    else:
        (work / 'user_ca.pub').write_text(user_ca.strip() + '\n')
        (work / 'principals').write_text(''.join(f'{p}\n' for p in principals))
        auth = (f'AuthorizedKeysFile none\nTrustedUserCAKeys {work}/user_ca.pub\n'
                f'AuthorizedPrincipalsFile {work}/principals\n')
    (work / 'home').mkdir(mode=0o700)
    Path('/run/sshd').mkdir(mode=0o755, exist_ok=True)
    (work / 'sshd_config').write_text(f'''Port {port}
ListenAddress 127.0.0.1
HostKey {work}/host
PidFile {work}/sshd.pid
{auth}AllowUsers root
SetEnv HOME={work}/home
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups {max_startups}
KexAlgorithms curve25519-sha256
Ciphers aes128-gcm@openssh.com
''')
    with open(work / 'sshd.log', 'wb') as log:
        proc = subprocess.Popen([sshd, '-D', '-e', '-f', str(work / 'sshd_config')], stderr=log)
    server = OpenSSHServer(proc, port, work)
    try:
        wait_port(port, proc)
    except BaseException:
        server.stop()
        raise
    return server


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(200):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f'sshd exited {proc.returncode} before listening on {port}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f'nothing listens on port {port}')
