"""
SASL (RFC 4422) mechanisms, neutral about the protocol that carries them and
about how the server checks credentials: one module per mechanism.

A mechanism turns the client's responses into twisted.cred credentials; the
server's checkers do the checking, as for USER/PASS and APOP.  A mechanism
knows neither POP3 (its failures are `SASLError`s whose `SASLFailure` the
POP3 side maps to a reply, in `pop3d.driver`) nor the portal: it is told what
the server can verify through `IVerifiers`, and asks it for what it needs
(SCRAM asks for the `IScramKeySource` of its credentials' checker).

A third party adds a mechanism (OAUTHBEARER, say) by implementing
`ISASLMechanism` and passing it to `pop3d.POP3Factory` (``mechanisms=``); its
credential type and the checker that verifies it go with it, and nothing in
pop3d changes (`pop3d.tap.build_portal` registers whatever interfaces the
checkers declare).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from zope.interface.interface import InterfaceClass


def decode_saslname(value: bytes) -> bytes | None:
    """
    A ``saslname`` unescaped, as GS2 (RFC 5801 section 4: an authzid) and
    SCRAM (RFC 5802 section 5.1: a user name) escape it: ``=2C`` is ``,``
    and ``=3D`` is ``=``; None when any other ``=`` makes it malformed.
    """
    parts = value.split(b"=")
    out = [parts[0]]
    for part in parts[1:]:
        escape, rest = part[:2], part[2:]
        if escape == b"2C":
            out.append(b"," + rest)
        elif escape == b"3D":
            out.append(b"=" + rest)
        else:
            return None
    return b"".join(out)


@dataclass(frozen=True)
class Challenge:
    """Send ``data`` to the client and wait for its response."""

    data: bytes


@dataclass(frozen=True)
class Authenticate:
    """The exchange is complete: log ``username`` in with ``credentials``."""

    credentials: ICredentials
    username: bytes


class SASLFailure(enum.Enum):
    """Why a mechanism ends an exchange, whatever the protocol that carries it."""

    #: The response breaks the mechanism's grammar (or its characters).
    MALFORMED = "malformed"
    #: The response asks for a part of the mechanism this server does not
    #: implement (SCRAM channel binding, mandatory extensions).
    UNSUPPORTED = "unsupported"
    #: A response came when the mechanism expected none (the exchange is over).
    UNEXPECTED = "unexpected"
    #: The client asks to act as another identity than the one it proves.
    NOT_AUTHORIZED = "not-authorized"


class SASLError(Exception):
    """
    A mechanism ends the exchange: ``failure`` says why, ``text`` says it in
    English for the client and the log (a message id of `pop3d.i18n`'s
    catalogues, so the POP3 side can translate it).
    """

    def __init__(self, text: str, failure: SASLFailure = SASLFailure.MALFORMED) -> None:
        super().__init__(text)
        self.text = text
        self.failure = failure


class IVerifiers(Interface):
    """
    What the server can verify, as a mechanism sees it: the credential
    types (zope interfaces) it has checks for, and those checks' add-on
    interfaces.  Asked each time: checkers may come and go.
    """

    def can_verify(credentials: InterfaceClass) -> bool:
        """
        Whether credentials providing ``credentials`` can be checked: some
        check verifies that interface or one it extends.
        """

    def lookup(credentials: InterfaceClass, wanted: InterfaceClass) -> Any:
        """
        The check for ``credentials`` as a ``wanted`` provider (e.g. SCRAM's
        `IScramKeySource`), or None if there is no such check or it does not
        provide ``wanted``.
        """


@dataclass(frozen=True)
class ExchangeContext:
    """What a mechanism may know of the exchange it runs."""

    #: What the server can verify (and the checks' add-on interfaces).
    verifiers: IVerifiers
    #: Host name for challenges (CRAM-MD5's msg-id, say).
    hostname: str
    #: Seconds since the epoch, from the injected clock.
    now: float


class ISASLExchange(Interface):
    """One run of a mechanism, from its start to success or failure."""

    def step(response: bytes | None) -> Deferred[Challenge | Authenticate]:
        """
        Take the client's next response, decoded (None when the client sent
        no initial response) and answer with a `Challenge` or, at the end,
        an `Authenticate`.  Fails with `SASLError` to end the exchange.
        """


class ISASLMechanism(Interface):
    """A SASL mechanism the server can offer."""

    name: bytes = Attribute("The mechanism name, upper case, e.g. b'PLAIN'.")
    sends_password: bool = Attribute(
        "True if the client sends the password itself (PLAIN, LOGIN): such a "
        "mechanism is only offered where plaintext logins are allowed "
        "(RFC 2595 section 2.3, RFC 8314 section 4.1)."
    )

    def usable(verifiers: IVerifiers) -> bool:
        """Whether the server can verify what this mechanism yields."""

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
