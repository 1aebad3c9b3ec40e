"""
SASLprep (RFC 4013), which RFC 6856 section 2.2 names for UTF-8 user names
and passwords: the examples of RFC 4013 section 3, and what
`prepare_credential` leaves alone.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3d.saslprep import SASLprepError, prepare_credential, saslprep


@pytest.mark.parametrize(
    "given_text,prepared",
    [
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC, matches the first
    ],
)
def test_rfc4013_section_3_examples(given_text: str, prepared: str) -> None:
    assert saslprep(given_text) == prepared


@pytest.mark.parametrize(
    "refused",
    [
        "\u0007",  # prohibited: ASCII control (RFC 4013 section 3, example 6)
        "\u0627\u0031",  # bidirectional check (example 7)
        "a\ue000",  # private use (RFC 3454 C.3)
        "a\u200e",  # LEFT-TO-RIGHT MARK (C.8)
        "\u0627a\u0627",  # right-to-left mixed with left-to-right
    ],
)
def test_rfc4013_refusals(refused: str) -> None:
    with pytest.raises(SASLprepError):
        saslprep(refused)


def test_non_ascii_space_becomes_space() -> None:
    """RFC 4013 section 2.1: NO-BREAK SPACE (C.1.2) maps to SPACE."""
    assert saslprep("p\u00a0w") == "p w"


def test_unassigned_code_points_only_in_queries() -> None:
    """RFC 3454 section 7: allowed in a query string, refused in a stored one."""
    unassigned = "\u0221"  # unassigned in Unicode 3.2
    assert saslprep(unassigned) == unassigned
    with pytest.raises(SASLprepError):
        saslprep(unassigned, stored=True)


def test_nfc_and_nfd_become_one_name() -> None:
    nfc = "\u00e9lise".encode()
    nfd = "e\u0301lise".encode()
    assert prepare_credential(nfd) == prepare_credential(nfc) == b"\xc3\xa9lise"


def test_right_to_left_alone_is_allowed() -> None:
    assert saslprep("\u0627\u0628") == "\u0627\u0628"


@pytest.mark.parametrize(
    "octets",
    [
        b"alice",
        b"tab\there",  # an ASCII control: PASS always took it
        b"p\xe4ss",  # Latin-1, not UTF-8: a legacy client's password
        b"\xff\xfe",
    ],
)
def test_what_passes_unchanged(octets: bytes) -> None:
    assert prepare_credential(octets) == octets


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_printable_ascii_is_never_changed(text: str) -> None:
    """Every login that worked before UTF-8 support works the same."""
    assert prepare_credential(text.encode("ascii")) == text.encode("ascii")
    assert saslprep(text) == text
