"""The one credential verifier: X.509 XOS-certs and OpenSSH user certificates -> VOIdentity.

Every entry point (SSH X.509 login, SSH OpenSSH-cert login, ``xos-ca verify``, PAM through the
control socket) calls :class:`Verifier`, so there is exactly one implementation of the rules:

* the credential was signed by a CA the configuration trusts *for the VO the credential names*
  (a CA of another VO -> ``vo-mismatch``; no trusted CA -> ``unknown-ca``);
* the leaf's and the CA's validity windows contain *now* (give or take ``clock_skew``);
* key usage fits (X.509: keyUsage digitalSignature, EKU clientAuth, not a CA; OpenSSH: a user
  certificate) and the key is strong (RSA >= 2048, EC P-256/384/521, Ed25519);
* the serial is not on the CA's CRL. The CRL's signature must verify against the CA; a missing,
  unreadable, badly signed or stale (past nextUpdate) CRL is ``crl-unavailable`` when the trust
  says ``crl_required`` and is otherwise ignored (the last good revocation list still applies);
* the XOS attributes parse strictly (see :mod:`.profile`) and name a user (else it is a service
  certificate).

Only the leaf is checked against the configured CA: xos-ca issues directly from the VO CA (its
``pathLenConstraint`` is 0), so further certificates a client sends in its chain are ignored --
trust anchors come from the configuration, never from the client.

Hot-path cost: CA certificates are parsed once and re-parsed only when their file changes; the
CRL file is ``stat``-ed per verification and re-read only when (inode, mtime_ns, size) change.
The verifier is meant for one event loop (no locking).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from . import sshcert
from .errors import AuthRefused, TrustConfigError
from .identity import VOIdentity, dedupe, key_fingerprint, ssh_fingerprint, ssh_public_blob
from .profile import USER_RULE, VO_RULE, XOS_ARC, parse_certificate, parse_ssh_extensions

DEFAULT_CLOCK_SKEW: Final = timedelta(minutes=5)
MIN_RSA_BITS: Final = 2048
STRONG_CURVES: Final[frozenset[str]] = frozenset({"secp256r1", "secp384r1", "secp521r1"})
STRONG_HASHES: Final[tuple[type[hashes.HashAlgorithm], ...]] = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
#: OpenSSH key algorithms accepted for the certified key (RSA is size-checked separately).
STRONG_SSH_KEYS: Final[frozenset[bytes]] = frozenset(
    {
        b"ecdsa-sha2-nistp256",
        b"ecdsa-sha2-nistp384",
        b"ecdsa-sha2-nistp521",
        b"ssh-ed25519",
        b"sk-ecdsa-sha2-nistp256@openssh.com",
        b"sk-ssh-ed25519@openssh.com",
    }
)
#: Critical standard extensions we understand in a leaf (RFC 5280: refuse other critical ones).
UNDERSTOOD_CRITICAL: Final[frozenset[x509.ObjectIdentifier]] = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    }
)
#: POSIX seconds past which an OpenSSH ``valid_before`` means "forever": we refuse those.
_MAX_TIMESTAMP: Final = 253402300799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True)
class VOTrust:
    """Configuration: the CA certificate trusted for ``vo`` and its CRL.

    ``crl_file`` may be ``None`` only when ``crl_required`` is false.
    """

    vo: str
    ca_file: Path | str
    crl_file: Path | str | None
    crl_required: bool = True


@dataclass(frozen=True)
class RevocationStatus:
    """The answer of :meth:`Verifier.revocation_status`: ``revoked`` only when a CRL says
    so; ``known`` is False when no usable CRL could answer (``message`` says why)."""

    revoked: bool
    known: bool
    message: str


def _file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _load_cert_file(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


class _CRL:
    """One CA's CRL, re-read only when the file's (dev, inode, mtime_ns, size) change."""

    def __init__(self, path: Path | None, required: bool, ca: _CA) -> None:
        self.path = path
        self.required = required
        self.ca = ca
        self.loads = 0
        self._key: tuple[int, int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._next_update: datetime | None = None
        self._error: str | None = "not loaded yet"

    def _refresh(self) -> None:
        assert self.path is not None
        try:
            key = _file_key(os.stat(self.path))
        except OSError as exc:
            self._key, self._error = None, f"CRL {self.path} unreadable: {exc.strerror}"
            return
        if key == self._key:
            return
        self._key = key
        self.loads += 1
        try:
            data = self.path.read_bytes()
            crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
        except OSError as exc:
            self._error = f"CRL {self.path} unreadable: {exc.strerror}"
            return
        except ValueError:
            self._error = f"CRL {self.path} is not a valid CRL"
            return
        if crl.issuer != self.ca.cert.subject:
            self._error = f"CRL {self.path} was issued by {crl.issuer.rfc4514_string()}, not the VO CA"
            return
        try:
            valid = crl.is_signature_valid(self.ca.cert.public_key())  # type: ignore[arg-type]
        except (TypeError, UnsupportedAlgorithm):
            valid = False
        if not valid:
            self._error = f"CRL {self.path} signature does not verify against the CA of VO {self.ca.vo}"
            return
        self._revoked = frozenset(rc.serial_number for rc in crl)
        self._next_update = crl.next_update_utc
        self._error = None

    def invalidate(self) -> None:
        """Forget the file identity so the next check re-reads (and re-verifies) the CRL."""
        self._key = None

    def lookup(self, serial: int) -> tuple[bool, str | None]:
        """(whether the last good CRL lists *serial*, why the CRL file is unusable now or None).

        Reads the file exactly as :meth:`check` does (re-read when it changed); a CRL that
        became unusable keeps the revocations of the last good one.
        """
        if self.path is None:
            return False, None
        self._refresh()
        return serial in self._revoked, self._error

    def check(self, serial: int, now: datetime) -> None:
        """Refuse a revoked serial; refuse everything when the CRL is required and unusable."""
        if self.path is None:
            return
        self._refresh()
        if self._error is not None:
            if self.required:
                raise AuthRefused("crl-unavailable", self._error)
        elif self._next_update is not None and now > self._next_update:
            if self.required:
                raise AuthRefused(
                    "crl-unavailable",
                    f"CRL {self.path} is stale (nextUpdate {_fmt(self._next_update)} has passed)",
                )
        if serial in self._revoked:
            raise AuthRefused("revoked", f"certificate serial {serial} is revoked by the CA of VO {self.ca.vo}")


class _CA:
    """A trusted CA: the parsed certificate (cached by file identity) and its CRL."""

    def __init__(self, trust: VOTrust) -> None:
        if VO_RULE.pattern.fullmatch(trust.vo) is None:
            raise TrustConfigError(f"invalid VO name {trust.vo!r}")
        if trust.crl_required and trust.crl_file is None:
            raise TrustConfigError(f"VO {trust.vo}: crl_required but no crl_file configured")
        self.trust = trust
        self.vo = trust.vo
        self.path = Path(trust.ca_file)
        self.loads = 0
        self._key: tuple[int, int, int, int] | None = None
        self.error: str | None = None
        self.load()
        self.crl = _CRL(Path(trust.crl_file) if trust.crl_file is not None else None, trust.crl_required, self)

    def load(self) -> None:
        """(Re)read the CA certificate; ``TrustConfigError`` if it cannot serve as this VO's CA."""
        try:
            st = os.stat(self.path)
            cert = _load_cert_file(self.path)
        except OSError as exc:
            raise TrustConfigError(f"VO {self.vo}: cannot read CA file {self.path}: {exc.strerror}") from None
        except ValueError:
            raise TrustConfigError(f"VO {self.vo}: {self.path} is not a certificate") from None
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise TrustConfigError(f"VO {self.vo}: {self.path} lacks basicConstraints/keyUsage") from None
        except (ValueError, x509.DuplicateExtension) as exc:
            raise TrustConfigError(f"VO {self.vo}: {self.path}: {exc}") from None
        if not bc.ca or not ku.key_cert_sign:
            raise TrustConfigError(f"VO {self.vo}: {self.path} is not a CA certificate")
        try:
            named_vo = parse_certificate(cert).primary_vo
        except AuthRefused as exc:
            raise TrustConfigError(f"VO {self.vo}: {self.path}: {exc}") from None
        if named_vo is not None and named_vo != self.vo:
            raise TrustConfigError(f"{self.path} is the CA of VO {named_vo!r}, configured for VO {self.vo!r}")
        try:
            ssh_blob = ssh_public_blob(cert.public_key())  # type: ignore[arg-type]
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise TrustConfigError(f"VO {self.vo}: unsupported CA key type in {self.path}") from None
        self.cert = cert
        self.subject = cert.subject.rfc4514_string()
        self.subject_der = cert.subject.public_bytes()
        self.ssh_blob = ssh_blob
        self.loads += 1
        self._key = _file_key(st)
        self.error = None
        if hasattr(self, "crl"):
            self.crl.invalidate()  # its signature was checked against the previous certificate

    def refresh(self) -> bool:
        """Re-read the CA file if it changed; True if the certificate (or its usability) changed.

        A CA file that became unreadable or invalid makes this CA unusable (``error`` set) until
        it is fixed, rather than silently keeping the old certificate.
        """
        try:
            key: tuple[int, int, int, int] | None = _file_key(os.stat(self.path))
        except OSError:
            key = None
        if key == self._key and key is not None:
            return False
        try:
            self.load()
        except TrustConfigError as exc:
            changed = self.error is None
            self._key, self.error = key, str(exc)
            return changed
        return True

    def check_validity(self, now: datetime, skew: timedelta) -> None:
        """Refuse when the CA certificate itself is outside its validity window."""
        _check_window(self.cert.not_valid_before_utc, self.cert.not_valid_after_utc, now, skew, f"CA certificate of VO {self.vo}")


def _check_window(not_before: datetime, not_after: datetime, now: datetime, skew: timedelta, what: str) -> None:
    """Refuse ``not-yet-valid``/``expired`` when ``now`` is outside the window widened by ``skew``."""
    if now < not_before - skew:
        raise AuthRefused("not-yet-valid", f"{what} is not valid before {_fmt(not_before)}")
    if now > not_after + skew:
        raise AuthRefused("expired", f"{what} expired at {_fmt(not_after)}")


def _leaf_public_key(leaf: x509.Certificate) -> object:
    """The leaf's public key, or a refusal when it does not load (off-curve, unknown curve)."""
    try:
        return leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuthRefused("weak-key", f"certificate public key is unusable: {exc}") from None


def _check_public_key(key: object) -> None:
    """Refuse keys weaker than RSA 2048 / EC P-256, and key types we do not accept at all."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AuthRefused("weak-key", f"RSA key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in STRONG_CURVES:
            raise AuthRefused("weak-key", f"elliptic curve {key.curve.name} is not accepted (P-256/384/521 only)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise AuthRefused("weak-key", f"unsupported key type {type(key).__name__}")


def _check_x509_usage(exts: x509.Extensions) -> None:
    """Refuse unknown critical extensions (RFC 5280) and usages unfit for a client login."""
    for ext in exts:
        if ext.critical and ext.oid not in UNDERSTOOD_CRITICAL and not ext.oid.dotted_string.startswith(XOS_ARC + "."):
            raise AuthRefused("invalid-attributes", f"unsupported critical extension {ext.oid.dotted_string}")
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise AuthRefused("wrong-usage", "a CA certificate cannot be used to log in")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise AuthRefused("wrong-usage", "keyUsage does not allow digitalSignature")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise AuthRefused("wrong-usage", "extendedKeyUsage does not include clientAuth")
    except x509.ExtensionNotFound:
        pass


class Verifier:
    """Verify credentials against per-VO trusted CAs; see the module docstring for the rules.

    Several trusts may name the same VO (CA rollover). Construction loads every CA certificate
    and raises :class:`TrustConfigError` if one is unusable; CRLs are loaded on first use.
    """

    def __init__(self, trusts: Iterable[VOTrust], clock_skew: timedelta = DEFAULT_CLOCK_SKEW) -> None:
        self.clock_skew = clock_skew
        self._trusts = tuple(trusts)
        self._cas: list[_CA] = [_CA(t) for t in self._trusts]
        self._index()

    def _index(self) -> None:
        by_subject: dict[bytes, list[_CA]] = {}
        by_ssh_key: dict[bytes, list[_CA]] = {}
        for ca in self._cas:
            if ca.error is None:
                by_subject.setdefault(ca.subject_der, []).append(ca)
                by_ssh_key.setdefault(ca.ssh_blob, []).append(ca)
        self._by_subject, self._by_ssh_key = by_subject, by_ssh_key

    def _refresh(self) -> None:
        if any([ca.refresh() for ca in self._cas]):
            self._index()

    @property
    def vos(self) -> frozenset[str]:
        """The VOs this verifier trusts a CA for."""
        return frozenset(t.vo for t in self._trusts)

    def reload(self) -> None:
        """Re-read every CA certificate and CRL now (e.g. on SIGHUP).

        Raises :class:`TrustConfigError` and keeps the previous state if a CA file is unusable.
        """
        fresh = [_CA(t) for t in self._trusts]
        self._cas = fresh
        self._index()

    # --- X.509 -----------------------------------------------------------------------------

    def verify_x509_chain(self, chain: Sequence[bytes], now: datetime | None = None) -> VOIdentity:
        """Verify an XOS-cert (``chain``: DER certificates, leaf first) and return its identity."""
        now = _utc(now)
        if not chain:
            raise AuthRefused("bad-encoding", "empty certificate chain")
        try:
            leaf = x509.load_der_x509_certificate(bytes(chain[0]))
        except (ValueError, x509.InvalidVersion):
            raise AuthRefused("bad-encoding", "certificate is not valid DER X.509") from None
        attrs = parse_certificate(leaf)  # strict; also surfaces duplicate extensions
        try:
            sig_hash = leaf.signature_hash_algorithm
        except UnsupportedAlgorithm:
            raise AuthRefused("bad-signature", "unsupported signature algorithm") from None
        if sig_hash is not None and not isinstance(sig_hash, STRONG_HASHES):
            raise AuthRefused("weak-key", f"signature hash {sig_hash.name} is too weak")
        if attrs.primary_vo is None:
            raise AuthRefused("missing-attributes", "certificate has no GlobalPrimaryVOName (1.34.5.0.14.1)")
        self._refresh()
        ca = self._x509_signer(leaf, attrs.primary_vo)
        ca.check_validity(now, self.clock_skew)
        _check_window(leaf.not_valid_before_utc, leaf.not_valid_after_utc, now, self.clock_skew, "certificate")
        _check_public_key(_leaf_public_key(leaf))
        _check_x509_usage(leaf.extensions)
        ca.crl.check(leaf.serial_number, now)
        if attrs.user_id is None:
            raise AuthRefused("service-certificate", "certificate has no GlobalUserID: a service certificate cannot log in")
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [attrs.user_id]:
            raise AuthRefused(
                "invalid-attributes",
                f"subject CN {', '.join(map(str, cns)) or '(none)'} does not repeat GlobalUserID {attrs.user_id}",
            )
        return VOIdentity(
            vo=ca.vo,
            user=attrs.user_id,
            groups=attrs.groups,
            role=attrs.role,
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc,
            issuer=ca.subject,
            key_fingerprint=key_fingerprint(_leaf_public_key(leaf)),  # type: ignore[arg-type]
        )

    def _x509_signer(self, leaf: x509.Certificate, vo: str) -> _CA:
        """The trusted CA that signed ``leaf`` for ``vo``; refuses unknown-ca/bad-signature/vo-mismatch."""
        try:
            issuer_der = leaf.issuer.public_bytes()
        except ValueError:  # e.g. a CN that is not valid UTF8String: parsed lazily, here
            raise AuthRefused("bad-encoding", "certificate issuer name is not valid DER") from None
        candidates = self._by_subject.get(issuer_der, [])
        if not candidates:
            raise AuthRefused("unknown-ca", f"issuer {leaf.issuer.rfc4514_string()} is not a trusted VO CA")
        signers = []
        for ca in candidates:
            try:
                leaf.verify_directly_issued_by(ca.cert)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            signers.append(ca)
        if not signers:
            raise AuthRefused("bad-signature", f"signature does not verify against the CA {candidates[0].subject}")
        for ca in signers:
            if ca.vo == vo:
                return ca
        raise AuthRefused("vo-mismatch", f"certificate names VO {vo!r} but was issued by the CA of VO {signers[0].vo!r}")

    # --- OpenSSH ---------------------------------------------------------------------------

    def verify_openssh_cert(self, blob: bytes, now: datetime | None = None) -> VOIdentity:
        """Verify an OpenSSH user certificate (SSH wire blob) and return its identity."""
        now = _utc(now)
        cert = sshcert.parse_certificate(bytes(blob))  # bad-encoding / bad-signature (own key)
        if cert.cert_type != sshcert.CERT_TYPE_USER:
            raise AuthRefused("wrong-usage", "not an OpenSSH user certificate (host certificate?)")
        if cert.signature_algorithm not in sshcert.ACCEPTED_SIGNATURE_ALGORITHMS:
            raise AuthRefused("weak-key", f"CA signature algorithm {cert.signature_algorithm} is not accepted")
        if cert.critical_options:
            names = ", ".join(sorted(cert.critical_options))
            raise AuthRefused("invalid-attributes", f"unsupported critical option(s): {names}")
        attrs = parse_ssh_extensions(cert.extensions)
        if attrs.vo is None:
            raise AuthRefused("missing-attributes", "OpenSSH certificate has no vo@xos extension")
        self._refresh()
        cas = self._by_ssh_key.get(cert.ca_key_blob, [])
        if not cas:
            raise AuthRefused("unknown-ca", f"signed by {ssh_fingerprint(cert.ca_key_blob)}, not a trusted VO CA key")
        ca = next((c for c in cas if c.vo == attrs.vo), None)
        if ca is None:
            raise AuthRefused("vo-mismatch", f"certificate names VO {attrs.vo!r} but was signed by the CA of VO {cas[0].vo!r}")
        ca.check_validity(now, self.clock_skew)
        if cert.valid_before > _MAX_TIMESTAMP:
            raise AuthRefused("invalid-attributes", "OpenSSH certificate has no expiry (valid forever)")
        if cert.valid_after > cert.valid_before:
            raise AuthRefused("invalid-attributes", "OpenSSH certificate becomes valid after it expires")
        not_before = datetime.fromtimestamp(cert.valid_after, UTC)
        not_after = datetime.fromtimestamp(cert.valid_before, UTC)
        _check_window(not_before, not_after, now, self.clock_skew, "OpenSSH certificate")
        algorithm = bytes(cert.key.algorithm)
        if algorithm == b"ssh-rsa":
            _check_public_key(cert.key.pyca_key)
        elif algorithm not in STRONG_SSH_KEYS:
            raise AuthRefused("weak-key", f"key type {algorithm.decode('ascii', 'replace')} is not accepted")
        ca.crl.check(cert.serial, now)
        user, at, id_vo = cert.key_id.rpartition("@")
        if not at or id_vo != attrs.vo:
            raise AuthRefused("invalid-attributes", f"key id {cert.key_id!r} is not USER@{attrs.vo}")
        USER_RULE.check(user, "key id")
        if user not in cert.principals:
            raise AuthRefused("invalid-attributes", f"principals {list(cert.principals)} do not include the user {user!r}")
        return VOIdentity(
            vo=ca.vo,
            user=user,
            groups=dedupe(attrs.groups),
            role=attrs.role,
            serial=cert.serial,
            not_after=not_after,
            issuer=ca.subject,
            key_fingerprint=ssh_fingerprint(cert.key_blob),
        )

    # --- live connections ------------------------------------------------------------------

    def revocation_status(self, vo: str, issuer: str, serial: int) -> RevocationStatus:
        """Whether the certificate *serial* that the CA named *issuer* (``VOIdentity.issuer``)
        issued for *vo* is revoked now, for connections that logged in earlier.

        The same CRL code path as a login (a changed CRL file is re-read and re-verified).
        Only a positive answer says ``revoked``: a CRL that is missing, unreadable or badly
        signed, or a CA no longer usable, gives ``known=False`` (the revocations of the last
        good CRL still count); a stale CRL (past nextUpdate) still answers with its list.
        """
        self._refresh()
        cas = [ca for ca in self._cas if ca.vo == vo and ca.subject == issuer and ca.error is None]
        if not cas:
            return RevocationStatus(False, False, f"no usable CA {issuer} for VO {vo}")
        problems = []
        for ca in cas:
            revoked, error = ca.crl.lookup(serial)
            if revoked:
                return RevocationStatus(True, True, f"certificate serial {serial} is revoked by the CA of VO {vo}")
            if error is not None:
                problems.append(error)
        if problems:
            return RevocationStatus(False, False, "; ".join(problems))
        return RevocationStatus(False, True, "")

    # --- introspection for tests and monitoring ---------------------------------------------

    @property
    def load_counts(self) -> dict[str, tuple[int, int]]:
        """Per CA file: (CA certificate loads, CRL loads) -- shows caching at work."""
        return {str(ca.path): (ca.loads, ca.crl.loads) for ca in self._cas}
