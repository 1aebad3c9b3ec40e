"""
``--auth sql:dovecot-sql.conf.ext``: users in PostgreSQL or SQLite, read
with Dovecot's own configuration file (pop3d.authdb.sql).

The database tests run every case against a real PostgreSQL cluster that the
fixture creates and starts (initdb, pg_ctl; as the ``postgres`` user when the
tests run as root; a UNIX socket in a temporary directory, no TCP), a real
MariaDB started the same way (mariadb-install-db, mariadbd as ``mysql``) and
an SQLite file; the end-to-end tests run ``twistd pop3d`` and the real
Dovecot (its pgsql and mysql drivers) on one ``dovecot-sql.conf.ext``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import poplib
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from zope.interface import implementer

from pop3d.authdb.sql import (
    SQLChecker,
    parse_passdb_row,
    read_sql_config,
)
from pop3d.authdb.sqlquery import MYSQL, PYFORMAT, QMARK, QueryError, bind_query
from pop3d.checkers import FirstMatchChecker
from pop3d.credentials import PreparedUsernamePassword
from pop3d.dovecotconf import ConfigFileError
from pop3d.dovecotvars import Variables
from pop3d.driver import APOPCredentials
from pop3d.errors import AuthUnavailable, LoginRefused
from pop3d.passwords import get_scheme
from pop3d.realm import MaildropRealm
from pop3d.reloading import IReloadable
from pop3d.sasl.cram_md5 import CramMD5Credentials
from pop3d.stores.interfaces import IMaildrop
from pop3d.tap import Options, build_portal
from pop3d.testing import MemoryStore, deliver_to_maildir
from pop3d.userdb import AuthenticatedUser, LoginContext, UserSettings, passdb_user

from .clock_threads import TimedClockThreads, result_of
from .conftest import Logged, start_service
from .test_cred import FakeThreadingReactor
from .test_dovecot_migration import _require_dovecot as require_dovecot
from .test_process import Launch, Server, twistd_arguments
from .test_process import launch as launch  # a fixture
from .test_scram import Client, run_exchange


def _newest_postgres_bin() -> Path:
    """The bin directory of the newest PostgreSQL Debian installed (15 on bookworm)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda initdb: (
            int(initdb.parent.parent.name) if initdb.parent.parent.name.isdigit() else 0
        ),
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


POSTGRES_BIN = _newest_postgres_bin()

# -- query binding (no database) ------------------------------------------------------


class TestBinding:
    def test_a_quoted_literal_with_variables_is_one_parameter(self) -> None:
        bound = bind_query("SELECT password FROM users WHERE userid = '%n@%d'", PYFORMAT)
        assert bound.statement == "SELECT password FROM users WHERE userid = %s"
        assert bound.parameters(Variables("alice@example.org")) == ("alice@example.org",)

    def test_qmark_style_for_sqlite(self) -> None:
        bound = bind_query("SELECT 1 FROM t WHERE a = '%u' AND b = '%d'", QMARK)
        assert bound.statement == "SELECT 1 FROM t WHERE a = ? AND b = ?"
        assert bound.parameters(Variables("bob@x.test")) == ("bob@x.test", "x.test")

    def test_the_value_is_what_dovecot_escaping_compares_with(self) -> None:
        """``''`` in the literal is a quote; the expansion is the name as typed."""
        bound = bind_query("SELECT 'it''s %Lu' AS reason", PYFORMAT)
        assert bound.statement == "SELECT %s AS reason"
        assert bound.parameters(Variables("O'Brien")) == ("it's o'brien",)

    def test_percent_outside_and_in_plain_literals(self) -> None:
        query = "SELECT 1 WHERE 7 %% 2 = 1 AND 'a%%' = 'a%%' AND 'x' = 'x' -- 5%% off"
        pg = bind_query(query, PYFORMAT)
        assert pg.statement == "SELECT 1 WHERE 7 %% 2 = 1 AND %s = %s AND 'x' = 'x' -- 5%%%% off"
        assert pg.parameters(Variables("u")) == ("a%", "a%")
        assert bind_query(query, QMARK).statement == (
            "SELECT 1 WHERE 7 % 2 = 1 AND ? = ? AND 'x' = 'x' -- 5%% off"
        )

    def test_mysql_strings(self) -> None:
        """MySQL: "..." is a string, backslashes escape, # starts a comment."""
        query = (
            "SELECT password FROM users WHERE userid = \"%u\" AND note = 'it\\'s %Ln' "
            "AND a = `col%%` # 5%% off"
        )
        bound = bind_query(query, MYSQL)
        assert bound.statement == (
            "SELECT password FROM users WHERE userid = %s AND note = %s AND a = `col%%%%` "
            "# 5%%%% off"
        )
        assert bound.parameters(Variables("Ann@x.test")) == ("Ann@x.test", "it's ann")
        with pytest.raises(QueryError, match="quoted identifier"):
            bind_query("SELECT 1 FROM `users_%d`", MYSQL)

    @pytest.mark.parametrize(
        "query,message",
        [
            ("SELECT password FROM users WHERE uid = %u", "variable %u outside quotes"),
            ('SELECT x FROM "users_%d"', "quoted identifier"),
            ("SELECT x FROM users WHERE name = E'%u'", "prefixed string literal"),
            ("SELECT x FROM users WHERE name = '%q'", "unknown variable %q"),
            ("SELECT x FROM users WHERE name = '%u", "unterminated ' quote"),
            ("SELECT x /* %u", "unterminated /* comment"),
        ],
    )
    def test_refused(self, query: str, message: str) -> None:
        with pytest.raises(QueryError, match=re.escape(message)):
            bind_query(query, PYFORMAT)


# -- the configuration file -----------------------------------------------------------


def write_config(path: Path, **settings: str) -> Path:
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    return path


class TestConfig:
    def test_dovecots_file_as_written(self, tmp_path: Path) -> None:
        path = tmp_path / "dovecot-sql.conf.ext"
        path.write_text(
            "# Dovecot's example, unchanged\n"
            "driver = pgsql\n"
            "connect = host=/run/postgresql host=db2 dbname=mails user=mailreader "
            "password=s3cret maxconns=3\n"
            "default_pass_scheme = SHA512-CRYPT\n"
            "password_query = \\\n"
            "  SELECT username AS user, password \\\n"
            "  FROM users WHERE username = '%n' AND domain = '%d'\n"
            "user_query = SELECT home, uid, gid FROM users WHERE userid = '%u'\n"
            "iterate_query = SELECT username AS user FROM users\n"
        )
        config = read_sql_config(str(path))
        assert config.driver == "pgsql"
        assert config.max_connections == 3
        assert "host=/run/postgresql,db2" in config.connect
        assert "maxconns" not in config.connect
        assert config.default_scheme.name == "SHA512-CRYPT"
        assert config.password_query.statement == (
            "SELECT username AS user, password FROM users WHERE username = %s AND domain = %s"
        )

    def test_mysql_connect(self, tmp_path: Path) -> None:
        path = write_config(
            tmp_path / "f",
            driver="mysql",
            connect="host=/run/mysqld/mysqld.sock host=db2 port=3307 dbname=mail user=u "
            "password=p maxconns=7",
        )
        config = read_sql_config(str(path))
        assert config.max_connections == 7
        assert dict(config.mysql_settings) == {
            "hosts": ("/run/mysqld/mysqld.sock", "db2"),
            "port": 3307,
            "database": "mail",
            "user": "u",
            "password": "p",
        }
        assert config.password_query.statement.endswith("username = %s AND domain = %s")

    @pytest.mark.parametrize(
        ("word", "verify"), [("yes", True), ("Y", True), ("1", True), ("no", False)]
    )
    def test_mysql_certificate_check_is_a_dovecot_yes_or_no(
        self, tmp_path: Path, word: str, verify: bool
    ) -> None:
        path = write_config(
            tmp_path / "f", driver="mysql", connect=f"host=db ssl_verify_server_cert={word}"
        )
        assert dict(read_sql_config(str(path)).mysql_settings)["ssl_verify_cert"] is verify

    def test_dovecot_defaults(self, tmp_path: Path) -> None:
        config = read_sql_config(str(write_config(tmp_path / "f", driver="sqlite", connect="x")))
        assert config.default_scheme.name == "MD5-CRYPT"  # Dovecot's "MD5"
        assert config.max_connections == 5
        assert config.password_query.templates == ("%n", "%d")

    @pytest.mark.parametrize(
        "settings,line,reason",
        [
            ({"driver": "oracle", "connect": "x"}, 1, "unsupported driver 'oracle'"),
            ({"driver": "sqlite"}, 1, "connect is not set"),
            (
                {"driver": "sqlite", "connect": "x", "default_pass_scheme": "ROT13"},
                3,
                "unsupported password scheme {ROT13}",
            ),
            (
                {"driver": "sqlite", "connect": "x", "password_query": "SELECT 1 WHERE a = %u"},
                3,
                "password_query: variable %u outside quotes",
            ),
            (
                {"driver": "sqlite", "connect": "x", "user_query": "SELECT 1 WHERE a = '%{bogus}'"},
                3,
                "user_query: unknown variable %{bogus}",
            ),
            (
                {"driver": "pgsql", "connect": "host=/x maxconns=none"},
                2,
                "invalid value for maxconns",
            ),
            ({"driver": "pgsql", "connect": "hots=/x"}, 2, 'invalid connection option "hots"'),
            ({"driver": "mysql", "connect": "host=/s dbnme=x"}, 2, "unknown mysql setting 'dbnme'"),
            ({"driver": "mysql", "connect": "host=/s port=http"}, 2, "port must be a number"),
            (
                # A misspelt yes/no is refused, never taken for "no" (which
                # would silently turn certificate checks off).
                {"driver": "mysql", "connect": "host=/s ssl_verify_server_cert=ture"},
                2,
                "connect: ssl_verify_server_cert 'ture': expected yes or no",
            ),
            ({"driver": "sqlite", "connect": "x", "pass_query": "x"}, 3, "unknown"),
        ],
    )
    def test_errors_name_the_file_and_line(
        self, tmp_path: Path, settings: dict[str, str], line: int, reason: str
    ) -> None:
        path = write_config(tmp_path / "dovecot-sql.conf.ext", **settings)
        with pytest.raises(ConfigFileError) as raised:
            read_sql_config(str(path))
        assert str(raised.value).startswith(f"{path}:{line}: ")
        assert reason in str(raised.value)

    def test_a_path_is_needed(self) -> None:
        with pytest.raises(usage.UsageError) as raised:
            Options().parseOptions(["--mail-location", "maildir:/x/{user}", "--auth", "sql:"])
        assert str(raised.value) == (
            "--auth sql: needs a path: --auth sql:/etc/pop3d/dovecot-sql.conf.ext"
        )

    def test_twistd_usage_error(self, tmp_path: Path) -> None:
        path = write_config(tmp_path / "sql.conf", driver="mssql", connect="x")
        with pytest.raises(usage.UsageError) as raised:
            Options().parseOptions(
                ["--mail-location", "maildir:/x/{user}", "--auth", f"sql:{path}"]
            )
        assert (
            str(raised.value)
            == f"--auth sql: {path}:1: unsupported driver 'mssql': pgsql, mysql or sqlite"
        )


class TestRows:
    """password_query fields, as Dovecot reads them (no database needed)."""

    plain = get_scheme("PLAIN")

    def test_fields(self) -> None:
        fields = {
            "user": "Alice@Example.org",
            "password": "{PLAIN}x",
            "nologin": "Y",
            "reason": "gone\r\nfishing",
            "allow_nets": "192.0.2.0/24, ::1",
            "userdb_mail": "maildir:/srv/%u",
            "userdb_login_delay": "60",
            "uid": "1000",
        }
        row = parse_passdb_row(fields, self.plain)
        assert row.entry is not None and (row.entry.scheme, row.entry.secret) == ("PLAIN", b"x")
        assert "password" not in row.fields
        with pytest.raises(LoginRefused) as refused:
            passdb_user("alice", row.fields, "test")
        assert refused.value.status().to_bytes() == b"-ERR [AUTH] gone fishing\r\n"
        del fields["nologin"]
        user = passdb_user("alice", parse_passdb_row(fields, self.plain).fields, "test")
        assert user.name == "Alice@Example.org"
        assert [str(n) for n in user.allowed_networks or ()] == ["192.0.2.0/24", "::1/128"]
        assert user.settings == UserSettings(mail="maildir:/srv/%u", login_delay=60)

    def test_username_and_domain_fields(self) -> None:
        row = parse_passdb_row(
            {"username": "bob", "domain": "example.org", "password": "p"}, self.plain
        )
        assert passdb_user("B@x", row.fields, "t").name == "bob@example.org"

    def test_null_fields_are_not_set(self) -> None:
        row = parse_passdb_row({"password": "p", "nologin": None, "user": None}, self.plain)
        assert passdb_user("carol", row.fields, "t") == AuthenticatedUser("carol")

    def test_default_scheme_and_noscheme(self) -> None:
        sha = get_scheme("SHA512-CRYPT")
        secret = sha.hash(b"pw").decode()
        row = parse_passdb_row({"password": secret}, sha)
        assert row.entry is not None and row.entry.scheme == "SHA512-CRYPT"
        row = parse_passdb_row({"password_noscheme": "{braces}"}, self.plain)
        assert row.entry is not None and row.entry.secret == b"{braces}"


# -- the databases ----------------------------------------------------------------------

SHA512_BOB = get_scheme("SHA512-CRYPT").hash(b"builder").decode()
SCRAM_SECRET = get_scheme("SCRAM-SHA-256").hash(b"pencil").decode()
CRAM_SECRET = get_scheme("CRAM-MD5").hash(b"hmac pw").decode()

COLUMNS = (
    "userid", "password", "canonical", "nologin", "reason", "allow_nets", "nopassword",
    "prefetch_mail", "home", "mail", "login_delay", "expire",
)  # fmt: skip


def row(userid: str, password: str | None, **fields: Any) -> tuple[Any, ...]:
    values = {"userid": userid, "password": password, **fields}
    return tuple(values.get(column) for column in COLUMNS)


USERS: list[tuple[Any, ...]] = [
    row("alice", "wonderland", home="/home/alice"),
    row("bob", "{SHA512-CRYPT}" + SHA512_BOB),
    row("ivan", SHA512_BOB),
    row("carol", "{PLAIN}secret", nologin="Y", reason="Your account is suspended"),
    row("dave", "{PLAIN}secret", allow_nets="192.0.2.0/24"),
    row("eve", None, nopassword="Y"),
    row("Frank@Example.ORG", "{PLAIN}frank", canonical="frank@example.org"),
    row("frank@example.org", "{PLAIN}other", home="/home/frank", mail="maildir:~/Mail",
        login_delay=120, expire="7"),
    row("o'brien", "{PLAIN}irish"),
    row("twin", "{PLAIN}twin"),
    row("twin", "{PLAIN}twin"),
    row("scram", "{SCRAM-SHA-256}" + SCRAM_SECRET),
    row("cram", "{CRAM-MD5}" + CRAM_SECRET),
    row("gina", "{PLAIN}gina", prefetch_mail="maildir:/prefetched/%u", home="/home/gina",
        mail="maildir:~/Maildir", login_delay=300, expire="never"),
    row("hank", "{NOSUCH}x"),
]  # fmt: skip
CREATE_TABLE = (
    "CREATE TABLE users (userid TEXT NOT NULL, password TEXT, canonical TEXT, nologin TEXT, "
    "reason TEXT, allow_nets TEXT, nopassword TEXT, prefetch_mail TEXT, home TEXT, mail TEXT, "
    "login_delay INTEGER, expire TEXT)"
)

#: Mixed-case field names (quoted aliases) test that fields are found in any case.
PASSWORD_QUERY = (
    'SELECT canonical AS "User", password AS "PassWord", nologin, reason, allow_nets, '
    "nopassword, prefetch_mail AS userdb_mail FROM users WHERE userid = '%u'"
)
USER_QUERY = "SELECT home, mail, login_delay, expire FROM users WHERE userid = '%u'"


def insert_users(placeholder: str) -> str:
    marks = ", ".join([placeholder] * len(COLUMNS))
    return f"INSERT INTO users ({', '.join(COLUMNS)}) VALUES ({marks})"  # noqa: S608


def _postgres_owner() -> str:
    """The user that runs the cluster: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


def require_postgres() -> None:
    reason = None
    if not (POSTGRES_BIN / "initdb").exists():
        reason = "PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it"
    elif os.geteuid() == 0 and shutil.which("runuser") is None:
        reason = "running PostgreSQL as root needs runuser to drop privileges"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class PostgresCluster:
    """A throwaway cluster: its socket in ``root``, no TCP, trust authentication."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.owner = _postgres_owner()
        root.chmod(0o755)
        shutil.chown(root, self.owner)
        self._run(str(POSTGRES_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "pop3d", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
        self.start()
        self.execute("CREATE DATABASE mail")

    def _run(self, *command: str) -> None:
        if os.geteuid() == 0:
            command = ("runuser", "-u", self.owner, "--", *command)
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-k {self.root} -c listen_addresses= -F"
        self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                  "-l", str(self.root / "postgres.log"), "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def connect(self) -> str:
        return f"host={self.root} dbname=mail user=pop3d"

    def execute(
        self, statement: str, rows: list[tuple[Any, ...]] | None = None, database: str = "mail"
    ) -> None:
        import psycopg

        dbname = "postgres" if statement.startswith("CREATE DATABASE") else database
        with psycopg.connect(
            host=str(self.root), dbname=dbname, user="pop3d", autocommit=True
        ) as c:
            if rows is None:
                c.execute(statement)  # type: ignore[arg-type]
            else:
                c.cursor().executemany(statement, rows)  # type: ignore[arg-type]

    def value(self, query: str) -> int:
        """The one number ``query`` answers."""
        import psycopg

        with psycopg.connect(
            host=str(self.root), dbname="mail", user="pop3d", autocommit=True
        ) as c:
            row = c.execute(query).fetchone()  # type: ignore[arg-type]
            assert row is not None
            return int(row[0])

    def count(self) -> int:
        import psycopg

        with psycopg.connect(host=str(self.root), dbname="mail", user="pop3d") as c:
            row = c.execute("SELECT count(*) FROM users").fetchone()
            assert row is not None
            return int(row[0])


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    require_postgres()
    # Reachable by the cluster's owner (and Dovecot's auth process), which
    # pytest's private temporary directory is not.
    root = Path(tempfile.mkdtemp(prefix="pop3d-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.execute(CREATE_TABLE)
        cluster.execute(insert_users("%s"), USERS)
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def sqlite_database(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute(CREATE_TABLE)
        connection.executemany(insert_users("?"), USERS)
    connection.close()
    return path


class Databases:
    """Writes configs for one driver, and makes checkers of them (closed at the end)."""

    def __init__(self, driver: str, connect: str, tmp_path: Path) -> None:
        self.driver = driver
        self.connect = connect
        self.tmp_path = tmp_path
        self.checkers: list[SQLChecker] = []

    def config(self, name: str = "dovecot-sql.conf.ext", **settings: str) -> Path:
        values = {
            "driver": self.driver,
            "connect": self.connect,
            "default_pass_scheme": "PLAIN",
            "password_query": PASSWORD_QUERY,
            "user_query": USER_QUERY,
        }
        values.update(settings)
        return write_config(self.tmp_path / name, **values)

    def checker(self, timeout: float = 5.0, **settings: str) -> SQLChecker:
        checker = SQLChecker(read_sql_config(str(self.config(**settings))), timeout=timeout)
        checker.run_slow_work_in(reactor)
        self.checkers.append(checker)
        return checker


MARIADB = Path("/usr/sbin/mariadbd")
MARIADB_INSTALL = Path("/usr/bin/mariadb-install-db")
READY = re.compile(r"ready for connections")


def require_mariadb() -> None:
    reason = None
    if not (MARIADB.exists() and MARIADB_INSTALL.exists()):
        reason = "MariaDB is not installed (apt-get install mariadb-server); .ci/run installs it"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class MariaDBServer:
    """A throwaway MariaDB: its socket in ``root``, no TCP, root without a password."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "mysqld.sock"
        as_user = ["--user=mysql"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(root, "mysql")
        root.chmod(0o755)
        subprocess.run(
            [str(MARIADB_INSTALL), "--no-defaults", f"--datadir={root}/data", *as_user,
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self.arguments = [
            "--no-defaults", f"--datadir={root}/data", f"--socket={self.socket}",
            "--skip-networking", f"--pid-file={root}/mysqld.pid", *as_user,
        ]  # fmt: skip
        self.start()

    def start(self) -> None:
        self.server = Server(self.arguments, self.root, program=[str(MARIADB)])
        self.server.wait_for(READY)

    @property
    def connect(self) -> str:
        return f"host={self.socket} dbname=mail user=root"

    def execute(self, statement: str, rows: list[tuple[Any, ...]] | None = None) -> None:
        import pymysql

        connection = pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True)
        try:
            with connection.cursor() as cursor:
                if rows is None:
                    cursor.execute(statement)
                else:
                    cursor.executemany(statement, rows)
        finally:
            connection.close()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDBServer]:
    require_mariadb()
    root = Path(tempfile.mkdtemp(prefix="pop3d-my-"))
    server = MariaDBServer(root)
    try:
        # Binary collation: names compare as PostgreSQL and SQLite compare them.
        server.execute("CREATE DATABASE mail CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        server.execute(CREATE_TABLE.replace("CREATE TABLE users", "CREATE TABLE mail.users"))
        server.execute(insert_users("%s").replace("INTO users", "INTO mail.users"), USERS)
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.async_yield_fixture(params=["sqlite", "pgsql", "mysql"])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    if request.param == "pgsql":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        made = Databases("pgsql", cluster.connect, tmp_path)
    elif request.param == "mysql":
        server: MariaDBServer = request.getfixturevalue("mariadb")
        made = Databases("mysql", server.connect, tmp_path)
    else:
        made = Databases("sqlite", str(sqlite_database(tmp_path / "users.db")), tmp_path)
    yield made
    for checker in made.checkers:
        await deferToThread(checker.database.close)


async def login(checker: SQLChecker, user: bytes | str, password: bytes | str) -> Any:
    credentials = PreparedUsernamePassword(
        user.encode() if isinstance(user, str) else user,
        password.encode() if isinstance(password, str) else password,
    )
    return await checker.requestAvatarId(credentials)


@pytest.mark.peer
class TestFields:
    """Each field and variable, against PostgreSQL and SQLite."""

    @pytest_twisted.ensureDeferred
    async def test_passwords_of_any_scheme(self, databases: Databases) -> None:
        checker = databases.checker()
        # No {SCHEME}: default_pass_scheme (PLAIN here).
        assert await login(checker, "alice", "wonderland") == AuthenticatedUser("alice")
        assert await login(checker, "bob", "builder") == AuthenticatedUser("bob")
        for user, password in [("alice", "wonder"), ("bob", "wonderland"), ("nobody", "x")]:
            with pytest.raises(UnauthorizedLogin):
                await login(checker, user, password)

    @pytest_twisted.ensureDeferred
    async def test_default_pass_scheme(self, databases: Databases) -> None:
        checker = databases.checker(default_pass_scheme="SHA512-CRYPT")
        assert (await login(checker, "ivan", "builder")).name == "ivan"
        with pytest.raises(UnauthorizedLogin):
            await login(checker, "ivan", SHA512_BOB)
        # Plaintext mechanisms cannot be offered over hashed passwords.
        names = {interface.__name__ for interface in checker.credentialInterfaces}
        assert names == {"IUsernamePassword"}

    @pytest_twisted.ensureDeferred
    async def test_user_field_is_the_canonical_name(self, databases: Databases) -> None:
        checker = databases.checker()
        user = await login(checker, "Frank@Example.ORG", "frank")
        assert user.name == "frank@example.org"

    @pytest_twisted.ensureDeferred
    async def test_nologin_after_the_password(self, databases: Databases) -> None:
        checker = databases.checker()
        with pytest.raises(UnauthorizedLogin):
            await login(checker, "carol", "wrong")
        with pytest.raises(LoginRefused) as refused:
            await login(checker, "carol", "secret")
        assert refused.value.status().to_bytes() == b"-ERR [AUTH] Your account is suspended\r\n"

    @pytest_twisted.ensureDeferred
    async def test_allow_nets_and_prefetch(self, databases: Databases) -> None:
        checker = databases.checker()
        dave = await login(checker, "dave", "secret")
        assert [str(n) for n in dave.allowed_networks] == ["192.0.2.0/24"]
        assert not dave.allows(LoginContext("127.0.0.1", "127.0.0.1", True))
        assert dave.allows(LoginContext("192.0.2.7", "127.0.0.1", False))
        gina = await login(checker, "gina", "gina")
        assert gina.settings == UserSettings(mail="maildir:/prefetched/%u")

    @pytest_twisted.ensureDeferred
    async def test_nopassword(self, databases: Databases) -> None:
        checker = databases.checker()
        assert (await login(checker, "eve", "anything at all")).name == "eve"
        # A mechanism that needs the stored password has none to use.
        challenge = b"<1.2@pop.example.test>"
        digest = hashlib.md5(challenge + b"x").hexdigest().encode()
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(APOPCredentials(challenge, b"eve", digest))

    @pytest_twisted.ensureDeferred
    async def test_several_rows_or_a_bad_row_are_refused_and_logged(
        self, databases: Databases, logged: Logged
    ) -> None:
        checker = databases.checker()
        with pytest.raises(UnauthorizedLogin):
            await login(checker, "twin", "twin")
        assert len(logged.texts("returned 2 rows for twin: refused")) == 1
        with pytest.raises(UnauthorizedLogin):
            await login(checker, "hank", "x")
        [line] = logged.texts("password_query of")[1:]
        assert "hank: unusable password: unsupported password scheme {NOSUCH}" in line

    @pytest_twisted.ensureDeferred
    async def test_user_query(self, databases: Databases, logged: Logged) -> None:
        checker = databases.checker()
        assert await checker.lookup("gina", None) == UserSettings(
            home="/home/gina", mail="maildir:~/Maildir", login_delay=300, expire_never=True
        )
        assert await checker.lookup("frank@example.org", None) == UserSettings(
            home="/home/frank", mail="maildir:~/Mail", login_delay=120, expire_days=7
        )
        assert await checker.lookup("alice", None) == UserSettings(home="/home/alice")
        assert await checker.lookup("nobody", None) is None
        assert await checker.lookup("twin", None) is None
        assert len(logged.texts("user_query of")) == 1

    @pytest_twisted.ensureDeferred
    async def test_variables_are_expanded_as_dovecot_does(self, databases: Databases) -> None:
        """The query echoes its bound values back through nologin's reason."""
        query = (
            "SELECT '{PLAIN}x' AS password, 'Y' AS nologin, "
            "'%u|%n|%d|%Lu|%Un|%r|%l|%s|%c|%2n|it''s 100%%' AS reason"
        )
        checker = databases.checker(password_query=query)
        credentials = PreparedUsernamePassword(b"Ann@Example.org", b"x")
        credentials.login_context = LoginContext("192.0.2.1", "198.51.100.2", True)  # type: ignore[attr-defined]
        with pytest.raises(LoginRefused) as refused:
            await checker.requestAvatarId(credentials)
        assert refused.value.text == (
            "Ann@Example.org|Ann|Example.org|ann@example.org|ANN|192.0.2.1|198.51.100.2|pop3|"
            "secured|An|it's 100%"
        )

    @pytest_twisted.ensureDeferred
    async def test_the_password_variable(self, databases: Databases) -> None:
        """%w: the database compares the password itself (Dovecot's nopassword idiom)."""
        query = (
            "SELECT 'Y' AS nopassword, userid AS user FROM users "
            "WHERE userid = '%u' AND password = '{PLAIN}%w'"
        )
        checker = databases.checker(password_query=query)
        assert (await login(checker, "o'brien", "irish")).name == "o'brien"
        for password in ["irish'", "' OR ''='", "%w"]:
            with pytest.raises(UnauthorizedLogin):
                await login(checker, "o'brien", password)

    @pytest.mark.parametrize(
        "name",
        [
            "x' OR '1'='1",
            "alice'--",
            "alice' /*",
            "'; DROP TABLE users; --",
            'a"b',
            "100%",
            "%u",
            "%%u",
            "back\\slash",
            "*",
            "(uid=*)",
            ")",
            "nul\x00byte",
            "o'brien'",
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_injection(self, databases: Databases, name: str) -> None:
        """Each name is a value: it matches no row, and the echo gives it back unchanged."""
        checker = databases.checker()
        with pytest.raises(UnauthorizedLogin):
            await login(checker, name.encode(), b"irish")
        with pytest.raises(UnauthorizedLogin):
            await login(checker, name.encode(), b"' OR '1'='1")
        assert (await login(checker, "o'brien", "irish")).name == "o'brien"
        if "\x00" in name:
            return  # never sent: no database stores a NUL in text
        echo = databases.checker(
            password_query="SELECT '{PLAIN}x' AS password, 'Y' AS nologin, '%u' AS reason"
        )
        with pytest.raises(LoginRefused) as refused:
            await login(echo, name.encode(), b"x")
        assert refused.value.text == name

    @pytest_twisted.ensureDeferred
    async def test_every_mechanism(self, databases: Databases) -> None:
        """USER/PASS, PLAIN and LOGIN, APOP, CRAM-MD5, SCRAM-SHA-256 as with a passwd-file."""
        checker = databases.checker()
        portal = build_portal(MaildropRealm(MemoryStore()), [checker], reactor)

        async def logs_in(credentials: Any) -> bool:
            try:
                _, maildrop, _ = await portal.login(credentials, None, IMaildrop)
            except UnauthorizedLogin:
                return False
            await maildrop.close()
            return True

        assert await logs_in(PreparedUsernamePassword(b"bob", b"builder"))
        challenge = b"<1896.697170952@dbc.mtview.ca.us>"

        def apop(user: bytes, password: bytes) -> APOPCredentials:
            return APOPCredentials(
                challenge, user, hashlib.md5(challenge + password).hexdigest().encode()
            )

        assert await logs_in(apop(b"alice", b"wonderland"))
        assert not await logs_in(apop(b"alice", b"wonder"))
        assert not await logs_in(apop(b"bob", b"builder"))  # hashed: no APOP

        def cram(user: bytes, password: bytes) -> CramMD5Credentials:
            digest = hmac.new(password, challenge, "md5").hexdigest().encode()
            return CramMD5Credentials(user, challenge, digest)

        assert await logs_in(cram(b"alice", b"wonderland"))
        assert await logs_in(cram(b"cram", b"hmac pw"))
        assert not await logs_in(cram(b"cram", b"hmac"))
        assert not await logs_in(cram(b"bob", b"builder"))

        result, server_final, _ = await run_exchange(portal, Client(b"scram", b"pencil"))
        assert server_final is not None and await logs_in(result.credentials)
        result, server_final, _ = await run_exchange(portal, Client(b"alice", b"wonderland"))
        assert server_final is not None and await logs_in(result.credentials)
        result, server_final, _ = await run_exchange(portal, Client(b"scram", b"pen"))
        assert server_final is None and not await logs_in(result.credentials)

    @pytest_twisted.ensureDeferred
    async def test_a_slow_query_is_unavailable_quickly(
        self, databases: Databases, logged: Logged
    ) -> None:
        slow = {
            # A statement the server itself cancels (statement_timeout).
            "pgsql": "SELECT password FROM users, pg_sleep(30) WHERE userid = '%u'",
            # max_statement_time (MariaDB), or the client's read timeout.
            "mysql": "SELECT password FROM users WHERE userid = '%u' AND SLEEP(30) = 0",
            # A query the progress handler interrupts.
            "sqlite": (
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT password FROM users, n WHERE userid = '%u' AND i < 0"
            ),
        }[databases.driver]
        checker = databases.checker(timeout=0.3, password_query=slow)
        with pytest.raises(AuthUnavailable) as unavailable:
            await login(checker, "alice", "wonderland")
        assert unavailable.value.status().to_bytes() == (
            b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n"
        )
        assert len(logged.texts("SQL database unavailable")) == 1


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_the_injection_leaves_the_table_alone(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    databases = Databases("pgsql", postgres.connect, tmp_path)
    checker = databases.checker()
    before = postgres.count()
    try:
        for name in ["'; DELETE FROM users; --", "x'); DROP TABLE users; --"]:
            with pytest.raises(UnauthorizedLogin):
                await login(checker, name, "x")
    finally:
        await deferToThread(checker.database.close)
    assert postgres.count() == before


@pytest_twisted.ensureDeferred
async def test_a_missing_sqlite_file_is_an_outage(tmp_path: Path, logged: Logged) -> None:
    checker = Databases("sqlite", str(tmp_path / "not-yet.db"), tmp_path).checker()
    for _ in range(3):
        with pytest.raises(AuthUnavailable):
            await login(checker, "alice", "wonderland")
    # It was not created (read-only), and the outage is one line.
    assert not (tmp_path / "not-yet.db").exists()
    assert len(logged.texts("SQL database unavailable")) == 1
    sqlite_database(tmp_path / "not-yet.db")
    assert (await login(checker, "alice", "wonderland")).name == "alice"
    assert len(logged.texts("SQL database available again")) == 1


@pytest.mark.peer
@pytest.mark.parametrize("driver", ["pgsql", "mysql"])
@pytest_twisted.ensureDeferred
async def test_database_down_and_back(
    request: pytest.FixtureRequest, driver: str, tmp_path: Path, logged: Logged
) -> None:
    """
    PostgreSQL stopped under a running server: logins are answered
    ``-ERR [SYS/TEMP]`` (RFC 3206 section 4) at once, the outage is logged
    once; started again, logins work without a restart of pop3d, and that
    is logged once too.
    """
    server_of_the_database: PostgresCluster | MariaDBServer = request.getfixturevalue(
        {"pgsql": "postgres", "mysql": "mariadb"}[driver]
    )
    config = Databases(driver, server_of_the_database.connect, tmp_path).config()
    server = await start_service(
        tmp_path, ["tcp:0:interface=127.0.0.1"], ["--auth", f"sql:{config}"]
    )

    def session() -> bytes:
        client = poplib.POP3(server.host, server.port, timeout=30)
        try:
            client.user("o'brien")
            return client.pass_("irish")
        except poplib.error_proto as error:
            return bytes(error.args[0])
        finally:
            client.quit()

    try:
        assert (await deferToThread(session)).startswith(b"+OK")
        await deferToThread(server_of_the_database.stop)
        try:
            for _ in range(3):
                started = time.monotonic()
                assert await deferToThread(session) == (
                    b"-ERR [SYS/TEMP] authentication service unavailable, try again later"
                )
                assert time.monotonic() - started < 2
        finally:
            await deferToThread(server_of_the_database.start)
        assert (await deferToThread(session)).startswith(b"+OK")
        assert (await deferToThread(session)).startswith(b"+OK")
    finally:
        await server.service.stopService()
    [down] = logged.texts("SQL database unavailable")
    assert f"({'PostgreSQL' if driver == 'pgsql' else 'MySQL'}, {config})" in down
    assert len(logged.texts("SQL database available again")) == 1
    assert not logged.texts("Traceback")


def scram_session(host: str, port: int, user: bytes, password: bytes) -> list[bytes]:
    """AUTH SCRAM-SHA-256 (RFC 5034 section 4) by hand: every reply, as sent."""
    client = Client(user, password)
    pop = poplib.POP3(host, port, timeout=30)
    replies = []
    try:

        def send(line: bytes) -> bytes:
            pop._putcmd(line.decode("ascii"))  # type: ignore[attr-defined]
            reply: bytes = pop._getline()[0]  # type: ignore[attr-defined]
            replies.append(reply)
            return reply

        send(b"AUTH SCRAM-SHA-256")
        server_first = send(base64.b64encode(client.first()))
        if server_first.startswith(b"+ "):
            server_final = send(base64.b64encode(client.final(base64.b64decode(server_first[2:]))))
            if server_final.startswith(b"+ "):
                send(b"")
    finally:
        pop.quit()
    return replies


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_a_scram_login_asks_postgresql_once_for_the_login(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    """
    SCRAM-SHA-256 (RFC 5802 section 5) over SQL, counted by PostgreSQL
    itself (the password_query takes a number from a sequence): one query
    for the server-first message's salt, one for the login, whose password
    check uses the row that query gave (not a third query, nor the keys
    derived again from another).  The replies are unchanged.
    """
    postgres.execute("CREATE SEQUENCE password_queries")
    counted = (
        "SELECT password, nextval('password_queries') AS counted FROM users WHERE userid = '%u'"
    )
    config = Databases("pgsql", postgres.connect, tmp_path).config(password_query=counted)
    server = await start_service(
        tmp_path, ["tcp:0:interface=127.0.0.1"], ["--auth", f"sql:{config}"]
    )

    async def session(user: bytes, password: bytes) -> tuple[list[bytes], int]:
        before = postgres.value("SELECT last_value FROM password_queries")
        replies = await deferToThread(scram_session, server.host, server.port, user, password)
        return replies, postgres.value("SELECT last_value FROM password_queries") - before

    try:
        postgres.value("SELECT nextval('password_queries')")
        for user, password in [(b"scram", b"pencil"), (b"o'brien", b"irish")]:
            replies, queries = await session(user, password)
            assert replies[0] == b"+ "
            assert base64.b64decode(replies[1][2:]).startswith(b"r=fyko+d2lbbFgONRv9qkxdawL")
            assert base64.b64decode(replies[2][2:]).startswith(b"v=")
            assert replies[3] == b"+OK maildrop has 0 messages (0 octets)"
            assert queries == 2
        replies, queries = await session(b"scram", b"pen")
        assert replies[2:] == [b"-ERR [AUTH] invalid user name or password"]
        assert queries == 2
    finally:
        await server.service.stopService()
        postgres.execute("DROP SEQUENCE password_queries")


# -- end to end: twistd pop3d and Dovecot on the same dovecot-sql.conf.ext ------------------

DOVECOT = "/usr/sbin/dovecot"


#: Dovecot's SQL drivers (Debian packages dovecot-pgsql, dovecot-mysql).
DOVECOT_DRIVERS = {
    "pgsql": "/usr/lib/dovecot/modules/libdriver_pgsql.so",
    "mysql": "/usr/lib/dovecot/modules/libdriver_mysql.so",
}


def require_dovecot_sql(driver: str) -> None:
    require_dovecot()
    if not (os.access(DOVECOT, os.X_OK) and os.path.exists(DOVECOT_DRIVERS[driver])):
        reason = f"Dovecot's {driver} driver is not installed (apt-get install dovecot-{driver})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def e2e_database(request: pytest.FixtureRequest, driver: str, rows: list[tuple[Any, ...]]) -> str:
    """A database ``e2e`` with ``rows`` in the driver's server; its ``connect``."""
    if driver == "pgsql":
        postgres: PostgresCluster = request.getfixturevalue("postgres")
        postgres.execute("CREATE DATABASE e2e")
        postgres.execute(CREATE_TABLE, database="e2e")
        postgres.execute(insert_users("%s"), rows, database="e2e")
        return f"host={postgres.root} dbname=e2e user=pop3d maxconns=2"
    mariadb: MariaDBServer = request.getfixturevalue("mariadb")
    mariadb.execute("CREATE DATABASE e2e CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    mariadb.execute(CREATE_TABLE.replace("TABLE users", "TABLE e2e.users"))
    mariadb.execute(insert_users("%s").replace("INTO users", "INTO e2e.users"), rows)
    return f"host={mariadb.socket} dbname=e2e user=root maxconns=2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dovecot_config(shared: Path, port: int, sql_config: Path) -> Path:
    """Dovecot's whole server (master, auth, pop3) over the SQL passdb and userdb."""
    path = shared / "dovecot.conf"
    path.write_text(
        f"base_dir = {shared}/run\n"
        f"state_dir = {shared}/state\n"
        f"log_path = {shared}/dovecot.log\n"
        "protocols = pop3\nlisten = 127.0.0.1\nssl = no\n"
        "disable_plaintext_auth = no\n"
        # Refusals are answered at once by both (pop3d: --login-failure-delay 0).
        "auth_failure_delay = 0\n"
        "mail_uid = nobody\nmail_gid = nogroup\nfirst_valid_uid = 1\n"
        f"service pop3-login {{\n  inet_listener pop3 {{\n    port = {port}\n  }}\n}}\n"
        f"passdb {{\n  driver = sql\n  args = {sql_config}\n}}\n"
        f"userdb {{\n  driver = sql\n  args = {sql_config}\n}}\n"
    )
    return path


class POP3From(poplib.POP3):
    """poplib's client, connecting from a given loopback address."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


Outcome = tuple[bool, list[bytes], list[bytes], bytes]


def pop3_session(port: int, user: str, password: str, source: str) -> Outcome:
    """Logged in?  Then the UIDL listing and message 1 as RETR gives it; else the reply."""
    # Each case from its own address: Dovecot slows down the next login
    # from an address that failed one (its auth penalty), pop3d too.
    client = POP3From(source, port)
    try:
        client.user(user)
        try:
            client.pass_(password)
        except poplib.error_proto as error:
            return False, [], [], bytes(error.args[0])
        uidls = client.uidl()[1]
        message = client.retr(1)[1] if uidls else []
        return True, uidls, message, b""
    finally:
        client.quit()


def run_cases(port: int) -> list[Outcome]:
    return [
        pop3_session(port, user, password, f"127.0.0.{10 + number}")
        for number, (user, password, _) in enumerate(E2E_CASES)
    ]


E2E_CASES = [
    ("alice", "wonderland", True),
    ("alice", "wonder", False),
    ("bob", "builder", True),
    ("bob", SHA512_BOB, False),
    ("carol", "secret", False),  # nologin
    ("dave", "secret", False),  # allow_nets: not from 127.0.0.1
    ("eve", "anything", True),  # nopassword
    ("twin", "twin", False),  # two rows
    ("hank", "x", False),  # a password in no scheme either knows
    ("nobody", "x", False),
    ("x'OR'1'='1", "x'OR'1'='1", False),
]


@pytest.mark.peer
@pytest.mark.parametrize("driver", ["pgsql", "mysql"])
def test_same_users_and_mail_as_dovecot(
    request: pytest.FixtureRequest, driver: str, launch: Launch
) -> None:
    """
    One dovecot-sql.conf.ext, read by the real Dovecot (passdb and userdb
    ``driver = sql``) and by ``twistd pop3d --auth sql:``: the same users are
    accepted and refused, and each is served the mail of the per-user
    ``mail`` location the user_query gives (a different layout for bob),
    with the same UIDLs and bytes.
    """
    require_dovecot_sql(driver)
    shared = Path(tempfile.mkdtemp(prefix="pop3d-sql-e2e-"))
    try:
        shared.chmod(0o755)
        # --mail-location's root (its lock file), though the userdb places each user's mail.
        (shared / "mail").mkdir()
        home = shared / "home"
        mail = {"alice": home / "alice" / "Maildir", "bob": home / "bob" / "Mail" / "inbox"}
        for user, maildir in mail.items():
            for number in (1, 2):
                deliver_to_maildir(str(maildir), f"Subject: {number} for {user}\n\nhi\n".encode())
        subprocess.run(["chown", "-R", "nobody:nogroup", str(home)], check=True)
        connect = e2e_database(
            request,
            driver,
            [
                row("alice", "wonderland", home=f"{home}/alice", mail="maildir:~/Maildir"),
                row(
                    "bob",
                    "{SHA512-CRYPT}" + SHA512_BOB,
                    home=f"{home}/bob",
                    mail="maildir:~/Mail/inbox",
                ),
                row("carol", "{PLAIN}secret", nologin="Y", reason="Your account is suspended"),
                row("dave", "{PLAIN}secret", allow_nets="192.0.2.0/24"),
                row("eve", None, nopassword="Y", home=f"{home}/eve", mail="maildir:~/Maildir"),
                row("twin", "{PLAIN}twin"),
                row("twin", "{PLAIN}twin"),
                row("hank", "{NOSUCH}x"),
            ],
        )
        sql_config = write_config(
            shared / "dovecot-sql.conf.ext",
            driver=driver,
            connect=connect,
            default_pass_scheme="PLAIN",
            password_query=(
                "SELECT userid AS user, password, nologin, reason, allow_nets, nopassword "
                "FROM users WHERE userid = '%u'"
            ),
            user_query="SELECT home, mail FROM users WHERE userid = '%u'",
        )
        sql_config.chmod(0o644)
        dovecot_port = free_port()
        config = dovecot_config(shared, dovecot_port, sql_config)
        subprocess.run([DOVECOT, "-c", str(config)], check=True, timeout=60)
        try:
            # Dovecot first: pop3d keeps the UIDLs it finds in dovecot-uidlist.
            from_dovecot = run_cases(dovecot_port)
        finally:
            subprocess.run([DOVECOT, "-c", str(config), "stop"], check=True, timeout=60)
        server = launch(
            *twistd_arguments(
                f"maildir:{shared}/mail/{{user}}",
                f"sql:{sql_config}",
                "--login-failure-delay",
                "0",
            )
        )
        port = server.wait_listening()
        from_pop3d = run_cases(port)
        server.assert_healthy()
        log = server.output
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    accepted = [outcome[0] for outcome in from_pop3d]
    assert accepted == [expected for _, _, expected in E2E_CASES], log
    # Same users, same UIDLs, same bytes; the refusals' words differ.
    assert [o[:3] for o in from_pop3d] == [o[:3] for o in from_dovecot]
    replies = [outcome[3] for outcome in from_pop3d]
    assert replies[0] == b""
    assert replies[1] == replies[9] == b"-ERR [AUTH] invalid user name or password"
    assert replies[4] == b"-ERR [AUTH] Your account is suspended"  # carol: nologin
    alice, bob = from_pop3d[0], from_pop3d[2]
    assert b"Subject: 1 for alice" in alice[2] and b"Subject: 1 for bob" in bob[2]
    assert len(alice[1]) == len(bob[1]) == 2


ROOT = Path(__file__).resolve().parent.parent


@pytest_twisted.ensureDeferred
async def test_the_readme_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README, the SQL subsection: its files, its commands, its users."""
    readme = (ROOT / "README.rst").read_text()
    config = ROOT / "examples" / "sql" / "dovecot-sql.conf.ext"
    settings = [
        line for line in config.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert "\n".join(f"    {line}".rstrip() for line in settings) in readme
    assert "--auth sql:examples/sql/dovecot-sql.conf.ext" in readme
    # The first command, run where the example's relative paths lead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "sql").mkdir(parents=True)
    script = (ROOT / "examples" / "sql" / "users.sql").read_text()
    sqlite3.connect("examples/sql/users.db").executescript(script).connection.close()
    checker = SQLChecker(read_sql_config(str(config)))
    checker.run_slow_work_in(reactor)
    assert (await login(checker, "alice", "wonderland")).name == "alice"
    with pytest.raises(LoginRefused) as refused:
        await login(checker, "bob", "builder")
    assert refused.value.text == "Your account is suspended"
    with pytest.raises(UnauthorizedLogin):
        await login(checker, "bob", "wrong")


@implementer(ICredentialsChecker)
class Unavailable:
    """A checker whose database is down."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return fail(AuthUnavailable())


@pytest_twisted.ensureDeferred
async def test_several_checkers_one_down() -> None:
    """
    ``--auth`` twice: another checker may still accept; if none does, the
    client is told to try later (not "wrong password"); a refusal after the
    right password is final.
    """
    memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
    checker = FirstMatchChecker([Unavailable(), memory], [IUsernamePassword])
    assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"
    with pytest.raises(AuthUnavailable):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))

    @implementer(ICredentialsChecker)
    class Refusing:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
            return fail(LoginRefused("Your account is suspended"))

    checker = FirstMatchChecker([Refusing(), memory], [IUsernamePassword])
    with pytest.raises(LoginRefused):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))


class QueuedThreadsReactor(FakeThreadingReactor, Clock):
    """Work given to the thread pool waits there until the test runs it."""

    def __init__(self) -> None:
        FakeThreadingReactor.__init__(self)
        Clock.__init__(self)

    def addSystemEventTrigger(self, *arguments: object) -> None:
        pass


class RecordedDatabase:
    """A database that answers every query with one row, and remembers who asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def fetch(self, statement: str, parameters: Sequence[str]) -> list[dict[str, str | None]]:
        self.asked.append(parameters[0])
        return [{"password": "{PLAIN}x"}]

    def close(self) -> None:
        pass


def test_at_most_maxconns_queries_at_once(tmp_path: Path) -> None:
    """Dovecot's maxconns bounds the queries in the thread pool; the others wait, in order."""
    config = write_config(
        tmp_path / "dovecot-sql.conf.ext",
        driver="pgsql",
        connect="host=/nonexistent dbname=mail maxconns=2",
        password_query="SELECT password FROM users WHERE userid = '%u'",
    )
    database = RecordedDatabase()
    checker = SQLChecker(read_sql_config(str(config)), database=database)  # type: ignore[arg-type]
    reactor = QueuedThreadsReactor()
    checker.run_slow_work_in(reactor)  # type: ignore[arg-type]
    logins = [
        checker.requestAvatarId(PreparedUsernamePassword(name.encode(), b"x"))
        for name in ["ann", "bob", "cid", "dee"]
    ]
    pool = reactor.pool
    assert len(pool.queued) == 2 and database.asked == []
    while pool.queued:
        assert len(pool.queued) <= 2
        pool.run_next()
    assert database.asked == ["ann", "bob", "cid", "dee"]
    assert [login.result.name for login in logins] == ["ann", "bob", "cid", "dee"]


@pytest_twisted.ensureDeferred
async def test_sighup_reads_the_file_again(tmp_path: Path, logged: Logged) -> None:
    """IReloadable: new queries and a new database take effect; a bad file is kept out."""
    first = sqlite_database(tmp_path / "first.db")
    second = zoe_database(tmp_path / "second.db")
    made = Databases("sqlite", str(first), tmp_path)
    checker = made.checker()
    assert IReloadable.providedBy(checker)
    assert (await login(checker, "alice", "wonderland")).name == "alice"
    made.connect = str(second)
    path = made.config(default_pass_scheme="SHA512-CRYPT")
    await checker.reload()
    assert (await login(checker, "zoe", "zz")).name == "zoe"
    with pytest.raises(UnauthorizedLogin):
        await login(checker, "alice", "wonderland")
    path.write_text("driver = sqlite\nconnect = x\npassword_query = SELECT 1 WHERE a = %u\n")
    await checker.reload()
    [error] = logged.texts("keeping the previous")
    assert f"{path}:3: password_query: variable %u outside quotes" in error
    assert (await login(checker, "zoe", "zz")).name == "zoe"


def test_a_reload_reads_the_file_in_the_thread_pool_and_logins_wait_for_it(
    tmp_path: Path, logged: Logged
) -> None:
    """
    SIGHUP's reading of dovecot-sql.conf.ext is not done on the reactor
    thread, which goes on serving the other sessions: it is handed to the
    thread pool.  A login that arrives meanwhile waits for it, and runs
    the new query against the new database.
    """
    made = Databases("sqlite", str(sqlite_database(tmp_path / "first.db")), tmp_path)
    path = made.config()
    checker = SQLChecker(read_sql_config(str(path)))
    threads = TimedClockThreads(Clock())
    checker.run_slow_work_in(threads.as_reactor)
    made.connect = str(zoe_database(tmp_path / "second.db"))
    made.config()
    checker.reload()
    assert threads.handed_over == 1
    assert checker.config.connect == str(tmp_path / "first.db")
    zoe = Deferred.fromCoroutine(login(checker, "zoe", "zz"))
    assert not zoe.called
    assert result_of(threads.clock, zoe) == AuthenticatedUser("zoe")
    assert logged.texts("reloaded") == [f"reloaded {path}"]
    checker.database.close()


def test_a_broken_reload_keeps_the_file_in_use_and_is_logged_once(
    tmp_path: Path, logged: Logged
) -> None:
    """A file that cannot be used: one line naming its file and line; logins go on with the old."""
    made = Databases("sqlite", str(sqlite_database(tmp_path / "first.db")), tmp_path)
    path = made.config()
    checker = SQLChecker(read_sql_config(str(path)))
    threads = TimedClockThreads(Clock())
    checker.run_slow_work_in(threads.as_reactor)
    path.write_text("driver = sqlite\nconnect = x\npassword_query = SELECT 1 WHERE a = %u\n")
    checker.reload()
    logins = [Deferred.fromCoroutine(login(checker, "alice", "wonderland")) for _ in range(2)]
    assert not any(waiting.called for waiting in logins)
    assert [result_of(threads.clock, waiting) for waiting in logins] == [
        AuthenticatedUser("alice"),
        AuthenticatedUser("alice"),
    ]
    assert threads.handed_over == 3  # the file once, then the two queries
    [kept] = logged.texts("keeping the previous")
    assert kept.startswith(
        f"keeping the previous {path}: {path}:3: password_query: variable %u outside quotes"
    )
    checker.database.close()


def zoe_database(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute(CREATE_TABLE)
        connection.execute("INSERT INTO users (userid, password) VALUES ('zoe', '{PLAIN}zz')")
    connection.close()
    return path


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_a_failing_query_with_the_password_logs_no_value(
    postgres: PostgresCluster, tmp_path: Path, logged: Logged
) -> None:
    """PostgreSQL quotes a bad value in its error: with %w in the query, only the kind is logged."""
    checker = Databases("pgsql", postgres.connect, tmp_path).checker(
        password_query="SELECT password FROM users WHERE userid = '%u' AND login_delay = '%w'"
    )
    try:
        with pytest.raises(AuthUnavailable):
            await login(checker, "alice", "s3cret-pw")
    finally:
        await deferToThread(checker.database.close)
    [line] = logged.texts("SQL database unavailable")
    assert "InvalidTextRepresentation (SQLSTATE 22P02)" in line
    assert "s3cret-pw" not in "".join(str(event) for event in logged.events)
