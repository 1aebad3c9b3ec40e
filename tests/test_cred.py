"""
Authentication: the realm's name checks, the passwd-file checker, and the
strcred glue.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import makeChecker
from twisted.internet.defer import Deferred
from zope.interface import implementer

from pop3d.checkers import (
    FirstMatchChecker,
    PasswdFileChecker,
    PasswdFileCheckerFactory,
    PasswdFileError,
    accept_wire_bytes,
    parse_passwd_file,
)
from pop3d.interfaces import IMaildrop
from pop3d.realm import MaildropRealm, is_safe_mailbox_name
from pop3d.session import APOPCredentials
from pop3d.testing import MemoryStore


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
    def test_parse(self) -> None:
        entries = parse_passwd_file(PASSWD)
        assert entries[b"alice"].secret == b"wonderland"
        assert entries[b"bob"].scheme == "CLEARTEXT"
        assert b"nopass" not in entries

    @pytest.mark.parametrize(
        "content,message",
        [
            (b"alice:{FOO}x::\n", "unsupported password scheme {FOO}"),
            (b"alice:secret::\n", "no {SCHEME} prefix"),
            (b"justaname\n", "line 1"),
        ],
    )
    def test_errors_name_the_problem(self, content: bytes, message: str) -> None:
        with pytest.raises(PasswdFileError, match=message.replace("{", r"\{")):
            parse_passwd_file(content)

    @pytest.fixture
    def checker(self, tmp_path: Path) -> PasswdFileChecker:
        path = tmp_path / "passwd"
        path.write_bytes(PASSWD)
        return PasswdFileChecker(str(path))

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
    async def test_first_match_tries_every_checker(self) -> None:
        first = InMemoryUsernamePasswordDatabaseDontUse(alice=b"one")
        second = InMemoryUsernamePasswordDatabaseDontUse(bob=b"two")
        chained = FirstMatchChecker([first, second], first.credentialInterfaces)
        assert await chained.requestAvatarId(UsernamePassword(b"bob", b"two")) == b"bob"
        with pytest.raises(UnauthorizedLogin):
            await chained.requestAvatarId(UsernamePassword(b"bob", b"one"))
