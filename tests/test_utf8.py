"""
RFC 6856 sections 2 and 5: the UTF8 capability and command, UTF-8 user
names and passwords prepared with SASLprep, messages with UTF-8 headers
served as stored; bytes in, bytes out, and poplib against the real server.

pop3d announces ``UTF8 USER`` (section 2.2): UTF-8 names and passwords are
taken before UTF8 too.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm, is_safe_mailbox_name
from pop3d.session import SessionPolicy
from pop3d.stores.common import expand_template
from pop3d.stores.interfaces import IMaildrop
from pop3d.testing import MemoryStore, deliver_to_maildir, memory_portal
from pop3d.tls import ServerTLS

from .conftest import USERS, RunningServer, Wire
from .test_endpoints import _self_signed

# "élise" and "pässword" as a passwd-file holds them (NFC), and as a client
# on macOS may send them (NFD: a letter, then its combining accent).
ELISE_NFC = b"\xc3\xa9lise"
ELISE_NFD = b"e\xcc\x81lise"
PASSWORD_NFC = b"p\xc3\xa4ssword"
PASSWORD_NFD = b"pa\xcc\x88ssword"

# RFC 6532 headers: UTF-8 as it is, stored with CRLF.
UTF8_MESSAGE = (
    b"From: \xc3\x89lise <elise@example.test>\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"\r\n"
    b"Preis: 5 \xe2\x82\xac\r\n"
)

LOGGED_IN = b"+OK maildrop has 1 messages (79 octets)\r\n"
UTF8_ENABLED = b"+OK UTF-8 mode enabled\r\n"
AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"


@pytest.fixture
def elise_factory(clock: Clock, store: MemoryStore) -> POP3Factory:
    store.deliver("\u00e9lise", UTF8_MESSAGE)
    users = {**USERS, ELISE_NFC.decode(): PASSWORD_NFC.decode()}
    return POP3Factory(
        memory_portal(store, users),
        clock=clock,
        hostname="pop.example.test",
        policy=SessionPolicy(),
        login_failure_delay=0,
    )


@pytest.fixture
def elise(elise_factory: POP3Factory) -> Wire:
    return Wire(elise_factory)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class TestCapability:
    """RFC 6856 sections 2 and 3.1: announced in both states, alike."""

    def test_before_login(self, elise: Wire) -> None:
        capa = elise.command(b"CAPA")
        assert capa.startswith(b"+OK capability list follows\r\n")
        assert b"\r\nUTF8 USER\r\nLANG\r\n" in capa

    def test_after_login(self, elise: Wire) -> None:
        elise.login(ELISE_NFC, PASSWORD_NFC)
        capa = elise.command(b"CAPA")
        assert b"\r\nUTF8 USER\r\nLANG\r\nIMPLEMENTATION pop3d\r\n.\r\n" in capa

    def test_after_the_utf8_command(self, elise: Wire) -> None:
        assert elise.command(b"UTF8") == UTF8_ENABLED
        assert b"\r\nUTF8 USER\r\nLANG\r\n" in elise.command(b"CAPA")


class TestUTF8Command:
    """RFC 6856 section 2.1: no arguments, AUTHORIZATION state only."""

    def test_accepted_before_login(self, elise: Wire) -> None:
        assert elise.command(b"UTF8") == UTF8_ENABLED
        # Replies stay as they were: English, ASCII.
        assert elise.command(b"FOO") == b"-ERR unknown command\r\n"

    def test_refused_after_login(self, elise: Wire) -> None:
        assert elise.login(ELISE_NFC, PASSWORD_NFC) == LOGGED_IN
        assert elise.command(b"UTF8") == b"-ERR command not valid in this state\r\n"
        assert elise.command(b"STAT") == b"+OK 1 79\r\n"

    def test_takes_no_argument(self, elise: Wire) -> None:
        assert elise.command(b"UTF8 USER") == b"-ERR usage: UTF8\r\n"

    def test_after_utf8_logins_still_work(self, elise: Wire) -> None:
        assert elise.command(b"UTF8") == UTF8_ENABLED
        assert elise.login(b"alice", b"wonderland").startswith(b"+OK maildrop has 0 messages")


class TestUTF8Credentials:
    """
    RFC 6856 section 2.2: UTF-8 names and passwords, SASLprep'd (RFC 4013)
    before the checkers see them, so NFC and NFD forms are the same login.
    """

    @pytest.mark.parametrize("name", [ELISE_NFC, ELISE_NFD])
    @pytest.mark.parametrize("password", [PASSWORD_NFC, PASSWORD_NFD])
    @pytest.mark.parametrize("utf8_first", [False, True])
    def test_user_pass_nfc_or_nfd(
        self, elise: Wire, name: bytes, password: bytes, utf8_first: bool
    ) -> None:
        if utf8_first:
            assert elise.command(b"UTF8") == UTF8_ENABLED
        # Before UTF8 too: the server announces "UTF8 USER".
        assert elise.command(b"USER " + name) == b"+OK send PASS\r\n"
        assert elise.command(b"PASS " + password) == LOGGED_IN

    def test_wrong_password(self, elise: Wire) -> None:
        elise.command(b"USER " + ELISE_NFD)
        assert elise.command(b"PASS p\xc3\xa4sswort") == AUTH_FAILED

    def test_apop_with_a_utf8_name(self, elise: Wire) -> None:
        """The digest is over the SASLprep'd secret (a "stored" string)."""
        timestamp = re.search(rb"<[^>]+>", elise.greeting)
        assert timestamp is not None
        digest = hashlib.md5(timestamp.group() + PASSWORD_NFC).hexdigest().encode()
        assert elise.command(b"APOP " + ELISE_NFD + b" " + digest) == LOGGED_IN

    def test_sasl_plain(self, elise: Wire) -> None:
        """RFC 4616 section 2: PLAIN's fields are UTF-8, SASLprep'd."""
        response = b64(b"\x00" + ELISE_NFD + b"\x00" + PASSWORD_NFD)
        assert elise.command(b"AUTH PLAIN " + response) == LOGGED_IN

    def test_sasl_plain_authzid_in_another_form(self, elise: Wire) -> None:
        response = b64(ELISE_NFC + b"\x00" + ELISE_NFD + b"\x00" + PASSWORD_NFC)
        assert elise.command(b"AUTH PLAIN " + response) == LOGGED_IN

    def test_sasl_login(self, elise: Wire) -> None:
        assert elise.command(b"AUTH LOGIN " + b64(ELISE_NFD)) == b"+ " + b64(b"Password:") + b"\r\n"
        assert elise.command(b64(PASSWORD_NFD)) == LOGGED_IN

    def test_sasl_plain_refuses_what_saslprep_refuses(self, elise: Wire) -> None:
        response = b64(b"\x00" + ELISE_NFC + b"\x00pass\xee\x80\x80")  # U+E000, private use
        assert elise.command(b"AUTH PLAIN " + response) == (
            b"-ERR the user name or password contains characters that are not allowed\r\n"
        )

    def test_user_with_a_prohibited_character(self, elise: Wire) -> None:
        """RFC 6856 section 2.2: "servers MUST reject" SASLprep's prohibited characters."""
        # U+200E LEFT-TO-RIGHT MARK (RFC 3454 table C.8).
        assert elise.command(b"USER elise\xe2\x80\x8e") == (
            b"-ERR the user name contains characters that are not allowed\r\n"
        )
        assert elise.command(b"PASS x") == b"-ERR send USER first\r\n"

    def test_password_with_a_prohibited_character(self, elise: Wire) -> None:
        elise.command(b"USER " + ELISE_NFC)
        assert elise.command(b"PASS pass\xee\x80\x80") == (
            b"-ERR the password contains characters that are not allowed\r\n"
        )

    def test_user_that_is_not_utf8(self, elise: Wire) -> None:
        """RFC 6856 section 2.2: names that are not UTF-8 are refused."""
        assert elise.command(b"USER \xe9lise") == b"-ERR arguments are UTF-8\r\n"

    def test_password_that_is_not_utf8_after_utf8(self, elise: Wire) -> None:
        elise.command(b"UTF8")
        elise.command(b"USER " + ELISE_NFC)
        assert elise.command(b"PASS p\xe4ssword") == b"-ERR arguments are UTF-8\r\n"


def test_a_legacy_latin1_password_still_logs_in(clock: Clock, store: MemoryStore) -> None:
    """
    A client that never sent UTF8 and whose password is Latin-1 octets logs
    in as before UTF-8 support: such octets are compared as they are.
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"legacy", b"p\xe4ss")
    portal = Portal(MaildropRealm(store), [checker])
    wire = Wire(POP3Factory(portal, clock=clock, hostname="pop.example.test"))
    wire.command(b"USER legacy")
    assert wire.command(b"PASS p\xe4ss") == b"+OK maildrop has 0 messages (0 octets)\r\n"


def test_stls_refused_after_utf8(clock: Clock, store: MemoryStore, tmp_path: Path) -> None:
    """RFC 6856 section 2.1: clients MUST NOT send STLS after UTF8; servers MAY refuse it."""
    key, cert = _self_signed(tmp_path)
    factory = POP3Factory(
        memory_portal(store, USERS),
        clock=clock,
        hostname="pop.example.test",
        tls=ServerTLS(str(cert), str(key)),
    )
    wire = Wire(factory)
    assert b"\r\nSTLS\r\n" in wire.command(b"CAPA")
    assert wire.command(b"UTF8") == UTF8_ENABLED
    assert b"STLS" not in wire.command(b"CAPA")
    assert wire.command(b"STLS") == b"-ERR STLS is not allowed after UTF8\r\n"


class TestUTF8Messages:
    """
    RFC 6856 section 2.1: "if the character encoding format of maildrops is
    UTF-8 or ASCII, the messages are sent to the client as is".
    """

    @pytest.mark.parametrize("utf8_first", [True, False])
    def test_retr_is_byte_exact(self, elise: Wire, utf8_first: bool) -> None:
        if utf8_first:
            elise.command(b"UTF8")
        elise.login(ELISE_NFC, PASSWORD_NFC)
        assert elise.command(b"RETR 1") == b"+OK 79 octets\r\n" + UTF8_MESSAGE + b".\r\n"

    def test_top_is_byte_exact(self, elise: Wire) -> None:
        elise.command(b"UTF8")
        elise.login(ELISE_NFC, PASSWORD_NFC)
        assert elise.command(b"TOP 1 0") == (
            b"+OK top of message follows\r\n"
            + UTF8_MESSAGE.split(b"\r\n\r\n")[0]
            + b"\r\n\r\n.\r\n"
        )


class TestMailboxNames:
    """UTF-8 names find their maildirs; unsafe ones still find none."""

    def test_template_with_a_utf8_name(self) -> None:
        assert expand_template("/srv/mail/{user}", "\u00e9lise") == "/srv/mail/\u00e9lise"
        assert (
            expand_template("/srv/{domain}/{local}", "\u00e9lise@ex\u00e4mple.test")
            == "/srv/ex\u00e4mple.test/\u00e9lise"
        )

    @pytest.mark.parametrize(
        "name",
        [
            "\u00e9lise/../bob",
            "..\u00e9",
            "\u00e9lise\u0085",  # NEXT LINE, a C1 control
            "\u00e9\u009b[2J",  # CSI, a C1 control
            "\u00e9lise\u2028x",  # LINE SEPARATOR
            "eli\u202ees",  # RIGHT-TO-LEFT OVERRIDE: shows another name
            "eli\u200bse",  # ZERO WIDTH SPACE: looks like "elise"
            "\ue000lise",  # private use
            "\u0378lise",  # unassigned
        ],
    )
    def test_unsafe_utf8_names(self, name: str) -> None:
        assert not is_safe_mailbox_name(name)

    @pytest_twisted.ensureDeferred
    async def test_realm_opens_a_utf8_maildrop(self) -> None:
        store = MemoryStore()
        store.deliver("\u00e9lise", UTF8_MESSAGE)
        _, avatar, _ = await MaildropRealm(store).requestAvatar(ELISE_NFC, None, IMaildrop)
        maildrop = IMaildrop(avatar)
        assert len(maildrop.messages) == 1
        assert store.is_locked("\u00e9lise")
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_poplib_utf8_user_against_the_server(running_server: RunningServer) -> None:
    """
    End to end: a passwd-file entry ``élise:{PLAIN}pässword`` (NFC) and the
    Maildir ``élise``; poplib sends UTF8, then the name and password in NFD.
    """
    server = running_server
    passwd = b"alice:{PLAIN}wonderland::\n" + ELISE_NFC + b":{PLAIN}" + PASSWORD_NFC + b"::\n"
    server.passwd.write_bytes(passwd)
    deliver_to_maildir(str(server.maildir("\u00e9lise")), UTF8_MESSAGE)

    def fetch() -> tuple[dict[str, list[str]], bytes, bytes, list[bytes]]:
        client = poplib.POP3(server.host, server.port, timeout=10)
        try:
            capabilities = client.capa()
            enabled = client.utf8()
            client.user(ELISE_NFD.decode())
            logged_in = client.pass_(PASSWORD_NFD.decode())
            _, lines, _ = client.retr(1)
            client.quit()
        finally:
            client.close()
        return capabilities, enabled, logged_in, lines

    capabilities, enabled, logged_in, lines = await deferToThread(fetch)
    assert capabilities["UTF8"] == ["USER"]
    assert "LANG" in capabilities
    assert enabled == b"+OK UTF-8 mode enabled"
    assert logged_in == b"+OK maildrop has 1 messages (79 octets)"
    assert lines == UTF8_MESSAGE.split(b"\r\n")[:-1]


class TestCredentialsStoredBeforePreparation:
    """
    Passwords and names written to a passwd-file as users typed them, before
    pop3d prepared credentials with SASLprep, still log in: SASLprep maps
    ``²`` to ``2`` and a no-break space to a space, and composes NFD, so the
    prepared form alone would no longer match them.
    """

    # "x²y<NO-BREAK SPACE>z": SASLprep makes it "x2y z".
    LEGACY_PASSWORD = "x\u00b2y\u00a0z".encode()

    @pytest.fixture
    def legacy(self, tmp_path: Path, clock: Clock, store: MemoryStore) -> POP3Factory:
        from pop3d.checkers import PasswdFileChecker
        from pop3d.tap import build_portal

        passwd = tmp_path / "passwd"
        passwd.write_bytes(
            b"carol:{PLAIN}"
            + self.LEGACY_PASSWORD
            + b"::\n"
            # A name stored decomposed (NFD), as a macOS editor may save it.
            + ELISE_NFD
            + b":{PLAIN}secret::\n"
        )
        store.deliver("carol", UTF8_MESSAGE)
        store.deliver(ELISE_NFD.decode(), UTF8_MESSAGE)
        portal = build_portal(MaildropRealm(store), [PasswdFileChecker(str(passwd))])
        return POP3Factory(portal, clock=clock, hostname="pop.example.test", login_failure_delay=0)

    def test_a_password_sasl_prep_would_change_still_logs_in(self, legacy: POP3Factory) -> None:
        wire = Wire(legacy)
        assert wire.command(b"USER carol") == b"+OK send PASS\r\n"
        assert wire.command(b"PASS " + self.LEGACY_PASSWORD) == LOGGED_IN

    def test_a_wrong_password_is_still_wrong(self, legacy: POP3Factory) -> None:
        wire = Wire(legacy)
        wire.command(b"USER carol")
        assert wire.command(b"PASS x2y\xc2\xa0q") == AUTH_FAILED

    def test_a_name_stored_decomposed_logs_in_as_sent(self, legacy: POP3Factory) -> None:
        wire = Wire(legacy)
        wire.command(b"USER " + ELISE_NFD)
        assert wire.command(b"PASS secret") == LOGGED_IN

    def test_sasl_plain_with_the_legacy_password(self, legacy: POP3Factory) -> None:
        wire = Wire(legacy)
        response = b64(b"\x00carol\x00" + self.LEGACY_PASSWORD)
        assert wire.command(b"AUTH PLAIN " + response) == LOGGED_IN
