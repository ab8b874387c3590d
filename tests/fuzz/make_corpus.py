"""Regenerate the checked-in fuzz seed corpus (``tests/fuzz_corpus/``).

    .venv/bin/python tests/fuzz/make_corpus.py            # rewrite every generated file

The corpus is checked in so fuzz runs are reproducible and the seeds survive refactors; run
this only when a format changes (keys are fresh each time, so every blob changes).  What each
directory holds, and the fixed challenge parameters, are in ``tests/fuzz_corpus/README.md``.

Real artefacts come from the real tools: X.509 XOS-certs and OpenSSH certificates from
``xos-ca init`` / ``xos-ca issue`` (ECDSA CA), plus RSA and Ed25519 CAs through the same
library call (``init_ca(key=...)``) because the CLI only makes ECDSA CAs.  Edge cases are
built by hand next to them.  Files named ``finding-*`` reproduce open fuzz findings: the
ordinary property tests skip them, the ``test_finding_*`` tests use them.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from xos_sshd.auth import profile, sshcert
from xos_sshd.auth.ca import init_ca, issue
from xos_sshd.auth.challenge import sign_challenge
from xos_sshd.auth.profile import XOSAttributes, encode_bit_string_value, encode_value

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "fuzz_corpus"
VENV_BIN = Path(sys.executable).parent

#: The challenge every corpus answer is signed for (README.md repeats them).
CHALLENGE_NONCE = b"xos-fuzz-corpus-nonce-0123456789"
CHALLENGE_SERVICE = "sshd"
CHALLENGE_USER = "alice"


def _write(target: str, name: str, data: bytes | str) -> None:
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


# --- XOS attribute extension values (DER) -------------------------------------------------------


def attr_values() -> None:
    t = "xos_attr_value"
    valid = {
        1: "dev", 2: "dev,physics.eu,lab-2", 3: "alice@example.org", 4: "users",
        5: "staff,admins,ops_2", 6: "worker", 7: "grid,hpc", 8: "sub.a,sub-b",
    }
    for n, text in valid.items():
        _write(t, f"attr{n}-octet.der", encode_value(text))
        _write(t, f"attr{n}-bitstring.der", encode_bit_string_value(text))
    _write(t, "multi-empty-octet.der", encode_value(""))
    _write(t, "multi-empty-bitstring.der", encode_bit_string_value(""))
    _write(t, "vo-max-31.der", encode_value("v" + "o" * 30))
    _write(t, "vo-32-too-long.der", encode_value("v" * 32))
    _write(t, "user-max-64.der", encode_value("u" * 64))
    _write(t, "user-65-too-long.der", encode_value("u" * 65))
    _write(t, "long-form-0x81.der", encode_value("a" * 200))  # 04 81 c8 ...
    _write(t, "long-form-0x82.der", encode_value(",".join(["g"] * 200)))  # 04 82 01 8f ...
    _write(t, "max-4096-bytes.der", encode_value("a" * 4096))
    _write(t, "over-4096-bytes.der", encode_value("a" * 4097))
    _write(t, "bitstring-empty-content.der", b"\x03\x00")
    _write(t, "bitstring-unused-bits.der", b"\x03\x04\x03dev")
    _write(t, "bitstring-constructed.der", _tlv(0x23, _tlv(0x03, b"\x00dev")))
    _write(t, "octet-constructed.der", _tlv(0x24, _tlv(0x04, b"dev")))
    _write(t, "utf8string.der", _tlv(0x0C, b"dev"))
    _write(t, "ia5string.der", _tlv(0x16, b"dev"))
    _write(t, "sequence.der", _tlv(0x30, encode_value("dev")))
    _write(t, "null.der", b"\x05\x00")
    _write(t, "nonminimal-long-short.der", b"\x04\x81\x03dev")
    _write(t, "nonminimal-leading-zero.der", b"\x04\x82\x00\x03dev")
    _write(t, "indefinite-length.der", b"\x04\x80dev\x00\x00")
    _write(t, "length-5-bytes.der", b"\x04\x85\x00\x00\x00\x00\x03dev")
    _write(t, "length-overflow-4-bytes.der", b"\x04\x84\xff\xff\xff\xffdev")
    _write(t, "truncated.der", b"\x04\x05dev")
    _write(t, "trailing-data.der", b"\x04\x03devX")
    _write(t, "one-byte.der", b"\x04")
    _write(t, "empty.der", b"")
    _write(t, "bad-utf8.der", _tlv(0x04, b"de\xffv"))
    _write(t, "overlong-utf8-slash.der", _tlv(0x04, b"a\xc0\xafb"))
    _write(t, "utf8-surrogate.der", _tlv(0x04, b"a\xed\xa0\x80b"))
    _write(t, "unicode-name.der", encode_value("d\u00e9v"))
    _write(t, "fullwidth-digit.der", encode_value("dev\uff11"))
    _write(t, "trailing-newline.der", encode_value("dev\n"))
    _write(t, "nul-inside.der", encode_value("de\x00v"))
    _write(t, "comma-empty-item.der", encode_value("a,,b"))
    _write(t, "comma-leading.der", encode_value(",a"))
    _write(t, "comma-trailing.der", encode_value("a,"))
    _write(t, "comma-only.der", encode_value(","))
    _write(t, "space-after-comma.der", encode_value("a, b"))
    _write(t, "uppercase-vo.der", encode_value("Dev"))
    _write(t, "leading-dot.der", encode_value(".dev"))
    _write(t, "leading-dash.der", encode_value("-dev"))
    _write(t, "path-traversal.der", encode_value("../etc"))


# --- XOS-certs (X.509 DER) and OpenSSH certificates ---------------------------------------------


def _self_signed(key, cn: str = "alice") -> x509.Certificate:
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(now).not_valid_after(now + timedelta(days=3650))
        .sign(key, algorithm)
    )


def _leaf_with(ca, xos: list[tuple[x509.ObjectIdentifier, bytes, bool]], cn: str = "alice") -> bytes:
    """A leaf under ``ca`` whose XOS extensions are exactly ``xos`` (oid, DER value, critical)."""
    now = datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.vo),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(4242)
        .not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    for oid, value, critical in xos:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=critical)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _with_duplicate(ca) -> bytes:
    """A leaf carrying GlobalUserID twice (cryptography will not build it: rename an OID)."""
    attrs = XOSAttributes(primary_vo=ca.vo, user_id="alice", primary_group="users")
    exts = [(e.oid, e.value, False) for e in attrs.to_extensions()]
    der = _leaf_with(ca, exts + [(x509.ObjectIdentifier("1.34.5.0.14.9"), b"\x04\x07mallory", False)])
    placeholder, target = bytes.fromhex("06054a05000e09"), bytes.fromhex("06054a05000e03")
    assert der.count(placeholder) == 1
    return der.replace(placeholder, target)  # signature now broken; parse_certificate does not care


def _version_4(der: bytes) -> bytes:
    """``der`` with its version field ([0] INTEGER 2, i.e. v3) set to 3."""
    assert der.count(b"\xa0\x03\x02\x01\x02") == 1
    return der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03")


def certificates(work: Path) -> None:
    subprocess.run([str(VENV_BIN / "xos-ca"), "init", str(work / "ca-ec"), "--vo", "dev"],
                   check=True, stdout=subprocess.DEVNULL)
    creds = {
        "ecdsa": ["--group", "users", "--group", "staff", "--role", "worker"],
        "rsa": ["--key-type", "rsa", "--group", "users"],
        "nogroups": [],
    }
    for name, extra in creds.items():
        subprocess.run([str(VENV_BIN / "xos-ca"), "issue", str(work / "ca-ec"), "--user", "alice",
                        "--out", str(work / name), *extra], check=True, stdout=subprocess.DEVNULL)
        pem = (work / f"{name}.pem").read_bytes()
        _write("xos_cert", f"xosca-{name}.der", x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))
        line = (work / f"{name}-cert.pub").read_bytes()
        _write("ssh_cert_file", f"xosca-{name}-cert.pub", line)
        _write("ssh_cert", f"xosca-{name}.bin", sshcert.read_certificate_file(line))
    ca_cert = x509.load_pem_x509_certificate((work / "ca-ec" / "ca.pem").read_bytes())
    _write("xos_cert", "xosca-ca-cert.der", ca_cert.public_bytes(serialization.Encoding.DER))

    for label, key in (("rsa", rsa.generate_private_key(65537, 2048)), ("ed25519", ed25519.Ed25519PrivateKey.generate())):
        ca = init_ca(work / f"ca-{label}", "physics", key=key)
        cred = issue(ca, "bob", work / f"bob-{label}", groups=["cern", "atlas"], role="shifter", key_type="ecdsa")
        _write("xos_cert", f"ca-{label}-leaf.der", cred.cert.public_bytes(serialization.Encoding.DER))
        _write("ssh_cert", f"ca-{label}-leaf.bin", cred.ssh_cert)

    ca = init_ca(work / "ca-edge", "dev")
    oid = {a.name: a.oid for a in profile.ATTRIBUTES}
    base = [(oid["GlobalPrimaryVOName"], encode_value("dev"), False),
            (oid["GlobalUserID"], encode_value("alice"), False)]
    every = [(a.oid, encode_value({True: "a,b", False: "dev" if "VO" in a.name else "alice"}[a.multi]), False)
             for a in profile.ATTRIBUTES]
    _write("xos_cert", "all-eight-attributes.der", _leaf_with(ca, every))
    _write("xos_cert", "bitstring-values.der", _leaf_with(ca, [(oid["GlobalPrimaryVOName"], encode_bit_string_value("dev"), False),
                                                                (oid["GlobalUserID"], encode_bit_string_value("alice"), False)]))
    _write("xos_cert", "critical-userid.der", _leaf_with(ca, [base[0], (base[1][0], base[1][1], True)]))
    _write("xos_cert", "unknown-arc-noncritical.der", _leaf_with(ca, base + [(x509.ObjectIdentifier("1.34.5.0.14.99"), b"\x05\x00", False)]))
    _write("xos_cert", "unknown-arc-critical.der", _leaf_with(ca, base + [(x509.ObjectIdentifier("1.34.5.0.14.99"), b"\x05\x00", True)]))
    _write("xos_cert", "service-cert-no-userid.der", _leaf_with(ca, base[:1]))
    _write("xos_cert", "no-xos-extensions.der", _leaf_with(ca, []))
    _write("xos_cert", "bad-utf8-userid.der", _leaf_with(ca, [base[0], (base[1][0], _tlv(0x04, b"al\xffice"), False)]))
    _write("xos_cert", "wrong-type-userid.der", _leaf_with(ca, [base[0], (base[1][0], _tlv(0x0C, b"alice"), False)]))
    _write("xos_cert", "duplicate-userid.der", _with_duplicate(ca))
    # FUZZ-5: an issuer name that is not valid UTF8String (no CA signature needed to reach it)
    leaf = _leaf_with(ca, base)
    _write("xos_cert", "finding-FUZZ-5-bad-utf8-issuer.der", leaf.replace(b"\x0c\tdev VO CA", b"\x0c\t\xe4ev VO CA", 1))
    # FUZZ-6: X.509 version field 3 (a "v4" certificate): the loader raises InvalidVersion
    _write("xos_cert", "finding-FUZZ-6-x509-version-4.der", _version_4(leaf))

    # OpenSSH certificates with odd but well-signed XOS extensions (bytes are written as given)
    ssh_ca = ca.ssh_key()
    user_key = __import__("asyncssh").generate_private_key("ssh-ed25519")
    odd = {
        "ext-empty-groups": {"vo@xos": "dev", "groups@xos": ""},
        "ext-duplicate-groups": {"vo@xos": "dev", "groups@xos": "users,users,staff"},
        "ext-bad-utf8-vo": {"vo@xos": b"d\xffv"},
        "ext-raw-not-string": {"vo@xos": "dev", "role@xos": b""},
        "ext-no-vo": {"groups@xos": "users"},
        "ext-role-comma": {"vo@xos": "dev", "role@xos": "a,b"},
    }
    for name, exts in odd.items():
        blob = sshcert.build_user_certificate(
            ssh_ca, user_key, serial=77, key_id="alice@dev", principals=["alice"],
            valid_after=0, valid_before=2**63, xos_extensions=exts)
        _write("ssh_cert", f"{name}.bin", blob)
    blob = sshcert.build_user_certificate(
        ssh_ca, user_key, serial=78, key_id="alice@dev", principals=["alice", "bob", ""],
        valid_after=0, valid_before=1, xos_extensions={"vo@xos": "dev"}, permits=())
    _write("ssh_cert", "many-principals-no-permits.bin", blob)
    good = (CORPUS / "ssh_cert" / "xosca-ecdsa.bin").read_bytes()
    _write("ssh_cert", "truncated-half.bin", good[: len(good) // 2])
    _write("ssh_cert", "trailing-byte.bin", good + b"\x00")
    _write("ssh_cert", "plain-key-not-cert.bin", bytes(user_key.public_data))
    _write("ssh_cert", "x509-der-not-ssh.bin", (CORPUS / "xos_cert" / "xosca-ecdsa.der").read_bytes())
    _write("ssh_cert", "huge-length.bin", b"\xff\xff\xff\xff" + b"ssh-ed25519-cert-v01@openssh.com")
    _write("ssh_cert_file", "comment-then-cert.pub", b"# a comment\n\n" + (CORPUS / "ssh_cert_file" / "xosca-ecdsa-cert.pub").read_bytes())
    _write("ssh_cert_file", "bad-base64.pub", b"ssh-ed25519-cert-v01@openssh.com AAAA*AAA alice\n")
    _write("ssh_cert_file", "algorithm-mismatch.pub", b"ssh-rsa-cert-v01@openssh.com " + base64.b64encode(good) + b"\n")
    _write("ssh_cert_file", "one-field.pub", b"ssh-ed25519-cert-v01@openssh.com\n")
    _write("ssh_cert_file", "empty.pub", b"")


# --- challenge answers ---------------------------------------------------------------------------


def _answer_of(doc: object) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode("utf-8")).decode("ascii")


def _unknown_curve(cert: x509.Certificate) -> bytes:
    """PEM of ``cert`` with its named curve changed to OID 0.16.840.10045.3.1.7 (found by atheris)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    assert der.count(p256) == 1
    bad = der.replace(p256, bytes.fromhex("0608108648ce3d030107"))
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"


def _off_curve(cert: x509.Certificate) -> bytes:
    """PEM of ``cert`` with one byte of its P-256 public point changed (point off the curve)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    i = der.index(p256) + len(p256) + 3 + 1 + 5  # BIT STRING header, unused-bits, 0x04, 4 bytes in
    bad = der[:i] + bytes([der[i] ^ 0x55]) + der[i + 1:]
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"


def answers() -> None:
    t = "challenge_answer"
    args = (CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_pem = _self_signed(ec_key).public_bytes(serialization.Encoding.PEM)
    rsa_pem = _self_signed(rsa_key).public_bytes(serialization.Encoding.PEM)
    ca_pem = _self_signed(ec.generate_private_key(ec.SECP384R1()), "Some CA").public_bytes(serialization.Encoding.PEM)
    _write(t, "ec-valid.txt", sign_challenge(ec_key, ec_pem, *args))
    _write(t, "rsa-valid.txt", sign_challenge(rsa_key, rsa_pem, *args))
    _write(t, "ec-with-ca-valid.txt", sign_challenge(ec_key, ec_pem + ca_pem, *args))
    _write(t, "ec-8-certs-valid.txt", sign_challenge(ec_key, ec_pem + ca_pem * 7, *args))
    _write(t, "ec-9-certs.txt", sign_challenge(ec_key, ec_pem + ca_pem * 8, *args))
    _write(t, "ec-wrong-user.txt", sign_challenge(ec_key, ec_pem, CHALLENGE_NONCE, CHALLENGE_SERVICE, "bob"))
    _write(t, "ec-key-of-other-cert.txt", sign_challenge(ec_key, rsa_pem, *args))
    _write(t, "crlf-wrapped.txt", sign_challenge(ec_key, ec_pem, *args) + "\r\n")
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_pem = _self_signed(ed_key).public_bytes(serialization.Encoding.PEM)
    _write(t, "ed25519-leaf-weak-key.txt", _answer_of({"chain": ed_pem.decode(), "sig": base64.b64encode(b"\0" * 64).decode()}))
    _write(t, "not-base64.txt", "this is not base64!")
    _write(t, "empty.txt", "")
    _write(t, "base64-not-json.txt", base64.b64encode(b"hello").decode())
    _write(t, "json-list.txt", _answer_of(["chain", "sig"]))
    _write(t, "json-missing-sig.txt", _answer_of({"chain": ec_pem.decode()}))
    _write(t, "json-sig-not-string.txt", _answer_of({"chain": ec_pem.decode(), "sig": 5}))
    _write(t, "json-chain-not-pem.txt", _answer_of({"chain": "hello", "sig": "AAAA"}))
    _write(t, "json-chain-non-ascii.txt", _answer_of({"chain": "h\u00e9llo", "sig": "AAAA"}))
    _write(t, "json-sig-bad-base64.txt", _answer_of({"chain": ec_pem.decode(), "sig": "A*AA"}))
    _write(t, "json-bad-utf8.txt", base64.b64encode(b'{"chain":"\xff","sig":""}').decode())
    _write(t, "json-nan.txt", base64.b64encode(b'{"chain":NaN,"sig":""}').decode())
    _write(t, "json-duplicate-keys.txt", base64.b64encode(b'{"chain":"x","sig":"AAAA","chain":"y"}').decode())
    # open findings (see README.md): the documented refusal is ChallengeError, these escape it
    _write(t, "finding-FUZZ-1-deep-json-nesting.txt", base64.b64encode(b"[" * 30000).decode())
    v4 = _version_4(_self_signed(ec_key).public_bytes(serialization.Encoding.DER))
    _write(t, "finding-FUZZ-6-x509-version-4.txt", _answer_of({
        "chain": (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(v4) + b"-----END CERTIFICATE-----\n").decode(),
        "sig": base64.b64encode(b"\0" * 70).decode()}))
    _write(t, "finding-FUZZ-2-unknown-curve-oid.txt",
           _answer_of({"chain": _unknown_curve(_self_signed(ec_key)).decode(), "sig": base64.b64encode(b"\0" * 70).decode()}))
    _write(t, "finding-FUZZ-2-off-curve-ec-point.txt",
           _answer_of({"chain": _off_curve(_self_signed(ec_key)).decode(), "sig": base64.b64encode(b"\0" * 70).decode()}))


# --- control socket streams ---------------------------------------------------------------------


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def control_streams() -> None:
    t = "control_stream"
    _write(t, "one-request.bin", _frame(b'{"op":"pam.challenge","service":"sshd","user":"alice"}'))
    _write(t, "two-requests.bin", _frame(b'{"op":"admin.list"}') + _frame(b'{"op":"ping","n":1}'))
    _write(t, "empty-object.bin", _frame(b"{}"))
    _write(t, "unicode.bin", _frame('{"op":"x","t":"\u00e9\u2603"}'.encode()))
    _write(t, "empty-stream.bin", b"")
    _write(t, "zero-length-frame.bin", _frame(b""))
    _write(t, "header-only-3-bytes.bin", b"\x00\x00\x00")
    _write(t, "truncated-body.bin", struct.pack(">I", 10) + b"{}")
    _write(t, "too-large-by-one.bin", struct.pack(">I", 64 * 1024 + 1))
    _write(t, "huge-length.bin", b"\xff\xff\xff\xff{}")
    _write(t, "json-array.bin", _frame(b"[]"))
    _write(t, "json-string.bin", _frame(b'"x"'))
    _write(t, "json-null.bin", _frame(b"null"))
    _write(t, "bad-utf8.bin", _frame(b'{"op":"\xff"}'))
    _write(t, "utf8-bom.bin", _frame(b'\xef\xbb\xbf{"op":"x"}'))
    _write(t, "deep-nesting.bin", _frame(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"))
    _write(t, "nan-infinity.bin", _frame(b'{"a":NaN,"b":-Infinity}'))
    _write(t, "duplicate-keys.bin", _frame(b'{"op":"a","op":"b"}'))
    _write(t, "bad-then-good.bin", _frame(b"[1]") + _frame(b'{"op":"x"}'))
    _write(t, "trailing-garbage.bin", _frame(b'{"op":"x"}') + b"\x00\x01")
    _write(t, "lone-surrogate-escape.bin", _frame(b'{"op":"\\ud800"}'))


# --- xos-cr request lines --------------------------------------------------------------------------


def cr_lines() -> None:
    t = "cr_lines"
    ops = [
        {"op": "list"}, {"op": "cr.list"}, {"op": "run", "argv": ["sleep", "60"], "env": {"A": "1"}},
        {"op": "logs", "job": "j0123456789", "max_bytes": 4096}, {"op": "kill", "job": "j0123456789", "signal": "SIGKILL"},
        {"op": "checkpoint", "job": "j0123456789", "stop": True}, {"op": "restart", "image": "i0123456789abcdef", "logs_of": "j0123456789"},
        {"op": "images"}, {"op": "image", "image": "i0123456789abcdef"}, {"op": "rm", "image": "i0123456789abcdef"},
        {"op": "imported", "upload": "job.tar"},
    ]
    _write(t, "every-op.jsonl", "".join(json.dumps(o) + "\n" for o in ops))
    _write(t, "one-list-no-newline.jsonl", '{"op":"list"}')
    _write(t, "crlf.jsonl", '{"op":"list"}\r\n{"op":"images"}\r\n')
    _write(t, "blank-lines.jsonl", '\n\n  \n{"op":"list"}\n\t\n')
    _write(t, "not-json.jsonl", "list\n")
    _write(t, "json-array.jsonl", "[]\n")
    _write(t, "json-number.jsonl", "42\n")
    _write(t, "bad-utf8.jsonl", b'{"op":"\xff"}\n')
    _write(t, "op-not-string.jsonl", '{"op":5}\n{"nop":"list"}\n')
    _write(t, "unknown-op.jsonl", '{"op":"reboot"}\n')
    _write(t, "deep-nesting.jsonl", "[" * 3000 + "\n")
    _write(t, "nul-in-argv.jsonl", '{"op":"run","argv":["a\\u0000b"]}\n')
    _write(t, "bad-fields.jsonl", '{"op":"logs","job":"x","max_bytes":true}\n{"op":"kill","job":"j0123456789","signal":"STOP"}\n'
           '{"op":"checkpoint","job":"j0123456789","stop":"yes"}\n{"op":"run","argv":[]}\n{"op":"run","argv":["x"],"env":{"1A":"x"}}\n')
    _write(t, "lone-surrogate.jsonl", '{"op":"\\ud800"}\n{"op":"run","argv":["\\udfff"]}\n')
    _write(t, "finding-FUZZ-4-trailing-newline-ids.jsonl",
           '{"op":"run","argv":["true"],"env":{"A\\n":"x"}}\n{"op":"logs","job":"j0123456789\\n"}\n'
           '{"op":"image","image":"i0123456789abcdef\\n"}\n{"op":"imported","upload":"job.tar\\n"}\n')


def main() -> None:
    for sub in ("xos_attr_value", "xos_cert", "ssh_cert", "ssh_cert_file", "challenge_answer", "control_stream", "cr_lines"):
        shutil.rmtree(CORPUS / sub, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        attr_values()
        certificates(Path(tmp))
        answers()
        control_streams()
        cr_lines()
    count = sum(1 for p in CORPUS.rglob("*") if p.is_file() and p.name != "README.md")
    print(f"wrote {count} corpus files under {CORPUS}")


if __name__ == "__main__":
    main()
