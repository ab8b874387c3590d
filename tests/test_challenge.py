"""The pam_xos keyboard-interactive challenge: prompt parsing, signing and verification."""

from __future__ import annotations

import base64
import datetime
import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from xos_sshd.auth.challenge import (
    DEFAULT_SERVICE, MAX_ANSWER_CHARS, ChallengeError, challenge_message, make_prompt,
    parse_prompt, sign_challenge, verify_challenge_answer)


def _cert(key, cn: str = "alice") -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .sign(key, hashes.SHA256()))


@pytest.fixture(scope="module", params=["ec", "rsa"])
def cred(request):
    key = (ec.generate_private_key(ec.SECP256R1()) if request.param == "ec"
           else rsa.generate_private_key(65537, 2048))
    cert = _cert(key)
    return key, cert, cert.public_bytes(serialization.Encoding.PEM)


NONCE = os.urandom(32)


def test_good_answer_verifies_and_returns_der_chain(cred):
    key, cert, pem = cred
    answer = sign_challenge(key, pem, NONCE, "sshd", "alice")
    assert "\n" not in answer
    result = verify_challenge_answer(answer, NONCE, "sshd", "alice")
    assert result.chain == [cert.public_bytes(serialization.Encoding.DER)]
    assert result.leaf == cert
    chain, leaf = result  # a plain tuple for callers that unpack
    assert chain[0] == result.chain[0]


def test_chain_with_ca_certificates_is_returned_leaf_first(cred):
    key, cert, pem = cred
    ca = _cert(ec.generate_private_key(ec.SECP256R1()), "Some CA")
    answer = sign_challenge(key, pem + ca.public_bytes(serialization.Encoding.PEM), NONCE, "sshd", "alice")
    chain = verify_challenge_answer(answer, NONCE, "sshd", "alice").chain
    assert chain == [c.public_bytes(serialization.Encoding.DER) for c in (cert, ca)]


@pytest.mark.parametrize("nonce,service,user", [
    (b"another nonce 0123456789abcdef", "sshd", "alice"),
    (NONCE, "sshd", "bob"),
    (NONCE, "login", "alice"),
])
def test_wrong_nonce_user_or_service_is_refused(cred, nonce, service, user):
    key, _cert_, pem = cred
    answer = sign_challenge(key, pem, NONCE, "sshd", "alice")
    with pytest.raises(ChallengeError) as err:
        verify_challenge_answer(answer, nonce, service, user)
    assert err.value.reason == "bad-signature"


def test_signature_by_another_key_is_refused(cred):
    _key, _cert_, pem = cred
    other = ec.generate_private_key(ec.SECP256R1())
    answer = sign_challenge(other, pem, NONCE, "sshd", "alice")
    with pytest.raises(ChallengeError, match="does not verify"):
        verify_challenge_answer(answer, NONCE, "sshd", "alice")


def _b64json(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


@pytest.mark.parametrize("answer", [
    "not base64 at all!",
    "",
    base64.b64encode(b"\xff\xfe not utf-8").decode(),
    base64.b64encode(b"{not json").decode(),
    _b64json(["chain", "sig"]),
    _b64json({"chain": "x"}),
    _b64json({"chain": 1, "sig": "AAAA"}),
    _b64json({"chain": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "sig": "AAAA"}),
    _b64json({"chain": "no pem here", "sig": "AAAA"}),
])
def test_malformed_answers_are_refused_as_bad_encoding(answer):
    with pytest.raises(ChallengeError) as err:
        verify_challenge_answer(answer, NONCE, "sshd", "alice")
    assert err.value.reason == "bad-encoding"


def test_bad_signature_base64_is_bad_encoding(cred):
    _key, _cert_, pem = cred
    answer = _b64json({"chain": pem.decode(), "sig": "!!"})
    with pytest.raises(ChallengeError) as err:
        verify_challenge_answer(answer, NONCE, "sshd", "alice")
    assert err.value.reason == "bad-encoding"


def test_oversize_answer_is_refused_before_decoding(cred):
    key, _cert_, pem = cred
    good = sign_challenge(key, pem, NONCE, "sshd", "alice")
    with pytest.raises(ChallengeError, match="longer than"):
        verify_challenge_answer(good + "A" * (MAX_ANSWER_CHARS + 1), NONCE, "sshd", "alice")
    huge = _b64json({"chain": pem.decode() * 200, "sig": "AAAA"})
    assert len(huge) > MAX_ANSWER_CHARS
    with pytest.raises(ChallengeError, match="longer than"):
        verify_challenge_answer(huge, NONCE, "sshd", "alice")


def test_message_is_framed_so_fields_cannot_slide():
    assert challenge_message(b"n", "sshd", "xalice") != challenge_message(b"n", "sshdx", "alice")
    assert challenge_message(b"nonce", "sshd", "u").startswith(b"XOS-CHALLENGE-V1\0")
    assert challenge_message(b"ab", "s", "u") == (
        b"XOS-CHALLENGE-V1\0" b"\0\0\0\x02ab" b"\0\0\0\x01s" b"\0\0\0\x01u")


def test_prompt_round_trip_and_default_service():
    assert parse_prompt(make_prompt(NONCE)) == (NONCE, DEFAULT_SERVICE)
    assert parse_prompt(make_prompt(NONCE, "login") + "\n") == (NONCE, "login")
    assert parse_prompt("Password: ") is None
    assert parse_prompt("XOS-CHALLENGE") is None
    assert parse_prompt("XOS-CHALLENGE !!notb64") is None
    assert parse_prompt(f"XOS-CHALLENGE {base64.b64encode(NONCE).decode()} bad/service") is None
    assert parse_prompt(f"XOS-CHALLENGE {base64.b64encode(NONCE).decode()} a b") is None
    with pytest.raises(ValueError):
        make_prompt(NONCE, "no spaces allowed")
