"""
A reactor's thread pool, as the stores use it, driven by a `Clock`.

`pop3d.stores.common.run_blocking` hands file work to ``reactor.getThreadPool()``
and gets the result back through ``reactor.callFromThread``.  `ClockThreads`
provides just that, without threads: the work runs at the Clock's next
``advance``, and its result reaches the Deferred then too, as it would a turn
of the reactor later.  So a test sees a store's answers arrive late, as in
production, but in an order that never varies; `settle` runs everything due
and `result_of` gives what a Deferred ended with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads


class ClockThreads:
    """
    The parts of `IReactorThreads` (and of its thread pool) that
    `deferToThreadPool` uses, running work on ``clock`` instead of threads.
    Pass `as_reactor` where a store takes ``reactor=``.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        #: How many pieces of work were handed to the "thread pool".
        self.handed_over = 0

    @property
    def as_reactor(self) -> IReactorThreads:
        return cast("IReactorThreads", self)

    def getThreadPool(self) -> ClockThreads:
        return self

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, object], None],
        work: Callable[..., object],
        *arguments: object,
        **keywords: object,
    ) -> None:
        self.handed_over += 1

        def run() -> None:
            try:
                result = work(*arguments, **keywords)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)

        self.clock.callLater(0, run)

    def callInThread(self, work: Callable[..., object], *arguments: object) -> None:
        self.handed_over += 1
        self.clock.callLater(0, work, *arguments)

    def callFromThread(self, work: Callable[..., object], *arguments: object) -> None:
        # Back on the "reactor thread": a turn later, like the real one.
        self.clock.callLater(0, work, *arguments)


def result_of(clock: Clock, deferred: Deferred[Any]) -> object:
    """What ``deferred`` ends with (a result or a Failure) once `settle` ran."""
    results: list[object] = []
    deferred.addBoth(results.append)
    settle(clock)
    assert results, "no answer, even after everything due ran"
    return results[0]


def settle(clock: Clock) -> None:
    """Run everything due now on ``clock``, and what that schedules for now, until nothing is."""
    while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
        clock.advance(0)


@implementer(IReactorTime)
class TimedClockThreads(ClockThreads):
    """`ClockThreads` that is also the Clock's `IReactorTime`: a store can wait on it."""

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable[..., object], *a: object, **kw: object) -> Any:
        return self.clock.callLater(delay, f, *a, **kw)

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()

    def addSystemEventTrigger(
        self, phase: str, event_type: str, f: Callable[..., object], *a: object, **kw: object
    ) -> object:
        # Kept, never run: a Clock does not shut down.
        return (phase, event_type, f)
