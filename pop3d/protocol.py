"""
The adapter between a TCP (or TLS, or UNIX) connection and a `Session`.

It frames lines, enforces the line-length limit and the inactivity timeout,
answers pipelined commands strictly in order, and streams messages with
backpressure.  Every decision about what to answer is the session's
(`pop3d.session`); what it asks for is done by its `pop3d.driver.SessionDriver`,
which hands each reply to `POP3Protocol.deliver`.
"""

from __future__ import annotations

import base64
import enum
import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from OpenSSL import SSL
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

# Not re-exported by twisted.protocols.haproxy (see pop3d.tap).
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.addresses import ip_address_of
from pop3d.driver import Replies, SessionDriver, unexpected_error
from pop3d.errors import POP3Error
from pop3d.idle import IdleTimeouts
from pop3d.readahead import BUSY_WINDOW
from pop3d.session import (
    Hangup,
    Link,
    Listing,
    MessageStream,
    Reply,
    SASLContinuation,
    Session,
    StartTLS,
)
from pop3d.wire import (
    MAX_COMMAND_LENGTH,
    TERMINATOR,
    ResponseCode,
    Status,
    Translator,
    format_multiline,
)

if TYPE_CHECKING:
    from twisted.python.failure import Failure as FailureType

    # A type only: pop3d.tls reloads through pop3d.lifecycle, which imports this module.
    from pop3d.tls import ServerTLS

log = Logger()

#: How much of a stored message is read and encoded at a time.  Large
#: enough that bytes.replace runs at C speed over most of the data.
CHUNK_SIZE = 256 * 1024

#: How much pipelined input is held, unprocessed, before the socket is no
#: longer read.
MAX_HELD_INPUT = 64 * 1024

#: RFC 1939 section 3: the autologout timer MUST be at least 10 minutes.
DEFAULT_TIMEOUT = 600

#: Told to an idle client when the server stops (RFC 3206 SYS/TEMP: come back later).
SHUTTING_DOWN = Status(False, "server shutting down, try again later", ResponseCode.SYS_TEMP)
#: Told to a client an administrator kicked (``pop3d kick``).  RFC 3206
#: section 4: SYS/TEMP, "likely to be temporary in nature, and therefore
#: there is no need to alarm the user": the admin is at work on the
#: maildrop, and the next poll may log in again.  (SYS/PERM would have the
#: user call support; RFC 2449's IN-USE and LOGIN-DELAY answer logins only.)
KICKED = Status(False, "disconnected by the administrator", ResponseCode.SYS_TEMP)


class _Transport(Protocol):
    """What pop3d needs of a transport: every one it runs on (TCP, TLS, UNIX,
    StringTransport) is a consumer and a producer that can abort."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def setTcpNoDelay(self, enabled: bool) -> None: ...
    def startTLS(self, context_factory: object) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class Phase(enum.Enum):
    """Where a connection is, as far as commands go."""

    #: Waiting for the next command line.
    READING = "READING"
    #: A command is being answered: its reply is not all written yet, and
    #: pipelined lines wait (RFC 2449 section 6.6: answered strictly in order).
    ANSWERING = "ANSWERING"
    #: Hung up or aborting: nothing more is read or answered.
    CLOSING = "CLOSING"
    #: The connection is gone.
    CLOSED = "CLOSED"

    # Checked several times per command: identity's hash, in C.
    __hash__ = object.__hash__


_OPEN = frozenset({Phase.READING, Phase.ANSWERING})
# Read on every command: a module global, not an attribute of the Enum
# class (whose metaclass's __getattr__ makes each such read slow).
_READING, _ANSWERING = Phase.READING, Phase.ANSWERING

#: Makes the driver of one connection's session: given how to learn the
#: link and where replies go.
NewDriver = Callable[[Callable[[], Link], Replies], SessionDriver]

#: Asked once per connection, as soon as the real client is known (behind a
#: PROXY header, once it arrived): None to serve it, or the refusal to send
#: before hanging up.
Admit = Callable[[Link], bytes | None]


@implementer(IHandshakeListener)
class POP3Protocol(LineReceiver):
    """
    Speaks POP3 for one `Session` (run by its `SessionDriver`) over one connection.
    """

    # Bare LF is accepted as a line end as well as CRLF: lenient in what we
    # accept, and it costs nothing since the CR is stripped below.
    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LENGTH
    log = Logger()

    def __init__(
        self,
        new_driver: NewDriver,
        *,
        idle_timeouts: IdleTimeouts,
        tls: ServerTLS | None = None,
        on_close: Callable[[], None] | None = None,
        admit: Admit | None = None,
    ) -> None:
        """
        ``idle_timeouts`` keeps the inactivity autologout of all of a
        server's connections (see `pop3d.idle`).
        """
        #: Runs the session: logins, stores, logging.
        self.driver = new_driver(self._link, self)
        self._on_close = on_close
        self._admit = admit
        self._tls = tls
        self._idle_timeouts = idle_timeouts
        self.phase = Phase.READING
        # Lines are held back while a reply is being produced (so that
        # pipelined commands are answered in order) and while the transport
        # cannot take more output (so that a client that does not read
        # cannot make the server buffer replies without bound).  Reading
        # from the socket goes on, since TLS needs it to make progress,
        # until too much input is held.
        self._output_blocked = False
        self._held_input = 0
        self._reading_paused = False
        self._stream: _MessageStreamer | None = None
        self._discarding_long_line = False
        self._after_long_line = b""
        self._tls_started = False
        self._handshake_done = False
        self._known_link: Link | None = None
        self._closed_waiters: list[Deferred[None]] | None = None
        # Replies written since the transport was last told to send, and
        # how deep in dataReceived we are (its replies leave at its end).
        self._unsent = False
        self._receiving = 0
        # The read being worked through carried one command line, no more:
        # a message it asked for is sent as soon as it is written whole.
        self._lone_command = False
        # The transport, if it sends when told to (`_send_now`): asked once.
        self._write_descriptor: IWriteDescriptor | None = None
        # Inside the transport's write (`_send_now`): what it resumes (the
        # next pipelined command, once it emptied its buffer) is sent by the
        # reactor, not by a write within that write.
        self._sending = False

    @property
    def session(self) -> Session:
        """The session this connection speaks for."""
        return self.driver.session

    @property
    def buffered_input(self) -> int:
        """Octets of client input held, not yet taken as lines (a partial line, pipelined ones)."""
        return len(self._buffer)

    def resetTimeout(self) -> None:
        """The client is active: the inactivity timeout starts again."""
        if self.phase is not Phase.CLOSED:
            self._idle_timeouts.touch(self)

    @property
    def _connection(self) -> _Transport:
        # Set for the whole life of a connected protocol.
        assert self.transport is not None
        # Not typing.cast: a Python call, on every reply.
        return self.transport  # type: ignore[return-value]

    def _link(self) -> Link:
        # Asked once a line arrives, not at connectionMade: behind a
        # PROXY-protocol wrapper (haproxy: endpoints) the real client is
        # known only once its header was read.  STLS forgets it.
        if self._known_link is None:
            self._known_link = self._describe_link()
        return self._known_link

    def _describe_link(self) -> Link:
        transport = self.transport
        address = transport.getPeer() if transport is not None else None
        host = getattr(address, "host", None)
        tls = _tls_connection(transport)
        return Link(
            peer=describe_address(address),
            host=host if host is not None else describe_address(address),
            # A wrapper (haproxy:) hides that STLS made the transport secure.
            secure=self._tls_started or ISSLTransport.providedBy(transport),
            local=isinstance(address, UNIXAddress) or _is_loopback(host),
            tls_version=tls.get_protocol_version_name() if tls is not None else None,
            tls_cipher=tls.get_cipher_name() if tls is not None else None,
            local_host=_local_host(transport),
        )

    # -- connection lifecycle ----------------------------------------------

    def _admitted(self, producing: bool) -> bool:
        """
        Asks ``admit`` about the real client (once); False: refused and
        hanging up.  ``producing``: the output valve is registered.
        """
        admit, self._admit = self._admit, None
        if admit is None:
            return True
        refusal = admit(self._link())
        if refusal is None:
            return True
        self._hang_up(refusal, producing)
        return False

    def connectionMade(self) -> None:
        if IWriteDescriptor.providedBy(self.transport):
            self._write_descriptor = self.transport
        if not _behind_proxy_header(self.transport):
            # The peer is the client: refused before the greeting.
            if not self._admitted(producing=False):
                return
        if ITCPTransport.providedBy(self.transport):
            # The last chunk of a message and the terminator must not wait
            # for an ACK (Nagle), or every small RETR costs a round trip.
            self._connection.setTcpNoDelay(True)
        self._connection.registerProducer(_OutputValve(self), True)
        self.resetTimeout()
        # Unique to this connection (APOP's timestamp): not remembered.
        self._connection.write(self.session.greeting().to_bytes(remember=False))
        self._send_now()

    def handshakeCompleted(self) -> None:
        # IHandshakeListener: told by the TLS layer, of STLS or implicit TLS.
        self._handshake_done = True
        tls = _tls_connection(self.transport)
        version = tls.get_protocol_version_name() if tls is not None else None
        self.driver.tls_handshake_done(version or "unknown")

    def connectionLost(self, reason: FailureType | None = None) -> None:
        if not self._handshake_done and reason is not None and reason.check(SSL.Error):
            # Before a handshake completed, OpenSSL's errors are the handshake's.
            self.driver.tls_handshake_failed()
        self.phase = Phase.CLOSED
        # First: whatever fails below, a closed connection is never timed out.
        self._idle_timeouts.forget(self)
        if self._on_close is not None:
            self._on_close()
        if self._stream is not None:
            self._stream.abandon()
        self.driver.connection_lost()
        waiters, self._closed_waiters = self._closed_waiters, None
        for waiter in waiters or ():
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is gone (at once if it is gone already)."""
        if self.phase is Phase.CLOSED:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(waiter)
        return waiter

    def shut_down(self) -> None:
        """
        The server is stopping: end this connection without UPDATE, as if
        the client had gone (RFC 1939 section 6: nothing marked by DELE is
        removed).  A client waiting for its next command is told why; one in
        the middle of a reply is cut off (its reply cannot be finished).
        """
        self._hang_up_with(SHUTTING_DOWN)

    def kick(self) -> None:
        """
        An administrator ends this session (``pop3d kick``), as `shut_down`
        does: without UPDATE, a client waiting for its next command told
        why (`KICKED`), one in the middle of a reply cut off.
        """
        self._hang_up_with(KICKED)

    def _hang_up_with(self, status: Status) -> None:
        if self.phase is Phase.READING:
            self._hang_up(status.to_bytes(self.session.wording))
        elif self.phase is not Phase.CLOSED:
            self._abort()

    def _hang_up(self, last_words: bytes, producing: bool = True) -> None:
        """Say ``last_words``, then close once they are written."""
        self.phase = Phase.CLOSING
        if producing:
            # A transport with a registered producer does not close.
            self._connection.unregisterProducer()
        self._connection.write(last_words)
        self._connection.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once, whatever is under way."""
        if self.phase is not Phase.CLOSED:
            self._abort()

    def timeoutConnection(self) -> None:
        # RFC 1939 section 3: autologout without a response and without
        # entering UPDATE.  Abort rather than wait for a stalled client to
        # drain its buffer.
        self.driver.log.info("autologout of idle connection from {peer}", peer=self.session.peer)
        self._abort()

    def _abort(self) -> None:
        """Close at once: no honest answer is left to give."""
        self.phase = Phase.CLOSING
        self._connection.abortConnection()

    # -- flow control --------------------------------------------------------

    def output_blocked(self, blocked: bool) -> None:
        """The transport's buffer went over (or back under) its limit."""
        self._output_blocked = blocked
        if self._stream is not None:
            if blocked:
                self._stream.pause()
            else:
                self._stream.resume()
        self._update_reading()

    def _update_reading(self) -> None:
        if self.phase not in _OPEN:
            return
        hold = self.phase is Phase.ANSWERING or self._output_blocked
        if hold and not self.paused:
            # LineReceiver hands over no more lines while paused.
            self.paused = True
        elif not hold and self.paused:
            self.paused = False
            self._held_input = 0
            if self._reading_paused:
                self._reading_paused = False
                self._connection.resumeProducing()
            self.dataReceived(b"")

    # -- framing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Behind a PROXY header the client is known once bytes arrive after it.
        if self._admit is not None and not self._admitted(producing=True):
            return
        if self.paused and not self._reading_paused:
            self._held_input += len(data)
            if self._held_input > MAX_HELD_INPUT:
                self._reading_paused = True
                self._connection.pauseProducing()
        self._receiving += 1
        # (One C-speed pass over what was read: a command line or a few.)
        self._lone_command = data.count(b"\n") == 1
        try:
            # LineReceiver's, named: no super object for every read.
            LineReceiver.dataReceived(self, data)
            # LineReceiver stops at an overlong line and hands us everything it
            # had buffered; what followed the overlong line is fed back here.
            while self._after_long_line and self.phase in _OPEN:
                rest, self._after_long_line = self._after_long_line, b""
                LineReceiver.dataReceived(self, rest)
        finally:
            self._receiving -= 1
        if self._unsent:  # (`_send_if_done`'s first test, without the call when it fails)
            self._send_if_done()

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.phase not in _OPEN:
            return
        _, newline, rest = line.partition(self.delimiter)
        if not newline:
            # The line has not ended yet: drop what we have and keep dropping
            # until its end, so it is never buffered whole.
            self._discarding_long_line = True
            return
        self._discarding_long_line = False
        self._after_long_line = rest
        self._command(None)

    def lineReceived(self, line: bytes) -> None:
        if self.phase not in _OPEN:
            return
        if self._discarding_long_line:
            self._discarding_long_line = False
            self._command(None)
        else:
            self._command(line[:-1] if line.endswith(b"\r") else line)
        # The inactivity timeout starts again once the command is handled
        # (answered, or its answer under way): a message asked for alone is
        # sent by now, and its client does not wait for this.  (resetTimeout,
        # without its call; not for a connection the command closed.)
        if self.phase in _OPEN:
            self._idle_timeouts.touch(self)

    # -- answering, strictly in order ----------------------------------------

    def _command(self, line: bytes | None) -> None:
        """A command line (None: one that was too long) for the driver."""
        self.phase = _ANSWERING
        try:
            if line is None:
                self.driver.line_too_long()
            else:
                self.driver.line(line)
        except Exception:
            self.deliver(Failure())
        if self.phase is _ANSWERING:
            # The answer comes later (or is a message still being sent): no
            # further command is read until it is all written.
            self._update_reading()

    def deliver(self, reply: Reply | Failure) -> None:
        """The driver's answer to the command in flight, at once or later."""
        if isinstance(reply, Failure):
            reply = self._unexpected_failure(reply)
        if self.phase not in _OPEN:
            if isinstance(reply, MessageStream):
                reply.body.close()
            return
        try:
            streaming = self._send(reply)
        except Exception:
            # Part of the reply, or a TLS handshake, may be under way, and
            # the next reply must not pass for this one's.
            self._unexpected_failure(Failure())
            self._abort()
            return
        if not streaming:
            # A message being sent calls this when it ends (`_stream_ended`).
            self._command_done()

    def _command_done(self, *, unsent: bool = True) -> None:
        """``unsent``: False when the reply was sent already (a message, at its end)."""
        if self.phase is _ANSWERING:
            self.phase = _READING
            self._unsent = unsent
            # Commands the client sent meanwhile (pipelining) are answered
            # now, and their replies leave together, with this one.  (The
            # calls are spared when they would do nothing: reading is held
            # exactly while the output is blocked, or a read is being
            # worked through.)
            if self.paused != self._output_blocked:
                self._update_reading()
            if not self._receiving:
                self._send_if_done()

    def _send_if_done(self) -> None:
        """
        Send what was written, once no read is being worked through (the
        replies to every command of a read leave together) and the
        connection is open.
        """
        if self._unsent and not self._receiving and self.phase in _OPEN:
            self._send_now()

    def _send_now(self) -> None:
        """
        Have the transport send what was written now, not on the reactor's
        next turn: a TCP transport writes when epoll next reports the socket
        writable, which costs every command a second turn of the reactor (a
        return from ``epoll_wait`` and a dispatch) before its reply leaves,
        and a client that waits for each answer (RETR after RETR, a login)
        waits that much longer.  Only while the connection is open and the
        transport is not closing (the TLS layer closes it on a client's
        close_notify, behind the protocol's back): a closing transport
        closes itself once the rest is out, which only the reactor sees.
        """
        self._unsent = False
        if self._sending:
            # Called back from within the write below: a buffer it emptied
            # resumed this connection, which answered the next pipelined
            # command.  Writing again from here would nest a write in a
            # write for every such command (hundreds of pipelined RETRs of
            # 100 KB overflowed the stack): the reactor sends it.
            return
        transport = self._write_descriptor
        if transport is not None and not getattr(transport, "disconnecting", True):
            # What it cannot send now stays buffered, and the reactor sends
            # it, or learns that the connection is gone, as it would have.
            self._sending = True
            try:
                transport.doWrite()
            finally:
                self._sending = False

    def _unexpected_failure(self, failure: Failure) -> Status:
        return unexpected_error(self.driver.log, failure, self.session.peer)

    def _send(self, reply: Reply) -> bool:
        """Put ``reply`` on the wire; True if it is a message, which may still be going."""
        # Worded as the session speaks now: a LANG reply is in its new language.
        wording = self.driver.session.wording
        if isinstance(reply, MessageStream):
            # No Deferred per message: a small one is read, encoded and
            # written within this call, and `_stream_ended` is called at once.
            stream = _MessageStreamer(
                self.transport,  # type: ignore[arg-type]
                reply,
                self.resetTimeout,
                self._stream_ended,
                translator=wording,
            )
            self._stream = stream
            if not self._output_blocked:
                # A write made now answers the line just received, which
                # restarts the inactivity timeout once it is handled.
                stream.pump(touched=self._receiving > 0)
            return True
        if isinstance(reply, Status):
            self._connection.write(reply.to_bytes(wording))
        elif isinstance(reply, Listing):
            self._connection.write(
                format_multiline(reply.status, reply.lines, reply.formatted, wording)
            )
        elif isinstance(reply, SASLContinuation):
            self._connection.write(b"+ " + base64.b64encode(reply.data) + b"\r\n")
        elif isinstance(reply, StartTLS):
            assert self._tls is not None
            self._connection.write(reply.status.to_bytes(wording))
            # Whatever the client sent after STLS, before the handshake, is
            # dropped, never executed after it (RFC 2595 section 4;
            # CVE-2011-0411-style command injection).
            self.clearLineBuffer()
            self._after_long_line = b""
            self._connection.startTLS(self._tls.context_factory())
            self._tls_started = True
            self._known_link = None
        elif isinstance(reply, Hangup):
            self._hang_up(reply.status.to_bytes(wording))
        else:
            raise TypeError(f"not a reply: {reply!r}")
        return False

    def _stream_ended(self, result: Failure | None) -> None:
        """The message being sent went out whole (None), or could not."""
        sent = False
        try:
            stream, self._stream = self._stream, None
            if stream is not None and stream.sent_whole:
                if self._lone_command:
                    # Asked for alone (a client that waits for each answer):
                    # the message is handed to the transport to send now,
                    # so that the client need not wait for the bookkeeping
                    # below, nor for the calls that made it to return.  A
                    # message asked for among pipelined commands waits, so
                    # that the replies to the read's commands leave together.
                    self._send_now()
                    sent = True
                self.driver.session.message_sent(stream.sent_octets)
            if result is not None and not result.check(ResponseAbandoned):
                # Part of the message is out, so there is no honest way to
                # finish the response: abort, and the client knows the
                # message is incomplete.
                self.driver.log.failure(
                    "reading a message failed mid-response to {peer}",
                    result,
                    peer=self.session.peer,
                )
                self._abort()
        finally:
            self._command_done(unsent=not sent)
        if sent and not self._idle_timeouts.others_active_within(self, BUSY_WINDOW):
            # Its client waits for each answer, and no other client keeps
            # the server busy meanwhile: the message it likely asks for
            # next is read while it takes this one in.
            self.driver.read_ahead()


@implementer(IPushProducer)
class _OutputValve:
    """
    Registered on the transport for the whole connection: tells the protocol
    when the transport's buffer is full, and when it has drained.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: POP3Protocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.output_blocked(True)

    def resumeProducing(self) -> None:
        self._protocol.output_blocked(False)

    def stopProducing(self) -> None:
        # The connection is closing; connectionLost follows and cleans up.
        pass


def _behind_proxy_header(transport: object) -> bool:
    """
    Whether the connection came through a PROXY-protocol wrapper (haproxy:),
    outside any TLS layer (haproxy:ssl:), whose header names the client only
    once it arrived, after connectionMade.
    """
    for _ in range(4):  # PROXY, TLS, TCP: a chain of wrappers is short
        if transport is None:
            return False
        if isinstance(transport, HAProxyProtocolWrapper):
            return True
        transport = getattr(transport, "transport", None)
    return False


@functools.lru_cache(maxsize=1024)
def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    # An IPv4 client of a dual-stack IPv6 socket (systemd's ListenStream=110)
    # is ::ffff:127.0.0.1, which Python before 3.13 does not call loopback:
    # ip_address_of reads it as 127.0.0.1.
    address = ip_address_of(host)
    return address is not None and address.is_loopback


def _local_host(transport: object) -> str | None:
    """The server's address the client connected to, if it is still known."""
    try:
        # A TCP transport forgets its socket once the connection is lost.
        address = transport.getHost() if transport is not None else None  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    host = getattr(address, "host", None)
    # Few addresses are listened on: one string each, not one per session.
    return sys.intern(host) if isinstance(host, str) else None


def _tls_connection(transport: object) -> SSL.Connection | None:
    """
    The OpenSSL connection under a transport, once its handshake is done:
    implicit TLS (the transport is TLS), or STLS (TLS is the protocol of the
    TCP transport).
    """
    for layer in (transport, getattr(transport, "protocol", None)):
        get_handle = getattr(layer, "getHandle", None)
        try:
            handle = get_handle() if get_handle is not None else None
        except AttributeError:
            # A TCP transport that has closed has no socket left (asked for
            # the first time when a client left before sending a line).
            handle = None
        if isinstance(handle, SSL.Connection) and handle.get_cipher_name() is not None:
            return handle
    return None


def describe_address(addr: IAddress | None) -> str:
    """host:port for IP addresses, the path for UNIX sockets."""
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(addr, "name", None) or addr)


class MessageTruncated(Exception):
    """A message had fewer octets than its announced size when sent."""

    def __init__(self, announced: int, found: int) -> None:
        super().__init__(f"announced {announced} octets, found {found}")


class ResponseAbandoned(Exception):
    """The connection closed while a message was being sent."""


class _MessageStreamer:
    """
    Writes one RETR/TOP response a chunk at a time, only while the transport
    takes more: a 200 MB message or a slow client never makes the server hold
    more than a chunk or two.

    A body may answer a read at once (a local file) or later (a Deferred: a
    store behind a network service).  One read is outstanding at a time; a
    chunk that arrives while the transport is full is written, and the next
    is asked for only once the transport takes more.
    """

    # One is made for every RETR and TOP: slots, no dict to make.
    __slots__ = (
        "_body",
        "_encoder",
        "_ended",
        "_expected_size",
        "_finished",
        "_paused",
        "_pending_status",
        "_progress",
        "_pumping",
        "_reading",
        "_touched",
        "_translator",
        "_transport",
        "sent_octets",
        "sent_whole",
    )

    def __init__(
        self,
        transport: _Transport,
        reply: MessageStream,
        progress: Any,
        ended: Callable[[Failure | None], None],
        *,
        translator: Translator | None = None,
    ) -> None:
        """
        ``progress`` is called before each write; ``ended`` once, when the
        message went out whole (None) or could not (the Failure; `ResponseAbandoned`
        if the connection went first).
        """
        self._transport = transport
        self._body = reply.body
        self._encoder = reply.encoder
        self._expected_size = reply.expected_size
        self._translator = translator
        self._pending_status: bytes | None = reply.status.to_bytes(translator)
        self._progress = progress
        # Writes made within `pump(touched=True)` do not call ``progress``.
        self._touched = False
        # Until `pause`: the protocol begins by calling `pump` (or, when the
        # transport is full, `resume`).
        self._paused = False
        self._finished = False
        # The read whose answer is awaited, if any.
        self._reading: Deferred[bytes] | None = None
        self._pumping = False
        #: The whole message and its terminator were written.
        self.sent_whole = False
        #: Once it was: the octets of the message, before byte-stuffing.
        self.sent_octets = 0
        self._ended = ended

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.pump()

    def pump(self, *, touched: bool = False) -> None:
        """
        Write while the transport takes more: called to begin (unless the
        transport is full: then `resume` begins), on `resume`, and when a
        read answered later.  ``touched``: the client was just heard from,
        so what is written now need not call ``progress``.

        A message read whole in one read (nearly every one) is read, encoded
        and written, terminator and all, within this one call.
        """
        if self._pumping:
            return  # a read answered at once, within the loop below: it goes on
        self._pumping = True
        self._touched = touched
        try:
            while not self._paused and not self._finished and self._reading is None:
                out = [] if self._pending_status is None else [self._pending_status]
                encoder = self._encoder
                at_end = encoder.done
                if not at_end:
                    body = self._body
                    chunk = body.read(CHUNK_SIZE)
                    if not isinstance(chunk, bytes):
                        self._await(chunk)
                        return
                    out.append(encoder.feed(chunk))
                    if chunk and len(chunk) < CHUNK_SIZE and not encoder.done:
                        # A short read is usually the end: look once more, so
                        # that the last bytes and the terminator leave in the
                        # same write.  (Never ended at the announced size: a
                        # body whose message grew is sent whole, as stored.)
                        more = body.read(CHUNK_SIZE)
                        if not isinstance(more, bytes):
                            # Not at hand: what is read goes now, the rest later.
                            self._write(out, at_end=False)
                            self._await(more)
                            return
                        if more:
                            # (Feeding nothing would change nothing: spared per message.)
                            out.append(encoder.feed(more))
                        chunk = more
                    at_end = not chunk or encoder.done
                self._write(out, at_end)
        except Exception:
            self._fail(Failure())
        finally:
            self._pumping = False
            self._touched = False

    def abandon(self) -> None:
        """The connection is gone: nothing more may be written."""
        self._finish(Failure(ResponseAbandoned()))

    def _await(self, reading: Deferred[bytes]) -> None:
        """Wait for a read that answers later, then go on if the transport takes more."""
        self._reading = reading
        reading.addCallbacks(self._arrived, self._read_failed)

    def _arrived(self, chunk: bytes) -> None:
        self._reading = None
        if self._finished:
            return  # abandoned meanwhile; the body is closed
        try:
            out = [] if self._pending_status is None else [self._pending_status]
            out.append(self._encoder.feed(chunk))
            self._write(out, at_end=not chunk or self._encoder.done)
        except Exception:
            self._fail(Failure())
            return
        self.pump()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = None
        if not self._finished:
            self._fail(failure)

    def _write(self, out: list[bytes], at_end: bool) -> None:
        self._pending_status = None
        if not self._touched:
            self._progress()
        if not at_end:
            # A middle chunk of a large message goes out as it is: joining
            # would copy 256 KiB for nothing.
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            return
        ending = self._encoder.finish()
        if self._expected_size is not None and self._encoder.size < self._expected_size:
            # Shorter than announced: the file was cut while being sent.  The
            # terminator would make a truncated message look complete.
            out.append(ending[: -len(TERMINATOR)])
            self._transport.write(b"".join(out))
            self._finish(Failure(MessageTruncated(self._expected_size, self._encoder.size)))
            return
        out.append(ending)
        self._transport.write(b"".join(out))
        self.sent_whole = True
        self.sent_octets = self._encoder.size
        self._finish(None)

    def _fail(self, failure: Failure) -> None:
        status = self._pending_status
        if status is not None and failure.check(POP3Error):
            # Nothing was sent yet: the client can be told plainly.
            error = failure.value
            assert isinstance(error, POP3Error)
            log.failure("cannot read a message", failure)
            self._transport.write(error.status().to_bytes(self._translator))
            self._finish(None)
        else:
            self._finish(failure)

    def _finish(self, failure: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        reading, self._reading = self._reading, None
        if reading is not None:
            # The answer is no longer wanted (the connection is gone).
            reading.cancel()
        try:
            # First: a message asked for alone is sent from ``ended``, and
            # its client need not wait for the file to be closed.
            self._ended(failure)
        finally:
            self._body.close()
