"""
Public helpers for using pop3d as a fixture in the tests of mail clients.

`MemoryStore` keeps maildrops in memory with the same contract as the
Maildir store; `memory_portal` puts it behind a portal with a fixed set of
users.  For example, with pytest-twisted::

    store = MemoryStore()
    store.deliver("alice", b"Subject: hi\\n\\nhello\\n")
    factory = POP3Factory(memory_portal(store, {"alice": "secret"}), clock=reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Mapping, Sequence

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from pop3d.errors import MaildropLocked, MessageGone
from pop3d.interfaces import (
    ILoginHistory,
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.logindelay import holds_back
from pop3d.realm import MaildropRealm
from pop3d.wire import wire_size


@implementer(IMaildropStore)
class MemoryStore:
    """
    Maildrops held in memory.  Locks hold within the process: a second
    session for a mailbox that is open gets ``-ERR [IN-USE]``.
    """

    def __init__(self) -> None:
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

    def _unlock(self, mailbox: str) -> None:
        self._locked.discard(mailbox)


@implementer(ILoginHistory)
class MemoryLoginHistory:
    """
    Last logins in memory, for `pop3d.logindelay.LoginDelayRealm` in tests:
    shared by whatever holds the same instance, gone when it is.
    """

    def __init__(self) -> None:
        self.logins: dict[str, float] = {}

    def last_login(self, user: str) -> Deferred[float | None]:
        return succeed(self.logins.get(user))

    def record_login(self, user: str, now: float, delay: float) -> Deferred[float | None]:
        last = self.logins.get(user)
        if holds_back(last, now, delay):
            return succeed(last)
        self.logins[user] = now
        return succeed(None)


@implementer(IMessageBody)
class _MemoryBody(io.BytesIO):
    pass


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
        return succeed(_MemoryBody(data))

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        for index in indexes:
            self._stored.pop(self.messages[index].uid, None)
        return succeed(None)

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._store._unlock(self._mailbox)
        return succeed(None)


_deliveries = itertools.count(1)


def deliver_to_maildir(
    maildir: str, message: bytes, *, subdirectory: str = "new", info: str = ""
) -> str:
    """
    Deliver ``message`` to the Maildir at ``maildir`` as an MTA would
    (written in ``tmp/``, then renamed), creating the Maildir if needed.
    Returns the unique name; ``info`` (e.g. ``":2,S"``) is appended to the
    file name, typically with ``subdirectory="cur"``.
    """
    for part in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, part), exist_ok=True)
    # Zero-padded so that name order (the order of a snapshot) is delivery order.
    unique = f"{int(time.time())}.M{next(_deliveries):06d}P{os.getpid()}.pop3d-testing"
    temporary = os.path.join(maildir, "tmp", unique)
    with open(temporary, "wb") as file:
        file.write(message)
    os.rename(temporary, os.path.join(maildir, subdirectory, unique + info))
    return unique


def memory_portal(store: IMaildropStore, users: Mapping[str, str]) -> Portal:
    """
    A portal serving ``store`` to ``users`` (name to password), accepting
    USER/PASS and APOP.
    """
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for name, password in users.items():
        checker.addUser(name.encode("utf-8"), password.encode("utf-8"))
    return Portal(MaildropRealm(store), [checker])
