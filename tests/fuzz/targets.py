"""The fuzz targets: one ``check_*`` per hostile-input parser, asserting its contract.

Every check feeds one input to the real parser and asserts: it returns a valid value or raises
the documented refusal (with a known reason code) -- never another exception -- and whatever it
accepts obeys the strict rules (names match their NameRule, DER is canonical, frames and lines
stay within their limits, signatures really verify).  An unexpected exception propagates
unchanged, so hypothesis (``test_fuzz_*.py``) and atheris (``atheris_fuzz.py``) both report it
with its traceback.

Open findings
    :data:`OPEN_FINDINGS` lists the bugs fuzzing found that are not fixed yet; their
    reproducers are ``test_fuzz_findings.py`` (xfail, strict) and the ``finding-*`` corpus
    files.  While an id is listed, the checks let exactly that failure through (narrowly:
    the same exception from the same root cause); once the bug is fixed, drop the id here
    and the xfail marker there, and the checks hold the parser to the full contract again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import asyncssh
from asyncssh.public_key import decode_ssh_public_key
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from xos_sshd.auth import profile, sshcert
from xos_sshd.auth.challenge import MAX_ANSWER_CHARS, MAX_CHAIN_CERTS, ChallengeError, challenge_message, verify_challenge_answer
from xos_sshd.auth.errors import REASON_CODES, AuthRefused
from xos_sshd.control import protocol
from xos_sshd.control.protocol import ControlError

#: Bugs found by fuzzing and not fixed yet (see the module docstring and test_fuzz_findings.py).
#: ``XOS_FUZZ_STRICT=1`` ignores the list: the property tests then fail on the open findings too.
OPEN_FINDINGS: frozenset[str] = frozenset()  # FUZZ-1..8 fixed

#: The challenge every corpus answer is signed for (make_corpus.py, README.md).
CHALLENGE_NONCE = b"xos-fuzz-corpus-nonce-0123456789"
CHALLENGE_SERVICE = "sshd"
CHALLENGE_USER = "alice"

ATTR_REASONS = frozenset({"bad-encoding", "invalid-attributes"})
SSH_CERT_REASONS = frozenset({"bad-encoding", "invalid-attributes", "bad-signature"})
CHALLENGE_REASONS = frozenset({"bad-encoding", "bad-signature", "weak-key"})


def note(label: str) -> None:
    """Count an outcome in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    from hypothesis import currently_in_test_context, event

    if currently_in_test_context():
        event(label)


def _valid_name(rule: profile.NameRule, name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= rule.max_length
            and rule.pattern.fullmatch(name) is not None and "," not in name)


# --- XOS attribute extension values ------------------------------------------------------------


def check_decode_value(attr: profile.XOSAttribute, der: bytes) -> str | None:
    """``decode_value``: text or ``AuthRefused``; accepted DER is the canonical encoding."""
    try:
        text = profile.decode_value(attr, der)
    except AuthRefused as exc:
        assert exc.reason in ATTR_REASONS, (exc.reason, str(exc))
        assert attr.label in str(exc), str(exc)
        if exc.reason == "invalid-attributes":
            assert "too long" in str(exc), str(exc)
        return None
    assert isinstance(text, str)
    assert len(text.encode("utf-8")) <= profile.MAX_VALUE_BYTES
    # strict DER: exactly one byte string encodes a given text as OCTET STRING, one as BIT STRING
    assert der in (profile.encode_value(text), profile.encode_bit_string_value(text)), der[:64]
    return text


def check_attr_value(attr: profile.XOSAttribute, der: bytes) -> str | tuple[str, ...] | None:
    """``parse_value``: a valid name (or tuple of names), or ``AuthRefused`` naming the attribute."""
    text = check_decode_value(attr, der)
    try:
        value = profile.parse_value(attr, der)
    except AuthRefused as exc:
        assert exc.reason in ATTR_REASONS, (exc.reason, str(exc))
        assert attr.label in str(exc), str(exc)
        note(f"value refused: {exc.reason}")
        if text is not None:  # the encoding was fine, so it is the name rules that refused
            assert exc.reason == "invalid-attributes", (exc.reason, str(exc))
            names = text.split(",") if attr.multi and text else [text]
            assert not all(_valid_name(attr.rule, n) for n in names), (text, str(exc))
        return None
    note("value accepted")
    assert text is not None, "parse_value accepted what decode_value refused"
    names = value if attr.multi else (value,)
    assert isinstance(names, tuple) and (attr.multi or len(names) == 1)
    for name in names:
        assert _valid_name(attr.rule, name), (attr.name, name)
    assert ",".join(names) == text
    return value


def check_attributes(attrs: profile.XOSAttributes) -> None:
    """An accepted attribute set: every value obeys its rule (validate() must agree)."""
    attrs.validate()
    for attr in profile.ATTRIBUTES:
        value = getattr(attrs, attr.field)
        if value is None:
            continue
        for name in (value if attr.multi else (value,)):
            assert _valid_name(attr.rule, name), (attr.name, name)


def check_xos_cert(der: bytes) -> profile.XOSAttributes | None:
    """``profile.parse_certificate`` on any DER the X.509 loader takes."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        return None  # not a certificate at all: the verifier's bad-encoding, not the profile's
    try:
        attrs = profile.parse_certificate(cert)
    except AuthRefused as exc:
        assert exc.reason in ATTR_REASONS, (exc.reason, str(exc))
        note(f"xos cert refused: {exc.reason}")
        return None
    note("xos cert accepted")
    check_attributes(attrs)
    # each XOS value read is exactly what its extension's DER says
    for ext in cert.extensions:
        attr = profile.BY_OID.get(ext.oid)
        if attr is not None:
            assert not ext.critical
            assert getattr(attrs, attr.field) == profile.parse_value(attr, ext.value.value)
    return attrs


# --- OpenSSH certificates ------------------------------------------------------------------------


class _Walk:
    """An independent, minimal walk of an OpenSSH certificate (for cross-checking only)."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.pos = blob, 0

    def take(self, n: int) -> bytes:
        assert 0 <= n <= len(self.blob) - self.pos, "walk: truncated"
        out = self.blob[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        return self.take(struct.unpack(">I", self.take(4))[0])


def ssh_cert_fields(blob: bytes) -> list[tuple[str, bytes]]:
    """The top-level fields of a certificate blob, in order: (kind, raw field bytes).

    ``kind`` is ``s`` for an SSH string (raw = content), ``u32``/``u64`` for integers.  Used to
    mutate one field and re-assemble (:func:`assemble_ssh_cert`) without breaking the framing.
    """
    w = _Walk(blob)
    algorithm = w.string()
    fields: list[tuple[str, bytes]] = [("s", algorithm), ("s", w.string())]
    for _ in range(sshcert._KEY_FIELDS[algorithm.decode("ascii")]):
        fields.append(("s", w.string()))
    fields += [("u64", w.take(8)), ("u32", w.take(4))]
    fields += [("s", w.string()), ("s", w.string())]  # key id, principals
    fields += [("u64", w.take(8)), ("u64", w.take(8))]
    fields += [("s", w.string()) for _ in range(4)]  # critical options, extensions, reserved, CA key
    fields.append(("s", w.string()))  # signature
    assert w.pos == len(blob)
    return fields


def assemble_ssh_cert(fields: Sequence[tuple[str, bytes]]) -> bytes:
    return b"".join(struct.pack(">I", len(raw)) + raw if kind == "s" else raw for kind, raw in fields)


def check_ssh_cert(blob: bytes) -> sshcert.OpenSSHCert | None:
    """``sshcert.parse_certificate``: a certificate whose signature verifies, or a refusal."""
    try:
        cert = sshcert.parse_certificate(blob)
    except AuthRefused as exc:
        assert exc.reason in SSH_CERT_REASONS, (exc.reason, str(exc))
        note(f"ssh cert refused: {exc.reason}")
        return None
    note("ssh cert accepted")
    assert cert.blob == blob
    fields = ssh_cert_fields(blob)  # accepted => our independent walk agrees on the framing
    assert cert.algorithm == fields[0][1].decode("ascii")
    signed = blob[: len(blob) - 4 - len(fields[-1][1])]
    ca_key = decode_ssh_public_key(cert.ca_key_blob)
    assert ca_key.verify(signed, fields[-1][1]), "accepted a certificate whose CA signature does not verify"
    assert fields[-2][1] == cert.ca_key_blob
    assert cert.key_id.encode("utf-8") == fields[-9][1]
    assert (cert.serial, cert.cert_type) == (int.from_bytes(fields[-11][1], "big"), int.from_bytes(fields[-10][1], "big"))
    assert (cert.valid_after, cert.valid_before) == (int.from_bytes(fields[-7][1], "big"), int.from_bytes(fields[-6][1], "big"))
    principals = _Walk(fields[-8][1])
    got = []
    while principals.pos < len(principals.blob):
        got.append(principals.string().decode("utf-8"))
    assert tuple(got) == cert.principals
    for section, parsed in ((fields[-5][1], cert.critical_options), (fields[-4][1], cert.extensions)):
        w, names = _Walk(section), []
        while w.pos < len(section):
            names.append(w.string().decode("utf-8"))
            w.string()
        assert len(names) == len(set(names)) == len(parsed), "duplicate option accepted"
    return cert


def check_ssh_extensions(extensions: Mapping[str, bytes]) -> profile.SSHAttributes | None:
    """``parse_ssh_extensions``: valid names, canonical data, or ``AuthRefused``."""
    try:
        attrs = profile.parse_ssh_extensions(extensions)
    except AuthRefused as exc:
        assert exc.reason in ATTR_REASONS, (exc.reason, str(exc))
        assert any(name in str(exc) for name in (profile.SSH_EXT_VO, profile.SSH_EXT_GROUPS, profile.SSH_EXT_ROLE))
        note(f"ssh extensions refused: {exc.reason}")
        return None
    note("ssh extensions accepted")
    for name, value, rule in ((profile.SSH_EXT_VO, attrs.vo, profile.VO_RULE),
                              (profile.SSH_EXT_ROLE, attrs.role, profile.ROLE_RULE)):
        if value is None:
            assert name not in extensions
        else:
            assert _valid_name(rule, value), (name, value)
            assert extensions[name] == profile.encode_ssh_extension_data(value)
    assert len(set(attrs.groups)) == len(attrs.groups)
    for group in attrs.groups:
        assert _valid_name(profile.GROUP_RULE, group), group
    if profile.SSH_EXT_GROUPS in extensions:
        text = extensions[profile.SSH_EXT_GROUPS][4:].decode("utf-8")
        assert extensions[profile.SSH_EXT_GROUPS] == profile.encode_ssh_extension_data(text)
        assert list(dict.fromkeys(text.split(","))) == list(attrs.groups) or (text == "" and attrs.groups == ())
    else:
        assert attrs.groups == ()
    return attrs


def check_ssh_cert_file(data: bytes) -> bytes | None:
    """``read_certificate_file``: the blob of the first key line, or ``bad-encoding``."""
    try:
        blob = sshcert.read_certificate_file(data)
    except AuthRefused as exc:
        assert exc.reason == "bad-encoding", (exc.reason, str(exc))
        return None
    lines = [line.split() for line in data.splitlines()]
    first = next(f for f in lines if f and not f[0].startswith(b"#"))
    assert base64.b64decode(first[1], validate=True) == blob
    assert _Walk(blob).string() == first[0]
    return blob


def check_identity(identity: Any, vo: str) -> None:
    """An identity a verifier accepted: every name obeys its rule."""
    assert identity.vo == vo
    assert _valid_name(profile.USER_RULE, identity.user), identity.user
    assert len(set(identity.groups)) == len(identity.groups)
    for group in identity.groups:
        assert _valid_name(profile.GROUP_RULE, group), group
    assert identity.role is None or _valid_name(profile.ROLE_RULE, identity.role), identity.role


def check_verify(verify: Any, arg: Any, vo: str) -> Any:
    """A verifier entry point: an identity that obeys the rules, or an ``AuthRefused``."""
    try:
        identity = verify(arg)
    except AuthRefused as exc:
        assert exc.reason in REASON_CODES
        note(f"verifier refused: {exc.reason}")
        return None
    check_identity(identity, vo)
    note("verifier accepted")
    return identity


def _fuzz5(der: bytes) -> bool:
    """FUZZ-5's root cause: the certificate loads but its issuer or subject name does not."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        return False
    try:
        cert.issuer.public_bytes()
        cert.subject.public_bytes()
    except ValueError:
        return True
    return False


def _fuzz6(load: Any) -> bool:
    """FUZZ-6's root cause: the X.509 loader raises InvalidVersion (not a ValueError)."""
    try:
        load()
    except x509.InvalidVersion:
        return True
    except Exception:
        return False
    return False


def _fuzz7(der: bytes) -> bool:
    """FUZZ-7's root cause: a certificate whose public key cryptography cannot load."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        return False
    try:
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return True
    return False


def check_verify_x509(verifier: Any, der: bytes, vo: str) -> Any:
    """``Verifier.verify_x509_chain([der])``: an identity that obeys the rules, or ``AuthRefused``."""
    try:
        return check_verify(lambda d: verifier.verify_x509_chain([d]), der, vo)
    except x509.InvalidVersion:
        if "FUZZ-6" in OPEN_FINDINGS:
            return None
        raise
    except (ValueError, UnsupportedAlgorithm):
        if "FUZZ-5" in OPEN_FINDINGS and _fuzz5(der):
            return None
        if "FUZZ-7" in OPEN_FINDINGS and _fuzz7(der):
            return None
        raise


#: The last second ``datetime`` can hold (verifier.py's ``_MAX_TIMESTAMP``).
MAX_TIMESTAMP = 253402300799


def check_verify_openssh(verifier: Any, blob: bytes, vo: str) -> Any:
    """``Verifier.verify_openssh_cert``: an identity that obeys the rules, or ``AuthRefused``."""
    try:
        return check_verify(verifier.verify_openssh_cert, blob, vo)
    except (OverflowError, OSError, ValueError):
        # FUZZ-8's root cause: a (CA-signed) valid_after beyond what datetime can hold
        if "FUZZ-8" in OPEN_FINDINGS and sshcert.parse_certificate(blob).valid_after > MAX_TIMESTAMP:
            return None
        raise


# --- the keyboard-interactive challenge answer ---------------------------------------------------


def _json_depth_exceeds(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
    except RecursionError:
        return True
    except (ValueError, UnicodeDecodeError):
        return False
    return False


def _fuzz1(answer: str) -> bool:
    """FUZZ-1's root cause: base64 of JSON nested deeper than the recursion limit."""
    try:
        raw = base64.b64decode(answer.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return _json_depth_exceeds(raw)


def _fuzz2(answer: str) -> bool:
    """FUZZ-2's root cause: the leaf certificate loads but its public key does not (ValueError
    for an off-curve point, UnsupportedAlgorithm for an unknown named curve)."""
    try:
        doc = json.loads(base64.b64decode(answer.strip(), validate=True).decode("utf-8"))
        leaf = x509.load_pem_x509_certificates(doc["chain"].encode("ascii"))[0]
    except Exception:
        return False
    try:
        leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return True
    return False


def check_challenge(answer: str) -> Any:
    """``verify_challenge_answer``: a proof that really verifies, or a ``ChallengeError``."""
    try:
        result = verify_challenge_answer(answer, CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    except ChallengeError as exc:
        assert exc.reason in CHALLENGE_REASONS, (exc.reason, str(exc))
        note(f"answer refused: {exc.reason}: {str(exc)[:40]}")
        return None
    except RecursionError:
        if "FUZZ-1" in OPEN_FINDINGS and _fuzz1(answer):
            return None
        raise
    except (ValueError, UnsupportedAlgorithm):
        if "FUZZ-2" in OPEN_FINDINGS and _fuzz2(answer):
            return None
        raise
    except x509.InvalidVersion:
        if "FUZZ-6" in OPEN_FINDINGS and _fuzz6(lambda: x509.load_pem_x509_certificates(
                json.loads(base64.b64decode(answer.strip()))["chain"].encode("ascii"))):
            return None
        raise
    note("answer accepted")
    assert len(answer) <= MAX_ANSWER_CHARS
    assert 1 <= len(result.chain) <= MAX_CHAIN_CERTS
    assert x509.load_der_x509_certificate(result.chain[0]) == result.leaf
    doc = json.loads(base64.b64decode(answer.strip(), validate=True))
    sig = base64.b64decode(doc["sig"], validate=True)
    message = challenge_message(CHALLENGE_NONCE, CHALLENGE_SERVICE, CHALLENGE_USER)
    key = result.leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(key, rsa.RSAPublicKey), type(key)
            key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AssertionError("accepted an answer whose signature does not verify") from None
    return result


# --- the control socket framing ------------------------------------------------------------------


def reference_frames(data: bytes, limit: int) -> list[Any]:
    """What a stream of bytes must read as, per protocol.py's docstring (the oracle).

    A list of decoded objects and ``("error", reason)``; ends with ``("end",)`` at a clean end
    of stream or with a fatal error.
    """
    out: list[Any] = []
    pos = 0
    while True:
        if pos == len(data):
            return out + [("end",)]
        if len(data) - pos < 4:
            return out + [("error", "truncated-frame")]
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if length > limit:
            return out + [("error", "frame-too-large")]
        if len(data) - pos - 4 < length:
            return out + [("error", "truncated-frame")]
        body = data[pos + 4 : pos + 4 + length]
        pos += 4 + length
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        out.append(obj if isinstance(obj, dict) else ("error", "bad-request"))


def _short(items: list[Any]) -> str:
    """An assertion message that stays readable when items are 64 KiB requests."""
    text = repr(items[:5])
    return text if len(text) < 400 else text[:200] + f" ...({len(text)} chars)... " + text[-100:]


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (JSON allows NaN in Python's reading)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


async def _read_all(data: bytes, limit: int) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[Any] = []
    while True:
        try:
            frame = await protocol.read_frame(reader, idle_timeout=5, frame_timeout=5, limit=limit)
        except ControlError as exc:
            assert exc.fatal == (exc.reason != "bad-request"), (exc.reason, exc.fatal)
            assert "\n" not in protocol.error_reply(exc.reason, str(exc))["error"]
            out.append(("error", exc.reason))
            if exc.fatal:
                return out
            continue
        if frame is None:
            return out + [("end",)]
        assert isinstance(frame, dict)
        out.append(frame)


def check_control_stream(data: bytes, limit: int = protocol.MAX_FRAME) -> list[Any]:
    """``read_frame`` over a whole stream agrees with :func:`reference_frames`."""
    got = asyncio.run(_read_all(data, limit))
    want = reference_frames(data, limit)
    assert len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want)), (_short(got), _short(want))
    return got


def check_control_decode(body: bytes) -> dict[str, Any] | None:
    """``decode``: an object, or the non-fatal ``bad-request``."""
    try:
        obj = protocol.decode(body)
    except ControlError as exc:
        assert exc.reason == "bad-request" and not exc.fatal, (exc.reason, exc.fatal)
        return None
    assert isinstance(obj, dict)
    return obj


def check_frame_length(header: bytes, limit: int) -> int | None:
    """``frame_length``: a length within the limit, or the fatal ``frame-too-large``."""
    try:
        length = protocol.frame_length(header, limit)
    except ControlError as exc:
        assert exc.reason == "frame-too-large" and exc.fatal
        assert struct.unpack(">I", header)[0] > limit
        return None
    assert 0 <= length <= limit and length == struct.unpack(">I", header)[0]
    return length


# --- the xos-cr JSON-lines subsystem -------------------------------------------------------------


class _Stdin:
    """A subsystem stdin: the given chunks, an interruption for each ``None``, then EOF."""

    def __init__(self, chunks: Sequence[bytes | None]) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int) -> bytes:
        assert n > 0
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if chunk is None:
            raise asyncssh.TerminalSizeChanged(80, 24, 0, 0)
        assert len(chunk) <= n, "the fake delivers more than the subsystem asked for"
        return chunk


class _Channel:
    def __init__(self) -> None:
        self.exits: list[int] = []

    def exit(self, status: int) -> None:
        self.exits.append(status)


class _Stdout:
    def __init__(self) -> None:
        self.data = bytearray()
        self.channel = _Channel()

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data

    async def drain(self) -> None:
        await asyncio.sleep(0)


class EchoService:
    """Stands in for CRService: records each request and answers its sequence number."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def handle(self, caller: Any, request: Any) -> dict[str, Any]:
        self.requests.append(request)
        return {"ok": True, "n": len(self.requests)}


class _Caller:
    class account:  # noqa: N801 - mimics Caller.account
        name = "fuzz"


def reference_cr_lines(data: bytes, max_line: int) -> list[Any]:
    """The documented reading of an ``xos-cr`` input: per line (newline excluded) of more than
    ``max_line`` bytes, one ``bad-request``; per blank line, nothing; else the request object
    or ``bad-request``."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out: list[Any] = []
    for line in lines:
        if len(line) > max_line:
            out.append(("error", "bad-request"))
            continue
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        out.append(obj if isinstance(obj, dict) else ("error", "bad-request"))
    return out


def padded_long_lines(data: bytes, max_line: int) -> bool:
    """FUZZ-3's root cause: a line over the limit that is short once stripped of whitespace."""
    return any(len(line) > max_line and len(line.strip()) <= max_line for line in data.split(b"\n"))


def check_cr_lines(data: bytes, chunk_sizes: Sequence[int] = (65536,), interrupt_every: int = 0) -> list[Any]:
    """``serve_lines`` on ``data`` delivered in reads of ``chunk_sizes`` (cycled, each at most the
    64 KiB the subsystem asks for): replies match :func:`reference_cr_lines`, in order, one JSON
    line each; only the requests of well-formed lines reach the service; exit status 0."""
    from xos_sshd.cr import subsystem

    chunks: list[bytes | None] = []
    pos = i = 0
    while pos < len(data):
        size = max(1, min(65536, chunk_sizes[i % len(chunk_sizes)]))
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
        if interrupt_every and i % interrupt_every == 0:
            chunks.append(None)
    service, stdout = EchoService(), _Stdout()
    asyncio.run(subsystem.serve_lines(service, _Caller(), _Stdin(chunks), stdout))  # type: ignore[arg-type]
    assert stdout.channel.exits == [0]
    assert stdout.data == b"" or stdout.data.endswith(b"\n")
    replies = [json.loads(line) for line in bytes(stdout.data).split(b"\n")[:-1]]
    want = reference_cr_lines(data, subsystem.MAX_LINE)
    if "FUZZ-3" in OPEN_FINDINGS and padded_long_lines(data, subsystem.MAX_LINE):
        return replies  # the count depends on the read boundaries until FUZZ-3 is fixed
    got: list[Any] = []
    for reply in replies:
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        if reply["ok"]:
            got.append(service.requests[reply["n"] - 1])
        else:
            assert reply["reason"] == "bad-request" and "\n" not in reply["error"], reply
            got.append(("error", "bad-request"))
    assert len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want)), (_short(got), _short(want))
    assert len(service.requests) == sum(1 for w in want if isinstance(w, dict))
    return replies


# --- CRService.handle on hostile requests --------------------------------------------------------

_STRICT = {
    "job": re.compile(r"j[0-9a-f]{10}"),
    "image": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"),
    "upload": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,123}\.tar"),
    "env": re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}"),
}


def strict_ok(kind: str, value: str) -> bool:
    """``value`` is a well-formed ``kind`` (job id, image id, upload name, env name).

    While FUZZ-4 is open, a well-formed value followed by one ``\\n`` is let through too: the
    service's ``re.match('^...$')`` accepts it (``$`` matches before a final newline).
    """
    if _STRICT[kind].fullmatch(value):
        return True
    return "FUZZ-4" in OPEN_FINDINGS and value.endswith("\n") and bool(_STRICT[kind].fullmatch(value[:-1]))


class StubBackends:
    """JobManager and ImageStore stand-ins for CRService: record what reaches them, own nothing."""

    def __init__(self) -> None:
        from xos_sshd.cr.images import ImageError
        from xos_sshd.cr.jobs import JobError

        self.seen: list[tuple[str, Any]] = []
        backends = self

        class Table:
            async def get(self, job_id: str) -> None:
                backends.seen.append(("job", job_id))
                return None

            async def list(self, **kw: Any) -> list[Any]:
                return []

        class Jobs:
            table = Table()

            async def start(self, account: Any, argv: Any, env: Any) -> Any:
                backends.seen.append(("start", (argv, env)))
                raise JobError("start-failed", "fuzz stub: nothing is started")

        class Images:
            quota_count = None

            async def get(self, uid: int, image_id: str) -> Any:
                backends.seen.append(("image", image_id))
                raise ImageError("no-such-image", f"no image {image_id}")

            async def list(self, uid: int) -> list[Any]:
                return []

        self.jobs, self.images = Jobs(), Images()


CR_REASONS = frozenset({"bad-request", "unknown-op", "no-such-job", "no-such-image", "no-such-upload", "start-failed"})


def check_cr_request(service: Any, backends: StubBackends, caller: Any, request: Any) -> dict[str, Any]:
    """``CRService.handle``: never raises, one-line refusals with known reasons, replies the
    subsystem can send, and only well-formed ids, argv and env reach the job manager and the
    image store."""
    backends.seen.clear()
    reply = asyncio.run(service.handle(caller, request))
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str).encode()  # what serve_lines sends
    if not reply["ok"]:
        assert reply["reason"] in CR_REASONS, reply
        assert isinstance(reply["error"], str) and "\n" not in reply["error"], reply
    for kind, value in backends.seen:
        if kind in ("job", "image"):
            assert isinstance(value, str) and strict_ok(kind, value), (kind, value)
        else:
            argv, env = value
            assert isinstance(argv, list) and 1 <= len(argv) <= 256
            assert all(isinstance(a, str) and "\0" not in a and len(a) <= 8192 for a in argv), argv
            assert isinstance(env, dict) and len(env) <= 64
            for k, v in env.items():
                assert isinstance(k, str) and strict_ok("env", k), k
                assert isinstance(v, str) and "\0" not in v and len(v) <= 8192
    if not reply["ok"] and reply["reason"] == "no-such-upload":
        assert strict_ok("upload", request["upload"]), request["upload"]
    return reply
