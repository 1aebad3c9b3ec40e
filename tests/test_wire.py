"""
The wire format, bytes in and bytes out (RFC 1939 section 3, RFC 2449
sections 3-4).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.wire import (
    MAX_RESPONSE_LINE,
    Command,
    MalformedCommand,
    MessageEncoder,
    ResponseCode,
    Status,
    UnknownCommand,
    Verb,
    format_multiline,
    format_status,
    is_valid_uidl,
    parse_command,
    parse_line_count,
    parse_message_number,
    wire_size,
)


def encode(message: bytes, chunk_size: int | None = None, body_lines: int | None = None) -> bytes:
    encoder = MessageEncoder(body_lines)
    size = chunk_size or max(len(message), 1)
    out = [encoder.feed(message[i : i + size]) for i in range(0, len(message), size)]
    return b"".join(out) + encoder.finish()


def unstuff(response_body: bytes) -> bytes:
    """What a client makes of a multi-line body (RFC 1939 section 3)."""
    assert response_body.endswith(b".\r\n")
    lines = response_body[:-3].split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed line {line!r}"
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


class TestParseCommand:
    """RFC 1939 section 3: case-insensitive keywords, space-separated arguments."""

    def test_keyword_is_case_insensitive(self) -> None:
        assert parse_command(b"sTaT") == Command(Verb.STAT, ())

    def test_arguments_are_split_on_spaces(self) -> None:
        assert parse_command(b"TOP 1 10") == Command(Verb.TOP, (b"1", b"10"))

    def test_pass_keeps_spaces_in_the_password(self) -> None:
        # RFC 1939 section 7 (PASS): the argument may contain spaces.
        assert parse_command(b"PASS my secret  pass ") == Command(Verb.PASS, (b"my secret  pass ",))

    def test_pass_without_argument(self) -> None:
        # A syntax error of the grammar now, no longer of the session.
        parsed = parse_command(b"PASS")
        assert isinstance(parsed, MalformedCommand)
        assert parsed.verb is Verb.PASS
        assert str(parsed.reason) == "usage: PASS password"

    def test_unknown_keyword(self) -> None:
        assert parse_command(b"XYZZY 1") == UnknownCommand(b"XYZZY")

    def test_empty_line_is_unknown(self) -> None:
        assert isinstance(parse_command(b""), UnknownCommand)

    def test_keyword_is_never_looked_up_by_prefix(self) -> None:
        assert isinstance(parse_command(b"RETRX 1"), UnknownCommand)
        assert isinstance(parse_command(b"_table"), UnknownCommand)


class TestArguments:
    @pytest.mark.parametrize("raw,expected", [(b"1", 1), (b"42", 42), (b"007", 7)])
    def test_message_numbers(self, raw: bytes, expected: int) -> None:
        assert parse_message_number(raw) == expected

    @pytest.mark.parametrize("raw", [b"0", b"-1", b"+1", b"1.0", b"0x1", b"", b"one", b"\xd9\xa1"])
    def test_not_message_numbers(self, raw: bytes) -> None:
        assert parse_message_number(raw) is None

    def test_huge_number_is_a_number_that_names_no_message(self) -> None:
        assert parse_message_number(b"9" * 5000) == 10**18
        assert parse_message_number(b"0" * 5000 + b"7") == 7

    def test_line_count_may_be_zero(self) -> None:
        assert parse_line_count(b"0") == 0
        assert parse_line_count(b"-1") is None


class TestFormatStatus:
    """RFC 1939 section 3 and RFC 2449 section 3 (single-line grammar)."""

    def test_positive(self) -> None:
        assert format_status(True, "2 320") == b"+OK 2 320\r\n"

    def test_negative_with_code(self) -> None:
        assert (
            format_status(False, "maildrop is locked", ResponseCode.IN_USE)
            == b"-ERR [IN-USE] maildrop is locked\r\n"
        )

    def test_bare_status(self) -> None:
        assert Status(True).to_bytes() == b"+OK\r\n"

    def test_text_never_starts_with_a_bracket(self) -> None:
        assert format_status(False, "[not a code") == b"-ERR not a code\r\n"

    def test_control_characters_cannot_break_the_line(self) -> None:
        line = format_status(False, "evil\r\n+OK injected")
        assert line.count(b"\r\n") == 1 and line.endswith(b"\r\n")

    def test_at_most_512_octets(self) -> None:
        line = format_status(True, "x" * 2000)
        assert len(line) == MAX_RESPONSE_LINE and line.endswith(b"\r\n")

    def test_multiline_is_stuffed_and_terminated(self) -> None:
        assert format_multiline(Status(True, "list"), [b"1 10", b".hidden"]) == (
            b"+OK list\r\n1 10\r\n..hidden\r\n.\r\n"
        )


def _messages(*pieces: bytes) -> st.SearchStrategy[bytes]:
    """Stored messages: any octets, or ``pieces`` run together (line ends, dots)."""
    return st.binary(max_size=300) | st.lists(st.sampled_from(pieces)).map(b"".join)


class TestMessageEncoder:
    """RFC 1939 section 3 (byte-stuffing, termination) and section 11 (sizes)."""

    def test_lf_becomes_crlf(self) -> None:
        assert encode(b"a\nb\n") == b"a\r\nb\r\n.\r\n"

    def test_crlf_is_not_doubled(self) -> None:
        assert encode(b"a\r\nb\r\n") == b"a\r\nb\r\n.\r\n"

    def test_mixed_endings(self) -> None:
        assert encode(b"a\r\nb\nc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"

    def test_first_line_dot_is_stuffed(self) -> None:
        assert encode(b".first\n") == b"..first\r\n.\r\n"

    def test_lone_dot_line_is_stuffed(self) -> None:
        assert encode(b"a\n.\nb\n") == b"a\r\n..\r\nb\r\n.\r\n"

    def test_missing_final_newline_gets_one(self) -> None:
        assert encode(b"a\nlast") == b"a\r\nlast\r\n.\r\n"

    def test_dot_as_last_line_without_newline(self) -> None:
        assert encode(b"a\n.") == b"a\r\n..\r\n.\r\n"

    def test_empty_message(self) -> None:
        assert encode(b"") == b".\r\n"

    def test_bare_cr_is_kept(self) -> None:
        assert encode(b"a\rb\n") == b"a\rb\r\n.\r\n"

    def test_trailing_bare_cr(self) -> None:
        assert encode(b"a\r") == b"a\r\r\n.\r\n"
        assert wire_size(b"a\r") == 4

    @pytest.mark.parametrize("boundary", [1, 2, 3, 16 * 1024, 64 * 1024])
    def test_dot_at_a_chunk_boundary_is_stuffed(self, boundary: int) -> None:
        message = b"x" * (boundary - 1) + b"\n.dot\n"
        assert encode(message, chunk_size=boundary).endswith(b"\r\n..dot\r\n.\r\n")

    def test_a_cr_after_chunks_without_one(self) -> None:
        # The first chunks are LF only; the CR that comes later, at a chunk's
        # end, is held until the next chunk shows the LF after it.
        message = b".a\nb\n.c\r\nd"
        expected = b"..a\r\nb\r\n..c\r\nd\r\n.\r\n"
        assert encode(message) == expected
        # A CR ending the second chunk, in the middle of the second, starting the second.
        for chunk_size in (4, 6, 8):
            assert encode(message, chunk_size=chunk_size) == expected
            encoder = MessageEncoder()
            for i in range(0, len(message), chunk_size):
                encoder.feed(message[i : i + chunk_size])
            encoder.finish()
            assert encoder.size == len(b".a\r\nb\r\n.c\r\nd\r\n") == wire_size(message)

    def test_a_message_without_a_final_newline_is_counted_with_the_crlf_added(self) -> None:
        encoder = MessageEncoder()
        assert encoder.feed(b"a\nlast") + encoder.finish() == b"a\r\nlast\r\n.\r\n"
        assert encoder.size == len(b"a\r\nlast\r\n") == wire_size(b"a\nlast")

    def test_crlf_split_across_chunks_is_not_doubled(self) -> None:
        assert encode(b"ab\r\n.c\r\n", chunk_size=3) == b"ab\r\n..c\r\n.\r\n"

    def test_top_sends_headers_blank_line_and_n_lines(self) -> None:
        message = b"Subject: a\nFrom: b\n\nline1\nline2\nline3\n"
        assert encode(message, body_lines=2) == (
            b"Subject: a\r\nFrom: b\r\n\r\nline1\r\nline2\r\n.\r\n"
        )

    def test_top_zero_lines(self) -> None:
        assert encode(b"H: v\n\nbody\n", body_lines=0) == b"H: v\r\n\r\n.\r\n"

    def test_top_more_lines_than_the_body(self) -> None:
        assert encode(b"H: v\n\nbody", body_lines=10) == b"H: v\r\n\r\nbody\r\n.\r\n"

    def test_top_without_a_body(self) -> None:
        assert encode(b"H: v\nI: w\n", body_lines=3) == b"H: v\r\nI: w\r\n.\r\n"

    def test_top_stuffs_body_lines(self) -> None:
        assert encode(b"H: v\n\n.a\n.b\n", body_lines=1) == b"H: v\r\n\r\n..a\r\n.\r\n"

    def test_top_stops_reading(self) -> None:
        encoder = MessageEncoder(0)
        encoder.feed(b"H: v\n\nbody\n")
        assert encoder.done

    @given(
        message=_messages(b"a", b".", b"\n", b"\r", b"\r\n", b"..", b"x y"),
        chunk_size=st.integers(min_value=1, max_value=17),
    )
    def test_any_chunking_gives_the_same_bytes_and_the_announced_size(
        self, message: bytes, chunk_size: int
    ) -> None:
        whole = encode(message)
        assert encode(message, chunk_size=chunk_size) == whole
        unstuffed = unstuff(whole)
        # Unstuffing gives back the stored message with CRLF line endings...
        expected = re.sub(rb"(?<!\r)\n", b"\r\n", message)
        if message and not message.endswith(b"\n"):
            expected += b"\r\n"
        assert unstuffed == expected
        # ... and exactly as many octets as STAT and LIST announce.
        assert len(unstuffed) == wire_size(message)

    @given(
        message=_messages(b"a", b".", b"\n", b"\r", b"\r\n", b"\n.", b".\r\n"),
        chunk_size=st.integers(min_value=1, max_value=17),
    )
    def test_the_octets_counted_while_encoding_are_the_size_announced(
        self, message: bytes, chunk_size: int
    ) -> None:
        # RFC 1939 section 11: RETR sends the size LIST announced; the
        # encoder's count (dots added by byte-stuffing not counted) is what
        # tells a message cut while being sent from a whole one.
        encoder = MessageEncoder()
        for i in range(0, len(message), chunk_size):
            encoder.feed(message[i : i + chunk_size])
        encoder.finish()
        assert encoder.size == wire_size(message)

    @given(
        message=st.lists(st.sampled_from([b"H: v\n", b"\n", b".x\n", b"body\r\n", b"y"])).map(
            b"".join
        ),
        lines=st.integers(min_value=0, max_value=5),
        chunk_size=st.integers(min_value=1, max_value=9),
    )
    def test_top_does_not_depend_on_chunking(
        self, message: bytes, lines: int, chunk_size: int
    ) -> None:
        assert encode(message, chunk_size, lines) == encode(message, None, lines)


class TestUidl:
    """RFC 1939 section 7: 1 to 70 characters in 0x21-0x7E."""

    def test_valid(self) -> None:
        assert is_valid_uidl("1700000001.M1P2.host")

    @pytest.mark.parametrize("uid", ["", "a b", "x" * 71, "caf\u00e9", "tab\t"])
    def test_invalid(self, uid: str) -> None:
        assert not is_valid_uidl(uid)
