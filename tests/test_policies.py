"""
RFC 2449 policies that are enforced, not only announced: LOGIN-DELAY
(section 6.5, response code of section 8.1.1) and EXPIRE (section 6.7).

Protocol tests drive bytes through a `Wire` with a Clock and compare them
with literal bytes; the history and the Maildir state are the real files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
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

from pop3d.errors import MaildropUnavailable
from pop3d.factory import POP3Factory
from pop3d.logindelay import ILoginHistory, LoginDelayRealm, LoginHistoryFile, default_login_history
from pop3d.realm import MaildropRealm
from pop3d.session import SessionPolicy
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    IRetrievalTimes,
)
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.posix import LockTable
from pop3d.tap import Options
from pop3d.testing import MemoryLoginHistory, MemoryStore, deliver_to_maildir

from .conftest import USERS, Wire, start_service, write_passwd
from .test_process import HOST, PATIENCE, Launch, pop3d_arguments
from .test_workers import WORKER_LISTENING, launch

__all__ = ["launch"]  # the fixture

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
            b"EXPIRE NEVER\r\nLOGIN-DELAY 300\r\nSASL CRAM-MD5 PLAIN LOGIN\r\n"
            b"UTF8 USER\r\nLANG\r\n.\r\n"
        )
        wire.login()
        assert wire.command(b"CAPA") == (
            b"+OK capability list follows\r\n"
            b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            b"EXPIRE NEVER\r\nLOGIN-DELAY 300\r\nSASL CRAM-MD5 PLAIN LOGIN\r\nUTF8 USER\r\nLANG\r\n"
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

    @pytest.mark.process
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

    @pytest.mark.process
    def test_processes_recording_at_once_admit_one_login(self, tmp_path: Path) -> None:
        """Three processes record a login of the same user at the same time: one wins."""
        path = str(tmp_path / "logins")
        script = (
            "import sys\n"
            "from pop3d.logindelay import LoginHistoryFile\n"
            "print(LoginHistoryFile(sys.argv[1]).record_login('alice', 7000.0, 300).result)\n"
        )
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", script, path], stdout=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        answers = sorted(racer.communicate()[0] for racer in racers)
        assert answers == ["7000.0\n"] * 2 + ["None\n"]

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


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    return write_passwd(tmp_path / "passwd", USERS)


def parse(passwd: Path, location: str, *extra: str) -> Options:
    """``twistd pop3d`` options over ``location`` and ``passwd``."""
    options = Options()
    options.parseOptions(["--mail-location", location, "--auth", f"passwd-file:{passwd}", *extra])
    return options


class TestOptions:
    def test_no_delay_by_default(self, passwd: Path, tmp_path: Path) -> None:
        options = parse(passwd, f"maildir:{tmp_path}/mail/{{user}}")
        assert options["login-delay"] is None
        assert options["login-history"] is None

    def test_the_history_is_beside_the_lock_table_by_default(
        self, passwd: Path, tmp_path: Path
    ) -> None:
        (tmp_path / "mail").mkdir()
        options = parse(passwd, f"maildir:{tmp_path}/mail/{{user}}", "--login-delay", "300")
        assert options["login-delay"] == 300
        assert options["login-history"] == f"{tmp_path}/mail/.pop3d-logins"
        # Made by the process that serves, not at start-up: twistd --uid
        # drops privileges after the options are parsed, and the serving
        # user must own the file.
        assert not (tmp_path / "mail" / ".pop3d-logins").exists()
        assert default_login_history("/srv/mail/{domain}/{local}") == "/srv/mail/.pop3d-logins"

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--login-delay", "five"], "--login-delay 'five'"),
            (["--login-delay", "-1"], "--login-delay '-1'"),
            (["--login-delay", "00", "--login-history", "/tmp/x"], "--login-history needs"),
            (["--login-history", "/tmp/x"], "--login-history needs --login-delay"),
            (
                ["--login-delay", "60", "--login-history", "/nonexistent/dir/logins"],
                "--login-history /nonexistent/dir/logins",
            ),
            (["--login-delay", "60", "--login-history", "/tmp"], "--login-history /tmp: "),
        ],
    )
    def test_bad_values_name_the_option(
        self, passwd: Path, tmp_path: Path, extra: list[str], message: str
    ) -> None:
        with pytest.raises(usage.UsageError) as raised:
            parse(passwd, f"maildir:{tmp_path}/mail/{{user}}", *extra)
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


# -- EXPIRE (RFC 2449 section 6.7) ----------------------------------------------

DAY = 86_400
MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n", b"Subject: three\n\nthird\n"]
LISTED_3 = b"+OK maildrop has 3 messages (72 octets)\r\n"


def capa(before: bytes, after: bytes = b"") -> tuple[bytes, bytes]:
    common = b"+OK capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\n"
    sasl = b"SASL CRAM-MD5 PLAIN LOGIN\r\nUTF8 USER\r\nLANG\r\n"
    return (
        common + b"AUTH-RESP-CODE\r\n" + before + sasl + b".\r\n",
        common + b"AUTH-RESP-CODE\r\n" + before + sasl + b"IMPLEMENTATION pop3d\r\n.\r\n",
    )


class Maildirs:
    """alice's real Maildir, served with a given EXPIRE policy on the Clock."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        self.maildir = root / "mail" / "alice"
        self.uniques = [deliver_to_maildir(str(self.maildir), m) for m in MESSAGES]

    def factory(self, days: int | None) -> POP3Factory:
        # A new store each time: what a restarted server reads.
        store = MaildirStore(
            f"{self.root}/mail/{{user}}", locks=LockTable(str(self.root / "locks"))
        )
        return POP3Factory(
            delayed_portal(MaildropRealm(store)),
            clock=self.clock,
            hostname="pop.example.test",
            policy=SessionPolicy(expire_days=days),
            login_failure_delay=0,
        )

    def present(self) -> list[int]:
        """Which of the three delivered messages are still on disk (1-based)."""
        names = {
            name.split(":")[0] for sub in ("new", "cur") for name in os.listdir(self.maildir / sub)
        }
        return [number for number, unique in enumerate(self.uniques, 1) if unique in names]


@pytest.fixture
def maildirs(tmp_path: Path, clock: Clock) -> Maildirs:
    return Maildirs(tmp_path, clock)


def retrieve(wire: Wire, number: int) -> None:
    assert wire.command(b"RETR %d" % number).startswith(b"+OK ")


class TestExpireZero:
    """EXPIRE 0: an implicit DELE of every message downloaded with RETR."""

    def test_retrieved_messages_are_deleted_at_quit(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(0))
        assert wire.login() == LISTED_3
        retrieve(wire, 1)
        assert (
            wire.command(b"TOP 2 0") == b"+OK top of message follows\r\nSubject: two\r\n\r\n.\r\n"
        )
        # Nothing is gone before UPDATE: still listed, still there.
        assert wire.command(b"STAT") == b"+OK 3 72\r\n"
        assert maildirs.present() == [1, 2, 3]
        assert wire.command(b"QUIT") == BYE
        assert maildirs.present() == [2, 3]

    def test_nothing_is_deleted_when_the_connection_drops(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(0))
        wire.login()
        retrieve(wire, 1)
        wire.disconnect()
        assert maildirs.present() == [1, 2, 3]

    def test_nothing_is_deleted_at_the_autologout(self, maildirs: Maildirs, clock: Clock) -> None:
        wire = Wire(maildirs.factory(0))
        wire.login()
        retrieve(wire, 2)
        clock.advance(600)
        assert wire.closed
        wire.disconnect()
        assert maildirs.present() == [1, 2, 3]

    def test_rset_does_not_undo_the_implicit_dele(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(0))
        wire.login()
        retrieve(wire, 3)
        wire.command(b"DELE 1")
        wire.command(b"RSET")
        assert wire.command(b"QUIT") == BYE
        assert maildirs.present() == [1, 2]

    def test_any_store_can_expire_at_once(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore
    ) -> None:
        for message in MESSAGES:
            store.deliver("alice", message)
        wire = Wire(make_factory(policy=SessionPolicy(expire_days=0)))
        wire.login()
        retrieve(wire, 2)
        assert wire.command(b"QUIT") == BYE
        assert store.messages("alice") == [MESSAGES[0], MESSAGES[2]]

    def test_a_message_whose_retr_failed_is_kept(self, clock: Clock, store: MemoryStore) -> None:
        """
        Section 6.7 deletes what was "downloaded with RETR": a RETR answered
        -ERR (the store could not read the message) downloaded nothing.
        """
        for message in MESSAGES:
            store.deliver("alice", message)
        portal = Portal(MaildropRealm(_UnreadableFirst(store)), [_alice_checker()])
        wire = Wire(
            POP3Factory(
                portal,
                clock=clock,
                hostname="pop.example.test",
                policy=SessionPolicy(expire_days=0),
                login_failure_delay=0,
            )
        )
        wire.login()
        assert wire.command(b"RETR 1") == b"-ERR [SYS/TEMP] cannot read message\r\n"
        retrieve(wire, 2)
        assert wire.command(b"QUIT") == BYE
        assert store.messages("alice") == [MESSAGES[0], MESSAGES[2]]

    def test_capa_says_expire_0_in_both_states(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(0))
        before, after = capa(b"EXPIRE 0\r\n")
        assert wire.command(b"CAPA") == before
        wire.login()
        assert wire.command(b"CAPA") == after


class TestExpireDays:
    """EXPIRE 5: deleted at a QUIT at least 5 days after the first RETR."""

    def test_deleted_at_a_quit_after_five_days(self, maildirs: Maildirs, clock: Clock) -> None:
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 1)
        assert wire.command(b"QUIT") == BYE
        assert maildirs.present() == [1, 2, 3]
        clock.advance(5 * DAY - 1)
        wire = Wire(maildirs.factory(5))
        wire.login()
        assert wire.command(b"QUIT") == BYE
        assert maildirs.present() == [1, 2, 3]
        clock.advance(1)
        wire = Wire(maildirs.factory(5))
        # Still listed in the session that finds it expired (RFC 1939
        # section 4: the snapshot does not change); gone after its QUIT.
        assert wire.login() == LISTED_3
        assert wire.command(b"RETR 1").startswith(b"+OK ")
        assert wire.command(b"QUIT") == BYE
        assert maildirs.present() == [2, 3]

    def test_the_first_retrieval_counts(self, maildirs: Maildirs, clock: Clock) -> None:
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 2)
        wire.command(b"QUIT")
        clock.advance(3 * DAY)
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 2)
        wire.command(b"QUIT")
        clock.advance(2 * DAY)
        wire = Wire(maildirs.factory(5))
        wire.login()
        wire.command(b"QUIT")
        assert maildirs.present() == [1, 3]

    def test_messages_never_retrieved_never_expire(self, maildirs: Maildirs, clock: Clock) -> None:
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 1)
        assert wire.command(b"TOP 2 10").startswith(b"+OK ")
        wire.command(b"QUIT")
        clock.advance(1000 * DAY)
        wire = Wire(maildirs.factory(5))
        wire.login()
        wire.command(b"QUIT")
        assert maildirs.present() == [2, 3]

    def test_a_session_without_quit_neither_records_nor_deletes(
        self, maildirs: Maildirs, clock: Clock
    ) -> None:
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 1)
        wire.disconnect()  # the retrieval is not recorded: only UPDATE writes
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 3)
        wire.command(b"QUIT")
        clock.advance(6 * DAY)
        wire = Wire(maildirs.factory(5))
        wire.login()
        wire.disconnect()
        assert maildirs.present() == [1, 2, 3]
        wire = Wire(maildirs.factory(5))
        wire.login()
        wire.command(b"QUIT")
        assert maildirs.present() == [1, 2]

    def test_the_times_are_kept_beside_the_sizes_and_forgotten_with_the_message(
        self, maildirs: Maildirs, clock: Clock
    ) -> None:
        clock.advance(1_000_000)
        wire = Wire(maildirs.factory(5))
        wire.login()
        retrieve(wire, 2)
        wire.command(b"QUIT")
        state = maildirs.maildir / "pop3d-retrieved"
        assert state.read_bytes() == b"pop3d-retrieved 1\n%s\t1000000\n" % (
            maildirs.uniques[1].encode()
        )
        clock.advance(5 * DAY)
        for _ in range(2):
            wire = Wire(maildirs.factory(5))
            wire.login()
            wire.command(b"QUIT")
        assert maildirs.present() == [1, 3]
        assert state.read_bytes() == b"pop3d-retrieved 1\n"

    def test_a_damaged_time_never_expires_a_message_early(
        self, maildirs: Maildirs, clock: Clock
    ) -> None:
        clock.advance(100 * DAY)
        state = maildirs.maildir / "pop3d-retrieved"
        state.write_text(
            "pop3d-retrieved 1\n"
            f"{maildirs.uniques[0]}\t-5\n{maildirs.uniques[1]}\t1e3\n"
            f"{maildirs.uniques[2]}\t0\textra\n"
        )
        wire = Wire(maildirs.factory(5))
        wire.login()
        wire.command(b"QUIT")
        assert maildirs.present() == [1, 2, 3]

    def test_a_store_without_retrieval_times_expires_nothing(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore, clock: Clock
    ) -> None:
        for message in MESSAGES:
            store.deliver("alice", message)
        for _ in range(2):
            wire = Wire(make_factory(policy=SessionPolicy(expire_days=5)))
            wire.login()
            retrieve(wire, 1)
            wire.command(b"DELE 3")
            assert wire.command(b"QUIT") == BYE
            clock.advance(10 * DAY)
        assert store.messages("alice") == [MESSAGES[0], MESSAGES[1]]

    def test_times_that_cannot_be_kept_expire_nothing_but_dele_is_done(
        self, clock: Clock, store: MemoryStore
    ) -> None:
        """A store failing at UPDATE: logged; the client's DELE still happens."""

        @implementer(IMaildrop, IRetrievalTimes)
        class Forgetful:
            def __init__(self, inner: IMaildrop) -> None:
                self.inner = inner
                self.messages = inner.messages

            def open_message(self, index: int) -> IMessageBody | Deferred[IMessageBody]:
                return self.inner.open_message(index)

            def remove(self, indexes: Sequence[int]) -> Deferred[None]:
                return self.inner.remove(indexes)

            def close(self) -> Deferred[None]:
                return self.inner.close()

            def record_retrievals(
                self, retrieved: Sequence[int], now: float
            ) -> Deferred[Mapping[int, float]]:
                return fail(MaildropUnavailable("cannot read the times"))

        @implementer(IMaildropStore)
        class ForgetfulStore:
            def open(self, mailbox: str) -> Deferred[IMaildrop]:
                return store.open(mailbox).addCallback(Forgetful)

        for message in MESSAGES:
            store.deliver("alice", message)
        portal = delayed_portal(MaildropRealm(ForgetfulStore()))
        factory = POP3Factory(portal, clock=clock, policy=SessionPolicy(expire_days=5))
        wire = Wire(factory)
        wire.login()
        retrieve(wire, 1)
        wire.command(b"DELE 2")
        assert wire.command(b"QUIT") == BYE
        assert store.messages("alice") == [MESSAGES[0], MESSAGES[2]]
        assert not store.is_locked("alice")

    def test_capa_says_expire_5_in_both_states(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(5))
        before, after = capa(b"EXPIRE 5\r\n")
        assert wire.command(b"CAPA") == before
        wire.login()
        assert wire.command(b"CAPA") == after

    def test_capa_says_expire_never_by_default(self, maildirs: Maildirs) -> None:
        wire = Wire(maildirs.factory(None))
        before, after = capa(b"EXPIRE NEVER\r\n")
        assert wire.command(b"CAPA") == before
        wire.login()
        assert wire.command(b"CAPA") == after


class TestExpireOption:
    @pytest.mark.parametrize(
        ("extra", "days"),
        [
            ([], None),
            (["--expire", "never"], None),
            (["--expire", "NEVER"], None),
            (["--expire", "0"], 0),
            (["--expire", "30"], 30),
        ],
    )
    def test_values(self, passwd: Path, extra: list[str], days: int | None) -> None:
        assert parse(passwd, "maildir:/srv/mail/{user}", *extra)["expire"] == days

    @pytest.mark.parametrize("value", ["-1", "soon", "1.5", "9999999"])
    def test_bad_values_name_the_option(self, passwd: Path, value: str) -> None:
        with pytest.raises(usage.UsageError, match=re.escape(f"--expire {value!r}")):
            parse(passwd, "maildir:/srv/mail/{user}", "--expire", value)

    def test_mbox_cannot_keep_retrieval_times(self, passwd: Path) -> None:
        assert parse(passwd, "mbox:/var/mail/{user}", "--expire", "0")["expire"] == 0
        with pytest.raises(usage.UsageError, match="--expire 5: this --mail-location cannot"):
            parse(passwd, "mbox:/var/mail/{user}", "--expire", "5")


@pytest_twisted.ensureDeferred
async def test_poplib_retrieved_messages_expire_at_quit(tmp_path: Path) -> None:
    """End to end, ``--expire 0``: RFC 2449 section 6.7."""
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"], ["--expire", "0"])
    maildir = server.maildir("alice")
    for message in MESSAGES:
        deliver_to_maildir(str(maildir), message)

    def session() -> bytes:
        client = poplib.POP3(server.host, server.port, timeout=30)
        expire = client.capa()["EXPIRE"][0].encode()
        client.user("alice")
        client.pass_("wonderland")
        client.retr(2)
        client.quit()
        return expire

    try:
        expire = await deferToThread(session)
    finally:
        await server.service.stopService()
    assert expire == b"0"
    left = sorted(
        (maildir / sub / name).read_bytes()
        for sub in ("new", "cur")
        for name in os.listdir(maildir / sub)
    )
    assert left == [MESSAGES[0], MESSAGES[2]]


@pytest.mark.process
def test_workers_share_the_login_history(tmp_path: Path, launch: Launch) -> None:
    """
    ``twistd pop3d --workers 2 --login-delay``: a burst of connections reaches
    both workers (each has its own socket, SO_REUSEPORT); after the first
    login, every other one is refused, whichever worker it reached.
    """
    mail_root = tmp_path / "mail"
    mail_root.mkdir()
    arguments = pop3d_arguments(
        mail_root,
        write_passwd(tmp_path / "passwd", USERS),
        "--workers",
        "2",
        "--login-delay",
        "3600",
    )
    server = launch(*arguments)
    listening = [server.wait_for(WORKER_LISTENING) for _ in range(2)]
    pids = [int(match.group(1)) for match in listening]
    port = int(listening[0].group(2))
    clients = [poplib.POP3(HOST, port, timeout=PATIENCE) for _ in range(16)]
    try:
        reached = [
            sum(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir())
            for pid in pids
        ]
        # Each worker holds its listening socket and the connections it
        # accepted: at least one each (all 16 on one worker by chance: 1 in 32,768).
        assert all(count > 1 for count in reached), reached
        answers = []
        for client in clients:
            client.user("alice")
            try:
                answers.append(client.pass_("wonderland")[:3])
                client.quit()
            except poplib.error_proto as error:
                answers.append(error.args[0][:18])
    finally:
        for client in clients:
            client.close()
    assert answers == [b"+OK"] + [b"-ERR [LOGIN-DELAY]"] * 15


@implementer(IMessageBody)
class _UnreadableBody:
    """A message the store opened but cannot read (an I/O error, say)."""

    def read(self, size: int) -> bytes:
        raise MaildropUnavailable("cannot read message")

    def close(self) -> None:
        pass


@implementer(IMaildrop)
class _FirstUnreadable:
    def __init__(self, maildrop: IMaildrop) -> None:
        self._maildrop = maildrop
        self.messages = maildrop.messages

    def open_message(self, index: int) -> IMessageBody | Deferred[IMessageBody]:
        if index == 0:
            return succeed(_UnreadableBody())
        return self._maildrop.open_message(index)

    def remove(self, indices: Sequence[int]) -> Deferred[None]:
        return self._maildrop.remove(indices)

    def close(self) -> Deferred[None]:
        return self._maildrop.close()


@implementer(IMaildropStore)
class _UnreadableFirst:
    """A store whose first message of every maildrop cannot be read."""

    def __init__(self, store: IMaildropStore) -> None:
        self._store = store

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return self._store.open(mailbox).addCallback(_FirstUnreadable)


def _alice_checker() -> InMemoryUsernamePasswordDatabaseDontUse:
    return InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
