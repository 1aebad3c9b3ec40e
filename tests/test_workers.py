"""
``--workers N``: worker processes share the listening sockets; a worker that
dies is started again and takes no mail with it; maildrop locks hold across
workers; orphaned workers do not outlive their parent.
"""

from __future__ import annotations

import io
import json
import os
import poplib
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from pop3d.testing import deliver_to_maildir
from pop3d.workers import SharedLog, WorkerLogLines

from .test_process import HOST, PATIENCE, Launch, launch, pop3d_arguments, write_passwd

__all__ = ["launch"]  # the fixture

pytestmark = pytest.mark.process

WORKER_LISTENING = re.compile(r"pop3d worker (\d+) listening on [\d.]+:(\d+)")


def _start_pool(launch: Launch, tmp_path: Path, workers: int) -> tuple[object, int, list[int]]:
    mail_root = tmp_path / "mail"
    for n in (1, 2):
        deliver_to_maildir(str(mail_root / "alice"), b"Subject: %d\n\nbody\n" % n)
    server = launch(*pop3d_arguments(mail_root, write_passwd(tmp_path), "--workers", str(workers)))
    pids, ports = [], set()
    for _ in range(workers):
        match = server.wait_for(WORKER_LISTENING)
        pids.append(int(match.group(1)))
        ports.add(int(match.group(2)))
    [port] = ports
    return server, port, pids


def _stat(port: int) -> tuple[int, int]:
    client = poplib.POP3(HOST, port, timeout=PATIENCE)
    client.user("alice")
    client.pass_("wonderland")
    result = client.stat()
    client.quit()
    return result


def test_workers_share_the_port_and_a_dead_one_comes_back(tmp_path: Path, launch: Launch) -> None:
    server, port, pids = _start_pool(launch, tmp_path, 2)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for _ in range(6):
        assert _stat(port)[0] == 2
    os.kill(pids[0], signal.SIGKILL)
    replacement = int(server.wait_for(WORKER_LISTENING).group(1))  # type: ignore[attr-defined]
    assert replacement not in pids
    for _ in range(6):
        assert _stat(port)[0] == 2


def test_maildrop_locks_hold_across_workers(tmp_path: Path, launch: Launch) -> None:
    """RFC 2449 section 8.1.2: [IN-USE], whichever workers the two logins reach."""
    _, port, _ = _start_pool(launch, tmp_path, 2)
    holders = []
    try:
        for _ in range(4):  # enough connections to reach both workers
            client = poplib.POP3(HOST, port, timeout=PATIENCE)
            holders.append(client)
            client.user("alice")
            try:
                client.pass_("wonderland")
            except poplib.error_proto as refused:
                assert str(refused).startswith("b'-ERR [IN-USE]")
            else:
                assert len(holders) == 1, "a second session got the same maildrop"
    finally:
        for client in holders:
            client.close()


def test_workers_end_with_their_parent(tmp_path: Path, launch: Launch) -> None:
    server, _, pids = _start_pool(launch, tmp_path, 2)
    # Opened before the kill: a pidfd stays the worker's, even if its pid is
    # reused once it is gone.
    workers = [os.pidfd_open(pid) for pid in pids]
    try:
        os.kill(server.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        for pid, pidfd in zip(pids, workers, strict=True):
            _wait_gone(pid, pidfd)
    finally:
        for pidfd in workers:
            os.close(pidfd)


def _wait_gone(pid: int, pidfd: int) -> None:
    """
    An orphaned worker notices its parent's end on its stdin pipe and stops;
    its pidfd becomes readable when it has ended (Linux 5.3).
    """
    ended, _, _ = select.select([pidfd], [], [], PATIENCE)
    assert ended, f"worker {pid} outlived its parent"


@pytest.mark.parametrize(
    "arguments",
    [
        ["--workers", "0"],
        ["--workers", "many"],
        ["--workers", "2", "--listen", "ssl:995:privateKey=key.pem"],
    ],
)
def test_bad_worker_options(tmp_path: Path, launch: Launch, arguments: list[str]) -> None:
    server = launch(*pop3d_arguments(tmp_path, write_passwd(tmp_path), *arguments))
    status, output = server.wait_exit()
    assert status != 0 and "Traceback" not in output
    assert "--workers" in output.strip().splitlines()[-1] or "--listen" in output


def test_connections_are_spread_over_the_workers(tmp_path: Path, launch: Launch) -> None:
    """
    Each worker has its own socket on the port (SO_REUSEPORT), so a burst of
    connections does not all go to the worker that happens to wake first.
    (All 16 on one of two workers by chance: 1 in 32,768.)
    """
    _, port, pids = _start_pool(launch, tmp_path, 2)
    # Each worker has its listening socket and at least two clients.
    _greeted_by_each(port, pids, sockets=3)


def _greeted_by_each(port: int, pids: list[int], sockets: int = 2) -> None:
    """
    16 clients connected at once (a burst, before any worker accepts), each
    greeted, while each worker has at least ``sockets`` sockets open (its
    listening socket and its clients').
    """
    clients = [socket.create_connection((HOST, port), timeout=PATIENCE) for _ in range(16)]
    try:
        # Every client has its greeting: every connection is accepted.
        assert all(client.recv(3) == b"+OK" for client in clients)
        connected = {pid: len(_sockets(pid)) for pid in pids}
        assert all(count >= sockets for count in connected.values()), connected
    finally:
        for client in clients:
            client.close()


def test_each_worker_has_its_own_listening_socket(tmp_path: Path, launch: Launch) -> None:
    """SO_REUSEPORT: no socket is shared, so no worker takes a whole burst."""
    _, _, pids = _start_pool(launch, tmp_path, 2)
    first, second = (_sockets(pid) for pid in pids)
    assert first and second and not first & second


def _sockets(pid: int) -> set[str]:
    """The sockets a process has open (``socket:[inode]``)."""
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link for link in links if link.startswith("socket:")}


def test_a_workers_logged_failure_reaches_the_parents_log_whole() -> None:
    """
    A worker's log line, as the parent writes it: the worker's time, level,
    namespace and text, and for a failure its traceback with the exception
    and its message (JSON alone would lose them).  Other output is no event.
    """
    from twisted.logger import LogLevel, formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from pop3d.workers import worker_event

    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: False)
    try:
        {}["missing"]
    except KeyError:
        failure = Failure()
    observer(
        {
            "log_format": "login of {user} failed unexpectedly",
            "user": "alice",
            "log_failure": failure,
            "log_level": LogLevel.critical,
            "log_namespace": "pop3d.session.Session",
            "log_time": 1796480000.0,
        }
    )
    [line] = output.text().encode().splitlines()
    event = worker_event(line)
    assert event is not None
    assert event["log_time"] == 1796480000.0  # the worker's time, not the parent's
    text = formatEventAsClassicLogText(event, formatTime=lambda _: "TIME")
    assert text is not None
    assert text.startswith(
        "TIME [pop3d.session.Session#critical] login of alice failed unexpectedly\n"
        "\tTraceback (most recent call last):\n"
    )
    assert "\tbuiltins.KeyError: 'missing'\n" in text
    assert worker_event(b"a line printed by a plug-in") is None


def test_a_worker_line_is_logged_as_the_worker_wrote_it_braces_and_all() -> None:
    """
    The parent logs a worker's text as it is (no format run on it again):
    braces a client sent, or that a format escaped, stay what they were.
    """
    from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText

    from pop3d.workers import worker_event

    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: False)
    observer(
        {
            "log_format": "[k.1] login failed: user={user} literal {{x}}",
            "user": '"{0}{log_text}{!r}}{"',
            "log_level": LogLevel.info,
            "log_namespace": "pop3d.session.Session",
            "log_system": "-",
            "log_time": 1796480000.0,
        }
    )
    [line] = output.text().encode().splitlines()
    event = worker_event(line)
    assert event is not None
    expected = '[k.1] login failed: user="{0}{log_text}{!r}}{" literal {x}'
    assert formatEvent(event) == expected
    assert formatEventAsClassicLogText(event, formatTime=lambda _: "TIME") == (
        "TIME [-] " + expected + "\n"
    )


class _Writes(io.StringIO):
    """A worker's standard output that remembers each write it was given, flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._unflushed = ""

    def write(self, text: str) -> int:
        self._unflushed += text
        return super().write(text)

    def flush(self) -> None:
        if self._unflushed:
            self.writes.append(self._unflushed)
            self._unflushed = ""
        super().flush()

    def text(self) -> str:
        return "".join(self.writes)


def _session_line(number: int) -> dict[str, object]:
    return {
        "log_format": "[s1] login: {summary}",
        "summary": f"rip=127.0.0.1 method=USER user=user{number}",
        "log_level": LogLevel.info,
        "log_namespace": "pop3d.session.Session",
        "log_time": 1796480000.0 + number,
    }


def _texts_and_times(written: str) -> list[tuple[str, float]]:
    from pop3d.workers import worker_event

    events = [worker_event(line) for line in written.encode().splitlines()]
    return [(formatEvent(event), event["log_time"]) for event in events if event is not None]


def test_a_workers_lines_of_one_reactor_turn_go_to_the_parent_in_one_write() -> None:
    """
    A busy worker logs a few lines per session, several sessions a turn:
    they reach the parent whole and in order, with their own times, in one
    write (one wake-up of the parent) when the turn ends.
    """
    output, clock = _Writes(), Clock()
    observer = WorkerLogLines(output, clock, keeping=lambda: True, interval=0.02)
    for number in range(3):
        observer(_session_line(number))
    assert output.writes == []  # the turn is not over
    clock.advance(0)
    assert len(output.writes) == 1
    assert _texts_and_times(output.text()) == [
        (f"[s1] login: rip=127.0.0.1 method=USER user=user{number}", 1796480000.0 + number)
        for number in range(3)
    ]


def test_a_busy_worker_writes_its_lines_once_per_interval() -> None:
    """
    Lines logged soon after a write wait for the interval to end, then go
    together, in order; a line after a quiet spell goes at the end of its
    turn.
    """
    output, clock = _Writes(), Clock()
    observer = WorkerLogLines(output, clock, keeping=lambda: True, interval=0.02)
    observer(_session_line(0))
    clock.advance(0)
    clock.advance(0.005)
    observer(_session_line(1))
    clock.advance(0)
    observer(_session_line(2))
    clock.advance(0.014)
    assert len(output.writes) == 1  # 0.019 s after the first write
    clock.advance(0.002)
    assert len(output.writes) == 2
    assert [text for text, _ in _texts_and_times(output.writes[1])] == [
        "[s1] login: rip=127.0.0.1 method=USER user=user1",
        "[s1] login: rip=127.0.0.1 method=USER user=user2",
    ]
    clock.advance(1)
    observer(_session_line(3))
    clock.advance(0)
    assert len(output.writes) == 3


def test_a_line_logged_outside_the_reactor_turn_is_written_at_once_after_those_kept() -> None:
    """
    The thread pool, or a worker whose reactor has stopped (its last lines,
    before twistd ends the process with the signal that stopped it), writes
    at once: nothing is lost, and what the turn kept goes first.
    """
    output, clock = _Writes(), Clock()
    in_turn = [True]
    observer = WorkerLogLines(output, clock, keeping=lambda: in_turn[0])
    observer(_session_line(0))
    observer(_session_line(1))
    in_turn[0] = False
    observer(_session_line(2))
    assert [text for text, _ in _texts_and_times(output.text())] == [
        f"[s1] login: rip=127.0.0.1 method=USER user=user{number}" for number in range(3)
    ]
    clock.advance(0)  # the end of the turn finds nothing left to write
    assert len(output.writes) == 1


def test_flush_writes_what_the_turn_kept() -> None:
    """What a worker calls when its reactor has stopped and when it exits."""
    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: True)
    observer(_session_line(0))
    observer.flush()
    assert len(_texts_and_times(output.text())) == 1


def test_a_stopping_workers_last_log_lines_reach_the_parent(tmp_path: Path, launch: Launch) -> None:
    """
    SIGTERM: each worker's last lines, logged after its reactor stopped
    (twistd then ends it with the signal, no exit handlers run), are in
    the parent's log, as the parent's own are.
    """
    server, port, pids = _start_pool(launch, tmp_path, 2)
    # Each worker logs that it listens before its reactor runs (and has its
    # SIGTERM handler): stopped sooner, it dies of the signal, logging
    # nothing.  Once each has greeted a client, each runs.
    _greeted_by_each(port, pids)
    server.process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    status, output = server.wait_exit()  # type: ignore[attr-defined]
    assert status == -signal.SIGTERM, output
    # Logged while each reactor still ran (kept for the turn's end), then
    # after it stopped (written at once).
    assert output.count("] Received SIGTERM, shutting down.\n") == 3, output
    assert output.count("] Main loop terminated.\n") == 3, output
    assert output.count("] Server Shut Down.\n") == 3, output


class _Box:
    name = "INBOX"


@pytest.mark.parametrize(
    ("log_format", "text"),
    [
        (
            "{user!r} has {count:03d} in {box.name} at {places[0]}, {when}",
            "'alice' has 007 in INBOX at here, {later}",
        ),
        ("called: {who()}", "called: the caller"),
        ("", ""),
    ],
)
def test_a_workers_line_has_the_text_twisted_logger_formats(log_format: str, text: str) -> None:
    """Fields, conversions, specs, attributes, items and twisted.logger's ``{callable()}``."""
    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: False)
    observer(
        {
            "log_format": log_format,
            "user": "alice",
            "count": 7,
            "box": _Box(),
            "places": ["here"],
            "when": "{later}",
            "who": lambda: "the caller",
            "log_level": LogLevel.info,
            "log_namespace": "pop3d.session.Session",
            "log_time": 1796480000.0,
        }
    )
    assert _texts_and_times(output.text()) == [(text, 1796480000.0)]


def test_a_workers_line_that_cannot_be_formatted_says_so() -> None:
    """As twisted.logger does: the line is kept, with what went wrong."""
    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: False)
    observer(
        {
            "log_format": "login of {user}",
            "log_level": LogLevel.info,
            "log_namespace": "pop3d.session.Session",
            "log_time": 1796480000.0,
        }
    )
    assert _texts_and_times(output.text()) == [
        (
            "Unable to format event {'log_format': 'login of {user}', 'log_level': "
            "<LogLevel=info>, 'log_namespace': 'pop3d.session.Session', "
            "'log_time': 1796480000.0}: 'user'",
            1796480000.0,
        )
    ]


class _ClosedPipe(io.StringIO):
    """Standard output of a worker whose parent is gone."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_worker_whose_parent_is_gone_drops_its_lines_and_carries_on() -> None:
    """
    Nowhere to write: the lines are dropped, nothing is raised into the
    session that logged or the reactor turn (which would log the error, to
    be written at the end of the next turn, and so on) until the worker
    sees that its parent is gone and stops.
    """
    clock = Clock()
    in_turn = [True]
    observer = WorkerLogLines(_ClosedPipe(), clock, keeping=lambda: in_turn[0])
    observer(_session_line(0))
    clock.advance(0)
    assert clock.getDelayedCalls() == []
    in_turn[0] = False
    observer(_session_line(1))


class _ReentrantWrites(_Writes):
    """Standard output that, like a real file object, refuses a write within a write."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = False
        self.during_write: Callable[[], None] = lambda: None

    def write(self, text: str) -> int:
        if self.writing:
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")
        self.writing = True
        try:
            self.during_write()
            return super().write(text)
        finally:
            self.writing = False


def test_a_line_logged_in_the_middle_of_a_write_goes_with_the_next() -> None:
    """
    Once the reactor has stopped, lines are written at once; a signal
    handler that logs while one is being written (Python runs handlers
    wherever the main thread is) neither breaks that write nor loses its
    own line: it goes with the next flush (the worker flushes at exit).
    """
    output, clock = _ReentrantWrites(), Clock()
    observer = WorkerLogLines(output, clock, keeping=lambda: False)

    def signal_arrives() -> None:
        output.during_write = lambda: None
        observer(_session_line(1))

    output.during_write = signal_arrives
    observer(_session_line(0))
    observer.flush()
    assert [text for text, _ in _texts_and_times(output.text())] == [
        "[s1] login: rip=127.0.0.1 method=USER user=user0",
        "[s1] login: rip=127.0.0.1 method=USER user=user1",
    ]


def test_a_line_logged_while_a_line_is_being_logged_is_kept_after_it() -> None:
    """
    A signal handler ("Received SIGTERM, shutting down.") logs wherever the
    worker's main thread is, also in the middle of logging a line: the
    worker neither hangs there nor loses either line.
    """
    output, clock = _Writes(), Clock()
    interrupted: list[bool] = []

    def keeping() -> bool:
        if not interrupted:
            interrupted.append(True)
            observer(_session_line(1))  # the signal arrives here
        return True

    observer = WorkerLogLines(output, clock, keeping=keeping)
    logging = threading.Thread(target=observer, args=(_session_line(0),), daemon=True)
    logging.start()
    logging.join(PATIENCE)
    assert not logging.is_alive(), "logging a line hung"
    clock.advance(0)
    assert [text for text, _ in _texts_and_times(output.text())] == [
        "[s1] login: rip=127.0.0.1 method=USER user=user0",
        "[s1] login: rip=127.0.0.1 method=USER user=user1",
    ]


def test_a_batch_of_worker_lines_reads_as_each_line_does() -> None:
    """
    The parent reads a worker's batch of lines in one go: the same events
    as line by line, in order, and a line that is not a record (a print;
    two records on one line) is taken as line by line.
    """
    from pop3d.workers import worker_event, worker_events

    output, clock = _Writes(), Clock()
    observer = WorkerLogLines(output, clock, keeping=lambda: False)
    for number in range(4):
        observer(_session_line(number))
    lines = output.text().encode().splitlines()
    assert len(lines) == 4
    printed = b"{ a plug-in's print"
    twice = lines[0] + b"," + lines[1]
    for batch in (lines, [*lines[:2], printed, *lines[2:]], [twice, lines[2]], lines[:1]):
        assert worker_events(batch) == [worker_event(line) for line in batch]
    assert [formatEvent(e) for e in worker_events(lines) if e] == [
        f"[s1] login: rip=127.0.0.1 method=USER user=user{number}" for number in range(4)
    ]
    assert worker_events([twice, lines[2]])[0] is None


@given(
    time=st.one_of(st.floats(), st.integers(), st.none()),
    namespace=st.one_of(st.text(), st.none()),
    text=st.text(),
    system=st.one_of(st.text(), st.none()),
)
def test_a_workers_line_is_the_json_of_its_record(
    time: float | None, namespace: str | None, text: str, system: str | None
) -> None:
    """Whatever a line holds (quotes, controls, surrogates, any time), it is JSON."""
    output = _Writes()
    observer = WorkerLogLines(output, Clock(), keeping=lambda: False)
    event: dict[str, object] = {
        "log_time": time,
        "log_namespace": namespace,
        "log_level": LogLevel.info,
        "log_format": "{text}",
        "text": text,
    }
    record: dict[str, object] = {
        "time": time,
        "namespace": namespace,
        "level": "info",
        "text": text,
    }
    if system is not None:
        event["log_system"] = record["system"] = system
    observer(event)
    assert output.text() == json.dumps(record) + "\n"


# -- workers that write their lines to the parent's standard output themselves ----------


def _shared_log_pair() -> tuple[socket.socket, socket.socket]:
    """A shared log that keeps each write apart (a datagram each): the test reads writes."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _writes(reader: socket.socket) -> list[bytes]:
    reader.setblocking(False)
    writes = []
    while True:
        try:
            writes.append(reader.recv(65536))
        except BlockingIOError:
            return writes


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC (twistd's log writes local time)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_worker_writes_its_lines_to_a_shared_log_as_twistd_would(utc: None) -> None:
    """
    ``twistd -n`` (the log on standard output): a worker writes each line
    there itself, the line twistd's observer would write for it.
    """
    writer, reader = _shared_log_pair()
    relayed = _Writes()
    observer = WorkerLogLines(
        relayed, Clock(), keeping=lambda: False, shared=SharedLog(writer.fileno())
    )
    observer(_session_line(7))
    observer({"log_format": "", "log_time": 1796480000.0})  # no text: no line
    observer({"log_format": "two\nlines", "log_time": 1796480000.5, "log_system": "sys"})
    assert _writes(reader) == [
        b"2026-12-05T14:13:27+0000 [pop3d.session.Session#info] "
        b"[s1] login: rip=127.0.0.1 method=USER user=user7\n",
        b"2026-12-05T14:13:20+0000 [sys] two\n\tlines\n",
    ]
    assert relayed.writes == []
    writer.close()
    reader.close()


def test_a_busy_worker_writes_whole_lines_to_a_shared_log_each_write_at_most_pipe_buf() -> None:
    """
    Lines kept for the end of a reactor turn go out in as few writes as
    hold them, each whole lines and at most PIPE_BUF bytes: written so,
    no other process's line can come in the middle of one, on a pipe too.
    """
    writer, reader = _shared_log_pair()
    clock = Clock()
    observer = WorkerLogLines(
        _Writes(), clock, keeping=lambda: True, shared=SharedLog(writer.fileno())
    )
    lines = [_session_line(number) for number in range(200)]
    for line in lines:
        observer(line)
    assert _writes(reader) == []
    clock.advance(0)
    writes = _writes(reader)
    assert 1 < len(writes) < len(lines)
    assert all(len(write) <= select.PIPE_BUF and write.endswith(b"\n") for write in writes)
    texts = b"".join(writes).decode().splitlines()
    assert [text.partition("] ")[2] for text in texts] == [
        f"[s1] login: rip=127.0.0.1 method=USER user=user{number}" for number in range(200)
    ]
    writer.close()
    reader.close()


def test_a_line_too_long_for_one_write_to_a_shared_log_goes_through_the_parent() -> None:
    """
    A line longer than PIPE_BUF (a traceback) could be cut by another
    process's line on a pipe: it goes to the parent (on the worker's
    standard error), which writes it as it writes its own.
    """
    from pop3d.workers import worker_event

    writer, reader = _shared_log_pair()
    relayed = _Writes()
    observer = WorkerLogLines(
        relayed, Clock(), keeping=lambda: False, shared=SharedLog(writer.fileno())
    )
    long = "x" * select.PIPE_BUF
    observer({**_session_line(1), "summary": long})
    observer(_session_line(2))
    [line] = relayed.text().encode().splitlines()
    event = worker_event(line)
    assert event is not None
    assert formatEvent(event) == "[s1] login: " + long
    assert event["log_time"] == 1796480001.0
    [write] = _writes(reader)
    assert write.endswith(b"[s1] login: rip=127.0.0.1 method=USER user=user2\n")
    writer.close()
    reader.close()


#: Times around whole seconds (datetime rounds to microseconds, half to even).
_EDGES = [1796480000.0 + frac for frac in (0.0, 0.4999995, 0.9999994, 0.9999995, 0.9999996)]


@given(
    when=st.one_of(
        st.sampled_from(_EDGES),
        st.floats(min_value=0, max_value=4e9),
        st.integers(min_value=0, max_value=2**32),
        st.none(),
    ),
    later=st.floats(min_value=0, max_value=3),
)
def test_time_stamps_are_twisted_loggers_format_time(when: float | None, later: float) -> None:
    """The cached time of a line is what twisted.logger's formatTime makes of it."""
    from twisted.logger import formatTime

    from pop3d.workers import TimeStamps

    stamps = TimeStamps()
    assert stamps(when) == formatTime(when)
    if when is not None:
        assert stamps(when + later) == formatTime(when + later)
        assert stamps(when) == formatTime(when)


_LEVELS = st.one_of(st.sampled_from(list(LogLevel.iterconstants())), st.none())


@given(
    format=st.one_of(st.text(), st.sampled_from(["{x}", "{{x}}", "a {x!r}\nb", "{", "{y}"])),
    x=st.text(),
    namespace=st.one_of(st.text(), st.none()),
    level=_LEVELS,
    system=st.one_of(st.text(), st.none()),
    when=st.one_of(st.floats(min_value=0, max_value=4e9), st.none()),
    flattened=st.booleans(),
    failure=st.booleans(),
)
def test_a_shared_log_line_is_twisteds_classic_line(
    format: str,
    x: str,
    namespace: str | None,
    level: LogLevel | None,
    system: str | None,
    when: float | None,
    flattened: bool,
    failure: bool,
) -> None:
    """
    Whatever an event holds, the line a worker writes to a shared log is
    the one twistd's observer writes (formatEventAsClassicLogText).
    """
    from twisted.logger import formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from pop3d.workers import TimeStamps, classic_line

    event: dict[str, object] = {"log_format": format, "x": x}
    for key, value in (
        ("log_namespace", namespace),
        ("log_level", level),
        ("log_system", system),
        ("log_time", when),
    ):
        if value is not None:
            event[key] = value
    if flattened:
        event["log_flattened"] = {}
    if failure:
        event["log_failure"] = Failure(KeyError(x))
    assert classic_line(event, TimeStamps()) == formatEventAsClassicLogText(event)


def test_twistd_logging_to_standard_output_is_shared_with_the_workers(tmp_path: Path) -> None:
    """
    Which twistd command lines log to standard output, which the workers
    then write to themselves; a log file (which twistd rotates), syslog and
    ``--logger`` go through the parent.
    """
    from twisted.scripts.twistd import ServerOptions

    from pop3d.tap import twistd_log_descriptor

    pop3d = pop3d_arguments(tmp_path, write_passwd(tmp_path))[2:]
    assert pop3d[0] == "pop3d"

    def descriptor(*twistd: str) -> int | None:
        options = ServerOptions()
        options.parseOptions([*twistd, *pop3d])
        return twistd_log_descriptor(options.subOptions)

    stdout = sys.__stdout__.fileno()
    assert descriptor("-n") == stdout
    assert descriptor("--nodaemon", "--pidfile=") == stdout
    assert descriptor("-n", "--logfile", "-") == stdout
    assert descriptor("-n", "--logfile", str(tmp_path / "pop3d.log")) is None
    assert descriptor("--logfile", str(tmp_path / "pop3d.log")) is None
    assert descriptor() is None  # a daemon: twistd.log
    assert descriptor("-n", "--syslog") is None
    assert descriptor("-n", "--logger", "pop3d.tap.worker_log_observer") is None


def test_one_process_writes_its_sessions_lines_itself_only_under_twistd_n(tmp_path: Path) -> None:
    """
    Where a single process's session lines go: written by pop3d when
    twistd logs to standard output, else through twisted.logger (a log
    file, or any pop3d whose parent is not twistd).
    """
    from twisted.logger import globalLogPublisher
    from twisted.scripts.twistd import ServerOptions

    from pop3d.tap import Options, session_log

    pop3d = pop3d_arguments(tmp_path, write_passwd(tmp_path))[2:]

    def sessions_log(*twistd: str) -> object:
        options = ServerOptions()
        options.parseOptions([*twistd, *pop3d])
        return session_log(options.subOptions)

    assert isinstance(sessions_log("-n"), WorkerLogLines)
    assert sessions_log("-n", "--logfile", str(tmp_path / "pop3d.log")) is globalLogPublisher
    own = Options()
    own.parseOptions(pop3d[1:])
    assert session_log(own) is globalLogPublisher


def test_workers_under_twistd_n_write_whole_lines_to_its_standard_output(
    tmp_path: Path, launch: Launch
) -> None:
    """
    ``twistd -n pop3d --workers 2`` (as under systemd): the workers write to
    twistd's standard output (a pipe) themselves; with sessions on both at
    once, every line of it is whole and in twistd's form, each session's
    login and logout there.
    """
    mail_root = tmp_path / "mail"
    users = [f"user{number}" for number in range(8)]
    for user in users:
        deliver_to_maildir(str(mail_root / user), b"Subject: hi\n\nbody\n")
    passwd = write_passwd(tmp_path, "".join(f"{user}:{{PLAIN}}secret::\n" for user in users))
    server = launch(*pop3d_arguments(mail_root, passwd, "--workers", "2"))
    workers = []
    for _ in range(2):
        match = server.wait_for(WORKER_LISTENING)
        workers.append(int(match.group(1)))
        port = int(match.group(2))
    # Each worker writes to twistd's standard output itself: the same pipe.
    parent = server.process.pid  # type: ignore[attr-defined]
    output = os.readlink(f"/proc/{parent}/fd/1")
    assert output.startswith("pipe:")
    assert [os.readlink(f"/proc/{pid}/fd/1") for pid in workers] == [output, output]
    errors: list[BaseException] = []

    def sessions(user: str) -> None:
        try:
            for _ in range(10):
                client = poplib.POP3(HOST, port, timeout=PATIENCE)
                client.user(user)
                client.pass_("secret")
                assert client.stat() == (1, 21)
                client.quit()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=sessions, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    server.process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    _, output = server.wait_exit()  # type: ignore[attr-defined]
    lines = output.splitlines()
    classic = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] \S")
    assert [line for line in lines if not classic.match(line)] == []
    for user in users:
        login = f'] login: rip=127.0.0.1 method=USER user="{user}"'
        logout = f'] session logged out: user="{user}"'
        assert sum(login in line for line in lines) == sum(logout in line for line in lines) == 10


def _failed_login_of_a_long_user(port: int) -> str:
    """A failed login as a 5,000-character user (its log line is longer than PIPE_BUF)."""
    user = "u" * 5000
    with socket.create_connection((HOST, port), timeout=PATIENCE) as client:
        replies = client.makefile("rb")
        assert replies.readline().startswith(b"+OK")
        client.sendall(b"USER %s\r\nPASS nope\r\nQUIT\r\n" % user.encode())
        assert replies.readline() == b"+OK send PASS\r\n"
        assert replies.readline() == b"-ERR [AUTH] invalid user name or password\r\n"
        assert replies.readline() == b"+OK bye\r\n"
    return user


def test_a_workers_line_too_long_for_one_write_reaches_twistds_standard_output_whole(
    tmp_path: Path, launch: Launch
) -> None:
    """
    ``twistd -n pop3d --workers 2``: a failed login's line naming a
    5,000-character user (longer than one whole write to a pipe) reaches
    the output whole, through the parent.
    """
    server, port, _ = _start_pool(launch, tmp_path, 2)
    user = _failed_login_of_a_long_user(port)
    line = server.wait_for(re.compile(r"\] \[[^]]+\] login failed: .*\n"))  # type: ignore[attr-defined]
    assert line.group(0).endswith(f' user="{user}"\n')
    assert line.string.startswith("20")


# -- one process under twistd -n: its sessions' lines written as a worker writes them ---


def test_a_line_too_long_for_a_shared_log_goes_to_its_overflow_after_those_kept() -> None:
    """
    One process (no parent to send to): a line too long for one write goes
    to the shared log's overflow (twistd's own observer), after the lines
    kept before it are written.
    """
    writer, reader = _shared_log_pair()
    overflowed: list[dict[str, object]] = []
    clock = Clock()
    observer = WorkerLogLines(
        None,
        clock,
        keeping=lambda: True,
        shared=SharedLog(writer.fileno(), overflow=overflowed.append),
    )
    observer(_session_line(1))
    long = {**_session_line(2), "summary": "x" * select.PIPE_BUF}
    observer(long)
    [write] = _writes(reader)
    assert write.endswith(b"[s1] login: rip=127.0.0.1 method=USER user=user1\n")
    assert overflowed == [long]
    writer.close()
    reader.close()


def test_lines_too_long_for_a_shared_log_need_somewhere_to_go() -> None:
    with pytest.raises(ValueError, match="need an output or an overflow"):
        WorkerLogLines(None, Clock(), keeping=lambda: False, shared=SharedLog(1))
    with pytest.raises(ValueError):
        WorkerLogLines(None, Clock(), keeping=lambda: False)


def test_one_process_under_twistd_n_writes_its_sessions_lines_as_twistd_would(
    tmp_path: Path, launch: Launch
) -> None:
    """
    ``twistd -n pop3d`` (one process, as under systemd): its sessions'
    lines, written by pop3d to standard output, are twistd's lines; a line
    too long for one write (a 5,000-character user's failed login) is
    written whole by twistd.
    """
    mail_root = tmp_path / "mail"
    deliver_to_maildir(str(mail_root / "alice"), b"Subject: 1\n\nbody\n")
    server = launch(*pop3d_arguments(mail_root, write_passwd(tmp_path)))
    server.wait_listening()  # type: ignore[attr-defined]
    port = server.port  # type: ignore[attr-defined]
    client = poplib.POP3(HOST, port, timeout=PATIENCE)
    client.user("alice")
    client.pass_("wonderland")
    server.wait_for(re.compile(r"\[pop3d\.session\.Session#info\] \[[^]]+\] login: rip="))  # type: ignore[attr-defined]
    client.quit()
    user = _failed_login_of_a_long_user(port)
    server.process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    _, output = server.wait_exit()  # type: ignore[attr-defined]
    lines = output.splitlines()
    classic = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] \S")
    assert [line for line in lines if not classic.match(line)] == []
    assert sum('] session logged out: user="alice"' in line for line in lines) == 1
    [failed] = [line for line in lines if "] login failed: " in line]
    assert failed.endswith(f' user="{user}"')
