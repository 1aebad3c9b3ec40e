"""
The adapter between a TCP (or TLS, or UNIX) connection and a `Session`.

It frames lines, enforces the line-length limit and the inactivity timeout,
answers pipelined commands strictly in order, and streams messages with
backpressure.  Every decision about what to answer is the session's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.session import (
    INTERNAL_ERROR,
    Hangup,
    Listing,
    MessageStream,
    Reply,
    Session,
)
from pop3d.wire import MAX_COMMAND_LENGTH, ResponseCode, Status, format_multiline

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITransport
    from twisted.python.failure import Failure as FailureType

#: How much of a stored message is read and encoded at a time.  Large
#: enough that bytes.replace runs at C speed over most of the data.
CHUNK_SIZE = 256 * 1024

#: RFC 1939 section 3: the autologout timer MUST be at least 10 minutes.
DEFAULT_TIMEOUT = 600


class POP3Protocol(LineReceiver, TimeoutMixin):
    """
    Speaks POP3 for one `Session` over one connection.
    """

    # Bare LF is accepted as a line end as well as CRLF: lenient in what we
    # accept, and it costs nothing since the CR is stripped below.
    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LENGTH
    log = Logger()

    def __init__(
        self,
        new_session: Callable[[Callable[[], str]], Session],
        *,
        clock: IReactorTime,
        timeout: int | None,
    ) -> None:
        self.session = new_session(self._describe_peer)
        self._clock = clock
        self._timeout = timeout
        self._command_in_flight = False
        self._paused_for_command = False
        self._discarding_long_line = False
        self._after_long_line = b""
        self._closing = False
        self._disconnected = False

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's scheduling, on the injected clock.
        return self._clock.callLater(period, func)

    @property
    def _connection(self) -> ITCPTransport:
        # Set for the whole life of a connected protocol; every transport
        # pop3d runs on (TCP, TLS, UNIX, StringTransport) can abort.
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def _describe_peer(self) -> str:
        return describe_address(self.transport.getPeer() if self.transport else None)

    # -- connection lifecycle ----------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # The last chunk of a message and the terminator must not wait
            # for an ACK (Nagle), or every small RETR costs a round trip.
            self._connection.setTcpNoDelay(True)
        self.setTimeout(self._timeout)
        self.log.info("connection from {peer}", peer=self.session.peer)
        self._connection.write(self.session.greeting().to_bytes())

    def connectionLost(self, reason: FailureType | None = None) -> None:
        self._disconnected = True
        self.setTimeout(None)
        self.session.connection_lost()

    def timeoutConnection(self) -> None:
        # RFC 1939 section 3: autologout without a response and without
        # entering UPDATE.  Abort rather than wait for a stalled client to
        # drain its buffer.
        self.log.info("autologout of idle connection from {peer}", peer=self.session.peer)
        self._connection.abortConnection()

    # -- framing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # LineReceiver stops at an overlong line and hands us everything it
        # had buffered; what followed the overlong line is fed back here.
        while self._after_long_line and not self._disconnected:
            rest, self._after_long_line = self._after_long_line, b""
            super().dataReceived(rest)

    def lineLengthExceeded(self, line: bytes) -> None:
        _, newline, rest = line.partition(self.delimiter)
        if not newline:
            # The line has not ended yet: drop what we have and keep dropping
            # until its end, so it is never buffered whole.
            self._discarding_long_line = True
            return
        self._discarding_long_line = False
        self._after_long_line = rest
        self._answer(_ask(self.session.line_too_long))

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        if self._discarding_long_line:
            self._discarding_long_line = False
            self._answer(_ask(self.session.line_too_long))
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        self._answer(_ask(lambda: self.session.handle_line(line)))

    # -- answering, strictly in order ----------------------------------------

    def _answer(self, reply: Deferred[Reply]) -> None:
        """
        Send a reply.  While it is not fully sent, no further command is read,
        so pipelined commands are answered in order (RFC 2449 section 6.6)
        and a client cannot make the server buffer without bound.
        """
        self._command_in_flight = True
        reply.addErrback(self._unexpected_failure)
        reply.addCallback(self._send)
        reply.addErrback(self._unexpected_failure)
        reply.addBoth(self._command_done)
        if self._command_in_flight and not self._disconnected:
            self._paused_for_command = True
            self.pauseProducing()

    def _command_done(self, _: object) -> None:
        self._command_in_flight = False
        if self._paused_for_command:
            self._paused_for_command = False
            if not self._disconnected and not self._closing:
                self.resumeProducing()

    def _unexpected_failure(self, failure: Failure) -> Status:
        self.log.failure("unexpected error answering {peer}", failure, peer=self.session.peer)
        return Status(False, INTERNAL_ERROR, ResponseCode.SYS_TEMP)

    def _send(self, reply: Reply) -> Deferred[None] | None:
        if self._disconnected:
            if isinstance(reply, MessageStream):
                reply.body.close()
            return None
        if isinstance(reply, Status):
            self._connection.write(reply.to_bytes())
        elif isinstance(reply, Listing):
            self._connection.write(format_multiline(reply.status, reply.lines))
        elif isinstance(reply, Hangup):
            self._closing = True
            self._connection.write(reply.status.to_bytes())
            self._connection.loseConnection()
        else:
            producer = _MessageProducer(self._connection, reply, self.resetTimeout)
            return producer.start().addErrback(self._stream_failed)
        return None

    def _stream_failed(self, failure: Failure) -> None:
        self._closing = True
        if failure.check(ResponseAbandoned):
            return
        # The status line is out, so there is no honest way to finish the
        # response: abort, and the client knows the message is incomplete.
        self.log.failure(
            "reading a message failed mid-response to {peer}", failure, peer=self.session.peer
        )
        self._connection.abortConnection()


def describe_address(addr: IAddress | None) -> str:
    """host:port for IP addresses, the path for UNIX sockets."""
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(addr, "name", None) or addr)


def _ask(question: Callable[[], Reply | Deferred[Reply]]) -> Deferred[Reply]:
    """The session's answer as a Deferred, whether it came at once or not."""
    try:
        answer = question()
    except Exception:
        return fail()
    return answer if isinstance(answer, Deferred) else succeed(answer)


class ResponseAbandoned(Exception):
    """The connection closed while a message was being sent."""


@implementer(IPushProducer)
class _MessageProducer:
    """
    Streams one RETR/TOP response with backpressure: a chunk is read only
    when the transport wants more, so a 200 MB message or a slow client never
    makes the server hold more than a chunk or two.
    """

    def __init__(self, transport: ITransport, reply: MessageStream, progress: Any) -> None:
        self._transport = transport
        self._body = reply.body
        self._encoder = reply.encoder
        self._pending = reply.status.to_bytes()
        self._progress = progress
        self._paused = False
        self._finished = False
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        try:
            while not self._paused and not self._finished:
                self._produce_one()
        except Exception:
            self._finish(Failure())

    def stopProducing(self) -> None:
        # The connection is going away (the transport says so before the
        # protocol hears of it): nothing more may be written.
        self._finish(Failure(ResponseAbandoned()))

    def _produce_one(self) -> None:
        out = [self._pending]
        self._pending = b""
        at_end = self._encoder.done
        if not at_end:
            chunk = self._body.read(CHUNK_SIZE)
            out.append(self._encoder.feed(chunk))
            if chunk and len(chunk) < CHUNK_SIZE and not self._encoder.done:
                # A short read is usually the end: look once more, so that the
                # last bytes and the terminator leave in the same write.
                chunk = self._body.read(CHUNK_SIZE)
                out.append(self._encoder.feed(chunk))
            at_end = not chunk or self._encoder.done
        if at_end:
            out.append(self._encoder.finish())
        self._progress()
        self._transport.write(b"".join(out))
        if at_end:
            self._finish()

    def _finish(self, failure: Failure | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._body.close()
        self._transport.unregisterProducer()  # type: ignore[attr-defined]
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)
