"""
Slowing down password guessing: every failed login is answered only after a
delay (like Dovecot's auth_failure_delay), and the delay grows for a peer
that keeps failing.  The wait is a timer on the injected clock, so it never
holds up other sessions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

#: Peers remembered at most; the least recently failing are forgotten first.
MAX_REMEMBERED_PEERS = 10_000


@dataclass
class _Record:
    failures: int
    last_failure: float


class FailureDelay:
    """
    ``base`` seconds for a peer's first failure, doubling with each further
    failure up to ``maximum``; a peer that has not failed for ``forget_after``
    seconds starts again from ``base``.  A delay of 0 answers at once.
    """

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 2.0,
        maximum: float = 30.0,
        forget_after: float = 900.0,
    ) -> None:
        self._clock = clock
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self._peers: OrderedDict[str, _Record] = OrderedDict()

    def delay_for_failure(self, peer_host: str) -> float:
        """Record a failed login from ``peer_host``; how long to wait to answer it."""
        if self.base <= 0:
            return 0.0
        now = self._clock.seconds()
        record = self._peers.pop(peer_host, None)
        if record is None or now - record.last_failure > self.forget_after:
            record = _Record(0, now)
        record.failures += 1
        record.last_failure = now
        self._peers[peer_host] = record
        while len(self._peers) > MAX_REMEMBERED_PEERS:
            self._peers.popitem(last=False)
        return float(min(self.base * 2 ** (record.failures - 1), self.maximum))

    def wait(self, seconds: float) -> Deferred[None]:
        if seconds <= 0:
            return succeed(None)
        return deferLater(self._clock, seconds, lambda: None)
