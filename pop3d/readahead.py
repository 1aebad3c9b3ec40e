"""
Read-ahead: the next message of a client that retrieves messages in order,
read while that client is still taking in the one just sent.

A client that waits for each answer before it sends the next command
(fetchmail, Thunderbird, ``poplib``: RETR 1, then RETR 2, ...) leaves the
server idle while it reads a message, and then waits while the server opens
and reads the next.  Reading that next message in the idle time takes the
opening and the reading out of the client's wait.  What is read ahead is the
message's stored bytes, as its RETR would read them: its RETR (or TOP) is
answered from them exactly as from the file.  A message that another
program deleted meanwhile is not sent from them: the RETR is answered as if
nothing had been read ahead (`pop3d.stores.interfaces.IRemovalCheck`).  A
message that is not asked for next costs one read.

Bounded for the whole server: at most one message per session, only
messages of at most `LARGEST` octets, at most ``limit`` octets and
``sessions`` sessions (each holds its message's file open, for the removal
check) for all sessions together; when a new message needs the room, the
messages read longest ago (those of clients gone idle) are dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.errors import POP3Error
from pop3d.stores.interfaces import IMaildrop, IMessageBody, IRemovalCheck
from pop3d.stores.memory import MemoryBody

log = Logger()

#: The largest message read ahead: one read of the protocol's.
LARGEST = 256 * 1024

#: What all of a server's sessions may hold read ahead at once, by default.
DEFAULT_LIMIT = 16 * 1024 * 1024

#: How many sessions may hold a message read ahead at once, by default.
DEFAULT_SESSIONS = 256


@dataclass(frozen=True, slots=True)
class _Held:
    index: int
    data: bytes
    #: The body, still open, when it can tell whether its message was removed.
    body: IMessageBody | None
    removed: Callable[[], bool] | None


class ReadAhead:
    """
    The messages read ahead for a server's sessions: at most one each, and
    at most ``limit`` octets and ``sessions`` sessions in all.  A session is
    known by the object given as its ``holder`` (its
    `pop3d.driver.SessionDriver`).  Used on the reactor thread only.
    """

    __slots__ = ("_held", "_limit", "_octets", "_opens_later", "_sessions")

    def __init__(self, limit: int = DEFAULT_LIMIT, sessions: int = DEFAULT_SESSIONS) -> None:
        self._limit = limit
        self._sessions = sessions
        # holder -> what it holds; the least recently read first.
        self._held: OrderedDict[object, _Held] = OrderedDict()
        self._octets = 0
        # Sessions whose maildrop opened a message later (a Deferred: a store
        # behind a network service): not read ahead again, since what the
        # read-ahead saves is a local file's opening and reading.
        self._opens_later: set[object] = set()

    @property
    def octets(self) -> int:
        """The octets held now, for all sessions."""
        return self._octets

    @property
    def sessions(self) -> int:
        """How many sessions hold a message now."""
        return len(self._held)

    def read(self, holder: object, maildrop: IMaildrop, index: int) -> None:
        """
        Read message ``index`` of ``maildrop`` for ``holder``, in place of
        what it held, if it is small enough and its store answers at once.
        A message that cannot be read is left to its RETR, which says why.
        """
        self.forget_message(holder)
        size = maildrop.messages.sizes[index]
        if (
            size > LARGEST
            or size > self._limit
            or self._sessions <= 0
            or holder in self._opens_later
        ):
            return
        body: IMessageBody | None = None
        try:
            opened = maildrop.open_message(index)
            if isinstance(opened, Deferred):
                self._opens_later.add(holder)
                opened.addCallbacks(_close, _ignore)
                return
            body = opened
            data = _read_whole(body)
        except POP3Error:
            data = None  # gone or unreadable: its RETR says so
        except Exception:
            log.failure("reading a message ahead failed")
            data = None
        if body is None:
            return
        if data is None or len(data) > self._limit:
            body.close()
            return
        if IRemovalCheck.providedBy(body):
            # Kept open, to be asked whether its message was deleted.
            held = _Held(index, data, body, body.removed)
        else:
            body.close()
            held = _Held(index, data, None, None)
        self._make_room(len(data))
        self._held[holder] = held
        self._octets += len(data)

    def take(self, holder: object, index: int) -> IMessageBody | None:
        """
        Message ``index`` as read ahead for ``holder``, if it holds that
        one and it was not deleted meanwhile; else None.  Either way
        ``holder`` holds nothing afterwards.
        """
        if not self._held:
            return None
        held = self._held.pop(holder, None)
        if held is None:
            return None
        self._octets -= len(held.data)
        try:
            if held.index != index or (held.removed is not None and held.removed()):
                return None
        finally:
            if held.body is not None:
                held.body.close()
        return MemoryBody(held.data)

    def forget_message(self, holder: object) -> None:
        """What ``holder`` holds is dropped."""
        held = self._held.pop(holder, None)
        if held is not None:
            self._drop(held)

    def forget(self, holder: object) -> None:
        """``holder``'s session ended."""
        self.forget_message(holder)
        self._opens_later.discard(holder)

    def _make_room(self, octets: int) -> None:
        held = self._held
        while held and (self._octets + octets > self._limit or len(held) >= self._sessions):
            _, oldest = held.popitem(last=False)
            self._drop(oldest)

    def _drop(self, held: _Held) -> None:
        self._octets -= len(held.data)
        if held.body is not None:
            held.body.close()


def _read_whole(body: IMessageBody) -> bytes | None:
    """All of ``body``; None if it is over `LARGEST` or answers later."""
    data = body.read(LARGEST)
    if isinstance(data, Deferred):
        data.addErrback(_ignore)
        return None
    if len(data) >= LARGEST:
        return None
    # Only an empty read is the end (a short one may not be); a local
    # file's says so without a system call.
    rest = body.read(LARGEST)
    if isinstance(rest, Deferred):
        rest.addErrback(_ignore)
        return None
    return None if rest else data


def _close(body: IMessageBody) -> None:
    body.close()


def _ignore(failure: Failure) -> None:
    """A read-ahead that failed: its RETR will say why, if it comes."""
