"""
The protocol factory: one `Session` and one `POP3Protocol` per connection.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable

from twisted.cred.credentials import IUsernameHashedPassword
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory

from pop3d.protocol import DEFAULT_TIMEOUT, POP3Protocol
from pop3d.session import DEFAULT_POLICY, Session, SessionPolicy
from pop3d.throttle import FailureDelay

#: Dovecot's auth_failure_delay default.
DEFAULT_LOGIN_FAILURE_DELAY = 2.0


class POP3Factory(Factory):
    """
    Serves POP3 for the users of a cred ``portal`` whose realm provides
    `pop3d.interfaces.IMaildrop` avatars (see `pop3d.MaildropRealm`).

    ``clock`` is the reactor (or a `twisted.internet.task.Clock` in tests);
    ``timeout`` is the inactivity autologout in seconds (None: never);
    ``hostname`` goes into APOP timestamps; ``login_failure_delay`` is how
    long the answer to a peer's first failed login waits (it doubles for each
    further failure, see `pop3d.throttle.FailureDelay`).
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
    ) -> None:
        self.portal = portal
        self.clock = clock
        self.timeout = timeout
        self.hostname = hostname or socket.gethostname()
        self.policy = policy
        self.failure_delay = FailureDelay(clock, base=login_failure_delay)

    def apop_challenge(self) -> bytes | None:
        """
        A fresh RFC 822 msg-id for the greeting (RFC 1939 section 7), or
        None when no checker can verify APOP, so APOP is not offered.
        """
        if IUsernameHashedPassword not in self.portal.listCredentialsInterfaces():
            return None
        token = secrets.token_hex(8)
        return f"<{token}.{int(self.clock.seconds())}@{self.hostname}>".encode("ascii", "replace")

    def buildProtocol(self, addr: IAddress | None) -> POP3Protocol:
        def new_session(peer: Callable[[], str]) -> Session:
            return Session(
                self.portal,
                apop_challenge=self.apop_challenge(),
                peer=peer,
                failure_delay=self.failure_delay,
                policy=self.policy,
            )

        protocol = POP3Protocol(new_session, clock=self.clock, timeout=self.timeout)
        protocol.factory = self
        return protocol
