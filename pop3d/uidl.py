"""
Unique-id listings compatible with other servers, so that clients of a
migrated server do not download years of mail again.

Dovecot keeps ``dovecot-uidlist`` in the Maildir root (version 3)::

    3 V1795695242 N3 G72cebf168a22086b0e4a000083ecc375
    1 :1795695242.M381375P18958.vm,S=43,W=47
    2 P00000002deadbeef :1795695242.M396959P18962.vm,S=39,W=43

and serves ``pop3_uidl_format`` (``%08xu%08xv`` by default: the IMAP UID
and UIDVALIDITY in hex) unless a message carries a ``P`` record (the UIDL it
was first served with).  This module parses that file and expands such
formats; it does no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pop3d.wire import is_valid_uidl

#: What Dovecot 2.x serves when pop3_uidl_format is not set.
DOVECOT_DEFAULT_FORMAT = "%08xu%08xv"

_VARIABLE = re.compile(r"%(0?)(\d*)([xX]?)([uvfm%])")


class UIDLFormatError(ValueError):
    """A --uidl-format that cannot be expanded."""


@dataclass(frozen=True)
class DovecotRecord:
    uid: int
    #: The UIDL stored by Dovecot (``P`` extension field), if any.
    stored_uidl: str | None


@dataclass(frozen=True)
class DovecotUidlist:
    uidvalidity: int
    #: Records by Maildir unique name (the file name before ``:``).
    records: Mapping[str, DovecotRecord]


def parse_dovecot_uidlist(content: bytes) -> DovecotUidlist | None:
    """
    The records of a version-3 ``dovecot-uidlist``, or None if the content
    is not one (another version, or damaged): then nothing is reused.
    """
    lines = content.decode("utf-8", "surrogateescape").split("\n")
    header = lines[0].split()
    if not header or header[0] != "3":
        return None
    fields = {field[:1]: field[1:] for field in header[1:]}
    if not fields.get("V", "").isdigit():
        return None
    records: dict[str, DovecotRecord] = {}
    for line in lines[1:]:
        if not line:
            continue
        before, colon, file_name = line.partition(" :")
        parts = before.split()
        if not colon or not parts or not parts[0].isdigit():
            return None
        stored = next((part[1:] for part in parts[1:] if part.startswith("P")), None)
        records[file_name.split(":", 1)[0]] = DovecotRecord(int(parts[0]), stored or None)
    return DovecotUidlist(int(fields["V"]), records)


def check_format(template: str) -> None:
    """Refuse a format with unknown variables or no variable that varies."""
    leftover = _VARIABLE.sub("", template)
    if "%" in leftover:
        raise UIDLFormatError(f"unknown variable in {template!r}: use %u, %v, %f or %m")
    if not re.search(r"%0?\d*[xX]?[ufm]", template):
        raise UIDLFormatError(f"{template!r} would give every message the same UIDL")


def expand_format(
    template: str,
    *,
    uid: int | None,
    uidvalidity: int | None,
    file_name: str,
    header: bytes | None = None,
) -> str | None:
    """
    Expand Dovecot's variables: ``%u`` UID, ``%v`` UIDVALIDITY, ``%f`` the
    Maildir unique name, ``%m`` the MD5 of the header (hex); each may take
    a width, zero padding and ``x``/``X`` for hexadecimal, as ``%08Xu``.
    None when the format needs a value this message does not have (a UID
    for a message Dovecot never saw).
    """
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        zero, width, radix, name = match.groups()
        if name == "%":
            return "%"
        if name in "uv":
            number = uid if name == "u" else uidvalidity
            if number is None:
                missing = True
                return ""
            text = format(number, radix or "d")
        elif name == "f":
            text = file_name
        else:
            if header is None:
                missing = True
                return ""
            text = hashlib.md5(header).hexdigest()
            text = text.upper() if radix == "X" else text
        return text.rjust(int(width or 0), "0" if zero else " ")

    expanded = _VARIABLE.sub(value, template)
    return None if missing else expanded


def header_x_uidl(header: bytes, complete: bool = True) -> str | None:
    """
    The first X-UIDL field of a message header, if it is a valid UIDL and
    not folded.  ``complete`` is false if the header was cut short, so its
    last line may be a piece.
    """
    lines = header.split(b"\n")
    if header.endswith(b"\n") or not complete:
        lines.pop()
    for number, line in enumerate(lines):
        name, colon, value = line.removesuffix(b"\r").partition(b":")
        if not colon or name[:1] in (b" ", b"\t") or name.rstrip(b" \t").lower() != b"x-uidl":
            continue
        following = lines[number + 1] if number + 1 < len(lines) else b""
        if following[:1] in (b" ", b"\t"):
            return None  # folded: not one token
        text = value.strip(b" \t").decode("ascii", "replace")
        return text if is_valid_uidl(text) else None
    return None
