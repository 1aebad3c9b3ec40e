"""
The POP3 session state machine (RFC 1939 sections 3-7, RFC 2449).

Every legal (state, command) pair is listed once, in `_TABLE`; a
command that is not there is answered ``-ERR`` without running any code
chosen by the client.  The session knows nothing about transports: it takes
command lines and returns replies (or Deferreds of replies), and the
`pop3d.protocol` adapter puts them on the wire.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from twisted.cred.credentials import (
    ICredentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pop3d.credentials import PreparedUsernamePassword
from pop3d.errors import LoginDelayed, MaildropLocked, MaildropUnavailable, POP3Error
from pop3d.expire import expired_messages
from pop3d.i18n import BUILTIN_LANGUAGES, Languages, Wording
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    SASLError,
)
from pop3d.saslprep import SASLprepError, prepare_credential
from pop3d.stores.interfaces import IMaildrop, IMessageBody, ISeenFlags, MessageList
from pop3d.throttle import FailureDelay
from pop3d.wire import (
    BAD_UTF8,
    NO_WORKAROUNDS,
    ClientWorkarounds,
    Command,
    MalformedCommand,
    MessageEncoder,
    ResponseCode,
    SASLCancel,
    Status,
    Text,
    UnknownCommand,
    Verb,
    decode_base64,
    is_utf8,
    parse_command,
    parse_line_count,
    parse_message_number,
    parse_sasl_response,
)

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorTime


class State(enum.Enum):
    """The session states of RFC 1939 section 3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# Texts of the replies, named so that each is written once (tests compare
# the literal bytes a client sees, not these names).
GREETING = "pop3d ready"
USER_ACCEPTED = "send PASS"
LOGIN_FAILED = "invalid user name or password"
BYE = "bye"
UNKNOWN_COMMAND = "unknown command"
WRONG_STATE = "command not valid in this state"
TOO_MANY_BAD_COMMANDS = "too many bad commands, closing connection"
LINE_TOO_LONG = "line too long"
NO_SUCH_MESSAGE = "no such message"
ALREADY_DELETED = "message already deleted"
INTERNAL_ERROR = "internal server error, try again later"
PASS_WITHOUT_USER = "send USER first"  # noqa: S105
APOP_UNAVAILABLE = "APOP is not available"
PLAINTEXT_DISALLOWED = "plaintext authentication disallowed on non-secure connections"
UNKNOWN_MECHANISM = "unsupported authentication mechanism"
AUTH_CANCELLED = "authentication cancelled"
INVALID_BASE64 = "invalid base64"
MECHANISMS_FOLLOW = "available authentication mechanisms"
STLS_UNAVAILABLE = "STLS is not available"
TLS_ALREADY_ACTIVE = "TLS is already active"
BEGIN_TLS = "begin TLS negotiation"
CAPABILITIES_FOLLOW = "capability list follows"
TOP_FOLLOWS = "top of message follows"
UIDL_FOLLOWS = "unique-id listing follows"
# RFC 6856.  A text with {placeholders} is the message id of a `Text`.
UTF8_ENABLED = "UTF-8 mode enabled"
STLS_AFTER_UTF8 = "STLS is not allowed after UTF8"
LANGUAGES_FOLLOW = "language listing follows"
#: RFC 6856 section 3.2: "+OK", the tag chosen, then the text.
LANGUAGE_CHANGED = "{tag} language changed"
NO_SUCH_LANGUAGE = "language {range} is not available"
INVALID_USER_NAME = "the user name contains characters that are not allowed"
INVALID_PASSWORD = "the password contains characters that are not allowed"  # noqa: S105


@dataclass(frozen=True)
class Listing:
    """
    A multi-line response whose lines are known in advance (CAPA, LIST,
    UIDL): ``lines`` without line endings, then ``formatted``, lines already
    byte-stuffed and ending in CRLF.
    """

    status: Status
    lines: list[bytes]
    formatted: bytes = b""


@dataclass(frozen=True)
class MessageStream:
    """A multi-line response carrying a stored message (RETR, TOP)."""

    status: Status
    body: IMessageBody
    encoder: MessageEncoder
    #: RETR's announced size: a message that turns out shorter (truncated by
    #: another program meanwhile) must not end as if it were complete.
    expected_size: int | None = None


@dataclass(frozen=True)
class Hangup:
    """A final response, after which the connection is closed."""

    status: Status


@dataclass(frozen=True)
class SASLContinuation:
    """A SASL challenge: ``+ base64`` (RFC 5034 section 4)."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Answer STLS, then begin the TLS handshake (RFC 2595 section 4)."""

    status: Status


Reply = Status | Listing | MessageStream | Hangup | SASLContinuation | StartTLS


@dataclass(frozen=True, slots=True)
class Link:
    """What the session knows of the connection it runs on."""

    #: host:port of the client (behind a PROXY-protocol proxy, the real one).
    peer: str
    #: The client's host alone, for per-peer accounting.
    host: str
    #: TLS is in use (implicit TLS or after STLS).
    secure: bool
    #: The client is on this machine (loopback address or UNIX socket).
    local: bool


@dataclass(frozen=True)
class SessionPolicy:
    """The knobs of a session that a server administrator may turn."""

    implementation: str = "pop3d"
    #: Like Dovecot: a client that keeps sending nonsense is disconnected.
    max_bad_commands_before_login: int = 3
    max_bad_commands_after_login: int = 20
    #: Failed logins (PASS, APOP) on one connection before it is closed.
    max_failed_logins: int = 3
    #: RFC 2595 section 2.3, RFC 8314 section 4.1: logins that send the
    #: password itself (USER/PASS, SASL PLAIN and LOGIN) are refused on a
    #: connection that is neither encrypted nor local, unless this is True.
    allow_plaintext_auth: bool = False
    #: What RETR and TOP send differently for clients that need it
    #: (Dovecot's pop3_client_workarounds); none by default.
    client_workarounds: ClientWorkarounds = NO_WORKAROUNDS
    #: RFC 2449 section 6.5: seconds between a user's logins, announced in
    #: CAPA (None: no LOGIN-DELAY).  Enforced by
    #: `pop3d.logindelay.LoginDelayRealm`, which must be given the same value.
    login_delay: int | None = None
    #: RFC 2449 section 6.7: days a message is kept after its first RETR
    #: (None: EXPIRE NEVER; 0: retrieved messages are deleted at QUIT).
    #: Days of 1 or more need a maildrop with `pop3d.stores.interfaces.IRetrievalTimes`.
    expire_days: int | None = None


DEFAULT_POLICY = SessionPolicy()
# Shared by every session that has marked no message.
_NONE: frozenset[int] = frozenset()
_NO_MESSAGES = MessageList()

_T = TypeVar("_T")


def _settled(deferred: Deferred[_T]) -> _T | Deferred[_T]:
    """
    The result of a Deferred that has already succeeded, else the Deferred.
    Most replies are ready at once (in-memory checkers, cached listings):
    returned as they are, they skip the protocol's callback chain.
    """
    results: list[object] = []

    def keep(result: object) -> object:
        results.append(result)
        return result

    deferred.addBoth(keep)
    if results and not isinstance(results[0], Failure):
        return cast(_T, results[0])
    return deferred


@dataclass(slots=True)
class SessionCounters:
    """What a session did, for the log line written when it ends."""

    method: str = ""
    retrieved_messages: int = 0
    retrieved_octets: int = 0
    deleted_messages: int = 0
    deleted_octets: int = 0


class _BadCommand(Exception):
    """A syntax error in a command: answered -ERR and counted as abuse."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    The credentials of an APOP command (RFC 1939 section 7): the digest
    is MD5 of the greeting's timestamp followed by the shared secret.
    """

    def __init__(self, challenge: bytes, username: bytes, digest: bytes) -> None:
        self.challenge = challenge
        self.username = username
        self.digest = digest

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        # RFC 6856 section 2.2: the secret of the digest is SASLprep'd as a
        # stored string; one SASLprep refuses is used as it is.
        try:
            password = prepare_credential(password, stored=True)
        except SASLprepError:
            pass
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())


def _is_md5_hex(value: bytes) -> bool:
    return len(value) == 32 and all(c in b"0123456789abcdefABCDEF" for c in value)


def _prepared(value: bytes, refusal: str) -> bytes:
    """
    A user name or password as the checkers see it: SASLprep for UTF-8
    (RFC 6856 section 2.2, "query" strings); ``refusal`` for what it refuses.
    """
    try:
        return prepare_credential(value)
    except SASLprepError:
        raise _BadCommand(refusal) from None


Handler = Callable[["Session", Command], "Reply | Deferred[Reply]"]


class Session:
    """
    One POP3 conversation, from greeting to UPDATE.

    ``apop_challenge`` is the timestamp of the greeting, or None when the
    portal cannot verify APOP (then the greeting carries none).
    """

    log = Logger()

    def __init__(
        self,
        portal: Portal,
        *,
        apop_challenge: bytes | None,
        link: Callable[[], Link],
        failure_delay: FailureDelay | None = None,
        policy: SessionPolicy = DEFAULT_POLICY,
        mechanisms: Sequence[ISASLMechanism] = (),
        tls_available: bool = False,
        hostname: str = "localhost",
        clock: IReactorTime | None = None,
        languages: Languages = BUILTIN_LANGUAGES,
    ) -> None:
        self._portal = portal
        self._apop_challenge = apop_challenge
        self._link = link
        self._mechanisms = mechanisms
        self._tls_available = tls_available
        self._hostname = hostname
        self._clock = clock
        if policy.expire_days and clock is None:
            raise ValueError("EXPIRE with a number of days needs a clock")
        self._sasl: _SASLInProgress | None = None
        self._policy = policy
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.counters = SessionCounters()
        self._pending_user: bytes | None = None
        self._maildrop: IMaildrop | None = None
        self._messages = _NO_MESSAGES
        # Marked by DELE; nothing is removed before UPDATE (RFC 1939 section 6).
        # Most sessions delete and retrieve nothing (and an idle session
        # should cost little): no set until they do.
        self._deleted: set[int] | frozenset[int] = _NONE
        # The octets of the whole snapshot, summed once.
        self._all_octets: int | None = None
        # Sent with RETR (not TOP), for stores that record what was read.
        self._retrieved: set[int] | frozenset[int] = _NONE
        self._bad_commands = 0
        self._failed_logins = 0
        self._failure_delay = failure_delay
        self._logout: Callable[[], None] | None = None
        self._disconnected = False
        self._languages = languages
        #: How replies are worded (RFC 6856): None until LANG or UTF8, for
        #: the English, ASCII-only texts of RFC 1939.
        self.wording: Wording | None = None
        #: The client sent UTF8 (RFC 6856 section 2.1).
        self.utf8 = False

    @property
    def link(self) -> Link:
        """
        The connection, asked of the transport each time: behind a
        PROXY-protocol wrapper (haproxy: endpoints) the real client is known
        only after the connection was made, and STLS makes it secure.
        """
        return self._link()

    @property
    def peer(self) -> str:
        return self.link.peer

    # -- entry points used by the protocol adapter -------------------------

    def greeting(self) -> Status:
        text = GREETING
        if self._apop_challenge is not None:
            text += " " + self._apop_challenge.decode("ascii")
        return Status(True, text)

    def handle_line(self, line: bytes) -> Reply | Deferred[Reply]:
        """Answer one command line (without its line ending)."""
        if self._sasl is not None:
            return self._sasl_response(line)
        command = parse_command(line)
        if isinstance(command, UnknownCommand):
            return self._bad_command(UNKNOWN_COMMAND)
        if isinstance(command, MalformedCommand):
            return self._bad_command(command.reason)
        handler = _TABLE.get((self.state, command.verb))
        if handler is None:
            return self._bad_command(WRONG_STATE)
        try:
            result = handler(self, command)
        except _BadCommand as bad:
            return self._bad_command(bad.text)
        except POP3Error as error:
            self._bad_commands = 0
            return error.status()
        # A command that was accepted (whatever its answer) ends a run of
        # bad ones: the limit is on rejected commands in a row.
        self._bad_commands = 0
        if isinstance(result, Deferred):
            return result.addErrback(_status_of_pop3_error)
        return result

    def line_too_long(self) -> Reply:
        """A command line over the limit was received and discarded."""
        return self._bad_command(LINE_TOO_LONG)

    def connection_lost(self) -> None:
        """
        The connection ended.  Outside UPDATE nothing is deleted (RFC 1939
        section 6: only QUIT enters UPDATE); the lock is released.  (An
        UPDATE under way releases it when it ends, whatever happens.)
        """
        self._disconnected = True
        if self.state is State.AUTHORIZATION:
            self.log.info(
                "disconnected before login: peer={peer} failed_logins={failed}",
                peer=self.peer,
                failed=self._failed_logins,
            )
        elif self.state is State.TRANSACTION:
            self._log_session_end("ended without QUIT, nothing deleted")
            self._release()

    # -- helpers --------------------------------------------------------------

    def _log_session_end(self, outcome: str) -> None:
        counters = self.counters
        # Rendered here, once: twisted.logger's formatter costs more than
        # the rest of a short session's work.  The fields stay in the event.
        summary = (
            f"{outcome}: user={self.user} peer={self.peer} method={counters.method}"
            f" retrieved={counters.retrieved_messages} ({counters.retrieved_octets} octets)"
            f" deleted={counters.deleted_messages} ({counters.deleted_octets} octets)"
        )
        self.log.info(
            "session {summary}",
            summary=summary,
            outcome=outcome,
            user=self.user,
            peer=self.peer,
            method=counters.method,
            retrieved_messages=counters.retrieved_messages,
            retrieved_octets=counters.retrieved_octets,
            deleted_messages=counters.deleted_messages,
            deleted_octets=counters.deleted_octets,
        )

    def _bad_command(self, text: str | Text) -> Reply:
        self._bad_commands += 1
        limit = (
            self._policy.max_bad_commands_before_login
            if self.state is State.AUTHORIZATION
            else self._policy.max_bad_commands_after_login
        )
        if self._bad_commands >= limit:
            self.log.info(
                "closing connection from {peer} after {count} bad commands",
                peer=self.peer,
                count=self._bad_commands,
            )
            return Hangup(Status(False, TOO_MANY_BAD_COMMANDS))
        return Status(False, text)

    def capabilities(self) -> list[bytes]:
        """
        The CAPA lines for the current state (RFC 2449 section 5: whatever
        is announced before login is announced after it too).
        """
        lines = [b"TOP", b"UIDL"]
        if self._user_pass_offered():
            lines.append(b"USER")
        lines += [b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", _expire_capability(self._policy)]
        if self._policy.login_delay is not None:
            # One delay for every user: the same value in both states, no "USER".
            lines.append(b"LOGIN-DELAY %d" % self._policy.login_delay)
        mechanisms = self._offered_mechanisms()
        if mechanisms:
            lines.append(b" ".join([b"SASL", *(m.name for m in mechanisms)]))
        # RFC 6856: UTF-8 user names and passwords before UTF8 too (section
        # 2.2: PASS always took them); LANG in both states (section 3.1).
        lines += [b"UTF8 USER", b"LANG"]
        link = self.link
        stls_possible = self._tls_available and not link.secure and not self.utf8
        if self.state is State.AUTHORIZATION and stls_possible:
            lines.append(b"STLS")
        if self.state is State.TRANSACTION:
            lines.append(b"IMPLEMENTATION " + self._policy.implementation.encode("ascii"))
        return lines

    def _plaintext_allowed(self) -> bool:
        link = self.link
        return link.secure or link.local or self._policy.allow_plaintext_auth

    def _user_pass_offered(self) -> bool:
        offered = IUsernamePassword in self._portal.listCredentialsInterfaces()
        return offered and self._plaintext_allowed()

    def _offered_mechanisms(self) -> list[ISASLMechanism]:
        plaintext = self._plaintext_allowed()
        return [
            m
            for m in self._mechanisms
            if m.usable(self._portal) and (plaintext or not m.sends_password)
        ]

    def _maildrop_summary(self) -> Text:
        count, octets = self._totals()
        return Text.of(
            "maildrop has {count} messages ({octets} octets)", count=count, octets=octets
        )

    def _totals(self) -> tuple[int, int]:
        assert self._maildrop is not None
        sizes = self._messages.sizes
        if self._all_octets is None:
            self._all_octets = sum(sizes)
        deleted_octets = sum(sizes[i] for i in self._deleted)
        return len(sizes) - len(self._deleted), self._all_octets - deleted_octets

    def _message_index(self, argument: bytes) -> int:
        """The snapshot index of a message-number argument that is not deleted."""
        number = parse_message_number(argument)
        if number is None:
            raise _BadCommand("invalid message number")
        assert self._maildrop is not None
        index = number - 1
        if index >= len(self._messages) or index in self._deleted:
            raise POP3Error(NO_SUCH_MESSAGE)
        return index

    def _release(self) -> None:
        maildrop, self._maildrop = self._maildrop, None
        logout, self._logout = self._logout, None
        if maildrop is not None:
            maybeDeferred(maildrop.close).addErrback(
                lambda failure: self.log.failure("releasing maildrop failed", failure)
            )
        if logout is not None:
            logout()

    # -- AUTHORIZATION (RFC 1939 section 4, section 7 for APOP) ---------------

    def _user(self, command: Command) -> Reply:
        if IUsernamePassword not in self._portal.listCredentialsInterfaces():
            return Status(False, "USER/PASS is not available")
        if not self._plaintext_allowed():
            return Status(False, PLAINTEXT_DISALLOWED, ResponseCode.AUTH)
        # Refused now if SASLprep prohibits it; kept as sent (see PASS).
        _prepared(command.arguments[0], INVALID_USER_NAME)
        self._pending_user = command.arguments[0]
        return Status(True, USER_ACCEPTED)

    def _pass(self, command: Command) -> Reply | Deferred[Reply]:
        if self._pending_user is None:
            raise _BadCommand(PASS_WITHOUT_USER)
        username, self._pending_user = self._pending_user, None
        password = command.arguments[0]
        if self.utf8 and not is_utf8(password):
            # RFC 6856 section 2.2; before UTF8, legacy octets pass as they are.
            raise _BadCommand(BAD_UTF8)
        try:
            credentials = PreparedUsernamePassword(username, password)
        except SASLprepError:
            raise _BadCommand(INVALID_PASSWORD) from None
        return self._login(credentials, credentials.username, "USER")

    def _apop(self, command: Command) -> Reply | Deferred[Reply]:
        if self._apop_challenge is None:
            return Status(False, APOP_UNAVAILABLE)
        if not _is_md5_hex(command.arguments[1]):
            raise _BadCommand("APOP takes a name and an MD5 digest")
        username, digest = command.arguments
        username = _prepared(username, INVALID_USER_NAME)
        self._pending_user = None
        credentials = APOPCredentials(self._apop_challenge, username, digest)
        return self._login(credentials, username, "APOP")

    def _login(
        self, credentials: ICredentials, username: bytes, method: str
    ) -> Reply | Deferred[Reply]:
        shown_user = username.decode("utf-8", "replace")
        attempt = self._portal.login(credentials, None, IMaildrop)

        def succeeded(result: tuple[type[Interface], object, Callable[[], None]]) -> Reply:
            _, avatar, logout = result
            self._maildrop = IMaildrop(avatar)
            listed = self._maildrop.messages
            # A store written against the older contract (a list of
            # MessageInfo) still works: its list is converted once.
            self._messages = listed if isinstance(listed, MessageList) else MessageList.of(listed)
            self._logout = logout
            if self._disconnected:
                self._release()
                return Status(False, BYE)
            self.user = shown_user
            self.state = State.TRANSACTION
            self._bad_commands = 0
            # One line per session, when it ends (see _log_session_end).
            self.counters.method = method
            return Status(True, self._maildrop_summary())

        def failed(failure: Failure) -> Reply | Deferred[Reply]:
            reason, status = _login_failure_status(failure)
            if reason == "internal":
                self.log.failure(
                    "login of {user} from {peer} failed unexpectedly",
                    failure,
                    user=shown_user,
                    peer=self.peer,
                )
            else:
                self.log.info(
                    "login failed: user={user} peer={peer} method={method} reason={reason}",
                    user=shown_user,
                    peer=self.peer,
                    method=method,
                    reason=reason,
                )
            if reason != "credentials":
                return status
            return self._answer_failed_login(status, credentials)

        return _settled(attempt.addCallbacks(succeeded, failed))

    def _auth(self, command: Command) -> Reply | Deferred[Reply]:
        """RFC 5034 section 4; with no argument, the mechanisms (as Outlook expects)."""
        if not command.arguments:
            names = [m.name for m in self._offered_mechanisms()]
            return Listing(Status(True, MECHANISMS_FOLLOW), names)
        name = command.arguments[0].upper()
        mechanism = next((m for m in self._offered_mechanisms() if m.name == name), None)
        if mechanism is None:
            refused = any(m.name == name and m.sends_password for m in self._mechanisms)
            if refused and not self._plaintext_allowed():
                return Status(False, PLAINTEXT_DISALLOWED, ResponseCode.AUTH)
            return Status(False, UNKNOWN_MECHANISM)
        initial: bytes | None = None
        if len(command.arguments) == 2:
            # "=" is an empty initial response (RFC 5034 section 4).
            argument = command.arguments[1]
            initial = b"" if argument == b"=" else decode_base64(argument)
            if initial is None:
                return Status(False, INVALID_BASE64)
        self._pending_user = None
        context = ExchangeContext(
            self._portal, self._hostname, self._clock.seconds() if self._clock else 0.0
        )
        self._sasl = _SASLInProgress(mechanism.name, mechanism.start(context))
        return self._sasl_step(initial)

    def _sasl_response(self, line: bytes) -> Reply | Deferred[Reply]:
        """A line answering a SASL challenge: base64, or "*" to cancel."""
        response = parse_sasl_response(line)
        if isinstance(response, SASLCancel):
            self._sasl = None
            return Status(False, AUTH_CANCELLED)
        if response is None:
            self._sasl = None
            return Status(False, INVALID_BASE64)
        return self._sasl_step(response)

    def _sasl_step(self, response: bytes | None) -> Deferred[Reply]:
        sasl = self._sasl
        assert sasl is not None

        def stepped(result: Challenge | Authenticate) -> Reply | Deferred[Reply]:
            if isinstance(result, Challenge):
                return SASLContinuation(result.data)
            self._sasl = None
            method = "SASL " + sasl.name.decode("ascii", "replace")
            return self._login(result.credentials, result.username, method)

        def refused(failure: Failure) -> Reply:
            # After a failure the session is as if AUTH never happened.
            self._sasl = None
            failure.trap(SASLError)
            error = failure.value
            assert isinstance(error, SASLError)
            return error.status()

        step: Deferred[Challenge | Authenticate] = maybeDeferred(sasl.exchange.step, response)
        return step.addCallbacks(stepped, refused)

    def _stls(self, command: Command) -> Reply:
        """RFC 2595 section 4: only before login, only while TLS is off."""
        if not self._tls_available:
            return Status(False, STLS_UNAVAILABLE)
        if self.link.secure:
            return Status(False, TLS_ALREADY_ACTIVE)
        if self.utf8:
            # RFC 6856 section 2.1: clients MUST NOT; servers MAY refuse.
            return Status(False, STLS_AFTER_UTF8)
        # Nothing said before the handshake carries over (RFC 2595 section 4),
        # not even a LANG a man in the middle may have slipped in (RFC 6856
        # section 7).
        self._pending_user = None
        self.wording = None
        return StartTLS(Status(True, BEGIN_TLS))

    def _answer_failed_login(
        self, status: Status, credentials: ICredentials
    ) -> Reply | Deferred[Reply]:
        """
        A wrong password (or unknown user: the same answer, after the same
        wait) is answered late, and the connection is closed after a few;
        the throttle recognises a retry of the same ``credentials``, and
        exempts trusted networks from both.
        """
        self._failed_logins += 1
        reply: Reply = status
        throttle, host = self._failure_delay, self.link.host
        trusted = throttle is not None and throttle.trusts(host)
        if self._failed_logins >= self._policy.max_failed_logins and not trusted:
            reply = Hangup(status)
        if throttle is None:
            return reply
        delay = throttle.delay_for_failure(host, credentials)
        return throttle.wait(delay).addCallback(lambda _: reply)

    def _quit_unauthenticated(self, command: Command) -> Reply:
        return Hangup(Status(True, BYE))

    def _utf8(self, command: Command) -> Reply:
        """RFC 6856 section 2.1: UTF-8 mode, for the rest of the session."""
        self.utf8 = True
        language = self._languages.english if self.wording is None else self.wording.language
        self.wording = Wording(language, utf8=True)
        return Status(True, UTF8_ENABLED)

    def _lang(self, command: Command) -> Reply:
        """
        RFC 6856 section 3: without an argument the languages, one
        "tag description" line each; with a language range, the texts of
        this and every later reply in the language chosen, which are UTF-8
        from now on.  A language not offered changes nothing.
        """
        languages = self._languages
        if not command.arguments:
            listing = [f"{each.tag} {each.name}".encode() for each in languages.all]
            return Listing(Status(True, LANGUAGES_FOLLOW), listing)
        language_range = command.arguments[0].decode("ascii")
        chosen = languages.lookup(language_range)
        if chosen is None:
            return Status(False, Text.of(NO_SUCH_LANGUAGE, range=language_range))
        self.wording = Wording(chosen, utf8=True)
        return Status(True, Text.of(LANGUAGE_CHANGED, tag=chosen.tag))

    # -- TRANSACTION (RFC 1939 section 5, optional commands of section 7) -----

    def _stat(self, command: Command) -> Reply:
        count, octets = self._totals()
        return Status(True, f"{count} {octets}")

    def _list(self, command: Command) -> Reply:
        count, octets = self._totals()
        return self._scan_listing(
            command,
            self._messages.sizes,
            Status(True, Text.of("{count} messages ({octets} octets)", count=count, octets=octets)),
        )

    def _uidl(self, command: Command) -> Reply:
        return self._scan_listing(command, self._messages.uids, Status(True, UIDL_FOLLOWS))

    def _scan_listing(
        self, command: Command, values: Sequence[int] | Sequence[str], heading: Status
    ) -> Reply:
        """
        LIST and UIDL (RFC 1939 sections 5, 7): one "number value" line for
        the message asked for, or for every message not marked as deleted.
        """
        if command.arguments:
            index = self._message_index(command.arguments[0])
            return Status(True, f"{index + 1} {values[index]}")
        deleted = self._deleted
        # One string for the whole listing (100,000 lines in a few ms); no
        # line starts with ".", so none needs byte-stuffing.
        lines = [f"{number} {value}\r\n" for number, value in enumerate(values, 1)]
        if deleted:
            lines = [line for index, line in enumerate(lines) if index not in deleted]
        return Listing(heading, [], "".join(lines).encode("ascii"))

    def _retr(self, command: Command) -> Reply | Deferred[Reply]:
        index = self._message_index(command.arguments[0])
        return self._stream(index, Status(True, f"{self._size(index)} octets"), None)

    def _top(self, command: Command) -> Reply | Deferred[Reply]:
        lines = parse_line_count(command.arguments[1])
        if lines is None:
            raise _BadCommand("invalid line count")
        index = self._message_index(command.arguments[0])
        return self._stream(index, Status(True, TOP_FOLLOWS), lines)

    def _size(self, index: int) -> int:
        assert self._maildrop is not None
        return self._messages.sizes[index]

    def _stream(
        self, index: int, status: Status, body_lines: int | None
    ) -> Reply | Deferred[Reply]:
        assert self._maildrop is not None

        def opened(body: IMessageBody) -> Reply:
            if body_lines is None:
                if isinstance(self._retrieved, frozenset):
                    self._retrieved = set()
                self._retrieved.add(index)
                self.counters.retrieved_messages += 1
                self.counters.retrieved_octets += self._size(index)
            expected = self._size(index) if body_lines is None else None
            encoder = MessageEncoder(body_lines, self._policy.client_workarounds)
            return MessageStream(status, body, encoder, expected)

        return _settled(maybeDeferred(self._maildrop.open_message, index).addCallback(opened))

    def _dele(self, command: Command) -> Reply:
        number = parse_message_number(command.arguments[0])
        if number is not None and number - 1 in self._deleted:
            return Status(False, ALREADY_DELETED)
        index = self._message_index(command.arguments[0])
        if isinstance(self._deleted, frozenset):
            self._deleted = set()
        self._deleted.add(index)
        return Status(True, Text.of("message {number} deleted", number=index + 1))

    def _noop(self, command: Command) -> Reply:
        return Status(True)

    def _rset(self, command: Command) -> Reply:
        self._deleted = _NONE
        return Status(True, self._maildrop_summary())

    def _capa(self, command: Command) -> Reply:
        return Listing(Status(True, CAPABILITIES_FOLLOW), self.capabilities())

    # -- UPDATE (RFC 1939 section 6) ---------------------------------------

    def _quit_update(self, command: Command) -> Reply | Deferred[Reply]:
        assert self._maildrop is not None
        self.state = State.UPDATE
        maildrop = self._maildrop
        implied = _settled(self._expired(maildrop))
        if isinstance(implied, Deferred):
            return implied.addCallback(lambda expired: self._update(maildrop, expired))
        return self._update(maildrop, implied)

    def _expired(self, maildrop: IMaildrop) -> Deferred[frozenset[int]]:
        """
        RFC 2449 section 6.7: the messages the EXPIRE policy deletes in this
        UPDATE besides those marked with DELE.  EXPIRE 0: an implicit DELE of
        every message sent with RETR (not TOP).
        """
        days = self._policy.expire_days
        if days is None:
            return succeed(_NONE)
        if days == 0:
            return succeed(frozenset(self._retrieved))
        assert self._clock is not None
        kept = self._retrieved - self._deleted
        return expired_messages(maildrop, kept, days=days, now=self._clock.seconds())

    def _update(self, maildrop: IMaildrop, expired: frozenset[int]) -> Reply | Deferred[Reply]:
        doomed_set = self._deleted | expired if expired else self._deleted
        doomed = sorted(doomed_set)
        doomed_octets = sum(self._messages.sizes[i] for i in doomed)
        removal: Deferred[None] = (
            maybeDeferred(maildrop.remove, doomed) if doomed else succeed(None)
        )

        def removed(_: None) -> Reply:
            self.counters.deleted_messages = len(doomed)
            self.counters.deleted_octets = doomed_octets
            return Hangup(Status(True, BYE))

        def not_removed(failure: Failure) -> Reply:
            if failure.check(POP3Error):
                error = failure.value
                assert isinstance(error, POP3Error)
                self.log.warn(
                    "UPDATE for {user} incomplete: {reason}", user=self.user, reason=error.text
                )
                return Hangup(error.status())
            self.log.failure("UPDATE for {user} failed", failure, user=self.user)
            return Hangup(Status(False, INTERNAL_ERROR, ResponseCode.SYS_TEMP))

        def seen_marked(reply: Reply) -> Reply | Deferred[Reply]:
            seen_flags = ISeenFlags(maildrop, None)
            if seen_flags is None:
                return reply
            every = range(len(self._messages))
            kept = [i for i in every if i not in doomed_set] if doomed_set else every
            retrieved = sorted(self._retrieved - doomed_set) if self._retrieved else []
            marking: Deferred[None] = maybeDeferred(seen_flags.mark_seen, retrieved, kept)
            settled: Deferred[None] | None = _settled(marking)
            if settled is None:
                return reply  # nothing to wait for (usually nothing to mark)
            marking.addErrback(lambda f: self.log.failure("marking messages seen failed", f))
            return marking.addCallback(lambda _: reply)

        def logged_out(reply: Reply) -> Reply:
            self._log_session_end("logged out")
            self._release()
            return reply

        outcome: Deferred[Reply] = removal.addCallback(removed)
        outcome.addErrback(not_removed)
        outcome.addCallback(seen_marked)
        outcome.addCallback(logged_out)
        return _settled(outcome)


# Every legal (state, command) pair, and who answers it: the whole protocol.
_TABLE: dict[tuple[State, Verb], Handler] = {
    (State.AUTHORIZATION, Verb.USER): Session._user,
    (State.AUTHORIZATION, Verb.PASS): Session._pass,
    (State.AUTHORIZATION, Verb.APOP): Session._apop,
    (State.AUTHORIZATION, Verb.CAPA): Session._capa,
    (State.AUTHORIZATION, Verb.QUIT): Session._quit_unauthenticated,
    (State.AUTHORIZATION, Verb.AUTH): Session._auth,
    (State.AUTHORIZATION, Verb.STLS): Session._stls,
    (State.AUTHORIZATION, Verb.UTF8): Session._utf8,
    (State.AUTHORIZATION, Verb.LANG): Session._lang,
    (State.TRANSACTION, Verb.STAT): Session._stat,
    (State.TRANSACTION, Verb.LIST): Session._list,
    (State.TRANSACTION, Verb.RETR): Session._retr,
    (State.TRANSACTION, Verb.DELE): Session._dele,
    (State.TRANSACTION, Verb.NOOP): Session._noop,
    (State.TRANSACTION, Verb.RSET): Session._rset,
    (State.TRANSACTION, Verb.TOP): Session._top,
    (State.TRANSACTION, Verb.UIDL): Session._uidl,
    (State.TRANSACTION, Verb.CAPA): Session._capa,
    (State.TRANSACTION, Verb.QUIT): Session._quit_update,
    (State.TRANSACTION, Verb.LANG): Session._lang,
}


@dataclass(frozen=True)
class _SASLInProgress:
    name: bytes
    exchange: ISASLExchange


def _expire_capability(policy: SessionPolicy) -> bytes:
    """One policy for every user: the same line in both states, no "USER"."""
    if policy.expire_days is None:
        return b"EXPIRE NEVER"
    return b"EXPIRE %d" % policy.expire_days


def _login_failure_status(failure: Failure) -> tuple[str, Status]:
    """Why a login failed (for the log) and what the client is told."""
    if failure.check(UnauthorizedLogin, LoginFailed):
        return "credentials", Status(False, LOGIN_FAILED, ResponseCode.AUTH)
    if failure.check(MaildropLocked):
        error = failure.value
        assert isinstance(error, POP3Error)
        return "in-use", error.status()
    if failure.check(MaildropUnavailable):
        error = failure.value
        assert isinstance(error, POP3Error)
        return "unavailable: " + error.text, error.status()
    if failure.check(LoginDelayed):
        # Not a failed login: neither counted nor made to wait.
        error = failure.value
        assert isinstance(error, POP3Error)
        return "login-delay", error.status()
    return "internal", Status(False, INTERNAL_ERROR, ResponseCode.SYS_TEMP)


def _status_of_pop3_error(failure: Failure) -> Status:
    """A typed failure becomes its -ERR line; any other failure passes on."""
    failure.trap(POP3Error)
    error = failure.value
    assert isinstance(error, POP3Error)
    return error.status()
