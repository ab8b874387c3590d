"""The XOS-cert profile: OIDs, DER codec of the attribute values, name rules, strict parsing."""

from __future__ import annotations

import pytest
from auth_certs import make_ca, make_leaf, refused, with_duplicate_extension, xos_exts
from cryptography import x509

from xos_sshd.auth import profile
from xos_sshd.auth.errors import REASON_CODES, AuthRefused
from xos_sshd.auth.profile import (
    GLOBAL_PRIMARY_VO_NAME,
    GLOBAL_SECONDARY_GROUP_NAMES,
    GLOBAL_USER_ID,
    ROLE,
    XOSAttributes,
    decode_value,
    encode_bit_string_value,
    encode_value,
    parse_certificate,
    parse_value,
)


def test_oids_are_the_xtreemos_arc():
    assert profile.XOS_ARC == "1.34.5.0.14"
    expected = {
        "GlobalPrimaryVOName": 1,
        "GlobalSecondaryVONames": 2,
        "GlobalUserID": 3,
        "GlobalPrimaryGroupName": 4,
        "GlobalSecondaryGroupNames": 5,
        "Role": 6,
        "Group": 7,
        "Subgroup": 8,
    }
    assert {a.name: int(a.oid.dotted_string.rsplit(".", 1)[1]) for a in profile.ATTRIBUTES} == expected
    assert all(a.oid.dotted_string.startswith("1.34.5.0.14.") for a in profile.ATTRIBUTES)


def test_reason_codes_include_the_documented_set():
    # docs/internals.md fixes these; other parts of auth may add their own (e.g. sshhook)
    assert REASON_CODES >= {
        "bad-encoding", "expired", "not-yet-valid", "unknown-ca", "bad-signature", "revoked",
        "crl-unavailable", "missing-attributes", "invalid-attributes", "vo-mismatch",
        "service-certificate", "weak-key", "wrong-usage",
    }
    with pytest.raises(ValueError):
        AuthRefused("no-such-reason", "x")


def test_value_encoding_is_der_octet_string_of_utf8():
    assert encode_value("dev") == b"\x04\x03dev"
    long = "a" * 200
    assert encode_value(long) == b"\x04\x81\xc8" + long.encode()
    assert decode_value(GLOBAL_USER_ID, encode_value("alice")) == "alice"
    assert decode_value(GLOBAL_USER_ID, encode_value(long)) == long


def test_bit_string_value_is_accepted():
    assert encode_bit_string_value("alice") == b"\x03\x06\x00alice"
    assert parse_value(GLOBAL_USER_ID, encode_bit_string_value("alice")) == "alice"


@pytest.mark.parametrize(
    "der, fragment",
    [
        (b"\x0c\x05alice", "UTF8String"),  # wrong ASN.1 type
        (b"\x13\x05alice", "PrintableString"),
        (b"\x30\x03\x04\x01a", "SEQUENCE"),
        (b"\x24\x07\x04\x05alice", "constructed OCTET STRING"),
        (b"\x04\x06alice", "truncated"),
        (b"\x04\x04alice", "trailing data"),
        (b"\x04\x80alice\x00\x00", "indefinite"),
        (b"\x04\x81\x05alice", "non-minimal"),
        (b"\x04", "truncated"),
        (b"\x03\x06\x03alice", "unused bits"),
        (b"\x03\x00", "unused bits"),
        (b"\x04\x03\xff\xfea", "UTF-8"),
        (b"\x04\x02\xc3\x28", "UTF-8"),
    ],
)
def test_malformed_values_are_bad_encoding(der, fragment):
    with refused("bad-encoding", "GlobalUserID", fragment):
        parse_value(GLOBAL_USER_ID, der)


def test_oversized_value_is_refused():
    with refused("invalid-attributes", "too long"):
        parse_value(GLOBAL_SECONDARY_GROUP_NAMES, encode_value(",".join(["g"] * 3000)))


@pytest.mark.parametrize(
    "attr, text, fragment",
    [
        (GLOBAL_PRIMARY_VO_NAME, "a" * 32, "too long"),
        (GLOBAL_USER_ID, "u" * 65, "too long"),
        (ROLE, "r" * 65, "too long"),
        (GLOBAL_PRIMARY_VO_NAME, "Dev", "illegal characters"),  # VO names are lowercase
        (GLOBAL_PRIMARY_VO_NAME, "dev@x", "illegal characters"),
        (GLOBAL_PRIMARY_VO_NAME, "-dev", "illegal characters"),
        (GLOBAL_USER_ID, "alice smith", "illegal characters"),
        (GLOBAL_USER_ID, "alice/../root", "illegal characters"),
        (GLOBAL_USER_ID, "älice", "illegal characters"),
        (GLOBAL_USER_ID, "alice\n", "illegal characters"),
        (GLOBAL_USER_ID, ".alice", "illegal characters"),
        (GLOBAL_USER_ID, "alice,bob", "illegal characters"),  # single-valued: no lists
        (GLOBAL_USER_ID, "", "empty"),
        (GLOBAL_SECONDARY_GROUP_NAMES, "a,,b", "empty"),
        (GLOBAL_SECONDARY_GROUP_NAMES, "a, b", "illegal characters"),
        (GLOBAL_SECONDARY_GROUP_NAMES, "a,b:c", "illegal characters"),
    ],
)
def test_name_rules_refuse(attr, text, fragment):
    with refused("invalid-attributes", attr.name, fragment):
        parse_value(attr, encode_value(text))


def test_name_rules_accept_boundaries():
    assert parse_value(GLOBAL_PRIMARY_VO_NAME, encode_value("a" * 31)) == "a" * 31
    assert parse_value(GLOBAL_PRIMARY_VO_NAME, encode_value("0vo_x.y-z")) == "0vo_x.y-z"
    assert parse_value(GLOBAL_USER_ID, encode_value("U" * 64)) == "U" * 64
    assert parse_value(GLOBAL_USER_ID, encode_value("Alice.Smith@site-1_x")) == "Alice.Smith@site-1_x"
    assert parse_value(GLOBAL_SECONDARY_GROUP_NAMES, encode_value("a,B,c@d")) == ("a", "B", "c@d")
    assert parse_value(GLOBAL_SECONDARY_GROUP_NAMES, encode_value("")) == ()
    assert profile.VO_NAME_RE.fullmatch("dev") and not profile.VO_NAME_RE.fullmatch("dev\n")


def test_attributes_roundtrip_through_a_certificate(tmp_path):
    ca = make_ca(tmp_path)
    attrs = XOSAttributes(
        primary_vo="dev",
        secondary_vos=("other", "third"),
        user_id="alice",
        primary_group="users",
        secondary_groups=("staff", "users", "VOAdmin"),
        role="worker",
        group=("g1",),
        subgroup=("s1", "s2"),
    )
    cert, _ = make_leaf(ca, xos=xos_exts(attrs))
    parsed = parse_certificate(cert)
    assert parsed == attrs
    assert parsed.groups == ("users", "staff", "VOAdmin")
    assert not parsed.is_service_certificate
    # every XOS extension is non-critical and an OCTET STRING
    for ext in cert.extensions:
        if ext.oid in profile.BY_OID:
            assert not ext.critical
            assert ext.value.value[0] == 0x04


def test_bit_string_encoded_certificate_parses(tmp_path):
    ca = make_ca(tmp_path)
    xos = [
        (GLOBAL_PRIMARY_VO_NAME.oid, encode_bit_string_value("dev"), False),
        (GLOBAL_USER_ID.oid, encode_bit_string_value("alice"), False),
    ]
    cert, _ = make_leaf(ca, xos=xos)
    assert parse_certificate(cert) == XOSAttributes(primary_vo="dev", user_id="alice")


def test_missing_user_id_is_a_service_certificate(tmp_path):
    ca = make_ca(tmp_path)
    cert, _ = make_leaf(ca, user=None, cn="www.example.org")
    assert parse_certificate(cert).is_service_certificate


def test_critical_xos_extension_is_refused(tmp_path):
    ca = make_ca(tmp_path)
    xos = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False), (GLOBAL_USER_ID.oid, encode_value("alice"), True)]
    cert, _ = make_leaf(ca, xos=xos)
    with refused("invalid-attributes", "GlobalUserID", "critical"):
        parse_certificate(cert)


def test_unknown_arc_extension_ignored_unless_critical(tmp_path):
    ca = make_ca(tmp_path)
    base = [(GLOBAL_PRIMARY_VO_NAME.oid, encode_value("dev"), False)]
    future = x509.ObjectIdentifier("1.34.5.0.14.42")
    cert, _ = make_leaf(ca, xos=base + [(future, b"\x04\x01x", False)])
    assert parse_certificate(cert).primary_vo == "dev"
    cert, _ = make_leaf(ca, xos=base + [(future, b"\x04\x01x", True)])
    with refused("invalid-attributes", "1.34.5.0.14.42"):
        parse_certificate(cert)


def test_duplicate_extension_is_refused(tmp_path):
    ca = make_ca(tmp_path)
    cert = x509.load_der_x509_certificate(with_duplicate_extension(ca, oid_number=3))
    assert ca.issued(cert)  # correctly signed: the duplicate is the only fault
    with refused("invalid-attributes", "duplicate", "GlobalUserID"):
        parse_certificate(cert)


def test_issuing_side_validates_too():
    with refused("invalid-attributes", "GlobalUserID"):
        XOSAttributes(primary_vo="dev", user_id="bad name").to_extensions()
    with refused("invalid-attributes", "GlobalSecondaryGroupNames"):
        XOSAttributes(primary_vo="dev", secondary_groups=("a,b",)).to_extensions()


def test_ssh_extension_codec():
    assert profile.encode_ssh_extension_data("dev") == b"\x00\x00\x00\x03dev"
    assert profile.decode_ssh_extension_data("vo@xos", b"\x00\x00\x00\x03dev") == "dev"
    parsed = profile.parse_ssh_extensions(
        {
            "vo@xos": profile.encode_ssh_extension_data("dev"),
            "groups@xos": profile.encode_ssh_extension_data("users,staff,users"),
            "role@xos": profile.encode_ssh_extension_data("worker"),
            "permit-pty": b"",
        }
    )
    assert parsed == profile.SSHAttributes(vo="dev", groups=("users", "staff"), role="worker")
    with refused("bad-encoding", "vo@xos"):
        profile.parse_ssh_extensions({"vo@xos": b"dev"})
    with refused("bad-encoding", "vo@xos", "UTF-8"):
        profile.parse_ssh_extensions({"vo@xos": b"\x00\x00\x00\x02\xff\xfe"})
    with refused("invalid-attributes", "groups@xos"):
        profile.parse_ssh_extensions({"groups@xos": profile.encode_ssh_extension_data("a b")})
