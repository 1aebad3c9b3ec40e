"""
Maildrops held in memory: the store that `pop3d.testing` exposes, for the
tests of mail clients and of pop3d itself.

Given a ``clock``, message bodies answer every read ``latency`` seconds
later on it, as a body kept by a network service (a database, an object
store) does: the contract of `pop3d.stores.interfaces.IMessageBody` allows
it, and the protocol streams such bodies as it streams files.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from pop3d.errors import MaildropLocked, MessageGone
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.wire import wire_size


@implementer(IMaildropStore)
class MemoryStore:
    """
    Maildrops held in memory.  Locks hold within the process: a second
    session for a mailbox that is open gets ``-ERR [IN-USE]``.

    Without a ``clock`` a body answers every read at once; with one, each
    read answers ``latency`` seconds later on that clock (a Deferred).
    """

    def __init__(self, *, clock: IReactorTime | None = None, latency: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self._mailboxes: dict[str, dict[str, bytes]] = {}
        self._locked: set[str] = set()
        self._uids = itertools.count(1)

    def deliver(self, mailbox: str, message: bytes) -> str:
        """Add a message (stored bytes, LF or CRLF) and return its UIDL."""
        uid = f"mem-{next(self._uids)}"
        self._mailboxes.setdefault(mailbox, {})[uid] = message
        return uid

    def messages(self, mailbox: str) -> list[bytes]:
        """The messages the mailbox holds now, in delivery order."""
        return list(self._mailboxes.get(mailbox, {}).values())

    def remove_behind_the_servers_back(self, mailbox: str, uid: str) -> None:
        """What another program deleting a message mid-session looks like."""
        del self._mailboxes[mailbox][uid]

    def is_locked(self, mailbox: str) -> bool:
        return mailbox in self._locked

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        if mailbox in self._locked:
            return fail(MaildropLocked())
        self._locked.add(mailbox)
        stored = self._mailboxes.setdefault(mailbox, {})
        return succeed(_MemoryMaildrop(self, mailbox, stored))

    def body(self, data: bytes) -> IMessageBody:
        """How this store serves ``data``: at once, or later on its clock."""
        if self.clock is None:
            return MemoryBody(data)
        return LateMemoryBody(data, self.clock, self.latency)

    def _unlock(self, mailbox: str) -> None:
        self._locked.discard(mailbox)


@implementer(IMessageBody)
class MemoryBody:
    """The bytes of one message, each read answered at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def read(self, size: int) -> bytes:
        start = self._position
        self._position = min(len(self._data), start + max(size, 0))
        return self._data[start : self._position]

    def close(self) -> None:
        self._position = len(self._data)


@implementer(IMessageBody)
class LateMemoryBody:
    """The bytes of one message, each read answered ``latency`` seconds later on ``clock``."""

    def __init__(self, data: bytes, clock: IReactorTime, latency: float) -> None:
        self._now = MemoryBody(data)
        self._clock = clock
        self._latency = latency
        self.reads = 0

    def read(self, size: int) -> Deferred[bytes]:
        self.reads += 1
        return deferLater(self._clock, self._latency, self._now.read, size)

    def close(self) -> None:
        self._now.close()


@implementer(IMaildrop)
class _MemoryMaildrop:
    def __init__(self, store: MemoryStore, mailbox: str, stored: dict[str, bytes]) -> None:
        self._store = store
        self._mailbox = mailbox
        self._stored = stored
        self.messages = MessageList.of(
            MessageInfo(uid, wire_size(data)) for uid, data in stored.items()
        )
        self._closed = False

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        data = self._stored.get(self.messages[index].uid)
        if data is None:
            return fail(MessageGone())
        return succeed(self._store.body(data))

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        for index in indexes:
            self._stored.pop(self.messages[index].uid, None)
        return succeed(None)

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._store._unlock(self._mailbox)
        return succeed(None)
