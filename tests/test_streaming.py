"""
RETR streams with backpressure (a producer registered on the transport): a
client that reads slowly never makes the server read, and so hold, much more
of a message than the connection can carry.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread

from pop3d import maildir
from pop3d.protocol import POP3Protocol

from .conftest import RunningServer

MESSAGE_SIZE = 40 * 1024 * 1024
# The most a well-behaved server can be ahead of its reader: the kernel's
# send buffer (up to 4 MiB on Linux by default), the small receive buffer the
# client sets, the transport's buffer and a couple of 256 KiB chunks.
READ_AHEAD_BOUND = 8 * 1024 * 1024
# More than the kernel's socket buffers can hold between a client and a
# server that stopped reading (about 5 MiB on Linux's defaults).
FLOOD_LIMIT = 16 * 1024 * 1024


def _write_big_message(maildir_path: Path) -> int:
    for part in ("new", "cur", "tmp"):
        (maildir_path / part).mkdir(parents=True, exist_ok=True)
    line = b"x" * 1000 + b"\n"
    dotted = b".starts with a dot" + b"y" * 982 + b"\n"
    block = (line * 15 + dotted) * 64  # 1 MiB minus a little
    count = MESSAGE_SIZE // len(block)
    with open(maildir_path / "new" / "1.M1.big", "wb") as file:
        file.write(b"Subject: big\n\n")
        for _ in range(count):
            file.write(block)
    return (maildir_path / "new" / "1.M1.big").stat().st_size


def _wait_for_reactor_turns(turns: int) -> None:
    """Let the server's reactor run a few iterations (called from a thread)."""
    for _ in range(turns):
        blockingCallFromThread(reactor, deferLater, reactor, 0, lambda: None)


def _read_line(sock: socket.socket, pending: bytearray) -> bytes:
    while b"\r\n" not in pending:
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\r\n")
    pending[:] = rest
    return line


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_does_not_make_the_server_read_ahead(
    running_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 1939 section 7 (RETR) for a 40 MiB message, read slowly."""
    stored = _write_big_message(running_server.maildir("alice"))
    read_from_disk = 0
    original_read = maildir._FileBody.read

    def counting_read(self: maildir._FileBody, size: int) -> bytes:
        nonlocal read_from_disk
        data = original_read(self, size)
        read_from_disk += len(data)
        return data

    monkeypatch.setattr(maildir._FileBody, "read", counting_read)

    def slow_client() -> tuple[int, int, bytes]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect((running_server.host, running_server.port))
        pending = bytearray()
        try:
            _read_line(sock, pending)
            sock.sendall(b"USER alice\r\nPASS wonderland\r\nRETR 1\r\n")
            assert _read_line(sock, pending).startswith(b"+OK")
            assert _read_line(sock, pending).startswith(b"+OK")
            status = _read_line(sock, pending)
            received = len(pending)
            worst_lead = 0
            tail = bytes(pending[-5:])
            while not tail.endswith(b"\r\n.\r\n"):
                chunk = sock.recv(64 * 1024)
                assert chunk, "connection closed mid-message"
                received += len(chunk)
                tail = (tail + chunk)[-5:]
                # Give the server every chance to run ahead of us.
                _wait_for_reactor_turns(3)
                worst_lead = max(worst_lead, read_from_disk - received)
            sock.sendall(b"QUIT\r\n")
            return worst_lead, received, status
        finally:
            sock.close()

    worst_lead, received, status = await deferToThread(slow_client)
    assert status.startswith(b"+OK ")
    assert read_from_disk == stored
    assert received > stored
    assert worst_lead < READ_AHEAD_BOUND, f"server read {worst_lead} bytes ahead of its reader"


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_cannot_make_the_server_buffer(
    running_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Pipelined commands from a client that reads no replies: once the
    transport's buffer is full the server stops taking commands (and then
    stops reading the socket), instead of buffering replies without bound.
    """
    protocols: list[POP3Protocol] = []
    original_made = POP3Protocol.connectionMade

    def recording_made(self: POP3Protocol) -> None:
        protocols.append(self)
        original_made(self)

    monkeypatch.setattr(POP3Protocol, "connectionMade", recording_made)

    def flood() -> int:
        sock = socket.socket()
        sock.connect((running_server.host, running_server.port))
        sock.setblocking(False)
        burst = b"CAPA\r\n" * 10_000
        sent = 0
        stalled_rounds = 0
        try:
            # Send until the server has stopped reading for several rounds of
            # its reactor: then everything it would buffer, it has buffered.
            while stalled_rounds < 20 and sent < FLOOD_LIMIT:
                try:
                    sent += sock.send(burst)
                    stalled_rounds = 0
                except BlockingIOError:
                    stalled_rounds += 1
                _wait_for_reactor_turns(2)
            return sent
        finally:
            sock.close()

    sent = await deferToThread(flood)
    [protocol] = protocols
    transport = protocol.transport
    pending_output = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    assert sent < FLOOD_LIMIT, "the server took commands without bound"
    assert pending_output < 1024 * 1024, f"{pending_output} octets of replies buffered"
