"""
What is particular to the mbox store: the format (From_ lines, quoting,
framing; test_mbox_format.py has mboxo against mboxrd), UIDLs, dotlock and
fcntl locks shared with other programs, the rewrite at QUIT (mail appended
meanwhile, owner and mode, crashes), and procmail writing the mbox that the
server reads.

Most tests use the store without a reactor, where every Deferred has fired
on return (`now`); the real ``twistd pop3d`` runs where a test needs a
process to kill.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar, cast

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pop3d.errors import DeletionFailed, MaildropLocked, MaildropUnavailable
from pop3d.stores.interfaces import IMaildrop
from pop3d.stores.mbox import (
    DOTLOCK_STALE_SECONDS,
    REWRITE_SUFFIX,
    MboxFormat,
    MboxStore,
)
from pop3d.stores.posix import LOCK_REFRESH_SECONDS
from pop3d.wire import MessageEncoder, ResponseCode, is_valid_uidl, wire_size

from .conftest import require_program
from .test_process import PATIENCE, Server, login, pop3d_arguments, write_passwd

T = TypeVar("T")

FROM_LINE = b"From sender@example.test  Thu Nov 26 12:13:17 2026\n"


def now(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has fired (the store runs inline)."""
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return cast(T, results[0])


def quote(message: bytes) -> bytes:
    """mboxrd: one more ">" on every line matching ^>*From ."""
    return re.sub(rb"(?m)^(>*From )", rb">\1", message)


def quote_mboxo(message: bytes) -> bytes:
    """mboxo (procmail, Postfix local): ">" before every line starting "From "."""
    return re.sub(rb"(?m)^From ", b">From ", message)


def mbox_of(
    messages: list[bytes], from_line: bytes = FROM_LINE, quoting: Callable[[bytes], bytes] = quote
) -> bytes:
    """An mbox as an MDA writes it (mboxrd by default): each message ends with a blank line."""
    entries = []
    for message in messages:
        body = quoting(message)
        if body and not body.endswith(b"\n"):
            body += b"\n"
        entries.append(from_line + body + b"\n")
    return b"".join(entries)


def read_all(maildrop: IMaildrop, index: int, chunk: int = 5) -> bytes:
    body = now(maybeDeferred(maildrop.open_message, index))
    data = []
    while piece := body.read(chunk):
        data.append(piece)
    body.close()
    return b"".join(data)


def contents(store: MboxStore, mailbox: str = "alice") -> list[bytes]:
    maildrop = now(store.open(mailbox))
    try:
        return [read_all(maildrop, i, 65536) for i in range(len(maildrop.messages))]
    finally:
        now(maildrop.close())


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    directory = tmp_path / "mail"
    directory.mkdir()
    return directory


@pytest.fixture
def store(mail: Path) -> MboxStore:
    return MboxStore(f"{mail}/{{user}}")


@pytest.fixture
def mboxrd_store(mail: Path) -> MboxStore:
    return MboxStore(f"{mail}/{{user}}", format=MboxFormat.MBOXRD)


@pytest.fixture
def alice(mail: Path) -> Path:
    return mail / "alice"


def age(path: Path, seconds: float) -> None:
    """Make a file (or a symbolic link itself) look ``seconds`` old."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


# -- the format ---------------------------------------------------------------


def test_from_lines_and_framing_are_not_served(store: MboxStore, alice: Path) -> None:
    """
    RFC 1939 section 7 (RETR) sends the message: neither the From_ line nor
    the blank line the MTA adds after it; section 11: LIST is its CRLF size.
    """
    alice.write_bytes(
        b"From a@example.test  Thu Nov 26 12:00:00 2026\n"
        b"Subject: one\n\nbody one\n\n"
        b"From b@example.test  Thu Nov 26 12:00:01 2026\n"
        b"Subject: two\n\nbody two\n\n"
    )
    maildrop = now(store.open("alice"))
    expected = [b"Subject: one\n\nbody one\n", b"Subject: two\n\nbody two\n"]
    assert [read_all(maildrop, i) for i in (0, 1)] == expected
    assert [m.size for m in maildrop.messages] == [wire_size(m) for m in expected]
    now(maildrop.close())


def test_a_from_line_needs_no_blank_line_before_it(store: MboxStore, alice: Path) -> None:
    """procmail writes no blank line after a message that had no final newline."""
    alice.write_bytes(
        FROM_LINE + b"Subject: a\n\nno newline\n" + FROM_LINE + b"Subject: b\n\nb\n\n"
    )
    assert contents(store) == [b"Subject: a\n\nno newline", b"Subject: b\n\nb\n"]


def test_only_unquoted_from_at_a_line_start_separates(store: MboxStore, alice: Path) -> None:
    message = b"Subject: x\n\n From indented\nFrom\nFromage\nsay From here\n>From quoted\n"
    alice.write_bytes(FROM_LINE + message + b"\n")
    assert contents(store) == [message]


def test_mboxrd_quoting_is_undone_once(mboxrd_store: MboxStore, alice: Path) -> None:
    alice.write_bytes(FROM_LINE + b"\n>From a\n>>From b\n>>>From c\n>From\n>Fromage\n\n")
    assert contents(mboxrd_store) == [b"\nFrom a\n>From b\n>>From c\n>From\n>Fromage\n"]


@pytest.mark.parametrize(
    ("format", "last"),
    [(MboxFormat.MBOXO, b">From x\r\n"), (MboxFormat.MBOXRD, b"From x\r\n")],
    ids=["mboxo", "mboxrd"],
)
def test_crlf_mbox(mail: Path, alice: Path, format: MboxFormat, last: bytes) -> None:
    alice.write_bytes(
        b"From a\r\nSubject: a\r\n\r\nbody\r\n\r\nFrom b\r\nSubject: b\r\n\r\n>From x\r\n\r\n"
    )
    store = MboxStore(f"{mail}/{{user}}", format=format)
    assert contents(store) == [b"Subject: a\r\n\r\nbody\r\n", b"Subject: b\r\n\r\n" + last]


@pytest.mark.parametrize("format", list(MboxFormat), ids=lambda format: format.value)
def test_long_lines_are_indexed_in_pieces(mail: Path, alice: Path, format: MboxFormat) -> None:
    long_from = b"From " + b"s" * 70_000 + b"\n"
    messages = [
        b"Subject: long\n\n>From " + b"y" * 200_000 + b"\nFrom " + b"z" * 100_000 + b"\n",
        b"Subject: after\n\n" + b"w" * 140_000 + b"\n",
    ]
    alice.write_bytes(mbox_of(messages, long_from))
    # mboxo serves the lines as the mboxrd writer stored them.
    served = messages if format is MboxFormat.MBOXRD else [quote(m) for m in messages]
    maildrop = now(MboxStore(f"{mail}/{{user}}", format=format).open("alice"))
    assert [read_all(maildrop, i, 70_000) for i in (0, 1)] == served
    assert [m.size for m in maildrop.messages] == [wire_size(m) for m in served]
    now(maildrop.close())


def test_blank_lines_before_the_first_message_are_kept(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(b"\n\n" + mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    maildrop = now(store.open("alice"))
    now(maildrop.remove([1]))
    now(maildrop.close())
    assert alice.read_bytes() == b"\n\n" + mbox_of([b"Subject: a\n\na\n"])


def test_a_file_that_is_not_an_mbox_is_refused_and_kept(store: MboxStore, alice: Path) -> None:
    """RFC 3206 section 4: SYS/PERM, the administrator must look at it."""
    alice.write_bytes(b"Subject: not an mbox\n\n" + mbox_of([b"x\n"]))
    with pytest.raises(MaildropUnavailable) as refused:
        now(store.open("alice"))
    assert refused.value.code is ResponseCode.SYS_PERM
    assert not Path(f"{alice}.lock").exists()
    assert contents_after_fix(store, alice) == [b"x\n"]


def contents_after_fix(store: MboxStore, alice: Path) -> list[bytes]:
    """The locks of the refused open were released: fix the file and read it."""
    alice.write_bytes(alice.read_bytes().split(b"\n\n", 1)[1])
    return contents(store)


def test_a_missing_mbox_is_an_empty_maildrop_and_is_not_created(
    store: MboxStore, alice: Path, tmp_path: Path
) -> None:
    maildrop = now(store.open("alice"))
    assert list(maildrop.messages) == []
    now(maildrop.remove([]))
    now(maildrop.close())
    assert not alice.exists()
    assert not Path(f"{alice}.lock").exists()
    elsewhere = MboxStore(f"{tmp_path}/no/such/directory/{{user}}")
    assert list(now(elsewhere.open("alice")).messages) == []


MESSAGE_PIECES = [
    *(b"From ", b">From ", b">>From ", b"From", b".", b"x", b"\r", b"\n", b"\r\n", b" "),
    *(b"X-UIDL: u1\n", b"X-UIDL: u2\n", b"\n\n"),
]


def opened(directory: str, format: MboxFormat = MboxFormat.MBOXRD, **reading: int) -> IMaildrop:
    return now(MboxStore(f"{directory}/{{user}}", format=format, **reading).open("alice"))


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(
        st.lists(st.sampled_from(MESSAGE_PIECES), max_size=12)
        .map(b"".join)
        # A final bare CR is not kept (the module docstring says why).
        .filter(lambda message: not message.endswith(b"\r")),
        min_size=1,
        max_size=4,
    ),
    from_line=st.sampled_from([FROM_LINE, b"From " + b"s" * 100 + b"\n"]),
    read_size=st.sampled_from([1, 2, 3, 5, 64, 1 << 20]),
    line_limit=st.sampled_from([8, 13, 64 * 1024]),
)
def test_mboxrd_round_trip(
    messages: list[bytes], from_line: bytes, read_size: int, line_limit: int
) -> None:
    """
    Whatever the messages, written as mboxrd they are read back exactly,
    with a size (RFC 1939 section 11) equal to what RETR sends before
    byte-stuffing, and the same UIDLs, however the file is cut into buffers
    while it is indexed.  Read as mboxo, the same file is served as stored,
    with sizes to match and the very same UIDLs.
    """
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "alice").write_bytes(
            b"".join(from_line + quote(message) + b"\n" for message in messages)
        )
        reference = opened(directory)
        now(reference.close())
        reading = {"read_size": read_size, "line_limit": line_limit}
        as_stored = opened(directory, MboxFormat.MBOXO, **reading)
        try:
            stored = [quote(message) for message in messages]
            assert [read_all(as_stored, i, 3) for i in range(len(messages))] == stored
            assert as_stored.messages.sizes == tuple(wire_size(m) for m in stored)
            assert as_stored.messages.uids == reference.messages.uids
        finally:
            now(as_stored.close())
        maildrop = opened(directory, **reading)
        try:
            assert maildrop.messages == reference.messages
            assert [read_all(maildrop, i, 3) for i in range(len(messages))] == messages
            for message, info in zip(messages, maildrop.messages, strict=True):
                encoder = MessageEncoder()
                sent = encoder.feed(message) + encoder.finish()
                unstuffed = sent[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
                unstuffed = unstuffed[1:] if unstuffed.startswith(b"..") else unstuffed
                assert info.size == wire_size(message) == len(unstuffed)
                assert is_valid_uidl(info.uid)
            assert len({info.uid for info in maildrop.messages}) == len(messages)
        finally:
            now(maildrop.close())


# -- UIDLs (RFC 1939 section 7) -------------------------------------------------


def uids(store: MboxStore) -> list[str]:
    maildrop = now(store.open("alice"))
    now(maildrop.close())
    return [m.uid for m in maildrop.messages]


def test_x_uidl_headers_are_the_uidls(store: MboxStore, alice: Path) -> None:
    """A mailbox that qpopper served keeps its UIDLs: clients do not fetch it all again."""
    alice.write_bytes(
        mbox_of(
            [
                b"X-UIDL: 4b1c9d0e6e5f4a3b2c1d0e9f8a7b6c5d\nSubject: a\n\na\n",
                b"Subject: b\nx-uidl:   <abc@host>  \n\nb\n",
            ]
        )
    )
    assert uids(store) == ["4b1c9d0e6e5f4a3b2c1d0e9f8a7b6c5d", "<abc@host>"]


@pytest.mark.parametrize(
    "header",
    [
        b"X-UIDL: " + b"a" * 71,  # over 70 characters
        b"X-UIDL: two words",
        b"X-UIDL: folded\n more",
        b"X-UIDL: caf\xc3\xa9",
        b"X-UIDL:",
        b"X-UIDL: " + b"0123456789abcdef" * 2 + b"01234567",  # looks generated
    ],
    ids=["too-long", "space", "folded", "non-ascii", "empty", "looks-generated"],
)
def test_an_invalid_x_uidl_is_not_used(store: MboxStore, alice: Path, header: bytes) -> None:
    alice.write_bytes(mbox_of([header + b"\nSubject: a\n\na\n"]))
    [uid] = uids(store)
    assert is_valid_uidl(uid)
    assert re.fullmatch(r"[0-9a-f]{40}", uid)


def test_x_uidl_in_the_body_is_not_a_header(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(mbox_of([b"Subject: a\n\nX-UIDL: inbody\n"]))
    assert uids(store) != ["inbody"]


def test_a_duplicate_x_uidl_is_used_once(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(
        mbox_of([b"X-UIDL: same\n\none\n", b"X-UIDL: same\n\ntwo\n", b"X-UIDL: other\n\n3\n"])
    )
    first, second, third = uids(store)
    assert (first, third) == ("same", "other")
    assert is_valid_uidl(second) and second not in ("same", "other")


def test_identical_messages_get_distinct_stable_uidls(store: MboxStore, alice: Path) -> None:
    """
    Byte-identical deliveries (same From_ line, same content) are distinct
    messages with distinct UIDLs, the same in every session, and the same
    after other messages, even identical ones before them, are deleted.
    """
    same = b"Subject: again\n\nsame\n"
    alice.write_bytes(mbox_of([same, b"Subject: other\n\nother\n", same, same]))
    first = uids(store)
    assert len(set(first)) == 4 and all(is_valid_uidl(uid) for uid in first)
    assert uids(store) == first

    maildrop = now(store.open("alice"))
    now(maildrop.remove([0]))
    now(maildrop.close())
    assert uids(store) == first[1:]

    maildrop = now(store.open("alice"))
    now(maildrop.remove([0]))
    now(maildrop.close())
    assert uids(store) == first[2:]


def test_uidls_do_not_depend_on_position(store: MboxStore, alice: Path) -> None:
    messages = [b"Subject: %d\n\n%d\n" % (n, n) for n in range(5)]
    alice.write_bytes(mbox_of(messages))
    before = uids(store)
    alice.write_bytes(mbox_of(messages[::-1]))
    assert uids(store) == before[::-1]


# -- locks ----------------------------------------------------------------------

_HOLD_FCNTL = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.read()
"""

_HOLD_DOTLOCK = """
import os, sys
os.close(os.open(sys.argv[1] + ".lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
print("locked", flush=True)
sys.stdin.read()
os.unlink(sys.argv[1] + ".lock")
"""

# What another program that locks like Postfix local(8) finds: each lock tried
# without waiting.
_PROBE = """
import fcntl, os, sys
mbox = sys.argv[1]
try:
    os.close(os.open(mbox + ".lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    os.unlink(mbox + ".lock")
    print("dotlock free")
except FileExistsError:
    print("dotlock held")
fd = os.open(mbox, os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("fcntl free")
except OSError:
    print("fcntl held")
"""


def probe(mbox: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(mbox)], capture_output=True, text=True, check=True
    )
    return result.stdout.split("\n")[:2]


class Holder:
    """Another process holding a lock until it is told to let go."""

    def __init__(self, script: str, mbox: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(mbox)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == b"locked\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=PATIENCE) == 0


@pytest.mark.process
@pytest.mark.parametrize("script", [_HOLD_FCNTL, _HOLD_DOTLOCK], ids=["fcntl", "dotlock"])
def test_a_lock_held_by_another_process_is_in_use(
    store: MboxStore, alice: Path, script: str
) -> None:
    """
    RFC 1939 section 4: the maildrop is locked for exclusive access, and
    RFC 2449 section 8.1.2: a maildrop held elsewhere is [IN-USE].  Either
    lock of Postfix local(8) and procmail (dotlock, fcntl) is enough.
    """
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
    holder = Holder(script, alice)
    try:
        with pytest.raises(MaildropLocked):
            now(store.open("alice"))
        # The refused attempt left the other program's lock alone.
        assert Path(f"{alice}.lock").exists() == (script is _HOLD_DOTLOCK)
    finally:
        holder.release()
    assert contents(store) == [b"Subject: a\n\na\n"]


@pytest.mark.process
def test_other_programs_see_both_locks_for_the_whole_session(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    assert probe(alice) == ["dotlock free", "fcntl free"]
    maildrop = now(store.open("alice"))
    assert probe(alice) == ["dotlock held", "fcntl held"]
    read_all(maildrop, 0)
    assert probe(alice) == ["dotlock held", "fcntl held"]
    now(maildrop.remove([0]))
    # The new file is locked as the old one was, until the session ends.
    assert probe(alice) == ["dotlock held", "fcntl held"]
    now(maildrop.close())
    assert probe(alice) == ["dotlock free", "fcntl free"]
    assert not Path(f"{alice}.lock").exists()


def test_a_stale_dotlock_is_broken(store: MboxStore, alice: Path) -> None:
    """A dotlock left by a crash blocks for 10 minutes at most."""
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
    lock = Path(f"{alice}.lock")
    lock.write_bytes(b"")
    age(lock, DOTLOCK_STALE_SECONDS - 30)
    with pytest.raises(MaildropLocked):
        now(store.open("alice"))
    age(lock, DOTLOCK_STALE_SECONDS + 30)
    maildrop = now(store.open("alice"))
    assert lock.read_bytes().startswith(b"%d\n" % os.getpid())
    now(maildrop.close())
    assert not lock.exists()


def test_a_second_session_in_this_process_is_refused_whatever_the_dotlock_age(
    store: MboxStore, alice: Path
) -> None:
    """fcntl locks do not exclude their own process: the server keeps its own record."""
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
    held = now(store.open("alice"))
    age(Path(f"{alice}.lock"), DOTLOCK_STALE_SECONDS * 2)
    with pytest.raises(MaildropLocked):
        now(MboxStore(str(alice.parent / "{user}")).open("alice"))
    assert read_all(held, 0) == b"Subject: a\n\na\n"
    now(held.close())


def test_the_session_keeps_its_dotlock_young(mail: Path, alice: Path) -> None:
    """
    An idle session's dotlock is touched every minute on the clock, so that
    Postfix or procmail never take it for a crashed program's and break it.
    """
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
    clock = Clock()
    store = MboxStore(f"{mail}/{{user}}", clock=clock)
    maildrop = now(store.open("alice"))
    lock = Path(f"{alice}.lock")
    age(lock, DOTLOCK_STALE_SECONDS - 1)
    clock.advance(LOCK_REFRESH_SECONDS - 1)
    assert time.time() - lock.stat().st_mtime > DOTLOCK_STALE_SECONDS / 2
    clock.advance(1)
    assert time.time() - lock.stat().st_mtime < DOTLOCK_STALE_SECONDS / 2
    # Every minute, not once.
    age(lock, DOTLOCK_STALE_SECONDS - 1)
    clock.advance(LOCK_REFRESH_SECONDS)
    assert time.time() - lock.stat().st_mtime < DOTLOCK_STALE_SECONDS / 2
    now(maildrop.close())
    assert not lock.exists()
    assert clock.getDelayedCalls() == []


def test_locks_are_released_when_opening_fails(store: MboxStore, alice: Path) -> None:
    os.mkfifo(alice)  # not a regular file: refused without blocking
    with pytest.raises(MaildropUnavailable) as refused:
        now(store.open("alice"))
    assert refused.value.code is ResponseCode.SYS_PERM
    assert not Path(f"{alice}.lock").exists()
    alice.unlink()
    now(now(store.open("alice")).close())


class TestLinks:
    """Nothing is followed through a symbolic link: not the mbox, not its dotlock."""

    def test_an_mbox_that_is_a_link_is_refused(
        self, store: MboxStore, alice: Path, mail: Path
    ) -> None:
        bob = mail / "bob"
        bob.write_bytes(mbox_of([b"Subject: for bob\n\nsecret\n"]))
        alice.symlink_to(bob)
        with pytest.raises(MaildropUnavailable) as refused:
            now(store.open("alice"))
        assert refused.value.code is ResponseCode.SYS_PERM
        assert not Path(f"{alice}.lock").exists()
        assert contents(store, "bob") == [b"Subject: for bob\n\nsecret\n"]

    def test_a_dotlock_that_is_a_link_is_not_followed(
        self, store: MboxStore, alice: Path, tmp_path: Path
    ) -> None:
        alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
        target = tmp_path / "target"
        lock = Path(f"{alice}.lock")
        lock.symlink_to(target)
        with pytest.raises(MaildropLocked):
            now(store.open("alice"))
        age(lock, DOTLOCK_STALE_SECONDS + 30)
        maildrop = now(store.open("alice"))
        assert not lock.is_symlink() and lock.is_file()
        now(maildrop.close())
        assert not target.exists() and not lock.exists()


# -- the rewrite at QUIT (RFC 1939 section 6) -----------------------------------

_APPEND = """
import sys
with open(sys.argv[1], "ab") as mbox:
    mbox.write(sys.stdin.buffer.read())
"""


def append_from_another_process(mbox: Path, data: bytes) -> None:
    """An MDA that ignores the locks (flock-only, say) appending to the mbox."""
    subprocess.run([sys.executable, "-c", _APPEND, str(mbox)], input=data, check=True)


@pytest.mark.process
def test_mail_appended_during_the_session_survives_quit(store: MboxStore, alice: Path) -> None:
    """
    RFC 1939 section 6: UPDATE removes the messages marked as deleted, and
    only those: mail that arrived after the snapshot is kept.
    """
    messages = [b"Subject: %d\n\n%d\n" % (n, n) for n in range(3)]
    alice.write_bytes(mbox_of(messages))
    maildrop = now(store.open("alice"))
    late = mbox_of([b"Subject: late\n\narrived during the session\n"])
    append_from_another_process(alice, late)
    now(maildrop.remove([0, 2]))
    now(maildrop.close())
    assert alice.read_bytes() == mbox_of(messages[1:2]) + late


@pytest.mark.process
def test_mail_appended_during_the_rewrite_survives(
    store: MboxStore, alice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appended after the copy, before the rename: copied after the rename."""
    messages = [b"Subject: %d\n\n%d\n" % (n, n) for n in range(3)]
    alice.write_bytes(mbox_of(messages))
    late = mbox_of([b"Subject: late\n\njust in time\n"])

    real_rename = os.rename

    def append_then_rename(source: str, target: str, **where: int) -> None:
        if source.endswith(REWRITE_SUFFIX):
            append_from_another_process(alice, late)
        real_rename(source, target, **where)

    monkeypatch.setattr(os, "rename", append_then_rename)
    maildrop = now(store.open("alice"))
    now(maildrop.remove([1]))
    now(maildrop.close())
    assert alice.read_bytes() == mbox_of([messages[0], messages[2]]) + late


def test_the_new_file_is_synced_before_the_rename_and_the_directory_after(
    store: MboxStore, alice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes the rename safe against a power failure, not only a crash."""
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    events: list[str] = []
    real_fsync, real_rename, real_pwrite = os.fsync, os.rename, os.pwrite

    def fsync(fd: int) -> None:
        events.append("fsync " + ("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def rename(source: str, target: str, **where: int) -> None:
        events.append(f"rename {source} {target}")
        real_rename(source, target, **where)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if not events or events[-1] != "written":
            events.append("written")
        return real_pwrite(fd, data, offset)

    maildrop = now(store.open("alice"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "pwrite", pwrite)
    now(maildrop.remove([0]))
    monkeypatch.undo()
    now(maildrop.close())
    assert events == [
        "written",
        "fsync file",
        "rename .alice.pop3d-rewrite alice",
        "fsync directory",
    ]


def test_the_rewrite_keeps_owner_and_mode(store: MboxStore, alice: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving the mbox another owner needs root")
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    os.chown(alice, 1234, 5678)
    alice.chmod(0o620)
    before = alice.stat()
    maildrop = now(store.open("alice"))
    now(maildrop.remove([0]))
    now(maildrop.close())
    after = alice.stat()
    assert after.st_ino != before.st_ino  # a new file, renamed into place
    assert (after.st_uid, after.st_gid) == (1234, 5678)
    assert stat.S_IMODE(after.st_mode) == 0o620
    assert sorted(os.listdir(alice.parent)) == ["alice"]


@pytest.mark.process
def test_a_failed_rewrite_deletes_nothing(
    store: MboxStore, alice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 3206: -ERR [SYS/TEMP]; every message is still there, whole."""
    original = mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"])
    alice.write_bytes(original)

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    maildrop = now(store.open("alice"))
    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full_disk)
        with pytest.raises(DeletionFailed) as failed:
            now(maildrop.remove([0]))
    assert failed.value.code is ResponseCode.SYS_TEMP
    # (Probed first: a descriptor of the mbox opened and closed in this
    # process would drop its fcntl lock, as POSIX has it.)
    assert probe(alice) == ["dotlock held", "fcntl held"]
    now(maildrop.close())
    assert probe(alice) == ["dotlock free", "fcntl free"]
    assert alice.read_bytes() == original
    assert sorted(os.listdir(alice.parent)) == ["alice"]


def test_a_dotlock_another_program_took_means_nothing_is_deleted(
    store: MboxStore, alice: Path
) -> None:
    original = mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"])
    alice.write_bytes(original)
    maildrop = now(store.open("alice"))
    lock = Path(f"{alice}.lock")
    # Another program broke our dotlock as stale and holds its own now.
    lock.unlink()
    lock.write_bytes(b"")
    with pytest.raises(DeletionFailed):
        now(maildrop.remove([0]))
    assert alice.read_bytes() == original
    now(maildrop.close())
    assert lock.exists()  # not ours: left alone


def test_a_dotlock_broken_and_released_is_taken_again(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    maildrop = now(store.open("alice"))
    Path(f"{alice}.lock").unlink()
    now(maildrop.remove([0]))
    now(maildrop.close())
    assert contents(store) == [b"Subject: b\n\nb\n"]
    assert not Path(f"{alice}.lock").exists()


def test_a_leftover_of_a_crashed_rewrite_is_removed(store: MboxStore, alice: Path) -> None:
    alice.write_bytes(mbox_of([b"Subject: a\n\na\n"]))
    leftover = alice.parent / ".alice.pop3d-rewrite"
    leftover.write_bytes(b"From half\nwritten")
    assert contents(store) == [b"Subject: a\n\na\n"]
    assert not leftover.exists()


def test_a_message_changed_in_place_is_found_again(store: MboxStore, alice: Path) -> None:
    """A program that ignores the locks rewrote the file in place (as mutt does)."""
    messages = [b"Subject: %d\n\n%d\n" % (n, n) for n in range(3)]
    alice.write_bytes(mbox_of(messages))
    maildrop = now(store.open("alice"))
    with open(alice, "r+b") as mbox:
        mbox.write(mbox_of(messages[1:]))
        mbox.truncate()
    assert read_all(maildrop, 2) == messages[2]
    now(maildrop.remove([1]))
    now(maildrop.close())
    assert contents(store) == [messages[2]]


@pytest_twisted.ensureDeferred
async def test_with_a_reactor_the_work_runs_in_threads(mail: Path, alice: Path) -> None:
    from twisted.internet import reactor

    alice.write_bytes(mbox_of([b"Subject: a\n\na\n", b"Subject: b\n\nb\n"]))
    store = MboxStore(f"{mail}/{{user}}", reactor=reactor)  # type: ignore[arg-type]
    maildrop = await store.open("alice")
    await maildrop.remove([1])
    await maildrop.close()
    assert alice.read_bytes() == mbox_of([b"Subject: a\n\na\n"])


# -- the real server ------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``twistd pop3d`` over ``mbox:MAIL/{user}``; every one is stopped at the end."""
    started: list[Server] = []
    passwd = write_passwd(tmp_path)

    def start(mail: Path) -> Server:
        server = Server(pop3d_arguments(mail, passwd, kind="mbox"), tmp_path)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.stop()


BIG = [b"Subject: %d\n\n" % n + (b"line %d\n" % n) * 40_000 for n in range(12)]
DELETED = (0, 4, 11)


#: Where a rewrite is killed: the crash points, in order.
REWRITE_STEPS = ("created", "copying", "written", "synced", "renamed", "done")

# A process that runs UPDATE on the mbox store and is killed (SIGKILL, by
# itself) at the crash point it is given: it wraps the public os calls the
# rewrite makes, as a crash would stop it there.
_KILLED_DURING_THE_REWRITE = """
import os, signal, stat, sys
from pop3d.stores.mbox import MboxStore

template, step, deleted = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]]
real_pwrite, real_fsync, real_rename = os.pwrite, os.fsync, os.rename
writes = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def pwrite(fd, data, offset):
    global writes
    writes += 1
    if step == "created" or (step == "copying" and writes == 2):
        die()
    return real_pwrite(fd, data, offset)

def fsync(fd):
    directory = stat.S_ISDIR(os.fstat(fd).st_mode)
    if step == "written" and not directory:
        die()
    real_fsync(fd)
    if step == "done" and directory:
        die()

def rename(*arguments, **where):
    if step == "synced":
        die()
    real_rename(*arguments, **where)
    if step == "renamed":
        die()

opened = []
MboxStore(template).open("alice").addCallback(opened.append)
os.pwrite, os.fsync, os.rename = pwrite, fsync, rename
opened[0].remove(deleted).addBoth(print)
print("not killed")
"""


@pytest.mark.process
@pytest.mark.parametrize("step", REWRITE_STEPS)
def test_killed_during_the_rewrite_loses_nothing(step: str, mail: Path, alice: Path) -> None:
    """
    kill -9 at each step of UPDATE (RFC 1939 section 6) leaves the old mbox
    or the new one, whole: it parses, and holds every message that was not
    deleted, exactly.
    """
    alice.write_bytes(mbox_of(BIG))
    alice.chmod(0o660)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_DURING_THE_REWRITE, f"{mail}/{{user}}", step]
        + [str(index) for index in DELETED],
        capture_output=True,
        check=False,
        timeout=PATIENCE,
    )
    assert killed.returncode == -signal.SIGKILL, killed

    leftover = mail / ".alice.pop3d-rewrite"
    renamed = REWRITE_STEPS.index(step) >= REWRITE_STEPS.index("renamed")
    assert leftover.exists() == (not renamed)
    if step == "copying":  # killed with the new file half written
        assert 0 < leftover.stat().st_size < alice.stat().st_size
    # The killed process left its dotlock; pop3d on this host sees that its
    # holder is gone and breaks it at once (other programs wait until it is
    # stale).
    assert Path(f"{alice}.lock").exists()
    store = MboxStore(f"{mail}/{{user}}")
    kept = [m for i, m in enumerate(BIG) if i not in DELETED]
    expected = kept if renamed else BIG
    assert contents(store) == expected
    assert stat.S_IMODE(alice.stat().st_mode) == 0o660
    assert sorted(os.listdir(mail)) == ["alice"]


@pytest.mark.process
@pytest.mark.peer
def test_a_message_delivered_by_procmail_is_served_as_delivered(
    tmp_path: Path, mail: Path, alice: Path, servers: Callable[..., Server]
) -> None:
    """
    procmail (dotlock and fcntl, mboxo) delivers; RETR (RFC 1939 section 7)
    sends each message as procmail stored it (its "From " body line quoted
    as ">From ", which mboxo cannot undo), with the size LIST announced
    (section 11).  A procmail delivery during a session waits for the locks,
    and lands in the mbox the session's QUIT wrote, not in the replaced one.
    """
    procmail = require_program("procmail")
    rcfile = tmp_path / "procmailrc"
    rcfile.write_text(f"LOCKSLEEP=1\n:0:\n{alice}\n")

    def deliver(message: bytes) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [procmail, "-m", "-f", "sender@example.test", str(rcfile)], stdin=subprocess.PIPE
        )
        assert process.stdin is not None
        process.stdin.write(message)
        process.stdin.close()
        return process

    messages = [
        b"From: a@example.test\nSubject: one\n\nFrom the start\n.dot line\n",
        b"From: b@example.test\nSubject: two\n\nno final newline",
        b"From: c@example.test\nSubject: three\r\n\r\nCRLF\r\n",
    ]
    for message in messages:
        assert deliver(message).wait(timeout=PATIENCE) == 0
    assert b"\n\n>From the start\n.dot line\n" in alice.read_bytes()
    stored = [quote_mboxo(message) for message in messages]
    server = servers(mail)
    client = login(server)
    try:
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        assert sizes == [wire_size(m) for m in stored]
        for number, message in enumerate(stored, 1):
            lines = client.retr(number)[1]
            assert lines == message.replace(b"\r\n", b"\n").removesuffix(b"\n").split(b"\n")
        lockfile = shutil.which("lockfile")
        if lockfile is not None:  # procmail's own dotlock tool sees ours
            assert subprocess.run([lockfile, "-r0", f"{alice}.lock"]).returncode != 0
        late = b"From: d@example.test\nSubject: late\n\ndelivered during the session\n"
        waiting = deliver(late)
        assert client.dele(1).startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    assert waiting.wait(timeout=PATIENCE) == 0
    assert contents(MboxStore(f"{mail}/{{user}}")) == [*stored[1:], late]
    server.assert_healthy()
