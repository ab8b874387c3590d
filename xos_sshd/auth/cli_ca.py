"""``xos-ca``: the VO certificate authority command line.

Subcommands: ``init``, ``issue``, ``revoke``, ``crl`` (re-sign the CRL before its nextUpdate),
``show`` and ``verify``. Library work lives in :mod:`.ca` and :mod:`.verifier`; this module
parses arguments and renders results. Every failure is one line on stderr (``xos-ca: ...``) and
a non-zero exit status (1 for errors and refusals, 2 for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from . import ca as calib
from . import sshcert
from .errors import AuthRefused, TrustConfigError
from .identity import VOIdentity, key_fingerprint, ssh_fingerprint
from .profile import ATTRIBUTES, BY_OID, SSH_EXT_GROUPS, SSH_EXT_ROLE, SSH_EXT_VO
from .profile import certificate_extensions, decode_ssh_extension_data, parse_value
from .verifier import Verifier, VOTrust

PROG = "xos-ca"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _fmt(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise calib.CAError(f"cannot read {path}: {exc.strerror}") from None


def _is_openssh_cert(data: bytes) -> bool:
    return b"-cert-v01@openssh.com" in data.lstrip().split(b"\n", 1)[0]


def _load_pem_chain(data: bytes, path: Path) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise calib.CAError(f"{path} is not a certificate") from None
    return certs


def _describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA {key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"ECDSA {key.curve.name}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "Ed25519"
    else:
        return type(key).__name__
    return f"{kind} {key_fingerprint(key)}"  # type: ignore[arg-type]


# --- show ---------------------------------------------------------------------------------------


def describe_x509(cert: x509.Certificate) -> list[str]:
    """Human-readable lines for an X.509 certificate and its XOS attributes."""
    lines = [
        "type:       X.509 certificate",
        f"subject:    {cert.subject.rfc4514_string()}",
        f"issuer:     {cert.issuer.rfc4514_string()}",
        f"serial:     {cert.serial_number}",
        f"valid:      {_fmt(cert.not_valid_before_utc)} .. {_fmt(cert.not_valid_after_utc)}",
        f"key:        {_describe_key(cert.public_key())}",
    ]
    try:
        exts = certificate_extensions(cert)
    except AuthRefused as exc:
        raise calib.CAError(f"{exc.reason}: {exc}") from None
    usage = []
    for ext in exts:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            usage.append("CA")
        elif isinstance(ext.value, x509.KeyUsage):
            usage += [n for n in ("digital_signature", "key_cert_sign", "crl_sign") if getattr(ext.value, n)]
        elif isinstance(ext.value, x509.ExtendedKeyUsage):
            usage += [getattr(oid, "_name", oid.dotted_string) for oid in ext.value]
    lines.append(f"usage:      {', '.join(usage) or '-'}")
    found = False
    for ext in exts:
        attr = BY_OID.get(ext.oid)
        if attr is None:
            continue
        found = True
        try:
            value = parse_value(attr, ext.value.value)  # type: ignore[attr-defined]
            text = ",".join(value) if isinstance(value, tuple) else value
        except AuthRefused as exc:
            text = f"<invalid: {exc}>"
        flag = " [CRITICAL]" if ext.critical else ""
        lines.append(f"{attr.name + ':':<27} {text}{flag}")
    if not found:
        lines.append("XOS attributes: none")
    elif not any(e.oid == ATTRIBUTES[2].oid for e in exts):
        lines.append("GlobalUserID absent: service certificate (cannot log in)")
    return lines


def describe_openssh(blob: bytes) -> list[str]:
    """Human-readable lines for an OpenSSH certificate and its XOS extensions."""
    try:
        cert = sshcert.parse_certificate(blob)
    except AuthRefused as exc:
        raise calib.CAError(f"{exc.reason}: {exc}") from None
    kind = {sshcert.CERT_TYPE_USER: "user", sshcert.CERT_TYPE_HOST: "host"}.get(cert.cert_type, "unknown")
    lines = [
        f"type:       OpenSSH {kind} certificate ({cert.algorithm})",
        f"key id:     {cert.key_id}",
        f"serial:     {cert.serial}",
        f"principals: {', '.join(cert.principals) or '(any)'}",
        f"valid:      {cert.valid_after} .. {cert.valid_before}"
        if cert.valid_before > 253402300799
        else f"valid:      {_fmt(datetime.fromtimestamp(cert.valid_after, UTC))} .. "
        f"{_fmt(datetime.fromtimestamp(cert.valid_before, UTC))}",
        f"key:        {ssh_fingerprint(cert.key_blob)}",
        f"signing CA: {ssh_fingerprint(cert.ca_key_blob)} ({cert.signature_algorithm})",
        f"critical:   {', '.join(sorted(cert.critical_options)) or '(none)'}",
        f"extensions: {', '.join(n for n in cert.extensions if not n.endswith('@xos')) or '(none)'}",
    ]
    for name in (SSH_EXT_VO, SSH_EXT_GROUPS, SSH_EXT_ROLE):
        if name in cert.extensions:
            try:
                text = decode_ssh_extension_data(name, cert.extensions[name])
            except AuthRefused as exc:
                text = f"<invalid: {exc}>"
            lines.append(f"{name + ':':<11} {text}")
    return lines


def describe_crl(data: bytes, path: Path) -> list[str]:
    """Human-readable lines for a CRL."""
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        raise calib.CAError(f"{path} is not a valid CRL") from None
    nxt = crl.next_update_utc
    lines = [
        "type:        X.509 CRL",
        f"issuer:      {crl.issuer.rfc4514_string()}",
        f"last update: {_fmt(crl.last_update_utc)}",
        f"next update: {_fmt(nxt) if nxt else '-'}",
        f"revoked:     {len(crl)}",
    ]
    lines += [f"  serial {rc.serial_number} at {_fmt(rc.revocation_date_utc)}" for rc in crl]
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = _read(path)
    if _is_openssh_cert(data):
        try:
            lines = describe_openssh(sshcert.read_certificate_file(data))
        except AuthRefused as exc:
            raise calib.CAError(f"{path}: {exc}") from None
    elif b"BEGIN X509 CRL" in data:
        lines = describe_crl(data, path)
    else:
        lines = describe_x509(_load_pem_chain(data, path)[0])
    print("\n".join(lines))
    return 0


# --- verify -------------------------------------------------------------------------------------


def identity_lines(identity: VOIdentity) -> list[str]:
    """Human-readable lines for a verified identity."""
    return [
        f"vo:          {identity.vo}",
        f"user:        {identity.user}",
        f"groups:      {','.join(identity.groups) or '-'}",
        f"role:        {identity.role or '-'}",
        f"serial:      {identity.serial}",
        f"not after:   {_fmt(identity.not_after)}",
        f"issuer:      {identity.issuer}",
        f"key:         {identity.key_fingerprint}",
    ]


def cmd_verify(args: argparse.Namespace) -> int:
    paths = calib.CAPaths(Path(args.dir))
    if not paths.cert.exists():
        raise calib.CAError(f"no CA in {paths.directory} (missing {calib.CA_CERT_FILE})")
    vo = calib.ca_vo(calib.load_ca_certificate(paths.cert))
    try:
        verifier = Verifier([VOTrust(vo, paths.cert, paths.crl, crl_required=not args.no_crl)])
    except TrustConfigError as exc:
        raise calib.CAError(str(exc)) from None
    path = Path(args.cert)
    data = _read(path)
    try:
        if _is_openssh_cert(data):
            identity = verifier.verify_openssh_cert(sshcert.read_certificate_file(data))
        else:
            try:
                if b"-----BEGIN" in data:
                    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(data)]
                else:
                    chain = [data]
            except ValueError:
                raise AuthRefused("bad-encoding", f"{path} is not a certificate") from None
            identity = verifier.verify_x509_chain(chain)
    except AuthRefused as exc:
        print(f"{PROG}: refused: {exc.reason}: {exc}", file=sys.stderr)
        return 1
    print("\n".join([f"ok:          {identity.user}@{identity.vo}", *identity_lines(identity)]))
    return 0


# --- init / issue / revoke / crl ----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    ca = calib.init_ca(args.dir, args.vo, days=args.days)
    print(f"created CA for VO {ca.vo} in {ca.paths.directory}: {ca.subject}, valid until {_fmt(ca.cert.not_valid_after_utc)}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    ca = calib.CertificateAuthority.load(args.dir)
    cred = calib.issue(
        ca,
        args.user,
        args.out,
        groups=args.group or (),
        role=args.role,
        hours=args.hours,
        key_type=args.key_type,
        rsa_bits=args.rsa_bits,
    )
    print(f"issued {args.user}@{ca.vo} serial {cred.serial}, valid until {_fmt(cred.cert.not_valid_after_utc)}")
    for p in (cred.cert_path, cred.key_path, cred.ssh_cert_path):
        print(f"  {p}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    ca = calib.CertificateAuthority.load(args.dir)
    serial = calib.serial_issued_by(ca, args.cert)
    if calib.revoke_serial(ca, serial, days=args.crl_days):
        print(f"revoked serial {serial}; {ca.paths.crl} updated")
    else:
        print(f"serial {serial} was already revoked")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    ca = calib.CertificateAuthority.load(args.dir)
    count = calib.refresh_crl(ca, days=args.days)
    print(f"re-signed {ca.paths.crl} ({count} revoked), next update in {args.days} days")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _rsa_bits(text: str) -> int:
    value = _positive_int(text)
    if value < calib.MIN_RSA_BITS:
        raise argparse.ArgumentTypeError(f"RSA keys need at least {calib.MIN_RSA_BITS} bits")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``xos-ca`` argument parser."""
    parser = _Parser(prog=PROG, description="VO certificate authority for xos-sshd (XOS-cert + OpenSSH certificates).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init", help="create a VO CA in DIR", description="Create DIR/ca.pem, DIR/ca.key (0600) and an empty signed DIR/crl.pem for VO.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--vo", required=True, help="the VO this CA speaks for (lowercase name)")
    p.add_argument("--days", type=_positive_int, default=calib.DEFAULT_CA_DAYS, help=f"CA validity in days (default {calib.DEFAULT_CA_DAYS})")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("issue", help="issue a user credential", description="Write PREFIX.pem (XOS-cert), PREFIX.key (0600) and PREFIX-cert.pub (OpenSSH user certificate).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--user", required=True, help="VO user name (GlobalUserID, certificate principal)")
    p.add_argument("--group", action="append", metavar="G", help="VO group; the first is the primary group (repeatable)")
    p.add_argument("--role", help="VO role")
    p.add_argument("--hours", type=_positive_float, default=calib.DEFAULT_CERT_HOURS, help=f"validity in hours (default {calib.DEFAULT_CERT_HOURS})")
    p.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa", help="user key type (default ecdsa P-256)")
    p.add_argument("--rsa-bits", type=_rsa_bits, default=calib.DEFAULT_RSA_BITS, help=f"RSA key size, >= {calib.MIN_RSA_BITS} (default {calib.DEFAULT_RSA_BITS})")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output file prefix")
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("revoke", help="revoke a certificate", description="Add the serial of CERT (PREFIX.pem or PREFIX-cert.pub) to DIR/crl.pem.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("cert", metavar="CERT")
    p.add_argument("--crl-days", type=_positive_int, default=calib.DEFAULT_CRL_DAYS, help=f"nextUpdate of the new CRL in days (default {calib.DEFAULT_CRL_DAYS})")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("crl", help="re-sign the CRL", description="Re-sign DIR/crl.pem with a fresh nextUpdate (run before the old one passes).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--days", type=_positive_int, default=calib.DEFAULT_CRL_DAYS, help=f"nextUpdate in days (default {calib.DEFAULT_CRL_DAYS})")
    p.set_defaults(func=cmd_crl)

    p = sub.add_parser("show", help="print a certificate's attributes", description="Print an X.509 certificate (.pem), an OpenSSH certificate (-cert.pub) or a CRL.")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="verify a certificate against the CA", description="Verify CERT (.pem or -cert.pub) as the gateway would; print the identity or the reason for refusal.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("cert", metavar="CERT")
    p.add_argument("--no-crl", action="store_true", help="do not require a usable CRL (revocations in a readable CRL still apply)")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xos-ca`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except calib.CAError as exc:
        print(f"{PROG}: {args.command}: {exc}", file=sys.stderr)
    except AuthRefused as exc:
        print(f"{PROG}: {args.command}: {exc.reason}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, never a traceback
        print(f"{PROG}: {args.command}: unexpected error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
    return 1

if __name__ == "__main__":
    sys.exit(main())
