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
it saved at this one (pop3d does; the floor does not); and pop3d's own
listing of it (``MaildirStore.open`` with no listing kept and no sizes
saved, in the reactor's thread pool, sharing the count with one counting
helper, as ``twistd pop3d`` does: it also keeps UIDLs and where each
message is).  Wall time, the four one after the other, several rounds;
every size checked against the maildrop's own.

    .venv/bin/python benchmarks/first_login_split.py [--messages N] [--rounds R]

``run.py``'s ``many`` workload times pop3d's first login from PASS to
STAT, in a server that also answers the fresh sessions meanwhile.
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
from twisted.internet import task
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool

from pop3d.stores.counting import CountingProcesses
from pop3d.stores.maildir import SIZE_CACHE, MaildirStore


def sorted_with_inodes(path: bytes) -> tuple[list[bytes], set[bytes], list[int]]:
    """
    `floor_server.sorted_names`, and the inode of each name, in the same
    order: the names read with their inodes and types (regular files only;
    where a file system gives no type in its listing, that is an ``lstat``
    more a name), the positions sorted by name (the cheapest way to put a
    second column in the same order: about twice the names' own sort here,
    where sorting (name, inode) pairs takes five times), each column
    gathered.
    """
    names: list[bytes] = []
    inodes: list[int] = []
    fresh: set[bytes] = set()
    for part in (b"new", b"cur"):
        with os.scandir(path + b"/" + part) as found:
            here = [(e.name, e.inode()) for e in found if e.is_file(follow_symlinks=False)]
        if part == b"new":
            fresh = {name for name, _ in here}
        names += [name for name, _ in here]
        inodes += [inode for _, inode in here]
    order = sorted(range(len(names)), key=names.__getitem__)
    return [names[at] for at in order], fresh, [inodes[at] for at in order]


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


async def pop3d_listing(
    store: MaildirStore, drop: maildrops.Maildrop, threads: IReactorThreads
) -> tuple[list[int], float]:
    """
    pop3d's first login to ``drop`` (nothing kept from before): its
    listing's sizes, and how long it took.  The sizes file it writes after
    answering is let finish first, so that the next round runs alone.
    """
    try:
        os.unlink(drop.path / SIZE_CACHE)
    except FileNotFoundError:
        pass
    started = time.perf_counter()
    maildrop = await store.open(drop.user)
    took = time.perf_counter() - started
    await maildrop.close()
    # The pool has one thread: this runs after the sizes are written.
    await deferToThreadPool(threads, threads.getThreadPool(), lambda: None)
    return list(maildrop.messages.sizes), took


async def main(reactor: IReactorTime) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    threads = IReactorThreads(reactor)
    # One thread, as one first login at a time would use.
    threads.suggestThreadPoolSize(1)
    counting = CountingProcesses(1, threads, clock=reactor)
    counting.startService()
    await counting.when_started()
    with tempfile.TemporaryDirectory(prefix="first-login-split-") as root:
        # run.py's "many" maildrop: half in new/, half in cur/.
        pool = [maildrops.mime_message(n, 3000, seed=3) for n in range(250)]
        messages = [pool[(n * 7) % len(pool)] for n in range(options.messages)]
        drop = maildrops.write_maildrop("many", Path(root) / "many", messages)
        expected = [size for _, size in sorted(zip(drop.file_names, drop.wire_sizes, strict=True))]
        path = os.fsencode(drop.path)
        store = MaildirStore(
            f"{root}/{{user}}", reactor=threads, listing_cache=0, counting=counting
        )
        print(f"Python {sys.version.split()[0]}; {options.messages:,} messages; wall time, ms")
        print(
            f"{'round':>5}  {'one process':>11}  {'two processes':>13}"
            f"  {'two, inodes kept':>16}  {'pop3d, one helper':>17}"
        )
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
            listed, pop3d = await pop3d_listing(store, drop, threads)
            if any(sizes != expected for sizes in (one, two, kept, listed)):
                raise SystemExit("a size differs from the maildrop's")
            print(
                f"{number:>5}  {alone * 1000:>11,.0f}  {split * 1000:>13,.0f}"
                f"  {with_inodes * 1000:>16,.0f}  {pop3d * 1000:>17,.0f}"
            )
    await counting.stopService()


if __name__ == "__main__":
    task.react(main)
