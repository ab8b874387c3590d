"""``xos-ams``: the admin's view of the account mapping, through the gateway's control socket.

    xos-ams [--socket PATH] list|show NAME|UID|pin NAME [--off]|release NAME [--force]
            |ban NAME|unban NAME|history NAME|UID|explain CERT [--json]

It talks to the running xos-sshd (never to the database behind its back), so every change goes
through the same AMS code, transactions and audit log as a login.  Human tables by default,
``--json`` for scripts.  Exit status: 0 success; 1 an error (one line on stderr), and for
``explain`` also a certificate that would be refused; 2 a usage error.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .client import SOCKET_ENV, ControlClient, Unreachable, default_socket
from .protocol import ControlError

PROG = 'xos-ams'


class CLIError(Exception):
    """One line for stderr, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--json', action='store_true', default=argparse.SUPPRESS,
                        help='machine-readable output (the daemon\'s JSON reply)')
    p = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description='Inspect and administer the account mappings of the running xos-sshd '
                    '(through its control socket; root only).',
        epilog=f'The socket is /run/xos-sshd/control.sock unless ${SOCKET_ENV} or --socket '
               'names another (xos-sshd --dev: STATE/control.sock).')
    p.add_argument('--socket', type=Path, metavar='PATH',
                   help=f'control socket (default: ${SOCKET_ENV} or /run/xos-sshd/control.sock)')
    sub = p.add_subparsers(dest='command', metavar='COMMAND', required=True)
    sub.add_parser('list', parents=[common], help='every mapping, by uid')
    s = sub.add_parser('show', parents=[common], help='one mapping')
    s.add_argument('account', metavar='NAME|UID')
    s = sub.add_parser('pin', parents=[common], help='pin a mapping (never reclaimed)')
    s.add_argument('account', metavar='NAME|UID')
    s.add_argument('--off', action='store_true', help='unpin instead')
    s = sub.add_parser('release', parents=[common],
                       help='free a mapping now (refused while the account has processes)')
    s.add_argument('account', metavar='NAME|UID')
    s.add_argument('--force', action='store_true', help='release even if processes still run')
    s = sub.add_parser('ban', parents=[common], help='refuse every login of a mapping')
    s.add_argument('account', metavar='NAME|UID')
    s = sub.add_parser('unban', parents=[common], help='lift a ban')
    s.add_argument('account', metavar='NAME|UID')
    s = sub.add_parser('history', parents=[common], help='who held this account (or uid), and when')
    s.add_argument('account', metavar='NAME|UID')
    s = sub.add_parser('explain', parents=[common],
                       help='which account a certificate would get, or exactly why it is refused '
                            '(maps nothing)')
    s.add_argument('cert', type=Path, metavar='CERT',
                   help='XOS-cert PEM (PREFIX.pem) or OpenSSH certificate (PREFIX-cert.pub)')
    return p


def _target(text: str) -> dict[str, Any]:
    """``NAME`` or ``UID``: account names never start with a digit."""
    return {'uid': int(text)} if text.isdigit() else {'name': text}


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cmd = args.command
    if cmd == 'list':
        return 'admin.list', {}
    if cmd == 'explain':
        try:
            text = args.cert.read_text(encoding='ascii')
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f'cannot read {args.cert}: {getattr(exc, "strerror", None) or exc}') from None
        if '-----BEGIN CERTIFICATE-----' in text:
            return 'admin.explain', {'chain_pem': text}
        return 'admin.explain', {'openssh_cert': text}
    target = _target(args.account)
    if cmd == 'pin':
        return 'admin.pin', {**target, 'pinned': not args.off}
    if cmd == 'release':
        return 'admin.release', {**target, 'force': args.force}
    return f'admin.{cmd}', target


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = getattr(args, 'json', False)
    path = args.socket or default_socket()
    try:
        op, fields = _request(args)
        try:
            with ControlClient(path) as client:
                reply = client.call(op, **fields)
        except Unreachable as exc:
            cause = exc.__cause__
            if isinstance(cause, PermissionError) or getattr(cause, 'errno', None) == errno.EACCES:
                raise CLIError(f'permission denied on {path}: xos-ams must run as root') from None
            raise CLIError(f'cannot reach xos-sshd at {path}: {exc}') from None
        except ControlError as exc:
            if exc.reason == 'permission-denied':
                raise CLIError(f'permission denied: {exc} (xos-ams must run as root)') from None
            raise CLIError(f'{exc} ({exc.reason})') from None
        except (OSError, ValueError) as exc:  # timeouts, a daemon gone mid-request
            raise CLIError(f'lost xos-sshd at {path}: {exc}') from None
    except CLIError as exc:
        print(f'{PROG}: {exc}', file=sys.stderr)
        return 1
    reply.pop('ok', None)
    if as_json:
        json.dump(reply, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write('\n')
    else:
        _HUMAN[args.command](reply, args)
    if args.command == 'explain' and reply.get('verdict') == 'refused':
        return 1
    return 0


# --- human output ---------------------------------------------------------------------------

def _when(text: str | None) -> str:
    if not text:
        return '-'
    return datetime.fromisoformat(text).strftime('%Y-%m-%d %H:%M UTC')


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for row in [headers] + rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _flags(m: dict[str, Any]) -> str:
    flags = [f for f in ('banned', 'pinned') if m.get(f)]
    if m.get('lease_expired'):
        flags.append('expired')
    return ','.join(flags) or '-'


def _who(m: dict[str, Any]) -> str:
    return f'{m["vo_user"]}@{m["vo"]}' + (f'/{m["role"]}' if m.get('role') else '')


def _print_list(reply: dict[str, Any], _args: argparse.Namespace) -> None:
    mappings = reply['mappings']
    if not mappings:
        print('no mappings')
        return
    _table(['ACCOUNT', 'UID', 'IDENTITY', 'POLICY', 'LAST SEEN', 'LEASE EXPIRES', 'FLAGS'],
           [[m['name'], str(m['uid']), _who(m), m['kind'], _when(m['last_seen']),
             _when(m['lease_expires']), _flags(m)] for m in mappings])


def _print_mapping(m: dict[str, Any] | None) -> None:
    if m is None:
        print('no mapping')
        return
    groups = ', '.join(f'{g["name"]}({g["gid"]})' for g in m['groups']) or '-'
    state = ', '.join(f for f in ('banned', 'pinned') if m.get(f)) or 'active'
    lease = _when(m['lease_expires']) + (' (expired)' if m.get('lease_expired') else '')
    for key, value in [('account', m['name']), ('uid', str(m['uid'])), ('gid', str(m['gid'])),
                       ('groups', groups), ('home', m['home']), ('shell', m['shell']),
                       ('identity', _who(m)), ('policy', m['kind']),
                       ('created', _when(m['created_at'])), ('last seen', _when(m['last_seen'])),
                       ('lease expires', lease), ('state', state)]:
        print(f'{key + ":":<15}{value}')


def _print_show(reply: dict[str, Any], _args: argparse.Namespace) -> None:
    _print_mapping(reply['mapping'])


def _print_changed(reply: dict[str, Any], args: argparse.Namespace) -> None:
    m = reply['mapping']
    verb = {'pin': 'unpinned' if getattr(args, 'off', False) else 'pinned',
            'ban': 'banned', 'unban': 'unbanned'}[args.command]
    print(f'{m["name"]} (uid {m["uid"]}, {_who(m)}): {verb}' if m else f'{args.account}: {verb}')


def _print_release(reply: dict[str, Any], _args: argparse.Namespace) -> None:
    line = f'released {reply["released"]} (uid {reply["uid"]})'
    if reply.get('home_archived'):
        line += f'; home archived to {reply["home_archived"]}'
    print(line)


def _print_history(reply: dict[str, Any], args: argparse.Namespace) -> None:
    events = reply['events']
    if not events:
        print(f'no history for {args.account}')
        return
    _table(['TIME', 'EVENT', 'ACCOUNT', 'UID', 'IDENTITY', 'DETAIL'],
           [[_when(e['at']), e['event'], e['name'], str(e['uid']), _who(e), e['detail'] or '-']
            for e in events])


def _print_explain(reply: dict[str, Any], _args: argparse.Namespace) -> None:
    ident, claimed, acc = reply.get('identity'), reply.get('claimed'), reply.get('account')
    if ident:
        role = f', role {ident["role"]}' if ident.get('role') else ''
        groups = f', groups {",".join(ident["groups"])}' if ident.get('groups') else ''
        print(f'certificate: {ident["user"]}@{ident["vo"]}{role}{groups} (serial {ident["serial"]}, '
              f'valid until {_when(ident["not_after"])}): verified')
    elif claimed:
        who = f'{claimed.get("user") or "?"}@{claimed.get("vo") or "?"}'
        print(f'certificate: claims {who} (serial {claimed["serial"]}, valid until '
              f'{_when(claimed["not_after"])}, issuer {claimed["issuer"]})')
    verdict = reply['verdict']
    if verdict == 'refused':
        print(f'refused at the {reply["stage"]} check ({reply["reason"]}): {reply["message"]}')
        if acc:
            print(f'mapped account: {acc["name"]} (uid {acc["uid"]})')
        return
    policy = f'policy {reply["policy"]}'
    if verdict == 'existing':
        m = reply.get('mapping') or {}
        print(f'maps to the existing account {acc["name"]} (uid {acc["uid"]}, {policy}; '
              f'lease until {_when(m.get("lease_expires"))}); a login renews it')
    else:
        print(f'would get the new account {acc["name"]} (uid {acc["uid"]}, gid {acc["gid"]}, '
              f'home {acc["home"]}, {policy}) at its first login; nothing was mapped')


_HUMAN = {'list': _print_list, 'show': _print_show, 'pin': _print_changed,
          'ban': _print_changed, 'unban': _print_changed, 'release': _print_release,
          'history': _print_history, 'explain': _print_explain}


if __name__ == '__main__':
    sys.exit(main())
