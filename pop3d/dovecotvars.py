"""
Dovecot's ``%`` variables, as its SQL queries, LDAP filters and mail
locations use them: ``%u`` (the user), ``%n`` (its part before ``@``),
``%d`` (the domain), ``%r``/``%l`` (remote and local address), ``%s``
(service), ``%c`` (``secured`` over TLS or from this machine), ``%w`` (the
password), ``%h`` (home), ``%%``; the long forms ``%{user}``,
``%{username}``, ``%{domain}``, ``%{rip}``, ``%{lip}``, ``%{service}``,
``%{secured}``, ``%{password}``, ``%{home}`` (and Dovecot 2.4's
``%{remote_ip}``, ``%{local_ip}``); modifiers between ``%`` and the name:
``L`` (lower case), ``U`` (upper case), ``E`` (backslash before ``\\``,
``"`` and ``'``) and a number (keep that many characters), as in ``%Ln`` or
``%1Ln``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pop3d.userdb import LoginContext


class VariableError(ValueError):
    """A template names a variable pop3d does not know, or is cut short."""


@dataclass(frozen=True)
class Variables:
    """What a template's variables stand for, for one login."""

    user: str
    remote_ip: str | None = None
    local_ip: str | None = None
    secured: bool = False
    service: str = "pop3"
    #: For ``%w`` only (``auth_bind`` filters); never logged.
    password: str | None = None
    home: str | None = None

    @classmethod
    def for_login(
        cls, user: str, context: LoginContext | None, password: str | None = None
    ) -> Variables:
        if context is None:
            return cls(user=user, password=password)
        return cls(
            user=user,
            remote_ip=context.remote_ip,
            local_ip=context.local_ip,
            secured=context.secured,
            service=context.service,
            password=password,
        )

    @property
    def username(self) -> str:
        """The user's part before the first ``@`` (Dovecot's ``%n``)."""
        return self.user.partition("@")[0]

    @property
    def domain(self) -> str:
        """The part after the first ``@``, or empty (Dovecot's ``%d``)."""
        return self.user.partition("@")[2]


_VALUES: dict[str, Callable[[Variables], str]] = {
    "user": lambda v: v.user,
    "username": lambda v: v.username,
    "domain": lambda v: v.domain,
    "rip": lambda v: v.remote_ip or "",
    "lip": lambda v: v.local_ip or "",
    "service": lambda v: v.service,
    "secured": lambda v: "secured" if v.secured else "",
    "password": lambda v: v.password or "",
    "home": lambda v: v.home or "",
}

#: The one-letter names and the long names that mean the same.
_ALIASES = {
    "u": "user",
    "n": "username",
    "d": "domain",
    "r": "rip",
    "l": "lip",
    "s": "service",
    "c": "secured",
    "w": "password",
    "h": "home",
    "remote_ip": "rip",
    "local_ip": "lip",
    **{name: name for name in _VALUES},
}

_REFERENCE = re.compile(r"%(?P<modifiers>[LUE]*)(?P<width>-?\d*)(?P<modifiers2>[LUE]*)")


@dataclass(frozen=True)
class Reference:
    """One ``%`` variable of a template, with its modifiers."""

    #: The long name (``user``, ``rip``...).
    name: str
    lower: bool = False
    upper: bool = False
    escaped: bool = False
    #: Keep this many characters (a negative number: that many from the end).
    width: int | None = None

    def value(self, variables: Variables) -> str:
        text = _VALUES[self.name](variables)
        if self.width is not None:
            text = text[: self.width] if self.width >= 0 else text[self.width :]
        if self.lower:
            text = text.lower()
        if self.upper:
            text = text.upper()
        if self.escaped:
            text = re.sub(r"([\\\"'])", r"\\\1", text)
        return text


@dataclass(frozen=True)
class Lookup:
    """
    ``%{NAMESPACE:key}`` or ``%{NAMESPACE:key:default}``: a value the
    caller looks up (an LDAP attribute of the entry, for ``%{ldap:...}``),
    where the template was parsed with that namespace allowed.
    """

    namespace: str
    key: str
    default: str | None


@dataclass(frozen=True)
class Template:
    """A template parsed once: literal text, `Reference` and `Lookup` parts, in order."""

    parts: tuple[str | Reference | Lookup, ...]

    def expand(
        self,
        variables: Variables,
        escape: Callable[[str], str] = str,
        lookup: Callable[[Lookup], str] | None = None,
    ) -> str:
        """
        The text with every variable's value (through ``escape``, never the
        template's own text) and every `Lookup` answered by ``lookup``.
        """
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Reference):
                out.append(escape(part.value(variables)))
            else:
                assert lookup is not None  # only parsed in where a lookup is given
                out.append(lookup(part))
        return "".join(out)


@functools.lru_cache(maxsize=1024)
def parse_template(template: str, lookups: frozenset[str] = frozenset()) -> Template:
    """
    ``template`` parsed (`VariableError` if it names an unknown variable or
    is cut short); ``%{NAMESPACE:...}`` for a namespace in ``lookups`` is a
    `Lookup`.  Templates come from config files, so they are few: each is
    parsed once, not at every login.
    """
    parts: list[str | Reference | Lookup] = []
    literal: list[str] = []
    position = 0
    while position < len(template):
        char = template[position]
        if char != "%":
            literal.append(char)
            position += 1
            continue
        if template.startswith("%%", position):
            literal.append("%")
            position += 2
            continue
        part, position = _lookup_at(template, position, lookups) or _reference_at(
            template, position
        )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(part)
    if literal:
        parts.append("".join(literal))
    return Template(tuple(parts))


def _lookup_at(template: str, start: int, lookups: frozenset[str]) -> tuple[Lookup, int] | None:
    if not template.startswith("%{", start):
        return None
    namespace, colon, _ = template[start + 2 :].partition(":")
    if not colon or namespace not in lookups:
        return None
    end = template.find("}", start)
    if end < 0:
        raise VariableError(f"'%{{{namespace}:' without '}}' in {template!r}")
    key, colon, default = template[start + 3 + len(namespace) : end].partition(":")
    if not key:
        raise VariableError(f"%{{{namespace}:}} names nothing in {template!r}")
    return Lookup(namespace, key, default if colon else None), end + 1


def _reference_at(template: str, start: int) -> tuple[Reference, int]:
    match = _REFERENCE.match(template, start)
    assert match is not None  # the pattern matches "%" alone
    modifiers = match["modifiers"] + match["modifiers2"]
    width = int(match["width"]) if match["width"] not in ("", "-") else None
    position = match.end()
    if position >= len(template):
        raise VariableError(f"a '%' at the end of {template!r}")
    if template[position] == "{":
        end = template.find("}", position)
        if end < 0:
            raise VariableError(f"'%{{' without '}}' in {template!r}")
        written = template[position + 1 : end]
        position = end + 1
    else:
        written = template[position]
        position += 1
    name = _ALIASES.get(written)
    if name is None:
        shown = written if len(written) == 1 else "{" + written + "}"
        raise VariableError(f"unknown variable %{shown} in {template!r}")
    reference = Reference(
        name,
        lower="L" in modifiers,
        upper="U" in modifiers,
        escaped="E" in modifiers,
        width=width,
    )
    return reference, position


def check_template(template: str) -> None:
    """Raise `VariableError` if ``template`` names an unknown variable."""
    parse_template(template)


def expand(template: str, variables: Variables, escape: Callable[[str], str] = str) -> str:
    """
    ``template`` with its variables replaced; ``escape`` is applied to each
    variable's value (an LDAP filter's escaping, say), never to the
    template's own text.
    """
    return parse_template(template).expand(variables, escape)
