"""
Faults of the storage under a real Maildir: removals that fail during UPDATE,
a full disk, messages that vanish or shrink while being sent, a server
killed during UPDATE.  Whatever happens, no message the user did not delete
is lost, and none is ever half there.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm
from pop3d.stores.interfaces import IMaildrop, IMaildropStore, IMessageBody, ISeenFlags
from pop3d.stores.maildir import MaildirStore
from pop3d.testing import deliver_to_maildir

from .conftest import Logged, Wire
from .test_process import HOST, Launch, launch, serve, write_passwd

__all__ = ["launch"]  # the fixture, used by the kill -9 test

MESSAGES = [b"Subject: %d\n\nbody %d\n" % (n, n) for n in range(1, 6)]


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    root = tmp_path / "alice"
    for message in MESSAGES:
        deliver_to_maildir(str(root), message)
    return root


def _logged_in(store: IMaildropStore) -> Wire:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")
    portal = Portal(MaildropRealm(store), [checker])
    wire = Wire(POP3Factory(portal, clock=Clock(), login_failure_delay=0))
    assert wire.login().startswith(b"+OK maildrop has 5 messages")
    return wire


@pytest.fixture
def wire(tmp_path: Path, mail: Path) -> Wire:
    return _logged_in(MaildirStore(f"{tmp_path}/{{user}}"))


def _contents(root: Path) -> list[bytes]:
    return sorted(p.read_bytes() for part in ("new", "cur") for p in (root / part).iterdir())


def _failing(
    monkeypatch: pytest.MonkeyPatch, name: str, call: str, error: int, target: bytes
) -> None:
    """Make os.<call> fail with ``error`` for the file holding ``target``."""
    original: Callable[..., object] = getattr(os, call)
    directory = {}

    def failing(path: str, *args: object, **kwargs: object) -> object:
        fd = kwargs.get("dir_fd") or kwargs.get("src_dir_fd")
        if isinstance(fd, int) and path not in directory:
            try:
                with open(os.open(path, os.O_RDONLY, dir_fd=fd), "rb") as file:
                    directory[path] = file.read()
            except OSError:
                directory[path] = b""
        if directory.get(path) == target:
            raise OSError(error, os.strerror(error), path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, call, failing)


@pytest.mark.parametrize("error", [errno.EACCES, errno.EIO, errno.EROFS])
def test_a_removal_that_fails_loses_nothing_else(
    wire: Wire, mail: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """RFC 1939 section 6 and RFC 3206: -ERR [SYS/TEMP], the rest done."""
    _failing(monkeypatch, "unlink", "unlink", error, MESSAGES[1])
    for number in (1, 2, 3):
        wire.command(b"DELE %d" % number)
    assert (
        wire.command(b"QUIT")
        == b"-ERR [SYS/TEMP] 1 message(s) could not be deleted, try again later\r\n"
    )
    assert _contents(mail) == sorted([MESSAGES[1], MESSAGES[3], MESSAGES[4]])


def test_a_message_already_removed_by_someone_else(wire: Wire, mail: Path) -> None:
    for path in (mail / "new").iterdir():
        if path.read_bytes() == MESSAGES[0]:
            path.unlink()
    wire.command(b"DELE 1")
    assert wire.command(b"QUIT") == b"+OK bye\r\n"
    assert _contents(mail) == sorted(MESSAGES[1:])


def test_a_full_disk_while_marking_seen_loses_nothing(
    wire: Wire, mail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for message in MESSAGES:
        _failing(monkeypatch, "rename", "rename", errno.ENOSPC, message)
    wire.command(b"RETR 1")
    wire.command(b"DELE 2")
    assert wire.command(b"QUIT") == b"+OK bye\r\n"
    assert _contents(mail) == sorted([MESSAGES[0], *MESSAGES[2:]])


@implementer(IMaildrop)
class _ActingAfterOpening:
    """A maildrop that runs ``act`` once a message is opened, before it is read."""

    def __init__(self, maildrop: IMaildrop, act: Callable[[], object]) -> None:
        self._maildrop = maildrop
        self._act = act
        self.messages = maildrop.messages

    def open_message(self, index: int) -> Deferred[IMessageBody]:
        def acted(body: IMessageBody) -> IMessageBody:
            self._act()
            return body

        return maybeDeferred(self._maildrop.open_message, index).addCallback(acted)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        return self._maildrop.remove(indexes)

    def close(self) -> Deferred[None]:
        return self._maildrop.close()


def _after_opening(tmp_path: Path, mail: Path, act: Callable[[Path], object]) -> Wire:
    """A session in which ``act`` runs on message 1's file right after RETR opened it."""
    [victim] = [p for p in (mail / "new").iterdir() if p.read_bytes() == MESSAGES[0]]
    maildirs = MaildirStore(f"{tmp_path}/{{user}}")

    @implementer(IMaildropStore)
    class Acting:
        def open(self, mailbox: str) -> Deferred[IMaildrop]:
            def wrapped(maildrop: IMaildrop) -> IMaildrop:
                return _ActingAfterOpening(maildrop, lambda: act(victim))

            return maildirs.open(mailbox).addCallback(wrapped)

    return _logged_in(Acting())


def test_a_message_removed_while_being_sent_is_sent_whole(tmp_path: Path, mail: Path) -> None:
    """Once RETR has opened the file, its bytes stay readable."""
    wire = _after_opening(tmp_path, mail, Path.unlink)
    answer = wire.command(b"RETR 1")
    assert answer.endswith(MESSAGES[0].replace(b"\n", b"\r\n") + b".\r\n")


def test_a_message_cut_short_while_being_sent_does_not_end_as_complete(
    tmp_path: Path, mail: Path
) -> None:
    wire = _after_opening(tmp_path, mail, lambda path: os.truncate(path, 5))
    answer = wire.command(b"RETR 1")
    assert answer.startswith(b"+OK ")
    assert not answer.endswith(b"\r\n.\r\n")
    assert wire.transport.disconnecting or wire.closed


@pytest.mark.process
def test_killed_during_update_leaves_every_message_whole_or_gone(
    tmp_path: Path, launch: Launch
) -> None:
    """
    kill -9 of the real server right after QUIT of a session that deleted
    many messages: each message is then either absent or complete.
    """
    mail_root = tmp_path / "mail"
    root = mail_root / "alice"
    messages = [b"Subject: %d\n\n%s\n" % (n, b"x" * 2000) for n in range(400)]
    for message in messages:
        deliver_to_maildir(str(root), message)
    server = serve(launch, mail_root, write_passwd(tmp_path))
    with socket.create_connection((HOST, server.port), timeout=30) as client:
        script = b"USER alice\r\nPASS wonderland\r\n"
        script += b"".join(b"DELE %d\r\n" % n for n in range(1, 401, 2)) + b"QUIT\r\n"
        client.sendall(script)
        reader = client.makefile("rb")
        for _ in range(2 + 200):  # greeting, USER, PASS and the DELEs
            assert reader.readline().startswith(b"+OK")
        os.kill(server.pid, signal.SIGKILL)
    server.process.wait()
    remaining = _contents(root)
    assert set(remaining) <= set(messages)
    kept = {m for i, m in enumerate(messages) if i % 2 == 1}
    assert kept <= set(remaining)


# -- marking what was read seen (ISeenFlags), whatever the store answers --------


@implementer(IMaildrop, ISeenFlags)
class _MarkingSeen:
    """A maildrop whose ``mark_seen`` answers as ``answer`` says, and records its calls."""

    def __init__(self, maildrop: IMaildrop, answer: str, calls: list[list[int]]) -> None:
        self._maildrop = maildrop
        self._answer = answer
        self._calls = calls
        self.messages = maildrop.messages

    def open_message(self, index: int) -> IMessageBody | Deferred[IMessageBody]:
        return self._maildrop.open_message(index)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        return self._maildrop.remove(indexes)

    def close(self) -> Deferred[None]:
        return self._maildrop.close()

    def mark_seen(self, retrieved: Sequence[int], kept: Sequence[int]) -> object:
        self._calls.append(list(retrieved))
        if self._answer == "raises":
            raise OSError(errno.EIO, "the flags cannot be written")
        if self._answer == "fails":
            return fail(OSError(errno.EIO, "the flags cannot be written"))
        if self._answer == "coroutine":
            return self._marked()
        return None if self._answer == "nothing to do" else succeed(None)

    async def _marked(self) -> None:
        return None


@pytest.mark.parametrize(
    ("answer", "failure_logged"),
    [
        ("nothing to do", False),
        ("done", False),
        ("coroutine", False),
        ("raises", True),
        ("fails", True),
    ],
)
def test_quit_answers_however_marking_seen_ends(
    answer: str, failure_logged: bool, tmp_path: Path, mail: Path, logged: Logged
) -> None:
    """
    RFC 1939 section 6: after UPDATE the server answers QUIT and closes.
    Marking messages seen is the store's business: a store that fails at it
    (at once or later) has it logged, and the client, whose work is done,
    still gets its +OK and loses no message.
    """
    maildirs = MaildirStore(f"{tmp_path}/{{user}}")
    calls: list[list[int]] = []

    @implementer(IMaildropStore)
    class Marking:
        def open(self, mailbox: str) -> Deferred[IMaildrop]:
            opened: Deferred[IMaildrop] = maildirs.open(mailbox)
            return opened.addCallback(_MarkingSeen, answer, calls)

    wire = _logged_in(Marking())
    assert wire.command(b"RETR 2") == b"+OK 22 octets\r\nSubject: 2\r\n\r\nbody 2\r\n.\r\n"
    assert wire.command(b"QUIT") == b"+OK bye\r\n"
    assert wire.closed
    assert calls == [[1]]
    failures = [e for e in logged.events if formatEvent(e).endswith("marking messages seen failed")]
    assert len(failures) == (1 if failure_logged else 0)
    assert _contents(mail) == sorted(MESSAGES)
