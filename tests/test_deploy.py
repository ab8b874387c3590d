"""The deployment recipes, checked as far as this machine allows (it runs no Docker engine):
the Dockerfile through a real linter (hadolint) and for every path it copies, the systemd unit
through systemd-analyze, the example config through the gateway's own config check."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xos_sshd.config import load_config

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint() -> None:
    res = subprocess.run([str(VENV_BIN / 'hadolint'), '--no-color', 'Dockerfile'], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_path_the_dockerfile_copies_exists() -> None:
    sources = []
    for line in (REPO / 'Dockerfile').read_text().splitlines():
        if line.startswith('COPY ') and '--from=' not in line:
            sources += line.split()[1:-1]
    assert sources, 'no COPY lines found'
    for source in sources:
        assert (REPO / source).exists(), source


def test_dockerfile_runs_the_gateway_with_the_config_volume() -> None:
    text = (REPO / 'Dockerfile').read_text()
    assert re.search(r'^FROM debian:trixie', text, re.M)
    assert 'criu' in text and 'openssh-server' in text
    assert '"--config", "/etc/xos-sshd/config.toml"' in text
    for volume in ('/etc/xos-sshd', '/var/lib/xos-sshd', '/home'):
        assert volume in text.split('VOLUME', 1)[1].splitlines()[0]


#: Debian's stock /etc/nsswitch.conf (trixie, the image's base; libc-bin's template).
DEBIAN_NSSWITCH = ('# /etc/nsswitch.conf\n#\n\npasswd:         files\ngroup:          files\n'
                   'shadow:         files\ngshadow:        files\n\nhosts:          files dns\n'
                   'networks:       files\n\nprotocols:      db files\nnetgroup:       nis\n')


def test_dockerfile_names_xos_in_nsswitch_for_pam_sessions(tmp_path: Path) -> None:
    """[session] pam = true in the container: PAM modules look accounts up by name, so the
    image's nsswitch.conf must name xos for passwd and group.  The Dockerfile's own sed runs
    on Debian's stock file and on this machine's (with ``systemd`` too), twice."""
    text = (REPO / 'Dockerfile').read_text()
    m = re.search(r"^RUN sed -Ei '([^']+)' /etc/nsswitch\.conf", text, re.M)
    assert m, 'no sed of /etc/nsswitch.conf in the Dockerfile'
    for original in (DEBIAN_NSSWITCH, Path('/etc/nsswitch.conf').read_text()):
        conf = tmp_path / 'nsswitch.conf'
        conf.write_text(original)
        for _ in range(2):  # a rebuild on a layer that has it already adds nothing
            subprocess.run(['sed', '-Ei', m.group(1), str(conf)], check=True)
        before, after = original.splitlines(), conf.read_text().splitlines()
        assert len(before) == len(after)
        for old, new in zip(before, after):
            if re.match(r'(passwd|group):', old):
                assert new.split() == old.split() + ['xos'], (old, new)  # after files
            else:
                assert new == old
    # the build fails if there was no line to extend, and the top of the file says why
    assert "grep -Eq '^passwd:.*[[:space:]]xos$' /etc/nsswitch.conf" in text
    assert "grep -Eq '^group:.*[[:space:]]xos$' /etc/nsswitch.conf" in text
    header = text.split('\nFROM ', 1)[0]
    assert 'nsswitch.conf' in header and 'libpam-systemd' in header
    assert 'libpam-systemd' not in text.split('\nFROM ', 1)[1]


@pytest.mark.skipif(not shutil.which('systemd-analyze'), reason='systemd-analyze not installed')
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / 'deploy' / 'xos-sshd.service').read_text()
    assert 'ExecReload=/bin/kill -HUP $MAINPID' in unit and 'KillMode=process' in unit
    local = tmp_path / 'xos-sshd.service'
    local.write_text(unit.replace('/opt/xos-sshd/bin/xos-sshd', str(VENV_BIN / 'xos-sshd')))
    res = subprocess.run(['systemd-analyze', 'verify', str(local)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_example_config_is_valid() -> None:
    config = load_config(REPO / 'deploy' / 'config.example.toml')
    assert list(config.vos) == ['physics']
    assert str(config.control_socket) == '/run/xos-sshd/control.sock'
