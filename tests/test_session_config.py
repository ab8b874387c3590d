"""The ``[session]`` table: PAM switches and resource limits, each bad value refused by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import dynamic_vo
from gatewayproc import XOS_SSHD, GatewayProcess, VOCA, run
from xos_sshd.config import UNLIMITED, ConfigError, SessionConfig, parse_config


def _parse(session: Any) -> SessionConfig:
    raw = {'host_keys': ['/etc/xos-sshd/key'],
           'vo': {'dev': {'ca': '/etc/xos-sshd/ca.pem', 'uid_range': [300000, 300999]}},
           'session': session}
    return parse_config(raw).session


def test_defaults_without_a_table() -> None:
    raw = {'host_keys': ['/k'], 'vo': {'dev': {'ca': '/ca.pem', 'uid_range': [300000, 300999]}}}
    session = parse_config(raw).session
    assert session == SessionConfig()
    assert (session.pam, session.pam_service, session.pam_confdir) == (False, 'xos-sshd', None)
    assert session.rlimits == (('nofile', 1024, 524288),)


def test_a_full_table() -> None:
    session = _parse({'pam': True, 'pam_service': 'xos-sshd.test', 'pam_confdir': '/etc/xos/pam',
                      'rlimits': {'nofile': [1024, 'unlimited'], 'core': 0, 'cpu': 'unlimited',
                                  'nproc': [100, 200]}})
    assert session.pam and session.pam_service == 'xos-sshd.test'
    assert session.pam_confdir == Path('/etc/xos/pam')
    # given, the table replaces the default; sorted by name
    assert session.rlimits == (('core', 0, 0), ('cpu', UNLIMITED, UNLIMITED),
                               ('nofile', 1024, UNLIMITED), ('nproc', 100, 200))
    assert _parse({'rlimits': {}}).rlimits == ()
    # the session exec shim: unset by default (installed, else the source checkout's build)
    assert _parse({}).exec_helper is None
    assert _parse({'exec_helper': '/opt/x/xos-session-exec'}).exec_helper == \
        Path('/opt/x/xos-session-exec')


@pytest.mark.parametrize('session, key', [
    ('pam', 'session'),
    ({'pam': 'yes'}, 'session.pam'),
    ({'pam_service': '../shadow'}, 'session.pam_service'),
    ({'pam_service': ''}, 'session.pam_service'),
    ({'pam_service': 7}, 'session.pam_service'),
    ({'pam_confdir': 'pam.d'}, 'session.pam_confdir'),
    ({'exec_helper': 'build/xos-session-exec'}, 'session.exec_helper'),
    ({'exec_helper': 5}, 'session.exec_helper'),
    ({'use_pam': True}, 'session.use_pam'),
    ({'rlimits': 5}, 'session.rlimits'),
    ({'rlimits': {'files': 5}}, 'session.rlimits.files'),
    ({'rlimits': {'nofile': -1}}, 'session.rlimits.nofile'),
    ({'rlimits': {'nofile': True}}, 'session.rlimits.nofile'),
    ({'rlimits': {'nofile': 'lots'}}, 'session.rlimits.nofile'),
    ({'rlimits': {'nofile': 1.5}}, 'session.rlimits.nofile'),
    ({'rlimits': {'nofile': [10, 5]}}, 'session.rlimits.nofile'),
    ({'rlimits': {'nofile': [1, 2, 3]}}, 'session.rlimits.nofile'),
    ({'rlimits': {'core': ['unlimited', 5]}}, 'session.rlimits.core'),
    ({'rlimits': {'stack': 2 ** 64}}, 'session.rlimits.stack'),
])
def test_bad_values_name_the_key(session: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(session)
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(f'{key}: ')


def test_check_config_refuses_a_bad_limit_with_one_line(tmp_path: Path, dev_ca: VOCA,
                                                        uid_range: tuple[int, int],
                                                        home_base: Path) -> None:
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})
    good = gw.config.read_text()
    gw.config.write_text(good + '\n[session]\npam = true\nrlimits = { nofile = [4096, 1024] }\n')
    res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip() == ('xos-sshd: configuration error: session.rlimits.nofile: the '
                                  'soft limit 4096 is above the hard limit 1024'), res.stderr
    gw.config.write_text(good + '\n[session]\npam = true\n[session.rlimits]\nnofile = 4096\n'
                         'core = 0\n')
    res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
    assert res.returncode == 0 and 'configuration OK' in res.stdout, res.stderr
