"""The XOS keyboard-interactive challenge: prompt format, signed message, answer sign/verify.

Why this exists: a stock OpenSSH sshd cannot check an X.509 XOS-cert during public-key
auth, so `pam_xos.so` asks for proof of possession through keyboard-interactive instead.
The module sends one `PAM_PROMPT_ECHO_ON` prompt and forwards the one-line answer to the
daemon; `ssh-xos --kbdint` produces that answer. Both sides use this module so the
bytes that get signed are defined in exactly one place (`challenge_message`).

Wire format (see also docs/internals.md):

* prompt: ``XOS-CHALLENGE <base64 nonce> [<service>]`` -- the service (the PAM service
  name) is optional and defaults to ``sshd``.
* answer: one line, ``base64(JSON)`` with the JSON object
  ``{"chain": "<PEM leaf certificate, then any CA certificates>", "sig": "<base64>"}``.
* ``sig`` is the XOS-cert key's signature over ``challenge_message(nonce, service, user)``:
  ECDSA with SHA-256 (DER-encoded) for EC keys, RSA PKCS#1 v1.5 with SHA-256 for RSA keys.

The signed message frames ``nonce || service || user`` unambiguously and with a domain
tag: ``b"XOS-CHALLENGE-V1\\0" + str(nonce) + str(service) + str(user)`` where ``str(x)``
is an SSH string (uint32 big-endian length, then the bytes). The framing stops two
different (service, user) pairs from producing the same bytes, and the tag stops a
hostile prompt from turning the answer into a signature that means something elsewhere
(an SSH userauth signature starts with a uint32 length, never with this tag).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .errors import AuthRefused

PROMPT_TAG = "XOS-CHALLENGE"
DEFAULT_SERVICE = "sshd"
MESSAGE_TAG = b"XOS-CHALLENGE-V1\0"
MAX_ANSWER_CHARS = 64 * 1024
MAX_CHAIN_CERTS = 8
MAX_NONCE_BYTES = 1024
_SERVICE_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class ChallengeError(AuthRefused):
    """An answer that cannot be accepted: an `AuthRefused` with reason `bad-encoding`,
    `bad-signature` or `weak-key`, so the daemon handles it like any other refusal."""


class VerifiedAnswer(NamedTuple):
    """A challenge answer whose signature checked out against its own leaf certificate.

    Only possession of the leaf's key is proven here: the caller must still verify
    `chain` (DER, leaf first) against the VO trust anchors, CRL, validity and attributes.
    """

    chain: list[bytes]
    leaf: x509.Certificate


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def challenge_message(nonce: bytes, service: str, user: str) -> bytes:
    """Return the exact bytes that the answer's signature covers.

    This is the one definition of the signed message, shared by client and daemon.
    """
    return (MESSAGE_TAG + _ssh_string(nonce) + _ssh_string(service.encode("utf-8"))
            + _ssh_string(user.encode("utf-8")))


def make_prompt(nonce: bytes, service: str | None = None) -> str:
    """Build the prompt text that pam_xos (or a test server) sends."""
    text = f"{PROMPT_TAG} {base64.b64encode(nonce).decode('ascii')}"
    if service is not None:
        if not _SERVICE_RE.fullmatch(service):
            raise ValueError(f"invalid PAM service name {service!r}")
        text += f" {service}"
    return text


def parse_prompt(text: str) -> tuple[bytes, str] | None:
    """Return ``(nonce, service)`` if `text` is an XOS challenge prompt, else None.

    Anything that is not exactly the documented format returns None, so a client never
    signs something it did not recognise.
    """
    fields = text.strip().split()
    if not fields or fields[0] != PROMPT_TAG or len(fields) not in (2, 3):
        return None
    try:
        nonce = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not nonce or len(nonce) > MAX_NONCE_BYTES:
        return None
    service = fields[2] if len(fields) == 3 else DEFAULT_SERVICE
    if not _SERVICE_RE.fullmatch(service):
        return None
    return nonce, service


def _sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise ChallengeError("weak-key", f"unsupported key type {type(key).__name__}")


def sign_challenge(key: PrivateKey, chain_pem: bytes | str, nonce: bytes,
                   service: str, user: str) -> str:
    """Produce the one-line answer for a prompt (client side).

    `chain_pem` is the leaf certificate in PEM, optionally followed by CA certificates.
    """
    if isinstance(chain_pem, bytes):
        chain_pem = chain_pem.decode("ascii")
    sig = _sign(key, challenge_message(nonce, service, user))
    doc = {"chain": chain_pem, "sig": base64.b64encode(sig).decode("ascii")}
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode("utf-8")).decode("ascii")


def _verify(leaf: x509.Certificate, sig: bytes, message: bytes) -> None:
    try:
        pub = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # off-curve point, unknown curve
        raise ChallengeError("weak-key", f"certificate public key is unusable: {exc}") from None
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise ChallengeError("weak-key", f"unsupported certificate key type {type(pub).__name__}")
    except InvalidSignature:
        raise ChallengeError("bad-signature", "challenge signature does not verify") from None


def verify_challenge_answer(answer: str, nonce: bytes, service: str, user: str) -> VerifiedAnswer:
    """Decode an answer line and check its signature against the leaf's public key.

    Raises `ChallengeError` for anything malformed, oversized or wrongly signed. The
    size limit is checked before any decoding so a hostile answer costs little.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        raise ChallengeError("bad-encoding", f"challenge answer longer than {MAX_ANSWER_CHARS} characters")
    try:
        raw = base64.b64decode(answer.strip(), validate=True)
        doc = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise ChallengeError("bad-encoding", "challenge answer is not base64 of a JSON object") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("chain"), str)
            or not isinstance(doc.get("sig"), str)):
        raise ChallengeError("bad-encoding", 'challenge answer lacks string "chain" and "sig"')
    try:
        certs = x509.load_pem_x509_certificates(doc["chain"].encode("ascii"))
        sig = base64.b64decode(doc["sig"], validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError, x509.InvalidVersion):
        raise ChallengeError("bad-encoding", "challenge answer chain or signature is malformed") from None
    if not certs or len(certs) > MAX_CHAIN_CERTS:
        raise ChallengeError("bad-encoding", f"challenge chain must hold 1 to {MAX_CHAIN_CERTS} certificates")
    _verify(certs[0], sig, challenge_message(nonce, service, user))
    return VerifiedAnswer([c.public_bytes(serialization.Encoding.DER) for c in certs], certs[0])
