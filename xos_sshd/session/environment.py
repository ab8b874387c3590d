"""The environment a session starts with: clean, built from the account and the identity.

Nothing of the gateway's own environment leaks in; from the client only ``TERM`` (from the
pty request) and locale variables are taken, as sshd's default ``AcceptEnv LANG LC_*``.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..ams import LocalAccount
from ..auth.identity import VOIdentity

DEFAULT_PATH = '/usr/local/bin:/usr/bin:/bin:/usr/games'
_LOCALE_NAME = re.compile(r'^(LANG|LANGUAGE|LC_[A-Z]+)\Z')
_LOCALE_VALUE = re.compile(r'^[A-Za-z0-9_.@:-]{0,64}\Z')
_TERM_VALUE = re.compile(r'^[A-Za-z0-9_.+-]{1,64}\Z')


def session_environment(identity: VOIdentity, account: LocalAccount,
                        client_env: Mapping[str, str], term: str | None) -> dict[str, str]:
    """Return the environment of a session process."""
    env = {
        'HOME': account.home,
        'USER': account.name,
        'LOGNAME': account.name,
        'SHELL': account.shell,
        'PATH': DEFAULT_PATH,
        'XOS_VO': identity.vo,
        'XOS_USER': identity.user,
        'XOS_ROLE': identity.role or '',
    }
    if term and _TERM_VALUE.match(term):
        env['TERM'] = term
    for name, value in client_env.items():
        if isinstance(name, str) and isinstance(value, str) \
                and _LOCALE_NAME.match(name) and _LOCALE_VALUE.match(value):
            env[name] = value
    return env
