"""
RETR streams with backpressure (a producer registered on the transport): a
client that reads slowly never makes the server read, and so hold, much more
of a message than the connection can carry; a client that never reads
cannot make the server buffer replies without bound.

The connection is a `StringTransport` that fills up as a socket does: the
tests play the reactor, pausing the producer the server registered on the
transport when its buffer is full and resuming it once the client has read
everything, and they see every octet the server wrote and every read it
made from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.protocol import POP3Protocol
from pop3d.stores.interfaces import IMaildrop, IMaildropStore, IMessageBody
from pop3d.testing import MemoryStore

from .conftest import LOOPBACK_PEER

#: What Twisted's TCP transport buffers before it pauses its producer
#: (``twisted.internet.abstract.FileDescriptor.bufferSize``).
SOCKET_BUFFER = 64 * 1024
#: The most a well-behaved server reads ahead of what its client received:
#: the transport's buffer and a few reads of the store.
READ_AHEAD_BOUND = 1024 * 1024
#: More than any bounded server takes from a client that reads nothing.
FLOOD_LIMIT = 1024 * 1024

#: The answer to CAPA before login (RFC 2449 section 5), spelled out.
CAPA_REPLY = (
    b"+OK capability list follows\r\n"
    b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
    b"EXPIRE NEVER\r\nSASL CRAM-MD5 PLAIN LOGIN\r\nUTF8 USER\r\nLANG\r\n"
    b".\r\n"
)


# -- a store that counts what is read from it -----------------------------------


@implementer(IMessageBody)
class CountingBody:
    """A message body that records the size of every read."""

    def __init__(self, body: IMessageBody, reads: list[int]) -> None:
        self._body = body
        self._reads = reads

    def read(self, size: int) -> Any:
        data = self._body.read(size)
        if isinstance(data, Deferred):  # a store that answers later
            return data.addCallback(self._count)
        return self._count(data)

    def _count(self, data: bytes) -> bytes:
        self._reads.append(len(data))
        return data

    def close(self) -> None:
        self._body.close()


@implementer(IMaildrop)
class CountingMaildrop:
    def __init__(self, maildrop: IMaildrop, reads: list[int]) -> None:
        self._maildrop = maildrop
        self._reads = reads
        self.messages = maildrop.messages

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        opened = maybeDeferred(self._maildrop.open_message, index)
        return opened.addCallback(CountingBody, self._reads)

    def remove(self, indexes: Any) -> Deferred[None]:
        return self._maildrop.remove(indexes)

    def close(self) -> Deferred[None]:
        return self._maildrop.close()


@implementer(IMaildropStore)
class CountingStore:
    """`MemoryStore`, with the octets of every read of a message body in ``reads``."""

    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.reads: list[int] = []

    def deliver(self, mailbox: str, message: bytes) -> str:
        return self.memory.deliver(mailbox, message)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return self.memory.open(mailbox).addCallback(CountingMaildrop, self.reads)


@pytest.fixture
def store() -> CountingStore:
    """The store `make_factory` serves (overrides conftest's)."""
    return CountingStore()


# -- a connection whose send buffer fills up ------------------------------------


class SocketTransport(StringTransport):
    """
    A StringTransport that fills up like a TCP connection whose client does
    not read: once it holds more than ``capacity`` unread octets it pauses
    the producer the server registered on it, as Twisted's TCP transport
    does.  `client_reads` takes everything written and, as the reactor does
    once the socket has drained, resumes that producer.
    """

    def __init__(self, capacity: int = SOCKET_BUFFER) -> None:
        super().__init__(peerAddress=LOOPBACK_PEER)
        self.capacity = capacity
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.full and len(self.value()) > self.capacity:
            self.full = True
            self.producer.pauseProducing()

    def client_reads(self) -> bytes:
        data = bytes(self.value())
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return data

    @property
    def server_reads_the_socket(self) -> bool:
        """Whether the server still takes input (StringTransport's producer state)."""
        return self.producerState == "producing"


def connect(factory: POP3Factory) -> tuple[POP3Protocol, SocketTransport]:
    protocol = factory.buildProtocol(LOOPBACK_PEER)
    assert protocol is not None
    transport = SocketTransport()
    protocol.makeConnection(transport)
    assert transport.client_reads().startswith(b"+OK pop3d ready")
    return protocol, transport


def big_message(size: int) -> bytes:
    """``size`` octets of 1 KiB LF-terminated lines, some of them starting with "."."""
    lines = []
    for number in range(size // 1024):
        start = b"." if number % 50 == 0 else b"x"
        lines.append(start + b"%07d " % number + b"a" * 1014 + b"\n")
    lines[500] = b".\n"
    return b"".join(lines)


def wire_form(message: bytes) -> bytes:
    """RFC 1939 section 3: CRLF line ends, a "." before every line starting with "."."""
    lines = message.removesuffix(b"\n").split(b"\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


# -- the tests --------------------------------------------------------------------


def test_a_slow_reader_does_not_make_the_server_read_ahead(
    make_factory: Callable[..., POP3Factory], store: CountingStore, clock: Clock
) -> None:
    """
    RFC 1939 section 7 (RETR) of an 8 MiB message, to a client that reads
    only when its socket is full: while the client does not read, the
    server reads nothing from the store and writes nothing; it is never far
    ahead of the client; the client gets the message exactly, and the reply
    to the command pipelined behind it (RFC 2449 section 6.6) after it.
    """
    message = big_message(8 * 1024 * 1024)
    store.deliver("alice", message)
    protocol, transport = connect(make_factory())
    protocol.dataReceived(b"USER alice\r\nPASS wonderland\r\n")
    assert transport.client_reads() == (
        b"+OK send PASS\r\n+OK maildrop has 1 messages (8395778 octets)\r\n"
    )

    protocol.dataReceived(b"RETR 1\r\nNOOP\r\n")
    received = bytearray()
    pauses = 0
    while transport.full:
        pauses += 1
        read, written = sum(store.reads), len(transport.value())
        # The client takes its time: the server waits, reading nothing.
        clock.advance(5)
        assert (sum(store.reads), len(transport.value())) == (read, written)
        # (Stored octets read against wire octets received: a wire line is
        # one or two octets longer, a small slack against a 1 MiB bound.)
        assert read - len(received) < READ_AHEAD_BOUND
        received += transport.client_reads()
    received += transport.client_reads()

    assert bytes(received) == (
        b"+OK 8395778 octets\r\n" + wire_form(message) + b".\r\n" + b"+OK\r\n"
    )
    assert sum(store.reads) == len(message) == 8387586
    # The server was paused again and again: the checks above ran.
    assert pauses > 8


def test_a_client_that_never_reads_cannot_make_the_server_buffer(
    make_factory: Callable[..., POP3Factory],
) -> None:
    """
    Pipelined CAPAs (RFC 2449 section 6.6) from a client that reads no
    replies: once the transport's buffer is full the server stops taking
    commands, and then stops reading the socket, instead of buffering
    replies without bound.  When the client reads, every command is
    answered and the server reads the socket again.
    """
    protocol, transport = connect(make_factory())
    burst = b"CAPA\r\n" * 1000
    sent = 0
    while transport.server_reads_the_socket and sent < FLOOD_LIMIT:
        protocol.dataReceived(burst)
        sent += len(burst)
    assert sent < 256 * 1024, "the server took commands without bound"
    buffered = transport.value()
    assert len(buffered) < SOCKET_BUFFER + len(CAPA_REPLY)
    assert buffered == CAPA_REPLY * (len(buffered) // len(CAPA_REPLY))

    commands = sent // len(b"CAPA\r\n")
    answered = 0
    while answered < commands:
        written = transport.client_reads()
        assert written, f"{commands - answered} commands left unanswered"
        assert written == CAPA_REPLY * (len(written) // len(CAPA_REPLY))
        answered += len(written) // len(CAPA_REPLY)
    assert answered == commands
    assert transport.server_reads_the_socket


def test_a_message_going_out_slowly_keeps_the_session_from_autologout(
    make_factory: Callable[..., POP3Factory], store: CountingStore, clock: Clock
) -> None:
    """
    RFC 1939 section 3: the autologout timer is for a client that is idle.
    A client reading a large message (RFC 1939 section 7, RETR) slowly, one
    socket buffer every 100 s of a 150 s timeout, is not idle while the
    message goes out, however long that takes: it gets all of it, and its
    session goes on.
    """
    message = big_message(1024 * 1024)
    store.deliver("alice", message)
    protocol, transport = connect(make_factory(timeout=150))
    protocol.dataReceived(b"USER alice\r\nPASS wonderland\r\n")
    transport.client_reads()

    protocol.dataReceived(b"RETR 1\r\n")
    received = bytearray()
    waits = 0
    while transport.full:
        waits += 1
        clock.advance(100)
        assert not transport.disconnecting
        received += transport.client_reads()
    assert bytes(received) == b"+OK 1048578 octets\r\n" + wire_form(message) + b".\r\n"
    assert waits * 100 > 2 * 150  # longer than the timeout, twice over

    protocol.dataReceived(b"NOOP\r\n")
    assert transport.client_reads() == b"+OK\r\n"
