"""
TLS with real clients on loopback: STLS (RFC 2595) with poplib, curl and
openssl s_client; implicit TLS (RFC 8314) with curl pop3s://; the STARTTLS
injection attempt over a real socket; certificate reload on SIGHUP.
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from pop3d.testing import deliver_to_maildir
from pop3d.tls import ServerTLS

from .conftest import USERS, RunningServer, require_program, start_service
from .test_endpoints import _self_signed

MESSAGE = b"Subject: secret\n\n.dotted\nline\n"
EXPECTED = b"Subject: secret\r\n\r\n.dotted\r\nline\r\n"


async def _tls_server(tmp_path: Path, listen: list[str] | None = None) -> RunningServer:
    key, cert = _self_signed(tmp_path)
    server = await start_service(
        tmp_path,
        listen or ["tcp:0:interface=127.0.0.1"],
        ["--tls-cert", str(cert), "--tls-key", str(key)],
    )
    deliver_to_maildir(str(server.maildir("alice")), MESSAGE)
    return server


def _client_context(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))


@pytest_twisted.ensureDeferred
async def test_poplib_stls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:

        def fetch() -> tuple[bytes, list[bytes], dict[str, list[str]]]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            assert "STLS" in client.capa()
            client.stls(context=_client_context(tmp_path))
            capabilities = client.capa()
            client.user("alice")
            client.pass_(USERS["alice"])
            status, lines, _ = client.retr(1)
            client.quit()
            return status, lines, capabilities

        _status, lines, capabilities = await deferToThread(fetch)
        assert lines == [b"Subject: secret", b"", b".dotted", b"line"]
        assert "STLS" not in capabilities
    finally:
        await server.service.stopService()


async def _curl_fetches_message_1(tmp_path: Path, url: str, *options: str) -> None:
    out, err, code = await getProcessOutputAndValue(
        require_program("curl"),
        [
            *("--disable", "--silent", "--show-error", *options),
            *("--cacert", str(tmp_path / "cert.pem")),
            *("--user", f"alice:{USERS['alice']}", url),
        ],
        env={"PATH": os.defpath},
    )
    assert code == 0, err
    assert out == EXPECTED


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl_requires_stls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:
        url = f"pop3://{server.host}:{server.port}/1"
        await _curl_fetches_message_1(tmp_path, url, "--ssl-reqd")
    finally:
        await server.service.stopService()


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl_implicit_tls(tmp_path: Path) -> None:
    """RFC 8314 section 3.3: pop3s://, TLS from the first byte."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    _self_signed(tmp_path)
    server = await _tls_server(
        tmp_path, [f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
    )
    try:
        await _curl_fetches_message_1(tmp_path, f"pop3s://{server.host}:{server.port}/1")
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_implicit_tls_with_the_reloadable_certificate(tmp_path: Path) -> None:
    """``--listen ssl:PORT`` without privateKey= uses --tls-cert/--tls-key."""
    server = await _tls_server(tmp_path, ["ssl:0:interface=127.0.0.1"])
    try:

        def fetch() -> tuple[list[bytes], dict[str, list[str]]]:
            context = _client_context(tmp_path)
            client = poplib.POP3_SSL(server.host, server.port, context=context, timeout=10)
            capabilities = client.capa()
            client.user("alice")
            client.pass_(USERS["alice"])
            lines = client.retr(1)[1]
            client.quit()
            return lines, capabilities

        lines, capabilities = await deferToThread(fetch)
        assert lines == [b"Subject: secret", b"", b".dotted", b"line"]
        # The connection is secure already: no STLS on offer.
        assert "STLS" not in capabilities
    finally:
        await server.service.stopService()


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_starttls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:
        script = f"USER alice\nPASS {USERS['alice']}\nSTAT\nQUIT\n".encode()

        def converse() -> bytes:
            import subprocess

            result = subprocess.run(
                [
                    require_program("openssl"),
                    "s_client",
                    "-quiet",
                    "-starttls",
                    "pop3",
                    "-connect",
                    f"{server.host}:{server.port}",
                    "-CAfile",
                    str(tmp_path / "cert.pem"),
                    "-verify_return_error",
                ],
                input=script,
                capture_output=True,
                timeout=30,
                check=False,
            )
            return result.stdout

        out = await deferToThread(converse)
        assert b"+OK maildrop has 1 messages" in out
        assert f"+OK 1 {len(EXPECTED)}".encode() in out
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_commands_injected_before_the_handshake_are_not_run(tmp_path: Path) -> None:
    """RFC 2595 section 4; the classic STARTTLS command injection."""
    server = await _tls_server(tmp_path)
    try:

        def attack() -> list[bytes]:
            raw = socket.create_connection((server.host, server.port), timeout=10)
            reader = raw.makefile("rb")
            reader.readline()  # greeting
            raw.sendall(b"STLS\r\nCAPA\r\nUSER alice\r\n")
            assert reader.readline() == b"+OK begin TLS negotiation\r\n"
            secure = _client_context(tmp_path).wrap_socket(raw, server_hostname="localhost")
            secure.sendall(b"NOOP\r\nPASS " + USERS["alice"].encode() + b"\r\n")
            replies = secure.makefile("rb")
            lines = [replies.readline(), replies.readline()]
            secure.close()
            return lines

        noop, password = await deferToThread(attack)
        assert noop == b"-ERR command not valid in this state\r\n"  # NOOP, not CAPA
        assert password == b"-ERR send USER first\r\n"  # the injected USER did not run
    finally:
        await server.service.stopService()


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
@pytest_twisted.ensureDeferred
async def test_certificate_is_reloaded_on_sighup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, implicit: bool
) -> None:
    reloaded: Deferred[None] = Deferred()
    original = ServerTLS.reload

    def reload(self: ServerTLS) -> None:
        original(self)
        reloaded.callback(None)

    monkeypatch.setattr(ServerTLS, "reload", reload)
    listen = ["ssl:0:interface=127.0.0.1"] if implicit else None
    server = await _tls_server(tmp_path, listen)
    try:
        first = await deferToThread(_server_certificate, server, implicit)
        _self_signed(tmp_path)  # a renewed certificate, same files
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded
        second = await deferToThread(_server_certificate, server, implicit)
        assert first != second
        assert second == ssl.PEM_cert_to_DER_cert((tmp_path / "cert.pem").read_text())
    finally:
        await server.service.stopService()


def _server_certificate(server: RunningServer, implicit: bool) -> bytes:
    raw = socket.create_connection((server.host, server.port), timeout=10)
    if not implicit:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STLS\r\n")
        reader.readline()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(raw) as secure:
        certificate = secure.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


@pytest.mark.peer
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest_twisted.ensureDeferred
async def test_curl_sasl_mechanisms(tmp_path: Path, mechanism: str) -> None:
    """Each SASL mechanism against an independent client (curl's own SASL)."""
    server = await _tls_server(tmp_path)
    try:
        url = f"pop3://{server.host}:{server.port}/1"
        await _curl_fetches_message_1(
            tmp_path, url, "--ssl-reqd", "--login-options", f"AUTH={mechanism}"
        )
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_stls_behind_haproxy_counts_as_secure(tmp_path: Path) -> None:
    """The PROXY-protocol wrapper must not hide that STLS made the link secure."""
    server = await _tls_server(tmp_path, ["haproxy:tcp:0:interface=127.0.0.1"])
    try:

        def converse() -> list[bytes]:
            raw = socket.create_connection((server.host, server.port), timeout=10)
            raw.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 110\r\n")
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"STLS\r\n")
            reader.readline()
            secure = _client_context(tmp_path).wrap_socket(raw, server_hostname="localhost")
            secure.sendall(b"CAPA\r\nUSER alice\r\nSTLS\r\n")
            replies = secure.makefile("rb")
            lines = []
            while (line := replies.readline()) != b".\r\n":
                lines.append(line)
            lines += [replies.readline(), replies.readline()]
            secure.close()
            return lines

        lines = await deferToThread(converse)
    finally:
        await server.service.stopService()
    assert b"USER\r\n" in lines and b"STLS\r\n" not in lines
    assert lines[-2:] == [b"+OK send PASS\r\n", b"-ERR TLS is already active\r\n"]
