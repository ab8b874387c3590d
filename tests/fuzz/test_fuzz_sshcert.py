"""Fuzz the OpenSSH side of the XOS-cert: certificate blobs, ``-cert.pub`` files, the
``vo@xos``/``groups@xos``/``role@xos`` extensions, and the OpenSSH verifier on hostile
certificates that a trusted CA really signed."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from auth_certs import verifier
from fuzzlib import corpus, corpus_files, fuzz_bytes, fuzz_settings, ids, mutate_bytes, seeded
from targets import (assemble_ssh_cert, check_ssh_cert, check_ssh_cert_file, check_ssh_extensions,
                     check_verify_openssh, ssh_cert_fields)
from xos_sshd.auth import profile, sshcert
from xos_sshd.auth.ca import init_ca

#: Mutated certificates make cryptography warn (e.g. "serial number wasn't positive").
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

CERT_FILES = corpus_files("ssh_cert")
CERT_SEEDS = corpus("ssh_cert")
FILE_FILES = corpus_files("ssh_cert_file")
FILE_SEEDS = corpus("ssh_cert_file")
XOS_EXTS = (profile.SSH_EXT_VO, profile.SSH_EXT_GROUPS, profile.SSH_EXT_ROLE)

# --- blobs and files -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CERT_FILES, ids=ids(CERT_FILES))
def test_ssh_cert_seed(path: Path) -> None:
    cert = check_ssh_cert(path.read_bytes())
    if cert is not None:
        check_ssh_extensions(cert.extensions)


def test_ssh_cert_seed_real_certificates_parse() -> None:
    """The corpus is meaningful: xos-ca's certificates parse and carry valid XOS extensions."""
    for name in ("xosca-ecdsa.bin", "xosca-rsa.bin", "xosca-nogroups.bin", "ca-rsa-leaf.bin", "ca-ed25519-leaf.bin"):
        cert = check_ssh_cert((CERT_FILES[0].parent / name).read_bytes())
        assert cert is not None and check_ssh_extensions(cert.extensions).vo in ("dev", "physics"), name


@seeded
@fuzz_settings()
@given(blob=fuzz_bytes(CERT_SEEDS))
def test_ssh_cert_fuzz(blob: bytes) -> None:
    cert = check_ssh_cert(blob)
    if cert is not None:
        check_ssh_extensions(cert.extensions)


@pytest.mark.parametrize("path", FILE_FILES, ids=ids(FILE_FILES))
def test_ssh_cert_file_seed(path: Path) -> None:
    check_ssh_cert_file(path.read_bytes())


@seeded
@fuzz_settings()
@given(data=fuzz_bytes(FILE_SEEDS))
def test_ssh_cert_file_fuzz(data: bytes) -> None:
    blob = check_ssh_cert_file(data)
    if blob is not None:
        check_ssh_cert(blob)


# --- the XOS extensions ------------------------------------------------------------------------------

ext_texts = st.one_of(
    st.sampled_from(["dev", "users,staff", "a,a", "", ",", "a,", "Dev", "worker", "a b", "dev\n"]),
    st.from_regex(profile.GROUP_NAME_RE, fullmatch=True),
    st.lists(st.from_regex(profile.GROUP_NAME_RE, fullmatch=True), max_size=4).map(",".join),
    st.text(alphabet="aA0_.@-, \n\x00é", max_size=20),
    st.integers(4094, 4098).map(lambda n: "g" * n),
)


@st.composite
def ext_data(draw) -> bytes:
    raw = draw(ext_texts).encode("utf-8")
    form = draw(st.sampled_from(["string", "string", "string", "bad-length", "raw", "mutated"]))
    if form == "string":
        return profile.encode_ssh_extension_data(raw)
    if form == "bad-length":
        return struct.pack(">I", (len(raw) + draw(st.sampled_from([-1, 1, 2**31]))) % 2**32) + raw
    if form == "raw":
        return raw
    return draw(mutate_bytes(profile.encode_ssh_extension_data(raw)))


@seeded
@fuzz_settings()
@given(exts=st.dictionaries(st.sampled_from(XOS_EXTS + ("permit-pty", "vo@xos.evil", "VO@XOS")), ext_data(), max_size=4))
def test_ssh_extensions_fuzz(exts: dict[str, bytes]) -> None:
    check_ssh_extensions(exts)


# --- the verifier, on hostile certificates its CA really signed --------------------------------------

#: A fixed Ed25519 CA key: its signatures are deterministic, so every example replays exactly.
_CA_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_USER_KEYS = ("ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa")


@pytest.fixture(scope="module")
def ssh_ca(tmp_path_factory: pytest.TempPathFactory):
    ca = init_ca(tmp_path_factory.mktemp("fuzz-ssh-ca") / "dev", "dev", key=_CA_KEY)
    signer = asyncssh.import_private_key(_CA_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    now = int(time.time())
    seeds = []
    for alg in _USER_KEYS:
        user = asyncssh.generate_private_key(alg, **({"key_size": 2048} if alg == "ssh-rsa" else {}))
        seeds.append(sshcert.build_user_certificate(
            signer, user, serial=1000 + len(seeds), key_id="alice@dev", principals=["alice", "al"],
            valid_after=now - 60, valid_before=now + 86400,
            xos_extensions={"vo@xos": "dev", "groups@xos": "users,staff", "role@xos": "worker"}))
    return ca, verifier(ca), signer, seeds


_U64 = [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def options_section(draw, data: bytes) -> bytes:
    """A critical-options/extensions section with entries added, dropped, renamed or mutated."""
    entries: list[tuple[bytes, bytes]] = []
    r = data
    while len(r) >= 4:
        n = struct.unpack(">I", r[:4])[0]
        name, r = r[4 : 4 + n], r[4 + n :]
        n = struct.unpack(">I", r[:4])[0] if len(r) >= 4 else 0
        value, r = r[4 : 4 + n], r[4 + n :]
        entries.append((name, value))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["add", "add", "drop", "rename", "value", "dup"]))
        if op == "add" or not entries:
            name = draw(st.sampled_from([e.encode() for e in XOS_EXTS] + [b"force-command", b"source-address",
                                                                          b"permit-pty", b"x@y", b"\xff"]))
            entries.insert(draw(st.integers(0, len(entries))), (name, draw(ext_data())))
        else:
            i = draw(st.integers(0, len(entries) - 1))
            if op == "drop":
                del entries[i]
            elif op == "rename":
                entries[i] = (draw(mutate_bytes(entries[i][0], max_ops=2)), entries[i][1])
            elif op == "value":
                entries[i] = (entries[i][0], draw(ext_data()))
            else:
                entries.insert(i, entries[i])
    return b"".join(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in entries)


@st.composite
def resigned_cert(draw, seeds: list[bytes], signer: asyncssh.SSHKey) -> bytes:
    """A seed with some fields changed (lengths kept right), then signed again by the CA."""
    fields = list(ssh_cert_fields(draw(st.sampled_from(seeds))))
    n = len(fields)
    named = {"serial": n - 11, "type": n - 10, "key_id": n - 9, "principals": n - 8, "after": n - 7,
             "before": n - 6, "critical": n - 5, "extensions": n - 4, "reserved": n - 3}
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.sampled_from(sorted(named) + ["any"]))
        i = named.get(which, None)
        if i is None:
            i = draw(st.integers(0, n - 3))
        kind, raw = fields[i]
        if which == "type":
            raw = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1])))
        elif which in ("after", "before"):
            now = int(time.time())
            raw = struct.pack(">Q", draw(st.sampled_from(_U64 + [now - 3600, now + 3600, now - 10**6, now + 10**9])))
        elif which == "key_id":
            raw = draw(st.sampled_from([b"alice@dev", b"alice@other", b"@dev", b"alice", b"al@dev", b"x@y@dev",
                                        b"alice@dev\n", b"Alice@dev", b"bob@dev"]) | mutate_bytes(raw))
        elif which == "principals":
            names = draw(st.lists(st.sampled_from([b"alice", b"al", b"bob", b"", b"alice\x00", b"\xff"]), max_size=4))
            raw = b"".join(struct.pack(">I", len(p)) + p for p in names)
            if draw(st.booleans()):
                raw = draw(mutate_bytes(raw, max_ops=2))
        elif which in ("critical", "extensions"):
            raw = draw(options_section(raw))
        elif kind == "s":
            raw = draw(mutate_bytes(raw))
        else:
            raw = draw(mutate_bytes(raw, max_ops=2))[: len(raw)].ljust(len(raw), b"\0")
        fields[i] = (kind, raw)
    fields[-2] = ("s", bytes(signer.public_data))
    body = assemble_ssh_cert(fields[:-1])
    return body + _ssh_string(signer.sign(body, b"ssh-ed25519"))


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@seeded
@fuzz_settings(weight=0.5)
@given(data=st.data())
def test_verifier_openssh_resigned_fuzz(ssh_ca, data: st.DataObject) -> None:
    """Field-level mutations of real certificates, re-signed by the trusted CA: the verifier
    refuses with a reason code or returns an identity that obeys every rule."""
    _ca, v, signer, seeds = ssh_ca
    blob = data.draw(resigned_cert(seeds, signer))
    cert = check_ssh_cert(blob)
    if cert is not None:
        check_ssh_extensions(cert.extensions)
    identity = check_verify_openssh(v, blob, "dev")
    if identity is not None:
        assert cert is not None
        assert cert.cert_type == sshcert.CERT_TYPE_USER and not cert.critical_options
        assert cert.key_id == f"{identity.user}@dev" and identity.user in cert.principals
        assert cert.signature_algorithm in sshcert.ACCEPTED_SIGNATURE_ALGORITHMS
        now = time.time()
        assert cert.valid_after - 600 <= now <= cert.valid_before + 600


def test_verifier_openssh_seeds_accepted(ssh_ca) -> None:
    """The re-sign seeds themselves verify, so the fuzz starts from accepted certificates."""
    _ca, v, _signer, seeds = ssh_ca
    for blob in seeds:
        assert v.verify_openssh_cert(blob).user == "alice"
