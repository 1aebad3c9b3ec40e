"""
How fast a first login could list the benchmark's 100,000-message Maildir
in CPython if it did nothing else: in one process (the floor's own
listing, ``floor_server.list_maildrop``: the names of ``new/`` and
``cur/``, sorted, every message opened, read and counted), and with the
reading split over two processes (the same listing and sort, then a fork:
the child counts the first half of the names with the floor's own loop,
``floor_server.count_messages``, and sends their sizes back through a pipe
while the parent counts the second half); and split so, but listing each
file's inode with its name (``os.scandir``) and keeping the inodes in
the names' order, as a server must to trust, at a later login, the sizes
it saved at this one (pop3d does; the floor does not).  Wall time, the
three one after the other, several rounds; every size checked against
the maildrop's own.

    .venv/bin/python benchmarks/first_login_split.py [--messages N] [--rounds R]

pop3d shares the same count with its counting helper (``--counting-
processes``), and also keeps what its later logins need (inodes, UIDLs,
where each message is); ``run.py``'s ``many`` workload times its first
login from PASS to STAT.
"""

from __future__ import annotations

import argparse
import array
import os
import sys
import tempfile
import time
from pathlib import Path

import floor_server
import maildrops


def sorted_with_inodes(path: bytes) -> tuple[list[bytes], set[bytes], list[int]]:
    """
    `floor_server.sorted_names`, and the inode of each name, in the same
    order: the names read with their inodes and types (regular files only),
    sorted together.
    """
    entries: list[tuple[bytes, int]] = []
    fresh: set[bytes] = set()
    for part in (b"new", b"cur"):
        with os.scandir(path + b"/" + part) as found:
            here = [(e.name, e.inode()) for e in found if e.is_file(follow_symlinks=False)]
        if part == b"new":
            fresh = {name for name, _ in here}
        entries += here
    entries.sort()  # by name: no two are the same
    return [name for name, _ in entries], fresh, [inode for _, inode in entries]


def split_listing(path: bytes, *, with_inodes: bool = False) -> list[int]:
    """
    The sizes of every message in unique-name order, as `list_maildrop`
    counts them, the first half of the names counted by a forked child;
    ``with_inodes``: listed by `sorted_with_inodes`.
    """
    if with_inodes:
        names, in_new, _ = sorted_with_inodes(path)
    else:
        names, in_new = floor_server.sorted_names(path)
    half = len(names) // 2
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fds = (os.open(path + b"/new", flags), os.open(path + b"/cur", flags))
    try:
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(reading)
            _, _, sizes = floor_server.count_messages(fds, names[:half], in_new)
            data = array.array("q", sizes).tobytes()
            while data:
                data = data[os.write(writing, data) :]
            os._exit(0)
        os.close(writing)
        _, _, mine = floor_server.count_messages(fds, names[half:], in_new)
        received = bytearray()
        while chunk := os.read(reading, 1 << 20):
            received += chunk
        os.close(reading)
        os.waitpid(child, 0)
    finally:
        for fd in fds:
            os.close(fd)
    theirs = array.array("q")
    theirs.frombytes(bytes(received))
    return [*theirs, *mine]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="first-login-split-") as root:
        # run.py's "many" maildrop: half in new/, half in cur/.
        pool = [maildrops.mime_message(n, 3000, seed=3) for n in range(250)]
        messages = [pool[(n * 7) % len(pool)] for n in range(options.messages)]
        drop = maildrops.write_maildrop("many", Path(root) / "many", messages)
        expected = [size for _, size in sorted(zip(drop.file_names, drop.wire_sizes, strict=True))]
        path = os.fsencode(drop.path)
        print(f"Python {sys.version.split()[0]}; {options.messages:,} messages; wall time, ms")
        print(f"{'round':>5}  {'one process':>11}  {'two processes':>13}  {'two, inodes kept':>16}")
        for number in range(1, options.rounds + 1):
            started = time.perf_counter()
            _, _, one = floor_server.list_maildrop(path)
            alone = time.perf_counter() - started
            started = time.perf_counter()
            two = split_listing(path)
            split = time.perf_counter() - started
            started = time.perf_counter()
            kept = split_listing(path, with_inodes=True)
            with_inodes = time.perf_counter() - started
            if one != expected or two != expected or kept != expected:
                raise SystemExit("a size differs from the maildrop's")
            print(
                f"{number:>5}  {alone * 1000:>11,.0f}  {split * 1000:>13,.0f}"
                f"  {with_inodes * 1000:>16,.0f}"
            )


if __name__ == "__main__":
    main()
