"""
Message bodies that answer later (`pop3d.stores.interfaces.IMessageBody`:
``read`` may return a Deferred), as a store behind a network service does:
RETR and TOP stream them as they stream files (RFC 1939 section 7: the
whole message, byte-stuffed, then the terminator), with backpressure
through the transport's producer API, on a Clock.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from pop3d.errors import MaildropUnavailable
from pop3d.factory import POP3Factory
from pop3d.session import SessionPolicy
from pop3d.stores.interfaces import IMessageBody
from pop3d.stores.memory import MemoryStore
from pop3d.testing import memory_portal

from .conftest import USERS, Wire

LATENCY = 1.0
SMALL = b"Subject: later\r\n\r\n.dot line\r\nlast\r\n"
# 600,000 octets: three reads of 256 KiB at most.
LINE = b"a" * 98 + b"\r\n"
LARGE = LINE * 6000


@pytest.fixture
def late_store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock, latency=LATENCY)


def logged_in(store: MemoryStore, clock: Clock) -> Wire:
    """A session of alice's over ``store``, logged in."""
    factory = POP3Factory(
        memory_portal(store, USERS),
        clock=clock,
        hostname="pop.example.test",
        policy=SessionPolicy(),
        login_failure_delay=0,
    )
    wire = Wire(factory)
    assert wire.login().startswith(b"+OK maildrop has 1 messages")
    return wire


@pytest.fixture
def late_wire(clock: Clock, late_store: MemoryStore) -> Callable[[bytes], Wire]:
    def connect(message: bytes) -> Wire:
        late_store.deliver("alice", message)
        return logged_in(late_store, clock)

    return connect


def test_a_body_that_answers_later_is_sent_whole(
    clock: Clock, late_wire: Callable[[bytes], Wire]
) -> None:
    """RFC 1939 section 7 RETR: status, byte-stuffed lines, terminator, once the reads answer."""
    wire = late_wire(SMALL)
    assert wire.command(b"RETR 1") == b""
    clock.advance(LATENCY)
    assert wire.take() == b"+OK 35 octets\r\nSubject: later\r\n\r\n..dot line\r\nlast\r\n"
    clock.advance(LATENCY)
    assert wire.take() == b".\r\n"
    assert wire.command(b"NOOP") == b"+OK\r\n"


def test_commands_sent_while_a_body_is_read_are_answered_after_it(
    clock: Clock, late_wire: Callable[[bytes], Wire]
) -> None:
    """RFC 2449 section 6.6 (PIPELINING): answers keep the order of the commands."""
    wire = late_wire(SMALL)
    assert wire.send(b"RETR 1\r\nNOOP\r\n") == b""
    clock.advance(LATENCY)
    clock.advance(LATENCY)
    assert wire.take() == (
        b"+OK 35 octets\r\nSubject: later\r\n\r\n..dot line\r\nlast\r\n.\r\n+OK\r\n"
    )


def test_no_read_is_asked_for_while_the_transport_is_full(
    clock: Clock, late_wire: Callable[[bytes], Wire]
) -> None:
    """
    Backpressure: with the transport's producer paused, the read under way
    is written when it answers, and no further read is asked for until the
    transport takes more; the message still arrives whole.
    """
    wire = late_wire(LARGE)
    assert wire.command(b"RETR 1") == b""
    clock.advance(LATENCY)
    sent = wire.take()
    assert sent.startswith(b"+OK 600000 octets\r\naaa")
    # The next read is under way; the client stops reading.
    assert len(clock.getDelayedCalls()) == 2  # that read, and the idle timeout
    producer = wire.transport.producer
    assert producer is not None
    producer.pauseProducing()
    clock.advance(LATENCY)
    sent += wire.take()
    assert len(sent) > 256 * 1024
    assert len(clock.getDelayedCalls()) == 1  # the idle timeout only: no read asked for
    clock.advance(LATENCY * 10)
    assert wire.take() == b""
    producer.resumeProducing()
    for _ in range(3):
        clock.advance(LATENCY)
        sent += wire.take()
    assert sent == b"+OK 600000 octets\r\n" + LARGE + b".\r\n"


def test_a_read_that_fails_later_before_anything_was_sent_is_an_error_reply(
    clock: Clock,
) -> None:
    """RFC 3206 section 4 [SYS/TEMP]: nothing was sent, so the client is told plainly."""

    @implementer(IMessageBody)
    class Unreachable:
        def read(self, size: int) -> Deferred[bytes]:
            def down() -> bytes:
                raise MaildropUnavailable("the object store is down")

            return deferLater(clock, LATENCY, down)

        def close(self) -> None:
            pass

    class FailingLater(MemoryStore):
        def body(self, data: bytes) -> IMessageBody:
            return Unreachable()

    store = FailingLater()
    store.deliver("alice", SMALL)
    wire = logged_in(store, clock)
    assert wire.command(b"RETR 1") == b""
    clock.advance(LATENCY)
    assert wire.take() == b"-ERR [SYS/TEMP] the object store is down\r\n"
    assert wire.command(b"NOOP") == b"+OK\r\n"


def test_a_read_under_way_is_cancelled_when_the_client_goes(
    clock: Clock, late_wire: Callable[[bytes], Wire]
) -> None:
    """The connection is gone: the outstanding read's answer is not awaited."""
    wire = late_wire(LARGE)
    wire.command(b"RETR 1")
    assert len(clock.getDelayedCalls()) == 2
    wire.disconnect()
    assert clock.getDelayedCalls() == []
