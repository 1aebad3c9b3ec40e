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

A count is shared through a small file in shared memory (``/dev/shm``), made
and removed by the thread that asks: the names to count, a state per batch
and a size per message.  Helpers take batches from the front and the thread
from the end, each taking one under a lock the helpers inherit; a helper
needs nothing from the server's process while it counts, so the thread
that asks can do other work meanwhile (`CountingProcesses.begin`), and the
batches never wait for the server's interpreter lock to be handed out.
"""

from __future__ import annotations

import errno
import functools
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import signal
import tempfile
import threading
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.synchronize import Lock
from types import TracebackType
from typing import TypeAlias

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.stores.common import run_blocking
from pop3d.stores.posix import DIRECTORY_FLAGS, READ_FLAGS, UNSEEN_READ_FLAGS
from pop3d.wire import WireSizeCounter, wire_size

#: What `wire_sizes` gives a message it left out (gone, or not a message)
#: or could not read (the error is beside it).
NOT_COUNTED = -1
#: Messages a helper is given at a time: about 10 ms of its work.  The
#: thread that asks takes back every batch that no helper has started, so
#: at the end it waits for at most a batch or two per helper.
BATCH = 2048
#: One read asks for this much; most messages are read in one go.
READ_SIZE = 256 * 1024
#: The lock that hands out batches is held for microseconds; not had within
#: this long, its holder died holding it (or the machine is stalled), and
#: counting goes on without the helpers.
LOCK_PATIENCE_SECONDS = 2.0
#: Where the files of shared counts are made: memory, not a disk, on Linux.
#: (Made there as any private temporary file is: a new random name, O_EXCL,
#: readable by the server's user only.)
SHARED_MEMORY = "/dev/shm"  # noqa: S108

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
            first = read(fd, READ_SIZE)
            # One octet more asked tells a short read from the end (no
            # buffer of READ_SIZE made for nothing), unless the file system
            # already did.
            if len(first) < READ_SIZE and short_read_is_end:
                more = b""
            else:
                more = read(fd, 1 if len(first) < READ_SIZE else READ_SIZE) if first else b""
            if not more:
                sizes.append(wire_size(first))  # most messages: read in one go
            else:
                counter = WireSizeCounter()
                counter.feed(first)
                counter.feed(more)
                while chunk := read(fd, READ_SIZE):
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
#: the front, the thread from the end; the state changes under the lock.
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
    """Messages ``first`` to ``first + count`` of the count, all of one directory."""

    directory: int
    first: int
    count: int
    #: Where its names are in the file, NUL-separated (`os.fsencode`).
    names_at: int
    names_size: int


@dataclass(frozen=True)
class _Plan:
    """What a helper is told of a shared count; the rest is in ``file``."""

    file: str
    #: (path, (device, inode), short read is the end) of each directory.
    directories: tuple[tuple[str, tuple[int, int], bool], ...]
    batches: tuple[_Batch, ...]
    messages: int

    @property
    def sizes_at(self) -> int:
        return len(self.batches) * _SLOT

    @property
    def file_size(self) -> int:
        last = self.batches[-1]
        return last.names_at + last.names_size


@contextmanager
def _mapped(descriptor: int, plan: _Plan) -> Iterator[tuple[memoryview, memoryview, mmap.mmap]]:
    """The states and sizes of a shared count's file, as integers, and the whole map."""
    shared = mmap.mmap(descriptor, plan.file_size)
    view = memoryview(shared)
    states = view[: plan.sizes_at].cast("q")
    sizes = view[plan.sizes_at : plan.sizes_at + plan.messages * _SLOT].cast("q")
    try:
        yield states, sizes, shared
    finally:
        # Every view released before the map can close.
        states.release()
        sizes.release()
        view.release()
        shared.close()


def _count_shared(plan: _Plan) -> int:
    """
    In a helper: count batches of a shared count from the front until the
    thread has taken the rest; a batch of a directory that is not the one
    the thread holds open (replaced since: device and inode differ), or
    with a message it could not read, is left to the thread (which then
    has each error).  Returns how many messages it counted.
    """
    lock = _claims
    assert lock is not None
    try:
        descriptor = os.open(plan.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0  # finished before this helper came to it
    directories: dict[int, int | None] = {}
    counted = 0
    try:
        with _mapped(descriptor, plan) as (states, sizes, shared):
            for number, batch in enumerate(plan.batches):
                if not lock.acquire(timeout=LOCK_PATIENCE_SECONDS):
                    break
                try:
                    state = states[number]
                    if state == FREE:
                        states[number] = HELPER_COUNTING
                finally:
                    lock.release()
                if state == THREAD_COUNTING:
                    break  # and every batch after it
                if state != FREE:
                    continue  # another helper's
                directory_fd = directories.get(batch.directory, -1)
                if directory_fd == -1:
                    directory_fd = directories[batch.directory] = _open_directory(
                        *plan.directories[batch.directory][:2]
                    )
                outcome = LEFT_TO_THREAD
                if directory_fd is not None:
                    names = os.fsdecode(
                        shared[batch.names_at : batch.names_at + batch.names_size]
                    ).split("\0")
                    short_read_is_end = plan.directories[batch.directory][2]
                    batch_sizes, failures = wire_sizes(
                        directory_fd, names, short_read_is_end=short_read_is_end
                    )
                    if not failures:
                        sizes[batch.first : batch.first + batch.count] = array("q", batch_sizes)
                        outcome = HELPER_COUNTED
                        counted += batch.count
                if not lock.acquire(timeout=LOCK_PATIENCE_SECONDS):
                    break
                try:
                    # The lock orders the sizes' writing before the state's
                    # reading in the thread.
                    states[number] = outcome
                finally:
                    lock.release()
    finally:
        os.close(descriptor)
        for directory_fd in directories.values():
            if directory_fd is not None:
                os.close(directory_fd)
    return counted


def _open_directory(path: str, identity: tuple[int, int]) -> int | None:
    """The directory ``path`` if it is still the one of device and inode ``identity``."""
    try:
        directory_fd = os.open(path, DIRECTORY_FLAGS)
    except OSError:
        return None
    info = os.fstat(directory_fd)
    if (info.st_dev, info.st_ino) != identity:
        os.close(directory_fd)
        return None  # replaced since: the thread counts
    return directory_fd


#: In a helper: what its first job waits at until every helper has one.
_all_started: threading.Barrier | None = None
#: In a helper: the lock under which batches of shared counts are taken.
_claims: Lock | None = None


def _started() -> int:
    """A helper's first job: every helper takes one, so that all have started."""
    if _all_started is not None:
        _all_started.wait()
    return os.getpid()


def _prepare_helper(all_started: threading.Barrier, claims: Lock) -> None:
    """
    In a helper, before its first job: it ignores the signals that reach
    every process of the server (a Ctrl-C or hang-up sent to its process
    group, the service manager's SIGTERM to all of them: the server's to
    act on), and ends when the server's process does, however that ends.
    """
    global _all_started, _claims
    _all_started = all_started
    _claims = claims
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    server = multiprocessing.parent_process()
    if server is not None:
        threading.Thread(target=_exit_after, args=(server.sentinel,), daemon=True).start()


def _exit_after(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


class CountingProcesses(Service):
    """
    ``processes`` helper processes that count messages' sizes with the
    thread that asks (`wire_sizes`), started and stopped with the service.

    Each is a fresh interpreter (``multiprocessing``'s ``spawn``, unless
    ``context`` says otherwise), so it inherits no descriptor of the server
    but standard input, output and error: no listening socket, no client,
    no maildrop's lock.  It ignores SIGINT, SIGHUP and SIGTERM (sent to the server's
    process group or all its processes, they are the server's to act on)
    and ends when the server's process does, however it ends.  It runs as
    the server's user and opens a directory by its path only to count the
    messages of the one the asking thread holds open, checked by device and
    inode.

    A count of at least two batches (``batch`` messages) is shared through
    a file in ``/dev/shm`` (else the temporary directory), readable by the
    server's user only and removed when the count ends: the helpers take
    batches from the front while the thread takes, from the end, every
    batch that no helper has started; then the thread takes the batches the
    helpers have counted and counts every other one itself, never waiting
    for a helper (one still starting, busy with another login, or reading a
    file system that hangs).  A batch a helper could not count (it died,
    the directory was replaced, a message could not be read) is counted by
    the thread.  Not running, this counts in the thread.

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
    ) -> None:
        if processes < 0:
            raise ValueError("the number of counting processes cannot be negative")
        if batch < 1:
            raise ValueError("a batch holds at least one message")
        self.processes = processes
        self.batch = batch
        self._reactor = reactor
        self._context = context if context is not None else multiprocessing.get_context("spawn")
        self._executor: ProcessPoolExecutor | None = None
        self._claims: Lock | None = None
        self._starting: list[Future[int]] = []

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self.processes:
            return
        executor: ProcessPoolExecutor | None = None
        try:
            interpreter = os.fsdecode(multiprocessing.spawn.get_executable())
            if not os.access(interpreter, os.X_OK):
                # Said plainly: what fails next would be an import of the
                # standard library, or a pipe to a helper that never ran.
                raise PermissionError(errno.EACCES, "this user cannot run", interpreter)
            claims = self._context.Lock()
            executor = ProcessPoolExecutor(
                self.processes,
                mp_context=self._context,
                initializer=_prepare_helper,
                initargs=(self._context.Barrier(self.processes), claims),
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
            return
        self._executor = executor
        self._claims = claims
        self.when_started().addCallbacks(self._started, self._not_started)

    def _started(self, pids: list[int]) -> None:
        log.info("counting helper processes started: {pids}", pids=pids)

    def _not_started(self, failure: Failure) -> None:
        if self.running:  # not merely stopped before they were up
            log.failure("counting helper processes did not start", failure)

    def when_started(self) -> Deferred[list[int]]:
        """
        Fires with the process ids of the helpers once they have started
        (with none if there are none), or an error if they could not.
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
        then ends after its batch, waited for in the thread pool (twistd
        ends its process as soon as the services have stopped; a helper
        left behind then ends by itself, but multiprocessing's resource
        tracker complains on standard error).
        """
        super().stopService()  # type: ignore[no-untyped-call]
        executor, self._executor = self._executor, None
        # Freed with the executor (its semaphore removed: the resource
        # tracker would call it leaked when twistd ends its process).
        self._claims = None
        if executor is None:
            return succeed(None)
        stop = functools.partial(executor.shutdown, wait=True, cancel_futures=True)
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
        Start counting the messages of ``directories`` (held open until
        `SharedCount.finish`): from a thread, not the reactor's.  The
        helpers begin at once; the thread may do other work before it calls
        `SharedCount.finish`, which counts what is left.  Use it as a
        context manager: leaving it unfinished (an error meanwhile) stops
        the helpers' part and removes the shared file.
        """
        executor = self._executor
        count = SharedCount(self, directories, self.batch)
        if executor is None or sum(len(d.names) for d in directories) < 2 * self.batch:
            return count
        try:
            assert self._claims is not None
            count.share(executor, self._claims, self.processes)
        except BrokenProcessPool:
            self._broken(executor)  # counted in the thread
        except RuntimeError:
            pass  # stopped meanwhile: counted in the thread
        except Exception:
            # A helper that could not be started again (one that ended is
            # replaced at a submit), or no room for the shared file.
            log.failure("sharing a count with the counting helper processes failed")
            count.unshare()
        return count

    def _broken(self, executor: ProcessPoolExecutor, how: str = "ended unexpectedly") -> None:
        """
        A helper died (killed, out of memory), or holds the lock for good:
        counting goes on in the threads.
        """
        if self._executor is executor:
            self._executor = self._claims = None
            log.error(
                "a counting helper process {how}; "
                "message sizes are counted in this process from now on",
                how=how,
            )
            executor.shutdown(wait=False, cancel_futures=True)
            # Reaped here: CPython 3.11's executor thread may itself end
            # before it does (gh-107219), leaving the dead helper a zombie.
            multiprocessing.active_children()

    def _checked(self, executor: ProcessPoolExecutor, futures: Sequence[Future[int]]) -> None:
        """What became of a shared count's jobs that have ended (never waited for)."""
        for future in futures:
            if not future.done() or future.cancelled():
                continue
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                self._broken(executor)
            elif error is not None:
                log.failure(
                    "counting sizes in a helper process failed",
                    Failure(error, type(error), error.__traceback__),
                )


def begin_count(
    counting: CountingProcesses | None, directories: Sequence[DirectoryToCount]
) -> SharedCount:
    """`CountingProcesses.begin`, or a count of this thread's alone without ``counting``."""
    if counting is None:
        return SharedCount(None, directories)
    return counting.begin(directories)


class SharedCount:
    """
    One count of `CountingProcesses.begin`: every message of each
    directory, in batches of at most ``batch``, all of one directory each.
    Unshared (no helper, or too few messages), `finish` counts everything.
    """

    def __init__(
        self,
        pool: CountingProcesses | None,
        directories: Sequence[DirectoryToCount],
        batch: int = BATCH,
    ) -> None:
        self.directories = tuple(directories)
        batches: list[tuple[int, int, int]] = []
        first = 0
        for number, directory in enumerate(self.directories):
            for at in range(0, len(directory.names), batch):
                batches.append((number, first + at, min(batch, len(directory.names) - at)))
            first += len(directory.names)
        #: (directory, first message of the count, how many) of each batch.
        self.batches = batches
        self._pool = pool
        self._executor: ProcessPoolExecutor | None = None
        self._claims: Lock | None = None
        self._plan: _Plan | None = None
        self._descriptor: int | None = None
        self._futures: list[Future[int]] = []
        self._finished = False

    def share(self, executor: ProcessPoolExecutor, claims: Lock, helpers: int) -> None:
        """Write the shared file and hand the count to the helpers (`CountingProcesses.begin`)."""
        starts = [0]
        for directory in self.directories:
            starts.append(starts[-1] + len(directory.names))
        encoded = []
        for which, first, count in self.batches:
            at = first - starts[which]
            names = self.directories[which].names[at : at + count]
            encoded.append(os.fsencode("\0".join(names)))
        names_at = (len(self.batches) + starts[-1]) * _SLOT
        batches = []
        for (which, first, count), names_of_batch in zip(self.batches, encoded, strict=True):
            batches.append(_Batch(which, first, count, names_at, len(names_of_batch)))
            names_at += len(names_of_batch)
        directories = []
        for directory in self.directories:
            info = os.fstat(directory.directory_fd)
            identity = (info.st_dev, info.st_ino)
            directories.append((directory.path, identity, directory.short_read_is_end))
        self._claims = claims
        self._executor = executor
        place = SHARED_MEMORY if os.path.isdir(SHARED_MEMORY) else None
        descriptor, file = tempfile.mkstemp(prefix="pop3d-count-", dir=place)
        self._descriptor = descriptor
        plan = self._plan = _Plan(file, tuple(directories), tuple(batches), starts[-1])
        # Made of zeros: every batch FREE.
        os.ftruncate(descriptor, plan.file_size)
        names = memoryview(b"".join(encoded))
        written = 0
        while written < len(names):  # a signal can cut a write short
            written += os.pwrite(descriptor, names[written:], batches[0].names_at + written)
        for _ in range(min(helpers, len(batches))):
            self._futures.append(executor.submit(_count_shared, plan))

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
        results: list[Counted | None] = [None] * len(self.batches)
        in_helpers = [0] * len(self.directories)
        try:
            if self._descriptor is not None:
                self._finish_shared(results, in_helpers)
            for number, result in enumerate(results):
                if result is None:
                    results[number] = self._count(number)
        finally:
            self.close()
        if self._executor is not None:
            for directory, count in zip(self.directories, in_helpers, strict=True):
                log.info(
                    "counted {count} message sizes in {path}, {in_helpers} in helper processes",
                    count=len(directory.names),
                    path=directory.path,
                    in_helpers=count,
                )
        counted: list[Counted] = [([], {}) for _ in self.directories]
        for (which, _, _), result in zip(self.batches, results, strict=True):
            assert result is not None
            batch_sizes, failures = result
            sizes, all_failures = counted[which]
            all_failures.update((len(sizes) + at, error) for at, error in failures.items())
            sizes += batch_sizes
        return counted

    def close(self) -> None:
        """Done with (`finish` does this too): see `unshare`."""
        self._finished = True
        self.unshare()

    def unshare(self) -> None:
        """
        The helpers' part stopped (one that has the shared file open finds
        every batch taken) and the file removed; `finish` counts the rest.
        """
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        assert self._plan is not None and self._claims is not None
        try:
            os.unlink(self._plan.file)
            with _mapped(descriptor, self._plan) as (states, _, _):
                if self._claims.acquire(timeout=LOCK_PATIENCE_SECONDS):
                    try:
                        for number, state in enumerate(states.tolist()):
                            if state == FREE:
                                states[number] = THREAD_COUNTING
                    finally:
                        self._claims.release()
        finally:
            os.close(descriptor)
            assert self._pool is not None and self._executor is not None
            self._pool._checked(self._executor, self._futures)

    def _finish_shared(self, results: list[Counted | None], in_helpers: list[int]) -> None:
        assert self._descriptor is not None and self._plan is not None
        with _mapped(self._descriptor, self._plan) as (states, sizes, _):
            # The helpers take batches in order; this thread from the end.
            for number in reversed(range(len(self.batches))):
                taken = self._take(states, number)
                if taken is None:
                    return  # the lock is lost: the rest is counted here
                if not taken:
                    break
                results[number] = self._count(number)
            final = self._states(states)
            if final is None:
                return
            for number, state in enumerate(final):
                if results[number] is None and state == HELPER_COUNTED:
                    directory, first, count = self.batches[number]
                    results[number] = (sizes[first : first + count].tolist(), {})
                    in_helpers[directory] += count

    def _take(self, states: memoryview, number: int) -> bool | None:
        """Take batch ``number`` if no helper has; None if the lock cannot be had."""
        assert self._claims is not None
        if not self._claims.acquire(timeout=LOCK_PATIENCE_SECONDS):
            self._lock_lost()
            return None
        try:
            if states[number] != FREE:
                return False
            states[number] = THREAD_COUNTING
            return True
        finally:
            self._claims.release()

    def _states(self, states: memoryview) -> list[int] | None:
        """Every batch's state (read under the lock: the sizes of those counted are written)."""
        assert self._claims is not None
        if not self._claims.acquire(timeout=LOCK_PATIENCE_SECONDS):
            self._lock_lost()
            return None
        try:
            states_now: list[int] = states.tolist()
            return states_now
        finally:
            self._claims.release()

    def _lock_lost(self) -> None:
        assert self._pool is not None and self._executor is not None
        self._pool._broken(self._executor, "stopped answering")

    def _count(self, number: int) -> Counted:
        """Batch ``number``, counted in this thread."""
        directory, first, count = self.batches[number]
        at = first - sum(len(d.names) for d in self.directories[:directory])
        to_count = self.directories[directory]
        return wire_sizes(
            to_count.directory_fd,
            to_count.names[at : at + count],
            short_read_is_end=to_count.short_read_is_end,
        )
