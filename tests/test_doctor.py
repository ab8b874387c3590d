"""`xos-sshd doctor`: one line per check, the fix for each problem, exit 1 when one fails."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import dynamic_vo
from gatewayproc import XOS_SSHD, GatewayProcess, VOCA, run
from xos_sshd.auth.ca import CertificateAuthority, refresh_crl


@pytest.fixture
def node(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> GatewayProcess:
    return GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})


def _doctor(gw: GatewayProcess, **env: str) -> tuple[int, dict[str, str]]:
    res = run(XOS_SSHD, 'doctor', '--config', str(gw.config), check=False,
              env={**os.environ, **env})
    lines = res.stdout.strip().splitlines()
    assert lines and all(re.match(r'^(OK  |WARN|FAIL) [^:]+: ', l) for l in lines), res.stdout
    assert 'Traceback' not in res.stderr
    return res.returncode, {l[5:].split(':')[0]: l for l in lines}


def test_healthy_node_passes(node: GatewayProcess) -> None:
    code, lines = _doctor(node)
    assert code == 0, lines
    assert lines['vo dev CA'].startswith('OK') and lines['vo dev CRL'].startswith('OK')
    assert lines['uid ranges'].startswith('OK') and lines['CRIU'].startswith('OK')
    assert all('fix:' in l for l in lines.values() if l.startswith('WARN'))


def test_each_mistake_is_named_with_its_fix(node: GatewayProcess, dev_ca: VOCA) -> None:
    host_key = Path(re.search(r'host_keys = \["([^"]+)"', node.config.read_text()).group(1))
    host_key.chmod(0o644)
    refresh_crl(CertificateAuthority.load(dev_ca.dir),
                now=datetime.now(UTC) - timedelta(days=10), days=1)
    code, lines = _doctor(node, XOS_CRIU='/bin/false')
    assert code == 1
    assert lines['host key ssh_host_ed25519_key'].startswith('FAIL')
    assert 'chmod 600' in lines['host key ssh_host_ed25519_key']
    assert lines['vo dev CRL'].startswith('FAIL') and 'stale since' in lines['vo dev CRL']
    assert lines['CRIU'].startswith('FAIL') and 'fix: install criu' in lines['CRIU']


def test_ranges_over_local_accounts_fail(node: GatewayProcess) -> None:
    text = re.sub(r'(uid|gid)_range = \[\d+, \d+\]', r'\1_range = [1000, 70000]',
                  node.config.read_text())
    node.config.write_text(text)
    code, lines = _doctor(node)
    assert code == 1 and lines['uid ranges'].startswith('FAIL') and '65534' in lines['uid ranges']
