"""
Dovecot's passdb extra fields (``user``, ``nologin`` and ``reason``,
``allow_nets``, ``userdb_*``) mean the same from every password database:
each case runs against an SQL password_query (SQLite) and an LDAP entry's
pass_attrs (a real slapd started by the tests), read by one
`pop3d.userdb.passdb_user`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.logger import formatEvent

from pop3d.authdb.ldap import LdapChecker
from pop3d.authdb.ldapconf import read_ldap_settings
from pop3d.authdb.sql import SQLChecker, read_sql_config
from pop3d.credentials import PreparedUsernamePassword
from pop3d.errors import POP3Error
from pop3d.userdb import AuthenticatedUser, UserSettings

from .conftest import Logged
from .ldapserver import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, LdapServer, person_ldif
from .ldapserver import start_ldap_server as start_slapd
from .test_sql_auth import sqlite_database, write_config

#: What a wrong password is answered (RFC 3206 section 4: [AUTH]).
WRONG_PASSWORD = b"-ERR [AUTH] invalid user name or password\r\n"
#: What a user database that cannot be used is answered (RFC 3206 section 4).
UNAVAILABLE = b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n"

#: The extra fields of ann's entry, and what her login (right password) comes to.
CASES: list[tuple[dict[str, str], AuthenticatedUser | bytes]] = [
    ({}, AuthenticatedUser("ann")),
    ({"user": "ann@example.org"}, AuthenticatedUser("ann@example.org")),
    # Dovecot: the reason is the reply's text ...
    (
        {"nologin": "Y", "reason": "System is being upgraded"},
        b"-ERR [AUTH] System is being upgraded\r\n",
    ),
    # ... and without one, the reply to a wrong password (its "Authentication failed.").
    ({"nologin": "Y"}, WRONG_PASSWORD),
    ({"nologin": "Y", "userdb_login_delay": "soon"}, WRONG_PASSWORD),
    # An empty value is a value (Dovecot skips only NULL): still refused ...
    ({"nologin": ""}, WRONG_PASSWORD),
    # ... and an empty allow_nets allows no network at all.
    ({"allow_nets": ""}, AuthenticatedUser("ann", allowed_networks=())),
    ({"user": ""}, AuthenticatedUser("ann")),
    (
        {"allow_nets": "192.0.2.0/24 ::1"},
        AuthenticatedUser(
            "ann",
            allowed_networks=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("::1")),
        ),
    ),
    (
        {"userdb_mail": "maildir:/srv/ann", "userdb_expire": "never"},
        AuthenticatedUser("ann", UserSettings(mail="maildir:/srv/ann", expire_never=True)),
    ),
    # A value pop3d cannot use: logged for the administrator, "try again later".
    ({"allow_nets": "192.0.2.300"}, UNAVAILABLE),
    ({"userdb_login_delay": "soon"}, UNAVAILABLE),
]

PASSWORD = "pencil"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LdapServer]:
    server = start_slapd(tmp_path_factory.mktemp("slapd") / "slapd")
    try:
        server.add(person_ldif("ann", "{PLAIN}" + PASSWORD))
        yield server
    finally:
        server.stop()


def sql_checker(tmp_path: Path, fields: dict[str, str]) -> SQLChecker:
    columns = "".join(f", '{value}' AS {name}" for name, value in fields.items())
    config = write_config(
        tmp_path / "dovecot-sql.conf.ext",
        driver="sqlite",
        connect=str(sqlite_database(tmp_path / "users.db")),
        password_query=f"SELECT '{{PLAIN}}{PASSWORD}' AS password{columns} WHERE '%u' = 'ann'",
    )
    checker = SQLChecker(read_sql_config(str(config)))
    checker.run_slow_work_in(reactor)
    return checker


def ldap_checker(tmp_path: Path, server: LdapServer, fields: dict[str, str]) -> LdapChecker:
    templates = "".join(f", ={name}={value}" for name, value in fields.items())
    config = tmp_path / "dovecot-ldap.conf.ext"
    config.write_text(
        f"uris = {server.uri}\n"
        f"dn = {SERVICE_DN}\n"
        f'dnpass = "{SERVICE_PASSWORD}"\n'
        f"base = {PEOPLE}\n"
        "pass_filter = (&(objectClass=posixAccount)(uid=%u))\n"
        f"pass_attrs = userPassword=password{templates}\n"
    )
    checker = LdapChecker(read_ldap_settings(str(config)))
    checker.run_slow_work_in(reactor)
    return checker


@pytest.fixture(params=["sql", "ldap"])
def make_checker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[dict[str, str]], ICredentialsChecker]:
    if request.param == "sql":
        return lambda fields: sql_checker(tmp_path, fields)
    server: LdapServer = request.getfixturevalue("slapd")
    return lambda fields: ldap_checker(tmp_path, server, fields)


async def outcome(checker: ICredentialsChecker, password: str) -> Any:
    """The avatar id, or the reply a refused login gets."""
    try:
        return await checker.requestAvatarId(PreparedUsernamePassword(b"ann", password.encode()))
    except UnauthorizedLogin:
        return WRONG_PASSWORD
    except POP3Error as error:
        return error.status().to_bytes()


@pytest.mark.peer
@pytest.mark.parametrize("fields,expected", CASES)
@pytest_twisted.ensureDeferred
async def test_the_extra_fields_mean_the_same_in_sql_and_ldap(
    make_checker: Callable[[dict[str, str]], ICredentialsChecker],
    logged: Logged,
    fields: dict[str, str],
    expected: AuthenticatedUser | bytes,
) -> None:
    checker = make_checker(fields)
    assert await outcome(checker, PASSWORD) == expected
    # A wrong password tells nothing of the fields (nor whether they are usable).
    assert await outcome(checker, "wrong") == WRONG_PASSWORD
    lines = [
        formatEvent(event) for event in logged.events if event.get("log_level").name == "error"
    ]
    if expected == UNAVAILABLE:
        [line] = lines
        name, value = next(iter(fields.items()))
        assert "ann" in line and value in line and str(name.removeprefix("userdb_")) in line
    else:
        assert lines == []
