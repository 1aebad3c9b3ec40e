"""
Test maildrops for the benchmarks: realistic RFC 5322 messages with MIME
parts, written the way an MTA writes them (bare LF line endings, one file per
message, Postfix-style unique names), and the exact bytes a correct POP3
server must send for each of them.

The expected RETR bytes are computed here, line by line, independently of
pop3d's encoder: CRLF after every line, a "." added in front of every line
that starts with ".", and the ".CRLF" terminator (RFC 1939 section 3).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Offsets at which a line starting with "." is placed when the message has
#: text there: twisted.mail.pop3 reads 16 KiB chunks (FileSender), pop3d
#: 256 KiB chunks; 64 KiB is a common buffer size.  A line starting at a chunk
#: boundary is where a stateless byte-stuffer goes wrong.
DOT_OFFSETS = (16 * 1024, 64 * 1024, 256 * 1024)

_WORDS = (
    "the quarterly report attached shows revenue growth in every region and we "
    "should discuss the budget for next year before the meeting on thursday please "
    "review section three carefully since the numbers changed after the audit our "
    "team will send the final figures tomorrow morning thanks for your patience with "
    "this release schedule regards invoice shipment customer delivery server backup "
    "database migration weekend maintenance window security update password expired "
    "newsletter subscription conference registration travel itinerary hotel booking"
).split()

#: Lines that start with "." as people and programs really write them.
_DOT_LINES = (
    b".",
    b"..",
    b"...",
    b". starts with a dot and a space",
    b".signature follows below",
    b"..double dot at the start of the line",
    b".\t tab after the dot",
    b".hidden-file-name.txt was attached by mistake",
)

_HOST = "bench.example"
_TIME0 = 1_732_600_000


def _prose_pool(seed: int = 1, size: int = 600) -> list[bytes]:
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        words: list[str] = []
        width = rng.randint(24, 76)
        while sum(len(w) + 1 for w in words) < width:
            words.append(rng.choice(_WORDS))
        line = " ".join(words)
        if rng.random() < 0.1:
            line = line.capitalize() + "."
        pool.append(line.encode("ascii"))
    pool += [b""] * (size // 8)  # paragraph breaks
    return pool


_POOL = _prose_pool()


class _Builder:
    """Appends LF-terminated lines and knows its byte offset."""

    def __init__(self, dot_targets: Sequence[int] = DOT_OFFSETS) -> None:
        self._parts: list[bytes] = []
        self.offset = 0
        self._targets = sorted(dot_targets)

    def line(self, text: bytes) -> None:
        self._parts.append(text + b"\n")
        self.offset += len(text) + 1

    def lines(self, texts: Sequence[bytes]) -> None:
        for text in texts:
            self.line(text)

    def raw(self, block: bytes) -> None:
        """Whole lines, already LF-terminated (a base64 body)."""
        self._parts.append(block)
        self.offset += len(block)

    def text(self, rng: random.Random, size: int) -> None:
        """About ``size`` octets of prose, with a few lines starting with "."."""
        end = self.offset + size
        while self.offset < end:
            text = rng.choice(_DOT_LINES) if rng.random() < 0.04 else rng.choice(_POOL)
            self._place_dot_line(len(text) + 1)
            self.line(text)

    def _place_dot_line(self, next_length: int) -> None:
        while self._targets and self._targets[0] < self.offset:
            self._targets.pop(0)  # passed inside base64: nothing to do there
        if self._targets and self._targets[0] <= self.offset + next_length:
            gap = self._targets[0] - self.offset
            if gap > 0:
                self.line((b"padding " * 20)[: gap - 1])
            assert self.offset == self._targets[0]
            self.line(b". this line starts at offset %d" % self.offset)
            self._targets.pop(0)

    def done(self) -> bytes:
        return b"".join(self._parts)


def _headers(b: _Builder, rng: random.Random, number: int, subject: str, boundary: str) -> None:
    day = 1 + number % 28
    sender = f"sender{number % 97}@mail{number % 7}.example.org"
    dkim = base64.b64encode(rng.randbytes(192)).decode()
    relay = f"mail{number % 7}.example.org"
    date = f"Tue, {day} Nov 2024 11:43:{number % 60:02d} +0000"
    b.lines(
        [
            f"Return-Path: <{sender}>".encode(),
            b"Delivered-To: user@example.com",
            f"Received: from {relay} ({relay} [192.0.2.{number % 250}])".encode(),
            b"\tby mx.example.com (Postfix) with ESMTPS id 4Xk%07dZ" % number,
            f"\tfor <user@example.com>; {date} (UTC)".encode(),
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=mail;",
            f"\tt={_TIME0 + number}; h=from:to:subject:date:message-id;".encode(),
            f"\tb={dkim[:64]}".encode(),
            *(f"\t {dkim[i : i + 72]}".encode() for i in range(64, len(dkim), 72)),
            f"Message-ID: <{number}.{rng.getrandbits(48):012x}@mail.example.org>".encode(),
            f"Date: {date}".encode(),
            f'From: "Sender {number % 97}" <{sender}>'.encode(),
            b"To: User <user@example.com>",
            f"Subject: {subject}".encode(),
            b"MIME-Version: 1.0",
            f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode(),
            b"",
            b"This is a multi-part message in MIME format.",
            b"",
        ]
    )


def _base64_part(b: _Builder, rng: random.Random, boundary: str, name: str, size: int) -> None:
    b.lines(
        [
            f"--{boundary}".encode(),
            f'Content-Type: application/pdf; name="{name}"'.encode(),
            f'Content-Disposition: attachment; filename="{name}"'.encode(),
            b"Content-Transfer-Encoding: base64",
            b"",
        ]
    )
    b.raw(base64.encodebytes(rng.randbytes(size * 3 // 4)))
    b.line(b"")


def _text_part(b: _Builder, rng: random.Random, boundary: str, size: int) -> None:
    b.lines(
        [
            f"--{boundary}".encode(),
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit",
            b"",
        ]
    )
    b.text(rng, size)
    b.line(b"")


def mime_message(number: int, size: int, seed: int = 0) -> bytes:
    """
    A multipart/mixed message of about ``size`` octets: a text/plain and a
    text/html alternative, a base64 attachment, and a quoted conversation in
    text/plain.  Lines start with "." here and there, and at the
    `DOT_OFFSETS` that fall in text.
    """
    rng = random.Random(seed * 1_000_003 + number)
    outer = f"=_mixed_{number:06d}"
    alternative = f"=_alt_{number:06d}"
    b = _Builder()
    _headers(b, rng, number, f"Benchmark message {number}", outer)
    b.lines(
        [
            f"--{outer}".encode(),
            f'Content-Type: multipart/alternative; boundary="{alternative}"'.encode(),
            b"",
        ]
    )
    _text_part(b, rng, alternative, max(300, size // 7))
    b.lines(
        [
            f"--{alternative}".encode(),
            b"Content-Type: text/html; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            b"<html><body>",
        ]
    )
    for _ in range(max(3, size // 1400)):
        b.line(b"<p>" + rng.choice(_POOL) + b"</p>")
    b.lines([b"</body></html>", b"", f"--{alternative}--".encode(), b""])
    if size >= 8000:
        _base64_part(b, rng, outer, f"report-{number}.pdf", size * 3 // 10)
    remaining = size - b.offset - 200
    if remaining > 0:
        _text_part(b, rng, outer, remaining)
    b.lines([f"--{outer}--".encode()])
    return b.done()


def huge_message(size: int, seed: int = 7) -> bytes:
    """
    One message of about ``size`` octets: text with lines starting with "."
    at every `DOT_OFFSETS` position, a large base64 attachment, and text again.
    """
    rng = random.Random(seed)
    boundary = "=_huge_boundary"
    b = _Builder()
    _headers(b, rng, 999_999, "Large attachment", boundary)
    _text_part(b, rng, boundary, max(DOT_OFFSETS) + 4096)
    # Random data is slow to make; repeat a 3 MiB random block (as base64
    # lines it is still an ordinary attachment).
    block = base64.encodebytes(rng.randbytes(3 * 1024 * 1024 * 3 // 4))
    attachment = size - b.offset - 8192
    b.lines(
        [
            f"--{boundary}".encode(),
            b'Content-Type: application/octet-stream; name="disk-image.bin"',
            b'Content-Disposition: attachment; filename="disk-image.bin"',
            b"Content-Transfer-Encoding: base64",
            b"",
        ]
    )
    while attachment > 0:
        piece = block[: attachment - attachment % 77] if attachment < len(block) else block
        if not piece:
            break
        b.raw(piece)
        attachment -= len(piece)
    b.line(b"")
    _text_part(b, rng, boundary, 4096)
    b.line(f"--{boundary}--".encode())
    return b.done()


def retr_bytes(message: bytes) -> bytes:
    """
    What a correct server sends after "+OK ...CRLF" for RETR of a stored
    message with LF endings: CRLF lines, dot-stuffed, then ".CRLF".
    """
    assert message.endswith(b"\n") and b"\r" not in message
    lines = message.split(b"\n")[:-1]
    return b"".join([(b"." + x if x[:1] == b"." else x) + b"\r\n" for x in lines]) + b".\r\n"


def wire_size(message: bytes) -> int:
    """The RFC 1939 size of a message (CRLF line endings, before stuffing)."""
    return len(message) + message.count(b"\n")


def unique_name(number: int) -> str:
    """A Postfix-style Maildir unique name; fixed width, so names sort by number."""
    return f"{_TIME0 + number}.V803I{number:08x}M{number % 1_000_000:06d}.{_HOST}"


def file_name(number: int) -> tuple[str, str]:
    """(subdirectory, file name): every other message was already seen (cur/, ":2,S")."""
    unique = unique_name(number)
    return ("cur", unique + ":2,S") if number % 2 else ("new", unique)


@dataclass
class Maildrop:
    """One user's Maildir and what a server should report for it."""

    user: str
    password: str
    path: Path
    #: Per message, in message-number order.
    wire_sizes: list[int] = field(default_factory=list)
    file_sizes: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.wire_sizes)

    def uidls(self, server: str) -> list[str]:
        """
        The UIDLs each server gives, in message-number order: pop3d the
        unique name; Twisted the MD5 of the file name as it is now (pop3d
        moves messages to cur/ and adds flags to their names at QUIT, so
        this is read from the directory when it is needed).
        """
        if server == "dovecot":
            # Dovecot's are UID and UIDVALIDITY (pop3_uidl_format), which it
            # assigns: the load generator checks their form, not their value.
            raise ValueError("Dovecot's UIDLs cannot be known in advance")
        if server == "pop3d":
            return [name.split(":", 1)[0] for name in self.file_names]
        names = sorted(
            name
            for subdirectory in ("cur", "new")
            for name in os.listdir(self.path / subdirectory)
            if not name.startswith(".")
        )
        return [hashlib.md5(name.encode()).hexdigest() for name in names]

    def sizes(self, server: str) -> list[int]:
        """
        The sizes each server reports: pop3d and Dovecot the RFC 1939 size
        (CRLF line endings); twisted.mail.pop3 the file size (LF line endings).
        """
        return self.file_sizes if server == "twisted" else self.wire_sizes


def make_maildir(path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def write_maildrop(
    user: str, path: Path, messages: Sequence[bytes], first_number: int = 0
) -> Maildrop:
    """Write messages as an MTA does: one file each in new/ or cur/."""
    make_maildir(path)
    drop = Maildrop(user, "pw-" + user, path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for offset, message in enumerate(messages):
        subdirectory, name = file_name(first_number + offset)
        fd = os.open(path / subdirectory / name, flags, 0o600)
        try:
            os.write(fd, message)
        finally:
            os.close(fd)
        drop.wire_sizes.append(wire_size(message))
        drop.file_sizes.append(len(message))
        drop.file_names.append(name)
    return drop


def link_maildrop(user: str, path: Path, source: Maildrop) -> Maildrop:
    """Another user's Maildir with the same messages, as hard links (no copying)."""
    make_maildir(path)
    for name in source.file_names:
        subdirectory = "cur" if ":" in name else "new"
        os.link(source.path / subdirectory / name, path / subdirectory / name)
    return Maildrop(
        user,
        "pw-" + user,
        path,
        list(source.wire_sizes),
        list(source.file_sizes),
        list(source.file_names),
    )


def write_passwd_files(directory: Path, drops: Sequence[Maildrop]) -> tuple[Path, Path]:
    """
    The same users for both servers: Dovecot passwd-file for pop3d
    (``user:{PLAIN}password::``), Twisted's ``user:password`` file for
    twisted.mail.pop3's FilePasswordDB.
    """
    pop3d = directory / "passwd-pop3d"
    twisted = directory / "passwd-twisted"
    pop3d.write_text("".join(f"{d.user}:{{PLAIN}}{d.password}::\n" for d in drops))
    twisted.write_text("".join(f"{d.user}:{d.password}\n" for d in drops))
    return pop3d, twisted
