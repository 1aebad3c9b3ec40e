"""
Maildir storage (the layout Postfix, Dovecot, Courier and procmail deliver).

Messages are read from ``new/`` and ``cur/``; ``tmp/`` holds deliveries in
progress and is never looked at.  A message is identified across sessions by
its unique name, the part of the file name before ``:`` (so a move from
``new/`` to ``cur/`` by another program, which adds ``:2,FLAGS``, keeps it).

Maildirs usually belong to their users while the server runs with more
privilege, so nothing here follows a symbolic link: the Maildir itself, its
``new``/``cur`` directories, its messages and its lock file are opened with
``O_NOFOLLOW`` relative to directory descriptors, and only regular files are
served.  A user cannot point their Maildir at someone else's mail.  Between
commands a session holds no descriptor of its Maildir (so an idle session
costs one descriptor, its socket); each operation opens the directory again
and refuses to go on if it is no longer the directory the session locked.
The one exception is RETR: the ``new``/``cur`` directory a session's
messages come from stays open until the session ends, a few dozen for the
whole process at most (see `_OpenSubdirectories`), and the Maildir's path is
still checked before each message.

Opening a maildrop is cheap when nothing changed.  As Dovecot does, the
listing of a Maildir is kept in memory while ``new/``, ``cur/`` and
``dovecot-uidlist`` keep the inode and modification time they had when it
was made; like every Maildir reader this relies on the Maildir rule that a
delivered file is never rewritten in place.  When they change, the
directories are read again, but messages are read only when they are new:
the sizes of messages without a Maildir++ ``,W=`` field are kept by unique
name and inode, in memory and in the file ``pop3d-sizes`` of the Maildir.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import operator
import os
import re
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, cast, overload

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropUnavailable, MessageGone, POP3Error
from pop3d.stores.common import (
    check_template,
    expand_template,
    fixed_directory,
    run_blocking,
)
from pop3d.stores.counting import (
    NOT_COUNTED,
    CountingProcesses,
    DirectoryToCount,
    SharedCount,
    begin_count,
    wire_sizes,
)
from pop3d.stores.interfaces import (
    IClosesAtOnce,
    ICountingStore,
    IMaildrop,
    IMaildropLocks,
    IMaildropStore,
    IMessageBody,
    IOpensAtOnce,
    IRemovalCheck,
    IRetrievalTimes,
    IRetrievalTimesStore,
    ISeenFlags,
    MessageList,
)
from pop3d.stores.posix import (
    CREATE_FLAGS,
    DIRECTORY_FLAGS,
    READ_FLAGS,
    SAFE_OPEN,
    LockTable,
    exists,
    open_same_directory,
    short_read_is_end,
    unavailable,
    unlink_quietly,
)
from pop3d.uidl import (
    DOVECOT_DEFAULT_FORMAT,
    DovecotUidlist,
    check_format,
    expand_format,
    header_x_uidl,
    parse_dovecot_uidlist,
)
from pop3d.wire import MAX_UIDL_LENGTH, is_valid_uidl

#: The `LockTable` file, in the directory above the Maildirs (see
#: `default_lock_table`).  User names never start with a dot.
LOCK_TABLE_NAME = ".pop3d-locks"
#: Listings kept in memory, in messages over all Maildirs (about 300 bytes
#: each); the least recently opened Maildirs are dropped first.
LISTING_CACHE_MESSAGES = 250_000

#: Descriptors of the new/ and cur/ directories of sessions reading messages,
#: kept open between RETRs, at most this many per store (see `_OpenSubdirectories`).
OPEN_SUBDIRECTORIES = 64
#: From this many messages to count in a directory (in one slice of it, at
#: a first login: `SCAN_SLICE_STEPS`) on, its file system is asked whether a
#: short read is the end of a file (`short_read_is_end`, about as long as
#: 100 one-octet reads): a read saved per message then.
ASK_FILE_SYSTEM_FROM = 256
#: Names one C-level call handles at once in a large listing: about a
#: millisecond of holding the GIL, which the reactor thread waits for.
STEP = 8192
#: A first login reads a directory this many steps of entries at a time,
#: handing each slice's count to the helpers before it reads on.
SCAN_SLICE_STEPS = 4
#: Above this many kept messages, `mark_seen` decides what to rename off the
#: reactor thread too.
PLAN_INLINE_MESSAGES = 1000
#: From this many messages on, QUIT waits (at most `SETTLE_WAIT_SECONDS`) for
#: the renames it made to settle before reading new/ and cur/ again, so that
#: the next login trusts its listing at once; smaller Maildirs are read again
#: at the next login, which costs less than the wait.
SETTLE_AT_QUIT_MESSAGES = 5000
SETTLE_WAIT_SECONDS = 0.2
DOVECOT_UIDLIST = "dovecot-uidlist"
#: Where counted message sizes are kept (see `_SizeCache`).
SIZE_CACHE = "pop3d-sizes"
#: When messages were first retrieved, for EXPIRE (see `_Maildrop.record_retrievals`).
RETRIEVAL_TIMES = "pop3d-retrieved"
_MAX_UIDLIST_SIZE = 64 * 1024 * 1024
_MAX_HEADER_SIZE = 256 * 1024
# A directory changed this recently may change again within the same tick
# of the file system's clock, which its modification time would not show.
_SETTLING_NS = 100_000_000
_COARSE_SETTLING_NS = 2_000_000_000
# Maildir++ (Courier, Dovecot): ",W=" is the size with CRLF line endings.
_WIRE_SIZE_FIELD = re.compile(r",W=(\d+)(?:,|$)")

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")

#: Messages of new/ or cur/ whose sizes a first login reads: the subdirectory,
#: (unique name, file name, inode) of each, and the directory to count in.
_ToCount: TypeAlias = tuple[str, list[tuple[str, str, int]], DirectoryToCount]

log = Logger()


def uidl_for(unique_name: str) -> str:
    """
    The unique-id listing of a message: its Maildir unique name when that is
    a valid UIDL (RFC 1939 section 7), else a digest of it (long host names
    can push unique names past 70 characters).
    """
    if is_valid_uidl(unique_name):
        return unique_name
    return hashlib.sha1(unique_name.encode("utf-8", "surrogateescape")).hexdigest()


def _unique_name(file_name: str) -> str:
    return file_name.split(":", 1)[0]


Location = tuple[str, str]
"""Where a message file is: (``new`` or ``cur``, file name)."""


class _Locations(Sequence[Location]):
    """
    Where each message of a listing is, as two columns: kept for as long as
    the listing, 100,000 (subdirectory, name) tuples would be objects for
    the garbage collector to walk.
    """

    __slots__ = ("_names", "_subdirectories")

    def __init__(self, subdirectories: tuple[str, ...], names: tuple[str, ...]) -> None:
        self._subdirectories = subdirectories
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> Location: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Location]: ...

    def __getitem__(self, index: int | slice) -> Location | Sequence[Location]:
        if isinstance(index, slice):
            return list(zip(self._subdirectories[index], self._names[index], strict=True))
        return (self._subdirectories[index], self._names[index])

    def __iter__(self) -> Iterator[Location]:
        return zip(self._subdirectories, self._names, strict=True)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def subdirectories(self) -> tuple[str, ...]:
        return self._subdirectories


_PARTS = ("new", "cur", DOVECOT_UIDLIST)


#: One part's stamp, packed: inode and modification time (-1, -1: missing).
_PART_STAMP = struct.Struct("<qq")
_MISSING_PART = _PART_STAMP.pack(-1, -1)


@dataclass(frozen=True, slots=True)
class _Stamps:
    """
    What a listing depends on, part by part (new/, cur/, dovecot-uidlist):
    inode and modification time, None for a part that is missing or was not
    read (see `_take_stamps`), and whether each had settled: no change to it
    just before it was stamped that its time could hide.

    Kept with every listing, so once per idle session: packed into one bytes
    object and a bit mask (a few dozen octets, not the dozen small objects
    of tuples of ints).
    """

    packed: bytes
    settled_bits: int

    @classmethod
    def of(cls, parts: Sequence[tuple[int, int] | None], settled: Sequence[bool]) -> _Stamps:
        return cls(
            b"".join(_MISSING_PART if p is None else _PART_STAMP.pack(*p) for p in parts),
            sum(1 << n for n, done in enumerate(settled) if done),
        )

    @property
    def parts(self) -> tuple[tuple[int, int] | None, ...]:
        unpacked = (_PART_STAMP.unpack_from(self.packed, n * 16) for n in range(len(_PARTS)))
        return tuple(None if part == (-1, -1) else part for part in unpacked)

    @property
    def settled(self) -> tuple[bool, ...]:
        return tuple(bool(self.settled_bits >> n & 1) for n in range(len(_PARTS)))

    def trusted(self, now: _Stamps, part: int) -> bool:
        """Whether what was read of ``part`` under these stamps still holds ``now``."""
        start = part * 16
        return bool(self.settled_bits >> part & 1) and (
            self.packed[start : start + 16] == now.packed[start : start + 16]
        )

    def trusted_all(self, now: _Stamps) -> bool:
        # `trusted` of every part at once: each settled, and stamped alike.
        return self.settled_bits == _ALL_SETTLED and self.packed == now.packed


_ALL_SETTLED = (1 << len(_PARTS)) - 1

#: Stamps that nothing matches: every part is read again.
_UNKNOWN = _Stamps.of((None, None, None), (False, False, False))


@dataclass(frozen=True, slots=True)
class _Listing:
    """
    A Maildir's messages as last read.  One is kept per recently opened
    Maildir (so per idle session): it is kept small.
    """

    #: The parts as they were when they were read (see `_take_stamps`).
    stamps: _Stamps
    messages: MessageList
    locations: _Locations
    #: The inode of each message file.
    inodes: tuple[int, ...]

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Unique name -> (inode, wire size) of messages without ",W="."""
        return {unique: (inode, size) for unique, inode, size in self.size_entries()}

    def size_entries(self) -> Iterator[tuple[str, int, int]]:
        """(unique name, inode, wire size) of each message without ",W=", one at a time."""
        for unique, inode, size in zip(
            map(_unique_name, self.locations.names),
            self.inodes,
            self.messages.sizes,
            strict=True,
        ):
            if ",W=" not in unique or _WIRE_SIZE_FIELD.search(unique) is None:
                yield unique, inode, size


class _ListingCache:
    """Recent listings by Maildir path, bounded by their number of messages."""

    def __init__(self, max_messages: int) -> None:
        self._max_messages = max_messages
        self._listings: OrderedDict[str, _Listing] = OrderedDict()
        self._messages = 0

    def get(self, root: str) -> _Listing | None:
        listing = self._listings.get(root)
        if listing is not None:
            self._listings.move_to_end(root)
        return listing

    def put(self, root: str, listing: _Listing) -> None:
        self.forget(root)
        if not self._max_messages or len(listing.messages) > self._max_messages:
            return
        self._listings[root] = listing
        self._messages += len(listing.messages)
        while self._messages > self._max_messages:
            _, dropped = self._listings.popitem(last=False)
            self._messages -= len(dropped.messages)

    def peek(self, root: str) -> _Listing | None:
        """The listing kept for ``root``, leaving the order of recency as it is."""
        return self._listings.get(root)

    def forget(self, root: str) -> None:
        dropped = self._listings.pop(root, None)
        if dropped is not None:
            self._messages -= len(dropped.messages)


@implementer(IMaildropStore, IOpensAtOnce, IRetrievalTimesStore, ICountingStore)
class MaildirStore:
    """
    Maildirs found by a path template such as ``/srv/mail/{user}``.

    ``{user}`` is the whole user name, ``{local}`` and ``{domain}`` its parts
    around ``@``.  With a ``reactor``, reading a Maildir that changed (which
    may read messages to learn their sizes) runs in the reactor's thread
    pool, so other sessions are not held up; without one it runs inline.
    Taking the lock and checking that nothing changed since the last listing
    (a few system calls) run inline.

    UIDLs are the messages' unique names, except where the Maildir holds a
    ``dovecot-uidlist``: messages Dovecot listed keep the UIDL Dovecot served
    (its stored one, or ``uidl_format``, Dovecot's own default unless given:
    see `pop3d.uidl`).  A ``uidl_format`` using only ``%f``/``%m`` applies to
    every message.  With ``reuse_x_uidl``, a message's ``X-UIDL`` header
    (written by qpopper and others) is its UIDL, after Dovecot's and before
    ``uidl_format``.

    ``listing_cache`` is how many messages of recent listings are kept in
    memory (0: none, every login reads its directories).  ``locks`` keep a
    maildrop to one session (see `pop3d.stores.posix`): by default a `LockTable`
    in `default_lock_table` of the template; `LockFiles` for NFS.

    Two knobs keep the reactor thread responsive with huge Maildirs (the
    defaults suit them; tests make them small): a large listing is sorted
    and checked ``step`` names at a time (`STEP`), and `mark_seen` decides
    what to rename in the thread pool when more than ``plan_inline``
    messages are kept (`PLAN_INLINE_MESSAGES`).

    A session that retrieves messages keeps the ``new/`` or ``cur/``
    directory it read them from open until it ends, so that each RETR opens
    one file: at most ``held_directories`` descriptors for the whole store
    (`OPEN_SUBDIRECTORIES`; 0: none, every RETR opens the Maildir again).

    Its maildrops keep the time of each message's first retrieval
    (`pop3d.stores.interfaces.IRetrievalTimes`, for EXPIRE) in the file
    `RETRIEVAL_TIMES` of the Maildir.

    Counting sizes reads each message to its end.  Where
    ``short_read_is_end`` (given a descriptor of ``new/`` or ``cur/``) says
    that a read returning less than asked is the end of a file, as on local
    disks (`pop3d.stores.posix.short_read_is_end`, the default), a message
    read in one go needs no second read to show its end; elsewhere (FUSE,
    9p, NFS) only an empty read is the end.  With ``counting``, a Maildir
    read in full (its first login, or one whose kept sizes were lost)
    shares the counting with those helper processes
    (`pop3d.stores.counting.CountingProcesses`, which the application
    starts and stops).
    """

    def __init__(
        self,
        template: str,
        *,
        reactor: IReactorThreads | None = None,
        uidl_format: str | None = None,
        reuse_x_uidl: bool = False,
        listing_cache: int = LISTING_CACHE_MESSAGES,
        locks: IMaildropLocks | None = None,
        step: int = STEP,
        plan_inline: int = PLAN_INLINE_MESSAGES,
        settle_at_quit: int = SETTLE_AT_QUIT_MESSAGES,
        held_directories: int = OPEN_SUBDIRECTORIES,
        short_read_is_end: Callable[[int], bool] = short_read_is_end,
        counting: CountingProcesses | None = None,
    ) -> None:
        check_template(template)
        if uidl_format is not None:
            check_format(uidl_format)
        self.template = template
        self.uidl_format = uidl_format
        self.reuse_x_uidl = reuse_x_uidl
        self.locks = locks if locks is not None else LockTable(default_lock_table(template))
        self._naming = _UIDLNaming(uidl_format, reuse_x_uidl)
        self._reactor = reactor
        self.listing_cache = listing_cache
        self.step = step
        self.plan_inline = plan_inline
        self.settle_at_quit = settle_at_quit
        self.short_read_is_end = short_read_is_end
        self.counting = counting
        self._listings = _ListingCache(listing_cache)
        self._subdirectories = _OpenSubdirectories(held_directories)
        self._notes = _ChangeNotes()

    def path_for(self, mailbox: str) -> str | None:
        return expand_template(self.template, mailbox)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        # maybeDeferred, typed: its overloads take no "a value or a Deferred".
        try:
            opened = self.open_at_once(mailbox)
        except Exception:
            return fail()
        return opened if isinstance(opened, Deferred) else succeed(opened)

    def open_at_once(self, mailbox: str) -> IMaildrop | Deferred[IMaildrop]:
        """
        `IOpensAtOnce`: the maildrop itself when its listing is the one
        kept from the last login (nearly every login), else a Deferred (the
        directories are read in the thread pool).
        """
        root = self.path_for(mailbox)
        if root is None:
            raise UnauthorizedLogin()
        try:
            root_fd = os.open(root, DIRECTORY_FLAGS)
        except FileNotFoundError:
            # Nothing delivered yet: an empty maildrop, not an error.
            return _Maildrop(None, MessageList(), (), None, self)
        except OSError as error:
            raise unavailable("cannot open maildir", root, error) from None
        release: Callable[[], None] | None = None
        try:
            info = os.fstat(root_fd)
            directory = _Directory(root, info.st_dev, info.st_ino)
            release = self.locks.acquire(root, root_fd, info)
            stamps = _take_stamps(root_fd)
        except BaseException as error:
            # Whatever went wrong (a lock file its owner filled with
            # nonsense, say), neither the descriptor nor the lock stays.
            os.close(root_fd)
            if release is not None:
                release()
            if isinstance(error, OSError):
                raise unavailable("cannot read maildir", root, error) from None
            raise
        held = release
        cached = self._listings.get(root)
        if cached is not None and cached.stamps.trusted_all(stamps):
            os.close(root_fd)
            return _Maildrop(directory, cached.messages, cached.locations, held, self, cached)

        def scan() -> tuple[_Listing, _SizesToSave]:
            try:
                return self._read(root, root_fd, stamps, cached)
            finally:
                os.close(root_fd)

        def opened(scanned: tuple[_Listing, _SizesToSave]) -> IMaildrop:
            listing, changed_sizes = scanned
            self._keep(directory, listing, changed_sizes)
            return _Maildrop(directory, listing.messages, listing.locations, held, self, listing)

        def failed(reason: Failure) -> Failure:
            held()
            return reason

        return run_blocking(self._reactor, scan).addCallbacks(opened, failed)

    def _read(
        self, root: str, root_fd: int, stamps: _Stamps, cached: _Listing | None
    ) -> tuple[_Listing, _SizesToSave]:
        """
        The listing of a Maildir whose parts have ``stamps``: ``cached``
        brought up to date by reading again only the directories that may
        have changed (see `_refresh`), else everything read again.
        """
        if cached is not None and self._incremental(cached, stamps):
            refreshed = _refresh(root, root_fd, cached, stamps, self._notes)
            if refreshed is not None:
                return refreshed
        # In the thread too: 100,000 sizes take a tenth of a second.
        known = cached.sizes() if cached is not None else None
        messages, locations, inodes, changed = _snapshot(
            root, root_fd, self._naming, known, self.step, self.short_read_is_end, self.counting
        )
        listing = _Listing(stamps, messages, locations, tuple(inodes))
        return listing, (_SizeUpdate(None, False) if changed else None)

    def _incremental(self, cached: _Listing, stamps: _Stamps) -> bool:
        """
        Whether ``cached`` can be brought up to date part by part: its order
        is the unique names' (no dovecot-uidlist, then or now) and its UIDLs
        depend on nothing but the names.
        """
        uidlist = _PARTS.index(DOVECOT_UIDLIST)
        return (
            self._naming == _PLAIN_NAMING
            and cached.stamps.parts[uidlist] is None
            and stamps.parts[uidlist] is None
        )

    def _keep(self, directory: _Directory, listing: _Listing, sizes: _SizesToSave) -> None:
        """Keep ``listing`` for the next login (on the reactor thread), and new sizes on disk."""
        self._listings.put(directory.path, listing)
        if sizes is not None:
            # After the answer, not before it: the client waits for no
            # file it does not need.
            saving = run_blocking(self._reactor, _save_sizes, directory, sizes, listing)
            saving.addErrback(lambda failure: log.failure("saving sizes failed", failure))

    def _cached(self, root: str) -> _Listing | None:
        return self._listings.peek(root)


def default_lock_table(template: str) -> str:
    """
    Where the `LockTable` of a template is by default: in the directory
    above its first placeholder (``/srv/mail/.pop3d-locks`` for
    ``/srv/mail/{user}``), which belongs to the administrator.
    """
    return os.path.join(fixed_directory(template), LOCK_TABLE_NAME)


def _take_stamps(root_fd: int) -> _Stamps:
    """
    The stamps of a Maildir's parts now, each settled if it last changed
    long enough ago that a later change cannot keep its time.  Whatever is
    read of a part after this is at least as new as its stamp.
    """
    now = time.time_ns()
    # Packed as `_Stamps.of` packs them, without its lists of parts (every
    # login takes stamps).
    packed = b""
    settled_bits = 0
    for part, name in enumerate(_PARTS):
        try:
            info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            packed += _MISSING_PART
            settled_bits |= 1 << part
            continue
        mtime = info.st_mtime_ns
        packed += _PART_STAMP.pack(info.st_ino, mtime)
        # Whole seconds: a file system (or NFS server) with coarse times,
        # where a change within the same second would not show.
        settling = _COARSE_SETTLING_NS if mtime % 1_000_000_000 == 0 else _SETTLING_NS
        if mtime < now - settling:
            settled_bits |= 1 << part
    return _Stamps(packed, settled_bits)


# -- bringing a kept listing up to date ---------------------------------------
#
# A later login reads again only the directories whose stamp changed (or had
# not settled), and compares what it finds with the kept listing: with no
# dovecot-uidlist and plain UIDLs, a listing is in unique-name order and each
# message's UIDL follows from its name, so a difference is handled where it
# is: messages gone are dropped, messages moved or flagged by another
# program keep their place, new ones (whose unique names sort after every
# kept one, as a delivery's do) are counted and appended.  Anything else
# (a name in two places, a delivery that sorts before kept mail, a file
# gone while counting it) is read the long way, `_snapshot`.


@dataclass(frozen=True, slots=True)
class _SizeUpdate:
    """
    Sizes for `SIZE_CACHE`: all of them, or ones to append to the file;
    None: every size of the listing kept with it (read from it in the
    thread pool after the answer: 100,000 take ~40 ms).
    """

    sizes: dict[str, tuple[int, int]] | None
    append: bool


_SizesToSave = _SizeUpdate | None


def _refresh(
    root: str,
    root_fd: int,
    cached: _Listing,
    stamps: _Stamps,
    notes: _ChangeNotes | None = None,
) -> tuple[_Listing, _SizesToSave] | None:
    """
    ``cached`` brought up to date with what new/ and cur/ hold now (their
    stamps taken before this reads them: ``stamps``), reading only the ones
    whose stamp is not the one it was read under, and of those only the
    ones ``notes`` do not say how they changed; None where only a full
    read can tell (see above).
    """
    untrusted = [part for part in range(2) if not cached.stamps.trusted(stamps, part)]
    noted: dict[str, tuple[dict[str, int], list[tuple[str, str, int]]]] = {}
    if notes is not None and any(cached.stamps.settled[part] for part in untrusted):
        # Another process's QUIT may have noted what it changed: then that
        # directory is not read (see `CHANGE_NOTES`).  A note never costs a
        # login: whatever goes wrong, the directories are read.
        try:
            noted = _changes_from_notes(
                root, root_fd, notes.read(root, root_fd), cached, stamps, untrusted
            )
        except Exception:
            log.failure("reading {path} failed", path=os.path.join(root, CHANGE_NOTES))

    def read(parts: list[int]) -> dict[str, dict[str, int]]:
        return {_PARTS[part]: dict(_entries(root, root_fd, _PARTS[part])) for part in parts}

    reread = read([part for part in untrusted if _PARTS[part] not in noted])
    counted: dict[str, tuple[int, int]] = {}
    try:
        listing = (
            _apply(root, root_fd, cached, reread, counted, noted) if reread or noted else cached
        )
    except Exception:
        if not noted:
            raise
        # Something the notes said could not be used (a file that is no
        # message any more): the directories say what is there.
        log.failure("using {path} failed", path=os.path.join(root, CHANGE_NOTES))
        reread = read(untrusted)
        counted = {}
        listing = _apply(root, root_fd, cached, reread, counted, {})
    if listing is None:
        return None
    listing = _Listing(stamps, listing.messages, listing.locations, listing.inodes)
    return listing, (_SizeUpdate(counted, True) if counted else None)


def _positions(subdirectories: tuple[str, ...], subdirectory: str) -> list[int]:
    """Where a listing's messages in ``subdirectory`` are (new/ holds few, often none)."""
    count = subdirectories.count(subdirectory)
    if count * 16 < len(subdirectories):
        positions: list[int] = []
        at = -1
        for _ in range(count):
            at = subdirectories.index(subdirectory, at + 1)
            positions.append(at)
        return positions
    if count == len(subdirectories):
        return list(range(count))
    here = map(subdirectory.__eq__, subdirectories)
    return list(itertools.compress(range(len(subdirectories)), here))


def _could_be_digest(uidl: str) -> bool:
    return len(uidl) == 40 and all(c in "0123456789abcdef" for c in uidl)


def _compare(
    subdirectory: str,
    here: list[int],
    listing: _Listing,
    entries: dict[str, int],
    gone_at: dict[str, int],
    came: list[tuple[str, str, int]],
) -> None:
    """
    What ``subdirectory`` holds now (``entries``: file name -> inode) that
    the listing's messages at positions ``here`` do not: the unique name of
    each kept file gone or replaced under its name -> its position, into
    ``gone_at``; (subdirectory, file name, inode) of each file that is not
    one of them (or replaced one), into ``came``.

    Column operations in C, with no pair made per file: after another
    process's QUIT (``--workers``) cur/ holds 100,000 names of which a few
    changed, and sets of (name, inode) pairs took a tenth of a second.
    """
    names = listing.locations.names
    inodes = listing.inodes
    if len(here) == len(names):
        here_names, here_inodes = names, inodes  # all of them: cur/ after QUIT
    else:
        here_names = tuple(map(names.__getitem__, here))
        here_inodes = tuple(map(inodes.__getitem__, here))
    # Each kept name's inode now (None: gone); names in a directory are unique.
    now = tuple(map(entries.get, here_names))
    still_there = len(here) - now.count(None)
    if now == here_inodes and still_there == len(entries):
        return  # the very files the listing has, and nothing else
    changed = zip(here, here_names, now, strict=True)
    for at, name, inode in itertools.compress(changed, map(operator.ne, here_inodes, now)):
        gone_at[_unique_name(name)] = at
        if inode is not None:
            came.append((subdirectory, name, inode))  # replaced: counted again
    if len(entries) > still_there:
        kept = set(here_names)
        came.extend(
            (subdirectory, name, inode) for name, inode in entries.items() if name not in kept
        )


def _apply(
    root: str,
    root_fd: int,
    listing: _Listing,
    reread: dict[str, dict[str, int]],
    counted: dict[str, tuple[int, int]],
    noted: Mapping[str, tuple[dict[str, int], list[tuple[str, str, int]]]] | None = None,
) -> _Listing | None:
    """
    ``listing`` with what the ``reread`` subdirectories hold now (file name
    -> inode), and the changes ``noted`` of others (what `_compare` would
    find there: see `_changes_from_notes`); sizes read meanwhile are added
    to ``counted``.  None if only a full read can tell.
    """
    subdirectories = listing.locations.subdirectories
    names = listing.locations.names
    inodes = listing.inodes
    count = len(names)
    gone_at: dict[str, int] = {}
    came: list[tuple[str, str, int]] = []
    for subdirectory, entries in reread.items():
        here = _positions(subdirectories, subdirectory)
        _compare(subdirectory, here, listing, entries, gone_at, came)
    for noted_gone, noted_came in (noted or {}).values():
        gone_at.update(noted_gone)
        came.extend(noted_came)
    if not gone_at and not came:
        return listing
    moved: dict[int, tuple[str, str, int]] = {}
    fresh: dict[str, tuple[str, str, int]] = {}
    for subdirectory, name, inode in came:
        unique = _unique_name(name)
        at = gone_at.pop(unique, None)
        if at is not None:
            # Moved or flagged by another program (or replaced): same place.
            moved[at] = (subdirectory, name, inode)
        elif unique in fresh:
            return None  # one unique name twice
        else:
            fresh[unique] = (subdirectory, name, inode)
    removed = set(gone_at.values())
    new_uniques = sorted(fresh)
    if new_uniques:
        last = next((at for at in range(count - 1, -1, -1) if at not in removed), None)
        if last is not None and _unique_name(names[last]) >= new_uniques[0]:
            return None  # not after every kept message: sorted the long way
        # A later unique name is no kept message's, nor its UIDL, unless
        # that UIDL is a digest (see `uidl_for`).
        digests = [unique for unique in new_uniques if _could_be_digest(uidl_for(unique))]
        if digests and not set(digests).isdisjoint(listing.messages.uids):
            return None
    # What needs a size: new messages, and files replaced under a kept name.
    replaced = {at for at, (_, _, inode) in moved.items() if inode != inodes[at]}
    to_count = dict(fresh)
    to_count.update((_unique_name(moved[at][1]), moved[at]) for at in replaced)
    found: dict[str, tuple[int, int]] = {}
    if to_count:
        found, uncounted = _known_sizes(to_count, {})
        for subdirectory, todo in uncounted.items():
            if todo:
                with _subdirectory(root, root_fd, subdirectory) as directory_fd:
                    if directory_fd is None:
                        return None
                    path = os.path.join(root, subdirectory)
                    _count_sizes(path, directory_fd, todo, found)
        if len(found) != len(to_count):
            return None  # gone since: the long way finds where
        counted.update(
            (unique, entry)
            for unique, entry in found.items()
            if ",W=" not in unique or _WIRE_SIZE_FIELD.search(unique) is None
        )
    sizes = listing.messages.sizes
    if not moved and not removed:
        # Deliveries only: the columns are the kept ones, extended in C.
        added = [fresh[unique] for unique in new_uniques]
        locations = _Locations(
            subdirectories + tuple([subdirectory for subdirectory, _, _ in added]),
            names + tuple([name for _, name, _ in added]),
        )
        messages = listing.messages.extended(
            tuple([uidl_for(unique) for unique in new_uniques]),
            tuple([found[unique][1] for unique in new_uniques]),
        )
        inodes = inodes + tuple([inode for _, _, inode in added])
        return _Listing(listing.stamps, messages, locations, inodes)
    kept_subdirectories = list(subdirectories)
    kept_names = list(names)
    kept_inodes = list(inodes)
    kept_sizes = list(sizes)
    for at, (subdirectory, name, inode) in moved.items():
        kept_subdirectories[at] = subdirectory
        kept_names[at] = name
        kept_inodes[at] = inode
        if at in replaced:
            kept_sizes[at] = found[_unique_name(name)][1]
    kept_uids = listing.messages.uids
    if removed:
        keep = [at not in removed for at in range(count)]
        kept_subdirectories = list(itertools.compress(kept_subdirectories, keep))
        kept_names = list(itertools.compress(kept_names, keep))
        kept_inodes = list(itertools.compress(kept_inodes, keep))
        kept_sizes = list(itertools.compress(kept_sizes, keep))
        kept_uids = tuple(itertools.compress(kept_uids, keep))
    if removed or replaced:
        messages = MessageList(kept_uids, tuple(kept_sizes))
    else:
        messages = listing.messages
    if new_uniques:
        added = [fresh[unique] for unique in new_uniques]
        kept_subdirectories.extend(subdirectory for subdirectory, _, _ in added)
        kept_names.extend(name for _, name, _ in added)
        kept_inodes.extend(inode for _, _, inode in added)
        # Appended: what LIST and UIDL formatted of the kept part stays.
        messages = messages.extended(
            tuple(uidl_for(unique) for unique in new_uniques),
            tuple(found[unique][1] for unique in new_uniques),
        )
    locations = _Locations(tuple(kept_subdirectories), tuple(kept_names))
    return _Listing(listing.stamps, messages, locations, tuple(kept_inodes))


# -- notes of what a QUIT changed, for the other processes ---------------------
#
# With ``--workers``, each process keeps its own listing of a Maildir.  When
# a session in one of them QUITs (renaming messages from new/ to cur/ and
# flagging them seen), the listing another process keeps no longer matches
# cur/'s stamp, and reading 100,000 names again to find the few that changed
# takes 0.1-0.3 s.  So the QUIT that verified its changes (it reads new/ and
# cur/ again, see `_Maildrop._bring_listing_up_to_date`) also writes them
# down, directory by directory, in the state file `CHANGE_NOTES` of the
# Maildir: "new/ (or cur/) went from stamp A to stamp B by losing these files
# and gaining those".  Another process whose listing of that directory was
# read under A (settled) and that finds it at B now applies the change
# instead of reading the directory; several notes in a row are followed one
# after the other.  A file in the Maildir works across processes, restarts
# and servers sharing it; the maildrop's lock keeps its writers one at a
# time; it is replaced whole (`_replace_state_file`).
#
# Correctness never depends on a note: a stamp identifies what a directory
# holds only once it has settled (see `_take_stamps`), so a note is written
# only for a directory whose stamps before and after had both settled, and
# used only from a listing whose stamp had settled too; a directory whose
# chain of notes does not lead to its stamp now, a note whose files are not
# where the listing has them, and a note file that is damaged or not
# pop3d's are read the usual way.

#: Where QUITs note what they changed (see above).
CHANGE_NOTES = "pop3d-changes"
_CHANGE_NOTES_HEADER = "pop3d-changes 1"
#: Notes kept in the file, the most recent ones, over both directories.
MAX_CHANGE_NOTES = 16
#: A QUIT that changed more files than this in one directory notes nothing
#: for it (a reader would spend about what reading the directory costs).
MAX_NOTED_FILES = 2000
_MAX_CHANGE_NOTES_SIZE = 1024 * 1024
#: Maildirs whose parsed notes a store keeps (see `_ChangeNotes`).
MAX_PARSED_NOTES = 64


@dataclass(frozen=True, slots=True)
class _ChangeNote:
    """
    What one QUIT did to one of new/ and cur/: the directory had the
    (inode, modification time) ``before``, then ``after`` (both settled),
    and lost the files ``removed`` and gained ``added`` in between, each
    as (file name, inode).
    """

    subdirectory: str
    before: tuple[int, int]
    after: tuple[int, int]
    removed: tuple[tuple[str, int], ...]
    added: tuple[tuple[str, int], ...]


def _changes_made(
    base: _Listing,
    locations: Sequence[Location],
    removed: AbstractSet[int],
    recorded: _Listing,
    verified: _Listing,
) -> list[_ChangeNote]:
    """
    Notes of what a session did to the Maildir it listed as ``base``: it
    removed the messages at positions ``removed`` and left the others at
    ``locations`` (renamed by its QUIT, or found moved), which gave the
    listing ``recorded``.  ``verified`` is what new/ and cur/ held when
    read again after that.  Nothing if they differ (another program
    changed the Maildir meanwhile: its change is not known file by file),
    and nothing for a directory whose stamps had not settled.
    """
    if not (
        verified.inodes == recorded.inodes
        and verified.locations.names == recorded.locations.names
        and verified.locations.subdirectories == recorded.locations.subdirectories
    ):
        return []
    parts = [
        part
        for part in range(2)
        if base.stamps.settled[part]
        and verified.stamps.settled[part]
        and base.stamps.parts[part] is not None
        and verified.stamps.parts[part] is not None
        and base.stamps.parts[part] != verified.stamps.parts[part]
    ]
    if not parts:
        return []
    before_subdirectories = base.locations.subdirectories
    before_names = base.locations.names
    subdirectories, names = _columns(locations)
    count = range(len(before_names))
    # Column operations in C: a QUIT on 100,000 messages renames a few.
    changed = set(itertools.compress(count, map(operator.ne, before_names, names)))
    changed.update(
        itertools.compress(count, map(operator.ne, before_subdirectories, subdirectories))
    )
    changed.update(removed)
    gone: dict[str, list[tuple[str, int]]] = {"new": [], "cur": []}
    came: dict[str, list[tuple[str, int]]] = {"new": [], "cur": []}
    for at in sorted(changed):
        inode = base.inodes[at]
        gone[before_subdirectories[at]].append((before_names[at], inode))
        if at not in removed:
            came[subdirectories[at]].append((names[at], inode))
    notes = []
    for part in parts:
        subdirectory = _PARTS[part]
        files = gone[subdirectory] + came[subdirectory]
        if len(files) > MAX_NOTED_FILES or any("\t" in name or "\n" in name for name, _ in files):
            continue
        before, after = base.stamps.parts[part], verified.stamps.parts[part]
        assert before is not None and after is not None
        notes.append(
            _ChangeNote(
                subdirectory, before, after, tuple(gone[subdirectory]), tuple(came[subdirectory])
            )
        )
    return notes


def _columns(locations: Sequence[Location]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The subdirectories and the names of ``locations``, as two columns."""
    if isinstance(locations, _Locations):
        return locations.subdirectories, locations.names
    if not locations:
        return (), ()
    subdirectories, names = zip(*locations, strict=True)
    return subdirectories, names


class _ChangeNotes:
    """
    Reading and writing `CHANGE_NOTES` (in the thread pool).  A file that
    cannot be understood is ignored, and said once per file (its inode and
    time) and store; a later QUIT replaces it.  What a file says is parsed
    once (while its inode, time and size stay), not at every login after
    a delivery: the notes of the `MAX_PARSED_NOTES` Maildirs read last.
    """

    def __init__(self) -> None:
        # Both used by several pool threads at once.
        self._lock = threading.Lock()
        self._complained: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._parsed: OrderedDict[str, tuple[tuple[int, int, int], list[_ChangeNote]]] = (
            OrderedDict()
        )

    def read(self, root: str, root_fd: int) -> list[_ChangeNote]:
        """The notes of a Maildir, oldest first; none if there are none to trust."""
        try:
            # One stat while the file stays as it was parsed last.
            seen = os.stat(CHANGE_NOTES, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return []
        except OSError as error:
            self._complain(root, (0, 0), f"cannot look at it: {error}")
            return []
        with self._lock:
            parsed = self._parsed.get(root)
            if parsed is not None and parsed[0] == (seen.st_ino, seen.st_mtime_ns, seen.st_size):
                self._parsed.move_to_end(root)
                return list(parsed[1])
        try:
            fd, info = _open_regular_file(CHANGE_NOTES, root_fd)
        except FileNotFoundError:
            return []
        except OSError as error:
            self._complain(root, (0, 0), f"cannot open it: {error}")
            return []
        try:
            stamp = (info.st_ino, info.st_mtime_ns)
            version = (info.st_ino, info.st_mtime_ns, info.st_size)
            size = info.st_size
            if size > _MAX_CHANGE_NOTES_SIZE:
                self._complain(root, stamp, "it is too large")
                return []
            data = _read_up_to(fd, _MAX_CHANGE_NOTES_SIZE + 1)
        except OSError as error:
            self._complain(root, (0, 0), f"cannot read it: {error}")
            return []
        finally:
            os.close(fd)
        notes = _parse_change_notes(data)
        if notes is None:
            self._complain(root, stamp, "it is not pop3d's, or damaged")
            return []
        with self._lock:
            self._parsed[root] = (version, notes)
            self._parsed.move_to_end(root)
            while len(self._parsed) > MAX_PARSED_NOTES:
                self._parsed.popitem(last=False)
        return list(notes)

    def add(self, root: str, root_fd: int, notes: list[_ChangeNote]) -> None:
        """Keep ``notes`` after the most recent ones; a failure is logged, nothing more."""
        kept = (self.read(root, root_fd) + notes)[-MAX_CHANGE_NOTES:]
        text = _format_change_notes(kept)
        while len(text) > _MAX_CHANGE_NOTES_SIZE and len(kept) > 1:
            kept = kept[1:]  # no larger than a reader accepts
            text = _format_change_notes(kept)
        try:
            _replace_state_file(root_fd, CHANGE_NOTES, [text])
        except OSError as error:
            log.info("not noting changes in {root}: {error}", root=root, error=error)

    def _complain(self, root: str, stamp: tuple[int, int], why: str) -> None:
        key = (root, *stamp)
        with self._lock:
            if key in self._complained:
                return
            self._complained[key] = None
            if len(self._complained) > 1000:
                self._complained.popitem(last=False)
        path = os.path.join(root, CHANGE_NOTES)
        log.warn("ignoring {path}: {why}", path=path, why=why)


def _format_change_notes(notes: list[_ChangeNote]) -> bytes:
    lines = [_CHANGE_NOTES_HEADER]
    for note in notes:
        lines.append(
            "\t".join(
                map(
                    str,
                    (
                        "note",
                        note.subdirectory,
                        *note.before,
                        *note.after,
                        len(note.removed),
                        len(note.added),
                    ),
                )
            )
        )
        lines.extend(f"{name}\t{inode}" for name, inode in note.removed + note.added)
    lines.append("end")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _parse_change_notes(data: bytes) -> list[_ChangeNote] | None:
    """The notes in a `CHANGE_NOTES` file; None unless all of it is pop3d's, whole."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if lines[0] != _CHANGE_NOTES_HEADER or lines[-2:] != ["end", ""]:
        return None
    notes: list[_ChangeNote] = []
    at = 1
    end = len(lines) - 2
    while at < end:
        fields = lines[at].split("\t")
        if (
            len(fields) != 8
            or fields[0] != "note"
            or fields[1] not in ("new", "cur")
            or not all(map(_is_number, fields[2:]))
        ):
            return None
        numbers = [int(field) for field in fields[2:]]
        removed, added = numbers[4], numbers[5]
        files: list[tuple[str, int]] = []
        for line in lines[at + 1 : at + 1 + removed + added]:
            name, tab, inode = line.partition("\t")
            if not tab or not _is_message_name(name) or not _is_number(inode):
                return None
            files.append((name, int(inode)))
        if len(files) != removed + added:
            return None
        notes.append(
            _ChangeNote(
                fields[1],
                (numbers[0], numbers[1]),
                (numbers[2], numbers[3]),
                tuple(files[:removed]),
                tuple(files[removed:]),
            )
        )
        at += 1 + removed + added
    return notes if at == end else None


def _is_message_name(name: str) -> bool:
    """
    Whether ``name`` could be a message's file in new/ or cur/, as `_entries`
    lists them: a note names no path (``/``), nothing hidden, ``.`` or
    ``..`` (a user who can write their Maildir can write its notes too).
    """
    return bool(name) and not name.startswith(".") and "/" not in name and "\0" not in name


def _follow_notes(
    notes: list[_ChangeNote], subdirectory: str, start: tuple[int, int], goal: tuple[int, int]
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]] | None:
    """
    The files ``subdirectory`` lost and gained going from stamp ``start``
    to ``goal``, following ``notes`` one after the other; None if they do
    not lead there.
    """
    removed: set[tuple[str, int]] = set()
    added: set[tuple[str, int]] = set()
    stamp = start
    for _ in range(len(notes)):
        note = next(
            (
                note
                for note in reversed(notes)
                if note.subdirectory == subdirectory and note.before == stamp
            ),
            None,
        )
        if note is None:
            return None
        for entry in note.removed:
            if entry in added:
                added.discard(entry)
            else:
                removed.add(entry)
        for entry in note.added:
            if entry in removed:
                removed.discard(entry)
            else:
                added.add(entry)
        stamp = note.after
        if stamp == goal:
            return removed, added
    return None


def _noted_changes(
    root: str,
    root_fd: int,
    listing: _Listing,
    subdirectory: str,
    removed: set[tuple[str, int]],
    added: set[tuple[str, int]],
) -> tuple[dict[str, int], list[tuple[str, str, int]]] | None:
    """
    What `_compare` would find in ``subdirectory`` after it lost
    ``removed`` and gained ``added`` (see there), found by looking up each
    removed file in the listing (which is in unique-name order) rather than
    comparing every file, and each added one in the directory (a regular
    file with the noted inode, as `_entries` would list it); None if one is
    not where the note has it.
    """
    with _subdirectory(root, root_fd, subdirectory) as directory_fd:
        if directory_fd is None and added:
            return None
        for name, inode in added:
            try:
                info = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
            except OSError:
                return None
            if not stat.S_ISREG(info.st_mode) or info.st_ino != inode:
                return None
    names = listing.locations.names
    subdirectories = listing.locations.subdirectories
    gone_at: dict[str, int] = {}
    for name, inode in removed:
        unique = _unique_name(name)
        at = bisect.bisect_left(names, unique, key=_unique_name)
        if not (
            at < len(names)
            and names[at] == name
            and subdirectories[at] == subdirectory
            and listing.inodes[at] == inode
        ):
            return None
        gone_at[unique] = at
    came = [(subdirectory, name, inode) for name, inode in sorted(added)]
    return gone_at, came


def _changes_from_notes(
    root: str,
    root_fd: int,
    notes: list[_ChangeNote],
    cached: _Listing,
    stamps: _Stamps,
    parts: list[int],
) -> dict[str, tuple[dict[str, int], list[tuple[str, str, int]]]]:
    """
    For each of ``parts`` (new/, cur/) whose stamp in ``cached`` had settled
    and whose notes lead from it to its stamp now (settled too: a note is
    only written for settled stamps): what changed in it, as `_compare`
    finds it.
    """
    found: dict[str, tuple[dict[str, int], list[tuple[str, str, int]]]] = {}
    for part in parts:
        start, goal = cached.stamps.parts[part], stamps.parts[part]
        if not cached.stamps.settled[part] or start is None or goal is None:
            continue
        subdirectory = _PARTS[part]
        followed = _follow_notes(notes, subdirectory, start, goal)
        if followed is None:
            continue
        changes = _noted_changes(root, root_fd, cached, subdirectory, *followed)
        if changes is not None:
            found[subdirectory] = changes
    return found


def _settling_delay(directory: _Directory) -> float | None:
    """
    Seconds until new/ and cur/ of a Maildir have settled (0: they have);
    None if that is more than `SETTLE_WAIT_SECONDS` away (a file system
    with whole-second times).
    """
    with directory.opened() as root_fd:
        now = time.time_ns()
        delay = 0
        for name in _PARTS[:2]:
            try:
                mtime = os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
            if mtime % 1_000_000_000 == 0:
                return None
            delay = max(delay, mtime + _SETTLING_NS + 1_000_000 - now)
    return delay / 1e9 if delay <= SETTLE_WAIT_SECONDS * 1e9 else None


# eq=False: known by identity (one per session), so that a key of
# `_OpenSubdirectories` is hashed in C, not by a generated __hash__ per RETR.
@dataclass(frozen=True, slots=True, eq=False)
class _Directory:
    """A Maildir a session has locked: its path, and which directory it was."""

    path: str
    device: int
    inode: int

    def unchanged(self) -> bool:
        """Whether the path still names the Maildir that was locked (one lstat)."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == (self.device, self.inode)

    @contextmanager
    def opened(self) -> Iterator[int]:
        """A descriptor of the Maildir, refusing a directory put in its place."""
        try:
            fd = open_same_directory(self.path, (self.device, self.inode))
        except OSError as error:
            raise unavailable("cannot open maildir", self.path, error) from error
        if fd is None:
            log.error("{path} was replaced during a session", path=self.path)
            raise MaildropUnavailable("the maildir was replaced", permanent=True)
        try:
            yield fd
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _UIDLNaming:
    """How UIDLs of other servers are kept (see `MaildirStore`)."""

    uidl_format: str | None
    reuse_x_uidl: bool


#: Unique names as UIDLs, unless dovecot-uidlist says otherwise.
_PLAIN_NAMING = _UIDLNaming(None, False)


@contextmanager
def _subdirectory(root: str, root_fd: int, name: str) -> Iterator[int | None]:
    """A descriptor of new/ or cur/, or None if there is none."""
    try:
        fd = os.open(name, DIRECTORY_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        yield None
        return
    except OSError as error:
        raise unavailable("cannot open maildir", os.path.join(root, name), error) from error
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(root: str, root_fd: int, subdirectory: str) -> list[tuple[str, int]]:
    """(file name, inode) of every regular, visible file in new/ or cur/."""
    with _subdirectory(root, root_fd, subdirectory) as fd:
        if fd is None:
            return []
        path = os.path.join(root, subdirectory)
        return [entry for some in _entry_slices(path, fd, STEP) for entry in some]


def _files(
    root: str, root_fd: int, subdirectories: Sequence[str]
) -> Iterator[tuple[str, str, int]]:
    """(subdirectory, file name, inode) of every regular, visible file in them."""
    for subdirectory in subdirectories:
        for name, inode in _entries(root, root_fd, subdirectory):
            yield subdirectory, name, inode


def _entry_slices(path: str, directory_fd: int, size: int) -> Iterator[list[tuple[str, int]]]:
    """
    (file name, inode) of every regular, visible file of the directory
    ``directory_fd`` (``path``), read ``size`` directory entries at a time.
    """
    try:
        with os.scandir(directory_fd) as entries:
            while some := list(itertools.islice(entries, size)):
                yield [
                    (entry.name, entry.inode())
                    for entry in some
                    if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
                ]
    except OSError as error:
        raise unavailable("cannot read maildir", path, error) from error


def _scanned_into(
    found: dict[str, tuple[str, str, int]],
    subdirectory: str,
    entries: list[tuple[str, int]],
    sizes: dict[str, tuple[int, int]],
) -> list[tuple[str, str, int]]:
    """
    (unique name, file name, inode) of the messages of a slice of
    ``entries`` (file name, inode) of new/ or cur/, each put in ``found``
    (unique name -> (subdirectory, file name, inode)).  A unique name seen
    twice (another program renaming or moving a message right now) is the
    file seen last: one seen before in this slice is left out, one of an
    earlier slice loses its known size in ``sizes``.
    """
    scanned = [
        # `_unique_name`, without a call per message.
        (name.partition(":")[0], name, inode)
        for name, inode in entries
    ]
    before = len(found)
    # A loop rather than one C-level update: over a slice (up to 32,768
    # names) a single call would hold the GIL, and so every session, ~15 ms.
    for unique, name, inode in scanned:
        found[unique] = (subdirectory, name, inode)
    if len(found) < before + len(scanned):
        scanned = [entry for entry in scanned if found[entry[0]] == (subdirectory, *entry[1:])]
        for unique, _, _ in scanned:
            # Only earlier slices' sizes are there yet: this one's are not known.
            sizes.pop(unique, None)
    return scanned


def _sorted_in_steps(names: list[str], step: int = STEP) -> list[str]:
    """
    ``sorted(names)``, holding the GIL a few milliseconds at a time rather
    than ~30 ms for 100,000 names: the reactor thread answers other sessions
    in between.  Slices are sorted, then sorted runs merged two at a time
    (the sort finds the two runs and merges them), for about the same work.
    """
    runs = [sorted(names[at : at + step]) for at in range(0, len(names), step)]
    while len(runs) > 1:
        runs = [sorted(runs[at] + runs[at + 1]) for at in range(0, len(runs) - 1, 2)] + (
            [runs[-1]] if len(runs) % 2 else []
        )
    return runs[0] if runs else []


def _plain_uidls(uniques: list[str], step: int = STEP) -> list[str]:
    """`uidl_for` of each unique name, checked a slice at a time when they are valid."""
    for at in range(0, len(uniques), step):
        some = uniques[at : at + step]
        joined = "".join(some)
        lengths = list(map(len, some))
        if not (
            joined.isascii()
            and joined.isprintable()
            and " " not in joined
            and 0 < min(lengths)
            and max(lengths) <= MAX_UIDL_LENGTH
        ):
            return [uidl_for(unique) for unique in uniques]
    return uniques


def _snapshot(
    root: str,
    root_fd: int,
    naming: _UIDLNaming,
    known_sizes: dict[str, tuple[int, int]] | None,
    step: int = STEP,
    short_read_is_end: Callable[[int], bool] | None = None,
    counting: CountingProcesses | None = None,
) -> tuple[MessageList, _Locations, list[int], bool]:
    """
    The messages in new/ and cur/ with their sizes and UIDLs: in Dovecot's
    UID order for those it listed, then in unique-name order.  Sizes come
    from ``known_sizes`` (else the size cache file) where the inode
    matches, else from ``,W=`` fields, else from reading the message: the
    directories are read a slice at a time, and each slice's count handed
    to ``counting``'s helpers as soon as they share it.  Also returns each
    message's inode, and whether the sizes to keep (those without a ",W="
    field: `_Listing.sizes`) differ from the file's.
    """
    known = known_sizes if known_sizes is not None else _load_sizes(root_fd)
    found: dict[str, tuple[str, str, int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    with ExitStack() as held:
        counts: list[tuple[SharedCount, list[_ToCount]]] = []
        waiting: list[_ToCount] = []
        names_to_count: list[list[str]] = []
        for subdirectory in ("new", "cur"):
            # Read and counted through one descriptor: what is counted is
            # the directory that was read, wherever it is moved meanwhile.
            directory_fd = held.enter_context(_subdirectory(root, root_fd, subdirectory))
            if directory_fd is None:
                continue
            path = os.path.join(root, subdirectory)
            at_end: bool | None = None
            for entries in _entry_slices(path, directory_fd, SCAN_SLICE_STEPS * step):
                # Each slice's list is freed when the next is read (the
                # messages to count stay in ``todo``).
                scanned = _scanned_into(found, subdirectory, entries, sizes)
                todo = _not_known(scanned, known, sizes)
                if todo:
                    if at_end is None and len(todo) >= ASK_FILE_SYSTEM_FROM:
                        at_end = short_read_is_end is not None and short_read_is_end(directory_fd)
                    names = [name for _, name, _ in todo]
                    names_to_count.append(names)
                    directory = DirectoryToCount(path, directory_fd, names, bool(at_end))
                    waiting.append((subdirectory, todo, directory))
                # Handed over as soon as helpers share it, so that they count
                # while this thread reads on; the rest at the end.
                if (
                    waiting
                    and counting is not None
                    and counting.shares(sum(len(todo) for _, todo, _ in waiting))
                ):
                    directories = [directory for _, _, directory in waiting]
                    counts.append((held.enter_context(begin_count(counting, directories)), waiting))
                    waiting = []
        if waiting:
            directories = [directory for _, _, directory in waiting]
            counts.append((held.enter_context(begin_count(counting, directories)), waiting))
        # While helper processes count (if there are): what needs no size.
        dovecot = _read_dovecot_uidlist(root, root_fd)
        ordered = _ordered(found, dovecot, step)
        uidls = _uidls(root, root_fd, ordered, found, dovecot, naming, step)
        locations, inodes = _placed(ordered, found)
        # Sizes given by ",W=" fields (inode -1) are not kept.
        known_kept = sum(1 for inode, _ in sizes.values() if inode >= 0)
        to_count = [entry for _, group in counts for entry in group]
        pending = [todo for _, todo, _ in to_count]
        positions = _size_positions(ordered, pending, sizes, step)
        # The last first: helpers take the counts from the first, this
        # thread from the last, so that while they are still in new/ the
        # two read different directories.
        finished = [count.finish() for count, _ in reversed(counts)][::-1]
        all_counted = [counted_here for results in finished for counted_here in results]
        in_order: list[int] = []
        for (subdirectory, todo, directory), (sizes_counted, failures) in zip(
            to_count, all_counted, strict=True
        ):
            if failures:
                # A file whose unique name was seen again later (being
                # renamed or moved right now) is not the message: never looked at.
                failures = {
                    at: error
                    for at, error in failures.items()
                    if found[todo[at][0]] == (subdirectory, *todo[at][1:])
                }
            _raise_first_failure(directory.path, todo, failures)
            in_order += sizes_counted
        in_order += [size for _, size in sizes.values()]
        column = _gathered(in_order.__getitem__, positions, step)
        counted = bool(to_count)
        if NOT_COUNTED in column:
            # Moved or removed by another program since the scan: each such
            # message looked for.
            sizes = {
                unique: (inode, size)
                for unique, inode, size in zip(ordered, inodes, column, strict=True)
                if size != NOT_COUNTED
            }
            ordered, uidls, locations, inodes, column, moved_counted = _found_again(
                root, root_fd, ordered, found, sizes, dovecot, naming, step
            )
            counted = counted or moved_counted
    messages = MessageList(tuple(uidls), tuple(column))
    # Everything kept was found; the file changes if something was counted
    # or something known is gone.
    changed = counted or known_kept != len(known)
    # Freed one at a time: all at once, when the function returns, they
    # would hold the GIL for ~20 ms.
    temporaries: list[list[Any]] = [in_order, positions, column, ordered, *names_to_count]
    temporaries += [sizes_counted for sizes_counted, _ in all_counted]
    for temporary in (*temporaries, *pending):
        temporary.clear()
    found.clear()
    sizes.clear()
    return messages, locations, inodes, changed


def _ordered(
    found: dict[str, tuple[str, str, int]], dovecot: DovecotUidlist | None, step: int
) -> list[str]:
    """The unique names in Dovecot's UID order for those it listed, then in their own."""
    records = dovecot.records if dovecot is not None else {}
    if not records:
        return _sorted_in_steps(list(found), step)
    no_uid = float("inf")

    def order(unique: str) -> tuple[float, str]:
        record = records.get(unique)
        return (record.uid if record is not None else no_uid, unique)

    return sorted(found, key=order)


def _uidls(
    root: str,
    root_fd: int,
    ordered: list[str],
    found: dict[str, tuple[str, str, int]],
    dovecot: DovecotUidlist | None,
    naming: _UIDLNaming,
    step: int,
) -> list[str]:
    """The UIDL of each message of ``ordered``."""
    if dovecot is not None or naming.uidl_format or naming.reuse_x_uidl:
        return _compatible_uidls(root, root_fd, ordered, found, dovecot, naming)
    return _plain_uidls(ordered, step)


def _placed(
    ordered: list[str], found: dict[str, tuple[str, str, int]]
) -> tuple[_Locations, list[int]]:
    """Where each message of ``ordered`` is, and its inode."""
    # In C, a slice at a time (`_gathered`): the reactor thread gets the
    # GIL between slices (all 100,000 scattered entries at once: ~20 ms).
    where = _gathered(found.__getitem__, ordered)
    locations = _Locations(
        tuple(_gathered(operator.itemgetter(0), where)),
        tuple(_gathered(operator.itemgetter(1), where)),
    )
    inodes = _gathered(operator.itemgetter(2), where)
    # Freed now: with the function's other temporaries, all at once, they
    # would hold the GIL for ~20 ms.
    where.clear()
    return locations, inodes


def _size_positions(
    ordered: list[str],
    pending: list[list[tuple[str, str, int]]],
    known: dict[str, tuple[int, int]],
    step: int = STEP,
) -> list[int]:
    """
    Where the size of each message of ``ordered`` is, once counted, in the
    sizes of the (unique name, file name, inode) lists ``pending`` one
    after the other, then the sizes of ``known``: a message in two of them
    (being moved from new/ to cur/) is the later one.  Worked out while
    helpers count, so that putting sizes in order after it is one C-level
    gather (`_gathered`).
    """
    index: dict[str, int] = {}
    at = 0
    for uniques in [[unique for unique, _, _ in messages] for messages in pending] + [list(known)]:
        # A slice at a time: the GIL is held a millisecond or so per call.
        for start in range(0, len(uniques), step):
            index.update(zip(uniques[start : start + step], itertools.count(at + start)))
        at += len(uniques)
    return _gathered(index.__getitem__, ordered, step)


def _gathered(
    get: Callable[[_Key], _Value], keys: Sequence[_Key], step: int = STEP
) -> list[_Value]:
    """``[get(key) for key in keys]``, in C, a slice at a time."""
    gathered: list[_Value] = []
    for start in range(0, len(keys), step):
        gathered.extend(map(get, keys[start : start + step]))
    return gathered


def _found_again(
    root: str,
    root_fd: int,
    ordered: list[str],
    found: dict[str, tuple[str, str, int]],
    sizes: dict[str, tuple[int, int]],
    dovecot: DovecotUidlist | None,
    naming: _UIDLNaming,
    step: int,
) -> tuple[list[str], list[str], _Locations, list[int], list[int], bool]:
    """
    When messages went missing between the scan and the count (``sizes``
    lacks them): each looked for where another program moved it, counted
    there, or left out.  The order, UIDLs, locations, inodes and sizes
    again, and whether anything was counted.
    """
    counted = False
    missing = [unique for unique in ordered if unique not in sizes]
    for unique in missing:
        subdirectory, name, _ = found[unique]
        location: Location | None = (subdirectory, name)
        size = None
        while location is not None and size is None:
            moved = _locate(root, root_fd, unique)
            location = moved if moved != location else None
            if location is not None:
                size = _count_moved(root, root_fd, unique, location, sizes)
                counted = True
        if location is not None and size is not None:
            found[unique] = (*location, sizes[unique][0])
    ordered = [unique for unique in ordered if unique in sizes]
    uidls = _uidls(root, root_fd, ordered, found, dovecot, naming, step)
    locations, inodes = _placed(ordered, found)
    column = [sizes[unique][1] for unique in ordered]
    return ordered, uidls, locations, inodes, column, counted


def _compatible_uidls(
    root: str,
    root_fd: int,
    ordered: list[str],
    found: dict[str, tuple[str, str, int]],
    dovecot: DovecotUidlist | None,
    naming: _UIDLNaming,
) -> list[str]:
    """UIDLs where other servers' must be kept (see `MaildirStore`), unique in the maildrop."""
    uidls: list[str] = []
    seen: set[str] = set()
    for unique in ordered:
        sub, name, _ = found[unique]
        uidl = _compatible_uidl(root, root_fd, unique, (sub, name), dovecot, naming)
        if uidl is None or uidl in seen:
            uidl = uidl_for(unique)
        seen.add(uidl)
        uidls.append(uidl)
    return uidls


def _read_dovecot_uidlist(root: str, root_fd: int) -> DovecotUidlist | None:
    try:
        fd = os.open(DOVECOT_UIDLIST, READ_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warn("ignoring {path}: {error}", path=os.path.join(root, DOVECOT_UIDLIST), error=error)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with open(fd, "rb") as file:
        return parse_dovecot_uidlist(file.read(_MAX_UIDLIST_SIZE))


def _compatible_uidl(
    root: str,
    root_fd: int,
    unique: str,
    location: tuple[str, str],
    dovecot: DovecotUidlist | None,
    naming: _UIDLNaming,
) -> str | None:
    """The UIDL another server gave this message, when there is one to keep."""
    record = dovecot.records.get(unique) if dovecot is not None else None
    if record is not None and record.stored_uidl and is_valid_uidl(record.stored_uidl):
        return record.stored_uidl
    template = naming.uidl_format or (DOVECOT_DEFAULT_FORMAT if record is not None else None)
    needs_header = naming.reuse_x_uidl or (template is not None and "m" in template)
    header = _read_header(root, root_fd, location) if needs_header else None
    if naming.reuse_x_uidl and header is not None and record is None:
        x_uidl = header_x_uidl(header)
        if x_uidl is not None:
            return x_uidl
    if template is None:
        return None
    uidl = expand_format(
        template,
        uid=record.uid if record is not None else None,
        uidvalidity=dovecot.uidvalidity if dovecot is not None else None,
        file_name=unique,
        header=header,
    )
    return uidl if uidl is not None and is_valid_uidl(uidl) else None


def _read_header(root: str, root_fd: int, location: tuple[str, str]) -> bytes | None:
    """A message's header, up to and including the blank line after it."""
    try:
        fd, _ = _open_message(root, root_fd, location)
        try:
            start = _read_up_to(fd, _MAX_HEADER_SIZE)
        finally:
            os.close(fd)
    except OSError:
        return None
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = start.find(separator)
        if end != -1:
            return start[: end + len(separator)]
    return start


# -- message sizes -----------------------------------------------------------
#
# Wire sizes of messages without a Maildir++ ",W=" field, by unique name and
# inode, are kept in the Maildir root (SIZE_CACHE), so that a later login,
# in any process, reads no message again.  A message whose file was replaced
# (another inode) is counted again.

_SIZE_CACHE_HEADER = "pop3d-sizes 2"


def _known_sizes(
    found: dict[str, tuple[str, str, int]], known: dict[str, tuple[int, int]]
) -> tuple[dict[str, tuple[int, int]], dict[str, list[tuple[str, str, int]]]]:
    """
    Sizes known without reading (`_not_known`), by unique name; and what is
    left to read, by subdirectory.
    """
    by_subdirectory: dict[str, list[tuple[str, str, int]]] = {"new": [], "cur": []}
    for unique, (subdirectory, name, inode) in found.items():
        by_subdirectory[subdirectory].append((unique, name, inode))
    sizes: dict[str, tuple[int, int]] = {}
    uncounted = {
        subdirectory: _not_known(messages, known, sizes)
        for subdirectory, messages in by_subdirectory.items()
    }
    return sizes, uncounted


def _not_known(
    messages: list[tuple[str, str, int]],
    known: dict[str, tuple[int, int]],
    sizes: dict[str, tuple[int, int]],
) -> list[tuple[str, str, int]]:
    """
    Of (unique name, file name, inode) ``messages``, those whose size must
    be read.  The others' go into ``sizes`` as (inode, size): from
    ``known`` where the inode matches, else from a ",W=" field (inode -1).
    """
    todo: list[tuple[str, str, int]] = []
    for message in messages:
        unique, _, inode = message
        entry = known.get(unique)
        if entry is not None and entry[0] == inode:
            sizes[unique] = entry
            continue
        if ",W=" in unique:
            field = _WIRE_SIZE_FIELD.search(unique)
            if field is not None:
                sizes[unique] = (-1, int(field.group(1)))
                continue
        todo.append(message)
    return todo


def _count_sizes(
    path: str,
    directory_fd: int,
    messages: list[tuple[str, str, int]],
    sizes: dict[str, tuple[int, int]],
) -> None:
    """
    Read and measure (unique name, file name, inode) messages of one
    directory, ``path``, into ``sizes``: a file gone meanwhile, or a FIFO
    planted after the scan, is left out; any other failure makes the
    maildrop unavailable.  The inode is the scan's: if the file was
    replaced since, the next scan shows another inode and counts it again.
    """
    counted, failures = wire_sizes(directory_fd, [name for _, name, _ in messages])
    _raise_first_failure(path, messages, failures)
    sizes.update(
        (unique, (inode, size))
        for (unique, _, inode), size in zip(messages, counted, strict=True)
        if size != NOT_COUNTED
    )


def _raise_first_failure(
    path: str, messages: list[tuple[str, str, int]], failures: Mapping[int, OSError]
) -> None:
    """
    A message of ``messages`` (of the directory ``path``) that could not be
    read (``failures``, by position) makes the maildrop unavailable.
    """
    if failures:
        position = min(failures)
        name, error = messages[position][1], failures[position]
        raise unavailable("cannot read message", os.path.join(path, name), error) from error


def _count_moved(
    root: str,
    root_fd: int,
    unique: str,
    location: Location,
    sizes: dict[str, tuple[int, int]],
) -> int | None:
    """The size of a message found again after another program moved it."""
    subdirectory, name = location
    with _subdirectory(root, root_fd, subdirectory) as directory_fd:
        if directory_fd is None:
            return None
        try:
            inode = os.stat(name, dir_fd=directory_fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None
        except OSError as error:
            path = os.path.join(root, *location)
            raise unavailable("cannot read message", path, error) from error
        counted: dict[str, tuple[int, int]] = {}
        _count_sizes(
            os.path.join(root, subdirectory), directory_fd, [(unique, name, inode)], counted
        )
    sizes.update(counted)
    return counted[unique][1] if unique in counted else None


def _state_records(root_fd: int, name: str, header: str) -> Iterator[tuple[str, str, str]]:
    """
    The lines of a state file of pop3d's in the Maildir root (``header``,
    then ``unique name<TAB>field<TAB>field`` lines), split at their first
    two tabs.  Nothing if the file is missing, unreadable or of another
    format; whoever reads them checks the fields (the Maildir's owner can
    write anything there).
    """
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=root_fd)
        with open(fd, encoding="utf-8", errors="surrogateescape") as file:
            if file.readline().rstrip("\n") != header:
                return
            for line in file:
                unique, _, fields = line.rstrip("\n").partition("\t")
                first, _, second = fields.partition("\t")
                yield unique, first, second
    except OSError:
        return


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _load_sizes(root_fd: int) -> dict[str, tuple[int, int]]:
    # A missing, unreadable or damaged entry: that size is counted again.
    return {
        name: (int(inode), int(size))
        for name, inode, size in _state_records(root_fd, SIZE_CACHE, _SIZE_CACHE_HEADER)
        if _is_number(inode) and _is_number(size)
    }


def _save_sizes(directory: _Directory, update: _SizeUpdate, listing: _Listing) -> None:
    # The listing's are written as they are read from it: a table of
    # 100,000 made for this would be freed at once, holding the GIL ~15 ms.
    entries = (
        listing.size_entries()
        if update.sizes is None
        else ((name, inode, size) for name, (inode, size) in update.sizes.items())
    )
    try:
        with directory.opened() as root_fd:
            if update.append:
                _append_sizes(directory.path, root_fd, entries)
            else:
                _write_sizes(directory.path, root_fd, entries)
    except POP3Error:
        pass  # the Maildir is gone or replaced: nothing to keep


def _append_sizes(root: str, root_fd: int, entries: Iterable[tuple[str, int, int]]) -> None:
    """
    Add a few sizes to `SIZE_CACHE` (a later line wins), rather than
    writing 100,000 lines again.  Each write starts a line of its own: a
    line cut short by a crash ends up with a field that is not a number,
    and is ignored (`_load_sizes`).
    """
    text = "".join([f"\n{name}\t{inode}\t{size}" for name, inode, size in entries])
    try:
        fd = os.open(SIZE_CACHE, os.O_WRONLY | os.O_APPEND | SAFE_OPEN, dir_fd=root_fd)
    except FileNotFoundError:
        return  # written whole by the next full read
    except OSError as error:
        log.info("not caching message sizes in {root}: {error}", root=root, error=error)
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.write(fd, (text + "\n").encode("utf-8", "surrogateescape"))
    except OSError as error:
        log.info("not caching message sizes in {root}: {error}", root=root, error=error)
    finally:
        os.close(fd)


def _write_sizes(root: str, root_fd: int, entries: Iterable[tuple[str, int, int]]) -> None:
    """`SIZE_CACHE` written anew with (unique name, inode, size) ``entries``."""

    def chunks() -> Iterator[bytes]:
        yield f"{_SIZE_CACHE_HEADER}\n".encode()
        # A slice at a time: formatting and encoding 100,000 lines in one go
        # would hold the GIL, and every session, for ~20 ms.
        remaining = iter(entries)
        while step := list(itertools.islice(remaining, STEP)):
            text = "".join([f"{name}\t{inode}\t{size}\n" for name, inode, size in step])
            yield text.encode("utf-8", "surrogateescape")

    try:
        _replace_state_file(root_fd, SIZE_CACHE, chunks())
    except OSError as error:
        log.info("not caching message sizes in {root}: {error}", root=root, error=error)


def _replace_state_file(root_fd: int, name: str, chunks: Iterable[bytes]) -> None:
    """
    Replace the state file ``name`` of the Maildir root with ``chunks``, all
    at once: a reader (or a crash) sees the old file or the whole new one.
    Raises `OSError`.
    """
    # A name of this writer's own (two servers may save at once), created
    # new or not at all: nothing the Maildir's owner put anywhere is
    # followed or overwritten.
    temporary = f"{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | CREATE_FLAGS, 0o600, dir_fd=root_fd)
    try:
        with open(fd, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.rename(temporary, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:
        unlink_quietly(temporary, root_fd)
        raise


# When messages were first retrieved (RETR), by unique name, in whole seconds
# of the server's clock: written in UPDATE, under the maildrop's lock.
_RETRIEVAL_TIMES_HEADER = "pop3d-retrieved 1"


def _load_retrieval_times(root_fd: int) -> dict[str, int]:
    # A damaged entry is dropped: that message's retention starts again,
    # later, never sooner.
    return {
        name: int(first)
        for name, first, rest in _state_records(root_fd, RETRIEVAL_TIMES, _RETRIEVAL_TIMES_HEADER)
        if _is_number(first) and not rest
    }


def _write_retrieval_times(root: str, root_fd: int, times: dict[str, int]) -> None:
    text = "".join([f"{name}\t{first}\n" for name, first in times.items()])
    try:
        _replace_state_file(
            root_fd,
            RETRIEVAL_TIMES,
            [f"{_RETRIEVAL_TIMES_HEADER}\n".encode(), text.encode("utf-8", "surrogateescape")],
        )
    except OSError as error:
        log.error("cannot record retrievals in {root}: {error}", root=root, error=error)


def _open_message(root: str, root_fd: int, location: Location) -> tuple[int, os.stat_result]:
    """Open a message file, refusing anything but a regular file: (fd, its ``fstat``)."""
    subdirectory, name = location
    with _subdirectory(root, root_fd, subdirectory) as directory_fd:
        if directory_fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", subdirectory)
        return _open_regular_file(name, directory_fd)


def _open_regular_file(name: str, directory_fd: int) -> tuple[int, os.stat_result]:
    """
    Open a file of a directory, refusing links and anything but a regular
    file: the descriptor, and what ``fstat`` said of the file.
    """
    fd = os.open(name, READ_FLAGS, dir_fd=directory_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _read_up_to(fd: int, size: int) -> bytes:
    """``size`` octets, fewer only at the end of the file."""
    # One read(2) may return less than asked before the end (FUSE, 9p,
    # some network file systems), so only an empty read means the end.
    data = os.read(fd, size)
    while data and len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def _locate(root: str, root_fd: int, unique: str) -> Location | None:
    """Where a message with this unique name is now, if anywhere."""
    for subdirectory, name, _ in _files(root, root_fd, ("cur", "new")):
        if _unique_name(name) == unique:
            return (subdirectory, name)
    return None


class _OpenSubdirectories:
    """
    The new/ and cur/ directories that sessions opened messages from, kept
    open until the session ends: a RETR then opens its file relative to the
    directory held (``openat``, ``O_NOFOLLOW``), where otherwise it opens
    the Maildir, checks that it is the one the session locked, opens the
    subdirectory and then the file.  A directory held is the one that was
    opened safely from the Maildir the session locked, so the file is the
    same one the long way would reach; the Maildir's path is still checked
    for each message (one ``lstat``), so a Maildir replaced during a
    session is not served.

    At most ``limit`` descriptors for the whole store, the least recently
    used closed first (its session then takes the long way again): idle
    sessions, however many, hold their sockets and these few descriptors.
    Used on the reactor thread only.
    """

    __slots__ = ("_held", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: OrderedDict[tuple[_Directory, str], int] = OrderedDict()

    def get(self, directory: _Directory, subdirectory: str) -> int | None:
        key = (directory, subdirectory)
        fd = self._held.get(key)
        if fd is not None:
            self._held.move_to_end(key)
        return fd

    def open(self, directory: _Directory, root_fd: int, subdirectory: str) -> None:
        """Hold ``subdirectory`` of ``root_fd`` (a checked Maildir); if that fails, nothing."""
        key = (directory, subdirectory)
        if self._limit <= 0 or key in self._held:
            return
        try:
            self._held[key] = os.open(subdirectory, DIRECTORY_FLAGS, dir_fd=root_fd)
        except OSError:
            return  # the next message takes the long way, which says what is wrong
        while len(self._held) > self._limit:
            _, oldest = self._held.popitem(last=False)
            os.close(oldest)

    def forget(self, directory: _Directory) -> None:
        """The session of ``directory`` ended: close what it held."""
        for subdirectory in ("new", "cur"):
            fd = self._held.pop((directory, subdirectory), None)
            if fd is not None:
                os.close(fd)


@implementer(IMessageBody, IRemovalCheck)
class _FileBody:
    """
    A message file read with plain ``read(2)`` calls: no buffered file object
    to build for a message that is read in one or two chunks.
    """

    __slots__ = ("_fd", "_file", "_left", "_location", "_maildrop")

    def __init__(
        self, fd: int, info: os.stat_result, maildrop: _Maildrop, location: Location
    ) -> None:
        """``info``: what ``fstat`` said of ``fd`` when it was opened."""
        self._fd = fd
        # The size when opened: a read that reaches it is the last, with no
        # read(2) just to learn that the next one returns nothing.
        self._left = info.st_size
        # The file as opened, for `removed` (the stat_result itself: no
        # tuple made per RETR).
        self._file = info
        # For `removed`, and the path of an error message.
        self._maildrop = maildrop
        self._location = location

    def read(self, size: int) -> bytes:
        fd, left = self._fd, self._left
        if fd < 0 or left <= 0:
            return b""
        wanted = size if size < left else left
        try:
            # One read(2) is all of it nearly always: `_read_up_to` only
            # when it was short (no Python call per message for the loop).
            data = os.read(fd, wanted)
            if data and len(data) < wanted:
                data += _read_up_to(fd, wanted - len(data))
        except OSError as error:
            path = os.path.join(self._maildrop.root, *self._location)
            raise unavailable("cannot read message", path, error) from error
        # Shorter than its size: the file was cut, and this is its end.
        self._left = self._left - len(data) if data else 0
        return data

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def removed(self) -> bool:
        """
        `IRemovalCheck`: a RETR would not open this file, as it was, now:
        the Maildir replaced, the file deleted, renamed (a flag set by
        another program), or changed (its size, time or mode).  Checked the
        way RETR opens a file: the Maildir's path, then the name in the
        directory the session holds; nothing is opened.
        """
        return not self._maildrop.still_stored(self._location, self._file)

    def __del__(self) -> None:
        # A body its reader forgot to close must not keep its descriptor.
        # (Nearly always it was closed: no call to learn so.)
        if self._fd >= 0:
            self.close()


_NONE_REMOVED: frozenset[int] = frozenset()


@implementer(IMaildrop, IClosesAtOnce, ISeenFlags, IRetrievalTimes)
class _Maildrop:
    __slots__ = (
        "_changed",
        "_directory",
        "_listing",
        "_locations",
        "_release",
        "_removed",
        "_store",
        "messages",
    )

    def __init__(
        self,
        directory: _Directory | None,
        messages: MessageList,
        locations: Sequence[Location],
        release: Callable[[], None] | None,
        store: MaildirStore,
        listing: _Listing | None = None,
    ) -> None:
        self.messages = messages
        # None: no Maildir when the session began, an empty maildrop.
        self._directory = directory
        # Copied when a message is found moved (rarely): until then, shared.
        self._locations: Sequence[Location] = locations
        self._release = release
        self._store = store
        # The kept listing this session's messages are, and what the session
        # did to the files since: UPDATE brings the listing up to date with
        # it, so the next login need not read everything again.
        self._listing = listing
        # Made at the first removal: an empty set per idle session is 216 octets.
        self._removed: AbstractSet[int] = _NONE_REMOVED
        self._changed = False

    @property
    def root(self) -> str:
        return self._directory.path if self._directory is not None else ""

    def _moved(self, index: int, location: Location) -> None:
        if not isinstance(self._locations, list):
            self._locations = list(self._locations)
        self._locations[index] = location

    def _relocate(self, root_fd: int, index: int) -> Location | None:
        unique = _unique_name(self._locations[index][1])
        location = _locate(self.root, root_fd, unique)
        if location is not None:
            self._moved(index, location)
        return location

    def still_stored(self, location: Location, opened: os.stat_result) -> bool:
        """
        Whether RETR would open, now, the file that was ``opened`` at
        ``location``, unchanged: the Maildir at the path is still the one
        locked, the subdirectory is held open, and the name in it is that
        same file, of the same size, time and mode (an ``lstat`` and a
        ``stat``).
        """
        directory = self._directory
        if directory is None or not directory.unchanged():
            return False
        directory_fd = self._store._subdirectories.get(directory, location[0])
        if directory_fd is None:
            return False  # (let go since: RETR takes the long way)
        try:
            now = os.stat(location[1], dir_fd=directory_fd, follow_symlinks=False)
        except OSError:
            return False
        return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns, now.st_mode) == (
            opened.st_dev,
            opened.st_ino,
            opened.st_size,
            opened.st_mtime_ns,
            opened.st_mode,
        )

    def open_message(self, index: int) -> IMessageBody | Deferred[IMessageBody]:
        directory = self._directory
        assert directory is not None
        location: Location | None = self._locations[index]
        assert location is not None
        subdirectories = self._store._subdirectories
        directory_fd = subdirectories.get(directory, location[0])
        # The subdirectory held open since an earlier RETR: the message opened
        # in it at once, if the Maildir at that path is still the locked one.
        if directory_fd is not None and directory.unchanged():
            try:
                fd, info = _open_regular_file(location[1], directory_fd)
            except FileNotFoundError:
                pass  # moved or gone: the long way looks for it
            except OSError as error:
                path = os.path.join(directory.path, *location)
                return fail(unavailable("cannot open message", path, error))
            else:
                # directory.path is `root`, without the property's call.
                return _FileBody(fd, info, self, location)
        # The first message of the session from this subdirectory, or one
        # moved or gone: the Maildir and its subdirectory are opened again.
        try:
            with directory.opened() as root_fd:
                while location is not None:
                    try:
                        fd, info = _open_message(self.root, root_fd, location)
                    except FileNotFoundError:
                        relocated = self._relocate(root_fd, index)
                        location = relocated if relocated != location else None
                        continue
                    except OSError as error:
                        path = os.path.join(self.root, *location)
                        raise unavailable("cannot open message", path, error) from error
                    body = _FileBody(fd, info, self, location)
                    try:
                        subdirectories.open(directory, root_fd, location[0])
                    except BaseException:
                        body.close()  # not left to the garbage collector
                        raise
                    return body
        except POP3Error as error:
            return fail(error)
        return fail(MessageGone())

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        if not indexes:
            return succeed(None)
        # UPDATE's unlinks and renames run in the thread pool, like the scan.
        return run_blocking(self._store._reactor, self._remove_all, list(indexes))

    def _remove_all(self, indexes: list[int]) -> None:
        assert self._directory is not None
        try:
            with self._directory.opened() as root_fd:
                failed = sum(1 for index in indexes if not self._remove_one(root_fd, index))
        except POP3Error:
            failed = len(indexes)
        if failed:
            raise DeletionFailed(failed)

    def _remove_one(self, root_fd: int, index: int) -> bool:
        location: Location | None = self._locations[index]
        try:
            while location is not None:
                subdirectory, name = location
                try:
                    with _subdirectory(self.root, root_fd, subdirectory) as fd:
                        if fd is None:
                            raise FileNotFoundError(errno.ENOENT, "no such directory")
                        os.unlink(name, dir_fd=fd)
                    self._note_removed(index)
                    return True
                except FileNotFoundError:
                    relocated = self._relocate(root_fd, index)
                    location = relocated if relocated != location else None
        except OSError as error:
            path = os.path.join(self.root, *location) if location else self.root
            log.error("cannot delete {path}: {error}", path=path, error=error)
            return False
        except POP3Error:
            return False
        # Already gone: what the user asked for is done.
        self._note_removed(index)
        return True

    def _note_removed(self, index: int) -> None:
        if not isinstance(self._removed, set):
            self._removed = set()
        self._removed.add(index)

    def mark_seen(self, retrieved: Sequence[int], kept: Sequence[int]) -> Deferred[None] | None:
        """
        What Dovecot's POP3 server does to a Maildir: messages still in new/
        move to cur/, and retrieved ones get the S (seen) flag.  The unique
        name, and so the UIDL, stays.
        """
        if self._directory is None:
            return None
        renaming: Deferred[None]
        if len(kept) > self._store.plan_inline:
            # About a microsecond a message to decide: 100,000 messages
            # would hold up every other session for a tenth of a second.
            def plan_and_rename() -> None:
                self._rename_all(self._renames(retrieved, kept))

            renaming = run_blocking(self._store._reactor, plan_and_rename)
        else:
            renames = self._renames(retrieved, kept)
            if renames:
                renaming = run_blocking(self._store._reactor, self._rename_all, renames)
            elif not self._removed:
                return None
            else:
                return self._bring_listing_up_to_date()
        return renaming.addCallback(lambda _: self._bring_listing_up_to_date())

    def _bring_listing_up_to_date(self) -> Deferred[None] | None:
        """
        After this session's own removals and renames: the kept listing
        with them, checked against what new/ and cur/ hold now (another
        program may have changed them meanwhile, within the same tick of
        their clock, which their times cannot show), and kept for the next
        login.  A large Maildir is read once its directories have settled,
        at most `SETTLE_WAIT_SECONDS` later, so that the next login trusts
        it without reading it; QUIT's answer waits for this.  Never fails:
        at worst, the next login reads the Maildir again.
        """
        if self._directory is None or not (self._removed or self._changed):
            return None
        if self._listing is None or self._store._cached(self.root) is not self._listing:
            return None
        directory = self._directory
        store = self._store
        reactor = store._reactor

        def record_and_read() -> tuple[_Listing, _SizesToSave] | None:
            recorded = self._recorded()
            if recorded is None:
                return None
            with directory.opened() as root_fd:
                result = store._read(directory.path, root_fd, _take_stamps(root_fd), recorded)
                self._note_changes(root_fd, recorded, result[0])
                return result

        def keep(result: tuple[_Listing, _SizesToSave] | None) -> None:
            if result is not None and store._cached(directory.path) is self._listing:
                store._keep(directory, *result)

        def read(delay: float | None) -> Deferred[tuple[_Listing, _SizesToSave] | None]:
            if delay and len(self.messages) >= store.settle_at_quit:
                assert IReactorTime.providedBy(reactor)
                waited = deferLater(cast(IReactorTime, reactor), delay, lambda: None)
                return waited.addCallback(lambda _: run_blocking(reactor, record_and_read))
            return run_blocking(reactor, record_and_read)

        wanted = IReactorTime.providedBy(reactor) and len(self.messages) >= store.settle_at_quit
        reading = run_blocking(reactor, _settling_delay, directory) if wanted else succeed(None)
        done = reading.addCallback(read).addCallback(keep)
        done.addErrback(lambda failure: log.failure("updating the listing failed", failure))
        return done

    def _recorded(self) -> _Listing | None:
        """
        The kept listing as this session left the Maildir: without the
        messages it removed, with the names it renamed messages to (and any
        new place it found a message at).  Its stamps are unknown: new/ and
        cur/ are read again before anyone trusts it.
        """
        base = self._listing
        if base is None:
            return None
        removed = self._removed
        subdirectories, names = _columns(self._locations)
        messages, inodes = base.messages, base.inodes
        if removed:
            keep = [index not in removed for index in range(len(names))]
            subdirectories = tuple(itertools.compress(subdirectories, keep))
            names = tuple(itertools.compress(names, keep))
            inodes = tuple(itertools.compress(inodes, keep))
            messages = MessageList(
                tuple(itertools.compress(messages.uids, keep)),
                tuple(itertools.compress(messages.sizes, keep)),
            )
        uidlist = _PARTS.index(DOVECOT_UIDLIST)
        stamps = _Stamps.of(
            (None, None, base.stamps.parts[uidlist]),
            (False, False, base.stamps.settled[uidlist]),
        )
        return _Listing(stamps, messages, _Locations(subdirectories, names), inodes)

    def _note_changes(self, root_fd: int, recorded: _Listing, verified: _Listing) -> None:
        """
        For the other processes: what this session changed, once new/ and
        cur/ read again (``verified``) show that it is all that changed (see
        `CHANGE_NOTES`).  A failure costs them a read, and is only logged.
        """
        base, store = self._listing, self._store
        if base is None or not store._incremental(base, verified.stamps):
            return
        try:
            notes = _changes_made(base, self._locations, self._removed, recorded, verified)
            if notes:
                store._notes.add(self.root, root_fd, notes)
        except Exception:
            log.failure("noting changes in {root} failed", root=self.root)

    def record_retrievals(
        self, retrieved: Sequence[int], now: float
    ) -> Deferred[Mapping[int, float]]:
        """
        In the file `RETRIEVAL_TIMES` of the Maildir root, by unique name (so
        a message keeps its time when another program moves or flags it).
        """
        if self._directory is None:
            return succeed({})
        return run_blocking(
            self._store._reactor, self._record_retrievals, list(retrieved), int(now)
        )

    def _record_retrievals(self, retrieved: list[int], now: int) -> dict[int, float]:
        assert self._directory is not None
        with self._directory.opened() as root_fd:
            known = _load_retrieval_times(root_fd)
            if not known and not retrieved:
                return {}  # most Maildirs, at most QUITs: one failed open(2)
            firsts: dict[int, float] = {}
            kept: dict[str, int] = {}
            if known:
                for index, (_, name) in enumerate(self._locations):
                    unique = _unique_name(name)
                    first = known.get(unique)
                    if first is not None:
                        firsts[index] = first
                        kept[unique] = first
            for index in retrieved:
                unique = _unique_name(self._locations[index][1])
                # A name that would not fit on its line is not recorded: that
                # message is kept, never deleted early.
                if index not in firsts and "\t" not in unique and "\n" not in unique:
                    firsts[index] = now
                    kept[unique] = now
            if kept != known:
                _write_retrieval_times(self.root, root_fd, kept)
        return firsts

    def _renames(self, retrieved: Sequence[int], kept: Sequence[int]) -> list[tuple[int, str]]:
        """(index, new file name) of each message `mark_seen` moves or flags."""
        seen = set(retrieved)
        renames: list[tuple[int, str]] = []
        locations = self._locations
        # The column, when the listing's: no tuple made per kept message.
        subdirectories = (
            locations.subdirectories
            if isinstance(locations, _Locations)
            else [subdirectory for subdirectory, _ in locations]
        )
        if not seen and "new" not in subdirectories:
            # Most QUITs of a kept mailbox: nothing read, nothing new.
            return renames
        for index in kept:
            if subdirectories[index] == "cur" and index not in seen:
                continue  # flags as they are
            subdirectory, name = locations[index]
            unique, _, info = name.partition(":")
            flags = set(info[2:]) if info.startswith("2,") else set()
            if index in seen:
                flags.add("S")
            target = f"{unique}:2,{''.join(sorted(flags))}"
            if subdirectory != "cur" or target != name:
                renames.append((index, target))
        return renames

    def _rename_all(self, renames: list[tuple[int, str]]) -> None:
        assert self._directory is not None
        try:
            with (
                self._directory.opened() as root_fd,
                _subdirectory(self.root, root_fd, "new") as new_fd,
                _subdirectory(self.root, root_fd, "cur") as cur_fd,
            ):
                if cur_fd is None:
                    return
                directories = {"new": new_fd, "cur": cur_fd}
                for index, target in renames:
                    self._rename(directories, cur_fd, index, target)
        except POP3Error as error:
            log.info("not marking messages seen in {root}: {error}", root=self.root, error=error)

    def _rename(
        self, directories: dict[str, int | None], cur_fd: int, index: int, target: str
    ) -> None:
        subdirectory, name = self._locations[index]
        source = directories[subdirectory]
        if source is None:
            return
        try:
            # Never replace a file another program put there; rename is
            # atomic, so a crash leaves the message in one place.
            if exists(target, cur_fd):
                return
            os.rename(name, target, src_dir_fd=source, dst_dir_fd=cur_fd)
            self._moved(index, ("cur", target))
            self._changed = True
        except OSError as error:
            log.info("not marking {name} seen: {error}", name=name, error=error)

    def close(self) -> Deferred[None]:
        self.close_at_once()
        return succeed(None)

    def close_at_once(self) -> None:
        """`IClosesAtOnce`: the lock is released now, and nothing is waited on."""
        if self._directory is not None:
            self._store._subdirectories.forget(self._directory)
        release, self._release = self._release, None
        if release is not None:
            release()
