"""
The protocol, bytes in and bytes out: every command in every state, every
error path (RFC 1939 sections 3-9, RFC 2449, RFC 3206), driven through a
StringTransport with a Clock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropUnavailable
from pop3d.factory import POP3Factory
from pop3d.protocol import DEFAULT_TIMEOUT
from pop3d.realm import MaildropRealm
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.testing import MemoryStore
from pop3d.wire import MAX_COMMAND_LENGTH

from .conftest import LOOPBACK_PEER, USERS, Logged, Wire

OK = b"+OK\r\n"

MESSAGE_1 = b"From: a@example.org\nSubject: one\n\nline 1\n.line 2\nline 3\n"
MESSAGE_2 = b"From: b@example.org\r\nSubject: two\r\n\r\nbody\r\n"
MESSAGE_3 = b"Subject: three\n\nno final newline"
SIZE_1 = len(MESSAGE_1) + MESSAGE_1.count(b"\n")
SIZE_2 = len(MESSAGE_2)
SIZE_3 = len(MESSAGE_3) + MESSAGE_3.count(b"\n") + 2
# The replies below spell these out: 62, 43 and 36 octets, 141 in all.


AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"


class _FailingTransport(StringTransport):
    """A transport whose next writes raise the exceptions in ``failures``."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.failures: list[Exception] = []

    def write(self, data: bytes) -> None:
        if self.failures:
            raise self.failures.pop()
        super().write(data)


class _WireWithFailingWrites(Wire):
    """A `Wire` whose transport can be told to fail a write."""

    transport: _FailingTransport

    def __init__(self, factory: POP3Factory, peer: IPv4Address = LOOPBACK_PEER) -> None:
        super().__init__(factory, peer, _FailingTransport(peer))


@pytest.fixture
def uids(store: MemoryStore) -> list[str]:
    return [store.deliver("alice", m) for m in (MESSAGE_1, MESSAGE_2, MESSAGE_3)]


@pytest.fixture
def logged_in(wire: Wire, uids: list[str]) -> Wire:
    assert wire.login() == b"+OK maildrop has 3 messages (141 octets)\r\n"
    return wire


def test_a_tls_failure_after_stls_closes_without_a_plaintext_answer(
    make_factory: Callable[..., POP3Factory], logged: Logged
) -> None:
    """
    RFC 2595 section 4: after +OK to STLS the next bytes are the TLS
    handshake.  A TLS context that cannot be had then (a bad reload on
    SIGHUP keeps the one in use: this is the last line of defence) leaves
    no honest answer: the connection is closed, and logged.
    """

    class BrokenTLS:
        def context_factory(self) -> object:
            raise OSError("cannot read the certificate")

    wire = Wire(make_factory(tls=BrokenTLS()))
    assert wire.command(b"STLS") == b"+OK begin TLS negotiation\r\n"
    assert wire.closed
    assert any(e.get("log_failure") is not None for e in logged.events)


class TestGreeting:
    """RFC 1939 section 4 (greeting) and section 7 (APOP timestamp)."""

    def test_greeting_carries_an_apop_timestamp(self, wire: Wire) -> None:
        assert re.fullmatch(
            rb"\+OK pop3d ready <[0-9a-f]{16}\.\d+@pop\.example\.test>\r\n", wire.greeting
        )

    def test_timestamp_is_fresh_on_every_greeting(self, factory: POP3Factory) -> None:
        assert Wire(factory).greeting != Wire(factory).greeting

    def test_no_timestamp_when_apop_cannot_be_verified(self, clock: Clock) -> None:
        portal = Portal(MaildropRealm(MemoryStore()), [_PasswordOnlyChecker()])
        assert Wire(POP3Factory(portal, clock=clock)).greeting == b"+OK pop3d ready\r\n"


class TestAuthorization:
    """RFC 1939 section 7 (USER, PASS, APOP), RFC 3206 section 4 ([AUTH])."""

    def test_user_then_pass(self, wire: Wire, uids: list[str]) -> None:
        assert wire.command(b"USER alice") == b"+OK send PASS\r\n"
        assert wire.command(b"PASS wonderland") == b"+OK maildrop has 3 messages (141 octets)\r\n"

    def test_wrong_password(self, wire: Wire) -> None:
        assert wire.login(b"alice", b"nope") == AUTH_FAILED

    def test_unknown_user_looks_like_a_wrong_password(self, wire: Wire) -> None:
        assert wire.command(b"USER mallory") == b"+OK send PASS\r\n"
        assert wire.command(b"PASS wonderland") == AUTH_FAILED

    def test_after_a_failure_user_must_be_sent_again(self, wire: Wire) -> None:
        wire.login(b"alice", b"nope")
        assert wire.command(b"PASS wonderland") == b"-ERR send USER first\r\n"

    def test_retry_after_failure(self, wire: Wire) -> None:
        wire.login(b"alice", b"nope")
        assert wire.login().startswith(b"+OK maildrop has")

    def test_pass_without_user(self, wire: Wire) -> None:
        assert wire.command(b"PASS wonderland") == b"-ERR send USER first\r\n"

    def test_password_with_spaces(self, make_factory: Callable[..., POP3Factory]) -> None:
        wire = Wire(make_factory())
        # The fixture's users have no spaces: build one that does.
        portal = wire.protocol.driver.portal
        checker = InMemoryUsernamePasswordDatabaseDontUse(carol=b"two words")
        portal.registerChecker(checker)
        wire.command(b"USER carol")
        assert wire.command(b"PASS two words").startswith(b"+OK")

    @pytest.mark.parametrize("line", [b"USER", b"USER a b", b"PASS"])
    def test_malformed(self, wire: Wire, line: bytes) -> None:
        assert wire.command(line).startswith(b"-ERR ")

    def test_apop(self, wire: Wire, uids: list[str]) -> None:
        timestamp = re.search(rb"<[^>]+>", wire.greeting)
        assert timestamp is not None
        digest = hashlib.md5(timestamp.group() + b"wonderland").hexdigest().encode()
        assert wire.command(b"APOP alice " + digest).startswith(b"+OK maildrop has 3 messages")

    def test_apop_digest_may_be_upper_case(self, wire: Wire) -> None:
        timestamp = re.search(rb"<[^>]+>", wire.greeting)
        assert timestamp is not None
        digest = hashlib.md5(timestamp.group() + b"wonderland").hexdigest().upper().encode()
        assert wire.command(b"APOP alice " + digest).startswith(b"+OK")

    def test_apop_wrong_digest(self, wire: Wire) -> None:
        assert wire.command(b"APOP alice " + b"0" * 32) == AUTH_FAILED

    def test_apop_digest_of_another_greeting_fails(self, factory: POP3Factory) -> None:
        first, second = Wire(factory), Wire(factory)
        timestamp = re.search(rb"<[^>]+>", first.greeting)
        assert timestamp is not None
        digest = hashlib.md5(timestamp.group() + b"wonderland").hexdigest().encode()
        assert second.command(b"APOP alice " + digest) == AUTH_FAILED

    @pytest.mark.parametrize("line", [b"APOP alice", b"APOP alice xyz", b"APOP"])
    def test_apop_malformed(self, wire: Wire, line: bytes) -> None:
        assert wire.command(line).startswith(b"-ERR ")

    def test_apop_not_offered(self, clock: Clock) -> None:
        portal = Portal(MaildropRealm(MemoryStore()), [_PasswordOnlyChecker()])
        wire = Wire(POP3Factory(portal, clock=clock))
        assert wire.command(b"APOP alice " + b"0" * 32) == b"-ERR APOP is not available\r\n"

    @pytest.mark.parametrize(
        "line", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"]
    )
    def test_transaction_commands_before_login(self, wire: Wire, line: bytes) -> None:
        assert wire.command(line) == b"-ERR command not valid in this state\r\n"
        assert not wire.closed

    def test_quit_before_login_closes_without_update(self, wire: Wire) -> None:
        assert wire.command(b"QUIT") == b"+OK bye\r\n"
        assert wire.closed

    def test_unsafe_user_name_is_refused_like_a_bad_password(
        self, wire: Wire, store: MemoryStore
    ) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse(**{"../bob": b"pw"})
        wire.protocol.driver.portal.registerChecker(checker)
        assert wire.login(b"../bob", b"pw") == AUTH_FAILED

    def test_maildrop_in_use(self, factory: POP3Factory, uids: list[str]) -> None:
        """RFC 2449 section 8.1.2: [IN-USE] when another session holds the maildrop."""
        first, second = Wire(factory), Wire(factory)
        assert first.login().startswith(b"+OK")
        assert second.login() == b"-ERR [IN-USE] maildrop is locked by another session\r\n"
        assert first.command(b"STAT").startswith(b"+OK 3 ")
        first.command(b"QUIT")
        assert second.login().startswith(b"+OK")

    def test_a_failed_login_releases_nothing_it_did_not_take(
        self, factory: POP3Factory, store: MemoryStore, uids: list[str]
    ) -> None:
        first = Wire(factory)
        first.login()
        Wire(factory).login()
        assert store.is_locked("alice")

    @pytest.mark.parametrize(
        "error,reply",
        [
            (
                MaildropUnavailable("cannot read maildir"),
                b"-ERR [SYS/TEMP] cannot read maildir\r\n",
            ),
            (
                MaildropUnavailable("cannot read maildir", permanent=True),
                b"-ERR [SYS/PERM] cannot read maildir\r\n",
            ),
        ],
        ids=["SYS/TEMP", "SYS/PERM"],
    )
    def test_maildrop_that_cannot_be_opened(
        self, clock: Clock, error: MaildropUnavailable, reply: bytes
    ) -> None:
        """RFC 1939 section 4 / RFC 3206: no +OK before the maildrop is open."""
        wire = _wire_for_store(clock, _FailingStore(error))
        assert wire.login() == reply
        # Still in AUTHORIZATION: transaction commands are refused.
        assert wire.command(b"STAT") == b"-ERR command not valid in this state\r\n"

    def test_unexpected_store_failure_is_logged_not_shown(
        self, clock: Clock, logged: Logged
    ) -> None:
        wire = _wire_for_store(clock, _FailingStore(RuntimeError("secret internals /etc/x")))
        answer = wire.login()
        assert answer == b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
        assert b"internals" not in answer
        assert any(e.get("log_failure") is not None for e in logged.events)

    def test_a_maildrop_whose_listing_fails_is_released(self, clock: Clock) -> None:
        """No +OK without a listing, and no lock kept for a login that failed."""
        store = _UnlistableStore()
        wire = _wire_for_store(clock, store)
        assert wire.login() == b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
        assert store.closed
        assert wire.command(b"STAT") == b"-ERR command not valid in this state\r\n"

    def test_a_message_that_cannot_be_opened_for_a_bug_is_a_sys_temp(
        self, clock: Clock, logged: Logged
    ) -> None:
        wire = _wire_for_store(clock, _FailingRemovalStore([b"Subject: a\r\n\r\nbody\r\n"]))
        wire.login()
        answer = wire.command(b"RETR 1")
        assert answer == b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
        assert any(e.get("log_failure") is not None for e in logged.events)
        # The session goes on.
        assert wire.command(b"STAT") == b"+OK 1 20\r\n"


class TestFailedLogins:
    """Brute-force defences: a wait before each failure, a limit per connection."""

    @pytest.fixture
    def slow_factory(self, make_factory: Callable[..., POP3Factory]) -> POP3Factory:
        return make_factory(login_failure_delay=2)

    def test_failure_is_answered_after_the_delay(
        self, slow_factory: POP3Factory, clock: Clock
    ) -> None:
        wire = Wire(slow_factory)
        assert wire.login(b"alice", b"nope") == b""
        clock.advance(1.9)
        assert wire.take() == b""
        clock.advance(0.1)
        assert wire.take() == AUTH_FAILED

    def test_unknown_user_waits_just_as_long(self, slow_factory: POP3Factory, clock: Clock) -> None:
        wire = Wire(slow_factory)
        wire.login(b"mallory", b"nope")
        clock.advance(1.9)
        assert wire.take() == b""
        clock.advance(0.1)
        assert wire.take() == AUTH_FAILED

    def test_the_delay_grows_for_a_peer_that_keeps_guessing(
        self, slow_factory: POP3Factory, clock: Clock
    ) -> None:
        """A new wrong password doubles the wait (2, 4, 8, 15 s: tests/test_throttle.py)."""
        first = Wire(slow_factory)
        first.login(b"alice", b"nope")
        clock.advance(2)
        second = Wire(slow_factory)
        second.login(b"alice", b"nope again")
        clock.advance(3.9)
        assert second.take() == b""
        clock.advance(0.1)
        assert second.take() == AUTH_FAILED

    def test_the_same_wrong_password_again_waits_no_longer(
        self, slow_factory: POP3Factory, clock: Clock
    ) -> None:
        """A client polling with a stale saved password is not punished more each time."""
        first = Wire(slow_factory)
        first.login(b"alice", b"nope")
        clock.advance(2)
        second = Wire(slow_factory)
        second.login(b"alice", b"nope")
        clock.advance(1.9)
        assert second.take() == b""
        clock.advance(0.1)
        assert second.take() == AUTH_FAILED

    def test_the_wait_does_not_hold_up_other_sessions(
        self, slow_factory: POP3Factory, clock: Clock, uids: list[str]
    ) -> None:
        guesser, user = Wire(slow_factory), Wire(slow_factory)
        guesser.login(b"alice", b"nope")
        assert user.login().startswith(b"+OK maildrop has")
        assert user.command(b"STAT").startswith(b"+OK 3 ")

    def test_commands_pipelined_behind_a_failure_wait_for_it(
        self, slow_factory: POP3Factory, clock: Clock
    ) -> None:
        wire = Wire(slow_factory)
        assert wire.send(b"USER alice\r\nPASS nope\r\nCAPA\r\n") == b"+OK send PASS\r\n"
        clock.advance(2)
        assert wire.take().startswith(AUTH_FAILED + b"+OK capability list follows\r\n")

    def test_a_deferred_reply_that_cannot_be_sent_closes_the_connection(
        self, slow_factory: POP3Factory, clock: Clock
    ) -> None:
        """A reply lost half-way must not leave the next one answering for it."""
        wire = _WireWithFailingWrites(slow_factory)
        wire.send(b"USER alice\r\nPASS nope\r\nNOOP\r\n")
        wire.transport.failures.append(RuntimeError("cannot send"))
        clock.advance(2)
        # Not "+OK" for NOOP, which the client would take for PASS's answer.
        assert wire.take() == b""
        assert wire.transport.disconnected

    def test_three_failures_close_the_connection(self, wire: Wire) -> None:
        assert wire.login(b"alice", b"one") == AUTH_FAILED
        assert wire.login(b"alice", b"two") == AUTH_FAILED
        assert not wire.closed
        assert wire.login(b"alice", b"three") == AUTH_FAILED
        assert wire.closed

    def test_apop_failures_count_too(self, wire: Wire) -> None:
        wire.login(b"alice", b"one")
        wire.command(b"APOP alice " + b"0" * 32)
        wire.login(b"alice", b"three")
        assert wire.closed


class TestCapa:
    """RFC 2449 section 5: CAPA in both states."""

    BEFORE = [
        b"TOP",
        b"UIDL",
        b"USER",
        b"RESP-CODES",
        b"PIPELINING",
        b"AUTH-RESP-CODE",
        b"EXPIRE NEVER",
        b"SASL CRAM-MD5 PLAIN LOGIN",
        # RFC 6856 sections 2.2 and 3.1.
        b"UTF8 USER",
        b"LANG",
    ]

    def test_before_login(self, wire: Wire) -> None:
        assert (
            wire.command(b"CAPA")
            == b"+OK capability list follows\r\n"
            + b"".join(c + b"\r\n" for c in self.BEFORE)
            + b".\r\n"
        )

    def test_after_login_everything_announced_before_is_announced_again(
        self, logged_in: Wire
    ) -> None:
        lines = logged_in.command(b"CAPA").split(b"\r\n")
        assert lines[0] == b"+OK capability list follows"
        assert lines[1:-2] == [*self.BEFORE, b"IMPLEMENTATION pop3d"]
        assert lines[-2:] == [b".", b""]


class TestTransaction:
    """RFC 1939 section 5 and the commands of sections 5 and 7."""

    def test_stat(self, logged_in: Wire) -> None:
        assert logged_in.command(b"STAT") == b"+OK 3 141\r\n"

    def test_list(self, logged_in: Wire) -> None:
        assert logged_in.command(b"LIST") == (
            b"+OK 3 messages (141 octets)\r\n1 62\r\n2 43\r\n3 36\r\n.\r\n"
        )

    def test_list_one(self, logged_in: Wire) -> None:
        assert logged_in.command(b"LIST 2") == b"+OK 2 43\r\n"

    @pytest.mark.parametrize("argument", [b"4", b"99999999999"])
    def test_list_no_such_message(self, logged_in: Wire, argument: bytes) -> None:
        assert logged_in.command(b"LIST " + argument) == b"-ERR no such message\r\n"

    @pytest.mark.parametrize(
        "line",
        [
            b"LIST 0",
            b"LIST x",
            b"LIST 1 2",
            b"STAT 1",
            b"RETR",
            b"RETR -1",
            b"TOP 1",
            b"TOP 1 x",
            b"TOP 1 -1",
            b"DELE",
            b"UIDL 1 2",
        ],
    )
    def test_malformed_arguments(self, logged_in: Wire, line: bytes) -> None:
        answer = logged_in.command(line)
        assert answer.startswith(b"-ERR ") and answer.count(b"\r\n") == 1

    def test_retr_sends_exact_bytes(self, logged_in: Wire) -> None:
        """RFC 1939 section 3: CRLF lines, byte-stuffed, CRLF.CRLF; section 11: size."""
        assert logged_in.command(b"RETR 1") == (
            b"+OK 62 octets\r\n"
            + b"From: a@example.org\r\nSubject: one\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n.\r\n"
        )

    def test_retr_crlf_stored(self, logged_in: Wire) -> None:
        assert logged_in.command(b"RETR 2") == b"+OK 43 octets\r\n" + MESSAGE_2 + b".\r\n"

    def test_retr_without_final_newline(self, logged_in: Wire) -> None:
        assert logged_in.command(b"RETR 3") == (
            b"+OK 36 octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n"
        )

    def test_top(self, logged_in: Wire) -> None:
        assert logged_in.command(b"TOP 1 2") == b"+OK top of message follows\r\n" + (
            b"From: a@example.org\r\nSubject: one\r\n\r\nline 1\r\n..line 2\r\n.\r\n"
        )

    def test_top_zero(self, logged_in: Wire) -> None:
        assert logged_in.command(b"TOP 2 0") == b"+OK top of message follows\r\n" + (
            b"From: b@example.org\r\nSubject: two\r\n\r\n.\r\n"
        )

    def test_dele_marks_and_hides(self, logged_in: Wire) -> None:
        assert logged_in.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
        assert logged_in.command(b"STAT") == b"+OK 2 79\r\n"
        assert logged_in.command(b"LIST") == (
            b"+OK 2 messages (79 octets)\r\n2 43\r\n3 36\r\n.\r\n"
        )
        for line in (b"RETR 1", b"LIST 1", b"TOP 1 0", b"UIDL 1"):
            assert logged_in.command(line) == b"-ERR no such message\r\n"

    def test_a_deleted_middle_message_leaves_uidl_and_list(
        self, logged_in: Wire, store: MemoryStore
    ) -> None:
        """RFC 1939 section 7: messages marked as deleted are not listed."""
        uids = logged_in.command(b"UIDL").split(b"\r\n")[1:4]
        logged_in.command(b"DELE 2")
        assert logged_in.command(b"UIDL") == b"+OK unique-id listing follows\r\n" + b"\r\n".join(
            [uids[0], uids[2], b".\r\n"]
        )
        assert logged_in.command(b"LIST") == (
            b"+OK 2 messages (98 octets)\r\n1 62\r\n3 36\r\n.\r\n"
        )

    def test_a_store_listing_messages_as_a_list_still_works(
        self,
        factory: POP3Factory,
        store: MemoryStore,
        uids: list[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Stores written before `MessageList` give a list of `MessageInfo`."""
        opening = store.open

        def open_as_list(mailbox: str) -> Deferred[IMaildrop]:
            def as_list(maildrop: IMaildrop) -> IMaildrop:
                maildrop.messages = list(maildrop.messages)  # type: ignore[assignment]
                return maildrop

            return opening(mailbox).addCallback(as_list)

        monkeypatch.setattr(store, "open", open_as_list)
        wire = Wire(factory)
        wire.login()
        assert wire.command(b"STAT") == b"+OK 3 141\r\n"
        assert wire.command(b"UIDL 2") == b"+OK 2 " + uids[1].encode() + b"\r\n"
        assert wire.command(b"LIST 3") == b"+OK 3 36\r\n"

    def test_commands_pipelined_behind_a_message_wait_for_all_of_it(self, logged_in: Wire) -> None:
        """RFC 2449 section 6.6: answers in order, even while output is held back."""
        logged_in.protocol.output_blocked(True)
        assert logged_in.send(b"RETR 1\r\nNOOP\r\n") == b""
        logged_in.protocol.output_blocked(False)
        assert logged_in.take() == b"+OK 62 octets\r\n" + (
            b"From: a@example.org\r\nSubject: one\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n.\r\n" + OK
        )

    def test_dele_twice(self, logged_in: Wire) -> None:
        logged_in.command(b"DELE 2")
        assert logged_in.command(b"DELE 2") == b"-ERR message already deleted\r\n"

    def test_dele_only_marks(self, logged_in: Wire, store: MemoryStore) -> None:
        """RFC 1939 section 6: nothing is removed before UPDATE."""
        logged_in.command(b"DELE 1")
        assert len(store.messages("alice")) == 3

    def test_rset_unmarks(self, logged_in: Wire) -> None:
        logged_in.command(b"DELE 1")
        logged_in.command(b"DELE 3")
        assert logged_in.command(b"RSET") == b"+OK maildrop has 3 messages (141 octets)\r\n"
        assert logged_in.command(b"LIST 1") == b"+OK 1 62\r\n"

    def test_noop(self, logged_in: Wire) -> None:
        assert logged_in.command(b"NOOP") == OK

    def test_uidl(self, logged_in: Wire, uids: list[str]) -> None:
        assert (
            logged_in.command(b"UIDL")
            == b"+OK unique-id listing follows\r\n"
            + b"".join(b"%d %s\r\n" % (i, uid.encode()) for i, uid in enumerate(uids, 1))
            + b".\r\n"
        )
        assert logged_in.command(b"UIDL 2") == b"+OK 2 " + uids[1].encode() + b"\r\n"

    @pytest.mark.parametrize("line", [b"USER alice", b"PASS x", b"APOP alice " + b"0" * 32])
    def test_authorization_commands_after_login(self, logged_in: Wire, line: bytes) -> None:
        assert logged_in.command(line) == b"-ERR command not valid in this state\r\n"

    def test_message_removed_by_another_program(
        self, logged_in: Wire, store: MemoryStore, uids: list[str]
    ) -> None:
        """A vanished message is -ERR, never +OK with an empty body."""
        store.remove_behind_the_servers_back("alice", uids[0])
        answer = logged_in.command(b"RETR 1")
        assert answer.startswith(b"-ERR ") and answer.count(b"\r\n") == 1
        assert logged_in.command(b"TOP 1 0").startswith(b"-ERR ")
        assert logged_in.command(b"RETR 2").startswith(b"+OK")

    def test_snapshot_ignores_new_mail(self, logged_in: Wire, store: MemoryStore) -> None:
        """RFC 1939 section 4: message numbers are fixed for the session."""
        store.deliver("alice", b"Subject: late\n\nlate\n")
        assert logged_in.command(b"STAT").startswith(b"+OK 3 ")
        assert logged_in.command(b"RETR 4") == b"-ERR no such message\r\n"

    def test_keywords_are_case_insensitive(self, logged_in: Wire) -> None:
        assert logged_in.command(b"stat").startswith(b"+OK 3 ")
        assert logged_in.command(b"Noop") == OK


class TestUpdate:
    """RFC 1939 section 6: deletions happen after QUIT, and only then."""

    def test_quit_removes_marked_messages(self, logged_in: Wire, store: MemoryStore) -> None:
        logged_in.command(b"DELE 1")
        logged_in.command(b"DELE 3")
        assert logged_in.command(b"QUIT") == b"+OK bye\r\n"
        assert logged_in.closed
        assert store.messages("alice") == [MESSAGE_2]
        assert not store.is_locked("alice")

    def test_quit_without_deletions(self, logged_in: Wire, store: MemoryStore) -> None:
        assert logged_in.command(b"QUIT") == b"+OK bye\r\n"
        assert len(store.messages("alice")) == 3

    def test_disconnect_deletes_nothing(self, logged_in: Wire, store: MemoryStore) -> None:
        logged_in.command(b"DELE 1")
        logged_in.disconnect()
        assert len(store.messages("alice")) == 3
        assert not store.is_locked("alice")

    def test_rset_then_quit_deletes_nothing(self, logged_in: Wire, store: MemoryStore) -> None:
        logged_in.command(b"DELE 1")
        logged_in.command(b"RSET")
        logged_in.command(b"QUIT")
        assert len(store.messages("alice")) == 3

    def test_failed_removal(self, clock: Clock, logged: Logged) -> None:
        store = _FailingRemovalStore([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"])
        wire = _wire_for_store(clock, store)
        wire.login()
        wire.command(b"DELE 1")
        assert (
            wire.command(b"QUIT")
            == b"-ERR [SYS/TEMP] 1 message(s) could not be deleted, try again later\r\n"
        )
        assert wire.closed and store.closed

    def test_store_raising_instead_of_failing_its_deferred(
        self, clock: Clock, logged: Logged
    ) -> None:
        """A store that breaks its contract still cannot keep the lock."""
        store = _FailingRemovalStore([b"a\n"], raise_at_once=PermissionError("cur/"))
        wire = _wire_for_store(clock, store)
        wire.login()
        wire.command(b"DELE 1")
        assert (
            wire.command(b"QUIT") == b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
        )
        assert wire.closed and store.closed

    def test_unexpected_failure_in_update(self, clock: Clock, logged: Logged) -> None:
        store = _FailingRemovalStore([b"a\n"], RuntimeError("disk on fire"))
        wire = _wire_for_store(clock, store)
        wire.login()
        wire.command(b"DELE 1")
        assert (
            wire.command(b"QUIT") == b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
        )
        assert wire.closed and store.closed
        assert any(e.get("log_failure") is not None for e in logged.events)

    def test_a_session_is_logged_once_with_counts_and_no_password(
        self, logged_in: Wire, logged: Logged
    ) -> None:
        logged_in.command(b"RETR 2")
        logged_in.command(b"DELE 1")
        logged_in.command(b"QUIT")
        [text] = logged.texts()
        # The default logout format is Dovecot's pop3_logout_format.
        assert re.fullmatch(
            r'\[[0-9a-z]+\.\d+\] session logged out: user="alice" peer=127\.0\.0\.1:40000'
            r" method=USER top=0/0, retr=1/43, del=1/3, size=141",
            text,
        ), text
        logout = logged.events
        assert logout[0]["session"] == text[1 : text.index("]")]
        assert logout[0]["outcome"] == "logged out"
        assert logout[0]["method"] == "USER"
        assert logout[0]["retrieved_messages"] == 1
        assert logout[0]["retrieved_octets"] == SIZE_2
        assert logout[0]["deleted_messages"] == 1
        assert logout[0]["deleted_octets"] == SIZE_1
        assert logout[0]["user"] == "alice"
        assert not any(USERS["alice"] in repr(e) for e in logged.events)


class TestTimeout:
    """RFC 1939 section 3: inactivity autologout, at least 10 minutes."""

    def test_default_is_ten_minutes(self, logged_in: Wire, clock: Clock) -> None:
        clock.advance(DEFAULT_TIMEOUT - 1)
        assert not logged_in.closed
        clock.advance(1)
        assert logged_in.closed

    def test_autologout_sends_nothing_and_deletes_nothing(
        self, logged_in: Wire, clock: Clock, store: MemoryStore
    ) -> None:
        logged_in.command(b"DELE 1")
        clock.advance(DEFAULT_TIMEOUT)
        assert logged_in.take() == b""
        logged_in.disconnect()
        assert len(store.messages("alice")) == 3
        assert not store.is_locked("alice")

    def test_activity_resets_the_timer(self, logged_in: Wire, clock: Clock) -> None:
        clock.advance(DEFAULT_TIMEOUT - 1)
        logged_in.command(b"NOOP")
        clock.advance(DEFAULT_TIMEOUT - 1)
        assert not logged_in.closed

    def test_timer_runs_before_login_too(self, wire: Wire, clock: Clock) -> None:
        clock.advance(DEFAULT_TIMEOUT)
        assert wire.closed

    def test_each_connection_times_out_after_its_own_last_command(
        self, factory: POP3Factory, clock: Clock
    ) -> None:
        # The connections of one server share one timer: none may time out
        # another's, or keep another alive, or go sooner or later than 600 s
        # after its own last command.
        first = Wire(factory)
        clock.advance(100)
        gone = Wire(factory)
        clock.advance(100)
        second = Wire(factory)
        clock.advance(300)
        first.command(b"CAPA")  # at 500: first's time starts again
        gone.disconnect()
        clock.advance(DEFAULT_TIMEOUT - 301)  # 799
        assert not first.closed
        assert not second.closed
        clock.advance(1)  # 800: 600 s after second connected
        assert second.closed
        assert not first.closed
        clock.advance(299)  # 1099
        assert not first.closed
        clock.advance(1)  # 1100: 600 s after first's CAPA
        assert first.closed


class TestPipelining:
    """RFC 2449 section 6.6: answers strictly in the order of the commands."""

    def test_all_in_one_write(self, wire: Wire, uids: list[str]) -> None:
        answer = wire.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nRETR 2\r\nNOOP\r\nQUIT\r\n")
        assert answer == (
            b"+OK send PASS\r\n"
            + b"+OK maildrop has 3 messages (141 octets)\r\n"
            + b"+OK 3 141\r\n"
            + b"+OK 43 octets\r\n"
            + MESSAGE_2
            + b".\r\n"
            + OK
            + b"+OK bye\r\n"
        )

    def test_waits_for_an_asynchronous_login(self, clock: Clock, store: MemoryStore) -> None:
        store.deliver("alice", MESSAGE_2)
        slow = _SlowStore(store)
        wire = _wire_for_store(clock, slow)
        assert (
            wire.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nNOOP\r\n") == b"+OK send PASS\r\n"
        )
        slow.release()
        assert wire.take() == b"+OK maildrop has 1 messages (43 octets)\r\n" + b"+OK 1 43\r\n" + OK

    def test_disconnect_during_login_releases_the_maildrop(
        self, clock: Clock, store: MemoryStore
    ) -> None:
        slow = _SlowStore(store)
        wire = _wire_for_store(clock, slow)
        wire.send(b"USER alice\r\nPASS wonderland\r\n")
        wire.disconnect()
        slow.release()
        assert not store.is_locked("alice")
        assert wire.take() == b""

    def test_commands_split_across_writes(self, wire: Wire) -> None:
        assert wire.send(b"NO") == b""
        assert wire.send(b"OP\r") == b""
        assert wire.send(b"\nCA") == b"-ERR command not valid in this state\r\n"

    def test_bare_lf_line_endings_are_accepted(self, wire: Wire) -> None:
        assert wire.send(b"USER alice\nPASS wonderland\n").endswith(b"octets)\r\n")


@implementer(IWriteDescriptor)
class _SocketLikeTransport(StringTransport):
    """
    A transport that, like a TCP connection, keeps what is written until
    told to send it (`doWrite`, which the reactor calls when the socket is
    writable); ``sent`` is what each `doWrite` sent.
    """

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.sent: list[bytes] = []
        self._unsent: list[bytes] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self._unsent.append(data)

    def doWrite(self) -> None:
        self.sent.append(b"".join(self._unsent))
        self._unsent = []

    def fileno(self) -> int:
        return -1

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "test"


class _SocketLikeWire(Wire):
    transport: _SocketLikeTransport

    def __init__(self, factory: POP3Factory, peer: IPv4Address = LOOPBACK_PEER) -> None:
        super().__init__(factory, peer, _SocketLikeTransport(peer))


class TestSendingAtOnce:
    """
    A reply leaves as soon as it is whole, not on the reactor's next turn
    (which would cost every command a second turn before the client sees
    its answer); the replies to commands pipelined together (RFC 2449
    section 6.6) leave together, in one send.
    """

    @pytest.fixture
    def wire(self, make_factory: Callable[..., POP3Factory], store: MemoryStore) -> _SocketLikeWire:
        store.deliver("alice", MESSAGE_2)
        return _SocketLikeWire(make_factory())

    def test_the_greeting_is_sent_at_once(self, wire: _SocketLikeWire) -> None:
        [greeting] = wire.transport.sent
        assert greeting.startswith(b"+OK ") and greeting == wire.greeting

    def test_each_reply_is_sent_before_the_next_command(self, wire: _SocketLikeWire) -> None:
        wire.command(b"USER alice")
        wire.command(b"PASS wonderland")
        wire.command(b"RETR 1")
        assert wire.transport.sent[1:] == [
            b"+OK send PASS\r\n",
            b"+OK maildrop has 1 messages (43 octets)\r\n",
            b"+OK 43 octets\r\n" + MESSAGE_2 + b".\r\n",
        ]

    def test_pipelined_replies_leave_in_one_send(self, wire: _SocketLikeWire) -> None:
        wire.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nNOOP\r\n")
        assert wire.transport.sent[1:] == [
            b"+OK send PASS\r\n"
            + b"+OK maildrop has 1 messages (43 octets)\r\n"
            + b"+OK 1 43\r\n"
            + OK
        ]

    def test_pipelined_messages_leave_with_the_other_replies_in_one_send(
        self, wire: _SocketLikeWire
    ) -> None:
        wire.command(b"USER alice")
        wire.command(b"PASS wonderland")
        wire.send(b"NOOP\r\nRETR 1\r\nTOP 1 0\r\nSTAT\r\nRETR 1\r\n")
        message = b"+OK 43 octets\r\n" + MESSAGE_2 + b".\r\n"
        assert wire.transport.sent[3:] == [
            b"+OK\r\n"
            + message
            + b"+OK top of message follows\r\nFrom: b@example.org\r\nSubject: two\r\n\r\n.\r\n"
            + b"+OK 1 43\r\n"
            + message
        ]

    def test_a_message_asked_for_alone_leaves_in_one_send(self, wire: _SocketLikeWire) -> None:
        wire.command(b"USER alice")
        wire.command(b"PASS wonderland")
        wire.send(b"RETR 1\r\n")
        wire.send(b"TOP 1 0\n")
        assert wire.transport.sent[3:] == [
            b"+OK 43 octets\r\n" + MESSAGE_2 + b".\r\n",
            b"+OK top of message follows\r\nFrom: b@example.org\r\nSubject: two\r\n\r\n.\r\n",
        ]

    def test_a_reply_that_comes_later_is_sent_when_it_comes(
        self, clock: Clock, store: MemoryStore
    ) -> None:
        store.deliver("alice", MESSAGE_2)
        slow = _SlowStore(store)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
        wire = _SocketLikeWire(POP3Factory(Portal(MaildropRealm(slow), [checker]), clock=clock))
        wire.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\n")
        assert wire.transport.sent[1:] == [b"+OK send PASS\r\n"]
        slow.release()
        assert wire.transport.sent[2:] == [
            b"+OK maildrop has 1 messages (43 octets)\r\n" + b"+OK 1 43\r\n"
        ]

    def test_a_transport_closing_on_its_own_is_left_to_close(
        self, clock: Clock, store: MemoryStore
    ) -> None:
        """
        The TLS layer closes the transport when the client ends TLS; a reply
        that comes after that is left to it too, or the connection would
        never close.
        """
        slow = _SlowStore(store)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
        wire = _SocketLikeWire(POP3Factory(Portal(MaildropRealm(slow), [checker]), clock=clock))
        wire.send(b"USER alice\r\nPASS wonderland\r\n")
        wire.transport.loseConnection()
        slow.release()
        assert wire.transport.sent[1:] == [b"+OK send PASS\r\n"]
        # Not lost: written, for the closing transport to send.
        assert wire.take() == b"+OK maildrop has 0 messages (0 octets)\r\n"

    def test_the_farewell_is_left_to_the_closing_transport(self, wire: _SocketLikeWire) -> None:
        """
        A TCP transport that has been told to close sends what is left and
        then closes: sending it from here would leave it open for good.
        """
        assert wire.send(b"QUIT\r\n") == b"+OK bye\r\n"
        assert wire.transport.disconnecting
        assert wire.transport.sent == [wire.greeting]


class TestAbuse:
    """Long lines and repeated bad commands (RFC 2449 section 4 for lengths)."""

    def test_255_octet_commands_are_accepted(self, wire: Wire) -> None:
        line = b"USER " + b"u" * 248
        assert len(line + b"\r\n") == 255
        assert wire.command(line) == b"+OK send PASS\r\n"

    def test_overlong_line_is_refused_and_the_session_goes_on(self, wire: Wire) -> None:
        answer = wire.send(b"USER " + b"x" * (MAX_COMMAND_LENGTH + 10) + b"\r\nNOOP\r\n")
        assert answer == b"-ERR line too long\r\n" + b"-ERR command not valid in this state\r\n"

    def test_overlong_line_in_pieces_is_not_buffered(self, logged_in: Wire) -> None:
        piece = b"x" * 4096
        for _ in range(256):
            assert logged_in.send(piece) == b""
            assert logged_in.protocol.buffered_input <= MAX_COMMAND_LENGTH + 1
        assert logged_in.send(b"tail\r\nNOOP\r\n") == b"-ERR line too long\r\n" + OK

    def test_three_bad_commands_before_login_close(self, wire: Wire) -> None:
        assert wire.command(b"FOO") == b"-ERR unknown command\r\n"
        assert wire.command(b"STAT") == b"-ERR command not valid in this state\r\n"
        assert wire.command(b"BAR") == b"-ERR too many bad commands, closing connection\r\n"
        assert wire.closed

    def test_twenty_bad_commands_after_login_close(self, logged_in: Wire) -> None:
        for _ in range(19):
            assert logged_in.command(b"LIST x").startswith(b"-ERR ")
        assert not logged_in.closed
        assert logged_in.command(b"FOO") == b"-ERR too many bad commands, closing connection\r\n"
        assert logged_in.closed

    def test_no_such_message_is_not_abuse(self, logged_in: Wire) -> None:
        for _ in range(30):
            logged_in.command(b"RETR 99")
        assert not logged_in.closed

    def test_connections_per_ip_are_limited(self, make_factory: Callable[..., POP3Factory]) -> None:
        """RFC 3206 section 4: SYS/TEMP, the client may try again later."""
        factory = make_factory(max_connections_per_ip=2)
        first, _second = Wire(factory), Wire(factory)
        third = Wire(factory)
        assert third.greeting == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
        assert third.closed
        other_host = Wire(factory, IPv4Address("TCP", "127.0.0.2", 1))
        assert other_host.greeting.startswith(b"+OK")
        first.disconnect()
        assert Wire(factory).greeting.startswith(b"+OK")

    def test_connections_in_all_are_limited(self, make_factory: Callable[..., POP3Factory]) -> None:
        factory = make_factory(max_connections=1)
        Wire(factory)
        assert Wire(factory, IPv4Address("TCP", "127.0.0.2", 1)).greeting.startswith(
            b"-ERR [SYS/TEMP]"
        )

    def test_nothing_is_answered_after_a_hangup(self, wire: Wire) -> None:
        assert wire.send(b"QUIT\r\nCAPA\r\n") == b"+OK bye\r\n"


# -- test doubles -----------------------------------------------------------


def _wire_for_store(clock: Clock, store: Any) -> Wire:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
    return Wire(POP3Factory(Portal(MaildropRealm(store), [checker]), clock=clock))


class _PasswordOnlyChecker(InMemoryUsernamePasswordDatabaseDontUse):
    from twisted.cred.credentials import IUsernamePassword

    credentialInterfaces = (IUsernamePassword,)


@implementer(IMaildropStore)
class _FailingStore:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return fail(self.error)


@implementer(IMaildropStore)
class _UnlistableStore:
    """Opens a maildrop whose listing fails (a store with a bug)."""

    def __init__(self) -> None:
        self.closed = False

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return succeed(_UnlistableMaildrop(self))


@implementer(IMaildrop)
class _UnlistableMaildrop:
    def __init__(self, store: _UnlistableStore) -> None:
        self.store = store

    @property
    def messages(self) -> MessageList:
        raise RuntimeError("listing failed")

    def close(self) -> Deferred[None]:
        self.store.closed = True
        return succeed(None)


@implementer(IMaildropStore)
class _SlowStore:
    """Opens maildrops only when told to, like a store on a busy disk."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.pending: list[tuple[str, Deferred[IMaildrop]]] = []

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        waiting: Deferred[IMaildrop] = Deferred()
        self.pending.append((mailbox, waiting))
        return waiting

    def release(self) -> None:
        for mailbox, waiting in self.pending:
            self.inner.open(mailbox).chainDeferred(waiting)


@implementer(IMaildropStore)
class _FailingRemovalStore:
    def __init__(
        self,
        messages: Sequence[bytes],
        error: Exception | None = None,
        raise_at_once: Exception | None = None,
    ) -> None:
        self.messages = list(messages)
        self.error = error or DeletionFailed(1)
        self.raise_at_once = raise_at_once
        self.closed = False

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return succeed(_FailingRemovalMaildrop(self))


@implementer(IMaildrop)
class _FailingRemovalMaildrop:
    def __init__(self, store: _FailingRemovalStore) -> None:
        self.store = store
        self.messages = MessageList.of(
            MessageInfo(f"u{i}", len(m)) for i, m in enumerate(store.messages)
        )

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        raise NotImplementedError

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        if self.store.raise_at_once is not None:
            raise self.store.raise_at_once
        return fail(self.store.error)

    def close(self) -> Deferred[None]:
        self.store.closed = True
        return succeed(None)
