"""
RETR opens each message relative to the ``new/`` or ``cur/`` directory its
session already holds (pop3d.stores.maildir._OpenSubdirectories): as safe as
opening the Maildir again for each message, and bounded in descriptors.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred

from pop3d.errors import MaildropUnavailable
from pop3d.stores.interfaces import IMaildrop, IMessageBody
from pop3d.stores.maildir import MaildirStore
from pop3d.testing import deliver_to_maildir


def _read_all(body: IMessageBody) -> bytes:
    data = b""
    while chunk := body.read(65536):
        assert isinstance(chunk, bytes)  # a Maildir answers at once
        data += chunk
    body.close()
    return data


async def _retr(maildrop: IMaildrop, index: int) -> bytes:
    return _read_all(await maybeDeferred(maildrop.open_message, index))


def _descriptors() -> int:
    gc.collect()  # files left open by earlier tests would close meanwhile
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(f"{tmp_path}/{{user}}")


@pytest_twisted.ensureDeferred
async def test_every_message_is_served_whole_one_after_another(
    store: MaildirStore, tmp_path: Path
) -> None:
    bodies = [b"Subject: %d\n\n%s\n" % (n, b"line\n" * n) for n in range(5)]
    for n, body in enumerate(bodies):
        deliver_to_maildir(str(tmp_path / "alice"), body, subdirectory=("new", "cur")[n % 2])
    maildrop = await store.open("alice")
    served = {await _retr(maildrop, index) for index in range(len(bodies))}
    served |= {await _retr(maildrop, index) for index in range(len(bodies))}  # and again
    # Each number is its own message, through the held directories too.
    assert [await _retr(maildrop, index) for index in range(len(bodies))] == bodies
    await maildrop.close()
    assert served == set(bodies)


def _maildir_replaced(maildir: Path, tmp_path: Path, second: str) -> None:
    maildir.rename(tmp_path / "moved")
    deliver_to_maildir(str(maildir), b"someone else's\n")


def _maildir_swapped_for_a_link(maildir: Path, tmp_path: Path, second: str) -> None:
    maildir.rename(tmp_path / "moved")
    maildir.symlink_to(tmp_path / "moved")  # the same directory, through a link


def _message_swapped_for_a_link(maildir: Path, tmp_path: Path, second: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    (maildir / "new" / second).unlink()
    (maildir / "new" / second).symlink_to(secret)


def _message_moved_to_cur(maildir: Path, tmp_path: Path, second: str) -> None:
    os.rename(maildir / "new" / second, maildir / "cur" / f"{second}:2,S")


def _subdirectory_replaced(maildir: Path, tmp_path: Path, second: str) -> None:
    # The held new/ is the one the session read; a message a program moved
    # into a new new/ meanwhile is still found (the Maildir is read again).
    (maildir / "new").rename(maildir / "old-new")
    (maildir / "new").mkdir()
    os.rename(maildir / "old-new" / second, maildir / "new" / second)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "change",
    [_maildir_replaced, _maildir_swapped_for_a_link, _message_swapped_for_a_link],
    ids=["maildir replaced", "maildir swapped for a link", "message swapped for a link"],
)
async def test_after_a_first_retr_what_is_no_longer_the_locked_maildir_is_not_served(
    store: MaildirStore, tmp_path: Path, change: Callable[[Path, Path, str], None]
) -> None:
    """The held new/ is used only while the path is still the Maildir locked, and its file."""
    maildir = tmp_path / "alice"
    deliver_to_maildir(str(maildir), b"first\n")
    second = deliver_to_maildir(str(maildir), b"second\n")
    maildrop = await store.open("alice")
    await _retr(maildrop, 0)  # its new/ is held from now on
    change(maildir, tmp_path, second)
    with pytest.raises(MaildropUnavailable):
        await maybeDeferred(maildrop.open_message, 1)
    await maildrop.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "change",
    [_message_moved_to_cur, _subdirectory_replaced],
    ids=["message moved to cur", "subdirectory replaced"],
)
async def test_after_a_first_retr_a_message_moved_is_still_served(
    store: MaildirStore, tmp_path: Path, change: Callable[[Path, Path, str], None]
) -> None:
    maildir = tmp_path / "alice"
    deliver_to_maildir(str(maildir), b"first\n")
    second = deliver_to_maildir(str(maildir), b"second\n")
    maildrop = await store.open("alice")
    await _retr(maildrop, 0)
    change(maildir, tmp_path, second)
    assert await _retr(maildrop, 1) == b"second\n"
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_held_directories_are_bounded_and_closed_with_their_session(
    tmp_path: Path,
) -> None:
    store = MaildirStore(f"{tmp_path}/{{user}}", held_directories=2)
    users = ("alice", "bob", "carol")
    for user in users:
        deliver_to_maildir(str(tmp_path / user), b"x\n")
        deliver_to_maildir(str(tmp_path / user), b"y\n", subdirectory="cur")
    maildrops = [await store.open(user) for user in users]
    before = _descriptors()  # the lock table's is open now
    for maildrop in maildrops:
        assert {await _retr(maildrop, 0), await _retr(maildrop, 1)} == {b"x\n", b"y\n"}
    # Three sessions reading from new/ and cur/: two descriptors, no more.
    assert _descriptors() == before + 2
    for maildrop in maildrops:
        await maildrop.close()
    assert _descriptors() == before


@pytest_twisted.ensureDeferred
async def test_without_held_directories_a_session_holds_no_descriptor(tmp_path: Path) -> None:
    store = MaildirStore(f"{tmp_path}/{{user}}", held_directories=0)
    deliver_to_maildir(str(tmp_path / "alice"), b"x\n")
    maildrop = await store.open("alice")
    before = _descriptors()
    assert await _retr(maildrop, 0) == b"x\n"
    assert _descriptors() == before
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_retr_after_retr_over_tcp_sends_the_same_octets(tmp_path: Path) -> None:
    """
    RFC 1939 section 3: each RETR of a session, the first (which opens the
    Maildir) and the later ones (opened in the held directory), sends the
    message with CRLF line endings, a "." added in front of every line
    starting with ".", and ".CRLF" at the end, byte for byte.
    """
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.cred.portal import Portal
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.threads import deferToThread

    from pop3d import MaildropRealm, POP3Factory, POP3Service

    maildir = tmp_path / "alice"
    deliver_to_maildir(str(maildir), b"Subject: one\n\n.\n..two\nend\n", subdirectory="cur")
    deliver_to_maildir(str(maildir), b".starts\r\nwith a dot\r\n")
    store = MaildirStore(f"{tmp_path}/{{user}}")
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    factory = POP3Factory(Portal(MaildropRealm(store), [checker]), clock=reactor, timeout=600)
    pop3 = POP3Service([serverFromString(reactor, "tcp:0:interface=127.0.0.1")], factory)
    pop3.startService()
    try:
        [port] = await pop3.when_listening()

        def talk() -> bytes:
            import socket

            commands = b"USER alice\r\nPASS secret\r\n"
            commands += b"RETR 1\r\nRETR 2\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"
            with socket.create_connection(("127.0.0.1", port.getHost().port), 10) as client:
                client.sendall(commands)
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
            return received

        received = await deferToThread(talk)
    finally:
        await pop3.stopService()
    replies = received.split(b"\r\n", 3)[3]  # after the greeting, USER and PASS
    first = b"+OK 31 octets\r\nSubject: one\r\n\r\n..\r\n...two\r\nend\r\n.\r\n"
    second = b"+OK 21 octets\r\n..starts\r\nwith a dot\r\n.\r\n"
    assert replies.startswith(first + second + first + second + b"+OK")
