"""The asyncssh hook's contract: if an asyncssh upgrade changes what the hook relies on, these
fail (pyproject pins asyncssh to 2.24.x for that reason; see xos_sshd/auth/sshhook.py)."""

from __future__ import annotations

import inspect
from pathlib import Path

import asyncssh
import pytest

from auth_certs import make_ca, verifier
from xos_sshd.auth import ca as ca_mod
from xos_sshd.auth import sshhook
from xos_sshd.auth.errors import AuthRefused


def test_validate_public_key_signature_is_what_the_hook_replaces() -> None:
    params = list(inspect.signature(asyncssh.SSHServerConnection.validate_public_key).parameters)
    assert params == ['self', 'username', 'key_data', 'msg', 'signature']
    assert inspect.iscoroutinefunction(asyncssh.SSHServerConnection.validate_public_key)
    assert asyncssh.__version__.startswith('2.24.')


class _Recorder(asyncssh.SSHServer):
    """A bare server using the hook with the real verifier, recording what it is told."""

    def __init__(self, ver, events: list) -> None:
        self._ver = ver
        self.events = events

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        sshhook.install(conn, self, lambda blob: sshhook.check_certificate(
            self._ver.verify_x509_chain, self._ver.verify_openssh_cert, blob))

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def certificate_refused(self, username: str, exc: AuthRefused) -> None:
        self.events.append(('refused', username, exc.reason))

    async def accept_login(self, username: str, check: sshhook.CertificateCheck) -> bool:
        session_id = self.conn._session_id
        self.events.append(('accept', username, check.identity.user, check.route,
                            type(session_id), len(session_id)))
        return username == check.identity.user


@pytest.mark.parametrize('route', ['x509', 'openssh'])
async def test_hook_sees_the_certificate_and_the_session_id(tmp_path: Path, route: str) -> None:
    ca = make_ca(tmp_path, 'dev')
    cred = ca_mod.issue(ca, 'alice', tmp_path / 'alice', groups=['g1'])
    events: list = []
    host_key = asyncssh.generate_private_key('ssh-ed25519')
    server = await asyncssh.listen('127.0.0.1', 0, server_host_keys=[host_key],
                                   server_factory=lambda: _Recorder(verifier(ca), events))
    port = server.sockets[0].getsockname()[1]
    key = asyncssh.read_private_key(str(cred.key_path))
    cert = (asyncssh.read_certificate(str(cred.cert_path)) if route == 'x509'
            else asyncssh.read_certificate(str(cred.ssh_cert_path)))
    try:
        async with asyncssh.connect('127.0.0.1', port, username='alice', known_hosts=None,
                                    client_keys=[(key, cert)], agent_path=None) as conn:
            assert conn is not None
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect('127.0.0.1', port, username='root', known_hosts=None,
                                   client_keys=[(key, cert)], agent_path=None)
        plain = asyncssh.generate_private_key('ssh-ed25519')
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect('127.0.0.1', port, username='alice', known_hosts=None,
                                   client_keys=[plain], agent_path=None)
    finally:
        server.close()
        await server.wait_closed()
    accepts = [e for e in events if e[0] == 'accept']
    assert accepts[0] == ('accept', 'alice', 'alice', route, bytes, 32)
    assert accepts[1][1] == 'root'
    assert ('refused', 'alice', 'not-a-certificate') in events
