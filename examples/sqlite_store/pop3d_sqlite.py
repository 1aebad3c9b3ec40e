"""
A third-party store for pop3d: mail kept in one SQLite file.

    PYTHONPATH=examples/sqlite_store twistd -n pop3d \\
        --mail-location sqlite:/var/mail/pop3d.sqlite --auth passwd-file:/etc/pop3d/passwd

The dropin ``twisted/plugins/pop3d_sqlite_plugin.py`` beside this module
makes the ``sqlite:`` scheme known to ``twistd pop3d`` (see
`pop3d.stores.interfaces.IMailLocationPlugin`); pop3d itself knows nothing
of it.

The messages are the rows of one table, ``messages (id, mailbox, size,
body)``: ``id`` is the UIDL (SQLite never hands out an AUTOINCREMENT id
twice), ``size`` the size on the wire (`deliver` computes it), ``body`` the
message as stored.  Every database call runs in the thread pool of the
reactor pop3d injects, so a slow disk holds up no session; message bodies
are read a piece at a time through SQLite's incremental blob I/O, each read
answering with a Deferred (`pop3d.stores.interfaces.IMessageBody`).

Locks: a maildrop is held by one session of this process at a time.  Serve
a database with one ``twistd pop3d`` process (no ``--workers``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.plugin import IPlugin
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropLocked, MaildropUnavailable, MessageGone
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMailLocationPlugin,
    IMessageBody,
    MailLocationError,
    MessageList,
)
from pop3d.wire import wire_size

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox TEXT NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_of_mailbox ON messages (mailbox, id);
"""


def connect(path: str) -> sqlite3.Connection:
    """
    A connection to the mail database, made if it is missing.  Its calls
    may come from any thread of the pool, one at a time.
    """
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        # Write-ahead logging: a session reading a message never holds up a
        # delivery or another session's deletions, and keeps reading the
        # bytes it started with.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(SCHEMA)
    except BaseException:
        connection.close()
        raise
    return connection


def deliver(path: str, mailbox: str, message: bytes) -> str:
    """Store ``message`` (as a mail transfer agent wrote it) for ``mailbox``; its UIDL."""
    with closing(connect(path)) as connection:
        cursor = connection.execute(
            "INSERT INTO messages (mailbox, size, body) VALUES (?, ?, ?)",
            (mailbox, wire_size(message), message),
        )
        return str(cursor.lastrowid)


def stored(path: str, mailbox: str) -> list[bytes]:
    """The messages of ``mailbox`` now, in delivery order."""
    with closing(connect(path)) as connection:
        rows = connection.execute(
            "SELECT body FROM messages WHERE mailbox = ? ORDER BY id", (mailbox,)
        ).fetchall()
    return [bytes(body) for (body,) in rows]


@implementer(IMaildropStore)
class SQLiteStore:
    """The maildrops of one SQLite file."""

    def __init__(self, path: str, threads: IReactorThreads) -> None:
        self.path = path
        self._threads = threads
        self._held: set[str] = set()

    def in_thread(self, function: Callable[..., _T], *arguments: object) -> Deferred[_T]:
        """Run blocking database work in the reactor's thread pool."""
        pool = self._threads.getThreadPool()
        return deferToThreadPool(self._threads, pool, function, *arguments)

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        if mailbox in self._held:
            return fail(MaildropLocked())
        self._held.add(mailbox)

        def opened(messages: MessageList) -> IMaildrop:
            return SQLiteMaildrop(self, mailbox, messages)

        def refused(failure: Any) -> Any:
            self.release(mailbox)
            return failure

        return self.in_thread(self._list, mailbox).addCallbacks(opened, refused)

    def release(self, mailbox: str) -> None:
        self._held.discard(mailbox)

    def _list(self, mailbox: str) -> MessageList:
        try:
            with closing(connect(self.path)) as connection:
                rows = connection.execute(
                    "SELECT id, size FROM messages WHERE mailbox = ? ORDER BY id", (mailbox,)
                ).fetchall()
        except sqlite3.Error as error:
            raise MaildropUnavailable(f"cannot read the mail database: {error}") from error
        return MessageList(tuple(str(uid) for uid, _ in rows), tuple(size for _, size in rows))


@implementer(IMaildrop)
class SQLiteMaildrop:
    def __init__(self, store: SQLiteStore, mailbox: str, messages: MessageList) -> None:
        self._store = store
        self._mailbox = mailbox
        self.messages = messages
        self._closed = False

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        row = int(self.messages.uids[index])
        return self._store.in_thread(SQLiteBody.open, self._store, row)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        rows = [(int(self.messages.uids[index]), self._mailbox) for index in indexes]
        return self._store.in_thread(self._delete, rows)

    def _delete(self, rows: list[tuple[int, str]]) -> None:
        # One transaction: every row goes, or none (and the client is told).
        try:
            with closing(connect(self._store.path)) as connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany("DELETE FROM messages WHERE id = ? AND mailbox = ?", rows)
                connection.execute("COMMIT")
        except sqlite3.Error:
            raise DeletionFailed(len(rows)) from None

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._store.release(self._mailbox)
        return succeed(None)


@implementer(IMessageBody)
class SQLiteBody:
    """
    One message, read through its own connection inside a read transaction:
    a deletion by anyone else meanwhile is not seen, so a response that has
    started is never cut short.
    """

    def __init__(self, store: SQLiteStore, connection: sqlite3.Connection, blob: Any) -> None:
        self._store = store
        self._connection = connection
        self._blob = blob
        self._pending: Deferred[bytes] | None = None
        self._closed = False

    @classmethod
    def open(cls, store: SQLiteStore, row: int) -> SQLiteBody:
        """(In a thread.)  The body of message ``row``, or `MessageGone`."""
        try:
            connection = connect(store.path)
        except sqlite3.Error as error:
            raise MaildropUnavailable(f"cannot read the mail database: {error}") from error
        try:
            connection.execute("BEGIN")
            blob = connection.blobopen("messages", "body", row, readonly=True)
        except sqlite3.OperationalError:
            connection.close()
            raise MessageGone() from None
        except BaseException:
            connection.close()
            raise
        return cls(store, connection, blob)

    def read(self, size: int) -> Deferred[bytes]:
        if self._closed:
            return succeed(b"")
        self._pending = self._store.in_thread(self._read, size)
        return self._pending

    def _read(self, size: int) -> bytes:
        try:
            return bytes(self._blob.read(size))
        except sqlite3.Error as error:
            raise MaildropUnavailable(f"cannot read the mail database: {error}") from error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            # A read is under way in a thread: close after it.
            def release_after(result: _T) -> _T:
                self._release()
                return result

            pending.addBoth(release_after)
        else:
            self._release()

    def _release(self) -> None:
        self._store.in_thread(self._close_connection)

    def _close_connection(self) -> None:
        self._blob.close()
        self._connection.close()


#: Store options of ``twistd pop3d`` that mean nothing for this store.
NOT_FOR_SQLITE = ("uidl-format", "mbox-format", "lock-table", "nfs-locks")


@implementer(IPlugin, IMailLocationPlugin)
class SQLiteLocation:
    """``--mail-location sqlite:PATH``: the store of this module."""

    scheme = "sqlite"
    help = "messages in one SQLite file, table messages (id, mailbox, size, body); one process"
    argument_help = "PATH of the SQLite file, e.g. sqlite:/var/mail/pop3d.sqlite"
    store_interfaces = ()

    def check(self, argument: str, options: Mapping[str, object]) -> None:
        if not argument:
            raise MailLocationError(
                "--mail-location sqlite: needs a database file, e.g. sqlite:/var/mail/pop3d.sqlite"
            )
        directory = os.path.dirname(os.path.abspath(argument))
        if not os.path.isdir(directory):
            raise MailLocationError(
                f"--mail-location sqlite:{argument}: {directory} is not a directory"
            )
        for option in NOT_FOR_SQLITE:
            if options.get(option):
                raise MailLocationError(f"--{option} does not apply to --mail-location sqlite:")

    def make(
        self,
        argument: str,
        options: Mapping[str, object],
        threads: IReactorThreads,
        clock: IReactorTime,
    ) -> IMaildropStore:
        return SQLiteStore(argument, threads)
