"""Prometheus metrics, counted from the audit events, served on an optional loopback port.

Why from the audit log: every login, mapping change, session and checkpoint/restart
operation is already reported once, as one audit event (:mod:`xos_sshd.audit`).
:class:`Metrics` subscribes to the log and turns each record into counter and histogram
updates, so the counters count exactly what the log says, with the same outcomes and
reasons, and nothing in the gateway reports an event twice in two ways.  Gauges that
describe state rather than events (mappings per VO, jobs per state) are read from the store
every ``[metrics] refresh_seconds`` and right after a mapping or job event.  The one
exception: connections refused before authentication are counted by admission
(:attr:`xos_sshd.admission.Admission.counters`), which deliberately audits none of them (a
flood must not flood the log), and read from there at scrape time.

Everything lives in a private :class:`~prometheus_client.CollectorRegistry` (never the
process-global default), served by prometheus_client's own HTTP server in a daemon thread on
``[metrics] listen`` (loopback only: :func:`xos_sshd.config._metrics_config`).  The names
are listed in ``docs/internals.md`` ("Metrics").
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import platform
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .admission import REFUSAL_REASONS
from .ams.store import OutageLog, StoreUnavailable
from .cr.jobs import JOB_STATES
from .tasks import cancel_and_wait, wake_or_timeout

log = logging.getLogger(__name__)

PREFIX = 'xos_sshd'
#: Checkpoint (CRIU dump) and restart (CRIU restore) durations, seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: ``cr`` actions that are migrations, and their direction.  A ``restart`` with
#: ``migrated: true`` (an image another node took, copied here) is a migration in too.
MIGRATION_OPS = {'migrate-out': 'out', 'migrate-in': 'in', 'migrate': 'out'}
#: Events after which the store-backed gauges are refreshed at once.
REFRESH_EVENTS = frozenset({'mapping', 'cr'})


def _label(value: Any) -> str:
    """A label value: ``none`` for a missing field, at most 64 characters."""
    return 'none' if value is None or value == '' else str(value)[:64]


class _Snapshot(Collector):
    """A gauge family whose samples are replaced all at once (no half-updated scrape)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        self.values = dict(values)  # one reference swap: the scrape thread sees old or new

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for key, value in sorted(self.values.items()):
            family.add_metric(list(key), value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))


class _Refusals(Collector):
    """``xos_sshd_connections_refused_total{reason}``, read at scrape time from admission's
    counters (reason -> count, kept by the event loop's thread)."""

    NAME = f'{PREFIX}_connections_refused'
    HELP = ('Connections refused before authentication (closed before the SSH banner), by '
            'reason')

    def __init__(self, counters: Mapping[str, int]) -> None:
        self.counters = counters

    def collect(self) -> Iterable[CounterMetricFamily]:
        # dict() of a Counter copies in C without releasing the GIL: the loop thread's
        # increments are seen before or after, never halfway.
        counts = dict(self.counters)
        family = CounterMetricFamily(self.NAME, self.HELP, labels=['reason'])
        for reason in REFUSAL_REASONS:  # (the counters also hold penalties imposed)
            family.add_metric([reason], float(counts.get(reason, 0)))
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=['reason'])


class Metrics:
    """The gateway's metrics in their own registry; :meth:`observe` takes audit records."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        Info(f'{PREFIX}_build', 'xos-sshd version and runtime', registry=r).info({
            'version': _version('xos-sshd'), 'python': platform.python_version(),
            'asyncssh': _version('asyncssh')})
        self.logins = Counter(f'{PREFIX}_logins_total', 'Login attempts (SSH and pam_xos) by '
                              'outcome, refusal reason and route', ['outcome', 'reason', 'route'],
                              registry=r)
        self.mapping_changes = Counter(f'{PREFIX}_mapping_changes_total', 'Mapping events '
                                       '(created, renewed, released, reclaimed, ...)',
                                       ['vo', 'action'], registry=r)
        self.sessions = Gauge(f'{PREFIX}_sessions', 'Live SSH sessions served by this '
                              'gateway', ['kind'], registry=r)
        self.session_requests = Counter(f'{PREFIX}_session_requests_total', 'Session requests '
                                        'by kind and outcome (pam_xos sessions: route pam)',
                                        ['kind', 'outcome', 'route'], registry=r)
        self.cr_ops = Counter(f'{PREFIX}_cr_ops_total', 'Checkpoint/restart operations by op '
                              'and outcome', ['op', 'outcome'], registry=r)
        self.checkpoint_bytes = Counter(f'{PREFIX}_checkpoint_bytes_total', 'Bytes of the '
                                        'checkpoint images taken', registry=r)
        self.checkpoint_seconds = Histogram(f'{PREFIX}_checkpoint_seconds', 'Duration of '
                                            'successful checkpoints (CRIU dump)',
                                            buckets=DURATION_BUCKETS, registry=r)
        self.restart_seconds = Histogram(f'{PREFIX}_restart_seconds', 'Duration of successful '
                                         'restarts (CRIU restore)', buckets=DURATION_BUCKETS,
                                         registry=r)
        self.migrations = Counter(f'{PREFIX}_migrations_total', 'Migrations by direction (out: '
                                  'a job left, in: a job arrived) and outcome',
                                  ['direction', 'outcome'], registry=r)
        self.migration_downtime = Histogram(f'{PREFIX}_migration_downtime_seconds', 'How long '
                                            'migrated jobs were frozen (source side)',
                                            buckets=DURATION_BUCKETS, registry=r)
        self.events = Counter(f'{PREFIX}_audit_events_total', 'Audit log lines by event and '
                              'outcome', ['event', 'outcome'], registry=r)
        self.mappings = _Snapshot(f'{PREFIX}_mappings', 'Mappings held now, by VO and policy '
                                  'kind (banned ones included)', ('vo', 'kind'))
        self.jobs = _Snapshot(f'{PREFIX}_jobs', 'Jobs of this node in the job table, by state',
                              ('state',))
        r.register(self.mappings)
        r.register(self.jobs)
        self.refusals: _Refusals | None = None
        if process:
            ProcessCollector(namespace=PREFIX, registry=r)

    # --- events ---------------------------------------------------------------------------

    def observe(self, record: Mapping[str, Any]) -> None:
        """Count one audit record (an :class:`~xos_sshd.audit.AuditLog` listener)."""
        event = str(record.get('event'))
        outcome = _label(record.get('outcome'))
        self.events.labels(_label(event), outcome).inc()
        if event == 'login':
            self.logins.labels(outcome, _label(record.get('reason')),
                               _label(record.get('route'))).inc()
        elif event == 'mapping':
            self.mapping_changes.labels(_label(record.get('vo')),
                                        _label(record.get('action'))).inc()
        elif event == 'session':
            self._session(record, outcome)
        elif event == 'cr':
            self._cr(record, outcome)

    def _session(self, record: Mapping[str, Any], outcome: str) -> None:
        action, kind, route = record.get('action'), _label(record.get('kind')), record.get('route')
        if action == 'open':
            self.session_requests.labels(kind, outcome, _label(route)).inc()
        if route != 'ssh' or outcome != 'ok':
            return  # pam_xos sessions are the system sshd's, not live here
        if action == 'open':
            self.sessions.labels(kind).inc()
        elif action == 'close':
            self.sessions.labels(kind).dec()

    def _cr(self, record: Mapping[str, Any], outcome: str) -> None:
        op = _label(record.get('action'))
        self.cr_ops.labels(op, outcome).inc()
        direction = MIGRATION_OPS.get(op) or ('in' if record.get('migrated') is True else None)
        if direction is not None:
            self.migrations.labels(direction, outcome).inc()
        if outcome != 'ok':
            return
        seconds = _number(record.get('seconds'))
        frozen = _number(record.get('frozen_seconds'))
        if op == 'migrate-out' and frozen is not None:
            self.migration_downtime.observe(frozen)
        if op == 'checkpoint':
            size = _number(record.get('size_bytes'))
            if size is not None:
                self.checkpoint_bytes.inc(size)
            if seconds is not None:
                self.checkpoint_seconds.observe(seconds)
        elif op == 'restart' and seconds is not None:
            self.restart_seconds.observe(seconds)

    def count_refusals(self, counters: Mapping[str, int]) -> None:
        """Export admission's refusal counters (``Admission.counters``), read at each scrape."""
        if self.refusals is None:
            self.refusals = _Refusals(counters)
            self.registry.register(self.refusals)
        else:
            self.refusals.counters = counters

    # --- state read from the store ------------------------------------------------------------

    def set_mappings(self, counts: Mapping[tuple[str, str], int],
                     configured: Iterable[tuple[str, str]] = ()) -> None:
        """Replace the mapping gauge; *configured* (vo, kind) pairs show 0 when empty."""
        values: dict[tuple[str, ...], float] = {key: 0.0 for key in configured}
        values.update({key: float(n) for key, n in counts.items()})
        self.mappings.replace(values)

    def set_jobs(self, counts: Mapping[str, int]) -> None:
        """Replace the jobs gauge (every known state is exported, 0 when none)."""
        # Every state is exported, as 0 before the first job in it exists.
        values: dict[tuple[str, ...], float] = {(s,): 0.0 for s in JOB_STATES}
        values.update({(state,): float(n) for state, n in counts.items()})
        self.jobs.replace(values)


class MetricsEndpoint:
    """The running endpoint: HTTP server thread, audit subscription, gauge refresher."""

    def __init__(self, metrics: Metrics, audit: Any, ams: Any, jobs: Any,
                 refresh_seconds: float) -> None:
        self.metrics = metrics
        self._audit = audit
        self._ams = ams
        self._jobs = jobs  # JobManager (table + node), or None
        self._refresh_seconds = refresh_seconds
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._httpd: Any = None
        self._thread: Any = None
        #: The (host, port) the endpoint is bound to.
        self.address: tuple[str, int] = ('', 0)

    @classmethod
    async def start(cls, config: Any, audit: Any, ams: Any, jobs: Any,
                    admission: Any = None) -> 'MetricsEndpoint | None':
        """Serve the metrics when ``[metrics] listen`` is set (else ``None``); *admission*
        (:class:`~xos_sshd.admission.Admission`): its refusals are exported too.

        Raises ``OSError`` when the address cannot be bound (the gateway does not start).
        """
        settings = getattr(config, 'metrics', None)
        if settings is None or settings.listen is None:
            return None
        endpoint = cls(Metrics(), audit, ams, jobs, settings.refresh_seconds)
        if admission is not None:
            endpoint.metrics.count_refusals(admission.counters)
        await endpoint.refresh()
        audit.subscribe(endpoint._observe)
        try:
            endpoint._httpd, endpoint._thread = start_http_server(
                settings.listen.port, settings.listen.host, registry=endpoint.metrics.registry)
        except BaseException:
            audit.unsubscribe(endpoint._observe)
            raise
        endpoint.address = endpoint._httpd.server_address[:2]
        endpoint._task = asyncio.create_task(endpoint._refresh_loop())
        log.info('metrics on http://%s/metrics', _hostport(*endpoint.address))
        return endpoint

    def _observe(self, record: dict[str, Any]) -> None:
        self.metrics.observe(record)
        if record.get('event') in REFRESH_EVENTS:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closing: no refresh needed any more
                pass

    async def _refresh_loop(self) -> None:
        outage = OutageLog(log, 'metrics refresh')  # a store outage: said once, not per pass
        while True:
            await wake_or_timeout(self._wake, self._refresh_seconds)
            try:
                await self.refresh()
            except StoreUnavailable as exc:
                outage.failed(exc)
            except Exception:
                log.exception('metrics refresh failed; will retry')
            else:
                outage.ok()

    async def refresh(self) -> None:
        """Read the mapping and job counts from the store now."""
        configured = [(vo, pol.kind) for vo, pol in getattr(self._ams, 'policies', {}).items()]
        self.metrics.set_mappings(await self._ams.count_mappings(), configured)
        if self._jobs is not None:
            self.metrics.set_jobs(await self._jobs.table.counts(node=self._jobs.node))

    async def close(self) -> None:
        """Stop counting, stop the refresher, close the listening socket."""
        self._audit.unsubscribe(self._observe)
        await cancel_and_wait(self._task)
        self._task = None
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, 5)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return float(value)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def _hostport(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
