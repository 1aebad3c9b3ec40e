"""
``--auth ldap:/etc/pop3d/dovecot-ldap.conf.ext``: users in an LDAP directory,
found through the same ``dovecot-ldap.conf.ext`` Dovecot reads (see
`pop3d.authdb.ldapconf` for the file).

Two ways to check a password, as in Dovecot:

- Password lookups (``auth_bind = no``): ``pass_filter`` finds the user's
  entry, ``pass_attrs`` map its attributes to fields, and the ``password``
  field (``userPassword=password``: ``{SSHA}``, ``{CRYPT}``... or
  ``default_pass_scheme``) is checked by pop3d (`pop3d.passwords`), with
  the same checks as a passwd-file (`pop3d.credchecks.PASSWORD_CHECKS`), so
  APOP and SASL CRAM-MD5 work when the directory holds plaintext passwords.
- Authentication binds (``auth_bind = yes``): the directory checks the
  password: pop3d binds as the user's DN (found with ``pass_filter``, or
  made from ``auth_bind_userdn``) with it, then binds back as ``dn``.  Only
  USER/PASS and SASL PLAIN/LOGIN can work this way.

Fields, read as from SQL (`pop3d.userdb.passdb_user`): ``user`` (or
``username``/``domain``: the canonical name), ``nologin`` with ``reason``
(`pop3d.errors.LoginRefused` after the password was verified),
``allow_nets``, and ``userdb_*`` (prefetched per-user settings).  A file that
sets ``user_filter`` or ``user_attrs`` also serves as the userdb
(`pop3d.userdb.IUserDatabase`): ``home``, ``mail``, ``login_delay``,
``expire``.

Every variable put into a filter is escaped as RFC 4515 says (``*``, ``(``,
``)``, ``\\``, NUL), into a DN (``base``, ``auth_bind_userdn``) as RFC 4514
says, so a user name cannot change a search or a bind.

The directory is asked through python-ldap (OpenLDAP's libldap) in the
reactor's thread pool, on a pool of connections bound as ``dn``: a server
that is down, refuses the service bind or does not answer within
`DEFAULT_TIMEOUT` fails the login with `pop3d.errors.AuthUnavailable`
(``-ERR [SYS/TEMP]``), logged once per outage and once when the server is
back; broken connections are dropped and new ones made at the next login.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer
from zope.interface.interface import InterfaceClass

from pop3d.authdb import OutageLog
from pop3d.authdb.ldapconf import (
    AttributeMapping,
    Deref,
    LdapSettings,
    RequireCert,
    entry_fields,
    read_ldap_settings,
    requested_attributes,
)
from pop3d.credchecks import (
    DEFAULT_MAX_CONCURRENT,
    PASSWORD_CHECKS,
    PasswordChecks,
    PasswordEntry,
    PasswordVerifier,
    StoredPasswordLookup,
    as_bytes,
)
from pop3d.credentials import PreparedUsernamePassword
from pop3d.dovecotconf import ConfigFileError
from pop3d.dovecotvars import Variables, expand
from pop3d.errors import AuthUnavailable
from pop3d.passwords import SCHEMES, PasswordScheme, PasswordSchemeError, get_scheme
from pop3d.reloading import IReloadable, ReloadableFiles
from pop3d.sasl import IScramSHA256Credentials
from pop3d.userdb import (
    AuthenticatedUser,
    IUserDatabase,
    IUserSettingsSource,
    LoginContext,
    UserFieldError,
    UserSettings,
    login_context_of,
    passdb_user,
)

try:
    import ldap
    import ldap.dn
    import ldap.filter
except ImportError:  # the "ldap" extra is not installed
    ldap = None

log = Logger()

_T = TypeVar("_T")

#: Seconds a connection, a bind or a search may take before the server is
#: taken for unavailable.
DEFAULT_TIMEOUT = 5.0
INSTALL_HINT = "python-ldap is not installed: pip install 'pop3d[ldap]'"


class LdapLibraryMissing(RuntimeError):
    """python-ldap is not installed."""


def escape_filter_value(value: str) -> str:
    """A value for an LDAP filter (RFC 4515 section 3: ``*``, ``(``, ``)``, ``\\``, NUL)."""
    return str(ldap.filter.escape_filter_chars(value, escape_mode=0))


def escape_dn_value(value: str) -> str:
    """A value for an attribute value of a DN (RFC 4514 section 2.4)."""
    return str(ldap.dn.escape_dn_chars(value))


class _Unavailable(Exception):
    """The directory could not answer (down, slow, refusing our bind)."""


class _Ambiguous(Exception):
    """A filter matched more than one entry."""


@dataclass(frozen=True)
class LdapEntry:
    """A found entry: its DN and the first value of each attribute (names lower case)."""

    dn: str
    attributes: dict[str, str]


def _first_values(attributes: dict[str, list[bytes]]) -> dict[str, str]:
    # surrogateescape: a userPassword that is not UTF-8 comes back byte for byte.
    return {
        name.lower(): values[0].decode("utf-8", "surrogateescape")
        for name, values in attributes.items()
        if values
    }


def _describe(error: Exception) -> str:
    """An LDAP error for the log: libldap's description and the server's text."""
    details = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    parts = [str(details.get(key)) for key in ("desc", "info") if details.get(key)]
    return ": ".join(parts) or type(error).__name__


_SCOPES = {"base": "SCOPE_BASE", "onelevel": "SCOPE_ONELEVEL", "subtree": "SCOPE_SUBTREE"}
_DEREFS = {
    Deref.NEVER: "DEREF_NEVER",
    Deref.SEARCHING: "DEREF_SEARCHING",
    Deref.FINDING: "DEREF_FINDING",
    Deref.ALWAYS: "DEREF_ALWAYS",
}
_REQUIRE_CERT = {
    RequireCert.NEVER: "OPT_X_TLS_NEVER",
    RequireCert.HARD: "OPT_X_TLS_HARD",
    RequireCert.DEMAND: "OPT_X_TLS_DEMAND",
    RequireCert.ALLOW: "OPT_X_TLS_ALLOW",
    RequireCert.TRY: "OPT_X_TLS_TRY",
}


class LdapConnections:
    """
    Connections to the directory bound as ``dn`` (anonymously without one),
    each used by one thread at a time; only called from the thread pool.
    """

    def __init__(self, settings: LdapSettings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def _open(self) -> Any:
        settings = self.settings
        connection = ldap.initialize(" ".join(settings.uris))
        options: list[tuple[int, Any]] = [
            (ldap.OPT_PROTOCOL_VERSION, settings.ldap_version),
            (ldap.OPT_REFERRALS, 0),
            (ldap.OPT_NETWORK_TIMEOUT, self.timeout),
            (ldap.OPT_TIMEOUT, self.timeout),
            (ldap.OPT_DEREF, getattr(ldap, _DEREFS[settings.deref])),
        ]
        tls_files = [
            (ldap.OPT_X_TLS_CACERTFILE, settings.tls_ca_cert_file),
            (ldap.OPT_X_TLS_CACERTDIR, settings.tls_ca_cert_dir),
            (ldap.OPT_X_TLS_CERTFILE, settings.tls_cert_file),
            (ldap.OPT_X_TLS_KEYFILE, settings.tls_key_file),
            (ldap.OPT_X_TLS_CIPHER_SUITE, settings.tls_cipher_suite),
        ]
        options += [(option, value) for option, value in tls_files if value is not None]
        if settings.tls_require_cert is not None:
            require = getattr(ldap, _REQUIRE_CERT[settings.tls_require_cert])
            options.append((ldap.OPT_X_TLS_REQUIRE_CERT, require))
        for option, value in options:
            connection.set_option(option, value)
        # Apply the TLS options to this connection's own TLS context.
        connection.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        try:
            if settings.starttls:
                connection.start_tls_s()
            self.bind_service(connection)
        except BaseException:
            self._close(connection)
            raise
        return connection

    def bind_service(self, connection: Any) -> None:
        """Bind as ``dn`` (or anonymously): after a user's bind, and on a new connection."""
        connection.simple_bind_s(self.settings.bind_dn or "", self.settings.bind_password or "")

    @staticmethod
    def _close(connection: Any) -> None:
        try:
            connection.unbind_ext_s()
        except Exception:  # noqa: S110 - a broken connection may not close cleanly
            pass

    @contextmanager
    def _connection(self, fresh: bool) -> Iterator[Any]:
        connection = None
        if not fresh:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._open()
        try:
            yield connection
        except BaseException:
            self._close(connection)
            raise
        with self._lock:
            self._idle.append(connection)

    def run(self, work: Callable[[Any], _T]) -> _T:
        """
        ``work(connection)`` on a bound connection.  A connection the server
        closed while it sat idle is replaced once; a server that cannot be
        reached, times out or refuses the service bind raises `_Unavailable`.
        """
        for fresh in (False, True):
            try:
                with self._connection(fresh) as connection:
                    return work(connection)
            except ldap.SERVER_DOWN as error:
                if fresh:
                    raise _Unavailable(_describe(error)) from None
            except (ldap.TIMEOUT, ldap.CONNECT_ERROR) as error:
                raise _Unavailable(_describe(error)) from None
            except ldap.INVALID_CREDENTIALS as error:
                raise _Unavailable(f"cannot bind as dn: {_describe(error)}") from None
            except ldap.LDAPError as error:
                raise _Unavailable(_describe(error)) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections (at shutdown)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self._close(connection)


@implementer(ICredentialsChecker, IReloadable)
class LdapChecker:
    """
    Checks logins against an LDAP directory configured by a
    ``dovecot-ldap.conf.ext`` (see the module's docstring).

    Its avatar ids are `pop3d.userdb.AuthenticatedUser`; with ``user_filter``
    or ``user_attrs`` in the file it is also the `pop3d.userdb.IUserDatabase`.
    Nothing is asked before `run_slow_work_in` gives it a reactor.  SIGHUP
    (`reload`) reads the file again; the credential types it offers and
    whether it is a user database stay as they were at start-up.
    """

    def __init__(
        self,
        settings: LdapSettings,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        checks: PasswordChecks = PASSWORD_CHECKS,
    ) -> None:
        if ldap is None:
            raise LdapLibraryMissing(INSTALL_HINT)
        self.settings = settings
        self.connections = LdapConnections(settings, timeout)
        self._checks = checks
        self._reactor: IReactorThreads | None = None
        # Searches, binds and slow password checks share one bound.
        self._verifier = PasswordVerifier()
        self._outage = OutageLog(f"LDAP server {' '.join(settings.uris)}")
        self._file = ReloadableFiles(
            settings.path, partial(read_ldap_settings, settings.path), self._use, (ConfigFileError,)
        )
        default = SCHEMES[settings.default_pass_scheme]
        self._default_kind = default
        self.credentialInterfaces: tuple[InterfaceClass, ...]
        if settings.auth_bind:
            self.credentialInterfaces = (IUsernamePassword,)
        else:
            # SCRAM needs stored keys from an IScramKeySource, which this is not.
            self.credentialInterfaces = tuple(
                check.interface
                for check in checks
                if check.possible([default]) and check.interface is not IScramSHA256Credentials
            )
        self._dummy_entries = checks.dummies([default])
        # An unknown user's password is checked against a dummy like the
        # last password the directory gave: the same scheme and cost.
        self._usual: PasswordEntry | PasswordScheme = SCHEMES["SSHA"]
        if settings.userdb:
            alsoProvides(self, IUserDatabase)
        prefetches = any(
            (mapping.field or "").startswith("userdb_") for mapping in settings.pass_attrs
        )
        if settings.userdb or prefetches:
            alsoProvides(self, IUserSettingsSource)

    def run_slow_work_in(
        self, reactor: IReactorThreads, max_concurrent: int = DEFAULT_MAX_CONCURRENT
    ) -> None:
        """
        Ask the directory (and run slow password checks) in ``reactor``'s
        thread pool, ``max_concurrent`` at once; connections are closed
        when the reactor stops.
        """
        self._reactor = reactor
        self._file.threads = reactor
        self._verifier = PasswordVerifier(reactor, max_concurrent)
        if IReactorCore.providedBy(reactor):
            core: IReactorCore = reactor
            core.addSystemEventTrigger("after", "shutdown", lambda: self.connections.close())

    def reload(self) -> Deferred[None]:
        """
        `IReloadable`: read the file again, in the thread pool (logins wait
        for it); a file that cannot be used is logged and kept.
        """
        return self._file.read_again()

    def _use(self, settings: LdapSettings) -> None:
        if settings == self.settings:
            return
        retired = self.connections
        self.settings = settings
        self.connections = LdapConnections(settings, retired.timeout)
        self._outage.what = f"LDAP server {' '.join(settings.uris)}"
        # Unbinding talks to the server: not on the reactor thread.
        self._in_thread(retired.close).addErrback(lambda _: None)

    def _in_thread(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if self._reactor is None:
            return fail(RuntimeError("LdapChecker.run_slow_work_in was not called"))
        return self._verifier.run_slow(work, *args)

    def _ask(self, work: Callable[[Any], _T]) -> Deferred[_T]:
        """``work(connection)`` in the thread pool; an outage becomes AuthUnavailable."""
        asked = self._in_thread(self.connections.run, work)
        return asked.addCallbacks(self._answered, self._unanswered)

    def _answered(self, result: _T) -> _T:
        self._outage.succeeded()
        return result

    def _unanswered(self, failure: Failure) -> Failure:
        if not failure.check(_Unavailable):
            return failure
        self._outage.failed(str(failure.value))
        raise AuthUnavailable()

    # -- searching (in a thread) ---------------------------------------------------------

    def _search(
        self,
        connection: Any,
        variables: Variables,
        filter_template: str,
        mappings: tuple[AttributeMapping, ...],
        skip: frozenset[str] = frozenset(),
    ) -> LdapEntry | None:
        settings = self.settings
        base = expand(settings.base, variables, escape_dn_value)
        search_filter = expand(filter_template, variables, escape_filter_value)
        attributes = requested_attributes([m for m in mappings if m.field not in skip])
        try:
            results = connection.search_ext_s(
                base,
                getattr(ldap, _SCOPES[settings.scope.value]),
                search_filter,
                attributes,
                timeout=self.connections.timeout,
                sizelimit=2,
            )
        except ldap.NO_SUCH_OBJECT:
            return None
        except ldap.SIZELIMIT_EXCEEDED:
            raise _Ambiguous() from None
        entries = [(dn, found) for dn, found in results if dn is not None]
        if len(entries) > 1:
            raise _Ambiguous()
        if not entries:
            return None
        dn, found = entries[0]
        return LdapEntry(dn, _first_values(found))

    def _bind_as_user(
        self,
        connection: Any,
        variables: Variables,
        passwords: tuple[bytes, ...],
    ) -> tuple[bool, LdapEntry | None]:
        """Find the user's DN (or make it from auth_bind_userdn) and bind as it."""
        settings = self.settings
        entry: LdapEntry | None
        if settings.auth_bind_userdn is not None:
            dn = expand(settings.auth_bind_userdn, variables, escape_dn_value)
            entry = None
        else:
            without_password = frozenset({"password"})
            entry = self._search(
                connection, variables, settings.pass_filter, settings.pass_attrs, without_password
            )
            # An unknown user costs a bind too, to a DN that does not exist.
            base = expand(settings.base, variables, escape_dn_value)
            dn = entry.dn if entry is not None else f"cn={secrets.token_hex(8)},{base}"
        matched = False
        try:
            for password in passwords:
                try:
                    connection.simple_bind_s(dn, password)
                except (
                    ldap.INVALID_CREDENTIALS,
                    ldap.INVALID_DN_SYNTAX,
                    ldap.UNWILLING_TO_PERFORM,
                    ldap.INAPPROPRIATE_AUTH,
                ):
                    continue
                matched = True
                break
        finally:
            self.connections.bind_service(connection)
        return matched and (entry is not None or settings.auth_bind_userdn is not None), entry

    # -- ICredentialsChecker -------------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        # With what a reading of the file under way (SIGHUP) gives.
        return self._file.settled().addCallback(lambda _: self._request_avatar_id(credentials))

    def _request_avatar_id(self, credentials: Any) -> Deferred[Any]:
        try:
            user = as_bytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin())
        context = login_context_of(credentials)
        if self.settings.auth_bind:
            return self._auth_bind(user, credentials, context)
        return self._password_lookup(user, credentials, context)

    def _auth_bind(
        self, user: str, credentials: Any, context: LoginContext | None
    ) -> Deferred[AuthenticatedUser]:
        if not IUsernamePassword.providedBy(credentials):
            return fail(UnauthorizedLogin())
        if isinstance(credentials, PreparedUsernamePassword):
            passwords = credentials.passwords
        else:
            passwords = (as_bytes(credentials.password),)
        # An empty password would make an unauthenticated bind, which
        # servers accept (RFC 4513 section 5.1.2): never a login.
        if not passwords[0]:
            return fail(UnauthorizedLogin())
        variables = Variables.for_login(
            user, context, passwords[0].decode("utf-8", "surrogateescape")
        )
        bound = self._ask(lambda c: self._bind_as_user(c, variables, passwords))

        def decided(outcome: tuple[bool, LdapEntry | None]) -> AuthenticatedUser:
            matched, entry = outcome
            if not matched:
                raise UnauthorizedLogin()
            fields = (
                {}
                if entry is None
                else entry_fields(self.settings.pass_attrs, variables, entry.attributes)
            )
            fields.pop("password", None)
            return self._authenticated(user, fields)

        return bound.addErrback(self._ambiguous, user).addCallback(decided)

    def _ambiguous(self, failure: Failure, user: str) -> Any:
        failure.trap(_Ambiguous)
        log.error(
            "LDAP: pass_filter of {path} matches several entries for {user}: refused",
            path=self.settings.path,
            user=user,
        )
        raise UnauthorizedLogin()

    def _password_lookup(
        self, user: str, credentials: Any, context: LoginContext | None
    ) -> Deferred[AuthenticatedUser]:
        settings = self.settings
        variables = Variables.for_login(user, context)
        found = self._ask(
            lambda c: self._search(c, variables, settings.pass_filter, settings.pass_attrs)
        ).addErrback(self._ambiguous, user)

        def verify(entry: LdapEntry | None) -> Deferred[AuthenticatedUser]:
            fields = (
                {}
                if entry is None
                else entry_fields(settings.pass_attrs, variables, entry.attributes)
            )
            stored = self._password_entry(user, fields.pop("password", None))
            check = self._checks.for_credentials(credentials)
            if check is None:
                return fail(UnauthorizedLogin())
            lookup = StoredPasswordLookup(
                user.encode("utf-8"),
                stored,
                self,
                self._verifier,
                self._usual,
                self._dummy_entries,
            )
            matched = check.run(lookup, credentials)

            def decided(ok: bool) -> AuthenticatedUser:
                if not ok or stored is None:
                    raise UnauthorizedLogin()
                return self._authenticated(user, fields)

            return matched.addCallback(decided)

        return found.addCallback(verify)

    def _password_entry(self, user: str, password: str | None) -> PasswordEntry | None:
        """The ``password`` field as a stored password; None if there is none pop3d can use."""
        if not password:
            return None
        try:
            entry = PasswordEntry.parse(
                # The file's scheme of the moment (SIGHUP may change it).
                password.encode("utf-8", "surrogateescape"),
                get_scheme(self.settings.default_pass_scheme),
            )
        except PasswordSchemeError as error:
            log.error(
                "LDAP: the password of {user} cannot be used: {error}", user=user, error=str(error)
            )
            return None
        self._usual = entry
        return entry

    def _authenticated(self, user: str, fields: dict[str, str]) -> AuthenticatedUser:
        """The avatar id of a user whose password was right, after nologin and friends."""
        try:
            return passdb_user(user, fields, self.settings.path)
        except UserFieldError as error:
            log.error("LDAP: the entry of {user} is unusable: {error}", user=user, error=str(error))
            raise AuthUnavailable() from None

    # -- IUserDatabase ---------------------------------------------------------------------

    def lookup(self, user: str, context: LoginContext | None) -> Deferred[UserSettings | None]:
        """``user_filter`` and ``user_attrs``: the user's settings, None if not found."""
        return self._file.settled().addCallback(lambda _: self._lookup(user, context))

    def _lookup(self, user: str, context: LoginContext | None) -> Deferred[UserSettings | None]:
        settings = self.settings
        variables = Variables.for_login(user, context)
        found = self._ask(
            lambda c: self._search(c, variables, settings.user_filter, settings.user_attrs)
        )

        def read(entry: LdapEntry | None) -> UserSettings | None:
            if entry is None:
                return None
            fields = entry_fields(settings.user_attrs, variables, entry.attributes)
            try:
                return UserSettings.from_fields(fields, settings.path)
            except UserFieldError as error:
                log.error(
                    "LDAP: the entry of {user} is unusable: {error}", user=user, error=str(error)
                )
                raise AuthUnavailable() from None

        def several(failure: Failure) -> None:
            failure.trap(_Ambiguous)
            log.error(
                "LDAP: user_filter of {path} matches several entries for {user}",
                path=settings.path,
                user=user,
            )
            return None

        return found.addErrback(several).addCallback(read)


@implementer(ICheckerFactory, IPlugin)
class LdapCheckerFactory:
    """The ``--auth ldap:PATH`` plugin for twisted.cred.strcred."""

    authType = "ldap"
    authHelp = (
        "Users in an LDAP directory, configured by Dovecot's dovecot-ldap.conf.ext "
        "(uris, dn, base, pass_filter, pass_attrs, auth_bind, user_filter, user_attrs...).  "
        "Needs python-ldap: pip install 'pop3d[ldap]'."
    )
    argStringFormat = "Path to a dovecot-ldap.conf.ext"
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> LdapChecker:
        if not argstring:
            raise ValueError("ldap needs a path: --auth ldap:/etc/pop3d/dovecot-ldap.conf.ext")
        if ldap is None:
            raise LdapLibraryMissing(INSTALL_HINT)
        return LdapChecker(read_ldap_settings(argstring))
