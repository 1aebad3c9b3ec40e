"""
Why benchmarks/floor_server.py does its work the way it does: the CPython
alternatives for each step, measured on this machine, each checked to give
the same result as the one kept.

    .venv/bin/python benchmarks/floor_choices.py

Times are thread CPU time (``time.thread_time``, so that other programs on
the machine do not count), the best of several repeats, per item.  The test
data are the benchmark's own messages (benchmarks/maildrops.py).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from functools import partial
from itertools import chain, count, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import floor_server
import maildrops
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineOnlyReceiver, LineReceiver

_DOT_LINE = re.compile(rb"\n\.")
_DOT_LINE_START = re.compile(rb"^\.", re.MULTILINE)


#: Rounds: every candidate is timed once per round, in turn, so that a
#: burst of load elsewhere on the machine hits all of them alike.
ROUNDS = 9


def race(
    candidates: Sequence[tuple[str, Callable[[], Any]]], items: int, number: int
) -> list[tuple[str, float]]:
    """Microseconds of thread CPU time per item of each candidate, best round."""
    best = [float("inf")] * len(candidates)
    for _ in range(ROUNDS):
        for index, (_, function) in enumerate(candidates):
            seconds = timeit.timeit(function, number=number, timer=time.thread_time)
            best[index] = min(best[index], seconds / number / items * 1e6)
    return [(label, value) for (label, _), value in zip(candidates, best, strict=True)]


def _ms(results: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(label, value / 1000) for label, value in results]


def _map(function: Callable[[bytes], Any], items: list[bytes]) -> list[Any]:
    return [function(item) for item in items]


def _starmap(function: Callable[[bytes, int], Any], items: list[tuple[bytes, int]]) -> list[Any]:
    return [function(*item) for item in items]


def report(title: str, unit: str, results: list[tuple[str, float]]) -> None:
    print(f"\n{title} ({unit}):")
    fastest = min(value for _, value in results)
    for name, value in results:
        print(f"  {name:<64} {value:8.2f}{'  <- fastest' if value == fastest else ''}")


# -- line splitting -------------------------------------------------------------


class _Transport:
    disconnecting = False


class _LineReceiver(LineReceiver):
    def lineReceived(self, line: bytes) -> None:
        pass


class _LineOnlyReceiver(LineOnlyReceiver):
    def lineReceived(self, line: bytes) -> None:
        pass


class _Split(Protocol):
    """A Protocol splitting with one bytes.split per chunk."""

    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\r\n")
        for line in lines:
            self.lineReceived(line)

    def lineReceived(self, line: bytes) -> None:
        pass


class _Find(Protocol):
    """A Protocol splitting with a find loop."""

    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        data = self.buffer + data
        end = data.find(b"\r\n")
        while end >= 0:
            self.lineReceived(data[:end])
            data = data[end + 2 :]
            end = data.find(b"\r\n")
        self.buffer = data

    def lineReceived(self, line: bytes) -> None:
        pass


def line_splitting() -> None:
    candidates: list[tuple[str, Callable[[], Any]]] = []
    for name, cls in (
        ("twisted LineReceiver (kept)", _LineReceiver),
        ("twisted LineOnlyReceiver", _LineOnlyReceiver),
        ("Protocol, one bytes.split per chunk", _Split),
        ("Protocol, find loop", _Find),
    ):
        protocol: Any = cls()
        protocol.transport = _Transport()
        feed: Callable[[bytes], None] = protocol.dataReceived
        candidates.append((name, partial(feed, b"RETR 1234\r\n")))
    report("Line splitting, one command line per chunk", "us per line", race(candidates, 1, 50_000))


# -- sizes ------------------------------------------------------------------------


def sizes(root: Path) -> None:
    messages = [
        maildrops.mime_message(n, 2000 + (n * 997) % 10_000, seed=1) for n in range(20)
    ]  # the login storm's maildrop
    drop = maildrops.write_maildrop("sizes", root / "sizes", messages)
    path = os.fsencode(drop.path)
    expected = floor_server.list_maildrop(path)[2]
    assert expected == drop.wire_sizes
    buffer = bytearray(floor_server.CHUNK)
    buffers, view = [buffer], memoryview(buffer)
    flags = os.O_RDONLY | os.O_CLOEXEC

    def with_open(name: bytes, fd: int) -> int:
        def opener(path: str, mode: int) -> int:
            return os.open(path, mode, dir_fd=fd)

        with open(name, "rb", buffering=0, opener=opener) as file:
            data = file.read()
        return len(data) + data.count(b"\n")

    def read_count(name: bytes, fd: int) -> int:
        file = os.open(name, flags, dir_fd=fd)
        data = os.read(file, 65536)
        os.close(file)
        return len(data) + data.count(b"\n")

    def read_replace(name: bytes, fd: int) -> int:
        file = os.open(name, flags, dir_fd=fd)
        data = os.read(file, 65536)
        os.close(file)
        return len(data.replace(b"\n", b"\r\n"))

    def read_256k(name: bytes, fd: int) -> int:
        file = os.open(name, flags, dir_fd=fd)
        data = os.read(file, floor_server.CHUNK)
        os.close(file)
        return len(data.replace(b"\n", b"\r\n"))

    def readv_count(name: bytes, fd: int) -> int:
        file = os.open(name, flags, dir_fd=fd)
        read = os.readv(file, buffers)
        os.close(file)
        return read + buffer.count(b"\n", 0, read)

    def readv_delete(name: bytes, fd: int) -> int:
        file = os.open(name, flags, dir_fd=fd)
        read = os.readv(file, buffers)
        os.close(file)
        return 2 * read - len(bytes(view[:read]).replace(b"\n", b""))

    names, where, _ = floor_server.list_maildrop(path)
    fds = [os.open(path + b"/new", os.O_RDONLY), os.open(path + b"/cur", os.O_RDONLY)]
    pairs = [(name, fds[part]) for name, part in zip(names, where, strict=True)]
    candidates: list[tuple[str, Callable[[], Any]]] = []
    for label, size_of in (
        ("open().read(), len + bytes.count(LF)", with_open),
        ("os.read 64 KiB, len + bytes.count(LF)", read_count),
        ("os.read 64 KiB, len(replace(LF, CRLF))", read_replace),
        ("os.read 256 KiB (an mmap per read), len(replace(LF, CRLF))", read_256k),
        ("os.readv into a buffer, bytearray.count(LF, 0, n)", readv_count),
        ("os.readv into a buffer, 2n - len(copy.replace(LF, '')) (kept)", readv_delete),
    ):
        assert [size_of(name, fd) for name, fd in pairs] == expected, label
        candidates.append((label, partial(_starmap, size_of, pairs)))
    report(
        "RFC 1939 size of a 2-12 KB message (open, read, count, close)",
        "us per message",
        race(candidates, len(pairs), 100),
    )
    for fd in fds:
        os.close(fd)


# -- CRLF and dot-stuffing ------------------------------------------------------


def _first_line(data: bytes) -> bytes:
    return b"." + data if data[:1] == b"." else data


def encoding() -> None:
    messages = [maildrops.mime_message(n, 20 * 1024) for n in range(50)]
    expected = [maildrops.retr_bytes(m) for m in messages]
    encoders: list[tuple[str, Callable[[bytes], bytes]]] = [
        (
            "replace(LF., LF..) then replace(LF, CRLF)",
            lambda d: _first_line(d.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")) + b".\r\n",
        ),
        (
            "replace(LF, CRLF) then replace(CRLF., CRLF..) (Twisted's)",
            lambda d: (
                _first_line(d.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")) + b".\r\n"
            ),
        ),
        (
            "re.sub(^\\., MULTILINE) then replace(LF, CRLF)",
            lambda d: _DOT_LINE_START.sub(b"..", d).replace(b"\n", b"\r\n") + b".\r\n",
        ),
        (
            "split(LF), stuff each line, CRLF.join",
            lambda d: (
                b"\r\n".join([b"." + x if x[:1] == b"." else x for x in d.split(b"\n")[:-1]])
                + b"\r\n.\r\n"
            ),
        ),
        (
            "split(LF.), LF...join, replace(LF, CRLF)",
            lambda d: _first_line(b"\n..".join(d.split(b"\n.")).replace(b"\n", b"\r\n")) + b".\r\n",
        ),
        (
            "re.sub(\\n\\., LF..) then replace(LF, CRLF) (kept)",
            lambda d: floor_server.encode(b"+OK\n" + d)[5:] + b".\r\n",
        ),
    ]
    timed: list[tuple[str, Callable[[], Any]]] = []
    for label, encode in encoders:
        assert [encode(m) for m in messages] == expected, label
        timed.append((label, partial(_map, encode, messages)))
    report("CRLF and dot-stuffing of a 20 KB message", "us per message", race(timed, 50, 10))


# -- LIST and UIDL --------------------------------------------------------------


def listings() -> None:
    sizes = [3000 + n % 500 for n in range(100_000)]
    names = [
        maildrops.unique_name(n).encode() + (b":2,S" if n % 2 else b"") for n in range(100_000)
    ]
    listing = "".join([f"{n} {size}\r\n" for n, size in enumerate(sizes, 1)]).encode()
    makers: list[tuple[str, Callable[[], bytes]]] = [
        (
            "b'%d %d' % line, joined",
            lambda: b"".join([b"%d %d\r\n" % pair for pair in enumerate(sizes, 1)]),
        ),
        (
            "f-string per line, joined, encoded",
            lambda: "".join([f"{n} {size}\r\n" for n, size in enumerate(sizes, 1)]).encode(),
        ),
        (
            "one % over the repeated line format (kept)",
            lambda: (b"%d %d\r\n" * len(sizes)) % tuple(chain.from_iterable(zip(count(1), sizes))),
        ),
    ]
    for label, make in makers:
        assert make() == listing, label
    report("LIST of 100,000 messages", "ms", _ms(race(makers, 1, 1)))
    uidl = b"".join([b"%d %s\r\n" % (n, x.partition(b":")[0]) for n, x in enumerate(names, 1)])
    makers = [
        (
            "b'%d %s' % (n, name.partition(':')[0]) per line, joined",
            lambda: b"".join(
                [b"%d %s\r\n" % (n, x.partition(b":")[0]) for n, x in enumerate(names, 1)]
            ),
        ),
        (
            "one % over the repeated line format, map(partition) (kept)",
            lambda: (
                (b"%d %s\r\n" * len(names))
                % tuple(
                    chain.from_iterable(
                        zip(count(1), map(itemgetter(0), map(bytes.partition, names, repeat(b":"))))
                    )
                )
            ),
        ),
    ]
    for label, make in makers:
        assert make() == uidl, label
    report("UIDL of 100,000 messages", "ms", _ms(race(makers, 1, 1)))


def main() -> None:
    print(f"Python {sys.version.split()[0]}; thread CPU time, best of {ROUNDS} interleaved rounds")
    with tempfile.TemporaryDirectory(prefix="floor-choices-") as root:
        line_splitting()
        sizes(Path(root))
        encoding()
        listings()


if __name__ == "__main__":
    main()
