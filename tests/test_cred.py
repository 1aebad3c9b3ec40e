"""
Authentication: the realm's name checks, the passwd-file checker, and the
strcred glue.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.cred.strcred import makeChecker
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

import pop3d.credchecks
from pop3d.checkers import (
    FirstMatchChecker,
    PasswdFileChecker,
    PasswdFileCheckerFactory,
    PasswdFileError,
    accept_wire_bytes,
    read_passwd_file,
)
from pop3d.credchecks import IAvatarIdAtOnce, PortalVerifiers, login_at_once
from pop3d.credentials import PreparedUsernamePassword
from pop3d.driver import APOPCredentials
from pop3d.errors import AuthUnavailable, LoginRefused, MaildropLocked
from pop3d.passwords import (
    SCHEMES,
    SCRAM_ITERATIONS,
    parse_scram_secret,
    scram_keys,
    scram_salt,
)
from pop3d.realm import MaildropRealm, is_safe_mailbox_name
from pop3d.reloading import ReloadableFiles
from pop3d.sasl import ICramMD5Credentials, IScramKeySource, IScramSHA256Credentials, ScramKeys
from pop3d.sasl.cram_md5 import CramMD5, CramMD5Credentials
from pop3d.stores.interfaces import IMaildrop
from pop3d.stores.maildir import MaildirStore
from pop3d.tap import build_portal
from pop3d.testing import MemoryStore, deliver_to_maildir

from .clock_threads import ClockThreads, TimedClockThreads, settle
from .conftest import Logged


class TestMailboxNames:
    @pytest.mark.parametrize("name", ["alice", "alice@example.org", "a.b-c_d", "Ünïcode"])
    def test_safe(self, name: str) -> None:
        assert is_safe_mailbox_name(name)

    @pytest.mark.parametrize(
        "name",
        [
            "",
            ".",
            "..",
            "../bob",
            "a/b",
            "a\\b",
            "a\x00b",
            "a\nb",
            "a\x7fb",
            ".hidden",
            "x" * 256,
            "é" * 128,
        ],
    )
    def test_unsafe(self, name: str) -> None:
        assert not is_safe_mailbox_name(name)

    @pytest_twisted.ensureDeferred
    async def test_realm_refuses_unsafe_names_as_unauthorized(self) -> None:
        realm = MaildropRealm(MemoryStore())
        with pytest.raises(UnauthorizedLogin):
            realm.requestAvatar(b"../../etc", None, IMaildrop)
        with pytest.raises(UnauthorizedLogin):
            realm.requestAvatar(b"\xff\xfe", None, IMaildrop)


PASSWD = b"""# Dovecot passwd-file
alice:{PLAIN}wonderland:1000:1000::/home/alice::userdb_mail=maildir:~/Maildir

bob:{cleartext}builder::
nopass:::
"""


class TestPasswdFile:
    @pytest_twisted.ensureDeferred
    async def test_a_password_without_a_scheme_is_a_crypt_hash_as_in_dovecot(
        self, tmp_path: Path
    ) -> None:
        stored = b"$1$saltsalt$rMIqYVCXYNdPxX2s/bKpR0"  # crypt("wonderland", "$1$saltsalt$")
        [entry] = read_passwd_file(b"alice:" + stored + b"::\n")[0].values()
        assert (entry.scheme, entry.secret) == ("CRYPT", stored)
        path = tmp_path / "passwd"
        path.write_bytes(b"alice:" + stored + b"::\n")
        checker = PasswdFileChecker(str(path))
        assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderlamp"))

    @pytest_twisted.ensureDeferred
    async def test_a_password_stored_unprepared_still_logs_in(self, tmp_path: Path) -> None:
        """
        RFC 4013 (SASLprep): a password stored as the client types it, before
        pop3d prepared passwords (U+00A0 in it, which SASLprep makes a space),
        matches in either form, and no other password does, with a cheap
        scheme answered at once.
        """
        typed = "open\u00a0sesame".encode()
        path = tmp_path / "passwd"
        path.write_bytes(b"alice:{PLAIN}" + typed + b"::\nbob:{PLAIN}open sesame::\n")
        checker = PasswdFileChecker(str(path))
        assert await checker.requestAvatarId(PreparedUsernamePassword(b"alice", typed)) == b"alice"
        assert await checker.requestAvatarId(PreparedUsernamePassword(b"bob", typed)) == b"bob"
        for wrong in (b"open sesame", b"open\xc2\xa0sesam"):
            with pytest.raises(UnauthorizedLogin):
                await checker.requestAvatarId(PreparedUsernamePassword(b"alice", wrong))

    def test_parse(self) -> None:
        entries = read_passwd_file(PASSWD)[0]
        assert entries[b"alice"].secret == b"wonderland"
        assert entries[b"bob"].scheme == "CLEARTEXT"
        assert b"nopass" not in entries

    @pytest.mark.parametrize(
        "content,message",
        [
            (b"alice:{FOO}x::\n", "unsupported password scheme {FOO}"),
            # No {SCHEME}: a crypt(3) hash, as Dovecot reads it, which this is not.
            (b"alice:secret::\n", "line 1: malformed {CRYPT} password"),
            (b"justaname\n", "line 1"),
        ],
    )
    def test_errors_name_the_problem(self, content: bytes, message: str) -> None:
        with pytest.raises(PasswdFileError, match=message.replace("{", r"\{")):
            read_passwd_file(content)[0]

    @pytest.fixture
    def checker(self, tmp_path: Path) -> PasswdFileChecker:
        path = tmp_path / "passwd"
        path.write_bytes(PASSWD)
        return PasswdFileChecker(str(path))

    @pytest.mark.parametrize(
        ("extra", "reply"),
        [
            # Dovecot's passdb extra fields (the eighth field): a user it
            # refuses is refused, with the reason ...
            (b"nologin reason=moved", b"-ERR [AUTH] moved\r\n"),
            # ... or as a wrong password is, without one ...
            (b"nologin", b"-ERR [AUTH] invalid user name or password\r\n"),
            # ... and from a network not allowed (the client is 127.0.0.1).
            (b"allow_nets=192.0.2.0/24", b"-ERR [AUTH] invalid user name or password\r\n"),
            (
                b"allow_nets=127.0.0.0/8,::1 userdb_mail=x:y",
                b"+OK maildrop has 1 messages (20 octets)\r\n",
            ),
        ],
    )
    def test_extra_fields_refuse_as_dovecot_does(
        self, tmp_path: Path, extra: bytes, reply: bytes
    ) -> None:
        from twisted.cred.portal import Portal

        from pop3d.factory import POP3Factory
        from pop3d.session import SessionPolicy

        from .conftest import Wire

        path = tmp_path / "passwd"
        path.write_bytes(b"alice:{PLAIN}wonderland:1000:1000::/home/alice::" + extra + b"\n")
        store = MemoryStore()
        store.deliver("alice", b"Subject: x\n\nbody\n")
        factory = POP3Factory(
            Portal(MaildropRealm(store), [PasswdFileChecker(str(path))]),
            clock=Clock(),
            hostname="pop.example.test",
            policy=SessionPolicy(),
            login_failure_delay=0,
        )
        assert Wire(factory).login() == reply

    def test_an_extra_field_it_cannot_use_names_the_line(self, tmp_path: Path) -> None:
        path = tmp_path / "passwd"
        path.write_bytes(PASSWD + b"carol:{PLAIN}x::::::allow_nets=192.0.2.300\n")
        with pytest.raises(PasswdFileError, match=re.escape("line 6: allow_nets: '192.0.2.300'")):
            PasswdFileChecker(str(path))

    @pytest_twisted.ensureDeferred
    async def test_user_pass(self, checker: PasswdFileChecker) -> None:
        assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"

    @pytest.mark.parametrize(
        "user,password", [(b"alice", b"wrong"), (b"mallory", b"wonderland"), (b"nopass", b"")]
    )
    @pytest_twisted.ensureDeferred
    async def test_refused(self, checker: PasswdFileChecker, user: bytes, password: bytes) -> None:
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(user, password))

    @pytest_twisted.ensureDeferred
    async def test_apop(self, checker: PasswdFileChecker) -> None:
        """RFC 1939 section 7: APOP digest over the timestamp and the secret."""
        challenge = b"<1896.697170952@dbc.mtview.ca.us>"
        digest = hashlib.md5(challenge + b"builder").hexdigest().encode()
        credentials = APOPCredentials(challenge, b"bob", digest)
        assert await checker.requestAvatarId(credentials) == b"bob"
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(APOPCredentials(challenge, b"alice", digest))

    def test_rfc1939_apop_example(self) -> None:
        """The worked example of RFC 1939 section 7."""
        credentials = APOPCredentials(
            b"<1896.697170952@dbc.mtview.ca.us>", b"mrose", b"c4c9334bac560ecc979e58001b3e22fb"
        )
        assert credentials.checkPassword(b"tanstaaf")
        assert not credentials.checkPassword(b"tanstaafl")

    @pytest_twisted.ensureDeferred
    async def test_reloaded_when_changed(self, checker: PasswdFileChecker) -> None:
        path = Path(checker.path)
        path.write_bytes(b"carol:{PLAIN}new::\n")
        os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
        assert await checker.requestAvatarId(UsernamePassword(b"carol", b"new")) == b"carol"
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))

    def test_a_changed_file_is_read_in_the_thread_pool_once_for_waiting_logins(
        self, checker: PasswdFileChecker
    ) -> None:
        """
        Reading a large passwd-file again must not stall every other session:
        it is queued to the thread pool, and two logins that noticed the
        change meanwhile wait for that one reading, then both use it.
        """
        threads = FakeThreadingReactor()
        checker.run_slow_work_in(cast(IReactorThreads, threads))
        path = Path(checker.path)
        path.write_bytes(b"carol:{PLAIN}new::\n")
        os.utime(path, ns=(1, 1))
        carol = checker.requestAvatarId(UsernamePassword(b"carol", b"new"))
        alice = checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
        assert not carol.called and not alice.called
        assert len(threads.pool.queued) == 1
        threads.pool.run_next()
        assert carol.result == b"carol"
        assert isinstance(alice.result, Failure) and alice.result.check(UnauthorizedLogin)
        alice.addErrback(lambda _: None)
        assert threads.pool.queued == []

    def test_a_reload_asked_during_a_reading_reads_once_more_after_it(self) -> None:
        """
        A SIGHUP (or a login that saw another change) while the files are
        being read: they may have changed since that reading began, so they
        are read once more after it; the logins waiting on the first reading
        go on with what it gave.
        """
        clock = Clock()
        threads = ClockThreads(clock)
        readings = iter(["first", "second"])
        used: list[str] = []
        files = ReloadableFiles("/etc/pop3d/x.conf", lambda: next(readings), used.append, ())
        files.threads = threads.as_reactor
        seen: dict[str, list[str]] = {}
        files.read_again().addCallback(lambda _: seen.setdefault("first", list(used)))
        files.read_again().addCallback(lambda _: seen.setdefault("second", list(used)))
        files.settled().addCallback(lambda _: seen.setdefault("login", list(used)))
        assert threads.handed_over == 1
        settle(clock)
        assert threads.handed_over == 2
        assert seen == {"first": ["first"], "login": ["first"], "second": ["first", "second"]}

    def test_a_login_waits_for_a_reading_at_most_its_patience(self) -> None:
        """
        A reading queued behind busy threads (a database that stopped
        answering holds them): the logins waiting on it go on with the
        configuration in use after READING_PATIENCE; the reading, when its
        turn comes, is used all the same.
        """
        from pop3d.reloading import READING_PATIENCE

        class BusyThreads(TimedClockThreads):
            """Every thread taken: what is handed over runs on `free`."""

            def __init__(self, clock: Clock) -> None:
                super().__init__(clock)
                self.queued: list[tuple[Any, ...]] = []

            def callInThreadWithCallback(self, *work: Any, **keywords: Any) -> None:
                self.queued.append(work)

            def free(self) -> None:
                for work in self.queued:
                    super().callInThreadWithCallback(*work)

        threads = BusyThreads(Clock())
        used: list[str] = []
        files = ReloadableFiles("/etc/pop3d/x.conf", lambda: "new", used.append, ())
        files.threads = threads.as_reactor
        files.read_again()
        login = files.settled()
        threads.clock.advance(READING_PATIENCE - 0.5)
        assert not login.called
        threads.clock.advance(0.5)
        assert login.called and used == []  # on with the configuration in use
        threads.free()
        settle(threads.clock)
        assert used == ["new"] and not files.reading

    def test_a_reading_that_cannot_be_handed_over_keeps_the_configuration(
        self, logged: Logged
    ) -> None:
        """
        A pool that cannot take the reading (gone at shutdown, not a thread
        pool at all): the logins waiting are not left waiting for ever, the
        configuration in use is kept, and the next change is read again.
        """
        used: list[str] = []
        files = ReloadableFiles("/etc/pop3d/x.conf", lambda: "read", used.append, ())
        files.threads = Clock()  # type: ignore[assignment]  # no callInThread
        reloaded = files.read_again()
        assert reloaded.called and not files.reading
        assert files.settled().called
        assert used == []
        assert len(logged.texts("keeping the previous /etc/pop3d/x.conf")) == 1
        files.threads = None  # inline, as at start-up
        files.read_again()
        assert used == ["read"]

    @pytest_twisted.ensureDeferred
    async def test_a_file_gone_for_a_while_is_said_once_and_read_when_back(
        self, checker: PasswdFileChecker, logged: Logged
    ) -> None:
        """Removed (an editor's unlink and rename, a deploy): logins go on with what was read."""
        path = Path(checker.path)
        path.unlink()
        for _ in range(3):
            login = UsernamePassword(b"alice", b"wonderland")
            assert await checker.requestAvatarId(login) == b"alice"
        assert len(logged.texts(f"keeping the previous {path}")) == 1
        path.write_bytes(PASSWD + b"carol:{PLAIN}c::\n")
        assert await checker.requestAvatarId(UsernamePassword(b"carol", b"c")) == b"carol"

    @pytest_twisted.ensureDeferred
    async def test_a_broken_change_keeps_the_last_good_file(
        self, checker: PasswdFileChecker
    ) -> None:
        path = Path(checker.path)
        path.write_bytes(b"alice:{BOGUS}x::\n")
        os.utime(path, ns=(1, 1))
        assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"

    def test_factory_errors_are_clear(self, tmp_path: Path) -> None:
        factory = PasswdFileCheckerFactory()
        with pytest.raises(PasswdFileError, match="needs a path"):
            factory.generateChecker("")
        with pytest.raises(PasswdFileError, match="cannot read"):
            factory.generateChecker(str(tmp_path / "missing"))

    def test_strcred_finds_the_plugin(self, tmp_path: Path) -> None:
        path = tmp_path / "passwd"
        path.write_bytes(PASSWD)
        assert isinstance(makeChecker(f"passwd-file:{path}"), PasswdFileChecker)


class TestStrcredGlue:
    @pytest_twisted.ensureDeferred
    async def test_memory_checker_meets_wire_bytes(self) -> None:
        checker = accept_wire_bytes(makeChecker("memory:alice:secret"))
        assert await checker.requestAvatarId(UsernamePassword(b"alice", b"secret")) == b"alice"

    @pytest_twisted.ensureDeferred
    async def test_a_broken_checker_looks_like_a_wrong_password(self) -> None:
        """A checker that raises must not tell which users exist."""

        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                raise PermissionError("/etc/shadow")

        chained = FirstMatchChecker([Broken()], [IUsernamePassword])
        with pytest.raises(UnauthorizedLogin):
            await chained.requestAvatarId(UsernamePassword(b"root", b"x"))

    @pytest_twisted.ensureDeferred
    async def test_a_database_that_cannot_answer_or_refuses_is_heard(self) -> None:
        """
        A user database down (AuthUnavailable: SYS/TEMP) is the answer only
        if no other checker accepts; nologin (LoginRefused) is the answer at once.
        """

        @implementer(ICredentialsChecker)
        class Raising:
            credentialInterfaces = (IUsernamePassword,)

            def __init__(self, error: Exception) -> None:
                self.error = error

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return fail(self.error)

        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"one")
        down = Raising(AuthUnavailable())
        chained = FirstMatchChecker([down, memory], [IUsernamePassword])
        assert await chained.requestAvatarId(UsernamePassword(b"alice", b"one")) == b"alice"
        with pytest.raises(AuthUnavailable):
            await chained.requestAvatarId(UsernamePassword(b"bob", b"two"))
        refusing = FirstMatchChecker([Raising(LoginRefused("closed")), memory], [IUsernamePassword])
        with pytest.raises(LoginRefused, match="closed"):
            await refusing.requestAvatarId(UsernamePassword(b"alice", b"one"))

    @pytest_twisted.ensureDeferred
    async def test_a_checker_answering_at_once_is_heard_as_one_answering_later(self) -> None:
        """
        A checker that answers at once (`IAvatarIdAtOnce`, as passwd-file
        does) gives the answers a Deferred would: its user; a refusal ends
        the search; an unavailable database or a wrong password lets the
        next checker try; a checker that breaks looks like a wrong password.
        """

        @implementer(ICredentialsChecker, IAvatarIdAtOnce)
        class AtOnce:
            credentialInterfaces = (IUsernamePassword,)

            def __init__(self, answer: bytes | Exception) -> None:
                self.answer = answer

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                raise AssertionError("asked at once, not through requestAvatarId")

            def avatar_id_at_once(self, credentials: object) -> bytes:
                if isinstance(self.answer, Exception):
                    raise self.answer
                return self.answer

        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"one")
        alice = UsernamePassword(b"alice", b"one")
        assert await FirstMatchChecker([AtOnce(b"bob")], []).requestAvatarId(alice) == b"bob"
        for passing in (AuthUnavailable(), UnauthorizedLogin(), PermissionError("/etc/shadow")):
            chained = FirstMatchChecker([AtOnce(passing), memory], [IUsernamePassword])
            assert await chained.requestAvatarId(alice) == b"alice"
        with pytest.raises(AuthUnavailable):
            await FirstMatchChecker([AtOnce(AuthUnavailable())], []).requestAvatarId(alice)
        with pytest.raises(UnauthorizedLogin):
            await FirstMatchChecker([AtOnce(PermissionError("x"))], []).requestAvatarId(alice)
        refusing = FirstMatchChecker([AtOnce(LoginRefused("closed")), memory], [])
        with pytest.raises(LoginRefused, match="closed"):
            await refusing.requestAvatarId(alice)

    @pytest_twisted.ensureDeferred
    async def test_a_login_at_once_answers_as_the_portal_does(self, tmp_path: Path) -> None:
        """
        `login_at_once` gives what ``Portal.login`` fires with: the avatar,
        a wrong password's UnauthorizedLogin, a maildrop in use's
        MaildropLocked (RFC 1939 section 4), credentials no checker takes
        (UnhandledCredentials); at once where the checker and the realm
        answer at once (passwd-file, a Maildir whose listing is kept).
        """
        passwd = tmp_path / "passwd"
        passwd.write_bytes(b"alice:{PLAIN}wonderland::\n")
        mail = tmp_path / "mail"
        deliver_to_maildir(str(mail / "alice"), b"Subject: one\n\nbody\n")
        an_hour_ago = time.time() - 3600
        for part in ("", "new", "cur", "tmp"):
            # Changed long enough ago for its listing to be trusted when kept.
            os.utime(mail / "alice" / part, (an_hour_ago, an_hour_ago))
        checker = FirstMatchChecker([PasswdFileChecker(str(passwd))], [IUsernamePassword])
        portal = Portal(MaildropRealm(MaildirStore(f"{mail}/{{user}}")), [checker])
        alice = UsernamePassword(b"alice", b"wonderland")
        _, first, _ = await portal.login(alice, None, IMaildrop)
        await IMaildrop(first).close()
        answer = login_at_once(portal, alice, None, IMaildrop)
        assert isinstance(answer, tuple)
        interface, maildrop, _ = answer
        assert interface is IMaildrop
        assert [message.size for message in IMaildrop(maildrop).messages] == [22]
        locked = login_at_once(portal, alice, None, IMaildrop)
        assert isinstance(locked, Failure) and locked.check(MaildropLocked)
        await IMaildrop(maildrop).close()
        wrong = login_at_once(portal, UsernamePassword(b"alice", b"x"), None, IMaildrop)
        assert isinstance(wrong, Failure) and wrong.check(UnauthorizedLogin)
        unhandled = login_at_once(portal, object(), None, IMaildrop)
        assert isinstance(unhandled, Deferred)
        with pytest.raises(UnhandledCredentials):
            await unhandled

    @pytest_twisted.ensureDeferred
    async def test_first_match_tries_every_checker(self) -> None:
        first = InMemoryUsernamePasswordDatabaseDontUse(alice=b"one")
        second = InMemoryUsernamePasswordDatabaseDontUse(bob=b"two")
        chained = FirstMatchChecker([first, second], first.credentialInterfaces)
        assert await chained.requestAvatarId(UsernamePassword(b"bob", b"two")) == b"bob"
        with pytest.raises(UnauthorizedLogin):
            await chained.requestAvatarId(UsernamePassword(b"bob", b"one"))


# -- hashed schemes (pop3d.passwords) in the passwd-file checker ----------------

# doveadm pw -s ... -p "correct horse" (Dovecot 2.3.19.1); tanstaaftanstaaf is
# RFC 2195's example password.
BLF_HORSE = b"$2y$05$8.EtBsQSSze1Ukke2iJSYeKMwJDqIk2FOpNWYeJSHnt5rACuzI4PC"
BLF_PENCIL = b"$2y$05$IzH8hM6czbBdR/uG45vpGejn2WojjtYtvP4n66iF9pvChtgL3HUzy"
SHA512_HORSE = (
    b"$6$DIDFPj2jIZ1ezu9i$XXq..exMy09oIQ8xPf4sd/Qn8lcfEk24ar/ArzeBNBEFv97FfMfM12VYVq4Xhls07"
    b"4rUMl.j/t/TIi10hDw1s0"
)
CRAM_TANSTAAF = b"d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"
SCRAM_HORSE = (
    b"4096,sX7qYEBSBRXbLXCdE/63BQ==,4R+yUgPOSMvlLbJCIXJkdS+GDZm7fb/+MNRqpij0lxE=,"
    b"jCB7ex4JVZHcF9ubxHObPHeJFv1br0HEiGlkovFYsuY="
)
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_RESPONSE = b"b913a602c7eda7a495b4e6e7334d3890"

HASHED_PASSWD = b"".join(
    [
        b"blf:{BLF-CRYPT}" + BLF_HORSE + b"::\n",
        b"sha:{SHA512-CRYPT}" + SHA512_HORSE + b":1000:1000::/home/sha::\n",
        b"cram:{CRAM-MD5}" + CRAM_TANSTAAF + b"::\n",
        b"scram:{SCRAM-SHA-256}" + SCRAM_HORSE + b"::\n",
        b"plain:{PLAIN}tanstaaftanstaaf::\n",
    ]
)


def passwd_checker(tmp_path: Path, content: bytes) -> PasswdFileChecker:
    path = tmp_path / "passwd"
    path.write_bytes(content)
    return PasswdFileChecker(str(path))


class TestHashedPasswdFile:
    @pytest.fixture
    def checker(self, tmp_path: Path) -> PasswdFileChecker:
        return passwd_checker(tmp_path, HASHED_PASSWD)

    @pytest.mark.parametrize(
        "user,password",
        [
            (b"blf", b"correct horse"),
            (b"sha", b"correct horse"),
            (b"cram", b"tanstaaftanstaaf"),
            (b"scram", b"correct horse"),
            (b"plain", b"tanstaaftanstaaf"),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_user_pass_for_every_scheme(
        self, checker: PasswdFileChecker, user: bytes, password: bytes
    ) -> None:
        assert await checker.requestAvatarId(UsernamePassword(user, password)) == user
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(user, password + b"!"))

    @pytest_twisted.ensureDeferred
    async def test_apop_only_for_plaintext(self, checker: PasswdFileChecker) -> None:
        def apop(user: bytes, secret: bytes) -> APOPCredentials:
            digest = hashlib.md5(b"<1.2@host>" + secret).hexdigest().encode()
            return APOPCredentials(b"<1.2@host>", user, digest)

        assert await checker.requestAvatarId(apop(b"plain", b"tanstaaftanstaaf")) == b"plain"
        # Neither the password nor the stored hash make an APOP digest.
        for user, secret in [(b"blf", b"correct horse"), (b"blf", BLF_HORSE)]:
            with pytest.raises(UnauthorizedLogin):
                await checker.requestAvatarId(apop(user, secret))

    @pytest.mark.parametrize("user", [b"cram", b"plain"])
    @pytest_twisted.ensureDeferred
    async def test_cram_md5_from_context_and_plaintext(
        self, checker: PasswdFileChecker, user: bytes
    ) -> None:
        """RFC 2195's example, against Dovecot's stored HMAC context and a plaintext entry."""
        good = CramMD5Credentials(user, RFC2195_CHALLENGE, RFC2195_RESPONSE)
        assert await checker.requestAvatarId(good) == user
        bad = CramMD5Credentials(user, RFC2195_CHALLENGE, b"0" * 32)
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(bad)

    @pytest.mark.parametrize("user", [b"blf", b"scram", b"nobody"])
    @pytest_twisted.ensureDeferred
    async def test_cram_md5_refused_without_a_usable_secret(
        self, checker: PasswdFileChecker, user: bytes
    ) -> None:
        credentials = CramMD5Credentials(user, RFC2195_CHALLENGE, RFC2195_RESPONSE)
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(credentials)

    def test_malformed_secret_names_line_and_scheme(self) -> None:
        content = b"alice:{PLAIN}x::\nbob:{BLF-CRYPT}$2y$05$tooshort::\n"
        with pytest.raises(PasswdFileError, match=r"line 2: malformed \{BLF-CRYPT\}") as caught:
            read_passwd_file(content)[0]
        assert b"tooshort" not in str(caught.value).encode()

    def test_scheme_names_are_case_insensitive(self) -> None:
        entries = read_passwd_file(b"a:{blf-crypt}" + BLF_HORSE + b"\n")[0]
        assert entries[b"a"].scheme == "BLF-CRYPT"


class TestAdvertisedInterfaces:
    """APOP and CRAM-MD5 are offered only when some entry can verify them."""

    @pytest.mark.parametrize(
        "content,expected",
        [
            (b"a:{BLF-CRYPT}" + BLF_HORSE + b"\n", {IUsernamePassword}),
            (b"a:{SHA512-CRYPT}" + SHA512_HORSE + b"\n", {IUsernamePassword}),
            (b"a:{CRAM-MD5}" + CRAM_TANSTAAF + b"\n", {IUsernamePassword, ICramMD5Credentials}),
            (
                b"a:{SCRAM-SHA-256}" + SCRAM_HORSE + b"\n",
                {IUsernamePassword, IScramSHA256Credentials},
            ),
            (
                b"a:{PLAIN}x\n",
                {
                    IUsernamePassword,
                    IUsernameHashedPassword,
                    ICramMD5Credentials,
                    IScramSHA256Credentials,
                },
            ),
            (b"# nobody yet\n", {IUsernamePassword}),
        ],
    )
    def test_only_what_the_entries_can_verify(
        self, tmp_path: Path, content: bytes, expected: set[object]
    ) -> None:
        assert set(passwd_checker(tmp_path, content).credentialInterfaces) == expected

    def test_the_plugin_offers_everything_it_might_verify(self) -> None:
        assert set(PasswdFileCheckerFactory.credentialInterfaces) == {
            IUsernamePassword,
            IUsernameHashedPassword,
            ICramMD5Credentials,
            IScramSHA256Credentials,
        }

    def test_portal_has_no_apop_for_hashed_files(self, tmp_path: Path) -> None:
        checker = passwd_checker(tmp_path, b"a:{BLF-CRYPT}" + BLF_HORSE + b"\n")
        portal = build_portal(MaildropRealm(MemoryStore()), [checker])
        assert IUsernameHashedPassword not in portal.listCredentialsInterfaces()
        assert ICramMD5Credentials not in portal.listCredentialsInterfaces()
        assert not CramMD5().usable(PortalVerifiers(portal))

    @pytest_twisted.ensureDeferred
    async def test_recomputed_on_reload(self, tmp_path: Path) -> None:
        checker = passwd_checker(tmp_path, b"a:{BLF-CRYPT}" + BLF_HORSE + b"\n")
        path = Path(checker.path)
        path.write_bytes(b"a:{CRAM-MD5}" + CRAM_TANSTAAF + b"\n")
        os.utime(path, ns=(1, 1))
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"a", b"wrong"))
        assert ICramMD5Credentials in checker.credentialInterfaces


class SpyScheme:
    """Records the thread and the secret of every check of one scheme."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls: list[tuple[threading.Thread, bytes]] = []
        scheme = SCHEMES[name]
        original = scheme.verify

        def verify(secret: bytes, password: bytes) -> bool:
            self.calls.append((threading.current_thread(), secret))
            return original(secret, password)

        monkeypatch.setattr(scheme, "verify", verify)


class FakeThreadPool:
    """Holds the work given to it until the test runs it: no threads, no waiting."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[..., None], Callable[..., object], tuple[object, ...]]]
        self.queued = []

    def callInThreadWithCallback(
        self, on_result: Callable[..., None], work: Callable[..., object], *args: object
    ) -> None:
        self.queued.append((on_result, work, args))

    def run_next(self) -> None:
        on_result, work, args = self.queued.pop(0)
        on_result(True, work(*args))


class FakeThreadingReactor:
    def __init__(self) -> None:
        self.pool = FakeThreadPool()

    def getThreadPool(self) -> FakeThreadPool:
        return self.pool

    def callFromThread(self, work: Callable[..., object], *args: object) -> None:
        work(*args)


class TestSlowWork:
    @pytest_twisted.ensureDeferred
    async def test_slow_hashes_run_in_the_reactor_thread_pool(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from twisted.internet import reactor

        assert threading.current_thread() is threading.main_thread()  # the reactor's
        spy = SpyScheme(monkeypatch, "BLF-CRYPT")
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        checker.run_slow_work_in(cast(IReactorThreads, reactor))
        assert await checker.requestAvatarId(UsernamePassword(b"blf", b"correct horse")) == b"blf"
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"blf", b"wrong"))
        assert len(spy.calls) == 2
        assert all(thread is not threading.main_thread() for thread, _ in spy.calls)

    @pytest_twisted.ensureDeferred
    async def test_build_portal_uses_the_reactor_thread_pool(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = SpyScheme(monkeypatch, "SHA512-CRYPT")
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        from twisted.internet import reactor

        portal = build_portal(
            MaildropRealm(MemoryStore()), [checker], cast(IReactorThreads, reactor)
        )
        credentials = UsernamePassword(b"sha", b"correct horse")
        _, maildrop, _ = await portal.login(credentials, None, IMaildrop)
        await IMaildrop(maildrop).close()
        [(thread, _)] = spy.calls
        assert thread is not threading.main_thread()

    def test_without_a_reactor_work_runs_inline(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = SpyScheme(monkeypatch, "BLF-CRYPT")
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        result = checker.requestAvatarId(UsernamePassword(b"blf", b"correct horse"))
        assert result.result == b"blf"
        assert spy.calls[0][0] is threading.current_thread()

    def test_concurrency_is_bounded(self, tmp_path: Path) -> None:
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        reactor = FakeThreadingReactor()
        checker.run_slow_work_in(reactor, max_concurrent=2)  # type: ignore[arg-type]
        attempts = [
            checker.requestAvatarId(UsernamePassword(user, b"correct horse"))
            for user in [b"blf", b"sha", b"blf", b"scram", b"sha"]
        ]
        results: list[object] = []
        for attempt in attempts:
            attempt.addBoth(results.append)
        pool = reactor.pool
        assert len(pool.queued) == 2 and results == []
        pool.run_next()
        assert len(pool.queued) == 2 and results == [b"blf"]
        while pool.queued:
            assert len(pool.queued) <= 2
            pool.run_next()
        assert results == [b"blf", b"sha", b"blf", b"scram", b"sha"]

    def test_cheap_checks_do_not_wait_for_the_pool(self, tmp_path: Path) -> None:
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        reactor = FakeThreadingReactor()
        checker.run_slow_work_in(reactor, max_concurrent=1)  # type: ignore[arg-type]
        checker.requestAvatarId(UsernamePassword(b"blf", b"correct horse"))
        cram = checker.requestAvatarId(UsernamePassword(b"cram", b"tanstaaftanstaaf"))
        assert cram.result == b"cram"

    def test_max_concurrent_must_be_positive(self, tmp_path: Path) -> None:
        checker = passwd_checker(tmp_path, HASHED_PASSWD)
        with pytest.raises(ValueError, match="at least 1"):
            checker.run_slow_work_in(FakeThreadingReactor(), max_concurrent=0)  # type: ignore[arg-type]


class TestUnknownUsers:
    """An unknown user is checked like a wrong password, against a dummy of the usual kind."""

    @pytest_twisted.ensureDeferred
    async def test_checked_against_a_dummy_of_the_most_common_scheme_and_cost(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        content = b"".join(
            [
                b"a:{BLF-CRYPT}" + BLF_HORSE + b"\n",
                b"b:{BLF-CRYPT}" + BLF_PENCIL + b"\n",
                b"c:{SHA512-CRYPT}" + SHA512_HORSE + b"\n",
            ]
        )
        checker = passwd_checker(tmp_path, content)
        bcrypt_spy = SpyScheme(monkeypatch, "BLF-CRYPT")
        sha_spy = SpyScheme(monkeypatch, "SHA512-CRYPT")
        for password in [b"correct horse", b"pencil"]:
            with pytest.raises(UnauthorizedLogin):
                await checker.requestAvatarId(UsernamePassword(b"mallory", password))
        assert sha_spy.calls == []
        secrets = [secret for _, secret in bcrypt_spy.calls]
        assert len(secrets) == 2 and secrets[0] == secrets[1]
        assert secrets[0].startswith(b"$2y$05$") and secrets[0] not in (BLF_HORSE, BLF_PENCIL)

    @pytest_twisted.ensureDeferred
    async def test_in_the_thread_pool_too(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from twisted.internet import reactor

        checker = passwd_checker(tmp_path, b"a:{BLF-CRYPT}" + BLF_HORSE + b"\n")
        checker.run_slow_work_in(cast(IReactorThreads, reactor))
        spy = SpyScheme(monkeypatch, "BLF-CRYPT")
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"mallory", b"correct horse"))
        [(thread, _)] = spy.calls
        assert thread is not threading.main_thread()


class TestScramKeySource:
    @pytest.fixture
    def checker(self, tmp_path: Path) -> PasswdFileChecker:
        return passwd_checker(tmp_path, HASHED_PASSWD)

    def test_is_a_key_source(self, checker: PasswdFileChecker) -> None:
        assert IScramKeySource.providedBy(checker)

    @pytest_twisted.ensureDeferred
    async def test_stored_keys(self, checker: PasswdFileChecker) -> None:
        keys = await checker.scram_sha256_keys(b"scram")
        assert keys is not None
        assert keys.iterations == 4096
        assert keys == parse_scram_secret(SCRAM_HORSE)

    @pytest_twisted.ensureDeferred
    async def test_derived_for_plaintext(self, checker: PasswdFileChecker) -> None:
        keys = await checker.scram_sha256_keys(b"plain")
        assert keys == scram_keys(b"tanstaaftanstaaf", scram_salt(b"plain"), SCRAM_ITERATIONS)
        assert await checker.scram_sha256_keys(b"plain") == keys  # the same salt each time

    @pytest.mark.parametrize(
        "content,derivations",
        [
            # Mostly plaintext: unknown users and other schemes derive dummy keys too.
            (b"p:{PLAIN}x\nq:{PLAIN}y\nb:{BLF-CRYPT}" + BLF_HORSE + b"\n", 1),
            # Mostly stored SCRAM keys: nobody derives anything.
            (b"s:{SCRAM-SHA-256}" + SCRAM_HORSE + b"\nb:{BLF-CRYPT}" + BLF_HORSE + b"\n", 0),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_unknown_users_do_the_usual_work(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        content: bytes,
        derivations: int,
    ) -> None:
        checker = passwd_checker(tmp_path, content)
        derived: list[bytes] = []

        def counting(password: bytes, salt: bytes, iterations: int) -> ScramKeys:
            derived.append(salt)
            return scram_keys(password, salt, iterations)

        monkeypatch.setattr(pop3d.credchecks, "scram_keys", counting)
        for user in [b"nobody", b"b"]:
            derived.clear()
            assert await checker.scram_sha256_keys(user) is None
            assert derived == [scram_salt(user)] * derivations

    @pytest.mark.parametrize("user", [b"blf", b"cram", b"nobody"])
    @pytest_twisted.ensureDeferred
    async def test_none_without_scram_keys(self, checker: PasswdFileChecker, user: bytes) -> None:
        assert await checker.scram_sha256_keys(user) is None

    def test_first_match_is_a_key_source_only_over_key_sources(
        self, checker: PasswdFileChecker
    ) -> None:
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        assert not IScramKeySource.providedBy(FirstMatchChecker([memory], [IUsernamePassword]))
        assert IScramKeySource.providedBy(FirstMatchChecker([memory, checker], []))

    @pytest_twisted.ensureDeferred
    async def test_first_match_asks_in_order(self, tmp_path: Path) -> None:
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        first = passwd_checker(tmp_path / "one", b"a:{SCRAM-SHA-256}" + SCRAM_HORSE + b"\n")
        second = passwd_checker(tmp_path / "two", b"a:{PLAIN}x\nb:{PLAIN}y\n")

        @implementer(IScramKeySource)
        class Broken:
            def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
                raise OSError("LDAP is down")

        chained = FirstMatchChecker([Broken(), first, second], [IScramSHA256Credentials])
        source = IScramKeySource(chained)
        assert await source.scram_sha256_keys(b"a") == parse_scram_secret(SCRAM_HORSE)
        assert await source.scram_sha256_keys(b"b") == await second.scram_sha256_keys(b"b")
        assert await source.scram_sha256_keys(b"c") is None


class TestLoginsAnsweredAtOnceOnTheWire:
    """
    What a client reads when the checker answers at once (passwd-file,
    `IAvatarIdAtOnce`) beside one that answers later, and when a Maildir
    whose listing is kept is opened at once: the replies of RFC 1939
    section 4 (PASS) with the codes of RFC 2449 section 8.1.2 (IN-USE) and
    RFC 3206 (AUTH, SYS/TEMP), whichever way the answer came.
    """

    @staticmethod
    def _factory(portal: Portal) -> Any:
        from pop3d.factory import POP3Factory
        from pop3d.session import SessionPolicy

        return POP3Factory(
            portal,
            clock=Clock(),
            hostname="pop.example.test",
            policy=SessionPolicy(),
            login_failure_delay=0,
        )

    @staticmethod
    def _passwd(tmp_path: Path, extra: bytes = b"") -> PasswdFileChecker:
        path = tmp_path / "passwd"
        path.write_bytes(b"alice:{PLAIN}wonderland::::::" + extra + b"\n")
        return PasswdFileChecker(str(path))

    @staticmethod
    def _kept_maildir(tmp_path: Path) -> MaildirStore:
        mail = tmp_path / "mail"
        deliver_to_maildir(str(mail / "alice"), b"Subject: one\n\nbody\n")
        settled = time.time() - 3600  # its listing is trusted at once
        for part in ("", "new", "cur", "tmp"):
            os.utime(mail / "alice" / part, (settled, settled))
        return MaildirStore(f"{mail}/{{user}}")

    def test_a_kept_maildir_in_use_and_free_again(self, tmp_path: Path) -> None:
        from .conftest import Wire

        factory = self._factory(
            build_portal(MaildropRealm(self._kept_maildir(tmp_path)), [self._passwd(tmp_path)])
        )
        first = Wire(factory)
        assert first.login() == b"+OK maildrop has 1 messages (22 octets)\r\n"
        assert Wire(factory).login() == (b"-ERR [IN-USE] maildrop is locked by another session\r\n")
        assert first.command(b"QUIT") == b"+OK bye\r\n"
        first.disconnect()
        assert Wire(factory).login() == b"+OK maildrop has 1 messages (22 octets)\r\n"

    def test_refusals_known_at_once(self, tmp_path: Path) -> None:
        from .conftest import Wire

        store = self._kept_maildir(tmp_path)
        factory = self._factory(build_portal(MaildropRealm(store), [self._passwd(tmp_path)]))
        wrong = b"-ERR [AUTH] invalid user name or password\r\n"
        assert Wire(factory).login(b"alice", b"rabbit") == wrong
        assert Wire(factory).login(b"nobody", b"rabbit") == wrong
        (tmp_path / "refusing").mkdir()
        refusing = self._passwd(tmp_path / "refusing", b"nologin reason=moved")
        factory = self._factory(build_portal(MaildropRealm(store), [refusing]))
        assert Wire(factory).login() == b"-ERR [AUTH] moved\r\n"

    def test_a_refusal_at_once_then_an_answer_later(self, tmp_path: Path) -> None:
        from .conftest import Wire

        @implementer(ICredentialsChecker)
        class Later:
            credentialInterfaces = (IUsernamePassword,)

            def __init__(self) -> None:
                self.asked: list[Deferred[bytes]] = []

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                self.asked.append(Deferred())
                return self.asked[-1]

        store = MemoryStore()
        store.deliver("alice", b"Subject: x\n\nbody\n")
        later = Later()
        checker = FirstMatchChecker([self._passwd(tmp_path), later], [IUsernamePassword])
        wire = Wire(self._factory(Portal(MaildropRealm(store), [checker])))
        assert wire.login(b"alice", b"other") == b""  # passwd-file said no: the next is asked
        later.asked[0].callback(b"alice")
        assert wire.take() == b"+OK maildrop has 1 messages (20 octets)\r\n"
        assert wire.command(b"QUIT") == b"+OK bye\r\n"
        wire.disconnect()
        # The other order: the later checker refuses, passwd-file accepts at once.
        checker = FirstMatchChecker([later, self._passwd(tmp_path)], [IUsernamePassword])
        wire = Wire(self._factory(Portal(MaildropRealm(store), [checker])))
        assert wire.login() == b""
        later.asked[1].errback(UnauthorizedLogin())
        assert wire.take() == b"+OK maildrop has 1 messages (20 octets)\r\n"

    @pytest.mark.parametrize(
        "error,reply",
        [
            (RuntimeError("boom"), b"-ERR [AUTH] invalid user name or password\r\n"),
            (
                AuthUnavailable(),
                b"-ERR [SYS/TEMP] authentication service unavailable, try again later\r\n",
            ),
        ],
    )
    def test_a_checker_that_breaks_at_once(
        self, error: Exception, reply: bytes, logged: Logged
    ) -> None:
        from .conftest import Wire

        @implementer(ICredentialsChecker, IAvatarIdAtOnce)
        class Breaking:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                raise AssertionError("asked at once")

            def avatar_id_at_once(self, credentials: object) -> bytes:
                raise error

        checker = FirstMatchChecker([Breaking()], [IUsernamePassword])
        wire = Wire(self._factory(Portal(MaildropRealm(MemoryStore()), [checker])))
        assert wire.login() == reply
        # A broken checker is logged, with what broke; the client reads none of it.
        broken = logged.texts("credentials checker")
        assert len(broken) == (1 if isinstance(error, RuntimeError) else 0)
        assert b"boom" not in reply and b"Traceback" not in reply


class TestLoginAtOnceIsThePortalsLogin:
    """
    `pop3d.credchecks.login_at_once` chooses the checker as twisted.cred's
    ``Portal.login`` does, for every credentials type a passwd-file verifies
    (USER/PASS, APOP, CRAM-MD5): the same user for the right secret, the
    same refusal for a wrong one, whichever checker answers at once.
    """

    @staticmethod
    def _credentials(right: bool) -> list[object]:
        password = b"wonderland" if right else b"rabbit"
        challenge = b"<1896.697170952@pop.example.test>"
        digest = hashlib.md5(challenge + password).hexdigest().encode("ascii")
        response = hmac.new(password, challenge, hashlib.md5).hexdigest().encode("ascii")
        return [
            UsernamePassword(b"alice", password),
            PreparedUsernamePassword(b"alice", password),
            APOPCredentials(challenge, b"alice", digest),
            CramMD5Credentials(b"alice", challenge, response),
        ]

    @pytest_twisted.ensureDeferred
    @pytest.mark.parametrize("right", [True, False], ids=["right secret", "wrong secret"])
    async def test_every_credentials_type(self, tmp_path: Path, right: bool) -> None:
        passwd = tmp_path / "passwd"
        passwd.write_bytes(b"alice:{PLAIN}wonderland::\n")
        store = MemoryStore()
        store.deliver("alice", b"Subject: one\n\nbody\n")
        portal = build_portal(MaildropRealm(store), [PasswdFileChecker(str(passwd))])
        for credentials in self._credentials(right):
            by_portal: object
            try:
                _, avatar, _ = await portal.login(credentials, None, IMaildrop)
                by_portal = len(IMaildrop(avatar).messages)
                await IMaildrop(avatar).close()
            except UnauthorizedLogin as refusal:
                by_portal = type(refusal)
            answer = login_at_once(portal, credentials, None, IMaildrop)
            if isinstance(answer, Deferred):
                answer = await answer.addErrback(lambda failure: failure)
            if isinstance(answer, Failure):
                at_once: object = answer.type
            else:
                avatar = cast("tuple[Any, Any, Any]", answer)[1]
                at_once = len(IMaildrop(avatar).messages)
                await IMaildrop(avatar).close()
            assert at_once == by_portal == (1 if right else UnauthorizedLogin), credentials
