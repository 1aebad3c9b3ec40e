"""
Why a first login's count reads each message 64 KiB at a time, not 256:
the time to open, read and close a small message with each first read,
and pop3d's own count (``pop3d.stores.counting.wire_sizes``), in a fresh
interpreter whose malloc is made unable to hold a 256 KiB buffer in its
heap ("malloc pinned": glibc's default thresholds kept, no padding at the
heap's top), in one that has imported only pop3d's counting module (as a
counting helper does) and in one that has imported the whole server
(``pop3d.tap``, as ``twistd pop3d`` does), each as it comes.

    .venv/bin/python benchmarks/first_read.py [--messages N] [--rounds R]

A buffer of 128 KiB or more (glibc's default mmap threshold) that the top
of malloc's heap cannot hold is a mapping of its own, made, faulted in,
shrunk by ``mremap`` (the read returned 3 KB) and unmade for every
message; whether the heap can hold it depends on what the process did
before (how many names the process listed, say), so one process counts
four times slower than another, and the last two rows may show it or not.  A 64 KiB
buffer always comes from the heap.  Each figure comes from a fresh
interpreter, the best of ``--rounds`` passes over the same messages (the
benchmark's 3 KB messages, written to a temporary directory, after one
pass that is not counted): microseconds a message, wall time, then user
and system CPU (whose clock ticks are coarse).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_KIB = 1024
#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _time_reads(directory: str, names: list[str], size: int | None, rounds: int) -> str:
    """Best round: open, read (``size``; None: pop3d's count) and close each message."""
    # Imported by `_child` already (the counting module imports both).
    from pop3d.stores.counting import wire_sizes
    from pop3d.stores.posix import DIRECTORY_FLAGS, UNSEEN_READ_FLAGS

    fd = os.open(directory, DIRECTORY_FLAGS)
    best = (float("inf"), 0.0, 0.0)
    for round_number in range(rounds + 1):
        started, before = time.perf_counter(), os.times()
        if size is None:
            sizes, failures = wire_sizes(fd, names, short_read_is_end=True)
            assert not failures and len(sizes) == len(names)
        else:
            for name in names:
                # Opened as the count opens them.
                message = os.open(name, UNSEEN_READ_FLAGS, dir_fd=fd)
                os.read(message, size)
                os.close(message)
        after = os.times()
        per = 1e6 / len(names)
        took = (
            (time.perf_counter() - started) * per,
            (after.user - before.user) * per,
            (after.system - before.system) * per,
        )
        if round_number:  # the first warms the page cache
            best = min(best, took)
    os.close(fd)
    wall, user, system = best
    return f"{wall:.1f} us (user {user:.1f}, system {system:.1f})"


def _child(arguments: list[str]) -> None:
    state, size, directory, rounds = arguments
    if state == "pinned":
        # glibc's default thresholds, kept (setting them stops glibc from
        # raising them), and no padding at the heap's top: the state of a
        # process whose heap cannot hold a 256 KiB buffer, made certain.
        libc = ctypes.CDLL("libc.so.6")
        for parameter, value in ((_M_MMAP_THRESHOLD, 128 * _KIB), (_M_TRIM_THRESHOLD, 128 * _KIB)):
            libc.mallopt(parameter, value)
        libc.mallopt(_M_TOP_PAD, 0)
    importlib.import_module("pop3d.tap" if state == "server" else "pop3d.stores.counting")
    names = sorted(os.listdir(directory))
    print(_time_reads(directory, names, None if size == "pop3d" else int(size), int(rounds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _child(options.child)
        return
    import maildrops

    with tempfile.TemporaryDirectory(prefix="pop3d-first-read-") as directory:
        for number in range(options.messages):
            Path(directory, maildrops.unique_name(number)).write_bytes(
                maildrops.mime_message(number, 3_000)
            )
        print(f"{options.messages:,} messages of about 3 KB; best of {options.rounds} rounds")
        for state, label in (
            ("pinned", "malloc pinned"),
            ("helper", "counting imported"),
            ("server", "pop3d.tap imported"),
        ):
            for size, what in (
                (str(256 * _KIB), "read 256 KiB"),
                (str(64 * _KIB), "read 64 KiB"),
                ("pop3d", "wire_sizes"),
            ):
                rounds = str(options.rounds)
                command = [sys.executable, __file__, "--child", state, size, directory, rounds]
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                print(f"{label:18}  {what:13}  {result.stdout.strip()}")


if __name__ == "__main__":
    main()
