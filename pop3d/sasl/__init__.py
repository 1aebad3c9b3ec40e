"""
SASL for the POP3 AUTH command (RFC 5034, RFC 4422): the contract between
the session and the mechanisms, one module per mechanism.

A mechanism turns the client's responses into twisted.cred credentials; the
portal's checkers do the checking, as for USER/PASS and APOP.  A third party
adds a mechanism (OAUTHBEARER, say) by implementing `ISASLMechanism` and
passing it to `pop3d.POP3Factory` (``mechanisms=``); nothing in the protocol
changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword
from zope.interface import Attribute, Interface

from pop3d.errors import POP3Error

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class Challenge:
    """Send ``data`` to the client (base64-encoded by the session) and wait."""

    data: bytes


@dataclass(frozen=True)
class Authenticate:
    """The exchange is complete: log ``username`` in with ``credentials``."""

    credentials: ICredentials
    username: bytes


class SASLError(POP3Error):
    """The client broke the mechanism's rules (bad encoding, wrong fields)."""


@dataclass(frozen=True)
class ExchangeContext:
    """What a mechanism may need to know about the session it serves."""

    portal: Portal
    #: Host name for challenges (CRAM-MD5's msg-id, say).
    hostname: str
    #: Seconds since the epoch, from the injected clock.
    now: float


class ISASLExchange(Interface):
    """One run of a mechanism, from AUTH to success or failure."""

    def step(response: bytes | None) -> Deferred[Challenge | Authenticate]:
        """
        Take the client's next response, decoded (None when AUTH carried no
        initial response) and answer with a `Challenge` or, at the end, an
        `Authenticate`.  Fails with `SASLError` for a malformed response.
        """


class ISASLMechanism(Interface):
    """A SASL mechanism the server can offer."""

    name: bytes = Attribute("The mechanism name, upper case, e.g. b'PLAIN'.")
    sends_password: bool = Attribute(
        "True if the client sends the password itself (PLAIN, LOGIN): such a "
        "mechanism is only offered where plaintext logins are allowed "
        "(RFC 2595 section 2.3, RFC 8314 section 4.1)."
    )

    def usable(portal: Portal) -> bool:
        """Whether the portal's checkers can verify what this mechanism yields."""

    def start(context: ExchangeContext) -> ISASLExchange:
        """Begin an exchange."""


class ICramMD5Credentials(IUsernameHashedPassword):
    """
    CRAM-MD5 (RFC 2195): ``response`` is the lower-case hex HMAC-MD5 of
    ``challenge`` keyed with the password.  ``checkPassword(password)``
    checks it against a plaintext password; a checker that stores Dovecot's
    ``{CRAM-MD5}`` HMAC context uses ``challenge`` and ``response`` directly.
    """

    challenge: bytes = Attribute("The challenge sent to the client.")
    response: bytes = Attribute("The client's digest, lower-case hex.")


@dataclass(frozen=True)
class ScramKeys:
    """A user's SCRAM-SHA-256 verifier (RFC 5802 section 3, RFC 7677)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class IScramSHA256Credentials(ICredentials):
    """The client's final SCRAM-SHA-256 message, checked against stored keys."""

    username: bytes = Attribute("The authentication identity.")

    def verify(keys: ScramKeys) -> bool:
        """Whether the client proof matches ``keys`` (constant time)."""


class IScramKeySource(Interface):
    """
    A checker that can hand out the salt and iteration count of a user
    before the client proves anything (SCRAM's server-first message).
    """

    def scram_sha256_keys(username: bytes) -> Deferred[ScramKeys | None]:
        """
        The user's keys, or None for an unknown user (the mechanism then
        answers with made-up but stable parameters, so that unknown users
        cannot be told apart).
        """
