"""``xos-ams`` end to end: the real console script against a real gateway's control socket."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from auth_certs import make_leaf, now_utc
from conftest import dynamic_vo
from controlhelp import map_user, reachable_dir
from cryptography.hazmat.primitives import serialization
from gatewayproc import SSH_XOS, VENV_BIN, VOCA, GatewayProcess, kill_uid_processes, run

from xos_sshd.auth.ca import CertificateAuthority
from xos_sshd.gateway import running_uids

XOS_AMS = str(VENV_BIN / 'xos-ams')



@pytest.fixture
def gw(tmp_path: Path, dev_ca: VOCA, uid_range: tuple[int, int],
       home_base: Path) -> Iterator[GatewayProcess]:
    with reachable_dir() as d:
        g = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base / 'home')},
                                     control_socket=str(d / 'control.sock')).start()
        yield g
        g.stop()


def ams(gw: GatewayProcess | None, *args: str, env: dict[str, str] | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    sock = ['--socket', str(gw.control_socket)] if gw else []
    return run(*(prefix or []), XOS_AMS, *sock, *args, check=False, env=env)


def ams_json(gw: GatewayProcess, *args: str) -> Any:
    res = ams(gw, *args, '--json')
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _passwd_names(gw: GatewayProcess) -> set[str]:
    path = gw.state / 'nss' / 'passwd'
    return {line.split(':')[0] for line in path.read_text().splitlines()} if path.exists() else set()


def test_list_and_show(gw: GatewayProcess, dev_ca: VOCA, tmp_path: Path,
                       uid_range: tuple[int, int]) -> None:
    res = ams(gw, 'list')
    assert res.returncode == 0 and res.stdout.strip() == 'no mappings'
    assert ams_json(gw, 'list') == {'mappings': []}
    map_user(gw, dev_ca, 'alice', tmp_path, '--group', 'physics', '--group', 'cms')
    map_user(gw, dev_ca, 'bob', tmp_path)
    res = ams(gw, 'list')
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split()[:3] == ['ACCOUNT', 'UID', 'IDENTITY']
    assert [r.split()[0] for r in rows] == ['dev-alice', 'dev-bob']
    assert rows[0].split()[2:4] == ['alice@dev', 'dynamic'] and rows[0].split()[-1] == '-'
    listed = ams_json(gw, 'list')['mappings']
    assert [m['name'] for m in listed] == ['dev-alice', 'dev-bob']
    alice = listed[0]
    assert uid_range[0] <= alice['uid'] <= uid_range[1]
    assert [g['name'] for g in alice['groups']] == ['dev-physics', 'dev-cms']
    assert alice['vo'] == 'dev' and alice['vo_user'] == 'alice' and alice['kind'] == 'dynamic'
    assert alice['banned'] is False and alice['pinned'] is False and alice['lease_expired'] is False
    # show by name or uid; --json before or after the command
    shown = ams_json(gw, 'show', 'dev-alice')['mapping']
    assert shown == alice
    res = ams(gw, '--json', 'show', str(alice['uid']))
    assert json.loads(res.stdout)['mapping']['name'] == 'dev-alice'
    human = ams(gw, 'show', 'dev-alice').stdout
    assert 'account:       dev-alice' in human and f'uid:           {alice["uid"]}' in human
    assert 'identity:      alice@dev' in human and 'dev-physics(' in human and 'state:         active' in human
    res = ams(gw, 'show', 'dev-zed')
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr == "xos-ams: no mapping for account 'dev-zed' (not-mapped)\n"


def test_pin_ban_release_and_history(gw: GatewayProcess, dev_ca: VOCA, tmp_path: Path) -> None:
    alice = map_user(gw, dev_ca, 'alice', tmp_path)
    uid = ams_json(gw, 'show', 'dev-alice')['mapping']['uid']
    res = ams(gw, 'pin', 'dev-alice')
    assert res.returncode == 0 and res.stdout.strip() == f'dev-alice (uid {uid}, alice@dev): pinned'
    assert ams_json(gw, 'show', 'dev-alice')['mapping']['pinned'] is True
    assert ams_json(gw, 'pin', 'dev-alice', '--off')['mapping']['pinned'] is False
    # ban: the next login is refused, the account leaves the NSS tables; unban undoes it
    assert ams_json(gw, 'ban', str(uid))['mapping']['banned'] is True
    assert gw.ssh_xos(alice, 'true').returncode == 255
    assert gw.audit()[-1]['reason'] == 'banned'
    assert 'dev-alice' not in _passwd_names(gw)
    assert 'banned' in ams(gw, 'list').stdout
    res = ams(gw, 'unban', 'dev-alice')
    assert res.returncode == 0 and 'unbanned' in res.stdout
    assert 'dev-alice' in _passwd_names(gw)
    # release is refused while the account runs something
    busy = subprocess.Popen([SSH_XOS, '-i', str(alice), '-p', str(gw.port), '-o',
                             'StrictHostKeyChecking=no', '127.0.0.1', 'sleep 60'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while uid not in running_uids():
            assert time.monotonic() < deadline, 'the sleep never started'
            time.sleep(0.1)
        res = ams(gw, 'release', 'dev-alice')
        assert res.returncode == 1 and '(account-busy)' in res.stderr
        assert res.stderr.count('\n') == 1 and res.stderr.startswith('xos-ams: ')
    finally:
        busy.kill()
        busy.wait()
    kill_uid_processes(uid, uid)
    time.sleep(0.5)
    home = ams_json(gw, 'show', 'dev-alice')['mapping']['home']
    Path(home, 'notes.txt').write_text('private')
    res = ams(gw, 'release', 'dev-alice')
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f'released dev-alice (uid {uid}); home archived to ')
    assert not Path(home).exists()  # the next holder of the uid never sees these files
    assert ams_json(gw, 'list') == {'mappings': []}
    # history outlives the mapping; a new login appends, never rewrites
    assert gw.ssh_xos(alice, 'true').returncode == 0
    events = ams_json(gw, 'history', 'dev-alice')['events']
    assert [e['event'] for e in events] == ['created', 'pinned', 'unpinned', 'banned', 'unbanned',
                                            'released', 'created']
    assert all(e['vo_user'] == 'alice' and e['vo'] == 'dev' and e['name'] == 'dev-alice' for e in events)
    assert events[5]['detail'] == 'released by admin'
    assert ams_json(gw, 'history', str(uid))['events'] == events
    human = ams(gw, 'history', 'dev-alice').stdout.splitlines()
    assert human[0].split() == ['TIME', 'EVENT', 'ACCOUNT', 'UID', 'IDENTITY', 'DETAIL']
    assert [line.split()[3] for line in human[1:]] == [e['event'] for e in events]
    assert ams(gw, 'history', 'dev-zed').stdout.strip() == 'no history for dev-zed'
    admin = [(e['action'], e['outcome'], e.get('reason')) for e in gw.audit() if e['event'] == 'admin']
    assert admin == [('pin', 'ok', None), ('unpin', 'ok', None), ('ban', 'ok', None),
                     ('unban', 'ok', None), ('release', 'refused', 'account-busy'),
                     ('release', 'ok', None)]


def test_explain_a_new_certificate_maps_nothing(gw: GatewayProcess, dev_ca: VOCA, tmp_path: Path,
                                               uid_range: tuple[int, int]) -> None:
    map_user(gw, dev_ca, 'alice', tmp_path)
    carol = dev_ca.issue('carol', tmp_path / 'carol', '--group', 'physics')
    before = ams_json(gw, 'list')
    res = ams(gw, 'explain', f'{carol}.pem')
    assert res.returncode == 0, res.stderr
    assert 'carol@dev' in res.stdout and 'verified' in res.stdout
    assert 'would get the new account dev-carol' in res.stdout and 'nothing was mapped' in res.stdout
    got = ams_json(gw, 'explain', f'{carol}.pem')
    assert got['verdict'] == 'new' and got['stage'] == 'mapping' and got['policy'] == 'dynamic'
    assert got['reason'] is None and got['mapping'] is None
    assert got['identity']['user'] == 'carol' and got['identity']['groups'] == ['physics']
    account = got['account']
    assert account['name'] == 'dev-carol' and uid_range[0] <= account['uid'] <= uid_range[1]
    # the OpenSSH certificate of the same key says the same
    assert ams_json(gw, 'explain', f'{carol}-cert.pub')['account'] == account
    # nothing was mapped, recorded or written to the NSS tables
    assert ams_json(gw, 'list') == before
    assert ams_json(gw, 'history', 'dev-carol') == {'events': []}
    assert 'dev-carol' not in _passwd_names(gw)
    # the first login gets exactly what explain announced
    assert int(gw.ssh_xos(carol, 'id -u').stdout) == account['uid']
    now = ams_json(gw, 'explain', f'{carol}.pem')
    assert now['verdict'] == 'existing' and now['account']['uid'] == account['uid']
    assert now['mapping']['name'] == 'dev-carol'
    assert 'maps to the existing account dev-carol' in ams(gw, 'explain', f'{carol}.pem').stdout


def test_explain_says_exactly_why_a_certificate_is_refused(gw: GatewayProcess, dev_ca: VOCA,
                                                          tmp_path: Path) -> None:
    # revoked
    dave = dev_ca.issue('dave', tmp_path / 'dave')
    dev_ca.revoke(dave)
    res = ams(gw, 'explain', f'{dave}.pem')
    assert res.returncode == 1
    assert 'claims dave@dev' in res.stdout and 'refused at the certificate check (revoked)' in res.stdout
    got = json.loads(ams(gw, '--json', 'explain', f'{dave}.pem').stdout)
    assert (got['verdict'], got['stage'], got['reason']) == ('refused', 'certificate', 'revoked')
    assert got['identity'] is None and got['claimed']['user'] == 'dave' and got['account'] is None
    # expired
    ca = CertificateAuthority.load(dev_ca.dir)
    start = now_utc() - timedelta(days=3)
    cert, _key = make_leaf(ca, user='erin', not_before=start, not_after=start + timedelta(hours=2))
    old = tmp_path / 'erin.pem'
    old.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    got = json.loads(ams(gw, '--json', 'explain', str(old)).stdout)
    assert (got['verdict'], got['reason']) == ('refused', 'expired') and 'expired at' in got['message']
    # another VO's CA
    stranger = VOCA.create(tmp_path, 'elsewhere').issue('frank', tmp_path / 'frank')
    got = json.loads(ams(gw, '--json', 'explain', f'{stranger}.pem').stdout)
    assert got['reason'] == 'unknown-ca'
    # a banned mapping: refused at the mapping stage, naming the account
    alice = map_user(gw, dev_ca, 'alice', tmp_path)
    ams_json(gw, 'ban', 'dev-alice')
    res = ams(gw, 'explain', f'{alice}.pem')
    assert res.returncode == 1 and 'refused at the mapping check (banned)' in res.stdout
    got = json.loads(ams(gw, '--json', 'explain', f'{alice}.pem').stdout)
    assert got['stage'] == 'mapping' and got['account']['name'] == 'dev-alice'
    # not a certificate at all
    junk = tmp_path / 'junk.pem'
    junk.write_text('hello\n')
    got = json.loads(ams(gw, '--json', 'explain', str(junk)).stdout)
    assert got['reason'] == 'bad-encoding'
    res = ams(gw, 'explain', str(tmp_path / 'missing.pem'))
    assert res.returncode == 1 and res.stderr.startswith('xos-ams: cannot read ')
    assert ams_json(gw, 'list')['mappings'][0]['name'] == 'dev-alice'  # still only alice


def test_errors_are_one_line(gw: GatewayProcess, tmp_path: Path) -> None:
    missing = tmp_path / 'nowhere' / 'control.sock'
    res = run(XOS_AMS, '--socket', str(missing), 'list', check=False)
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr == f'xos-ams: cannot reach xos-sshd at {missing}: No such file or directory\n'
    env = {**os.environ, 'XOS_CONTROL_SOCKET': str(missing)}
    res = run(XOS_AMS, 'list', check=False, env=env)
    assert res.returncode == 1 and str(missing) in res.stderr
    env['XOS_CONTROL_SOCKET'] = str(gw.control_socket)
    res = run(XOS_AMS, 'list', '--json', check=False, env=env)
    assert res.returncode == 0 and json.loads(res.stdout) == {'mappings': []}
    # a live socket whose daemon is gone
    gw.stop()
    res = ams(gw, 'list')
    assert res.returncode == 1 and res.stderr.startswith('xos-ams: cannot reach xos-sshd at ')
    gw.start()
    # not root
    res = ams(gw, 'list', prefix=['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups'])
    assert res.returncode == 1
    assert res.stderr == f'xos-ams: permission denied on {gw.control_socket}: xos-ams must run as root\n'
    # usage
    assert run(XOS_AMS, '--help', check=False).returncode == 0
    assert 'explain' in run(XOS_AMS, '--help').stdout
    assert run(XOS_AMS, check=False).returncode == 2
    assert run(XOS_AMS, 'frobnicate', check=False).returncode == 2
