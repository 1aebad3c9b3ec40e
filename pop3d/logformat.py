"""
What the session log lines say, and how: session ids, user names quoted so
that they cannot forge a log line, and the logout line's format
(``--logout-format``, after Dovecot's ``pop3_logout_format``).

Pure text: no Twisted, no I/O.  `pop3d.driver` writes the lines.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

#: Dovecot's default ``pop3_logout_format``: its information (TOP, RETR and
#: DELE counts and octets, the maildrop's size) is more than pop3d's old
#: line had, so it is pop3d's default too.
DEFAULT_LOGOUT_FORMAT = "top=%t/%p, retr=%r/%b, del=%d/%m, size=%s"

#: The variables of ``--logout-format``: Dovecot's one-letter name, its long
#: name (written ``%{name}``), and what it stands for.
LOGOUT_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("t", "top_count", "TOP commands answered"),
    ("p", "top_bytes", "octets of messages sent by TOP"),
    ("r", "retr_count", "messages sent whole by RETR"),
    ("b", "retr_bytes", "octets of messages sent by RETR"),
    ("d", "deleted_count", "messages deleted at QUIT"),
    ("", "deleted_bytes", "octets of the messages deleted at QUIT"),
    ("m", "message_count", "messages in the maildrop at login"),
    ("s", "message_bytes", "octets of the maildrop at login"),
    ("u", "uidl_change", "a hash of the maildrop's UIDL list at login"),
)
_LONG_NAMES = {short: long for short, long, _ in LOGOUT_VARIABLES if short}
_KNOWN = {long for _, long, _ in LOGOUT_VARIABLES}
_VARIABLE = re.compile(r"%(?:\{([^}]*)\}|(.)|$)", re.DOTALL)


class LogoutFormatError(ValueError):
    """A ``--logout-format`` that names an unknown variable."""


@dataclass(frozen=True, slots=True)
class LogoutValues:
    """What a session did, as the logout line's variables see it."""

    top_count: int
    top_bytes: int
    retr_count: int
    retr_bytes: int
    deleted_count: int
    deleted_bytes: int
    message_count: int
    message_bytes: int
    uidls: Sequence[str]

    @property
    def uidl_change(self) -> str:
        """``%u``: computed only when the format names it."""
        return uidl_hash(self.uidls)


def uidl_hash(uidls: Sequence[str]) -> str:
    """
    8 hex digits that change when the maildrop's UIDL list changes (as
    Dovecot's ``%u``): an admin sees whether a client saw the same list.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    for uid in uidls:
        digest.update(uid.encode("utf-8") + b"\n")
    return digest.hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class LogoutFormat:
    """
    A parsed ``--logout-format``: literal text and variables (``%t`` or
    ``%{top_count}``, ``%%`` for a percent sign).
    """

    #: Literal text, or the long name of a variable (marked by ``True``).
    parts: tuple[tuple[bool, str], ...]
    # Made once from ``parts``: a %-format (its literal text with control
    # characters escaped) and what fills it, read in C; a session's last
    # line is rendered with one % (the line is logged for every session).
    _template: str = field(init=False, repr=False, compare=False)
    _fill: Callable[[LogoutValues], tuple[object, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        names = [part for is_variable, part in self.parts if is_variable]
        template = "".join(
            "%s" if is_variable else quote_controls(part).replace("%", "%%")
            for is_variable, part in self.parts
        )
        fill: Callable[[LogoutValues], tuple[object, ...]]
        if not names:
            fill = _no_values
        elif len(names) == 1:
            # attrgetter of one name gives the value, not a tuple.
            one = operator.attrgetter(names[0])
            fill = lambda values: (one(values),)  # noqa: E731
        else:
            fill = operator.attrgetter(*names)
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_fill", fill)

    @classmethod
    def parse(cls, text: str) -> LogoutFormat:
        parts: list[tuple[bool, str]] = []
        position = 0
        for match in _VARIABLE.finditer(text):
            if match.start() > position:
                parts.append((False, text[position : match.start()]))
            position = match.end()
            long_name, short_name = match.group(1), match.group(2)
            if short_name == "%":
                parts.append((False, "%"))
                continue
            name = long_name if long_name is not None else _LONG_NAMES.get(short_name or "")
            if name not in _KNOWN:
                shown = match.group(0) or "%"
                raise LogoutFormatError(
                    f"unknown variable {shown!r} in the logout format; known: "
                    + ", ".join(_variable_names())
                )
            assert name is not None
            parts.append((True, name))
        if position < len(text):
            parts.append((False, text[position:]))
        return cls(tuple(parts))

    @property
    def names(self) -> frozenset[str]:
        """The variables it uses (the UIDL hash is computed only if asked for)."""
        return frozenset(part for is_variable, part in self.parts if is_variable)

    def render(self, values: LogoutValues) -> str:
        return self._template % self._fill(values)


def _no_values(values: LogoutValues) -> tuple[object, ...]:
    return ()


def _variable_names() -> Iterator[str]:
    for short, long, _ in LOGOUT_VARIABLES:
        yield f"%{short} (%{{{long}}})" if short else f"%{{{long}}}"


# -- a log line's text ----------------------------------------------------------------


def escape_braces(text: str) -> str:
    """``text`` as a format with no field: what twisted.logger formats back to ``text``."""
    return text.replace("{", "{{").replace("}", "}}")


def render_format(format: str, fields: Mapping[str, object]) -> str | None:
    """
    The text twisted.logger makes of an event's ``format`` and ``fields``,
    done by ``str.format_map``, which reads fields, conversions and specs as
    twisted.logger does, at a tenth of the cost (Python's string.Formatter).
    None where it cannot be done here, so that twisted.logger does it (and
    says in the text what went wrong): a ``{callable()}`` field, or a format
    that fails.
    """
    if "()" in format:
        return None
    try:
        return format.format_map(fields)
    except Exception:
        return None


# -- quoting what a client sent ---------------------------------------------------

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: a
# log reader may take any of them for the end of a line.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_QUOTED = re.compile('[\\\\"\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _escape(match: re.Match[str]) -> str:
    character = match.group(0)
    if character in '\\"':
        return "\\" + character
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quote(text: str) -> str:
    """
    ``text`` between double quotes, with backslash, double quote and every
    control character escaped (``\\\\``, ``\\"``, ``\\xNN``): whatever a
    client sends, it stays one quoted field on one line.
    """
    return '"' + _QUOTED.sub(_escape, text) + '"'


def quote_controls(text: str) -> str:
    """``text`` with its control characters escaped, for text the admin wrote."""
    return _CONTROLS.sub(_escape, text)


def method_token(method: str) -> str:
    """A login method as one word: ``USER``, ``APOP``, ``SASL/PLAIN``."""
    return quote_controls(method).replace(" ", "/")


#: The logout line's default format, parsed.
DEFAULT_LOGOUT = LogoutFormat.parse(DEFAULT_LOGOUT_FORMAT)


# -- session ids -------------------------------------------------------------------


class SessionIds:
    """
    Short ids, unique in one process: ``PREFIX.N``.  The prefix tells the
    processes of ``--workers`` apart (by default the process id, in base 36).
    """

    def __init__(self, prefix: str | None = None) -> None:
        # Without a prefix, the process id of the first session: twistd
        # forks (to run as a daemon) after pop3d is imported.
        self._prefix = prefix
        self._numbers = itertools.count(1)

    def next_id(self) -> str:
        if self._prefix is None:
            self._prefix = _base36(os.getpid())
        return f"{self._prefix}.{next(self._numbers)}"


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


#: The ids of this process's sessions.
SESSION_IDS = SessionIds()
