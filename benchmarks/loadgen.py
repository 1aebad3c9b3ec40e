"""
A POP3 load generator that costs much less than the servers it drives.

One process, one ``selectors`` loop (epoll), raw non-blocking sockets.  Each
simulated client is a generator ("script") that yields instructions (connect,
send a command and wait for the single-line or multi-line reply, park until
the benchmark runner releases it, close) and gets the replies back.  There
are no per-command objects, no callbacks and no copies of message bodies: a
RETR reply is compared chunk by chunk with the expected bytes as it arrives
(``bytes.startswith(chunk, offset)``, a memcmp).

Every wait has a deadline; a reply that is late, wrong or cut short is
thrown into the script as `SessionError`.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import resource
import selectors
import socket
import time
from collections import deque
from collections.abc import Generator
from typing import Any

#: Instructions a script yields.
CONNECT = "connect"  # ("connect",)                   -> greeting line
LINE = "line"  # ("line", command)                    -> status line
RETR = "retr"  # ("retr", command, expected_body)     -> status line; body verified
MULTI = "multi"  # ("multi", command)                 -> (status line, body or None)
PARK = "park"  # ("park", lot)                        -> None, once the lot is released
CLOSE = "close"  # ("close",)                         -> None
WAIT = "wait"  # ("wait", seconds)                    -> None, that much later

Instruction = tuple[Any, ...]
Script = Generator[Instruction, Any, None]

_RECV_SIZE = 256 * 1024
_MAX_LINE = 64 * 1024
_TERMINATOR = b"\r\n.\r\n"

# Slot states.
_IDLE, _CONNECTING, _STATUS, _BODY_EXACT, _BODY_TERMINATED, _PARKED, _DONE = range(7)


class SessionError(Exception):
    """A reply that is late, wrong, or never comes."""


class ParkingLot:
    """Scripts wait here until the runner calls `LoadGenerator.release`."""

    def __init__(self) -> None:
        self.parked: list[_Slot] = []


class _Slot:
    __slots__ = (
        "buffer",
        "deadline",
        "expected",
        "kind",
        "name",
        "offset",
        "outgoing",
        "script",
        "sock",
        "state",
        "status",
    )

    def __init__(self, script: Script, name: str) -> None:
        self.script = script
        self.name = name
        self.sock: socket.socket | None = None
        self.state = _IDLE
        self.kind = ""
        self.buffer = b""
        self.expected = b""
        self.offset = 0
        self.status = b""
        self.outgoing = b""
        self.deadline = 0.0


class LoadGenerator:
    """
    Runs scripts against one server address.  ``step_timeout`` bounds every
    wait for a reply (connect, greeting, each command).
    """

    def __init__(self, address: tuple[str, int], step_timeout: float = 30.0) -> None:
        self.address = address
        self.step_timeout = step_timeout
        self.errors: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._runnable: deque[tuple[_Slot, Any, BaseException | None]] = deque()
        self._active = 0
        self._slots: set[_Slot] = set()
        self._waiting: deque[_Slot] = deque()
        self._max_active: int | None = None
        #: (wake-up time, tie-breaker, slot) of scripts in a WAIT.
        self._sleeping: list[tuple[float, int, _Slot]] = []
        self._sleep_order = itertools.count()

    # -- running ---------------------------------------------------------

    def start(self, scripts: list[tuple[str, Script]], max_active: int | None = None) -> None:
        """
        Schedule named scripts; they run during `run`.  With ``max_active``,
        no more than that many run at once (parked ones do not count): the
        others wait their turn, so that connections do not overflow the
        server's listen backlog.
        """
        self._max_active = max_active
        for name, script in scripts:
            slot = _Slot(script, name)
            self._slots.add(slot)
            self._waiting.append(slot)
        self._admit()

    def _admit(self) -> None:
        while self._waiting and (self._max_active is None or self._active < self._max_active):
            slot = self._waiting.popleft()
            self._active += 1
            self._runnable.append((slot, None, None))

    def release(self, lot: ParkingLot) -> None:
        """Resume every script parked in ``lot`` (during the next `run`)."""
        parked, lot.parked = lot.parked, []
        for slot in parked:
            if slot.state == _PARKED:
                slot.state = _IDLE
                self._active += 1
                self._runnable.append((slot, None, None))

    def run(self, deadline: float) -> None:
        """
        Run until no script is active (each has finished or is parked), or
        until ``deadline`` (time.monotonic()), when the active ones fail.
        """
        next_check = time.monotonic() + 0.25
        while True:
            while self._runnable:
                self._step(*self._runnable.popleft())
                self._admit()
            if self._active == 0:
                return
            now = time.monotonic()
            if now >= deadline:
                for slot in list(self._slots):
                    if slot.state not in (_PARKED, _DONE):
                        self.errors.append(f"{slot.name}: workload deadline exceeded")
                        slot.script.close()
                        self._finish(slot)
                self._runnable.clear()
                self._waiting.clear()
                self._active = 0
                return
            timeout = min(0.25, max(0.0, deadline - now))
            if self._sleeping:
                timeout = min(timeout, max(0.0, self._sleeping[0][0] - now))
            events = self._selector.select(timeout)
            for key, mask in events:
                slot = key.data
                if mask & selectors.EVENT_WRITE:
                    self._writable(slot)
                if mask & selectors.EVENT_READ and slot.sock is not None:
                    self._readable(slot)
            now = time.monotonic()
            while self._sleeping and self._sleeping[0][0] <= now:
                _, _, sleeper = heapq.heappop(self._sleeping)
                self._runnable.append((sleeper, None, None))
            if now >= next_check:
                next_check = now + 0.25
                for slot in list(self._slots):
                    if slot.state in (_CONNECTING, _STATUS, _BODY_EXACT, _BODY_TERMINATED) and (
                        now > slot.deadline
                    ):
                        self._fail(slot, SessionError(f"no reply within {self.step_timeout} s"))

    def close_all(self) -> None:
        """Close every socket and forget every script (parked ones included)."""
        for slot in list(self._slots):
            self._close(slot)
            slot.script.close()
            slot.state = _DONE
        self._slots.clear()
        self._runnable.clear()
        self._waiting.clear()
        self._active = 0
        self._selector.close()

    # -- driving one script ------------------------------------------------

    def _step(self, slot: _Slot, value: Any, error: BaseException | None) -> None:
        while True:
            try:
                if error is not None:
                    instruction = slot.script.throw(error)
                else:
                    instruction = slot.script.send(value)
            except StopIteration:
                self._finish(slot)
                return
            except Exception as exc:
                self.errors.append(f"{slot.name}: {exc}")
                self._finish(slot)
                return
            error = None
            value = None
            kind = instruction[0]
            if kind == CONNECT:
                error = self._connect(slot)
                if error is None:
                    return
            elif kind == CLOSE:
                self._close(slot)
            elif kind == WAIT:
                wake = time.monotonic() + instruction[1]
                heapq.heappush(self._sleeping, (wake, next(self._sleep_order), slot))
                return
            elif kind == PARK:
                slot.state = _PARKED
                self._active -= 1
                instruction[1].parked.append(slot)
                return
            else:
                error = self._send_command(slot, instruction)
                if error is None:
                    return

    def _finish(self, slot: _Slot) -> None:
        self._close(slot)
        if slot.state != _DONE:
            if slot.state != _PARKED:
                self._active -= 1
            slot.state = _DONE
        self._slots.discard(slot)

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        """An awaited reply will not come: close, and tell the script."""
        self._close(slot)
        slot.state = _IDLE
        self._runnable.append((slot, None, error))

    def _complete(self, slot: _Slot, value: Any) -> None:
        slot.state = _IDLE
        self._runnable.append((slot, value, None))

    # -- sockets -----------------------------------------------------------

    def _connect(self, slot: _Slot) -> SessionError | None:
        self._close(slot)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return SessionError(f"connect: {errno.errorcode.get(code, code)}")
        slot.sock = sock
        slot.buffer = b""
        slot.state = _CONNECTING
        slot.kind = LINE
        slot.deadline = time.monotonic() + self.step_timeout
        self._selector.register(sock, selectors.EVENT_WRITE, slot)
        return None

    def _close(self, slot: _Slot) -> None:
        sock, slot.sock = slot.sock, None
        if sock is not None:
            self._selector.unregister(sock)
            sock.close()

    def _send_command(self, slot: _Slot, instruction: Instruction) -> SessionError | None:
        if slot.sock is None:
            return SessionError("not connected")
        kind, command = instruction[0], instruction[1]
        slot.kind = kind
        slot.state = _STATUS
        slot.deadline = time.monotonic() + self.step_timeout
        if kind == RETR:
            slot.expected = instruction[2]
        try:
            sent = slot.sock.send(command)
        except OSError as exc:
            return SessionError(f"send: {exc}")
        if sent < len(command):
            slot.outgoing = command[sent:]
            self._selector.modify(slot.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, slot)
        if slot.buffer:
            # Bytes that arrived with the previous reply (a pipelining server).
            pending, slot.buffer = slot.buffer, b""
            self._feed(slot, pending)
        return None

    def _writable(self, slot: _Slot) -> None:
        sock = slot.sock
        assert sock is not None
        if slot.state == _CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._fail(slot, SessionError(f"connect: {errno.errorcode.get(code, code)}"))
                return
            slot.state = _STATUS
            self._selector.modify(sock, selectors.EVENT_READ, slot)
            return
        try:
            sent = sock.send(slot.outgoing)
        except OSError as exc:
            self._fail(slot, SessionError(f"send: {exc}"))
            return
        slot.outgoing = slot.outgoing[sent:]
        if not slot.outgoing:
            self._selector.modify(sock, selectors.EVENT_READ, slot)

    def _readable(self, slot: _Slot) -> None:
        sock = slot.sock
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            reason = f"recv: {exc}"
        else:
            reason = "connection closed by the server"
        if not data:
            if slot.state in (_STATUS, _BODY_EXACT, _BODY_TERMINATED):
                self._fail(slot, SessionError(reason))
            else:
                # Closed while nothing is awaited (parked, or after QUIT).
                self._close(slot)
            return
        if slot.state in (_IDLE, _PARKED):
            slot.buffer += data  # unexpected now; the next command sees it
            return
        self._feed(slot, data)

    def _feed(self, slot: _Slot, data: bytes) -> None:
        state = slot.state
        if state == _STATUS:
            buffer = slot.buffer + data if slot.buffer else data
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > _MAX_LINE:
                    self._fail(slot, SessionError("status line too long"))
                else:
                    slot.buffer = buffer
                return
            status, rest = buffer[:end], buffer[end + 2 :]
            slot.buffer = b""
            if slot.kind == LINE or not status.startswith(b"+OK"):
                slot.buffer = rest
                self._complete(slot, (status, None) if slot.kind == MULTI else status)
                return
            slot.status = status
            slot.offset = 0
            if slot.kind == RETR:
                slot.state = _BODY_EXACT
            else:
                slot.state = _BODY_TERMINATED
                rest = b"\r\n" + rest  # the terminator may follow the status line at once
            if rest:
                self._feed(slot, rest)
        elif state == _BODY_EXACT:
            expected = slot.expected
            missing = len(expected) - slot.offset
            chunk, rest = (data, b"") if len(data) <= missing else (data[:missing], data[missing:])
            if not expected.startswith(chunk, slot.offset):
                self._fail(slot, SessionError(_mismatch(expected, chunk, slot.offset)))
                return
            slot.offset += len(chunk)
            if slot.offset == len(expected):
                slot.buffer = rest
                self._complete(slot, slot.status)
        elif state == _BODY_TERMINATED:
            buffer = slot.buffer + data
            end = buffer.find(_TERMINATOR, max(0, slot.offset - 4))
            if end < 0:
                slot.buffer = buffer
                slot.offset = len(buffer)
                return
            # The body without the leading CRLF, with its last line's CRLF.
            body, slot.buffer = buffer[2 : end + 2], buffer[end + len(_TERMINATOR) :]
            self._complete(slot, (slot.status, body))


def _mismatch(expected: bytes, chunk: bytes, offset: int) -> str:
    for index, byte in enumerate(chunk):
        if expected[offset + index] != byte:
            at = offset + index
            return (
                f"wrong RETR bytes at offset {at}: expected "
                f"{expected[max(0, at - 20) : at + 20]!r}, got "
                f"{chunk[max(0, index - 20) : index + 20]!r}"
            )
    return f"RETR reply longer than expected ({offset + len(chunk)} > {len(expected)} octets)"


def expect_ok(reply: bytes, what: str) -> bytes:
    """The reply if it is +OK; SessionError otherwise."""
    if not reply.startswith(b"+OK"):
        raise SessionError(f"{what}: {reply[:200]!r}")
    return reply


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
