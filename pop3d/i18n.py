"""
The languages of reply texts (RFC 6856 section 3, the LANG command).

Replies are made in English: their texts are the message ids of GNU gettext
catalogs, ``pop3d/locale/<tag>/LC_MESSAGES/pop3d.mo``, compiled from the
``.po`` beside them (``msgfmt -o pop3d.mo pop3d.po``; a test checks that the
two agree).  A session words its replies through a `Wording` once the client
chose a language; response codes and machine-read parts (STAT, LIST and UIDL
lines, RETR's octet count) are never in a catalog, so never translated.

The catalogs are read once, when this module is imported; sessions only look
texts up.
"""

from __future__ import annotations

import gettext
import re
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "pop3d"
LOCALE_DIRECTORY = Path(__file__).parent / "locale"

#: The tag of the texts as written in the code.
ENGLISH = "en"

#: Every catalog translates this message id to the name of its language in
#: the language itself: the description in LANG's listing.
LANGUAGE_NAME = "English"

# RFC 4647 section 2.1: basic-language-range = (1*8ALPHA *("-" 1*8alphanum)) / "*"
_BASIC_RANGE = re.compile(r"\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")


@dataclass(frozen=True, eq=False)
class Language:
    """One language replies can be worded in."""

    #: RFC 5646 language tag, as LANG names it: "en", "de".
    tag: str
    catalog: gettext.NullTranslations = field(repr=False)

    @property
    def name(self) -> str:
        """The language's name in the language itself (RFC 6856 section 3.2)."""
        return self.catalog.gettext(LANGUAGE_NAME)


@dataclass(frozen=True)
class Wording:
    """
    A `pop3d.wire.Translator`: a session's language, and whether its texts
    may be UTF-8 (RFC 6856: after LANG, whatever language; after UTF8).
    """

    language: Language
    utf8: bool

    def translate(self, text: str) -> str:
        return self.language.catalog.gettext(text)


class Languages:
    """
    The languages a server offers, English first; ``preferred`` is the one
    ``LANG *`` chooses (the administrator's, RFC 6856 section 3.2).
    """

    def __init__(self, languages: list[Language], preferred: str = ENGLISH) -> None:
        self._by_tag = {language.tag.lower(): language for language in languages}
        self.all = tuple(languages)
        #: The texts as the code writes them, whether listed or not.
        self.english = self._by_tag.get(ENGLISH) or Language(ENGLISH, gettext.NullTranslations())
        found = self.lookup(preferred)
        if found is None:
            raise ValueError(f"no such language: {preferred!r}")
        self.preferred = found

    def lookup(self, language_range: str) -> Language | None:
        """
        The language LANG chooses for ``language_range`` (a basic language
        range, RFC 4647 section 2.1; case does not matter): "*" is the
        preferred one; otherwise the first tag found by RFC 4647 section 3.4
        lookup, which drops subtags from the end ("de-CH-1996", "de-CH",
        "de").  None for none, or for a malformed range.
        """
        if not _BASIC_RANGE.fullmatch(language_range):
            return None
        if language_range == "*":
            return self.preferred
        candidate = language_range.lower()
        while candidate:
            found = self._by_tag.get(candidate)
            if found is not None:
                return found
            candidate = candidate.rpartition("-")[0]
            # RFC 4647 section 3.4: a single-letter subtag ("x", "i") is
            # dropped together with the subtag before it.
            if len(candidate) > 1 and candidate[-2:-1] == "-":
                candidate = candidate[:-2]
        return None

    def with_preferred(self, tag: str) -> Languages:
        """The same languages, ``tag`` the one ``LANG *`` chooses."""
        return Languages(list(self.all), tag)


def load_languages(directory: Path = LOCALE_DIRECTORY) -> Languages:
    """English and every language with a compiled catalog in ``directory``."""
    languages = [Language(ENGLISH, gettext.NullTranslations())]
    for catalog_file in sorted(directory.glob(f"*/LC_MESSAGES/{DOMAIN}.mo")):
        tag = catalog_file.parent.parent.name
        catalog = gettext.translation(DOMAIN, directory, languages=[tag])
        languages.append(Language(tag, catalog))
    return Languages(languages)


#: What this package ships.
BUILTIN_LANGUAGES = load_languages()
