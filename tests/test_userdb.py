"""
What a user database says besides "the password is right", as the client
and the files see it: Dovecot's ``allow_nets``, ``nologin``/``reason``, a
database that cannot answer, per-user mail locations (``home``, ``mail``),
and per-user LOGIN-DELAY and EXPIRE (RFC 2449 sections 6.5 and 6.7, with
the "USER" token).  The checker here is a stand-in for the SQL, LDAP and
OAuth2 ones: it speaks the same contract (`pop3d.userdb`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from zope.interface import implementer

from pop3d.errors import (
    AuthUnavailable,
    LoginDelayed,
    LoginRefused,
    MaildropLocked,
    MaildropUnavailable,
)
from pop3d.factory import POP3Factory
from pop3d.logindelay import LoginDelayRealm
from pop3d.metrics import Metrics, TimingRealm
from pop3d.realm import MaildropRealm, user_mail_location
from pop3d.session import SessionPolicy
from pop3d.stores.interfaces import MailLocationError
from pop3d.stores.locations import MailLocations, installed_mail_locations
from pop3d.testing import MemoryLoginHistory, MemoryStore, deliver_to_maildir
from pop3d.throttle import TrustedNetworks
from pop3d.userdb import (
    AuthenticatedUser,
    IUserDatabase,
    LoginContext,
    UserSettings,
    login_context_of,
    parse_allow_nets,
)

from .conftest import Logged, Wire

AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"
BYE = b"+OK bye\r\n"


@implementer(ICredentialsChecker, IUserDatabase)
class UserDatabase:
    """A database of users: password, the avatar id it answers with, userdb settings."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.passwords: dict[bytes, bytes] = {b"alice": b"wonderland", b"bob": b"builder"}
        self.avatars: dict[bytes, Any] = {}
        self.settings: dict[str, UserSettings | None] = {}
        self.refusals: dict[bytes, Exception] = {}
        self.contexts: list[LoginContext | None] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        self.contexts.append(login_context_of(credentials))
        if self.passwords.get(credentials.username) != credentials.password:
            return fail(UnauthorizedLogin())
        if credentials.username in self.refusals:
            return fail(self.refusals[credentials.username])
        return succeed(self.avatars.get(credentials.username, credentials.username))

    def lookup(self, user: str, context: LoginContext | None) -> Deferred[UserSettings | None]:
        return succeed(self.settings.get(user, UserSettings()))


@pytest.fixture
def database() -> UserDatabase:
    return UserDatabase()


def factory(
    realm: Any, database: UserDatabase, clock: Clock, policy: SessionPolicy | None = None
) -> POP3Factory:
    return POP3Factory(
        Portal(realm, [database]),
        clock=clock,
        hostname="pop.example.test",
        policy=replace(policy or SessionPolicy(per_user=True), allow_plaintext_auth=True),
        login_failure_delay=0,
    )


def peer(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class TestAllowNets:
    """Dovecot's allow_nets: the password is right, the network is not."""

    def test_a_login_from_another_network_is_a_failed_login(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.avatars[b"alice"] = AuthenticatedUser(
            "alice", allowed_networks=parse_allow_nets("192.0.2.0/24, ::1")
        )
        server = factory(MaildropRealm(store, userdb=database), database, clock)
        outside = Wire(server, peer("198.51.100.9"))
        assert outside.login() == AUTH_FAILED
        assert not store.is_locked("alice")
        inside = Wire(server, peer("192.0.2.7"))
        assert inside.login() == b"+OK maildrop has 0 messages (0 octets)\r\n"

    def test_with_metrics_the_realm_still_sees_where_the_login_comes_from(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.avatars[b"alice"] = AuthenticatedUser(
            "alice", allowed_networks=parse_allow_nets("192.0.2.0/24")
        )
        metrics = Metrics()
        server = POP3Factory(
            Portal(TimingRealm(MaildropRealm(store), clock), [database]),
            clock=clock,
            policy=SessionPolicy(allow_plaintext_auth=True),
            login_failure_delay=0,
            metrics=metrics,
        )
        assert Wire(server, peer("198.51.100.9")).login() == AUTH_FAILED
        inside = Wire(server, peer("192.0.2.7"))
        assert inside.login() == b"+OK maildrop has 0 messages (0 octets)\r\n"

    def test_the_checker_sees_where_the_login_comes_from(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        server = factory(MaildropRealm(store), database, clock)
        Wire(server, peer("192.0.2.7")).login()
        assert database.contexts == [
            LoginContext(remote_ip="192.0.2.7", local_ip="10.0.0.1", secured=False)
        ]

    @pytest.mark.parametrize(
        "host,inside",
        [
            ("192.0.2.7", True),
            ("198.51.100.9", False),
            # An IPv4 client of a dual-stack IPv6 socket.
            ("::ffff:192.0.2.7", True),
            ("::1", True),
            ("fe80::1%eth0", True),
            ("fe80::2%eth0", False),
            ("/run/pop3d.sock", False),
            ("", False),
        ],
    )
    def test_allow_nets_reads_addresses_as_trusted_networks_do(
        self, host: str, inside: bool
    ) -> None:
        networks = parse_allow_nets("192.0.2.0/24, ::1, fe80::1")
        user = AuthenticatedUser("alice", allowed_networks=networks)
        assert user.allows(LoginContext(host, None, False)) is inside
        assert (host in TrustedNetworks(networks)) is inside

    def test_a_list_with_a_bad_entry_is_an_error(self) -> None:
        with pytest.raises(ValueError, match=r"'192\.0\.2\.300' is not an address or network"):
            parse_allow_nets("192.0.2.1,192.0.2.300")


class TestCanonicalName:
    def test_the_maildrop_and_the_logs_are_the_databases_name(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, logged: Logged
    ) -> None:
        database.passwords[b"Alice"] = b"wonderland"
        database.avatars[b"Alice"] = AuthenticatedUser("alice@example.org")
        store.deliver("alice@example.org", b"hello\r\n")
        wire = Wire(factory(MaildropRealm(store), database, clock))
        reply = wire.login(b"Alice", b"wonderland")
        assert reply == b"+OK maildrop has 1 messages (7 octets)\r\n"
        logins = [e["summary"] for e in logged.events if "] login: " in formatEvent(e)]
        assert len(logins) == 1
        assert logins[0].endswith('user="alice@example.org"')


class TestRefusals:
    @pytest.mark.parametrize(
        ("error", "reply", "log_line"),
        [
            (UnauthorizedLogin(), AUTH_FAILED, 'reason=credentials user="alice"'),
            (
                MaildropLocked(),
                b"-ERR [IN-USE] maildrop is locked by another session\r\n",
                'reason=in-use user="alice"',
            ),
            (
                MaildropUnavailable("no such directory", permanent=True),
                b"-ERR [SYS/PERM] no such directory\r\n",
                'reason=unavailable user="alice" detail="no such directory"',
            ),
            (
                LoginRefused("account suspended"),
                b"-ERR [AUTH] account suspended\r\n",
                'reason=refused user="alice" detail="account suspended"',
            ),
            (
                AuthUnavailable(),
                b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n",
                'reason=auth-unavailable user="alice" '
                'detail="authentication service unavailable, try again later"',
            ),
            (
                LoginDelayed(300, 120),
                b"-ERR [LOGIN-DELAY] last login less than 300 seconds ago, "
                b"try again in 120 seconds\r\n",
                'reason=login-delay user="alice"',
            ),
        ],
    )
    def test_each_failed_login_its_reply_and_its_log_line(
        self,
        database: UserDatabase,
        clock: Clock,
        store: MemoryStore,
        error: Exception,
        reply: bytes,
        log_line: str,
        logged: Logged,
    ) -> None:
        """
        RFC 2449 section 8 (IN-USE, LOGIN-DELAY) and RFC 3206 section 4
        (AUTH, SYS/TEMP, SYS/PERM): each typed failure its response code and
        text; the log line fail2ban reads says which it was.
        """
        database.refusals[b"alice"] = error
        answer = Wire(factory(MaildropRealm(store), database, clock)).login()
        assert answer == reply
        [line] = [e["summary"] for e in logged.events if "login failed:" in e.get("log_format", "")]
        assert line.partition(" method=USER ")[2] == log_line

    @pytest.mark.parametrize(
        "error", [UnauthorizedLogin(), LoginRefused(), LoginRefused("")], ids=repr
    )
    def test_a_refusal_without_reason_waits_and_counts_as_a_wrong_password(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, error: Exception
    ) -> None:
        """
        A nologin user without a reason is answered as a wrong password
        (Dovecot's "Authentication failed."): as late as one too, and it
        counts towards the failed-login limit, or an instant answer would say
        that the guessed password was right.
        """
        database.refusals[b"alice"] = error
        policy = replace(SessionPolicy(per_user=True), allow_plaintext_auth=True)
        pop3 = POP3Factory(
            Portal(MaildropRealm(store), [database]),
            clock=clock,
            hostname="pop.example.test",
            policy=policy,
            login_failure_delay=2.0,
        )
        wire = Wire(pop3)
        assert wire.login() == b""  # not yet
        clock.advance(1.9)
        assert wire.take() == b""
        clock.advance(0.1)
        assert wire.take() == AUTH_FAILED
        for _ in range(policy.max_failed_logins - 1):
            wire.login()
            clock.advance(60)
            wire.take()
        assert wire.closed  # hung up after the limit, as for wrong passwords

    def test_nologin_gets_its_reason_with_auth(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.refusals[b"alice"] = LoginRefused("account suspended, call the helpdesk")
        wire = Wire(factory(MaildropRealm(store), database, clock))
        assert wire.login() == b"-ERR [AUTH] account suspended, call the helpdesk\r\n"
        # Still in AUTHORIZATION, and not closed: another user may log in.
        assert wire.login(b"bob", b"builder") == b"+OK maildrop has 0 messages (0 octets)\r\n"

    def test_a_database_that_cannot_answer_is_a_temporary_failure_without_traceback(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, logged: Logged
    ) -> None:
        database.refusals[b"alice"] = AuthUnavailable()
        wire = Wire(factory(MaildropRealm(store), database, clock))
        reply = wire.login()
        assert reply == b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n"
        assert not [event for event in logged.events if "log_failure" in event]
        lines = [event["summary"] for event in logged.events if "summary" in event]
        assert any("reason=auth-unavailable" in line for line in lines)

    def test_a_user_the_userdb_does_not_know_is_a_failed_login(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.settings["alice"] = None
        wire = Wire(factory(MaildropRealm(store, userdb=database), database, clock))
        assert wire.login() == AUTH_FAILED


def locations(tmp_path: Path) -> MailLocations:
    return MailLocations(
        installed_mail_locations(),
        {"lock-table": str(tmp_path / "locks")},
        None,  # type: ignore[arg-type]  # stores run their file work inline
        Clock(),
        default_template=str(tmp_path / "mail" / "{user}"),
    )


class TestPerUserMailLocation:
    def test_mail_and_home_from_the_userdb_name_the_maildir(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, tmp_path: Path
    ) -> None:
        home = tmp_path / "home" / "alice"
        deliver_to_maildir(str(home / "Maildir"), b"Subject: here\r\n\r\nhi\r\n")
        store.deliver("alice", b"Subject: not here\r\n\r\nno\r\n")
        database.settings["alice"] = UserSettings(home=str(home), mail="maildir:~/Maildir")
        realm = MaildropRealm(store, userdb=database, locations=locations(tmp_path))
        wire = Wire(factory(realm, database, clock))
        assert wire.login() == b"+OK maildrop has 1 messages (21 octets)\r\n"
        assert (
            wire.command(b"TOP 1 0") == b"+OK top of message follows\r\nSubject: here\r\n\r\n.\r\n"
        )

    def test_prefetched_settings_need_no_userdb(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, tmp_path: Path
    ) -> None:
        deliver_to_maildir(str(tmp_path / "vmail" / "example.org" / "alice"), b"x\r\n")
        database.avatars[b"alice"] = AuthenticatedUser(
            "alice@example.org",
            settings=UserSettings(mail=f"maildir:{tmp_path}/vmail/%d/%n:INDEX=/var/index/%u"),
        )
        realm = MaildropRealm(store, locations=locations(tmp_path))
        wire = Wire(factory(realm, database, clock))
        assert wire.login() == b"+OK maildrop has 1 messages (3 octets)\r\n"

    @pytest.mark.parametrize("server_options", [{}, {"nfs-locks": True}])
    def test_an_mbox_from_the_userdb_is_served_whatever_the_maildir_options(
        self,
        database: UserDatabase,
        clock: Clock,
        store: MemoryStore,
        tmp_path: Path,
        server_options: dict[str, object],
    ) -> None:
        """
        The server's lock table (or --nfs-locks) is for Maildirs; a user
        whose mail is an mbox is served from it all the same.
        """
        mbox = tmp_path / "mbox" / "alice"
        mbox.parent.mkdir()
        mbox.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 1970\nSubject: s\n\nhi\n")
        database.settings["alice"] = UserSettings(mail=f"mbox:{mbox}")
        mail_locations = MailLocations(
            installed_mail_locations(),
            server_options,
            None,  # type: ignore[arg-type]  # stores run their file work inline
            Clock(),
            default_template=str(tmp_path / "mail" / "{user}"),
        )
        realm = MaildropRealm(store, userdb=database, locations=mail_locations)
        wire = Wire(factory(realm, database, clock))
        assert wire.login() == b"+OK maildrop has 1 messages (18 octets)\r\n"

    def test_a_broken_mail_location_is_a_permanent_failure(
        self, database: UserDatabase, clock: Clock, store: MemoryStore, tmp_path: Path
    ) -> None:
        database.settings["alice"] = UserSettings(mail="imap:whatever")
        realm = MaildropRealm(store, userdb=database, locations=locations(tmp_path))
        wire = Wire(factory(realm, database, clock))
        assert (
            wire.login() == b"-ERR [SYS/PERM] the mail location of this user is misconfigured\r\n"
        )

    @pytest.mark.parametrize("location", ["imap:whatever", "maildir"])
    def test_a_location_of_no_installed_kind_names_the_installed_ones(
        self, tmp_path: Path, location: str
    ) -> None:
        """As --mail-location does (test_tap): the same words, found the same way."""
        with pytest.raises(MailLocationError) as refused:
            locations(tmp_path)(location)
        assert str(refused.value) == (
            f"{location!r}: expected SCHEME:ARGUMENT, SCHEME one of the installed stores: "
            "maildir, mbox"
        )

    @pytest.mark.parametrize(
        ("mail", "home", "location"),
        [
            ("maildir:~/Maildir", "/home/alice", "maildir:/home/alice/Maildir"),
            ("maildir:~/Maildir:LAYOUT=fs", "/home/alice/", "maildir:/home/alice/Maildir"),
            ("mbox:/var/mail/%Ln", None, "mbox:/var/mail/alice"),
            ("maildir:/srv/%d/%n", None, "maildir:/srv/example.org/Alice"),
        ],
    )
    def test_dovecot_mail_fields_become_mail_locations(
        self, mail: str, home: str | None, location: str
    ) -> None:
        assert user_mail_location(mail, "Alice@example.org", home) == location

    def test_a_tilde_without_a_home_is_an_error(self) -> None:
        with pytest.raises(MailLocationError, match="the user has no home"):
            user_mail_location("maildir:~/Maildir", "alice", None)


def capabilities(wire: Wire) -> list[bytes]:
    return [
        line
        for line in wire.command(b"CAPA").split(b"\r\n")
        if line.startswith((b"EXPIRE", b"LOGIN-DELAY"))
    ]


class TestPerUserPolicies:
    """RFC 2449 sections 6.5 and 6.7: values that differ per user."""

    POLICY = SessionPolicy(login_delay=600, expire_days=30, per_user=True)

    def test_capa_announces_the_bounds_with_user_then_the_users_own(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        # Section 6.5: "the largest value which could be set for any user"
        # and section 6.7: "the smallest value", followed by "USER"; "the
        # more accurate value in TRANSACTION state".
        database.settings["alice"] = UserSettings(login_delay=60, expire_never=True)
        wire = Wire(factory(MaildropRealm(store, userdb=database), database, clock, self.POLICY))
        assert capabilities(wire) == [b"EXPIRE 30 USER", b"LOGIN-DELAY 600 USER"]
        wire.login()
        assert capabilities(wire) == [b"EXPIRE NEVER", b"LOGIN-DELAY 60"]

    def test_a_user_without_own_values_gets_the_servers(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        wire = Wire(factory(MaildropRealm(store, userdb=database), database, clock, self.POLICY))
        wire.login()
        assert capabilities(wire) == [b"EXPIRE 30", b"LOGIN-DELAY 600"]

    def test_own_values_stay_within_what_was_announced(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.settings["alice"] = UserSettings(login_delay=3600, expire_days=1)
        wire = Wire(factory(MaildropRealm(store, userdb=database), database, clock, self.POLICY))
        wire.login()
        assert capabilities(wire) == [b"EXPIRE 30", b"LOGIN-DELAY 600"]

    def test_one_server_for_all_announces_no_user_token(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        policy = SessionPolicy(login_delay=600, expire_days=30)
        wire = Wire(factory(MaildropRealm(store), database, clock, policy))
        assert capabilities(wire) == [b"EXPIRE 30", b"LOGIN-DELAY 600"]

    def test_a_users_shorter_login_delay_is_enforced(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        database.settings["alice"] = UserSettings(login_delay=60)
        realm = LoginDelayRealm(
            MaildropRealm(store, userdb=database),
            MemoryLoginHistory(),
            delay=600,
            clock=clock,
            per_user=True,
        )
        server = factory(realm, database, clock, self.POLICY)
        for name, password in ((b"alice", b"wonderland"), (b"bob", b"builder")):
            first = Wire(server)
            first.login(name, password)
            assert first.command(b"QUIT") == BYE
        clock.advance(61)
        assert Wire(server).login() == b"+OK maildrop has 0 messages (0 octets)\r\n"
        assert Wire(server).login(b"bob", b"builder") == (
            b"-ERR [LOGIN-DELAY] last login less than 600 seconds ago, try again in 539 seconds\r\n"
        )

    def test_a_users_expire_never_keeps_what_expire_0_would_delete(
        self, database: UserDatabase, clock: Clock, store: MemoryStore
    ) -> None:
        store.deliver("alice", b"one\r\n")
        store.deliver("bob", b"two\r\n")
        database.settings["alice"] = UserSettings(expire_never=True)
        policy = SessionPolicy(expire_days=0, per_user=True)
        server = factory(MaildropRealm(store, userdb=database), database, clock, policy)
        for name, password in ((b"alice", b"wonderland"), (b"bob", b"builder")):
            wire = Wire(server)
            wire.login(name, password)
            wire.command(b"RETR 1")
            assert wire.command(b"QUIT") == BYE
        assert Wire(server).login() == b"+OK maildrop has 1 messages (5 octets)\r\n"
        assert Wire(server).login(b"bob", b"builder") == (
            b"+OK maildrop has 0 messages (0 octets)\r\n"
        )


class TestUserSettings:
    def test_fields_by_dovecots_names(self) -> None:
        fields: Mapping[str, str | None] = {
            "HOME": "/home/a",
            "mail": "maildir:~/M",
            "login_delay": "60",
            "expire": "never",
            "uid": "1000",
            "quota_rule": None,
        }
        assert UserSettings.from_fields(fields, "sql") == UserSettings(
            home="/home/a", mail="maildir:~/M", login_delay=60, expire_never=True
        )

    def test_a_bad_number_names_the_field(self) -> None:
        with pytest.raises(ValueError, match="sql: login_delay 'soon' is not a whole number"):
            UserSettings.from_fields({"login_delay": "soon"}, "sql")
