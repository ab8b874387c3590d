"""Fuzz the XOS-cert attribute extension: DER values, whole certificates, and the X.509 verifier.

Targets: ``profile.decode_value`` / ``parse_value`` (every attribute), ``profile.parse_certificate``
and ``Verifier.verify_x509_chain`` on re-signed hostile certificates.  Properties in targets.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from auth_certs import der, make_ca, make_leaf, resign, split_certificate, verifier, xos_exts
from fuzzlib import corpus, corpus_files, fuzz_bytes, fuzz_settings, ids, mutate_der, mutated, seeded
from targets import check_attr_value, check_identity, check_verify_x509, check_xos_cert
from xos_sshd.auth import profile
from xos_sshd.auth.errors import AuthRefused

#: Mutated certificates make cryptography warn (e.g. "serial number wasn't positive").
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

ATTRS = profile.ATTRIBUTES
VALUE_FILES = corpus_files("xos_attr_value")
VALUE_SEEDS = corpus("xos_attr_value")
CERT_FILES = corpus_files("xos_cert")
CERT_SEEDS = corpus("xos_cert")

# --- strategies ---------------------------------------------------------------------------------

_NAME_ALPHABET = "abcAZ09_.@-,/ \n\t\x00é\u2603\uff11"
names_ish = st.one_of(
    st.sampled_from(["dev", "alice", "users", "a", "0", "-a", ".", "@", "a,b", "", "Dev", "a b", "a\n"]),
    st.from_regex(profile.GROUP_NAME_RE, fullmatch=True),
    st.from_regex(profile.VO_NAME_RE, fullmatch=True),
    st.text(alphabet=_NAME_ALPHABET, max_size=24),
    st.text(max_size=12),
    st.integers(28, 70).map(lambda n: "v" * n),
)
texts = st.one_of(names_ish, st.lists(names_ish, max_size=5).map(",".join),
                  st.integers(4090, 4100).map(lambda n: "a" * n))
contents = st.one_of(texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=48))


@st.composite
def der_values(draw) -> bytes:
    """A TLV around attribute-like content, with every length form DER has and forbids."""
    tag = draw(st.sampled_from([0x04, 0x04, 0x03, 0x03, 0x0C, 0x16, 0x24, 0x23, 0x30, 0x05]) | st.integers(0, 255))
    content = draw(contents)
    if tag == 0x03:
        content = bytes([draw(st.sampled_from([0, 0, 0, 1, 7, 8, 0xFF]))]) + content
    n = len(content)
    form = draw(st.sampled_from(["minimal", "minimal", "minimal", "long-for-short", "leading-zero",
                                 "indefinite", "five-bytes", "off-by-one"]))
    if form == "minimal":
        length = profile._der_length(n)
    elif form == "long-for-short":
        length = bytes([0x81, n]) if n < 256 else profile._der_length(n)
    elif form == "leading-zero":
        body = n.to_bytes(2, "big") if n < 65536 else n.to_bytes(4, "big")
        length = bytes([0x80 | (len(body) + 1)]) + b"\x00" + body
    elif form == "indefinite":
        length, content = b"\x80", content + b"\x00\x00"
    elif form == "five-bytes":
        length = b"\x85" + n.to_bytes(5, "big")
    else:
        length = profile._der_length(max(0, n + draw(st.sampled_from([-1, 1]))))
    return bytes([tag]) + length + content


# --- attribute values ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALUE_FILES, ids=ids(VALUE_FILES))
def test_attr_value_seed(path: Path) -> None:
    for attr in ATTRS:
        check_attr_value(attr, path.read_bytes())


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("form", ["octet", "bitstring"])
def test_attr_value_seed_valid_values_are_accepted(n: int, form: str) -> None:
    """The corpus is meaningful: each attribute's valid seed parses (both encodings)."""
    attr = profile.ATTRIBUTES[n - 1]
    assert check_attr_value(attr, (VALUE_FILES[0].parent / f"attr{n}-{form}.der").read_bytes())


@pytest.mark.parametrize("name,reason", [
    ("nonminimal-long-short.der", "bad-encoding"), ("nonminimal-leading-zero.der", "bad-encoding"),
    ("indefinite-length.der", "bad-encoding"), ("trailing-data.der", "bad-encoding"),
    ("bitstring-unused-bits.der", "bad-encoding"), ("octet-constructed.der", "bad-encoding"),
    ("bad-utf8.der", "bad-encoding"), ("utf8-surrogate.der", "bad-encoding"),
    ("over-4096-bytes.der", "invalid-attributes"), ("trailing-newline.der", "invalid-attributes"),
    ("comma-empty-item.der", "invalid-attributes"), ("fullwidth-digit.der", "invalid-attributes"),
])
def test_attr_value_seed_edge_cases_are_refused(name: str, reason: str) -> None:
    with pytest.raises(AuthRefused) as info:
        profile.parse_value(profile.GLOBAL_SECONDARY_GROUP_NAMES, (VALUE_FILES[0].parent / name).read_bytes())
    assert info.value.reason == reason


@seeded
@fuzz_settings()
@given(attr=st.sampled_from(ATTRS), der=st.one_of(fuzz_bytes(VALUE_SEEDS), der_values()))
def test_attr_value_fuzz(attr: profile.XOSAttribute, der: bytes) -> None:
    check_attr_value(attr, der)


@seeded
@fuzz_settings(weight=0.5)
@given(data=st.data())
def test_valid_names_round_trip(data: st.DataObject) -> None:
    """No false refusals: any names the rules allow come back unchanged, in both encodings."""
    attr = data.draw(st.sampled_from(ATTRS))
    names = data.draw(st.lists(st.from_regex(attr.rule.pattern, fullmatch=True),
                               min_size=0 if attr.multi else 1, max_size=4 if attr.multi else 1))
    text = ",".join(names)
    for encode in (profile.encode_value, profile.encode_bit_string_value):
        assert profile.parse_value(attr, encode(text)) == (tuple(names) if attr.multi else names[0])


# --- whole certificates: profile.parse_certificate -------------------------------------------------


@pytest.mark.parametrize("path", CERT_FILES, ids=ids(CERT_FILES))
def test_xos_cert_seed(path: Path) -> None:
    check_xos_cert(path.read_bytes())


@pytest.mark.parametrize("name,reason", [
    ("duplicate-userid.der", "invalid-attributes"), ("critical-userid.der", "invalid-attributes"),
    ("unknown-arc-critical.der", "invalid-attributes"), ("bad-utf8-userid.der", "bad-encoding"),
    ("wrong-type-userid.der", "bad-encoding"), ("xosca-ecdsa.der", None), ("all-eight-attributes.der", None),
    ("bitstring-values.der", None), ("unknown-arc-noncritical.der", None), ("service-cert-no-userid.der", None),
])
def test_xos_cert_seed_outcomes(name: str, reason: str | None) -> None:
    data = (CERT_FILES[0].parent / name).read_bytes()
    if reason is None:
        assert check_xos_cert(data) is not None
        return
    cert = x509.load_der_x509_certificate(data)
    with pytest.raises(AuthRefused) as info:
        profile.parse_certificate(cert)
    assert info.value.reason == reason


@seeded
@fuzz_settings()
@given(der=st.one_of(mutated(CERT_SEEDS, max_ops=3),
                     st.sampled_from(CERT_SEEDS).flatmap(lambda s: mutate_der(s, der_values()))))
def test_xos_cert_fuzz(der: bytes) -> None:
    check_xos_cert(der)


# --- the verifier, on hostile certificates its CA really signed ------------------------------------


@pytest.fixture(scope="module")
def x509_ca(tmp_path_factory: pytest.TempPathFactory):
    ca = make_ca(tmp_path_factory.mktemp("fuzz-x509-ca"), "dev")
    key = ec.generate_private_key(ec.SECP256R1())
    leaves = [der(make_leaf(ca, key=key)[0]),
              der(make_leaf(ca, key=key, groups=(), role=None, user="bob.smith@site")[0]),
              der(make_leaf(ca, key=key, xos=xos_exts(profile.XOSAttributes(
                  primary_vo="dev", secondary_vos=("physics",), user_id="carol", primary_group="g1",
                  secondary_groups=("g2", "g3"), role="r", group=("x",), subgroup=("y", "z"))), cn="carol")[0])]
    return ca, verifier(ca), key, leaves


def _resign_tbs(ca, cert_der: bytes, tbs: bytes) -> bytes:
    return resign(cert_der, tbs, ca.key)


@seeded
@fuzz_settings(weight=0.5)
@given(data=st.data())
def test_verifier_x509_resigned_fuzz(x509_ca, data: st.DataObject) -> None:
    """DER-tree mutations of a real leaf's TBS, re-signed by the trusted CA: the verifier
    refuses with a reason code or returns an identity that obeys every name rule."""
    ca, v, _key, leaves = x509_ca
    leaf = data.draw(st.sampled_from(leaves))
    tbs = split_certificate(leaf)[0]
    new_tbs = data.draw(mutate_der(tbs, der_values()))
    cert_der = _resign_tbs(ca, leaf, new_tbs)
    check_xos_cert(cert_der)
    check_verify_x509(v, cert_der, "dev")


_UNKNOWN_ARC = [x509.ObjectIdentifier("1.34.5.0.14.99"), x509.ObjectIdentifier("1.34.5.0.140")]
_VALID = {profile.GLOBAL_PRIMARY_VO_NAME.oid: "dev", profile.GLOBAL_USER_ID.oid: "alice",
          profile.GLOBAL_PRIMARY_GROUP_NAME.oid: "users", profile.GLOBAL_SECONDARY_GROUP_NAMES.oid: "staff,ops",
          profile.ROLE.oid: "worker"}
attr_values = st.one_of(der_values(), mutated(VALUE_SEEDS, max_ops=2),
                        names_ish.map(lambda t: profile.encode_value(t.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))))


@st.composite
def xos_extension_sets(draw) -> list[tuple[x509.ObjectIdentifier, bytes, bool]]:
    """A valid attribute set with 1..3 edits: a value replaced, an attribute dropped, an
    unknown arc OID added, or an extension made critical."""
    exts = {oid: [profile.encode_value(text), False] for oid, text in _VALID.items()}
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "value", "value", "drop", "add", "critical"]))
        oid = draw(st.sampled_from([a.oid for a in ATTRS] + _UNKNOWN_ARC))
        if op == "drop":
            exts.pop(oid, None)
        elif op == "critical" and oid in exts:
            exts[oid][1] = True
        else:
            exts[oid] = [draw(attr_values), exts.get(oid, [b"", False])[1]]
    return [(oid, value, critical) for oid, (value, critical) in exts.items()]


@seeded
@fuzz_settings(weight=0.5)
@given(exts=xos_extension_sets(),
       cn=st.one_of(st.just("alice"), st.sampled_from(["Alice", "alice ", "bob"]), st.none(), names_ish.filter(bool)))
def test_verifier_x509_generated_attributes(x509_ca, exts, cn) -> None:
    """Certificates signed by the trusted CA with edited XOS extensions and CN."""
    ca, v, key, _ = x509_ca
    try:
        cert, _ = make_leaf(ca, key=key, xos=exts, cn=cn or None)
    except ValueError:
        return  # cryptography will not build that subject (e.g. an over-long CN)
    identity = check_verify_x509(v, der(cert), "dev")
    if identity is not None:
        assert identity.user == cn


@seeded
@fuzz_settings(weight=0.5)
@given(data=st.data())
def test_verifier_x509_valid_attributes_accepted(x509_ca, data: st.DataObject) -> None:
    """No false refusals end to end: rule-abiding attributes give exactly that identity."""
    ca, v, key, _ = x509_ca
    name = lambda rule: st.from_regex(rule.pattern, fullmatch=True)  # noqa: E731
    user = data.draw(name(profile.USER_RULE))
    groups = data.draw(st.lists(name(profile.GROUP_RULE), max_size=4, unique=True))
    role = data.draw(st.none() | name(profile.ROLE_RULE))
    cert, _ = make_leaf(ca, key=key, user=user, groups=groups, role=role)
    identity = v.verify_x509_chain([der(cert)])
    check_identity(identity, "dev")
    assert (identity.user, identity.groups, identity.role) == (user, tuple(groups), role)
