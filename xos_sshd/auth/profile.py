"""The XOS-cert profile: the XtreemOS VO attributes, their encoding and the name rules.

This module is the single definition of the profile; ``ca.py`` issues with it and ``verifier.py``
reads with it, so the two can never disagree.

X.509 side
    Each VO attribute is its own **non-critical** extension under the original XtreemOS arc
    ``1.34.5.0.14`` (so certificates and tools of the XtreemOS era interoperate). The extension
    value (the content of ``extnValue``) is a DER ``OCTET STRING`` holding UTF-8 text; a DER
    ``BIT STRING`` (zero unused bits) is accepted on input because the original reader accepted
    it. Multi-valued attributes are comma-separated, without spaces.

OpenSSH side
    The same CA mints an OpenSSH user certificate whose extensions ``vo@xos``, ``groups@xos``
    (comma-separated, primary group first) and ``role@xos`` carry the same values; the data of
    each is an SSH ``string`` holding the UTF-8 text, as ``ssh-keygen -O extension:NAME=VALUE``
    writes it.

Parsing is strict: malformed DER, a wrong ASN.1 type, bad UTF-8, an over-long value, an illegal
character, a duplicate or a critical XOS extension all refuse the certificate with an
:class:`~xos_sshd.auth.errors.AuthRefused` whose message names the attribute.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from .errors import AuthRefused
from .identity import dedupe

#: The XtreemOS XOS-cert arc. Do not change: it is what XtreemOS-era certificates carry.
XOS_ARC: Final[str] = "1.34.5.0.14"

#: Upper bound on one extension's raw text, whatever the attribute (a DoS guard, not a rule).
MAX_VALUE_BYTES: Final[int] = 4096

# --- name rules: one documented regex per kind (always matched with ``fullmatch``) ------------

#: VO names: lowercase letters, digits, ``_.-``; start with a letter or digit; 1..31 characters.
#: Lowercase only because VO names become parts of local account names and file paths.
VO_NAME_RE: Final[re.Pattern[str]] = re.compile(r"[a-z0-9][a-z0-9_.-]{0,30}")
#: VO user ids (GlobalUserID): ASCII letters, digits, ``_.@-``; start alphanumeric; 1..64 chars.
USER_ID_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: Group names (primary, secondary, Group, Subgroup): same alphabet and length as user ids.
GROUP_NAME_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: Role names: same alphabet and length as user ids.
ROLE_NAME_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class NameRule:
    """A kind of name (VO, user, group, role): its regex and maximum length in characters.

    ``max_length`` duplicates the regex's bound so an over-long name gets its own message.
    """

    kind: str
    pattern: re.Pattern[str]
    max_length: int
    alphabet: str

    def check(self, value: str, label: str) -> str:
        """Return ``value`` if it is a valid name of this kind, else raise ``invalid-attributes``."""
        if not value:
            raise AuthRefused("invalid-attributes", f"{label}: empty {self.kind} name")
        if len(value) > self.max_length:
            raise AuthRefused(
                "invalid-attributes",
                f"{label}: {self.kind} name is too long ({len(value)} > {self.max_length} characters)",
            )
        if self.pattern.fullmatch(value) is None:
            raise AuthRefused(
                "invalid-attributes",
                f"{label}: {self.kind} name {value!r} has illegal characters (allowed: {self.alphabet})",
            )
        return value

    def is_valid(self, value: str) -> bool:
        """True when ``value`` satisfies the rule (for argument checking in tools)."""
        return len(value) <= self.max_length and self.pattern.fullmatch(value) is not None


VO_RULE: Final = NameRule("VO", VO_NAME_RE, 31, "a-z 0-9 _ . -, starting with a-z or 0-9")
USER_RULE: Final = NameRule("user", USER_ID_RE, 64, "A-Z a-z 0-9 _ . @ -, starting alphanumeric")
GROUP_RULE: Final = NameRule("group", GROUP_NAME_RE, 64, "A-Z a-z 0-9 _ . @ -, starting alphanumeric")
ROLE_RULE: Final = NameRule("role", ROLE_NAME_RE, 64, "A-Z a-z 0-9 _ . @ -, starting alphanumeric")


# --- the attributes -------------------------------------------------------------------------


@dataclass(frozen=True)
class XOSAttribute:
    """One XOS attribute: its XtreemOS name, OID, cardinality, name rule and dataclass field."""

    name: str
    oid: x509.ObjectIdentifier
    multi: bool
    rule: NameRule
    field: str

    @property
    def label(self) -> str:
        """``Name (oid)``: how messages refer to the attribute."""
        return f"{self.name} ({self.oid.dotted_string})"


def _attr(n: int, name: str, multi: bool, rule: NameRule, fld: str) -> XOSAttribute:
    return XOSAttribute(name, x509.ObjectIdentifier(f"{XOS_ARC}.{n}"), multi, rule, fld)


GLOBAL_PRIMARY_VO_NAME: Final = _attr(1, "GlobalPrimaryVOName", False, VO_RULE, "primary_vo")
GLOBAL_SECONDARY_VO_NAMES: Final = _attr(2, "GlobalSecondaryVONames", True, VO_RULE, "secondary_vos")
GLOBAL_USER_ID: Final = _attr(3, "GlobalUserID", False, USER_RULE, "user_id")
GLOBAL_PRIMARY_GROUP_NAME: Final = _attr(4, "GlobalPrimaryGroupName", False, GROUP_RULE, "primary_group")
GLOBAL_SECONDARY_GROUP_NAMES: Final = _attr(
    5, "GlobalSecondaryGroupNames", True, GROUP_RULE, "secondary_groups"
)
ROLE: Final = _attr(6, "Role", False, ROLE_RULE, "role")
GROUP: Final = _attr(7, "Group", True, GROUP_RULE, "group")
SUBGROUP: Final = _attr(8, "Subgroup", True, GROUP_RULE, "subgroup")

#: All attributes, in OID order (the order ``ca.py`` writes them).
ATTRIBUTES: Final[tuple[XOSAttribute, ...]] = (
    GLOBAL_PRIMARY_VO_NAME,
    GLOBAL_SECONDARY_VO_NAMES,
    GLOBAL_USER_ID,
    GLOBAL_PRIMARY_GROUP_NAME,
    GLOBAL_SECONDARY_GROUP_NAMES,
    ROLE,
    GROUP,
    SUBGROUP,
)
BY_OID: Final[Mapping[x509.ObjectIdentifier, XOSAttribute]] = {a.oid: a for a in ATTRIBUTES}
BY_NAME: Final[Mapping[str, XOSAttribute]] = {a.name: a for a in ATTRIBUTES}


def attribute_label(oid: x509.ObjectIdentifier) -> str:
    """Human label for an extension OID: the XOS attribute name when it is one."""
    attr = BY_OID.get(oid)
    return attr.label if attr else oid.dotted_string


# --- DER codec of one extension value -----------------------------------------------------------

_TAG_OCTET_STRING: Final = 0x04
_TAG_BIT_STRING: Final = 0x03
_TAG_NAMES: Final[Mapping[int, str]] = {
    0x01: "BOOLEAN",
    0x02: "INTEGER",
    0x03: "BIT STRING",
    0x04: "OCTET STRING",
    0x05: "NULL",
    0x06: "OBJECT IDENTIFIER",
    0x0C: "UTF8String",
    0x13: "PrintableString",
    0x16: "IA5String",
    0x1E: "BMPString",
    0x23: "constructed BIT STRING",
    0x24: "constructed OCTET STRING",
    0x30: "SEQUENCE",
    0x31: "SET",
}


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode_value(text: str) -> bytes:
    """DER-encode an attribute's text as the extension value: ``OCTET STRING`` of UTF-8."""
    data = text.encode("utf-8")
    return bytes([_TAG_OCTET_STRING]) + _der_length(len(data)) + data


def encode_bit_string_value(text: str) -> bytes:
    """DER-encode text as a ``BIT STRING`` (zero unused bits): the legacy form we still read."""
    data = b"\x00" + text.encode("utf-8")
    return bytes([_TAG_BIT_STRING]) + _der_length(len(data)) + data


def _der_content(der: bytes, label: str) -> tuple[int, bytes]:
    """Split one DER TLV that must span all of ``der``; refuse non-DER length forms."""

    def bad(why: str) -> AuthRefused:
        return AuthRefused("bad-encoding", f"{label}: malformed DER ({why})")

    if len(der) < 2:
        raise bad("truncated")
    tag, first = der[0], der[1]
    if first < 0x80:
        length, offset = first, 2
    elif first == 0x80:
        raise bad("indefinite length")
    else:
        count = first & 0x7F
        if count > 4 or len(der) < 2 + count:
            raise bad("bad length")
        raw = der[2 : 2 + count]
        length, offset = int.from_bytes(raw, "big"), 2 + count
        if raw[0] == 0 or length < 0x80:
            raise bad("non-minimal length")
    if len(der) < offset + length:
        raise bad("truncated")
    if len(der) > offset + length:
        raise bad("trailing data")
    return tag, der[offset:]


def decode_value(attr: XOSAttribute, der: bytes) -> str:
    """Decode one extension value to text, checking DER, ASN.1 type, size and UTF-8.

    Only the encoding is checked here; :func:`parse_value` also applies the name rules.
    """
    tag, content = _der_content(der, attr.label)
    if tag == _TAG_BIT_STRING:
        if not content or content[0] != 0:
            raise AuthRefused("bad-encoding", f"{attr.label}: BIT STRING must have zero unused bits")
        content = content[1:]
    elif tag != _TAG_OCTET_STRING:
        kind = _TAG_NAMES.get(tag, f"tag 0x{tag:02x}")
        raise AuthRefused(
            "bad-encoding", f"{attr.label}: wrong ASN.1 type {kind}, expected OCTET STRING"
        )
    if len(content) > MAX_VALUE_BYTES:
        raise AuthRefused(
            "invalid-attributes", f"{attr.label}: value too long ({len(content)} bytes)"
        )
    try:
        return content.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AuthRefused("bad-encoding", f"{attr.label}: value is not valid UTF-8") from None


def split_names(rule: NameRule, text: str, label: str, multi: bool) -> tuple[str, ...]:
    """Split (when ``multi``) and check names. An empty multi-valued text is the empty list."""
    if not multi:
        return (rule.check(text, label),)
    if text == "":
        return ()
    return tuple(rule.check(item, label) for item in text.split(","))


def parse_value(attr: XOSAttribute, der: bytes) -> str | tuple[str, ...]:
    """Decode and check one extension value: a name, or a tuple of names when multi-valued."""
    names = split_names(attr.rule, decode_value(attr, der), attr.label, attr.multi)
    return names if attr.multi else names[0]


# --- the attribute set --------------------------------------------------------------------------


@dataclass(frozen=True)
class XOSAttributes:
    """The XOS attributes of one certificate (absent single values are ``None``).

    ``Group`` and ``Subgroup`` are carried and checked for XtreemOS compatibility but do not
    feed the VOIdentity; the login groups are the primary then the secondary group names.
    """

    primary_vo: str | None = None
    secondary_vos: tuple[str, ...] = ()
    user_id: str | None = None
    primary_group: str | None = None
    secondary_groups: tuple[str, ...] = ()
    role: str | None = None
    group: tuple[str, ...] = ()
    subgroup: tuple[str, ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        """Primary group first, then the secondary ones, de-duplicated."""
        first = (self.primary_group,) if self.primary_group else ()
        return dedupe(first + self.secondary_groups)

    @property
    def is_service_certificate(self) -> bool:
        """True when there is no GlobalUserID: such a certificate never logs in."""
        return self.user_id is None

    def validate(self) -> None:
        """Check every present value against its name rule (raises ``invalid-attributes``)."""
        for attr in ATTRIBUTES:
            value = getattr(self, attr.field)
            if value is None:
                continue
            values = value if attr.multi else (value,)
            for item in values:
                if "," in item:
                    raise AuthRefused("invalid-attributes", f"{attr.label}: ',' inside a name")
                attr.rule.check(item, attr.label)

    def to_extensions(self) -> list[x509.UnrecognizedExtension]:
        """The extensions to put in a certificate, in OID order (validated first).

        Empty multi-valued attributes are omitted rather than written as an empty string.
        """
        self.validate()
        out: list[x509.UnrecognizedExtension] = []
        for attr in ATTRIBUTES:
            value = getattr(self, attr.field)
            if value is None or (attr.multi and not value):
                continue
            text = ",".join(value) if attr.multi else value
            out.append(x509.UnrecognizedExtension(attr.oid, encode_value(text)))
        return out

    def add_to(self, builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        """Return ``builder`` with these attributes added as non-critical extensions."""
        for ext in self.to_extensions():
            builder = builder.add_extension(ext, critical=False)
        return builder


def certificate_extensions(cert: x509.Certificate) -> x509.Extensions:
    """Return the certificate's extensions, mapping parse failures to ``AuthRefused``.

    cryptography refuses a certificate carrying the same extension twice (RFC 5280 forbids it);
    a duplicate XOS extension is ``invalid-attributes`` naming the attribute (two different
    values for, say, GlobalUserID must never be resolved by picking one), any other duplicate
    or undecodable standard extension is ``bad-encoding``.
    """
    try:
        return cert.extensions
    except x509.DuplicateExtension as exc:
        if exc.oid in BY_OID:
            raise AuthRefused(
                "invalid-attributes", f"duplicate extension {attribute_label(exc.oid)}"
            ) from None
        raise AuthRefused("bad-encoding", f"duplicate extension {exc.oid.dotted_string}") from None
    except ValueError as exc:
        raise AuthRefused("bad-encoding", f"undecodable certificate extension: {exc}") from None


def parse_certificate(cert: x509.Certificate) -> XOSAttributes:
    """Strictly read the XOS attributes of ``cert``.

    Refuses duplicates, critical XOS extensions and any malformed value. Unknown OIDs under the
    arc are ignored when non-critical (forward compatibility) and refused when critical.
    """
    values: dict[str, object] = {}
    for ext in certificate_extensions(cert):
        oid = ext.oid
        attr = BY_OID.get(oid)
        if attr is None:
            if oid.dotted_string.startswith(XOS_ARC + ".") and ext.critical:
                raise AuthRefused(
                    "invalid-attributes", f"unknown critical XOS extension {oid.dotted_string}"
                )
            continue
        if ext.critical:
            raise AuthRefused(
                "invalid-attributes",
                f"{attr.label}: extension is marked critical; XOS attributes must be non-critical",
            )
        raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else None
        if raw is None:  # pragma: no cover - cryptography knows none of our OIDs
            raise AuthRefused("bad-encoding", f"{attr.label}: unexpected extension type")
        values[attr.field] = parse_value(attr, raw)
    return XOSAttributes(**values)  # type: ignore[arg-type]


# --- OpenSSH certificate extensions ----------------------------------------------------------

SSH_EXT_VO: Final[str] = "vo@xos"
SSH_EXT_GROUPS: Final[str] = "groups@xos"
SSH_EXT_ROLE: Final[str] = "role@xos"


def ssh_extension_texts(vo: str, groups: Sequence[str], role: str | None) -> dict[str, str]:
    """The XOS OpenSSH-certificate extensions (name -> text) for an identity; checked first."""
    VO_RULE.check(vo, SSH_EXT_VO)
    for g in groups:
        GROUP_RULE.check(g, SSH_EXT_GROUPS)
    out = {SSH_EXT_VO: vo}
    if groups:
        out[SSH_EXT_GROUPS] = ",".join(groups)
    if role is not None:
        out[SSH_EXT_ROLE] = ROLE_RULE.check(role, SSH_EXT_ROLE)
    return out


def encode_ssh_extension_data(text: str | bytes) -> bytes:
    """The data of a value-bearing OpenSSH extension: an SSH ``string`` of the UTF-8 text.

    ``bytes`` are written as given (only tests use that, to build malformed certificates).
    """
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def decode_ssh_extension_data(name: str, data: bytes) -> str:
    """Inverse of :func:`encode_ssh_extension_data`, strict (exact length, UTF-8, size cap)."""
    if len(data) < 4 or int.from_bytes(data[:4], "big") != len(data) - 4:
        raise AuthRefused("bad-encoding", f"{name}: malformed extension data")
    if len(data) - 4 > MAX_VALUE_BYTES:
        raise AuthRefused("invalid-attributes", f"{name}: value too long ({len(data) - 4} bytes)")
    try:
        return data[4:].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AuthRefused("bad-encoding", f"{name}: value is not valid UTF-8") from None


@dataclass(frozen=True)
class SSHAttributes:
    """The XOS attributes read from an OpenSSH certificate's extensions."""

    vo: str | None
    groups: tuple[str, ...]
    role: str | None


def parse_ssh_extensions(extensions: Mapping[str, bytes]) -> SSHAttributes:
    """Strictly read ``vo@xos``, ``groups@xos`` and ``role@xos`` (other extensions ignored)."""
    vo = role = None
    groups: tuple[str, ...] = ()
    if SSH_EXT_VO in extensions:
        vo = VO_RULE.check(decode_ssh_extension_data(SSH_EXT_VO, extensions[SSH_EXT_VO]), SSH_EXT_VO)
    if SSH_EXT_GROUPS in extensions:
        text = decode_ssh_extension_data(SSH_EXT_GROUPS, extensions[SSH_EXT_GROUPS])
        groups = dedupe(split_names(GROUP_RULE, text, SSH_EXT_GROUPS, multi=True))
    if SSH_EXT_ROLE in extensions:
        text = decode_ssh_extension_data(SSH_EXT_ROLE, extensions[SSH_EXT_ROLE])
        role = ROLE_RULE.check(text, SSH_EXT_ROLE)
    return SSHAttributes(vo=vo, groups=groups, role=role)
