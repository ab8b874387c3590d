"""``xos-ca`` end to end through the installed console script (subprocess), plus OpenSSH interop."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from auth_certs import der, flip_last_byte, make_leaf, now_utc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xos_sshd.auth import ca as calib
from xos_sshd.auth import profile, sshcert

XOS_CA = str(Path(sys.executable).with_name("xos-ca"))
SSH_KEYGEN = "/usr/bin/ssh-keygen"


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([XOS_CA, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The process failed with exactly one stderr line containing ``fragments``."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def cadir(tmp_path) -> Path:
    run("init", tmp_path / "ca", "--vo", "dev")
    return tmp_path / "ca"


@pytest.fixture
def alice(cadir, tmp_path) -> Path:
    prefix = tmp_path / "alice"
    run("issue", cadir, "--user", "alice", "--group", "users", "--group", "staff", "--role", "worker", "--out", prefix)
    return prefix


def test_help_everywhere():
    for sub in ([], ["init"], ["issue"], ["revoke"], ["crl"], ["show"], ["verify"]):
        proc = run(*sub, "--help")
        assert "usage: xos-ca" in proc.stdout
    assert "--key-type" in run("issue", "--help").stdout


def test_usage_errors_are_one_line():
    refused(run(ok=False), "xos-ca")
    proc = run("init", "/tmp/x", ok=False)  # missing --vo
    assert proc.returncode == 2
    refused(proc, "--vo")
    refused(run("frobnicate", ok=False), "frobnicate")


def test_init_writes_the_ca(cadir):
    cert_path, key_path, crl_path = cadir / "ca.pem", cadir / "ca.key", cadir / "crl.pem"
    assert mode(key_path) == 0o600
    assert mode(cadir) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=dev VO CA,O=dev"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert profile.parse_certificate(cert).primary_vo == "dev"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(cert.public_key())
    assert crl.next_update_utc > now_utc() + timedelta(days=6)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650)


def test_init_days_and_refuses_to_overwrite(cadir, tmp_path):
    before = (cadir / "ca.key").read_bytes()
    line = refused(run("init", cadir, "--vo", "dev", ok=False), "already exists")
    assert line.startswith("xos-ca: init:")
    assert (cadir / "ca.key").read_bytes() == before
    run("init", tmp_path / "short", "--vo", "short", "--days", "30")
    cert = x509.load_pem_x509_certificate((tmp_path / "short" / "ca.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)
    refused(run("init", tmp_path / "bad", "--vo", "Bad VO", ok=False), "illegal characters")
    assert not (tmp_path / "bad" / "ca.pem").exists()


def test_issue_writes_three_files(cadir, alice):
    pem, key_path, pub = Path(f"{alice}.pem"), Path(f"{alice}.key"), Path(f"{alice}-cert.pub")
    assert mode(key_path) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    ca_cert = x509.load_pem_x509_certificate((cadir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=alice,O=dev"
    assert 0 < cert.serial_number < 2**63
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=24)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    attrs = profile.parse_certificate(cert)
    assert attrs == profile.XOSAttributes(
        primary_vo="dev", user_id="alice", primary_group="users", secondary_groups=("staff",), role="worker"
    )
    # the OpenSSH certificate: same key, CA, serial, validity
    ssh = sshcert.parse_certificate(sshcert.read_certificate_file(pub.read_bytes()))
    assert ssh.cert_type == sshcert.CERT_TYPE_USER
    assert ssh.serial == cert.serial_number
    assert ssh.key_id == "alice@dev"
    assert ssh.principals == ("alice",)
    assert ssh.valid_after == int(cert.not_valid_before_utc.timestamp())
    assert ssh.valid_before == int(cert.not_valid_after_utc.timestamp())
    ca_pub = ca_cert.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert ssh.ca_key_blob == base64.b64decode(ca_pub.split()[1])
    assert ssh.extensions["vo@xos"] == profile.encode_ssh_extension_data("dev")
    assert ssh.extensions["groups@xos"] == profile.encode_ssh_extension_data("users,staff")
    assert ssh.extensions["role@xos"] == profile.encode_ssh_extension_data("worker")
    assert {"permit-pty", "permit-port-forwarding", "permit-agent-forwarding"} <= set(ssh.extensions)
    assert list(ssh.extensions) == sorted(ssh.extensions)  # lexical order, as OpenSSH wants


def test_issue_options(cadir, tmp_path):
    run("issue", cadir, "--user", "bob", "--hours", "2", "--key-type", "rsa", "--rsa-bits", "2048", "--out", tmp_path / "bob")
    cert = x509.load_pem_x509_certificate((tmp_path / "bob.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=2)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    assert profile.parse_certificate(cert).primary_group is None
    ssh = sshcert.parse_certificate(sshcert.read_certificate_file((tmp_path / "bob-cert.pub").read_bytes()))
    assert ssh.algorithm == "ssh-rsa-cert-v01@openssh.com" and "role@xos" not in ssh.extensions
    assert "groups@xos" not in ssh.extensions


def test_issue_refusals(cadir, tmp_path):
    refused(run("issue", cadir, "--user", "bob", "--key-type", "rsa", "--rsa-bits", "1024", "--out", tmp_path / "b", ok=False), "2048")
    refused(run("issue", cadir, "--user", "bad user", "--out", tmp_path / "b", ok=False), "--user", "illegal characters")
    refused(run("issue", cadir, "--user", "bob", "--group", "a,b", "--out", tmp_path / "b", ok=False), "--group")
    refused(run("issue", cadir, "--user", "u" * 65, "--out", tmp_path / "b", ok=False), "too long")
    refused(run("issue", cadir, "--user", "bob", "--hours", "0", "--out", tmp_path / "b", ok=False), "positive")
    refused(run("issue", cadir, "--user", "bob", "--hours", "1000000", "--out", tmp_path / "b", ok=False), "CA certificate")
    refused(run("issue", tmp_path / "nope", "--user", "bob", "--out", tmp_path / "b", ok=False), "no CA")
    refused(run("issue", cadir, "--user", "bob", "--out", tmp_path / "missing" / "b", ok=False), "does not exist")
    assert not list(tmp_path.glob("b*"))


def test_ssh_keygen_reads_the_certificate(alice):
    if not Path(SSH_KEYGEN).exists():  # pragma: no cover
        pytest.skip("OpenSSH ssh-keygen not installed")
    out = subprocess.run([SSH_KEYGEN, "-L", "-f", f"{alice}-cert.pub"], capture_output=True, text=True, check=True).stdout
    assert "user certificate" in out
    assert 'Key ID: "alice@dev"' in out
    principals = out.split("Principals:", 1)[1].split("Critical Options:", 1)[0].split()
    assert principals == ["alice"]
    for name in ("vo@xos", "groups@xos", "role@xos", "permit-pty"):
        assert name in out
    serial = x509.load_pem_x509_certificate(Path(f"{alice}.pem").read_bytes()).serial_number
    assert f"Serial: {serial}" in out
    # OpenSSH also reads the PKCS#8 private key and derives the certified public key from it
    Path(f"{alice}.key").chmod(0o600)
    pub = subprocess.run([SSH_KEYGEN, "-y", "-f", f"{alice}.key"], capture_output=True, text=True, check=True).stdout.split()
    cert_line = Path(f"{alice}-cert.pub").read_text().split()
    fingerprint = subprocess.run([SSH_KEYGEN, "-l", "-f", f"{alice}-cert.pub"], capture_output=True, text=True, check=True).stdout
    key_fp = subprocess.run([SSH_KEYGEN, "-l", "-f", "/dev/stdin"], input=" ".join(pub[:2]), capture_output=True, text=True, check=True).stdout
    assert fingerprint.split()[1] == key_fp.split()[1]
    assert cert_line[0] == "ecdsa-sha2-nistp256-cert-v01@openssh.com"


def test_show(alice, cadir):
    out = run("show", f"{alice}.pem").stdout
    for fragment in ("CN=alice,O=dev", "GlobalPrimaryVOName:", "dev", "GlobalUserID:", "alice",
                     "GlobalPrimaryGroupName:", "users", "GlobalSecondaryGroupNames:", "staff", "Role:", "worker"):
        assert fragment in out
    out = run("show", f"{alice}-cert.pub").stdout
    for fragment in ("OpenSSH user certificate", "key id:     alice@dev", "principals: alice",
                     "vo@xos:     dev", "groups@xos: users,staff", "role@xos:   worker"):
        assert fragment in out
    assert "GlobalPrimaryVOName:" in run("show", cadir / "ca.pem").stdout
    assert "revoked:     0" in run("show", cadir / "crl.pem").stdout
    refused(run("show", cadir / "nothing.pem", ok=False), "cannot read")
    (cadir / "junk.pem").write_text("hello\n")
    refused(run("show", cadir / "junk.pem", ok=False), "not a certificate")


def test_verify_ok_both_forms(cadir, alice):
    for path in (f"{alice}.pem", f"{alice}-cert.pub"):
        out = run("verify", cadir, path).stdout
        assert "ok:          alice@dev" in out
        assert "groups:      users,staff" in out and "role:        worker" in out


def test_revoke_then_verify_refuses(cadir, alice, tmp_path):
    out = run("revoke", cadir, f"{alice}.pem").stdout
    serial = x509.load_pem_x509_certificate(Path(f"{alice}.pem").read_bytes()).serial_number
    assert str(serial) in out
    crl = x509.load_pem_x509_crl((cadir / "crl.pem").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((cadir / "ca.pem").read_bytes())
    assert [rc.serial_number for rc in crl] == [serial] and crl.is_signature_valid(ca_cert.public_key())
    assert mode(cadir / "crl.pem") == 0o644
    assert sorted(p.name for p in cadir.iterdir()) == [".lock", "ca.key", "ca.pem", "crl.pem"]  # no temp files
    for path in (f"{alice}.pem", f"{alice}-cert.pub"):
        refused(run("verify", cadir, path, ok=False), "revoked")
    assert "already revoked" in run("revoke", cadir, f"{alice}-cert.pub").stdout
    # a second revocation keeps the first one
    run("issue", cadir, "--user", "bob", "--out", tmp_path / "bob")
    run("revoke", cadir, tmp_path / "bob-cert.pub")
    assert len(x509.load_pem_x509_crl((cadir / "crl.pem").read_bytes())) == 2
    assert "revoked:     2" in run("show", cadir / "crl.pem").stdout


def test_revoke_refuses_foreign_certificates(cadir, tmp_path):
    run("init", tmp_path / "other", "--vo", "other")
    run("issue", tmp_path / "other", "--user", "eve", "--out", tmp_path / "eve")
    refused(run("revoke", cadir, tmp_path / "eve.pem", ok=False), "not issued by")
    refused(run("revoke", cadir, tmp_path / "eve-cert.pub", ok=False), "not issued by")
    refused(run("verify", cadir, tmp_path / "eve.pem", ok=False), "unknown-ca")
    refused(run("verify", cadir, tmp_path / "eve-cert.pub", ok=False), "unknown-ca")


def test_crl_refresh(cadir):
    before = x509.load_pem_x509_crl((cadir / "crl.pem").read_bytes())
    run("crl", cadir, "--days", "30")
    after = x509.load_pem_x509_crl((cadir / "crl.pem").read_bytes())
    assert after.next_update_utc - after.last_update_utc == timedelta(days=30)
    number = after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1


def _write(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_verify_names_each_reason(cadir, alice, tmp_path):
    ca = calib.CertificateAuthority.load(cadir)
    now = now_utc()
    cases = {
        "expired": make_leaf(ca, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))[0],
        "not-yet-valid": make_leaf(ca, not_before=now + timedelta(days=1), not_after=now + timedelta(days=2))[0],
        "service-certificate": make_leaf(ca, user=None, cn="svc")[0],
        "vo-mismatch": make_leaf(ca, vo="beta")[0],
        "wrong-usage": make_leaf(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH])[0],
        "weak-key": make_leaf(ca, key=rsa.generate_private_key(public_exponent=65537, key_size=1024))[0],
        "missing-attributes": make_leaf(ca, xos=[(profile.GLOBAL_USER_ID.oid, profile.encode_value("alice"), False)])[0],
        "invalid-attributes": make_leaf(ca, cn="mallory")[0],
    }
    for reason, cert in cases.items():
        refused(run("verify", cadir, _write(tmp_path / f"{reason}.pem", cert), ok=False), "refused", reason)
    bad_sig = tmp_path / "badsig.der"
    bad_sig.write_bytes(flip_last_byte(der(x509.load_pem_x509_certificate(Path(f"{alice}.pem").read_bytes()))))
    refused(run("verify", cadir, bad_sig, ok=False), "bad-signature")
    pub = Path(f"{alice}-cert.pub")
    fields = pub.read_text().split()
    tampered = tmp_path / "tampered-cert.pub"
    tampered.write_text(f"{fields[0]} {base64.b64encode(flip_last_byte(base64.b64decode(fields[1]))).decode()}\n")
    refused(run("verify", cadir, tampered, ok=False), "bad-signature")
    (cadir / "crl.pem").unlink()
    refused(run("verify", cadir, f"{alice}.pem", ok=False), "crl-unavailable")
    assert "ok:" in run("verify", "--no-crl", cadir, f"{alice}.pem").stdout


def test_verify_without_ca_key_access(cadir, alice, tmp_path):
    # verify needs only ca.pem and crl.pem, never the private key
    public = tmp_path / "public"
    public.mkdir()
    for name in ("ca.pem", "crl.pem"):
        shutil.copy(cadir / name, public / name)
    assert "ok:" in run("verify", public, f"{alice}.pem").stdout
    refused(run("verify", tmp_path / "nowhere", f"{alice}.pem", ok=False), "no CA")


def test_ca_subject_names_vo(cadir):
    cert = x509.load_pem_x509_certificate((cadir / "ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "dev"
