"""
Dovecot's SQL queries as bound-parameter statements.

Dovecot writes a user's name into a query as text, escaped for the quoted
literal it stands in: ``WHERE userid = '%u'``.  pop3d sends the same query
with a placeholder instead of each quoted literal that holds a variable, and
the literal's expansion as that placeholder's value: the database compares
with exactly the string Dovecot's escaping would have produced, and no user
name can end the literal early (there is no literal left to end).

A variable outside single quotes (``WHERE uid = %u``, ``FROM "users_%d"``)
is refused: Dovecot escapes only for a quoted literal, so such a query
lets a user name inject SQL there too, and an identifier cannot be bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pop3d.dovecotvars import (
    Reference,
    VariableError,
    Variables,
    check_template,
    expand,
    parse_template,
)


class QueryError(ValueError):
    """A query that cannot be turned into a bound statement, and why."""


#: How the variable at a ``%`` is shown in an error: ``%u``, ``%Lu``, ``%{user}``.
_VARIABLE = re.compile(r"%(?:\{[^}]*\}|[0-9A-Z.-]*[a-zA-Z%]?)")


@dataclass(frozen=True)
class Placeholders:
    """How a database driver spells a parameter, and a ``%`` in the statement text."""

    parameter: str
    percent: str
    #: MySQL's SQL: ``"..."`` is a string too, backslashes escape in
    #: strings, ``#`` starts a comment and identifiers are in backticks.
    mysql: bool = False


#: psycopg: ``%s``, and ``%%`` for a literal ``%``.
PYFORMAT = Placeholders("%s", "%%")
#: sqlite3 (qmark style): ``?``; ``%`` is an ordinary character.
QMARK = Placeholders("?", "%")
#: PyMySQL: as psycopg, in MySQL's dialect.
MYSQL = Placeholders("%s", "%%", mysql=True)

#: MySQL's backslash escapes in strings (``\%`` and ``\_`` keep their backslash).
_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


@dataclass(frozen=True)
class BoundQuery:
    """A statement with placeholders, and the template of each parameter's value."""

    #: The statement as the driver takes it.
    statement: str
    #: One Dovecot template per placeholder, in order: a literal's content.
    templates: tuple[str, ...]

    @property
    def holds_password(self) -> bool:
        """Whether a parameter holds the password (``%w``): errors must not quote them."""
        return any(
            isinstance(part, Reference) and part.name == "password"
            for template in self.templates
            for part in parse_template(template).parts
        )

    def parameters(self, variables: Variables) -> tuple[str, ...]:
        """The values of the placeholders for one login (none of them SQL: data)."""
        return tuple(expand(template, variables) for template in self.templates)


def _variable_at(query: str, index: int) -> str:
    match = _VARIABLE.match(query, index)
    return match.group(0) if match else "%"


def _mysql_quoted(query: str, start: int, quote: str) -> tuple[str, int]:
    """A MySQL string at ``start``: doubled quotes and backslash escapes undone."""
    content: list[str] = []
    index = start + 1
    while index < len(query):
        char = query[index]
        if char == "\\" and index + 1 < len(query):
            escaped = query[index + 1]
            if escaped in "%_":
                content.append("\\" + escaped)
            else:
                content.append(_MYSQL_ESCAPES.get(escaped, escaped))
            index += 2
        elif char == quote and query.startswith(quote * 2, index):
            content.append(quote)
            index += 2
        elif char == quote:
            return "".join(content), index + 1
        else:
            content.append(char)
            index += 1
    raise QueryError(f"unterminated {quote} quote")


def _quoted(query: str, start: int, quote: str) -> tuple[str, int]:
    """The quoted text at ``start`` (doubled quotes undone) and the index after it."""
    content: list[str] = []
    index = start + 1
    while True:
        end = query.find(quote, index)
        if end < 0:
            raise QueryError(f"unterminated {quote} quote")
        content.append(query[index:end])
        if query.startswith(quote * 2, end):
            content.append(quote)
            index = end + 2
            continue
        return "".join(content), end + 1


def bind_query(query: str, style: Placeholders) -> BoundQuery:
    """
    ``query`` (Dovecot's syntax, in the SQL of PostgreSQL or SQLite) as a
    `BoundQuery` in the driver's ``style``.

    - A single-quoted literal with a ``%`` in it becomes one placeholder; its
      value is the literal's text (``''`` read as ``'``) with the variables
      expanded (and ``%%`` as ``%``): ``'%n@%d'`` is one parameter.
    - Other literals, double-quoted identifiers and comments are kept as written.
    - ``%%`` elsewhere is a ``%`` (an operator).
    - A variable outside single quotes, an unknown variable, a variable in a
      prefixed literal (``E'...'``, whose backslashes are escapes) or in a
      quoted identifier raise `QueryError`.
    """
    parts: list[str] = []
    templates: list[str] = []
    index, length = 0, len(query)
    while index < length:
        char = query[index]
        if char == "'" or (char == '"' and style.mysql):
            if style.mysql:
                content, after = _mysql_quoted(query, index, char)
            else:
                content, after = _quoted(query, index, "'")
            if "%" not in content:
                parts.append(query[index:after].replace("%", style.percent))
            else:
                previous = query[index - 1] if index else " "
                if previous.isalnum() or previous == "_":
                    raise QueryError(
                        f"a variable in a prefixed string literal ({previous}'...') "
                        "cannot be bound; use a plain '...' literal"
                    )
                try:
                    check_template(content)
                except VariableError as error:
                    raise QueryError(str(error)) from None
                templates.append(content)
                parts.append(style.parameter)
            index = after
        elif char == '"' or (char == "`" and style.mysql):
            content, after = _quoted(query, index, char)
            if "%" in content.replace("%%", ""):
                raise QueryError(
                    f"variable {_variable_at(content, content.index('%'))} in a quoted "
                    'identifier ("...") cannot be bound as a parameter'
                )
            parts.append(query[index:after].replace("%", style.percent))
            index = after
        elif query.startswith("--", index) or (char == "#" and style.mysql):
            end = query.find("\n", index)
            end = length if end < 0 else end
            parts.append(query[index:end].replace("%", style.percent))
            index = end
        elif query.startswith("/*", index):
            end = query.find("*/", index + 2)
            if end < 0:
                raise QueryError("unterminated /* comment")
            parts.append(query[index : end + 2].replace("%", style.percent))
            index = end + 2
        elif char == "%":
            if query.startswith("%%", index):
                parts.append(style.percent)
                index += 2
                continue
            raise QueryError(
                f"variable {_variable_at(query, index)} outside quotes: write it in a "
                f"quoted string ('{_variable_at(query, index)}') so that it is bound as a "
                "parameter (Dovecot escapes it only there)"
            )
        else:
            parts.append(char)
            index += 1
    return BoundQuery("".join(parts), tuple(templates))
