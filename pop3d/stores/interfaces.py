"""
The contracts between the protocol and the stores behind it.

A store is anything that turns a mailbox name into an opened, exclusively
locked maildrop.  Every method that may touch storage returns a Deferred,
so the protocol never has to know whether a store is in memory, on local
disk, behind a thread pool or behind a network service; every failure is
one of the types in `pop3d.errors`.  The one exception is made for speed:
`IMessageBody.read` may answer at once (bytes) when the bytes are at hand,
as a local file's are, and must then not block for long.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorThreads, IReactorTime


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """
    One message of a maildrop snapshot.

    ``uid`` is its unique-id listing (RFC 1939 section 7): 1-70 characters in
    0x21-0x7E, unique in the maildrop and the same in every session.
    ``size`` is the exact number of octets RETR sends for it before
    byte-stuffing, line endings counted as CRLF (RFC 1939 section 11).
    """

    uid: str
    size: int


@dataclass(frozen=True, slots=True)
class MessageList(Sequence[MessageInfo]):
    """
    The messages of a maildrop snapshot, kept as two columns: UIDLs and
    sizes.  A 100,000-message listing is two tuples, not 100,000 objects that
    every full pass of the garbage collector walks (holding the GIL) for as
    long as the listing is kept; STAT, LIST and UIDL read a column at C
    speed.  Indexing gives a `MessageInfo`.
    """

    uids: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    #: `numbered` bodies made so far, by column: a listing a store keeps for
    #: the next login is formatted once, not at every LIST and UIDL.
    #: (None until the first: one listing is kept per idle session.)
    _numbered: dict[str, bytes] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        # Tuples, whatever sequences were given: the value stays hashable
        # and nobody can change a snapshot through a list they kept.
        object.__setattr__(self, "uids", tuple(self.uids))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if len(self.uids) != len(self.sizes):
            raise ValueError("as many UIDLs as sizes are needed")

    @classmethod
    def of(cls, messages: Iterable[MessageInfo]) -> MessageList:
        listed = list(messages)
        return cls(tuple(m.uid for m in listed), tuple(m.size for m in listed))

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> MessageList: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | MessageList:
        if isinstance(index, slice):
            return MessageList(self.uids[index], self.sizes[index])
        return MessageInfo(self.uids[index], self.sizes[index])

    def __iter__(self) -> Iterator[MessageInfo]:
        return map(MessageInfo, self.uids, self.sizes)

    def numbered(self, column: Literal["sizes", "uids"]) -> bytes:
        """
        A line ``N value`` (ending in CRLF) for every message, N from 1: the
        body of a LIST (``sizes``) or UIDL (``uids``) of the whole maildrop,
        made once.
        UIDLs are printable ASCII (RFC 1939 section 7), so no line needs
        byte-stuffing.
        """
        numbered = self._numbered
        if numbered is None:
            numbered = {}
            # Frozen for its users; this cache is not part of the value.
            object.__setattr__(self, "_numbered", numbered)
        made = numbered.get(column)
        if made is None:
            made = _numbered_lines(self.sizes if column == "sizes" else self.uids, 1)
            numbered[column] = made
        return made

    def extended(self, uids: Sequence[str], sizes: Sequence[int]) -> MessageList:
        """
        These messages followed by more, keeping what `numbered` made of
        these (a delivery adds lines to LIST and UIDL; it changes none).
        """
        longer = MessageList(self.uids + tuple(uids), self.sizes + tuple(sizes))
        first = len(self.sizes) + 1
        if self._numbered:
            numbered = {
                column: made + _numbered_lines(sizes if column == "sizes" else uids, first)
                for column, made in self._numbered.items()
            }
            object.__setattr__(longer, "_numbered", numbered)
        return longer


def _numbered_lines(values: Sequence[int | str], first: int) -> bytes:
    return numbered_lines(range(first, first + len(values)), values)


def numbered_lines(numbers: Sequence[int], values: Sequence[int | str]) -> bytes:
    """
    ``N value`` CRLF for each number and value (LIST and UIDL bodies):
    pure ASCII, so no line needs byte-stuffing.
    """
    # One %-format of the whole listing, its arguments laid out by slice
    # assignment: all in C.  On 100,000 lines, half the time of joining
    # f-strings (sizes 38 -> 19 ms, UIDLs 33 -> 27 ms): the first LIST of a
    # big maildrop in each worker of --workers pays it.
    arguments: list[object] = [None] * (2 * len(numbers))
    arguments[0::2] = numbers
    arguments[1::2] = values
    return (("%d %s\r\n" * len(numbers)) % tuple(arguments)).encode("ascii")


class IMessageBody(Interface):
    """
    The stored bytes of one message, opened for reading.

    Once opened, the bytes stay readable even if another program removes the
    message, so a response that has started is never cut short.
    """

    def read(size: int) -> bytes | Deferred[bytes]:
        """
        Up to ``size`` more stored bytes, or ``b""`` at the end: at once
        (bytes), or later (a Deferred that fires with them).  Line endings
        are as stored (LF or CRLF): the protocol converts them.

        A store answers at once only when that takes no longer than a local
        file read (the reactor thread waits for it); a store behind a
        network service answers with a Deferred.  The caller asks for the
        next bytes only after the previous answer came.  An I/O error is
        `pop3d.errors.MaildropUnavailable`, raised or as the Deferred's
        failure.
        """

    def close() -> None:
        """
        Release the underlying resources.  Safe to call more than once, and
        while a read is outstanding (its answer is then ignored).
        """


class IRemovalCheck(Interface):
    """
    An optional part of `IMessageBody`: a body that can tell whether its
    message is still stored as it was when it was opened.
    `pop3d.readahead` asks it before a message read ahead is sent, so that
    a message another program removed or moved meanwhile is answered as if
    it had not been read ahead (gone, or found where it went).
    """

    def removed() -> bool:
        """
        True if the message is no longer stored where and as it was opened
        (or that cannot be told); False if it still is.  Asked after the
        body was read whole and closed.  Never blocks longer than a local
        file's ``lstat``.
        """


class IMaildrop(Interface):
    """
    A maildrop opened and locked for one session (RFC 1939 section 4).

    The snapshot in ``messages`` is taken when the maildrop is opened and
    never changes during the session: mail delivered meanwhile appears in the
    next session.  Index ``i`` of every method is a position in ``messages``.
    """

    messages: MessageList = Attribute(
        "The messages present when the maildrop was opened, in order: a `MessageList`"
        " (another sequence of `MessageInfo` is converted once per session)."
    )

    def open_message(index: int) -> IMessageBody | Deferred[IMessageBody]:
        """
        Open one message of the snapshot for reading: its body at once where
        it opens at once (a local file: no Deferred per RETR), else a
        Deferred that fires with it.

        Fails (raises, or the Deferred fails) with
        `pop3d.errors.MessageGone` if another program removed it, or
        `pop3d.errors.MaildropUnavailable` if it cannot be read.
        (``maybeDeferred(maildrop.open_message, index)`` always gives a Deferred.)
        """

    def remove(indexes: Sequence[int]) -> Deferred[None]:
        """
        Remove the given messages (the UPDATE state, RFC 1939 section 6).

        Every removal is attempted; a message that is already gone counts as
        removed.  If any removal fails, the Deferred fails with
        `pop3d.errors.DeletionFailed` after the others were done, and no
        message outside ``indexes`` is touched.
        """

    def close() -> Deferred[None]:
        """
        Release the lock.  Called exactly once per opened maildrop, on every
        way a session ends (QUIT, disconnect, timeout, error); never fails.
        """


class IMaildropStore(Interface):
    """Where maildrops live: a Maildir tree, an in-memory dictionary, ..."""

    def open(mailbox: str) -> Deferred[IMaildrop]:
        """
        Open and exclusively lock the maildrop of ``mailbox``.

        ``mailbox`` has already been checked to be a safe name (see
        `pop3d.realm.is_safe_mailbox_name`).  A mailbox that has no maildrop
        yet is an empty maildrop.  Fails with `pop3d.errors.MaildropLocked`
        if another session holds it (in any process), or
        `pop3d.errors.MaildropUnavailable` if it cannot be read.
        """


class IClosesAtOnce(Interface):
    """
    An optional part of `IMaildrop` whose `IMaildrop.close` has nothing to
    wait for: `pop3d.realm.release` closes it this way, without the
    Deferred (and its callback) a session would otherwise make at its end.
    """

    def close_at_once() -> None:
        """
        `IMaildrop.close`, done when it returns: the lock released and
        whatever the maildrop held let go.  A second call does nothing.
        What it raises is logged by the caller (`pop3d.realm.release`),
        as a failed ``close`` would be.
        """


class IOpensAtOnce(Interface):
    """
    An optional part of `IMaildropStore`: a store that usually opens a
    maildrop at once (a local Maildir whose listing it kept) gives it
    without a Deferred, whose every callback costs a login about 8,000
    instructions.  `pop3d.realm.MaildropRealm` asks for it this way.
    """

    def open_at_once(mailbox: str) -> IMaildrop | Deferred[IMaildrop]:
        """
        `IMaildropStore.open`: the maildrop itself where it is opened at
        once (without blocking the reactor thread on slow work), else a
        Deferred that fires with it.  It fails as ``open`` does, with the
        same errors, raised or in the Deferred; when it fails, nothing is
        left held (no lock, no descriptor).
        """


class ISeenFlags(Interface):
    """
    An optional part of `IMaildrop`: a store that records what a client has
    read, for mail readers that share the maildrop (IMAP, webmail).
    """

    def mark_seen(retrieved: Sequence[int], kept: Sequence[int]) -> Deferred[None] | None:
        """
        Called once during UPDATE, after `IMaildrop.remove`: ``retrieved``
        are the messages sent with RETR, ``kept`` those not deleted.  Never
        changes a message's UIDL or its content; a failure is logged, not
        reported to the client (the client's work is done).  None when
        there was nothing to do (most sessions of a busy server), else a
        Deferred that fires once it is done.
        """


class IMaildropLocks(Interface):
    """How a directory store keeps a maildrop to one session at a time."""

    def acquire(directory: str, dir_fd: int, info: os.stat_result) -> Callable[[], None]:
        """
        Lock the maildrop in ``directory`` (open as ``dir_fd``, whose
        ``os.fstat`` is ``info``: the store took it already) without
        waiting; return what releases the lock (harmless to call twice).
        Raises `pop3d.errors.MaildropLocked` if it is held by another
        session, in any process, or `pop3d.errors.MaildropUnavailable`.
        """


class IRetrievalTimes(Interface):
    """
    An optional part of `IMaildrop`: a store that keeps, across sessions,
    when each message was first retrieved with RETR, so that RFC 2449
    section 6.7 ``EXPIRE n`` (n days) can be kept (see `pop3d.expire`).
    """

    def record_retrievals(retrieved: Sequence[int], now: float) -> Deferred[Mapping[int, float]]:
        """
        Called once during UPDATE, before `IMaildrop.remove`, while the
        maildrop is locked: record ``now`` as the first retrieval of each
        message in ``retrieved`` that has none yet (an earlier one is kept),
        forget the messages no longer in the maildrop, and return the first
        retrieval time of every message of the snapshot that has one, by
        index.  Never changes a message.  If the times cannot be read the
        Deferred fails (the session then expires nothing); a time that
        cannot be written is lost, which only keeps a message longer.
        """


class IRetrievalTimesStore(Interface):
    """
    An optional part of `IMaildropStore`: every maildrop it opens provides
    `IRetrievalTimes`.  Only such a store can offer ``EXPIRE n`` for n of
    1 or more (``twistd pop3d --expire`` checks at start-up).
    """


class ICountingStore(Interface):
    """
    An optional part of `IMaildropStore`: a store whose first open of a
    maildrop reads every message to count its size, and shares that
    reading with helper processes when it is made with the server's
    `pop3d.stores.counting.CountingProcesses` (its plug-in's ``make``
    finds them as ``options["counting"]``).  ``twistd pop3d`` starts such
    helpers (``--counting-processes``) only for a store that provides this,
    or where a user database may give users locations of their own.
    """


class MailLocationError(ValueError):
    """
    A ``--mail-location`` argument, or a store option given with it, that a
    mail location plug-in cannot use.  The message names what is at fault
    (``--mail-location: ...``, ``--mbox-format ...``): ``twistd pop3d``
    shows it as the usage error.
    """


class IMailLocationPlugin(Interface):
    """
    A kind of mail location, ``twistd pop3d --mail-location SCHEME:ARGUMENT``:
    the ``twisted.plugin`` plug-in that makes a store from the ARGUMENT.

    ``twistd pop3d`` finds the plug-ins with
    ``twisted.plugin.getPlugins(IMailLocationPlugin)`` (a plug-in object
    also provides `twisted.plugin.IPlugin` and lives in a module of a
    ``twisted/plugins/`` directory on the path; ``maildir:`` and ``mbox:``
    are such plug-ins, declared in pop3d's own dropin), picks the one whose
    ``scheme`` is the text before the first colon, calls `check` while it
    parses the command line and `make` once when it starts serving.

    Both get ``options``, the parsed ``twistd pop3d`` options (a mapping of
    option name, without the dashes, to value).  A plug-in reads the store
    options it uses (``uidl-format``, ``lock-table``, ``mbox-format``...)
    and refuses, in `check`, those that cannot apply to it; it ignores the
    rest.  When it makes a store, ``counting`` is the server's
    `pop3d.stores.counting.CountingProcesses` (None if it has none), for a
    store that reads many files at a first login, as the Maildir store does:
    ``twistd pop3d`` starts helpers for a default location only if its
    ``store_interfaces`` has `ICountingStore` (or users may have locations
    of their own, from a user database).
    """

    scheme: str = Attribute("The name before the colon, e.g. ``maildir``: lower case, no colon.")

    help: str = Attribute("One line that says what is stored where (--help-mail-location).")

    argument_help: str = Attribute(
        "The ARGUMENT's form, e.g. ``PATH with {user}, {local} or {domain}``."
    )

    store_interfaces: tuple[type[Interface], ...] = Attribute(
        "The optional store interfaces every store it makes provides, e.g."
        " `IRetrievalTimesStore` (which ``--expire DAYS`` needs)."
    )

    def check(argument: str, options: Mapping[str, object]) -> None:
        """
        Refuse an ARGUMENT, or a store option, that cannot be used: raise
        `MailLocationError`.  Quick: at most a look at the file system, no
        store is made, nothing is created.
        """

    def make(
        argument: str,
        options: Mapping[str, object],
        threads: IReactorThreads,
        clock: IReactorTime,
    ) -> IMaildropStore:
        """
        The store (after `check` accepted ``argument`` and ``options``).
        Its blocking work runs in ``threads``' thread pool, its timers on
        ``clock``; making it does no blocking I/O (storage is first touched
        by `IMaildropStore.open`).
        """
