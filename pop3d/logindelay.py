"""
RFC 2449 section 6.5 LOGIN-DELAY, enforced: a user who logged in less than
the delay ago is refused with ``-ERR [LOGIN-DELAY]`` (section 8.1.1).

`LoginDelayRealm` wraps the realm of a portal, so it runs only after a
checker accepted the credentials: a wrong password or an unknown user is
answered ``-ERR [AUTH]`` as always, and the refusal tells nothing about who
exists.  A refused login is not a login: it does not restart the wait.

The last logins are kept by an `ILoginHistory`:
`LoginHistoryFile`, an SQLite database that the processes of ``twistd pop3d
--workers`` share and that survives a restart, or
`pop3d.testing.MemoryLoginHistory`.
"""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from typing import Any, cast

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pop3d.errors import LoginDelayed
from pop3d.realm import Avatar, mailbox_name, release
from pop3d.stores.common import run_blocking
from pop3d.stores.interfaces import IMaildrop
from pop3d.stores.maildir import default_lock_table
from pop3d.userdb import AuthenticatedUser, IUserMaildrop

#: The default `LoginHistoryFile`, beside the default lock table (see
#: `default_login_history`).  User names never start with a dot.
LOGIN_HISTORY_NAME = ".pop3d-logins"
#: How long a process waits for another one's write to the history.
BUSY_TIMEOUT_SECONDS = 5.0

log = Logger()


class ILoginHistory(Interface):
    """
    When each user last logged in, for RFC 2449 section 6.5 LOGIN-DELAY
    (see `pop3d.logindelay.LoginDelayRealm`).

    Times are seconds on the server's clock (``IReactorTime.seconds``).  A
    history shared by several processes (``twistd pop3d --workers``) must
    give every one of them the same answers; one that survives a restart
    keeps the delay across it.
    """

    def last_login(user: str) -> Deferred[float | None]:
        """When ``user`` last logged in, or None if never (as far as known)."""

    def record_login(user: str, now: float, delay: float) -> Deferred[float | None]:
        """
        Atomically, with respect to every other caller in every process: if
        the last login of ``user`` is within ``delay`` seconds before
        ``now`` (``now - delay < last <= now``), change nothing and return
        that time (the login is refused); otherwise record ``now`` as their
        last login and return None.  A last login later than ``now`` (the
        clock was set back) holds no one back.  Fails, changing nothing,
        if the history cannot be read or written.
        """


def default_login_history(template: str) -> str:
    """
    Where the login history of a mail location is by default: in the same
    directory as its default lock table (``/srv/mail/.pop3d-logins`` for
    ``/srv/mail/{user}``), which belongs to the administrator.
    """
    return os.path.join(os.path.dirname(default_lock_table(template)), LOGIN_HISTORY_NAME)


def holds_back(last: float | None, now: float, delay: float) -> bool:
    """Whether a last login at ``last`` refuses a login at ``now``."""
    return last is not None and now - delay < last <= now


@implementer(IRealm)
class LoginDelayRealm:
    """
    Refuses a login sooner than ``delay`` seconds after the same user's
    previous one, then lets ``realm`` open the maildrop.

    The history is asked first, so a refused login costs no maildrop
    opening; the login is recorded only once the maildrop is open (the
    +OK from which RFC 2449 counts), atomically, so two logins racing in
    different processes cannot both get in.  The loser's maildrop is closed
    again.  A history that cannot be read refuses the login (logged;
    ``-ERR [SYS/TEMP]``): the delay is a promise made in CAPA.

    A user database's own ``login_delay`` for a user (an
    `pop3d.userdb.AuthenticatedUser`'s prefetched settings, or the
    `pop3d.userdb.IUserMaildrop` the realm gives) replaces ``delay`` for
    that user, but never exceeds it.  With ``per_user`` (the realm asks a
    user database), a login is refused only once the maildrop is open and
    the user's own delay known; otherwise before anything is opened.

    Announce the same delay in CAPA (`pop3d.session.SessionPolicy.login_delay`).
    """

    def __init__(
        self,
        realm: IRealm,
        history: ILoginHistory,
        *,
        delay: int,
        clock: IReactorTime,
        per_user: bool = False,
    ) -> None:
        self.realm = realm
        self.per_user = per_user
        self.history = history
        self.delay = delay
        self._clock = clock

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Deferred[Avatar]:
        known = avatarId if isinstance(avatarId, AuthenticatedUser) else None
        user = mailbox_name(known.name if known is not None else avatarId)
        if user is None:
            # Not a name any maildrop has: the realm refuses it as it always does.
            return self._open(avatarId, mind, interfaces)
        # A delay the checker already fetched for this user applies before
        # the maildrop is opened; one from the user database only after.
        # Never longer than `delay`: CAPA announced it as the longest.
        prefetched = known.settings.login_delay if known is not None else None
        default = self.delay if prefetched is None else min(prefetched, self.delay)
        # The user database may give this user a shorter delay, known once
        # the realm asked it: then only the recording decides.
        delay_before = 0 if prefetched is None and self.per_user else default

        def checked(last: float | None) -> Deferred[Avatar]:
            if holds_back(last, self._clock.seconds(), delay_before):
                assert last is not None
                raise self._refusal(last, delay_before)
            opened = self._open(avatarId, mind, interfaces)
            return opened.addCallback(record)

        def record(avatar: Avatar) -> Avatar | Deferred[Avatar]:
            delay = min(_user_delay(avatar, default), self.delay)
            if delay <= 0:
                return avatar
            recorded = maybeDeferred(self.history.record_login, user, self._clock.seconds(), delay)

            def decided(last: float | None) -> Avatar:
                if last is not None:
                    _release(avatar)
                    raise self._refusal(last, delay)
                return avatar

            def broken(failure: Failure) -> Failure:
                _release(avatar)
                return failure

            return recorded.addCallbacks(decided, broken)

        if delay_before <= 0:
            return checked(None)
        looked_up: Deferred[float | None] = maybeDeferred(self.history.last_login, user)
        return looked_up.addCallback(checked)

    def _open(self, avatarId: Any, mind: object, interfaces: tuple[Any, ...]) -> Deferred[Avatar]:
        request: Callable[..., object] = self.realm.requestAvatar
        return cast("Deferred[Avatar]", maybeDeferred(request, avatarId, mind, *interfaces))

    def _refusal(self, last: float, delay: int) -> LoginDelayed:
        """What a login held back by one at ``last`` is told."""
        remaining = math.ceil(last + delay - self._clock.seconds())
        return LoginDelayed(delay, max(1, remaining))


def _user_delay(avatar: Avatar, default: int) -> int:
    """The login delay of the user the avatar belongs to (their database's, or ``default``)."""
    _, opened, _ = avatar
    if IUserMaildrop.providedBy(opened) and opened.settings.login_delay is not None:
        return int(opened.settings.login_delay)
    return default


def _release(avatar: Avatar) -> None:
    """Give back what the realm took for a login that is refused after all."""
    _, opened, logout = avatar
    if IUserMaildrop.providedBy(opened):
        opened = opened.maildrop
    release(IMaildrop(opened, None), logout, log)


_SCHEMA = "CREATE TABLE IF NOT EXISTS last_login (name TEXT PRIMARY KEY, at REAL NOT NULL)"


@implementer(ILoginHistory)
class LoginHistoryFile:
    """
    Last logins in an SQLite database at ``path``, shared by every process
    of this host that names the same file and kept across restarts.

    Write-ahead logging lets readers proceed while one process writes; a
    writer waits up to `BUSY_TIMEOUT_SECONDS` for another.  A new file is
    created readable by its owner only (it names users).  With a
    ``reactor``, every query runs in its thread pool; without one (tests),
    inline.  Losing the file (or its last writes, in a power cut) only lets
    users in sooner.
    """

    def __init__(self, path: str, *, reactor: IReactorThreads | None = None) -> None:
        self.path = path
        self._reactor = reactor
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    def check(self) -> None:
        """
        Create the database if needed and read it once, in the calling
        thread (at start-up); raises `OSError` or `sqlite3.Error`.
        """
        with self._lock:
            self._connected().execute("SELECT count(*) FROM last_login").fetchone()

    def check_place(self) -> None:
        """
        At start-up, creating nothing: the file, if there, is a regular file
        (not a link), else its directory exists.  The file itself is made at
        the first login, by the process that serves: ``twistd --uid`` drops
        privileges after start-up, and a file root made then would be
        refused to the serving user (it must own it).  Raises `OSError`.
        """
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise FileNotFoundError(errno.ENOENT, "no such directory", directory) from None
            return
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", self.path)

    def close(self) -> None:
        """Close the connection (the next query opens it again)."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def last_login(self, user: str) -> Deferred[float | None]:
        return run_blocking(self._reactor, self._last_login, user)

    def record_login(self, user: str, now: float, delay: float) -> Deferred[float | None]:
        return run_blocking(self._reactor, self._record_login, user, now, delay)

    def _last_login(self, user: str) -> float | None:
        with self._lock:
            row = (
                self._connected()
                .execute("SELECT at FROM last_login WHERE name = ?", (user,))
                .fetchone()
            )
        return None if row is None else float(row[0])

    def _record_login(self, user: str, now: float, delay: float) -> float | None:
        with self._lock:
            connection = self._connected()
            # IMMEDIATE: the write lock is taken before reading, so no other
            # process can record a login between this read and this write.
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute(
                    "SELECT at FROM last_login WHERE name = ?", (user,)
                ).fetchone()
                last = None if row is None else float(row[0])
                if holds_back(last, now, delay):
                    connection.execute("ROLLBACK")
                    return last
                connection.execute(
                    "INSERT OR REPLACE INTO last_login (name, at) VALUES (?, ?)", (user, now)
                )
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return None

    def _connected(self) -> sqlite3.Connection:
        """The connection, opened (and the file created) on first use."""
        if self._connection is not None:
            return self._connection
        # Created here, not by SQLite, to get owner-only permissions (SQLite
        # gives its -wal and -shm files the same ones).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            # Another user could hold everyone out, or let everyone in.
            raise PermissionError(errno.EPERM, "not a file of this server's user", self.path)
        connection = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_SECONDS,
            # Transactions are begun explicitly; the connection is used by
            # one pool thread at a time, under self._lock.
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection
