"""
`pop3d.lifecycle.GracefulStop`, on a Clock: what a stopping server does to
each session, and that it is done within its bound whatever the clients do.
(tests/test_lifecycle.py sends the real SIGTERM to ``twistd pop3d``.)
"""

from __future__ import annotations

from twisted.internet.address import IPv6Address
from twisted.internet.task import Clock

from pop3d.factory import POP3Factory
from pop3d.lifecycle import DRAIN_TIMEOUT, GracefulStop
from pop3d.testing import MemoryStore

from .conftest import Wire

SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down, try again later\r\n"
PLAINTEXT_REFUSED = b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"


def _stopper(factory: POP3Factory, clock: Clock) -> GracefulStop:
    stopper = GracefulStop(lambda: factory.connections, clock=clock)
    stopper.startService()
    return stopper


def test_session_in_transaction_is_closed_without_update(
    factory: POP3Factory, clock: Clock, store: MemoryStore
) -> None:
    """
    RFC 1939 section 6: a session that ends other than by QUIT does not
    enter UPDATE, so the message marked by DELE stays; the client is told
    why (RFC 3206 section 4: SYS/TEMP, a passing condition).
    """
    store.deliver("alice", b"Subject: keep\n\nbody\n")
    wire = Wire(factory)
    wire.login()
    assert wire.command(b"DELE 1") == b"+OK message 1 deleted\r\n"

    stopped = _stopper(factory, clock).stopService()

    assert wire.take() == SHUTTING_DOWN
    assert wire.closed
    assert not stopped.called
    wire.disconnect()
    assert stopped.called
    assert store.messages("alice") == [b"Subject: keep\n\nbody\n"]
    assert not store.is_locked("alice")


def test_session_before_login_is_told_too(factory: POP3Factory, clock: Clock) -> None:
    wire = Wire(factory)
    wire.disconnect()  # a connection already gone is left alone
    waiting = Wire(factory)
    stopped = _stopper(factory, clock).stopService()
    assert waiting.take() == SHUTTING_DOWN
    waiting.disconnect()
    assert stopped.called


def test_stop_is_bounded_when_a_client_never_goes(factory: POP3Factory, clock: Clock) -> None:
    """A client that does not close its end does not keep the server running."""
    wire = Wire(factory)
    wire.login()
    stopped = _stopper(factory, clock).stopService()
    clock.advance(DRAIN_TIMEOUT - 0.1)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called
    assert wire.transport.disconnecting


def test_nothing_to_stop(factory: POP3Factory, clock: Clock) -> None:
    stopped = _stopper(factory, clock).stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_ipv4_mapped_loopback_is_local(factory: POP3Factory) -> None:
    """
    RFC 2595 section 2.3: plaintext logins only where they cannot be
    overheard.  Over pop3d.socket (a dual-stack IPv6 socket) an IPv4
    loopback client is ::ffff:127.0.0.1: local; another mapped address is not.
    """
    loopback = Wire(factory, IPv6Address("TCP", "::ffff:127.0.0.1", 40000))  # type: ignore[arg-type]
    assert loopback.login() == b"+OK maildrop has 0 messages (0 octets)\r\n"
    remote = Wire(factory, IPv6Address("TCP", "::ffff:198.51.100.7", 40000))  # type: ignore[arg-type]
    assert remote.command(b"USER alice") == PLAINTEXT_REFUSED
