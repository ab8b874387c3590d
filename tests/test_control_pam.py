"""pam.* ops end to end: what pam_xos.so asks while a stock sshd logs a VO user in.

A real gateway process; the mapping is made by a real ``ssh-xos`` login first (PAM never
creates one); answers are signed exactly as ``ssh-xos --kbdint`` signs them.
"""

from __future__ import annotations

import os
import shutil
import stat
from datetime import timedelta
from pathlib import Path

from auth_certs import make_leaf, now_utc
from controlhelp import answer, map_user, pam_auth
from cryptography.hazmat.primitives import serialization
from gatewayproc import VOCA, GatewayProcess

from xos_sshd.auth.ca import CertificateAuthority
from xos_sshd.control.client import ControlClient



def _call(gw: GatewayProcess, op: str, **fields: object) -> dict:
    with ControlClient(gw.control_socket) as client:
        return client.request({'op': op, **fields})


def _pam_audit(gw: GatewayProcess) -> list[dict]:
    return [e for e in gw.audit() if e['event'] == 'login' and e.get('route') == 'pam']


def test_pam_auth_accepts_the_mapped_account(gateway: GatewayProcess, dev_ca: VOCA,
                                             tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path, '--group', 'physics')
    uid = int(gateway.ssh_xos(alice, 'id -u').stdout)
    before = _call(gateway, 'admin.show', name='dev-alice')['mapping']
    got = pam_auth(gateway.control_socket, alice, 'dev-alice', rhost='192.0.2.7')
    assert got['ok'] is True, got
    assert got['account'] == 'dev-alice' and got['uid'] == uid
    assert (got['vo'], got['user'], got['role']) == ('dev', 'alice', None)
    after = _call(gateway, 'admin.show', name='dev-alice')['mapping']
    assert after['lease_expires'] >= before['lease_expires']  # renewed, not recreated
    assert after['created_at'] == before['created_at']
    line = _pam_audit(gateway)[-1]
    assert line['outcome'] == 'accepted' and line['reason'] == 'ok'
    assert line['account'] == 'dev-alice' and line['uid'] == uid and line['login'] == 'dev-alice'
    assert line['vo'] == 'dev' and line['user'] == 'alice' and line['serial']
    assert line['service'] == 'sshd' and line['source'] == '192.0.2.7' and line['pid'] == os.getpid()
    # the same account is what the SSH login maps to: one identity, one account
    assert [m['name'] for m in _call(gateway, 'admin.list')['mappings']] == ['dev-alice']


def test_nonce_is_single_use_and_bound_to_its_connection(gateway: GatewayProcess, dev_ca: VOCA,
                                                         tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    path = gateway.control_socket
    with ControlClient(path) as first:
        nonce = first.call('pam.challenge', service='sshd', user='dev-alice')['nonce']
        line = answer(alice, nonce, 'sshd', 'dev-alice')
        auth = {'op': 'pam.auth', 'service': 'sshd', 'user': 'dev-alice', 'answer': line}
        assert first.request(auth)['ok'] is True
        again = first.request(auth)  # the nonce is spent
        assert again['ok'] is False and again['reason'] == 'no-challenge'
        # a fresh challenge on the same connection: the old answer does not fit it
        nonce2 = first.call('pam.challenge', service='sshd', user='dev-alice')['nonce']
        assert nonce2 != nonce
        replay = first.request(auth)
        assert replay['ok'] is False and replay['reason'] == 'bad-signature'
    # ... nor on another connection (a captured answer is worthless)
    with ControlClient(path) as second:
        second.call('pam.challenge', service='sshd', user='dev-alice')
        assert second.request(auth)['reason'] == 'bad-signature'
    with ControlClient(path) as third:  # no challenge at all on this connection
        got = third.request(auth)
        assert got['reason'] == 'no-challenge'
    refused = [e['reason'] for e in _pam_audit(gateway) if e['outcome'] == 'refused']
    assert refused == ['no-challenge', 'bad-signature', 'bad-signature', 'no-challenge']


def test_answer_is_bound_to_service_and_user(gateway: GatewayProcess, dev_ca: VOCA,
                                             tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    with ControlClient(gateway.control_socket) as client:
        nonce = client.call('pam.challenge', service='login', user='dev-alice')['nonce']
        signed_for_sshd = answer(alice, nonce, 'sshd', 'dev-alice')
        got = client.request({'op': 'pam.auth', 'service': 'login', 'user': 'dev-alice',
                              'answer': signed_for_sshd})
        assert got['reason'] == 'bad-signature'
    with ControlClient(gateway.control_socket) as client:
        nonce = client.call('pam.challenge', service='sshd', user='dev-alice')['nonce']
        got = client.request({'op': 'pam.auth', 'service': 'su', 'user': 'dev-alice',
                              'answer': answer(alice, nonce, 'su', 'dev-alice')})
        assert got['reason'] == 'no-challenge'  # the challenge was for sshd
    with ControlClient(gateway.control_socket) as client:
        client.call('pam.challenge', service='sshd', user='dev-alice')
        got = client.request({'op': 'pam.auth', 'service': 'sshd', 'user': 'dev-alice',
                              'answer': 'bm90IGpzb24='})
        assert got['reason'] == 'bad-encoding'
    with ControlClient(gateway.control_socket) as client:
        bad = client.request({'op': 'pam.challenge', 'service': 'ssh d', 'user': 'dev-alice'})
        assert bad['reason'] == 'bad-request'
        bad = client.request({'op': 'pam.challenge', 'service': 'sshd'})
        assert bad['reason'] == 'bad-request'


def test_another_users_certificate_cannot_open_this_account(gateway: GatewayProcess,
                                                             dev_ca: VOCA, tmp_path: Path) -> None:
    map_user(gateway, dev_ca, 'alice', tmp_path)
    bob = map_user(gateway, dev_ca, 'bob', tmp_path)
    got = pam_auth(gateway.control_socket, bob, 'dev-alice')
    assert got['ok'] is False and got['reason'] == 'login-name-mismatch', got
    # a VO member who never logged in through the gateway has no account: PAM maps nobody
    carol = dev_ca.issue('carol', tmp_path / 'carol')
    got = pam_auth(gateway.control_socket, carol, 'dev-carol')
    assert got['reason'] == 'not-mapped'
    assert 'dev-carol' not in {m['name'] for m in _call(gateway, 'admin.list')['mappings']}
    # PAM_USER is the local account: the VO user name is not an alias here
    alice = tmp_path / 'alice'
    assert pam_auth(gateway.control_socket, alice, 'alice')['reason'] == 'login-name-mismatch'
    # a certificate from another VO's CA
    other = VOCA.create(tmp_path, 'other')
    mallory = other.issue('alice', tmp_path / 'mallory')
    assert pam_auth(gateway.control_socket, mallory, 'dev-alice')['reason'] == 'unknown-ca'


def test_revoked_and_expired_certificates_are_refused(gateway: GatewayProcess, dev_ca: VOCA,
                                                      tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    assert pam_auth(gateway.control_socket, alice, 'dev-alice')['ok'] is True
    assert _call(gateway, 'pam.account', service='sshd', user='dev-alice')['ok'] is True
    dev_ca.revoke(alice)
    assert pam_auth(gateway.control_socket, alice, 'dev-alice')['reason'] == 'revoked'
    # the account phase re-verifies the certificate that authenticated a moment ago
    got = _call(gateway, 'pam.account', service='sshd', user='dev-alice')
    assert got['ok'] is False and got['reason'] == 'revoked', got
    # an expired certificate of the same person (same CA, old validity window)
    ca = CertificateAuthority.load(dev_ca.dir)
    start = now_utc() - timedelta(days=2)
    cert, key = make_leaf(ca, user='alice', groups=('users',), role=None, not_before=start,
                          not_after=start + timedelta(hours=1))
    old = tmp_path / 'alice-old'
    Path(f'{old}.pem').write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(f'{old}.key').write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert pam_auth(gateway.control_socket, old, 'dev-alice')['reason'] == 'expired'


def test_account_phase_refuses_banned_and_unknown(gateway: GatewayProcess, dev_ca: VOCA,
                                                  tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    ok = _call(gateway, 'pam.account', service='sshd', user='dev-alice')
    assert ok['ok'] is True and ok['account'] == 'dev-alice'
    assert _call(gateway, 'admin.ban', name='dev-alice')['mapping']['banned'] is True
    got = _call(gateway, 'pam.account', service='sshd', user='dev-alice')
    assert got['ok'] is False and got['reason'] == 'banned'
    assert pam_auth(gateway.control_socket, alice, 'dev-alice')['reason'] == 'banned'
    assert _call(gateway, 'pam.open_session', service='sshd', user='dev-alice')['reason'] == 'banned'
    _call(gateway, 'admin.unban', name='dev-alice')
    assert _call(gateway, 'pam.account', service='sshd', user='dev-alice')['ok'] is True
    for user in ('root', 'dev-nobody'):
        assert _call(gateway, 'pam.account', service='sshd', user=user)['reason'] == 'not-mapped'
    refusals = [e for e in gateway.audit() if e['event'] == 'account']
    assert [e['reason'] for e in refusals] == ['banned', 'not-mapped', 'not-mapped']


def test_open_session_creates_the_home_like_a_gateway_login(gateway: GatewayProcess, dev_ca: VOCA,
                                                            tmp_path: Path) -> None:
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    mapping = _call(gateway, 'admin.show', name='dev-alice')['mapping']
    shutil.rmtree(mapping['home'])
    assert pam_auth(gateway.control_socket, alice, 'dev-alice')['ok'] is True
    with ControlClient(gateway.control_socket) as client:
        opened = client.call('pam.open_session', service='sshd', user='dev-alice',
                             tty='/dev/pts/9', rhost='192.0.2.7')
        assert opened['home'] == mapping['home'] and opened['home_created'] is True
        st = os.stat(mapping['home'])
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == mapping['uid']
        assert st.st_gid == mapping['gid']
        assert client.call('pam.open_session', service='sshd', user='dev-alice')['home_created'] is False
        closed = client.call('pam.close_session', service='sshd', user='dev-alice', tty='/dev/pts/9')
        assert closed['account'] == 'dev-alice'
    sessions = [e for e in gateway.audit() if e['event'] == 'session' and e['route'] == 'pam']
    assert [e['action'] for e in sessions] == ['open', 'open', 'close']
    assert sessions[0]['tty'] == '/dev/pts/9' and sessions[0]['source'] == '192.0.2.7'
    assert all(e['account'] == 'dev-alice' and e['route'] == 'pam' for e in sessions)
    assert _call(gateway, 'pam.open_session', service='sshd', user='dev-zed')['reason'] == 'not-mapped'


def test_hostile_rhost_and_tty_reach_logs_inert(gateway: GatewayProcess, dev_ca: VOCA,
                                                tmp_path: Path) -> None:
    """PAM_RHOST and PAM_TTY are whatever the PAM application (or a local client of the
    socket) says: terminal escapes, line breaks and bidi overrides in them must not reach
    the gateway's log or the audit fields."""
    alice = map_user(gateway, dev_ca, 'alice', tmp_path)
    hostile = 'evil\x1b]0;owned\x07\u202ehost\nFAKE login accepted'
    got = pam_auth(gateway.control_socket, alice, 'dev-nobody', rhost=hostile)
    assert got['ok'] is False
    got = _call(gateway, 'pam.open_session', service='sshd', user='dev-alice',
                tty='/dev/pts/1\x1b[2J\r\nFAKE', rhost=hostile)
    assert got['ok'] is True, got
    log = gateway.log()
    assert 'evil' in log and 'FAKE login accepted' in log  # logged, but inert
    for bad in ('\x1b', '\x07', '\u202e', '\r', 'host\nFAKE'):
        assert bad not in log
    fields = [str(v) for e in _pam_audit(gateway) + gateway.audit()
              for k, v in e.items() if k in ('source', 'tty')]
    assert any('evil' in f for f in fields)
    assert not any(c in f for f in fields for c in '\x1b\x07\u202e\r\n')
