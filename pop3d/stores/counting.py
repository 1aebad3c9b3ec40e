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
"""

from __future__ import annotations

import errno
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
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


def _count_in_helper(
    path: str, identity: tuple[int, int], names: list[str], short_read_is_end: bool
) -> Counted | None:
    """
    `wire_sizes` in a helper process, of the directory ``path`` if it is
    still the one the asking thread holds open (device and inode
    ``identity``); None if not.
    """
    try:
        directory_fd = os.open(path, DIRECTORY_FLAGS)
    except OSError:
        return None
    try:
        info = os.fstat(directory_fd)
        if (info.st_dev, info.st_ino) != identity:
            return None  # replaced since: the asking thread counts
        return wire_sizes(directory_fd, names, short_read_is_end=short_read_is_end)
    finally:
        os.close(directory_fd)


#: In a helper: what its first job waits at until every helper has one.
_all_started: threading.Barrier | None = None


def _started() -> int:
    """A helper's first job: every helper takes one, so that all have started."""
    if _all_started is not None:
        _all_started.wait()
    return os.getpid()


def _prepare_helper(all_started: threading.Barrier) -> None:
    """
    In a helper, before its first job: it ignores the signals that reach
    every process of the server (a Ctrl-C or hang-up sent to its process
    group, the service manager's SIGTERM to all of them: the server's to
    act on), and ends when the server's process does, however that ends.
    """
    global _all_started
    _all_started = all_started
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
    no lock.  It ignores SIGINT, SIGHUP and SIGTERM (sent to the server's
    process group or all its processes, they are the server's to act on)
    and ends when the server's process does, however it ends.  It runs as
    the server's user and opens a directory by its path only to count the
    messages of the one the asking thread holds open, checked by device and
    inode.

    A count of at least two batches (``batch`` messages) is shared: the
    helpers take batches from the front while the thread takes back, from
    the end, every batch that no helper has started; then the thread takes
    the batches the helpers have counted and counts every other one itself,
    never waiting for a helper (one still starting, busy with another
    login, or reading a file system that hangs).  A batch a helper could
    not count (it died, the directory was replaced) is counted by the
    thread.  Not running, this counts in the thread.

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
            executor = ProcessPoolExecutor(
                self.processes,
                mp_context=self._context,
                initializer=_prepare_helper,
                initargs=(self._context.Barrier(self.processes),),
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
        executor = self._executor
        if executor is None or len(names) < 2 * self.batch:
            return wire_sizes(directory_fd, names, short_read_is_end=short_read_is_end)
        info = os.fstat(directory_fd)
        identity = (info.st_dev, info.st_ino)
        batches = [list(names[at : at + self.batch]) for at in range(0, len(names), self.batch)]
        futures: list[Future[Counted | None]] = []
        try:
            for batch in batches:
                futures.append(
                    executor.submit(_count_in_helper, path, identity, batch, short_read_is_end)
                )
        except BrokenProcessPool:
            self._broken(executor)  # the rest is counted here
        except RuntimeError:
            pass  # stopped meanwhile: the rest is counted here
        except Exception:
            # A helper that could not be started again (one that ended is
            # replaced at a submit).
            log.failure("starting a counting helper process failed")
            self._broken(executor)
        results: list[Counted | None] = [None] * len(batches)
        # The helpers take batches in order; this thread from the end.
        for position in reversed(range(len(batches))):
            if position >= len(futures) or futures[position].cancel():
                results[position] = wire_sizes(
                    directory_fd, batches[position], short_read_is_end=short_read_is_end
                )
        in_helpers = 0
        for position, future in enumerate(futures):
            if results[position] is not None:
                continue
            counted: Counted | None = None
            # Never waited for: a helper may still be starting, busy with
            # another count, or reading a file system that hangs; counting
            # a batch here costs no more than waiting for it would.
            if future.done():
                try:
                    counted = future.result()
                except BrokenProcessPool:
                    self._broken(executor)
                except CancelledError:
                    pass  # stopped meanwhile
                except Exception:
                    log.failure("counting sizes in a helper process failed")
            if counted is None:
                counted = wire_sizes(
                    directory_fd, batches[position], short_read_is_end=short_read_is_end
                )
            else:
                in_helpers += len(batches[position])
            results[position] = counted
        log.info(
            "counted {count} message sizes in {path}, {in_helpers} in helper processes",
            count=len(names),
            path=path,
            in_helpers=in_helpers,
        )
        sizes: list[int] = []
        failures: dict[int, OSError] = {}
        for position, result in enumerate(results):
            assert result is not None
            batch_sizes, batch_failures = result
            start = position * self.batch
            failures.update((start + at, error) for at, error in batch_failures.items())
            sizes += batch_sizes
        return sizes, failures

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        """A helper died (killed, out of memory): counting goes on in the threads."""
        if self._executor is executor:
            self._executor = None
            log.error(
                "a counting helper process ended unexpectedly; "
                "message sizes are counted in this process from now on"
            )
            executor.shutdown(wait=False, cancel_futures=True)
            # Reaped here: CPython 3.11's executor thread may itself end
            # before it does (gh-107219), leaving the dead helper a zombie.
            multiprocessing.active_children()
