"""
OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's and Microsoft's older
format): the client sends an OAuth 2.0 bearer token (RFC 6750) instead of a
password.

OAUTHBEARER, RFC 7628 section 3.1::

    client-resp = (gs2-header kvsep *kvpair kvsep) / kvsep
    kvsep       = %x01
    kvpair      = key "=" value kvsep      ; auth=Bearer <b64token>, host=, port=

e.g. ``n,a=user@example.com,^Aauth=Bearer vF9dft4qmT^A^A``.  XOAUTH2 is
``user=<user>^Aauth=Bearer <token>^A^A``.

Both mechanisms yield `BearerTokenCredentials` (`IOAuth2BearerToken`): the
user the client names (the gs2 header's ``a=``, XOAUTH2's ``user=``; may be
empty for OAUTHBEARER) and the token.  The checker that verifies them
decides who the token belongs to; a named user must be that user.

A refused token is answered as RFC 7628 section 3.2.2 says: a challenge
holding a JSON error (``{"status":"invalid_token"}``, with ``scope`` and
``openid-configuration`` when the checker names them), to which the client
answers with a single %x01 (section 3.2.3); only then does the exchange
fail, through the server's usual failed-login path (counted, delayed,
logged as any wrong password).  XOAUTH2 does the same with Google's error
JSON (``{"status":"401","schemes":"bearer",...}``), the client answering with
an empty response.  For this the mechanism asks the checker, through the
add-on interface `IOAuth2TokenVerifier`, before the exchange ends; the
checker remembers its answer for these credentials, so a token is checked
once per login.  Without that interface the exchange ends at once, and a
refused token gets the final -ERR without the JSON challenge.

Bearer tokens are secrets that can be replayed: like PLAIN, both mechanisms
are offered only where plaintext logins are (``sends_password``; RFC 6750
section 5.3; Dovecot counts them as plaintext mechanisms too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    IVerifiers,
    SASLError,
    SASLFailure,
    decode_saslname,
)

#: RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
#: RFC 7628 section 3.1: key = 1*(ALPHA); value = *(VCHAR / SP / HTAB / CR / LF)
_KEY = re.compile(rb"[A-Za-z]+")
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n]*")
#: RFC 7235 section 2.1: the scheme is case-insensitive; RFC 6750 section 2.1: 1*SP.
_BEARER = re.compile(rb"(?i:bearer) +(.*)", re.DOTALL)

MALFORMED_OAUTHBEARER = "malformed OAUTHBEARER response"
MALFORMED_XOAUTH2 = "malformed XOAUTH2 response"


class IOAuth2BearerToken(ICredentials):
    """
    An OAuth 2.0 bearer token (RFC 6750) sent with OAUTHBEARER or XOAUTH2.
    The checker finds out who it belongs to; if ``username`` is not empty,
    the token must belong to that user, or the login fails.
    """

    username: bytes = Attribute(
        "The user the client names (OAUTHBEARER's gs2 authzid, XOAUTH2's user=), "
        "or b'' when it names none."
    )
    token: bytes = Attribute("The token, an RFC 6750 b64token.  Secret: never log it.")


@implementer(IOAuth2BearerToken)
class BearerTokenCredentials:
    """A bearer token and the user its client named."""

    def __init__(self, username: bytes, token: bytes) -> None:
        self.username = username
        self.token = token

    def __repr__(self) -> str:
        # Whatever prints credentials (a traceback's locals, a debugger) never shows the token.
        return (
            f"<BearerTokenCredentials username={self.username!r} token=<{len(self.token)} bytes>>"
        )


@dataclass(frozen=True)
class TokenRefusal:
    """
    What a server tells the client of a refused token (RFC 7628 section
    3.2.2): the scopes that would do, the OpenID discovery document.
    """

    scope: str | None = None
    openid_configuration: str | None = None


@dataclass(frozen=True)
class TokenCheck:
    """
    The verdict on a token: accepted for ``user`` (the canonical name),
    ``refused`` (with what the client may be told), or neither when it could
    not be checked (the provider is unreachable: the login will say so).
    """

    user: bytes | None = None
    refused: TokenRefusal | None = None


class IOAuth2TokenVerifier(Interface):
    """
    A checker of `IOAuth2BearerToken` that can give its verdict before the
    login, so that a mechanism can send RFC 7628's error challenge.  It
    remembers the verdict for the ``credentials`` object and gives the same
    one when the credentials come back to it through the portal.
    """

    def check_token(credentials: IOAuth2BearerToken) -> Deferred[TokenCheck]:
        """The verdict on ``credentials``; never fails (trouble is a `TokenCheck()`)."""


def _verifier(verifiers: IVerifiers) -> IOAuth2TokenVerifier | None:
    verifier: IOAuth2TokenVerifier | None = verifiers.lookup(
        IOAuth2BearerToken, IOAuth2TokenVerifier
    )
    return verifier


def is_b64token(token: bytes) -> bool:
    """Whether ``token`` has RFC 6750 section 2.1's b64token form."""
    return _B64TOKEN.fullmatch(token) is not None


def _bearer_token(auth_value: bytes) -> bytes | None:
    """``Bearer <b64token>`` (RFC 6750 section 2.1) -> the token, or None."""
    match = _BEARER.fullmatch(auth_value)
    if match is None or not is_b64token(match.group(1)):
        return None
    return match.group(1)


def _key_values(fields: list[bytes]) -> dict[bytes, bytes] | None:
    """``key=value`` pairs (RFC 7628 section 3.1), each key once; None if malformed."""
    pairs: dict[bytes, bytes] = {}
    for field in fields:
        key, separator, value = field.partition(b"=")
        if not separator or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            return None
        if key in pairs:
            return None
        pairs[key] = value
    return pairs


def parse_oauthbearer(response: bytes) -> BearerTokenCredentials:
    """
    An OAUTHBEARER client response (RFC 7628 section 3.1) as credentials;
    `SASLError` if it breaks the grammar, uses channel binding, or names a
    user in a form RFC 5801 does not allow.
    """
    gs2_header, kvsep, rest = response.partition(b"\x01")
    # After the gs2 header: *kvpair kvsep, each kvpair ending with its own kvsep.
    if not kvsep or not rest.endswith(b"\x01"):
        raise SASLError(MALFORMED_OAUTHBEARER)
    body = rest[:-1]
    if body and not body.endswith(b"\x01"):
        raise SASLError(MALFORMED_OAUTHBEARER)
    pairs = _key_values(body[:-1].split(b"\x01") if body else [])
    if pairs is None:
        raise SASLError(MALFORMED_OAUTHBEARER)
    # RFC 5801 section 4: gs2-header = [gs2-nonstd-flag ","] gs2-cb-flag "," [gs2-authzid] ","
    header = gs2_header.split(b",")
    if len(header) != 3 or header[2] != b"":
        raise SASLError(MALFORMED_OAUTHBEARER)
    flag, authzid_field = header[0], header[1]
    if flag.startswith(b"p="):
        # RFC 7628 section 3.1: channel binding is not supported by OAUTHBEARER.
        raise SASLError("OAUTHBEARER does not support channel binding", SASLFailure.UNSUPPORTED)
    if flag not in (b"n", b"y"):
        raise SASLError(MALFORMED_OAUTHBEARER)
    username = b""
    if authzid_field:
        if not authzid_field.startswith(b"a="):
            raise SASLError(MALFORMED_OAUTHBEARER)
        unescaped = decode_saslname(authzid_field[2:])
        if not unescaped or not _is_utf8(unescaped) or b"\x00" in unescaped:
            raise SASLError(MALFORMED_OAUTHBEARER)
        username = unescaped
    token = _bearer_token(pairs.get(b"auth", b""))
    if token is None:
        raise SASLError(MALFORMED_OAUTHBEARER)
    return BearerTokenCredentials(username, token)


def parse_xoauth2(response: bytes) -> BearerTokenCredentials:
    """``user=<user>^Aauth=Bearer <token>^A^A`` as credentials; `SASLError` if malformed."""
    if not response.endswith(b"\x01\x01"):
        raise SASLError(MALFORMED_XOAUTH2)
    pairs: dict[bytes, bytes] = {}
    for field in response[:-2].split(b"\x01"):
        key, separator, value = field.partition(b"=")
        if not separator or key in pairs:
            raise SASLError(MALFORMED_XOAUTH2)
        pairs[key] = value
    user = pairs.get(b"user", b"")
    if not user or not _is_utf8(user) or any(byte < 0x20 for byte in user):
        raise SASLError(MALFORMED_XOAUTH2)
    token = _bearer_token(pairs.get(b"auth", b""))
    if token is None:
        raise SASLError(MALFORMED_XOAUTH2)
    return BearerTokenCredentials(user, token)


def oauthbearer_error(refusal: TokenRefusal) -> bytes:
    """The JSON of RFC 7628 section 3.2.2 for a refused token."""
    error: dict[str, str] = {"status": "invalid_token"}
    if refusal.scope:
        error["scope"] = refusal.scope
    if refusal.openid_configuration:
        error["openid-configuration"] = refusal.openid_configuration
    return json.dumps(error, separators=(",", ":")).encode("utf-8")


def xoauth2_error(refusal: TokenRefusal) -> bytes:
    """
    Google's XOAUTH2 error JSON, as Dovecot sends it: its scope is always
    there, ``mail`` unless the checker names another.
    """
    error = {"status": "401", "schemes": "bearer", "scope": refusal.scope or "mail"}
    return json.dumps(error, separators=(",", ":")).encode("utf-8")


@implementer(ISASLMechanism)
@dataclass(frozen=True)
class BearerTokenMechanism:
    """
    A SASL mechanism that carries an OAuth 2.0 bearer token: the two differ
    only in how the client's response is written and how a refusal is told.
    """

    name: bytes
    parse: Callable[[bytes], BearerTokenCredentials]
    error_json: Callable[[TokenRefusal], bytes]
    sends_password: bool = True

    def usable(self, verifiers: IVerifiers) -> bool:
        return bool(verifiers.can_verify(IOAuth2BearerToken))

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _BearerExchange(_verifier(context.verifiers), self.parse, self.error_json)


def OAuthBearer() -> BearerTokenMechanism:
    """The OAUTHBEARER mechanism (RFC 7628)."""
    return BearerTokenMechanism(b"OAUTHBEARER", parse_oauthbearer, oauthbearer_error)


def XOAuth2() -> BearerTokenMechanism:
    """The XOAUTH2 mechanism (Google's, Microsoft's)."""
    return BearerTokenMechanism(b"XOAUTH2", parse_xoauth2, xoauth2_error)


@implementer(ISASLExchange)
class _BearerExchange:
    def __init__(
        self,
        verifier: IOAuth2TokenVerifier | None,
        parse: Callable[[bytes], BearerTokenCredentials],
        error_json: Callable[[TokenRefusal], bytes],
    ) -> None:
        self._verifier = verifier
        self._parse = parse
        self._error_json = error_json
        self._asked = False
        self._refused: BearerTokenCredentials | None = None
        self._over = False

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if self._over:
            return fail(SASLError("the exchange is over", SASLFailure.UNEXPECTED))
        if self._refused is not None:
            # RFC 7628 section 3.2.3: the client's %x01 after the error
            # challenge (XOAUTH2: an empty response).  Whatever it sent, the
            # login fails now, as any other with wrong credentials.
            credentials, self._refused = self._refused, None
            self._over = True
            return succeed(Authenticate(credentials, credentials.username))
        if response is None:
            if self._asked:
                return fail(SASLError("expected the client response", SASLFailure.UNEXPECTED))
            # No initial response (RFC 5034 section 4): ask for it.
            self._asked = True
            return succeed(Challenge(b""))
        try:
            credentials = self._parse(response)
        except SASLError as error:
            return fail(error)
        verifier = self._verifier
        if verifier is None:
            self._over = True
            return succeed(Authenticate(credentials, credentials.username))
        checked: Deferred[TokenCheck] = maybeDeferred(verifier.check_token, credentials)
        return checked.addCallback(self._checked, credentials)

    def _checked(
        self, verdict: TokenCheck, credentials: BearerTokenCredentials
    ) -> Challenge | Authenticate:
        if verdict.refused is not None:
            self._refused = credentials
            return Challenge(self._error_json(verdict.refused))
        self._over = True
        # Accepted (or not checkable now): the login decides, with the
        # canonical name for the log when the token told it.
        return Authenticate(credentials, verdict.user or credentials.username)


def _is_utf8(value: bytes) -> bool:
    # Not pop3d.wire's: SASL mechanisms know nothing of POP3 (see pop3d.sasl).
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
