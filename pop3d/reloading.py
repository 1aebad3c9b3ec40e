"""
Reading configuration files again (SIGHUP): `IReloadable`, what a part
read from files provides, and `ReloadableFiles`, the one way such a part
reads its files again (in the thread pool) while logins and handshakes go
on.  Twisted and the thread-pool helper only: the credentials checkers and
the TLS settings use it without importing the protocol stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from pop3d.stores.common import run_blocking

log = Logger()

_Read = TypeVar("_Read")

#: Seconds a login waits at most for a reading under way (see `ReloadableFiles.settled`).
READING_PATIENCE = 5.0


def _go_on(result: object, timeout: float) -> None:
    """A login that waited `READING_PATIENCE` goes on with the configuration in use."""
    return None


class IReloadable(Interface):
    """
    An add-on for a credentials checker (or any part ``twistd pop3d``
    composes) whose configuration is read from files: SIGHUP calls
    `reload`.
    """

    def reload() -> Deferred[None]:
        """
        Read the configuration again (in the thread pool: `ReloadableFiles`);
        the Deferred fires once the new one is in use, or the one in use
        kept.  A configuration that cannot be used is logged with the file
        and line, and the one in use is kept.
        """


class ReloadableFiles(Generic[_Read]):
    """
    How an `IReloadable` reads its files again, and how its logins wait for
    that: ``read`` (the files, parsed and checked) runs in ``threads``' pool
    (inline until `threads` is set, as at start-up), and ``use`` takes what
    it gave, on the reactor thread.

    A login calls `settled` first: while a reading is under way it waits for
    it, then goes on with what it gave.  One reading serves every login
    that waits; a `read_again` asked while one is under way (the files may
    have changed since it began) reads once more after it.  A reading that
    fails keeps the configuration in use and is logged once: the errors of
    ``expected`` (which name the file and line) in one line, anything else
    with its traceback.
    """

    def __init__(
        self,
        path: str,
        read: Callable[[], _Read],
        use: Callable[[_Read], None],
        expected: tuple[type[Exception], ...],
    ) -> None:
        self.path = path
        #: Where the files are read (`IReactorThreads`); None: inline.
        self.threads: IReactorThreads | None = None
        self._read = read
        self._use = use
        self._expected = expected
        #: The logins waiting for the reading under way (None: no reading).
        self._waiting: list[Deferred[None]] | None = None
        #: Those waiting for the reading after it.
        self._next: list[Deferred[None]] = []

    @property
    def reading(self) -> bool:
        """The files are being read: `settled` would wait."""
        return self._waiting is not None

    def settled(self) -> Deferred[None]:
        """
        Fires at once, or, while the files are being read, once they are,
        or after `READING_PATIENCE` seconds at most (with the configuration
        in use): a reading queued behind busy threads (a database that stopped
        answering holds them) never holds logins with it.
        """
        if self._waiting is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        clock = self.threads
        if IReactorTime.providedBy(clock):
            waiting.addTimeout(READING_PATIENCE, clock, onTimeoutCancel=_go_on)
        return waiting

    def read_again(self) -> Deferred[None]:
        """Read the files again; fires once what they hold is in use, or the old kept."""
        waiting: Deferred[None] = Deferred()
        if self._waiting is None:
            self._start([waiting])
        else:
            self._next.append(waiting)
        return waiting

    def _start(self, waiting: list[Deferred[None]]) -> None:
        self._waiting = waiting
        try:
            reading = run_blocking(self.threads, self._read)
        except Exception:
            # Not even handed over (a pool that is gone): the logins waiting
            # must not wait for ever; the configuration in use is kept.
            self._read_done(Failure())
            return
        reading.addCallback(self._use).addBoth(self._read_done)

    def _read_done(self, result: Failure | None) -> None:
        if result is None:
            log.info("reloaded {path}", path=self.path)
        elif result.check(*self._expected):
            log.error("keeping the previous {path}: {error}", path=self.path, error=result.value)
        else:
            log.failure("keeping the previous {path}", result, path=self.path)
        waiting, self._waiting = self._waiting or [], None
        if self._next:
            following, self._next = self._next, []
            self._start(following)
        for login in waiting:
            if not login.called:  # not given up on (READING_PATIENCE)
                login.callback(None)
