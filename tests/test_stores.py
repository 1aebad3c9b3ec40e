"""
The store contract (pop3d.stores.interfaces), checked the same way for every store:
the Maildir store, the mbox store and the public in-memory store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from zope.interface.verify import verifyObject

from pop3d.errors import MaildropLocked, MessageGone
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.mbox import MboxFormat, MboxStore
from pop3d.testing import MemoryStore, deliver_to_maildir
from pop3d.wire import MessageEncoder, is_valid_uidl, wire_size


@dataclass
class StoreUnderTest:
    """A store plus the ways a test puts mail in it and sees what is left."""

    store: IMaildropStore
    deliver: Callable[[str, bytes], None]
    remaining: Callable[[str], list[bytes]]
    vanish: Callable[[str, int], None]


def _memory(tmp_path: Path) -> StoreUnderTest:
    store = MemoryStore()
    uids: dict[str, list[str]] = {}

    def deliver(mailbox: str, message: bytes) -> None:
        uids.setdefault(mailbox, []).append(store.deliver(mailbox, message))

    def vanish(mailbox: str, index: int) -> None:
        store.remove_behind_the_servers_back(mailbox, uids[mailbox][index])

    return StoreUnderTest(store, deliver, store.messages, vanish)


def _maildir(tmp_path: Path) -> StoreUnderTest:
    store = MaildirStore(f"{tmp_path}/{{user}}/Maildir")

    def deliver(mailbox: str, message: bytes) -> None:
        deliver_to_maildir(store.path_for(mailbox), message)

    def files(mailbox: str) -> list[Path]:
        root = Path(store.path_for(mailbox))
        return sorted((*root.glob("new/*"), *root.glob("cur/*")), key=lambda p: p.name)

    def remaining(mailbox: str) -> list[bytes]:
        return [path.read_bytes() for path in files(mailbox)]

    def vanish(mailbox: str, index: int) -> None:
        files(mailbox)[index].unlink()

    return StoreUnderTest(store, deliver, remaining, vanish)


# An mbox as an MTA writes it (mboxrd): a From_ line, the message with
# "From " lines quoted, and a line ending that is framing, not message.
_FROM_LINE = b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\n"
_MBOX_MESSAGE = re.compile(rb"^From [^\n]*\n((?:(?!From ).*\n?)*)", re.MULTILINE)


def _mbox(tmp_path: Path) -> StoreUnderTest:
    (tmp_path / "mail").mkdir()
    store = MboxStore(f"{tmp_path}/mail/{{user}}", format=MboxFormat.MBOXRD)

    def stored(mailbox: str) -> list[bytes]:
        path = tmp_path / "mail" / mailbox
        return [m.group(0) for m in _MBOX_MESSAGE.finditer(path.read_bytes())]

    def deliver(mailbox: str, message: bytes) -> None:
        quoted = re.sub(rb"(?m)^(>*From )", rb">\1", message)
        with open(tmp_path / "mail" / mailbox, "ab") as mbox:
            mbox.write(_FROM_LINE + quoted + b"\n")

    def remaining(mailbox: str) -> list[bytes]:
        messages = []
        for entry in stored(mailbox):
            message = entry.split(b"\n", 1)[1]
            message = message.removesuffix(b"\r\n" if message.endswith(b"\r\n") else b"\n")
            messages.append(re.sub(rb"(?m)^>(>*From )", rb"\1", message))
        return messages

    def vanish(mailbox: str, index: int) -> None:
        # Another program, ignoring the locks, writes a new file without it.
        entries = stored(mailbox)
        del entries[index]
        replacement = tmp_path / "mail" / "replacement"
        replacement.write_bytes(b"".join(entries))
        os.replace(replacement, tmp_path / "mail" / mailbox)

    return StoreUnderTest(store, deliver, remaining, vanish)


@pytest.fixture(params=[_memory, _maildir, _mbox], ids=["memory", "maildir", "mbox"])
def under_test(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    factory: Callable[[Path], StoreUnderTest] = request.param
    return factory(tmp_path)


MESSAGES = [
    b"Subject: one\n\n.dot\n",
    b"Subject: two\r\n\r\nCRLF\r\n",
    b"Subject: three\n\nno newline",
    b"Subject: one\n\n.dot\n",  # identical bytes, still a distinct message
]


def _read_all(body: IMessageBody) -> bytes:
    chunks = []
    while chunk := body.read(7):
        chunks.append(chunk)
    body.close()
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_snapshot_lists_every_message_with_its_wire_size(
    under_test: StoreUnderTest,
) -> None:
    for message in MESSAGES:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    verifyObject(IMaildrop, maildrop)
    assert [m.size for m in maildrop.messages] == [wire_size(m) for m in MESSAGES]
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_messages_read_back_as_stored(under_test: StoreUnderTest) -> None:
    for message in MESSAGES:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    for index, message in enumerate(MESSAGES):
        body = await maybeDeferred(maildrop.open_message, index)
        assert _read_all(body) == message
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_size_is_what_the_encoder_sends(under_test: StoreUnderTest) -> None:
    """RFC 1939 section 11: the size is the octets RETR sends, before stuffing."""
    for message in MESSAGES:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    for index, info in enumerate(maildrop.messages):
        encoder = MessageEncoder()
        body = await maybeDeferred(maildrop.open_message, index)
        sent = encoder.feed(_read_all(body)) + encoder.finish()
        unstuffed = sent[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
        if unstuffed.startswith(b".."):
            unstuffed = unstuffed[1:]
        assert len(unstuffed) == info.size
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_uids_are_valid_unique_and_stable(under_test: StoreUnderTest) -> None:
    """RFC 1939 section 7 (UIDL): unique, 1-70 chars of 0x21-0x7E, same every session."""
    for message in MESSAGES:
        under_test.deliver("alice", message)
    first = await under_test.store.open("alice")
    uids = [m.uid for m in first.messages]
    assert all(is_valid_uidl(uid) for uid in uids)
    assert len(set(uids)) == len(uids)
    await first.remove([0])
    await first.close()
    second = await under_test.store.open("alice")
    assert [m.uid for m in second.messages] == uids[1:]
    await second.close()


@pytest_twisted.ensureDeferred
async def test_lock_is_exclusive_until_closed(under_test: StoreUnderTest) -> None:
    under_test.deliver("alice", MESSAGES[0])
    held = await under_test.store.open("alice")
    with pytest.raises(MaildropLocked):
        await under_test.store.open("alice")
    other = await under_test.store.open("bob")
    await other.close()
    await held.close()
    again = await under_test.store.open("alice")
    await again.close()


@pytest_twisted.ensureDeferred
async def test_close_twice_is_harmless(under_test: StoreUnderTest) -> None:
    maildrop = await under_test.store.open("alice")
    await maildrop.close()
    await maildrop.close()
    again = await under_test.store.open("alice")
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_mailbox_without_mail_is_empty(under_test: StoreUnderTest) -> None:
    maildrop = await under_test.store.open("nobody-yet")
    assert list(maildrop.messages) == []
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_mail_arriving_later_is_not_in_the_snapshot(under_test: StoreUnderTest) -> None:
    under_test.deliver("alice", MESSAGES[0])
    maildrop = await under_test.store.open("alice")
    under_test.deliver("alice", MESSAGES[1])
    assert len(maildrop.messages) == 1
    await maildrop.remove([0])
    await maildrop.close()
    assert under_test.remaining("alice") == [MESSAGES[1]]


@pytest_twisted.ensureDeferred
async def test_remove_touches_only_the_given_messages(under_test: StoreUnderTest) -> None:
    for message in MESSAGES:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    await maildrop.remove([1, 3])
    await maildrop.close()
    assert under_test.remaining("alice") == [MESSAGES[0], MESSAGES[2]]


@pytest_twisted.ensureDeferred
async def test_removing_a_message_already_gone_is_not_an_error(
    under_test: StoreUnderTest,
) -> None:
    for message in MESSAGES[:2]:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    under_test.vanish("alice", 0)
    await maildrop.remove([0, 1])
    await maildrop.close()
    assert under_test.remaining("alice") == []


@pytest_twisted.ensureDeferred
async def test_vanished_message_cannot_be_opened(under_test: StoreUnderTest) -> None:
    for message in MESSAGES[:2]:
        under_test.deliver("alice", message)
    maildrop = await under_test.store.open("alice")
    under_test.vanish("alice", 0)
    with pytest.raises(MessageGone):
        await maybeDeferred(maildrop.open_message, 0)
    assert _read_all(await maybeDeferred(maildrop.open_message, 1)) == MESSAGES[1]
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_an_opened_message_stays_readable_if_removed(under_test: StoreUnderTest) -> None:
    under_test.deliver("alice", MESSAGES[0])
    maildrop = await under_test.store.open("alice")
    body = await maybeDeferred(maildrop.open_message, 0)
    under_test.vanish("alice", 0)
    assert _read_all(body) == MESSAGES[0]
    await maildrop.close()


def test_stores_provide_the_interface(under_test: StoreUnderTest) -> None:
    assert verifyObject(IMaildropStore, under_test.store)


@pytest_twisted.ensureDeferred
async def test_messages_are_a_message_list(under_test: StoreUnderTest) -> None:
    under_test.deliver("alice", MESSAGES[0])
    under_test.deliver("alice", MESSAGES[1])
    maildrop = await under_test.store.open("alice")
    messages = maildrop.messages
    await maildrop.close()
    assert isinstance(messages, MessageList)
    assert list(messages) == [messages[0], messages[1]]
    assert messages.sizes == tuple(wire_size(m) for m in MESSAGES[:2])
    assert messages[1] == MessageInfo(messages.uids[1], messages.sizes[1])
    assert messages[1:] == MessageList(messages.uids[1:], messages.sizes[1:])


def test_a_message_list_needs_a_size_for_every_uidl() -> None:
    with pytest.raises(ValueError):
        MessageList(("a", "b"), (1,))


def test_a_message_list_numbers_its_lines_once() -> None:
    """
    The bodies of LIST and UIDL of a whole maildrop (RFC 1939 sections 5 and
    7), made once per listing; a listing extended by deliveries keeps what
    was made and adds the new lines.
    """
    listed = MessageList(("a1", "b2"), (120, 7))
    assert listed.numbered("sizes") == b"1 120\r\n2 7\r\n"
    assert listed.numbered("uids") == b"1 a1\r\n2 b2\r\n"
    assert listed.numbered("uids") is listed.numbered("uids")
    longer = listed.extended(("c3",), (9,))
    assert longer == MessageList(("a1", "b2", "c3"), (120, 7, 9))
    assert longer.numbered("sizes") == b"1 120\r\n2 7\r\n3 9\r\n"
    assert longer.numbered("uids") == b"1 a1\r\n2 b2\r\n3 c3\r\n"
    assert MessageList().numbered("uids") == b""
