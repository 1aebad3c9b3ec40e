"""
Maildir storage (the layout Postfix, Dovecot, Courier and procmail deliver).

Messages are read from ``new/`` and ``cur/``; ``tmp/`` holds deliveries in
progress and is never looked at.  A message is identified across sessions by
its unique name, the part of the file name before ``:`` (so a move from
``new/`` to ``cur/`` by another program, which adds ``:2,FLAGS``, keeps it).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Sequence
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropUnavailable, MessageGone, POP3Error
from pop3d.interfaces import IMaildrop, IMaildropStore, IMessageBody, MessageInfo
from pop3d.locking import MaildropLock
from pop3d.wire import WireSizeCounter, is_valid_uidl

#: The lock file in the root of every locked Maildir.  No leading dot:
#: Maildir++ treats dot-names in the root as folders.
LOCK_FILE_NAME = "pop3d.lock"

_READ_SIZE = 256 * 1024
_PLACEHOLDER = re.compile(r"\{(user|local|domain)\}")
# Maildir++ (Courier, Dovecot): ",W=" is the size with CRLF line endings.
_WIRE_SIZE_FIELD = re.compile(r",W=(\d+)(?:,|$)")

log = Logger()


class MaildirTemplateError(ValueError):
    """A --mail-location path template that cannot be used."""


def check_template(template: str) -> None:
    """Refuse a template with placeholders other than {user}, {local}, {domain}."""
    leftover = _PLACEHOLDER.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise MaildirTemplateError(
            f"unknown placeholder in {template!r}: use {{user}}, {{local}} or {{domain}}"
        )
    if not template:
        raise MaildirTemplateError("the maildir path is empty")


def expand_template(template: str, mailbox: str) -> str:
    """
    Substitute a mailbox name into a path template in one pass, so text in
    the name is never itself taken for a placeholder.
    """
    local, _, domain = mailbox.partition("@")
    values = {"user": mailbox, "local": local, "domain": domain}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def uidl_for(unique_name: str) -> str:
    """
    The unique-id listing of a message: its Maildir unique name when that is
    a valid UIDL (RFC 1939 section 7), else a digest of it (long host names
    can push unique names past 70 characters).
    """
    if is_valid_uidl(unique_name):
        return unique_name
    return hashlib.sha1(unique_name.encode("utf-8", "surrogateescape")).hexdigest()


@implementer(IMaildropStore)
class MaildirStore:
    """
    Maildirs found by a path template such as ``/srv/mail/{user}``.

    ``{user}`` is the whole user name, ``{local}`` and ``{domain}`` its parts
    around ``@``.
    """

    def __init__(self, template: str) -> None:
        check_template(template)
        self.template = template

    def path_for(self, mailbox: str) -> str:
        return expand_template(self.template, mailbox)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        try:
            maildrop: IMaildrop = _open_maildir(self.path_for(mailbox))
        except POP3Error as error:
            return fail(error)
        return succeed(maildrop)


def _open_maildir(root: str) -> _Maildrop:
    try:
        root_stat = os.stat(root)
    except FileNotFoundError:
        # Nothing delivered yet: an empty maildrop, not an error.
        return _Maildrop(root, [], [], None)
    except OSError as error:
        raise _unavailable("cannot read maildir", root, error) from error
    if not stat.S_ISDIR(root_stat.st_mode):
        log.error("maildir {path} is not a directory", path=root)
        raise MaildropUnavailable("maildrop is not a directory", permanent=True)
    lock = MaildropLock.acquire(os.path.join(root, LOCK_FILE_NAME))
    try:
        messages, paths = _snapshot(root)
    except BaseException:
        lock.release()
        raise
    return _Maildrop(root, messages, paths, lock)


def _snapshot(root: str) -> tuple[list[MessageInfo], list[str]]:
    messages: list[MessageInfo] = []
    paths: list[str] = []
    for name, path in zip(*_scan(root), strict=True):
        size = _wire_size(name, path)
        if size is None:
            # Moved or removed by another program since the scan.
            moved = _locate(root, name)
            if moved is None or moved == path:
                continue
            path, size = moved, _wire_size(name, moved)
            if size is None:
                continue
        messages.append(MessageInfo(uidl_for(name), size))
        paths.append(path)
    return messages, paths


def _scan(root: str) -> tuple[list[str], list[str]]:
    """The unique names and paths of the messages in new/ and cur/, in name order."""
    found: dict[str, str] = {}
    for subdirectory in ("new", "cur"):
        directory = os.path.join(root, subdirectory)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file():
                        continue
                    # A message seen in both (another program moving it right
                    # now) is the same message: the cur/ one wins.
                    found[entry.name.split(":", 1)[0]] = entry.path
        except FileNotFoundError:
            continue
        except OSError as error:
            raise _unavailable("cannot read maildir", directory, error) from error
    names = sorted(found)
    return names, [found[name] for name in names]


def _wire_size(unique_name: str, path: str) -> int | None:
    """The RETR size of a message, or None if its file is gone."""
    field = _WIRE_SIZE_FIELD.search(unique_name)
    if field is not None:
        return int(field.group(1))
    counter = WireSizeCounter()
    try:
        with open(path, "rb") as message:
            while chunk := message.read(_READ_SIZE):
                counter.feed(chunk)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _unavailable("cannot read message", path, error) from error
    return counter.finish()


def _locate(root: str, unique_name: str) -> str | None:
    """Where a message with this unique name is now, if anywhere."""
    for subdirectory in ("cur", "new"):
        directory = os.path.join(root, subdirectory)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.split(":", 1)[0] == unique_name:
                        return entry.path
        except FileNotFoundError:
            continue
    return None


def _unavailable(what: str, path: str, error: OSError) -> MaildropUnavailable:
    permanent = isinstance(error, (PermissionError, NotADirectoryError, IsADirectoryError))
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


@implementer(IMaildrop)
class _Maildrop:
    def __init__(
        self,
        root: str,
        messages: list[MessageInfo],
        paths: list[str],
        lock: MaildropLock | None,
    ) -> None:
        self.root = root
        self.messages = messages
        self._paths = paths
        self._unique_names = [os.path.basename(p).split(":", 1)[0] for p in paths]
        self._lock = lock

    def _relocate(self, index: int) -> str | None:
        path = _locate(self.root, self._unique_names[index])
        if path is not None:
            self._paths[index] = path
        return path

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        path: str | None = self._paths[index]
        while path is not None:
            try:
                body: IMessageBody = _FileBody(open(path, "rb"), path)
            except FileNotFoundError:
                relocated = self._relocate(index)
                path = relocated if relocated != path else None
                continue
            except OSError as error:
                return fail(_unavailable("cannot open message", path, error))
            return succeed(body)
        return fail(MessageGone())

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        failed = 0
        for index in indexes:
            if not self._remove_one(index):
                failed += 1
        if failed:
            return fail(DeletionFailed(failed))
        return succeed(None)

    def _remove_one(self, index: int) -> bool:
        path: str | None = self._paths[index]
        while path is not None:
            try:
                os.unlink(path)
                return True
            except FileNotFoundError:
                relocated = self._relocate(index)
                path = relocated if relocated != path else None
            except OSError as error:
                log.error("cannot delete {path}: {error}", path=path, error=error)
                return False
        # Already gone: what the user asked for is done.
        return True

    def close(self) -> Deferred[None]:
        if self._lock is not None:
            self._lock.release()
        return succeed(None)
