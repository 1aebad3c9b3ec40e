"""
The POP3 wire format: parsing command lines and formatting responses.

Nothing here does I/O or imports Twisted, so every rule of RFC 1939 section 3
(and RFC 2449 sections 3-4) about bytes on the wire lives in one place and is
tested with plain bytes.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol

CRLF = b"\r\n"
TERMINATOR = b".\r\n"

#: RFC 2449 section 4: servers supporting CAPA accept commands of up to 255
#: octets including CRLF; anything longer than this is refused without being
#: buffered whole.  The extra room is for SASL responses (RFC 5034 section 4).
MAX_COMMAND_LENGTH = 8192

#: RFC 1939 section 3 / RFC 2449 section 4: 512 octets including CRLF.
MAX_RESPONSE_LINE = 512

#: RFC 1939 section 7: a UIDL is 1 to 70 characters in the range 0x21-0x7E.
MAX_UIDL_LENGTH = 70

# A line starting with "." (after the first).  The regular expression engine
# finds it 1.5-3 times faster than bytes.replace, whose search for a
# two-octet pattern steps through about one octet per comparison.
_DOT_LINE = re.compile(rb"\n\.")
_LF = ord("\n")
_DOT = ord(".")


class Verb(enum.Enum):
    """
    The commands this server knows.  Client input is only ever looked up in
    this enumeration, never used as an attribute name.
    """

    # Looked up on every command: identity's hash, in C, not Enum's in Python
    # (as the session's State and Event).
    __hash__ = object.__hash__

    USER = "USER"
    PASS = "PASS"  # noqa: S105
    APOP = "APOP"
    QUIT = "QUIT"
    STAT = "STAT"
    LIST = "LIST"
    RETR = "RETR"
    DELE = "DELE"
    NOOP = "NOOP"
    RSET = "RSET"
    TOP = "TOP"
    UIDL = "UIDL"
    CAPA = "CAPA"
    AUTH = "AUTH"
    STLS = "STLS"
    UTF8 = "UTF8"
    LANG = "LANG"


_VERBS = {verb.value.encode("ascii"): verb for verb in Verb}
# Read for every command line: a global, not an attribute of the Enum class
# (whose metaclass's __getattr__ makes each such read slow).
_PASS = Verb.PASS


class Command(NamedTuple):
    """
    One command line that follows the grammar below: a known keyword and
    the arguments it takes.  PASS has one argument, the rest of the line.

    A named tuple, not a frozen dataclass as the other values: one is made
    for most command lines (every RETR), and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (measured on
    CPython 3.11: 4.6k instructions to make one, a named tuple 3.0k).
    """

    verb: Verb
    arguments: tuple[bytes, ...]


@dataclass(frozen=True)
class UnknownCommand:
    """A line whose keyword is not a command this server knows."""

    keyword: bytes


@dataclass(frozen=True)
class MalformedCommand:
    """
    A known keyword whose line breaks the grammar (RFC 1939 section 3: "a
    syntactically invalid command"): answered ``-ERR``, never run.
    ``reason`` says what is wrong, fit for the client.
    """

    verb: Verb
    reason: str | Text


@dataclass(frozen=True)
class Arguments:
    """
    What may follow a command's keyword: between ``fewest`` and ``most``
    arguments, each after exactly one SPACE; ``usage`` names them for the
    client.
    """

    fewest: int
    most: int
    usage: str


# The command grammar.  RFC 1939 section 3: "Keywords and arguments consist
# of printable ASCII characters.  Keywords and arguments are each separated
# by a single SPACE character.  Keywords are three or four characters long."
# So a line is KEYWORD *(SP 1*VCHAR), with exactly the arguments below.
#
# The exceptions, and only these:
# - PASS: its one argument is the rest of the line, spaces included (RFC 1939
#   section 7: "the argument may include spaces"), and octets beyond ASCII
#   (UTF-8 passwords are common); never NUL, CR or LF.  See `PASS_ARGUMENT`.
# - The arguments of USER and APOP may be UTF-8: pop3d announces "UTF8
#   USER", so they may before the UTF8 command too (RFC 6856 section 2.2);
#   PASS takes UTF-8 always (above).  See `UTF8_ARGUMENTS`.
# - A line answering a SASL challenge is not a command: it is base64 or "*"
#   (RFC 5034 section 5).  See `parse_sasl_response`.
# - The 40-character limit on an argument of RFC 1939 section 3 is lifted by
#   RFC 2449 section 4 for servers that announce CAPA (commands of up to 255
#   octets, here `MAX_COMMAND_LENGTH`): user names, SASL initial responses.
GRAMMAR: dict[Verb, Arguments] = {
    Verb.USER: Arguments(1, 1, "USER name"),
    Verb.PASS: Arguments(1, 1, "PASS password"),
    Verb.APOP: Arguments(2, 2, "APOP name digest"),
    Verb.QUIT: Arguments(0, 0, "QUIT"),
    Verb.STAT: Arguments(0, 0, "STAT"),
    Verb.LIST: Arguments(0, 1, "LIST [msg]"),
    Verb.RETR: Arguments(1, 1, "RETR msg"),
    Verb.DELE: Arguments(1, 1, "DELE msg"),
    Verb.NOOP: Arguments(0, 0, "NOOP"),
    Verb.RSET: Arguments(0, 0, "RSET"),
    Verb.TOP: Arguments(2, 2, "TOP msg n"),
    Verb.UIDL: Arguments(0, 1, "UIDL [msg]"),
    Verb.CAPA: Arguments(0, 0, "CAPA"),
    # AUTH alone lists the mechanisms (what Outlook sends); RFC 5034
    # section 4 for the mechanism and the optional initial response.
    Verb.AUTH: Arguments(0, 2, "AUTH [mechanism [initial-response]]"),
    Verb.STLS: Arguments(0, 0, "STLS"),
    # RFC 6856 sections 2.1 and 3.1.
    Verb.UTF8: Arguments(0, 0, "UTF8"),
    Verb.LANG: Arguments(0, 1, "LANG [language-range]"),
}

#: The commands whose arguments may be UTF-8 (RFC 6856 section 2.2).
UTF8_ARGUMENTS = frozenset({Verb.USER, Verb.APOP})

# The octets of an argument: printable ASCII (0x21-0x7E); for
# `UTF8_ARGUMENTS` also those beyond ASCII (checked as UTF-8 afterwards).
_ASCII_OCTETS = rb"\x21-\x7e"
_UTF8_OCTETS = _ASCII_OCTETS + rb"\x80-\xff"
# The rest of a command line: such arguments, each after exactly one space.
_ASCII_ARGUMENTS = re.compile(rb"(?: [" + _ASCII_OCTETS + rb"]+)*")
_UTF8_ARGUMENTS = re.compile(rb"(?: [" + _UTF8_OCTETS + rb"]+)*")
# An octet that may stand in no argument (nor be the space between them).
_ASCII_FORBIDDEN = re.compile(rb"[^ " + _ASCII_OCTETS + rb"]")
_UTF8_FORBIDDEN = re.compile(rb"[^ " + _UTF8_OCTETS + rb"]")
# PASS: one SPACE, then at least one octet of anything but NUL, CR and LF.
PASS_ARGUMENT = re.compile(rb" [^\x00\r\n]+")

BAD_SPACING = "keyword and arguments are separated by a single space"
BAD_OCTETS = "arguments are printable ASCII"
BAD_UTF8 = "arguments are UTF-8"
BAD_PASSWORD = "the password may not contain NUL"  # noqa: S105


def parse_command(line: bytes) -> Command | UnknownCommand | MalformedCommand:
    """
    Parse one command line, without its line terminator, by the grammar
    above.  Keywords are case-insensitive (RFC 1939 section 3).
    """
    keyword, space, rest = line.partition(b" ")
    # A keyword is three or four characters (RFC 1939 section 3), letters
    # but for the digit of RFC 6856's UTF8: every key of `_VERBS` is one,
    # and upper() changes only a-z, so a keyword is known exactly when its
    # upper case is a key (no pattern to match first).
    verb = _VERBS.get(keyword.upper())
    if verb is None:
        return UnknownCommand(keyword[:40])
    if not space:
        # The keyword alone (STAT, QUIT...: half of a usual session's
        # lines): no arguments to match, one Command per verb.
        bare = _BARE_COMMANDS.get(verb)
        return bare if bare is not None else MalformedCommand(verb, _usage(verb))
    if rest.isdigit() and verb in _ONE_ARGUMENT:
        # One message number (RETR 1, DELE 2, LIST 3: most of a session's
        # lines with an argument): ASCII digits are valid octets for every
        # verb, so there is no pattern to match and nothing to split.
        return Command(verb, (rest,))
    if verb is _PASS:
        if PASS_ARGUMENT.fullmatch(line, len(keyword)):
            return Command(verb, (rest,))
        if rest and b"\x00" in rest:
            return MalformedCommand(verb, BAD_PASSWORD)
        return MalformedCommand(verb, _usage(verb))
    eight_bit = verb in UTF8_ARGUMENTS
    shape = _UTF8_ARGUMENTS if eight_bit else _ASCII_ARGUMENTS
    if not shape.fullmatch(line, len(keyword)):
        return MalformedCommand(verb, _what_is_wrong(line[len(keyword) :], eight_bit))
    arguments = tuple(rest.split(b" ")) if rest else ()
    # The arguments are UTF-8 exactly when the rest of the line is: no
    # octet of a UTF-8 sequence is a space.
    if eight_bit and not rest.isascii() and not is_utf8(rest):
        return MalformedCommand(verb, BAD_UTF8)
    grammar = GRAMMAR[verb]
    if not grammar.fewest <= len(arguments) <= grammar.most:
        return MalformedCommand(verb, _usage(verb))
    return Command(verb, arguments)


#: The verbs that may take exactly one argument.
_ONE_ARGUMENT = frozenset(
    verb for verb, grammar in GRAMMAR.items() if grammar.fewest <= 1 <= grammar.most
)

#: The command of each verb that may be sent without arguments, as sent so.
_BARE_COMMANDS = {
    verb: Command(verb, ()) for verb, grammar in GRAMMAR.items() if not grammar.fewest
}


def _usage(verb: Verb) -> Text:
    """The reply to a command with the wrong arguments: how it is used."""
    return Text.of("usage: {usage}", usage=GRAMMAR[verb].usage)


def _what_is_wrong(rest: bytes, eight_bit: bool) -> str:
    """Why the arguments ``rest`` (from the space after the keyword on) break the grammar."""
    forbidden = _UTF8_FORBIDDEN if eight_bit else _ASCII_FORBIDDEN
    if forbidden.search(rest):
        return BAD_OCTETS
    return BAD_SPACING


def is_utf8(argument: bytes) -> bool:
    """Whether ``argument`` is well-formed UTF-8."""
    try:
        argument.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class SASLCancel:
    """The client cancelled a SASL exchange with "*" (RFC 5034 section 4)."""


def parse_sasl_response(line: bytes) -> bytes | SASLCancel | None:
    """
    A line answering a SASL challenge (RFC 5034 section 5): "*" cancels,
    anything else is base64 (an empty line is an empty response).  None for
    a line that is neither, with nothing stripped or skipped.
    """
    if line == b"*":
        return SASLCancel()
    return decode_base64(line)


def decode_base64(text: bytes) -> bytes | None:
    """Strict base64 (RFC 4648 section 4, as RFC 5034 section 5 requires), or None."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_message_number(argument: bytes) -> int | None:
    """
    A message-number argument: decimal digits only, greater than zero.

    Returns None for anything else, so that "+1", "0x1", " 1" or "1.0" are
    never mistaken for a message number.  ``isdigit`` alone would accept
    other scripts' digits in str, but these are bytes: ASCII only.
    """
    if not argument.isdigit():
        return None
    # Short numbers (every real one) without `_bounded_int`'s call.
    number = int(argument) if len(argument) <= 18 else _bounded_int(argument)
    return number if number > 0 else None


def parse_line_count(argument: bytes) -> int | None:
    """The non-negative line count of TOP (RFC 1939 section 7)."""
    if not argument.isdigit():
        return None
    return _bounded_int(argument)


#: Larger than any message number or line count can be, small enough to parse.
_HUGE = 10**18


def _bounded_int(digits: bytes) -> int:
    """An ASCII-digit string as an int, saturating instead of parsing megabytes."""
    significant = digits.lstrip(b"0")
    return _HUGE if len(significant) > 18 else int(significant or b"0")


class ResponseCode(enum.Enum):
    """Extended response codes (RFC 2449 section 8, RFC 3206)."""

    IN_USE = "IN-USE"
    LOGIN_DELAY = "LOGIN-DELAY"
    AUTH = "AUTH"
    SYS_TEMP = "SYS/TEMP"
    SYS_PERM = "SYS/PERM"


@dataclass(frozen=True)
class Text:
    """
    A reply text with values in it: the English ``template`` (the message
    id a translation looks up, RFC 6856 section 3) and the values of its
    placeholders, filled in only once the text is worded for a session.
    ``str()`` is the English text.
    """

    template: str
    values: tuple[tuple[str, str | int], ...] = ()

    @classmethod
    def of(cls, template: str, **values: str | int) -> Text:
        return cls(template, tuple(values.items()))

    def fill(self, template: str) -> str:
        """``template`` (this text's, or a translation of it) with the values in."""
        values = dict(self.values)
        try:
            return template.format_map(values)
        except (KeyError, IndexError, ValueError, AttributeError):
            # A translation with a placeholder of its own: English, not a traceback.
            return self.template.format_map(values)

    def __str__(self) -> str:
        return self.fill(self.template)


class Translator(Protocol):
    """
    How one session's replies are worded (RFC 6856 section 3): the texts
    in the language it chose, and whether they may be UTF-8.
    """

    @property
    def utf8(self) -> bool:
        """True once text beyond ASCII may be sent (after LANG or UTF8)."""

    def translate(self, text: str) -> str:
        """The translation of the English ``text``, or ``text`` itself."""


@dataclass(frozen=True)
class Status:
    """
    A single-line response: status indicator, optional code, text.  The
    text is English; a `Translator` words it for a session as it goes out.
    Response codes are never translated.
    """

    ok: bool
    text: str | Text = ""
    code: ResponseCode | None = None

    def to_bytes(self, translator: Translator | None = None, *, remember: bool = True) -> bytes:
        """
        The line as sent; ``remember`` False for a line never sent twice
        (the greeting, with its APOP timestamp), which would only push the
        replies that do repeat out of `format_status`'s memory.
        """
        format = format_status if remember else format_status.__wrapped__
        text = self.text
        if translator is None:
            return format(self.ok, text if isinstance(text, str) else str(text), self.code)
        if isinstance(text, Text):
            worded = text.fill(translator.translate(text.template))
        else:
            worded = translator.translate(text) if text else text
        return format(self.ok, worded, self.code, utf8=translator.utf8)


# Most replies repeat ("+OK", the same STAT of an unchanged maildrop, BYE):
# remembered, they cost a dictionary lookup instead of checks and joins.
# The text is part of the key: a translated reply is remembered as itself.
@functools.lru_cache(maxsize=1024)
def format_status(
    ok: bool, text: str = "", code: ResponseCode | None = None, *, utf8: bool = False
) -> bytes:
    """
    Format a single-line response.

    The result always ends with CRLF and never exceeds 512 octets; human text
    never starts with "[" (RFC 2449 section 3, ``schar``), so a client cannot
    mistake it for a response code.  The text is printable ASCII unless
    ``utf8`` (RFC 6856: after LANG or UTF8), when it is printable UTF-8 and
    is cut, if it must be, between characters.
    """
    parts = [b"+OK" if ok else b"-ERR"]
    if code is not None:
        parts.append(b"[" + code.value.encode("ascii") + b"]")
    safe_text = _printable_utf8(text) if utf8 else _printable(text)
    if code is None:
        safe_text = safe_text.lstrip("[")
    if safe_text:
        parts.append(safe_text.encode("utf-8" if utf8 else "ascii"))
    line = b" ".join(parts)
    if len(line) > MAX_RESPONSE_LINE - len(CRLF):
        line = line[: MAX_RESPONSE_LINE - len(CRLF)]
        if utf8:
            line = line.decode("utf-8", "ignore").encode("utf-8")
    return line + CRLF


def _printable(text: str) -> str:
    """Text restricted to printable ASCII, so it cannot break the framing."""
    if not (text.isascii() and text.isprintable()):
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text.strip()


def _printable_utf8(text: str) -> str:
    """Printable text of any script: no controls, line separators or surrogates."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text.strip()


def format_multiline(
    status: Status,
    lines: list[bytes],
    formatted: bytes = b"",
    translator: Translator | None = None,
) -> bytes:
    """
    A complete multi-line response whose lines are already known (CAPA, LIST,
    UIDL): status line, byte-stuffed lines, terminator (RFC 1939 section 3).
    ``formatted`` lines follow ``lines``, already stuffed and CRLF-terminated.
    Only the status line is worded by ``translator``.
    """
    body = [status.to_bytes(translator)]
    for line in lines:
        if line.startswith(b"."):
            line = b"." + line
        body.append(line + CRLF)
    body.append(formatted)
    body.append(TERMINATOR)
    return b"".join(body)


def is_valid_uidl(uid: str) -> bool:
    """RFC 1939 section 7: 1 to 70 characters in 0x21-0x7E."""
    # ASCII, printable and no space: exactly 0x21-0x7E, at C speed.
    return (
        0 < len(uid) <= MAX_UIDL_LENGTH and uid.isascii() and uid.isprintable() and (" " not in uid)
    )


class LineEndingNormalizer:
    """
    Turns stored message bytes, chunk by chunk, into CRLF-terminated lines.

    A bare LF becomes CRLF; a CRLF stays a CRLF (never ``\\r\\r\\n``).  A CR
    at the end of a chunk is held back until the next chunk shows whether an
    LF follows it, so the result does not depend on where chunks split.
    """

    # Made for every message sized, every TOP, and a RETR of a message with a
    # CR in it or with client workarounds: slots, no dict to make.
    __slots__ = ("_empty", "_ends_with_newline", "_held_cr")

    def __init__(self, *, empty: bool = True, ends_with_newline: bool = True) -> None:
        """
        A normalizer at the start of a message, or (``empty``,
        ``ends_with_newline``) one taking over after chunks without a CR
        were converted elsewhere.
        """
        self._held_cr = False
        self._ends_with_newline = ends_with_newline
        self._empty = empty

    def feed(self, chunk: bytes) -> bytes:
        if b"\r" not in chunk and not self._held_cr:
            # Mail as MTAs store it: LF only, one C-speed pass instead of two
            # (and what `_take` would do, without a call for every message).
            if chunk:
                self._empty = False
                self._ends_with_newline = chunk[-1] == _LF
            return chunk.replace(b"\n", b"\r\n")
        chunk = self._take(chunk)
        return chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def measure(self, chunk: bytes) -> int:
        """How many octets `feed` would return for ``chunk``, without making them."""
        chunk = self._take(chunk)
        if b"\r" not in chunk:
            # LF only: spare the slower two-octet count (see `feed`).
            return len(chunk) + count_newlines(chunk)
        return len(chunk) + count_newlines(chunk) - chunk.count(b"\r\n")

    def _take(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` that can be converted now (see the class)."""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if chunk:
            self._empty = False
            self._ends_with_newline = chunk.endswith(b"\n")
        return chunk

    def finish(self) -> bytes:
        """
        The bytes still owed at the end of the message: a held CR, and a final
        CRLF when the message does not end with a line ending, so that the
        terminator always starts a line of its own.
        """
        tail = b""
        if self._held_cr:
            tail = b"\r"
            self._empty = False
            self._ends_with_newline = False
        if not self._empty and not self._ends_with_newline:
            tail += CRLF
        return tail


class WireSizeCounter:
    """
    Counts the octets a message occupies on the wire before byte-stuffing:
    the size that STAT and LIST report and that RETR sends (RFC 1939
    section 11).  It uses the same normalisation as the encoder, so the two
    can never disagree.
    """

    def __init__(self) -> None:
        self._normalizer = LineEndingNormalizer()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += self._normalizer.measure(chunk)

    def finish(self) -> int:
        self.size += len(self._normalizer.finish())
        return self.size


def wire_size(message: bytes) -> int:
    """The wire size of a whole message held in memory."""
    if b"\r" not in message:
        # Mail as MTAs store it, LF only: what `LineEndingNormalizer` makes
        # of it, counted at C speed.
        ending = 0 if not message or message.endswith(b"\n") else len(CRLF)
        return len(message) + count_newlines(message) + ending
    counter = WireSizeCounter()
    counter.feed(message)
    return counter.finish()


def count_newlines(data: bytes) -> int:
    """How many LF octets ``data`` holds."""
    # bytes.count(b"\n") tests every octet; replace finds each LF with
    # memchr and skips the rest: half the time on a 5 KB message, and the
    # first login to a big Maildir counts every message's.
    return len(data) - len(data.replace(b"\n", b""))


class _TopLimiter:
    """
    Passes through the header, the blank line after it and then at most
    ``body_lines`` lines of a normalised (CRLF) message (RFC 1939 section 7,
    TOP).
    """

    def __init__(self, body_lines: int) -> None:
        self._in_header = True
        self._remaining = body_lines
        self._at_line_start = True

    @property
    def done(self) -> bool:
        return not self._in_header and self._remaining == 0

    def feed(self, data: bytes) -> bytes:
        kept: list[bytes] = []
        position = 0
        while position < len(data) and not self.done:
            newline = data.find(b"\n", position)
            if newline == -1:
                kept.append(data[position:])
                self._at_line_start = False
                break
            line = data[position : newline + 1]
            kept.append(line)
            if self._in_header:
                if self._at_line_start and line == CRLF:
                    self._in_header = False
            else:
                self._remaining -= 1
            self._at_line_start = True
            position = newline + 1
        return b"".join(kept)


@dataclass(frozen=True)
class ClientWorkarounds:
    """
    Changes to what RETR and TOP send, for mail clients that break on some
    messages (Dovecot's ``pop3_client_workarounds``, with the same names).
    Only the octets on the wire change, never the stored message, and never
    the sizes STAT, LIST and RETR announce (as in Dovecot): those come from
    the store without reading every message.
    """

    #: ``outlook-no-nuls``: Outlook and Outlook Express hang on a message
    #: holding a NUL octet; each one is sent as 0x80 instead (one octet for
    #: one, so sizes are unchanged).
    outlook_no_nuls: bool = False
    #: ``oe-ns-eoh``: Outlook Express and Netscape Mail break on a message
    #: without the blank line that ends the header (a header-only message,
    #: which RFC 5322 allows); one is sent at its end.  These 2 octets come
    #: after all the announced ones and are not counted in them.
    oe_ns_eoh: bool = False

    @property
    def enabled(self) -> bool:
        """True if any workaround is on (else messages are sent as usual)."""
        return self.outlook_no_nuls or self.oe_ns_eoh

    @classmethod
    def parse(cls, text: str) -> ClientWorkarounds:
        """
        Workarounds named as in Dovecot's setting: separated by spaces or
        commas, in any case; an empty text names none.  An unknown name
        raises `UnknownWorkaround`.
        """
        known = {_workaround_name(field.name): field.name for field in fields(cls)}
        enabled: dict[str, bool] = {}
        for name in text.replace(",", " ").split():
            field_name = known.get(name.lower())
            if field_name is None:
                raise UnknownWorkaround(name, tuple(known))
            enabled[field_name] = True
        # None named: the default itself, which `MessageEncoder` knows by
        # identity (no property read for every message).
        return cls(**enabled) if enabled else NO_WORKAROUNDS


def _workaround_name(field_name: str) -> str:
    """The Dovecot name of a `ClientWorkarounds` field."""
    return field_name.replace("_", "-")


class UnknownWorkaround(ValueError):
    """A client workaround name that is not one of `ClientWorkarounds`."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown workaround {name!r} (known: {', '.join(known)})")
        self.name = name


NO_WORKAROUNDS = ClientWorkarounds()


class _WorkaroundFilter:
    """
    Applies `ClientWorkarounds` to a normalised (CRLF) message as it goes
    out, chunk by chunk: the result does not depend on where chunks split.
    """

    def __init__(self, workarounds: ClientWorkarounds) -> None:
        self._replace_nuls = workarounds.outlook_no_nuls
        # With oe-ns-eoh off there is no header end to look for.
        self._header_ended = not workarounds.oe_ns_eoh
        self._at_line_start = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        if not self._header_ended:
            # Normalised data never ends with a bare CR (the normaliser holds
            # one back), so a blank line is either whole in this chunk or
            # starts it, right after a line ending in the previous one.
            self._header_ended = (
                self._at_line_start and data.startswith(CRLF)
            ) or b"\r\n\r\n" in data
            self._at_line_start = data.endswith(b"\n")
        if self._replace_nuls:
            data = data.replace(b"\0", b"\x80")
        return data

    def finish(self) -> bytes:
        """The blank line ending the header, for a message that had none."""
        return b"" if self._header_ended else CRLF


class MessageEncoder:
    """
    Encodes a stored message as the body of a RETR or TOP response.

    Feed it the stored bytes in chunks of any size; it returns the bytes to
    send, CRLF-normalised and byte-stuffed wherever a line starts with "."
    (including the first line and lines that straddle chunks).  ``finish``
    returns the rest, ending with the terminator "CRLF.CRLF".
    ``workarounds`` change the octets sent for clients that need it.
    """

    # One is made for every RETR and TOP: slots, no dict to make.
    __slots__ = ("_at_line_start", "_limiter", "_normalizer", "_workarounds", "done", "size")

    def __init__(
        self, body_lines: int | None = None, workarounds: ClientWorkarounds = NO_WORKAROUNDS
    ) -> None:
        #: Octets of the message encoded so far, before byte-stuffing: what
        #: LIST announced, once the whole message is through.  A blank line
        #: that oe-ns-eoh adds is not counted, so it cannot hide a message
        #: cut short.
        self.size = 0
        self._limiter = _TopLimiter(body_lines) if body_lines is not None else None
        self._workarounds = (
            None
            if workarounds is NO_WORKAROUNDS or not workarounds.enabled
            else _WorkaroundFilter(workarounds)
        )
        # RETR as nearly every client gets it, of mail as MTAs store it (LF
        # only), is encoded by `feed` itself: a normalizer is made at the
        # first CR, or at once for TOP and workarounds.  (Measured with
        # benchmarks/instructions.py: 5.3k of the 379k instructions of a
        # RETR of 20 KB, four calls and an object fewer.)
        self._normalizer: LineEndingNormalizer | None = (
            None if self._limiter is None and self._workarounds is None else LineEndingNormalizer()
        )
        self._at_line_start = True
        #: True once TOP has all the lines it wants: read no further.  (An
        #: attribute, not a property: read twice for every message.)
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        normalizer = self._normalizer
        if normalizer is None:
            if b"\r" not in chunk:
                # Stuffed before the line endings are made CRLF, with the
                # same result (a "." is added only after an LF, and every LF
                # becomes CRLF) and fewer octets for the regex to scan; what
                # `_stuff` and the normalizer would do, without their calls.
                if not chunk:
                    return chunk
                stuffed = _DOT_LINE.sub(b"\n..", chunk)
                if self._at_line_start and stuffed[0] == _DOT:
                    stuffed = b"." + stuffed
                self._at_line_start = chunk[-1] == _LF
                data = stuffed.replace(b"\n", b"\r\n")
                # An LF is two octets on the wire; the dots added are not counted.
                self.size += len(chunk) + len(data) - len(stuffed)
                return data
            # A CR: from here on, a normalizer holds a CR that ends a chunk.
            normalizer = self._normalizer = LineEndingNormalizer(
                empty=self.size == 0, ends_with_newline=self._at_line_start
            )
        if self._limiter is None and self._workarounds is None:
            stuffed = self._stuff(chunk)
            data = normalizer.feed(stuffed)
            self.size += len(data) - len(stuffed) + len(chunk)
            return data
        data = normalizer.feed(chunk)
        if self._limiter is not None:
            data = self._limiter.feed(data)
            self.done = self._limiter.done
        self.size += len(data)
        if self._workarounds is not None:
            data = self._workarounds.feed(data)
        return self._stuff(data)

    def finish(self) -> bytes:
        normalizer = self._normalizer
        if normalizer is None:
            # LF only: a line ending is owed by a message that ends without one.
            if self._at_line_start:
                return TERMINATOR
            self.size += len(CRLF)
            return CRLF + TERMINATOR
        tail = b"" if self.done else normalizer.finish()
        self.size += len(tail)
        if self._workarounds is not None:
            tail = self._workarounds.feed(tail) + self._workarounds.finish()
        # Nearly always nothing is owed: no call to stuff nothing.
        return self._stuff(tail) + TERMINATOR if tail else TERMINATOR

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return data
        stuffed = _DOT_LINE.sub(b"\n..", data)
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = stuffed.endswith(b"\n")
        return stuffed
