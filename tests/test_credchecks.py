"""
The registry of credential checks (pop3d.credchecks) and the line between
SASL mechanisms and POP3: mechanisms see what the server can verify, never
the portal, and say why they fail, never how POP3 words it.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure
from zope.interface import implementer

import pop3d.sasl
from pop3d.checkers import PasswdFileChecker, PasswdFileError, read_passwd_file
from pop3d.credchecks import (
    PASSWORD_CHECKS,
    PasswordCheck,
    PasswordChecks,
    PasswordEntry,
    PasswordVerifier,
    PortalVerifiers,
    StoredPasswordLookup,
    most_specific_first,
)
from pop3d.credentials import PreparedUsernamePassword
from pop3d.driver import APOPCredentials, sasl_failure_status
from pop3d.passwords import SCHEMES, PasswordSchemeError
from pop3d.realm import MaildropRealm
from pop3d.sasl import (
    ICramMD5Credentials,
    IScramKeySource,
    IScramSHA256Credentials,
    SASLError,
    SASLFailure,
    ScramKeys,
)
from pop3d.sasl.cram_md5 import CramMD5Credentials
from pop3d.sasl.scram import ScramCredentials
from pop3d.testing import MemoryStore

from .test_cred import BLF_HORSE, SHA512_HORSE, FakeThreadingReactor, SpyScheme

#: What a mechanism must not know: POP3's replies and states, the portal.
POP3_SIDE = {
    "pop3d.wire",
    "pop3d.errors",
    "pop3d.session",
    "pop3d.driver",
    "pop3d.protocol",
    "pop3d.factory",
    "pop3d.checkers",
    "pop3d.tap",
    "twisted.cred.portal",
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_mechanisms_know_neither_pop3_nor_the_portal() -> None:
    package = Path(pop3d.sasl.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {path.name for path in modules} >= {
        "__init__.py",
        "plain.py",
        "login.py",
        "cram_md5.py",
        "scram.py",
    }
    for path in modules:
        assert imported_modules(path) & POP3_SIDE == set(), path.name


def test_each_failure_is_worded_in_one_place() -> None:
    """RFC 5034 section 4: -ERR; [AUTH] (RFC 3206) only for another identity."""
    replies = {
        failure: sasl_failure_status(SASLError("why", failure)).to_bytes()
        for failure in SASLFailure
    }
    assert replies == {
        SASLFailure.MALFORMED: b"-ERR why\r\n",
        SASLFailure.UNSUPPORTED: b"-ERR why\r\n",
        SASLFailure.UNEXPECTED: b"-ERR why\r\n",
        SASLFailure.NOT_AUTHORIZED: b"-ERR [AUTH] why\r\n",
    }


def test_most_specific_first() -> None:
    given = [IUsernameHashedPassword, IUsernamePassword, ICramMD5Credentials, IUsernamePassword]
    assert most_specific_first(given) == [
        ICramMD5Credentials,
        IUsernameHashedPassword,
        IUsernamePassword,
    ]


@implementer(ICredentialsChecker, IScramKeySource)
class _Keys:
    credentialInterfaces = (IScramSHA256Credentials,)

    def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
        return succeed(None)

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        raise NotImplementedError


class TestPortalVerifiers:
    def test_a_derived_type_is_verified_by_its_base_types_checker(self) -> None:
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        verifiers = PortalVerifiers(Portal(MaildropRealm(MemoryStore()), [memory]))
        assert verifiers.can_verify(IUsernamePassword)
        assert verifiers.can_verify(ICramMD5Credentials)  # through IUsernameHashedPassword
        assert not verifiers.can_verify(IScramSHA256Credentials)
        assert verifiers.lookup(IScramSHA256Credentials, IScramKeySource) is None

    def test_lookup_gives_the_checkers_add_on_interface(self) -> None:
        keys = _Keys()
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        portal = Portal(MaildropRealm(MemoryStore()), [memory])
        verifiers = PortalVerifiers(portal)
        assert verifiers.lookup(IUsernamePassword, IScramKeySource) is None
        # Asked each time: a checker added later counts.
        portal.registerChecker(keys)
        assert verifiers.can_verify(IScramSHA256Credentials)
        assert verifiers.lookup(IScramSHA256Credentials, IScramKeySource) is keys


class TestPasswordChecks:
    def test_credentials_go_to_the_check_of_their_most_derived_type(self) -> None:
        cases = [
            (PreparedUsernamePassword(b"a", b"b"), IUsernamePassword),
            (APOPCredentials(b"<1@x>", b"a", b"0" * 32), IUsernameHashedPassword),
            (CramMD5Credentials(b"a", b"<1@x>", b"0" * 32), ICramMD5Credentials),
            (ScramCredentials(b"a", b"m", b"p", b"s", 4096), IScramSHA256Credentials),
        ]
        for credentials, interface in cases:
            check = PASSWORD_CHECKS.for_credentials(credentials)
            assert check is not None and check.interface is interface
        assert PASSWORD_CHECKS.for_credentials(object()) is None

    def test_every_type_a_mechanism_yields_has_a_check(self) -> None:
        assert set(PASSWORD_CHECKS.interfaces()) == {
            IUsernamePassword,
            IUsernameHashedPassword,
            ICramMD5Credentials,
            IScramSHA256Credentials,
        }


class TestPasswordVerifier:
    """
    The one way every stored-password checker (passwd-file, SQL, LDAP)
    checks a password: slow schemes in the thread pool, a bounded number at
    once, and an unknown user against a dummy so that it takes as long.
    """

    def test_an_unknown_user_verifies_a_dummy_of_the_same_scheme_and_cost(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        bcrypt = SpyScheme(monkeypatch, "BLF-CRYPT")
        sha = SpyScheme(monkeypatch, "SHA512-CRYPT")
        verifier = PasswordVerifier()
        like = PasswordEntry("BLF-CRYPT", BLF_HORSE)
        for password in [b"correct horse", b"pencil"]:
            assert verifier.check(None, password, like).result is False
        assert sha.calls == []
        [first, second] = [secret for _, secret in bcrypt.calls]
        # The same dummy each time, at the usual entry's cost ($05$), never the entry.
        assert first == second
        assert first.startswith(b"$2y$05$") and first != BLF_HORSE
        assert verifier.check(like, b"correct horse", like).result is True

    def test_a_scheme_alone_gives_a_dummy_at_its_default_cost(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sha = SpyScheme(monkeypatch, "SHA512-CRYPT")
        verifier = PasswordVerifier()
        assert verifier.check(None, b"correct horse", SCHEMES["SHA512-CRYPT"]).result is False
        [(_, dummy)] = sha.calls
        assert dummy.startswith(b"$6$") and dummy != SHA512_HORSE

    def test_slow_work_never_exceeds_the_bound(self) -> None:
        reactor = FakeThreadingReactor()
        verifier = PasswordVerifier(cast(IReactorThreads, reactor), max_concurrent=2)
        blf = PasswordEntry("BLF-CRYPT", BLF_HORSE)
        sha = PasswordEntry("SHA512-CRYPT", SHA512_HORSE)
        attempts = [
            verifier.check(blf, b"correct horse", blf),
            verifier.check(None, b"correct horse", blf),
            verifier.check(sha, b"wrong", blf),
            verifier.run_slow(lambda: "other slow work"),
            verifier.check(None, b"correct horse", SCHEMES["SHA512-CRYPT"]),
        ]
        results: list[object] = []
        for attempt in attempts:
            attempt.addBoth(results.append)
        pool = reactor.pool
        assert len(pool.queued) == 2 and results == []
        # A cheap scheme's check does not wait for its turn.
        plain = PasswordEntry("PLAIN", b"tanstaaf")
        assert verifier.check(plain, b"tanstaaf", plain).result is True
        while pool.queued:
            assert len(pool.queued) <= 2
            pool.run_next()
        assert results == [True, False, False, "other slow work", False]

    def test_without_a_reactor_slow_work_runs_inline(self) -> None:
        ran: list[threading.Thread] = []
        done = PasswordVerifier().run_slow(lambda: ran.append(threading.current_thread()))
        assert ran == [threading.current_thread()] and done.called

    def test_the_bound_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            PasswordVerifier(cast(IReactorThreads, FakeThreadingReactor()), max_concurrent=0)

    def test_a_stored_lookup_serves_the_password_checks(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        bcrypt = SpyScheme(monkeypatch, "BLF-CRYPT")
        blf = PasswordEntry("BLF-CRYPT", BLF_HORSE)
        kinds = [blf.kind]
        verifier = PasswordVerifier()

        def login(entry: PasswordEntry | None, password: bytes) -> object:
            lookup = StoredPasswordLookup(
                b"alice", entry, None, verifier, blf, PASSWORD_CHECKS.dummies(kinds)
            )
            credentials = UsernamePassword(b"alice", password)
            check = PASSWORD_CHECKS.for_credentials(credentials)
            assert check is not None
            return check.run(lookup, credentials).result

        assert login(blf, b"correct horse") is True
        assert login(blf, b"wrong") is False
        assert login(None, b"correct horse") is False
        assert len(bcrypt.calls) == 3 and bcrypt.calls[2][1] != BLF_HORSE
        # CRAM-MD5 is checked against its own dummy, of the kind bcrypt files allow.
        assert PASSWORD_CHECKS.possible(kinds) == (IUsernamePassword,)
        assert set(PASSWORD_CHECKS.dummies(kinds)) == {ICramMD5Credentials}


# -- stored passwords: one reading for every password database ----------------------

#: Stored passwords as a database may hold them, and the password each one
#: matches (None: every database refuses the value as unusable).
STORED_PASSWORDS: list[tuple[str, bytes | None]] = [
    ("{PLAIN}pencil", b"pencil"),
    ("{plain}pencil", b"pencil"),
    # Dovecot's aliases: {MD5} is MD5-crypt, {BLF} bcrypt.
    ("{MD5}" + SCHEMES["MD5-CRYPT"].hash(b"pencil").decode(), b"pencil"),
    ("{BLF}" + BLF_HORSE.decode(), b"correct horse"),
    ("{blf-crypt}" + BLF_HORSE.decode(), b"correct horse"),
    ("{SHA512-CRYPT}" + SHA512_HORSE.decode(), b"correct horse"),
    ("{CRAM-MD5}" + SCHEMES["CRAM-MD5"].hash(b"pencil").decode(), b"pencil"),
    ("{SCRAM-SHA-256}" + SCHEMES["SCRAM-SHA-256"].hash(b"pencil").decode(), b"pencil"),
    ("{NOSUCH}pencil", None),
    ("{SHA512-CRYPT}not a crypt string", None),
    ("{SSHA}c2hvcnQ=", None),
    ("{BLF-CRYPT}$2b$05$short", None),
]


def passwd_file_reads(stored: str) -> PasswordEntry | None:
    """What a passwd-file makes of ``stored`` (None: it refuses the file)."""
    try:
        entries = read_passwd_file(b"user:" + stored.encode() + b"::\n")[0]
    except PasswdFileError:
        return None
    return entries[b"user"]


class TestParsingStoredPasswords:
    @pytest.mark.parametrize("stored,password", STORED_PASSWORDS)
    def test_passwd_file_and_sql_read_a_stored_password_alike(
        self, stored: str, password: bytes | None
    ) -> None:
        """passwd-file and an SQL row (``password`` field) accept and refuse the same values."""
        from pop3d.authdb.sql import RowError, parse_passdb_row

        in_file = passwd_file_reads(stored)
        try:
            in_sql: PasswordEntry | None = parse_passdb_row(
                {"password": stored}, SCHEMES["PLAIN"]
            ).entry
        except RowError:
            in_sql = None
        assert in_file == in_sql
        if password is None:
            assert in_file is None
        else:
            assert in_file is not None
            assert in_file.kind.verify(in_file.secret, password)
            assert not in_file.kind.verify(in_file.secret, password + b"x")

    def test_without_a_prefix_the_default_scheme(self) -> None:
        crypt = SCHEMES["SHA512-CRYPT"]
        assert PasswordEntry.parse(SHA512_HORSE, crypt) == PasswordEntry(
            "SHA512-CRYPT", SHA512_HORSE
        )
        # password_noscheme: a brace is part of the secret.
        assert PasswordEntry.parse(b"{x}y", SCHEMES["PLAIN"], noscheme=True) == PasswordEntry(
            "PLAIN", b"{x}y"
        )
        with pytest.raises(PasswordSchemeError, match=r"no \{SCHEME\} prefix"):
            PasswordEntry.parse(b"pencil")

    def test_errors_never_repeat_the_secret(self) -> None:
        with pytest.raises(PasswordSchemeError) as error:
            PasswordEntry.parse(b"{SHA512-CRYPT}my secret value")
        assert str(error.value).startswith("malformed {SHA512-CRYPT} password: ")
        assert "my secret value" not in str(error.value)


class TestAPasswordCheckOfItsOwn:
    """
    A credential type's check registered by another module (the module
    docstring's extension point) is given a `PasswordLookup` whose
    ``check_password`` answers in a Deferred, for a cheap scheme too: the
    at-once answer pop3d's own checks use is a separate method.
    """

    def test_a_check_that_waits_on_check_password(self, tmp_path: Path) -> None:
        def verify(lookup: Any, credentials: Any) -> Deferred[bool]:
            return lookup.check_password(credentials.password).addCallback(bool)

        path = tmp_path / "passwd"
        path.write_bytes(b"alice:{PLAIN}wonderland::\n")
        checker = PasswdFileChecker(
            str(path), PasswordChecks([PasswordCheck(IUsernamePassword, verify)])
        )
        answers: list[object] = []
        checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")).addBoth(answers.append)
        assert answers == [b"alice"]
        checker.requestAvatarId(UsernamePassword(b"alice", b"rabbit")).addBoth(answers.append)
        assert isinstance(answers[1], Failure) and answers[1].check(UnauthorizedLogin)
