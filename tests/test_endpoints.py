"""
``--listen`` takes any Twisted server endpoint: each kind is served for real
here (tcp6, unix, ssl for implicit TLS, haproxy, systemd socket activation).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import poplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from pop3d.testing import deliver_to_maildir

from .conftest import USERS, Logged, RunningServer, start_service, write_passwd

MESSAGE = b"Subject: endpoint\n\n.dotted\n"
RECEIVED = [b"Subject: endpoint", b"", b".dotted"]


def _fetch(client: poplib.POP3) -> list[bytes]:
    client.user("alice")
    client.pass_(USERS["alice"])
    lines = client.retr(1)[1]
    client.quit()
    return lines


async def _serve_and_fetch(
    tmp_path: Path, listen: str, connect: Callable[[RunningServer], poplib.POP3]
) -> list[bytes]:
    server = await start_service(tmp_path, [listen])
    try:
        deliver_to_maildir(str(server.maildir("alice")), MESSAGE)
        return await deferToThread(lambda: _fetch(connect(server)))
    finally:
        await server.service.stopService()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_tcp6(tmp_path: Path) -> None:
    lines = await _serve_and_fetch(
        tmp_path, r"tcp6:0:interface=\:\:1", lambda s: poplib.POP3("::1", s.port, timeout=10)
    )
    assert lines == RECEIVED


class _UnixPOP3(poplib.POP3):
    def __init__(self, path: str) -> None:
        self._unix_path = path
        super().__init__("localhost", 0, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(self._unix_path)
        return sock


@pytest_twisted.ensureDeferred
async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "pop3.sock"
    lines = await _serve_and_fetch(tmp_path, f"unix:{path}", lambda s: _UnixPOP3(str(path)))
    assert lines == RECEIVED


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, certificate = make_certificate("localhost", addresses=("127.0.0.1",))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_certificate(
    name: str,
    *,
    authority: bool = False,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    addresses: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """
    A new key and its certificate, valid for a day: a server's for ``name``
    (and ``addresses``), or with ``authority`` one that signs others; signed
    by ``issuer`` (a key and its certificate), else by itself.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signing_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if authority:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    else:
        names: list[x509.GeneralName] = [x509.DNSName(name)]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(signing_key, hashes.SHA256())


@pytest_twisted.ensureDeferred
async def test_implicit_tls(tmp_path: Path) -> None:
    """RFC 8314 section 3.3: POP3 over implicit TLS (port 995 style)."""
    key, cert = _self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    lines = await _serve_and_fetch(
        tmp_path,
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        lambda s: poplib.POP3_SSL("127.0.0.1", s.port, context=context, timeout=10),
    )
    assert lines == RECEIVED


@pytest_twisted.ensureDeferred
async def test_haproxy_proxy_protocol_shows_the_real_client(tmp_path: Path, logged: Logged) -> None:
    """Behind HAProxy (send-proxy), logs name the client, not the proxy."""
    server = await start_service(
        tmp_path, ["haproxy:tcp:0:interface=127.0.0.1"], ["--allow-plaintext-auth"]
    )
    try:

        def client() -> bytes:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 40123 110\r\n")
                sock.sendall(b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                return received

        answer = await deferToThread(client)
    finally:
        await server.service.stopService()
    assert answer.startswith(b"+OK pop3d ready") and answer.endswith(b"+OK bye\r\n")
    sessions = [e for e in logged.events if "] session logged out: " in formatEvent(e)]
    assert [e["peer"] for e in sessions] == ["203.0.113.7:40123"]


_ACTIVATE = r"""
import os, socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)
print(listener.getsockname()[1], flush=True)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="pop3", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-c",
    "from twisted.scripts.twistd import run; run()", *sys.argv[1:]])
"""


@pytest.mark.process
def test_systemd_socket_activation(tmp_path: Path) -> None:
    """A socket passed the systemd way (LISTEN_FDS, fd 3) is served."""
    passwd = write_passwd(tmp_path / "passwd", USERS)
    deliver_to_maildir(str(tmp_path / "mail" / "alice"), MESSAGE)
    command = [
        *(sys.executable, "-c", _ACTIVATE),
        *("-n", "--pidfile=", "pop3d"),
        *("--listen", "systemd:domain=INET:index=0"),
        *("--mail-location", f"maildir:{tmp_path}/mail/{{user}}"),
        *("--auth", f"passwd-file:{passwd}"),
    ]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        # The socket listens before twistd starts: connecting needs no wait.
        assert _fetch(poplib.POP3("127.0.0.1", port, timeout=30)) == RECEIVED
    finally:
        server.kill()
        server.wait()
