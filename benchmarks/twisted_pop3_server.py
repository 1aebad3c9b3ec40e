"""
twisted.mail.pop3 serving Maildirs: what benchmarks/run.py compares pop3d with.

    python benchmarks/twisted_pop3_server.py --listen tcp:0:interface=127.0.0.1 \\
        --maildirs /path/to/maildirs --passwd /path/to/user-password-file

This is Twisted's own POP3 server protocol (``twisted.mail.pop3.POP3``) with
Twisted's own Maildir mailbox (``twisted.mail.maildir.MaildirMailbox``) and
Twisted's own password file checker (``FilePasswordDB``, cached), set up the
way pop3d is set up, so that the comparison is fair.  Only what is needed for
it to send the right bytes, or to run like pop3d does, is changed here, in
subclasses, and nothing else:

1. Messages are opened in binary mode.  ``MaildirMailbox.getMessage`` opens
   them in text mode, so ``FileSender`` hands ``str`` chunks to
   ``POP3.transformChunk``, which replaces ``bytes`` in them: on Python 3
   every RETR of a Maildir message fails with a TypeError.
2. Byte-stuffing is right at the start of a message and across chunks.
   ``transformChunk`` is stateless: ``chunk.replace(b"\\n", b"\\r\\n")
   .replace(b"\\r\\n.", b"\\r\\n..")`` misses a "." at the start of the
   first line, and at the start of each 16 KiB chunk that ``FileSender``
   reads, so a line starting with "." at a 16 KiB boundary goes out
   unstuffed and the client takes it for the end of the message (or drops
   its dot).  The fix remembers whether the previous chunk ended a line:
   two O(1) checks per chunk, the same two passes of ``bytes.replace``.
3. TCP_NODELAY, as pop3d sets it: without it, the terminator written after
   the last chunk waits for the client's delayed ACK.
4. The inactivity timeout is 600 seconds, pop3d's (RFC 1939's minimum),
   rather than Twisted's 300, so that idle sessions are not dropped while
   they are being counted.

Not changed: the 16 KiB chunks and pull producer of ``FileSender``, the
cooperative STAT/LIST/UIDL listings, the sizes (``MaildirMailbox`` reports
the file size, LF line endings, not the RFC 1939 size with CRLF: a fix would
read every message, as pop3d does), messages stored with CRLF (they would
get CR CR LF; the benchmark stores LF, as MTAs write), the UIDL (MD5 of the
file name, which changes when a message moves from new/ to cur/), and the
absence of maildrop locking.  Logging goes to stdout, as ``twistd -n``
logs; "twisted.mail.pop3 listening on HOST:PORT" tells that it is ready.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.cred.checkers import FilePasswordDB
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.mail import maildir, pop3
from zope.interface import implementer

log = Logger()


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """Fix 1: messages are bytes on disk and on the wire."""

    def getMessage(self, i: int) -> IO[bytes]:  # type: ignore[override]
        return open(self.list[i], "rb")  # FileSender reads it to the end


class FairPOP3(pop3.POP3):
    """twisted.mail.pop3.POP3 with fixes 2-4 (see the module docstring)."""

    timeOut = 600
    _at_line_start = True

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)  # fix 3
        super().connectionMade()  # type: ignore[no-untyped-call]

    def _sendMessageContent(
        self, i: bytes, fpWrapper: Callable[[Any], Any], successResponse: Callable[[int], Any]
    ) -> Any:
        # Fix 2: a new message starts at the start of a line.  (Commands are
        # not processed while a message is sent, so one flag is enough.)
        def start_message(file: Any) -> Any:
            self._at_line_start = True
            return fpWrapper(file)

        return super()._sendMessageContent(  # type: ignore[no-untyped-call]
            i, start_message, successResponse
        )

    def transformChunk(self, chunk: bytes) -> bytes:
        # Fix 2: Twisted's two replaces, plus the line start carried over
        # from the previous chunk.
        data = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data


@implementer(IRealm)
class MaildirRealm:
    """A user's maildrop is the Maildir ``ROOT/<user>`` (pop3d: maildir:ROOT/{user})."""

    def __init__(self, root: bytes) -> None:
        self.root = root

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, pop3.IMailbox, Callable[[], None]]:
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("only IMailbox")
        if not isinstance(avatarId, bytes) or b"/" in avatarId or avatarId.startswith(b"."):
            raise UnauthorizedLogin()
        mailbox = BinaryMaildirMailbox(os.path.join(self.root, avatarId))
        return pop3.IMailbox, mailbox, lambda: None


class POP3ServerFactory(protocol.ServerFactory):
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr: Any) -> Any:
        server = FairPOP3()
        server.factory = self  # type: ignore[assignment]
        server.portal = self.portal  # type: ignore[assignment]
        return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="tcp:0:interface=127.0.0.1")
    parser.add_argument("--maildirs", required=True, help="directory of per-user Maildirs")
    parser.add_argument("--passwd", required=True, help="user:password lines")
    options = parser.parse_args(argv)

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    portal = Portal(
        MaildirRealm(os.fsencode(options.maildirs)),
        [FilePasswordDB(options.passwd, cache=True)],
    )
    factory = POP3ServerFactory(portal)

    def listening(port: IListeningPort) -> None:
        address = port.getHost()
        log.info(
            "twisted.mail.pop3 listening on {host}:{port}",
            host=address.host,  # type: ignore[attr-defined]
            port=address.port,  # type: ignore[attr-defined]
        )

    def failed(failure: Any) -> None:
        log.failure("cannot listen", failure)
        reactor.stop()

    serverFromString(reactor, options.listen).listen(factory).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
