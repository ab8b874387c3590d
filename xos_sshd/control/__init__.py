"""The control socket: pam_xos, ``xos-ams`` and local tools talk to the running gateway.

See ``docs/internals.md`` (section "control socket") for the protocol and every op's fields.

The names below are loaded lazily (PEP 562), so that a client needing only the wire format
(:mod:`xos_sshd.control.protocol`, standard library only) can import it with any Python,
without the gateway's dependencies: ``xos-cr`` runs that way inside user sessions.
"""

from __future__ import annotations

from typing import Any

__all__ = ['ANY', 'ROOT', 'ControlError', 'ControlServer', 'Op', 'Peer', 'Request', 'control_ops',
           'cr_ops']


def control_ops() -> dict[str, Any]:
    """The dispatch table of the root-only control socket: every op with its privilege.

    The users' ``cr.*`` ops are *not* here: they are served on their own socket
    (:func:`cr_ops`), so a root-only op is never reachable through a socket users can open.
    """
    from . import admin_ops, pam_ops  # here, not above: they import the gateway module
    return {**pam_ops.OPS, **admin_ops.OPS}


def cr_ops() -> dict[str, Any]:
    """The dispatch table of the users' checkpoint/restart socket (``cr.*`` only)."""
    from ..cr import localops
    return dict(localops.OPS)


def __getattr__(name: str) -> Any:
    if name == 'ControlError':
        from .protocol import ControlError
        return ControlError
    if name in ('ANY', 'ROOT', 'ControlServer', 'Op', 'Peer', 'Request'):
        from . import server
        return getattr(server, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
