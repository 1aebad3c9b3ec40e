"""
Every core: ``--workers N`` runs N worker processes that accept on the same
listening sockets.

The parent listens as a single server would (so ``systemd:`` socket
activation, privileged ports and port 0 work as usual), stops accepting
itself, and starts the workers with the listening sockets as inherited file
descriptors; each worker adopts them (``adoptStreamPort``) and serves POP3
as a whole server does.  The kernel hands each new connection to one worker.
A worker that dies is started again; it takes no mail with it, since its
sessions never reached UPDATE.  Its maildrop locks hold across processes
(`pop3d.stores.posix`): the kernel drops its ``fcntl`` locks (the Maildir
lock table, the lock on an mbox), and the lock files or mbox dotlocks it
leaves are broken by the next login on this host, which sees that their
process is gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import IO, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.logformat import escape_braces, render_format
from pop3d.protocol import describe_address

log = Logger()

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0
#: Seconds the workers have to end after SIGTERM, before SIGKILL: longer
#: than a worker gives its sessions in UPDATE (`pop3d.lifecycle.DRAIN_TIMEOUT`).
STOP_TIMEOUT = 10.0
#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0
#: The longest line of a worker's output held while its end is awaited.
MAX_LOG_LINE = 1024 * 1024
#: The shortest time between two writes of a busy worker's log lines to the
#: parent (see `WorkerLogLines`): the longest a line waits.
LOG_WRITE_INTERVAL = 0.02
#: The most a worker writes to a `SharedLog` at once: what the kernel writes
#: whole to a pipe (POSIX's PIPE_BUF), so that no other process's line can
#: come in the middle of it.
SHARED_LOG_WRITE = select.PIPE_BUF


@dataclass(frozen=True)
class SharedLog:
    """
    The parent's log when it is the parent's standard output (``twistd -n``
    without ``--logfile``, or ``--logfile -``: the journal under systemd, a
    container's log): each worker writes its own lines to it, as twistd
    writes the parent's, instead of sending them to the parent to write.
    Each write is whole lines and at most `SHARED_LOG_WRITE` bytes, which
    a pipe never splits, so that no other process's line lands in the
    middle of a worker's; a longer line (a traceback) goes through the
    parent as before, and may come after lines logged after it.

    ``fd`` is the worker's descriptor of that output; ``encoding`` the one
    the worker's standard output writes in (the parent's environment's).
    ``overflow``, when given, takes the lines too long for one write
    instead of the parent: in a single process under ``twistd -n``, whose
    session lines pop3d writes itself, twistd's own observer.
    """

    fd: int
    encoding: str = "utf-8"
    overflow: ILogObserver | None = None


@dataclass(frozen=True)
class InheritedSocket:
    """A listening socket a worker adopts: its descriptor and address family."""

    fd: int
    family: int

    def __str__(self) -> str:
        return f"{self.fd}:{self.family}"

    @classmethod
    def parse_all(cls, text: str) -> list[InheritedSocket]:
        """The ``--worker-sockets`` value: ``FD:FAMILY,FD:FAMILY,...``."""
        sockets = []
        for item in text.split(","):
            fd, _, family = item.partition(":")
            if not (fd.isdigit() and family.isdigit()):
                raise ValueError(f"expected FD:FAMILY, got {item!r}")
            sockets.append(cls(int(fd), int(family)))
        return sockets


class AdoptedPorts(Service):
    """In a worker: accept on the inherited sockets, one factory each."""

    def __init__(
        self,
        reactor: IReactorSocket,
        sockets: Sequence[InheritedSocket],
        factories: Sequence[IProtocolFactory],
    ) -> None:
        self._reactor = reactor
        self._sockets = list(sockets)
        self._factories = list(factories)
        self._ports: list[IListeningPort] = []
        self._parent_watch = LoopingCall(lambda: None)

    def startService(self) -> None:
        super().startService()
        # When the parent is gone, however it went, so is the worker: no
        # one would restart it or pass signals on, and it keeps the port.
        parent = os.getppid()
        self._parent_watch = LoopingCall(self._stop_if_orphaned, parent)
        self._parent_watch.clock = cast(IReactorTime, self._reactor)
        self._parent_watch.start(PARENT_CHECK_INTERVAL, now=False)
        for inherited, factory in zip(self._sockets, self._factories, strict=True):
            family = socket.AddressFamily(inherited.family)
            port = self._reactor.adoptStreamPort(inherited.fd, family, factory)  # type: ignore[arg-type]
            # adoptStreamPort duplicates the descriptor.
            os.close(inherited.fd)
            self._ports.append(port)
            log.info(
                "pop3d worker {pid} listening on {address}",
                pid=os.getpid(),
                address=describe_address(port.getHost()),
            )

    def _stop_if_orphaned(self, parent: int) -> None:
        if os.getppid() != parent:
            log.info("the parent process is gone; worker {pid} stops", pid=os.getpid())
            self._parent_watch.stop()
            cast(IReactorCore, self._reactor).stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._parent_watch.running:
            self._parent_watch.stop()
        ports, self._ports = self._ports, []
        stopped = DeferredList([port.stopListening() for port in ports])  # type: ignore[misc]
        return stopped.addCallback(lambda _: None)


class _NotAccepting(Factory):
    """The parent's listening ports never accept: the workers do."""

    def buildProtocol(self, addr: object) -> Protocol | None:
        return None


class WorkerPool(Service):
    """
    In the parent: listen on ``endpoints``, then keep ``count`` workers
    running, each started as ``command`` + ``--worker-sockets FD:FAMILY,...``.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        endpoints: Sequence[IStreamServerEndpoint],
        command: Sequence[str],
        count: int,
        descriptions: Sequence[str] = (),
        log_observer: ILogObserver = globalLogPublisher,
        shared_log: int | None = None,
    ) -> None:
        self._reactor = reactor
        #: Where the workers' log events go: this process's log (its
        #: --logfile, --syslog or standard output), so one writer has it all.
        self.log_observer = log_observer
        # This process's log when it is a descriptor the workers can write
        # to themselves (`SharedLog`): their standard output.
        self._shared_log = shared_log
        self._endpoints = list(endpoints)
        self._descriptions = list(descriptions) or [""] * len(self._endpoints)
        self._command = list(command)
        self._count = count
        self._ports: list[IListeningPort] = []
        self._own_sockets: list[socket.socket] = []
        # For each worker, its listening sockets, in --listen order.
        self._sockets: list[list[InheritedSocket]] = [[] for _ in range(count)]
        self._workers: dict[int, _Worker] = {}
        #: Variables the workers get on top of this process's environment
        #: (e.g. prometheus_client's directory for --metrics with --workers).
        self.environment: dict[str, str] = {}
        #: Called with the process id of each worker that has exited (e.g.
        #: to drop its live gauges from --metrics), before it is restarted.
        self.on_worker_exit: Callable[[int], None] | None = None
        self._bound = False

    def privilegedStartService(self) -> None:
        # Before twistd gives up root (--uid/--gid): ports below 1024 are
        # bound here, and the workers, started later, run as the new user.
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if not self._bound:
            self._bind()
        for number in range(self._count):
            self._start(number)

    def _bind(self) -> None:
        self._bound = True
        failures: list[Failure] = []
        for endpoint, description in zip(self._endpoints, self._descriptions, strict=True):
            address = tcp_address(description)
            if address is not None:
                # A socket per worker on one port (SO_REUSEPORT): the kernel
                # spreads connections across workers.  A shared socket would
                # give a burst of connections to whichever worker woke first.
                for number, listener in enumerate(reuseport_sockets(address, self._count)):
                    self._own_sockets.append(listener)
                    self._sockets[number].append(
                        InheritedSocket(listener.fileno(), listener.family)
                    )
                continue
            listening = endpoint.listen(_NotAccepting())
            listening.addCallbacks(self._share, failures.append)
        if failures:
            failures[0].raiseException()

    def _share(self, port: IListeningPort) -> None:
        """One socket for all workers (UNIX sockets, systemd's sockets)."""
        self._ports.append(port)
        # Port objects of these endpoints: the socket is theirs.
        port.stopReading()  # type: ignore[attr-defined]
        listener: socket.socket = port.socket  # type: ignore[attr-defined]
        for sockets in self._sockets:
            sockets.append(InheritedSocket(listener.fileno(), listener.family))

    def _start(self, number: int) -> None:
        if not self.running:
            return
        # The workers see the sockets at descriptors 3, 4, ... in order.
        own = self._sockets[number]
        inherited = [InheritedSocket(3 + i, s.family) for i, s in enumerate(own)]
        # Standard output: the worker's log events (pop3d.tap.worker_log_observer),
        # or this process's log, which the worker writes to itself
        # (pop3d.tap.worker_shared_log_observer); standard error: whatever
        # it writes before its log starts, and its lines too long for the
        # shared log.
        output: int | str = "r" if self._shared_log is None else self._shared_log
        child_fds: dict[int, int | str] = {0: 0, 1: output, 2: "r"}
        child_fds.update({s.fd: parent.fd for s, parent in zip(inherited, own, strict=True)})
        arguments = [*self._command, "--worker-sockets", ",".join(map(str, inherited))]
        worker = _Worker(self, number)
        self._workers[number] = worker
        process = self._reactor.spawnProcess(
            worker,
            arguments[0],
            arguments,
            env={**os.environ, **self.environment},
            childFDs=child_fds,
        )
        # Kept: the transport forgets its pid once the process has ended.
        worker.pid = process.pid
        log.info("started worker {number}", number=number)

    def worker_pids(self) -> list[int]:
        """The process ids of the workers running now."""
        pids = []
        for worker in self._workers.values():
            pid = getattr(worker.transport, "pid", None)
            if isinstance(pid, int):
                pids.append(pid)
        return pids

    def signal_workers(self, name: str) -> None:
        """Pass a signal on to every worker (SIGHUP: reload the certificate)."""
        for worker in self._workers.values():
            worker.send(name)

    def worker_ended(self, number: int, reason: Failure) -> None:
        worker = self._workers.pop(number, None)
        if worker is not None and worker.pid is not None and self.on_worker_exit is not None:
            try:
                self.on_worker_exit(worker.pid)
            except Exception:
                log.failure("after worker {number} exited", number=number)
        if worker is not None and worker.stopped is not None:
            worker.stopped.callback(None)
        if self.running:
            log.warn(
                "worker {number} ended ({reason}); starting it again",
                number=number,
                reason=reason.getErrorMessage(),
            )
            clock = cast(IReactorTime, self._reactor)
            clock.callLater(RESTART_DELAY, self._start, number)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        ending = []
        for worker in list(self._workers.values()):
            worker.stopped = Deferred()
            ending.append(worker.stopped)
            worker.terminate()
        for port in self._ports:
            port.stopListening()
        self._ports = []
        for listener in self._own_sockets:
            listener.close()
        self._own_sockets = []
        # A worker that does not end when asked is killed.
        clock = cast(IReactorTime, self._reactor)
        laggards = clock.callLater(STOP_TIMEOUT, self.signal_workers, "KILL")

        def ended(_: object) -> None:
            if laggards.active():
                laggards.cancel()

        return DeferredList(ending).addCallback(ended)


@implementer(ILogObserver)
class WorkerLogLines:
    """
    Writes each event as the few fields a log line is made of, its text
    already formatted (and a failure's traceback as text): a busy worker
    logs a few lines per session, and the parent reads every worker's, so
    neither side flattens or rebuilds whole events.

    While ``keeping()`` (in the worker: the reactor runs and this is its
    thread), lines are kept and written together at the end of a reactor
    turn, at most one write per ``interval`` seconds: a line logged after a
    quiet spell goes out at the end of its turn, and a busy worker wakes the
    parent once per ``interval`` for all its sessions (a write per line
    woke it twice per session of a login storm).  Each worker's lines keep
    their order (but for a shared log's lines too long for it); two
    workers' lines may reach the parent's log up to ``interval`` out of
    time order.  Otherwise (the thread pool logging, the
    reactor not yet or no longer running) a line is written at once, after
    those kept before it.
    `flush` writes what is kept.

    With a ``shared`` log (`SharedLog`), lines go there as twistd's
    observer would have written them (`classic_line`); ``output`` then only
    takes the lines too long for one write to it, or nothing (None) when
    the shared log's ``overflow`` takes them.
    """

    def __init__(
        self,
        output: IO[str] | None,
        clock: IReactorTime,
        keeping: Callable[[], bool],
        interval: float = LOG_WRITE_INTERVAL,
        shared: SharedLog | None = None,
    ) -> None:
        if output is None and (shared is None or shared.overflow is None):
            raise ValueError("lines too long for the shared log need an output or an overflow")
        self._output = output
        self._clock = clock
        self._keeping = keeping
        self._interval = interval
        self._shared = shared
        self._stamps = TimeStamps()
        # Lines for the parent (str: JSON) and, with a shared log, for it
        # (bytes: whole lines, encoded).
        self._kept: list[str | bytes] = []
        self._flush_pending = False
        self._last_write = -interval
        # The thread pool logs too: one writer at a time, in order.
        # Re-entrant: a signal handler logs ("Received SIGTERM") wherever
        # the main thread is, in here too.
        self._lock = threading.RLock()
        self._writing = False

    def __call__(self, event: LogEvent) -> None:
        line = self._line(event)
        if line is None:
            return
        with self._lock:
            self._kept.append(line)
            if not self._keeping():
                self._write_kept()
                return
            if self._flush_pending:
                return
            self._flush_pending = True
            delay = max(0.0, self._last_write + self._interval - self._clock.seconds())
        self._clock.callLater(delay, self.flush)

    def _line(self, event: LogEvent) -> str | bytes | None:
        if self._shared is None:
            return _worker_line(event)
        text = classic_line(event, self._stamps)
        if text is None:
            # twistd's observer writes no line for an event without text.
            return None
        line = text.encode(self._shared.encoding, "backslashreplace")
        if len(line) <= SHARED_LOG_WRITE:
            return line
        overflow = self._shared.overflow
        if overflow is None:
            return _worker_line(event)
        # After the lines kept before it.
        self.flush()
        overflow(event)
        return None

    def flush(self) -> None:
        """Write the lines kept so far."""
        with self._lock:
            self._flush_pending = False
            self._write_kept()

    def _write_kept(self) -> None:
        if self._writing:
            # A signal handler logging in the middle of a write (a file
            # object cannot be written from within its own write): its line
            # stays kept for the next flush.
            return
        kept, self._kept = self._kept, []
        if kept:
            self._last_write = self._clock.seconds()
            self._writing = True
            # The parent gone (the pipe closed), these lines have nowhere to
            # go; the worker stops within PARENT_CHECK_INTERVAL.  Raised from
            # the end of a turn, the error would be logged, kept, and raised
            # again at the end of the next.
            try:
                relayed = [line for line in kept if type(line) is str]
                if len(relayed) < len(kept) and self._shared is not None:
                    # The output gone (the journal stopped?), as below.
                    with contextlib.suppress(OSError):
                        _write_lines(self._shared.fd, [b for b in kept if type(b) is bytes])
                if relayed and self._output is not None:
                    with contextlib.suppress(OSError):
                        self._output.write("".join(relayed))
                        self._output.flush()
            finally:
                self._writing = False


def _write_lines(fd: int, lines: list[bytes]) -> None:
    """
    ``lines`` (each at most `SHARED_LOG_WRITE` bytes) to ``fd``, as few
    writes as can hold them whole, each at most `SHARED_LOG_WRITE` bytes.
    """
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if size + len(line) > SHARED_LOG_WRITE:
            _write_all(fd, b"".join(chunk))
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        _write_all(fd, b"".join(chunk))


def _write_all(fd: int, data: bytes) -> None:
    # A pipe takes at most PIPE_BUF bytes whole or blocks; a file or a
    # socket may take less (a signal): the rest follows.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TimeStamps:
    """
    twisted.logger's ``formatTime`` (RFC 3339, whole seconds, local time),
    made once per second: ``formatTime`` builds a time zone per call, which
    cost more than the rest of a line.  Called with the seconds of a log
    event's time, or None.
    """

    def __init__(self) -> None:
        # (second, text), replaced whole: the thread pool logs too.
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, when: float | None) -> str:
        if type(when) is not float or not math.isfinite(when) or when < 0:
            return formatTime(when)
        # The second datetime.fromtimestamp makes of ``when``: its
        # microseconds rounded half to even, a second more at 1,000,000.
        second = math.floor(when)
        if round((when - second) * 1e6) >= 1_000_000:
            second += 1
        last = self._last
        if last[0] == second:
            return last[1]
        text = formatTime(float(second))
        self._last = (second, text)
        return text


def classic_line(event: LogEvent, stamps: Callable[[float | None], str]) -> str | None:
    """
    ``formatEventAsClassicLogText(event, formatTime=stamps)``, the line
    twistd's observer writes (``TIME [NAMESPACE#LEVEL] TEXT``, continued
    lines indented), the common case (no failure, no ``log_system``) made
    here from `_event_text`.
    """
    if "log_failure" in event or "log_system" in event:
        return formatEventAsClassicLogText(event, formatTime=stamps)
    text = _event_text(event)
    if not text:
        return None
    level = event.get("log_level")
    system = "{}#{}".format(event.get("log_namespace", "-"), "-" if level is None else level.name)
    line = stamps(event.get("log_time")) + " [" + system + "] " + text
    return line.replace("\n", "\n\t") + "\n"


def _worker_line(event: LogEvent) -> str:
    """The line of JSON `worker_event` reads back."""
    level = event.get("log_level")
    record: dict[str, object] = {
        "time": event.get("log_time"),
        "namespace": event.get("log_namespace"),
        "level": getattr(level, "name", None),
        "text": _event_text(event),
    }
    system = event.get("log_system")
    if system is not None:
        record["system"] = str(system)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return _json_line(record)


def _json_line(record: dict[str, object]) -> str:
    """
    ``json.dumps(record)`` and a newline, for `_worker_line`'s records (the
    time first, then fields named by plain ASCII keys): the common one (a
    float time, strings) written by hand, as json.dumps writes it; json.dumps
    makes a new encoder at every call, which cost a busy worker as much as
    the rest of its line.
    """
    time = record["time"]
    if type(time) is not float or not math.isfinite(time):
        return json.dumps(record) + "\n"
    parts = ['{"time": ', repr(time)]
    for key, value in record.items():
        if key == "time":
            continue
        if type(value) is not str:
            return json.dumps(record) + "\n"
        parts += (', "', key, '": ', encode_basestring_ascii(value))
    parts.append("}\n")
    return "".join(parts)


def _event_text(event: LogEvent) -> str:
    """
    ``formatEvent(event)``, the common case done by `render_format`: a
    session's line (`pop3d.driver.SessionLogger`) arrives flattened, its
    format its text, with no field left.
    """
    format = event.get("log_format")
    if type(format) is str:
        # A flattened event's fields are the flattened ones: a format that
        # still has one is left to twisted.logger.
        text = render_format(format, {} if "log_flattened" in event else event)
        if text is not None:
            return text
    return formatEvent(event)


class _TracebackText:
    """In the parent, a worker's failure: what a log observer asks of it, its traceback."""

    def __init__(self, text: str) -> None:
        self._text = text

    def getTraceback(self, *args: object, **kwargs: object) -> str:
        return self._text


def worker_event(line: bytes) -> LogEvent | None:
    """
    The log event of a line a worker's `pop3d.tap.worker_log_observer` wrote (its
    failure, if any, as its traceback text), or None for another line.
    """
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return _record_event(record)


def worker_events(lines: list[bytes]) -> list[LogEvent | None]:
    """
    `worker_event` of each line, the JSON of a batch read in one go: a busy
    worker writes its lines together, and reading each apart cost the
    parent more than making its event (json.loads's own Python code, per
    call).  A batch with another line in it (a print) is read line by line.
    Lines that are no record each but read as one record each once joined
    (the halves of a record a print cut in two, beside a line holding two)
    are taken as records: only a worker's own prints could do that, and a
    whole record on one line was always taken as one.
    """
    if len(lines) > 1 and all(line[:1] == b"{" for line in lines):
        try:
            records = json.loads(b"[" + b",".join(lines) + b"]")
        except ValueError:
            pass
        else:
            if len(records) == len(lines):
                return [_record_event(record) for record in records]
    return [worker_event(line) for line in lines]


def _record_event(record: object) -> LogEvent | None:
    """The log event of one record a worker wrote, or None if it is none."""
    if not isinstance(record, dict) or not isinstance(record.get("time"), int | float):
        return None
    text = record.get("text")
    if not isinstance(text, str):
        text = ""
    event: LogEvent = {
        "log_time": record["time"],
        "log_namespace": str(record.get("namespace") or "pop3d.workers"),
        "log_level": _LEVELS.get(str(record.get("level")), LogLevel.info),
        # The worker formatted the text: here it is a format with no field
        # (its braces doubled) and nothing left to flatten, as twisted.logger
        # reads back an event that crossed a process (flattenEvent): an
        # observer takes it as it is, without running the formatter (Python's
        # string.Formatter, a third of the parent's work per line) again.
        "log_format": escape_braces(text),
        "log_flattened": {},
    }
    system = record.get("system")
    if isinstance(system, str):
        event["log_system"] = system
    traceback = record.get("traceback")
    if isinstance(traceback, str):
        event["log_failure"] = _TracebackText(traceback)
    return event


_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class _LogLines:
    """
    A worker's output, split into lines, handed over as the lines of each
    read; a line longer than MAX_LOG_LINE is cut.
    """

    def __init__(self, lines: Callable[[list[bytes]], None]) -> None:
        self._lines = lines
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LOG_LINE:
            lines.append(self._partial)
            self._partial = b""
        if lines:
            self._lines(lines)

    def end(self) -> None:
        if self._partial:
            self._lines([self._partial])
            self._partial = b""


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, number: int) -> None:
        self._pool = pool
        self.number = number
        self._events = _LogLines(self._event_lines)
        self._errors = _LogLines(self._error_lines)
        self.pid: int | None = None
        self.stopped: Deferred[None] | None = None

    def terminate(self) -> None:
        self.send("TERM")

    def send(self, name: str) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except Exception:  # already gone
                log.debug("worker {number} already ended", number=self.number)

    def outReceived(self, data: bytes) -> None:
        self._events.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._errors.feed(data)

    def _event_lines(self, lines: list[bytes]) -> None:
        self._log_lines(lines, LogLevel.info)

    def _error_lines(self, lines: list[bytes]) -> None:
        # With a shared log, a line too long for it comes this way.
        self._log_lines(lines, LogLevel.warn)

    def _log_lines(self, lines: list[bytes], other: LogLevel) -> None:
        """The worker's log events among ``lines``; ``other`` lines logged at that level."""
        for line, event in zip(lines, worker_events(lines), strict=True):
            if event is not None:
                self._pool.log_observer(event)
                continue
            text = line.decode("utf-8", "replace")
            if text.strip():  # a print, not a log event
                log.emit(other, "worker {number}: {line}", number=self.number, line=text)

    def processEnded(self, reason: Failure) -> None:
        self._events.end()
        self._errors.end()
        if reason.check(ProcessDone):
            log.info("worker {number} exited", number=self.number)
        self._pool.worker_ended(self.number, reason)


@dataclass(frozen=True)
class TCPAddress:
    family: int
    host: str
    port: int
    backlog: int


def tcp_address(description: str) -> TCPAddress | None:
    """
    Where a ``tcp:``, ``tcp6:`` or (pop3d's own) ``ssl:`` endpoint listens,
    behind an optional ``haproxy:``; None for other kinds.
    """
    inner = description.removeprefix("haproxy:")
    kind, _, rest = inner.partition(":")
    if kind not in ("tcp", "tcp6", "ssl") or "privateKey=" in rest:
        return None
    # Endpoint strings escape ":" inside values with a backslash.
    fields = [f.replace("\\:", ":") for f in re.split(r"(?<!\\):", rest)]
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    positional = [f for f in fields[1:] if "=" not in f]
    if not fields[0].isdigit() or positional:
        return None
    host = options.get("interface", "::" if kind == "tcp6" else "")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in host else socket.AF_INET
    backlog = int(options["backlog"]) if options.get("backlog", "").isdigit() else 50
    return TCPAddress(family, host, int(fields[0]), backlog)


def reuseport_sockets(address: TCPAddress, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port, with SO_REUSEPORT."""
    sockets: list[socket.socket] = []
    port = address.port
    try:
        for _ in range(count):
            listener = socket.socket(address.family, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((address.host, port))
            # Port 0: the first socket picks the port; the others share it.
            port = listener.getsockname()[1]
            listener.listen(address.backlog)
            listener.setblocking(False)
            listener.set_inheritable(True)
    except OSError:
        for listener in sockets:
            listener.close()
        raise
    log.info("pop3d listening on {host}:{port}", host=address.host or "*", port=port)
    return sockets


def worker_command(arguments: Sequence[str], shared_log: bool = False) -> list[str]:
    """
    How to start a worker: twistd in the foreground, with the parent's pop3d
    options less ``--workers``; with ``shared_log``, a worker that writes its
    log lines to its standard output itself (`SharedLog`).
    """
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument == "--workers":
            skip = True
            continue
        if argument.startswith("--workers="):
            continue
        kept.append(argument)
    twistd = "from twisted.scripts.twistd import run; run()"
    return [
        sys.executable,
        "-c",
        twistd,
        "-n",
        "--pidfile=",
        "--logger",
        "pop3d.tap.worker_shared_log_observer" if shared_log else "pop3d.tap.worker_log_observer",
        "pop3d",
        *kept,
    ]
