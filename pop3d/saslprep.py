"""
SASLprep (RFC 4013), the stringprep profile (RFC 3454) that RFC 6856
section 2.2 names for UTF-8 user names and passwords in USER, PASS and APOP,
and that RFC 4616 (SASL PLAIN) names for its fields.

The tables are Python's `stringprep` module, which is RFC 3454's Unicode 3.2
exactly; normalisation is NFKC of the same Unicode version.  Nothing here does
I/O.  `prepare_credential` is what the session and the mechanisms use: it
leaves octets that are not UTF-8 text alone (see there).
"""

from __future__ import annotations

import stringprep
import unicodedata

_UNICODE_3_2 = unicodedata.ucd_3_2_0


class SASLprepError(ValueError):
    """A string SASLprep refuses: a prohibited character, or mixed directions."""


def saslprep(text: str, *, stored: bool = False) -> str:
    """
    Prepare ``text`` by RFC 4013.  ``stored``: a stored string (RFC 3454
    section 7), in which unassigned code points are refused; otherwise a
    query string, in which they are allowed.  Raises `SASLprepError`.
    """
    # RFC 4013 section 2.1: non-ASCII spaces become SPACE; what is "commonly
    # mapped to nothing" (soft hyphen, zero-width joiners, ...) is removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    # Section 2.2: Unicode normalisation form KC.
    normalized = _UNICODE_3_2.normalize("NFKC", mapped)
    for character in normalized:
        # Section 2.3, and unassigned code points (RFC 3454 section 7).
        if _prohibited(character) or (stored and stringprep.in_table_a1(character)):
            raise SASLprepError(f"character U+{ord(character):04X} is not allowed")
    _check_bidi(normalized)
    return normalized


def _prohibited(c: str) -> bool:
    return (
        stringprep.in_table_c12(c)
        or stringprep.in_table_c21_c22(c)
        or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c)
        or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c)
        or stringprep.in_table_c9(c)
    )


def _check_bidi(text: str) -> None:
    """RFC 3454 section 6: right-to-left text is wholly right-to-left."""
    if not any(stringprep.in_table_d1(c) for c in text):
        return
    if any(stringprep.in_table_d2(c) for c in text):
        raise SASLprepError("left-to-right and right-to-left characters are mixed")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise SASLprepError("right-to-left text must start and end with a right-to-left character")


def prepare_credential(value: bytes, *, stored: bool = False) -> bytes:
    """
    A user name or password as it reaches the checkers: UTF-8 text prepared
    by SASLprep, so that ``élise`` typed as NFC or NFD (or with a non-ASCII
    space) is one name.

    Two kinds of octets pass unchanged, so that no login that worked before
    UTF-8 support stops working: ASCII (which SASLprep leaves as it is,
    apart from refusing control characters, which a password sent by PASS
    could always hold), and octets that are not UTF-8 at all (a Latin-1
    password of a client that never asked for UTF-8; the session refuses
    those once the client did, RFC 6856 section 2.2).  Raises
    `SASLprepError` for UTF-8 text SASLprep refuses.
    """
    if value.isascii():
        return value
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return value
    return saslprep(text, stored=stored).encode("utf-8")
