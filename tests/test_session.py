"""
The session state machine on its own: no Twisted, no transport, no driver.

The tests tell the session what happened (command lines, the outcomes of what
it asked for) and compare what it answers: replies as the literal bytes a
client would read (RFC 1939 section 3 framing, rendered by `pop3d.wire`), and
requests for actions as values.
"""

from __future__ import annotations

import ast
import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from zope.interface import implementer

import pop3d.session
from pop3d.session import (
    TRANSITIONS,
    AnswerFailedLogin,
    APOPDigest,
    CloseForAbuse,
    DisconnectedBeforeLogin,
    EndSession,
    Event,
    Hangup,
    Link,
    Listing,
    LogIn,
    LoginRefusal,
    MessageStream,
    OpenMessage,
    Outcome,
    PasswordCredentials,
    ReleaseMaildrop,
    RunUpdate,
    SASLContinuation,
    Session,
    SessionBusy,
    SessionPolicy,
    StartSASL,
    StartTLS,
    State,
    StepSASL,
)
from pop3d.stores.interfaces import IMessageBody, MessageList
from pop3d.wire import ResponseCode, Status, Verb, format_multiline

LOCAL = Link(peer="127.0.0.1:40000", host="127.0.0.1", secure=False, local=True)
REMOTE = Link(peer="192.0.2.1:40000", host="192.0.2.1", secure=False, local=False)
CHALLENGE = b"<1.2@pop.example.test>"
LISTING = MessageList(uids=("uid-a", "uid-b"), sizes=(10, 20))
WRONG_STATE = b"-ERR command not valid in this state\r\n"
AUTH_FAILED = Status(False, "invalid user name or password", ResponseCode.AUTH)


@dataclass(frozen=True)
class _Mechanism:
    name: bytes
    sends_password: bool


PLAIN = _Mechanism(b"PLAIN", True)
CRAM = _Mechanism(b"CRAM-MD5", False)


class _Authentication:
    """Every login can be checked: USER/PASS, PLAIN and CRAM-MD5."""

    def password_logins(self) -> bool:
        return True

    def usable_mechanisms(self) -> Sequence[_Mechanism]:
        return [CRAM, PLAIN]

    def configured_mechanisms(self) -> Sequence[_Mechanism]:
        return [CRAM, PLAIN]


@implementer(IMessageBody)
class _Body:
    """A message body the session only passes on."""

    def read(self, size: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def make_session(link: Link = LOCAL, **policy: object) -> Session:
    return Session(
        apop_challenge=CHALLENGE,
        link=lambda: link,
        authentication=_Authentication(),
        policy=SessionPolicy(**policy),  # type: ignore[arg-type]
        tls_available=True,
    )


def rendered(outcome: Outcome | None) -> bytes:
    """What the client reads for a reply (the framing is pop3d.wire's)."""
    if isinstance(outcome, Status):
        return outcome.to_bytes()
    if isinstance(outcome, Listing):
        return format_multiline(outcome.status, outcome.lines, outcome.formatted)
    if isinstance(outcome, (Hangup, StartTLS, MessageStream)):
        return outcome.status.to_bytes()
    if isinstance(outcome, SASLContinuation):
        return b"+ " + base64.b64encode(outcome.data) + b"\r\n"
    if isinstance(outcome, (CloseForAbuse, AnswerFailedLogin)):
        return rendered(outcome.reply)
    if isinstance(outcome, EndSession) and outcome.reply is not None:
        return rendered(outcome.reply)
    raise AssertionError(f"not a reply: {outcome!r}")


def _authorization() -> Session:
    return make_session()


def _user_given() -> Session:
    session = make_session()
    session.receive_line(b"USER alice")
    return session


def _login_pending() -> Session:
    session = _user_given()
    session.receive_line(b"PASS wonderland")
    return session


def _transaction() -> Session:
    session = _login_pending()
    session.login_succeeded(LISTING)
    return session


def _sasl_step() -> Session:
    session = make_session()
    session.receive_line(b"AUTH PLAIN")
    return session


def _sasl_challenged() -> Session:
    session = _sasl_step()
    session.sasl_challenge(b"")
    return session


def _opening() -> Session:
    session = _transaction()
    session.receive_line(b"RETR 1")
    return session


def _update() -> Session:
    session = _transaction()
    session.receive_line(b"QUIT")
    return session


def _closed() -> Session:
    session = _login_pending()
    session.connection_lost()
    return session


START: dict[State, Callable[[], Session]] = {
    State.AUTHORIZATION: _authorization,
    State.USER_GIVEN: _user_given,
    State.LOGIN_PENDING: _login_pending,
    State.SASL_STEP: _sasl_step,
    State.SASL_CHALLENGED: _sasl_challenged,
    State.TRANSACTION: _transaction,
    State.OPENING_MESSAGE: _opening,
    State.UPDATE: _update,
    State.CLOSED: _closed,
}

A, U, T = State.AUTHORIZATION, State.USER_GIVEN, State.TRANSACTION
CAPA_BEFORE_LOGIN = (
    b"+OK capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\n"
    b"AUTH-RESP-CODE\r\nEXPIRE NEVER\r\nSASL CRAM-MD5 PLAIN\r\nUTF8 USER\r\nLANG\r\n"
    b"STLS\r\n.\r\n"
)

# (state, command line, next state, what the client reads)
LINE_TRANSITIONS: list[tuple[State, bytes, State, bytes]] = [
    # RFC 1939 section 4: AUTHORIZATION.
    (A, b"USER alice", U, b"+OK send PASS\r\n"),
    (A, b"PASS wonderland", A, b"-ERR send USER first\r\n"),
    (A, b"CAPA", A, CAPA_BEFORE_LOGIN),
    (A, b"QUIT", A, b"+OK bye\r\n"),
    (A, b"UTF8", A, b"+OK UTF-8 mode enabled\r\n"),
    (A, b"LANG de", A, b"+OK de language changed\r\n"),
    (A, b"STLS", A, b"+OK begin TLS negotiation\r\n"),
    (A, b"AUTH", A, b"+OK available authentication mechanisms\r\nCRAM-MD5\r\nPLAIN\r\n.\r\n"),
    (A, b"AUTH GSSAPI", A, b"-ERR unsupported authentication mechanism\r\n"),
    (A, b"AUTH PLAIN !!", A, b"-ERR invalid base64\r\n"),
    (A, b"APOP alice xyz", A, b"-ERR APOP takes a name and an MD5 digest\r\n"),
    (A, b"STAT", A, WRONG_STATE),
    (A, b"RETR 1", A, WRONG_STATE),
    (A, b"NOOP", A, WRONG_STATE),
    (A, b"XYZZY", A, b"-ERR unknown command\r\n"),
    # RFC 1939 section 7: a USER waits for its PASS.
    (U, b"USER bob", U, b"+OK send PASS\r\n"),
    (U, b"CAPA", U, CAPA_BEFORE_LOGIN),
    (U, b"LANG", U, b"+OK language listing follows\r\nen English\r\nde Deutsch\r\n.\r\n"),
    (U, b"STLS", A, b"+OK begin TLS negotiation\r\n"),
    (U, b"QUIT", U, b"+OK bye\r\n"),
    (U, b"DELE 1", U, WRONG_STATE),
    (U, b"AUTH GSSAPI", U, b"-ERR unsupported authentication mechanism\r\n"),
    # RFC 1939 section 5: TRANSACTION.
    (T, b"STAT", T, b"+OK 2 30\r\n"),
    (T, b"LIST", T, b"+OK 2 messages (30 octets)\r\n1 10\r\n2 20\r\n.\r\n"),
    (T, b"LIST 2", T, b"+OK 2 20\r\n"),
    (T, b"LIST 3", T, b"-ERR no such message\r\n"),
    (T, b"UIDL", T, b"+OK unique-id listing follows\r\n1 uid-a\r\n2 uid-b\r\n.\r\n"),
    (T, b"UIDL 1", T, b"+OK 1 uid-a\r\n"),
    (T, b"DELE 2", T, b"+OK message 2 deleted\r\n"),
    (T, b"DELE x", T, b"-ERR invalid message number\r\n"),
    (T, b"NOOP", T, b"+OK\r\n"),
    (T, b"RSET", T, b"+OK maildrop has 2 messages (30 octets)\r\n"),
    (T, b"RETR 9", T, b"-ERR no such message\r\n"),
    (T, b"TOP 1 x", T, b"-ERR invalid line count\r\n"),
    (T, b"USER alice", T, WRONG_STATE),
    (T, b"STLS", T, WRONG_STATE),
    (T, b"UTF8", T, WRONG_STATE),
    # RFC 5034 section 4: the answer to a challenge.
    (State.SASL_CHALLENGED, b"*", A, b"-ERR authentication cancelled\r\n"),
    (State.SASL_CHALLENGED, b"!!", A, b"-ERR invalid base64\r\n"),
]


@pytest.mark.parametrize(("state", "line", "after", "expected"), LINE_TRANSITIONS)
def test_line_transitions(state: State, line: bytes, after: State, expected: bytes) -> None:
    session = START[state]()
    assert session.state is state
    assert rendered(session.receive_line(line)) == expected
    assert session.state is after


# (state, command line, next state, the action asked for)
LINE_ACTIONS: list[tuple[State, bytes, State, Outcome]] = [
    (
        U,
        b"PASS wonderland",
        State.LOGIN_PENDING,
        LogIn(PasswordCredentials(b"alice", b"wonderland"), b"alice", "USER"),
    ),
    (
        A,
        b"APOP alice " + b"a" * 32,
        State.LOGIN_PENDING,
        LogIn(APOPDigest(CHALLENGE, b"alice", b"a" * 32), b"alice", "APOP"),
    ),
    (A, b"AUTH PLAIN", State.SASL_STEP, StartSASL(PLAIN, None)),
    (A, b"AUTH PLAIN =", State.SASL_STEP, StartSASL(PLAIN, b"")),
    (U, b"AUTH CRAM-MD5", State.SASL_STEP, StartSASL(CRAM, None)),
    (State.SASL_CHALLENGED, b"YWJj", State.SASL_STEP, StepSASL(b"abc")),
    (T, b"RETR 2", State.OPENING_MESSAGE, OpenMessage(1)),
    (T, b"TOP 1 0", State.OPENING_MESSAGE, OpenMessage(0)),
    (
        T,
        b"QUIT",
        State.UPDATE,
        RunUpdate(
            remove=frozenset(),
            expire_days=None,
            expire_candidates=frozenset(),
            retrieved=frozenset(),
            message_count=2,
        ),
    ),
]


@pytest.mark.parametrize(("state", "line", "after", "action"), LINE_ACTIONS)
def test_line_actions(state: State, line: bytes, after: State, action: Outcome) -> None:
    session = START[state]()
    assert session.receive_line(line) == action
    assert session.state is after


def _body() -> _Body:
    return _Body()


# (state, event, next state, outcome: bytes read by the client, or an action)
EVENT_TRANSITIONS: list[tuple[State, Callable[[Session], Outcome | None], State, object]] = [
    (
        State.LOGIN_PENDING,
        lambda s: s.login_succeeded(LISTING),
        T,
        b"+OK maildrop has 2 messages (30 octets)\r\n",
    ),
    (
        State.LOGIN_PENDING,
        lambda s: s.login_refused(LoginRefusal(AUTH_FAILED, counted=True)),
        A,
        AnswerFailedLogin(AUTH_FAILED),
    ),
    (
        State.LOGIN_PENDING,
        lambda s: s.login_refused(
            LoginRefusal(Status(False, "maildrop is locked", ResponseCode.IN_USE), counted=False)
        ),
        A,
        b"-ERR [IN-USE] maildrop is locked\r\n",
    ),
    (State.LOGIN_PENDING, Session.connection_lost, State.CLOSED, DisconnectedBeforeLogin(0)),
    (State.AUTHORIZATION, Session.connection_lost, State.CLOSED, DisconnectedBeforeLogin(0)),
    (State.USER_GIVEN, Session.connection_lost, State.CLOSED, DisconnectedBeforeLogin(0)),
    (State.SASL_STEP, lambda s: s.sasl_challenge(b"abc"), State.SASL_CHALLENGED, b"+ YWJj\r\n"),
    (State.SASL_STEP, lambda s: s.sasl_challenge(b""), State.SASL_CHALLENGED, b"+ \r\n"),
    (
        State.SASL_STEP,
        lambda s: s.sasl_succeeded("credentials", b"alice"),
        State.LOGIN_PENDING,
        LogIn("credentials", b"alice", "SASL PLAIN"),
    ),
    (
        State.SASL_STEP,
        lambda s: s.sasl_refused(Status(False, "bad response")),
        A,
        b"-ERR bad response\r\n",
    ),
    (State.SASL_STEP, Session.connection_lost, State.CLOSED, DisconnectedBeforeLogin(0)),
    (State.SASL_CHALLENGED, Session.connection_lost, State.CLOSED, DisconnectedBeforeLogin(0)),
    (State.OPENING_MESSAGE, lambda s: s.message_opened(_body()), T, b"+OK 10 octets\r\n"),
    (
        State.OPENING_MESSAGE,
        lambda s: s.message_gone(Status(False, "message was removed")),
        T,
        b"-ERR message was removed\r\n",
    ),
    (
        State.OPENING_MESSAGE,
        Session.connection_lost,
        State.CLOSED,
        EndSession("ended without QUIT, nothing deleted", None),
    ),
    (
        T,
        Session.connection_lost,
        State.CLOSED,
        EndSession("ended without QUIT, nothing deleted", None),
    ),
    (State.UPDATE, lambda s: s.update_done(frozenset()), State.CLOSED, b"+OK bye\r\n"),
    (
        State.UPDATE,
        lambda s: s.update_failed(Status(False, "some messages were not deleted")),
        State.CLOSED,
        b"-ERR some messages were not deleted\r\n",
    ),
    # UPDATE goes on when the client leaves: it ends the session itself.
    (State.UPDATE, Session.connection_lost, State.UPDATE, None),
    # Outcomes that arrive after the client left.
    (State.CLOSED, lambda s: s.login_succeeded(LISTING), State.CLOSED, ReleaseMaildrop()),
    (
        State.CLOSED,
        lambda s: s.login_refused(LoginRefusal(AUTH_FAILED, counted=True)),
        State.CLOSED,
        None,
    ),
    (State.CLOSED, Session.connection_lost, State.CLOSED, None),
]


@pytest.mark.parametrize(("state", "event", "after", "expected"), EVENT_TRANSITIONS)
def test_event_transitions(
    state: State, event: Callable[[Session], Outcome | None], after: State, expected: object
) -> None:
    session = START[state]()
    outcome = event(session)
    if isinstance(expected, bytes):
        assert rendered(outcome) == expected
    else:
        assert outcome == expected
    assert session.state is after


def test_every_state_answers_every_command() -> None:
    """
    RFC 1939 section 3: a command not valid in a state is answered -ERR; the
    table holds only valid ones.  Waiting states take no line at all.
    """
    taking = {A, U, T}
    for state in State:
        for verb in Verb:
            session = START[state]()
            if state not in taking and state is not State.SASL_CHALLENGED:
                with pytest.raises(SessionBusy):
                    session.receive_line(verb.value.encode("ascii"))
            elif state in taking and (state, verb) not in TRANSITIONS:
                line = verb.value.encode("ascii") + b" 1 1"
                reply = rendered(session.receive_line(line))
                assert reply.startswith(b"-ERR "), (state, verb)
                assert session.state is state


def test_events_outside_the_table_are_driver_bugs() -> None:
    session = _transaction()
    with pytest.raises(SessionBusy):
        session.login_succeeded(LISTING)
    with pytest.raises(SessionBusy):
        session.update_done(frozenset())
    assert session.state is T
    assert set(Event) == {event for (_, event) in TRANSITIONS if isinstance(event, Event)}


class TestUserThenPass:
    """RFC 1939 section 7: USER names the maildrop, PASS logs in."""

    def test_login(self) -> None:
        session = make_session()
        assert rendered(session.receive_line(b"USER alice")) == b"+OK send PASS\r\n"
        assert session.state is State.USER_GIVEN
        action = session.receive_line(b"PASS wonderland")
        assert action == LogIn(PasswordCredentials(b"alice", b"wonderland"), b"alice", "USER")
        assert rendered(session.login_succeeded(LISTING)) == (
            b"+OK maildrop has 2 messages (30 octets)\r\n"
        )
        assert session.user == "alice"
        assert session.counters.method == "USER"

    def test_after_a_failed_login_user_must_be_sent_again(self) -> None:
        session = _login_pending()
        session.login_refused(LoginRefusal(AUTH_FAILED, counted=True))
        assert session.state is State.AUTHORIZATION
        assert rendered(session.receive_line(b"PASS wonderland")) == b"-ERR send USER first\r\n"

    def test_a_later_user_replaces_the_first(self) -> None:
        session = _user_given()
        session.receive_line(b"USER bob")
        assert session.receive_line(b"PASS builder") == LogIn(
            PasswordCredentials(b"bob", b"builder"), b"bob", "USER"
        )

    def test_a_refused_password_forgets_the_user(self) -> None:
        """RFC 6856 section 2.2: after UTF8, a password must be UTF-8."""
        session = make_session()
        session.receive_line(b"UTF8")
        session.receive_line(b"USER alice")
        refused = rendered(session.receive_line(b"PASS \xff\xfe"))
        assert refused.startswith(b"-ERR ")
        assert session.state is State.AUTHORIZATION

    def test_plaintext_is_refused_on_an_open_remote_connection(self) -> None:
        """RFC 2595 section 2.3."""
        session = make_session(REMOTE)
        assert rendered(session.receive_line(b"USER alice")) == (
            b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"
        )
        assert session.state is State.AUTHORIZATION

    def test_failed_logins_close_the_connection_after_the_limit(self) -> None:
        session = make_session()
        outcomes = []
        for _ in range(3):
            session.receive_line(b"USER alice")
            session.receive_line(b"PASS nope")
            outcomes.append(session.login_refused(LoginRefusal(AUTH_FAILED, counted=True)))
        assert outcomes[:2] == [AnswerFailedLogin(AUTH_FAILED)] * 2
        assert outcomes[2] == AnswerFailedLogin(Hangup(AUTH_FAILED))
        assert rendered(outcomes[2]) == b"-ERR [AUTH] invalid user name or password\r\n"

    def test_a_trusted_client_is_not_disconnected(self) -> None:
        session = make_session()
        for _ in range(5):
            session.receive_line(b"USER alice")
            session.receive_line(b"PASS nope")
            refusal = LoginRefusal(AUTH_FAILED, counted=True, trusted=True)
            assert session.login_refused(refusal) == AnswerFailedLogin(AUTH_FAILED)

    def test_a_refusal_that_is_no_failed_login_is_not_counted(self) -> None:
        """RFC 2449 section 8.1.2: [IN-USE] is answered at once and not counted."""
        session = make_session()
        in_use = Status(False, "maildrop is locked", ResponseCode.IN_USE)
        for _ in range(4):
            session.receive_line(b"USER alice")
            session.receive_line(b"PASS wonderland")
            outcome = session.login_refused(LoginRefusal(in_use, counted=False))
            assert rendered(outcome) == b"-ERR [IN-USE] maildrop is locked\r\n"
        assert session.failed_logins == 0


class TestSASLExchange:
    """RFC 5034 section 4."""

    def test_continuation_then_success(self) -> None:
        session = make_session()
        assert session.receive_line(b"AUTH PLAIN") == StartSASL(PLAIN, None)
        assert rendered(session.sasl_challenge(b"")) == b"+ \r\n"
        assert session.state is State.SASL_CHALLENGED
        # Not a command: the answer to the challenge, whatever it looks like.
        assert session.receive_line(b"AGFsaWNlAHdvbmRlcmxhbmQ=") == StepSASL(
            b"\x00alice\x00wonderland"
        )
        assert session.sasl_succeeded("credentials", b"alice") == LogIn(
            "credentials", b"alice", "SASL PLAIN"
        )
        assert rendered(session.login_succeeded(LISTING)).startswith(b"+OK maildrop has 2 ")
        assert session.counters.method == "SASL PLAIN"

    def test_cancel(self) -> None:
        session = _sasl_challenged()
        assert rendered(session.receive_line(b"*")) == b"-ERR authentication cancelled\r\n"
        assert session.state is State.AUTHORIZATION
        assert rendered(session.receive_line(b"NOOP")) == WRONG_STATE

    def test_a_line_that_looks_like_a_command_is_an_answer(self) -> None:
        session = _sasl_challenged()
        assert session.receive_line(b"QUIT") == StepSASL(base64.b64decode(b"QUIT"))

    def test_a_refused_step_ends_the_exchange(self) -> None:
        session = _sasl_step()
        assert rendered(session.sasl_refused(Status(False, "malformed"))) == b"-ERR malformed\r\n"
        assert rendered(session.receive_line(b"USER alice")) == b"+OK send PASS\r\n"

    def test_auth_forgets_a_pending_user(self) -> None:
        session = _user_given()
        session.receive_line(b"AUTH PLAIN")
        session.sasl_refused(Status(False, "malformed"))
        assert rendered(session.receive_line(b"PASS wonderland")) == b"-ERR send USER first\r\n"


class TestLoginPending:
    """RFC 2449 section 6.6: pipelined commands wait for the login's outcome."""

    def test_no_line_is_taken_until_the_outcome(self) -> None:
        session = _login_pending()
        with pytest.raises(SessionBusy):
            session.receive_line(b"STAT")
        assert session.state is State.LOGIN_PENDING
        session.login_succeeded(LISTING)
        assert rendered(session.receive_line(b"STAT")) == b"+OK 2 30\r\n"

    def test_a_login_that_completes_after_the_client_left_is_released(self) -> None:
        session = _login_pending()
        assert session.connection_lost() == DisconnectedBeforeLogin(0)
        assert session.login_succeeded(LISTING) == ReleaseMaildrop()
        assert session.user is None


class TestTransaction:
    def test_retr_counts_what_was_sent(self) -> None:
        session = _transaction()
        assert session.receive_line(b"RETR 2") == OpenMessage(1)
        stream = session.message_opened(_body())
        assert isinstance(stream, MessageStream)
        assert rendered(stream) == b"+OK 20 octets\r\n"
        assert stream.expected_size == 20
        # Retrieved once it went out whole (the protocol says so), not before.
        assert (session.counters.retrieved_messages, session.counters.retrieved_octets) == (0, 0)
        session.message_sent()
        assert (session.counters.retrieved_messages, session.counters.retrieved_octets) == (1, 20)

    def test_top_counts_nothing(self) -> None:
        session = _transaction()
        session.receive_line(b"TOP 1 0")
        stream = session.message_opened(_body())
        assert rendered(stream) == b"+OK top of message follows\r\n"
        assert isinstance(stream, MessageStream)
        assert stream.expected_size is None
        assert session.counters.retrieved_messages == 0

    def test_a_deleted_message_is_gone_until_rset(self) -> None:
        """RFC 1939 section 5: DELE marks, RSET unmarks."""
        session = _transaction()
        session.receive_line(b"DELE 1")
        assert rendered(session.receive_line(b"DELE 1")) == b"-ERR message already deleted\r\n"
        assert rendered(session.receive_line(b"RETR 1")) == b"-ERR no such message\r\n"
        assert rendered(session.receive_line(b"STAT")) == b"+OK 1 20\r\n"
        assert rendered(session.receive_line(b"LIST")) == (
            b"+OK 1 messages (20 octets)\r\n2 20\r\n.\r\n"
        )
        session.receive_line(b"RSET")
        assert rendered(session.receive_line(b"STAT")) == b"+OK 2 30\r\n"

    def test_bad_commands_close_the_connection(self) -> None:
        session = _transaction()
        for _ in range(19):
            assert rendered(session.receive_line(b"XYZZY")) == b"-ERR unknown command\r\n"
        closing = session.receive_line(b"XYZZY")
        assert closing == CloseForAbuse(
            Hangup(Status(False, "too many bad commands, closing connection")), 20
        )
        assert rendered(closing) == b"-ERR too many bad commands, closing connection\r\n"

    def test_a_good_command_ends_a_run_of_bad_ones(self) -> None:
        session = make_session()
        for _ in range(5):
            session.receive_line(b"XYZZY")
            assert rendered(session.receive_line(b"XYZZY")) == b"-ERR unknown command\r\n"
            session.receive_line(b"CAPA")
        assert rendered(session.line_too_long()) == b"-ERR line too long\r\n"


class TestUpdate:
    """RFC 1939 section 6 (and RFC 2449 section 6.7, EXPIRE)."""

    def test_the_plan(self) -> None:
        session = _transaction()
        session.receive_line(b"RETR 2")
        session.message_opened(_body())
        session.message_sent()
        session.receive_line(b"DELE 1")
        assert session.receive_line(b"QUIT") == RunUpdate(
            remove=frozenset({0}),
            expire_days=None,
            expire_candidates=frozenset(),
            retrieved=frozenset({1}),
            message_count=2,
        )
        ended = session.update_done(frozenset({0}))
        assert ended == EndSession("logged out", Hangup(Status(True, "bye")))
        assert rendered(ended) == b"+OK bye\r\n"
        counters = session.counters
        assert (counters.deleted_messages, counters.deleted_octets) == (1, 10)
        assert session.state is State.CLOSED

    def test_expire_0_removes_what_was_retrieved(self) -> None:
        session = make_session(expire_days=0)
        session.receive_line(b"USER alice")
        session.receive_line(b"PASS wonderland")
        session.login_succeeded(LISTING)
        session.receive_line(b"RETR 2")
        session.message_opened(_body())
        session.message_sent()
        plan = session.receive_line(b"QUIT")
        assert isinstance(plan, RunUpdate)
        assert plan.remove == frozenset({1})
        assert plan.expire_days is None

    def test_expire_0_keeps_a_message_whose_retr_failed(self) -> None:
        """RFC 2449 section 6.7: only what was "downloaded with RETR" goes."""
        session = make_session(expire_days=0)
        session.receive_line(b"USER alice")
        session.receive_line(b"PASS wonderland")
        session.login_succeeded(LISTING)
        session.receive_line(b"RETR 2")
        session.message_opened(_body())  # then the read fails: never sent
        plan = session.receive_line(b"QUIT")
        assert isinstance(plan, RunUpdate)
        assert plan.remove == frozenset()
        assert plan.retrieved == frozenset()

    def test_expire_days_leave_the_choice_to_the_store(self) -> None:
        session = make_session(expire_days=3)
        session.receive_line(b"USER alice")
        session.receive_line(b"PASS wonderland")
        session.login_succeeded(LISTING)
        for line in (b"RETR 1", b"RETR 2"):
            session.receive_line(line)
            session.message_opened(_body())
            session.message_sent()
        session.receive_line(b"DELE 2")
        plan = session.receive_line(b"QUIT")
        assert isinstance(plan, RunUpdate)
        assert (plan.remove, plan.expire_days) == (frozenset({1}), 3)
        assert plan.expire_candidates == frozenset({0})

    def test_a_failed_update_still_ends_the_session(self) -> None:
        session = _update()
        failed = session.update_failed(Status(False, "some messages were not deleted"))
        assert failed == EndSession(
            "logged out", Hangup(Status(False, "some messages were not deleted"))
        )
        assert session.counters.deleted_messages == 0

    def test_no_line_during_update(self) -> None:
        session = _update()
        with pytest.raises(SessionBusy):
            session.receive_line(b"NOOP")


def test_the_greeting_carries_the_apop_timestamp() -> None:
    """RFC 1939 section 7."""
    assert make_session().greeting().to_bytes() == b"+OK pop3d ready <1.2@pop.example.test>\r\n"


def test_session_imports_nothing_of_twisted() -> None:
    """The session is sans-I/O (h11's rule): no Twisted, not even for types."""
    tree = ast.parse(Path(pop3d.session.__file__).read_text())
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.append(node.module)
    assert imported, "no imports found: the test is not reading session.py"
    assert [name for name in imported if name.split(".")[0] == "twisted"] == []
