"""
CRAM-MD5 (RFC 2195): the server sends a fresh msg-id, the client answers
with its user name and HMAC-MD5(password, challenge) in hex.  The password
never crosses the wire, so it is offered on unencrypted connections too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from twisted.cred.credentials import IUsernameHashedPassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ICramMD5Credentials,
    ISASLExchange,
    ISASLMechanism,
    SASLError,
)


@implementer(ICramMD5Credentials)
class CramMD5Credentials:
    def __init__(self, username: bytes, challenge: bytes, response: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.response = response.lower()

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hmac.new(password, self.challenge, hashlib.md5).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.response)


@implementer(ISASLMechanism)
class CramMD5:
    name = b"CRAM-MD5"
    sends_password = False

    def usable(self, portal: Portal) -> bool:
        offered = portal.listCredentialsInterfaces()
        return ICramMD5Credentials in offered or IUsernameHashedPassword in offered

    def start(self, context: ExchangeContext) -> ISASLExchange:
        token = secrets.token_hex(8)
        challenge = f"<{token}.{int(context.now)}@{context.hostname}>".encode("ascii", "replace")
        return _CramMD5Exchange(challenge)


@implementer(ISASLExchange)
class _CramMD5Exchange:
    def __init__(self, challenge: bytes) -> None:
        self._challenge = challenge
        self._sent = False

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if not self._sent:
            if response is not None:
                return fail(SASLError("CRAM-MD5 takes no initial response"))
            self._sent = True
            return succeed(Challenge(self._challenge))
        username, _, digest = (response or b"").rpartition(b" ")
        if not username or len(digest) != 32 or not _is_hex(digest):
            return fail(SASLError("malformed CRAM-MD5 response"))
        return succeed(
            Authenticate(CramMD5Credentials(username, self._challenge, digest), username)
        )


def _is_hex(value: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in value)
