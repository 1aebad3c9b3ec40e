"""
RFC 2449 section 6.6 (PIPELINING) over real connections (TCP, implicit TLS,
STLS): a client that sends many commands at once and reads as fast as the
server writes.  Each reply is written and then sent at once (the transport
told to write now, not on the reactor's next turn); when that write empties
a buffer the transport had paused the server's output for, the transport
resumes the server from inside that write, and the next pipelined command
is answered from there.  However many large replies follow one another that
way, each goes out whole, once, in order.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from pop3d.testing import deliver_to_maildir

from .conftest import USERS, start_service
from .test_endpoints import _self_signed

#: A client that waits longer than this for the next octet fails the test
#: (a server that stalls must not hang the suite).
PATIENCE = 60


def _read_all(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    return bytes(received)


def _pipeline(
    host: str, port: int, commands: bytes, tls: ssl.SSLContext | None, stls: bool
) -> bytes:
    """Send ``commands`` in one write (after STLS, if asked), read until the server hangs up."""
    with socket.create_connection((host, port), timeout=PATIENCE) as raw:
        if tls is None:
            raw.sendall(commands)
            return _read_all(raw)
        if stls:
            # The greeting and the answer to STLS, before the handshake.
            raw.sendall(b"STLS\r\n")
            before = bytearray()
            while before.count(b"\r\n") < 2:
                before += raw.recv(1)
        with tls.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(commands)
            try:
                return _read_all(client)
            except ssl.SSLEOFError:  # the server closed without close_notify
                return b""


@pytest.mark.parametrize("connection", ["tcp", "implicit TLS", "STLS"])
@pytest_twisted.ensureDeferred
async def test_hundreds_of_pipelined_large_retrs_are_each_answered_whole(
    tmp_path: Path, connection: str
) -> None:
    # Larger than the transport's 64 KiB buffer (the server's output is
    # paused by each reply) and smaller than the 128 KiB the transport
    # sends at a time (each write empties the buffer and resumes it).
    line = b"x" * 78 + b"\n"
    message = b"Subject: big\n\n" + line * 1_200
    key, cert = _self_signed(tmp_path)
    listen = (
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        if connection == "implicit TLS"
        else "tcp:0:interface=127.0.0.1"
    )
    server = await start_service(
        tmp_path, [listen], ["--tls-cert", str(cert), "--tls-key", str(key)]
    )
    tls = None
    if connection != "tcp":
        tls = ssl.create_default_context(cafile=str(cert))
        tls.check_hostname = False
    try:
        deliver_to_maildir(str(tmp_path / "mail" / "alice"), message)
        count = 400
        commands = (
            f"USER alice\r\nPASS {USERS['alice']}\r\n".encode()
            + b"RETR 1\r\n" * count
            + b"QUIT\r\n"
        )
        received = await deferToThread(
            _pipeline, server.host, server.port, commands, tls, connection == "STLS"
        )
    finally:
        await server.service.stopService()
    body = message.replace(b"\n", b"\r\n")
    retr = b"+OK %d octets\r\n" % len(body) + body + b".\r\n"
    if connection != "STLS":  # (the greeting came before the handshake)
        greeting, _, received = received.partition(b"\r\n")
        assert greeting.startswith(b"+OK pop3d ready")
    assert received == (
        b"+OK send PASS\r\n"
        + b"+OK maildrop has 1 messages (%d octets)\r\n" % len(body)
        + retr * count
        + b"+OK bye\r\n"
    )
