"""A bad configuration stops xos-sshd at start with one line naming the key, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayproc import XOS_SSHD, GatewayProcess, VOCA, run
from conftest import dynamic_vo


def _check(config: Path) -> tuple[int, str, str]:
    res = run(XOS_SSHD, '--config', str(config), '--check-config', check=False)
    return res.returncode, res.stdout, res.stderr


@pytest.fixture
def good(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int], home_base: Path) -> GatewayProcess:
    return GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})


def test_good_config_passes_the_check(good: GatewayProcess) -> None:
    code, out, err = _check(good.config)
    assert code == 0 and 'configuration OK' in out and err == ''


@pytest.mark.parametrize('edit, key', [
    (lambda t: 'bogus_key = 1\n' + t, 'bogus_key'),
    (lambda t: t.replace('listen = [', 'listen = ["nonsense", '), 'listen'),
    (lambda t: t.replace('policy = "dynamic"', 'policy = "lottery"'), 'vo.dev.policy'),
    (lambda t: t.replace('uid_range = [', 'uid_range = [5, '), 'vo.dev.uid_range'),
    (lambda t: t.replace('uid_range = [', 'uid_range = "1-2" #['), 'vo.dev.uid_range'),
    (lambda t: 'login_grace_seconds = true\n' + t, 'login_grace_seconds'),
    (lambda t: t.replace('host_keys = ["', 'host_keys = ["/nonexistent'), 'host_keys'),
    (lambda t: t.replace('ca = "', 'ca = "/nonexistent'), 'vo'),
    (lambda t: t.replace('[vo.dev]', '[vo.dev]\nca_typo = 1'), 'vo.dev.ca_typo'),
    (lambda t: t.replace('home_base = "', 'home_base = "relative'), 'vo.dev.home_base'),
    (lambda t: 'this is = not [toml', None),
])
def test_bad_config_names_the_key_and_exits_2(good: GatewayProcess, edit, key: str | None) -> None:
    good.config.write_text(edit(good.config.read_text()))
    code, out, err = _check(good.config)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('xos-sshd: configuration error: '), err
    if key:
        assert lines[0].startswith(f'xos-sshd: configuration error: {key}: '), lines[0]
    assert 'Traceback' not in err


def test_uid_range_over_system_accounts_is_refused(good: GatewayProcess) -> None:
    text = good.config.read_text()
    import re
    text = re.sub(r'uid_range = \[\d+, \d+\]', 'uid_range = [1000, 70000]', text)
    text = re.sub(r'gid_range = \[\d+, \d+\]', 'gid_range = [1000, 70000]', text)
    good.config.write_text(text)
    code, _out, err = _check(good.config)
    assert code == 2 and '65534' in err, err


def test_missing_config_file(tmp_path: Path) -> None:
    code, _out, err = _check(tmp_path / 'nope.toml')
    assert code == 2 and 'cannot read' in err
