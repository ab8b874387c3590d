"""The gateway's configuration: one TOML file, checked completely before anything starts.

Every key is validated here, so a bad file fails at start with one message that names the
key (``ConfigError``), never later with a traceback in the middle of a login.  The per-VO
tables become :class:`xos_sshd.ams.VOPolicy` objects (mapping) and
:class:`xos_sshd.auth.verifier.VOTrust` objects (trust).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .ams import VOPolicy
from .ams.store import PgSettings, is_pg_url
from .auth.verifier import VOTrust

DEFAULT_STATE_DIR = Path('/var/lib/xos-sshd')
DEFAULT_PORT = 22022
POLICIES = ('dynamic', 'pool', 'static')
DEFAULT_IMAGE_QUOTA_BYTES = 10 << 30
DEFAULT_IMAGE_QUOTA_COUNT = 20


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f'{key}: {message}')
        self.key = key


@dataclass(frozen=True)
class ListenAddress:
    """One address the gateway listens on."""

    host: str
    port: int


@dataclass(frozen=True)
class VOConfig:
    """Everything configured for one VO: whom to trust, how to map."""

    name: str
    trust: VOTrust
    policy: VOPolicy


@dataclass(frozen=True)
class ImagesConfig:
    """The ``[images]`` table: checkpoint images (:mod:`xos_sshd.cr.images`).

    ``trusted_node_keys``: other nodes' image keys, each a file holding one OpenSSH public key
    line (``ssh-ed25519 AAAA... comment``, i.e. a copy of that node's ``STATE/image_key.pub``);
    images they signed may be imported and restored here.  This node's own key is always
    trusted.  ``quota_bytes``/``quota_count``: per account.  ``criu_path``: the CRIU to run
    (``cr.criu.find_criu``; default: ``$XOS_CRIU``, a system CRIU >= 4, the installed one).
    ``node_name``: this node's name in the manifests it signs (default: the host name).
    """

    trusted_node_keys: tuple[Path, ...] = ()
    quota_bytes: int = DEFAULT_IMAGE_QUOTA_BYTES
    quota_count: int = DEFAULT_IMAGE_QUOTA_COUNT
    criu_path: str | None = None
    node_name: str | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """The ``[limits]`` table: admission control and per-account caps
    (:mod:`xos_sshd.admission`, :mod:`xos_sshd.liveconn`).

    ``max_startups`` = (start, rate, full), OpenSSH ``MaxStartups``: beyond *start*
    unauthenticated connections a new one is refused with probability *rate* % rising
    linearly to 100 % at *full*.  ``max_startups_per_source``: unauthenticated connections
    from one source (IPv4 address, IPv6 /64) at once; 0 = no limit.  ``penalty_*`` (seconds),
    as OpenSSH ``PerSourcePenalties``: a source that failed authentication (``authfail``),
    ran out of ``login_grace_seconds`` (``grace_exceeded``) or went away without
    authenticating (``noauth``) collects that much penalty; once it holds ``penalty_min`` it
    is refused for as long as it holds (at most ``penalty_max``).  ``penalty_exempt``:
    networks never penalised.  ``max_sessions_per_connection`` (OpenSSH ``MaxSessions``),
    ``max_sessions_per_account`` (across connections), ``max_jobs_per_account`` (running
    ``xos-cr`` jobs on this node): 0 = no limit for the per-account ones.
    ``revocation_check_seconds``: how often live connections are checked against the CRLs.
    ``max_auth_tries`` (OpenSSH ``MaxAuthTries``): refused authentications on one connection
    before it is disconnected (asyncssh has no such limit).
    ``keepalive_seconds``/``keepalive_count_max``: SSH keepalives to the client (0 = off).
    """

    max_startups: tuple[int, int, int] = (10, 30, 100)
    max_startups_per_source: int = 10
    penalties: bool = True
    penalty_authfail: float = 5.0
    penalty_noauth: float = 1.0
    penalty_grace_exceeded: float = 20.0
    penalty_min: float = 15.0
    penalty_max: float = 600.0
    penalty_exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_sessions_per_connection: int = 10
    max_auth_tries: int = 6
    max_sessions_per_account: int = 100
    max_jobs_per_account: int = 20
    revocation_check_seconds: float = 2.0
    keepalive_seconds: float = 60.0
    keepalive_count_max: int = 3


@dataclass(frozen=True)
class SessionConfig:
    """The ``[session]`` table: PAM sessions and resource limits of user processes
    (:mod:`xos_sshd.session.spawn`, :mod:`xos_sshd.session.pamsession`).

    ``pam``: open a PAM session (service ``pam_service``, ``/etc/pam.d/<pam_service>``) for
    every session process, as sshd's ``UsePAM``, in a per-session root helper (never in the
    gateway).  ``pam_confdir``: read the service file from this directory instead of
    /etc/pam.d (``pam_start_confdir``; for tests and containers).  ``rlimits``: resource
    limits of every session process and job, ``(name, soft, hard)`` with limits.conf's names
    and setrlimit(2)'s units (bytes, seconds); ``UNLIMITED`` (-1) is ``RLIM_INFINITY``.
    Given, the table replaces the default (nofile 1024 soft / 524288 hard, as systemd gives
    user services); with ``pam`` they are set before the PAM session opens, so pam_limits
    overrides what limits.conf names.  ``exec_helper``: the exec shim every session process
    starts as (``xos-session-exec``); unset, the installed one or a source checkout's build
    (:func:`xos_sshd.session.spawn.exec_helper`).
    """

    pam: bool = False
    pam_service: str = 'xos-sshd'
    pam_confdir: Path | None = None
    rlimits: tuple[tuple[str, int, int], ...] = (('nofile', 1024, 524288),)
    exec_helper: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """The ``[metrics]`` table: the optional Prometheus endpoint (:mod:`xos_sshd.metrics`).

    ``listen``: the loopback address it serves ``/metrics`` on; ``None`` (no table, or no
    key) means no endpoint.  Only loopback addresses are accepted: the counters tell who logs
    in how often and from which VO, so a remote Prometheus reaches them through a proxy or a
    tunnel the admin secures.  ``refresh_seconds``: how often the gauges read from the store
    (mappings per VO, jobs per state) are refreshed; they are also refreshed right after a
    mapping or job event.
    """

    listen: ListenAddress | None = None
    refresh_seconds: float = 15.0


@dataclass(frozen=True)
class Config:
    """The whole, validated gateway configuration."""

    state_dir: Path
    listen: tuple[ListenAddress, ...]
    host_keys: tuple[Path, ...]
    vos: Mapping[str, VOConfig]
    audit_log: Path
    nss_dir: Path
    control_socket: Path
    #: The users' socket for local ``xos-cr`` (``cr.*`` ops only, mode 0666).
    cr_socket: Path = Path('/run/xos-sshd/cr.sock')
    allow_port_forwarding: bool = False
    allow_agent_forwarding: bool = False
    login_grace_seconds: float = 30.0
    clock_skew_seconds: int = 300
    log_level: str = 'info'
    reclaim_interval_seconds: float = 600.0
    source: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: ``[ams] store = "postgresql://..."``: the shared store of a cluster; ``None``: the
    #: embedded sqlite database (:attr:`ams_db`).
    ams_pg: PgSettings | None = None

    @property
    def ams_db(self) -> Path:
        """The embedded AMS's sqlite database."""
        return self.state_dir / 'ams.sqlite'

    @property
    def ams_store(self) -> Path | PgSettings:
        """What ``AMS.open`` opens: the PostgreSQL settings, or the sqlite file."""
        return self.ams_pg if self.ams_pg is not None else self.ams_db

    def describe_store(self) -> str:
        """One line for ``--check-config`` and the logs: which store, never a password."""
        if self.ams_pg is None:
            return f'sqlite {self.ams_db}'
        pg = self.ams_pg
        source = (f'password from {pg.password_file}' if pg.password_file else
                  f'password from ${pg.password_env}' if pg.password_env else
                  'password from PGPASSWORD or ~/.pgpass, if any')
        return f'{pg.describe()} ({source})'

    @property
    def trusts(self) -> list[VOTrust]:
        """The per-VO trust anchors, for the verifier."""
        return [vo.trust for vo in self.vos.values()]

    @property
    def policies(self) -> dict[str, VOPolicy]:
        """The per-VO mapping policies, for the AMS."""
        return {name: vo.policy for name, vo in self.vos.items()}


_TOP_KEYS = {'state_dir', 'listen', 'host_keys', 'vo', 'audit_log', 'nss_dir', 'control_socket',
             'cr_socket',
             'allow_port_forwarding', 'allow_agent_forwarding', 'login_grace_seconds',
             'clock_skew_seconds', 'log_level', 'reclaim_interval_seconds', 'images',
             'limits', 'session', 'metrics', 'ams'}
_VO_KEYS = {'ca', 'crl', 'crl_required', 'policy', 'uid_range', 'gid_range', 'lease_hours',
            'home_base', 'shell', 'account_prefix', 'map_roles', 'pool', 'static'}
_IMAGES_KEYS = {'trusted_node_keys', 'quota_bytes', 'quota_count', 'criu_path', 'node_name'}
_LOG_LEVELS = ('debug', 'info', 'warning', 'error')


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at *path*."""
    try:
        with open(path, 'rb') as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), f'cannot read: {exc.strerror}') from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f'not valid TOML: {exc}') from None
    return parse_config(raw, source=path)


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document and build the :class:`Config`."""
    _no_unknown_keys(raw, _TOP_KEYS, '')
    state_dir = _path(raw, 'state_dir', DEFAULT_STATE_DIR)
    vos_raw = raw.get('vo')
    if not isinstance(vos_raw, dict) or not vos_raw:
        raise ConfigError('vo', 'at least one [vo.NAME] table is required')
    vos = {name: _vo_config(name, table, state_dir) for name, table in vos_raw.items()}
    host_keys = tuple(Path(p) for p in _str_list(raw, 'host_keys', []))
    if not host_keys:
        raise ConfigError('host_keys', 'at least one host key file is required')
    log_level = _typed(raw, 'log_level', str, 'info')
    if log_level not in _LOG_LEVELS:
        raise ConfigError('log_level', f'must be one of {", ".join(_LOG_LEVELS)}')
    grace = _typed(raw, 'login_grace_seconds', (int, float), 30)
    if not 1 <= grace <= 600:
        raise ConfigError('login_grace_seconds', 'must be between 1 and 600')
    skew = _typed(raw, 'clock_skew_seconds', int, 300)
    if not 0 <= skew <= 3600:
        raise ConfigError('clock_skew_seconds', 'must be between 0 and 3600')
    reclaim = _typed(raw, 'reclaim_interval_seconds', (int, float), 600)
    if not 1 <= reclaim <= 86400:
        raise ConfigError('reclaim_interval_seconds', 'must be between 1 and 86400')
    control_socket = _path(raw, 'control_socket', Path('/run/xos-sshd/control.sock'))
    return Config(
        state_dir=state_dir,
        listen=tuple(_listen_address(a) for a in _str_list(raw, 'listen', [f'0.0.0.0:{DEFAULT_PORT}'])),
        host_keys=host_keys,
        vos=vos,
        audit_log=_path(raw, 'audit_log', state_dir / 'audit.log'),
        nss_dir=_path(raw, 'nss_dir', state_dir / 'nss'),
        control_socket=control_socket,
        cr_socket=_path(raw, 'cr_socket', control_socket.parent / 'cr.sock'),
        allow_port_forwarding=_typed(raw, 'allow_port_forwarding', bool, False),
        allow_agent_forwarding=_typed(raw, 'allow_agent_forwarding', bool, False),
        login_grace_seconds=float(grace),
        clock_skew_seconds=skew,
        log_level=log_level,
        reclaim_interval_seconds=float(reclaim),
        source=source,
        images=_images_config(raw.get('images', {})),
        limits=_limits_config(_table(raw, 'limits')),
        session=_session_config(_table(raw, 'session')),
        metrics=_metrics_config(_table(raw, 'metrics')),
        ams_pg=_ams_store_config(_table(raw, 'ams')),
    )


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """An optional sub-table: absent is empty, anything but a table is an error."""
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(key, 'must be a table')
    return table


# --- [limits] ---------------------------------------------------------------------------

#: key -> (kind, lowest, highest) of the plain numeric ``[limits]`` keys.
_LIMITS_NUMBERS: dict[str, tuple[Any, float, float]] = {
    'max_startups_per_source': (int, 0, 100_000),
    'penalty_authfail': ((int, float), 0, 86_400),
    'penalty_noauth': ((int, float), 0, 86_400),
    'penalty_grace_exceeded': ((int, float), 0, 86_400),
    'penalty_min': ((int, float), 0, 86_400),
    'penalty_max': ((int, float), 1, 7 * 86_400),
    'max_sessions_per_connection': (int, 1, 10_000),
    'max_auth_tries': (int, 1, 1_000),
    'max_sessions_per_account': (int, 0, 1_000_000),
    'max_jobs_per_account': (int, 0, 100_000),
    'revocation_check_seconds': ((int, float), 0.1, 300),
    'keepalive_seconds': ((int, float), 0, 3600),
    'keepalive_count_max': (int, 1, 100),
}
_LIMITS_KEYS = set(_LIMITS_NUMBERS) | {'max_startups', 'penalties', 'penalty_exempt'}


def _limits_config(table: Mapping[str, Any]) -> LimitsConfig:
    """The optional ``[limits]`` table; every key has a safe default (:class:`LimitsConfig`)."""
    _no_unknown_keys(table, _LIMITS_KEYS, 'limits.')
    defaults = LimitsConfig()
    values: dict[str, Any] = {}
    for key, (kind, low, high) in _LIMITS_NUMBERS.items():
        value = _typed(table, key, kind, getattr(defaults, key), 'limits')
        if not low <= value <= high:
            raise ConfigError(f'limits.{key}', f'must be between {low} and {high}')
        values[key] = float(value) if kind != int else value
    if values['penalty_max'] < values['penalty_min']:
        raise ConfigError('limits.penalty_max', 'must not be less than limits.penalty_min')
    return LimitsConfig(
        max_startups=parse_max_startups(table.get('max_startups', defaults.max_startups)),
        penalties=_typed(table, 'penalties', bool, True, 'limits'),
        penalty_exempt=tuple(_network(text, 'limits.penalty_exempt')
                             for text in _str_list(table, 'penalty_exempt', [], 'limits')),
        **values)


def parse_max_startups(value: Any, key: str = 'limits.max_startups') -> tuple[int, int, int]:
    """``"start:rate:full"`` (OpenSSH ``MaxStartups``), or one number N (= ``"N:100:N"``: a
    hard limit) -> ``(start, rate, full)``; ``ConfigError`` naming *key* otherwise."""
    if isinstance(value, tuple):
        parts: list[Any] = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value, 100, value]
    elif isinstance(value, str) and re.fullmatch(r'\d{1,7}(:\d{1,3}:\d{1,7})?', value.strip()):
        numbers = [int(p) for p in value.strip().split(':')]
        parts = numbers if len(numbers) == 3 else [numbers[0], 100, numbers[0]]
    else:
        raise ConfigError(key, f'expected "start:rate:full" (e.g. "10:30:100") or a number, '
                          f'got {value!r}')
    start, rate, full = parts
    if not 1 <= start <= full <= 1_000_000:
        raise ConfigError(key, f'needs 1 <= start <= full (got start {start}, full {full})')
    if not 0 <= rate <= 100:
        raise ConfigError(key, f'rate is a percentage (0..100), got {rate}')
    return (start, rate, full)


def _network(text: str, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One network (``10.0.0.0/8``, ``2001:db8::/32``, or one address) of a list."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(key, f'{text!r} is not a network (e.g. "10.0.0.0/8" or '
                          f'"2001:db8::/32")') from None


# --- [ams] ------------------------------------------------------------------------------

#: key -> (lowest, highest) of the numeric ``[ams]`` keys (seconds, except pool_size).
_AMS_NUMBERS: dict[str, tuple[float, float]] = {
    'connect_timeout': (0.1, 300), 'command_timeout': (0.1, 3600), 'retry_seconds': (0, 600),
    'pool_size': (1, 100), 'nss_refresh_seconds': (1, 86_400)}
_AMS_KEYS = set(_AMS_NUMBERS) | {'store', 'password_file', 'password_env'}


def _ams_store_config(table: Mapping[str, Any]) -> PgSettings | None:
    """The optional ``[ams]`` table: ``store = "sqlite"`` (default, ``STATE/ams.sqlite``) or
    ``"postgresql://USER@HOST[:PORT]/DB"`` (a cluster's shared store).  The password never
    goes in the file: ``password_file`` (an absolute path; its first line) or
    ``password_env`` (the name of an environment variable), else PGPASSWORD/~/.pgpass."""
    _no_unknown_keys(table, _AMS_KEYS, 'ams.')
    store = _typed(table, 'store', str, 'sqlite', 'ams')
    if store == 'sqlite':
        others = sorted(set(table) - {'store'})
        if others:
            raise ConfigError(f'ams.{others[0]}', 'only for a PostgreSQL store '
                              '(ams.store = "postgresql://...")')
        return None
    if not is_pg_url(store):
        raise ConfigError('ams.store', f'must be "sqlite" or a postgresql:// URL, got {store!r}')
    parts = urlsplit(store)
    if parts.password is not None or 'password' in parse_qs(parts.query):
        raise ConfigError('ams.store', 'must not hold the password (the config file is no place '
                          'for it): set ams.password_file or ams.password_env')
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ConfigError('ams.store', f'{store!r} has an invalid port') from None
    settings: dict[str, Any] = {'dsn': store}
    if 'password_file' in table:
        settings['password_file'] = str(_path(table, 'password_file', None, 'ams'))
    env = _typed(table, 'password_env', str, None, 'ams')
    if env is not None:
        if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', env):
            raise ConfigError('ams.password_env', f'{env!r} is not an environment variable name')
        if 'password_file' in settings:
            raise ConfigError('ams.password_env', 'give password_file or password_env, not both')
        settings['password_env'] = env
    for key, (low, high) in _AMS_NUMBERS.items():
        kind: Any = int if key == 'pool_size' else (int, float)
        value = _typed(table, key, kind, None, 'ams')
        if value is None:
            continue
        if not low <= value <= high:
            raise ConfigError(f'ams.{key}', f'must be between {low} and {high}')
        settings[key] = value if key == 'pool_size' else float(value)
    return PgSettings(**settings)


def check_store(config: Config) -> None:
    """At start (and ``--check-config``): the password file of a PostgreSQL store is readable
    (nothing is connected to: ``xos-sshd doctor`` does that)."""
    pg = config.ams_pg
    if pg is None:
        return
    try:
        pg.password()
    except OSError as exc:
        raise ConfigError('ams.password_file', f'{pg.password_file}: {exc.strerror}') from None
    if pg.password_env and pg.password_env not in os.environ:
        raise ConfigError('ams.password_env', f'${pg.password_env} is not set')


# --- [session] --------------------------------------------------------------------------

#: ``[session] rlimits`` keys: limits.conf's names of the setrlimit(2) resources.
RLIMIT_NAMES = ('as', 'core', 'cpu', 'data', 'fsize', 'locks', 'memlock', 'msgqueue', 'nice',
                'nofile', 'nproc', 'rss', 'rtprio', 'rttime', 'sigpending', 'stack')
UNLIMITED = -1  # resource.RLIM_INFINITY as Python's resource module spells it on Linux
_SESSION_KEYS = {'pam', 'pam_service', 'pam_confdir', 'rlimits', 'exec_helper'}
_RLIMIT_MAX = 2 ** 63 - 1


def _session_config(table: Mapping[str, Any]) -> SessionConfig:
    """The optional ``[session]`` table (:class:`SessionConfig`)."""
    _no_unknown_keys(table, _SESSION_KEYS, 'session.')
    service = _typed(table, 'pam_service', str, 'xos-sshd', 'session')
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._+-]{0,63}', service):
        raise ConfigError('session.pam_service', 'must be a PAM service name, a file name in '
                          '/etc/pam.d ([A-Za-z0-9._+-], at most 64 characters)')
    confdir = _path(table, 'pam_confdir', None, 'session') if 'pam_confdir' in table else None
    helper = _path(table, 'exec_helper', None, 'session') if 'exec_helper' in table else None
    rlimits = SessionConfig.rlimits
    if 'rlimits' in table:
        raw = table['rlimits']
        if not isinstance(raw, dict):
            raise ConfigError('session.rlimits', 'must be a table, e.g. '
                              '{ nofile = [1024, 524288], core = 0 }')
        _no_unknown_keys(raw, set(RLIMIT_NAMES), 'session.rlimits.')
        rlimits = tuple(_rlimit(name, raw[name]) for name in sorted(raw))
    return SessionConfig(pam=_typed(table, 'pam', bool, False, 'session'), pam_service=service,
                         pam_confdir=confdir, rlimits=rlimits, exec_helper=helper)


def _rlimit(name: str, value: Any) -> tuple[str, int, int]:
    """One limit: N or "unlimited" (soft = hard), or [soft, hard]; soft never above hard."""
    key = f'session.rlimits.{name}'

    def one(v: Any) -> int:
        if v in ('unlimited', 'infinity'):
            return UNLIMITED
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _RLIMIT_MAX:
            return v
        raise ConfigError(key, f'expected a non-negative integer, "unlimited" or [soft, hard], '
                          f'got {v!r}')

    if isinstance(value, list):
        if len(value) != 2:
            raise ConfigError(key, f'expected [soft, hard], got {len(value)} values')
        soft, hard = one(value[0]), one(value[1])
    else:
        soft = hard = one(value)
    if hard != UNLIMITED and (soft == UNLIMITED or soft > hard):
        raise ConfigError(key, f'the soft limit {value[0]!r} is above the hard limit {value[1]!r}')
    return (name, soft, hard)


# --- [metrics] --------------------------------------------------------------------------

_METRICS_KEYS = {'listen', 'refresh_seconds'}


def _metrics_config(table: Mapping[str, Any]) -> MetricsConfig:
    """The optional ``[metrics]`` table: ``listen = "127.0.0.1:9622"``, loopback only."""
    _no_unknown_keys(table, _METRICS_KEYS, 'metrics.')
    refresh = _typed(table, 'refresh_seconds', (int, float), 15.0, 'metrics')
    if not 1 <= refresh <= 3600:
        raise ConfigError('metrics.refresh_seconds', 'must be between 1 and 3600')
    text = _typed(table, 'listen', str, None, 'metrics')
    if text is None:
        return MetricsConfig(refresh_seconds=float(refresh))
    try:
        address = _listen_address(text)
    except ConfigError as exc:
        raise ConfigError('metrics.listen', str(exc).removeprefix('listen: ')) from None
    host = '127.0.0.1' if address.host == 'localhost' else address.host
    if not ipaddress.ip_address(host).is_loopback:
        raise ConfigError('metrics.listen', f'{text!r} is not a loopback address: the metrics '
                          'tell who logs in; serve them on 127.0.0.1 or [::1] and let a proxy '
                          'or tunnel you secure reach them')
    return MetricsConfig(listen=ListenAddress(host, address.port), refresh_seconds=float(refresh))


def _images_config(table: Any) -> ImagesConfig:
    """The optional ``[images]`` table (no file is read here: see :func:`check_images`)."""
    if not isinstance(table, dict):
        raise ConfigError('images', 'must be a table')
    _no_unknown_keys(table, _IMAGES_KEYS, 'images.')
    keys = _str_list(table, 'trusted_node_keys', [], 'images')
    for key in keys:
        if not key.startswith('/'):
            raise ConfigError('images.trusted_node_keys', f'{key!r} is not an absolute path')
    quotas: dict[str, int] = {}
    for key, default in (('quota_bytes', DEFAULT_IMAGE_QUOTA_BYTES),
                         ('quota_count', DEFAULT_IMAGE_QUOTA_COUNT)):
        quotas[key] = _typed(table, key, int, default, 'images')
        if quotas[key] < 1:
            raise ConfigError(f'images.{key}', 'must be a positive integer')
    criu = _path(table, 'criu_path', None, 'images') if 'criu_path' in table else None
    node = _typed(table, 'node_name', str, None, 'images')
    if node is not None and not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._-]{0,63}', node):
        raise ConfigError('images.node_name', 'must be a host-like name ([A-Za-z0-9._-], '
                          'at most 64 characters)')
    return ImagesConfig(trusted_node_keys=tuple(Path(k) for k in keys),
                        quota_bytes=quotas['quota_bytes'], quota_count=quotas['quota_count'],
                        criu_path=str(criu) if criu else None, node_name=node)


def check_images(config: Config) -> None:
    """Read every trusted node key now (at start), so a missing or malformed one stops the
    gateway with ``images.trusted_node_keys`` named rather than failing at the first import."""
    from .cr.manifest import load_trusted_keys
    try:
        load_trusted_keys(config.images.trusted_node_keys)
    except ValueError as exc:
        raise ConfigError('images.trusted_node_keys', str(exc)) from None


def _vo_config(name: str, table: Any, state_dir: Path) -> VOConfig:
    """Build one VO's trust and policy from its ``[vo.NAME]`` table."""
    where = f'vo.{name}'
    if not isinstance(table, dict):
        raise ConfigError(where, 'must be a table')
    _no_unknown_keys(table, _VO_KEYS, where + '.')
    if 'ca' not in table:
        raise ConfigError(f'{where}.ca', 'the VO CA certificate file is required')
    trust = VOTrust(vo=name, ca_file=_path(table, 'ca', None, where),
                    crl_file=_path(table, 'crl', None, where) if 'crl' in table else None,
                    crl_required=_typed(table, 'crl_required', bool, True, where))
    policy_name = _typed(table, 'policy', str, 'dynamic', where)
    if policy_name not in POLICIES:
        raise ConfigError(f'{where}.policy', f'must be one of {", ".join(POLICIES)}')
    fields: dict[str, Any] = {'vo': name, 'kind': policy_name}
    for key in ('uid_range', 'gid_range'):
        if key in table or (key == 'uid_range' and policy_name != 'static'):
            fields[key] = _range(table, key, where)
    optional = {'lease_hours': (int, float), 'home_base': str, 'shell': str,
                'account_prefix': str, 'map_roles': bool}
    for key, kind in optional.items():
        if key in table:
            fields[key] = _typed(table, key, kind, None, where)
    if 'pool' in table:
        fields['pool'] = tuple(_str_list(table, 'pool', [], where))
    if 'static' in table:
        static = table['static']
        if not isinstance(static, dict) or not all(isinstance(v, str) for v in static.values()):
            raise ConfigError(f'{where}.static', 'must be a table of VO user = "local account"')
        fields['static'] = dict(static)
    if policy_name == 'pool' and not fields.get('pool'):
        raise ConfigError(f'{where}.pool', 'the pool policy needs a non-empty list of pool accounts')
    if policy_name == 'static' and not fields.get('static'):
        raise ConfigError(f'{where}.static', 'the static policy needs a [vo.NAME.static] table')
    if 'home_base' in table and not fields['home_base'].startswith('/'):
        raise ConfigError(f'{where}.home_base', 'must be an absolute path')
    try:
        policy = VOPolicy(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from None
    return VOConfig(name=name, trust=trust, policy=policy)


def _no_unknown_keys(table: Mapping[str, Any], known: set[str], prefix: str) -> None:
    """Refuse typos loudly: an unknown key is an error, not a silent default."""
    for key in table:
        if key not in known:
            raise ConfigError(prefix + key, 'unknown key')


def _typed(table: Mapping[str, Any], key: str, kind: Any, default: Any, where: str = '') -> Any:
    """Return ``table[key]`` checked against *kind*, or *default* when absent."""
    full = f'{where}.{key}' if where else key
    if key not in table:
        return default
    value = table[key]
    # bool is an int subclass: never accept true where a number is wanted.
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(full, f'expected {_kind_name(kind)}, got a boolean')
    if not isinstance(value, kind):
        raise ConfigError(full, f'expected {_kind_name(kind)}, got {type(value).__name__}')
    return value


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string'}
    return ' or '.join(names.get(k, k.__name__) for k in kinds)


def _path(table: Mapping[str, Any], key: str, default: Path | None, where: str = '') -> Path:
    value = _typed(table, key, str, None, where)
    if value is None:
        if default is None:
            raise ConfigError(f'{where}.{key}' if where else key, 'is required')
        return default
    if not value.startswith('/'):
        raise ConfigError(f'{where}.{key}' if where else key, 'must be an absolute path')
    return Path(value)


def _str_list(table: Mapping[str, Any], key: str, default: list[str], where: str = '') -> list[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where}.{key}' if where else key, 'expected a list of strings')
    return value


def _range(table: Mapping[str, Any], key: str, where: str) -> tuple[int, int]:
    value = table.get(key)
    full = f'{where}.{key}'
    if value is None:
        raise ConfigError(full, 'is required, e.g. [200000, 209999]')
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(full, 'expected [first, last] (two integers)')
    low, high = value
    if low > high:
        raise ConfigError(full, 'first must not be greater than last')
    return (low, high)


def _listen_address(text: str) -> ListenAddress:
    """Parse ``host:port`` or ``[v6]:port``."""
    host, sep, port = text.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError('listen', f'{text!r} is not host:port')
    host = host.strip('[]') or '0.0.0.0'
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != 'localhost':
            raise ConfigError('listen', f'{text!r}: {host!r} is not an IP address') from None
    return ListenAddress(host=host, port=int(port))
