"""Observability: the audit log covers every event kind with its fields, rotates on SIGHUP,
and the Prometheus endpoint counts exactly what the log says.

The end-to-end test drives a real gateway process the way users and admins do (ssh-xos,
xos-cr over SSH with real CRIU, xos-ams on the control socket, a non-VO uid on the users'
socket, SIGHUP after a logrotate-style rename) and scrapes ``/metrics`` over HTTP before and
after.  The smaller tests pin the AMS's mapping events (one per committed change) and the
translation of audit records into metrics on real objects.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import dynamic_vo
from crhelpers import wait_for
from gatewayproc import SSH_XOS, XOS_SSHD, VOCA, GatewayProcess, free_port, run
from prometheus_client.parser import text_string_to_metric_families
from test_ams_service import Clock, ident, policies
from test_cr_e2e import REPO, NOBODY, alice, ca, cr_env, make_gateway, xcr  # noqa: F401

from xos_sshd.ams import AMS
from xos_sshd.audit import AuditLog
from xos_sshd.metrics import Metrics

XOS_AMS = str(Path(sys.executable).parent / 'xos-ams')

# --------------------------------------------------------------------------- helpers


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` over HTTP, as Prometheus reads it: {(sample name, labels): value}."""
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def with_metrics(gw: GatewayProcess, **table: Any) -> None:
    gw.config.write_text(gw.config.read_text() + '[metrics]\n' + ''.join(
        f'{k} = {json.dumps(v)}\n' for k, v in table.items()))


def open_sessions(path: Path) -> set[str]:
    """Ids of SSH sessions with an ``open`` event and no ``close`` yet."""
    seen: dict[str, int] = {}
    for e in events(path):
        if e['event'] == 'session' and e.get('route') == 'ssh' and e.get('outcome') == 'ok':
            seen[e['session']] = seen.get(e['session'], 0) + (1 if e['action'] == 'open' else -1)
    return {sid for sid, n in seen.items() if n}


def listening_ports(pid: int) -> set[int]:
    """TCP ports process *pid* listens on (from /proc: its socket inodes in state LISTEN)."""
    inodes = set()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
        except OSError:
            continue
        if target.startswith('socket:['):
            inodes.add(target[8:-1])
    ports = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == '0A' and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(':', 1)[1], 16))
    return ports


# --------------------------------------------------------------------------- units on real parts


async def test_ams_reports_each_committed_mapping_change_once(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    clock = Clock()
    ams = await AMS.open(tmp_path / 'ams.sqlite', policies(), tmp_path / 'nss', clock=clock,
                         on_event=lambda event, **f: got.append({'event': event, **f}),
                         is_idle=lambda uid: True)
    try:
        acc = await ams.map_identity(ident('alice'))
        await ams.map_identity(ident('alice'))
        await ams.renew(acc.name)
        await ams.ban(acc.name)
        await ams.ban(acc.name)  # no change: no event
        await ams.unban(acc.name)
        await ams.pin(acc.name)
        await ams.pin(acc.name, False)
        await ams.release(acc.name)
        bob = await ams.map_identity(ident('bob'))
        clock.advance(11)  # atlas leases: 10 h
        assert await ams.reclaim_expired(lambda uid: True) == [bob.name]
        # a full pool reclaims an expired idle lease on the spot: that is a reclaim too
        pool = [await ams.map_identity(ident(u, vo='cms', groups=('cms',))) for u in 'xyz']
        clock.advance(2)
        await ams.map_identity(ident('w', vo='cms', groups=('cms',)))
    finally:
        await ams.close()
    assert all(e['event'] == 'mapping' and e['outcome'] == 'ok' for e in got)
    assert [(e['action'], e['account']) for e in got[:10]] == [
        ('created', acc.name), ('renewed', acc.name), ('renewed', acc.name),
        ('banned', acc.name), ('unbanned', acc.name), ('pinned', acc.name),
        ('unpinned', acc.name), ('released', acc.name), ('created', bob.name),
        ('reclaimed', bob.name)]
    first = got[0]
    assert (first['uid'], first['vo'], first['user'], first['kind'], first['role']) == (
        acc.uid, 'atlas', 'alice', 'dynamic', None)
    assert first['lease_expires'].startswith('2023-11-15T')  # clock + 10 h, ISO 8601
    assert got[7]['detail'] == 'released by admin'
    assert got[9]['detail'] == 'lease expired, account idle'
    tail = [(e['action'], e['account'], e['kind']) for e in got[10:]]
    assert tail[:3] == [('created', p.name, 'pool') for p in pool]
    assert ('reclaimed', pool[0].name, 'pool') in tail[3:] and tail[-1][0] == 'created'


def test_metrics_count_what_the_audit_log_writes(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / 'audit.log')
    metrics = Metrics(process=False)
    audit.subscribe(metrics.observe)

    def broken(record: dict[str, Any]) -> None:
        raise RuntimeError('a broken listener')

    audit.subscribe(broken)  # must neither stop the line nor the other listeners
    sample = metrics.registry.get_sample_value
    audit.write('login', outcome='accepted', reason='ok', route='x509', account='dev-a')
    audit.write('login', outcome='refused', reason='revoked', route='openssh')
    audit.write('login', outcome='refused', reason='not-a-certificate', route=None)
    audit.write('session', action='open', outcome='ok', route='ssh', kind='exec')
    audit.write('session', action='open', outcome='ok', route='ssh', kind='shell')
    audit.write('session', action='close', outcome='ok', route='ssh', kind='exec')
    audit.write('session', action='open', outcome='ok', route='pam', service='sshd')
    audit.write('session', action='open', outcome='refused', route='ssh', kind='subsystem')
    audit.write('cr', action='checkpoint', outcome='ok', seconds=0.75, size_bytes=4096)
    audit.write('cr', action='checkpoint', outcome='ok', seconds=3.0, size_bytes=1000)
    audit.write('cr', action='checkpoint', outcome='refused', reason='quota-exceeded', seconds=0.1)
    audit.write('cr', action='restart', outcome='ok', seconds=1.5, migrated=True)
    audit.write('cr', action='restart', outcome='refused', reason='restore-failed', migrated=True)
    audit.write('cr', action='restart', outcome='ok', seconds=0.2, migrated=False)
    audit.write('mapping', action='created', outcome='ok', vo='dev', kind='dynamic')
    audit.write('cr', action='migrate-out', outcome='ok', mode='lazy-pages', seconds=2.0,
                frozen_seconds=0.3)
    audit.write('cr', action='migrate-in', outcome='refused', reason='untrusted-node')
    audit.close()
    assert len(events(tmp_path / 'audit.log')) == 17
    assert sample('xos_sshd_logins_total', {'outcome': 'accepted', 'reason': 'ok', 'route': 'x509'}) == 1
    assert sample('xos_sshd_logins_total', {'outcome': 'refused', 'reason': 'revoked', 'route': 'openssh'}) == 1
    assert sample('xos_sshd_logins_total', {'outcome': 'refused', 'reason': 'not-a-certificate',
                                            'route': 'none'}) == 1
    assert sample('xos_sshd_sessions', {'kind': 'exec'}) == 0
    assert sample('xos_sshd_sessions', {'kind': 'shell'}) == 1
    assert sample('xos_sshd_session_requests_total', {'kind': 'subsystem', 'outcome': 'refused', 'route': 'ssh'}) == 1
    assert sample('xos_sshd_session_requests_total', {'kind': 'none', 'outcome': 'ok', 'route': 'pam'}) == 1
    assert sample('xos_sshd_checkpoint_bytes_total') == 5096
    assert sample('xos_sshd_checkpoint_seconds_count') == 2
    assert sample('xos_sshd_checkpoint_seconds_sum') == 3.75
    assert sample('xos_sshd_checkpoint_seconds_bucket', {'le': '1.0'}) == 1
    assert sample('xos_sshd_restart_seconds_count') == 2
    assert sample('xos_sshd_migrations_total', {'direction': 'in', 'outcome': 'ok'}) == 1
    assert sample('xos_sshd_migrations_total', {'direction': 'in', 'outcome': 'refused'}) == 2
    assert sample('xos_sshd_migrations_total', {'direction': 'out', 'outcome': 'ok'}) == 1
    assert sample('xos_sshd_migration_downtime_seconds_sum') == 0.3
    assert sample('xos_sshd_cr_ops_total', {'op': 'checkpoint', 'outcome': 'refused'}) == 1
    assert sample('xos_sshd_mapping_changes_total', {'vo': 'dev', 'action': 'created'}) == 1
    assert sample('xos_sshd_audit_events_total', {'event': 'cr', 'outcome': 'ok'}) == 5
    metrics.set_mappings({('dev', 'dynamic'): 3}, configured=[('dev', 'dynamic'), ('cms', 'pool')])
    metrics.set_jobs({'running': 2})
    assert sample('xos_sshd_mappings', {'vo': 'dev', 'kind': 'dynamic'}) == 3
    assert sample('xos_sshd_mappings', {'vo': 'cms', 'kind': 'pool'}) == 0
    assert sample('xos_sshd_jobs', {'state': 'running'}) == 2
    assert sample('xos_sshd_jobs', {'state': 'lost'}) == 0


# --------------------------------------------------------------------------- configuration


def test_metrics_config_is_loopback_only(tmp_path: Path, dev_ca: VOCA,
                                         uid_range: tuple[int, int], home_base: Path) -> None:
    gw = GatewayProcess.configure(tmp_path, {'dev': dynamic_vo(dev_ca, uid_range, home_base)})
    plain = gw.config.read_text()
    for listen, ok in (('0.0.0.0:9622', False), ('192.0.2.1:9622', False), ('[::]:9622', False),
                       ('127.0.0.1', False), ('127.0.0.1:9622', True), ('[::1]:9622', True)):
        gw.config.write_text(plain)
        with_metrics(gw, listen=listen)
        res = run(XOS_SSHD, '--check-config', '--config', str(gw.config), check=False)
        assert (res.returncode == 0) is ok, (listen, res.stderr)
        if not ok:
            assert res.returncode == 2 and res.stderr.count('\n') == 1
            assert res.stderr.startswith('xos-sshd: configuration error: metrics.listen: ')
    doctor = run(XOS_SSHD, 'doctor', '--config', str(gw.config), check=False).stdout.splitlines()
    assert [line for line in doctor if line.startswith('OK   metrics:')] == [
        'OK   metrics: Prometheus endpoint http://[::1]:9622/metrics (loopback only)']


def test_no_endpoint_unless_configured(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    assert listening_ports(gateway.proc.pid) == {gateway.port}


# --------------------------------------------------------------------------- end to end


def test_audit_and_metrics_follow_real_operations(cr_env: dict[str, Any], ca: VOCA,  # noqa: F811
                                                  alice: Path) -> None:  # noqa: F811
    gw = make_gateway(cr_env, ca, start=False)
    mport = free_port()
    with_metrics(gw, listen=f'127.0.0.1:{mport}')
    gw.start()
    audit_path = gw.state / 'audit.log'
    m0 = scrape(mport)
    build = [dict(k[1]) for k, v in m0.items() if k[0] == 'xos_sshd_build_info' and v == 1]
    assert [b['version'] for b in build] == [importlib.metadata.version('xos-sshd')]
    assert value(m0, 'xos_sshd_mappings', vo='dev', kind='dynamic') == 0
    assert value(m0, 'xos_sshd_process_open_fds') > 0
    assert listening_ports(gw.proc.pid) == {gw.port, mport}

    # a refused login, then a first login with an exec session that exits 3
    assert gw.ssh_xos(alice, 'true', login='root').returncode == 255
    res = gw.ssh_xos(alice, 'echo secret-word-1; exit 3')
    assert res.returncode == 3 and res.stdout == 'secret-word-1\n'
    wait_for(lambda: not open_sessions(audit_path), 10, 'the session closes')
    m1 = scrape(mport)
    refused = [e for e in events(audit_path) if e['event'] == 'login' and e['outcome'] == 'refused']
    assert [(e['reason'], e['login'], e['user']) for e in refused] == [
        ('login-name-mismatch', 'root', 'alice')]
    assert delta(m0, m1, 'xos_sshd_logins_total', outcome='refused', reason='login-name-mismatch',
                 route=refused[0]['route']) == 1
    assert delta(m0, m1, 'xos_sshd_logins_total', outcome='accepted', reason='ok', route='x509') == 1
    assert value(m1, 'xos_sshd_mappings', vo='dev', kind='dynamic') == 1
    log = events(audit_path)
    created = [e for e in log if e['event'] == 'mapping']
    assert [(e['action'], e['account'], e['user'], e['vo'], e['kind']) for e in created] == [
        ('created', 'dev-alice', 'alice', 'dev', 'dynamic')]
    opened, closed = [e for e in log if e['event'] == 'session']
    login = next(e for e in log if e['event'] == 'login' and e['outcome'] == 'accepted')
    assert opened['action'] == 'open' and closed['action'] == 'close'
    assert opened['session'] == closed['session'] and opened['pid'] == closed['pid'] > 1
    for e in (opened, closed):
        assert (e['outcome'], e['route'], e['kind'], e['account'], e['user'], e['vo'], e['uid']) == (
            'ok', 'ssh', 'exec', 'dev-alice', 'alice', 'dev', login['uid'])
        assert e['source'] == login['source']  # host:port: pairs the session with its login
    assert closed['exit_status'] == 3 and 0 <= closed['seconds'] < 30
    assert 'secret-word' not in audit_path.read_text()  # the command text is never logged
    assert delta(m0, m1, 'xos_sshd_session_requests_total', kind='exec', outcome='ok', route='ssh') == 1
    assert value(m1, 'xos_sshd_sessions', kind='exec') == 0

    # a live session is counted while it lasts; a hang-up closes it with the signal
    held = subprocess.Popen([SSH_XOS, '-i', str(alice), '-p', str(gw.port), '-o',
                             'StrictHostKeyChecking=no', '127.0.0.1', 'sleep 60'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(e['event'] == 'session' for e in events(audit_path)) == 3, 20,
                 'the held session opens')
        assert value(scrape(mport), 'xos_sshd_sessions', kind='exec') == 1
    finally:
        held.kill()
        held.wait()
    wait_for(lambda: sum(e['event'] == 'session' for e in events(audit_path)) == 4, 20,
             'the held session closes')
    hung_up = events(audit_path)[-1]
    assert (hung_up['action'], hung_up['exit_signal']) == ('close', 'HUP')
    renewed = [e['account'] for e in events(audit_path)
               if e['event'] == 'mapping' and e['action'] == 'renewed']
    assert renewed == ['dev-alice']  # the second login renewed the lease

    # jobs: run, checkpoint, kill, restart over SSH (subsystem sessions), with real CRIU
    m2 = scrape(mport)
    job = xcr(gw, alice, 'run', '--', 'sleep', '600').stdout.strip()
    wait_for(lambda: value(scrape(mport), 'xos_sshd_jobs', state='running') == 1, 10,
             'the jobs gauge sees the running job')
    image = xcr(gw, alice, 'checkpoint', job).stdout.strip()
    xcr(gw, alice, 'kill', job, '-s', 'KILL')
    new = xcr(gw, alice, 'restart', image).stdout.strip()
    xcr(gw, alice, 'kill', new, '-s', 'KILL')
    m3 = scrape(mport)
    cr = [e for e in events(audit_path) if e['event'] == 'cr']
    assert [(e['action'], e['outcome']) for e in cr] == [
        ('run', 'ok'), ('checkpoint', 'ok'), ('kill', 'ok'), ('restart', 'ok'), ('kill', 'ok')]
    run_, ck, _, rs, _ = cr
    assert run_['job'] == job and run_['pid'] > 1 and run_['command'] == ['sleep', '600']
    assert (ck['job'], ck['image'], ck['route']) == (job, image, 'ssh')
    assert ck['size_bytes'] > 0 and ck['seconds'] > 0
    assert (rs['job'], rs['image'], rs['migrated']) == (new, image, False) and rs['seconds'] > 0
    assert all((e['vo'], e['user'], e['account']) == ('dev', 'alice', 'dev-alice') for e in cr)
    assert delta(m2, m3, 'xos_sshd_checkpoint_bytes_total') == ck['size_bytes']
    assert delta(m2, m3, 'xos_sshd_checkpoint_seconds_count') == 1
    assert delta(m2, m3, 'xos_sshd_checkpoint_seconds_sum') == pytest.approx(ck['seconds'])
    assert delta(m2, m3, 'xos_sshd_restart_seconds_count') == 1
    assert delta(m2, m3, 'xos_sshd_cr_ops_total', op='kill', outcome='ok') == 2
    assert delta(m2, m3, 'xos_sshd_migrations_total', direction='in', outcome='ok') == 0
    subsystem = [e for e in events(audit_path) if e['event'] == 'session' and e.get('kind') == 'subsystem']
    assert {e['subsystem'] for e in subsystem} == {'xos-cr'} and len(subsystem) >= 2 * 5
    wait_for(lambda: value(scrape(mport), 'xos_sshd_jobs', state='killed') == 2, 10,
             'the jobs gauge sees both jobs killed')
    # a uid that is no VO account is refused on the users' socket, and that is audited
    nobody = run(*NOBODY, '/usr/bin/python3', '-m', 'xos_sshd.cr.cli', '--socket',
                 str(gw.state / 'cr.sock'), 'list', check=False, cwd='/',
                 env={'PYTHONPATH': str(REPO), 'PATH': os.environ['PATH']})
    assert nobody.returncode == 1 and '[permission-denied]' in nobody.stderr, nobody.stderr
    denied = events(audit_path)[-1]
    assert (denied['event'], denied['action'], denied['outcome'], denied['reason'],
            denied['route'], denied['peer_uid']) == ('cr', 'list', 'refused',
                                                     'permission-denied', 'local', 65534)

    # xos-ams release through the control socket: one admin line, one mapping line
    wait_for(lambda: not open_sessions(audit_path), 10, 'every session closed')
    res = run(XOS_AMS, '--socket', str(gw.control_socket), 'release', 'dev-alice', '--force')
    assert res.stdout.startswith('released dev-alice')
    log = events(audit_path)
    released = [e for e in log if e['event'] == 'mapping' and e['action'] == 'released']
    assert [(e['account'], e['detail']) for e in released] == [('dev-alice', 'released by admin')]
    admin = [e for e in log if e['event'] == 'admin']
    assert [(e['action'], e['outcome'], e['account'], e['force']) for e in admin] == [
        ('release', 'ok', 'dev-alice', True)]
    wait_for(lambda: value(scrape(mport), 'xos_sshd_mappings', vo='dev', kind='dynamic') == 0, 10,
             'the mappings gauge sees the release')

    # logrotate: rename, SIGHUP, and the next event lands in a new file
    rotated = audit_path.with_name('audit.log.1')
    audit_path.rename(rotated)
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(audit_path.exists, 10, 'the audit log reopened')
    old_size = rotated.stat().st_size
    assert gw.ssh_xos(alice, 'true').returncode == 0
    wait_for(lambda: not open_sessions(audit_path), 10, 'the session closes')
    assert sorted((e['event'], e['action'] if e['event'] != 'login' else e['outcome'])
                  for e in events(audit_path)) == [
        ('login', 'accepted'), ('mapping', 'created'), ('session', 'close'), ('session', 'open')]
    assert rotated.stat().st_size == old_size
    assert os.stat(audit_path).st_mode & 0o777 == 0o600

    # every line of the log is counted, under its event and outcome, and nothing else
    final = scrape(mport)
    lines: dict[tuple[str, str], int] = {}
    for e in events(rotated) + events(audit_path):
        key = (e['event'], e.get('outcome', 'none'))
        lines[key] = lines.get(key, 0) + 1
    counted = {(dict(k[1])['event'], dict(k[1])['outcome']): v for k, v in final.items()
               if k[0] == 'xos_sshd_audit_events_total'}
    assert counted == lines

    # SIGTERM closes the endpoint with the gateway; nothing failed on the way
    gw.stop()
    assert gw.proc is not None and gw.proc.returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(('127.0.0.1', mport), timeout=2).close()
    assert 'Traceback' not in gw.log() and 'listener failed' not in gw.log()
