"""``admin.*`` ops: what ``xos-ams`` asks (root peers only).

Each op is a thin layer over one AMS call; the reply carries plain JSON views of the AMS
types (:func:`mapping_view`, :func:`event_view`), times as ISO 8601 UTC.  Every change, and
every refused change, is audited (event ``admin``: what was asked, with the peer's pid and
uid); the mapping change itself is the AMS's own ``mapping`` event.  ``admin.explain`` runs the
certificate through the one verifier and the mapping through :meth:`AMS.explain`, and
writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ams import (
    HistoryEvent,
    LocalAccount,
    MappingPreview,
    MappingRecord,
    UnknownMapping,
)
from ..auth import sshcert
from ..auth.errors import AuthRefused
from ..auth.identity import VOIdentity
from ..auth.profile import parse_certificate
from ..gateway import running_uids
from ..session.home import HomeError
from ..tasks import ThreadsBusy, Unresponsive
from .protocol import ControlError
from .server import ROOT, Op, Request

log = logging.getLogger(__name__)


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat(timespec='seconds') if when else None


def account_view(account: LocalAccount) -> dict[str, Any]:
    return {'name': account.name, 'uid': account.uid, 'gid': account.gid,
            'groups': [{'name': n, 'gid': g} for n, g in account.groups],
            'home': account.home, 'shell': account.shell, 'gecos': account.gecos,
            'vo': account.vo, 'vo_user': account.vo_user, 'role': account.role}


def mapping_view(record: MappingRecord) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {**account_view(record.account), 'kind': record.kind,
            'created_at': _iso(record.created_at), 'last_seen': _iso(record.last_seen),
            'lease_expires': _iso(record.lease_expires), 'lease_expired': record.expired(now),
            'banned': record.banned, 'pinned': record.pinned}


def event_view(event: HistoryEvent) -> dict[str, Any]:
    return {'at': _iso(event.at), 'event': event.event, 'name': event.name, 'uid': event.uid,
            'vo': event.vo, 'vo_user': event.vo_user, 'role': event.role, 'detail': event.detail}


def identity_view(identity: VOIdentity) -> dict[str, Any]:
    return {'vo': identity.vo, 'user': identity.user, 'groups': list(identity.groups),
            'role': identity.role, 'serial': str(identity.serial),
            'not_after': _iso(identity.not_after), 'issuer': identity.issuer,
            'key': identity.key_fingerprint}


def _audit(req: Request, action: str, outcome: str = 'ok', **fields: Any) -> None:
    req.gateway.audit.write('admin', action=action, outcome=outcome, pid=req.peer.pid,
                            peer_uid=req.peer.uid, **fields)


def _asked(req: Request) -> dict[str, Any]:
    """The ``name``/``uid`` a refused request named, as given (cut short), for its audit line."""
    return {k: str(req.args[k])[:64] for k in ('name', 'uid') if req.args.get(k) is not None}


def _refusal(req: Request, action: str, exc: ControlError, **fields: Any) -> ControlError:
    """Audit a refused change (``outcome: refused`` with the reason) and return *exc*."""
    _audit(req, action, 'refused', reason=exc.reason, message=str(exc), **fields)
    return exc


async def _record(req: Request) -> MappingRecord:
    """The mapping named by ``name`` or ``uid``; ``not-mapped`` if none."""
    ams = req.gateway.ams
    if 'uid' in req.args and req.args['uid'] is not None:
        uid = req.number('uid')
        record = await ams.mapping_for_uid(uid)
        what = f'uid {uid}'
    else:
        name = req.text('name', max_len=64)
        record = await ams.get_mapping(name)
        what = f'account {name!r}'
    if record is None:
        raise ControlError('not-mapped', f'no mapping for {what}')
    return record


async def _named(req: Request) -> str:
    """The account name of ``name`` or ``uid`` (pin, ban... act on names)."""
    return (await _record(req)).account.name


async def admin_list(req: Request) -> dict[str, Any]:
    """``{}`` -> ``{mappings: [mapping...]}`` by uid."""
    return {'mappings': [mapping_view(r) for r in await req.gateway.ams.list_mappings()]}


async def admin_show(req: Request) -> dict[str, Any]:
    """``{name}`` or ``{uid}`` -> ``{mapping}``."""
    return {'mapping': mapping_view(await _record(req))}


async def _act(req: Request, action: str, call: Any) -> dict[str, Any]:
    try:
        name = await _named(req)
    except ControlError as exc:
        raise _refusal(req, action, exc, **_asked(req))
    try:
        await call(name)
    except UnknownMapping as exc:
        raise _refusal(req, action, ControlError('not-mapped', str(exc)), account=name) from None
    _audit(req, action, account=name)
    record = await req.gateway.ams.get_mapping(name)
    return {'mapping': mapping_view(record) if record else None}


async def admin_pin(req: Request) -> dict[str, Any]:
    """``{name, pinned=true}`` -> ``{mapping}``: a pinned mapping is never reclaimed."""
    pinned = req.flag('pinned', True)
    return await _act(req, 'pin' if pinned else 'unpin',
                      lambda name: req.gateway.ams.pin(name, pinned))


async def admin_ban(req: Request) -> dict[str, Any]:
    """``{name}`` -> ``{mapping, closed}``: logins refuse ``banned``; the mapping is kept;
    the account's live SSH connections to this gateway are closed at once (``closed``: how
    many; each audited as event ``connection``, reason ``banned``)."""
    reply = await _act(req, 'ban', req.gateway.ams.ban)
    mapping = reply.get('mapping')
    closed = req.gateway.account_banned(mapping['name']) if mapping else 0
    return {**reply, 'closed': closed}


async def admin_unban(req: Request) -> dict[str, Any]:
    """``{name}`` -> ``{mapping}``."""
    reply = await _act(req, 'unban', req.gateway.ams.unban)
    if reply.get('mapping'):
        req.gateway.account_unbanned(reply['mapping']['name'])
    return reply


async def admin_release(req: Request) -> dict[str, Any]:
    """``{name, force=false}`` -> ``{released, uid, home_archived}``.

    Refuses ``account-busy`` while a process runs under the account's uid (unless ``force``),
    and on a shared store also while another node published the uid as busy or runs (or
    starts) a job of it, naming the nodes.  The home of a dynamic or pool account is archived
    as after a reclaim, so the next holder of the uid or pool name never sees the previous
    one's files (other nodes archive theirs when they hear of the release).
    """
    force = req.flag('force', False)
    try:
        record = await _record(req)
    except ControlError as exc:
        raise _refusal(req, 'release', exc, **_asked(req))
    account = record.account
    if not force and account.uid in await asyncio.to_thread(running_uids):
        raise _refusal(req, 'release', ControlError(
            'account-busy', f'processes of {account.name} (uid {account.uid}) are still '
                            f'running (stop them, or release with force)'),
            account=account.name, uid=account.uid)
    # A shared store: the account may be busy on other nodes (their published processes,
    # their jobs in the shared table); their homes follow the release (session/home.py).
    elsewhere = {} if force else await req.gateway.ams.busy_elsewhere(account.uid)
    if elsewhere:
        where = '; '.join(f'node {node}: {", ".join(what[:3])}'
                          + (f' and {len(what) - 3} more' if len(what) > 3 else '')
                          for node, what in elsewhere.items())
        raise _refusal(req, 'release', ControlError(
            'account-busy', f'{account.name} (uid {account.uid}) is in use on other nodes '
                            f'({where}): stop it there, or release with force'),
            account=account.name, uid=account.uid, nodes=sorted(elsewhere))
    try:
        await req.gateway.ams.release(account.name)
    except UnknownMapping as exc:
        raise _refusal(req, 'release', ControlError('not-mapped', str(exc)),
                       account=account.name) from None
    archived = None
    if record.kind != 'static':
        try:
            archived = await req.gateway.archive_home(account)
        except (HomeError, OSError, Unresponsive, ThreadsBusy) as exc:
            log.error('could not archive the home of released %s: %s', account.name, exc)
    _audit(req, 'release', account=account.name, uid=account.uid, force=force,
           home_archived=archived)
    return {'released': account.name, 'uid': account.uid, 'home_archived': archived}


async def admin_history(req: Request) -> dict[str, Any]:
    """``{name}`` or ``{uid}`` (or neither: everything) -> ``{events: [...]}`` oldest first."""
    ams = req.gateway.ams
    limit = req.number('limit', required=False)
    if req.args.get('uid') is not None:
        events = await ams.history(uid=req.number('uid'), limit=limit)
    elif req.args.get('name') is not None:
        events = await ams.history(req.text('name', max_len=64), limit=limit)
    else:
        events = await ams.history(limit=limit)
    return {'events': [event_view(e) for e in events]}


def _claimed(leaf: x509.Certificate) -> dict[str, Any]:
    """What an (unverified) X.509 certificate says about itself, for a refused explain."""
    out: dict[str, Any] = {'serial': str(leaf.serial_number),
                           'not_after': _iso(leaf.not_valid_after_utc),
                           'issuer': leaf.issuer.rfc4514_string()}
    try:
        attrs = parse_certificate(leaf)
    except AuthRefused:
        return out
    out.update(vo=attrs.primary_vo, user=attrs.user_id, role=attrs.role)
    return out


def _verify_for_explain(req: Request) -> VOIdentity:
    """The identity the gateway would see for the offered certificate (or AuthRefused)."""
    verifier = req.gateway.verifier
    if req.args.get('openssh_cert') is not None:
        text = req.text('openssh_cert', max_len=32 * 1024)
        return verifier.verify_openssh_cert(sshcert.read_certificate_file(text.encode()))
    pem = req.text('chain_pem', max_len=60 * 1024)
    try:
        certs = x509.load_pem_x509_certificates(pem.encode('ascii'))
    except (ValueError, UnicodeEncodeError):
        raise AuthRefused('bad-encoding', 'chain_pem holds no PEM certificate') from None
    claimed = _claimed(certs[0])
    try:
        chain = [c.public_bytes(serialization.Encoding.DER) for c in certs]
        return verifier.verify_x509_chain(chain)
    except AuthRefused as exc:
        exc.claimed = claimed  # type: ignore[attr-defined]
        raise


async def admin_explain(req: Request) -> dict[str, Any]:
    """``{chain_pem}`` or ``{openssh_cert}`` -> what a login with it would do; maps nothing.

    Reply: ``verdict`` (``existing`` | ``new`` | ``refused``), ``stage`` (``certificate`` or
    ``mapping``: where a refusal comes from), ``reason``, ``message``, ``identity`` (verified)
    or ``claimed`` (what a refused certificate says of itself), ``policy``, ``account``
    (the account held or that a first login would get), ``mapping`` (an existing mapping).
    """
    try:
        identity = _verify_for_explain(req)
    except AuthRefused as exc:
        return {'verdict': 'refused', 'stage': 'certificate', 'reason': exc.reason,
                'message': str(exc), 'identity': None,
                'claimed': getattr(exc, 'claimed', None), 'policy': None, 'account': None,
                'mapping': None}
    preview: MappingPreview = await req.gateway.ams.explain(identity)
    return {'verdict': preview.outcome, 'stage': 'mapping', 'reason': preview.reason,
            'message': preview.message, 'identity': identity_view(identity), 'claimed': None,
            'policy': preview.policy,
            'account': account_view(preview.account) if preview.account else None,
            'mapping': mapping_view(preview.record) if preview.record else None}


OPS: dict[str, Op] = {
    'admin.list': Op(admin_list, ROOT),
    'admin.show': Op(admin_show, ROOT),
    'admin.pin': Op(admin_pin, ROOT),
    'admin.release': Op(admin_release, ROOT),
    'admin.ban': Op(admin_ban, ROOT),
    'admin.unban': Op(admin_unban, ROOT),
    'admin.history': Op(admin_history, ROOT),
    'admin.explain': Op(admin_explain, ROOT),
}
