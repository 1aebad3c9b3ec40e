"""
The POP3 session state machine (RFC 1939 sections 3-7, RFC 2449, RFC 5034,
RFC 6856), with no I/O.

Like h11, the session does nothing itself and imports nothing of Twisted.
It is told what happened -- a command line from the client, or the outcome
of something it asked for -- and answers with what to do next: a reply to
send (`Reply`), or an `Action` for its driver (`pop3d.driver`) to carry out
and report back (log in, open a message, run the UPDATE plan, ...).

Every transition is in `TRANSITIONS`, one table of
(state, event) -> (who answers, next state, state if refused); an event
that is not there in the current state is refused without running any code
chosen by the client.  Sub-states are states of their own: a USER waiting
for its PASS, a SASL exchange, a login or a message being fetched, UPDATE.
"""

from __future__ import annotations

import enum
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

from pop3d.errors import POP3Error
from pop3d.i18n import BUILTIN_LANGUAGES, Languages, Wording
from pop3d.logformat import DEFAULT_LOGOUT, LogoutFormat
from pop3d.saslprep import SASLprepError, prepare_credential
from pop3d.stores.interfaces import IMessageBody, MessageList, numbered_lines
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


class State(enum.Enum):
    """
    The session states of RFC 1939 section 3, with their sub-states: while
    the session waits for its driver (a login, a message, UPDATE) no command
    is taken; the driver holds pipelined lines until the outcome is in.
    """

    #: RFC 1939 section 4: no user named yet.
    AUTHORIZATION = "AUTHORIZATION"
    #: USER was accepted: PASS may follow (RFC 1939 section 7).
    USER_GIVEN = "USER_GIVEN"
    #: A SASL mechanism is working on a response (RFC 5034 section 4).
    SASL_STEP = "SASL_STEP"
    #: A SASL challenge was sent: the next line is the client's answer.
    SASL_CHALLENGED = "SASL_CHALLENGED"
    #: The driver is checking credentials and opening the maildrop.
    LOGIN_PENDING = "LOGIN_PENDING"
    #: RFC 1939 section 5.
    TRANSACTION = "TRANSACTION"
    #: RETR or TOP: the driver is opening the message.
    OPENING_MESSAGE = "OPENING_MESSAGE"
    #: RFC 1939 section 6: the driver is carrying out the UPDATE plan.
    UPDATE = "UPDATE"
    #: The session is over (the connection is gone, or UPDATE ended).
    CLOSED = "CLOSED"

    # Looked up on every command: identity's hash, in C, not Enum's in Python.
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What happens to a session besides commands (`pop3d.wire.Verb`)."""

    #: A line answering a SASL challenge (decoded; None if not base64).
    SASL_RESPONSE = "SASL_RESPONSE"
    #: "*" instead of an answer to a SASL challenge (RFC 5034 section 4).
    SASL_CANCEL = "SASL_CANCEL"
    #: The mechanism sends a challenge.
    SASL_CHALLENGE = "SASL_CHALLENGE"
    #: The exchange is complete: credentials to log in with.
    SASL_SUCCEEDED = "SASL_SUCCEEDED"
    #: The mechanism refused the client's response.
    SASL_REFUSED = "SASL_REFUSED"
    #: The maildrop is open; its listing.
    LOGIN_SUCCEEDED = "LOGIN_SUCCEEDED"
    #: The login was refused (`LoginRefusal`).
    LOGIN_REFUSED = "LOGIN_REFUSED"
    #: The message asked for is open; its body.
    MESSAGE_OPENED = "MESSAGE_OPENED"
    #: The message asked for cannot be read; the -ERR to send.
    MESSAGE_GONE = "MESSAGE_GONE"
    #: UPDATE removed what it was to remove (the indexes removed).
    UPDATE_DONE = "UPDATE_DONE"
    #: UPDATE could not remove everything; the -ERR to send.
    UPDATE_FAILED = "UPDATE_FAILED"
    #: The client went away.
    CONNECTION_LOST = "CONNECTION_LOST"

    __hash__ = object.__hash__


# Texts of the replies, named so that each is written once (tests compare
# the literal bytes a client sees, not these names).
GREETING = "pop3d ready"
USER_ACCEPTED = "send PASS"
BYE = "bye"
UNKNOWN_COMMAND = "unknown command"
WRONG_STATE = "command not valid in this state"
TOO_MANY_BAD_COMMANDS = "too many bad commands, closing connection"
LINE_TOO_LONG = "line too long"
NO_SUCH_MESSAGE = "no such message"
ALREADY_DELETED = "message already deleted"
INTERNAL_ERROR = "internal server error, try again later"
PASS_WITHOUT_USER = "send USER first"  # noqa: S105
USER_PASS_UNAVAILABLE = "USER/PASS is not available"  # noqa: S105
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


# -- replies --------------------------------------------------------------------


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


class MessageStream:
    """
    A multi-line response carrying a stored message (RETR, TOP).

    Not a frozen dataclass as the other replies are: it is no value to
    compare or keep, but an open body and an encoder's state handed over
    once, and one is made for every RETR and TOP (measured: a frozen
    dataclass's ``__init__`` costs CPython 3.11 some 1,800 instructions a
    field, 1.3% of a RETR of 20 KB).  Its fields are `Final`: read, never set.
    """

    __slots__ = ("body", "encoder", "expected_size", "status")

    def __init__(
        self,
        status: Status,
        body: IMessageBody,
        encoder: MessageEncoder,
        expected_size: int | None = None,
    ) -> None:
        self.status: Final = status
        self.body: Final = body
        self.encoder: Final = encoder
        #: RETR's announced size: a message that turns out shorter (truncated by
        #: another program meanwhile) must not end as if it were complete.
        self.expected_size: Final = expected_size


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


# -- requests for actions -----------------------------------------------------


class Action:
    """Something the driver must do for the session (then report back)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class PasswordCredentials:
    """
    USER and PASS (RFC 1939 section 7) as the client sent them; the checkers
    get them SASLprep'd too (RFC 6856 section 2.2, `pop3d.credentials`).
    """

    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class APOPDigest:
    """APOP (RFC 1939 section 7): MD5 of ``challenge`` and the shared secret."""

    challenge: bytes
    username: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class LogIn(Action):
    """
    Check ``credentials`` (`PasswordCredentials`, `APOPDigest`, or what a SASL
    mechanism produced) and open the maildrop; report `Session.login_succeeded`
    or `Session.login_refused`.
    """

    credentials: object
    username: bytes
    #: For the log: "USER", "APOP", "SASL PLAIN", ...
    method: str


@dataclass(frozen=True, slots=True)
class StartSASL(Action):
    """
    Start ``mechanism`` and give it ``initial`` (None: AUTH carried no initial
    response); report its outcome (`Session.sasl_challenge`,
    `Session.sasl_succeeded`, `Session.sasl_refused`).
    """

    mechanism: Mechanism
    initial: bytes | None


@dataclass(frozen=True, slots=True)
class StepSASL(Action):
    """Give the running mechanism the client's ``response``; report as for `StartSASL`."""

    response: bytes


@dataclass(frozen=True, slots=True)
class OpenMessage(Action):
    """Open message ``index``; report `Session.message_opened` or `Session.message_gone`."""

    index: int


@dataclass(frozen=True, slots=True)
class RunUpdate(Action):
    """
    The UPDATE plan (RFC 1939 section 6): remove ``remove`` and, when
    ``expire_days`` is set, those of ``expire_candidates`` retrieved that
    many days ago (RFC 2449 section 6.7); then mark ``retrieved`` seen (of
    the messages left) on stores that keep the flag.  Report
    `Session.update_done` (whatever the seen flags did) or `Session.update_failed`.
    """

    remove: frozenset[int]
    expire_days: int | None
    expire_candidates: frozenset[int]
    retrieved: frozenset[int]
    message_count: int


@dataclass(frozen=True, slots=True)
class AnswerFailedLogin(Action):
    """Send ``reply`` after the failed-login delay (`pop3d.throttle`)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class EndSession(Action):
    """
    A logged-in session ended: write its one log line (``outcome`` and
    `Session.counters`), release the maildrop, then send ``reply`` if any.
    """

    outcome: str
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class ReleaseMaildrop(Action):
    """A login completed after the client left: release the maildrop, say nothing."""


@dataclass(frozen=True, slots=True)
class DisconnectedBeforeLogin(Action):
    """The client left before logging in: log it, with ``failed_logins``."""

    failed_logins: int


@dataclass(frozen=True, slots=True)
class CloseForAbuse(Action):
    """Too many bad commands in a row: log it, then send ``reply``."""

    reply: Hangup
    bad_commands: int


Outcome = Reply | Action


@dataclass(frozen=True, slots=True)
class LoginRefusal:
    """Why a login failed, as the driver found it."""

    #: What the client is told.
    status: Status
    #: A wrong password or unknown user: counted, and answered late.
    counted: bool
    #: The client is in a trusted network: never disconnected for failures.
    trusted: bool = False


# -- what the session needs to know ---------------------------------------------


class Mechanism(Protocol):
    """What the session knows of a SASL mechanism (`pop3d.sasl.ISASLMechanism`)."""

    @property
    def name(self) -> bytes: ...

    @property
    def sends_password(self) -> bool: ...


class Authentication(Protocol):
    """Which logins the server can check now (asked each time: checkers may be added)."""

    def password_logins(self) -> bool:
        """USER/PASS (and so plaintext SASL mechanisms) can be checked."""

    def usable_mechanisms(self) -> Sequence[Mechanism]:
        """The configured mechanisms whose credentials can be checked."""

    def configured_mechanisms(self) -> Sequence[Mechanism]:
        """Every configured mechanism."""


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
    #: With TLS: the protocol version and cipher negotiated (for the log).
    tls_version: str | None = None
    tls_cipher: str | None = None
    #: The server's address the client connected to (Dovecot's ``%l``).
    local_host: str | None = None


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
    #: The end of the logout line (``--logout-format``, as Dovecot's
    #: pop3_logout_format); `pop3d.driver` writes it.
    logout_format: LogoutFormat = DEFAULT_LOGOUT
    #: A user database may set ``login_delay`` and ``expire`` per user: CAPA
    #: before login announces `login_delay` as the largest delay and
    #: `expire_days` as the shortest expiry any user has, followed by
    #: ``USER`` (RFC 2449 sections 6.5 and 6.7); after login, the user's own
    #: (`Session.login_succeeded`).
    per_user: bool = False

    def for_user(
        self, login_delay: int | None, expire_days: int | None, never: bool
    ) -> SessionPolicy:
        """
        This policy with a user's own values, kept within what CAPA promised
        before login: a delay no longer than `login_delay`, an expiry no
        sooner than `expire_days` (NEVER stays NEVER).
        """
        delay = self.login_delay
        if login_delay is not None and delay is not None:
            delay = min(login_delay, delay)
        days = self.expire_days
        if days is not None:
            if never:
                days = None
            elif expire_days is not None:
                days = max(expire_days, days)
        return replace(self, login_delay=delay, expire_days=days)


DEFAULT_POLICY = SessionPolicy()
_OK = Status(True)
# The replies and the ends most sessions have, made once: a frozen
# dataclass costs some thousands of instructions to make.
_USER_ACCEPTED = Status(True, USER_ACCEPTED)
_BYE = Hangup(Status(True, BYE))
_LOGGED_OUT = EndSession("logged out", _BYE)
_ENDED_WITHOUT_QUIT = EndSession("ended without QUIT, nothing deleted", None)
# Shared by every session that has marked no message.
_NONE: frozenset[int] = frozenset()
_NO_MESSAGES = MessageList()


@dataclass(slots=True)
class SessionCounters:
    """What a session did, for the log line written when it ends."""

    method: str = ""
    retrieved_messages: int = 0
    retrieved_octets: int = 0
    deleted_messages: int = 0
    deleted_octets: int = 0
    #: TOP responses sent whole, and the octets of message they carried.
    top_messages: int = 0
    top_octets: int = 0


class SessionBusy(RuntimeError):
    """A command line reached a session waiting for its driver (a driver bug)."""


class _BadCommand(Exception):
    """A syntax error in a command: answered -ERR and counted as abuse."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Declined(Exception):
    """
    A command answered without its transition (a refusal, a listing):
    the session takes the entry's ``otherwise`` state.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self.reply = reply


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


_BEFORE_LOGIN = frozenset(
    {State.AUTHORIZATION, State.USER_GIVEN, State.SASL_STEP, State.SASL_CHALLENGED}
)
# Read on every command (or message): module globals, not attributes of
# the Enum classes (whose metaclass's __getattr__ makes each read slow).
_SASL_CHALLENGED, _MESSAGE_OPENED = State.SASL_CHALLENGED, Event.MESSAGE_OPENED
# A line can only be taken while the session waits for the client.
_TAKES_LINES = _BEFORE_LOGIN - {State.SASL_STEP} | {State.TRANSACTION}


class Session:
    """
    One POP3 conversation, from greeting to UPDATE.

    ``apop_challenge`` is the timestamp of the greeting, or None when APOP
    cannot be verified (then the greeting carries none).  ``link`` tells the
    connection as it is now (STLS makes it secure); ``authentication`` which
    logins can be checked.
    """

    # Thousands of idle sessions: no instance dictionary.
    __slots__ = (
        "_all_octets",
        "_apop_challenge",
        "_authentication",
        "_bad_commands",
        "_deleted",
        "_languages",
        "_link",
        "_login_method",
        "_messages",
        "_opening",
        "_opening_lines",
        "_opening_status",
        "_policy",
        "_retrieved",
        "_tls_available",
        "_user_policy",
        "_username",
        "counters",
        "failed_logins",
        "state",
        "user",
        "utf8",
        "wording",
    )

    def __init__(
        self,
        *,
        apop_challenge: bytes | None,
        link: Callable[[], Link],
        authentication: Authentication,
        policy: SessionPolicy = DEFAULT_POLICY,
        tls_available: bool = False,
        languages: Languages = BUILTIN_LANGUAGES,
    ) -> None:
        self._apop_challenge = apop_challenge
        self._link = link
        self._authentication = authentication
        self._tls_available = tls_available
        self._policy = policy
        self.state = State.AUTHORIZATION
        #: The user logged in (as shown in logs), once in TRANSACTION.
        self.user: str | None = None
        self._user_policy: SessionPolicy | None = None
        self.counters = SessionCounters()
        # USER_GIVEN: the name given; LOGIN_PENDING: who is logging in.
        self._username = b""
        # LOGIN_PENDING (and the SASL exchange before it): how ("USER",
        # "APOP", "SASL PLAIN", ...).
        self._login_method = ""
        # OPENING_MESSAGE: the message, and the lines of TOP (None: RETR).
        self._opening = 0
        self._opening_lines: int | None = None
        self._opening_status = _OK
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
        self.failed_logins = 0
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

    # -- events ------------------------------------------------------------------

    def greeting(self) -> Status:
        text = GREETING
        if self._apop_challenge is not None:
            text += " " + self._apop_challenge.decode("ascii")
        return Status(True, text)

    def receive_line(self, line: bytes) -> Outcome:
        """A command line (without its line ending) from the client."""
        state = self.state
        if state is _SASL_CHALLENGED:
            response = parse_sasl_response(line)
            if isinstance(response, SASLCancel):
                answer = self._fire(Event.SASL_CANCEL, None)
            else:
                answer = self._fire(Event.SASL_RESPONSE, response)
            assert answer is not None
            return answer
        if state not in _TAKES_LINES:
            raise SessionBusy(f"a command line while {state.name}")
        command = parse_command(line)
        if type(command) is not Command:  # one check for the common case
            if isinstance(command, UnknownCommand):
                return self._bad_command(UNKNOWN_COMMAND)
            assert isinstance(command, MalformedCommand)
            return self._bad_command(command.reason)
        transition = TRANSITIONS.get((state, command.verb))
        if transition is None:
            return self._bad_command(WRONG_STATE)
        try:
            reply = transition.answer(self, command)
        except _BadCommand as bad:
            self.state = transition.otherwise
            return self._bad_command(bad.text)
        except _Declined as declined:
            reply = declined.reply
            self.state = transition.otherwise
        except POP3Error as error:
            reply = error.status()
            self.state = transition.otherwise
        else:
            self.state = transition.then
        # A command that was accepted (whatever its answer) ends a run of
        # bad ones: the limit is on rejected commands in a row.
        self._bad_commands = 0
        assert reply is not None  # every command is answered
        return reply

    def line_too_long(self) -> Outcome:
        """A command line over the limit was received and discarded."""
        return self._bad_command(LINE_TOO_LONG)

    def sasl_challenge(self, data: bytes) -> Outcome | None:
        """The mechanism challenges the client with ``data``."""
        return self._fire(Event.SASL_CHALLENGE, data)

    def sasl_succeeded(self, credentials: object, username: bytes) -> Outcome | None:
        """The exchange is complete: log in with ``credentials``."""
        return self._fire(Event.SASL_SUCCEEDED, (credentials, username))

    def sasl_refused(self, status: Status) -> Outcome | None:
        """The mechanism refused the client's response with ``status``."""
        return self._fire(Event.SASL_REFUSED, status)

    def login_succeeded(
        self, messages: MessageList, policy: SessionPolicy | None = None, user: str | None = None
    ) -> Outcome | None:
        """
        The maildrop is open and locked; ``messages`` is its listing.
        ``policy``: the user's own (`SessionPolicy.for_user`), for the rest
        of the session; ``user``: the name the user database knows the
        user by, if not the one the client gave (logs, who and kick).
        """
        self._user_policy = policy
        if user is not None:
            self._username = user.encode("utf-8")
        return self._fire(Event.LOGIN_SUCCEEDED, messages)

    def login_refused(self, refusal: LoginRefusal) -> Outcome | None:
        """The login failed (wrong credentials, maildrop in use, LOGIN-DELAY, ...)."""
        return self._fire(Event.LOGIN_REFUSED, refusal)

    def message_opened(self, body: IMessageBody) -> Outcome | None:
        """The message of `OpenMessage` is open: ``body`` is sent as the reply's lines."""
        return self._fire(_MESSAGE_OPENED, body)

    def message_gone(self, status: Status) -> Outcome | None:
        """The message of `OpenMessage` cannot be read: ``status`` is the answer."""
        return self._fire(Event.MESSAGE_GONE, status)

    def update_done(self, removed: frozenset[int]) -> Outcome | None:
        """`RunUpdate` removed ``removed`` (DELE's and EXPIRE's)."""
        return self._fire(Event.UPDATE_DONE, removed)

    def update_failed(self, status: Status) -> Outcome | None:
        """`RunUpdate` could not remove everything: ``status`` is the answer to QUIT."""
        return self._fire(Event.UPDATE_FAILED, status)

    def connection_lost(self) -> Outcome | None:
        """
        The connection ended.  Outside UPDATE nothing is deleted (RFC 1939
        section 6: only QUIT enters UPDATE); the maildrop is released.  (An
        UPDATE under way ends the session when it is done.)
        """
        return self._fire(Event.CONNECTION_LOST, None)

    def _fire(self, event: Event, payload: object) -> Outcome | None:
        transition = TRANSITIONS.get((self.state, event))
        if transition is None:
            raise SessionBusy(f"{event.name} while {self.state.name}")
        try:
            outcome = transition.answer(self, payload)
        except _Declined as declined:
            self.state = transition.otherwise
            return declined.reply
        self.state = transition.then
        return outcome

    # -- helpers -----------------------------------------------------------------

    def _bad_command(self, text: str | Text) -> Outcome:
        self._bad_commands += 1
        limit = (
            self._policy.max_bad_commands_before_login
            if self.state in _BEFORE_LOGIN
            else self._policy.max_bad_commands_after_login
        )
        if self._bad_commands >= limit:
            return CloseForAbuse(Hangup(Status(False, TOO_MANY_BAD_COMMANDS)), self._bad_commands)
        return Status(False, text)

    def capabilities(self) -> list[bytes]:
        """
        The CAPA lines for the current state (RFC 2449 section 5: whatever
        is announced before login is announced after it too).
        """
        lines = [b"TOP", b"UIDL"]
        if self._user_pass_offered():
            lines.append(b"USER")
        # RFC 2449 sections 6.5 and 6.7: values that may differ per user
        # are followed by "USER" before login, and exact after it.
        per_user = b" USER" if self._policy.per_user and self.user is None else b""
        lines += [
            b"RESP-CODES",
            b"PIPELINING",
            b"AUTH-RESP-CODE",
            _expire_capability(self._policy)
            + (per_user if self._policy.expire_days is not None else b""),
        ]
        if self._policy.login_delay is not None:
            lines.append(b"LOGIN-DELAY %d" % self._policy.login_delay + per_user)
        mechanisms = self._offered_mechanisms()
        if mechanisms:
            lines.append(b" ".join([b"SASL", *(m.name for m in mechanisms)]))
        # RFC 6856: UTF-8 user names and passwords before UTF8 too (section
        # 2.2: PASS always took them); LANG in both states (section 3.1).
        lines += [b"UTF8 USER", b"LANG"]
        link = self.link
        stls_possible = self._tls_available and not link.secure and not self.utf8
        before_login = self.state in _BEFORE_LOGIN
        if before_login and stls_possible:
            lines.append(b"STLS")
        if not before_login:
            lines.append(b"IMPLEMENTATION " + self._policy.implementation.encode("ascii"))
        return lines

    def _plaintext_allowed(self) -> bool:
        link = self.link
        return link.secure or link.local or self._policy.allow_plaintext_auth

    def _user_pass_offered(self) -> bool:
        return self._authentication.password_logins() and self._plaintext_allowed()

    def _offered_mechanisms(self) -> list[Mechanism]:
        plaintext = self._plaintext_allowed()
        return [
            m for m in self._authentication.usable_mechanisms() if plaintext or not m.sends_password
        ]

    def _maildrop_summary(self) -> Text:
        count, octets = self._totals()
        return Text.of(
            "maildrop has {count} messages ({octets} octets)", count=count, octets=octets
        )

    def _totals(self) -> tuple[int, int]:
        sizes = self._messages.sizes
        if self._all_octets is None:
            self._all_octets = sum(sizes)
        if not self._deleted:
            # Nothing marked (most sessions): no generator to sum.
            return len(sizes), self._all_octets
        deleted_octets = sum(sizes[i] for i in self._deleted)
        return len(sizes) - len(self._deleted), self._all_octets - deleted_octets

    def _message_index(self, argument: bytes) -> int:
        """The snapshot index of a message-number argument that is not deleted."""
        number = parse_message_number(argument)
        if number is None:
            raise _BadCommand("invalid message number")
        index = number - 1
        # The column's length: MessageList.__len__ is a Python call.
        if index >= len(self._messages.sizes) or index in self._deleted:
            raise POP3Error(NO_SUCH_MESSAGE)
        return index

    # -- AUTHORIZATION (RFC 1939 section 4, section 7 for APOP) ---------------

    def _user(self, command: Command) -> Reply:
        if not self._authentication.password_logins():
            raise _Declined(Status(False, USER_PASS_UNAVAILABLE))
        if not self._plaintext_allowed():
            raise _Declined(Status(False, PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
        # Refused now if SASLprep prohibits it; kept as sent (see PASS).
        _prepared(command.arguments[0], INVALID_USER_NAME)
        self._username = command.arguments[0]
        return _USER_ACCEPTED

    def _pass_without_user(self, command: Command) -> Reply:
        raise _BadCommand(PASS_WITHOUT_USER)

    def _pass(self, command: Command) -> Outcome:
        username = self._username
        password = command.arguments[0]
        if self.utf8 and not is_utf8(password):
            # RFC 6856 section 2.2; before UTF8, legacy octets pass as they are.
            raise _BadCommand(BAD_UTF8)
        # Refused if SASLprep prohibits it; both forms go to the checkers
        # (the driver makes pop3d.credentials.PreparedUsernamePassword).
        _prepared(password, INVALID_PASSWORD)
        return self._log_in(PasswordCredentials(username, password), username, "USER")

    def _apop(self, command: Command) -> Outcome:
        if self._apop_challenge is None:
            raise _Declined(Status(False, APOP_UNAVAILABLE))
        if not _is_md5_hex(command.arguments[1]):
            raise _BadCommand("APOP takes a name and an MD5 digest")
        username, digest = command.arguments
        username = _prepared(username, INVALID_USER_NAME)
        return self._log_in(APOPDigest(self._apop_challenge, username, digest), username, "APOP")

    def _log_in(self, credentials: object, username: bytes, method: str) -> Action:
        self._username = username
        self._login_method = method
        return LogIn(credentials, username, method)

    def _auth(self, command: Command) -> Outcome:
        """RFC 5034 section 4; with no argument, the mechanisms (as Outlook expects)."""
        offered = self._offered_mechanisms()
        if not command.arguments:
            names = [m.name for m in offered]
            raise _Declined(Listing(Status(True, MECHANISMS_FOLLOW), names))
        name = command.arguments[0].upper()
        mechanism = next((m for m in offered if m.name == name), None)
        if mechanism is None:
            configured = self._authentication.configured_mechanisms()
            refused = any(m.name == name and m.sends_password for m in configured)
            if refused and not self._plaintext_allowed():
                raise _Declined(Status(False, PLAINTEXT_DISALLOWED, ResponseCode.AUTH))
            raise _Declined(Status(False, UNKNOWN_MECHANISM))
        initial: bytes | None = None
        if len(command.arguments) == 2:
            # "=" is an empty initial response (RFC 5034 section 4).
            argument = command.arguments[1]
            initial = b"" if argument == b"=" else decode_base64(argument)
            if initial is None:
                raise _Declined(Status(False, INVALID_BASE64))
        self._login_method = "SASL " + mechanism.name.decode("ascii", "replace")
        return StartSASL(mechanism, initial)

    def _stls(self, command: Command) -> Reply:
        """RFC 2595 section 4: only before login, only while TLS is off."""
        if not self._tls_available:
            raise _Declined(Status(False, STLS_UNAVAILABLE))
        if self.link.secure:
            raise _Declined(Status(False, TLS_ALREADY_ACTIVE))
        if self.utf8:
            # RFC 6856 section 2.1: clients MUST NOT; servers MAY refuse.
            raise _Declined(Status(False, STLS_AFTER_UTF8))
        # Nothing said before the handshake carries over (RFC 2595 section 4),
        # not even a USER, or a LANG a man in the middle may have slipped in
        # (RFC 6856 section 7).
        self.wording = None
        return StartTLS(Status(True, BEGIN_TLS))

    def _quit_unauthenticated(self, command: Command) -> Reply:
        return _BYE

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

    # -- the SASL exchange (RFC 5034 section 4) --------------------------------------

    def _sasl_response(self, response: bytes | None) -> Outcome:
        if response is None:
            raise _Declined(Status(False, INVALID_BASE64))
        return StepSASL(response)

    def _sasl_cancel(self, _: None) -> Outcome:
        return Status(False, AUTH_CANCELLED)

    def _sasl_challenge(self, data: bytes) -> Outcome:
        return SASLContinuation(data)

    def _sasl_succeeded(self, result: tuple[object, bytes]) -> Outcome:
        credentials, username = result
        return self._log_in(credentials, username, self._login_method)

    def _sasl_refused(self, status: Status) -> Outcome:
        # After a failure the session is as if AUTH never happened.
        return status

    # -- the outcome of a login ------------------------------------------------------

    def _logged_in(self, messages: MessageList) -> Outcome:
        self._messages = messages
        if self._user_policy is not None:
            self._policy, self._user_policy = self._user_policy, None
        self.user = self._username.decode("utf-8", "replace")
        self._username = b""  # an idle session keeps only what it needs
        self._apop_challenge = None  # APOP is over (RFC 1939 section 7: AUTHORIZATION only)
        self._bad_commands = 0
        # One line per session, when it ends (see EndSession).
        self.counters.method = self._login_method
        return Status(True, self._maildrop_summary())

    def _login_refused(self, refusal: LoginRefusal) -> Outcome:
        """
        A wrong password (or unknown user: the same answer, after the same
        wait) is answered late, and the connection is closed after a few,
        except for a trusted client.  Any other refusal is answered at once.
        """
        if not refusal.counted:
            return refusal.status
        self.failed_logins += 1
        reply: Reply = refusal.status
        if self.failed_logins >= self._policy.max_failed_logins and not refusal.trusted:
            reply = Hangup(refusal.status)
        return AnswerFailedLogin(reply)

    def _disconnected_before_login(self, _: None) -> Outcome:
        return DisconnectedBeforeLogin(self.failed_logins)

    def _release_late_login(self, _: object) -> Outcome:
        return ReleaseMaildrop()

    def _nothing(self, _: object) -> None:
        return None

    # -- TRANSACTION (RFC 1939 section 5, optional commands of section 7) -----

    def _stat(self, command: Command) -> Reply:
        count, octets = self._totals()
        return Status(True, f"{count} {octets}")

    def _list(self, command: Command) -> Reply:
        count, octets = self._totals()
        return self._scan_listing(
            command,
            "sizes",
            Status(True, Text.of("{count} messages ({octets} octets)", count=count, octets=octets)),
        )

    def _uidl(self, command: Command) -> Reply:
        return self._scan_listing(command, "uids", Status(True, UIDL_FOLLOWS))

    def _scan_listing(
        self, command: Command, column: Literal["sizes", "uids"], heading: Status
    ) -> Reply:
        """
        LIST and UIDL (RFC 1939 sections 5, 7): one "number value" line for
        the message asked for, or for every message not marked as deleted.
        """
        messages = self._messages
        values: Sequence[int] | Sequence[str] = (
            messages.sizes if column == "sizes" else messages.uids
        )
        if command.arguments:
            index = self._message_index(command.arguments[0])
            return Status(True, f"{index + 1} {values[index]}")
        deleted = self._deleted
        if not deleted:
            # Made once per listing the store keeps (see MessageList.numbered).
            return Listing(heading, [], messages.numbered(column))
        kept = [index not in deleted for index in range(len(values))]
        numbers = list(itertools.compress(range(1, len(values) + 1), kept))
        kept_values: list[int | str] = list(itertools.compress(values, kept))
        return Listing(heading, [], numbered_lines(numbers, kept_values))

    def _retr(self, command: Command) -> Outcome:
        index = self._message_index(command.arguments[0])
        return self._open(index, _retr_status(self._messages.sizes[index]), None)

    def _top(self, command: Command) -> Outcome:
        lines = parse_line_count(command.arguments[1])
        if lines is None:
            raise _BadCommand("invalid line count")
        index = self._message_index(command.arguments[0])
        return self._open(index, Status(True, TOP_FOLLOWS), lines)

    def _open(self, index: int, status: Status, body_lines: int | None) -> Outcome:
        self._opening = index
        self._opening_status = status
        self._opening_lines = body_lines
        return OpenMessage(index)

    def _message_opened(self, body: IMessageBody) -> Outcome:
        index, body_lines = self._opening, self._opening_lines
        expected: int | None = None
        if body_lines is None:
            expected = self._messages.sizes[index]
        encoder = MessageEncoder(body_lines, self._policy.client_workarounds)
        return MessageStream(self._opening_status, body, encoder, expected)

    def message_sent(self, octets: int = 0) -> None:
        """
        The message of the last RETR or TOP (``octets`` of it, before
        byte-stuffing) went out whole, terminator and all.  Only
        now is it retrieved: what EXPIRE 0 deletes at QUIT (RFC 2449 section
        6.7, "downloaded with RETR"), what the seen flag marks and the log
        counts.  A RETR answered -ERR, or cut off, retrieved nothing.
        """
        if self._opening_lines is not None:
            self.counters.top_messages += 1
            self.counters.top_octets += octets
            return
        index = self._opening
        if isinstance(self._retrieved, frozenset):
            self._retrieved = set()
        self._retrieved.add(index)
        self.counters.retrieved_messages += 1
        self.counters.retrieved_octets += self._messages.sizes[index]

    def next_in_order(self) -> int | None:
        """
        The message a client that retrieves messages in order asks for
        next: the one after the message the last RETR was for, if there is
        one and it is not deleted; None outside TRANSACTION, or after a TOP.
        (`pop3d.readahead` reads it while the client takes in the last.)
        """
        if self.state is not State.TRANSACTION or self._opening_lines is not None:
            return None
        index = self._opening + 1
        if index >= len(self._messages.sizes) or index in self._deleted:
            return None
        return index

    def _message_gone(self, status: Status) -> Outcome:
        return status

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

    def _ended_without_quit(self, _: None) -> Outcome:
        return _ENDED_WITHOUT_QUIT

    # -- UPDATE (RFC 1939 section 6) ---------------------------------------

    def _quit_update(self, command: Command) -> Outcome:
        """
        RFC 2449 section 6.7: the EXPIRE policy deletes more than DELE marked.
        EXPIRE 0: an implicit DELE of every message sent with RETR (not TOP).
        """
        days = self._policy.expire_days
        deleted, retrieved = self._deleted, self._retrieved
        remove = frozenset(deleted | retrieved if days == 0 else deleted)
        return RunUpdate(
            remove=remove,
            expire_days=days or None,
            expire_candidates=frozenset(retrieved - deleted) if days else _NONE,
            retrieved=frozenset(retrieved),
            message_count=len(self._messages),
        )

    def _update_done(self, removed: frozenset[int]) -> Outcome:
        self.counters.deleted_messages = len(removed)
        self.counters.deleted_octets = (
            sum(self._messages.sizes[i] for i in removed) if removed else 0
        )
        return _LOGGED_OUT

    def _update_failed(self, status: Status) -> Outcome:
        return EndSession("logged out", Hangup(status))


@functools.lru_cache(maxsize=256)
def _retr_status(size: int) -> Status:
    """
    RETR's "+OK <size> octets", one value for each size seen lately: made
    once, and found again by `pop3d.wire.format_status` without hashing a
    new text.  (Measured: a fifth of the time of making it for every RETR
    when sizes repeat, and no slower when none does.)
    """
    return Status(True, f"{size} octets")


@dataclass(frozen=True, slots=True)
class Transition:
    """
    Who answers an event in a state, the state after it, and the state when
    the answer is a refusal (a bad command, an -ERR, a listing of AUTH).
    """

    answer: Callable[[Session, object], Outcome | None]
    then: State
    otherwise: State


_S = State
_A, _U = _S.AUTHORIZATION, _S.USER_GIVEN
_T = _S.TRANSACTION

# Every legal (state, event) pair: the whole protocol.  A command that is not
# here is answered "-ERR command not valid in this state"; another event is a
# driver bug (`SessionBusy`).
_ROWS: list[tuple[State, Verb | Event, Callable[..., Outcome | None], State, State]] = [
    # RFC 1939 section 4 and 7: AUTHORIZATION, and a USER waiting for PASS.
    (_A, Verb.USER, Session._user, _U, _A),
    (_U, Verb.USER, Session._user, _U, _U),
    (_A, Verb.PASS, Session._pass_without_user, _A, _A),
    (_U, Verb.PASS, Session._pass, _S.LOGIN_PENDING, _A),
    (_A, Verb.APOP, Session._apop, _S.LOGIN_PENDING, _A),
    (_U, Verb.APOP, Session._apop, _S.LOGIN_PENDING, _U),
    (_A, Verb.AUTH, Session._auth, _S.SASL_STEP, _A),
    (_U, Verb.AUTH, Session._auth, _S.SASL_STEP, _U),
    (_A, Verb.STLS, Session._stls, _A, _A),
    (_U, Verb.STLS, Session._stls, _A, _U),
    (_A, Verb.CAPA, Session._capa, _A, _A),
    (_U, Verb.CAPA, Session._capa, _U, _U),
    (_A, Verb.UTF8, Session._utf8, _A, _A),
    (_U, Verb.UTF8, Session._utf8, _U, _U),
    (_A, Verb.LANG, Session._lang, _A, _A),
    (_U, Verb.LANG, Session._lang, _U, _U),
    (_A, Verb.QUIT, Session._quit_unauthenticated, _A, _A),
    (_U, Verb.QUIT, Session._quit_unauthenticated, _U, _U),
    (_A, Event.CONNECTION_LOST, Session._disconnected_before_login, _S.CLOSED, _S.CLOSED),
    (_U, Event.CONNECTION_LOST, Session._disconnected_before_login, _S.CLOSED, _S.CLOSED),
    # RFC 5034 section 4: the SASL exchange.
    (_S.SASL_STEP, Event.SASL_CHALLENGE, Session._sasl_challenge, _S.SASL_CHALLENGED, _A),
    (_S.SASL_STEP, Event.SASL_SUCCEEDED, Session._sasl_succeeded, _S.LOGIN_PENDING, _A),
    (_S.SASL_STEP, Event.SASL_REFUSED, Session._sasl_refused, _A, _A),
    (_S.SASL_STEP, Event.CONNECTION_LOST, Session._disconnected_before_login, _S.CLOSED, _S.CLOSED),
    (_S.SASL_CHALLENGED, Event.SASL_RESPONSE, Session._sasl_response, _S.SASL_STEP, _A),
    (_S.SASL_CHALLENGED, Event.SASL_CANCEL, Session._sasl_cancel, _A, _A),
    (
        _S.SASL_CHALLENGED,
        Event.CONNECTION_LOST,
        Session._disconnected_before_login,
        _S.CLOSED,
        _S.CLOSED,
    ),
    # The driver checks the credentials and opens the maildrop.
    (_S.LOGIN_PENDING, Event.LOGIN_SUCCEEDED, Session._logged_in, _T, _T),
    (_S.LOGIN_PENDING, Event.LOGIN_REFUSED, Session._login_refused, _A, _A),
    (
        _S.LOGIN_PENDING,
        Event.CONNECTION_LOST,
        Session._disconnected_before_login,
        _S.CLOSED,
        _S.CLOSED,
    ),
    # RFC 1939 section 5 and 7: TRANSACTION.
    (_T, Verb.STAT, Session._stat, _T, _T),
    (_T, Verb.LIST, Session._list, _T, _T),
    (_T, Verb.RETR, Session._retr, _S.OPENING_MESSAGE, _T),
    (_T, Verb.TOP, Session._top, _S.OPENING_MESSAGE, _T),
    (_T, Verb.DELE, Session._dele, _T, _T),
    (_T, Verb.NOOP, Session._noop, _T, _T),
    (_T, Verb.RSET, Session._rset, _T, _T),
    (_T, Verb.UIDL, Session._uidl, _T, _T),
    (_T, Verb.CAPA, Session._capa, _T, _T),
    (_T, Verb.LANG, Session._lang, _T, _T),
    (_T, Verb.QUIT, Session._quit_update, _S.UPDATE, _T),
    (_T, Event.CONNECTION_LOST, Session._ended_without_quit, _S.CLOSED, _S.CLOSED),
    (_S.OPENING_MESSAGE, Event.MESSAGE_OPENED, Session._message_opened, _T, _T),
    (_S.OPENING_MESSAGE, Event.MESSAGE_GONE, Session._message_gone, _T, _T),
    (_S.OPENING_MESSAGE, Event.CONNECTION_LOST, Session._ended_without_quit, _S.CLOSED, _S.CLOSED),
    # RFC 1939 section 6: UPDATE, which goes on if the client leaves.
    (_S.UPDATE, Event.UPDATE_DONE, Session._update_done, _S.CLOSED, _S.CLOSED),
    (_S.UPDATE, Event.UPDATE_FAILED, Session._update_failed, _S.CLOSED, _S.CLOSED),
    (_S.UPDATE, Event.CONNECTION_LOST, Session._nothing, _S.UPDATE, _S.UPDATE),
    # Outcomes that arrive after the client left.
    (_S.CLOSED, Event.LOGIN_SUCCEEDED, Session._release_late_login, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.LOGIN_REFUSED, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.SASL_CHALLENGE, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.SASL_SUCCEEDED, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.SASL_REFUSED, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.MESSAGE_OPENED, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.MESSAGE_GONE, Session._nothing, _S.CLOSED, _S.CLOSED),
    (_S.CLOSED, Event.CONNECTION_LOST, Session._nothing, _S.CLOSED, _S.CLOSED),
]

TRANSITIONS: dict[tuple[State, Verb | Event], Transition] = {
    (state, event): Transition(answer, then, otherwise)
    for state, event, answer, then, otherwise in _ROWS
}


def _expire_capability(policy: SessionPolicy) -> bytes:
    """The EXPIRE line (without the "USER" that per-user values add before login)."""
    if policy.expire_days is None:
        return b"EXPIRE NEVER"
    return b"EXPIRE %d" % policy.expire_days
