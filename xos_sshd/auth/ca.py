"""The VO certificate authority behind ``xos-ca``: create a CA, issue credentials, revoke.

A CA directory holds ``ca.pem`` (self-signed CA certificate carrying GlobalPrimaryVOName, so
anyone holding only ``ca.pem`` knows which VO it speaks for), ``ca.key`` (PEM PKCS#8, mode 0600)
and ``crl.pem`` (always present and signed, possibly empty). Every file is published atomically
(temporary file, fsync, rename; ``link`` where an existing file must not be overwritten) so a
reader -- above all the gateway's verifier, which re-reads ``crl.pem`` when it changes -- never sees
a torn file. Revocations are serialised with ``flock`` on ``DIR/.lock``.

An issued credential is one key with two certificates for it: the X.509 XOS-cert ``PREFIX.pem``
and the OpenSSH user certificate ``PREFIX-cert.pub``, both signed by the CA key, with the same
serial and validity, so both login routes yield the same VOIdentity.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Union

import asyncssh
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import sshcert
from .. import fsutil
from .errors import AuthRefused
from .profile import (
    GROUP_RULE,
    ROLE_RULE,
    USER_RULE,
    VO_RULE,
    NameRule,
    XOSAttributes,
    parse_certificate,
    ssh_extension_texts,
)

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca.key"
CRL_FILE: Final = "crl.pem"
LOCK_FILE: Final = ".lock"

DEFAULT_CA_DAYS: Final = 3650
DEFAULT_CERT_HOURS: Final = 24
#: nextUpdate of every CRL we sign; re-sign (``xos-ca crl DIR``) before it passes.
DEFAULT_CRL_DAYS: Final = 7
MIN_RSA_BITS: Final = 2048
DEFAULT_RSA_BITS: Final = 3072
#: Serials are random, positive and below 2**63 (fit OpenSSH's uint64 and signed 64-bit stores).
SERIAL_LIMIT: Final = 2**63

CAPrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]
UserPrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


class CAError(Exception):
    """An operational error of the CA tool (one clear line, shown to the operator as is)."""


# --- files --------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, overwrite: bool = True) -> None:
    """:func:`xos_sshd.fsutil.atomic_write`, refusing to replace a CA file with a CAError."""
    try:
        fsutil.atomic_write(path, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise CAError(f"{path} already exists; refusing to overwrite it") from None


def _private_pem(key: CAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_name(rule: NameRule, value: str, what: str) -> str:
    try:
        return rule.check(value, what)
    except AuthRefused as exc:
        raise CAError(str(exc)) from None


def _now(now: datetime | None) -> datetime:
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).replace(microsecond=0)


def new_serial() -> int:
    """A random serial in ``[1, 2**63)``."""
    return secrets.randbelow(SERIAL_LIMIT - 1) + 1


def signing_hash(key: CAPrivateKey) -> hashes.HashAlgorithm | None:
    """The hash to sign certificates and CRLs with (None for Ed25519, which hashes itself)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def generate_user_key(key_type: str = "ecdsa", rsa_bits: int = DEFAULT_RSA_BITS) -> UserPrivateKey:
    """A fresh user key: ECDSA P-256 (default) or RSA of ``rsa_bits`` >= 2048."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits < MIN_RSA_BITS:
            raise CAError(f"RSA keys must have at least {MIN_RSA_BITS} bits (got {rsa_bits})")
        if rsa_bits > 16384:
            raise CAError(f"RSA key size {rsa_bits} is unreasonably large")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise CAError(f"unknown key type {key_type!r} (use ecdsa or rsa)")


# --- the CA -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CAPaths:
    """Where a CA directory keeps its files."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def crl(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def lock(self) -> Path:
        return self.directory / LOCK_FILE


def ca_vo(cert: x509.Certificate) -> str:
    """The VO a CA certificate speaks for (its GlobalPrimaryVOName), or ``CAError``."""
    try:
        vo = parse_certificate(cert).primary_vo
    except AuthRefused as exc:
        raise CAError(f"CA certificate: {exc}") from None
    if vo is None:
        raise CAError("CA certificate has no GlobalPrimaryVOName extension naming its VO")
    return vo


def load_ca_certificate(path: Path) -> x509.Certificate:
    """Read a PEM (or DER) CA certificate, with a one-line ``CAError`` on failure."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CAError(f"{path} is not a valid certificate") from None


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its directory, VO, certificate and private key."""

    paths: CAPaths
    vo: str
    cert: x509.Certificate
    key: CAPrivateKey

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        """Load the CA in ``directory`` (certificate, key, VO); ``CAError`` if unusable."""
        paths = CAPaths(Path(directory))
        if not paths.cert.exists():
            raise CAError(f"no CA in {paths.directory} (missing {CA_CERT_FILE}; run xos-ca init)")
        cert = load_ca_certificate(paths.cert)
        try:
            key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
        except OSError as exc:
            raise CAError(f"cannot read CA key {paths.key}: {exc.strerror}") from None
        except (ValueError, TypeError):
            raise CAError(f"{paths.key} is not an unencrypted PEM private key") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise CAError(f"{paths.key}: unsupported CA key type")
        if key.public_key() != cert.public_key():
            raise CAError(f"{paths.key} does not belong to {paths.cert}")
        return cls(paths=paths, vo=ca_vo(cert), cert=cert, key=key)

    @property
    def subject(self) -> str:
        """The CA subject, RFC 4514."""
        return self.cert.subject.rfc4514_string()

    def ssh_key(self) -> asyncssh.SSHKey:
        """The CA key as an asyncssh signer for OpenSSH certificates."""
        return asyncssh.import_private_key(_private_pem(self.key))

    def issued(self, cert: x509.Certificate) -> bool:
        """True when ``cert`` was signed by this CA (name and signature)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def init_ca(
    directory: Path | str,
    vo: str,
    *,
    days: int = DEFAULT_CA_DAYS,
    key: CAPrivateKey | None = None,
    now: datetime | None = None,
) -> CertificateAuthority:
    """Create a CA for ``vo`` in ``directory``; refuse if one (even partial) is already there.

    ``key`` defaults to a fresh ECDSA P-256 key (tests pass RSA keys to exercise RSA CAs).
    """
    _check_name(VO_RULE, vo, "--vo")
    if days <= 0:
        raise CAError("--days must be positive")
    paths = CAPaths(Path(directory))
    for existing in (paths.cert, paths.key, paths.crl):
        if existing.exists():
            raise CAError(f"a CA already exists in {paths.directory} ({existing.name} present); refusing to overwrite")
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = _now(now)
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, vo),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{vo} VO CA"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    builder = XOSAttributes(primary_vo=vo).add_to(builder)
    cert = builder.sign(key, signing_hash(key))
    atomic_write(paths.key, _private_pem(key), 0o600, overwrite=False)
    atomic_write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=False)
    ca = CertificateAuthority(paths=paths, vo=vo, cert=cert, key=key)
    write_crl(ca, {}, number=1, now=now, overwrite=False)
    return ca


# --- issuing ------------------------------------------------------------------------------------


def build_leaf_certificate(
    ca: CertificateAuthority,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    attributes: XOSAttributes,
    *,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Sign an XOS-cert for ``public_key`` with the CA: the profile's usages and extensions.

    Subject ``CN=<GlobalUserID>,O=<VO>`` (CN omitted for a service certificate).
    """
    rdns = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, attributes.primary_vo or ca.vo)]
    if attributes.user_id is not None:
        rdns.append(x509.NameAttribute(NameOID.COMMON_NAME, attributes.user_id))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(rdns))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    return attributes.add_to(builder).sign(ca.key, signing_hash(ca.key))


@dataclass(frozen=True)
class IssuedCredential:
    """What ``issue`` wrote: the key, both certificates, and their file paths."""

    key: UserPrivateKey
    cert: x509.Certificate
    ssh_cert: bytes
    serial: int
    cert_path: Path
    key_path: Path
    ssh_cert_path: Path


def credential_paths(prefix: Path | str) -> tuple[Path, Path, Path]:
    """``(PREFIX.pem, PREFIX.key, PREFIX-cert.pub)``."""
    prefix = str(prefix)
    return Path(prefix + ".pem"), Path(prefix + ".key"), Path(prefix + "-cert.pub")


def issue(
    ca: CertificateAuthority,
    user: str,
    out_prefix: Path | str,
    *,
    groups: Sequence[str] = (),
    role: str | None = None,
    hours: float = DEFAULT_CERT_HOURS,
    key_type: str = "ecdsa",
    rsa_bits: int = DEFAULT_RSA_BITS,
    now: datetime | None = None,
) -> IssuedCredential:
    """Issue a user credential: new key, XOS-cert and OpenSSH certificate, written at the prefix.

    The first group is GlobalPrimaryGroupName, the rest GlobalSecondaryGroupNames. Existing
    files at the prefix are replaced (re-issuing to the same prefix is how one renews).
    """
    _check_name(USER_RULE, user, "--user")
    for group in groups:
        _check_name(GROUP_RULE, group, "--group")
    if role is not None:
        _check_name(ROLE_RULE, role, "--role")
    if not hours > 0:
        raise CAError("--hours must be positive")
    cert_path, key_path, ssh_path = credential_paths(out_prefix)
    if not cert_path.parent.is_dir():
        raise CAError(f"output directory {cert_path.parent} does not exist")
    not_before = _now(now)
    not_after = not_before + timedelta(seconds=int(hours * 3600))
    if not_after > ca.cert.not_valid_after_utc:
        raise CAError(f"requested validity ends after the CA certificate ({ca.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    group_list = list(dict.fromkeys(groups))
    attributes = XOSAttributes(
        primary_vo=ca.vo,
        user_id=user,
        primary_group=group_list[0] if group_list else None,
        secondary_groups=tuple(group_list[1:]),
        role=role,
    )
    key = generate_user_key(key_type, rsa_bits)
    serial = new_serial()
    cert = build_leaf_certificate(
        ca, key.public_key(), attributes, serial=serial, not_before=not_before, not_after=not_after
    )
    key_id = f"{user}@{ca.vo}"
    user_ssh_key = asyncssh.import_public_key(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    ssh_blob = sshcert.build_user_certificate(
        ca.ssh_key(),
        user_ssh_key,
        serial=serial,
        key_id=key_id,
        principals=[user],
        valid_after=int(not_before.timestamp()),
        valid_before=int(not_after.timestamp()),
        xos_extensions=ssh_extension_texts(ca.vo, group_list, role),
        comment=key_id,
    )
    atomic_write(key_path, _private_pem(key), 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write(ssh_path, sshcert.export_certificate_line(ssh_blob, key_id), 0o644)
    # OpenSSH pairs `-i PREFIX.key` with `CertificateFile=PREFIX-cert.pub` only when it can
    # read the key's public half without the private key: from PREFIX.key.pub.
    atomic_write(Path(f"{key_path}.pub"),
                 user_ssh_key.export_public_key("openssh").rstrip(b"\n") + f" {key_id}\n".encode(),
                 0o644)
    return IssuedCredential(key, cert, ssh_blob, serial, cert_path, key_path, ssh_path)


# --- revocation ---------------------------------------------------------------------------------


@contextmanager
def _locked(ca: CertificateAuthority) -> Iterator[None]:
    fd = os.open(ca.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_crl(ca: CertificateAuthority) -> x509.CertificateRevocationList | None:
    """The CA's current CRL (signature checked), ``None`` when there is none; ``CAError`` if bad.

    A bad CRL is never silently replaced: that would drop earlier revocations.
    """
    try:
        data = ca.paths.crl.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CAError(f"cannot read {ca.paths.crl}: {exc.strerror}") from None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise CAError(f"{ca.paths.crl} is not a valid CRL; fix or remove it first") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        raise CAError(f"{ca.paths.crl} is not signed by this CA; fix or remove it first")
    return crl


def write_crl(
    ca: CertificateAuthority,
    revoked: dict[int, datetime],
    *,
    number: int,
    now: datetime | None = None,
    days: int = DEFAULT_CRL_DAYS,
    overwrite: bool = True,
) -> x509.CertificateRevocationList:
    """Sign and atomically publish a CRL listing ``revoked`` (serial -> revocation time)."""
    now = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, signing_hash(ca.key))
    atomic_write(ca.paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)
    return crl


def _crl_state(crl: x509.CertificateRevocationList | None) -> tuple[dict[int, datetime], int]:
    if crl is None:
        return {}, 1
    revoked = {rc.serial_number: rc.revocation_date_utc for rc in crl}
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return revoked, number + 1


def revoke_serial(
    ca: CertificateAuthority, serial: int, *, now: datetime | None = None, days: int = DEFAULT_CRL_DAYS
) -> bool:
    """Add ``serial`` to the CRL (re-signed, atomically replaced). False if already listed."""
    with _locked(ca):
        revoked, number = _crl_state(read_crl(ca))
        if serial in revoked:
            return False
        revoked[serial] = _now(now)
        write_crl(ca, revoked, number=number, now=now, days=days)
        return True


def refresh_crl(ca: CertificateAuthority, *, now: datetime | None = None, days: int = DEFAULT_CRL_DAYS) -> int:
    """Re-sign the CRL with a fresh nextUpdate; return how many serials it lists."""
    with _locked(ca):
        revoked, number = _crl_state(read_crl(ca))
        write_crl(ca, revoked, number=number, now=now, days=days)
        return len(revoked)


def serial_issued_by(ca: CertificateAuthority, path: Path | str) -> int:
    """The serial of a certificate file (``.pem``/``.der`` or ``-cert.pub``) this CA issued.

    ``CAError`` if the file is unreadable or was not signed by this CA.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror}") from None
    if b"-cert-v01@openssh.com" in data.split(b"\n", 1)[0]:
        try:
            parsed = sshcert.parse_certificate(sshcert.read_certificate_file(data))
        except AuthRefused as exc:
            raise CAError(f"{path}: {exc}") from None
        if parsed.ca_key_blob != bytes(ca.ssh_key().public_data):
            raise CAError(f"{path} was not issued by the CA in {ca.paths.directory}")
        return parsed.serial
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise CAError(f"{path} is not a certificate") from None
    if not ca.issued(cert):
        raise CAError(f"{path} was not issued by the CA in {ca.paths.directory}")
    return cert.serial_number
