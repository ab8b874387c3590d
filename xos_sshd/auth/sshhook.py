"""The one place where asyncssh's public-key authentication meets the XOS verifier.

Why a hook: asyncssh (2.24, issues #155 and #642) has no public API that hands the server
the client's certificate, and it checks no CRL.  Its X.509 path also only accepts a chain
when an authorized-keys entry matches, and an entry with ``principals=`` turns its
login-name check off entirely.  So the gateway uses none of that: it replaces, per
connection, ``SSHServerConnection.validate_public_key(username, key_data, msg, signature)``
— the single method asyncssh's ``publickey`` handler calls with the raw key blob — by
:func:`_validate` below, which

1. decodes the blob (an RFC 6187 X.509 chain or an OpenSSH user certificate; plain keys are
   refused) and hands it to the one :class:`~xos_sshd.auth.verifier.Verifier`;
2. for a probe without signature, answers whether this certificate would be accepted;
3. for a signed request, verifies the signature over ``session id || msg`` exactly as
   asyncssh does (``conn._session_id`` is the one private attribute used), and only then
4. lets the gateway apply its login-name rule and the mapping.

``pyproject.toml`` pins asyncssh to the 2.24 series, and ``tests/test_sshhook.py`` fails if
an upgrade changes the method's signature, the probe/sign sequence or the session id.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

import asyncssh
from asyncssh.packet import String
from asyncssh.public_key import KeyImportError, decode_ssh_certificate

from .errors import AuthRefused
from .identity import VOIdentity

log = logging.getLogger(__name__)

X509_PREFIX = b'x509v3-'


@dataclass(frozen=True)
class CertificateCheck:
    """What the verifier made of one offered certificate."""

    identity: VOIdentity
    key: asyncssh.SSHKey
    route: str  # 'x509' or 'openssh'


class LoginPolicy(Protocol):
    """The gateway side of the hook (implemented by the per-connection server object)."""

    def certificate_refused(self, username: str, exc: AuthRefused) -> None: ...

    def accept_login(self, username: str, check: CertificateCheck) -> Awaitable[bool]: ...


def check_certificate(verify_x509: Callable[[list[bytes]], VOIdentity],
                      verify_openssh: Callable[[bytes], VOIdentity],
                      key_data: bytes) -> CertificateCheck:
    """Decode *key_data* and run it through the verifier; raise AuthRefused otherwise."""
    try:
        cert = decode_ssh_certificate(key_data)
    except KeyImportError as exc:
        raise AuthRefused('not-a-certificate',
                          f'only XOS-cert logins are accepted (X.509 chain or OpenSSH '
                          f'certificate from a VO CA): {exc}') from None
    if key_data[4:4 + len(X509_PREFIX)] == X509_PREFIX:
        return CertificateCheck(verify_x509(x509_chain_from_blob(key_data)), cert.key, 'x509')
    return CertificateCheck(verify_openssh(key_data), cert.key, 'openssh')


def x509_chain_from_blob(blob: bytes) -> list[bytes]:
    """Split an RFC 6187 ``x509v3-*`` public key blob into its DER certificates, leaf first."""
    def take(offset: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from('>I', blob, offset)
        end = offset + 4 + length
        if end > len(blob):
            raise AuthRefused('bad-encoding', 'truncated X.509 certificate chain')
        return blob[offset + 4:end], end

    _alg, offset = take(0)
    (count,) = struct.unpack_from('>I', blob, offset)
    offset += 4
    if not 1 <= count <= 8:
        raise AuthRefused('bad-encoding', f'X.509 chain of {count} certificates')
    chain = []
    for _ in range(count):
        der, offset = take(offset)
        chain.append(der)
    return chain


def install(conn: asyncssh.SSHServerConnection, policy: LoginPolicy,
            checker: Callable[[bytes], CertificateCheck]) -> None:
    """Route *conn*'s public-key authentication through *checker* and *policy*."""
    cache: dict[bytes, CertificateCheck] = {}

    async def _validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        try:
            check = cache.get(key_data) or checker(key_data)
        except AuthRefused as exc:
            policy.certificate_refused(username, exc)
            return False
        except Exception:  # a verifier bug must refuse this login, not kill the connection
            log.exception('certificate check failed unexpectedly for %r', username)
            policy.certificate_refused(
                username, AuthRefused('bad-encoding', 'the certificate could not be checked'))
            return False
        if not msg:
            # A probe: remember the verdict so the signed request does not verify twice.
            cache.clear()
            cache[key_data] = check
            return True
        cache.clear()
        session_id: bytes = conn._session_id  # noqa: SLF001 - see the module docstring
        if not check.key.verify(String(session_id) + msg, signature):
            policy.certificate_refused(
                username, AuthRefused('bad-proof', 'the signature does not prove possession '
                                      'of the certificate key'))
            return False
        return await policy.accept_login(username, check)

    conn.validate_public_key = _validate  # type: ignore[method-assign]
