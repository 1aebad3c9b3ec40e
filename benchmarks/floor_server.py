"""
The floor of CPython + Twisted: the least work any correct POP3 server
written in CPython on Twisted must do for benchmarks/run.py's workloads.

    python benchmarks/floor_server.py --maildirs ROOT --passwd FILE [--workers N]

It is a floor, not a server.  It answers every byte the benchmark checks as a
correct server would (pop3d's form: RFC 1939 sizes with CRLF line endings,
the Maildir unique name as UIDL, messages numbered in unique-name order), and
does nothing else, so that its column shows what CPython and Twisted alone
cost on the machine the benchmark ran on:

- One process per core (``--workers``, default ``os.cpu_count()``), as
  ``pop3d --workers auto``: the parent binds 127.0.0.1 port 0 once
  (backlog 50), says ``... listening on 127.0.0.1:PORT``, forks the
  workers, forwards SIGTERM to them and waits; each worker adopts the
  socket (``reactor.adoptStreamPort``), says ``floor worker PID listening
  on 127.0.0.1:PORT`` and runs its own epoll reactor.
- A plain ``twisted.protocols.basic.LineReceiver`` (measured: as cheap per
  command line as any splitting of our own), a dict of verbs per state.
  It speaks only what the benchmark sends: USER, PASS, STAT, LIST and UIDL
  without an argument, RETR, NOOP, QUIT.  Anything else is answered
  ``-ERR``.
- USER/PASS: a dict lookup in the benchmark's passwd-file
  (``user:{PLAIN}password::``), read once at start.
- At PASS, the listing of ``new/`` and ``cur/``, sorted, every message read
  to count its RFC 1939 size (an LF that has no CR before it counts one
  more octet): ``os.readv`` into one preallocated buffer per process, the
  LFs counted as what ``bytes.replace`` deletes from a copy, which measured
  the cheapest (benchmarks/floor_choices.py).
- RETR: the message is read (one read for messages up to 256 KiB, a pull
  producer of 256 KiB chunks beyond that, so that a 200 MB message is not
  held in memory), dot-stuffed with one compiled ``re.sub`` of ``\\n\\.``
  and turned to CRLF with one ``bytes.replace`` (measured fastest:
  benchmarks/floor_choices.py), and handed to ``transport.write``.
- QUIT: the messages retrieved are renamed as seen (``new/NAME`` to
  ``cur/NAME:2,S``, or ``S`` added to the flags in ``cur/``), as Maildir POP3
  servers do; nothing else is written.

Left out on purpose, because no reply the benchmark checks depends on it:
no logging per session, no maildrop locking (RFC 1939's lock matters where
sessions share a maildrop or delete messages; the benchmark's never do), no
timeouts, no limits, no caching of anything across sessions (every login
reads every message), no thread pool (file work blocks the worker's
reactor), no TLS, no other command or argument.  Never use it to serve mail.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hmac
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from itertools import chain, count, repeat
from operator import itemgetter
from types import FrameType
from typing import Any, cast

from twisted.internet.interfaces import IPullProducer, ITCPTransport
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

#: One read of a message (and the chunks of a larger one).
CHUNK = 256 * 1024
#: A line that starts with "." (after the LF that ends the line before it).
_DOT_LINE = re.compile(rb"\n\.")
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_LF, _CR = 10, 13
_PR_SET_PDEATHSIG = 1

#: Each worker's read buffer (the reactor thread is the only reader).
_buffer = bytearray(CHUNK)
_buffers = [_buffer]
_view = memoryview(_buffer)


def read_passwd(path: str) -> dict[bytes, bytes]:
    """``user:{PLAIN}password::`` lines (Dovecot's passwd-file, as pop3d gets it)."""
    users = {}
    with open(path, "rb") as lines:
        for line in lines:
            user, _, rest = line.rstrip(b"\n").partition(b":")
            password = rest.split(b":", 1)[0]
            if password.startswith(b"{PLAIN}"):
                users[user] = password[len(b"{PLAIN}") :]
    return users


def _wire_size_from(fd: int, read: int) -> int:
    """
    The RFC 1939 size of the rest of a file whose first ``read`` octets are
    in the buffer: every LF counts two octets unless a CR is before it.
    """
    size, after_cr = 0, False
    while read:
        size += 2 * read - len(bytes(_view[:read]).replace(b"\n", b""))
        if _buffer.find(b"\r", 0, read) >= 0:
            size -= _buffer.count(b"\r\n", 0, read)
        if after_cr and _buffer[0] == _LF:
            size -= 1
        after_cr = _buffer[read - 1] == _CR
        read = os.readv(fd, _buffers)
    return size


def list_maildrop(path: bytes) -> tuple[list[bytes], list[int], list[int]]:
    """
    (names, 0 for new/ or 1 for cur/, RFC 1939 sizes) of every message, in
    unique-name order (pop3d's numbering).  A message that went away
    between the listing and its reading is left out.
    """
    names, in_new = sorted_names(path)
    fds = (os.open(path + b"/new", _DIRECTORY_FLAGS), os.open(path + b"/cur", _DIRECTORY_FLAGS))
    try:
        return count_messages(fds, names, in_new)
    finally:
        os.close(fds[0])
        os.close(fds[1])


def sorted_names(path: bytes) -> tuple[list[bytes], set[bytes]]:
    """The file names in new/ and cur/, sorted; and those in new/."""
    fresh = os.listdir(path + b"/new")
    names = fresh + os.listdir(path + b"/cur")
    names.sort()
    return names, set(fresh)


def count_messages(
    fds: tuple[int, int], names: list[bytes], in_new: set[bytes]
) -> tuple[list[bytes], list[int], list[int]]:
    """
    `list_maildrop` of ``names`` (of new/ if ``in_new``, else of cur/),
    read through the directories ``fds`` (new/, cur/).
    """
    kept: list[bytes] = []
    where: list[int] = []
    sizes: list[int] = []
    readv, open_, close, buffer, view = os.readv, os.open, os.close, _buffer, _view
    for name in names:
        if name[:1] == b".":
            continue
        part = 0 if name in in_new else 1
        try:
            fd = open_(name, _READ_FLAGS, dir_fd=fds[part])
        except FileNotFoundError:
            continue
        try:
            read = readv(fd, _buffers)
            if read < CHUNK and buffer.find(b"\r", 0, read) < 0:
                # The common case: one read, LF line endings.  Each LF
                # is one more octet on the wire: deleting them counts
                # them (a memchr per line) faster than bytes.count,
                # which tests every octet.
                size = 2 * read - len(bytes(view[:read]).replace(b"\n", b""))
            else:
                size = _wire_size_from(fd, read)
        finally:
            close(fd)
        kept.append(name)
        where.append(part)
        sizes.append(size)
    return kept, where, sizes


def encode(data: bytes | memoryview) -> bytes:
    """LF-terminated lines to CRLF, with a "." added to lines that start with one."""
    return _DOT_LINE.sub(b"\n..", data).replace(b"\n", b"\r\n")


def seen_name(name: bytes) -> bytes | None:
    """The Maildir name of a message flagged seen (``S``); None if it is already."""
    unique, colon, info = name.partition(b":")
    if not colon:
        return unique + b":2,S"
    if info.startswith(b"2,") and b"S" not in info:
        return unique + b":2," + bytes(sorted(info[2:] + b"S"))
    return None


@implementer(IPullProducer)
class MessageSender:
    """
    A message larger than one read, a chunk each time the transport asks,
    with what must carry over from one chunk to the next: whether the last
    octet sent ended a line (a "." after it starts one) and a CR held back
    (the CR of a CRLF that the read split in two).
    """

    def __init__(self, protocol: FloorPOP3, fd: int) -> None:
        self._protocol = protocol
        self._fd = fd
        self._last = b""
        self._cr = False

    def convert(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if b"\r" in data:
            if data[-1] == _CR:
                data, self._cr = data[:-1], True
            data = data.replace(b"\r\n", b"\n")
        if not data:
            return b""
        out = encode(data)
        if self._last == b"\n" and out[:1] == b".":
            out = b"." + out
        self._last = data[-1:]
        return out

    def resumeProducing(self) -> None:
        transport: Any = self._protocol.transport
        while True:
            read = os.readv(self._fd, _buffers)
            if not read:
                self._finish(transport)
                return
            if self._cr or _buffer.find(b"\r", 0, read) >= 0:
                out = self.convert(bytes(_view[:read]))
            else:
                # LF line endings: converted from the buffer, no copy of it.
                out = encode(_view[:read])
                if self._last == b"\n" and out[:1] == b".":
                    out = b"." + out
                self._last = b"\n" if _buffer[read - 1] == _LF else b""
            if out:
                transport.write(out)
                return

    def _finish(self, transport: Any) -> None:
        self.stopProducing()
        transport.unregisterProducer()
        tail = b"\r" if self._cr else b""
        if tail:
            self._last = tail
        transport.write(tail + (b".\r\n" if self._last == b"\n" else b"\r\n.\r\n"))
        transport.resumeProducing()  # commands are read again
        self._protocol.sender = None

    def stopProducing(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FloorPOP3(LineReceiver):
    """One session: the commands the benchmark sends, nothing else."""

    delimiter = b"\r\n"

    def __init__(self, root: bytes, users: dict[bytes, bytes]) -> None:
        self.root = root
        self.users = users
        self.commands = AUTHORIZATION
        self.user = b""
        self.path = b""
        self.names: list[bytes] = []
        self.where: list[int] = []
        self.sizes: list[int] = []
        self.total = 0
        self.retrieved: set[int] = set()
        #: Descriptors of new/ and cur/, opened at the first RETR.
        self.directories: tuple[int, int] | None = None
        self.sender: MessageSender | None = None

    def connectionMade(self) -> None:
        transport = cast(ITCPTransport, self.transport)
        transport.setTcpNoDelay(True)
        transport.write(b"+OK POP3 floor ready\r\n")

    def lineReceived(self, line: bytes) -> None:
        verb, _, argument = line.partition(b" ")
        handler = self.commands.get(verb.upper())
        if handler is None:
            self.transport.write(b"-ERR not spoken by the floor\r\n")  # type: ignore[union-attr]
        else:
            handler(self, argument)

    def connectionLost(self, reason: Any = None) -> None:
        if self.sender is not None:
            self.sender.stopProducing()
        if self.directories is not None:
            os.close(self.directories[0])
            os.close(self.directories[1])
            self.directories = None

    def do_user(self, argument: bytes) -> None:
        self.user = argument
        self.transport.write(b"+OK\r\n")  # type: ignore[union-attr]

    def do_pass(self, argument: bytes) -> None:
        password = self.users.get(self.user)
        if password is None or not hmac.compare_digest(password, argument):
            self.user = b""
            self.transport.write(b"-ERR [AUTH] invalid user name or password\r\n")  # type: ignore[union-attr]
            return
        self.path = self.root + b"/" + self.user
        try:
            self.names, self.where, self.sizes = list_maildrop(self.path)
        except OSError:
            self.transport.write(b"-ERR [SYS/TEMP] cannot read the maildrop\r\n")  # type: ignore[union-attr]
            return
        self.total = sum(self.sizes)
        self.commands = TRANSACTION
        self.transport.write(b"+OK\r\n")  # type: ignore[union-attr]

    def do_stat(self, argument: bytes) -> None:
        self.transport.write(b"+OK %d %d\r\n" % (len(self.sizes), self.total))  # type: ignore[union-attr]

    def do_list(self, argument: bytes) -> None:
        if argument:
            self.transport.write(b"-ERR not spoken by the floor\r\n")  # type: ignore[union-attr]
            return
        # One % over the whole listing: measured faster than a line at a time.
        sizes = self.sizes
        listing = (b"%d %d\r\n" * len(sizes)) % tuple(chain.from_iterable(zip(count(1), sizes)))
        self.transport.write(b"+OK\r\n" + listing + b".\r\n")  # type: ignore[union-attr]

    def do_uidl(self, argument: bytes) -> None:
        if argument:
            self.transport.write(b"-ERR not spoken by the floor\r\n")  # type: ignore[union-attr]
            return
        names = self.names
        unique = map(itemgetter(0), map(bytes.partition, names, repeat(b":")))
        listing = (b"%d %s\r\n" * len(names)) % tuple(chain.from_iterable(zip(count(1), unique)))
        self.transport.write(b"+OK\r\n" + listing + b".\r\n")  # type: ignore[union-attr]

    def do_retr(self, argument: bytes) -> None:
        transport: Any = self.transport
        index = int(argument) - 1 if argument.isdigit() else -1
        if not 0 <= index < len(self.names):
            transport.write(b"-ERR no such message\r\n")
            return
        if self.directories is None:
            self.directories = (
                os.open(self.path + b"/new", _DIRECTORY_FLAGS),
                os.open(self.path + b"/cur", _DIRECTORY_FLAGS),
            )
        try:
            fd = os.open(self.names[index], _READ_FLAGS, dir_fd=self.directories[self.where[index]])
        except OSError:
            transport.write(b"-ERR [SYS/TEMP] cannot read the message\r\n")
            return
        read = os.readv(fd, _buffers)
        # "+OK" with an LF: the LF becomes CRLF with the rest, and a first
        # line starting with "." is stuffed like any other.
        data = b"+OK\n" + _view[:read]
        self.retrieved.add(index)
        if read < CHUNK:
            os.close(fd)
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            transport.write(encode(data) + (b".\r\n" if data[-1] == _LF else b"\r\n.\r\n"))
            return
        self.sender = sender = MessageSender(self, fd)
        transport.pauseProducing()  # no command is read while the message goes out
        transport.write(sender.convert(data))
        transport.registerProducer(sender, False)

    def do_noop(self, argument: bytes) -> None:
        self.transport.write(b"+OK\r\n")  # type: ignore[union-attr]

    def do_quit(self, argument: bytes) -> None:
        if self.retrieved:
            self._mark_seen()
        self.transport.write(b"+OK\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _mark_seen(self) -> None:
        """Retrieved messages: new/NAME to cur/NAME:2,S, or S added in cur/."""
        assert self.directories is not None
        new, cur = self.directories
        for index in self.retrieved:
            name = self.names[index]
            target = seen_name(name)
            if target is None:
                continue
            source = new if self.where[index] == 0 else cur
            try:
                os.rename(name, target, src_dir_fd=source, dst_dir_fd=cur)
            except OSError as error:
                if error.errno != errno.ENOENT:  # moved by someone else meanwhile
                    raise


Handler = Callable[[FloorPOP3, bytes], None]
AUTHORIZATION: dict[bytes, Handler] = {
    b"USER": FloorPOP3.do_user,
    b"PASS": FloorPOP3.do_pass,
    b"QUIT": FloorPOP3.do_quit,
}
TRANSACTION: dict[bytes, Handler] = {
    b"STAT": FloorPOP3.do_stat,
    b"LIST": FloorPOP3.do_list,
    b"UIDL": FloorPOP3.do_uidl,
    b"RETR": FloorPOP3.do_retr,
    b"NOOP": FloorPOP3.do_noop,
    b"QUIT": FloorPOP3.do_quit,
}


class FloorFactory(ServerFactory):
    noisy = False

    def __init__(self, root: bytes, users: dict[bytes, bytes]) -> None:
        self.root = root
        self.users = users

    def buildProtocol(self, addr: Any) -> FloorPOP3:
        protocol = FloorPOP3(self.root, self.users)
        protocol.factory = self
        return protocol


def serve(listener: socket.socket, root: bytes, users: dict[bytes, bytes]) -> None:
    """A worker: its own epoll reactor, accepting on the inherited socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the parent is gone: so is the worker
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # Errors (tracebacks) go to the log the runner reads; sessions log nothing.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
        listener.fileno(), socket.AF_INET, FloorFactory(root, users)
    )
    listener.close()  # adoptStreamPort duplicated it
    address = port.getHost()
    # One write(2), the line ending with it: the other workers write to the
    # same pipe, and a line cut by theirs is not seen as "listening".
    sys.stdout.flush()
    os.write(1, f"floor worker {os.getpid()} listening on {address.host}:{address.port}\n".encode())
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maildirs", required=True, help="directory of per-user Maildirs")
    parser.add_argument("--passwd", required=True, help="Dovecot passwd-file ({PLAIN})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args(argv)
    users = read_passwd(options.passwd)
    root = os.fsencode(os.path.abspath(options.maildirs))

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    listener.setblocking(False)
    host, port = listener.getsockname()
    print(f"CPython+Twisted floor listening on {host}:{port}", flush=True)
    workers = []
    for _ in range(options.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(listener, root, users)
            except BaseException:
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)
            os._exit(0)
        workers.append(pid)
    listener.close()

    def forward(signum: int, frame: FrameType | None) -> None:
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break


if __name__ == "__main__":
    main()
