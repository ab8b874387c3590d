"""Every hostile certificate class is refused at the SSH door, with its reason in the audit log,
and the gateway keeps serving the good ones.

The certificates are real (tests/auth_certs.py signs each with a real CA key and exactly one
thing wrong); the client is the real ``ssh-xos`` (X.509 route) or OpenSSH ``ssh`` (OpenSSH
certificate route).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from auth_certs import flip_last_byte, make_ca, make_leaf, now_utc
from conftest import dynamic_vo
from gatewayproc import GatewayProcess, VOCA
from xos_sshd.auth.ca import CertificateAuthority


@pytest.fixture
def two_vo_gateway(tmp_path: Path, uid_range: tuple[int, int],
                   home_base: Path) -> Iterator[tuple[GatewayProcess, CertificateAuthority, CertificateAuthority]]:
    """A gateway trusting VO ``dev`` and VO ``other``, each with its own CA."""
    dev = make_ca(tmp_path / 'cas', 'dev')
    other = make_ca(tmp_path / 'cas', 'other')
    half = (uid_range[1] - uid_range[0]) // 2
    vos = {}
    for ca, rng in ((dev, (uid_range[0], uid_range[0] + half)),
                    (other, (uid_range[0] + half + 1, uid_range[1]))):
        vos[ca.vo] = dynamic_vo(VOCA(ca.vo, ca.paths.cert.parent), rng, home_base / 'home')
    gw = GatewayProcess.configure(tmp_path, vos).start()
    yield gw, dev, other
    gw.stop()


def _write_credential(prefix: Path, cert_der_or_obj, key) -> Path:
    cert_pem = (cert_der_or_obj.public_bytes(serialization.Encoding.PEM)
                if hasattr(cert_der_or_obj, 'public_bytes') else
                _der_to_pem(cert_der_or_obj))
    prefix.with_name(prefix.name + '.pem').write_bytes(cert_pem)
    key_path = prefix.with_name(prefix.name + '.key')
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return prefix


def _der_to_pem(der: bytes) -> bytes:
    import base64
    body = base64.encodebytes(der).decode().replace('\n', '')
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ('-----BEGIN CERTIFICATE-----\n' + '\n'.join(lines) +
            '\n-----END CERTIFICATE-----\n').encode()


def _hostile(kind: str, dev: CertificateAuthority, other: CertificateAuthority, base: Path):
    now = now_utc()
    if kind == 'expired':
        return make_leaf(dev, not_before=now - timedelta(days=3), not_after=now - timedelta(days=2))
    if kind == 'not-yet-valid':
        return make_leaf(dev, not_before=now + timedelta(days=1), not_after=now + timedelta(days=2))
    if kind == 'unknown-ca':
        stranger = make_ca(base / 'strangers', 'stranger')
        return make_leaf(stranger)
    if kind == 'bad-signature':
        forger = make_ca(base / 'forgers', 'dev')  # same VO and name, another key
        return make_leaf(dev, signer_key=forger.key)
    if kind == 'tampered':
        cert, key = make_leaf(dev)
        return flip_last_byte(cert.public_bytes(serialization.Encoding.DER)), key
    if kind == 'service-certificate':
        return make_leaf(dev, user=None, cn='batch-service')
    if kind == 'vo-mismatch':
        return make_leaf(dev, vo='other')  # claims VO "other", signed by dev's CA
    if kind == 'missing-attributes':
        return make_leaf(dev, xos=[])
    if kind == 'weak-key':
        return make_leaf(dev, key=rsa.generate_private_key(65537, 1024))
    if kind == 'wrong-usage':
        return make_leaf(dev, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    raise AssertionError(kind)


EXPECTED = {
    'expired': {'expired'}, 'not-yet-valid': {'not-yet-valid'}, 'unknown-ca': {'unknown-ca'},
    'bad-signature': {'bad-signature'}, 'tampered': {'bad-signature', 'bad-encoding'},
    'service-certificate': {'service-certificate'}, 'vo-mismatch': {'vo-mismatch'},
    'missing-attributes': {'missing-attributes'}, 'weak-key': {'weak-key'},
    'wrong-usage': {'wrong-usage'},
}


def test_hostile_x509_certificates_are_refused_with_reason(two_vo_gateway, tmp_path: Path) -> None:
    gw, dev, other = two_vo_gateway
    good = _write_credential(tmp_path / 'good', *make_leaf(dev))
    for kind, reasons in EXPECTED.items():
        prefix = _write_credential(tmp_path / kind, *_hostile(kind, dev, other, tmp_path))
        res = gw.ssh_xos(prefix, 'echo SHOULD-NOT-RUN', login='alice')
        assert res.returncode == 255 and 'SHOULD-NOT-RUN' not in res.stdout, (kind, res)
        assert 'ssh-xos:' in res.stderr and 'Traceback' not in res.stderr, res.stderr
        last = [e for e in gw.audit() if e['event'] == 'login'][-1]
        assert last['outcome'] == 'refused' and last['reason'] in reasons, (kind, last)
        assert last['message'], last
        # the server keeps serving: the good certificate still logs in
        ok = gw.ssh_xos(good, 'echo fine', login='alice')
        assert ok.returncode == 0 and ok.stdout == 'fine\n', (kind, ok.stderr, gw.log()[-3000:])
    assert gw.alive()
    accounts = {e['account'] for e in gw.audit() if e['outcome'] == 'accepted'}
    assert accounts == {'dev-alice'}  # nothing hostile was ever mapped


def test_revoked_certificate_is_refused_on_both_routes(gateway: GatewayProcess, dev_ca: VOCA,
                                                       tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    bob = dev_ca.issue('bob', tmp_path / 'bob')
    assert gateway.ssh_xos(alice, 'true').returncode == 0
    dev_ca.revoke(alice)  # the CRL file changes under the running gateway
    assert gateway.ssh_xos(alice, 'true').returncode == 255
    assert gateway.ssh(alice, 'alice', 'true').returncode == 255
    reasons = [e['reason'] for e in gateway.audit() if e['outcome'] == 'refused']
    assert reasons.count('revoked') >= 2, reasons
    assert gateway.ssh_xos(bob, 'true').returncode == 0


def test_missing_crl_refuses_when_required(gateway: GatewayProcess, dev_ca: VOCA,
                                          tmp_path: Path) -> None:
    alice = dev_ca.issue('alice', tmp_path / 'alice')
    crl = dev_ca.dir / 'crl.pem'
    saved = crl.read_bytes()
    os.unlink(crl)
    try:
        assert gateway.ssh_xos(alice, 'true').returncode == 255
        assert [e for e in gateway.audit() if e['event'] == 'login'][-1]['reason'] == 'crl-unavailable'
    finally:
        crl.write_bytes(saved)
    assert gateway.ssh_xos(alice, 'true').returncode == 0
