"""
Credential checkers: Dovecot's passwd-file format, and the glue that lets
twisted.cred.strcred's checkers take the bytes POP3 reads from the wire.

The password schemes themselves are in `pop3d.passwords`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer
from zope.interface.interface import InterfaceClass

from pop3d.credchecks import (
    DEFAULT_MAX_CONCURRENT,
    PASSWORD_CHECKS,
    IAvatarIdAtOnce,
    PasswordChecks,
    PasswordEntry,
    PasswordVerifier,
    StoredPasswordLookup,
    as_bytes,
    avatar_id_later,
)
from pop3d.credentials import PreparedUsernamePassword
from pop3d.errors import AuthUnavailable, LoginRefused
from pop3d.passwords import (
    SCHEMES,
    PasswordScheme,
    PasswordSchemeError,
    ScramSHA256Scheme,
)
from pop3d.reloading import IReloadable, ReloadableFiles
from pop3d.sasl import IScramKeySource, ScramKeys
from pop3d.sasl.oauth2 import IOAuth2TokenVerifier, TokenCheck
from pop3d.userdb import AuthenticatedUser, UserFieldError, passdb_user

log = Logger()

#: Schemes whose stored secret is the password itself.
PLAINTEXT_SCHEMES = frozenset(name for name, scheme in SCHEMES.items() if scheme.plaintext)


#: The scheme of a passwd-file password without a ``{SCHEME}`` prefix, as
#: in Dovecot (a crypt(3) hash: ``$6$...``, ``$2y$...``, DES).
PASSWD_FILE_DEFAULT_SCHEME = SCHEMES["CRYPT"]


class PasswdFileError(ValueError):
    """A passwd-file that cannot be used, with the line that is wrong."""


#: The extra fields of a passwd-file that pop3d applies (see `read_passwd_file`).
_REFUSALS = frozenset({"nologin", "reason", "allow_nets"})


def read_passwd_file(
    content: bytes, source: str = "passwd-file"
) -> tuple[dict[bytes, PasswordEntry], dict[bytes, AuthenticatedUser | LoginRefused]]:
    """
    Parse Dovecot's passwd-file format, ``user:{SCHEME}password:uid:gid:
    gecos:home:shell:extra``; blank lines and lines starting with ``#`` are
    comments.  Returns each user's `PasswordEntry`, and for those whose
    extra fields refuse or restrict them, who logs in (`AuthenticatedUser`)
    or why not (`LoginRefused`): the eighth field holds words
    ``key=value`` (or ``key`` alone: an empty value) separated by spaces, as
    Dovecot reads them; of those, ``nologin``, ``reason`` and ``allow_nets``
    are applied as from SQL and LDAP (`pop3d.userdb.passdb_user`): a user
    Dovecot refuses is refused.  (Other fields, ``userdb_*`` among them, are
    not used from a passwd-file.)  An unknown scheme, a secret its scheme
    cannot read, or an extra field pop3d cannot use is an error that names
    the line.
    """
    entries: dict[bytes, PasswordEntry] = {}
    extras: dict[bytes, AuthenticatedUser | LoginRefused] = {}
    for number, raw_line in enumerate(content.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, separator, rest = line.partition(b":")
        if not separator or not user:
            raise PasswdFileError(f"{source} line {number}: expected user:{{SCHEME}}password")
        fields = rest.split(b":", 6)
        password = fields[0]
        if not password:
            log.warn(
                "{source} line {number}: {user} has no password and cannot log in",
                source=source,
                number=number,
                user=user.decode("utf-8", "replace"),
            )
            continue
        try:
            # Without a {SCHEME} prefix, Dovecot's passwd-file default: CRYPT.
            entries[user] = PasswordEntry.parse(password, PASSWD_FILE_DEFAULT_SCHEME)
        except PasswordSchemeError as error:
            raise PasswdFileError(f"{source} line {number}: {error}") from None
        extra = _refusals(fields[6]) if len(fields) == 7 else {}
        if extra:
            name = user.decode("utf-8", "replace")
            try:
                extras[user] = passdb_user(name, extra, f"{source} line {number}")
            except LoginRefused as refused:
                extras[user] = refused
            except UserFieldError as error:
                raise PasswdFileError(str(error)) from None
    return entries, extras


def _refusals(extra_field: bytes) -> dict[str, str]:
    words = extra_field.decode("utf-8", "replace").split()
    pairs = (word.partition("=")[::2] for word in words)
    return {key: value for key, value in pairs if key.lower() in _REFUSALS}


@dataclass(frozen=True)
class _Table:
    """A loaded passwd-file and what follows from it."""

    entries: dict[bytes, PasswordEntry]
    #: The credentials its entries can verify.
    interfaces: tuple[InterfaceClass, ...]
    #: An entry of the most common (scheme, cost) among the entries: an
    #: unknown user's password is checked against a dummy of that class.
    usual: PasswordEntry | PasswordScheme
    #: What an unknown user's credentials of each type are checked against
    #: (for the checks that have a ``dummy``).
    dummies: dict[InterfaceClass, PasswordEntry]
    #: Most entries that can serve SCRAM are plaintext, whose keys are
    #: derived for each exchange: so are dummy keys for everyone else.
    scram_derives: bool
    #: What the extra fields of some users come to (`read_passwd_file`).
    extras: dict[bytes, AuthenticatedUser | LoginRefused]

    @classmethod
    def of(
        cls,
        entries: dict[bytes, PasswordEntry],
        checks: PasswordChecks,
        extras: dict[bytes, AuthenticatedUser | LoginRefused],
    ) -> _Table:
        kinds = {entry.kind for entry in entries.values()}
        samples: dict[tuple[str, Hashable], bytes] = {}
        counts: Counter[tuple[str, Hashable]] = Counter()
        for entry in entries.values():
            key = (entry.scheme, entry.kind.cost(entry.secret))
            samples.setdefault(key, entry.secret)
            counts[key] += 1
        usual: PasswordEntry | PasswordScheme = SCHEMES["PLAIN"]
        if counts:
            (name, cost), _ = counts.most_common(1)[0]
            usual = PasswordEntry(name, samples[(name, cost)])
        derived = sum(1 for entry in entries.values() if entry.kind.plaintext)
        stored = sum(1 for entry in entries.values() if isinstance(entry.kind, ScramSHA256Scheme))
        return cls(
            entries,
            checks.possible(kinds),
            usual,
            checks.dummies(kinds),
            derived > stored,
            extras,
        )


@implementer(ICredentialsChecker, IScramKeySource, IReloadable, IAvatarIdAtOnce)
class PasswdFileChecker:
    """
    Checks logins against a Dovecot passwd-file, whatever the scheme of
    each entry (see `pop3d.passwords`).

    Each credential type is verified by its `pop3d.credchecks.PasswordCheck`
    in ``checks`` (`pop3d.credchecks.PASSWORD_CHECKS` by default):

    - USER/PASS (``IUsernamePassword``): every scheme.
    - APOP (``IUsernameHashedPassword``): plaintext entries only.
    - SASL CRAM-MD5 (`pop3d.sasl.ICramMD5Credentials`, `pop3d.sasl.cram_md5`):
      plaintext and ``{CRAM-MD5}``.
    - SASL SCRAM-SHA-256 (`pop3d.sasl.IScramSHA256Credentials`,
      `pop3d.sasl.scram`) with the keys of this checker's `IScramKeySource`:
      ``{SCRAM-SHA-256}`` entries, and plaintext ones whose keys are derived
      on demand with `pop3d.passwords.SCRAM_ITERATIONS` iterations and a salt
      that is stable for the process (`pop3d.passwords.scram_salt`).

    ``credentialInterfaces`` lists only what the file's entries can verify,
    so that APOP or CRAM-MD5 are not advertised when no entry could pass.

    The file is read at start-up (a bad file is an error then) and read again
    whenever it changes (each login looks at its size, inode and time; the
    reading and parsing run in the thread pool once `run_slow_work_in` gave
    one, while the logins that noticed the change wait for it); a change
    that does not parse is logged and the last good content stays in use.
    (A portal learns ``credentialInterfaces`` once, when it is built.)

    Slow checks (bcrypt, Argon2, SHA-crypt, PBKDF2) run inline until
    `run_slow_work_in` gives the checker a reactor: then they run in the
    reactor's thread pool, a bounded number at once.  An unknown user is
    checked against a dummy secret of the file's most common scheme and
    cost, so that it takes the path and the time of a wrong password.
    """

    #: Every credential type the default checks verify (an instance lists
    #: what its file's entries can verify).
    credentialInterfaces: tuple[InterfaceClass, ...] = PASSWORD_CHECKS.interfaces()

    def __init__(self, path: str, checks: PasswordChecks = PASSWORD_CHECKS) -> None:
        self.path = path
        self._checks = checks
        self._verifier = PasswordVerifier()
        self._file = ReloadableFiles(path, self._read, self._set_table, (OSError, PasswdFileError))
        self._signature: tuple[int, int, int] | None = self._stat()
        self._set_table(self._read())

    def run_slow_work_in(
        self, reactor: IReactorThreads, max_concurrent: int = DEFAULT_MAX_CONCURRENT
    ) -> None:
        """
        Run slow checks in ``reactor``'s thread pool, at most
        ``max_concurrent`` at once (the others wait their turn, in order).
        """
        self._verifier = PasswordVerifier(reactor, max_concurrent)
        self._file.threads = reactor

    def _set_table(self, table: _Table) -> None:
        self._table = table
        self.credentialInterfaces = table.interfaces

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _read(self) -> _Table:
        with open(self.path, "rb") as passwd:
            content = passwd.read()
        entries, extras = read_passwd_file(content, self.path)
        return _Table.of(entries, self._checks, extras)

    def _current_table(self) -> _Table | Deferred[_Table]:
        """
        The entries, after one ``stat`` of the file: those in use at once
        (nearly every login: no Deferred to wait on), else once the file,
        which changed, has been read again.
        """
        try:
            signature = self._stat()
        except OSError as error:
            if self._signature is not None:  # said once, not at every login
                log.error("keeping the previous {path}: {error}", path=self.path, error=error)
                self._signature = None
            return self._table
        if signature == self._signature:
            if not self._file.reading:
                return self._table
            # While the file is read, the logins that noticed the change wait.
            return self._file.settled().addCallback(lambda _: self._table)
        # Read once per change, whatever comes of it: a broken file is said
        # once, and read again when it changes again.
        self._signature = signature
        return self._file.read_again().addCallback(lambda _: self._table)

    def reload(self) -> Deferred[None]:
        """Read the file again now if it changed (SIGHUP); logins do so anyway."""
        table = self._current_table()
        if isinstance(table, Deferred):
            return table.addCallback(lambda _: None)
        return succeed(None)

    # -- ICredentialsChecker ---------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        # The user's name (bytes), or an AuthenticatedUser when the file
        # gives the user extra fields.
        return avatar_id_later(self, credentials)

    def avatar_id_at_once(self, credentials: Any) -> Any:
        """`IAvatarIdAtOnce`: nearly every login, with a cheap scheme, at once."""
        table = self._current_table()
        if isinstance(table, Deferred):
            return table.addCallback(self._check, credentials)
        return self._check(table, credentials)

    def _check(
        self, table: _Table, credentials: Any
    ) -> Deferred[bytes | AuthenticatedUser | tuple[()]] | bytes | AuthenticatedUser | tuple[()]:
        username = as_bytes(credentials.username)
        found = table.entries.get(username)
        if found is None and isinstance(credentials, PreparedUsernamePassword):
            # An entry written with the name as the client typed it, before
            # names were prepared (see PreparedUsernamePassword).
            for alternative in credentials.usernames[1:]:
                found = table.entries.get(alternative)
                if found is not None:
                    username = alternative
                    break
        check = self._checks.for_credentials(credentials)
        matched: Deferred[bool] | bool
        if check is None:
            matched = False
        else:
            lookup = StoredPasswordLookup(
                username,
                found,
                self,
                self._verifier,
                table.usual,
                table.dummies,
                table.scram_derives,
            )
            matched = check.verify(lookup, credentials)

        def decided(ok: bool) -> bytes | AuthenticatedUser | tuple[()]:
            if not ok or found is None:
                raise UnauthorizedLogin()
            # nologin and allow_nets, as SQL and LDAP apply them (worked out
            # when the file was read).
            restricted = table.extras.get(username)
            if restricted is None:
                return username
            if isinstance(restricted, LoginRefused):
                raise LoginRefused(restricted.reason)
            return restricted

        return matched.addCallback(decided) if isinstance(matched, Deferred) else decided(matched)

    # -- IScramKeySource ---------------------------------------------------------

    def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
        """
        The keys of a ``{SCRAM-SHA-256}`` entry as stored; those of a
        plaintext entry derived (in the thread pool, for each exchange);
        None for an unknown user or another scheme, after the same work as
        the file's usual SCRAM-capable entry, so that the time it takes does
        not tell which users exist.
        """
        name = as_bytes(username)

        def keys(table: _Table) -> Deferred[ScramKeys | None]:
            return self._verifier.scram_keys(name, table.entries.get(name), table.scram_derives)

        table = self._current_table()
        return (
            table.addCallback(keys) if isinstance(table, Deferred) else maybeDeferred(keys, table)
        )


@implementer(ICheckerFactory, IPlugin)
class PasswdFileCheckerFactory:
    """The ``--auth passwd-file:PATH`` plugin for twisted.cred.strcred."""

    authType = "passwd-file"
    authHelp = (
        "Dovecot-style passwd-file: one 'user:{SCHEME}password:' line per user; "
        "schemes: " + " ".join(f"{{{name}}}" for name in sorted(SCHEMES)) + ".  "
        "'#' starts a comment.  Re-read when it changes.  "
        "'python -m pop3d pw' makes hashed passwords."
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
            converted.addUser(as_bytes(username), as_bytes(password))
        return converted
    return checker


@implementer(ICredentialsChecker, IAvatarIdAtOnce)
class FirstMatchChecker:
    """
    Several checkers for one credentials interface, tried in order: the first
    that accepts the credentials wins.  (A Portal keeps one checker per
    interface, so repeated ``--auth`` options need this to all count.)

    A checker's `pop3d.errors.LoginRefused` (the password was right, the
    user may not log in) ends the search with it; `pop3d.errors.AuthUnavailable`
    (its database could not answer) lets the others try, and is the answer
    if none of them accepts.

    When some of its checkers are `IScramKeySource`s, so is it: it asks
    them in order, and the first that knows the user answers.  The same for
    `IOAuth2TokenVerifier`: the first that accepts the token answers.
    """

    def __init__(self, checkers: Sequence[Any], interfaces: Iterable[Any]) -> None:
        self.checkers = list(checkers)
        self.credentialInterfaces = tuple(interfaces)
        if any(IScramKeySource.providedBy(checker) for checker in self.checkers):
            alsoProvides(self, IScramKeySource)
        if any(IOAuth2TokenVerifier.providedBy(checker) for checker in self.checkers):
            alsoProvides(self, IOAuth2TokenVerifier)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return avatar_id_later(self, credentials)

    def avatar_id_at_once(self, credentials: Any) -> Any:
        """
        `IAvatarIdAtOnce`: the answer itself while the checkers answer at
        once (a checker that provides `IAvatarIdAtOnce` and has the answer,
        passwd-file's nearly always), raised if it is a failure; else a
        Deferred, from the first checker that makes the login wait.
        """
        return _FirstMatch(self.checkers, credentials).try_next(None, None)

    def check_token(self, credentials: Any) -> Deferred[TokenCheck]:
        """`IOAuth2TokenVerifier`: the first acceptance, else the first refusal."""
        return Deferred.fromCoroutine(self._first_token_check(credentials))

    async def _first_token_check(self, credentials: Any) -> TokenCheck:
        verdicts: list[TokenCheck] = []
        for checker in self.checkers:
            if not IOAuth2TokenVerifier.providedBy(checker):
                continue
            verdict: TokenCheck = await maybeDeferred(checker.check_token, credentials)
            if verdict.user is not None:
                return verdict
            verdicts.append(verdict)
        refusals = [verdict for verdict in verdicts if verdict.refused is not None]
        if len(refusals) < len(verdicts):
            # One could not tell: the login will say the service is unavailable.
            return TokenCheck()
        return refusals[0] if refusals else TokenCheck()

    def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
        """`IScramKeySource`: the first non-None answer of the checkers that give keys."""
        return Deferred.fromCoroutine(self._first_scram_keys(username))

    async def _first_scram_keys(self, username: bytes) -> ScramKeys | None:
        for checker in self.checkers:
            if not IScramKeySource.providedBy(checker):
                continue
            try:
                keys: ScramKeys | None = await maybeDeferred(checker.scram_sha256_keys, username)
            except Exception:
                # As in requestAvatarId: a broken checker is as one that does
                # not know the user.
                log.failure("SCRAM key source {checker} failed", checker=checker)
                continue
            if keys is not None:
                return keys
        return None


class _FirstMatch:
    """
    One login's search through the checkers of a `FirstMatchChecker`.  An
    object, not a nested function that calls itself: that would be a
    reference cycle, garbage only the cyclic collector frees (a login's
    credentials with it), which it then has to look for.
    """

    __slots__ = ("_credentials", "_remaining", "_unavailable")

    def __init__(self, checkers: Sequence[Any], credentials: Any) -> None:
        self._credentials = credentials
        self._remaining = iter(checkers)
        self._unavailable: list[Failure] = []

    def try_next(self, failure: Failure | None, tried: object) -> Any:
        if failure is not None and failure.check(LoginRefused):
            # The password was right and the database refuses the user:
            # that is the answer, with its reason.
            failure.raiseException()
        if failure is not None and failure.check(AuthUnavailable):
            # Logged by the checker; another checker may know the user.
            self._unavailable.append(failure)
        elif failure is not None and not failure.check(UnauthorizedLogin):
            # A checker that breaks must not answer differently from a
            # wrong password: that could tell which users exist.
            log.failure("credentials checker {checker} failed", failure, checker=tried)
        checker = next(self._remaining, None)
        if checker is None:
            # Nobody accepted: "try again later" if a database could not say.
            if self._unavailable:
                self._unavailable[0].raiseException()
            raise UnauthorizedLogin()
        attempt: Deferred[Any]
        if IAvatarIdAtOnce.providedBy(checker):
            # Most logins: the answer at once, and no callback to run
            # on a Deferred that has fired (about 8,000 instructions).
            try:
                answer = checker.avatar_id_at_once(self._credentials)
            except Exception:
                return self.try_next(Failure(), checker)
            if not isinstance(answer, Deferred):
                return answer
            attempt = answer
        else:
            attempt = maybeDeferred(checker.requestAvatarId, self._credentials)
        return attempt.addErrback(self.try_next, checker)
