"""
``--auth ldap:dovecot-ldap.conf.ext`` (pop3d.authdb.ldap): the file's keys,
password lookups with the schemes OpenLDAP writes, authentication binds,
Dovecot's fields, filter and DN injection attempts, a server that is down
or does not answer, all against a real slapd started by the tests.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from pop3d.authdb.ldap import LdapChecker, LdapCheckerFactory, escape_dn_value
from pop3d.authdb.ldapconf import (
    AttributeMapping,
    Deref,
    FieldTemplate,
    RequireCert,
    Scope,
    entry_fields,
    read_ldap_settings,
    requested_attributes,
)
from pop3d.credentials import PreparedUsernamePassword
from pop3d.dovecotconf import ConfigFileError, ConfigValue
from pop3d.dovecotvars import Lookup, Variables
from pop3d.driver import APOPCredentials
from pop3d.errors import AuthUnavailable, LoginRefused
from pop3d.passwords import SCHEMES
from pop3d.reloading import IReloadable
from pop3d.sasl import ICramMD5Credentials
from pop3d.sasl.cram_md5 import CramMD5Credentials
from pop3d.userdb import (
    AuthenticatedUser,
    IUserDatabase,
    IUserSettingsSource,
    LoginContext,
    UserSettings,
    attach_login_context,
)
from pop3d.wire import ResponseCode

from .clock_threads import ClockThreads, result_of
from .conftest import Logged
from .ldapserver import (
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SUFFIX,
    LdapServer,
    person_ldif,
    start_ldap_server,
)
from .test_credchecks import STORED_PASSWORDS, passwd_file_reads

HORSE = "correct horse"

#: userPassword values written by slappasswd (tests/test_passwords.py has more).
USERS: dict[str, tuple[str, str]] = {
    "alice": ("{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    "bob": (
        "{CRYPT}$6$rUNH2UKG8yivNmDd$u/W8HtEadwidOJces2S/3LMgZLAEazeRDTrE9jUDPY25/oVwaDI10QHTMIhPs"
        "dehdUqYBRHaiJztIOgirZRUX/",
        HORSE,
    ),
    "carol": (
        "{SSHA512}HB6DmleHAvmP11+M0XzS4DxlZFahTeF4Q4xSt5Pc2Y0hGtpwesTZZ/K8WzalL6zU9I5fJJvrajAw6"
        "MF8CQRw8v3DizcVc9l0",
        HORSE,
    ),
    "dave": ("{SMD5}X8tf42S2eBHunXDTPvLTGwMmOzY=", HORSE),
    "erin": ("{SHA}L55TUjtiq8FBorTWAZ0jy6g129A=", HORSE),
    "frank": ("{CRYPT}XXsTqXqb60.nU", "horse"),
    "grace": ("{CRYPT}$2b$05$GP5DDMUcSl4zhZkvqhH2XeqerWNJsSph7HrF1p.Nv2NlaVcZObW1K", HORSE),
    "heidi": ("{CRYPT}$1$Wz/kzrof$918CawWcJIG7i4uOaVJEF1", HORSE),
    # Dovecot's alias, as in every passdb: {BLF} is {BLF-CRYPT}.
    "heidi2": ("{BLF}$2b$05$GP5DDMUcSl4zhZkvqhH2XeqerWNJsSph7HrF1p.Nv2NlaVcZObW1K", HORSE),
    "ivan": ("{CRYPT}$5$QKJGpc2eE4cuMQEZ$iN7BSvgclQiaj5opnts8yWmq0D.x3q1fp29xIakC7zB", HORSE),
    # No scheme: default_pass_scheme (CRYPT unless the file says otherwise).
    "judy": ("$1$Wz/kzrof$918CawWcJIG7i4uOaVJEF1", HORSE),
    # Names that an unescaped filter or DN would read as syntax.
    "st*r": ("{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    "pa(re)n": ("{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    "back\\slash": ("{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    "comma,plus+": ("{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
}


def _dn_of(uid: str) -> str:
    return f"uid={escape_dn_value(uid)},{PEOPLE}"


def _ldif(uid: str, password: str | None, **attributes: str | list[str]) -> str:
    text = person_ldif(uid, password, **attributes)
    return text.replace(f"dn: uid={uid},", f"dn: uid={escape_dn_value(uid)},", 1)


def _load(server: LdapServer, home_root: Path) -> None:
    entries = [
        _ldif(uid, password, homeDirectory=str(home_root / uid.replace("\\", "_")))
        for uid, (password, _) in USERS.items()
    ]
    entries += [
        _ldif(
            "mallory",
            "{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs",
            objectClass="pop3dUser",
            mailDisabled="TRUE",
            disabledReason="account closed, ask the help desk",
        ),
        _ldif(
            "oscar",
            "{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs",
            objectClass="pop3dUser",
            allowedNets="10.0.0.0/8, 192.0.2.1",
        ),
        _ldif(
            "peggy",
            "{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs",
            objectClass="pop3dUser",
            allowedNets="127.0.0.0/8",
            mailLocation="maildir:~/Mail",
            popLoginDelay="300",
            popExpire="never",
            homeDirectory="/srv/peggy",
        ),
        _ldif("plain", "plain secret"),
        _ldif("nopass", None),
        _ldif("weird", "{NTLM}0123456789abcdef"),
        # Two entries for one name: ambiguous, refused.
        _ldif("twin", "{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs"),
        f"dn: cn=twin2,{PEOPLE}\nobjectClass: account\nobjectClass: posixAccount\n"
        "uid: twin\ncn: twin2\nuidNumber: 1000\ngidNumber: 1000\nhomeDirectory: /tmp\n"
        "userPassword: {SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs\n",
        # The values every password database must read alike.
        *(_ldif(f"stored-{index}", stored) for index, (stored, _) in enumerate(STORED_PASSWORDS)),
        # A user whose password pop3d made: slapd checks it in auth binds.
        *(
            _ldif(
                f"made-{name.lower()}", f"{{{name}}}{SCHEMES[name].hash(HORSE.encode()).decode()}"
            )
            for name in ("SSHA", "SHA", "SMD5", "SSHA512", "CRYPT")
        ),
    ]
    server.add("\n".join(entries))


@pytest.fixture(scope="module")
def ldap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LdapServer]:
    """One slapd for the module's tests that do not stop it."""
    directory = tmp_path_factory.mktemp("slapd")
    server = start_ldap_server(directory / "slapd")
    try:
        _load(server, directory / "home")
        yield server
    finally:
        server.stop()


def _write_conf(path: Path, server: LdapServer, extra: str = "") -> Path:
    path.write_text(
        f"uris = {server.uri}\n"
        f"dn = {SERVICE_DN}\n"
        f'dnpass = "{SERVICE_PASSWORD}"\n'
        f"base = {PEOPLE}\n"
        "scope = subtree\n"
        "pass_filter = (&(objectClass=posixAccount)(uid=%u))\n"
        "pass_attrs = uid=user, userPassword=password, mailDisabled=nologin, "
        "disabledReason=reason, allowedNets=allow_nets\n" + extra
    )
    return path


def _checker(path: Path, timeout: float = 5.0) -> LdapChecker:
    checker = LdapChecker(read_ldap_settings(str(path)), timeout=timeout)
    checker.run_slow_work_in(reactor)
    return checker


def _credentials(user: str, password: str, remote_ip: str = "127.0.0.1") -> Any:
    credentials = PreparedUsernamePassword(user.encode(), password.encode())
    attach_login_context(credentials, LoginContext(remote_ip, "127.0.0.1", secured=False))
    return credentials


async def _login(checker: LdapChecker, credentials: Any) -> Any:
    try:
        return await checker.requestAvatarId(credentials)
    except Exception as error:
        return error


# -- the file ---------------------------------------------------------------------------


class TestSettings:
    def _read(self, tmp_path: Path, text: str) -> Any:
        path = tmp_path / "dovecot-ldap.conf.ext"
        path.write_text(text)
        return read_ldap_settings(str(path))

    def test_dovecot_defaults(self, tmp_path: Path) -> None:
        settings = self._read(tmp_path, "hosts = ldap1 ldap2:3389\nbase = dc=example,dc=org\n")
        assert settings.uris == ("ldap://ldap1", "ldap://ldap2:3389")
        assert settings.bind_dn is None and settings.bind_password is None
        assert settings.scope is Scope.SUBTREE and settings.deref is Deref.NEVER
        assert (
            settings.pass_filter == settings.user_filter == "(&(objectClass=posixAccount)(uid=%u))"
        )
        assert [(m.attribute, m.field) for m in settings.pass_attrs] == [
            ("uid", "user"),
            ("userPassword", "password"),
        ]
        assert [(m.attribute, m.field) for m in settings.user_attrs] == [
            ("homeDirectory", "home"),
            ("uidNumber", "uid"),
            ("gidNumber", "gid"),
        ]
        assert settings.default_pass_scheme == "CRYPT"
        assert settings.ldap_version == 3
        assert not settings.auth_bind and not settings.starttls and not settings.userdb

    def test_every_key(self, tmp_path: Path) -> None:
        settings = self._read(
            tmp_path,
            "uris = ldaps://a.example ldap://b.example:389\n"
            "hosts = ignored.example\n"
            "dn = cn=pop3d,dc=example,dc=org\n"
            'dnpass = "with # and spaces"\n'
            "tls = yes\n"
            "tls_ca_cert_file = /etc/ssl/ca.pem\n"
            "tls_ca_cert_dir = /etc/ssl/certs\n"
            "tls_cert_file = /etc/ssl/client.pem\n"
            "tls_key_file = /etc/ssl/client.key\n"
            "tls_cipher_suite = HIGH\n"
            "tls_require_cert = hard\n"
            "ldaprc_path = /etc/ldap/ldaprc\n"
            "debug_level = 0\n"
            "auth_bind = yes\n"
            "auth_bind_userdn = uid=%n,ou=%d,dc=example,dc=org\n"
            "ldap_version = 2\n"
            "base = ou=%d,dc=example,dc=org\n"
            "deref = always\n"
            "scope = onelevel\n"
            "user_attrs = homeDirectory=home\n"
            "user_filter = (uid=%n)\n"
            "pass_attrs = uid=user\n"
            "pass_filter = (mail=%u)\n"
            "iterate_attrs = uid=user\n"
            "iterate_filter = (objectClass=posixAccount)\n"
            "default_pass_scheme = ssha\n"
            "blocking = yes\n"
            "sasl_bind = no\n",
        )
        assert settings.uris == ("ldaps://a.example", "ldap://b.example:389")
        assert settings.bind_password == "with # and spaces"
        assert settings.starttls and settings.auth_bind and settings.userdb
        assert settings.auth_bind_userdn == "uid=%n,ou=%d,dc=example,dc=org"
        assert settings.tls_require_cert is RequireCert.HARD
        assert settings.tls_ca_cert_file == "/etc/ssl/ca.pem"
        assert settings.tls_cert_file == "/etc/ssl/client.pem"
        assert settings.ldap_version == 2
        assert settings.scope is Scope.ONELEVEL and settings.deref is Deref.ALWAYS
        assert settings.base == "ou=%d,dc=example,dc=org"
        assert settings.default_pass_scheme == "SSHA"

    @pytest.mark.parametrize(
        "text,line,reason",
        [
            ("uris = ldap://x\nbase = o=x\nscope = sub\n", 3, "'sub' is not one of base, onelevel"),
            ("uris = ldap://x\nbase = o=x\nderef = sometimes\n", 3, "is not one of never"),
            ("uris = ldap://x\nbase = o=x\ntls = maybe\n", 3, "tls 'maybe': expected yes or no"),
            ("uris = ldap://x\nbase = o=x\nldap_version = 4\n", 3, "expected 2 or 3"),
            ("uris = ldap://x\nbase = o=x\ntls_require_cert = yes\n", 3, "not one of never, hard"),
            ("uris = http://x\nbase = o=x\n", 1, "is not an ldap://"),
            ("uris = ldap://x\n", 0, "base is not set"),
            ("base = o=x\n", 0, "neither uris nor hosts is set"),
            ("uris = ldap://x\nbase = o=x\nsasl_bind = yes\n", 3, "sasl_bind = yes is not"),
            ("uris = ldap://x\nbase = o=x\ndefault_pass_scheme = MD4\n", 3, r"unsupported"),
            ("uris = ldap://x\nbase = o=x\npass_filter = (uid=%z)\n", 3, "unknown variable %z"),
            ("uris = ldap://x\nbase = ou=%{nope}\n", 2, "unknown variable %{nope}"),
            ("uris = ldap://x\nbase = o=x\nauth_bind_userdn = uid=%q\n", 3, "unknown variable"),
            ("uris = ldap://x\nbase = o=x\nuser_attrs = @mail=%{ldap:x}\n", 3, "@ sub-queries"),
            (
                "uris = ldap://x\nbase = o=x\nuser_attrs = =home=%{ldap_ptr:x}\n",
                3,
                "ldap_ptr",
            ),
            ("uris = ldap://x\nbase = o=x\nuser_attrs = =home\n", 3, "needs '=template'"),
            ("uris = ldap://x\nbase = o=x\nuser_attrs = a b=home\n", 3, "not an LDAP attribute"),
            ("uris = ldap://x\nbase = o=x\nuser_attrs = =home=%{ldap:x\n", 3, "without '}'"),
            ("uris = ldap://x\nbase = o=x\nuser_attrs = =home=%{ldap:}\n", 3, "names nothing"),
            ("uris = ldap://x\nbase = o=x\nuser_query = x\n", 3, "unknown setting 'user_query'"),
        ],
    )
    def test_mistakes_name_the_file_and_line(
        self, tmp_path: Path, text: str, line: int, reason: str
    ) -> None:
        with pytest.raises(ConfigFileError, match=reason) as raised:
            self._read(tmp_path, text)
        assert raised.value.line == line
        assert raised.value.path == str(tmp_path / "dovecot-ldap.conf.ext")

    def test_userdb_only_when_the_file_sets_it(self, tmp_path: Path) -> None:
        """A passdb-only file must not refuse users the default user_filter misses."""
        assert not self._read(tmp_path, "uris = ldap://x\nbase = o=x\n").userdb
        assert self._read(tmp_path, "uris = ldap://x\nbase = o=x\nuser_attrs = =mail=x\n").userdb


class TestAttributeLists:
    VARIABLES = Variables(user="alice@example.org")

    def _parse(self, text: str) -> tuple[AttributeMapping, ...]:
        from pop3d.authdb.ldapconf import parse_attribute_list

        return parse_attribute_list(ConfigValue(text, "f", 1))

    def test_dovecot_23_forms(self) -> None:
        mappings = self._parse(
            "uid=user, userPassword=password, mailHome, "
            "mailboxPath=home=/home/%{ldap:mailboxPath}, "
            "=mail=maildir:/var/vmail/%d/%n/%{ldap:uid}, "
            "=quota=%{ldap:quotaBytes:1000}, !objectClass, "
            "mailQuota=quota_rule:protected"
        )
        entry = {"uid": "Alice", "userpassword": "{SSHA}x", "mailhome": "/m", "objectclass": "x"}
        assert entry_fields(mappings, self.VARIABLES, entry) == {
            "user": "Alice",
            "password": "{SSHA}x",
            "mailHome": "/m",
            "mail": "maildir:/var/vmail/example.org/alice/Alice",
            "quota": "1000",
        }
        entry["mailboxpath"] = "alice"
        assert entry_fields(mappings, self.VARIABLES, entry)["home"] == "/home/alice"

    def test_what_is_asked_for(self) -> None:
        mappings = self._parse("uid=user, =home=/h/%{ldap:cn}, !objectClass, UID=other")
        assert requested_attributes(mappings) == ["uid", "cn", "objectClass"]
        assert requested_attributes(self._parse("=mail=maildir:~/Maildir")) == ["1.1"]
        # An empty list: every attribute, each its own field.
        assert requested_attributes(()) is None
        assert entry_fields((), self.VARIABLES, {"uid": "alice"}) == {"uid": "alice"}

    def test_percent_percent_stays_literal(self) -> None:
        template = FieldTemplate.parse("100%% of %{ldap:cn} %u")
        assert template.template.parts[1] == Lookup("ldap", "cn", None)
        assert template.expand(self.VARIABLES, {"cn": "A"}) == "100% of A alice@example.org"


# -- against slapd -------------------------------------------------------------------------


@pytest.fixture
def conf(tmp_path: Path, ldap_server: LdapServer) -> Path:
    return _write_conf(tmp_path / "dovecot-ldap.conf.ext", ldap_server)


@pytest.mark.peer
class TestPasswordLookups:
    @pytest.mark.parametrize("user", sorted(USERS))
    @pytest_twisted.ensureDeferred
    async def test_every_scheme_slappasswd_writes(self, conf: Path, user: str) -> None:
        checker = _checker(conf)
        password = USERS[user][1]
        avatar = await _login(checker, _credentials(user, password))
        assert avatar == AuthenticatedUser(user)
        refused = await _login(checker, _credentials(user, password[:-1] + "X"))
        assert isinstance(refused, UnauthorizedLogin)

    @pytest.mark.parametrize(
        "user,password",
        [
            ("nobody-here", HORSE),
            ("nopass", HORSE),
            ("nopass", ""),
            # A scheme pop3d does not read: logged, refused.
            ("weird", "0123456789abcdef"),
            # Two entries: ambiguous, refused.
            ("twin", HORSE),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_refused(self, conf: Path, user: str, password: str) -> None:
        refused = await _login(_checker(conf), _credentials(user, password))
        assert isinstance(refused, UnauthorizedLogin)

    @pytest_twisted.ensureDeferred
    async def test_the_directory_spells_the_name(self, conf: Path) -> None:
        """``uid=user``: LDAP matching ignores case, the entry's uid is the name."""
        avatar = await _login(_checker(conf), _credentials("ALICE", HORSE))
        assert avatar == AuthenticatedUser("alice")

    @pytest_twisted.ensureDeferred
    async def test_nologin_with_reason_after_the_password(self, conf: Path) -> None:
        checker = _checker(conf)
        refused = await _login(checker, _credentials("mallory", HORSE))
        assert isinstance(refused, LoginRefused)
        assert refused.status().text == "account closed, ask the help desk"
        # A wrong password says nothing about nologin.
        wrong = await _login(checker, _credentials("mallory", "nope"))
        assert isinstance(wrong, UnauthorizedLogin)

    @pytest_twisted.ensureDeferred
    async def test_allow_nets(self, conf: Path) -> None:
        avatar = await _login(_checker(conf), _credentials("oscar", HORSE))
        assert isinstance(avatar, AuthenticatedUser)
        assert avatar.allowed_networks == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.0.2.1/32"),
        )
        assert not avatar.allows(LoginContext("127.0.0.1", None, False))
        assert avatar.allows(LoginContext("10.1.2.3", None, False))

    @pytest_twisted.ensureDeferred
    async def test_userdb_prefetch(self, tmp_path: Path, ldap_server: LdapServer) -> None:
        conf = _write_conf(tmp_path / "prefetch.conf.ext", ldap_server)
        conf.write_text(
            conf.read_text().replace(
                "allowedNets=allow_nets",
                "homeDirectory=userdb_home, mailLocation=userdb_mail, "
                "popLoginDelay=userdb_login_delay, popExpire=userdb_expire",
            )
        )
        checker = _checker(conf)
        assert IUserSettingsSource.providedBy(checker)
        assert not IUserDatabase.providedBy(checker)
        avatar = await _login(checker, _credentials("peggy", HORSE))
        assert avatar.settings == UserSettings(
            home="/srv/peggy", mail="maildir:~/Mail", login_delay=300, expire_never=True
        )

    @pytest_twisted.ensureDeferred
    async def test_default_pass_scheme(self, tmp_path: Path, ldap_server: LdapServer) -> None:
        conf = _write_conf(
            tmp_path / "plain.conf.ext", ldap_server, "default_pass_scheme = PLAIN\n"
        )
        checker = _checker(conf)
        assert isinstance(
            await _login(checker, _credentials("plain", "plain secret")), AuthenticatedUser
        )
        # Prefixed values keep their own scheme.
        assert isinstance(await _login(checker, _credentials("alice", HORSE)), AuthenticatedUser)

    @pytest_twisted.ensureDeferred
    async def test_apop_and_cram_md5_with_plaintext_passwords(
        self, tmp_path: Path, ldap_server: LdapServer
    ) -> None:
        conf = _write_conf(
            tmp_path / "plain.conf.ext", ldap_server, "default_pass_scheme = PLAIN\n"
        )
        checker = _checker(conf)
        assert ICramMD5Credentials in checker.credentialInterfaces
        challenge = b"<1896.697170952@pop3d.example>"
        digest = hashlib.md5(challenge + b"plain secret").hexdigest().encode()
        apop = APOPCredentials(challenge, b"plain", digest)
        assert await _login(checker, apop) == AuthenticatedUser("plain")
        response = hmac.new(b"plain secret", challenge, "md5").hexdigest().encode()
        cram = CramMD5Credentials(b"plain", challenge, response)
        assert await _login(checker, cram) == AuthenticatedUser("plain")
        wrong = CramMD5Credentials(b"plain", challenge, b"0" * 32)
        assert isinstance(await _login(checker, wrong), UnauthorizedLogin)

    @pytest.mark.parametrize(
        "base,scope,found",
        [
            (SUFFIX, "subtree", True),
            (SUFFIX, "onelevel", False),
            (PEOPLE, "onelevel", True),
            (PEOPLE, "base", False),
            ("uid=%u," + PEOPLE, "base", True),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_base_and_scope(
        self, tmp_path: Path, ldap_server: LdapServer, base: str, scope: str, found: bool
    ) -> None:
        conf = _write_conf(tmp_path / "scope.conf.ext", ldap_server, f"scope = {scope}\n")
        conf.write_text(conf.read_text().replace(f"base = {PEOPLE}\n", f"base = {base}\n"))
        outcome = await _login(_checker(conf), _credentials("alice", HORSE))
        assert (outcome == AuthenticatedUser("alice")) is found

    @pytest.mark.parametrize("index", range(len(STORED_PASSWORDS)))
    @pytest_twisted.ensureDeferred
    async def test_stored_passwords_read_as_a_passwd_file_reads_them(
        self, conf: Path, index: int
    ) -> None:
        """Every scheme and alias a passwd-file accepts, and nothing else."""
        stored, password = STORED_PASSWORDS[index]
        user = f"stored-{index}"
        avatar = await _login(_checker(conf), _credentials(user, (password or b"pencil").decode()))
        assert (avatar == AuthenticatedUser(user)) is (passwd_file_reads(stored) is not None)
        if password is None:
            assert isinstance(avatar, UnauthorizedLogin)

    def test_hashed_directories_offer_user_pass_only(self, conf: Path) -> None:
        """With {CRYPT} by default no stored password serves APOP or CRAM-MD5."""
        assert _checker(conf).credentialInterfaces == (IUsernamePassword,)


@pytest.mark.peer
class TestInjection:
    """RFC 4515 section 3 (filters) and RFC 4514 section 2.4 (DNs): values are escaped."""

    @pytest.mark.parametrize("user", ["st*r", "pa(re)n", "back\\slash", "comma,plus+"])
    @pytest_twisted.ensureDeferred
    async def test_names_with_special_characters_log_in(self, conf: Path, user: str) -> None:
        assert await _login(_checker(conf), _credentials(user, HORSE)) == AuthenticatedUser(user)

    @pytest.mark.parametrize(
        "user",
        [
            "*",
            "s*",
            "a*",
            "*)(uid=*",
            "alice)(uid=*",
            "alice*",
            "al\\2a",
            "alice\x00",
            "*\x00",
            # Quotes and %: no meaning in a filter, and no variable either.
            "alice'",
            "' or '1'='1",
            "%u",
            "alice%",
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_filter_syntax_in_a_name_matches_nothing(self, conf: Path, user: str) -> None:
        refused = await _login(_checker(conf), _credentials(user, HORSE))
        assert isinstance(refused, UnauthorizedLogin)

    @pytest.mark.parametrize(
        "user",
        ["alice,ou=people", "alice+cn=alice", "x,uid=alice", "alice\x00", "#alice", "alice\\"],
    )
    @pytest_twisted.ensureDeferred
    async def test_dn_syntax_in_a_name_binds_as_nobody(
        self, tmp_path: Path, ldap_server: LdapServer, user: str
    ) -> None:
        conf = _write_conf(
            tmp_path / "bind.conf.ext",
            ldap_server,
            f"auth_bind = yes\nauth_bind_userdn = uid=%u,{PEOPLE}\n",
        )
        refused = await _login(_checker(conf), _credentials(user, HORSE))
        assert isinstance(refused, UnauthorizedLogin)

    def test_escaping(self) -> None:
        from pop3d.authdb.ldap import escape_filter_value

        assert escape_filter_value("*)(uid=*\\\x00") == "\\2a\\29\\28uid=\\2a\\5c\\00"
        assert escape_dn_value("a,b+c=d\\") == "a\\,b\\+c\\=d\\\\"


@pytest.mark.peer
class TestAuthBind:
    @pytest.fixture
    def lookup_conf(self, tmp_path: Path, ldap_server: LdapServer) -> Path:
        return _write_conf(tmp_path / "bind.conf.ext", ldap_server, "auth_bind = yes\n")

    @pytest.fixture
    def template_conf(self, tmp_path: Path, ldap_server: LdapServer) -> Path:
        return _write_conf(
            tmp_path / "template.conf.ext",
            ldap_server,
            f"auth_bind = yes\nauth_bind_userdn = uid=%u,{PEOPLE}\n",
        )

    @pytest.mark.parametrize("user", ["alice", "bob", "frank", "st*r", "back\\slash"])
    @pytest_twisted.ensureDeferred
    async def test_the_server_checks_the_password(self, lookup_conf: Path, user: str) -> None:
        checker = _checker(lookup_conf)
        password = USERS[user][1]
        assert await _login(checker, _credentials(user, password)) == AuthenticatedUser(user)
        refused = await _login(checker, _credentials(user, password + "x"))
        assert isinstance(refused, UnauthorizedLogin)

    @pytest.mark.parametrize("scheme", ["ssha", "sha", "smd5", "ssha512", "crypt"])
    @pytest_twisted.ensureDeferred
    async def test_slapd_reads_the_hashes_pop3d_makes(self, lookup_conf: Path, scheme: str) -> None:
        """The other direction: OpenLDAP's own password check accepts pop3d's hashes."""
        checker = _checker(lookup_conf)
        user = f"made-{scheme}"
        assert await _login(checker, _credentials(user, HORSE)) == AuthenticatedUser(user)

    @pytest_twisted.ensureDeferred
    async def test_dn_template(self, template_conf: Path) -> None:
        checker = _checker(template_conf)
        assert await _login(checker, _credentials("comma,plus+", HORSE)) == AuthenticatedUser(
            "comma,plus+"
        )
        assert isinstance(await _login(checker, _credentials("alice", "no")), UnauthorizedLogin)
        assert isinstance(await _login(checker, _credentials("ghost", HORSE)), UnauthorizedLogin)

    @pytest_twisted.ensureDeferred
    async def test_an_empty_password_is_not_an_anonymous_bind(
        self, lookup_conf: Path, template_conf: Path
    ) -> None:
        """RFC 4513 section 5.1.2: a name with no password is an unauthenticated bind."""
        for conf in (lookup_conf, template_conf):
            refused = await _login(_checker(conf), _credentials("alice", ""))
            assert isinstance(refused, UnauthorizedLogin)

    @pytest_twisted.ensureDeferred
    async def test_fields_and_rebind(self, lookup_conf: Path) -> None:
        """After a user's bind the connection is the service's again: userPassword is readable."""
        checker = _checker(lookup_conf)
        refused = await _login(checker, _credentials("mallory", HORSE))
        assert isinstance(refused, LoginRefused)
        for _ in range(3):
            assert await _login(checker, _credentials("alice", HORSE)) == AuthenticatedUser("alice")

            def whoami(connection: Any) -> Any:
                return connection.whoami_s()

            identity = await deferToThread(checker.connections.run, whoami)
            assert identity == f"dn:{SERVICE_DN}"

    def test_user_pass_only(self, lookup_conf: Path) -> None:
        assert _checker(lookup_conf).credentialInterfaces == (IUsernamePassword,)


@pytest.mark.peer
class TestUserDatabase:
    @pytest_twisted.ensureDeferred
    async def test_user_attrs(self, tmp_path: Path, ldap_server: LdapServer) -> None:
        conf = _write_conf(
            tmp_path / "userdb.conf.ext",
            ldap_server,
            "user_filter = (&(objectClass=posixAccount)(uid=%u))\n"
            "user_attrs = homeDirectory=home, mailLocation=mail, "
            "popLoginDelay=login_delay, popExpire=expire, uidNumber=uid\n",
        )
        checker = _checker(conf)
        assert IUserDatabase.providedBy(checker)
        settings = await checker.lookup("peggy", None)
        assert settings == UserSettings(
            home="/srv/peggy", mail="maildir:~/Mail", login_delay=300, expire_never=True
        )
        assert await checker.lookup("ghost", None) is None
        assert await checker.lookup("*", None) is None

    @pytest_twisted.ensureDeferred
    async def test_templates(self, tmp_path: Path, ldap_server: LdapServer) -> None:
        conf = _write_conf(
            tmp_path / "userdb.conf.ext",
            ldap_server,
            "user_attrs = =home=/var/vmail/%{ldap:uid}, =mail=maildir:~/%{ldap:roomNumber:Inbox}\n",
        )
        settings = await _checker(conf).lookup("alice", None)
        assert settings == UserSettings(home="/var/vmail/alice", mail="maildir:~/Inbox")


@pytest.mark.peer
class TestReload:
    @pytest_twisted.ensureDeferred
    async def test_sighup_reads_the_file_again(
        self, tmp_path: Path, ldap_server: LdapServer, logged: Logged
    ) -> None:
        conf = _write_conf(tmp_path / "c.conf.ext", ldap_server)
        checker = _checker(conf)
        assert IReloadable.providedBy(checker)
        assert await _login(checker, _credentials("alice", HORSE)) == AuthenticatedUser("alice")
        conf.write_text(conf.read_text().replace("(uid=%u)", "(cn=nobody-%u)"))
        await checker.reload()
        assert isinstance(await _login(checker, _credentials("alice", HORSE)), UnauthorizedLogin)
        good = conf.read_text()
        conf.write_text(good + "scope = everywhere\n")
        await checker.reload()
        assert f"keeping the previous {conf}: {conf}:" in "\n".join(logged.texts())
        assert isinstance(await _login(checker, _credentials("alice", HORSE)), UnauthorizedLogin)

    def test_the_file_is_read_in_the_thread_pool_and_logins_wait_for_it(
        self, tmp_path: Path, ldap_server: LdapServer, logged: Logged
    ) -> None:
        """
        SIGHUP's reading of the file is handed to the thread pool, not done
        on the reactor thread; a login that arrives meanwhile waits for it,
        and searches with the new pass_filter.
        """
        conf = _write_conf(tmp_path / "c.conf.ext", ldap_server)
        good = conf.read_text()
        conf.write_text(good.replace("(uid=%u)", "(cn=nobody-%u)"))
        threads = ClockThreads(Clock())
        checker = LdapChecker(read_ldap_settings(str(conf)))
        checker.run_slow_work_in(threads.as_reactor)
        conf.write_text(good)
        checker.reload()
        assert threads.handed_over == 1
        assert "(cn=nobody-%u)" in checker.settings.pass_filter
        alice = checker.requestAvatarId(_credentials("alice", HORSE))
        assert not alice.called
        assert result_of(threads.clock, alice) == AuthenticatedUser("alice")
        assert logged.texts("reloaded") == [f"reloaded {conf}"]

    def test_a_broken_file_keeps_the_one_in_use_and_is_logged_once(
        self, tmp_path: Path, ldap_server: LdapServer, logged: Logged
    ) -> None:
        conf = _write_conf(tmp_path / "c.conf.ext", ldap_server)
        threads = ClockThreads(Clock())
        checker = LdapChecker(read_ldap_settings(str(conf)))
        checker.run_slow_work_in(threads.as_reactor)
        conf.write_text(conf.read_text() + "scope = everywhere\n")
        checker.reload()
        logins = [checker.requestAvatarId(_credentials("alice", HORSE)) for _ in range(2)]
        assert not any(login.called for login in logins)
        assert [result_of(threads.clock, login) for login in logins] == [
            AuthenticatedUser("alice"),
            AuthenticatedUser("alice"),
        ]
        [kept] = logged.texts("keeping")
        assert kept.startswith(f"keeping the previous {conf}: {conf}:8: ")


# -- outages ---------------------------------------------------------------------------


class _Silent(Protocol):
    """Accepts a connection and never answers."""


@pytest.mark.peer
class TestOutages:
    @pytest_twisted.ensureDeferred
    async def test_down_then_back(self, tmp_path: Path, logged: Logged) -> None:
        server = start_ldap_server(tmp_path / "slapd")
        try:
            server.add(_ldif("alice", USERS["alice"][0]))
            checker = _checker(_write_conf(tmp_path / "c.conf.ext", server))
            assert await _login(checker, _credentials("alice", HORSE)) == AuthenticatedUser("alice")
            server.stop()
            for _ in range(3):
                down = await _login(checker, _credentials("alice", HORSE))
                assert isinstance(down, AuthUnavailable)
                assert down.status().code is ResponseCode.SYS_TEMP
            server.start()
            # The pooled connection died with the server: a new one, by itself.
            back = await _login(checker, _credentials("alice", HORSE))
            assert back == AuthenticatedUser("alice"), logged.texts()
        finally:
            server.stop()
        messages = logged.texts("LDAP server")
        assert len(messages) == 2, messages
        assert messages[0].startswith(f"LDAP server {server.uri} unavailable: Can't contact")
        assert messages[1] == f"LDAP server {server.uri} available again"
        assert not any(HORSE in text for text in logged.texts())

    @pytest_twisted.ensureDeferred
    async def test_a_server_that_does_not_answer(self, tmp_path: Path, logged: Logged) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        try:
            uri = f"ldap://127.0.0.1:{port.getHost().port}"
            conf = tmp_path / "slow.conf.ext"
            conf.write_text(f"uris = {uri}\nbase = {PEOPLE}\n")
            checker = _checker(conf, timeout=0.5)
            slow = await _login(checker, _credentials("alice", HORSE))
            assert isinstance(slow, AuthUnavailable)
            slow = await _login(checker, _credentials("alice", HORSE))
            assert isinstance(slow, AuthUnavailable)
        finally:
            await port.stopListening()
        assert len(logged.texts("LDAP server")) == 1

    @pytest_twisted.ensureDeferred
    async def test_a_wrong_service_password_is_an_outage(
        self, tmp_path: Path, ldap_server: LdapServer
    ) -> None:
        conf = _write_conf(tmp_path / "c.conf.ext", ldap_server)
        conf.write_text(conf.read_text().replace(SERVICE_PASSWORD, "wrong"))
        refused = await _login(_checker(conf), _credentials("alice", HORSE))
        assert isinstance(refused, AuthUnavailable)


@pytest.mark.peer
class TestStartTLS:
    @pytest_twisted.ensureDeferred
    async def test_starttls_with_the_ca(self, tmp_path: Path, ldap_server: LdapServer) -> None:
        conf = _write_conf(
            tmp_path / "tls.conf.ext",
            ldap_server,
            f"tls = yes\ntls_ca_cert_file = {ldap_server.ca_file}\ntls_require_cert = demand\n",
        )
        assert await _login(_checker(conf), _credentials("alice", HORSE)) == AuthenticatedUser(
            "alice"
        )

    @pytest_twisted.ensureDeferred
    async def test_an_unknown_certificate_is_refused(
        self, tmp_path: Path, ldap_server: LdapServer
    ) -> None:
        other = tmp_path / "other"
        other.mkdir()
        from .test_endpoints import _self_signed

        _, other_ca = _self_signed(other)
        conf = _write_conf(
            tmp_path / "tls.conf.ext",
            ldap_server,
            f"tls = yes\ntls_ca_cert_file = {other_ca}\ntls_require_cert = demand\n",
        )
        refused = await _login(_checker(conf), _credentials("alice", HORSE))
        assert isinstance(refused, AuthUnavailable)


class TestFactory:
    def test_a_bad_file_is_a_usage_error_naming_file_and_line(self, tmp_path: Path) -> None:
        from twisted.python import usage

        from pop3d.tap import Options

        path = tmp_path / "bad.conf.ext"
        path.write_text("uris = ldap://127.0.0.1\nbase = o=x\nscope = everything\n")
        with pytest.raises(usage.UsageError, match=rf"--auth ldap: {path}:3: 'everything'"):
            Options().parseOptions(["--auth", f"ldap:{path}"])

    @pytest.mark.process
    def test_without_python_ldap_the_usage_error_names_the_extra(self, tmp_path: Path) -> None:
        path = tmp_path / "c.conf.ext"
        path.write_text("uris = ldap://127.0.0.1\nbase = o=x\n")
        code = (
            "import sys; sys.modules['ldap'] = None\n"
            "from twisted.python import usage\n"
            "from pop3d.tap import Options\n"
            "try:\n"
            f"    Options().parseOptions(['--auth', 'ldap:{path}'])\n"
            "except usage.UsageError as error:\n"
            "    print(error)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stdout == (
            "--auth ldap: python-ldap is not installed: pip install 'pop3d[ldap]'\n"
        )

    def test_needs_a_path(self) -> None:
        with pytest.raises(ValueError, match="ldap needs a path"):
            LdapCheckerFactory().generateChecker("")

    def test_run_slow_work_in_first(self, tmp_path: Path) -> None:
        path = tmp_path / "c.conf.ext"
        path.write_text("uris = ldap://127.0.0.1:1\nbase = o=x\n")
        checker = LdapCheckerFactory().generateChecker(str(path))
        failed: list[Any] = []
        result: Deferred[Any] = checker.requestAvatarId(_credentials("a", "b"))
        result.addErrback(failed.append)
        assert failed and "run_slow_work_in" in str(failed[0].value)
