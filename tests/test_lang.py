"""
RFC 6856 section 3: the LANG command, bytes in and bytes out, and the
gettext catalogs behind it.

Only human-readable texts change language: response codes, CAPA, STAT,
LIST and UIDL lines and RETR's octet count are the same in every language
(RFC 1939 section 5 fixes STAT's reply; clients parse the others).  Without
LANG every reply is the English, ASCII text it always was (the other test
modules compare those bytes).
"""

from __future__ import annotations

import gettext
import re
import string
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.python import usage

import pop3d.session
from pop3d.factory import POP3Factory
from pop3d.i18n import BUILTIN_LANGUAGES, LOCALE_DIRECTORY, Language, Languages, Wording
from pop3d.tap import Options
from pop3d.testing import MemoryStore
from pop3d.tls import ServerTLS
from pop3d.wire import ResponseCode, Status, Text, format_status

from .conftest import Wire, require_program
from .test_auth import TLSWire
from .test_endpoints import _self_signed

MESSAGE = b"Subject: one\n\nbody\n"
GERMAN = b"+OK de Sprache ge\xc3\xa4ndert\r\n"
LISTING = b"+OK language listing follows\r\nen English\r\nde Deutsch\r\n.\r\n"


@pytest.fixture
def german(wire: Wire, store: MemoryStore) -> Wire:
    store.deliver("alice", MESSAGE)
    assert wire.command(b"LANG de") == GERMAN
    return wire


def test_capa_announces_lang_in_both_states(wire: Wire) -> None:
    """RFC 6856 section 3.1: "Announced states: both"."""
    assert b"\r\nLANG\r\n" in wire.command(b"CAPA")
    wire.login()
    assert b"\r\nLANG\r\n" in wire.command(b"CAPA")


class TestListing:
    """RFC 6856 section 3.2: "tag SP description", the description in its own language."""

    def test_before_login(self, wire: Wire) -> None:
        assert wire.command(b"LANG") == LISTING

    def test_after_login(self, wire: Wire) -> None:
        wire.login()
        assert wire.command(b"LANG") == LISTING

    def test_listing_heading_in_the_language_chosen(self, wire: Wire) -> None:
        wire.command(b"LANG de")
        assert wire.command(b"LANG") == (
            b"+OK Liste der Sprachen folgt\r\nen English\r\nde Deutsch\r\n.\r\n"
        )


class TestChoosing:
    """RFC 6856 section 3.2: "+OK", a space, the exact tag chosen, a space, text."""

    def test_german_from_its_own_reply_on(self, german: Wire) -> None:
        assert german.command(b"FOO") == b"-ERR unbekannter Befehl\r\n"
        assert german.command(b"STAT") == b"-ERR Befehl in diesem Zustand nicht erlaubt\r\n"
        assert german.command(b"USER alice") == b"+OK bitte PASS senden\r\n"
        assert german.command(b"PASS wonderland") == (
            b"+OK Postfach enth\xc3\xa4lt 1 Nachrichten (22 Oktette)\r\n"
        )

    def test_response_codes_stay(self, german: Wire) -> None:
        """RFC 2449 section 8: codes are for programs, not people."""
        german.command(b"USER alice")
        assert german.command(b"PASS wrong") == (
            b"-ERR [AUTH] ung\xc3\xbcltiger Benutzername oder ung\xc3\xbcltiges Passwort\r\n"
        )

    def test_machine_read_replies_stay(self, german: Wire) -> None:
        german.login()
        assert german.command(b"STAT") == b"+OK 1 22\r\n"
        assert german.command(b"LIST") == b"+OK 1 Nachrichten (22 Oktette)\r\n1 22\r\n.\r\n"
        assert german.command(b"LIST 1") == b"+OK 1 22\r\n"
        assert german.command(b"UIDL 1") == b"+OK 1 mem-1\r\n"
        assert german.command(b"RETR 1") == (b"+OK 22 octets\r\nSubject: one\r\n\r\nbody\r\n.\r\n")
        capa = german.command(b"CAPA")
        assert capa.startswith(b"+OK Liste der F\xc3\xa4higkeiten folgt\r\nTOP\r\nUIDL\r\n")

    def test_errors_and_values_in_german(self, german: Wire) -> None:
        german.login()
        assert german.command(b"RETR 9") == b"-ERR keine solche Nachricht\r\n"
        assert german.command(b"RETR x") == b"-ERR ung\xc3\xbcltige Nachrichtennummer\r\n"
        assert german.command(b"RETR") == b"-ERR Aufruf: RETR msg\r\n"
        assert german.command(b"DELE 1") == b"+OK Nachricht 1 gel\xc3\xb6scht\r\n"
        assert german.command(b"DELE 1") == b"-ERR Nachricht bereits gel\xc3\xb6scht\r\n"
        assert german.command(b"QUIT") == b"+OK auf Wiedersehen\r\n"

    def test_in_the_transaction_state(self, wire: Wire, store: MemoryStore) -> None:
        """RFC 6856 section 3.1: valid in AUTHORIZATION and TRANSACTION."""
        store.deliver("alice", MESSAGE)
        wire.login()
        assert wire.command(b"LANG de") == GERMAN
        assert (
            wire.command(b"RSET") == b"+OK Postfach enth\xc3\xa4lt 1 Nachrichten (22 Oktette)\r\n"
        )

    def test_pipelined_replies_follow_the_change(self, wire: Wire) -> None:
        assert wire.send(b"FOO\r\nLANG de\r\nFOO\r\n") == (
            b"-ERR unknown command\r\n" + GERMAN + b"-ERR unbekannter Befehl\r\n"
        )

    def test_back_to_english(self, german: Wire) -> None:
        assert german.command(b"LANG en") == b"+OK en language changed\r\n"
        assert german.command(b"FOO") == b"-ERR unknown command\r\n"

    @pytest.mark.parametrize(
        "language_range,reply",
        [
            # RFC 4647 section 3.4 lookup: subtags are dropped from the end.
            (b"de-DE", GERMAN),
            (b"de-CH-1996", GERMAN),
            (b"DE", GERMAN),
            (b"en-GB-x-oxendict", b"+OK en language changed\r\n"),
            (b"EN", b"+OK en language changed\r\n"),
        ],
    )
    def test_language_ranges(self, wire: Wire, language_range: bytes, reply: bytes) -> None:
        assert wire.command(b"LANG " + language_range) == reply

    def test_star_chooses_the_administrators_language(self, wire: Wire) -> None:
        """RFC 6856 section 3.2: "*" is the language the administrator prefers."""
        assert wire.command(b"LANG *") == b"+OK en language changed\r\n"

    def test_star_with_german_preferred(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore
    ) -> None:
        wire = Wire(make_factory(languages=BUILTIN_LANGUAGES.with_preferred("de")))
        # Until LANG, English still: the greeting and replies are RFC 1939's.
        assert wire.greeting.startswith(b"+OK pop3d ready <")
        assert wire.command(b"FOO") == b"-ERR unknown command\r\n"
        assert wire.command(b"LANG *") == GERMAN


class TestRefused:
    """RFC 6856 section 3.2: -ERR, and the language stays what it was."""

    def test_unknown_language(self, wire: Wire) -> None:
        assert wire.command(b"LANG xx") == b"-ERR language xx is not available\r\n"
        assert wire.command(b"FOO") == b"-ERR unknown command\r\n"

    def test_unknown_language_in_german(self, german: Wire) -> None:
        assert german.command(b"LANG MUL") == b"-ERR Sprache MUL ist nicht verf\xc3\xbcgbar\r\n"
        assert german.command(b"FOO") == b"-ERR unbekannter Befehl\r\n"

    @pytest.mark.parametrize("language_range", [b"de_DE", b"abcdefghi", b"-de", b"de-", b"de--x"])
    def test_not_a_language_range(self, wire: Wire, language_range: bytes) -> None:
        assert wire.command(b"LANG " + language_range) == (
            b"-ERR language " + language_range + b" is not available\r\n"
        )

    def test_two_arguments(self, wire: Wire) -> None:
        assert wire.command(b"LANG de en") == b"-ERR usage: LANG [language-range]\r\n"


def test_english_unchanged_without_lang(wire: Wire, store: MemoryStore) -> None:
    """No LANG: the bytes of RFC 1939's replies, as before LANG existed."""
    store.deliver("alice", MESSAGE)
    assert wire.command(b"FOO") == b"-ERR unknown command\r\n"
    assert wire.login() == b"+OK maildrop has 1 messages (22 octets)\r\n"
    assert wire.command(b"LIST") == b"+OK 1 messages (22 octets)\r\n1 22\r\n.\r\n"
    assert wire.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert wire.command(b"RETR 1") == b"-ERR no such message\r\n"


def test_language_option(tmp_path: Path) -> None:
    """``--language`` sets what "LANG *" chooses; an unknown one names the option."""
    options = Options()
    arguments = ["--mail-location", f"maildir:{tmp_path}/{{user}}", "--auth", "memory:a:b"]
    options.parseOptions([*arguments, "--language", "de"])
    assert options["languages"].preferred.tag == "de"
    with pytest.raises(usage.UsageError, match=r"^--language fr: not one of en, de$"):
        Options().parseOptions([*arguments, "--language", "fr"])


class TestWording:
    """Formatting for the wire, in `pop3d.wire`."""

    def test_utf8_text_is_cut_between_characters(self) -> None:
        line = format_status(False, "\u00e4" * 300, utf8=True)
        assert len(line) <= 512 and line.endswith(b"\xc3\xa4\r\n")
        line.decode("utf-8")

    def test_controls_never_reach_the_wire(self) -> None:
        assert format_status(True, "a\r\nb\u2028c\u0085", utf8=True) == b"+OK a??b?c?\r\n"
        # Without UTF-8, as before: ASCII only.
        assert format_status(True, "gel\u00f6scht") == b"+OK gel?scht\r\n"

    def test_a_broken_translation_falls_back_to_english(self, wire: Wire) -> None:
        class Broken(gettext.NullTranslations):
            def gettext(self, message: str) -> str:
                return "{nonsense}" if "{" in message else message

        english = BUILTIN_LANGUAGES.all[0]
        broken = Languages([english, Language("xx", Broken())])
        wording = Wording(broken.all[1], utf8=True)
        status = Status(True, Text.of("message {number} deleted", number=1))
        assert status.to_bytes(wording) == b"+OK message 1 deleted\r\n"
        assert status.to_bytes() == b"+OK message 1 deleted\r\n"

    def test_codes_are_never_translated(self) -> None:
        german = Wording(BUILTIN_LANGUAGES.all[1], utf8=True)
        status = Status(False, "maildrop is locked by another session", ResponseCode.IN_USE)
        assert status.to_bytes(german) == (
            b"-ERR [IN-USE] Postfach ist von einer anderen Sitzung gesperrt\r\n"
        )


class TestCatalogs:
    """The .po sources and the .mo files gettext reads."""

    PO = LOCALE_DIRECTORY / "de" / "LC_MESSAGES" / "pop3d.po"
    MO = LOCALE_DIRECTORY / "de" / "LC_MESSAGES" / "pop3d.mo"

    def _entries(self) -> dict[str, str]:
        text = self.PO.read_text(encoding="utf-8")
        pairs = re.findall(r'^msgid "(.*)"\nmsgstr "(.*)"$', text, re.MULTILINE)
        return {msgid: msgstr for msgid, msgstr in pairs if msgid}

    @pytest.mark.peer
    def test_mo_is_compiled_from_the_po(self) -> None:
        """The committed .mo is what msgfmt makes of the .po (so pip needs no tools)."""
        msgfmt = require_program("msgfmt")
        compiled = subprocess.run(
            [msgfmt, "--check", "-o", "-", str(self.PO)], capture_output=True, check=True
        ).stdout
        assert compiled == self.MO.read_bytes()

    def test_every_reply_text_of_the_session_is_translated(self) -> None:
        german = BUILTIN_LANGUAGES.lookup("de")
        assert german is not None
        texts = [
            value
            for name, value in vars(pop3d.session).items()
            if name.isupper() and isinstance(value, str) and name != "DEFAULT_POLICY"
        ]
        assert len(texts) > 30
        untranslated = [text for text in texts if german.catalog.gettext(text) == text]
        assert untranslated == []

    def test_placeholders_are_kept(self) -> None:
        def names(template: str) -> set[str | None]:
            return {field for _, field, _, _ in string.Formatter().parse(template) if field}

        for msgid, msgstr in self._entries().items():
            assert names(msgid) == names(msgstr), msgid

    def test_lang_reply_starts_with_the_tag(self) -> None:
        """RFC 6856 section 3.2: "+OK", the tag, then the text."""
        assert self._entries()["{tag} language changed"].startswith("{tag} ")

    def test_no_stale_message_ids(self) -> None:
        """Every message id is a text of the code (or the language's name)."""
        package = Path(pop3d.session.__file__).parent
        source = "".join(path.read_text() for path in package.rglob("*.py"))
        stale = [msgid for msgid in self._entries() if f'"{msgid}"' not in source]
        assert stale == []


def test_stls_forgets_the_language(
    make_factory: Callable[..., POP3Factory], tmp_path: Path
) -> None:
    """
    RFC 6856 section 7: a LANG inserted before STLS by a man in the middle
    must not outlive the handshake (RFC 2595 section 4: nothing before it
    carries over).
    """
    key, cert = _self_signed(tmp_path)
    wire = TLSWire(make_factory(tls=ServerTLS(str(cert), str(key))))
    assert wire.command(b"LANG de") == GERMAN
    assert wire.command(b"STLS") == b"+OK begin TLS negotiation\r\n"
    assert wire.command(b"FOO") == b"-ERR unknown command\r\n"


def test_utf8_keeps_the_language(german: Wire) -> None:
    assert german.command(b"UTF8") == b"+OK UTF-8-Modus aktiviert\r\n"
    assert german.command(b"FOO") == b"-ERR unbekannter Befehl\r\n"
