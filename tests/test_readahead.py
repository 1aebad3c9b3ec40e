"""
Read-ahead (`pop3d.readahead`): once a message went whole to a client that
waits for each answer, the next message of the snapshot is read while the
client takes in the last, and its RETR (RFC 1939 section 7) or TOP is
answered from what was read, with exactly the bytes the file would give.
Nothing about the session changes: a message read ahead is not retrieved
(RFC 2449 section 6.7: EXPIRE counts RETR), one that another program
deleted meanwhile is answered as if it had not been read ahead, and what is
held is bounded for the whole server.
"""

from __future__ import annotations

import os
import poplib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.readahead import BUSY_WINDOW, LARGEST, ReadAhead
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.memory import MemoryBody, MemoryStore
from pop3d.testing import deliver_to_maildir
from pop3d.wire import wire_size

from .clock_threads import ClockThreads, settle
from .conftest import USERS, Wire, start_service

ONE = b"Subject: one\n\nfirst\n"
TWO = b"Subject: two\n\n.dot line\nsecond\n"
THREE = b"Subject: three\n\nthird\n"

RETR_ONE = b"+OK 23 octets\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
RETR_TWO = b"+OK 35 octets\r\nSubject: two\r\n\r\n..dot line\r\nsecond\r\n.\r\n"
RETR_THREE = b"+OK 25 octets\r\nSubject: three\r\n\r\nthird\r\n.\r\n"
GONE = b"-ERR message was removed by another program\r\n"


@implementer(IMaildrop)
class OpeningMaildrop:
    """
    A maildrop that notes the index of every message opened, answered as its
    store answers; its listing a plain list of `MessageInfo`, as the
    interface allows a store's to be.
    """

    def __init__(self, maildrop: IMaildrop, opened: list[int]) -> None:
        self._maildrop = maildrop
        self._opened = opened
        self.messages = list(maildrop.messages)

    def open_message(self, index: int) -> IMessageBody | Deferred[IMessageBody]:
        self._opened.append(index)
        return self._maildrop.open_message(index)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        return self._maildrop.remove(indexes)

    def close(self) -> Deferred[None]:
        return self._maildrop.close()


@implementer(IMaildropStore)
class OpeningStore:
    """A store whose maildrops note, in ``opened``, every message opened."""

    def __init__(self, store: IMaildropStore) -> None:
        self._store = store
        self.opened: list[int] = []

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return self._store.open(mailbox).addCallback(OpeningMaildrop, self.opened)


@pytest.fixture
def maildir_store(tmp_path: Path, clock: Clock) -> MaildirStore:
    return MaildirStore(f"{tmp_path}/{{user}}", reactor=ClockThreads(clock).as_reactor)


@pytest.fixture
def names(tmp_path: Path) -> list[str]:
    """alice's three messages, in new/, as an MTA delivers them: their unique names."""
    return [deliver_to_maildir(str(tmp_path / "alice"), m) for m in (ONE, TWO, THREE)]


def logged_in(factory: POP3Factory, clock: Clock, user: bytes = b"alice") -> Wire:
    wire = Wire(factory)
    wire.command(b"USER " + user)
    answer = wire.command(b"PASS " + USERS[user.decode()].encode())
    settle(clock)  # a Maildir's listing is read in the "thread pool"
    assert (answer + wire.take()).startswith(b"+OK maildrop has")
    return wire


def quit_and_list(wire: Wire, clock: Clock, maildir: Path) -> list[str]:
    """QUIT, and UPDATE's renames run (in the "thread pool"): what cur/ holds then."""
    wire.command(b"QUIT")
    settle(clock)
    assert wire.take() == b"+OK bye\r\n"
    return sorted(os.listdir(maildir / "cur"))


def test_the_next_message_is_read_while_the_client_takes_in_the_last(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    store = OpeningStore(maildir_store)
    factory = make_factory(store=store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    # Message 2 was opened and read right after message 1 went out.
    assert store.opened == [0, 1]
    assert factory.read_ahead is not None
    assert factory.read_ahead.octets == len(TWO)
    # Its RETR opens nothing: the bytes sent are those read ahead, stuffed.
    assert wire.command(b"RETR 2") == RETR_TWO
    assert store.opened == [0, 1, 2]
    assert wire.command(b"RETR 3") == RETR_THREE
    # The last message: there is nothing after it to read.
    assert store.opened == [0, 1, 2]
    assert factory.read_ahead.octets == 0


def test_a_message_another_program_deleted_after_it_was_read_ahead_is_not_sent(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """As without read-ahead: -ERR, and the session goes on."""
    factory = make_factory(store=maildir_store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    (tmp_path / "alice" / "new" / names[1]).unlink()
    assert wire.command(b"RETR 2") == GONE
    assert wire.command(b"RETR 3") == RETR_THREE
    assert wire.command(b"NOOP") == b"+OK\r\n"


def test_a_message_another_program_flagged_after_it_was_read_ahead_is_found_where_it_went(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """
    An IMAP server sets a flag (new/NAME to cur/NAME:2,F): the same message,
    sent whole; at QUIT it is marked seen where it is now, its bytes intact.
    """
    maildir = tmp_path / "alice"
    factory = make_factory(store=maildir_store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    os.rename(maildir / "new" / names[1], maildir / "cur" / f"{names[1]}:2,F")
    assert wire.command(b"RETR 2") == RETR_TWO
    assert quit_and_list(wire, clock, maildir) == [
        f"{names[0]}:2,S",
        f"{names[1]}:2,FS",
        f"{names[2]}:2,",
    ]
    assert (maildir / "cur" / f"{names[1]}:2,FS").read_bytes() == TWO
    assert os.listdir(maildir / "new") == []


def test_quit_lets_go_of_what_was_read_ahead_before_update(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    """RFC 1939 section 6: UPDATE removes files; none of them is held open by a read-ahead."""
    factory = make_factory(store=maildir_store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"DELE 2") == b"+OK message 2 deleted\r\n"
    assert factory.read_ahead is not None
    assert factory.read_ahead.sessions == 1
    wire.command(b"QUIT")
    assert factory.read_ahead.sessions == 0
    settle(clock)
    assert wire.take() == b"+OK bye\r\n"


def test_a_message_read_ahead_is_not_retrieved(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """
    Only RETR retrieves: at QUIT the message read ahead is not flagged seen
    (new/ to cur/ only, as every message the session saw), its bytes intact.
    """
    maildir = tmp_path / "alice"
    factory = make_factory(store=maildir_store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert quit_and_list(wire, clock, maildir) == [
        f"{names[0]}:2,S",
        f"{names[1]}:2,",
        f"{names[2]}:2,",
    ]
    assert (maildir / "cur" / f"{names[1]}:2,").read_bytes() == TWO


def test_deletion_marks_are_kept_for_a_message_read_ahead(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    """RFC 1939 section 5: a message marked deleted is not there for RETR, until RSET."""
    store = OpeningStore(maildir_store)
    wire = logged_in(make_factory(store=store), clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"DELE 2") == b"+OK message 2 deleted\r\n"
    assert wire.command(b"RETR 2") == b"-ERR no such message\r\n"
    assert wire.command(b"RSET") == b"+OK maildrop has 3 messages (83 octets)\r\n"
    assert wire.command(b"RETR 2") == RETR_TWO
    assert store.opened == [0, 1, 2]


def test_top_of_a_message_read_ahead(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    """RFC 1939 section 7, TOP: the header, the blank line, n body lines, stuffed."""
    store = OpeningStore(maildir_store)
    wire = logged_in(make_factory(store=store), clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"TOP 2 1") == (
        b"+OK top of message follows\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n"
    )
    # TOP took what was read ahead, and reads nothing ahead itself.
    assert store.opened == [0, 1]
    assert wire.command(b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 2]


def test_pipelined_commands_are_not_read_ahead(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    """A client that pipelines (RFC 2449 section 6.6) has its next commands in already."""
    store = OpeningStore(maildir_store)
    factory = make_factory(store=store)
    wire = logged_in(factory, clock)
    assert wire.send(b"RETR 1\r\nRETR 2\r\n") == RETR_ONE + RETR_TWO
    assert store.opened == [0, 1]
    assert factory.read_ahead is not None
    assert factory.read_ahead.octets == 0


def test_nothing_is_read_ahead_while_another_client_keeps_the_server_busy(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """
    A command from another session within the last millisecond: the server
    has no idle time to read in (and RETR 2 opens its file); a millisecond
    later it has.
    """
    deliver_to_maildir(str(tmp_path / "bob"), ONE)
    store = OpeningStore(maildir_store)
    factory = make_factory(store=store)
    alice = logged_in(factory, clock)
    bob = logged_in(factory, clock, b"bob")
    clock.advance(0.0005)
    assert bob.command(b"NOOP") == b"+OK\r\n"
    clock.advance(0.0009)
    assert alice.command(b"RETR 1") == RETR_ONE
    assert store.opened == [0]
    clock.advance(0.0011)
    assert alice.command(b"RETR 2") == RETR_TWO
    assert store.opened == [0, 1, 2]
    assert alice.command(b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 2]


def test_nothing_is_read_ahead_when_it_is_turned_off(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    names: list[str],
) -> None:
    store = OpeningStore(maildir_store)
    factory = make_factory(store=store, read_ahead_limit=0)
    assert factory.read_ahead is None
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"RETR 2") == RETR_TWO
    assert store.opened == [0, 1]


def test_a_message_larger_than_one_read_is_not_read_ahead(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
) -> None:
    big = b"Subject: big\n\n" + (b"x" * 99 + b"\n") * (LARGEST // 100 + 1)
    deliver_to_maildir(str(tmp_path / "alice"), ONE)
    deliver_to_maildir(str(tmp_path / "alice"), big)
    store = OpeningStore(maildir_store)
    wire = logged_in(make_factory(store=store), clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert store.opened == [0]


def test_the_messages_read_longest_ago_make_room(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """Room for one message in all: each read-ahead drops the other session's."""
    deliver_to_maildir(str(tmp_path / "bob"), ONE)
    deliver_to_maildir(str(tmp_path / "bob"), TWO)
    store = OpeningStore(maildir_store)
    factory = make_factory(store=store, read_ahead_limit=wire_size(TWO))
    alice = logged_in(factory, clock)
    bob = logged_in(factory, clock, b"bob")

    def alone(wire: Wire, line: bytes) -> bytes:
        """The command, after the other client's is over a millisecond old (not busy)."""
        clock.advance(2 * BUSY_WINDOW)
        return wire.command(line)

    assert alone(alice, b"RETR 1") == RETR_ONE
    assert alone(bob, b"RETR 1") == RETR_ONE
    assert store.opened == [0, 1, 0, 1]
    assert alone(alice, b"RETR 2") == RETR_TWO
    # Alice's message 3 read ahead made room by dropping bob's message 2.
    assert store.opened == [0, 1, 0, 1, 1, 2]
    assert alone(bob, b"RETR 2") == RETR_TWO
    assert store.opened == [0, 1, 0, 1, 1, 2, 1]
    assert alone(alice, b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 0, 1, 1, 2, 1]


def test_a_store_that_answers_through_a_fired_deferred_is_read_ahead(
    make_factory: Callable[..., POP3Factory], clock: Clock
) -> None:
    """``MemoryStore`` opens with ``succeed``: at once, as far as read-ahead goes."""
    memory = MemoryStore()
    for message in (ONE, TWO, THREE):
        memory.deliver("alice", message)
    store = OpeningStore(memory)
    wire = logged_in(make_factory(store=store), clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"RETR 2") == RETR_TWO
    assert wire.command(b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 2]


def test_a_store_that_reads_later_is_not_read_ahead_again(
    make_factory: Callable[..., POP3Factory], clock: Clock
) -> None:
    """
    A store behind a network service (its reads answer later): one message
    read ahead is tried, and given up, in a session; never again.
    """
    memory = MemoryStore(clock=clock, latency=1.0)
    for message in (ONE, TWO, THREE):
        memory.deliver("alice", message)
    store = OpeningStore(memory)
    wire = logged_in(make_factory(store=store), clock)

    def command(line: bytes) -> bytes:
        wire.command(line)
        clock.pump([1.0] * 4)
        return wire.take()

    assert command(b"RETR 1") == RETR_ONE
    assert command(b"RETR 2") == RETR_TWO
    assert command(b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 1, 2]


def _open_files(tmp_path: Path) -> list[str]:
    """The files under ``tmp_path`` this process holds open."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # the listing's own descriptor, closed since
    return [t for t in targets if t.startswith(str(tmp_path)) and ("/new/" in t or "/cur/" in t)]


def test_no_file_is_held_open_and_a_session_that_ends_lets_go(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    factory = make_factory(store=maildir_store)
    wire = logged_in(factory, clock)
    assert wire.command(b"RETR 1") == RETR_ONE
    assert factory.read_ahead is not None
    assert (factory.read_ahead.octets, factory.read_ahead.sessions) == (len(TWO), 1)
    # Message 2 is in memory; its file was closed once read.
    assert _open_files(tmp_path) == []
    wire.disconnect()
    settle(clock)
    assert (factory.read_ahead.octets, factory.read_ahead.sessions) == (0, 0)


def _delete(maildir: Path, name: str) -> None:
    (maildir / "new" / name).unlink()


def _flag(maildir: Path, name: str) -> None:
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,F")


def _append(maildir: Path, name: str) -> None:
    with open(maildir / "new" / name, "ab") as file:
        file.write(b"appended\n")


def _replace_maildir_keeping_the_files(maildir: Path, name: str) -> None:
    """Another Maildir put at the path, of the same files (hard links, as ``cp -al`` makes)."""
    moved = maildir.with_name("moved")
    maildir.rename(moved)
    for part in ("tmp", "new", "cur"):
        (maildir / part).mkdir(parents=True)
        for entry in (moved / part).iterdir():
            os.link(entry, maildir / part / entry.name)


@pytest.mark.parametrize(
    "change",
    [_delete, _flag, _append, _replace_maildir_keeping_the_files],
    ids=lambda c: c.__name__,
)
def test_a_change_by_another_program_is_answered_as_without_read_ahead(
    make_factory: Callable[..., POP3Factory],
    clock: Clock,
    tmp_path: Path,
    change: Callable[[Path, str], None],
) -> None:
    """
    The same session twice, read-ahead on and off, with another program
    changing message 2 between RETR 1 and RETR 2: every reply, and every
    file after QUIT, is the same.
    """
    outcomes = []
    for read_ahead_limit in (16 * 1024 * 1024, 0):
        root = tmp_path / str(read_ahead_limit)
        store = MaildirStore(f"{root}/{{user}}", reactor=ClockThreads(clock).as_reactor)
        names = [deliver_to_maildir(str(root / "alice"), m) for m in (ONE, TWO, THREE)]
        wire = logged_in(make_factory(store=store, read_ahead_limit=read_ahead_limit), clock)
        replies = [wire.command(b"RETR 1")]
        change(root / "alice", names[1])
        replies += [wire.command(b"RETR 2"), wire.command(b"RETR 3"), wire.command(b"QUIT")]
        settle(clock)
        replies.append(wire.take())
        # Each file as (Maildir, subdirectory, which message, flags, bytes).
        files = sorted(
            (
                path.parent.parent.name,
                path.parent.name,
                names.index(path.name.partition(":")[0]),
                path.name.partition(":")[2],
                path.read_bytes(),
            )
            for path in root.rglob("*")
            if path.is_file() and path.parent.name in ("new", "cur")
        )
        outcomes.append((replies, files))
    with_read_ahead, without = outcomes
    assert with_read_ahead == without


def test_a_message_gone_before_it_was_read_ahead_leaves_read_ahead_on(
    make_factory: Callable[..., POP3Factory],
    maildir_store: MaildirStore,
    clock: Clock,
    tmp_path: Path,
    names: list[str],
) -> None:
    """The Maildir answers a message gone with a failed Deferred: not a store that answers later."""
    deliver_to_maildir(str(tmp_path / "alice"), ONE)
    store = OpeningStore(maildir_store)
    wire = logged_in(make_factory(store=store), clock)
    (tmp_path / "alice" / "new" / names[1]).unlink()
    assert wire.command(b"RETR 1") == RETR_ONE
    assert wire.command(b"RETR 2") == GONE
    assert wire.command(b"RETR 3") == RETR_THREE
    assert store.opened == [0, 1, 1, 2, 3]
    assert wire.command(b"RETR 4") == RETR_ONE
    assert store.opened == [0, 1, 1, 2, 3]


@implementer(IMaildrop)
class AtOnce:
    """A maildrop of messages in memory, each opened at once."""

    def __init__(self, *stored: bytes) -> None:
        self._stored = stored
        self.messages = MessageList.of(
            MessageInfo(str(n), wire_size(m)) for n, m in enumerate(stored)
        )

    def open_message(self, index: int) -> IMessageBody:
        return MemoryBody(self._stored[index])

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        raise NotImplementedError

    def close(self) -> Deferred[None]:
        raise NotImplementedError


def test_at_most_so_many_sessions_hold_a_message() -> None:
    read_ahead = ReadAhead(sessions=2)
    first, second, third = object(), object(), object()
    maildrop = AtOnce(ONE, TWO, THREE)
    for holder in (first, second, third):  # (each its own session)
        read_ahead.read(holder, maildrop, 1, wire_size(TWO))
    assert (read_ahead.sessions, read_ahead.octets) == (2, 2 * len(TWO))
    # The first read longest ago made room for the third.
    assert read_ahead.take(first, 1) is None
    body = read_ahead.take(third, 1)
    assert body is not None and body.read(LARGEST) == TWO
    # Asked for another message than the one held: nothing, and nothing held.
    assert read_ahead.take(second, 2) is None
    assert (read_ahead.sessions, read_ahead.octets) == (0, 0)


def test_one_message_per_session() -> None:
    read_ahead = ReadAhead()
    holder = object()
    maildrop = AtOnce(ONE, TWO, THREE)
    read_ahead.read(holder, maildrop, 1, wire_size(TWO))
    read_ahead.read(holder, maildrop, 2, wire_size(THREE))
    assert (read_ahead.sessions, read_ahead.octets) == (1, len(THREE))
    assert read_ahead.take(holder, 1) is None


@pytest_twisted.ensureDeferred
async def test_poplib_retrieves_every_message_in_order(tmp_path: Path) -> None:
    """
    The real server, read ahead on (the default), and Python's poplib
    retrieving one message after another, one deleted by another program
    in between: every other message arrives byte for byte.
    """
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"])
    try:
        maildir = server.maildir("alice")
        stored = [b"Subject: %d\n\n%s\n" % (n, b".line\n" * n) for n in range(1, 7)]
        names = [deliver_to_maildir(str(maildir), message) for message in stored]

        def retrieve() -> list[object]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            try:
                client.user("alice")
                client.pass_("wonderland")
                got: list[object] = []
                for number in range(1, 7):
                    if number == 4:
                        (maildir / "new" / names[3]).unlink()
                    try:
                        got.append(b"\n".join(client.retr(number)[1]) + b"\n")
                    except poplib.error_proto as error:
                        got.append(error.args[0])
                client.quit()
                return got
            finally:
                client.close()

        got = await threads.deferToThread(retrieve)
    finally:
        await server.service.stopService()
    expected: list[object] = list(stored)
    expected[3] = b"-ERR message was removed by another program"
    assert got == expected
