"""
Counting message sizes (`pop3d.stores.counting`): the one loop that reads
messages, and the helper processes that share a large count with the
thread that asks.

RFC 1939 section 5: LIST gives each message's exact size; section 11: a
server that stores LF line endings counts each LF as two octets (what the
client receives is CRLF).  Every size below is counted by hand.
"""

from __future__ import annotations

import errno
import os
import poplib
import re
import resource
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Lock
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from pop3d.errors import MaildropUnavailable
from pop3d.stores.counting import (
    NOT_COUNTED,
    CountingProcesses,
    DirectoryToCount,
    replacement_wait,
    wire_sizes,
)
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.posix import LockOwner, this_process
from pop3d.wire import ResponseCode

from .conftest import Logged
from .test_process import HOST, PATIENCE, Launch, launch, pop3d_arguments, write_passwd

__all__ = ["launch"]  # the fixture, used here too

#: A message of each shape, and its size on the wire.
SHAPES = {
    "lf": (b"Subject: a\n\nbody\n", 20),
    "crlf": (b"Subject: a\r\n\r\nbody\r\n", 20),
    # No line end at the end: the server ends the last line (section 3).
    "unended": (b"Subject: a\n\nno newline at end", 33),
    "empty": (b"", 0),
    "mixed": (b"a\r\nb\nc\r\n", 9),
    # Longer than one read: 3,000 lines of 100 octets.
    "long": ((b"x" * 99 + b"\n") * 3000, 303_000),
    # The first read takes 64 KiB: exactly that (64 lines of 1,024 octets),
    # one octet more (unended), and a CRLF split by it (65,535 octets, then
    # CR LF, then "z" LF: the CRLF is not counted as a bare LF).
    "first read": ((b"x" * 1023 + b"\n") * 64, 65_600),
    "first read and one": ((b"x" * 1023 + b"\n") * 64 + b"y", 65_603),
    "crlf split": (b"x" * 65_535 + b"\r\nz\n", 65_540),
}


def _directory(path: Path, messages: dict[str, bytes]) -> int:
    path.mkdir()
    for name, data in messages.items():
        (path / name).write_bytes(data)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize("short_read_is_end", [False, True])
def test_every_shape_of_message_is_counted_as_sent(tmp_path: Path, short_read_is_end: bool) -> None:
    fd = _directory(tmp_path / "cur", {name: data for name, (data, _) in SHAPES.items()})
    try:
        counted = wire_sizes(fd, list(SHAPES), short_read_is_end=short_read_is_end)
    finally:
        os.close(fd)
    assert counted == ([20, 20, 33, 0, 9, 303_000, 65_600, 65_603, 65_540], {})


def test_a_file_gone_is_left_out_and_one_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    fd = _directory(tmp_path / "cur", {"lf": SHAPES["lf"][0], "after": b"x\n"})
    (tmp_path / "cur" / "link").symlink_to(tmp_path / "cur" / "lf")
    try:
        sizes, failures = wire_sizes(fd, ["lf", "gone", "link", "after"])
    finally:
        os.close(fd)
    # Gone since the directory was read (another client's DELE): left out.
    assert sizes == [20, NOT_COUNTED, NOT_COUNTED, 3]
    assert list(failures) == [2]
    # A symbolic link is never followed: someone else's mail stays theirs.
    assert failures[2].errno == errno.ELOOP


#: Holds a write lease on a file (as an NFS server's delegation or Samba's
#: oplock would) until killed; says "held" once it does.
HOLD_LEASE = """
import fcntl, os, signal, sys, time
signal.signal(signal.SIGIO, signal.SIG_IGN)
fd = os.open(sys.argv[1], os.O_WRONLY)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("held", flush=True)
signal.pause()
"""


@pytest.fixture
def leased(tmp_path: Path) -> Iterator[Path]:
    """A Maildir of two messages, the first under another program's write lease."""
    maildir = tmp_path / "mail" / "alice"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1000000000.M1P1.test").write_bytes(b"x\n")
    (maildir / "new" / "1000000001.M2P1.test").write_bytes(b"y\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, str(maildir / "new" / "1000000000.M1P1.test")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield maildir
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.process
def test_a_message_under_another_programs_lease_is_an_error_not_left_out(leased: Path) -> None:
    """Opening it without waiting fails (EAGAIN): counted as an error, not as a file gone."""
    fd = os.open(leased / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        sizes, failures = wire_sizes(fd, ["1000000000.M1P1.test", "1000000001.M2P1.test"])
    finally:
        os.close(fd)
    assert sizes == [NOT_COUNTED, 3]
    assert list(failures) == [0] and failures[0].errno == errno.EAGAIN


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_login_to_a_maildir_with_a_leased_message_is_refused_for_now(leased: Path) -> None:
    """RFC 3206 SYS/TEMP: a listing without the message would be a wrong one (STAT, UIDL)."""
    store = MaildirStore(f"{leased.parent}/{{user}}")
    with pytest.raises(MaildropUnavailable) as refused:
        await store.open("alice")
    assert refused.value.code is ResponseCode.SYS_TEMP


@dataclass(frozen=True)
class Many:
    """A directory of messages enough for the helpers to take part, and their sizes."""

    path: Path
    names: list[str]
    sizes: list[int]


#: About 100 ms of counting in one thread: the helpers surely take batches.
MANY = 20_000


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Many:
    path = tmp_path_factory.mktemp("many") / "cur"
    path.mkdir()
    names, sizes = [], []
    for number in range(MANY):
        data = b"Subject: %d\n\n" % number + b"line\n" * (number % 7)
        name = f"{1_000_000_000 + number}.M{number}P1.test:2,S"
        (path / name).write_bytes(data)
        names.append(name)
        sizes.append(len(data) + data.count(b"\n"))
    return Many(path, names, sizes)


@pytest.fixture
def directory_fd(many: Many) -> Iterator[int]:
    fd = os.open(many.path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def shared_memory(tmp_path: Path) -> Path:
    """Where the helpers' shared files go: this test's alone."""
    path = tmp_path / "shm"
    path.mkdir()
    return path


@pytest.fixture
def helpers(shared_memory: Path) -> Iterator[CountingProcesses]:
    counting = CountingProcesses(1, reactor, batch=256, shared_memory=str(shared_memory))  # type: ignore[arg-type]
    counting.startService()
    try:
        yield counting
    finally:
        pytest_twisted.blockon(counting.stopService())


COUNTED = re.compile(r"counted (\d+) message sizes in (.+), (\d+) in helper processes")


def _shared(logged: Logged) -> list[tuple[int, str, int]]:
    return [
        (int(match[1]), match[2], int(match[3]))
        for text in logged.texts("counted ")
        if (match := COUNTED.fullmatch(text)) is not None
    ]


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_helpers_count_part_of_a_large_batch(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged
) -> None:
    pids = await helpers.when_started()
    assert len(pids) == 1 and pids[0] != os.getpid()
    assert f"counting helper processes started: [{pids[0]}]" in logged.texts()
    counted = helpers.wire_sizes(str(many.path), directory_fd, many.names)
    assert counted == (many.sizes, {})
    [(count, path, in_helpers)] = _shared(logged)
    assert (count, path) == (MANY, str(many.path))
    # Part: the thread takes the last batches back before a helper can.
    assert 0 < in_helpers < MANY


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_what_a_helper_cannot_read_keeps_its_place(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged
) -> None:
    """A failure in a helper's batch comes back at its position in the whole count."""
    link = many.path / "zz-link"
    link.symlink_to(many.path / many.names[0])
    try:
        await helpers.when_started()
        names = [*many.names[:600], "zz-link", *many.names[600:], "zz-gone"]
        sizes, failures = helpers.wire_sizes(str(many.path), directory_fd, names)
    finally:
        link.unlink()
    assert sizes == [*many.sizes[:600], NOT_COUNTED, *many.sizes[600:], NOT_COUNTED]
    assert list(failures) == [600] and failures[600].errno == errno.ELOOP
    [(_, _, in_helpers)] = _shared(logged)
    assert in_helpers > 0


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_every_helper_has_started_when_they_say_so(logged: Logged) -> None:
    counting = CountingProcesses(2, reactor)  # type: ignore[arg-type]
    counting.startService()
    try:
        pids = await counting.when_started()
        assert len(pids) == 2 and os.getpid() not in pids
        assert f"counting helper processes started: {pids}" in logged.texts()
    finally:
        await counting.stopService()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_signals_to_the_servers_process_group_are_not_the_helpers(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged
) -> None:
    """Ctrl-C, a hang-up, systemd's SIGTERM to every process: the server decides, helpers stay."""
    [pid] = await helpers.when_started()
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        os.kill(pid, number)
    assert helpers.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    assert logged.texts("ended unexpectedly") == []
    [(_, _, in_helpers)] = _shared(logged)
    assert in_helpers > 0


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_directory_replaced_meanwhile_is_counted_by_the_thread(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged, tmp_path: Path
) -> None:
    """A helper counts only the directory the thread holds open, never another at its path."""
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    for name in many.names:
        (impostor / name).write_bytes(b"")
    await helpers.when_started()
    assert helpers.wire_sizes(str(impostor), directory_fd, many.names) == (many.sizes, {})
    assert _shared(logged) == [(MANY, str(impostor), 0)]


def _shared_files(shared_memory: Path) -> list[Path]:
    return sorted(shared_memory.glob("pop3d-count-*"))


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_count_of_two_directories_gives_each_its_sizes_and_errors(
    many: Many,
    directory_fd: int,
    helpers: CountingProcesses,
    logged: Logged,
    tmp_path: Path,
    shared_memory: Path,
) -> None:
    """
    One count over new/ and cur/ (as a first login makes): each directory's
    sizes in the order of its names (any name the file system allows), a
    failure at its position in its own directory; the shared file is the
    server user's alone, in a directory of its own, and gone after.
    """
    undecodable = os.fsdecode(b"1000000000.M1P1.caf\xe9")
    other = {"lf": SHAPES["lf"][0], undecodable: b"x\n"}
    other_fd = _directory(tmp_path / "other", other)
    (tmp_path / "other" / "link").symlink_to(tmp_path / "other" / "lf")
    await helpers.when_started()
    try:
        with helpers.begin(
            [
                DirectoryToCount(str(many.path), directory_fd, many.names),
                DirectoryToCount(str(tmp_path / "other"), other_fd, ["lf", "link", undecodable]),
            ]
        ) as count:
            [own] = _shared_files(shared_memory)
            # It names this process, as a lock file does: a server started
            # later removes it if this one is killed before it can.
            assert (own / "owner").read_bytes() == this_process().line()
            assert own.stat().st_mode & 0o777 == 0o700
            assert (own / "count").stat().st_mode & 0o777 == 0o600
            assert (own / "count").stat().st_uid == os.getuid()
            first, second = count.finish()
    finally:
        os.close(other_fd)
    assert first == (many.sizes, {})
    sizes, failures = second
    assert sizes == [20, NOT_COUNTED, 3]
    assert list(failures) == [1] and failures[1].errno == errno.ELOOP
    assert _shared_files(shared_memory) == []
    [(count_first, path_first, in_helpers), (count_second, path_second, _)] = _shared(logged)
    assert (count_first, path_first) == (MANY, str(many.path))
    assert (count_second, path_second) == (3, str(tmp_path / "other"))
    assert in_helpers > 0


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_count_left_unfinished_leaves_nothing_behind(
    many: Many,
    directory_fd: int,
    helpers: CountingProcesses,
    logged: Logged,
    shared_memory: Path,
) -> None:
    """An error between begin and finish (a login refused meanwhile): file gone, helpers free."""
    await helpers.when_started()
    with pytest.raises(MaildropUnavailable):
        with helpers.begin([DirectoryToCount(str(many.path), directory_fd, many.names)]):
            assert _shared_files(shared_memory) != []
            raise MaildropUnavailable("meanwhile")
    assert _shared_files(shared_memory) == []
    # The helper is not held up by the count given up: it takes part in the next.
    assert helpers.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    [(_, _, in_helpers)] = _shared(logged)
    assert in_helpers > 0


def _numbered_maildir(
    maildir: Path, count: int, in_new: Callable[[int], bool]
) -> list[tuple[str, int]]:
    """
    A Maildir of ``count`` messages, each in new/ if ``in_new(number)``,
    else in cur/ and seen: (unique name, wire size) of each, in order.
    """
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    expected = []
    for number in range(count):
        data = b"Subject: %d\n\n" % number + b".line\n" * (number % 4)
        unique = f"{1_000_000_000 + number}.M{number}P1.test"
        name = f"new/{unique}" if in_new(number) else f"cur/{unique}:2,S"
        (maildir / name).write_bytes(data)
        expected.append((unique, len(data) + data.count(b"\n")))
    return expected


@pytest.mark.process
@pytest.mark.parametrize("in_new", [1500, 300])
@pytest_twisted.ensureDeferred
async def test_a_first_login_shares_the_count_of_new_and_cur(
    tmp_path: Path, helpers: CountingProcesses, logged: Logged, in_new: int, shared_memory: Path
) -> None:
    """
    RFC 1939 sections 5 and 11: every size exact, in unique-name order,
    whichever directory a message is in and whoever counted it.  new/'s
    count is handed over before cur/ is read if it is shared on its own (two
    batches of 256 or more), else with cur/'s: both are shared either way.
    """
    maildir = tmp_path / "mail" / "alice"
    expected = _numbered_maildir(maildir, 3000, lambda number: number % (3000 // in_new) == 0)
    await helpers.when_started()
    shared_when_asked: list[int] = []

    def shared_yet(directory_fd: int) -> bool:
        # Asked of each directory once it is read (each fits in one slice
        # here), before its count begins.
        shared_when_asked.append(len(list(shared_memory.iterdir())))
        return True

    store = MaildirStore(
        f"{tmp_path}/mail/{{user}}", counting=helpers, short_read_is_end=shared_yet
    )
    drop = await store.open("alice")
    try:
        assert list(zip(drop.messages.uids, drop.messages.sizes, strict=True)) == expected
    finally:
        await drop.close()
    counts = {path: (count, in_helpers) for count, path, in_helpers in _shared(logged)}
    assert counts.keys() == {str(maildir / "new"), str(maildir / "cur")}
    assert counts[str(maildir / "new")][0] == in_new
    assert counts[str(maildir / "cur")][0] == 3000 - in_new
    # new/'s count is under way while cur/ is read only if shared on its own.
    assert shared_when_asked == ([0, 1] if in_new >= 2 * 256 else [0, 0])


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_large_directory_is_counted_in_slices_each_shared(
    tmp_path: Path, helpers: CountingProcesses, logged: Logged
) -> None:
    """
    A first login reads a directory ``4 * step`` entries at a time, each
    slice of two batches or more a count of its own for the helpers (here
    slices of 1,024 messages): every size exact all the same (RFC 1939
    sections 5 and 11).
    """
    maildir = tmp_path / "mail" / "alice"
    expected = _numbered_maildir(maildir, 3000, lambda number: False)
    await helpers.when_started()
    store = MaildirStore(f"{tmp_path}/mail/{{user}}", counting=helpers, step=256)
    drop = await store.open("alice")
    try:
        assert list(zip(drop.messages.uids, drop.messages.sizes, strict=True)) == expected
    finally:
        await drop.close()
    slices = [count for count, path, _ in _shared(logged) if path == str(maildir / "cur")]
    assert sorted(slices) == [952, 1024, 1024]


def test_a_count_is_shared_from_two_batches() -> None:
    counting = CountingProcesses(2, reactor, batch=100)  # type: ignore[arg-type]
    assert [counting.shares(n) for n in (0, 199, 200, 10_000)] == [False, False, True, True]
    alone = CountingProcesses(0, reactor, batch=100)  # type: ignore[arg-type]
    assert not alone.shares(10_000)


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_no_room_for_the_shared_file_counts_in_the_thread(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged, shared_memory: Path
) -> None:
    """
    /dev/shm full (64 MB in a container by default): the room is asked for
    before the file is used (a write into a mapped file with no room kills
    the process), and the count is the thread's; said as a warning.
    """
    await helpers.when_started()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Files of this process cannot grow past 64 KiB: as a full file system.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        counted = helpers.wire_sizes(str(many.path), directory_fd, many.names)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert counted == (many.sizes, {})
    assert logged.texts("a count of") == [
        f"a count of {MANY} message sizes is not shared ([Errno 27] File too large)"
    ]
    assert [in_helpers for _, _, in_helpers in _shared(logged)] == [0]
    assert _shared_files(shared_memory) == []
    # Nothing else is wrong: the next count, with room, is shared.
    assert helpers.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    assert _shared(logged)[-1][2] > 0


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_what_a_killed_server_left_in_shared_memory_is_removed_at_start(
    shared_memory: Path, logged: Logged
) -> None:
    """
    A server killed in the middle of a count (SIGKILL, out of memory) leaves
    its shared file in /dev/shm, which is memory until the machine restarts:
    the next server removes it, and nothing of a server still running.
    """
    ended = subprocess.Popen(["true"])
    ended.wait()
    here = this_process()
    # A process of this host, boot and namespace that has ended.
    gone = LockOwner(here.host, ended.pid, here.incarnation.rpartition(":")[0] + ":1")
    left = shared_memory / "pop3d-count-abcd1234"
    running = shared_memory / "pop3d-count-efgh5678"
    unknown = shared_memory / "pop3d-count-ijkl9012"
    owners = {left: gone.line(), running: here.line(), unknown: b"nonsense\n"}
    for directory, owner in owners.items():
        directory.mkdir()
        (directory / "owner").write_bytes(owner)
        (directory / "count").write_bytes(b"\0" * 64)
    counting = CountingProcesses(1, reactor, shared_memory=str(shared_memory))  # type: ignore[arg-type]
    counting.startService()
    try:
        await counting.when_started()
    finally:
        await counting.stopService()
    assert sorted(shared_memory.iterdir()) == [running, unknown]
    assert logged.texts("removed ") == [
        f"removed {left}, left by a server that ended while counting"
    ]


class _HeldLockContext(SpawnContext):
    """Spawns helpers as usual, and keeps the locks made, for a test to hold."""

    def __init__(self) -> None:
        super().__init__()
        self.locks: list[Lock] = []

    def Lock(self) -> Lock:
        lock = super().Lock()
        self.locks.append(lock)
        return lock


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_lock_held_for_good_stops_the_sharing_not_the_count(
    many: Many, directory_fd: int, logged: Logged
) -> None:
    """
    A helper killed while it held the lock that hands out batches would hold
    it for good: the thread gives up on it after a while, counts everything
    itself, says so once, and counts alone from then on.
    """
    context = _HeldLockContext()
    counting = CountingProcesses(1, reactor, context=context, batch=256)  # type: ignore[arg-type]
    counting.startService()
    try:
        await counting.when_started()
        # The first lock made (the executor's queues make theirs after it).
        claims = context.locks[0]
        assert claims.acquire(timeout=PATIENCE)
        try:
            for _ in range(2):
                counted = counting.wire_sizes(str(many.path), directory_fd, many.names)
                assert counted == (many.sizes, {})
        finally:
            claims.release()
    finally:
        await counting.stopService()
    assert logged.texts("a counting helper process stopped") == [
        "a counting helper process stopped answering; "
        "message sizes are counted in this process until it is replaced"
    ]
    assert [in_helpers for _, _, in_helpers in _shared(logged)] == [0]


DIED = "a counting helper process ended unexpectedly"


async def _kill_and_count(
    counting: CountingProcesses, many: Many, directory_fd: int, logged: Logged
) -> int:
    """
    Kill the helper, and count (in a thread, as a login does) until its
    death is noticed, each count exact.  The helper's pid.
    """
    [pid] = await counting.when_started()
    noticed = len(logged.texts(DIED))
    os.kill(pid, signal.SIGKILL)
    # The executor learns of the death a moment later: a count hands its
    # batches to the dead helper until then (and counts them itself).
    for _ in range(50):
        counted = await deferToThread(counting.wire_sizes, str(many.path), directory_fd, many.names)
        assert counted == (many.sizes, {})
        if len(logged.texts(DIED)) > noticed:
            break
    else:
        pytest.fail("the helper's death was never noticed")
    assert not Path(f"/proc/{pid}").exists()
    return pid


# CPython 3.11's executor thread may raise InvalidStateError as it fails the
# jobs of a dead helper, if one of them was cancelled (gh-107219, fixed in
# 3.12): a traceback in that thread, and that thread ends (the dead helper
# is reaped by CountingProcesses); no harm to the count.  Counts no longer
# cancel jobs, only the shutdown after a death does (not seen in six runs
# with the warning an error), so this stays as a guard.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_helper_that_dies_costs_no_size(
    many: Many, directory_fd: int, helpers: CountingProcesses, logged: Logged
) -> None:
    await _kill_and_count(helpers, many, directory_fd, logged)
    for _ in range(2):
        assert helpers.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    # Said once; every count after the death was the thread's.
    assert logged.texts(DIED) == [
        "a counting helper process ended unexpectedly; "
        "message sizes are counted in this process until it is replaced"
    ]
    assert all(in_helpers == 0 for _, _, in_helpers in _shared(logged))


# gh-107219: see above.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_helpers_that_die_are_replaced_later_each_time_they_die_young(
    many: Many, directory_fd: int, shared_memory: Path, logged: Logged
) -> None:
    """
    A helper killed (the out-of-memory killer, an administrator) is replaced
    a second later, and the counts are shared again; replacements found dead
    within five minutes of starting wait twice as long each time (up to
    five minutes: `test_replacements_wait_longer_while_found_dead_young`);
    helpers that lived longer are replaced a second later again.
    """
    clock = Clock()
    counting = CountingProcesses(
        1,
        reactor,  # type: ignore[arg-type]
        batch=256,
        shared_memory=str(shared_memory),
        clock=clock,
    )
    counting.startService()
    try:
        waits = []
        for _ in range(3):
            dead = await _kill_and_count(counting, many, directory_fd, logged)
            [wait] = [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()]
            waits.append(wait)
            assert await counting.when_started() == []  # none of the dead
            clock.advance(wait - 0.1)
            assert len(clock.getDelayedCalls()) == 1  # not yet replaced
            clock.advance(0.1)
            [pid] = await counting.when_started()
            assert pid != dead and Path(f"/proc/{pid}").exists()
            assert f"counting helper processes started: [{pid}]" in logged.texts()
        assert waits == [1, 2, 4]
        # Shared again.
        before = len(_shared(logged))
        counted = await deferToThread(counting.wire_sizes, str(many.path), directory_fd, many.names)
        assert counted == (many.sizes, {})
        [(_, _, in_helpers)] = _shared(logged)[before:]
        assert in_helpers > 0
        # Five minutes later the next death is a first one again.
        clock.advance(300)
        await _kill_and_count(counting, many, directory_fd, logged)
        assert [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()] == [1]
    finally:
        await counting.stopService()
    # Stopped while a replacement waits: none is started.
    assert clock.getDelayedCalls() == []
    assert len(logged.texts(DIED)) == 4
    assert logged.texts("counting helper processes are started again") == [
        f"counting helper processes are started again in {wait} s" for wait in (1, 2, 4, 1)
    ]


def test_replacements_wait_longer_while_found_dead_young() -> None:
    """Doubling from a second, at most five minutes; after five minutes alive, a second."""
    waits: list[float] = []
    previous = None
    for _ in range(12):
        previous = replacement_wait(previous, 10.0)
        waits.append(previous)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert replacement_wait(300, 299.9) == 300
    assert replacement_wait(300, 300) == 1


class _SecondStartFails(SpawnContext):
    """Spawns helpers, but the second cannot be started (no memory, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def Process(self, *args: Any, **kwargs: Any) -> SpawnProcess:  # type: ignore[override]
        self.starts += 1
        kind = _Unstartable if self.starts == 2 else SpawnProcess
        return kind(*args, **kwargs)


# gh-107219: see above.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_replacement_that_cannot_start_is_tried_again_later(
    many: Many, directory_fd: int, shared_memory: Path, logged: Logged
) -> None:
    clock = Clock()
    counting = CountingProcesses(
        1,
        reactor,  # type: ignore[arg-type]
        context=_SecondStartFails(),
        batch=256,
        shared_memory=str(shared_memory),
        clock=clock,
    )
    counting.startService()
    try:
        await _kill_and_count(counting, many, directory_fd, logged)
        clock.advance(1)
        assert logged.texts("counting helper processes could not start") == [
            "counting helper processes could not start (PermissionError: [Errno 13] "
            "Permission denied: '/root/python3'); message sizes are counted in this process"
        ]
        assert [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()] == [2]
        clock.advance(2)
        [pid] = await counting.when_started()
        assert Path(f"/proc/{pid}").exists()
    finally:
        await counting.stopService()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_not_running_counts_in_the_thread_and_stopped_no_helper_is_left(
    many: Many, directory_fd: int, logged: Logged
) -> None:
    counting = CountingProcesses(1, reactor, batch=256)  # type: ignore[arg-type]
    assert counting.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    counting.startService()
    [pid] = await counting.when_started()
    await counting.stopService()
    assert _ends_within(pid, PATIENCE)
    assert counting.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    assert _shared(logged) == []


class _Unstartable(SpawnProcess):
    def start(self) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/root/python3")


class _UnstartableContext(SpawnContext):
    """Processes that cannot start: a server whose user cannot run the interpreter."""

    Process = _Unstartable


def test_helpers_that_cannot_start_leave_the_counting_to_the_server(
    many: Many, directory_fd: int, logged: Logged
) -> None:
    counting = CountingProcesses(1, reactor, context=_UnstartableContext(), batch=256)  # type: ignore[arg-type]
    counting.startService()
    assert logged.texts("counting helper processes could not start") == [
        "counting helper processes could not start (PermissionError: [Errno 13] "
        "Permission denied: '/root/python3'); message sizes are counted in this process"
    ]
    assert counting.wire_sizes(str(many.path), directory_fd, many.names) == (many.sizes, {})
    assert _shared(logged) == []
    assert counting.stopService().called  # nothing to end


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (not a child of this one) ends within ``seconds``."""
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([descriptor], [], [], seconds)
        return bool(readable)
    finally:
        os.close(descriptor)


def test_bad_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        CountingProcesses(-1, reactor)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one message"):
        CountingProcesses(1, reactor, batch=0)  # type: ignore[arg-type]


@pytest.mark.process
def test_twistd_counts_a_first_login_with_a_helper(tmp_path: Path, launch: Launch) -> None:
    """
    ``twistd pop3d --counting-processes 1``: the first login to a Maildir of
    5,000 messages (more than two batches) lists every exact size, and the
    helper ends with the server.
    """
    mail_root = tmp_path / "mail"
    new = mail_root / "alice" / "new"
    new.mkdir(parents=True)
    for sub in ("cur", "tmp"):
        (mail_root / "alice" / sub).mkdir()
    sizes = []
    for number in range(5000):
        data = b"Subject: %d\n\n" % number + b"line\n" * (number % 5)
        (new / f"{1_000_000_000 + number}.M{number}P1.test").write_bytes(data)
        sizes.append(len(data) + data.count(b"\n"))
    server = launch(
        *pop3d_arguments(mail_root, write_passwd(tmp_path), "--counting-processes", "1")
    )
    server.wait_listening()
    helper = int(server.wait_for(re.compile(r"counting helper processes started: \[(\d+)\]"))[1])
    client = poplib.POP3(HOST, server.port, timeout=60)
    try:
        client.user("alice")
        client.pass_("wonderland")
        assert client.stat() == (5000, sum(sizes))
        _, lines, _ = client.list()
        assert lines == [b"%d %d" % (number + 1, size) for number, size in enumerate(sizes)]
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    assert re.search(
        rf"counted 5000 message sizes in {re.escape(str(new))}, \d+ in helper", server.output
    )
    server.assert_healthy()
    server.stop()
    assert _ends_within(helper, PATIENCE)


@pytest.mark.process
def test_a_killed_server_leaves_no_helper(tmp_path: Path, launch: Launch) -> None:
    """However the server ends (here SIGKILL: no service is stopped), its helper ends too."""
    server = launch(
        *pop3d_arguments(tmp_path / "mail", write_passwd(tmp_path), "--counting-processes", "1")
    )
    server.wait_listening()
    helper = int(server.wait_for(re.compile(r"counting helper processes started: \[(\d+)\]"))[1])
    server.kill()
    assert _ends_within(helper, PATIENCE)
