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
served.  A user cannot point their Maildir at someone else's mail.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropUnavailable, MessageGone, POP3Error
from pop3d.interfaces import IMaildrop, IMaildropStore, IMessageBody, ISeenFlags, MessageInfo
from pop3d.locking import MaildropLock
from pop3d.storage import (
    check_template,
    expand_template,
    run_blocking,
)
from pop3d.uidl import (
    DOVECOT_DEFAULT_FORMAT,
    DovecotUidlist,
    check_format,
    expand_format,
    header_x_uidl,
    parse_dovecot_uidlist,
)
from pop3d.wire import WireSizeCounter, is_valid_uidl

#: The lock file in the root of every locked Maildir.  No leading dot:
#: Maildir++ treats dot-names in the root as folders.
LOCK_FILE_NAME = "pop3d.lock"

_READ_SIZE = 256 * 1024
DOVECOT_UIDLIST = "dovecot-uidlist"
#: Where counted message sizes are kept (see `_SizeCache`).
SIZE_CACHE = "pop3d-sizes"
_MAX_UIDLIST_SIZE = 64 * 1024 * 1024
_MAX_HEADER_SIZE = 256 * 1024
# Maildir++ (Courier, Dovecot): ",W=" is the size with CRLF line endings.
_WIRE_SIZE_FIELD = re.compile(r",W=(\d+)(?:,|$)")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in cur/ must not block the server on open.
_MESSAGE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

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


@implementer(IMaildropStore)
class MaildirStore:
    """
    Maildirs found by a path template such as ``/srv/mail/{user}``.

    ``{user}`` is the whole user name, ``{local}`` and ``{domain}`` its parts
    around ``@``.  With a ``reactor``, opening a maildrop (which may read
    every message to learn its size) runs in the reactor's thread pool, so
    other sessions are not held up; without one it runs inline.

    UIDLs are the messages' unique names, except where the Maildir holds a
    ``dovecot-uidlist``: messages Dovecot listed keep the UIDL Dovecot served
    (its stored one, or ``uidl_format``, Dovecot's own default unless given:
    see `pop3d.uidl`).  A ``uidl_format`` using only ``%f``/``%m`` applies to
    every message.  With ``reuse_x_uidl``, a message's ``X-UIDL`` header
    (written by qpopper and others) is its UIDL, after Dovecot's and before
    ``uidl_format``.
    """

    def __init__(
        self,
        template: str,
        *,
        reactor: IReactorThreads | None = None,
        uidl_format: str | None = None,
        reuse_x_uidl: bool = False,
    ) -> None:
        check_template(template)
        if uidl_format is not None:
            check_format(uidl_format)
        self.template = template
        self.uidl_format = uidl_format
        self.reuse_x_uidl = reuse_x_uidl
        self._reactor = reactor

    def path_for(self, mailbox: str) -> str | None:
        return expand_template(self.template, mailbox)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        path = self.path_for(mailbox)
        if path is None:
            return fail(UnauthorizedLogin())
        naming = _UIDLNaming(self.uidl_format, self.reuse_x_uidl)
        return run_blocking(self._reactor, _open_maildir, path, naming, self._reactor)


@dataclass(frozen=True)
class _UIDLNaming:
    """How UIDLs of other servers are kept (see `MaildirStore`)."""

    uidl_format: str | None
    reuse_x_uidl: bool


def _open_maildir(
    root: str, naming: _UIDLNaming, reactor: IReactorThreads | None = None
) -> IMaildrop:
    try:
        root_fd = os.open(root, _DIRECTORY_FLAGS)
    except FileNotFoundError:
        # Nothing delivered yet: an empty maildrop, not an error.
        return _Maildrop(root, None, [], [], None, reactor)
    except OSError as error:
        raise _unavailable("cannot open maildir", root, error) from error
    lock: MaildropLock | None = None
    try:
        lock = MaildropLock.acquire(LOCK_FILE_NAME, dir_fd=root_fd)
        messages, locations = _snapshot(root, root_fd, naming)
    except BaseException:
        if lock is not None:
            lock.release()
        os.close(root_fd)
        raise
    return _Maildrop(root, root_fd, messages, locations, lock, reactor)


@contextmanager
def _subdirectory(root: str, root_fd: int, name: str) -> Iterator[int | None]:
    """A descriptor of new/ or cur/, or None if there is none."""
    try:
        fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        yield None
        return
    except OSError as error:
        raise _unavailable("cannot open maildir", os.path.join(root, name), error) from error
    try:
        yield fd
    finally:
        os.close(fd)


def _files(root: str, root_fd: int, subdirectories: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(subdirectory, file name) of every regular, visible file in them."""
    for subdirectory in subdirectories:
        with _subdirectory(root, root_fd, subdirectory) as fd:
            if fd is None:
                continue
            try:
                with os.scandir(fd) as entries:
                    names = [
                        entry.name
                        for entry in entries
                        if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
                    ]
            except OSError as error:
                path = os.path.join(root, subdirectory)
                raise _unavailable("cannot read maildir", path, error) from error
        for name in names:
            yield subdirectory, name


def _snapshot(
    root: str, root_fd: int, naming: _UIDLNaming
) -> tuple[list[MessageInfo], list[tuple[str, str]]]:
    """
    The messages in new/ and cur/ with their sizes and UIDLs: in Dovecot's
    UID order for those it listed, then in unique-name order.
    """
    # A message seen in both (another program moving it right now) is the
    # same message: the cur/ one, seen last, wins.
    found = {_unique_name(name): (sub, name) for sub, name in _files(root, root_fd, ("new", "cur"))}
    dovecot = _read_dovecot_uidlist(root, root_fd)
    records = dovecot.records if dovecot is not None else {}
    no_uid = float("inf")

    def order(unique: str) -> tuple[float, str]:
        record = records.get(unique)
        return (record.uid if record is not None else no_uid, unique)

    messages: list[MessageInfo] = []
    locations: list[tuple[str, str]] = []
    seen_uidls: set[str] = set()
    sizes = _SizeCache.load(root, root_fd)
    with (
        _subdirectory(root, root_fd, "new") as new_fd,
        _subdirectory(root, root_fd, "cur") as cur_fd,
    ):
        directories = {"new": new_fd, "cur": cur_fd}
        for unique in sorted(found, key=order):
            location: tuple[str, str] | None = found[unique]
            size = None
            while location is not None and size is None:
                size = sizes.wire_size(unique, location, directories)
                if size is None:
                    # Moved or removed by another program since the scan.
                    moved = _locate(root, root_fd, unique)
                    location = moved if moved != location else None
            if location is None or size is None:
                continue
            uidl = _compatible_uidl(root, root_fd, unique, location, dovecot, naming)
            if uidl is None or uidl in seen_uidls:
                uidl = uidl_for(unique)
            seen_uidls.add(uidl)
            messages.append(MessageInfo(uidl, size))
            locations.append(location)
    sizes.save(set(found))
    return messages, locations


def _read_dovecot_uidlist(root: str, root_fd: int) -> DovecotUidlist | None:
    try:
        fd = os.open(DOVECOT_UIDLIST, _MESSAGE_FLAGS, dir_fd=root_fd)
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
        with _open_message(root, root_fd, location) as message:
            start = message.read(_MAX_HEADER_SIZE)
    except OSError:
        return None
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = start.find(separator)
        if end != -1:
            return start[: end + len(separator)]
    return start


@dataclass(frozen=True)
class _SizeRecord:
    disk_size: int
    mtime_ns: int
    inode: int
    wire_size: int


class _SizeCache:
    """
    Wire sizes of messages without a Maildir++ ``,W=`` field, kept in the
    Maildir root so that a later login reads no message again.  An entry is
    used only while the file's size, mtime and inode are what they were when
    it was counted: a file changed since is counted again.
    """

    HEADER = "pop3d-sizes 1"

    def __init__(self, root: str, root_fd: int, records: dict[str, _SizeRecord]) -> None:
        self._root = root
        self._root_fd = root_fd
        self._records = records
        self._changed = False

    @classmethod
    def load(cls, root: str, root_fd: int) -> _SizeCache:
        records: dict[str, _SizeRecord] = {}
        try:
            fd = os.open(SIZE_CACHE, _MESSAGE_FLAGS, dir_fd=root_fd)
            with open(fd, encoding="utf-8", errors="surrogateescape") as file:
                if file.readline().rstrip("\n") == cls.HEADER:
                    for line in file:
                        name, *numbers = line.rstrip("\n").split("\t")
                        try:
                            disk_size, mtime_ns, inode, wire_size = map(int, numbers)
                        except ValueError:
                            continue  # a damaged line: that size is counted again
                        records[name] = _SizeRecord(disk_size, mtime_ns, inode, wire_size)
        except OSError:
            pass  # no cache yet, or unreadable: sizes are counted again
        return cls(root, root_fd, records)

    def wire_size(
        self, unique: str, location: tuple[str, str], directories: dict[str, int | None]
    ) -> int | None:
        """The RETR size of a message, or None if its file is gone."""
        field = _WIRE_SIZE_FIELD.search(unique)
        if field is not None:
            return int(field.group(1))
        subdirectory, name = location
        directory = directories[subdirectory]
        if directory is None:
            return None
        try:
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            cached = self._records.get(unique)
            if cached is not None and (cached.disk_size, cached.mtime_ns, cached.inode) == (
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
            ):
                return cached.wire_size
            counter = WireSizeCounter()
            with _open_message(self._root, self._root_fd, location) as message:
                while chunk := message.read(_READ_SIZE):
                    counter.feed(chunk)
                after = os.fstat(message.fileno())
        except FileNotFoundError:
            return None
        except OSError as error:
            path = os.path.join(self._root, subdirectory, name)
            raise _unavailable("cannot read message", path, error) from error
        size = counter.finish()
        self._records[unique] = _SizeRecord(after.st_size, after.st_mtime_ns, after.st_ino, size)
        self._changed = True
        return size

    def save(self, present: set[str]) -> None:
        """Write the cache back if it changed, keeping only present messages."""
        stale = self._records.keys() - present
        if not self._changed and not stale:
            return
        lines = [self.HEADER]
        lines += [
            f"{name}\t{r.disk_size}\t{r.mtime_ns}\t{r.inode}\t{r.wire_size}"
            for name, r in self._records.items()
            if name in present
        ]
        temporary = SIZE_CACHE + ".tmp"
        # The Maildir's owner may have put anything under that name (a FIFO
        # that would block, a hard link to a file to overwrite): remove it,
        # then create a new file or nothing.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=self._root_fd)
            fd = os.open(temporary, flags, 0o600, dir_fd=self._root_fd)
            with open(fd, "w", encoding="utf-8", errors="surrogateescape") as file:
                file.write("\n".join(lines) + "\n")
            # Atomic: a crash leaves the old cache or the new one.
            os.rename(temporary, SIZE_CACHE, src_dir_fd=self._root_fd, dst_dir_fd=self._root_fd)
        except OSError as error:
            log.info("not caching message sizes in {root}: {error}", root=self._root, error=error)


def _open_message(root: str, root_fd: int, location: tuple[str, str]) -> BinaryIO:
    """Open a message file, refusing anything but a regular file."""
    subdirectory, name = location
    with _subdirectory(root, root_fd, subdirectory) as directory_fd:
        if directory_fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", subdirectory)
        fd = os.open(name, _MESSAGE_FLAGS, dir_fd=directory_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _locate(root: str, root_fd: int, unique: str) -> tuple[str, str] | None:
    """Where a message with this unique name is now, if anywhere."""
    for subdirectory, name in _files(root, root_fd, ("cur", "new")):
        if _unique_name(name) == unique:
            return (subdirectory, name)
    return None


def _exists(name: str, directory_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unavailable(what: str, path: str, error: OSError) -> MaildropUnavailable:
    # ELOOP: a symbolic link where a directory or a message should be.
    permanent = isinstance(error, (PermissionError, NotADirectoryError, IsADirectoryError)) or (
        error.errno in (errno.ELOOP, errno.EINVAL)
    )
    log.error("{what} {path}: {error}", what=what, path=path, error=error)
    return MaildropUnavailable(what, permanent=permanent)


@implementer(IMessageBody)
class _FileBody:
    def __init__(self, file: BinaryIO, path: str) -> None:
        self._file = file
        self._path = path

    def read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except OSError as error:
            raise _unavailable("cannot read message", self._path, error) from error

    def close(self) -> None:
        self._file.close()


@implementer(IMaildrop, ISeenFlags)
class _Maildrop:
    def __init__(
        self,
        root: str,
        root_fd: int | None,
        messages: list[MessageInfo],
        locations: list[tuple[str, str]],
        lock: MaildropLock | None,
        reactor: IReactorThreads | None,
    ) -> None:
        self.root = root
        self.messages = messages
        # UPDATE's unlinks and renames run in its thread pool, like the scan.
        self._reactor = reactor
        self._root_fd = root_fd
        self._locations = locations
        self._lock = lock

    def _relocate(self, index: int) -> tuple[str, str] | None:
        assert self._root_fd is not None
        unique = _unique_name(self._locations[index][1])
        location = _locate(self.root, self._root_fd, unique)
        if location is not None:
            self._locations[index] = location
        return location

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        assert self._root_fd is not None
        location: tuple[str, str] | None = self._locations[index]
        try:
            while location is not None:
                try:
                    file = _open_message(self.root, self._root_fd, location)
                except FileNotFoundError:
                    relocated = self._relocate(index)
                    location = relocated if relocated != location else None
                    continue
                except OSError as error:
                    path = os.path.join(self.root, *location)
                    raise _unavailable("cannot open message", path, error) from error
                body: IMessageBody = _FileBody(file, os.path.join(self.root, *location))
                return succeed(body)
        except POP3Error as error:
            return fail(error)
        return fail(MessageGone())

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        return run_blocking(self._reactor, self._remove_all, list(indexes))

    def _remove_all(self, indexes: list[int]) -> None:
        failed = sum(1 for index in indexes if not self._remove_one(index))
        if failed:
            raise DeletionFailed(failed)

    def _remove_one(self, index: int) -> bool:
        assert self._root_fd is not None
        location: tuple[str, str] | None = self._locations[index]
        try:
            while location is not None:
                subdirectory, name = location
                try:
                    with _subdirectory(self.root, self._root_fd, subdirectory) as fd:
                        if fd is None:
                            raise FileNotFoundError(errno.ENOENT, "no such directory")
                        os.unlink(name, dir_fd=fd)
                    return True
                except FileNotFoundError:
                    relocated = self._relocate(index)
                    location = relocated if relocated != location else None
        except OSError as error:
            path = os.path.join(self.root, *location) if location else self.root
            log.error("cannot delete {path}: {error}", path=path, error=error)
            return False
        except POP3Error:
            return False
        # Already gone: what the user asked for is done.
        return True

    def mark_seen(self, retrieved: Sequence[int], kept: Sequence[int]) -> Deferred[None]:
        """
        What Dovecot's POP3 server does to a Maildir: messages still in new/
        move to cur/, and retrieved ones get the S (seen) flag.  The unique
        name, and so the UIDL, stays.
        """
        return run_blocking(self._reactor, self._mark_seen, list(retrieved), list(kept))

    def _mark_seen(self, retrieved: list[int], kept: list[int]) -> None:
        if self._root_fd is None:
            return
        seen = set(retrieved)
        for index in kept:
            subdirectory, name = self._locations[index]
            unique, _, info = name.partition(":")
            flags = set(info[2:]) if info.startswith("2,") else set()
            if index in seen:
                flags.add("S")
            target = f"{unique}:2,{''.join(sorted(flags))}"
            if subdirectory == "cur" and target == name:
                continue
            try:
                with (
                    _subdirectory(self.root, self._root_fd, subdirectory) as source,
                    _subdirectory(self.root, self._root_fd, "cur") as cur,
                ):
                    if source is None or cur is None:
                        continue
                    # Never replace a file another program put there; rename
                    # is atomic, so a crash leaves the message in one place.
                    if _exists(target, cur):
                        continue
                    os.rename(name, target, src_dir_fd=source, dst_dir_fd=cur)
                self._locations[index] = ("cur", target)
            except (OSError, POP3Error) as error:
                log.info("not marking {name} seen: {error}", name=name, error=error)

    def close(self) -> Deferred[None]:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
        return succeed(None)
