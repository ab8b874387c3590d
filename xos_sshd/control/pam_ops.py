"""``pam.*`` ops: what pam_xos.so asks while a stock sshd logs a VO user in (root peers only).

``user`` is always PAM_USER, i.e. the *local account name*.  The auth path is the SSH login's
path: the one :class:`~xos_sshd.auth.verifier.Verifier`, then the gateway's login-name rule
and AMS calls (:meth:`Gateway.authorize` with ``existing_only``: PAM never creates a
mapping), the same audit line (``route: pam``); ``open_session`` creates the home exactly as
an SSH login does.
"""

from __future__ import annotations

import base64
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

from ..ams import LocalAccount, MappingRefused
from ..auth.challenge import MAX_ANSWER_CHARS, verify_challenge_answer
from ..auth.errors import AuthRefused
from ..gateway import LoginRefused
from .protocol import ControlError, one_line
from .server import ROOT, Op, Request

NONCE_BYTES = 32
#: A challenge must be answered within this long (the connection's idle timeout is shorter
#: anyway; this bounds a connection kept alive by other requests).
CHALLENGE_TTL = 120.0
#: pam.account re-verifies the certificate of an account that authenticated this recently.
RECHECK_WINDOW = 600.0
_RECENT_MAX = 4096
SERVICE_RE = re.compile(r'[A-Za-z0-9._+-]{1,64}')
ACCOUNT_RE = re.compile(r'[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,63}')


def _service(req: Request) -> str:
    service = req.text('service', max_len=64)
    if not SERVICE_RE.fullmatch(service):
        raise ControlError('bad-request', f'{req.op}: invalid PAM service name')
    return service


def _user(req: Request) -> str:
    user = req.text('user', max_len=64)
    if not ACCOUNT_RE.fullmatch(user):
        raise ControlError('bad-request', f'{req.op}: invalid account name')
    return user


def _source(req: Request) -> str | None:
    """PAM_RHOST as the PAM application set it: peer text, made inert for logs."""
    rhost = req.text('rhost', required=False, max_len=256)
    return None if rhost is None else one_line(rhost, 256)


def _recent(req: Request) -> dict[str, tuple[list[bytes], float]]:
    return req.server.shared.setdefault('pam_recent', {})


async def pam_challenge(req: Request) -> dict[str, Any]:
    """``{service, user}`` -> ``{nonce}``: a fresh nonce for this connection, usable once."""
    service, user = _service(req), _user(req)
    nonce = os.urandom(NONCE_BYTES)
    req.conn['pam_challenge'] = (nonce, service, user, time.monotonic())
    return {'nonce': base64.b64encode(nonce).decode('ascii')}


async def pam_auth(req: Request) -> dict[str, Any]:
    """``{service, user, answer[, rhost]}`` -> ``{account, uid, vo, user, role, not_after}``."""
    service, user = _service(req), _user(req)
    answer = req.text('answer', max_len=MAX_ANSWER_CHARS)
    source = _source(req)
    gateway = req.gateway
    pending = req.conn.pop('pam_challenge', None)  # single use, whatever happens next
    identity = None

    def refuse(reason: str, message: str) -> ControlError:
        gateway.audit_login(user, identity, 'pam', source, 'refused', reason, message,
                            service=service, pid=req.peer.pid)
        return ControlError(reason, message)

    if pending is None:
        raise refuse('no-challenge', 'no challenge pending on this connection '
                                     '(pam.challenge first; each challenge answers once)')
    nonce, c_service, c_user, issued = pending
    if (c_service, c_user) != (service, user):
        raise refuse('no-challenge', 'the pending challenge was issued for another service or user')
    if time.monotonic() - issued > CHALLENGE_TTL:
        raise refuse('no-challenge', f'the challenge is older than {CHALLENGE_TTL:g} s')
    try:
        verified = verify_challenge_answer(answer, nonce, service, user)
        identity = gateway.verifier.verify_x509_chain(verified.chain)
    except AuthRefused as exc:
        raise refuse(exc.reason, str(exc)) from None
    try:
        account = await gateway.authorize(user, identity, existing_only=True)
    except (LoginRefused, MappingRefused) as exc:
        raise refuse(exc.reason, str(exc)) from None
    gateway.audit_login(user, identity, 'pam', source, 'accepted', 'ok', '', account,
                        service=service, pid=req.peer.pid)
    recent = _recent(req)
    recent.pop(account.name, None)
    recent[account.name] = (verified.chain, time.monotonic())
    while len(recent) > _RECENT_MAX:
        del recent[next(iter(recent))]
    return {'account': account.name, 'uid': account.uid, 'vo': identity.vo, 'user': identity.user,
            'role': identity.role, 'not_after': identity.not_after.isoformat()}


async def pam_account(req: Request) -> dict[str, Any]:
    """``{service, user}`` -> ``{account, uid}``: is this mapped account allowed in right now?"""
    service, user = _service(req), _user(req)
    gateway = req.gateway
    try:
        record = await gateway.ams.get_mapping(user)
        if record is None:
            raise ControlError('not-mapped', f'{user!r} is not an account mapped by xos-sshd')
        if record.banned:
            raise ControlError('banned', f'account {user!r} is banned')
        if record.expired(datetime.now(UTC)):
            raise ControlError('lease-expired', f'the lease of account {user!r} has expired: '
                                                'log in with the certificate to renew it')
        recent = _recent(req).get(user)
        if recent is not None and time.monotonic() - recent[1] <= RECHECK_WINDOW:
            identity = gateway.verifier.verify_x509_chain(recent[0])  # expired? revoked since?
            acc = record.account
            if (identity.vo, identity.user) != (acc.vo, acc.vo_user):
                raise ControlError('login-name-mismatch',
                                   f'account {user!r} now serves {acc.vo_user}@{acc.vo}')
    except (ControlError, AuthRefused) as exc:
        gateway.audit.write('account', outcome='refused', reason=exc.reason, message=str(exc),
                            route='pam', service=service, account=user, pid=req.peer.pid)
        raise
    return {'account': user, 'uid': record.account.uid}


async def _session(req: Request, action: str) -> dict[str, Any]:
    service, user = _service(req), _user(req)
    tty = req.text('tty', required=False, max_len=256)
    tty = None if tty is None else one_line(tty, 256)
    rhost = _source(req)
    gateway = req.gateway
    account: LocalAccount | None = await gateway.ams.renew(user)
    if account is None:
        raise ControlError('not-mapped', f'{user!r} is not an account mapped by xos-sshd')
    created = False
    if action == 'open':
        try:
            created = await gateway.prepare_home(account)
        except LoginRefused as exc:
            gateway.audit.write('session', action=action, outcome='refused', reason=exc.reason,
                                message=str(exc), route='pam', service=service,
                                account=user, uid=account.uid, tty=tty, source=rhost,
                                pid=req.peer.pid)
            raise ControlError(exc.reason, str(exc)) from None
    gateway.audit.write('session', action=action, outcome='ok', route='pam', service=service,
                        account=user, uid=account.uid, vo=account.vo, user=account.vo_user,
                        tty=tty, source=rhost, pid=req.peer.pid)
    reply: dict[str, Any] = {'account': user, 'uid': account.uid}
    if action == 'open':
        reply.update(home=account.home, home_created=created)
    return reply


async def pam_open_session(req: Request) -> dict[str, Any]:
    """``{service, user[, tty, rhost]}`` -> ``{account, uid, home, home_created}``."""
    return await _session(req, 'open')


async def pam_close_session(req: Request) -> dict[str, Any]:
    """``{service, user[, tty, rhost]}`` -> ``{account, uid}``."""
    return await _session(req, 'close')


OPS: dict[str, Op] = {
    'pam.challenge': Op(pam_challenge, ROOT),
    'pam.auth': Op(pam_auth, ROOT),
    'pam.account': Op(pam_account, ROOT),
    'pam.open_session': Op(pam_open_session, ROOT),
    'pam.close_session': Op(pam_close_session, ROOT),
}
