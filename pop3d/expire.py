"""
RFC 2449 section 6.7 EXPIRE with a number of days: a message is deleted at
the first QUIT at least that many days after it was first retrieved (RETR,
not TOP).

Expiry happens only in UPDATE, after a QUIT, as if the client had sent DELE:
a session that ends any other way deletes nothing.  A message that has
expired is still listed in the session that finds it expired (the session's
snapshot is fixed at login, RFC 1939 section 4: its message numbers and
UIDLs do not change under the client, and it may still be retrieved); the
next session no longer has it.  Messages never retrieved never expire.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.stores.interfaces import IMaildrop, IRetrievalTimes

SECONDS_PER_DAY = 86_400

log = Logger()


def expired_messages(
    maildrop: IMaildrop, retrieved: Collection[int], *, days: int, now: float
) -> Deferred[frozenset[int]]:
    """
    Record this session's first retrievals (``retrieved``, the messages sent
    with RETR and not deleted) and return the messages of the snapshot first
    retrieved at least ``days`` days before ``now``.  If the times cannot be
    kept, nothing expires in this session (logged): nothing is deleted that
    the policy does not allow.
    """
    times = IRetrievalTimes(maildrop, None)
    if times is None:
        log.error("the maildrop keeps no retrieval times: nothing expires")
        return succeed(frozenset())
    recorded: Deferred[Mapping[int, float]] = maybeDeferred(
        times.record_retrievals, sorted(retrieved), now
    )
    cutoff = now - days * SECONDS_PER_DAY

    def expired(firsts: Mapping[int, float]) -> frozenset[int]:
        return frozenset(index for index, first in firsts.items() if first <= cutoff)

    def not_recorded(failure: Failure) -> frozenset[int]:
        log.failure("retrieval times not kept: nothing expires in this session", failure)
        return frozenset()

    # After `expired` too: whatever a store returns, UPDATE goes on.
    return recorded.addCallback(expired).addErrback(not_recorded)
