"""Reproducers of the bugs fuzzing found, one test per finding, each stating the contract.

All eight are fixed; the tests stay as regression tests.  A new finding gets a test here
marked ``xfail(strict=True)`` and its id in ``targets.OPEN_FINDINGS`` until it is fixed.
The inputs are the ``finding-*`` files of the corpus (or built below when they need a
trusted CA's signature).
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncssh
import pytest

from auth_certs import der, make_ca, make_leaf, resign, split_certificate, verifier
from fuzzlib import finding
from targets import CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER, EchoService, StubBackends, _Caller, _Stdin, _Stdout
from xos_sshd.ams import LocalAccount
from xos_sshd.audit import AuditLog
from xos_sshd.auth import sshcert
from xos_sshd.auth.challenge import ChallengeError, verify_challenge_answer
from xos_sshd.auth.errors import AuthRefused
from xos_sshd.cr import subsystem
from xos_sshd.cr.manifest import Owner
from xos_sshd.cr.service import Caller, CRService

#: Mutated certificates make cryptography warn (e.g. "serial number wasn't positive").
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def _answer(name: str) -> str:
    return finding("challenge_answer", name).decode("ascii")


def test_finding_fuzz1_challenge_deep_json_is_bad_encoding() -> None:
    """challenge.py catches (binascii.Error, ValueError, UnicodeDecodeError) around json.loads;
    RecursionError (base64 of 30000 '[') escapes, so pam_ops answers internal-error and the
    refused login is never audited.  protocol.decode and subsystem._decode catch it already."""
    with pytest.raises(ChallengeError) as info:
        verify_challenge_answer(_answer("FUZZ-1"), CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    assert info.value.reason == "bad-encoding"


@pytest.mark.parametrize("variant", ["off-curve-ec-point", "unknown-curve-oid"])
def test_finding_fuzz2_challenge_unloadable_leaf_key_is_refused(variant: str) -> None:
    """challenge._verify calls leaf.public_key() outside any try: a (self-made) leaf whose
    P-256 point is off the curve loads as a certificate but its key raises ValueError('Invalid
    key'); with the curve OID changed to 0.16.840.10045.3.1.7 (found by atheris) it raises
    cryptography.exceptions.UnsupportedAlgorithm."""
    with pytest.raises(ChallengeError) as info:
        verify_challenge_answer(_answer(f"FUZZ-2-{variant}"), CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    assert info.value.reason in ("bad-encoding", "weak-key")


def test_finding_fuzz3_cr_overlong_padded_line_is_refused() -> None:
    """subsystem.serve_lines checks MAX_LINE on the *stripped* line (``one``) but on the raw
    buffer while no newline has come: 65536 spaces + '{"op":"list"}' + newline, read in two
    reads of at most 64 KiB, reaches the service; read in smaller pieces it is refused.  The
    docstring says a line of more than MAX_LINE bytes (newline excluded) is refused."""
    data = b" " * subsystem.MAX_LINE + b'{"op":"list"}\n'
    replies = {}
    for chunk in (65536, 1000):
        service, stdout = EchoService(), _Stdout()
        chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        asyncio.run(subsystem.serve_lines(service, _Caller(), _Stdin(chunks), stdout))  # type: ignore[arg-type]
        replies[chunk] = (service.requests, [json.loads(x) for x in bytes(stdout.data).splitlines()])
    for chunk, (requests, out) in replies.items():
        assert requests == [], f"reads of {chunk}: the over-long line reached the service"
        assert [r["reason"] for r in out] == ["bad-request"], (chunk, out)


def test_finding_fuzz4_cr_ids_and_env_names_with_trailing_newline_are_refused(tmp_path) -> None:
    """service.py checks env names with re.match(r'^[A-Za-z_][A-Za-z0-9_]{0,63}$'), job ids with
    JOB_ID.match, image ids with manifest.ID_RE.match and uploads with UPLOAD_NAME.match; '$'
    also matches before a final '\\n', so 'A\\n' becomes an environment variable of the job and
    'j0123456789\\n' / 'i...\\n' reach the job table and the image store (whose own ID_RE.match
    lets it through again).  Use fullmatch (or \\Z)."""
    backends = StubBackends()
    audit = AuditLog(tmp_path / "audit.log")
    service = CRService(backends.jobs, backends.images, audit)  # type: ignore[arg-type]
    account = LocalAccount("dev-alice", 60001, 60001, (), "/nonexistent", "/bin/sh", "", "dev", "alice")
    caller = Caller(Owner("dev", "alice"), account)
    lines = finding("cr_lines", "FUZZ-4").decode().splitlines()
    outcomes = []
    for line in lines:
        backends.seen.clear()
        reply = asyncio.run(service.handle(caller, json.loads(line)))
        outcomes.append((line, reply.get("reason"), list(backends.seen)))
    audit.close()
    for line, reason, seen in outcomes:
        assert seen == [], f"{line}: reached the backend with {seen}"
        assert reason in ("bad-request", "no-such-job", "no-such-image"), (line, reason)


@pytest.fixture(scope="module")
def dev_ca_and_verifier(tmp_path_factory):
    ca = make_ca(tmp_path_factory.mktemp("fuzz-findings"), "dev")
    return ca, verifier(ca)


def test_finding_fuzz5_verifier_bad_issuer_name_is_bad_encoding(dev_ca_and_verifier) -> None:
    """verifier._x509_signer reads leaf.issuer.public_bytes() before any signature check;
    cryptography parses names lazily and raises ValueError for an issuer CN that is not valid
    UTF8String.  No CA signature is needed: anyone can send it (SSH X.509 login: logged as a
    verifier bug; PAM challenge: internal-error, login not audited)."""
    _ca, v = dev_ca_and_verifier
    with pytest.raises(AuthRefused) as info:
        v.verify_x509_chain([finding("xos_cert", "FUZZ-5")])
    assert info.value.reason in ("bad-encoding", "unknown-ca")


def test_finding_fuzz6_x509_version_4_is_bad_encoding(dev_ca_and_verifier) -> None:
    """cryptography.x509.InvalidVersion is not a ValueError: verify_x509_chain (except
    ValueError around load_der_x509_certificate) and verify_challenge_answer (except
    binascii.Error, ValueError, UnicodeEncodeError around load_pem_x509_certificates) let it
    through.  Unsigned input suffices."""
    _ca, v = dev_ca_and_verifier
    with pytest.raises(AuthRefused) as info:
        v.verify_x509_chain([finding("xos_cert", "FUZZ-6")])
    assert info.value.reason == "bad-encoding"
    with pytest.raises(ChallengeError) as info:
        verify_challenge_answer(_answer("FUZZ-6"), CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    assert info.value.reason == "bad-encoding"


def test_finding_fuzz7_verifier_unloadable_leaf_key_is_refused(dev_ca_and_verifier) -> None:
    """verify_x509_chain calls _check_public_key(leaf.public_key()) unguarded; a leaf with an
    off-curve P-256 point raises ValueError('Invalid key') (an unknown named curve raises
    UnsupportedAlgorithm).  Reaching it needs the trusted CA's signature, so low severity."""
    ca, v = dev_ca_and_verifier
    leaf = der(make_leaf(ca)[0])
    tbs = split_certificate(leaf)[0]
    p256 = bytes.fromhex("06082a8648ce3d030107")
    i = tbs.index(p256) + len(p256) + 3 + 1 + 5
    bad_tbs = tbs[:i] + bytes([tbs[i] ^ 0x55]) + tbs[i + 1 :]
    with pytest.raises(AuthRefused) as info:
        v.verify_x509_chain([resign(leaf, bad_tbs, ca.key)])
    assert info.value.reason in ("bad-encoding", "weak-key")


def test_finding_fuzz8_openssh_valid_after_out_of_range_is_refused(dev_ca_and_verifier) -> None:
    """verify_openssh_cert bounds valid_before by _MAX_TIMESTAMP but not valid_after:
    datetime.fromtimestamp(2**63) raises OverflowError (2**40: ValueError, some values
    OSError EOVERFLOW).  Needs the trusted CA's signature, so low severity."""
    ca, v = dev_ca_and_verifier
    user = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    for valid_after in (2**63, 2**40):
        blob = sshcert.build_user_certificate(
            ca.ssh_key(), user, serial=9, key_id="alice@dev", principals=["alice"],
            valid_after=valid_after, valid_before=now + 3600, xos_extensions={"vo@xos": "dev"})
        with pytest.raises(AuthRefused) as info:
            v.verify_openssh_cert(blob)
        assert info.value.reason in ("not-yet-valid", "invalid-attributes")
