"""Errors raised by the authentication layer.

Every refusal of a credential -- whichever entry point saw it (SSH X.509 login, SSH OpenSSH-cert
login, ``xos-ca verify``, PAM) -- is an :class:`AuthRefused` carrying a *stable short reason code*
(logged, counted and matched on by callers and tests) and a human message naming what was wrong.
Configuration problems of the trust store itself are a different failure (the operator's, not the
client's) and raise :class:`TrustConfigError` instead.
"""

from __future__ import annotations

from typing import Final

#: The reason codes, fixed by docs/internals.md. Callers may match on them; never rename one.
REASON_CODES: Final[frozenset[str]] = frozenset(
    {
        "bad-encoding",  # unparseable DER / SSH wire data, wrong ASN.1 type, bad UTF-8
        "expired",  # leaf or CA past its notAfter / valid_before (beyond the allowed skew)
        "not-yet-valid",  # leaf or CA before its notBefore / valid_after (beyond the skew)
        "unknown-ca",  # no CA trusted by the configuration issued it (or its VO is unknown)
        "bad-signature",  # the issuer named matches a trusted CA but the signature does not verify
        "revoked",  # serial listed on the CA's CRL
        "crl-unavailable",  # CRL required but missing, unreadable, badly signed or stale
        "missing-attributes",  # a required XOS attribute (e.g. GlobalPrimaryVOName) is absent
        "invalid-attributes",  # attribute present but breaks the profile (name rules, critical...)
        "vo-mismatch",  # the VO named in the certificate is not the VO of the CA that signed it
        "service-certificate",  # no GlobalUserID: a service certificate never logs in
        "weak-key",  # RSA < 2048, unsupported curve / key type, weak signature hash
        "wrong-usage",  # keyUsage / extendedKeyUsage / basicConstraints / cert type do not fit
        "not-a-certificate",  # SSH login offered a plain key, not an XOS-cert or OpenSSH cert
        "bad-proof",  # the SSH signature does not prove possession of the certificate's key
    }
)


class AuthRefused(Exception):
    """A credential was refused.

    ``reason`` is one of :data:`REASON_CODES`; ``str(exc)`` is a one-line human message that
    names the offending attribute or check. The message never contains secrets, only data taken
    from the (public) certificate and the trust configuration.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASON_CODES:
            raise ValueError(f"unknown AuthRefused reason code {reason!r}")
        super().__init__(message)
        self.reason: str = reason
        self.message: str = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"AuthRefused({self.reason!r}, {self.message!r})"


class TrustConfigError(ValueError):
    """The trust configuration itself is unusable (CA file missing, not a CA, VO clash...).

    Raised when a :class:`~xos_sshd.auth.verifier.Verifier` is built or reloaded, so a gateway
    refuses to start with a broken trust store instead of refusing every login later.
    """
