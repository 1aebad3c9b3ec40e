"""
LOGIN (draft-murchison-sasl-login): the user name, then the password, each
asked for in turn.  Obsolete, but Outlook and many phones still use it.
Both are prepared with SASLprep, as for PLAIN.
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pop3d.credentials import PreparedUsernamePassword
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    IVerifiers,
    SASLError,
)
from pop3d.sasl.plain import NOT_ALLOWED
from pop3d.saslprep import SASLprepError


@implementer(ISASLMechanism)
class Login:
    name = b"LOGIN"
    sends_password = True

    def usable(self, verifiers: IVerifiers) -> bool:
        return bool(verifiers.can_verify(IUsernamePassword))

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _LoginExchange()


@implementer(ISASLExchange)
class _LoginExchange:
    def __init__(self) -> None:
        self._username: bytes | None = None
        self._asked_for_username = False

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if self._username is None:
            if response is None and not self._asked_for_username:
                self._asked_for_username = True
                return succeed(Challenge(b"Username:"))
            self._username = response or b""
            return succeed(Challenge(b"Password:"))
        try:
            credentials = PreparedUsernamePassword(self._username, response or b"")
        except SASLprepError:
            return fail(SASLError(NOT_ALLOWED))
        return succeed(Authenticate(credentials, credentials.username))
