"""
The protocol factory: one `POP3Protocol`, `SessionDriver` and `Session` per connection.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.cred.credentials import IUsernameHashedPassword
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure

from pop3d.driver import Replies, SessionDriver
from pop3d.i18n import BUILTIN_LANGUAGES, Languages
from pop3d.idle import IdleTimeouts
from pop3d.protocol import DEFAULT_TIMEOUT, POP3Protocol
from pop3d.readahead import DEFAULT_LIMIT as DEFAULT_READ_AHEAD_LIMIT
from pop3d.readahead import ReadAhead
from pop3d.sasl import ISASLMechanism
from pop3d.sasl.cram_md5 import CramMD5
from pop3d.sasl.login import Login
from pop3d.sasl.oauth2 import OAuthBearer, XOAuth2
from pop3d.sasl.plain import Plain
from pop3d.sasl.scram import ScramSHA256
from pop3d.session import DEFAULT_POLICY, Link, Reply, SessionPolicy
from pop3d.throttle import FailureDelay, IPNetwork
from pop3d.tls import ServerTLS
from pop3d.wire import ClientWorkarounds, ResponseCode, Status, format_status

if TYPE_CHECKING:
    from pop3d.metrics import Metrics

log = Logger()

#: Mechanisms offered when none are given, strongest first; each only when
#: the checkers can verify what it yields (OAUTHBEARER and XOAUTH2: with
#: ``--auth oauth2:``).
DEFAULT_MECHANISMS: tuple[ISASLMechanism, ...] = (
    ScramSHA256(),
    CramMD5(),
    Plain(),
    Login(),
    OAuthBearer(),
    XOAuth2(),
)

TOO_MANY_CONNECTIONS = "too many connections, try again later"

#: Dovecot's auth_failure_delay default.
DEFAULT_LOGIN_FAILURE_DELAY = 2.0


class POP3Factory(Factory):
    """
    Serves POP3 for the users of a cred ``portal`` whose realm provides
    `pop3d.stores.interfaces.IMaildrop` avatars (see `pop3d.MaildropRealm`).

    ``clock`` is the reactor (or a `twisted.internet.task.Clock` in tests);
    ``timeout`` is the inactivity autologout in seconds (None: never);
    ``hostname`` goes into APOP timestamps; ``login_failure_delay`` is how
    long the answer to a peer's first failed login waits (it doubles for each
    further guess, up to 15 s, see `pop3d.throttle.FailureDelay`; 0: no
    delay).  Clients in ``trusted_networks`` (`ipaddress` networks, e.g. a
    webmail host) are never delayed, may fail any number of logins on one
    connection, and are not counted against ``max_connections_per_ip``.
    ``client_workarounds``, when given, replaces those of ``policy`` (see
    `pop3d.wire.ClientWorkarounds`).  ``metrics`` (a `pop3d.metrics.Metrics`),
    when given, counts what the server does; None: nothing is counted.
    ``session_log`` is where the sessions' log lines go (twisted.logger's
    global publisher; under ``twistd -n``, `pop3d.tap` has them written to
    standard output directly).  ``read_ahead_limit``: the octets all
    sessions together may hold of messages read ahead for clients that
    retrieve them in order (`pop3d.readahead`; 0: none are read ahead).
    """

    def __init__(
        self,
        portal: Portal,
        *,
        clock: IReactorTime,
        timeout: int | None = DEFAULT_TIMEOUT,
        hostname: str | None = None,
        policy: SessionPolicy = DEFAULT_POLICY,
        login_failure_delay: float = DEFAULT_LOGIN_FAILURE_DELAY,
        mechanisms: Sequence[ISASLMechanism] | None = None,
        tls: ServerTLS | None = None,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        client_workarounds: ClientWorkarounds | None = None,
        trusted_networks: Sequence[IPNetwork] = (),
        languages: Languages = BUILTIN_LANGUAGES,
        metrics: Metrics | None = None,
        session_log: ILogObserver = globalLogPublisher,
        read_ahead_limit: int = DEFAULT_READ_AHEAD_LIMIT,
    ) -> None:
        if client_workarounds is not None:
            policy = dataclasses.replace(policy, client_workarounds=client_workarounds)
        self.portal = portal
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.policy = policy
        self.failure_delay = FailureDelay(clock, base=login_failure_delay, trusted=trusted_networks)
        self.mechanisms = list(DEFAULT_MECHANISMS if mechanisms is None else mechanisms)
        self.tls = tls
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self._connections = 0
        self._connections_by_host: Counter[str] = Counter()
        #: The languages of LANG (RFC 6856 section 3).
        self.languages = languages
        #: What the server counts (`pop3d.metrics.Metrics`), or None.
        self.metrics = metrics
        #: Where the sessions' log lines go.
        self.session_log = session_log
        #: The messages read ahead for this server's sessions, or None.
        self.read_ahead = ReadAhead(read_ahead_limit) if read_ahead_limit > 0 else None
        # Every connection's inactivity timeout, in one timer.
        self._idle_timeouts = IdleTimeouts(clock, timeout)
        #: The connections served (closed ones drop out), for a graceful stop.
        self.connections: weakref.WeakSet[POP3Protocol] = weakref.WeakSet()

    def apop_challenge(self) -> bytes | None:
        """
        A fresh RFC 822 msg-id for the greeting (RFC 1939 section 7), or
        None when no checker can verify APOP, so APOP is not offered.
        """
        if IUsernameHashedPassword not in self.portal.listCredentialsInterfaces():
            return None
        token = secrets.token_hex(8)
        return f"<{token}.{int(self.clock.seconds())}@{self.hostname}>".encode("ascii", "replace")

    @property
    def timeout(self) -> float | None:
        """The inactivity autologout in seconds (None: never), kept by the shared timer."""
        return self._idle_timeouts.period

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self.max_connections is not None and self._connections >= self.max_connections:
            host = getattr(addr, "host", None) or ""
            log.warn("refusing connection from {host}: too many connections", host=host)
            return _TooManyConnections()

        metrics = self.metrics

        def new_driver(link: Callable[[], Link], replies: Replies) -> SessionDriver:
            if metrics is not None:
                replies = _CountedReplies(replies, metrics)
            return SessionDriver(
                self.portal,
                replies=replies,
                link=link,
                clock=self.clock,
                apop_challenge=self.apop_challenge(),
                failure_delay=self.failure_delay,
                policy=self.policy,
                mechanisms=self.mechanisms,
                tls_available=self.tls is not None,
                hostname=self.hostname,
                languages=self.languages,
                metrics=metrics,
                session_log=self.session_log,
                read_ahead=self.read_ahead,
            )

        slot = _ConnectionSlot(self)
        protocol = POP3Protocol(
            new_driver,
            idle_timeouts=self._idle_timeouts,
            tls=self.tls,
            # The slot itself, not a bound method (64 octets per session).
            on_close=slot,
            admit=slot.admit,
        )
        protocol.factory = self
        self.connections.add(protocol)
        self._connections += 1
        if metrics is not None:
            metrics.session_started()
        return protocol

    def _admit(self, host: str) -> bool:
        """
        Whether a connection from ``host`` (the real client, also behind a
        PROXY header) is within ``max_connections_per_ip``; if so, it counts.
        """
        limit = self.max_connections_per_ip
        # A trusted host (a webmail) brings many users' connections.
        if (
            limit is not None
            and self._connections_by_host[host] >= limit
            and not self.failure_delay.trusts(host)
        ):
            log.warn("refusing connection from {host}: too many connections", host=host)
            return False
        self._connections_by_host[host] += 1
        return True

    def _closed(self, host: str | None) -> None:
        self._connections -= 1
        if self.metrics is not None:
            self.metrics.session_ended()
        if host is None:
            return
        self._connections_by_host[host] -= 1
        if self._connections_by_host[host] <= 0:
            del self._connections_by_host[host]


class _TooManyConnections(Protocol):
    """Says why, then hangs up (RFC 3206 SYS/TEMP: try again later)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(format_status(False, TOO_MANY_CONNECTIONS, ResponseCode.SYS_TEMP))
        self.transport.loseConnection()


class _ConnectionSlot:
    """
    One connection in the factory's counts (small: one per session).  It
    counts for its address only once the protocol knows the real client:
    behind ``haproxy:`` the address a connection is accepted from is the
    proxy's, and the client's arrives with the PROXY header, later.
    """

    __slots__ = ("_factory", "_host")

    def __init__(self, factory: POP3Factory) -> None:
        self._factory = factory
        self._host: str | None = None

    def admit(self, link: Link) -> bytes | None:
        """None to serve the client of ``link``, else the refusal to send before hanging up."""
        if not self._factory._admit(link.host):
            return format_status(False, TOO_MANY_CONNECTIONS, ResponseCode.SYS_TEMP)
        self._host = link.host
        return None

    def __call__(self) -> None:
        """The connection closed."""
        self._factory._closed(self._host)


class _CountedReplies:
    """Counts each reply by its response code on its way to the protocol."""

    __slots__ = ("_metrics", "_replies")

    def __init__(self, replies: Replies, metrics: Metrics) -> None:
        self._replies = replies
        self._metrics = metrics

    def deliver(self, reply: Reply | Failure) -> None:
        kind = type(reply)
        if kind is Status:  # most replies: checked first
            status: object = reply
        elif kind is Failure:
            # Answered -ERR [SYS/TEMP] by the protocol.
            status = _SYSTEM_ERROR
        else:  # a SASL continuation has no status
            status = getattr(reply, "status", None)
        if type(status) is Status:
            self._metrics.reply(status.ok, status.code)
        self._replies.deliver(reply)


_SYSTEM_ERROR = Status(False, code=ResponseCode.SYS_TEMP)
