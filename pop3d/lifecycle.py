"""
Stopping gracefully: what happens to the sessions when ``twistd pop3d`` gets
SIGTERM (or SIGINT, or a worker's parent goes away).

twistd stops the application before the reactor stops, and waits for the
Deferreds its services' ``stopService`` return.  The listening services stop
accepting first; then `GracefulStop`:

- closes every session that is not in UPDATE, without UPDATE, as if its
  client had gone (RFC 1939 section 6: only QUIT enters UPDATE, so nothing
  marked by DELE is removed); a client waiting for its next command is told
  ``-ERR [SYS/TEMP] server shutting down, try again later`` first;
- waits for the sessions in UPDATE to finish it (the removal of what their
  client deleted, an mbox rewrite, the seen flags) and send their last reply;
- after ``timeout`` seconds, drops whatever connection is still open.  A
  removal already running in the thread pool still finishes: the reactor
  joins its threads before the process exits.

With ``--workers`` the parent passes SIGTERM on to its workers, each of
which stops this way, and waits for them (`pop3d.workers.STOP_TIMEOUT`,
longer than `DRAIN_TIMEOUT`, before it kills one that does not end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from pop3d.protocol import Phase, POP3Protocol
from pop3d.session import State
from pop3d.stores.common import run_blocking

log = Logger()

_Read = TypeVar("_Read")

#: Seconds the sessions in UPDATE have to finish when the server stops.
DRAIN_TIMEOUT = 5.0

#: Session states whose work must not be cut short: UPDATE, and a session
#: whose UPDATE is done and whose last reply is being written.
_FINISHING = frozenset({State.UPDATE, State.CLOSED})


class GracefulStop(Service):
    """
    When stopped, ends the connections ``connections()`` lists as described
    in the module docstring; ``stopService`` fires once they are all gone,
    within ``timeout`` seconds of ``clock``.
    """

    def __init__(
        self,
        connections: Callable[[], Iterable[POP3Protocol]],
        *,
        clock: IReactorTime,
        timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self._connections = connections
        self._clock = clock
        self._timeout = timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return stop_sessions(list(self._connections()), clock=self._clock, timeout=self._timeout)


def stop_sessions(
    connections: Iterable[POP3Protocol], *, clock: IReactorTime, timeout: float
) -> Deferred[None]:
    """End ``connections`` as a stopping server does; fires when they are all closed."""
    connections = list(connections)
    finishing: list[POP3Protocol] = []
    closed = 0
    for protocol in connections:
        if protocol.phase is Phase.CLOSED:
            continue
        if protocol.session.state in _FINISHING:
            finishing.append(protocol)
        else:
            protocol.shut_down()
            closed += 1
    log.info(
        "shutting down: closed {closed} sessions without UPDATE; waiting up to "
        "{timeout:g} s for {finishing} sessions in UPDATE",
        closed=closed,
        finishing=len(finishing),
        timeout=timeout,
    )
    waiting = [protocol.when_closed() for protocol in connections]
    stopped: Deferred[None] = Deferred()

    def too_late() -> None:
        late = [protocol for protocol in connections if protocol.phase is not Phase.CLOSED]
        log.warn(
            "shutting down: {count} connections still open after {timeout:g} s; dropping them",
            count=len(late),
            timeout=timeout,
        )
        for protocol in late:
            protocol.abort()
        # Bounded: the process goes on stopping whether or not they are gone.
        if not stopped.called:
            stopped.callback(None)

    deadline = clock.callLater(timeout, too_late)

    def all_closed(_: object) -> None:
        if deadline.active():
            deadline.cancel()
        if not stopped.called:
            stopped.callback(None)

    DeferredList(waiting).addCallback(all_closed)
    return stopped


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
        """Fires at once, or, while the files are being read, once they are."""
        if self._waiting is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
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
            login.callback(None)
