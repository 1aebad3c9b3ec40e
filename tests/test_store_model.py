"""
The Maildir store alone, checked step by step against a model.

Hypothesis opens, reads, updates and closes a maildrop of `MaildirStore`
(its file work in a "thread pool" on a Clock) while mail arrives and another
program (an IMAP server, a mail client) moves, flags and deletes files
behind its back.  The model says what each listing holds, what each message
reads as, and which files exist afterwards:

- a listing is the messages of new/ and cur/ in unique-name order, each
  with its wire size and its unique name as UIDL, however it was moved or
  flagged (RFC 1939 sections 5 and 7: a UIDL never changes);
- a message reads as the bytes delivered, wherever it was moved since the
  listing; one deleted since is `MessageGone`;
- `remove` deletes exactly the messages asked for, wherever they are now;
  `mark_seen` moves and flags only as the README's "Migrating from Dovecot"
  says, and never a file another program has renamed since the session
  last saw it;
- a maildrop is locked while open; no stored byte is ever altered;
- the listing a store keeps and brings up to date (its own removals and
  renames at UPDATE, what another program did since) is never stale: not
  when the other program's change falls within the same tick of the file
  system's clock as the store's own (so the directories' times do not show
  it), nor when two stores (two ``--workers`` processes) serve the Maildir
  in turn, one bringing its listing up to date from what the other's QUIT
  noted it changed (`pop3d.stores.maildir.CHANGE_NOTES`);
- a message that has not moved since the session last saw it (when it
  opened the maildrop, or read the message) opens with no directory read:
  the listing says where each message is;
- all of this whether a full read takes its directories whole or a few
  entries at a time (``step``: slices of 4 or 8 entries, each counted on
  its own), and whether the sizes are counted by the thread alone or each
  count of two messages or more is shared through a file with a helper
  process (`CountingProcesses`, one batch per message; with counts this
  small the thread takes nearly every batch back before the helper starts
  it: tests/test_counting.py has the helper count).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import pytest_twisted
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pop3d.errors import MaildropLocked, MessageGone
from pop3d.stores.counting import CountingProcesses
from pop3d.stores.interfaces import IMaildrop, IMessageBody, ISeenFlags
from pop3d.stores.maildir import (
    LISTING_CACHE_MESSAGES,
    SETTLE_AT_QUIT_MESSAGES,
    SETTLE_WAIT_SECONDS,
    STEP,
    MaildirStore,
)
from pop3d.stores.posix import LockTable
from pop3d.testing import deliver_to_maildir

from .clock_threads import ClockThreads, TimedClockThreads, result_of, settle
from .test_session_model import (
    MESSAGES,
    PLACEMENTS,
    StoredMessage,
    let_time_pass,
    wire_octets,
)

# Hypothesis runs hundreds of store histories: seconds, not milliseconds.
pytestmark = pytest.mark.slow

MAILBOX = "carol"

#: One helper process for every history that shares its counts (`helpers`).
HELPERS: list[CountingProcesses] = []


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A counting helper for `TestStore`, its shared files in a directory of its own."""
    shared_memory = tmp_path_factory.mktemp("shm")
    counting = CountingProcesses(1, reactor, batch=1, shared_memory=str(shared_memory))  # type: ignore[arg-type]
    counting.startService()
    pytest_twisted.blockon(counting.when_started())
    HELPERS.append(counting)
    try:
        yield
    finally:
        HELPERS.clear()
        pytest_twisted.blockon(counting.stopService())


@contextmanager
def directory_reads() -> Iterator[mock.Mock]:
    """Counts the directories read meanwhile (calls of ``os.scandir``)."""
    with mock.patch.object(os, "scandir", wraps=os.scandir) as scandir:
        yield scandir


def read_all(body: IMessageBody) -> bytes:
    """A message body read in small pieces, then closed."""
    chunks = []
    while chunk := body.read(7):
        chunks.append(chunk)
    body.close()
    return b"".join(chunks)


@dataclass
class Opened:
    """An open maildrop and what the model knows of its session."""

    maildrop: IMaildrop
    snapshot: list[StoredMessage]
    #: Where the session last found each message: (subdirectory, file name).
    seen_at: list[tuple[str, str]]
    #: The Maildir existed when it was opened (so it is locked).
    locked: bool


class StoreMachine(RuleBasedStateMachine):
    """One mailbox, one session at a time, and another program beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="pop3d-store-model-")
        self.maildir = os.path.join(self.root, MAILBOX)
        self.clock = Clock()
        self.threads = TimedClockThreads(self.clock)
        self.store = MaildirStore(f"{self.root}/{{user}}")  # until make_store
        #: Another process's store (``--workers``), with a listing of its own.
        self.other_store: MaildirStore | None = None
        self.disk: list[StoredMessage] = []
        self.opened: Opened | None = None
        self.moments = 0

    @initialize(
        listing_cache=st.sampled_from([0, 2, LISTING_CACHE_MESSAGES]),
        settle_at_quit=st.sampled_from([1, SETTLE_AT_QUIT_MESSAGES]),
        step=st.sampled_from([1, 2, STEP]),
        shared=st.booleans(),
        deliveries=st.lists(st.tuples(MESSAGES, PLACEMENTS), max_size=5),
    )
    def make_store(
        self,
        listing_cache: int,
        settle_at_quit: int,
        step: int,
        shared: bool,
        deliveries: list[tuple[bytes, tuple[str, str]]],
    ) -> None:
        """
        With no listing cache, a tiny one, or the default; QUIT waits for its
        renames to settle (as for a large Maildir) or not; directories read
        a few entries at a time or whole; sizes counted with the helper or
        not; mail may be waiting.
        """
        counting = HELPERS[0] if shared else None
        self.store = MaildirStore(
            f"{self.root}/{{user}}",
            reactor=self.threads.as_reactor,
            listing_cache=listing_cache,
            settle_at_quit=settle_at_quit,
            step=step,
            counting=counting,
        )
        self.other_store = MaildirStore(
            f"{self.root}/{{user}}",
            reactor=self.threads.as_reactor,
            locks=self.store.locks,
            settle_at_quit=settle_at_quit,
            step=step,
            counting=counting,
        )
        for content, placement in deliveries:
            self.deliver(content, placement)

    def teardown(self) -> None:
        try:
            if self.opened is not None:
                self.opened.maildrop.close()
        finally:
            if isinstance(self.store.locks, LockTable):
                self.store.locks.close()
            shutil.rmtree(self.root)
        counting = self.store.counting
        if counting is not None:
            # Every count of this history removed its shared file.
            assert os.listdir(counting.shared_memory) == []

    def _on_disk(self, message: StoredMessage) -> bool:
        return any(message is there for there in self.disk)

    # -- the world outside ----------------------------------------------------

    @rule(content=MESSAGES, placement=PLACEMENTS)
    def deliver(self, content: bytes, placement: tuple[str, str]) -> None:
        subdirectory, info = placement
        unique = deliver_to_maildir(self.maildir, content, subdirectory=subdirectory, info=info)
        self.disk.append(StoredMessage(unique, content, subdirectory, info))

    @precondition(lambda self: self.disk)
    @rule(which=st.integers(0, 20), flags=st.sampled_from(["", "S", "F", "FS", "RST"]))
    def another_program_moves(self, which: int, flags: str) -> None:
        """An IMAP server moves a message to cur/ or changes its flags."""
        message = self.disk[which % len(self.disk)]
        source = os.path.join(self.maildir, message.subdirectory, message.file_name)
        message.subdirectory, message.info = "cur", ":2," + flags
        os.rename(source, os.path.join(self.maildir, "cur", message.file_name))

    @precondition(lambda self: self.disk)
    @rule(which=st.integers(0, 20))
    def another_program_deletes(self, which: int) -> None:
        message = self.disk.pop(which % len(self.disk))
        os.unlink(os.path.join(self.maildir, message.subdirectory, message.file_name))

    @precondition(lambda self: os.path.isdir(self.maildir))
    @rule(
        change=st.sampled_from(["deliver", "deliver to cur", "move", "delete"]),
        content=MESSAGES,
        which=st.integers(0, 20),
    )
    def another_program_within_the_same_tick(self, change: str, content: bytes, which: int) -> None:
        """
        Another program's change that leaves new/ and cur/ with the times they
        had, as a change within the same tick of a coarse clock does: only
        possible (and so only made) while that tick may still be running,
        here for a directory whose time is less than 50 ms old (the store
        waits for 100 ms).
        """
        root = Path(self.maildir)
        times = {part: (root / part).stat().st_mtime_ns for part in ("new", "cur")}
        if change.startswith("deliver"):
            self.deliver(content, ("cur", ":2,") if change == "deliver to cur" else ("new", ""))
        elif not self.disk:
            return
        elif change == "move":
            self.another_program_moves(which, "F")
        else:
            self.another_program_deletes(which)
        for part, mtime in times.items():
            if time.time_ns() - mtime < 50_000_000:
                os.utime(root / part, ns=(mtime, mtime))

    @precondition(lambda self: os.path.isdir(self.maildir))
    @rule()
    def time_passes(self) -> None:
        """
        The Maildir settles: the store may trust what it listed before.  A
        directory changed lately gets a time long ago (each time another);
        one that had settled keeps its time, as it would.
        """
        self.moments += 1
        root = Path(self.maildir)
        recent = time.time_ns() - 10 * 10**9
        if any((root / part).stat().st_mtime_ns > recent for part in ("new", "cur")):
            let_time_pass(root, self.moments)

    # -- a session --------------------------------------------------------------

    @precondition(lambda self: self.opened is None)
    @rule(in_another_process=st.booleans(), after_a_while=st.booleans())
    def open(self, in_another_process: bool, after_a_while: bool) -> None:
        """A session begins, in one store or the other, maybe once the Maildir settled."""
        existed = os.path.isdir(self.maildir)
        if after_a_while and existed:
            self.time_passes()
        store = self.other_store if in_another_process and self.other_store else self.store
        maildrop = result_of(self.clock, store.open(MAILBOX))
        assert IMaildrop.providedBy(maildrop), maildrop
        assert isinstance(maildrop, object)
        snapshot = sorted(self.disk, key=lambda message: message.unique)
        listed = IMaildrop(maildrop).messages
        assert list(listed.uids) == [message.unique for message in snapshot]
        assert list(listed.sizes) == [wire_octets(message.content) for message in snapshot]
        self.opened = Opened(
            IMaildrop(maildrop),
            snapshot,
            [(message.subdirectory, message.file_name) for message in snapshot],
            existed,
        )

    @precondition(lambda self: self.opened is not None and self.opened.locked)
    @rule()
    def open_again_is_refused(self) -> None:
        refused = result_of(self.clock, self.store.open(MAILBOX))
        assert isinstance(refused, Failure) and refused.check(MaildropLocked), refused

    @precondition(lambda self: self.opened is not None and self.opened.snapshot)
    @rule(which=st.integers(0, 20))
    def read(self, which: int) -> None:
        assert self.opened is not None
        index = which % len(self.opened.snapshot)
        message = self.opened.snapshot[index]
        with directory_reads() as scans:
            body = result_of(self.clock, maybeDeferred(self.opened.maildrop.open_message, index))
        here = (message.subdirectory, message.file_name)
        if self._on_disk(message) and here == self.opened.seen_at[index]:
            assert scans.call_count == 0, "a message where the listing says was looked for"
        if not self._on_disk(message):
            assert isinstance(body, Failure) and body.check(MessageGone), body
            return
        assert not isinstance(body, Failure), body
        assert read_all(IMessageBody(body)) == message.content
        # Found wherever it is now: the session knows the new place.
        self.opened.seen_at[index] = (message.subdirectory, message.file_name)

    @precondition(lambda self: self.opened is not None)
    @rule()
    def close(self) -> None:
        """A session that ends without UPDATE changes nothing."""
        assert self.opened is not None
        self.opened.maildrop.close()
        self.opened = None

    @precondition(lambda self: self.opened is not None)
    @rule(
        doomed=st.sets(st.integers(0, 9)),
        retrieved=st.sets(st.integers(0, 9)),
        time_passes_meanwhile=st.booleans(),
    )
    def update(self, doomed: set[int], retrieved: set[int], time_passes_meanwhile: bool) -> None:
        """
        RFC 1939 section 6 as the session does it: remove, mark seen, close.
        Time may pass while QUIT waits for its renames to settle (and so
        QUIT notes what it changed, for the other store).
        """
        opened = self.opened
        assert opened is not None
        count = len(opened.snapshot)
        doomed = {index for index in doomed if index < count}
        kept = [index for index in range(count) if index not in doomed]
        retrieved = {index for index in retrieved if index in kept}
        removal = result_of(self.clock, opened.maildrop.remove(sorted(doomed)))
        assert removal is None, removal
        for index in doomed:
            gone = opened.snapshot[index]
            self.disk = [message for message in self.disk if message is not gone]
        seen_flags = ISeenFlags(opened.maildrop)
        marked: list[object] = []
        # None: nothing was left to do.
        maybeDeferred(seen_flags.mark_seen, sorted(retrieved), kept).addBoth(marked.append)
        settle(self.clock)
        if time_passes_meanwhile and os.path.isdir(self.maildir):
            self.time_passes()
        self.clock.advance(SETTLE_WAIT_SECONDS)
        settle(self.clock)
        assert marked == [None], marked
        for index in kept:
            self._mark(opened, index, index in retrieved)
        opened.maildrop.close()
        self.opened = None

    @precondition(lambda self: self.opened is None and os.path.isdir(self.maildir))
    @rule(
        quitting_in_another_process=st.booleans(),
        # Half the time nothing between: the note is then all that changed.
        between=st.one_of(
            st.just(""), st.sampled_from(["deliver", "deliver to cur", "move", "delete"])
        ),
        content=MESSAGES,
        which=st.integers(0, 20),
        doomed=st.sets(st.integers(0, 9)),
        retrieved=st.sets(st.integers(0, 9)),
        time_passes_meanwhile=st.booleans(),
        afterwards=st.sampled_from(["", "deliver", "deliver to cur", "move", "delete"]),
        reads=st.booleans(),
    )
    def sessions_in_both_processes(
        self,
        quitting_in_another_process: bool,
        between: str,
        content: bytes,
        which: int,
        doomed: set[int],
        retrieved: set[int],
        time_passes_meanwhile: bool,
        afterwards: str,
        reads: bool,
    ) -> None:
        """
        ``--workers``: one process lists the settled Maildir and its session
        ends; another program may change the Maildir; then a session in the
        other process QUITs (its renames may settle while QUIT waits), and
        another program may change the Maildir right after, within the same
        tick.  Then a session begins in the first process (and may read
        every message): it may bring its listing up to date from what that
        QUIT noted, if that is all that changed since it listed it.
        """
        self.open(in_another_process=not quitting_in_another_process, after_a_while=True)
        self.close()
        if between.startswith("deliver"):
            self.deliver(content, ("cur", ":2,") if between == "deliver to cur" else ("new", ""))
        elif between == "move" and self.disk:
            self.another_program_moves(which, "F")
        elif between == "delete" and self.disk:
            self.another_program_deletes(which)
        self.open(in_another_process=quitting_in_another_process, after_a_while=True)
        self.update(doomed, retrieved, time_passes_meanwhile)
        if afterwards:
            self.another_program_within_the_same_tick(afterwards, content, which)
        self.open(in_another_process=not quitting_in_another_process, after_a_while=False)
        assert self.opened is not None
        for index in range(len(self.opened.snapshot)) if reads else ():
            self.read(index)

    def _mark(self, opened: Opened, index: int, retrieved: bool) -> None:
        """What mark_seen does to one kept message (see the module docstring)."""
        subdirectory, name = opened.seen_at[index]
        if subdirectory == "cur" and not retrieved:
            return
        unique, _, info = name.partition(":")
        flags = set(info[2:]) if info.startswith("2,") else set()
        if retrieved:
            flags.add("S")
        target = f"{unique}:2,{''.join(sorted(flags))}"
        message = opened.snapshot[index]
        if not self._on_disk(message) or (message.subdirectory, message.file_name) != (
            subdirectory,
            name,
        ):
            # Moved or deleted by another program since: left as it is.
            return
        message.subdirectory, message.info = "cur", target[len(unique) :]

    # -- what must always hold --------------------------------------------------

    @invariant()
    def files_are_as_the_model_says(self) -> None:
        expected = {
            (message.subdirectory, message.file_name): message.content for message in self.disk
        }
        root = Path(self.maildir)
        if not root.exists():
            assert expected == {}
            return
        found = {
            (path.parent.name, path.name): path.read_bytes()
            for subdirectory in ("new", "cur")
            for path in (root / subdirectory).iterdir()
        }
        assert found == expected


StoreMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStore = pytest.mark.usefixtures("helpers")(StoreMachine.TestCase)


def test_store_work_waits_for_the_clock(tmp_path: Path) -> None:
    """
    `ClockThreads` is what the model tests rely on: work the store hands to
    its thread pool is done, and its answer arrives, only when the Clock
    turns; and then it arrives whole.
    """
    clock = Clock()
    threads = ClockThreads(clock)
    store = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor)
    deliver_to_maildir(str(tmp_path / MAILBOX), b"Subject: waiting\n\nbody\n")
    results: list[object] = []
    store.open(MAILBOX).addBoth(results.append)
    assert results == []
    assert threads.handed_over == 1
    settle(clock)
    [maildrop] = results
    assert IMaildrop.providedBy(maildrop)
    assert list(IMaildrop(maildrop).messages.sizes) == [len(b"Subject: waiting\r\n\r\nbody\r\n")]
    IMaildrop(maildrop).close()
    assert isinstance(store.locks, LockTable)
    store.locks.close()
