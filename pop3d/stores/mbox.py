"""
mbox storage: one file per user, as Postfix local(8), procmail, mail.local
and mutt keep it (``/var/mail/{user}``).

Format
------

Writers differ in how they keep a body line that begins with ``From `` from
looking like the start of a message:

- mboxo (Postfix local(8), procmail, mail.local) writes such a line as
  ``>From `` and leaves a line that already was ``>From `` (a quoted
  reply, say) as it is.  The two are then the same bytes, so the only
  reading that never alters a message is to serve every line as stored:
  `MboxFormat.MBOXO`, the default (Dovecot reads mbox files so too).
- mboxrd (mpop's mbox delivery, for one) adds one ``>`` to every line
  matching ``^>*From ``, so that removing one ``>`` from every line
  matching ``^>+From `` gives the message back: `MboxFormat.MBOXRD`, for
  files that only such writers write.  Read so, an mboxo file loses a
  ``>`` from every ``>From `` line its authors wrote.

Either way:

- A message starts with a line that begins with ``From `` (the "From_"
  line), at the start of the file or at the start of any later line.  Every
  mboxo and mboxrd writer quotes such lines inside messages, so an unquoted
  one is always a separator; no blank line is required before it (procmail
  writes none after a message that did not end with a newline).  The From_
  line is not part of the message.
- The line ending (LF or CRLF) of the last line before the next From_ line,
  or before the end of the file, is framing, not message: writers add a
  blank line after every message, and a message that did not end with a
  newline gets one.  So a message is served exactly as delivered, except
  that a final CR of a message that ended with a bare CR is lost.
- Anything before the first From_ line must be blank, or the file is not
  an mbox and the maildrop is refused (``-ERR [SYS/PERM]``) rather than
  risk rewriting it.  ``Content-Length:`` headers (mboxcl) are not used.
- A missing file is an empty maildrop (it is not created).

The file is read once at login, in 1 MiB buffers, to index it (offsets,
sizes and UIDLs); message bodies are then read from the file as they are
sent.  Memory use does not grow with the size of the file or its messages.

Locks
-----

For the whole session (RFC 1939 section 4: exclusive access), in this order
(the dotlock before the fcntl lock, as Postfix local(8) and procmail take
them):

1. an entry in `pop3d.stores.posix.PROCESS_LOCKS`, because fcntl locks
   are per process and would let a second session of this server in;
2. the dotlock ``FILE.lock``, a `pop3d.stores.posix.DotLock`: created with
   ``O_CREAT|O_EXCL|O_NOFOLLOW`` (atomic on local file systems and on NFSv3
   and later), holding the server's PID on its first line (as liblockfile
   writes it), then its host, incarnation and a lock id.  One older than
   `DOTLOCK_STALE_SECONDS` (10 minutes: between Postfix's 500 seconds and
   procmail's 1024), or left by a pop3d process of this host that is gone,
   is taken for the leftover of a crashed program and broken: moved aside
   and checked before it is removed, never removed by name, so that a
   dotlock another program made meanwhile stays.  A session's dotlock is
   touched every `pop3d.stores.posix.LOCK_REFRESH_SECONDS` on the store's
   clock, in the thread pool, while it is held (idle or not: a client that
   reads one message an hour keeps it too); if another program still
   breaks it, the fcntl lock keeps that program out, and UPDATE checks the
   dotlock again before rewriting;
3. an ``fcntl`` (``lockf``) write lock on the whole mbox file.

Any of them held elsewhere is ``-ERR [IN-USE]``; MTAs that find them held
retry later.  None is waited for, so whatever order another program takes
them in cannot deadlock.  They are released in the reverse order on every
way a session ends (a server killed with SIGKILL leaves its dotlock, which
then keeps the maildrop in use until it is stale for other programs, and
until the next pop3d session on the same host finds its process gone).  With
classic fcntl locks, closing any descriptor of a file drops the process's
locks on it, so this module opens the mbox once per session and reads
message bodies with ``pread`` on that descriptor.

Nothing here follows a symbolic link: the mbox, its dotlock and the
temporary file of a rewrite are opened with ``O_NOFOLLOW`` relative to a
descriptor of their directory, and only a regular file is an mbox.  The
directories from the template's first placeholder on are opened one by one
with ``O_NOFOLLOW`` too; above it (the administrator's part, such as
``/var/mail``, often a link) links are followed.

UPDATE
------

QUIT with deletions (RFC 1939 section 6) writes a new file and renames it
over the old one, so that a crash at any moment leaves either the old file
or the new one, whole:

1. check that the dotlock is still ours (re-taking it if another program
   broke it as stale and let it go; giving up if another program holds it);
   check that the file at the path is still the one indexed (another program
   ignoring the locks may have changed it: it is then indexed again and
   messages are found by UIDL);
2. create ``.FILE.pop3d-rewrite`` in the same directory (``O_EXCL``), lock
   it with fcntl, give it the owner, group and mode of the mbox;
3. copy everything except the deleted messages, then everything after the
   end of the snapshot: mail appended since login by a program that ignores
   the locks;
4. ``fsync`` it, ``rename`` it over the mbox, copy what was appended to the
   old file meanwhile (if anything), ``fsync`` the directory.

Locks across the rename: the dotlock is a separate file, held from before
the new file is created until after the rename, so a program that takes the
dotlock before opening the mbox (Postfix local, procmail, mutt, Dovecot)
opens it only after the rename and appends to the new file.  The new file is
fcntl-locked before it is renamed into place, so a program that goes by
fcntl alone and opens the path after the rename waits on the new file until
the session ends.  The old file's lock is dropped only after the rename, when
the old file has no name any more.  (A program that opened the old file
before the rename and then blocks on its fcntl lock without taking the
dotlock, and does not check after locking that the path still names the
file it opened, would append to the replaced file: that is the one case no
rename-based rewrite can cover.)

A failed rewrite deletes nothing (``-ERR [SYS/TEMP]``); a leftover
temporary file of a crash is removed by the next session.

UIDLs
-----

A message's UIDL is its ``X-UIDL:`` header (written by qpopper and others)
when that is a valid UIDL (RFC 1939 section 7), is the first ``X-UIDL:`` in
the first 64 KiB of the message header, is not folded, does not look like one of the generated
ids below, and no earlier message of the file has it.

Otherwise it is the first 40 hex digits of the SHA-256 of the From_ line and
the message as read as mboxrd (one ``>`` removed from every line matching
``^>+From ``: what earlier versions served), followed by ``.N`` when N later
messages in the file have the same From_ line and content (byte-identical
deliveries in the same second).
The digest is the same in both formats, so choosing one never changes a
UIDL (which would make clients download the mail again); it identifies the
stored bytes just as well, since un-quoting maps different stored messages
to different results.
Counting later copies, not earlier ones, keeps every UIDL when messages are
deleted from the front, as POP3 clients do; only a new byte-identical copy
arriving later changes the UIDL of the earlier copies.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import os
import re
import stat
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pop3d.errors import (
    DeletionFailed,
    MaildropLocked,
    MaildropUnavailable,
    MessageGone,
    POP3Error,
)
from pop3d.stores.common import check_template, expand_template, fixed_directory, run_blocking
from pop3d.stores.interfaces import IMaildrop, IMaildropStore, IMessageBody, MessageList
from pop3d.stores.posix import (
    CREATE_FLAGS,
    PROCESS_LOCKS,
    SAFE_OPEN,
    DotLock,
    LockRefresher,
    open_directory,
    unavailable,
    unlink_quietly,
)
from pop3d.uidl import header_x_uidl
from pop3d.wire import WireSizeCounter

#: A dotlock older than this (by its modification time) is stale and removed.
DOTLOCK_STALE_SECONDS = 10 * 60

DOTLOCK_SUFFIX = ".lock"
REWRITE_SUFFIX = ".pop3d-rewrite"

#: How much of the file one read takes (`MboxStore`'s ``read_size``).
READ_SIZE = 1024 * 1024
# Lines longer than this are indexed in pieces.
LINE_LIMIT = 64 * 1024
# How much of a From_ line is kept to recognise it later.
_CHECK_SIZE = 256
_FROM_AT_START = re.compile(rb"(>*)From ")
_FROM_AFTER_NEWLINE = re.compile(rb"\n(>*)From ")
# How much of a message header is searched for X-UIDL.
_HEADER_LIMIT = 64 * 1024
_GENERATED_UIDL = re.compile(r"[0-9a-f]{40}(?:\.[0-9]+)?")

log = Logger()

_T = TypeVar("_T")


class MboxFormat(enum.Enum):
    """How the writers of an mbox quote body lines (the module docstring has more)."""

    #: Lines are served as stored (Postfix local(8), procmail, mail.local).
    MBOXO = "mboxo"
    #: One ``>`` is removed from every line matching ``^>+From ``.
    MBOXRD = "mboxrd"


@dataclass(frozen=True)
class _Indexing:
    """How a store reads its files to index them (see `MboxStore`)."""

    format: MboxFormat
    read_size: int = READ_SIZE
    line_limit: int = LINE_LIMIT


class _NotAnMbox(Exception):
    """The file does not start with a From_ line."""


# -- the index ------------------------------------------------------------------


@dataclass
class _Entry:
    """Where one message is in the file; offsets are absolute."""

    start: int  # the From_ line
    body_start: int  # the message, after the From_ line
    body_end: int  # before the framing line ending
    end: int  # the next From_ line, or the end of the indexed part
    check: bytes  # the start of the From_ line, to recognise it
    quotes: array[int]  # offsets of the ">" removed (mboxrd), from body_start
    size: int
    uid: str


class _MessageBuilder:
    """
    Follows one message during indexing.  Its content comes in slices of any
    size, without the ``>`` that mboxrd quoting added (announced by
    `quote`); the last two octets are held back until the end shows whether
    they are the framing line ending.
    """

    def __init__(self, start: int, format: MboxFormat) -> None:
        self.start = start
        self._format = format
        self.body_start = -1
        self.check = b""
        self.quotes: array[int] = array("q")
        self.x_uidl: str | None = None
        self._hash = hashlib.sha256()
        self._counter = WireSizeCounter()
        self._tail = b""
        self._header: bytearray | None = bytearray()

    def from_line(self, data: bytes) -> None:
        if len(self.check) < _CHECK_SIZE:
            self.check += data[: _CHECK_SIZE - len(self.check)]
        self._hash.update(data)

    def content(self, data: bytes) -> None:
        data = self._tail + data
        self._tail = data[-2:]
        self._emit(data[:-2])

    def quote(self, offset: int) -> None:
        """
        A ``>`` before ``From `` at ``offset`` from the start of the message,
        which mboxrd quoting would have added.  It is never part of the
        digest (UIDLs are those of mboxrd in both formats); in mboxo it is
        served, so it counts in the size.
        """
        if self._format is MboxFormat.MBOXRD:
            self.quotes.append(offset)
            return
        # More content follows (the "From "), so the held-back octets are
        # not framing: count them before the ">", in the order RETR sends.
        tail, self._tail = self._tail, b""
        self._emit(tail)
        self._counter.feed(b">")

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self._counter.feed(data)
        if self._header is not None:
            self._watch_header(data)

    def _watch_header(self, data: bytes) -> None:
        assert self._header is not None
        searched = max(0, len(self._header) - 2)
        self._header += data[: _HEADER_LIMIT - len(self._header)]
        header = self._header
        if header.startswith((b"\n", b"\r\n")):
            self._end_header(0, True)
            return
        ends = [at for blank in (b"\n\n", b"\n\r\n") if (at := header.find(blank, searched)) >= 0]
        if ends:
            self._end_header(min(ends) + 1, True)
        elif len(header) >= _HEADER_LIMIT:
            self._end_header(len(header), False)

    def _end_header(self, length: int, complete: bool) -> None:
        assert self._header is not None
        header, self._header = bytes(self._header[:length]), None
        self.x_uidl = header_x_uidl(header, complete)

    def finish(self, end: int) -> tuple[_Entry, str, str | None]:
        """The message's entry, digest and X-UIDL, given where it ends."""
        tail = self._tail
        framing = 2 if tail.endswith(b"\r\n") else 1 if tail.endswith(b"\n") else 0
        self._emit(tail[: len(tail) - framing])
        if self._header is not None:
            self._end_header(len(self._header), True)
        if self.body_start < 0:
            self.body_start = end  # a From_ line at the very end
        entry = _Entry(
            self.start,
            self.body_start,
            max(self.body_start, end - framing),
            end,
            self.check,
            self.quotes,
            self._counter.finish(),
            "",
        )
        return entry, self._hash.hexdigest()[:40], self.x_uidl


class _Scanner:
    """
    Finds the messages of an mbox in buffers of it, stopping only at the
    lines that matter (From_ lines and quoted ``>From`` lines): everything
    else goes to the messages' digests and sizes in large slices.
    """

    def __init__(self, indexing: _Indexing) -> None:
        self._format = indexing.format
        self._line_limit = indexing.line_limit
        self.entries: list[_Entry] = []
        self.digests: list[str] = []
        self.x_uidls: list[str | None] = []
        self._message: _MessageBuilder | None = None
        self._in_from_line = False
        self._at_line_start = True

    def scan(self, buffer: bytes, base: int, final: bool) -> int:
        """
        Index ``buffer``, which is the file from offset ``base`` on; return
        how much of it was used (the rest is a line to be continued).
        """
        used = 0
        if self._in_from_line:
            used = self._rest_of_from_line(buffer, 0, len(buffer), base)
            if self._in_from_line:
                return used
        end = len(buffer) if final else buffer.rfind(b"\n") + 1
        if end <= used:
            if len(buffer) - used < self._line_limit:
                return used  # wait for the rest of the line
            end = len(buffer)  # a very long line: take its first part now
        for start, quotes in self._lines_of_interest(buffer, used, end):
            if start < used:
                continue
            self._content(buffer, used, start, base)
            if self._message is None and quotes:
                raise _NotAnMbox(base + start)
            if self._message is not None and quotes:
                # A quoted ">From ": one ">" is not part of the mboxrd message.
                self._message.quote(base + start - self._message.body_start)
                used = start + 1
                continue
            if self._message is not None:
                self._add(self._message.finish(base + start))
            self._message = _MessageBuilder(base + start, self._format)
            self._in_from_line = True
            used = self._rest_of_from_line(buffer, start, end, base)
            if self._in_from_line:
                break
        self._content(buffer, used, end, base)
        if end:
            self._at_line_start = buffer[end - 1] == 0x0A
        return end

    def _lines_of_interest(self, buffer: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(line start, number of ">") of every From_ or quoted From line."""
        if start == 0 and self._at_line_start:
            first = _FROM_AT_START.match(buffer, 0, end)
            if first is not None:
                yield 0, len(first.group(1))
        # A line start right after a From_ line is found through its "\n".
        for found in _FROM_AFTER_NEWLINE.finditer(buffer, max(0, start - 1), end):
            yield found.start() + 1, len(found.group(1))

    def _rest_of_from_line(self, buffer: bytes, start: int, end: int, base: int) -> int:
        """Take the From_ line (or its part) at ``start``; return where it ends."""
        assert self._message is not None
        newline = buffer.find(b"\n", start, end)
        if newline < 0:
            self._message.from_line(buffer[start:end])
            self._at_line_start = False
            return end
        self._message.from_line(buffer[start : newline + 1])
        self._message.body_start = base + newline + 1
        self._in_from_line = False
        self._at_line_start = True
        return newline + 1

    def _content(self, buffer: bytes, start: int, end: int, base: int) -> None:
        if start >= end:
            return
        if self._message is not None:
            self._message.content(buffer[start:end])
        elif buffer[start:end].strip():
            raise _NotAnMbox(base + start)

    def _add(self, finished: tuple[_Entry, str, str | None]) -> None:
        entry, digest, x_uidl = finished
        self.entries.append(entry)
        self.digests.append(digest)
        self.x_uidls.append(x_uidl)

    def finish(self, end: int) -> list[_Entry]:
        if self._message is not None:
            self._add(self._message.finish(end))
        _assign_uids(self.entries, self.digests, self.x_uidls)
        return self.entries


def _index(fd: int, end: int, indexing: _Indexing) -> list[_Entry]:
    """Index the first ``end`` octets of the mbox open at ``fd``."""
    scanner = _Scanner(indexing)
    read_size = indexing.read_size
    carried = b""
    base = offset = 0
    while True:
        chunk = os.pread(fd, min(read_size, end - offset), offset) if offset < end else b""
        offset += len(chunk)
        final = not chunk or offset >= end  # (a file shorter than it was ends early)
        buffer = carried + chunk if carried else chunk
        used = scanner.scan(buffer, base, final)
        base += used
        carried = buffer[used:]
        if final:
            return scanner.finish(base)


def _assign_uids(
    entries: Sequence[_Entry], digests: Sequence[str], x_uidls: Sequence[str | None]
) -> None:
    """UIDLs as the module docstring describes: unique within the file."""
    later: dict[str, int] = {}
    for position in reversed(range(len(entries))):
        digest = digests[position]
        copies = later.get(digest, 0)
        later[digest] = copies + 1
        entries[position].uid = f"{digest}.{copies}" if copies else digest
    taken: set[str] = set()
    for entry, x_uidl in zip(entries, x_uidls, strict=True):
        if x_uidl is not None and x_uidl not in taken and not _GENERATED_UIDL.fullmatch(x_uidl):
            taken.add(x_uidl)
            entry.uid = x_uidl


# -- an opened mbox file ----------------------------------------------------------


class _MboxFile:
    """
    One opened and fcntl-locked mbox file (an inode) with its index.  Its
    descriptor is closed only with the maildrop, never while a body reads.
    """

    def __init__(self, fd: int, entries: list[_Entry], end: int) -> None:
        self.fd = fd
        self.entries = entries
        self.end = end
        self._mutex = threading.Lock()
        self._closed = False

    def pread(self, size: int, offset: int) -> bytes:
        with self._mutex:
            if self._closed:
                raise MaildropUnavailable("the maildrop was closed")
            return os.pread(self.fd, size, offset)

    def intact(self, entry: _Entry) -> bool:
        """Whether the From_ line of ``entry`` is still where it was."""
        return self.pread(len(entry.check), entry.start) == entry.check

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


def _open_locked(dir_fd: int, name: str, path: str) -> int | None:
    """The mbox opened and fcntl-locked, or None if there is none."""
    try:
        fd = os.open(name, os.O_RDWR | SAFE_OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise unavailable("cannot open the mbox", path, error) from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise unavailable(
                "the mbox is not a regular file", path, OSError(errno.EINVAL, "not a file")
            )
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise MaildropLocked() from error
            raise unavailable("cannot lock the mbox", path, error) from error
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_index(fd: int, path: str, indexing: _Indexing) -> tuple[list[_Entry], int]:
    """The index of the whole mbox open at ``fd``, and its size."""
    try:
        end = os.fstat(fd).st_size
        return _index(fd, end, indexing), end
    except _NotAnMbox as error:
        log.error(
            "{path} is not an mbox file (no From_ line at offset {offset})",
            path=path,
            offset=error.args[0],
        )
        raise MaildropUnavailable("the maildrop is not an mbox file", permanent=True) from None
    except OSError as error:
        raise unavailable("cannot read the mbox", path, error) from error


# -- the rewrite ------------------------------------------------------------------


class _Copier:
    """Copies byte ranges of one descriptor to the end of another."""

    def __init__(self, source: int, target: int, read_size: int) -> None:
        self._source = source
        self._target = target
        self._read_size = read_size
        self.written = 0

    def copy(self, start: int, end: int) -> None:
        while start < end:
            data = os.pread(self._source, min(self._read_size, end - start), start)
            if not data:
                raise OSError(errno.EIO, "the mbox shrank during the rewrite")
            view = memoryview(data)
            while view:
                done = os.pwrite(self._target, view, self.written)
                view = view[done:]
                self.written += done
            start += len(data)


def _rewrite(
    dir_fd: int, name: str, path: str, current: _MboxFile, doomed: set[int], read_size: int
) -> tuple[_MboxFile, list[int | None]]:
    """
    Replace the mbox by a copy without the ``doomed`` entries of ``current``
    (the module docstring has the procedure).  Returns the new file, locked,
    and where each entry of ``current`` is in it.  Raises OSError if the
    mbox was not replaced.
    """
    before = os.fstat(current.fd)
    size = before.st_size
    temporary = "." + name + REWRITE_SUFFIX
    unlink_quietly(temporary, dir_fd)
    fd = os.open(temporary, os.O_RDWR | CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    renamed = False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        created = os.fstat(fd)
        if (created.st_uid, created.st_gid) != (before.st_uid, before.st_gid):
            os.fchown(fd, before.st_uid, before.st_gid)
        os.fchmod(fd, stat.S_IMODE(before.st_mode))
        copier = _Copier(current.fd, fd, read_size)
        entries = current.entries
        copier.copy(0, entries[0].start if entries else current.end)
        kept: list[_Entry] = []
        where: list[int | None] = []
        for position, entry in enumerate(entries):
            if position in doomed:
                where.append(None)
                continue
            shift = copier.written - entry.start
            copier.copy(entry.start, entry.end)
            where.append(len(kept))
            kept.append(
                replace(
                    entry,
                    start=entry.start + shift,
                    body_start=entry.body_start + shift,
                    body_end=entry.body_end + shift,
                    end=entry.end + shift,
                )
            )
        new_end = copier.written
        # Mail appended since the snapshot, by a program that ignored the locks.
        copier.copy(current.end, size)
        os.fsync(fd)
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        renamed = True
    except BaseException:
        if not renamed:
            unlink_quietly(temporary, dir_fd)
        os.close(fd)
        raise
    # Replaced: from here on the deletion is done, whatever else fails.
    try:
        late = os.fstat(current.fd).st_size
        if late > size:
            log.warn(
                "{path}: {octets} octets were appended during the rewrite; copied",
                path=path,
                octets=late - size,
            )
            copier.copy(size, late)
            os.fsync(fd)
        os.fsync(dir_fd)
    except OSError as error:
        log.error("{path}: after the rewrite: {error}", path=path, error=error)
    return _MboxFile(fd, kept, new_end), where


# -- message bodies ---------------------------------------------------------------


@implementer(IMessageBody)
class _Body:
    """One message read from the mbox with pread, without the ``>`` of `_Entry.quotes`."""

    def __init__(self, file: _MboxFile, entry: _Entry, read_size: int) -> None:
        self._read_size = read_size
        self._file: _MboxFile | None = file
        self._position = entry.body_start
        self._end = entry.body_end
        self._quotes = [entry.body_start + offset for offset in entry.quotes]
        self._quotes.reverse()

    def read(self, size: int) -> bytes:
        file = self._file
        if file is None or size <= 0:
            return b""
        chunks: list[bytes] = []
        wanted = size
        while wanted > 0 and self._position < self._end:
            if self._quotes and self._quotes[-1] == self._position:
                self._quotes.pop()
                self._position += 1
                continue
            stop = self._quotes[-1] if self._quotes else self._end
            try:
                size = min(wanted, stop - self._position, self._read_size)
                data = file.pread(size, self._position)
            except OSError as error:
                log.error("cannot read the mbox: {error}", error=error)
                raise MaildropUnavailable("cannot read message") from error
            if not data:
                raise MaildropUnavailable("the mbox was truncated by another program")
            chunks.append(data)
            self._position += len(data)
            wanted -= len(data)
        return b"".join(chunks)

    def close(self) -> None:
        self._file = None


# -- the maildrop -----------------------------------------------------------------


@implementer(IMaildrop)
class _MboxMaildrop:
    def __init__(
        self,
        path: str,
        name: str,
        dir_fd: int | None,
        key: object,
        dotlock: DotLock | None,
        current: _MboxFile | None,
        reactor: IReactorThreads | None,
        indexing: _Indexing,
        refresher: LockRefresher,
    ) -> None:
        self.path = path
        self._refresher = refresher
        self._indexing = indexing
        self._name = name
        self._dir_fd = dir_fd
        self._key = key
        self._dotlock = dotlock
        self._current = current
        self._files = [current] if current is not None else []
        self._reactor = reactor
        entries = current.entries if current is not None else []
        self.messages = MessageList(
            tuple(entry.uid for entry in entries), tuple(entry.size for entry in entries)
        )
        # Where each message of the snapshot is in self._current, if anywhere.
        self._where: list[int | None] = list(range(len(entries)))
        self._mutex = threading.Lock()
        self._closed = False

    def _verify(self, which: Iterable[int] | None) -> None:
        """
        Make sure the index describes the file at the path: a program that
        ignores the locks may have replaced, changed or removed it.  If so,
        the messages of the snapshot are looked for again, by UIDL.
        ``which`` are the snapshot indexes about to be used (None: all).
        """
        current = self._current
        if current is None:
            return
        assert self._dir_fd is not None
        try:
            found = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
            own = os.fstat(current.fd)
        except FileNotFoundError:
            log.warn("{path} was removed by another program", path=self.path)
            self._follow(None)
            return
        except OSError as error:
            raise unavailable("cannot check the mbox", self.path, error) from error
        if (found.st_dev, found.st_ino) != (own.st_dev, own.st_ino):
            log.warn("{path} was replaced by another program", path=self.path)
            try:
                fd = _open_locked(self._dir_fd, self._name, self.path)
            except MaildropLocked:
                raise MaildropUnavailable(
                    "the maildrop is being changed by another program"
                ) from None
            if fd is None:
                self._follow(None)
                return
            try:
                entries, end = _read_index(fd, self.path, self._indexing)
            except BaseException:
                os.close(fd)
                raise
            replacement = _MboxFile(fd, entries, end)
            self._files.append(replacement)
            self._follow(replacement)
            return
        if which is None:
            used = current.entries
        else:
            used = [current.entries[w] for i in which if (w := self._where[i]) is not None]
        try:
            changed = own.st_size < current.end or not all(current.intact(e) for e in used)
        except OSError as error:
            raise unavailable("cannot read the mbox", self.path, error) from error
        if changed:
            log.warn("{path} was changed by another program", path=self.path)
            current.entries, current.end = _read_index(current.fd, self.path, self._indexing)
            self._follow(current)

    def _follow(self, file: _MboxFile | None) -> None:
        """Make ``file`` the current one and find the snapshot's messages in it."""
        self._current = file
        if file is None:
            self._where = [None] * len(self.messages)
            return
        positions = {entry.uid: position for position, entry in enumerate(file.entries)}
        self._where = [positions.get(uid) for uid in self.messages.uids]

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        with self._mutex:
            try:
                if self._closed:
                    raise MaildropUnavailable("the maildrop was closed")
                self._verify([index])
            except POP3Error as error:
                return fail(error)
            position = self._where[index]
            if self._current is None or position is None:
                return fail(MessageGone())
            body: IMessageBody = _Body(
                self._current, self._current.entries[position], self._indexing.read_size
            )
            return succeed(body)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        if not indexes:
            return succeed(None)
        return run_blocking(self._reactor, self._remove, list(indexes))

    def _remove(self, indexes: list[int]) -> None:
        with self._mutex:
            if self._closed:
                raise DeletionFailed(len(indexes))
            try:
                self._verify(None)
            except POP3Error as error:
                log.error("{path}: nothing deleted: {error}", path=self.path, error=error.text)
                raise DeletionFailed(len(indexes)) from error
            current = self._current
            doomed = {w for i in indexes if (w := self._where[i]) is not None}
            if current is None or not doomed:
                return  # already gone: done
            assert self._dir_fd is not None
            if self._dotlock is not None and not self._dotlock.ensure(self._dir_fd):
                log.error(
                    "{path}: nothing deleted: another program holds the dotlock", path=self.path
                )
                raise DeletionFailed(len(doomed))
            try:
                rewritten, moved = _rewrite(
                    self._dir_fd, self._name, self.path, current, doomed, self._indexing.read_size
                )
            except OSError as error:
                log.error("{path}: nothing deleted: {error}", path=self.path, error=error)
                raise DeletionFailed(len(doomed)) from error
            self._files.append(rewritten)
            self._current = rewritten
            self._where = [None if w is None else moved[w] for w in self._where]

    def keep_dotlock_fresh(self) -> None:
        """Have the store's refresher touch this session's dotlock until `close`."""
        if self._dotlock is not None:
            self._refresher.add(self._dotlock)

    def close(self) -> Deferred[None]:
        with self._mutex:
            if self._closed:
                return succeed(None)
            self._closed = True
            for file in self._files:
                try:
                    file.close()  # drops the fcntl locks
                except OSError as error:
                    log.error("closing {path}: {error}", path=self.path, error=error)
            self._files = []
            self._current = None
            if self._dotlock is not None:
                self._refresher.discard(self._dotlock)
                self._dotlock.release(self._dir_fd)
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
            PROCESS_LOCKS.release(self._key)
        return succeed(None)


# -- the store --------------------------------------------------------------------


@implementer(IMaildropStore)
class MboxStore:
    """
    mbox files found by a path template such as ``/var/mail/{user}``.

    The template is that of `pop3d.stores.maildir.MaildirStore`: ``{user}`` is the
    whole user name, ``{local}`` and ``{domain}`` its parts around ``@``.
    With a ``reactor``, opening a maildrop (which reads the whole file),
    rewriting it at QUIT and touching held dotlocks run in the reactor's
    thread pool; without one they run inline.  Held dotlocks are touched on
    ``clock`` (default: the ``reactor``, if it keeps time; with neither,
    they are not touched, which only tests do).  ``format`` is how the
    files' writers quote ``From`` lines in bodies: `MboxFormat.MBOXO` (the
    default) serves every line as stored; `MboxFormat.MBOXRD` removes one
    ``>`` from lines matching ``^>+From ``.

    The file is indexed ``read_size`` octets at a time (`READ_SIZE`), and a
    line longer than ``line_limit`` (`LINE_LIMIT`) in pieces; whatever they
    are, the same messages, sizes and UIDLs result (tests make them small).
    """

    def __init__(
        self,
        template: str,
        *,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        format: MboxFormat = MboxFormat.MBOXO,
        read_size: int = READ_SIZE,
        line_limit: int = LINE_LIMIT,
    ) -> None:
        check_template(template)
        if read_size < 1 or line_limit < 1:
            raise ValueError("read_size and line_limit must be positive")
        self.template = template
        self.format = MboxFormat(format)
        self._indexing = _Indexing(self.format, read_size, line_limit)
        self._reactor = reactor
        if clock is None and IReactorTime.providedBy(reactor):
            clock = reactor
        self._refresher = LockRefresher(clock, threads=reactor)
        # Links are followed above the first placeholder only (/var/mail
        # may be one): below it, users may own the directories.
        self._trusted = fixed_directory(template)

    def path_for(self, mailbox: str) -> str | None:
        return expand_template(self.template, mailbox)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        path = self.path_for(mailbox)
        if path is None:
            return fail(UnauthorizedLogin())
        opening = run_blocking(
            self._reactor, _open_mbox, path, self._trusted, self._reactor, self._indexing,
            self._refresher,
        )  # fmt: skip
        return opening.addCallback(self._hold)

    def _hold(self, maildrop: _MboxMaildrop) -> IMaildrop:
        # On the reactor thread, as every change to the refresher's set.
        maildrop.keep_dotlock_fresh()
        return maildrop


def _open_mbox(
    path: str,
    trusted: str,
    reactor: IReactorThreads | None,
    indexing: _Indexing,
    refresher: LockRefresher,
) -> _MboxMaildrop:
    directory, name = os.path.split(os.path.abspath(path))
    try:
        dir_fd = open_directory(directory, trusted=trusted)
    except FileNotFoundError:
        # Nothing delivered yet: an empty maildrop, not an error.
        key: object = ("mbox path", os.path.abspath(path))
        PROCESS_LOCKS.claim(key)
        return _MboxMaildrop(path, name, None, key, None, None, reactor, indexing, refresher)
    except OSError as error:
        raise unavailable("cannot open the mbox directory", directory, error) from error
    dotlock: DotLock | None = None
    fd: int | None = None
    claimed = False
    try:
        directory_stat = os.fstat(dir_fd)
        key = ("mbox", directory_stat.st_dev, directory_stat.st_ino, name)
        PROCESS_LOCKS.claim(key)
        claimed = True
        dotlock = DotLock.acquire(
            name + DOTLOCK_SUFFIX,
            dir_fd=dir_fd,
            directory=directory,
            stale_seconds=DOTLOCK_STALE_SECONDS,
            pid_first=True,
            links_are_locks=True,
        )
        fd = _open_locked(dir_fd, name, path)
        # A leftover of a rewrite that crashed; with the locks held, nobody
        # else can be writing it.
        unlink_quietly("." + name + REWRITE_SUFFIX, dir_fd)
        current = None if fd is None else _MboxFile(fd, *_read_index(fd, path, indexing))
    except BaseException:
        if fd is not None:
            os.close(fd)
        if dotlock is not None:
            dotlock.release(dir_fd)
        os.close(dir_fd)
        if claimed:
            PROCESS_LOCKS.release(key)
        raise
    return _MboxMaildrop(path, name, dir_fd, key, dotlock, current, reactor, indexing, refresher)
