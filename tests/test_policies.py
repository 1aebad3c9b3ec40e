"""
RFC 2449 policies that are enforced, not only announced: LOGIN-DELAY
(section 6.5, response code of section 8.1.1) and EXPIRE (section 6.7).

Protocol tests drive bytes through a `Wire` with a Clock and compare them
with literal bytes; the history and the Maildir state are the real files.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.interfaces import ILoginHistory
from pop3d.logindelay import LoginDelayRealm, LoginHistoryFile, default_login_history
from pop3d.realm import MaildropRealm
from pop3d.session import SessionPolicy
from pop3d.tap import Options
from pop3d.testing import MemoryLoginHistory, MemoryStore

from .conftest import USERS, Wire, start_service, write_passwd

DELAY = 300

AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"
SYS_TEMP = b"-ERR [SYS/TEMP] internal server error, try again later\r\n"
LOGGED_IN_EMPTY = b"+OK maildrop has 0 messages (0 octets)\r\n"
BYE = b"+OK bye\r\n"


def refused(remaining: int) -> bytes:
    return (
        b"-ERR [LOGIN-DELAY] last login less than 300 seconds ago, try again in %d seconds\r\n"
        % remaining
    )


def delayed_portal(realm: IRealm) -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for name, password in USERS.items():
        checker.addUser(name.encode(), password.encode())
    return Portal(realm, [checker])


@pytest.fixture
def history() -> MemoryLoginHistory:
    return MemoryLoginHistory()


@pytest.fixture
def delayed(clock: Clock, store: MemoryStore, history: ILoginHistory) -> Callable[[], POP3Factory]:
    """Factories of a server with a 300-second login delay over ``history``."""

    def make() -> POP3Factory:
        realm = LoginDelayRealm(MaildropRealm(store), history, delay=DELAY, clock=clock)
        return POP3Factory(
            delayed_portal(realm),
            clock=clock,
            hostname="pop.example.test",
            policy=SessionPolicy(login_delay=DELAY),
            login_failure_delay=0,
        )

    return make


def session(factory: POP3Factory, password: bytes = b"wonderland") -> tuple[Wire, bytes]:
    wire = Wire(factory)
    return wire, wire.login(b"alice", password)


class TestLoginDelay:
    """RFC 2449 section 6.5 and section 8.1.1."""

    def test_a_login_within_the_delay_is_refused_after_it_accepted(
        self, delayed: Callable[[], POP3Factory], clock: Clock, store: MemoryStore
    ) -> None:
        factory = delayed()
        first, reply = session(factory)
        assert reply == LOGGED_IN_EMPTY
        assert first.command(b"QUIT") == BYE
        clock.advance(100)
        second, reply = session(factory)
        assert reply == refused(200)
        # Refused, the session stays in AUTHORIZATION and holds nothing.
        assert not store.is_locked("alice")
        assert second.command(b"STAT") == b"-ERR command not valid in this state\r\n"
        assert not second.closed
        clock.advance(200)
        assert second.login() == LOGGED_IN_EMPTY

    def test_a_refused_login_does_not_restart_the_wait(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        clock.advance(299)
        assert session(factory)[1] == refused(1)
        clock.advance(1)
        assert session(factory)[1] == LOGGED_IN_EMPTY

    def test_the_delay_counts_from_the_last_login_not_the_last_logout(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        factory = delayed()
        first, _ = session(factory)
        clock.advance(250)
        first.command(b"QUIT")
        clock.advance(60)
        assert session(factory)[1] == LOGGED_IN_EMPTY

    def test_a_wrong_password_within_the_delay_gets_auth(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        clock.advance(10)
        assert session(factory, b"not the password")[1] == AUTH_FAILED

    def test_an_unknown_user_is_answered_as_a_wrong_password(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        clock.advance(10)
        assert Wire(factory).login(b"nobody", b"wonderland") == AUTH_FAILED

    def test_users_wait_each_for_their_own_logins(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        assert Wire(factory).login(b"bob", b"builder") == LOGGED_IN_EMPTY

    def test_apop_and_sasl_are_held_back_too(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        """Section 6.5: USER PASS APOP AUTH are the commands affected."""
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        clock.advance(1)
        plain = base64.b64encode(b"\0alice\0wonderland")
        assert Wire(factory).command(b"AUTH PLAIN " + plain) == refused(299)
        wire = Wire(factory)
        challenge = wire.greeting.split()[-1]
        digest = hashlib.md5(challenge + b"wonderland").hexdigest().encode()
        assert wire.command(b"APOP alice " + digest) == refused(299)

    def test_a_refusal_is_not_a_failed_login(
        self, delayed: Callable[[], POP3Factory], clock: Clock
    ) -> None:
        """Three failed logins close a connection; refusals do not count."""
        factory = delayed()
        session(factory)[0].command(b"QUIT")
        wire = Wire(factory)
        for _ in range(4):
            assert wire.login() == refused(DELAY)
        assert not wire.closed

    def test_capa_announces_the_delay_in_both_states(
        self, delayed: Callable[[], POP3Factory]
    ) -> None:
        """
        Section 6.5: one delay for every user, so the same value in both
        states and no "USER" token.
        """
        wire = Wire(delayed())
        assert wire.command(b"CAPA") == (
            b"+OK capability list follows\r\n"
            b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"EXPIRE NEVER\r\nLOGIN-DELAY 300\r\nSASL CRAM-MD5 PLAIN LOGIN\r\n.\r\n"
        )
        wire.login()
        assert wire.command(b"CAPA") == (
            b"+OK capability list follows\r\n"
            b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"EXPIRE NEVER\r\nLOGIN-DELAY 300\r\nSASL CRAM-MD5 PLAIN LOGIN\r\n"
            b"IMPLEMENTATION pop3d\r\n.\r\n"
        )

    def test_no_login_delay_is_announced_by_default(self, wire: Wire) -> None:
        assert b"LOGIN-DELAY" not in wire.command(b"CAPA")

    def test_a_login_that_loses_a_race_releases_its_maildrop(
        self, clock: Clock, store: MemoryStore
    ) -> None:
        """
        Another process recorded a login between this one's look-up and its
        record: refused, and the maildrop it opened is closed again.
        """

        @implementer(ILoginHistory)
        class Racing:
            def last_login(self, user: str) -> Deferred[float | None]:
                return succeed(None)

            def record_login(self, user: str, now: float, delay: float) -> Deferred[float | None]:
                return succeed(now)

        realm = LoginDelayRealm(MaildropRealm(store), Racing(), delay=DELAY, clock=clock)
        factory = POP3Factory(delayed_portal(realm), clock=clock, login_failure_delay=0)
        assert session(factory)[1] == refused(DELAY)
        assert not store.is_locked("alice")

    def test_a_broken_history_refuses_and_releases(self, clock: Clock, store: MemoryStore) -> None:
        @implementer(ILoginHistory)
        class Broken:
            def last_login(self, user: str) -> Deferred[float | None]:
                return succeed(None)

            def record_login(self, user: str, now: float, delay: float) -> Deferred[float | None]:
                return fail(OSError("disk full"))

        realm = LoginDelayRealm(MaildropRealm(store), Broken(), delay=DELAY, clock=clock)
        factory = POP3Factory(delayed_portal(realm), clock=clock, login_failure_delay=0)
        assert session(factory)[1] == SYS_TEMP
        assert not store.is_locked("alice")

    def test_a_clock_set_back_holds_no_one_out(
        self, delayed: Callable[[], POP3Factory], clock: Clock, history: MemoryLoginHistory
    ) -> None:
        history.logins["alice"] = 10_000.0
        assert session(delayed())[1] == LOGGED_IN_EMPTY


class TestLoginHistoryFile:
    """The SQLite history: across restarts and processes."""

    def test_a_login_is_refused_by_a_restarted_server(
        self, tmp_path: Path, clock: Clock, store: MemoryStore
    ) -> None:
        path = str(tmp_path / "logins")

        def server() -> POP3Factory:
            history = LoginHistoryFile(path)
            realm = LoginDelayRealm(MaildropRealm(store), history, delay=DELAY, clock=clock)
            return POP3Factory(delayed_portal(realm), clock=clock, login_failure_delay=0)

        first, reply = session(server())
        assert reply == LOGGED_IN_EMPTY
        first.command(b"QUIT")
        clock.advance(30)
        assert session(server())[1] == refused(270)

    def test_record_is_atomic_across_instances(self, tmp_path: Path) -> None:
        one = LoginHistoryFile(str(tmp_path / "logins"))
        two = LoginHistoryFile(str(tmp_path / "logins"))
        assert one.record_login("alice", 1000.0, DELAY).result is None
        assert two.record_login("alice", 1001.0, DELAY).result == 1000.0
        assert two.last_login("alice").result == 1000.0
        assert two.record_login("alice", 1300.0, DELAY).result is None
        assert one.last_login("alice").result == 1300.0
        assert one.last_login("bob").result is None

    def test_another_process_sees_the_login(self, tmp_path: Path) -> None:
        """What the --workers processes share: a login recorded by another process."""
        path = str(tmp_path / "logins")
        LoginHistoryFile(path).record_login("alice", 5000.0, DELAY)
        script = (
            "import sys\n"
            "from pop3d.logindelay import LoginHistoryFile\n"
            "history = LoginHistoryFile(sys.argv[1])\n"
            "print(history.record_login('alice', 5100.0, 300).result)\n"
            "print(history.record_login('bob', 5100.0, 300).result)\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", script, path], capture_output=True, check=True, text=True
        ).stdout
        assert output == "5000.0\nNone\n"
        assert LoginHistoryFile(path).last_login("bob").result == 5100.0

    def test_a_new_file_is_private(self, tmp_path: Path) -> None:
        path = tmp_path / "logins"
        LoginHistoryFile(str(path)).check()
        assert path.stat().st_mode & 0o777 == 0o600

    def test_a_symbolic_link_is_not_followed(self, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        (tmp_path / "logins").symlink_to(target)
        with pytest.raises(OSError):
            LoginHistoryFile(str(tmp_path / "logins")).check()
        assert not target.exists()


class TestOptions:
    @pytest.fixture
    def passwd(self, tmp_path: Path) -> Path:
        return write_passwd(tmp_path / "passwd", USERS)

    def parse(self, passwd: Path, tmp_path: Path, *extra: str) -> Options:
        options = Options()
        options.parseOptions(
            [
                "--mail-location",
                f"maildir:{tmp_path}/mail/{{user}}",
                "--auth",
                f"passwd-file:{passwd}",
                *extra,
            ]
        )
        return options

    def test_no_delay_by_default(self, passwd: Path, tmp_path: Path) -> None:
        options = self.parse(passwd, tmp_path)
        assert options["login-delay"] is None
        assert options["login-history"] is None

    def test_the_history_is_beside_the_lock_table_by_default(
        self, passwd: Path, tmp_path: Path
    ) -> None:
        (tmp_path / "mail").mkdir()
        options = self.parse(passwd, tmp_path, "--login-delay", "300")
        assert options["login-delay"] == 300
        assert options["login-history"] == f"{tmp_path}/mail/.pop3d-logins"
        assert (tmp_path / "mail" / ".pop3d-logins").is_file()
        assert default_login_history("/srv/mail/{domain}/{local}") == "/srv/mail/.pop3d-logins"

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--login-delay", "five"], "--login-delay 'five'"),
            (["--login-delay", "-1"], "--login-delay '-1'"),
            (["--login-history", "/tmp/x"], "--login-history needs --login-delay"),
            (
                ["--login-delay", "60", "--login-history", "/nonexistent/dir/logins"],
                "--login-history /nonexistent/dir/logins",
            ),
        ],
    )
    def test_bad_values_name_the_option(
        self, passwd: Path, tmp_path: Path, extra: list[str], message: str
    ) -> None:
        with pytest.raises(usage.UsageError) as raised:
            self.parse(passwd, tmp_path, *extra)
        assert str(raised.value).startswith(message)


@pytest_twisted.ensureDeferred
async def test_poplib_is_refused_a_second_login(tmp_path: Path) -> None:
    """End to end, the real reactor and thread pool: RFC 2449 section 8.1.1."""
    history = tmp_path / "logins"
    server = await start_service(
        tmp_path,
        ["tcp:0:interface=127.0.0.1"],
        ["--login-delay", "3600", "--login-history", str(history)],
    )

    def two_logins() -> tuple[bytes, bytes]:
        client = poplib.POP3(server.host, server.port, timeout=30)
        capabilities = client.capa()
        client.user("alice")
        client.pass_("wonderland")
        client.quit()
        again = poplib.POP3(server.host, server.port, timeout=30)
        again.user("alice")
        answer = b""
        try:
            again.pass_("wonderland")
        except poplib.error_proto as error:
            answer = error.args[0]
        again.quit()
        return capabilities["LOGIN-DELAY"][0].encode(), answer

    try:
        delay, answer = await deferToThread(two_logins)
    finally:
        await server.service.stopService()
    assert delay == b"3600"
    assert answer.startswith(b"-ERR [LOGIN-DELAY] last login less than 3600 seconds ago")
