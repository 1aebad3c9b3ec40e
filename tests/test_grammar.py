"""
The command grammar of RFC 1939 section 3, command by command, with the
exact bytes a client sees.

RFC 1939 section 3: "Keywords and arguments consist of printable ASCII
characters.  Keywords and arguments are each separated by a single SPACE
character. [...] A server MUST respond to an unrecognized, unimplemented, or
syntactically invalid command by responding with a negative status
indicator."  A malformed line is answered ``-ERR`` and runs nothing: the
tests check both the reply and that the state did not change.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.testing import MemoryStore
from pop3d.wire import (
    Command,
    MalformedCommand,
    SASLCancel,
    UnknownCommand,
    Verb,
    parse_command,
    parse_sasl_response,
)

from .conftest import Wire

MESSAGE = b"Subject: one\n\nbody\n"
# 19 octets stored, each of its 3 LFs sent as CRLF.
STAT_REPLY = b"+OK 1 22\r\n"

SPACING = b"-ERR keyword and arguments are separated by a single space\r\n"
OCTETS = b"-ERR arguments are printable ASCII\r\n"
UNKNOWN = b"-ERR unknown command\r\n"


@pytest.fixture
def logged_in(wire: Wire, store: MemoryStore) -> Wire:
    store.deliver("alice", MESSAGE)
    wire.command(b"USER alice")
    assert wire.command(b"PASS wonderland") == b"+OK maildrop has 1 messages (22 octets)\r\n"
    return wire


# (line, reply) pairs in the TRANSACTION state: each line breaks the grammar.
MALFORMED_IN_TRANSACTION = [
    (b"RETR  1", SPACING),
    (b" NOOP", UNKNOWN),
    (b"STAT ", SPACING),
    (b"UIDL 1 ", SPACING),
    (b"LIST 1 ", SPACING),
    (b"LIST  1", SPACING),
    (b"CAPA x", b"-ERR usage: CAPA\r\n"),
    (b"QUIT 1", b"-ERR usage: QUIT\r\n"),
    (b"NOOP x", b"-ERR usage: NOOP\r\n"),
    (b"RSET 1", b"-ERR usage: RSET\r\n"),
    (b"STAT 1", b"-ERR usage: STAT\r\n"),
    (b"LIST 1 2", b"-ERR usage: LIST [msg]\r\n"),
    (b"UIDL 1 2", b"-ERR usage: UIDL [msg]\r\n"),
    (b"RETR", b"-ERR usage: RETR msg\r\n"),
    (b"RETR 1 2", b"-ERR usage: RETR msg\r\n"),
    (b"DELE", b"-ERR usage: DELE msg\r\n"),
    (b"DELE 1 1", b"-ERR usage: DELE msg\r\n"),
    (b"TOP", b"-ERR usage: TOP msg n\r\n"),
    (b"TOP 1", b"-ERR usage: TOP msg n\r\n"),
    (b"TOP 1 2 3", b"-ERR usage: TOP msg n\r\n"),
    (b"TOP 1  0", SPACING),
    (b"RETR\t1", UNKNOWN),
    (b"RETR 1\x00", OCTETS),
    (b"DELE \x001", OCTETS),
    (b"RETR \xd9\xa1", OCTETS),
    (b"LIST 1\x7f", OCTETS),
    (b"NOOP\x00", UNKNOWN),
    (b"", UNKNOWN),
    (b" ", UNKNOWN),
    (b"RE", UNKNOWN),
    (b"RETRX 1", UNKNOWN),
    (b"XTND XMIT", UNKNOWN),
]


class TestMalformedInTransaction:
    """Every malformed form is -ERR and changes nothing (RFC 1939 section 3)."""

    @pytest.mark.parametrize("line,reply", MALFORMED_IN_TRANSACTION)
    def test_refused_and_nothing_runs(
        self, logged_in: Wire, store: MemoryStore, line: bytes, reply: bytes
    ) -> None:
        assert logged_in.command(line) == reply
        assert not logged_in.closed
        # Nothing was marked, deleted or ended: the maildrop is as it was.
        assert logged_in.command(b"STAT") == STAT_REPLY
        assert logged_in.command(b"QUIT") == b"+OK bye\r\n"
        assert store.messages("alice") == [MESSAGE]

    def test_dele_with_a_trailing_space_deletes_nothing(
        self, logged_in: Wire, store: MemoryStore
    ) -> None:
        assert logged_in.command(b"DELE 1 ") == SPACING
        assert logged_in.command(b"QUIT") == b"+OK bye\r\n"
        assert store.messages("alice") == [MESSAGE]

    def test_quit_with_an_argument_neither_quits_nor_updates(
        self, logged_in: Wire, store: MemoryStore
    ) -> None:
        assert logged_in.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
        assert logged_in.command(b"QUIT 1") == b"-ERR usage: QUIT\r\n"
        assert not logged_in.closed
        logged_in.disconnect()
        assert store.messages("alice") == [MESSAGE]

    def test_retr_with_two_spaces_sends_no_message(self, logged_in: Wire) -> None:
        assert logged_in.command(b"RETR  1") == SPACING


# The same forms are valid when written to the letter.
VALID_IN_TRANSACTION = [
    (b"STAT", STAT_REPLY),
    (b"stat", STAT_REPLY),
    (b"LIST", b"+OK 1 messages (22 octets)\r\n1 22\r\n.\r\n"),
    (b"LIST 1", b"+OK 1 22\r\n"),
    (b"UIDL 1", b"+OK 1 mem-1\r\n"),
    (b"NOOP", b"+OK\r\n"),
    (b"RSET", b"+OK maildrop has 1 messages (22 octets)\r\n"),
    (b"RETR 1", b"+OK 22 octets\r\nSubject: one\r\n\r\nbody\r\n.\r\n"),
    (b"TOP 1 0", b"+OK top of message follows\r\nSubject: one\r\n\r\n.\r\n"),
    (b"LIST 2", b"-ERR no such message\r\n"),
]


@pytest.mark.parametrize("line,reply", VALID_IN_TRANSACTION)
def test_valid_forms_are_answered(logged_in: Wire, line: bytes, reply: bytes) -> None:
    assert logged_in.command(line) == reply


MALFORMED_IN_AUTHORIZATION = [
    (b"USER", b"-ERR usage: USER name\r\n"),
    (b"USER a b", b"-ERR usage: USER name\r\n"),
    (b"USER  alice", SPACING),
    (b"USER alice ", SPACING),
    (b"USER alice\x00STAT", OCTETS),
    (b"USER al\x01ice", OCTETS),
    # UTF-8 names are welcome ("UTF8 USER", RFC 6856 section 2.2), Latin-1 not.
    (b"USER \xe9lise", b"-ERR arguments are UTF-8\r\n"),
    (b"USER \xc3\xa9lise \xe9", b"-ERR arguments are UTF-8\r\n"),
    (b"USER \xc3\xa9lise \xc3\xa9", b"-ERR usage: USER name\r\n"),
    (b"PASS", b"-ERR usage: PASS password\r\n"),
    (b"PASS ", b"-ERR usage: PASS password\r\n"),
    (b"PASS wonder\x00land", b"-ERR the password may not contain NUL\r\n"),
    (b"APOP", b"-ERR usage: APOP name digest\r\n"),
    (b"APOP alice", b"-ERR usage: APOP name digest\r\n"),
    (b"APOP  alice " + b"0" * 32, SPACING),
    (b"AUTH PLAIN = x", b"-ERR usage: AUTH [mechanism [initial-response]]\r\n"),
    (b"AUTH  PLAIN", SPACING),
    (b"CAPA ", SPACING),
    (b"STLS x", b"-ERR usage: STLS\r\n"),
]


@pytest.mark.parametrize("line,reply", MALFORMED_IN_AUTHORIZATION)
def test_malformed_before_login(wire: Wire, line: bytes, reply: bytes) -> None:
    assert wire.command(line) == reply
    assert not wire.closed


def test_a_user_with_a_nul_is_not_remembered(wire: Wire) -> None:
    """``USER name<NUL>STAT`` is refused whole: no USER is pending after it."""
    assert wire.command(b"USER alice\x00STAT") == OCTETS
    assert wire.command(b"PASS wonderland") == b"-ERR send USER first\r\n"


def test_pass_keeps_spaces_and_utf8(wire: Wire, store: MemoryStore) -> None:
    """RFC 1939 section 7: PASS's argument is the rest of the line, spaces included."""
    wire.command(b"USER alice")
    # The password of the fixture is "wonderland": " wonderland" is another one.
    assert wire.command(b"PASS  wonderland") == (b"-ERR [AUTH] invalid user name or password\r\n")
    wire.command(b"USER alice")
    assert wire.command(b"PASS wonderland").startswith(b"+OK ")


class TestBadCommandLimit:
    """Rejected commands are counted in a row; a valid command resets the count."""

    def test_a_valid_command_resets_the_count_before_login(self, wire: Wire) -> None:
        for _ in range(5):
            assert wire.command(b"FOO") == UNKNOWN
            assert wire.command(b"STAT") == b"-ERR command not valid in this state\r\n"
            assert wire.command(b"CAPA").startswith(b"+OK ")
        assert not wire.closed

    def test_the_third_in_a_row_gets_an_err_then_the_close(self, wire: Wire) -> None:
        assert wire.command(b"FOO") == UNKNOWN
        assert wire.command(b"NOOP x") == b"-ERR usage: NOOP\r\n"
        assert not wire.closed
        assert wire.command(b"STAT ") == b"-ERR too many bad commands, closing connection\r\n"
        assert wire.closed

    def test_twenty_in_a_row_after_login(self, logged_in: Wire) -> None:
        for _ in range(19):
            assert logged_in.command(b"RETR  1") == SPACING
        assert logged_in.command(b"NOOP") == b"+OK\r\n"
        for _ in range(19):
            assert logged_in.command(b"LIST x") == b"-ERR invalid message number\r\n"
        assert not logged_in.closed
        assert logged_in.command(b"FOO") == b"-ERR too many bad commands, closing connection\r\n"
        assert logged_in.closed

    def test_a_valid_command_never_closes(self, logged_in: Wire) -> None:
        for _ in range(19):
            logged_in.command(b"FOO")
        # A -ERR for a valid command ("no such message") is not a bad command.
        assert logged_in.command(b"RETR 9") == b"-ERR no such message\r\n"
        assert not logged_in.closed
        assert logged_in.command(b"NOOP") == b"+OK\r\n"


class TestParser:
    """The grammar itself, in `pop3d.wire`, with no session around it."""

    @pytest.mark.parametrize(
        "line,parsed",
        [
            (b"STAT", Command(Verb.STAT, ())),
            (b"top 1 0", Command(Verb.TOP, (b"1", b"0"))),
            (b"LIST", Command(Verb.LIST, ())),
            (b"AUTH", Command(Verb.AUTH, ())),
            (b"AUTH PLAIN =", Command(Verb.AUTH, (b"PLAIN", b"="))),
            (b"PASS  a b ", Command(Verb.PASS, (b" a b ",))),
            (b"PASS p\xc3\xa4ss", Command(Verb.PASS, (b"p\xc3\xa4ss",))),
            (b"PASS tab\there", Command(Verb.PASS, (b"tab\there",))),
            (
                b"STAT ",
                MalformedCommand(
                    Verb.STAT, "keyword and arguments are separated by a single space"
                ),
            ),
            (b"USER a\x00", MalformedCommand(Verb.USER, "arguments are printable ASCII")),
            (b"HELLO", UnknownCommand(b"HELLO")),
            (b"ST", UnknownCommand(b"ST")),
        ],
    )
    def test_lines(self, line: bytes, parsed: object) -> None:
        assert parse_command(line) == parsed

    @given(
        keyword=st.sampled_from(
            [b"USER", b"pass", b"List", b"RETR", b"dele", b"UIDL", b"AUTH", b"LANG"]
        ),
        number=st.from_regex(rb"[0-9]{1,25}", fullmatch=True),
    )
    def test_one_number_is_an_argument(self, keyword: bytes, number: bytes) -> None:
        """
        RFC 1939 section 3: a keyword, a single SPACE, an argument of
        printable ASCII; digits are an argument of every command that takes
        one (what it means, a message number or a name, is the command's).
        """
        assert parse_command(keyword + b" " + number) == Command(
            Verb(keyword.upper().decode()), (number,)
        )

    @pytest.mark.parametrize(
        "line,usage",
        [
            (b"STAT 1", "STAT"),
            (b"QUIT 1", "QUIT"),
            (b"noop 12", "NOOP"),
            (b"RSET 3", "RSET"),
            (b"CAPA 1", "CAPA"),
            (b"STLS 1", "STLS"),
            (b"UTF8 1", "UTF8"),
            (b"TOP 1", "TOP msg n"),
            (b"APOP 1", "APOP name digest"),
        ],
    )
    def test_one_number_where_none_or_two_belong(self, line: bytes, usage: str) -> None:
        parsed = parse_command(line)
        assert isinstance(parsed, MalformedCommand)
        assert str(parsed.reason) == f"usage: {usage}"

    def test_utf8_user_names(self) -> None:
        """
        RFC 6856 section 2.2: pop3d announces "UTF8 USER", so USER and APOP
        take UTF-8 before the UTF8 command too; other octets beyond ASCII
        are refused, and other commands' arguments stay ASCII.
        """
        assert parse_command(b"USER \xc3\xa9lise") == Command(Verb.USER, (b"\xc3\xa9lise",))
        assert parse_command(b"APOP \xc3\xa9lise " + b"0" * 32) == Command(
            Verb.APOP, (b"\xc3\xa9lise", b"0" * 32)
        )
        assert parse_command(b"USER \xff") == MalformedCommand(Verb.USER, "arguments are UTF-8")
        assert parse_command(b"USER \xc3\xa9\x01") == MalformedCommand(
            Verb.USER, "arguments are printable ASCII"
        )
        assert parse_command(b"RETR \xd9\xa1") == MalformedCommand(
            Verb.RETR, "arguments are printable ASCII"
        )

    @pytest.mark.parametrize(
        "line,parsed",
        [
            (b"*", SASLCancel()),
            (b"", b""),
            (b"AGFsaWNl", b"\x00alice"),
            (b" AGFsaWNl", None),
            (b"AGFsaWNl ", None),
            (b"AGFsaW", None),
            (b" *", None),
            (b"*\x00", None),
        ],
    )
    def test_sasl_responses(self, line: bytes, parsed: object) -> None:
        """RFC 5034 section 5: base64 (an empty line: an empty response) or "*"."""
        assert parse_sasl_response(line) == parsed
