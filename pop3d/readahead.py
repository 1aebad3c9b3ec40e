"""
Read-ahead: the next message of a client that retrieves messages in order,
read while that client is still taking in the one just sent.

A client that waits for each answer before it sends the next command
(fetchmail, Thunderbird, ``poplib``: RETR 1, then RETR 2, ...) leaves the
server idle while it reads a message, and then waits while the server opens
and reads the next.  Reading that next message in the idle time takes the
opening and the reading out of the client's wait.  What is read ahead is the
message's stored bytes, as its RETR would read them: its RETR (or TOP) is
answered from them exactly as from the file.  Before they are sent, the
store's body is asked whether the file is still the one its RETR would open
now (`pop3d.stores.interfaces.IRemovalCheck`): if another program deleted,
moved, flagged or changed it meanwhile, the RETR is answered as if nothing
had been read ahead.  A message that is not asked for next costs one read.

Only while the server is otherwise idle: no other connection was active
(made, a command handled, a message's write resumed) within `BUSY_WINDOW`.
Bounded for the whole server: at most one message per session, only
messages under `LARGEST` octets, at most ``limit`` octets and ``sessions``
sessions for all sessions together; when a new message needs the room, the
messages read longest ago (those of clients gone idle) are dropped first.
No file is held open: a body is closed once it is read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.errors import POP3Error
from pop3d.stores.interfaces import IMaildrop, IMessageBody, IRemovalCheck
from pop3d.stores.memory import MemoryBody

log = Logger()

#: Messages read ahead are under this size (stored octets): one read of the protocol's.
LARGEST = 256 * 1024

#: What all of a server's sessions may hold read ahead at once, by default.
DEFAULT_LIMIT = 16 * 1024 * 1024

#: How many sessions may hold a message read ahead at once, by default.
DEFAULT_SESSIONS = 1024

#: Nothing is read ahead when another connection of the server was active
#: (made, a command handled, a message's write resumed) within this many
#: seconds: a server busy with other clients has no idle
#: time to read in, and the read-ahead's check would only add to its work.
BUSY_WINDOW = 0.001


@dataclass(frozen=True, slots=True)
class _Held:
    index: int
    data: bytes
    #: The closed body's `IRemovalCheck.removed`, when it has one.
    removed: Callable[[], bool] | None


class ReadAhead:
    """
    The messages read ahead for a server's sessions: at most one each, and
    at most ``limit`` octets and ``sessions`` sessions in all.  A session is
    known by the object given as its ``holder`` (its
    `pop3d.driver.SessionDriver`).  Used on the reactor thread only.
    """

    __slots__ = ("_answers_later", "_held", "_limit", "_octets", "_sessions")

    def __init__(self, limit: int = DEFAULT_LIMIT, sessions: int = DEFAULT_SESSIONS) -> None:
        self._limit = limit
        self._sessions = sessions
        # holder -> what it holds; the least recently read first.
        self._held: OrderedDict[object, _Held] = OrderedDict()
        self._octets = 0
        # Sessions whose maildrop opened or read a message later (a
        # Deferred: a store behind a network service): not read ahead
        # again, since what the read-ahead saves is a local file's opening
        # and reading.
        self._answers_later: set[object] = set()

    @property
    def octets(self) -> int:
        """The octets held now, for all sessions."""
        return self._octets

    @property
    def sessions(self) -> int:
        """How many sessions hold a message now."""
        return len(self._held)

    def read(self, holder: object, maildrop: IMaildrop, index: int, size: int) -> None:
        """
        Read message ``index`` of ``maildrop`` (``size`` octets as listed)
        for ``holder``, in place of what it held, if it is small enough and
        its store answers at once.  A message that cannot be read is left
        to its RETR, which says why.
        """
        self.forget_message(holder)
        if (
            size > LARGEST
            or size > self._limit
            or self._sessions <= 0
            or holder in self._answers_later
        ):
            return
        try:
            opened = maildrop.open_message(index)
        except POP3Error:
            return  # gone or unreadable: its RETR says so
        if isinstance(opened, Deferred):
            if not opened.called:
                self._answered_later(holder, opened.addCallback(_close))
                return
            # Fired already (``succeed``, or a failure at once: the message
            # gone): the store answered at once, through a Deferred.
            answered: list[IMessageBody] = []
            opened.addCallbacks(answered.append, _ignore)
            if not answered:
                return
            opened = answered[0]
        try:
            data = opened.read(LARGEST)
            if isinstance(data, Deferred):
                self._answered_later(holder, data)
                return
            if len(data) >= LARGEST:
                return
            # Only an empty read is the end (a short one may not be); a
            # local file's says so without a system call.
            rest = opened.read(LARGEST)
            if isinstance(rest, Deferred):
                self._answered_later(holder, rest)
                return
            if rest or len(data) > self._limit:
                return
        except POP3Error:
            return
        finally:
            opened.close()
        check = opened.removed if IRemovalCheck.providedBy(opened) else None
        self._make_room(len(data))
        self._held[holder] = _Held(index, data, check)
        self._octets += len(data)

    def take(self, holder: object, index: int) -> IMessageBody | None:
        """
        Message ``index`` as read ahead for ``holder``, if it holds that
        one and it is still stored as it was read; else None.  Either way
        ``holder`` holds nothing afterwards.
        """
        if not self._held:
            return None
        held = self._held.pop(holder, None)
        if held is None:
            return None
        self._octets -= len(held.data)
        if held.index != index:
            return None
        if held.removed is not None:
            try:
                if held.removed():
                    return None
            except Exception:
                log.failure("checking a message read ahead failed")
                return None
        return MemoryBody(held.data)

    def forget_message(self, holder: object) -> None:
        """What ``holder`` holds is dropped."""
        held = self._held.pop(holder, None)
        if held is not None:
            self._octets -= len(held.data)

    def forget(self, holder: object) -> None:
        """``holder``'s session ended."""
        self.forget_message(holder)
        self._answers_later.discard(holder)

    def _answered_later(self, holder: object, answer: Deferred[Any]) -> None:
        """
        ``holder``'s store answered through ``answer``, a Deferred (an open
        yet to fire, or any read's): it is not read ahead for again.
        """
        self._answers_later.add(holder)
        answer.addErrback(_ignore)

    def _make_room(self, octets: int) -> None:
        held = self._held
        while held and (self._octets + octets > self._limit or len(held) >= self._sessions):
            _, oldest = held.popitem(last=False)
            self._octets -= len(oldest.data)


def _close(body: IMessageBody) -> None:
    body.close()


def _ignore(failure: Failure) -> None:
    """A read-ahead that failed: its RETR will say why, if it comes."""
