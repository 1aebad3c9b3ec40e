"""
What the stores have in common: mailbox path templates, and running their
blocking file work in the reactor's thread pool (`run_blocking`; bounded,
`BoundedThreads`, as the password checks and SQL queries use it).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

_T = TypeVar("_T")

_PLACEHOLDER = re.compile(r"\{(user|local|domain)\}")


class MaildirTemplateError(ValueError):
    """A --mail-location path template that cannot be used."""


def check_template(template: str) -> None:
    """Refuse a template with placeholders other than {user}, {local}, {domain}."""
    leftover = _PLACEHOLDER.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise MaildirTemplateError(
            f"unknown placeholder in {template!r}: use {{user}}, {{local}} or {{domain}}"
        )
    if not template:
        raise MaildirTemplateError("the maildir path is empty")


def fixed_directory(template: str) -> str:
    """
    The directory above the first placeholder of a template
    (``/srv/mail`` for ``/srv/mail/{user}``): the part the administrator
    chose, where users own nothing.
    """
    fixed = template.split("{", 1)[0]
    directory = fixed if fixed.endswith("/") else os.path.dirname(fixed)
    return os.path.normpath(directory or ".")


def expand_template(template: str, mailbox: str) -> str | None:
    """
    Substitute a mailbox name into a path template in one pass, so text in
    the name is never itself taken for a placeholder.  None if a part the
    template uses is empty or starts with a dot (``{domain}`` of ``a@`` or
    ``{local}`` of ``.x@y``), which would name the wrong directory.
    """
    path, placed = _template_parts(template)
    local, _, domain = mailbox.partition("@")
    for used, literal in placed:
        value = mailbox if used == "user" else local if used == "local" else domain
        if not value or value.startswith("."):
            return None
        path += value + literal
    return path


@functools.lru_cache(maxsize=64)
def _template_parts(template: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """
    A template split once (every login expands one): the text before its
    first placeholder, then each placeholder's name and the text after it.
    """
    pieces = _PLACEHOLDER.split(template)
    return pieces[0], tuple(zip(pieces[1::2], pieces[2::2], strict=True))


def run_blocking(
    reactor: IReactorThreads | None, function: Callable[..., _T], *arguments: object
) -> Deferred[_T]:
    """
    Run file work in the reactor's thread pool, so that other sessions are
    not held up; without a reactor (tests), inline.
    """
    if reactor is None:
        return maybeDeferred(function, *arguments)
    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *arguments)


class BoundedThreads:
    """
    Blocking work in ``reactor``'s thread pool, at most ``limit`` at once
    (the rest wait their turn, in order), so that one kind of work (slow
    password checks, database queries) cannot take every thread; without a
    reactor (tests), inline.
    """

    __slots__ = ("_reactor", "_turns")

    def __init__(self, reactor: IReactorThreads | None, limit: int) -> None:
        if limit < 1:
            raise ValueError("the bound of concurrent work must be at least 1")
        self._reactor = reactor
        self._turns = DeferredSemaphore(limit)

    def run(self, work: Callable[..., _T], *arguments: object) -> Deferred[_T]:
        """``work(*arguments)`` in its turn; a Deferred of its result."""
        if self._reactor is None:
            return maybeDeferred(work, *arguments)
        return self._turns.run(run_blocking, self._reactor, work, *arguments)
