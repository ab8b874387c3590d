"""The ``[images]`` table: defaults, every key checked and named, trusted keys read at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import dynamic_vo
from gatewayproc import VOCA, XOS_SSHD, GatewayProcess, run

from xos_sshd.config import (
    DEFAULT_IMAGE_QUOTA_BYTES,
    DEFAULT_IMAGE_QUOTA_COUNT,
    ConfigError,
    check_images,
    parse_config,
)
from xos_sshd.cr.images import ImageStore


def raw(images: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {'host_keys': ['/etc/xos-sshd/key'],
                           'vo': {'dev': {'ca': '/etc/xos-sshd/ca.pem', 'uid_range': [500000, 500999]}}}
    if images is not None:
        doc['images'] = images
    return doc


def test_defaults_without_the_table() -> None:
    images = parse_config(raw()).images
    assert images.trusted_node_keys == () and images.criu_path is None and images.node_name is None
    assert (images.quota_bytes, images.quota_count) == (DEFAULT_IMAGE_QUOTA_BYTES,
                                                        DEFAULT_IMAGE_QUOTA_COUNT)
    assert DEFAULT_IMAGE_QUOTA_BYTES == 10 << 30 and DEFAULT_IMAGE_QUOTA_COUNT == 20


def test_all_keys() -> None:
    images = parse_config(raw({'trusted_node_keys': ['/etc/xos-sshd/nodes/b.pub'],
                               'quota_bytes': 1 << 30, 'quota_count': 3,
                               'criu_path': '/opt/xos-criu/bin/criu', 'node_name': 'node-a'})).images
    assert images.trusted_node_keys == (Path('/etc/xos-sshd/nodes/b.pub'),)
    assert (images.quota_bytes, images.quota_count) == (1 << 30, 3)
    assert (images.criu_path, images.node_name) == ('/opt/xos-criu/bin/criu', 'node-a')


@pytest.mark.parametrize('table, key', [
    ({'bogus': 1}, 'images.bogus'),
    ({'trusted_node_keys': 'a.pub'}, 'images.trusted_node_keys'),
    ({'trusted_node_keys': ['relative.pub']}, 'images.trusted_node_keys'),
    ({'trusted_node_keys': [1]}, 'images.trusted_node_keys'),
    ({'quota_bytes': True}, 'images.quota_bytes'),
    ({'quota_bytes': '10G'}, 'images.quota_bytes'),
    ({'quota_bytes': 0}, 'images.quota_bytes'),
    ({'quota_bytes': 1.5}, 'images.quota_bytes'),
    ({'quota_count': -1}, 'images.quota_count'),
    ({'criu_path': 'criu'}, 'images.criu_path'),
    ({'criu_path': 4}, 'images.criu_path'),
    ({'node_name': 'a/b'}, 'images.node_name'),
    ('yes', 'images'),
])
def test_bad_values_name_the_key(table: Any, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw(table))
    assert exc.value.key == key and str(exc.value).startswith(f'{key}: ')


def test_trusted_keys_are_read_by_the_check(tmp_path: Path) -> None:
    other = ImageStore.open(tmp_path / 'b', node_name='b')
    good = tmp_path / 'b' / 'image_key.pub'
    check_images(parse_config(raw({'trusted_node_keys': [str(good)]})))
    rsa = tmp_path / 'rsa.pub'
    rsa.write_text('ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x\n')
    two = tmp_path / 'two.pub'
    two.write_text(good.read_text() * 2)
    for path in (tmp_path / 'missing.pub', rsa, two):
        with pytest.raises(ConfigError) as exc:
            check_images(parse_config(raw({'trusted_node_keys': [str(good), str(path)]})))
        assert exc.value.key == 'images.trusted_node_keys' and path.name in str(exc.value)
    # What the check accepted is what the store trusts.
    assert other.fingerprint in ImageStore.open(tmp_path / 'a', node_name='a',
                                                trusted_keys=[good]).trusted


def test_check_config_names_a_bad_trusted_key(tmp_path: Path, dev_ca: VOCA,
                                              uid_range: tuple[int, int], home_base: Path) -> None:
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})
    text = gw.config.read_text()
    gw.config.write_text(text + f'[images]\ntrusted_node_keys = ["{tmp_path}/nope.pub"]\n')
    res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
    assert res.returncode == 2
    assert res.stderr.startswith('xos-sshd: configuration error: images.trusted_node_keys: ')
    assert 'nope.pub' in res.stderr and 'Traceback' not in res.stderr
    gw.config.write_text(text + '[images]\nquota_count = 5\n')
    res = run(XOS_SSHD, '--config', str(gw.config), '--check-config', check=False)
    assert res.returncode == 0, res.stderr
