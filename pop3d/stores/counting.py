"""
Counting messages' sizes, on more than one core when there are many.

LIST and STAT give each message's exact size as sent (RFC 1939 sections 5
and 11: each LF of mail stored with LF line endings counts as two octets),
so the first login to a Maildir reads every message.  For 100,000
messages that is about half a second of one core, most of it the
interpreter's work per message, which threads cannot share (they take
turns holding the GIL).
`CountingProcesses` are helper processes that count part of a large batch
beside the thread that asks.

`wire_sizes` is the one loop that opens, reads and measures messages; both
the thread and the helpers run it.

A count is shared through a file in shared memory (``/dev/shm``: each
message's name and 8 octets), made and removed by the thread that asks: a
state per batch, a size per message, the names to count.  Helpers take
batches from the front and the thread from the end, each taking one under
a lock the helpers inherit; a helper needs nothing from the server's
process while it counts (not a turn of its interpreter lock, as a result
handed back through the executor would), so the thread that asks can do
other work meanwhile (`CountingProcesses.begin`).
"""

from __future__ import annotations

import errno
import functools
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import shutil
import signal
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.context import BaseContext
from multiprocessing.synchronize import Lock
from types import TracebackType
from typing import TypeAlias

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.stores.common import run_blocking
from pop3d.stores.posix import (
    CREATE_FLAGS,
    DIRECTORY_FLAGS,
    READ_FLAGS,
    UNSEEN_READ_FLAGS,
    LockOwner,
    open_same_directory,
    read_small_file,
    this_process,
)
from pop3d.wire import WireSizeCounter, wire_size

#: What `wire_sizes` gives a message it left out (gone, or not a message)
#: or could not read (the error is beside it).
NOT_COUNTED = -1
#: Messages a helper takes at a time: about 10 ms of its work.  The thread
#: that asks takes every batch that no helper has started, and counts again
#: any a helper has not finished: at the end it has at most a batch or two
#: per helper to count that a helper is counting too.
BATCH = 2048
#: The first read of each message asks for this much: most messages are
#: read whole in one go.  Below glibc's M_MMAP_THRESHOLD (128 KiB until a
#: freed mapping raises it), so that the buffer comes from malloc's heap in
#: any process: a 256 KiB buffer, where the threshold had not been raised
#: (a helper that had imported little), was mapped, faulted in, shrunk by
#: mremap and unmapped for every message: opening, reading and closing a
#: 3 KB message took four times as long (benchmarks/first_read.py).
FIRST_READ_SIZE = 64 * 1024
#: A longer message is read on this much at a time.
READ_SIZE = 256 * 1024
#: The lock that hands out batches is held for microseconds; not had within
#: this long, its holder died holding it (or the machine is stalled), and
#: counting goes on without the helpers.
LOCK_PATIENCE_SECONDS = 2.0
#: Seconds before helpers that ended unexpectedly are replaced; doubled each
#: time replacements are found dead within `REPLACE_WAIT_MOST` of starting
#: (helpers that cannot live are not started again and again), up to that
#: (`replacement_wait`).
REPLACE_WAIT = 1.0
REPLACE_WAIT_MOST = 300.0
#: Where the files of shared counts are made: memory, not a disk, on Linux.
#: (Each in a directory of its own, made as any private temporary directory
#: is: a new random name, mode 0700.)
SHARED_MEMORY = "/dev/shm"  # noqa: S108

#: How the directory of each shared count is named (then random letters);
#: the file in it that names the server that made it.
SHARED_PREFIX = "pop3d-count-"
OWNER = "owner"

#: Sizes in the order of the names asked, and the error of each one
#: `NOT_COUNTED`, by its position.
Counted: TypeAlias = tuple[list[int], dict[int, OSError]]

log = Logger()


def wire_sizes(
    directory_fd: int, names: Sequence[str], *, short_read_is_end: bool = False
) -> Counted:
    """
    The size on the wire of each message ``names`` of the directory
    ``directory_fd`` (opened as `pop3d.stores.posix` opens files: no link
    followed, a FIFO never waited for), else `NOT_COUNTED`: a file gone
    since it was listed (ENOENT at open) or a FIFO planted since (EAGAIN at
    read) is left out; any other failure is an error, given by position.
    (EAGAIN at open is a lease another program holds: an error, not a file
    to leave out.)  With ``short_read_is_end`` (the file system says so: see
    `pop3d.stores.posix.short_read_is_end`), a read returning less than
    asked ends a message; else only an empty read does.
    """
    # A tight loop: names bound once, no call per message but the system's.
    open_file, read, close = os.open, os.read, os.close
    flags = UNSEEN_READ_FLAGS
    sizes: list[int] = []
    failures: dict[int, OSError] = {}
    for position, name in enumerate(names):
        try:
            try:
                fd = open_file(name, flags, dir_fd=directory_fd)
            except PermissionError:
                if flags == READ_FLAGS:
                    raise
                # Not the file's owner (EPERM for O_NOATIME, or really
                # unreadable: then this fails again): as any reader does.
                flags = READ_FLAGS
                fd = open_file(name, flags, dir_fd=directory_fd)
        except OSError as error:
            sizes.append(NOT_COUNTED)
            if not isinstance(error, FileNotFoundError):
                failures[position] = error
            continue
        try:
            first = read(fd, FIRST_READ_SIZE)
            # One octet more asked tells a short read from the end (no
            # buffer of READ_SIZE made for nothing), unless the file system
            # already did.
            if len(first) < FIRST_READ_SIZE and short_read_is_end:
                more = b""
            else:
                more = read(fd, 1 if len(first) < FIRST_READ_SIZE else READ_SIZE) if first else b""
            if not more:
                sizes.append(wire_size(first))  # most messages: read in one go
            else:
                counter = WireSizeCounter()
                counter.feed(first)
                counter.feed(more)
                # Where a short read is the end, the read that returned
                # less than asked was the last (no empty read to learn so).
                chunk = more
                while not (short_read_is_end and len(chunk) < READ_SIZE):
                    chunk = read(fd, READ_SIZE)
                    if not chunk:
                        break
                    counter.feed(chunk)
                sizes.append(counter.finish())
        except OSError as error:
            sizes.append(NOT_COUNTED)
            if error.errno != errno.EAGAIN:
                failures[position] = error
        finally:
            close(fd)
    return sizes, failures


#: A batch's state in a shared count's file.  Helpers take FREE batches from
#: the front, the thread from the end; a state changes under the lock only.
FREE, HELPER_COUNTING, HELPER_COUNTED, THREAD_COUNTING, LEFT_TO_THREAD = range(5)
#: Octets of a state or a size in the file (a native signed 64-bit integer).
_SLOT = array("q").itemsize


@dataclass(frozen=True)
class DirectoryToCount:
    """Messages ``names`` of the directory ``path``, held open as ``directory_fd``."""

    path: str
    directory_fd: int
    names: Sequence[str]
    #: See `wire_sizes`.
    short_read_is_end: bool = False


@dataclass(frozen=True)
class _Batch:
    """
    Messages ``first`` to ``first + count`` of a count, all of directory
    number ``directory``, where they start at ``start``; their names are
    at ``names_at`` in the shared file, NUL-separated (`os.fsencode`).
    """

    directory: int
    first: int
    count: int
    start: int
    names_at: int = 0
    names_size: int = 0


@dataclass(frozen=True)
class _SharedDirectory:
    """What a helper is told of a directory: it opens ``path`` only if it is ``identity``."""

    path: str
    #: (device, inode) of the directory the thread holds open.
    identity: tuple[int, int]
    short_read_is_end: bool


@dataclass(frozen=True)
class _Plan:
    """What a helper is told of a shared count; the rest is in ``file``."""

    file: str
    #: (device, inode) of ``file``: a file put at its name since is not it.
    identity: tuple[int, int]
    directories: tuple[_SharedDirectory, ...]
    batches: tuple[_Batch, ...]
    messages: int

    @property
    def sizes_at(self) -> int:
        return len(self.batches) * _SLOT

    @property
    def names_at(self) -> int:
        return self.sizes_at + self.messages * _SLOT

    @property
    def file_size(self) -> int:
        last = self.batches[-1]
        return last.names_at + last.names_size


@dataclass(frozen=True)
class _Helpers:
    """Running helpers: their executor, and the lock they take batches under."""

    executor: ProcessPoolExecutor
    lock: Lock
    #: Where shared counts' files are made (in a directory of their own each).
    shared_directory: str | None


@contextmanager
def _mapped(descriptor: int, plan: _Plan) -> Iterator[tuple[memoryview, memoryview, mmap.mmap]]:
    """The states and sizes of a shared count's file, as integers, and the whole map."""
    shared = mmap.mmap(descriptor, plan.file_size)
    view = memoryview(shared)
    states = view[: plan.sizes_at].cast("q")
    sizes = view[plan.sizes_at : plan.names_at].cast("q")
    try:
        yield states, sizes, shared
    finally:
        # Every view released before the map can close.
        states.release()
        sizes.release()
        view.release()
        shared.close()


@contextmanager
def _holding(lock: Lock) -> Iterator[bool]:
    """The lock that hands out batches, if it can be had (`LOCK_PATIENCE_SECONDS`)."""
    had = lock.acquire(timeout=LOCK_PATIENCE_SECONDS)
    try:
        yield had
    finally:
        if had:
            lock.release()


def _take(lock: Lock, states: memoryview, number: int, taker: int) -> int | None:
    """
    The state batch ``number`` had when ``taker`` (`HELPER_COUNTING` or
    `THREAD_COUNTING`) asked for it, which it now has if that was `FREE`;
    None if the lock could not be had.
    """
    with _holding(lock) as had:
        if not had:
            return None
        state: int = states[number]
        if state == FREE:
            states[number] = taker
        return state


def _count_shared(plan: _Plan) -> int:
    """
    In a helper: count batches of a shared count from the front until the
    thread has taken the rest.  A batch of a directory that is not the one
    the thread holds open (replaced since: device and inode differ), or
    with a message it could not read, is left to the thread (which then
    has each error).  Returns how many messages it counted.
    """
    lock = _lock
    assert lock is not None
    try:
        descriptor = os.open(plan.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0  # finished before this helper came to it
    opened: dict[int, int | None] = {}
    counted = 0
    try:
        info = os.fstat(descriptor)
        if (info.st_dev, info.st_ino) != plan.identity:
            return 0  # not the thread's file
        with _mapped(descriptor, plan) as (states, sizes, shared):
            for number, batch in enumerate(plan.batches):
                state = _take(lock, states, number, HELPER_COUNTING)
                if state is None or state == THREAD_COUNTING:
                    break  # the thread has this batch and every one after it
                if state != FREE:
                    continue  # another helper's
                if batch.directory not in opened:
                    opened[batch.directory] = _open_directory(plan.directories[batch.directory])
                directory_fd = opened[batch.directory]
                outcome = LEFT_TO_THREAD
                if directory_fd is not None:
                    encoded = shared[batch.names_at : batch.names_at + batch.names_size]
                    batch_sizes, failures = wire_sizes(
                        directory_fd,
                        os.fsdecode(encoded).split("\0"),
                        short_read_is_end=plan.directories[batch.directory].short_read_is_end,
                    )
                    if not failures:
                        sizes[batch.first : batch.first + batch.count] = array("q", batch_sizes)
                        outcome = HELPER_COUNTED
                        counted += batch.count
                with _holding(lock) as had:
                    if not had:
                        break
                    # Under the lock: the sizes are written before the
                    # thread, which reads states under it, sees this one.
                    states[number] = outcome
    finally:
        os.close(descriptor)
        for directory_fd in opened.values():
            if directory_fd is not None:
                os.close(directory_fd)
    return counted


def _open_directory(directory: _SharedDirectory) -> int | None:
    """The directory, if it is still the one the thread holds open (else the thread counts)."""
    try:
        return open_same_directory(directory.path, directory.identity)
    except OSError:
        return None


#: In a helper: what its first job waits at until every helper has one.
_all_started: threading.Barrier | None = None
#: In a helper: the lock under which batches of shared counts are taken.
_lock: Lock | None = None


def _started() -> int:
    """A helper's first job: every helper takes one, so that all have started."""
    if _all_started is not None:
        _all_started.wait()
    return os.getpid()


def _prepare_helper(all_started: threading.Barrier, lock: Lock) -> None:
    """
    In a helper, before its first job: it ignores the signals that reach
    every process of the server (a Ctrl-C or hang-up sent to its process
    group, the service manager's SIGTERM to all of them: the server's to
    act on), and ends when the server's process does, however that ends.
    """
    global _all_started, _lock
    _all_started = all_started
    _lock = lock
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    server = multiprocessing.parent_process()
    if server is not None:
        threading.Thread(target=_exit_after, args=(server.sentinel,), daemon=True).start()


def _exit_after(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def replacement_wait(previous: float | None, lived: float) -> float:
    """
    Seconds to wait before replacing helpers found dead ``lived`` seconds
    after they were started, when the last replacement waited ``previous``
    (None: there was none): `REPLACE_WAIT`, doubled for each replacement
    found dead within `REPLACE_WAIT_MOST` of starting, at most that.
    """
    if previous is None or lived >= REPLACE_WAIT_MOST:
        return REPLACE_WAIT
    return min(2 * previous, REPLACE_WAIT_MOST)


class CountingProcesses(Service):
    """
    ``processes`` helper processes that count messages' sizes with the
    thread that asks (`wire_sizes`, `begin`), started and stopped with the
    service.

    Each is a fresh interpreter (``multiprocessing``'s ``spawn``, unless
    ``context`` says otherwise), so it inherits no descriptor of the server
    but standard input, output and error: no listening socket, no client,
    no maildrop's lock.  It ignores SIGINT, SIGHUP and SIGTERM (sent to the
    server's process group or all its processes, they are the server's to
    act on) and ends when the server's process does, however it ends.  It
    runs as the server's user and opens by path only a count's shared file
    (checked by device and inode) and a directory to count in, if it is
    the one the asking thread holds open (checked the same way).

    A count of at least two batches (``batch`` messages) in all is shared
    through a file in a directory of its own (mode 0700) in
    ``shared_memory`` (``/dev/shm`` if it is there and writable, else the
    temporary directory), removed when the count ends: a state per batch,
    a size per message (8 octets each), the names.  The helpers take
    batches from the front while the thread takes, from the end, every
    batch that no helper has started; then the thread takes the batches the
    helpers have counted and counts every other one itself, never waiting
    for a helper (one still starting, busy with another login, or reading a
    file system that hangs).  A batch a helper could not count (it died,
    the directory was replaced, a message could not be read) is counted by
    the thread.  Not running, or without room for the file, this counts in
    the thread.

    Helpers that end unexpectedly (killed, out of memory), stop answering
    or cannot start are replaced `REPLACE_WAIT` seconds later (of
    ``clock``, by default ``reactor``), later still if their replacements
    are found dead too within `REPLACE_WAIT_MOST` of starting
    (`replacement_wait`); meanwhile the thread counts alone.  (Helpers
    that cannot be started at all, an interpreter this user cannot run, are
    not tried again.)

    With ``spawn``, each helper imports the program's main module again
    (as ``__mp_main__``): a program that starts the reactor at module level
    must do it under ``if __name__ == "__main__":`` (twistd and ``.tac``
    files are fine).
    """

    def __init__(
        self,
        processes: int,
        reactor: IReactorThreads,
        *,
        context: BaseContext | None = None,
        batch: int = BATCH,
        shared_memory: str = SHARED_MEMORY,
        clock: IReactorTime | None = None,
    ) -> None:
        if processes < 0:
            raise ValueError("the number of counting processes cannot be negative")
        if batch < 1:
            raise ValueError("a batch holds at least one message")
        self.processes = processes
        self.batch = batch
        self.shared_memory = shared_memory
        self._reactor = reactor
        self._clock = clock if clock is not None else IReactorTime(reactor)
        self._context = context if context is not None else multiprocessing.get_context("spawn")
        self._helpers: _Helpers | None = None
        #: Two logins may find the helpers broken at once: it is said once.
        self._breaking = threading.Lock()
        self._starting: list[Future[int]] = []
        #: When the helpers were last started (`_clock`); how long the last
        #: replacement waited; the replacement waiting, if one is.
        self._started_at = 0.0
        self._last_wait: float | None = None
        self._replacing: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.processes:
            self._start_helpers(first=True)

    def _start_helpers(self, *, first: bool) -> None:
        self._replacing = None
        self._starting = []
        self._started_at = self._clock.seconds()
        executor: ProcessPoolExecutor | None = None
        try:
            interpreter = os.fsdecode(multiprocessing.spawn.get_executable())
            if not os.access(interpreter, os.X_OK):
                # Said plainly: what fails next would be an import of the
                # standard library, or a pipe to a helper that never ran.
                raise PermissionError(errno.EACCES, "this user cannot run", interpreter)
            lock = self._context.Lock()
            executor = ProcessPoolExecutor(
                self.processes,
                mp_context=self._context,
                initializer=_prepare_helper,
                initargs=(self._context.Barrier(self.processes), lock),
            )
            # Started now (one job each), not at the first large login.
            self._starting = [executor.submit(_started) for _ in range(self.processes)]
        except Exception as error:
            # The interpreter cannot be run as this user, say (twistd --uid
            # with Python in root's home): the server serves all the same.
            log.error(
                "counting helper processes could not start ({error}); "
                "message sizes are counted in this process",
                error=f"{type(error).__name__}: {error}",
            )
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            if not first:
                # No process now (out of memory after a kill, say): later.
                self._replace_later()
            return
        writable = os.access(self.shared_memory, os.W_OK | os.X_OK)
        shared_directory = self.shared_memory if writable else None
        if first:
            _remove_left_behind(shared_directory)
        helpers = self._helpers = _Helpers(executor, lock, shared_directory)
        self.when_started().addCallbacks(self._started, self._not_started, errbackArgs=(helpers,))

    def _started(self, pids: list[int]) -> None:
        log.info("counting helper processes started: {pids}", pids=pids)

    def _not_started(self, failure: Failure, helpers: _Helpers) -> None:
        if self.running:  # not merely stopped before they were up
            log.failure("counting helper processes did not start", failure)
            self._broken(helpers, "ended as it started")

    def when_started(self) -> Deferred[list[int]]:
        """
        Fires with the process ids of the helpers once they have started
        (those started last: replacements, once there are), with none if
        there are none (as while dead ones wait to be replaced), or an error
        if they could not.
        """
        starting = self._starting
        started: Deferred[list[int]] = Deferred()
        remaining = [len(starting)]

        def one_more(future: Future[int]) -> None:
            remaining[0] -= 1
            if remaining[0]:
                return
            try:
                pids = sorted({future.result() for future in starting})
            except Exception as error:
                # BrokenProcessPool; CancelledError: stopped first.
                started.errback(Failure(error))
            else:
                started.callback(pids)

        if not starting:
            started.callback([])
        for future in starting:
            future.add_done_callback(lambda future: self._reactor.callFromThread(one_more, future))
        return started

    def stopService(self) -> Deferred[None]:
        """
        Fires once the helpers have ended: each is let finish starting (it
        reads the server's semaphores, which go with the server's process),
        then ends once the count it is in is taken, waited for in the
        thread pool (twistd ends its process as soon as the services have
        stopped; a helper left behind then ends by itself, but
        multiprocessing's resource tracker complains on standard error).
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        # Dropped with the executor: the lock's semaphore is removed when
        # it is freed (else the resource tracker calls it leaked).
        helpers, self._helpers = self._helpers, None
        if helpers is None:
            return succeed(None)
        stop = functools.partial(helpers.executor.shutdown, wait=True, cancel_futures=True)
        return self.when_started().addBoth(lambda _: run_blocking(self._reactor, stop))

    def wire_sizes(
        self,
        path: str,
        directory_fd: int,
        names: Sequence[str],
        *,
        short_read_is_end: bool = False,
    ) -> Counted:
        """
        `wire_sizes` of ``names`` in ``directory_fd``, the directory
        ``path``, shared with the helpers.  Called from a thread, not the
        reactor's: it counts too.
        """
        directory = DirectoryToCount(path, directory_fd, names, short_read_is_end)
        with self.begin([directory]) as count:
            [counted] = count.finish()
        return counted

    def begin(self, directories: Sequence[DirectoryToCount]) -> SharedCount:
        """
        Start counting the messages of ``directories`` (held open until the
        count is finished): from a thread, not the reactor's.  The helpers
        begin at once; the thread may do other work before it calls
        `SharedCount.finish`, which counts what is left.  Use it as a
        context manager: left unfinished (an error meanwhile), the helpers'
        part stops and the shared file is removed.
        """
        helpers = self._helpers
        count = SharedCount(directories, self.batch, on_broken=self._broken)
        if helpers is not None and self.shares(sum(len(d.names) for d in directories)):
            count.share_with(helpers, self.processes)
        return count

    def shares(self, messages: int) -> bool:
        """
        Whether a count of ``messages`` is shared with the helpers (if they
        run): at least two batches; fewer are counted sooner by the thread.
        """
        return self.processes > 0 and messages >= 2 * self.batch

    def _broken(self, helpers: _Helpers, how: str) -> None:
        """
        A helper died (killed, out of memory), or holds the lock for good:
        counting goes on in the threads until new helpers are started.
        From any thread.
        """
        with self._breaking:
            if self._helpers is not helpers:
                return
            self._helpers = None
        log.error(
            "a counting helper process {how}; "
            "message sizes are counted in this process until it is replaced",
            how=how,
        )
        helpers.executor.shutdown(wait=False, cancel_futures=True)
        # Reaped here: CPython 3.11's executor thread may itself end before
        # it does (gh-107219), leaving the dead helper a zombie.
        multiprocessing.active_children()
        self._reactor.callFromThread(self._replace_later)

    def _replace_later(self) -> None:
        """On the reactor's thread: start new helpers after `replacement_wait`."""
        if not self.running or self._helpers is not None or self._replacing is not None:
            return  # stopped; started again meanwhile; already waiting
        # Until then, no pids of the dead ones.
        self._starting = []
        wait = replacement_wait(self._last_wait, self._clock.seconds() - self._started_at)
        self._last_wait = wait
        log.info("counting helper processes are started again in {wait:g} s", wait=wait)
        self._replacing = self._clock.callLater(wait, self._start_helpers, first=False)


def begin_count(
    counting: CountingProcesses | None, directories: Sequence[DirectoryToCount]
) -> SharedCount:
    """`CountingProcesses.begin`, or a count of this thread's alone without ``counting``."""
    if counting is None:
        return SharedCount(directories)
    return counting.begin(directories)


class SharedCount:
    """
    One count (`CountingProcesses.begin`): every message of each directory,
    in batches of at most ``batch``, each of one directory.  Unshared (no
    helper, or too few messages), `finish` counts everything.
    """

    def __init__(
        self,
        directories: Sequence[DirectoryToCount],
        batch: int = BATCH,
        *,
        on_broken: Callable[[_Helpers, str], None] | None = None,
    ) -> None:
        self.directories = tuple(directories)
        batches = []
        first = 0
        for number, directory in enumerate(self.directories):
            for start in range(0, len(directory.names), batch):
                count = min(batch, len(directory.names) - start)
                batches.append(_Batch(number, first + start, count, start))
            first += len(directory.names)
        self._batches = tuple(batches)
        self._messages = first
        self._on_broken = on_broken
        self._helpers: _Helpers | None = None
        self._jobs: list[Future[int]] = []
        #: The shared file, while it is there.
        self._shared: tuple[_Plan, int] | None = None
        self._lock_lost = False
        self._finished = False

    def share_with(self, helpers: _Helpers, processes: int) -> None:
        """Write the shared file and hand the count to the helpers (`CountingProcesses.begin`)."""
        encoded = [os.fsencode("\0".join(self._names(batch))) for batch in self._batches]
        names_at = (len(self._batches) + self._messages) * _SLOT
        batches = []
        for batch, names in zip(self._batches, encoded, strict=True):
            batches.append(replace(batch, names_at=names_at, names_size=len(names)))
            names_at += len(names)
        directories = []
        for directory in self.directories:
            info = os.fstat(directory.directory_fd)
            identity = (info.st_dev, info.st_ino)
            directories.append(
                _SharedDirectory(directory.path, identity, directory.short_read_is_end)
            )
        self._helpers = helpers
        place = None
        descriptor = None
        try:
            # A directory of its own: no one else can put a file at the
            # name a helper opens.  Its owner (as a lock file names one)
            # lets a later server remove it if this one is killed meanwhile.
            place = tempfile.mkdtemp(prefix=SHARED_PREFIX, dir=helpers.shared_directory)
            owner = os.open(os.path.join(place, OWNER), CREATE_FLAGS | os.O_WRONLY, 0o600)
            try:
                os.write(owner, this_process().line())
            finally:
                os.close(owner)
            file = os.path.join(place, "count")
            descriptor = os.open(file, CREATE_FLAGS | os.O_RDWR, 0o600)
            info = os.fstat(descriptor)
            plan = _Plan(
                file,
                (info.st_dev, info.st_ino),
                tuple(directories),
                tuple(batches),
                self._messages,
            )
            # Room taken now (an error if there is none), not at a write
            # through the map (SIGBUS); zeros: every batch FREE.
            os.posix_fallocate(descriptor, 0, plan.file_size)
            with _mapped(descriptor, plan) as (_, _, shared):
                shared[plan.names_at :] = b"".join(encoded)
        except OSError as error:
            # /dev/shm full (64 MB in a container by default), say.
            log.warn(
                "a count of {messages} message sizes is not shared ({error})",
                messages=self._messages,
                error=error,
            )
            if descriptor is not None:
                os.close(descriptor)
            if place is not None:
                shutil.rmtree(place, ignore_errors=True)
            return
        self._shared = (plan, descriptor)
        try:
            for _ in range(min(processes, len(batches))):
                self._jobs.append(helpers.executor.submit(_count_shared, plan))
        except BrokenProcessPool:
            self._broken("ended unexpectedly")
        except RuntimeError:
            pass  # stopped meanwhile: counted in the thread
        except Exception:
            # A helper that could not be started again (one that ended is
            # replaced at a submit).
            log.failure("starting a counting helper process failed")
            self._broken("could not be started again")

    def __enter__(self) -> SharedCount:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def finish(self) -> list[Counted]:
        """
        Count what the helpers have not, from the end, never waiting for a
        helper (one still starting, busy with another count, or reading a
        file system that hangs); then the sizes and errors of each
        directory, in the order of its names.
        """
        if self._finished:
            raise RuntimeError("this count is finished")
        results: list[Counted | None] = [None] * len(self._batches)
        in_helpers = [0] * len(self.directories)
        try:
            if self._shared is not None:
                self._finish_shared(results, in_helpers)
            for number, result in enumerate(results):
                if result is None:
                    results[number] = self._count(self._batches[number])
        finally:
            self.close()
        if self._helpers is not None:
            for directory, count in zip(self.directories, in_helpers, strict=True):
                log.info(
                    "counted {count} message sizes in {path}, {in_helpers} in helper processes",
                    count=len(directory.names),
                    path=directory.path,
                    in_helpers=count,
                )
        counted: list[Counted] = [([], {}) for _ in self.directories]
        for batch, result in zip(self._batches, results, strict=True):
            assert result is not None
            batch_sizes, failures = result
            sizes, all_failures = counted[batch.directory]
            all_failures.update((batch.start + at, error) for at, error in failures.items())
            sizes += batch_sizes
        return counted

    def close(self) -> None:
        """
        Done with (`finish` does this too): batches no helper has started
        are taken from them, the shared file is removed.
        """
        self._finished = True
        shared, self._shared = self._shared, None
        if shared is None:
            return
        plan, descriptor = shared
        assert self._helpers is not None
        try:
            shutil.rmtree(os.path.dirname(plan.file), ignore_errors=True)
            if not self._lock_lost:
                with _mapped(descriptor, plan) as (states, _, _):
                    with _holding(self._helpers.lock) as had:
                        for number, state in enumerate(states.tolist() if had else ()):
                            if state == FREE:
                                states[number] = THREAD_COUNTING
        finally:
            os.close(descriptor)
            self._check_jobs()

    def _finish_shared(self, results: list[Counted | None], in_helpers: list[int]) -> None:
        assert self._shared is not None and self._helpers is not None
        plan, descriptor = self._shared
        lock = self._helpers.lock
        with _mapped(descriptor, plan) as (states, sizes, _):
            # The helpers take batches in order; this thread from the end.
            for number in reversed(range(len(self._batches))):
                state = _take(lock, states, number, THREAD_COUNTING)
                if state is None:
                    self._lose_lock()
                    return  # the rest is counted here
                if state != FREE:
                    break
                results[number] = self._count(self._batches[number])
            with _holding(lock) as had:
                # Read under the lock: the sizes of those counted are written.
                states_now: list[int] = states.tolist() if had else []
            if not had:
                self._lose_lock()
                return
            for number, state in enumerate(states_now):
                if results[number] is None and state == HELPER_COUNTED:
                    batch = self._batches[number]
                    results[number] = (sizes[batch.first : batch.first + batch.count].tolist(), {})
                    in_helpers[batch.directory] += batch.count

    def _lose_lock(self) -> None:
        """Its holder holds it for good (killed holding it): no more sharing."""
        self._lock_lost = True
        self._broken("stopped answering")

    def _broken(self, how: str) -> None:
        if self._on_broken is not None and self._helpers is not None:
            self._on_broken(self._helpers, how)

    def _check_jobs(self) -> None:
        """What became of the helpers' jobs that have ended (never waited for)."""
        for job in self._jobs:
            if not job.done() or job.cancelled():
                continue
            error = job.exception()
            if isinstance(error, BrokenProcessPool):
                self._broken("ended unexpectedly")
            elif error is not None:
                log.failure(
                    "counting sizes in a helper process failed",
                    Failure(error, type(error), error.__traceback__),
                )

    def _names(self, batch: _Batch) -> Sequence[str]:
        return self.directories[batch.directory].names[batch.start : batch.start + batch.count]

    def _count(self, batch: _Batch) -> Counted:
        """A batch, counted in this thread."""
        directory = self.directories[batch.directory]
        return wire_sizes(
            directory.directory_fd,
            self._names(batch),
            short_read_is_end=directory.short_read_is_end,
        )


def _remove_left_behind(shared_directory: str | None) -> None:
    """
    Remove the directories of shared counts that servers of this user left
    when they ended in the middle of a count without cleaning up (SIGKILL,
    out of memory): ``/dev/shm`` is memory, kept until the machine restarts.
    Only one whose owner is known to be gone (`LockOwner.is_gone`: on this
    host, in this boot and process-id namespace) is removed.
    """
    place = shared_directory if shared_directory is not None else tempfile.gettempdir()
    try:
        entries = [entry for entry in os.scandir(place) if entry.name.startswith(SHARED_PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            directory_fd = os.open(entry.path, DIRECTORY_FLAGS)
        except OSError:
            continue
        try:
            mine = os.fstat(directory_fd).st_uid == os.geteuid()
            content = read_small_file(OWNER, directory_fd) if mine else None
        finally:
            os.close(directory_fd)
        owner = LockOwner.parse(content) if content is not None else None
        if owner is not None and owner.is_gone():
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed {path}, left by a server that ended while counting", path=entry.path)
