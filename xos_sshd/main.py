"""``xos-sshd``: start the gateway from a config file, or in dev mode from a state directory."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path

import asyncssh
import uvloop

from .ams.ranges import RangeError, validate_policies
from .auth.errors import TrustConfigError
from .auth.verifier import Verifier
from .config import Config, ConfigError, check_images, check_store, load_config

log = logging.getLogger('xos_sshd')

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='xos-sshd',
        description='SSH gateway for virtual organisations: XOS-cert logins mapped to local '
                    'accounts.  "xos-sshd doctor [--config FILE|--dev]" checks a node.')
    p.add_argument('--config', type=Path, metavar='FILE',
                   help='TOML configuration file (see README: configuration reference)')
    p.add_argument('--dev', action='store_true',
                   help='embedded default: create/reuse a complete setup in --state-dir '
                        '(dev CA for VO "dev", host keys, demo user) and listen on 127.0.0.1')
    p.add_argument('--state-dir', type=Path, default=Path('.xos-dev'), metavar='DIR',
                   help='state directory for --dev (default: ./.xos-dev)')
    p.add_argument('--port', type=int, default=2222, help='port for --dev (default: 2222)')
    p.add_argument('--check-config', '-t', action='store_true',
                   help='validate the configuration and exit (like sshd -t)')
    p.add_argument('--debug', '-d', action='store_true', help='log at debug level')
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doctor = bool(argv) and argv[0] == 'doctor'
    parser = _parser()
    if doctor:
        parser.prog = 'xos-sshd doctor'
        parser.description = ('check CA/CRL files, clock, uid ranges, permissions, NSS, PAM and '
                              'CRIU; one line per check with the fix (changes nothing)')
        argv = argv[1:]
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.dev):
        print('xos-sshd: give exactly one of --config FILE or --dev', file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.dev:
            from . import devmode
            config = load_config(devmode.prepare(args.state_dir, args.port))
        else:
            config = load_config(args.config)
        if not doctor:  # doctor explains a broken config check by check instead
            verifier, host_keys = check_config(config)
    except (ConfigError, RangeError) as exc:
        print(f'xos-sshd: configuration error: {exc}', file=sys.stderr)
        return EXIT_CONFIG
    if doctor:
        from . import doctor as doctor_mod
        return doctor_mod.run(config)
    if args.check_config:
        print(f'xos-sshd: configuration OK ({len(config.vos)} VO(s): {", ".join(config.vos)}; '
              f'AMS store: {config.describe_store()})')
        return 0
    _setup_logging('debug' if args.debug else config.log_level)
    banner = None
    if args.dev:
        from . import devmode
        banner = devmode.login_help(args.state_dir, args.port)
    try:
        return uvloop.run(_serve(config, verifier, host_keys, banner))
    except KeyboardInterrupt:
        return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format='%(asctime)s xos-sshd %(levelname)s %(name)s: %(message)s')
    # Third-party chatter only when asked for: asyncssh at debug, never aiosqlite's per-query log.
    logging.getLogger('asyncssh').setLevel(logging.DEBUG if level == 'debug' else logging.WARNING)
    logging.getLogger('aiosqlite').setLevel(logging.WARNING)


def check_config(config: Config) -> tuple[Verifier, list[asyncssh.SSHKey]]:
    """Everything that can be checked before start: ranges, CA files, host keys, image keys.

    Returns the loaded trust and host keys, so the gateway starts from exactly what was checked.
    """
    validate_policies(config.policies)
    try:
        verifier = Verifier(config.trusts, clock_skew=timedelta(seconds=config.clock_skew_seconds))
    except TrustConfigError as exc:
        raise ConfigError('vo', str(exc)) from None
    host_keys = []
    for path in config.host_keys:
        try:
            host_keys.append(asyncssh.read_private_key(str(path)))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError('host_keys', f'{path}: {getattr(exc, "strerror", None) or exc}') from None
    check_images(config)
    check_store(config)
    return verifier, host_keys


async def _serve(config: Config, verifier: Verifier, host_keys: list[asyncssh.SSHKey],
                 banner: str | None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads CAs and CRLs and reopens the audit log."""
    from .gateway import Gateway
    try:
        gateway = await Gateway.open(config, verifier, host_keys)
        bound = await gateway.listen()
    except (OSError, ValueError) as exc:
        log.error('cannot start: %s', exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(gateway))
    for host, port in bound:
        log.info('listening on %s port %d', host, port)
    if banner:
        print(f'xos-sshd (dev) listening on {", ".join(f"{h}:{p}" for h, p in bound)}\n{banner}',
              flush=True)
    await stop.wait()
    log.info('shutting down')
    await gateway.close()
    return 0


def _reload(gateway) -> None:
    """SIGHUP: re-read CAs and CRLs, reopen the audit log, then check the live connections
    against the CRLs at once (a revoked certificate's connections end now, not at the next
    periodic check)."""
    try:
        gateway.verifier.reload()
    except TrustConfigError as exc:
        log.error('reload refused, keeping the previous CAs: %s', exc)
    else:
        log.info('reloaded CAs and CRLs')
    gateway.audit.reopen()
    gateway.check_revocations()


if __name__ == '__main__':
    sys.exit(main())
