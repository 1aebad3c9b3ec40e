"""
``--auth sql:/etc/pop3d/dovecot-sql.conf.ext``: users and passwords in an SQL
database, configured by Dovecot's own ``dovecot-sql.conf.ext``.

The file is read as Dovecot reads it (`pop3d.dovecotconf`): ``driver``
(``pgsql``, ``mysql`` or ``sqlite``), ``connect``, ``default_pass_scheme``,
``password_query``, ``user_query`` and ``iterate_query`` (accepted, unused).
Dovecot's variables in the queries become bound parameters
(`pop3d.authdb.sqlquery`).

PostgreSQL is reached through psycopg 3 and a psycopg_pool connection pool
of ``maxconns`` connections (Dovecot's key in ``connect``, 5 by default);
MySQL and MariaDB through PyMySQL, one connection per thread that queries;
SQLite through the standard library, read-only, one connection per thread.
Every query runs in the reactor's thread pool, at most ``maxconns`` at once,
and is bounded by `DEFAULT_QUERY_TIMEOUT` on the database's side
(``statement_timeout``, MariaDB's ``max_statement_time`` and the client's
read timeout, SQLite's progress handler) and on the reactor's: a
database that is down or slow answers the client ``-ERR [SYS/TEMP]``
(`pop3d.errors.AuthUnavailable`), is logged once when it goes and once when
it is back, and is reconnected to by itself.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.authdb import OutageLog
from pop3d.authdb.sqlquery import (
    MYSQL,
    PYFORMAT,
    QMARK,
    BoundQuery,
    Placeholders,
    QueryError,
    bind_query,
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
from pop3d.dovecotconf import ConfigFileError, ConfigValue, read_conf_ext, yes_or_no
from pop3d.dovecotvars import Variables
from pop3d.errors import AuthUnavailable
from pop3d.passwords import (
    PasswordScheme,
    PasswordSchemeError,
    get_scheme,
)
from pop3d.reloading import IReloadable, ReloadableFiles
from pop3d.sasl import IScramKeySource, ScramKeys
from pop3d.stores.common import BoundedThreads, run_blocking
from pop3d.userdb import (
    AuthenticatedUser,
    IUserDatabase,
    LoginContext,
    UserFieldError,
    UserSettings,
    login_context_of,
    passdb_user,
)

log = Logger()

#: The keys of ``dovecot-sql.conf.ext`` (Dovecot 2.3).
CONFIG_KEYS = (
    "driver",
    "connect",
    "default_pass_scheme",
    "password_query",
    "user_query",
    "iterate_query",
)

#: Dovecot's defaults for what the file does not set.
DEFAULT_PASS_SCHEME = "MD5"  # noqa: S105 (a scheme name)
DEFAULT_PASSWORD_QUERY = (
    "SELECT username, domain, password FROM users "  # noqa: S105 (a query)
    "WHERE username = '%n' AND domain = '%d'"
)
DEFAULT_USER_QUERY = "SELECT home, uid, gid FROM users WHERE username = '%n' AND domain = '%d'"
#: Dovecot's ``maxconns`` when ``connect`` has none.
DEFAULT_MAX_CONNECTIONS = 5

#: Seconds a query may take (connecting included) before the login is
#: answered ``-ERR [SYS/TEMP]``.
DEFAULT_QUERY_TIMEOUT = 5.0

#: The extra to install for each driver's library.
_EXTRA_HINT = "pip install 'pop3d[sql]'"


class DatabaseError(Exception):
    """A query that did not run: the database is down, slow or refuses it."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        #: What happened without the database's words, which may quote a
        #: parameter (PostgreSQL: 'invalid input syntax ...: "value"').
        self.kind = kind or message


def _database_error(error: Exception) -> DatabaseError:
    state = getattr(error, "sqlstate", None)
    kind = type(error).__name__ + (f" (SQLSTATE {state})" if state else "")
    return DatabaseError(_one_line(str(error)), kind)


class _BrokenConnection(Exception):
    """A pooled connection the server closed (it restarted, or it is down)."""


# -- the configuration file ------------------------------------------------------------


@dataclass(frozen=True)
class SQLConfig:
    """What ``dovecot-sql.conf.ext`` says, checked."""

    path: str
    driver: str
    #: libpq's conninfo (pgsql), without Dovecot's own keys; or the database path (sqlite).
    connect: str
    max_connections: int
    default_scheme: PasswordScheme
    password_query: BoundQuery
    user_query: BoundQuery
    #: PyMySQL's connection settings (mysql), read from ``connect``.
    mysql_settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class _ConnectWords:
    """Dovecot's ``connect`` split on spaces into ``key=value`` words."""

    #: ``maxconns``, which Dovecot takes out for itself.
    max_connections: int
    #: Every ``host``, in order.
    hosts: tuple[str, ...]
    #: The other words, in order.
    others: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, value: ConfigValue) -> _ConnectWords:
        max_connections = DEFAULT_MAX_CONNECTIONS
        hosts: list[str] = []
        others: list[tuple[str, str]] = []
        for word in value.value.split():
            key, _, setting = word.partition("=")
            if key == "maxconns":
                if not setting.isdigit() or int(setting) < 1:
                    raise value.error(f"invalid value for maxconns: {setting!r}")
                max_connections = int(setting)
            elif key == "host":
                hosts.append(setting)
            else:
                others.append((key, setting))
        return cls(max_connections, tuple(hosts), tuple(others))


def _pgsql_conninfo(value: ConfigValue) -> tuple[str, int]:
    """
    Dovecot's ``connect`` for pgsql as libpq's conninfo and ``maxconns``.

    Dovecot splits it on spaces into ``key=value`` and takes ``maxconns``
    and every ``host`` out for itself; the hosts become libpq's list
    (``host=a,b``: tried in order).
    """
    try:
        import psycopg.conninfo
        import psycopg_pool  # noqa: F401 (needed at the first login)
    except ImportError:
        raise value.error(f"driver pgsql needs psycopg: {_EXTRA_HINT}") from None
    words = _ConnectWords.of(value)
    others = dict(words.others)
    if words.hosts:
        others["host"] = ",".join(words.hosts)
    try:
        conninfo = psycopg.conninfo.make_conninfo(**others)
    except psycopg.Error as error:
        # libpq's message names the bad keyword, never a value.
        raise value.error(f"connect: {error}") from None
    return conninfo, words.max_connections


#: Dovecot's mysql ``connect`` keys and PyMySQL's names for them (``host``
#: and ``maxconns`` are read apart; a ``host`` that is a path is the socket).
_MYSQL_KEYS = {
    "port": "port",
    "dbname": "database",
    "user": "user",
    "password": "password",
    "client_flags": "client_flag",
    "ssl_ca": "ssl_ca",
    "ssl_cert": "ssl_cert",
    "ssl_key": "ssl_key",
    "ssl_cipher": "ssl_cipher",
    "ssl_verify_server_cert": "ssl_verify_cert",
    "option_file": "read_default_file",
    "option_group": "read_default_group",
}
_MYSQL_NUMBERS = frozenset({"port", "client_flags"})


def _mysql_settings(value: ConfigValue) -> tuple[tuple[tuple[str, Any], ...], int]:
    """Dovecot's ``connect`` for mysql as PyMySQL's arguments, and ``maxconns``."""
    try:
        import pymysql  # noqa: F401 (needed at the first login)
    except ImportError:
        raise value.error(f"driver mysql needs PyMySQL: {_EXTRA_HINT}") from None
    words = _ConnectWords.of(value)
    settings: dict[str, Any] = {}
    for key, setting in words.others:
        if key in _MYSQL_KEYS:
            if key in _MYSQL_NUMBERS:
                if not setting.isdigit():
                    raise value.error(f"connect: {key} must be a number")
                settings[_MYSQL_KEYS[key]] = int(setting)
            elif key == "ssl_verify_server_cert":
                verify = yes_or_no(setting)
                if verify is None:
                    raise value.error(f"connect: {key} {setting!r}: expected yes or no")
                settings[_MYSQL_KEYS[key]] = verify
            else:
                settings[_MYSQL_KEYS[key]] = setting
        else:
            raise value.error(f"connect: unknown mysql setting {key!r}")
    settings["hosts"] = words.hosts or ("localhost",)
    return tuple(settings.items()), words.max_connections


def read_sql_config(path: str) -> SQLConfig:
    """Read and check ``path``; `ConfigFileError` names the line of what is wrong."""
    values = read_conf_ext(path, CONFIG_KEYS)
    driver = values.get("driver")
    if driver is None:
        raise ConfigFileError(path, 1, "driver is not set (pgsql, mysql or sqlite)")
    connect = values.get("connect")
    if connect is None:
        raise driver.error("connect is not set")
    placeholders: Placeholders
    mysql_settings: tuple[tuple[str, Any], ...] = ()
    if driver.value == "mysql":
        mysql_settings, max_connections = _mysql_settings(connect)
        conninfo, placeholders = connect.value, MYSQL
    elif driver.value == "pgsql":
        conninfo, max_connections = _pgsql_conninfo(connect)
        placeholders = PYFORMAT
    elif driver.value == "sqlite":
        conninfo, max_connections = connect.value.strip(), DEFAULT_MAX_CONNECTIONS
        if not conninfo:
            raise connect.error("connect: the path of the SQLite database")
        placeholders = QMARK
    else:
        raise driver.error(f"unsupported driver {driver.value!r}: pgsql, mysql or sqlite")
    scheme_value = values.get("default_pass_scheme")
    try:
        scheme = get_scheme(scheme_value.value if scheme_value else DEFAULT_PASS_SCHEME)
    except PasswordSchemeError as error:
        if scheme_value is None:
            raise
        raise scheme_value.error(str(error)) from None

    def query(key: str, default: str) -> BoundQuery:
        given = values.get(key)
        try:
            return bind_query(given.value if given else default, placeholders)
        except QueryError as error:
            if given is None:
                raise
            raise given.error(f"{key}: {error}") from None

    password_query = query("password_query", DEFAULT_PASSWORD_QUERY)
    user_query = query("user_query", DEFAULT_USER_QUERY)
    return SQLConfig(
        path,
        driver.value,
        conninfo,
        max_connections,
        scheme,
        password_query,
        user_query,
        mysql_settings,
    )


# -- the databases ----------------------------------------------------------------------

Row = dict[str, str | None]


def _text(value: object) -> str | None:
    """A column's value as the text Dovecot reads (its drivers read text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _rows(description: Sequence[Any] | None, records: Sequence[Sequence[Any]]) -> list[Row]:
    # Field names in any case, as Dovecot matches them.
    names = [column[0].lower() for column in description or ()]
    return [dict(zip(names, map(_text, record), strict=True)) for record in records]


class PostgresDatabase:
    """
    PostgreSQL through a psycopg_pool `ConnectionPool`, opened on first use
    (in the process that serves: twistd may fork after reading options).
    """

    def __init__(self, conninfo: str, max_connections: int, timeout: float) -> None:
        self.conninfo = conninfo
        self.max_connections = max_connections
        self.timeout = timeout
        self._pool: Any = None
        self._lock = threading.Lock()
        #: Whether the next query should first see that the server answers:
        #: at the start and after a failure, so that a server that is down
        #: fails each login at once (the pool would wait for a connection
        #: until the timeout).
        self._probe = True

    def _configure(self, connection: Any) -> None:
        # Bounded on the server's side too: a slow query is cancelled there.
        milliseconds = str(max(1, int(self.timeout * 1000)))
        connection.execute("SELECT set_config('statement_timeout', %s, false)", (milliseconds,))

    def _the_pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                # The pool warns at each failed reconnection; pop3d logs an
                # outage itself, once (and once when it is over).
                pool_log = logging.getLogger("psycopg.pool")
                pool_log.addHandler(logging.NullHandler())
                pool_log.propagate = False

                self._pool = ConnectionPool(
                    self.conninfo,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": self._connect_timeout,
                    },
                    min_size=1,
                    max_size=self.max_connections,
                    open=False,
                    configure=self._configure,
                    timeout=self.timeout,
                    reconnect_timeout=self.timeout,
                    name="pop3d-sql",
                )
                self._pool.open(wait=False)
            return self._pool

    def fetch(self, statement: str, parameters: Sequence[str]) -> list[Row]:
        """Run ``statement`` (blocking: in a thread)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            if self._probe:
                self._reach()
            try:
                return self._run(statement, parameters)
            except _BrokenConnection:
                # The server closed it (restarted): the pool drops it, and
                # the others that went with it, if the server is back.
                self._reach()
                self._the_pool().check()
                return self._run(statement, parameters)
        except PoolTimeout:
            self._probe = True
            raise DatabaseError(f"no connection within {self.timeout:g} s") from None
        except (psycopg.Error, _BrokenConnection) as error:
            self._probe = True
            raise _database_error(error) from None

    def _reach(self) -> None:
        """Connect once outside the pool: fails at once if the server is down."""
        import psycopg

        psycopg.connect(self.conninfo, connect_timeout=self._connect_timeout).close()
        self._probe = False

    def _run(self, statement: str, parameters: Sequence[str]) -> list[Row]:
        import psycopg

        with self._the_pool().connection() as connection:
            try:
                cursor = connection.execute(statement, parameters)
                return _rows(cursor.description, cursor.fetchall())
            except psycopg.OperationalError as error:
                if connection.broken or connection.closed:
                    raise _BrokenConnection(str(error)) from None
                raise

    @property
    def _connect_timeout(self) -> int:
        # libpq counts whole seconds, at least 2.
        return max(2, round(self.timeout))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __str__(self) -> str:
        return "PostgreSQL"


class SQLiteDatabase:
    """An SQLite file, read-only, one connection per thread that queries it."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # Read-only: pop3d only reads, and a missing file is an error
            # (an outage), not a new empty database.
            uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, timeout=self.timeout)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def fetch(self, statement: str, parameters: Sequence[str]) -> list[Row]:
        """Run ``statement`` (blocking: in a thread)."""
        deadline = time.monotonic() + self.timeout
        try:
            connection = self._connection()
            # Interrupts a query still running at the deadline.
            connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
            cursor = connection.execute(statement, tuple(parameters))
            return _rows(cursor.description, cursor.fetchall())
        except sqlite3.Error as error:
            self._forget()
            raise _database_error(error) from None

    def _forget(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._lock:
                self._connections.remove(connection)
            connection.close()

    def close(self) -> None:
        # Connections belong to their threads: each is closed when its
        # thread next fails; at shutdown the process ends them.
        pass

    def __str__(self) -> str:
        return f"SQLite {self.path}"


class MySQLDatabase:
    """
    MySQL or MariaDB through PyMySQL: one connection per thread that
    queries (at most ``maxconns`` query at once), made again after a
    failure; each ``host`` in turn, a path being the server's socket.
    """

    def __init__(self, settings: Sequence[tuple[str, Any]], timeout: float) -> None:
        options = dict(settings)
        self.hosts: tuple[str, ...] = options.pop("hosts")
        self.options = options
        self.timeout = timeout
        self._local = threading.local()

    def _connect(self) -> Any:
        import pymysql

        failure: Exception | None = None
        for host in self.hosts:
            where = {"unix_socket": host} if host.startswith("/") else {"host": host}
            try:
                connection = pymysql.connect(
                    **where,
                    **self.options,
                    charset="utf8mb4",
                    autocommit=True,
                    connect_timeout=self.timeout,
                    read_timeout=self.timeout,
                    write_timeout=self.timeout,
                )
            except pymysql.Error as error:
                failure = error
                continue
            try:
                # MariaDB stops a slow statement itself (MySQL has no such
                # setting for every statement: the read timeout still holds).
                seconds = f"{self.timeout:.3f}"
                connection.cursor().execute(f"SET SESSION max_statement_time = {seconds}")
            except pymysql.Error:
                pass
            return connection
        assert failure is not None
        raise failure

    def fetch(self, statement: str, parameters: Sequence[str]) -> list[Row]:
        """Run ``statement`` (blocking: in a thread)."""
        import pymysql

        try:
            connection = getattr(self._local, "connection", None)
            if connection is None:
                return self._run(self._new_connection(), statement, parameters)
            try:
                return self._run(connection, statement, parameters)
            except (pymysql.OperationalError, pymysql.InterfaceError) as error:
                if "timed out" in str(error):
                    raise
                # The server closed it (it restarted): once more, anew.
                self._forget()
                return self._run(self._new_connection(), statement, parameters)
        except pymysql.Error as error:
            self._forget()
            code = error.args[0] if error.args and isinstance(error.args[0], int) else None
            kind = type(error).__name__ + (f" ({code})" if code else "")
            raise DatabaseError(_one_line(str(error)), kind) from None

    def _new_connection(self) -> Any:
        connection = self._local.connection = self._connect()
        return connection

    @staticmethod
    def _run(connection: Any, statement: str, parameters: Sequence[str]) -> list[Row]:
        with connection.cursor() as cursor:
            cursor.execute(statement, tuple(parameters))
            return _rows(cursor.description, cursor.fetchall())

    def _forget(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: S110 (already broken)
                pass

    def close(self) -> None:
        # As with SQLite: each thread's connection ends with the process.
        pass

    def __str__(self) -> str:
        return "MySQL"


def _one_line(text: str) -> str:
    return " ".join(text.split())


Database = PostgresDatabase | SQLiteDatabase | MySQLDatabase


def open_database(config: SQLConfig, timeout: float) -> Database:
    if config.driver == "pgsql":
        return PostgresDatabase(config.connect, config.max_connections, timeout)
    if config.driver == "mysql":
        return MySQLDatabase(config.mysql_settings, timeout)
    return SQLiteDatabase(config.connect, timeout)


# -- what a password_query row says ---------------------------------------------------


class RowError(ValueError):
    """A row the checker cannot use (logged, the login refused)."""


@dataclass(frozen=True)
class PassdbRow:
    """One user's password_query row: the password, and the fields read once it matched."""

    #: None with ``nopassword`` (or an empty password: no password can match).
    entry: PasswordEntry | None
    nopassword: bool = False
    #: The other fields (``user``, ``nologin``, ``allow_nets``, ``userdb_*``...),
    #: NULL ones left out, for `pop3d.userdb.passdb_user`.
    fields: Mapping[str, str] = field(default_factory=dict)


def _password_entry(value: str, default: PasswordScheme, *, noscheme: bool) -> PasswordEntry:
    try:
        return PasswordEntry.parse(
            value.encode("utf-8", "surrogateescape"), default, noscheme=noscheme
        )
    except PasswordSchemeError as error:
        raise RowError(f"unusable password: {error}") from None


def parse_passdb_row(fields: Row, default: PasswordScheme) -> PassdbRow:
    """The password of a password_query row (NULL fields are not set, as in Dovecot)."""
    password: str | None = None
    noscheme = False
    others: dict[str, str] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key in ("password", "password_noscheme"):
            password, noscheme = value, key == "password_noscheme"
        else:
            others[key] = value
    nopassword = "nopassword" in others
    entry: PasswordEntry | None = None
    if password:
        if nopassword:
            raise RowError("nopassword is set but the password is not empty")
        entry = _password_entry(password, default, noscheme=noscheme)
    return PassdbRow(entry, nopassword, others)


# -- the checker ---------------------------------------------------------------------------


@implementer(ICredentialsChecker, IScramKeySource, IUserDatabase, IReloadable)
class SQLChecker:
    """
    Checks logins with the password_query of a ``dovecot-sql.conf.ext``, and
    gives each user's settings from its user_query (`IUserDatabase`).

    A password_query row gives (field names in any case):

    - ``password``: ``{SCHEME}secret`` in any scheme pop3d knows, or a secret
      of ``default_pass_scheme`` (``password_noscheme``: always that);
    - ``user`` (or ``username``/``domain``): the canonical name, the
      `AuthenticatedUser`'s name (its maildrop, its user_query);
    - ``nologin`` (with ``reason``): refused once the password is verified,
      ``-ERR [AUTH] reason`` (`LoginRefused`);
    - ``allow_nets``: the networks the user may log in from;
    - ``nopassword``: any password is accepted (USER/PASS, PLAIN, LOGIN);
    - ``userdb_*``: settings prefetched (``userdb_mail``, ``userdb_home``, ...).

    The fields besides the password are read once it matched, as from LDAP
    (`pop3d.userdb.passdb_user`): a value that cannot be used is logged and
    answered ``-ERR [SYS/TEMP]`` (`AuthUnavailable`).

    No row is an unknown user; several are refused and logged.  Every
    credential type of ``checks`` is verified as a passwd-file's entry
    would be: CRAM-MD5 and APOP need plaintext passwords, SCRAM-SHA-256
    a ``{SCRAM-SHA-256}`` or plaintext one.

    The user_query's ``home``, ``mail``, ``login_delay``, ``expire`` are the
    user's settings; no row: not in the userdb (refused).
    """

    def __init__(
        self,
        config: SQLConfig,
        *,
        timeout: float = DEFAULT_QUERY_TIMEOUT,
        checks: PasswordChecks = PASSWORD_CHECKS,
        database: Database | None = None,
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._checks = checks
        self.database: Database = database or open_database(config, timeout)
        self._health = OutageLog("SQL database", f" ({self.database}, {config.path})")
        self._reactor: Any = None
        # At most maxconns queries at once, in the thread pool (once there is one).
        self._queries = BoundedThreads(None, config.max_connections)
        self._verifier = PasswordVerifier()
        self._set_scheme(config.default_scheme)
        self._file = ReloadableFiles(
            config.path, partial(read_sql_config, config.path), self._use, (ConfigFileError,)
        )

    def _set_scheme(self, default: PasswordScheme) -> None:
        kinds = [default]
        self.credentialInterfaces = self._checks.possible(kinds)
        self._dummy_entries = self._checks.dummies(kinds)

    def reload(self) -> Deferred[None]:
        """
        SIGHUP (`IReloadable`): read the file again (in the thread pool; the
        logins that come meanwhile wait for it).  New queries and scheme
        apply to the next login; a new ``driver`` or ``connect`` opens a new
        pool (the old one is closed in the thread pool).  A file that cannot
        be used is logged with its line, and the one in use is kept.  (A
        portal learns the mechanisms ``default_pass_scheme`` allows once.)
        """
        return self._file.read_again()

    def _use(self, config: SQLConfig) -> None:
        old = self.config
        if (config.driver, config.connect, config.max_connections) != (
            old.driver,
            old.connect,
            old.max_connections,
        ):
            previous, self.database = self.database, open_database(config, self.timeout)
            # The same outage log: an outage going on ends with one line.
            self._health.where = f" ({self.database}, {config.path})"
            self._queries = BoundedThreads(self._reactor, config.max_connections)
            if self._reactor is not None:
                closed = run_blocking(self._reactor, previous.close)
                closed.addErrback(lambda failure: log.failure("closing {db}", failure, db=previous))
        self.config = config
        self._set_scheme(config.default_scheme)

    def run_slow_work_in(self, reactor: IReactorThreads) -> None:
        """
        Queries and slow password checks run in ``reactor``'s thread pool
        (``reactor`` is also the clock of the query timeout); the pool is
        closed when the reactor stops.
        """
        self._reactor = reactor
        self._file.threads = reactor
        self._queries = BoundedThreads(reactor, self.config.max_connections)
        self._verifier = PasswordVerifier(reactor, DEFAULT_MAX_CONCURRENT)
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "before", "shutdown", self.database.close
        )

    # -- queries --------------------------------------------------------------------

    def query(self, query: BoundQuery, variables: Variables) -> Deferred[list[Row]]:
        """
        The rows of ``query`` for these variables; `AuthUnavailable` when the
        database does not answer (in time).
        """
        parameters = query.parameters(variables)
        if self._reactor is None:
            raise RuntimeError("SQLChecker.run_slow_work_in was not called")
        ran: Deferred[list[Row]] = self._queries.run(
            self.database.fetch, query.statement, parameters
        )
        clock: IReactorTime = self._reactor
        # The database's own timeouts come first; this one is for a thread
        # stuck in the driver (a server that accepts and never answers).
        ran.addTimeout(self.timeout + 1, clock)

        def answered(rows: list[Row]) -> list[Row]:
            self._health.succeeded()
            return rows

        def failed(failure: Failure) -> list[Row]:
            if failure.check(DatabaseError):
                error = failure.value
                assert isinstance(error, DatabaseError)
                # A query with the password in it: never the database's words.
                self._health.failed(error.kind if query.holds_password else str(error))
            elif failure.check(TimeoutError):
                self._health.failed(f"no answer within {self.timeout + 1:g} s")
            else:
                failure.raiseException()
            raise AuthUnavailable()

        return ran.addCallbacks(answered, failed)

    # -- passdb -----------------------------------------------------------------------

    async def _passdb_row(
        self, user: str, context: LoginContext | None, password: str | None = None
    ) -> PassdbRow | None:
        await self._file.settled()
        variables = Variables.for_login(user, context, password)
        rows = await self.query(self.config.password_query, variables)
        if not rows:
            return None
        if len(rows) > 1:
            log.error(
                "password_query of {config} returned {count} rows for {user}: refused",
                config=self.config.path,
                count=len(rows),
                user=user,
            )
            return None
        try:
            return parse_passdb_row(rows[0], self.config.default_scheme)
        except RowError as error:
            # Refused as an unknown user: the password could not be checked.
            self._log_unusable_row(user, error)
            return None

    def _log_unusable_row(self, user: str, error: ValueError) -> None:
        log.error(
            "password_query of {config} for {user}: {error}",
            config=self.config.path,
            user=user,
            error=str(error),
        )

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._request_avatar_id(credentials))

    async def _request_avatar_id(self, credentials: Any) -> AuthenticatedUser:
        username = as_bytes(credentials.username)
        try:
            user: str | None = username.decode("utf-8")
        except UnicodeDecodeError:
            user = None
        if user is not None and "\x00" in user:
            # No database keeps a NUL in text (PostgreSQL refuses one): no such user.
            user = None
        # %w: the password, when the client sent it (USER/PASS, PLAIN, LOGIN).
        password = None
        if IUsernamePassword.providedBy(credentials):
            password = as_bytes(credentials.password).decode("utf-8", "replace")
        context = login_context_of(credentials)
        row = None if user is None else await self._passdb_row(user, context, password)
        check = self._checks.for_credentials(credentials)
        if row is not None and row.nopassword:
            # Any password, but only where there is one to accept.
            matched = IUsernamePassword.providedBy(credentials)
        elif check is None:
            matched = False
        else:
            entry = row.entry if row is not None else None
            lookup = StoredPasswordLookup(
                username,
                entry,
                self,
                self._verifier,
                # An unknown user takes the time of a wrong password of the
                # default scheme, at its default cost.
                self.config.default_scheme,
                self._dummy_entries,
                # Plaintext passwords by default: their SCRAM keys are derived.
                self.config.default_scheme.plaintext,
            )
            matched = await check.run(lookup, credentials)
        if not matched or row is None or user is None:
            raise UnauthorizedLogin()
        try:
            return passdb_user(user, row.fields, f"{self.config.path}: password_query")
        except UserFieldError as error:
            # The password was right: the entry is for the administrator to mend.
            self._log_unusable_row(user, error)
            raise AuthUnavailable() from None

    # -- IScramKeySource -------------------------------------------------------------

    def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
        """
        A ``{SCRAM-SHA-256}`` password's keys; a plaintext one's derived; None
        otherwise (also while the database is down: the login that follows
        is answered ``-ERR [SYS/TEMP]``).
        """
        return Deferred.fromCoroutine(self._scram_keys(as_bytes(username)))

    async def _scram_keys(self, username: bytes) -> ScramKeys | None:
        try:
            user = username.decode("utf-8")
            row = None if "\x00" in user else await self._passdb_row(user, None)
        except (UnicodeDecodeError, AuthUnavailable):
            row = None
        entry = row.entry if row is not None else None
        derive_dummy = self.config.default_scheme.plaintext
        keys: ScramKeys | None = await self._verifier.scram_keys(username, entry, derive_dummy)
        return keys

    # -- IUserDatabase ------------------------------------------------------------------

    def lookup(self, user: str, context: LoginContext | None) -> Deferred[UserSettings | None]:
        """The user_query's fields for ``user``; None when it has no row (or several)."""
        return Deferred.fromCoroutine(self._lookup(user, context))

    async def _lookup(self, user: str, context: LoginContext | None) -> UserSettings | None:
        await self._file.settled()
        rows = await self.query(self.config.user_query, Variables.for_login(user, context))
        if len(rows) != 1:
            if rows:
                log.error(
                    "user_query of {config} returned {count} rows for {user}: refused",
                    config=self.config.path,
                    count=len(rows),
                    user=user,
                )
            return None
        fields = {name: value for name, value in rows[0].items() if value is not None}
        try:
            return UserSettings.from_fields(fields, f"{self.config.path}: user_query")
        except UserFieldError as error:
            log.error(
                "user_query of {config} for {user}: {error}: refused",
                config=self.config.path,
                user=user,
                error=str(error),
            )
            return None


@implementer(ICheckerFactory, IPlugin)
class SQLCheckerFactory:
    """The ``--auth sql:PATH`` plugin for twisted.cred.strcred."""

    authType = "sql"
    authHelp = (
        "Users in PostgreSQL, MySQL or SQLite, configured by Dovecot's dovecot-sql.conf.ext "
        "(driver, connect, default_pass_scheme, password_query, user_query); "
        "PostgreSQL and MySQL need " + _EXTRA_HINT + "."
    )
    argStringFormat = "Path to dovecot-sql.conf.ext"
    credentialInterfaces = PASSWORD_CHECKS.interfaces()

    def generateChecker(self, argstring: str) -> SQLChecker:
        if not argstring:
            raise ValueError("needs a path: --auth sql:/etc/pop3d/dovecot-sql.conf.ext")
        return SQLChecker(read_sql_config(argstring))


__all__ = [
    "CONFIG_KEYS",
    "DatabaseError",
    "PassdbRow",
    "SQLChecker",
    "SQLCheckerFactory",
    "SQLConfig",
    "parse_passdb_row",
    "read_sql_config",
]
