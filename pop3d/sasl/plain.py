"""
PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one response.

An authorization identity other than the authentication identity (acting as
another user) is refused: pop3d has no notion of administrators who may read
other users' mail.
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    SASLError,
)
from pop3d.wire import ResponseCode


@implementer(ISASLMechanism)
class Plain:
    name = b"PLAIN"
    sends_password = True

    def usable(self, portal: Portal) -> bool:
        return IUsernamePassword in portal.listCredentialsInterfaces()

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _PlainExchange()


@implementer(ISASLExchange)
class _PlainExchange:
    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if response is None:
            # No initial response: ask for it with an empty challenge.
            return succeed(Challenge(b""))
        fields = response.split(b"\x00")
        if len(fields) != 3 or not fields[1]:
            return fail(SASLError("malformed PLAIN response"))
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            return fail(SASLError("not authorized to act as another user", ResponseCode.AUTH))
        return succeed(Authenticate(UsernamePassword(authcid, password), authcid))
