"""
The registry of credential checks: which credential types (zope interfaces)
the server can verify, and how.

- `PortalVerifiers` shows a mechanism (`pop3d.sasl.IVerifiers`) what a cred
  portal's checkers can verify, and hands out their add-on interfaces (SCRAM's
  `pop3d.sasl.IScramKeySource`) without the mechanism seeing the portal.
- `PasswordChecks` is the table a password file's checker
  (`pop3d.checkers.PasswdFileChecker`) verifies credentials with: one
  `PasswordCheck` per credential type: USER/PASS and APOP registered here,
  the SASL types by the module that defines each (`pop3d.sasl.cram_md5`,
  `pop3d.sasl.scram`, which this module imports last, so the table is whole
  wherever it is used).  A new credential type adds its check here from its
  own module; the checker does not change.
- `PasswordVerifier` and `StoredPasswordLookup` are how every checker that
  holds stored passwords (passwd-file, SQL, LDAP) checks one: slow schemes
  in the reactor's thread pool, a bounded number at once, and an unknown
  user against a dummy secret, so that it takes as long as a wrong password.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pop3d.credentials import PreparedUsernamePassword
from pop3d.passwords import (
    SCHEMES,
    SCRAM_ITERATIONS,
    PasswordScheme,
    PasswordSchemeError,
    ScramSHA256Scheme,
    get_scheme,
    parse_scram_secret,
    scram_keys,
    scram_salt,
    split_scheme,
)
from pop3d.sasl import IVerifiers, ScramKeys
from pop3d.stores.common import BoundedThreads

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorThreads
    from zope.interface.interface import InterfaceClass

_T = TypeVar("_T")

#: Slow password checks (bcrypt, Argon2, SHA-crypt, PBKDF2) at once in the
#: reactor's thread pool, by default.
DEFAULT_MAX_CONCURRENT = 4


def most_specific_first(interfaces: Iterable[InterfaceClass]) -> list[InterfaceClass]:
    """
    ``interfaces`` without repeats, an interface before those it extends
    (otherwise in the order given): credentials of a derived type (CRAM-MD5's
    are also hashed-password credentials) go to the check made for them.
    """
    unique = list(dict.fromkeys(interfaces))
    # An interface's resolution order holds that of every interface it extends.
    return sorted(unique, key=lambda interface: -len(interface.__iro__))


def as_bytes(value: bytes | str) -> bytes:
    """A credential field as the checks compare it (strcred's checkers give str)."""
    return value.encode("utf-8") if isinstance(value, str) else value


class IAvatarIdAtOnce(Interface):
    """
    An optional part of a credentials checker (``ICredentialsChecker``)
    whose answer is usually known at once (`pop3d.checkers.PasswdFileChecker`,
    and `pop3d.checkers.FirstMatchChecker` over such checkers): asked this
    way (`login_at_once`), a login waits on no Deferred when it need not;
    every callback on a Deferred that has fired costs it about 8,000
    instructions.
    """

    def avatar_id_at_once(credentials: Any) -> Any:
        """
        What ``requestAvatarId(credentials)`` would fire with, itself when
        it is known without waiting (never by blocking the reactor thread:
        a slow scheme's work still goes to the thread pool), else a
        Deferred of it, which may fail as ``requestAvatarId``'s would.  A
        refusal known at once is raised: ``UnauthorizedLogin`` (a wrong
        password or an unknown user), `pop3d.errors.LoginRefused` (the
        password was right, the user is refused, with the reason) or
        `pop3d.errors.AuthUnavailable` (the database could not say);
        anything else raised is a broken checker, answered as a failed
        login.  A class that provides this and overrides
        ``requestAvatarId`` must override this too: callers that find it
        use it instead.
        """


def avatar_id_later(checker: Any, credentials: Any) -> Deferred[Any]:
    """
    ``requestAvatarId`` of a checker that provides `IAvatarIdAtOnce`: its
    `IAvatarIdAtOnce.avatar_id_at_once` answer, always as a Deferred (what
    twisted.cred's Portal.login expects).
    """
    return maybeDeferred(checker.avatar_id_at_once, credentials)


def login_at_once(portal: Portal, credentials: Any, mind: object, *interfaces: Any) -> object:
    """
    ``portal.login(credentials, mind, *interfaces)``, its answer itself
    (the avatar tuple, or a `Failure`) when the checker for ``credentials``
    (an `IAvatarIdAtOnce`) and the realm answer at once, else a Deferred
    of it: a login's answer without a Deferred between checker, realm and
    caller, as twisted.cred's ``Portal.login`` would give it otherwise.
    """
    checker = None
    for interface, candidate in portal.checkers.items():
        if interface.providedBy(credentials):
            checker = candidate
            break
    if checker is None or not IAvatarIdAtOnce.providedBy(checker):
        return portal.login(credentials, mind, *interfaces)
    try:
        avatar_id = checker.avatar_id_at_once(credentials)
        if isinstance(avatar_id, Deferred):
            return avatar_id.addCallback(portal.realm.requestAvatar, mind, *interfaces)
        return portal.realm.requestAvatar(avatar_id, mind, *interfaces)
    except Exception:
        return Failure()


@implementer(IVerifiers)
class PortalVerifiers:
    """What the checkers of a cred ``portal`` can verify, asked each time."""

    __slots__ = ("_portal",)

    def __init__(self, portal: Portal) -> None:
        self._portal = portal

    def can_verify(self, credentials: InterfaceClass) -> bool:
        return self._checker_for(credentials) is not None

    def lookup(self, credentials: InterfaceClass, wanted: InterfaceClass) -> Any:
        checker = self._checker_for(credentials)
        return None if checker is None else wanted(checker, None)

    def _checker_for(self, credentials: InterfaceClass) -> Any:
        # The checker Portal.login would choose: the first registered for an
        # interface that credentials of this type provide.
        for interface, checker in self._portal.checkers.items():
            if credentials.isOrExtends(interface):
                return checker
        return None


@dataclass(frozen=True)
class PasswordEntry:
    """One user's stored password: ``{SCHEME}secret``."""

    scheme: str
    secret: bytes

    @property
    def kind(self) -> PasswordScheme:
        return SCHEMES[self.scheme]

    @classmethod
    def parse(
        cls, stored: bytes, default: PasswordScheme | None = None, *, noscheme: bool = False
    ) -> PasswordEntry:
        """
        A stored password as every password database reads it (passwd-file,
        SQL, LDAP): ``{SCHEME}secret`` in any scheme `pop3d.passwords.get_scheme`
        knows (any case, Dovecot's aliases too); without the prefix (or with
        ``noscheme``, Dovecot's ``password_noscheme``), a secret of
        ``default``.  `PasswordSchemeError` says what is wrong, never the secret.
        """
        prefixed = not noscheme and stored.startswith(b"{") and b"}" in stored
        if prefixed or default is None:
            # Without a default the prefix is needed (split_scheme says so).
            name, secret = split_scheme(stored)
            scheme = get_scheme(name)
        else:
            scheme, secret = default, stored
        try:
            scheme.check(secret)
        except PasswordSchemeError as error:
            raise PasswordSchemeError(f"malformed {{{scheme.name}}} password: {error}") from None
        return cls(scheme.name, secret)


class PasswordLookup(Protocol):
    """What a `PasswordCheck` is given: one user's entry, and the means to use it."""

    @property
    def username(self) -> bytes:
        """The user name as the file spells it."""

    @property
    def entry(self) -> PasswordEntry | None:
        """The user's entry; None for an unknown user (who must take as long)."""

    @property
    def checker(self) -> object:
        """
        The checker the entry came from, for a check that needs one of its
        add-on interfaces (pop3d's own checks need none: SCRAM's keys come
        from `scram_keys`).
        """

    def dummy(self, credentials: InterfaceClass) -> PasswordEntry:
        """
        An entry to check an unknown user's ``credentials`` against, of the
        kind the file's entries have (made by the check's ``dummy``).
        """

    def check_password(self, password: bytes) -> Deferred[bool]:
        """``password`` against the entry (or a dummy like the usual entry), whatever its scheme."""

    def check_password_at_once(self, password: bytes) -> Deferred[bool] | bool:
        """
        `check_password`, its answer itself for a cheap scheme (no Deferred,
        whose every callback costs a login about 8,000 instructions), else a
        Deferred (a slow scheme's work runs in the thread pool).
        """

    def scram_keys(self) -> Deferred[ScramKeys | None]:
        """
        The SCRAM-SHA-256 keys of the entry (stored, or derived from a
        plaintext one); None for an unknown user or another scheme, after
        the work the checker's usual SCRAM-capable entry costs.
        """

    def run_slow(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run CPU-heavy ``work`` away from the reactor thread when there is a pool."""


@dataclass(frozen=True)
class PasswordCheck:
    """How a password file verifies one credential type."""

    #: The credential type (a zope interface the credentials provide).
    interface: InterfaceClass
    #: The check: does ``credentials`` match the user's entry?  False for an
    #: unknown user, after the same work as for a known one.  The answer
    #: itself when it is known at once, else a Deferred; it may raise.
    verify: Callable[[PasswordLookup, Any], Deferred[bool] | bool]
    #: Whether a file whose entries have these schemes can verify the type at
    #: all (else it is not advertised, and mechanisms that need it are not offered).
    possible: Callable[[Collection[PasswordScheme]], bool] = lambda schemes: True
    #: The entry an unknown user is checked against, for files of these schemes.
    dummy: Callable[[Collection[PasswordScheme]], PasswordEntry] | None = None

    def run(self, lookup: PasswordLookup, credentials: Any) -> Deferred[bool]:
        """``verify``, its answer or its exception always in a Deferred."""
        try:
            result = self.verify(lookup, credentials)
        except Exception:
            return fail()
        return result if isinstance(result, Deferred) else succeed(result)


class PasswordChecks:
    """The table of `PasswordCheck`s, one per credential type."""

    def __init__(self, checks: Iterable[PasswordCheck] = ()) -> None:
        self._checks: dict[InterfaceClass, PasswordCheck] = {}
        # In the order `__iter__` gives them, made when first asked (every
        # login asks): None after a change.
        self._ordered: tuple[PasswordCheck, ...] | None = None
        for check in checks:
            self.register(check)

    def register(self, check: PasswordCheck) -> None:
        """Add ``check`` (replacing an earlier check of its credential type)."""
        self._checks[check.interface] = check
        self._ordered = None

    def __iter__(self) -> Iterator[PasswordCheck]:
        """The checks, those of derived credential types first."""
        if self._ordered is None:
            order = most_specific_first(self._checks)
            self._ordered = tuple(self._checks[interface] for interface in order)
        return iter(self._ordered)

    def interfaces(self) -> tuple[InterfaceClass, ...]:
        """Every credential type there is a check for."""
        return tuple(check.interface for check in self)

    def for_credentials(self, credentials: object) -> PasswordCheck | None:
        """The check for ``credentials``: that of the most derived type they provide."""
        for check in self:
            if check.interface.providedBy(credentials):
                return check
        return None

    def possible(self, schemes: Collection[PasswordScheme]) -> tuple[InterfaceClass, ...]:
        """The credential types entries of these ``schemes`` can verify."""
        return tuple(check.interface for check in self if check.possible(schemes))

    def dummies(self, schemes: Collection[PasswordScheme]) -> dict[InterfaceClass, PasswordEntry]:
        """What an unknown user's credentials of each type are checked against."""
        return {check.interface: check.dummy(schemes) for check in self if check.dummy is not None}


#: The checks every `pop3d.checkers.PasswdFileChecker` uses by default; each
#: credential type's module registers its own.
PASSWORD_CHECKS = PasswordChecks()


def _verify_password(lookup: PasswordLookup, credentials: Any) -> Deferred[bool] | bool:
    """
    USER/PASS: each form of a prepared password in turn, until one matches
    (the answer at once where each check answers at once).
    """
    if isinstance(credentials, PreparedUsernamePassword):
        first, *others = credentials.passwords
    else:
        first, others = as_bytes(credentials.password), []
    checked = lookup.check_password_at_once(first)
    for other in others:
        if not isinstance(checked, Deferred):
            if checked:
                return True
            checked = lookup.check_password_at_once(other)
            continue

        def next_form(matched: bool, other: bytes = other) -> bool | Deferred[bool]:
            return matched or lookup.check_password(other)

        checked = checked.addCallback(next_form)
    return checked


def _verify_hashed(lookup: PasswordLookup, credentials: Any) -> bool:
    """APOP: the digest covers the password itself."""
    found = lookup.entry
    if found is None:
        credentials.checkPassword(secrets.token_hex(8).encode("ascii"))
        return False
    if not found.kind.plaintext:
        return False
    return bool(credentials.checkPassword(found.secret))


PASSWORD_CHECKS.register(PasswordCheck(IUsernamePassword, _verify_password))
PASSWORD_CHECKS.register(
    PasswordCheck(
        IUsernameHashedPassword,
        _verify_hashed,
        possible=lambda schemes: any(scheme.plaintext for scheme in schemes),
    )
)


class PasswordVerifier:
    """
    Checks passwords against stored entries, for every checker that holds
    them (a passwd-file, an SQL or LDAP password lookup).

    A slow scheme's work (bcrypt, Argon2, SHA-crypt, PBKDF2; any `run_slow`
    work) runs in ``reactor``'s thread pool, at most ``max_concurrent`` at
    once (the others wait their turn, in order); without a reactor it runs
    inline.  A cheap scheme's check never waits for the pool.

    An unknown user's password is checked against a dummy secret that no
    password matches and that costs what the checker's usual entry costs
    (made once per scheme and cost), so that it takes the path and the time
    of a wrong password.
    """

    __slots__ = ("_dummies", "_threads")

    def __init__(
        self, reactor: IReactorThreads | None = None, max_concurrent: int = DEFAULT_MAX_CONCURRENT
    ) -> None:
        self._threads = BoundedThreads(reactor, max_concurrent)
        self._dummies: dict[Hashable, bytes] = {}

    def run_slow(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run blocking ``work`` in the thread pool, in its turn; without a reactor, now."""
        return self._threads.run(work, *args)

    def check(
        self,
        entry: PasswordEntry | None,
        password: bytes,
        like: PasswordEntry | PasswordScheme,
    ) -> Deferred[bool]:
        """
        Whether ``password`` matches ``entry``.  For an unknown user (no
        ``entry``): False, after checking it against a dummy of ``like``'s
        scheme and cost (a scheme: at its default cost).
        """
        answer = self.check_at_once(entry, password, like)
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def check_at_once(
        self,
        entry: PasswordEntry | None,
        password: bytes,
        like: PasswordEntry | PasswordScheme,
    ) -> Deferred[bool] | bool:
        """`check`, its answer itself for a cheap scheme (no slow work to wait for)."""
        if entry is None:
            scheme = like.kind if isinstance(like, PasswordEntry) else like
            if scheme.slow:
                return self.run_slow(self._verify_dummy, like, password)
            return self._verify_dummy(like, password)
        kind = entry.kind
        if kind.slow:
            return self.run_slow(kind.verify, entry.secret, password)
        return kind.verify(entry.secret, password)

    def scram_keys(
        self, username: bytes, entry: PasswordEntry | None, derive_dummy: bool
    ) -> Deferred[ScramKeys | None]:
        """
        The SCRAM-SHA-256 keys of ``username``'s ``entry`` (`pop3d.sasl.IScramKeySource`):
        those of a ``{SCRAM-SHA-256}`` entry as stored; those of a plaintext
        entry derived (as slow work, for each exchange) with
        `pop3d.passwords.SCRAM_ITERATIONS` iterations and the user's
        `pop3d.passwords.scram_salt`.  None for an unknown user or another
        scheme, after deriving dummy keys if ``derive_dummy`` (the checker's
        usual SCRAM-capable entries are plaintext), so that the time it takes
        does not tell which users exist.
        """
        if entry is not None and isinstance(entry.kind, ScramSHA256Scheme):
            return succeed(parse_scram_secret(entry.secret))
        password = entry.secret if entry is not None and entry.kind.plaintext else None
        if password is None and not derive_dummy:
            return succeed(None)
        derived = self.run_slow(
            scram_keys, password or _DUMMY_SCRAM_PASSWORD, scram_salt(username), SCRAM_ITERATIONS
        )
        return derived.addCallback(lambda keys: keys if password is not None else None)

    def _verify_dummy(self, like: PasswordEntry | PasswordScheme, password: bytes) -> bool:
        # Made once per scheme and cost, in the thread pool for slow schemes;
        # two threads making it at once is harmless.
        scheme, sample = (
            (like.kind, like.secret) if isinstance(like, PasswordEntry) else (like, None)
        )
        key: Hashable = (scheme.name, "default" if sample is None else scheme.cost(sample))
        dummy = self._dummies.get(key)
        if dummy is None:
            unknown = secrets.token_hex(16).encode("ascii")
            made = scheme.hash(unknown) if sample is None else scheme.dummy_like(sample)
            dummy = self._dummies[key] = made
        scheme.verify(dummy, password)
        return False


_DUMMY_SCRAM_PASSWORD = secrets.token_hex(16).encode("ascii")


@dataclass(frozen=True, slots=True)
class StoredPasswordLookup:
    """One login's stored entry, for a `PasswordCheck` (a `PasswordLookup`)."""

    #: The user name as the checker's store spells it.
    username: bytes
    #: The user's entry; None for an unknown user.
    entry: PasswordEntry | None
    #: The checker the entry came from (see `PasswordLookup.checker`).
    checker: object
    verifier: PasswordVerifier
    #: The usual entry (or scheme, at its default cost) an unknown user's
    #: password is checked against a dummy of.
    like: PasswordEntry | PasswordScheme
    #: What an unknown user's credentials of each type are checked against
    #: (`PasswordChecks.dummies`).
    dummies: Mapping[InterfaceClass, PasswordEntry]
    #: Whether the usual SCRAM-capable entry is plaintext (its keys derived
    #: for each exchange): then an unknown user's dummy keys are derived too.
    scram_derives: bool = False

    def dummy(self, credentials: InterfaceClass) -> PasswordEntry:
        return self.dummies[credentials]

    def check_password(self, password: bytes) -> Deferred[bool]:
        return self.verifier.check(self.entry, password, self.like)

    def check_password_at_once(self, password: bytes) -> Deferred[bool] | bool:
        return self.verifier.check_at_once(self.entry, password, self.like)

    def scram_keys(self) -> Deferred[ScramKeys | None]:
        # The entry this login already holds: the store is not asked again.
        return self.verifier.scram_keys(self.username, self.entry, self.scram_derives)

    def run_slow(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return self.verifier.run_slow(work, *args)


# The SASL credential types register their checks from their own modules,
# which import this one: imported here, at the end, so that the table is
# whole wherever it is used (an SQL or LDAP checker made by a program that
# never imports pop3d.checkers, or twistd listing what --auth sql can check).
from pop3d.sasl import cram_md5, scram  # noqa: E402

#: The modules of the SASL credential types a password file verifies.
CREDENTIAL_TYPE_MODULES = (cram_md5, scram)
