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

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pop3d.protocol import Phase, POP3Protocol
from pop3d.session import State

log = Logger()


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
