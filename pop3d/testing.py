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

import itertools
import os
import time
from collections.abc import Mapping

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from pop3d.logindelay import ILoginHistory, holds_back
from pop3d.realm import MaildropRealm
from pop3d.stores.interfaces import IMaildropStore
from pop3d.stores.memory import MemoryStore

__all__ = ["MemoryLoginHistory", "MemoryStore", "deliver_to_maildir", "memory_portal"]


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
