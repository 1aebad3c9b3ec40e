"""
Why a first login's count reads each message 64 KiB at a time, not 256:
the time to open, read and close a small message with each first read,
in a fresh interpreter that has imported only pop3d's counting module (as
a counting helper does) and in one that has imported the whole server
(``pop3d.tap``, as ``twistd pop3d`` does), and pop3d's own count
(``pop3d.stores.counting.wire_sizes``) in both.

    .venv/bin/python benchmarks/first_read.py [--messages N] [--rounds R]

A buffer of 128 KiB or more (glibc's default mmap threshold) that the top
of malloc's heap cannot hold is a mapping of its own, made, faulted in,
shrunk by ``mremap`` (the read returned 3 KB) and unmade for every
message; whether the heap can hold it depends on what the process did
before, so one process counts four times slower than another.  A 64 KiB
buffer always comes from the heap.  Each figure comes from a fresh
interpreter, the best of ``--rounds`` passes over the same messages (the
benchmark's 3 KB messages, written to a temporary directory, after one
pass that is not counted): microseconds a message, wall time, then user
and system CPU (whose clock ticks are coarse).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_KIB = 1024


def _time_reads(directory: str, names: list[str], size: int | None, rounds: int) -> str:
    """Best round: open, read (``size``; None: pop3d's count) and close each message."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    # As the count opens them (`pop3d.stores.posix.UNSEEN_READ_FLAGS`).
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)
    best = (float("inf"), 0.0, 0.0)
    for round_number in range(rounds + 1):
        started, before = time.perf_counter(), os.times()
        if size is None:
            from pop3d.stores.counting import wire_sizes

            sizes, failures = wire_sizes(fd, names, short_read_is_end=True)
            assert not failures and len(sizes) == len(names)
        else:
            for name in names:
                message = os.open(name, flags, dir_fd=fd)
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
        for state, label in (("helper", "counting imported"), ("server", "pop3d.tap imported")):
            for size, what in (
                (str(256 * _KIB), "read 256 KiB"),
                (str(64 * _KIB), "read 64 KiB"),
                ("pop3d", "wire_sizes"),
            ):
                command = [sys.executable, __file__, "--child", state, size, directory]
                command.append(str(options.rounds))
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                print(f"{label:18}  {what:13}  {result.stdout.strip()}")


if __name__ == "__main__":
    main()
