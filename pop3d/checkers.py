"""
Credential checkers: Dovecot's passwd-file format, and the glue that lets
twisted.cred.strcred's checkers take the bytes POP3 reads from the wire.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Schemes whose stored secret is the password itself.
PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEARTEXT"})


class PasswdFileError(ValueError):
    """A passwd-file that cannot be used, with the line that is wrong."""


@dataclass(frozen=True)
class PasswordEntry:
    """One user's stored password: ``{SCHEME}secret``."""

    scheme: str
    secret: bytes


def parse_passwd_file(content: bytes, source: str = "passwd-file") -> dict[bytes, PasswordEntry]:
    """
    Parse Dovecot's passwd-file format: ``user:{SCHEME}password:`` followed
    by optional fields that are ignored here; blank lines and lines starting
    with ``#`` are comments.
    """
    entries: dict[bytes, PasswordEntry] = {}
    for number, raw_line in enumerate(content.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, separator, rest = line.partition(b":")
        if not separator or not user:
            raise PasswdFileError(f"{source} line {number}: expected user:{{SCHEME}}password")
        password = rest.split(b":", 1)[0]
        if not password:
            log.warn(
                "{source} line {number}: {user} has no password and cannot log in",
                source=source,
                number=number,
                user=user.decode("utf-8", "replace"),
            )
            continue
        if not password.startswith(b"{") or b"}" not in password:
            raise PasswdFileError(
                f"{source} line {number}: the password has no {{SCHEME}} prefix (e.g. {{PLAIN}})"
            )
        scheme_bytes, _, secret = password[1:].partition(b"}")
        scheme = scheme_bytes.decode("ascii", "replace").upper()
        if scheme not in PLAINTEXT_SCHEMES:
            raise PasswdFileError(
                f"{source} line {number}: unsupported password scheme {{{scheme}}}; "
                f"supported: {', '.join(f'{{{s}}}' for s in sorted(PLAINTEXT_SCHEMES))}"
            )
        entries[user] = PasswordEntry(scheme, secret)
    return entries


# Compared against when the user is unknown, so that an unknown user and a
# wrong password take the same path.
_NO_SUCH_USER = PasswordEntry("PLAIN", b"\x00" * 16)


@implementer(ICredentialsChecker)
class PasswdFileChecker:
    """
    Checks USER/PASS and APOP against a Dovecot passwd-file.

    The file is read at start-up (a bad file is an error then) and read again
    whenever it changes; a change that does not parse is logged and the last
    good content stays in use.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature = self._stat()
        with open(path, "rb") as passwd:
            self._entries = parse_passwd_file(passwd.read(), path)

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _current_entries(self) -> dict[bytes, PasswordEntry]:
        try:
            signature = self._stat()
            if signature != self._signature:
                with open(self.path, "rb") as passwd:
                    self._entries = parse_passwd_file(passwd.read(), self.path)
                self._signature = signature
                log.info("reloaded {path}", path=self.path)
        except (OSError, PasswdFileError) as error:
            log.error("keeping the previous {path}: {error}", path=self.path, error=error)
        return self._entries

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        username = _as_bytes(credentials.username)
        found = self._current_entries().get(username)
        entry = found or _NO_SUCH_USER
        if IUsernamePassword.providedBy(credentials):
            matched = hmac.compare_digest(_as_bytes(credentials.password), entry.secret)
        elif IUsernameHashedPassword.providedBy(credentials):
            matched = bool(credentials.checkPassword(entry.secret))
        else:
            matched = False
        if matched and found is not None:
            return succeed(username)
        return fail(UnauthorizedLogin())


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(ICheckerFactory, IPlugin)
class PasswdFileCheckerFactory:
    """The ``--auth passwd-file:PATH`` plugin for twisted.cred.strcred."""

    authType = "passwd-file"
    authHelp = (
        "Dovecot-style passwd-file: one 'user:{SCHEME}password:' line per user "
        "({PLAIN} and {CLEARTEXT}); '#' starts a comment.  Re-read when it changes."
    )
    argStringFormat = "Path to the passwd-file"
    credentialInterfaces = PasswdFileChecker.credentialInterfaces

    def generateChecker(self, argstring: str) -> PasswdFileChecker:
        if not argstring:
            raise PasswdFileError("passwd-file needs a path: --auth passwd-file:/etc/pop3d/passwd")
        try:
            return PasswdFileChecker(argstring)
        except OSError as error:
            raise PasswdFileError(f"cannot read {argstring}: {error.strerror}") from error


def accept_wire_bytes(checker: Any) -> Any:
    """
    strcred's ``memory:`` checker stores str names and passwords, while POP3
    credentials arrive as bytes; give it the bytes form so both meet.
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        converted = InMemoryUsernamePasswordDatabaseDontUse()
        for username, password in checker.users.items():
            converted.addUser(_as_bytes(username), _as_bytes(password))
        return converted
    return checker


@implementer(ICredentialsChecker)
class FirstMatchChecker:
    """
    Several checkers for one credentials interface, tried in order: the first
    that accepts the credentials wins.  (A Portal keeps one checker per
    interface, so repeated ``--auth`` options need this to all count.)
    """

    def __init__(self, checkers: Sequence[Any], interfaces: Iterable[Any]) -> None:
        self.checkers = list(checkers)
        self.credentialInterfaces = tuple(interfaces)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        remaining = iter(self.checkers)

        def try_next(failure: Failure | None, tried: object) -> Deferred[Any]:
            if failure is not None and not failure.check(UnauthorizedLogin):
                # A checker that breaks must not answer differently from a
                # wrong password: that could tell which users exist.
                log.failure("credentials checker {checker} failed", failure, checker=tried)
            checker = next(remaining, None)
            if checker is None:
                return fail(UnauthorizedLogin())
            attempt = maybeDeferred(checker.requestAvatarId, credentials)
            return attempt.addErrback(try_next, checker)

        return try_next(None, None)
