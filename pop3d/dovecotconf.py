"""
Dovecot's ``*.conf.ext`` files (``dovecot-sql.conf.ext``,
``dovecot-ldap.conf.ext``, ``dovecot-oauth2.conf.ext``), read as Dovecot
2.3 reads them, so that one file serves Dovecot and pop3d unchanged.

The format: one ``key = value`` a line; leading and trailing white space
is dropped; a ``#`` outside quotes starts a comment; a line ending in ``\\``
goes on in the next line (joined with one space); a value wholly in double
or single quotes is unquoted (``\\`` escapes the next character);
``!include PATH`` and ``!include_try PATH`` read another file (relative
paths from the including file's directory).  Every mistake is reported
with the file and line it is on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Collection
from dataclasses import dataclass

#: How deep ``!include`` may nest before it is taken for a loop.
MAX_INCLUDE_DEPTH = 10


class ConfigFileError(ValueError):
    """A config file pop3d cannot use; ``str()`` is ``PATH:LINE: reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class ConfigValue:
    """A setting's value and where it was written."""

    value: str
    path: str
    line: int

    def error(self, reason: str) -> ConfigFileError:
        """An error about this value, naming its file and line (raise it)."""
        return ConfigFileError(self.path, self.line, reason)

    def boolean(self, key: str) -> bool:
        """
        The value as Dovecot's yes/no (``yes``/``no``, also ``y``/``n``,
        ``true``/``false``, ``1``/``0``, any case; empty is no); anything
        else is an error naming ``key``, never taken for "no".
        """
        answer = yes_or_no(self.value)
        if answer is None:
            raise self.error(f"{key} {self.value!r}: expected yes or no")
        return answer


_YES = frozenset({"yes", "y", "true", "1"})
_NO = frozenset({"no", "n", "false", "0", ""})


def yes_or_no(word: str) -> bool | None:
    """``word`` as a yes/no setting (see `ConfigValue.boolean`); None if it is neither."""
    word = word.strip().lower()
    if word in _YES:
        return True
    if word in _NO:
        return False
    return None


def read_conf_ext(path: str | os.PathLike[str], keys: Collection[str]) -> dict[str, ConfigValue]:
    """
    The settings of the file at ``path``; ``keys`` are the ones allowed
    (any other is an error).  A later line setting a key again wins, as in
    Dovecot.  An unreadable file raises `ConfigFileError` at line 0.
    """
    settings: dict[str, ConfigValue] = {}
    _read_file(os.fspath(path), frozenset(keys), settings, depth=0, include_line=None)
    return settings


def parse_conf_ext(
    text: str, path: str, keys: Collection[str], *, depth: int = 0
) -> dict[str, ConfigValue]:
    """`read_conf_ext` for text already read (``path`` names it in errors)."""
    settings: dict[str, ConfigValue] = {}
    _parse(text, path, frozenset(keys), settings, depth)
    return settings


def _read_file(
    path: str,
    keys: frozenset[str],
    settings: dict[str, ConfigValue],
    depth: int,
    include_line: tuple[str, int] | None,
) -> None:
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read()
    except UnicodeDecodeError as error:
        raise ConfigFileError(path, 0, f"not UTF-8 text ({error.reason})") from error
    except OSError as error:
        where, line = include_line if include_line is not None else (path, 0)
        raise ConfigFileError(where, line, f"cannot read {path}: {error.strerror}") from error
    _parse(text, path, keys, settings, depth)


def _parse(
    text: str, path: str, keys: frozenset[str], settings: dict[str, ConfigValue], depth: int
) -> None:
    pending = ""
    pending_start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _without_comment(raw.strip(), path, number).rstrip()
        if line.endswith("\\"):
            if not pending:
                pending_start = number
            pending += line[:-1].rstrip() + " "
            continue
        if pending:
            line, pending = pending + line, ""
            start = pending_start
        else:
            start = number
        if line:
            _setting(line, path, start, keys, settings, depth)
    if pending:
        raise ConfigFileError(path, pending_start, "the file ends inside a continued line")


def _without_comment(line: str, path: str, number: int) -> str:
    """The line up to a ``#`` that is not inside quotes."""
    position = 0
    while position < len(line):
        char = line[position]
        if char in "\"'":
            end = _closing_quote(line, position)
            if end < 0:
                return line
            position = end + 1
            continue
        if char == "#":
            return line[:position]
        position += 1
    return line


def _closing_quote(line: str, start: int) -> int:
    quote = line[start]
    position = start + 1
    while position < len(line):
        if line[position] == "\\":
            position += 2
            continue
        if line[position] == quote:
            return position
        position += 1
    return -1


def _setting(
    line: str,
    path: str,
    number: int,
    keys: frozenset[str],
    settings: dict[str, ConfigValue],
    depth: int,
) -> None:
    if line.startswith("!include"):
        directive, _, argument = line.partition(" ")
        if directive not in ("!include", "!include_try"):
            raise ConfigFileError(path, number, f"unknown directive {directive!r}")
        _include(argument.strip(), directive == "!include_try", path, number, keys, settings, depth)
        return
    key, equals, value = line.partition("=")
    key = key.strip()
    if not equals:
        raise ConfigFileError(path, number, f"expected 'key = value', got {line!r}")
    if not key or any(c.isspace() for c in key):
        raise ConfigFileError(path, number, f"expected 'key = value', got {line!r}")
    if key not in keys:
        raise ConfigFileError(path, number, f"unknown setting {key!r}")
    settings[key] = ConfigValue(_unquoted(value.strip()), path, number)


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        out: list[str] = []
        position = 0
        while position < len(inner):
            char = inner[position]
            if char == "\\" and position + 1 < len(inner):
                position += 1
                char = inner[position]
            out.append(char)
            position += 1
        return "".join(out)
    return value


def _include(
    argument: str,
    optional: bool,
    path: str,
    number: int,
    keys: frozenset[str],
    settings: dict[str, ConfigValue],
    depth: int,
) -> None:
    if depth >= MAX_INCLUDE_DEPTH:
        raise ConfigFileError(path, number, "!include nested too deep (a loop?)")
    target = _unquoted(argument)
    if not target:
        raise ConfigFileError(path, number, "!include needs a file name")
    if not os.path.isabs(target):
        target = os.path.join(os.path.dirname(os.path.abspath(path)), target)
    matches = sorted(glob.glob(target)) if glob.has_magic(target) else [target]
    if not matches or not all(os.path.exists(match) for match in matches):
        if optional:
            return
        raise ConfigFileError(path, number, f"cannot read {target}: No such file or directory")
    for match in matches:
        _read_file(match, keys, settings, depth + 1, include_line=(path, number))
