"""
The inactivity timeouts of a server's connections (RFC 1939 section 3's
autologout timer), all in one timer.

One `twisted.internet.base.DelayedCall` per connection (what
`twisted.protocols.policies.TimeoutMixin` keeps) is about 460 octets: a
tenth of what an idle session costs.  The connections of one server share a
timeout, so the order in which their time runs out is the order in which
they were last active: they are kept in that order, each with its deadline,
and one call waits for the first deadline.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class TimesOut(Protocol):
    """A connection with an inactivity timeout."""

    def timeoutConnection(self) -> None:
        """Its time ran out: nothing was heard from it for the whole timeout."""


class IdleTimeouts:
    """
    Calls ``timeoutConnection()`` of each connection `touch` was told of,
    ``period`` seconds of ``clock`` after it was last touched, unless it was
    forgotten first.  ``period`` None: never.
    """

    __slots__ = ("_call", "_clock", "_deadlines", "period")

    def __init__(self, clock: IReactorTime, period: float | None) -> None:
        self._clock = clock
        self.period = period
        # Least recently touched first, so soonest deadline first.
        self._deadlines: OrderedDict[TimesOut, float] = OrderedDict()
        # Waits for the first deadline (or an earlier one, since moved on).
        self._call: IDelayedCall | None = None

    def touch(self, connection: TimesOut) -> None:
        """``connection`` was active: its time starts again from now."""
        period = self.period
        if period is None:
            return
        deadlines = self._deadlines
        deadlines[connection] = self._clock.seconds() + period
        deadlines.move_to_end(connection)
        if self._call is None:
            self._call = self._clock.callLater(period, self._expire)

    def others_active_within(self, connection: TimesOut, seconds: float) -> bool:
        """
        Whether a connection other than ``connection`` was touched in the
        last ``seconds`` (False without a timeout: then nothing is kept).
        """
        period = self.period
        if period is None:
            return False
        deadlines = self._deadlines
        # The most recently touched last: this one, at most, comes before it.
        for other in reversed(deadlines):
            if other is not connection:
                return deadlines[other] >= self._clock.seconds() + period - seconds
        return False

    def forget(self, connection: TimesOut) -> None:
        """``connection`` has no timeout any more (it closed)."""
        deadlines = self._deadlines
        deadlines.pop(connection, None)
        call = self._call
        if not deadlines and call is not None:
            # Nothing left to wait for: no call is left behind in the reactor.
            self._call = None
            call.cancel()

    def _expire(self) -> None:
        self._call = None
        deadlines = self._deadlines
        now = self._clock.seconds()
        try:
            while deadlines:
                connection, deadline = next(iter(deadlines.items()))
                if deadline > now:
                    break
                del deadlines[connection]
                try:
                    connection.timeoutConnection()
                except Exception:
                    # One connection's failure leaves the others' timeouts running.
                    log.failure("timing out {connection} failed", connection=connection)
        finally:
            if deadlines and self._call is None:
                first = next(iter(deadlines.values()))
                self._call = self._clock.callLater(
                    max(0.0, first - self._clock.seconds()), self._expire
                )
