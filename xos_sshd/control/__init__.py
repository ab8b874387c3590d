"""The control socket: pam_xos, ``xos-ams`` and local tools talk to the running gateway.

See ``docs/internals.md`` (section "control socket") for the protocol and every op's fields.
"""

from __future__ import annotations

from .protocol import ControlError
from .server import ANY, ROOT, ControlServer, Op, Peer, Request


def control_ops() -> dict[str, Op]:
    """The dispatch table: every op the gateway serves, with the privilege it requires.

    Later op families (``cr.*``) add their table here.
    """
    from . import admin_ops, pam_ops  # here, not above: they import the gateway module
    return {**pam_ops.OPS, **admin_ops.OPS}


__all__ = ['ANY', 'ROOT', 'ControlError', 'ControlServer', 'Op', 'Peer', 'Request', 'control_ops']
