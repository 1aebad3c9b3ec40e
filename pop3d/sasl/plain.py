"""
PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one response.

An authorization identity other than the authentication identity (acting as
another user) is refused: pop3d has no notion of administrators who may read
other users' mail.  The fields are prepared with SASLprep (RFC 4616 section
2, `pop3d.saslprep`), so NFC and NFD forms of a UTF-8 name are one name.
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
    SASLFailure,
)
from pop3d.saslprep import SASLprepError, prepare_credential

#: A user name or password SASLprep refuses (RFC 4013 section 2.3).
NOT_ALLOWED = "the user name or password contains characters that are not allowed"


@implementer(ISASLMechanism)
class Plain:
    name = b"PLAIN"
    sends_password = True

    def usable(self, verifiers: IVerifiers) -> bool:
        return bool(verifiers.can_verify(IUsernamePassword))

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
        try:
            credentials = PreparedUsernamePassword(authcid, password)
            authzid = prepare_credential(authzid)
        except SASLprepError:
            return fail(SASLError(NOT_ALLOWED))
        if authzid and authzid not in credentials.usernames:
            return fail(
                SASLError("not authorized to act as another user", SASLFailure.NOT_AUTHORIZED)
            )
        return succeed(Authenticate(credentials, credentials.username))
