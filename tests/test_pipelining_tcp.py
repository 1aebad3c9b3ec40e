"""
RFC 2449 section 6.6 (PIPELINING) over a real TCP connection: a client
that sends many commands at once and reads as fast as the server writes.
Each reply is written and then sent at once (the transport told to write
now, not on the reactor's next turn); when that write empties a buffer the
transport had paused the server's output for, the transport resumes the
server from inside that write, and the next pipelined command is answered
from there.  However many large replies follow one another that way, each
goes out whole, once, in order.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from pop3d.testing import deliver_to_maildir

from .conftest import USERS, start_service


def _read_all(host: str, port: int, commands: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=60) as client:
        client.sendall(commands)
        received = bytearray()
        while chunk := client.recv(1 << 20):
            received += chunk
        return bytes(received)


@pytest_twisted.ensureDeferred
async def test_hundreds_of_pipelined_large_retrs_are_each_answered_whole(tmp_path: Path) -> None:
    # Larger than the transport's 64 KiB buffer (the server's output is
    # paused by each reply) and smaller than the 128 KiB the transport
    # sends at a time (each write empties the buffer and resumes it).
    line = b"x" * 78 + b"\n"
    message = b"Subject: big\n\n" + line * 1_200
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"])
    try:
        deliver_to_maildir(str(tmp_path / "mail" / "alice"), message)
        count = 400
        commands = (
            f"USER alice\r\nPASS {USERS['alice']}\r\n".encode()
            + b"RETR 1\r\n" * count
            + b"QUIT\r\n"
        )
        received = await deferToThread(_read_all, server.host, server.port, commands)
    finally:
        await server.service.stopService()
    body = message.replace(b"\n", b"\r\n")
    retr = b"+OK %d octets\r\n" % len(body) + body + b".\r\n"
    assert received == (
        received[: received.index(b"\r\n") + 2]  # the greeting
        + b"+OK send PASS\r\n"
        + b"+OK maildrop has 1 messages (%d octets)\r\n" % len(body)
        + retr * count
        + b"+OK bye\r\n"
    )
