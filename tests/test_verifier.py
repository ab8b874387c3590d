"""The verifier: every refusal class with a real certificate built for it, and both login routes."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import asyncssh
import pytest
from auth_certs import (
    der,
    flip_last_byte,
    make_ca,
    make_leaf,
    make_ssh_cert,
    now_utc,
    refused,
    resign,
    split_certificate,
    ssh_key_of,
    trust,
    verifier,
    with_duplicate_extension,
    xos_exts,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from xos_sshd.auth import ca as calib
from xos_sshd.auth.errors import TrustConfigError
from xos_sshd.auth.identity import VOIdentity, key_fingerprint
from xos_sshd.auth.profile import (
    GLOBAL_PRIMARY_VO_NAME,
    GLOBAL_USER_ID,
    XOSAttributes,
    encode_bit_string_value,
    encode_value,
)
from xos_sshd.auth.sshcert import read_certificate_file
from xos_sshd.auth.verifier import Verifier, VOTrust


@pytest.fixture
def ca(tmp_path):
    return make_ca(tmp_path, "dev")


@pytest.fixture
def beta(tmp_path):
    return make_ca(tmp_path, "beta")


@pytest.fixture
def cred(ca, tmp_path):
    return calib.issue(ca, "alice", tmp_path / "alice", groups=["users", "staff", "users"], role="worker")


# --- acceptance and the two routes --------------------------------------------------------------


def test_issued_credential_verifies_on_both_routes_to_the_same_identity(ca, cred):
    v = verifier(ca)
    ident = v.verify_x509_chain([der(cred.cert)])
    assert ident == VOIdentity(
        vo="dev",
        user="alice",
        groups=("users", "staff"),
        role="worker",
        serial=cred.serial,
        not_after=cred.cert.not_valid_after_utc,
        issuer="CN=dev VO CA,O=dev",
        key_fingerprint=key_fingerprint(cred.key.public_key()),
    )
    assert ident.not_after.tzinfo is not None
    assert v.verify_openssh_cert(cred.ssh_cert) == ident
    # the -cert.pub file carries the same blob
    assert read_certificate_file(cred.ssh_cert_path.read_bytes()) == cred.ssh_cert
    # the fingerprint is the one OpenSSH shows for the key
    assert ident.key_fingerprint == ssh_key_of(cred.key).get_fingerprint("sha256")


def test_rsa_user_key_same_identity_both_routes(ca, tmp_path):
    cred = calib.issue(ca, "bob", tmp_path / "bob", groups=["users"], key_type="rsa", rsa_bits=2048)
    v = verifier(ca)
    ident = v.verify_x509_chain([der(cred.cert)])
    assert ident.user == "bob" and ident.groups == ("users",) and ident.role is None
    assert v.verify_openssh_cert(cred.ssh_cert) == ident


def test_rsa_ca_signatures_verify(tmp_path):
    rsa_ca = make_ca(tmp_path, "rsavo", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    cred = calib.issue(rsa_ca, "carol", tmp_path / "carol")
    v = verifier(rsa_ca)
    assert v.verify_x509_chain([der(cred.cert)]) == v.verify_openssh_cert(cred.ssh_cert)
    assert v.verify_x509_chain([der(cred.cert)]).groups == ()


def test_chain_with_ca_appended_and_ed25519_key(ca):
    cert, _ = make_leaf(ca, key=ed25519.Ed25519PrivateKey.generate())
    ident = verifier(ca).verify_x509_chain([der(cert), der(ca.cert)])
    assert ident.user == "alice" and ident.groups == ("users", "staff")


def test_bit_string_encoded_extensions_are_accepted(ca):
    xos = [
        (GLOBAL_PRIMARY_VO_NAME.oid, encode_bit_string_value("dev"), False),
        (GLOBAL_USER_ID.oid, encode_bit_string_value("alice"), False),
    ]
    cert, _ = make_leaf(ca, xos=xos)
    ident = verifier(ca).verify_x509_chain([der(cert)])
    assert (ident.vo, ident.user, ident.groups) == ("dev", "alice", ())


def test_clock_skew_is_tolerated(ca):
    now = now_utc()
    cert, _ = make_leaf(ca, not_before=now + timedelta(minutes=3), not_after=now + timedelta(hours=1))
    verifier(ca).verify_x509_chain([der(cert)], now=now)
    strict = Verifier([trust(ca)], clock_skew=timedelta(0))
    with refused("not-yet-valid"):
        strict.verify_x509_chain([der(cert)], now=now)


def test_multiple_vos_select_their_own_ca(ca, beta, tmp_path):
    v = verifier(ca, beta)
    a = calib.issue(ca, "alice", tmp_path / "a")
    b = calib.issue(beta, "alice", tmp_path / "b")
    assert v.verify_x509_chain([der(a.cert)]).vo == "dev"
    assert v.verify_x509_chain([der(b.cert)]).vo == "beta"
    assert v.verify_openssh_cert(b.ssh_cert).issuer == "CN=beta VO CA,O=beta"
    assert v.vos == {"dev", "beta"}


# --- X.509 refusals -----------------------------------------------------------------------------


def test_expired(ca):
    now = now_utc()
    cert, _ = make_leaf(ca, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    with refused("expired", "certificate expired"):
        verifier(ca).verify_x509_chain([der(cert)], now=now)


def test_not_yet_valid(ca):
    now = now_utc()
    cert, _ = make_leaf(ca, not_before=now + timedelta(hours=1), not_after=now + timedelta(hours=2))
    with refused("not-yet-valid"):
        verifier(ca).verify_x509_chain([der(cert)], now=now)


def test_expired_ca(tmp_path):
    old = make_ca(tmp_path, "old", days=1, now=now_utc() - timedelta(days=3))
    cert, _ = make_leaf(old, not_before=now_utc() - timedelta(minutes=1))
    with refused("expired", "CA certificate"):
        verifier(old).verify_x509_chain([der(cert)])


def test_other_ca_is_unknown(ca, tmp_path):
    rogue = make_ca(tmp_path, "dev", name="rogue-elsewhere")
    # different CA subject key but same name: the signature is what fails
    cert, _ = make_leaf(rogue)
    with refused("bad-signature"):
        verifier(ca).verify_x509_chain([der(cert)])
    # a CA the configuration does not know at all
    other = make_ca(tmp_path, "gamma")
    cert, _ = make_leaf(other)
    with refused("unknown-ca", "gamma"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_forged_signature_under_trusted_name(ca):
    cert, _ = make_leaf(ca, signer_key=ec.generate_private_key(ec.SECP256R1()))
    with refused("bad-signature"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_tampered_signature(ca, cred):
    with refused("bad-signature"):
        verifier(ca).verify_x509_chain([flip_last_byte(der(cred.cert))])


def test_tampered_content(ca, cred):
    data = der(cred.cert)
    i = data.index(b"alice")
    tampered = data[:i] + b"alicf" + data[i + 5 :]  # changes the subject CN inside the TBS
    with refused("bad-signature"):
        verifier(ca).verify_x509_chain([tampered])


def test_revoked(ca, cred):
    calib.revoke_serial(ca, cred.serial)
    with refused("revoked", str(cred.serial)):
        verifier(ca).verify_x509_chain([der(cred.cert)])


def test_missing_user_id_is_service_certificate(ca):
    cert, _ = make_leaf(ca, user=None, cn="build-service")
    with refused("service-certificate", "GlobalUserID"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_missing_vo(ca):
    cert, _ = make_leaf(ca, xos=[(GLOBAL_USER_ID.oid, encode_value("alice"), False)])
    with refused("missing-attributes", "GlobalPrimaryVOName"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_bad_utf8_in_extension(ca):
    xos = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False), (GLOBAL_USER_ID.oid, b"\x04\x04al\xffe", False)]
    cert, _ = make_leaf(ca, xos=xos)
    with refused("bad-encoding", "GlobalUserID", "UTF-8"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_wrong_asn1_type_in_extension(ca):
    xos = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False), (GLOBAL_USER_ID.oid, b"\x0c\x05alice", False)]
    cert, _ = make_leaf(ca, xos=xos)
    with refused("bad-encoding", "GlobalUserID", "UTF8String"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_overlong_name(ca):
    long = "a" * 65
    cert, _ = make_leaf(ca, cn="alice", xos=[(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False), (GLOBAL_USER_ID.oid, encode_value(long), False)])
    with refused("invalid-attributes", "GlobalUserID", "too long"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_illegal_characters(ca):
    xos = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False), (GLOBAL_USER_ID.oid, encode_value("../root"), False)]
    cert, _ = make_leaf(ca, cn="../root", xos=xos)
    with refused("invalid-attributes", "GlobalUserID", "illegal characters"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_duplicate_extension(ca):
    with refused("invalid-attributes", "duplicate", "GlobalUserID"):
        verifier(ca).verify_x509_chain([with_duplicate_extension(ca)])


def test_critical_xos_extension(ca):
    xos = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), True), (GLOBAL_USER_ID.oid, encode_value("alice"), False)]
    cert, _ = make_leaf(ca, xos=xos)
    with refused("invalid-attributes", "GlobalPrimaryVOName", "critical"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_unknown_critical_extension(ca):
    attrs = XOSAttributes(primary_vo="dev", user_id="alice")
    cert, _ = make_leaf(ca, xos=xos_exts(attrs) + [(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00", True)])
    with refused("invalid-attributes", "1.2.3.4"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_cn_must_repeat_user_id(ca):
    cert, _ = make_leaf(ca, cn="mallory")
    with refused("invalid-attributes", "CN"):
        verifier(ca).verify_x509_chain([der(cert)])
    cert, _ = make_leaf(ca, cn=None)
    with refused("invalid-attributes", "CN"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_vo_mismatch_between_leaf_and_ca(ca, beta):
    cert, _ = make_leaf(ca, vo="beta")  # names VO beta, signed by the dev CA
    with refused("vo-mismatch", "beta", "dev"):
        verifier(ca).verify_x509_chain([der(cert)])
    with refused("vo-mismatch"):
        verifier(ca, beta).verify_x509_chain([der(cert)])


def test_ca_configured_for_the_wrong_vo_is_a_config_error(ca):
    with pytest.raises(TrustConfigError, match="VO"):
        Verifier([trust(ca, vo="beta")])


def test_rsa_1024_is_weak(ca):
    cert, _ = make_leaf(ca, key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with refused("weak-key", "1024"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_unaccepted_curve_is_weak(ca):
    cert, _ = make_leaf(ca, key=ec.generate_private_key(ec.SECP256K1()))
    with refused("weak-key", "secp256k1"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_sha1_signature_is_weak(tmp_path):
    rsa_ca = make_ca(tmp_path, "rsavo", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    # cryptography no longer signs certificates with SHA-1: rewrite both AlgorithmIdentifiers
    # (sha256WithRSAEncryption -> sha1WithRSAEncryption, same length) and re-sign by hand.
    cert, _ = make_leaf(rsa_ca)
    tbs, alg, _ = split_certificate(der(cert))
    sha256_rsa, sha1_rsa = bytes.fromhex("06092a864886f70d01010b"), bytes.fromhex("06092a864886f70d010105")
    assert sha256_rsa in tbs and sha256_rsa in alg
    forged = resign(der(cert), tbs.replace(sha256_rsa, sha1_rsa), rsa_ca.key, hashes.SHA1(), alg.replace(sha256_rsa, sha1_rsa))
    assert x509.load_der_x509_certificate(forged).signature_hash_algorithm.name == "sha1"
    with refused("weak-key", "sha1"):
        verifier(rsa_ca).verify_x509_chain([forged])


def test_wrong_eku(ca):
    cert, _ = make_leaf(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with refused("wrong-usage", "clientAuth"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_key_usage_without_digital_signature(ca):
    cert, _ = make_leaf(ca, key_usage=False)
    with refused("wrong-usage", "digitalSignature"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_usage_extensions_are_optional(ca):
    cert, _ = make_leaf(ca, key_usage=None, eku=[])
    assert verifier(ca).verify_x509_chain([der(cert)]).user == "alice"


def test_ca_certificate_cannot_log_in(ca):
    cert, _ = make_leaf(ca, basic_ca=True)
    with refused("wrong-usage", "CA"):
        verifier(ca).verify_x509_chain([der(cert)])


def test_garbage_and_empty_chain(ca):
    v = verifier(ca)
    with refused("bad-encoding"):
        v.verify_x509_chain([b"\x30\x03\x02\x01\x01"])
    with refused("bad-encoding"):
        v.verify_x509_chain([])


# --- CRL handling -------------------------------------------------------------------------------


def test_revocation_after_verifier_was_built_is_seen(ca, cred):
    v = verifier(ca)
    v.verify_x509_chain([der(cred.cert)])
    v.verify_openssh_cert(cred.ssh_cert)
    calib.revoke_serial(ca, cred.serial)
    with refused("revoked"):
        v.verify_x509_chain([der(cred.cert)])
    with refused("revoked"):
        v.verify_openssh_cert(cred.ssh_cert)


def test_no_file_reads_when_nothing_changed(ca, cred):
    v = verifier(ca)
    for _ in range(50):
        v.verify_x509_chain([der(cred.cert)])
        v.verify_openssh_cert(cred.ssh_cert)
    assert v.load_counts == {str(ca.paths.cert): (1, 1)}
    calib.refresh_crl(ca)
    v.verify_x509_chain([der(cred.cert)])
    assert v.load_counts == {str(ca.paths.cert): (1, 2)}


def test_missing_crl(ca, cred):
    ca.paths.crl.unlink()
    with refused("crl-unavailable"):
        verifier(ca).verify_x509_chain([der(cred.cert)])
    assert verifier(ca, crl_required=False).verify_x509_chain([der(cred.cert)]).user == "alice"


def test_garbage_crl(ca, cred):
    ca.paths.crl.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with refused("crl-unavailable"):
        verifier(ca).verify_x509_chain([der(cred.cert)])


def test_badly_signed_crl(ca, cred, tmp_path):
    # same issuer name, different key: signature must not verify against the trusted CA
    imposter = make_ca(tmp_path, "dev", name="imposter")
    calib.revoke_serial(imposter, 12345)
    ca.paths.crl.write_bytes(imposter.paths.crl.read_bytes())
    with refused("crl-unavailable", "signature"):
        verifier(ca).verify_x509_chain([der(cred.cert)])


def test_stale_crl(ca, cred):
    later = now_utc() + timedelta(days=8)  # the CRL's nextUpdate is 7 days out
    long_cert, _ = make_leaf(ca, not_after=later + timedelta(days=1))
    with refused("crl-unavailable", "stale"):
        verifier(ca).verify_x509_chain([der(long_cert)], now=later)
    assert verifier(ca, crl_required=False).verify_x509_chain([der(long_cert)], now=later).user == "alice"


def test_unreadable_crl_keeps_last_good_revocations_when_optional(ca, cred):
    calib.revoke_serial(ca, cred.serial)
    v = verifier(ca, crl_required=False)
    with refused("revoked"):
        v.verify_x509_chain([der(cred.cert)])
    ca.paths.crl.write_bytes(b"garbage")
    with refused("revoked"):
        v.verify_x509_chain([der(cred.cert)])


def test_replaced_ca_file_is_picked_up(ca, cred, tmp_path):
    v = verifier(ca)
    v.verify_x509_chain([der(cred.cert)])
    new = make_ca(tmp_path, "dev", name="new")
    os.replace(new.paths.cert, ca.paths.cert)
    os.replace(new.paths.crl, ca.paths.crl)
    with refused("bad-signature"):
        v.verify_x509_chain([der(cred.cert)])
    with refused("unknown-ca"):
        v.verify_openssh_cert(cred.ssh_cert)


def test_trust_config_errors(ca, cred, tmp_path):
    with pytest.raises(TrustConfigError):
        Verifier([VOTrust("dev", tmp_path / "missing.pem", ca.paths.crl)])
    with pytest.raises(TrustConfigError, match="not a CA"):
        Verifier([VOTrust("dev", cred.cert_path, ca.paths.crl)])
    with pytest.raises(TrustConfigError, match="crl"):
        Verifier([VOTrust("dev", ca.paths.cert, None, crl_required=True)])
    v = Verifier([VOTrust("dev", ca.paths.cert, None, crl_required=False)])
    assert v.verify_x509_chain([der(cred.cert)]).user == "alice"


# --- OpenSSH certificate refusals ---------------------------------------------------------------


def test_openssh_expired_and_not_yet_valid(ca):
    now = now_utc()
    v = verifier(ca)
    blob = make_ssh_cert(ca, valid_after=now - timedelta(days=2), valid_before=now - timedelta(days=1))
    with refused("expired"):
        v.verify_openssh_cert(blob, now=now)
    blob = make_ssh_cert(ca, valid_after=now + timedelta(hours=1), valid_before=now + timedelta(hours=2))
    with refused("not-yet-valid"):
        v.verify_openssh_cert(blob, now=now)


def test_openssh_other_ca(ca, tmp_path):
    other = make_ca(tmp_path, "dev", name="other")
    with refused("unknown-ca"):
        verifier(ca).verify_openssh_cert(make_ssh_cert(other))


def test_openssh_tampered(ca):
    blob = make_ssh_cert(ca)
    i = blob.index(b"alice@dev")
    tampered = blob[:i] + b"mallo@dev" + blob[i + 9 :]
    with refused("bad-signature"):
        verifier(ca).verify_openssh_cert(tampered)
    with refused("bad-signature"):
        verifier(ca).verify_openssh_cert(flip_last_byte(blob))


def test_openssh_revoked_by_serial(ca):
    blob = make_ssh_cert(ca, serial=4242)
    calib.revoke_serial(ca, 4242)
    with refused("revoked", "4242"):
        verifier(ca).verify_openssh_cert(blob)


def test_openssh_missing_and_mismatched_vo(ca, beta):
    with refused("missing-attributes", "vo@xos"):
        verifier(ca).verify_openssh_cert(make_ssh_cert(ca, ext={"groups@xos": "users"}))
    blob = make_ssh_cert(ca, key_id="alice@beta", ext={"vo@xos": "beta"})
    with refused("vo-mismatch", "beta"):
        verifier(ca, beta).verify_openssh_cert(blob)


def test_openssh_principal_and_key_id(ca):
    v = verifier(ca)
    with refused("invalid-attributes", "principals"):
        v.verify_openssh_cert(make_ssh_cert(ca, principals=["bob"]))
    with refused("invalid-attributes", "principals"):
        v.verify_openssh_cert(make_ssh_cert(ca, principals=[]))
    with refused("invalid-attributes", "key id"):
        v.verify_openssh_cert(make_ssh_cert(ca, key_id="alice"))
    with refused("invalid-attributes", "key id"):
        v.verify_openssh_cert(make_ssh_cert(ca, key_id="alice@beta"))
    with refused("invalid-attributes", "illegal characters"):
        v.verify_openssh_cert(make_ssh_cert(ca, key_id="al ice@dev", principals=["al ice"]))
    ident = v.verify_openssh_cert(make_ssh_cert(ca, key_id="a@b.org@dev", principals=["x", "a@b.org"]))
    assert ident.user == "a@b.org"


def test_openssh_bad_extension_values(ca):
    v = verifier(ca)
    with refused("invalid-attributes", "groups@xos"):
        v.verify_openssh_cert(make_ssh_cert(ca, ext={"vo@xos": "dev", "groups@xos": "users,bad group"}))
    with refused("bad-encoding", "role@xos", "UTF-8"):
        v.verify_openssh_cert(make_ssh_cert(ca, ext={"vo@xos": "dev", "role@xos": b"\xff"}))
    with refused("invalid-attributes", "vo@xos"):
        v.verify_openssh_cert(make_ssh_cert(ca, ext={"vo@xos": "DEV"}))


def test_openssh_weak_user_key(ca):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with refused("weak-key", "1024"):
        verifier(ca).verify_openssh_cert(make_ssh_cert(ca, weak))


def test_openssh_host_certificate_and_critical_options(ca):
    ca_key = ca.ssh_key()
    user = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    host = ca_key.generate_host_certificate(user, "alice@dev", principals=["alice"], valid_before="+1h")
    with refused("wrong-usage", "host"):
        verifier(ca).verify_openssh_cert(host.public_data)
    forced = ca_key.generate_user_certificate(user, "alice@dev", principals=["alice"], valid_before="+1h", force_command="/bin/true")
    with refused("invalid-attributes", "force-command"):
        verifier(ca).verify_openssh_cert(forced.public_data)


def test_openssh_garbage(ca, cred):
    v = verifier(ca)
    with refused("bad-encoding"):
        v.verify_openssh_cert(b"\x00\x00\x00\x03abc")
    with refused("bad-encoding"):
        v.verify_openssh_cert(cred.ssh_cert[:-10])
    with refused("bad-encoding"):
        v.verify_openssh_cert(cred.ssh_cert + b"x")
    with refused("bad-encoding"):
        v.verify_openssh_cert(ssh_key_of(cred.key).public_data)  # a plain key, not a certificate


def test_identity_is_hashable_and_frozen(ca, cred):
    ident = verifier(ca).verify_x509_chain([der(cred.cert)])
    assert {ident: 1}[ident] == 1
    with pytest.raises(AttributeError):
        ident.user = "root"  # type: ignore[misc]


def test_naive_now_is_utc(ca, cred):
    naive = datetime.now(UTC).replace(tzinfo=None)
    assert verifier(ca).verify_x509_chain([der(cred.cert)], now=naive).user == "alice"


def test_primary_group_only(ca):
    attrs = XOSAttributes(primary_vo="dev", user_id="alice", primary_group="users")
    cert, _ = make_leaf(ca, xos=xos_exts(attrs))
    ident = verifier(ca).verify_x509_chain([der(cert)])
    assert (ident.groups, ident.role) == (("users",), None)
