"""
CRAM-MD5 (RFC 2195): the server sends a fresh msg-id, the client answers
with its user name and HMAC-MD5(password, challenge) in hex.  The password
never crosses the wire, so it is offered on unencrypted connections too.

A password file verifies CRAM-MD5 credentials against plaintext entries and
Dovecot's ``{CRAM-MD5}`` ones (`verify_cram_md5`, registered in
`pop3d.credchecks.PASSWORD_CHECKS`); any other checker of hashed-password
credentials (APOP's) verifies them against its plaintext passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pop3d.credchecks import (
    PASSWORD_CHECKS,
    PasswordCheck,
    PasswordEntry,
    PasswordLookup,
    as_bytes,
)
from pop3d.passwords import CramMD5Scheme, PasswordScheme
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ICramMD5Credentials,
    ISASLExchange,
    ISASLMechanism,
    IVerifiers,
    SASLError,
    SASLFailure,
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

    def usable(self, verifiers: IVerifiers) -> bool:
        # Also true where only hashed-password (APOP) credentials can be
        # checked: CRAM-MD5's are such credentials too.
        return bool(verifiers.can_verify(ICramMD5Credentials))

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
                return fail(SASLError("CRAM-MD5 takes no initial response", SASLFailure.UNEXPECTED))
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


# -- in a password file -----------------------------------------------------------------


def verify_cram_md5(lookup: PasswordLookup, credentials: Any) -> bool:
    """A plaintext entry's password, or a ``{CRAM-MD5}`` entry's HMAC context."""
    entry = lookup.entry or lookup.dummy(ICramMD5Credentials)
    kind = entry.kind
    if kind.plaintext:
        matched = bool(credentials.checkPassword(entry.secret))
    elif isinstance(kind, CramMD5Scheme):
        challenge = as_bytes(credentials.challenge)
        response = as_bytes(credentials.response)
        matched = kind.verify_response(entry.secret, challenge, response)
    else:
        matched = False
    return matched and lookup.entry is not None


def _possible(schemes: Collection[PasswordScheme]) -> bool:
    return any(scheme.plaintext or isinstance(scheme, CramMD5Scheme) for scheme in schemes)


def _dummy(schemes: Collection[PasswordScheme]) -> PasswordEntry:
    """An unknown user's response is checked as the file's entries would check it."""
    if any(isinstance(scheme, CramMD5Scheme) for scheme in schemes):
        return PasswordEntry("CRAM-MD5", secrets.token_hex(32).encode("ascii"))
    return PasswordEntry("PLAIN", secrets.token_hex(8).encode("ascii"))


PASSWORD_CHECKS.register(
    PasswordCheck(ICramMD5Credentials, verify_cram_md5, possible=_possible, dummy=_dummy)
)
