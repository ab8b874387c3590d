"""The gateway's configuration: one TOML file, checked completely before anything starts.

Every key is validated here, so a bad file fails at start with one message that names the
key (``ConfigError``), never later with a traceback in the middle of a login.  The per-VO
tables become :class:`xos_sshd.ams.VOPolicy` objects (mapping) and
:class:`xos_sshd.auth.verifier.VOTrust` objects (trust).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ams import VOPolicy
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
    """The ``[limits]`` table: admission control and per-account caps (filled in below)."""


@dataclass(frozen=True)
class SessionConfig:
    """The ``[session]`` table: PAM sessions and resource limits of user processes."""


@dataclass(frozen=True)
class MetricsConfig:
    """The ``[metrics]`` table: the optional Prometheus endpoint."""


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

    @property
    def ams_db(self) -> Path:
        """The embedded AMS's sqlite database."""
        return self.state_dir / 'ams.sqlite'

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
             'limits', 'session', 'metrics'}
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
    )


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """An optional sub-table: absent is empty, anything but a table is an error."""
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(key, 'must be a table')
    return table


# --- [limits] ---------------------------------------------------------------------------

def _limits_config(table: Mapping[str, Any]) -> LimitsConfig:
    """The optional ``[limits]`` table."""
    _no_unknown_keys(table, set(), 'limits.')
    return LimitsConfig()


# --- [session] --------------------------------------------------------------------------

def _session_config(table: Mapping[str, Any]) -> SessionConfig:
    """The optional ``[session]`` table."""
    _no_unknown_keys(table, set(), 'session.')
    return SessionConfig()


# --- [metrics] --------------------------------------------------------------------------

def _metrics_config(table: Mapping[str, Any]) -> MetricsConfig:
    """The optional ``[metrics]`` table."""
    _no_unknown_keys(table, set(), 'metrics.')
    return MetricsConfig()


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
