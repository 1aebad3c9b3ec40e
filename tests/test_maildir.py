"""
What is particular to the Maildir store: the layout, Maildir++ size fields,
other programs moving files, locks held by other processes, faults.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.errors import DeletionFailed, MaildropLocked, MaildropUnavailable
from pop3d.realm import MaildropRealm, release
from pop3d.stores import maildir as maildir_module
from pop3d.stores.common import MaildirTemplateError, expand_template
from pop3d.stores.interfaces import IClosesAtOnce, IMaildrop, ISeenFlags, MessageList
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.posix import (
    LOCK_FILE_NAME,
    LOCK_REFRESH_SECONDS,
    LockFiles,
    LockOwner,
    LockTable,
    this_process,
)
from pop3d.testing import deliver_to_maildir
from pop3d.wire import wire_size

from .clock_threads import TimedClockThreads, result_of, settle
from .conftest import Logged


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(f"{tmp_path}/{{user}}")


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    root = tmp_path / "alice"
    for part in ("new", "cur", "tmp"):
        (root / part).mkdir(parents=True)
    return root


@pytest_twisted.ensureDeferred
async def test_reads_new_and_cur_but_not_tmp(store: MaildirStore, maildir: Path) -> None:
    (maildir / "new" / "1.M1.host").write_bytes(b"new\n")
    (maildir / "cur" / "2.M2.host:2,S").write_bytes(b"cur\n")
    (maildir / "tmp" / "3.M3.host").write_bytes(b"being delivered\n")
    (maildir / "cur" / ".hidden").write_bytes(b"not a message\n")
    (maildir / "new" / "subdirectory").mkdir()
    maildrop = await store.open("alice")
    assert [m.uid for m in maildrop.messages] == ["1.M1.host", "2.M2.host"]
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_maildir_plus_plus_wire_size_is_trusted(store: MaildirStore, maildir: Path) -> None:
    """Maildir++ ``,W=`` is the CRLF size: STAT needs no read of the file."""
    (maildir / "cur" / "1.M1.host,S=5,W=123:2,S").write_bytes(b"abcd\n")
    (maildir / "new" / "2.M2.host").write_bytes(b"a\nb\n")
    maildrop = await store.open("alice")
    assert [m.size for m in maildrop.messages] == [123, wire_size(b"a\nb\n")]
    await maildrop.close()


@pytest.mark.parametrize("when", ["after new/ is read", "after cur/ is read"])
@pytest_twisted.ensureDeferred
async def test_a_first_login_follows_messages_moved_or_removed_while_it_counts(
    tmp_path: Path, maildir: Path, when: str
) -> None:
    """
    RFC 1939 sections 5 and 7: another program marks a message seen (new/
    to cur/) and removes one while the server reads the directories and
    counts (a count may begin before cur/ is read): the listing has the
    moved message once, with its size and UIDL, where it is now, and not
    the removed one.
    """
    messages = {
        f"{1_000_000_000 + n}.M{n}P1.host": b"Subject: %d\n\nbody\n" % n for n in range(600)
    }
    for n, (unique, data) in enumerate(messages.items()):
        path = maildir / "new" / unique if n < 300 else maildir / "cur" / f"{unique}:2,S"
        path.write_bytes(data)
    moved, removed = "1000000007.M7P1.host", "1000000009.M9P1.host"
    asked: list[int] = []

    def meanwhile(directory_fd: int) -> bool:
        # Asked once per directory of 256 messages or more to count (each
        # fits in one slice here), once it is read and before it is
        # counted: another program's turn.
        asked.append(directory_fd)
        if len(asked) == (1 if when == "after new/ is read" else 2):
            os.rename(maildir / "new" / moved, maildir / "cur" / f"{moved}:2,S")
            os.unlink(maildir / "new" / removed)
        return False

    store = MaildirStore(f"{tmp_path}/{{user}}", short_read_is_end=meanwhile)
    maildrop = await store.open("alice")
    try:
        assert len(asked) == 2
        expected = [unique for unique in messages if unique != removed]
        assert list(maildrop.messages.uids) == expected
        assert list(maildrop.messages.sizes) == [wire_size(messages[u]) for u in expected]
        body = await maybeDeferred(maildrop.open_message, expected.index(moved))
        assert body.read(100) == messages[moved]
        body.close()
    finally:
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_a_message_in_both_new_and_cur_is_the_one_in_cur(
    store: MaildirStore, maildir: Path
) -> None:
    """
    Caught in the middle of another program's move (a copy, then the
    unlink), a message is in new/ and cur/ under one unique name: it is one
    message (RFC 1939 section 7: one UIDL, one message), cur/'s: its size,
    its octets.  Its size in new/ is another, and may be read first (a count
    may begin before cur/ is read).
    """
    unique = "1000000001.M1P1.host"
    (maildir / "new" / unique).write_bytes(b"Subject: old copy\n\nbody\n")
    in_cur = b"Subject: the copy in cur\n\nlonger body\n"
    (maildir / "cur" / f"{unique}:2,S").write_bytes(in_cur)
    (maildir / "cur" / "1000000002.M2P1.host:2,").write_bytes(b"x\n")
    maildrop = await store.open("alice")
    try:
        assert list(maildrop.messages.uids) == [unique, "1000000002.M2P1.host"]
        assert list(maildrop.messages.sizes) == [wire_size(in_cur), wire_size(b"x\n")]
        body = await maybeDeferred(maildrop.open_message, 0)
        assert body.read(100) == in_cur
        body.close()
    finally:
        await maildrop.close()


@pytest.mark.parametrize("kept", ["cur", "new"])
@pytest_twisted.ensureDeferred
async def test_a_size_kept_for_either_copy_gives_the_one_in_cur(
    tmp_path: Path, maildir: Path, kept: str
) -> None:
    """
    The same, when one copy's size was kept from an earlier login (the
    size cache file) and the other's must be read: the listing has cur/'s
    size, whichever was kept.
    """
    unique = "1000000001.M1P1.host"
    in_cur = b"Subject: the copy in cur\n\nlonger body\n"
    copies = {"cur": (maildir / "cur" / f"{unique}:2,S", in_cur)}
    copies["new"] = (maildir / "new" / unique, b"Subject: old copy\n\nbody\n")
    for path, data in copies.values():
        path.write_bytes(data)
    path, data = copies[kept]
    (maildir / maildir_module.SIZE_CACHE).write_text(
        f"pop3d-sizes 2\n{unique}\t{path.stat().st_ino}\t{wire_size(data)}\n"
    )
    maildrop = await MaildirStore(f"{tmp_path}/{{user}}").open("alice")
    try:
        assert list(maildrop.messages.uids) == [unique]
        assert list(maildrop.messages.sizes) == [wire_size(in_cur)]
    finally:
        await maildrop.close()


@pytest.mark.parametrize("others", [0, 40])
@pytest_twisted.ensureDeferred
async def test_a_unique_name_twice_in_cur_is_one_message_with_its_own_size(
    tmp_path: Path, maildir: Path, others: int
) -> None:
    """
    A mail reader renaming a message to change its flags, caught between
    its link and its unlink: one unique name, two files in cur/.  One
    message (RFC 1939 section 7), whichever file the listing took, with
    that file's size, even when the other file's size was kept from an
    earlier login.  With 40 other messages, read 4 at a time (``step=1``),
    the two files are most often in different slices of the directory.
    """
    unique = "1000000001.M1P1.host"
    contents = {
        f"{unique}:2,": b"Subject: x\n\nshort\n",
        f"{unique}:2,S": b"Subject: x\n\n" + b"long\n" * 20,
    }
    for number in range(others):
        contents[f"{2_000_000_000 + number}.M{number}P1.host:2,S"] = b"x\n" * (number + 1)
    cache = ["pop3d-sizes 2"]
    for name, data in contents.items():
        (maildir / "cur" / name).write_bytes(data)
        if name.startswith(unique):
            cache.append(f"{unique}\t{(maildir / 'cur' / name).stat().st_ino}\t{wire_size(data)}")
    others_sizes = [wire_size(b"x\n" * (number + 1)) for number in range(others)]
    for cached in cache[1:]:
        # The size of either file kept from before.
        (maildir / maildir_module.SIZE_CACHE).write_text(f"{cache[0]}\n{cached}\n")
        maildrop = await MaildirStore(f"{tmp_path}/{{user}}", step=1).open("alice")
        try:
            assert maildrop.messages.uids[0] == unique
            assert len(maildrop.messages) == 1 + others
            body = await maybeDeferred(maildrop.open_message, 0)
            data = body.read(1000)
            body.close()
            assert list(maildrop.messages.sizes) == [wire_size(data), *others_sizes]
        finally:
            await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_uidls_are_checked_in_every_slice(tmp_path: Path, maildir: Path) -> None:
    """RFC 1939 section 7: a UIDL is 1 to 70 characters, wherever the long name sorts."""
    names = [f"17000000{n:02d}.M{n}P1.host" for n in range(7)]
    names.append("1700000099.M1P1." + "very-long-host-name." * 5 + "example")
    for name in names:
        (maildir / "new" / name).write_bytes(b"x\n")
    maildrop = await MaildirStore(f"{tmp_path}/{{user}}", step=2).open("alice")
    try:
        uids = list(maildrop.messages.uids)
        assert len(uids) == 8 and all(0 < len(uid) <= 70 for uid in uids)
    finally:
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_uidl_survives_a_move_from_new_to_cur(store: MaildirStore, maildir: Path) -> None:
    """RFC 1939 section 7: the same UIDL in every session, whatever other programs do."""
    unique = deliver_to_maildir(str(maildir), b"Subject: x\n\nbody\n")
    first = await store.open("alice")
    uid = first.messages[0].uid
    # A mail reader marks it seen while we hold the maildrop.
    os.rename(maildir / "new" / unique, maildir / "cur" / f"{unique}:2,S")
    body = await maybeDeferred(first.open_message, 0)
    assert body.read(100) == b"Subject: x\n\nbody\n"
    body.close()
    await first.close()
    second = await store.open("alice")
    assert [m.uid for m in second.messages] == [uid]
    await second.remove([0])
    await second.close()
    assert list((maildir / "cur").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_removal_follows_a_moved_message(store: MaildirStore, maildir: Path) -> None:
    unique = deliver_to_maildir(str(maildir), b"x\n")
    maildrop = await store.open("alice")
    os.rename(maildir / "new" / unique, maildir / "cur" / f"{unique}:2,S")
    await maildrop.remove([0])
    await maildrop.close()
    assert list((maildir / "cur").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_long_unique_names_get_a_valid_uidl(store: MaildirStore, maildir: Path) -> None:
    name = "1700000000.M1P1." + "very-long-host-name." * 5 + "example"
    (maildir / "new" / name).write_bytes(b"x\n")
    uids = []
    for _ in range(2):
        maildrop = await store.open("alice")
        uids.append(maildrop.messages[0].uid)
        await maildrop.close()
    assert len(uids[0]) <= 70 and uids[0] == uids[1]


@pytest_twisted.ensureDeferred
async def test_only_the_long_unique_name_is_digested(store: MaildirStore, maildir: Path) -> None:
    long_name = "1700000001.M1P1." + "very-long-host-name." * 5 + "example"
    (maildir / "new" / "1700000000.M1P1.host").write_bytes(b"x\n")
    (maildir / "cur" / (long_name + ":2,S")).write_bytes(b"y\n")
    (maildir / "new" / "1700000002.M1P1.host").write_bytes(b"z\n")
    maildrop = await store.open("alice")
    uids = list(maildrop.messages.uids)
    await maildrop.close()
    assert uids[0] == "1700000000.M1P1.host" and uids[2] == "1700000002.M1P1.host"
    assert len(uids[1]) <= 70 and uids[1] != long_name


@pytest_twisted.ensureDeferred
async def test_messages_are_in_unique_name_order_when_sorted_in_steps(
    tmp_path: Path, maildir: Path
) -> None:
    """Large listings are sorted a slice at a time; the order is the same."""
    store = MaildirStore(f"{tmp_path}/{{user}}", step=3)
    names = [f"17000000{n:02d}.M{n}P1.host" for n in range(11)]
    for n, name in enumerate(reversed(names)):
        subdirectory, suffix = ("cur", ":2,S") if n % 2 else ("new", "")
        (maildir / subdirectory / (name + suffix)).write_bytes(b"%d\n" % n)
    maildrop = await store.open("alice")
    assert list(maildrop.messages.uids) == names
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_missing_maildir_is_empty_and_not_created(
    store: MaildirStore, tmp_path: Path
) -> None:
    maildrop = await store.open("nobody")
    assert list(maildrop.messages) == []
    await maildrop.close()
    assert not (tmp_path / "nobody").exists()


@pytest_twisted.ensureDeferred
async def test_maildir_that_is_a_file(store: MaildirStore, tmp_path: Path) -> None:
    """RFC 3206 section 4: a condition an administrator must fix is SYS/PERM."""
    (tmp_path / "alice").write_bytes(b"oops")
    with pytest.raises(MaildropUnavailable) as raised:
        await store.open("alice")
    assert raised.value.permanent


@pytest_twisted.ensureDeferred
async def test_cur_that_is_a_file(store: MaildirStore, maildir: Path) -> None:
    (maildir / "cur").rmdir()
    (maildir / "cur").write_bytes(b"oops")
    with pytest.raises(MaildropUnavailable) as raised:
        await store.open("alice")
    assert raised.value.permanent
    # The lock was not kept by the failed open.
    (maildir / "cur").unlink()
    maildrop = await store.open("alice")
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_failed_removal_does_the_others(store: MaildirStore, maildir: Path) -> None:
    names = [deliver_to_maildir(str(maildir), b"%d\n" % i) for i in range(3)]
    maildrop = await store.open("alice")
    # Something that cannot be unlinked now stands where message 2 was.
    (maildir / "new" / names[1]).unlink()
    (maildir / "new" / names[1]).mkdir()
    with pytest.raises(DeletionFailed) as raised:
        await maildrop.remove([0, 1, 2])
    assert raised.value.failed == 1
    await maildrop.close()
    assert sorted(p.name for p in (maildir / "new").iterdir()) == [names[1]]


_HOLD_LOCK = """
import os, sys
from pop3d.stores.posix import LockFiles, LockTable
locks = LockTable(sys.argv[2]) if sys.argv[2] else LockFiles(None)
directory = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
locks.acquire(sys.argv[1], directory, os.fstat(directory))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.process
@pytest.mark.parametrize("kind", ["lock table", "lock files"])
@pytest_twisted.ensureDeferred
async def test_lock_held_by_another_process(tmp_path: Path, maildir: Path, kind: str) -> None:
    """
    RFC 1939 section 4: exclusive access across processes; a holder killed
    with SIGKILL does not keep the maildrop (a lock file it leaves behind
    is known for stale at once).
    """
    table = str(tmp_path / "locks") if kind == "lock table" else ""
    locks = LockTable(table) if table else LockFiles(None)
    store = MaildirStore(f"{tmp_path}/{{user}}", locks=locks)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(maildir), table],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MaildropLocked):
            await store.open("alice")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    maildrop = await store.open("alice")
    await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_the_lock_table_is_above_the_maildirs_and_costs_no_descriptor(
    store: MaildirStore, tmp_path: Path
) -> None:
    assert store.locks.path == str(tmp_path / ".pop3d-locks")  # type: ignore[attr-defined]
    for user in ("alice", "bob", "carol"):
        deliver_to_maildir(str(tmp_path / user), b"x\n")
    first = await store.open("alice")
    gc.collect()  # files left open by earlier tests would close meanwhile
    before = len(os.listdir("/proc/self/fd"))
    opened = [await store.open(user) for user in ("bob", "carol")]
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    for maildrop in [first, *opened]:
        await maildrop.close()
    assert LOCK_FILE_NAME not in os.listdir(tmp_path / "alice")


@pytest_twisted.ensureDeferred
async def test_a_login_to_a_maildir_read_before_is_answered_at_once(
    store: MaildirStore, maildir: Path
) -> None:
    """
    RFC 1939 section 4: through the portal, a maildrop in use fails the
    login with MaildropLocked ("[IN-USE]"), whether the Maildir is read
    again (a Deferred) or its listing is the kept one (the realm's answer
    at once, `IOpensAtOnce`); once released, it opens with its messages.
    """
    deliver_to_maildir(str(maildir), b"Subject: one\n\nbody\n")
    an_hour_ago = time.time() - 3600
    for part in (maildir, maildir / "new", maildir / "cur", maildir / "tmp"):
        # Changed long enough ago for its listing to be trusted when kept.
        os.utime(part, (an_hour_ago, an_hour_ago))
    realm = MaildropRealm(store)
    portal = Portal(realm, [InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")])
    alice = UsernamePassword(b"alice", b"pw")
    _, first, _ = await portal.login(alice, None, IMaildrop)
    with pytest.raises(MaildropLocked):
        await portal.login(alice, None, IMaildrop)
    with pytest.raises(MaildropLocked):
        realm.requestAvatar(b"alice", None, IMaildrop)
    await IMaildrop(first).close()
    answer = realm.requestAvatar(b"alice", None, IMaildrop)
    assert not isinstance(answer, Deferred)
    _, again, _ = answer
    assert [message.size for message in IMaildrop(again).messages] == [22]
    with pytest.raises(MaildropLocked):
        await portal.login(alice, None, IMaildrop)
    await IMaildrop(again).close()
    _, third, _ = await portal.login(alice, None, IMaildrop)
    await IMaildrop(third).close()


@pytest_twisted.ensureDeferred
async def test_a_session_end_unlocks_the_maildir_at_once(
    store: MaildirStore, maildir: Path, logged: Logged
) -> None:
    """
    RFC 1939 section 4: once a session ended (`pop3d.realm.release`), the
    maildrop is free for the next login, with nothing left to wait for; a
    release that breaks is logged, and the session's end goes on.
    """
    logouts: list[str] = []
    maildrop = await store.open("alice")
    release(maildrop, lambda: logouts.append("alice"), Logger())
    assert logouts == ["alice"]
    again = await store.open("alice")
    with pytest.raises(MaildropLocked):
        await store.open("alice")
    await again.close()

    @implementer(IMaildrop, IClosesAtOnce)
    class Breaking:
        messages = MessageList()

        def close_at_once(self) -> None:
            raise OSError("the lock file went away")

    release(cast(IMaildrop, Breaking()), lambda: logouts.append("bob"), Logger())
    assert logouts == ["alice", "bob"]
    assert logged.texts("releasing maildrop failed") == ["releasing maildrop failed"]


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_tree_in_one_process_agree(tmp_path: Path, maildir: Path) -> None:
    """fcntl locks never conflict within a process: the tables must know."""
    first = MaildirStore(f"{tmp_path}/{{user}}")
    second = MaildirStore(f"{tmp_path}/{{user}}")
    maildrop = await first.open("alice")
    with pytest.raises(MaildropLocked):
        await second.open("alice")
    await maildrop.close()
    maildrop = await second.open("alice")
    await maildrop.close()


@pytest.mark.parametrize(
    ("template", "table"),
    [
        ("/srv/mail/{user}", "/srv/mail/.pop3d-locks"),
        ("/srv/{domain}/{local}", "/srv/.pop3d-locks"),
        ("/home/{user}/Maildir", "/home/.pop3d-locks"),
        ("/srv/mail-{user}", "/srv/.pop3d-locks"),
        ("{user}", "./.pop3d-locks"),
    ],
)
def test_where_the_lock_table_is(template: str, table: str) -> None:
    assert maildir_module.default_lock_table(template) == table


class TestLockFiles:
    """
    Lock files that hold across machines sharing Maildirs over NFS: a lock
    of another host is stale only once it has not been refreshed for
    ``stale_seconds``; a lock of this host is stale once its process is
    gone, even if the process id now belongs to another process.
    """

    @pytest.fixture
    def store(self, tmp_path: Path) -> MaildirStore:
        return MaildirStore(f"{tmp_path}/{{user}}", locks=LockFiles(None, stale_seconds=300))

    def plant(self, maildir: Path, owner: LockOwner, age: float = 0) -> Path:
        lock = maildir / LOCK_FILE_NAME
        lock.write_bytes(owner.line())
        when = time.time() - age
        os.utime(lock, (when, when))
        return lock

    @pytest_twisted.ensureDeferred
    async def test_the_lock_file_is_there_while_locked_and_is_not_a_message(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        maildrop = await store.open("alice")
        owner = LockOwner.parse((maildir / LOCK_FILE_NAME).read_bytes())
        assert owner == this_process()
        await maildrop.close()
        assert not (maildir / LOCK_FILE_NAME).exists()
        (maildir / "new" / "1.M1.host").write_bytes(b"x\n")
        maildrop = await store.open("alice")
        assert [m.uid for m in maildrop.messages] == ["1.M1.host"]
        await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_a_fresh_lock_of_another_host_is_respected(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        lock = self.plant(maildir, LockOwner("elsewhere.example", 4242, "x:1"), age=60)
        with pytest.raises(MaildropLocked):
            await store.open("alice")
        assert LockOwner.parse(lock.read_bytes()) == LockOwner("elsewhere.example", 4242, "x:1")

    @pytest_twisted.ensureDeferred
    async def test_a_lock_not_refreshed_for_too_long_is_broken(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        self.plant(maildir, LockOwner("elsewhere.example", 4242, "x:1"), age=301)
        maildrop = await store.open("alice")
        assert LockOwner.parse((maildir / LOCK_FILE_NAME).read_bytes()) == this_process()
        await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_a_reused_process_id_does_not_keep_a_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        here = this_process()
        # Our own pid, alive, but an earlier incarnation (a restarted server
        # in a container often gets the same pid).
        earlier = here.incarnation.rpartition(":")[0] + ":0"
        self.plant(maildir, LockOwner(here.host, here.pid, earlier))
        maildrop = await store.open("alice")
        await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_a_lock_of_another_pid_namespace_is_left_to_the_timeout(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A container sharing the host name cannot be asked about its processes."""
        here = this_process()
        self.plant(maildir, LockOwner(here.host, 4_000_000, "bootid:12345:1"))
        with pytest.raises(MaildropLocked):
            await store.open("alice")

    @pytest.mark.parametrize("content", ["host ²³ x:1 id", f"host {10**30} - id", "\x00\xff"])
    @pytest_twisted.ensureDeferred
    async def test_a_lock_file_full_of_nonsense_costs_no_descriptor(
        self, store: MaildirStore, maildir: Path, content: str
    ) -> None:
        lock = maildir / LOCK_FILE_NAME
        lock.write_bytes(content.encode("utf-8", "surrogateescape"))
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(MaildropLocked):
                await store.open("alice")
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == before

    @pytest_twisted.ensureDeferred
    async def test_a_live_lock_of_this_host_is_respected(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        self.plant(maildir, this_process())
        with pytest.raises(MaildropLocked):
            await store.open("alice")

    @pytest_twisted.ensureDeferred
    async def test_held_locks_are_refreshed_on_the_clock(
        self, tmp_path: Path, maildir: Path
    ) -> None:
        clock = Clock()
        store = MaildirStore(f"{tmp_path}/{{user}}", locks=LockFiles(clock))
        maildrop = await store.open("alice")
        lock = maildir / LOCK_FILE_NAME
        os.utime(lock, (1, 1))
        clock.advance(LOCK_REFRESH_SECONDS)
        assert time.time() - lock.stat().st_mtime < 60
        await maildrop.close()
        assert clock.getDelayedCalls() == []

    @pytest_twisted.ensureDeferred
    async def test_refreshes_run_off_the_reactor_thread(
        self, tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Touching many lock files over NFS must not stall other sessions."""
        import threading

        from twisted.internet import reactor

        locks = LockFiles(Clock(), threads=reactor)  # type: ignore[arg-type]
        store = MaildirStore(f"{tmp_path}/{{user}}", locks=locks)
        maildrop = await store.open("alice")
        touched: list[threading.Thread] = []
        original = os.utime

        def recording(*args: Any, **kwargs: Any) -> None:
            touched.append(threading.current_thread())
            original(*args, **kwargs)

        monkeypatch.setattr(os, "utime", recording)
        os.utime(maildir / LOCK_FILE_NAME, (1, 1))
        touched.clear()
        await locks.refresh()
        assert time.time() - (maildir / LOCK_FILE_NAME).stat().st_mtime < 60
        await maildrop.close()
        assert len(touched) == 1
        assert touched[0] is not threading.main_thread()

    @pytest_twisted.ensureDeferred
    async def test_a_lock_taken_over_is_not_removed_by_its_first_holder(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        maildrop = await store.open("alice")
        lock = maildir / LOCK_FILE_NAME
        lock.unlink()
        self.plant(maildir, LockOwner("elsewhere.example", 1, "x:1"))
        await maildrop.close()
        assert LockOwner.parse(lock.read_bytes()) == LockOwner("elsewhere.example", 1, "x:1")

    @pytest_twisted.ensureDeferred
    async def test_a_linked_lock_file_is_refused_and_not_created(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        target = tmp_path / "elsewhere" / "created-by-root"
        target.parent.mkdir()
        (maildir / LOCK_FILE_NAME).symlink_to(target)
        with pytest.raises(MaildropUnavailable):
            await store.open("alice")
        assert not target.exists()

    @pytest.mark.process
    def test_incarnations_differ_between_processes(self) -> None:
        other = subprocess.run(
            [sys.executable, "-c", "from pop3d.stores.posix import this_process as t; print(t())"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert this_process().incarnation not in other
        assert this_process().host in other


class TestTemplates:
    def test_user_local_domain(self) -> None:
        expanded = expand_template("/m/{domain}/{local}/{user}", "al@ex.org")
        assert expanded == "/m/ex.org/al/al@ex.org"

    def test_no_domain(self) -> None:
        assert expand_template("/m/{local}", "alice") == "/m/alice"

    def test_name_is_not_expanded_again(self) -> None:
        assert expand_template("/m/{user}/{domain}", "{domain}@x") == "/m/{domain}@x/x"

    def test_placeholders_anywhere_and_twice(self) -> None:
        assert expand_template("{user}", "alice") == "alice"
        assert expand_template("{local}.{domain}/{local}", "al@ex.org") == "al.ex.org/al"

    @pytest.mark.parametrize(
        ("template", "mailbox"),
        [
            ("/m/{domain}/{local}", "al@"),
            ("/m/{domain}/{local}", "@ex.org"),
            ("/m/{domain}/{local}", ".al@ex.org"),
            ("/m/{domain}/{local}", "al@.ex.org"),
            ("/m/{domain}", "alice"),
        ],
    )
    def test_a_part_empty_or_hidden_names_no_maildir(self, template: str, mailbox: str) -> None:
        # It would name the wrong directory (the domain's, or a dot file).
        assert expand_template(template, mailbox) is None

    @pytest.mark.parametrize("template", ["/m/{usr}", "/m/{user", "/m/{0}", ""])
    def test_bad_templates(self, template: str) -> None:
        with pytest.raises(MaildirTemplateError):
            MaildirStore(template)


class TestNoSymbolicLinks:
    """
    Maildirs belong to their users; the server usually has more privilege.
    Nothing is followed through a symbolic link, so a user cannot read or
    delete what is not theirs.
    """

    @pytest_twisted.ensureDeferred
    async def test_a_maildir_that_is_a_link_is_refused(
        self, store: MaildirStore, tmp_path: Path
    ) -> None:
        deliver_to_maildir(str(tmp_path / "alice"), b"Subject: alice's secret\n\n")
        (tmp_path / "mallory").symlink_to(tmp_path / "alice")
        with pytest.raises(MaildropUnavailable) as raised:
            await store.open("mallory")
        assert raised.value.permanent

    @pytest_twisted.ensureDeferred
    async def test_a_linked_cur_is_refused(self, store: MaildirStore, tmp_path: Path) -> None:
        deliver_to_maildir(str(tmp_path / "alice"), b"x\n", subdirectory="cur")
        for part in ("new", "tmp"):
            (tmp_path / "mallory" / part).mkdir(parents=True)
        (tmp_path / "mallory" / "cur").symlink_to(tmp_path / "alice" / "cur")
        with pytest.raises(MaildropUnavailable):
            await store.open("mallory")

    @pytest_twisted.ensureDeferred
    async def test_linked_and_special_files_are_not_messages(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        secret = tmp_path / "secret"
        secret.write_bytes(b"root's secret\n")
        (maildir / "cur" / "1.M1.link:2,S").symlink_to(secret)
        os.mkfifo(maildir / "new" / "2.M2.fifo")
        (maildir / "new" / "3.M3.real").write_bytes(b"real\n")
        maildrop = await store.open("alice")
        assert [m.uid for m in maildrop.messages] == ["3.M3.real"]
        await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_a_message_swapped_for_a_link_is_not_served(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        secret = tmp_path / "secret"
        secret.write_bytes(b"root's secret\n")
        (maildir / "new" / "1.M1.host").write_bytes(b"mine\n")
        maildrop = await store.open("alice")
        (maildir / "new" / "1.M1.host").unlink()
        (maildir / "new" / "1.M1.host").symlink_to(secret)
        with pytest.raises(MaildropUnavailable):
            await maybeDeferred(maildrop.open_message, 0)
        await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_a_linked_lock_table_is_refused_and_not_created(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        target = tmp_path / "elsewhere" / "created-by-root"
        target.parent.mkdir()
        (tmp_path / ".pop3d-locks").symlink_to(target)
        with pytest.raises(MaildropUnavailable):
            await store.open("alice")
        assert not target.exists()


class TestNameParts:
    @pytest.mark.parametrize("name", ["alice@", "@example.org", ".x@example.org", "a@.."])
    @pytest_twisted.ensureDeferred
    async def test_names_whose_parts_would_name_the_wrong_directory(
        self, tmp_path: Path, name: str
    ) -> None:
        store = MaildirStore(f"{tmp_path}/{{domain}}/{{local}}")
        with pytest.raises(UnauthorizedLogin):
            await store.open(name)

    @pytest_twisted.ensureDeferred
    async def test_parts_are_only_checked_when_used(self, tmp_path: Path) -> None:
        maildrop = await MaildirStore(f"{tmp_path}/{{user}}").open("alice@")
        await maildrop.close()


class TestSizeCache:
    """
    Sizes without a ``,W=`` field are counted once and kept: a later login
    reads no message, and a changed file is never given its old size.
    """

    @pytest_twisted.ensureDeferred
    async def test_a_later_login_reads_no_message(
        self, store: MaildirStore, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for n in range(3):
            (maildir / "new" / f"{n}.M{n}.host").write_bytes(b"line\n" * (n + 1))
        first = await store.open("alice")
        sizes = [m.size for m in first.messages]
        await first.close()
        # Grown in place (same inode; no Maildir writer does that): a login
        # that read a message would count the new size.
        for n in range(3):
            with open(maildir / "new" / f"{n}.M{n}.host", "ab") as grown:
                grown.write(b"more\n")
        second = await store.open("alice")
        assert [m.size for m in second.messages] == sizes == [6, 12, 18]
        await second.close()

    @pytest_twisted.ensureDeferred
    async def test_a_replaced_file_is_counted_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        message = maildir / "cur" / "1.M1.host:2,S"
        message.write_bytes(b"abc\n")
        first = await store.open("alice")
        assert first.messages[0].size == 5
        await first.close()
        # Same length on disk, one more line: a different wire size.  (A
        # file is replaced by a rename, never rewritten: the Maildir rule.)
        replacement = maildir / "tmp" / "1.M1.host"
        replacement.write_bytes(b"a\nb\n")
        replacement.rename(message)
        second = await store.open("alice")
        assert second.messages[0].size == 6
        await second.close()

    @pytest_twisted.ensureDeferred
    async def test_a_damaged_cache_is_ignored(self, store: MaildirStore, maildir: Path) -> None:
        (maildir / "new" / "1.M1.host").write_bytes(b"x\n")
        (maildir / maildir_module.SIZE_CACHE).write_bytes(b"pop3d-sizes 2\n1.M1.host\tjunk\n")
        maildrop = await store.open("alice")
        assert maildrop.messages[0].size == 3
        await maildrop.close()

    @pytest.mark.parametrize("planted", ["fifo", "hard link", "directory"])
    @pytest_twisted.ensureDeferred
    async def test_what_the_owner_plants_under_the_cache_names_is_harmless(
        self, store: MaildirStore, maildir: Path, tmp_path: Path, planted: str
    ) -> None:
        """The server must not block on, or write through, files users control."""
        (maildir / "new" / "1.M1.host").write_bytes(b"x\n")
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious\n")
        temporary = maildir / (maildir_module.SIZE_CACHE + ".tmp")
        if planted == "fifo":
            os.mkfifo(temporary)
        elif planted == "hard link":
            os.link(victim, temporary)
        else:
            (maildir / maildir_module.DOVECOT_UIDLIST).mkdir()
        maildrop = await store.open("alice")
        assert maildrop.messages[0].size == 3
        await maildrop.close()
        assert victim.read_bytes() == b"precious\n"


class TestListingCache:
    """
    A later login does not read the Maildir's directories while new/, cur/
    and dovecot-uidlist are unchanged, and never misses a change.
    """

    @pytest.fixture
    def scans(self, monkeypatch: pytest.MonkeyPatch) -> list[object]:
        scanned: list[object] = []
        original = os.scandir

        def recording(path: object) -> object:
            scanned.append(path)
            return original(path)  # type: ignore[call-overload]

        monkeypatch.setattr(os, "scandir", recording)
        return scanned

    def settle(self, maildir: Path) -> None:
        """Make the Maildir look untouched for a minute."""
        for part in ("new", "cur"):
            when = time.time() - 60
            os.utime(maildir / part, (when, when))

    async def uids(self, store: MaildirStore) -> list[str]:
        maildrop = await store.open("alice")
        try:
            return [m.uid for m in maildrop.messages]
        finally:
            await maildrop.close()

    @pytest_twisted.ensureDeferred
    async def test_an_unchanged_maildir_is_not_read_again(
        self, store: MaildirStore, maildir: Path, scans: list[object]
    ) -> None:
        (maildir / "cur" / "1.M1.host:2,S").write_bytes(b"x\n")
        self.settle(maildir)
        assert await self.uids(store) == ["1.M1.host"]
        scans.clear()
        assert await self.uids(store) == ["1.M1.host"]
        assert scans == []

    @pytest_twisted.ensureDeferred
    async def test_a_delivery_is_seen_at_the_next_login(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        (maildir / "cur" / "1.M1.host:2,S").write_bytes(b"x\n")
        self.settle(maildir)
        assert await self.uids(store) == ["1.M1.host"]
        deliver_to_maildir(str(maildir), b"y\n")
        assert len(await self.uids(store)) == 2

    @pytest_twisted.ensureDeferred
    async def test_a_change_the_clock_cannot_show_is_not_missed(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """
        A delivery within the same tick of the file system's clock as the
        listing leaves new/ with the same mtime: a directory that changed
        that recently is read again at the next login.
        """
        before = (maildir / "new").stat().st_mtime_ns
        assert await self.uids(store) == []
        (maildir / "new" / "1.M1.host").write_bytes(b"x\n")
        os.utime(maildir / "new", ns=(before, before))
        assert await self.uids(store) == ["1.M1.host"]

    @pytest_twisted.ensureDeferred
    async def test_a_new_dovecot_uidlist_is_read(self, store: MaildirStore, maildir: Path) -> None:
        (maildir / "cur" / "1.M1.host:2,S").write_bytes(b"x\n")
        self.settle(maildir)
        assert await self.uids(store) == ["1.M1.host"]
        (maildir / maildir_module.DOVECOT_UIDLIST).write_bytes(
            b"3 V1700000000 N2 G0\n1 P7 :1.M1.host\n"
        )
        assert await self.uids(store) == ["7"]

    @pytest_twisted.ensureDeferred
    async def test_without_the_cache_every_login_reads_the_maildir(
        self, tmp_path: Path, maildir: Path, scans: list[object]
    ) -> None:
        store = MaildirStore(f"{tmp_path}/{{user}}", listing_cache=0)
        self.settle(maildir)
        await self.uids(store)
        scans.clear()
        await self.uids(store)
        assert len(scans) == 2  # new/ and cur/

    @pytest_twisted.ensureDeferred
    async def test_the_cache_keeps_the_most_recent_listings(
        self, tmp_path: Path, scans: list[object]
    ) -> None:
        store = MaildirStore(f"{tmp_path}/{{user}}", listing_cache=3)
        for user in ("alice", "bob"):
            for n in range(2):
                deliver_to_maildir(str(tmp_path / user), b"%d\n" % n, subdirectory="cur")
            self.settle(tmp_path / user)
        for user in ("alice", "bob"):
            maildrop = await store.open(user)
            await maildrop.close()
        scans.clear()
        for user in ("bob", "alice"):
            maildrop = await store.open(user)
            await maildrop.close()
        assert len(scans) == 2  # alice's new/ and cur/: she did not fit

    @pytest_twisted.ensureDeferred
    async def test_another_workers_quit_and_deliveries_are_seen_by_a_kept_listing(
        self, store: MaildirStore, tmp_path: Path, maildir: Path, scans: list[object]
    ) -> None:
        """
        ``--workers``: two stores on one Maildir.  While the first keeps its
        listing, the second's QUIT moves messages from new/ to cur/ and flags
        one seen, a file is replaced under its own name, one is deleted and
        mail arrives.  The first store's next login lists exactly what is
        there, in unique-name order with the new mail last (RFC 1939
        section 7: UIDLs unchanged), reading new/ and cur/ once each.
        """
        for n in range(6):
            subdirectory = "cur" if n % 2 else "new"
            info = ":2,S" if n % 2 else ""
            (maildir / subdirectory / f"{n}.M{n}.host{info}").write_bytes(b"x" * n + b"\n")
        self.settle(maildir)
        assert await self.uids(store) == [f"{n}.M{n}.host" for n in range(6)]
        other = MaildirStore(f"{tmp_path}/{{user}}", locks=store.locks)
        maildrop = await other.open("alice")
        await ISeenFlags(maildrop).mark_seen([0], [0, 1, 2, 3, 4, 5])
        await maildrop.close()
        assert sorted(os.listdir(maildir / "new")) == []
        (maildir / "cur" / "3.M3.host:2,S").unlink()
        replaced = maildir / "tmp" / "5.M5.host"
        replaced.write_bytes(b"a longer file now\n")
        replaced.rename(maildir / "cur" / "5.M5.host:2,S")
        (maildir / "new" / "7.M7.host").write_bytes(b"seven\n")
        (maildir / "new" / "8.M8.host").write_bytes(b"eight!\n")
        self.settle(maildir)
        scans.clear()
        maildrop = await store.open("alice")
        try:
            assert [(m.uid, m.size) for m in maildrop.messages] == [
                ("0.M0.host", 2),
                ("1.M1.host", 3),
                ("2.M2.host", 4),
                ("4.M4.host", 6),
                ("5.M5.host", 19),
                ("7.M7.host", 7),
                ("8.M8.host", 8),
            ]
            body = await maybeDeferred(maildrop.open_message, 4)
            assert body.read(100) == b"a longer file now\n"  # the replacement, as stored
            body.close()
            # Moved to cur/ by the other worker: found where it is now, with
            # no further read of the directories (checked below).
            for index, stored in ((0, b"\n"), (2, b"xx\n")):
                body = await maybeDeferred(maildrop.open_message, index)
                assert body.read(100) == stored
                body.close()
        finally:
            await maildrop.close()
        assert len(scans) == 2  # new/ and cur/, once each
        assert sorted(os.listdir(maildir / "cur")) == [
            "0.M0.host:2,S",
            "1.M1.host:2,S",
            "2.M2.host:2,",
            "4.M4.host:2,",
            "5.M5.host:2,S",
        ]

    @pytest_twisted.ensureDeferred
    async def test_a_maildir_replaced_during_a_session_is_not_served(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        deliver_to_maildir(str(maildir), b"mine\n")
        maildrop = await store.open("alice")
        maildir.rename(tmp_path / "moved")
        deliver_to_maildir(str(maildir), b"someone else's\n")
        with pytest.raises(MaildropUnavailable):
            await maybeDeferred(maildrop.open_message, 0)
        await maildrop.close()


@pytest_twisted.ensureDeferred
async def test_update_work_runs_off_the_reactor_thread(
    tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlinks and seen-flag renames of a big QUIT must not stall other sessions."""
    import threading

    from twisted.internet import reactor

    for n in range(3):
        (maildir / "new" / f"{n}.M{n}.host").write_bytes(b"x\n")
    store = MaildirStore(f"{tmp_path}/{{user}}", reactor=reactor)  # type: ignore[arg-type]
    maildrop = await store.open("alice")
    threads: list[threading.Thread] = []
    for call in ("unlink", "rename"):
        original = getattr(os, call)

        def recording(*args: object, _original: object = original, **kwargs: object) -> object:
            if ".M" in str(args[0]):  # a message, not the size cache
                threads.append(threading.current_thread())
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(os, call, recording)
    await maildrop.remove([0])
    await ISeenFlags(maildrop).mark_seen([1], [1, 2])
    await maildrop.close()
    assert len(threads) == 3
    assert threading.main_thread() not in threads
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == ["1.M1.host:2,S", "2.M2.host:2,"]


@pytest_twisted.ensureDeferred
async def test_deciding_what_a_big_quit_renames_runs_off_the_reactor_thread(
    tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 100,000 messages, only deciding what to rename takes 0.1 s."""
    import threading

    from twisted.internet import reactor

    for n in range(3):
        (maildir / "new" / f"{n}.M{n}.host").write_bytes(b"x\n")
    store = MaildirStore(
        f"{tmp_path}/{{user}}",
        reactor=reactor,  # type: ignore[arg-type]
        plan_inline=2,
    )
    maildrop = await store.open("alice")
    planners: list[threading.Thread] = []

    class Kept(list[int]):
        """The kept messages, noting where they are gone through (decided about)."""

        def __iter__(self) -> Iterator[int]:
            planners.append(threading.current_thread())
            return super().__iter__()

    await ISeenFlags(maildrop).mark_seen([0], Kept([0, 1, 2]))
    await maildrop.close()
    assert planners and threading.main_thread() not in planners
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == [
        "0.M0.host:2,S",
        "1.M1.host:2,",
        "2.M2.host:2,",
    ]


@pytest_twisted.ensureDeferred
async def test_reads_shorter_than_asked_are_not_the_end(
    tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE, 9p and some network file systems return short reads mid-file."""
    message = b"Subject: short reads\nX-UIDL: abc123\n\n" + b".line\n" * 50
    (maildir / "new" / "1.M1.host").write_bytes(message)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, size: real_read(fd, min(size, 7)))
    store = MaildirStore(f"{tmp_path}/{{user}}", reuse_x_uidl=True)
    maildrop = await store.open("alice")
    body = await maybeDeferred(maildrop.open_message, 0)
    chunks = []
    while chunk := body.read(256 * 1024):
        chunks.append(chunk)
    body.close()
    await maildrop.close()
    assert b"".join(chunks) == message
    assert maildrop.messages.sizes == (wire_size(message),)
    assert maildrop.messages.uids == ("abc123",)


def _many_messages(maildir: Path) -> dict[str, bytes]:
    """More messages than make the store ask the file system, of every kind."""
    messages = {
        f"{number:04d}.M{number}.host": b"Subject: %d\n\n" % number + b"line\n" * (number % 7)
        for number in range(maildir_module.ASK_FILE_SYSTEM_FROM)
    }
    # Longer than one read; CRLF already; no final newline; a ",S=" that
    # says 3 (the file size in a name is a hint, the content decides).
    messages["9001.M1.host"] = b"Subject: big\n\n" + b"x" * 99 + (b"\n" + b"y" * 99) * 3000 + b"\n"
    messages["9002.M2.host"] = b"Subject: crlf\r\n\r\nbody\r\n"
    messages["9003.M3.host"] = b"Subject: no newline\n\nlast"
    messages["9004.M4.host,S=3"] = b"Subject: lies\n\nabcdef\n"
    # Longer than the first read (64 KiB), shorter than it and the next.
    messages["9005.M5.host"] = b"Subject: attachment\n\n" + (b"z" * 79 + b"\n") * 1250
    for name, content in messages.items():
        (maildir / "new" / name).write_bytes(content)
    return messages


@pytest_twisted.ensureDeferred
async def test_sizes_are_exact_where_a_short_read_ends_a_file(
    tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    RFC 1939 section 11: sizes with CRLF line endings.  On a local disk a
    read returning less than asked is the end of the file, so a message read
    whole in one go is not read again; sizes stay exact for every kind of
    message, whatever its name says.  (Told it is such a disk, whatever
    this machine's temporary directory is.)
    """
    messages = _many_messages(maildir)
    store = MaildirStore(f"{tmp_path}/{{user}}", short_read_is_end=lambda fd: True)
    real_read = os.read
    reads: list[int] = []

    def counting(fd: int, size: int) -> bytes:
        reads.append(fd)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", counting)
    maildrop = await store.open("alice")
    monkeypatch.undo()
    sizes = dict(zip(maildrop.messages.uids, maildrop.messages.sizes, strict=True))
    await maildrop.close()
    assert sizes == {name: wire_size(content) for name, content in messages.items()}
    assert [sizes[unique] for unique in ("9001.M1.host", "9002.M2.host", "9003.M3.host")] == [
        303117,
        23,
        29,  # the CRLF a server adds before the final dot counts (RFC 1939 section 11)
    ]
    assert sizes["9004.M4.host,S=3"] == 25
    # 100,021 octets, 1,252 LFs (each sent as CRLF).
    assert sizes["9005.M5.host"] == 101_273
    # One read a message: none is read again to learn that it ended, but
    # the two larger than the first read (64 KiB), each read in two: 9001
    # (300 KB: 64 KiB, then the rest, shorter than the 256 KiB asked) and
    # 9005 (100 KB).
    assert len(reads) == len(messages) - 2 + 2 * 2


@pytest_twisted.ensureDeferred
async def test_a_file_system_with_short_reads_is_read_to_the_end(
    tmp_path: Path, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    FUSE, 9p and some network file systems return short reads mid-file:
    where the file system does not say otherwise, only an empty read ends a
    message, and every size is exact (RFC 1939 section 11).
    """
    messages = _many_messages(maildir)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, size: real_read(fd, min(size, 7)))
    asked: list[int] = []

    def like_fuse(directory_fd: int) -> bool:
        asked.append(directory_fd)
        return False

    store = MaildirStore(f"{tmp_path}/{{user}}", short_read_is_end=like_fuse)
    maildrop = await store.open("alice")
    sizes = dict(zip(maildrop.messages.uids, maildrop.messages.sizes, strict=True))
    await maildrop.close()
    assert len(asked) == 1  # new/; cur/ holds nothing to count
    assert sizes == {name: wire_size(content) for name, content in messages.items()}
    assert sizes["9001.M1.host"] == 303117


@pytest_twisted.ensureDeferred
async def test_counting_sizes_leaves_access_times_alone(store: MaildirStore, maildir: Path) -> None:
    """
    The first login reads every message to learn its RFC 1939 size (section
    11: CRLF line endings); that is the server's reading, not the user's: no
    message's access time changes (O_NOATIME; a relatime mount would write
    every inode again).
    """
    messages = {
        maildir / "new" / "1.M1.host": b"Subject: one\n\nbody\n",
        maildir / "cur" / "2.M2.host:2,S": b"Subject: two\r\n\r\nbody\r\nmore\n",
    }
    stamps = {}
    for path, content in messages.items():
        path.write_bytes(content)
        info = path.stat()
        # Older than the file: a relatime mount would update it on a read.
        stamps[path] = info.st_mtime_ns - 3_600_000_000_000
        os.utime(path, ns=(stamps[path], info.st_mtime_ns))
    maildrop = await store.open("alice")
    assert list(maildrop.messages.sizes) == [wire_size(m) for m in messages.values()] == [22, 28]
    await maildrop.close()
    assert {path: path.stat().st_atime_ns for path in messages} == stamps


@pytest.mark.peer
def test_sizes_are_counted_for_a_reader_who_does_not_own_the_messages(
    tmp_path: Path, maildir: Path
) -> None:
    """
    Only a file's owner (or a process with CAP_FOWNER) may read it without
    touching its access time: a server that can read the Maildir but does
    not own its messages still counts every size exactly (RFC 1939 section
    11).  The server here is root without CAP_FOWNER (``setpriv``), the
    messages belong to nobody.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        reason = "reading as a non-owner needs root and setpriv (util-linux)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    contents = [b"Subject: one\n\nbody\n", b"Subject: two\n\n" + b"line\n" * 3000]
    for number, content in enumerate(contents):
        path = maildir / "new" / f"{number}.M{number}.host"
        path.write_bytes(content)
        shutil.chown(path, "nobody")
    script = (
        "from pop3d.stores.maildir import MaildirStore\n"
        f"store = MaildirStore({str(tmp_path / '{user}')!r})\n"
        "store.open('alice').addCallback(lambda drop: print(list(drop.messages.sizes)))\n"
    )
    result = subprocess.run(
        [setpriv, "--bounding-set", "-fowner", "--", sys.executable, "-c", script],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == b"[22, 18016]\n"
    assert [wire_size(content) for content in contents] == [22, 18016]


class _TimedMaildirSessions:
    """What the tests of kept listings share: a clock, its thread pool, and the directories read."""

    @pytest.fixture
    def threads(self) -> TimedClockThreads:
        return TimedClockThreads(Clock())

    @pytest.fixture
    def scans(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """The directories read (``os.scandir`` of new/ or cur/), by name."""
        scanned: list[str] = []
        original = os.scandir

        def recording(fd: int) -> Any:
            scanned.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            return original(fd)

        monkeypatch.setattr(os, "scandir", recording)
        return scanned

    def long_ago(self, maildir: Path, parts: tuple[str, ...] = ("new", "cur")) -> None:
        """As if the directories last changed a minute ago (each call another time)."""
        when = time.time_ns() - 60 * 10**9
        for part in parts:
            os.utime(maildir / part, ns=(when, when))

    def open(self, store: MaildirStore, threads: TimedClockThreads) -> Any:
        maildrop = result_of(threads.clock, store.open("alice"))
        assert not isinstance(maildrop, Failure), maildrop
        return maildrop

    def quit(
        self,
        maildrop: Any,
        threads: TimedClockThreads,
        retrieved: list[int],
        between: Callable[[], None] = lambda: None,
    ) -> None:
        """UPDATE, no deletion; ``between`` runs while QUIT waits for the renames to settle."""
        marking = ISeenFlags(maildrop).mark_seen(retrieved, range(len(maildrop.messages)))
        done: list[object] = []
        marking.addBoth(done.append)
        settle(threads.clock)
        assert not done, "QUIT answered before reading the Maildir again"
        between()
        threads.clock.advance(maildir_module.SETTLE_WAIT_SECONDS)
        settle(threads.clock)
        assert done == [None]
        maildrop.close()


class TestListingAfterUpdate(_TimedMaildirSessions):
    """
    UPDATE brings the kept listing up to date with its own removals and
    renames; a large Maildir is read again at QUIT once its directories have
    settled, so that the next login reads nothing (issue 14), and no change
    by another program is missed meanwhile.
    """

    def test_the_next_login_reads_nothing(
        self, tmp_path: Path, maildir: Path, threads: TimedClockThreads, scans: list[object]
    ) -> None:
        store = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor, settle_at_quit=1)
        uniques = [deliver_to_maildir(str(maildir), b"%d\n" % n) for n in range(3)]
        self.long_ago(maildir)
        self.quit(self.open(store, threads), threads, [1], between=lambda: self.long_ago(maildir))
        assert sorted(os.listdir(maildir / "cur")) == sorted(
            [uniques[0] + ":2,", uniques[1] + ":2,S", uniques[2] + ":2,"]
        )
        scans.clear()
        maildrop = self.open(store, threads)
        assert scans == []
        assert list(maildrop.messages.uids) == uniques
        body = result_of(threads.clock, maybeDeferred(maildrop.open_message, 1))
        assert body.read(10) == b"1\n"  # type: ignore[union-attr]
        body.close()  # type: ignore[union-attr]
        maildrop.close()

    @pytest.mark.parametrize("change", ["deliver", "delete", "flag"])
    def test_another_programs_change_within_the_same_tick_is_seen(
        self, tmp_path: Path, maildir: Path, threads: TimedClockThreads, change: str
    ) -> None:
        """
        Another program changes the Maildir right after QUIT's renames, and
        the directories keep the times the renames gave them (the same tick
        of a coarse clock): the next login lists what is there.
        """
        store = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor, settle_at_quit=1)
        uniques = [deliver_to_maildir(str(maildir), b"%d\n" % n) for n in range(3)]
        self.long_ago(maildir)

        def meanwhile() -> None:
            times = {part: (maildir / part).stat().st_mtime_ns for part in ("new", "cur")}
            if change == "deliver":
                uniques.append(deliver_to_maildir(str(maildir), b"late\n", subdirectory="cur"))
            elif change == "delete":
                os.unlink(maildir / "cur" / (uniques.pop(1) + ":2,"))
            else:
                os.rename(
                    maildir / "cur" / (uniques[2] + ":2,"), maildir / "cur" / (uniques[2] + ":2,F")
                )
            for part, mtime in times.items():
                os.utime(maildir / part, ns=(mtime, mtime))

        self.quit(self.open(store, threads), threads, [0], between=meanwhile)
        maildrop = self.open(store, threads)
        assert list(maildrop.messages.uids) == uniques
        assert list(maildrop.messages.sizes) == [
            wire_size((maildir / "cur" / name).read_bytes())
            for name in sorted(os.listdir(maildir / "cur"))
        ]
        maildrop.close()

    def test_a_rename_that_fails_leaves_the_message_listed_where_it_is(
        self,
        tmp_path: Path,
        maildir: Path,
        threads: TimedClockThreads,
        monkeypatch: pytest.MonkeyPatch,
        scans: list[str],
    ) -> None:
        """
        QUIT's renames stop part way (a crash of that work, a full disk): the
        listing kept is what the directories hold, not what was planned (the
        message is opened where it is, without looking for it).
        """
        store = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor, settle_at_quit=1)
        uniques = [deliver_to_maildir(str(maildir), b"%d\n" % n) for n in range(3)]
        self.long_ago(maildir)
        original = os.rename

        def failing(source: object, target: object, **kwargs: Any) -> None:
            if str(source) == uniques[1]:
                raise OSError(28, "No space left on device")
            original(source, target, **kwargs)  # type: ignore[arg-type]

        maildrop = self.open(store, threads)
        monkeypatch.setattr(os, "rename", failing)
        self.quit(maildrop, threads, [0, 1, 2], between=lambda: self.long_ago(maildir))
        monkeypatch.setattr(os, "rename", original)
        assert os.listdir(maildir / "new") == [uniques[1]]
        maildrop = self.open(store, threads)
        assert list(maildrop.messages.uids) == uniques
        assert list(maildrop.messages.sizes) == [3, 3, 3]
        scans.clear()
        body = result_of(threads.clock, maybeDeferred(maildrop.open_message, 1))
        assert body.read(10) == b"1\n"  # type: ignore[union-attr]
        body.close()  # type: ignore[union-attr]
        assert scans == []  # listed in new/, where it is
        maildrop.close()

    def test_a_small_maildir_is_read_again_at_the_next_login_instead(
        self, tmp_path: Path, maildir: Path, threads: TimedClockThreads
    ) -> None:
        """Below ``settle_at_quit`` messages QUIT does not wait: reading costs less."""
        store = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor)
        uniques = [deliver_to_maildir(str(maildir), b"%d\n" % n) for n in range(3)]
        maildrop = self.open(store, threads)
        marking = ISeenFlags(maildrop).mark_seen([0], range(3))
        assert result_of(threads.clock, marking) is None
        maildrop.close()
        deliver_to_maildir(str(maildir), b"more\n")
        maildrop = self.open(store, threads)
        assert list(maildrop.messages.uids)[:3] == uniques
        assert len(maildrop.messages) == 4
        maildrop.close()


class TestChangeNotes(_TimedMaildirSessions):
    """
    ``--workers`` (issue 14): a QUIT in one process notes what it changed in
    the Maildir (`pop3d.stores.maildir.CHANGE_NOTES`), so that another
    process's next login brings its own listing up to date without reading
    the 100,000 names of cur/ again; and nothing depends on the note.
    """

    def stores(self, tmp_path: Path, threads: TimedClockThreads) -> tuple[MaildirStore, ...]:
        """Two worker processes' stores on the same Maildirs, sharing their locks."""
        first = MaildirStore(f"{tmp_path}/{{user}}", reactor=threads.as_reactor, settle_at_quit=1)
        second = MaildirStore(
            f"{tmp_path}/{{user}}",
            reactor=threads.as_reactor,
            settle_at_quit=1,
            locks=first.locks,
        )
        return first, second

    def retrieve_and_quit(
        self, maildrop: Any, threads: TimedClockThreads, maildir: Path, index: int, body: bytes
    ) -> None:
        """RETR one message, then QUIT; the renames settle while QUIT waits for them."""
        read = result_of(threads.clock, maybeDeferred(maildrop.open_message, index))
        assert read.read(100) == body  # type: ignore[union-attr]
        read.close()  # type: ignore[union-attr]
        self.quit(maildrop, threads, [index], between=lambda: self.long_ago(maildir))

    def noted_quit(
        self,
        tmp_path: Path,
        maildir: Path,
        threads: TimedClockThreads,
        count: int = 4,
        retrieved: int = 1,
    ) -> tuple[MaildirStore, MaildirStore, list[bytes], list[str]]:
        """
        ``count`` messages; the second store lists them, the first one's
        session retrieves message ``retrieved`` (an index) and QUITs,
        noting what it changed.
        """
        first, second = self.stores(tmp_path, threads)
        bodies = [b"%d\n" % n for n in range(count)]
        uniques = [deliver_to_maildir(str(maildir), body) for body in bodies]
        self.long_ago(maildir)
        self.open(second, threads).close()
        self.retrieve_and_quit(
            self.open(first, threads), threads, maildir, retrieved, bodies[retrieved]
        )
        return first, second, bodies, uniques

    def test_another_process_reads_no_directory_after_a_quit(
        self, tmp_path: Path, maildir: Path, threads: TimedClockThreads, scans: list[str]
    ) -> None:
        """
        The second store listed the Maildir; the first one's session
        retrieves a message and QUITs (moving every message from new/ to
        cur/, flagging one seen).  The second store's next login lists them
        all, in the same order with the same UIDLs (RFC 1939 section 7) and
        sizes, and opens the moved message, reading neither new/ nor cur/.
        After another such session and 5 deliveries, it reads new/ only.
        """
        first, second, bodies, uniques = self.noted_quit(tmp_path, maildir, threads, 6, 2)
        assert sorted(os.listdir(maildir / "new")) == []
        assert (maildir / maildir_module.CHANGE_NOTES).is_file()
        scans.clear()
        maildrop = self.open(second, threads)
        assert scans == []
        assert list(maildrop.messages.uids) == uniques
        assert list(maildrop.messages.sizes) == [3] * 6
        read = result_of(threads.clock, maybeDeferred(maildrop.open_message, 2))
        assert read.read(100) == bodies[2]  # type: ignore[union-attr]
        read.close()  # type: ignore[union-attr]
        assert scans == []  # found where the note said it went
        maildrop.close()

        self.retrieve_and_quit(self.open(first, threads), threads, maildir, 4, bodies[4])
        later = [b"later %d\n" % n for n in range(5)]
        uniques += [deliver_to_maildir(str(maildir), body) for body in later]
        self.long_ago(maildir, ("new",))
        scans.clear()
        maildrop = self.open(second, threads)
        assert scans == ["new"]
        assert list(maildrop.messages.uids) == uniques
        assert list(maildrop.messages.sizes) == [3] * 6 + [9] * 5
        for index, body in ((4, bodies[4]), (8, later[2])):
            read = result_of(threads.clock, maybeDeferred(maildrop.open_message, index))
            assert read.read(100) == body  # type: ignore[union-attr]
            read.close()  # type: ignore[union-attr]
        assert scans == ["new"]
        maildrop.close()
        assert sorted(os.listdir(maildir / "cur")) == [
            uniques[0] + ":2,",
            uniques[1] + ":2,",
            uniques[2] + ":2,S",
            uniques[3] + ":2,",
            uniques[4] + ":2,S",
            uniques[5] + ":2,",
        ]

    @pytest.mark.parametrize("hostile", ["a path", "hidden", "a directory", "missing"])
    def test_a_note_naming_what_is_not_a_message_there_is_not_followed(
        self,
        tmp_path: Path,
        maildir: Path,
        threads: TimedClockThreads,
        scans: list[str],
        hostile: str,
    ) -> None:
        """
        A user who can write their Maildir can write its note, with the
        directories' real stamps: a note that says a message went to a path
        (``x/../../other-user/cur/y``), to a hidden name, or to what is no
        regular file with that inode in cur/ is not followed (the server
        never reads or deletes anything outside the Maildir through it):
        cur/ is read, and the listing is what is there.
        """
        _, second, bodies, uniques = self.noted_quit(tmp_path, maildir, threads)
        notes = maildir / maildir_module.CHANGE_NOTES
        moved = (uniques[1] + ":2,S").encode()
        assert b"\n" + moved + b"\t" in notes.read_bytes()
        cur = maildir / "cur"
        stamp = cur.stat().st_mtime_ns
        if hostile == "a path":
            other = tmp_path / "bob" / "cur"
            other.mkdir(parents=True)
            (other / "secret").write_bytes(b"bob's\n")
            name = moved + b"/../../../bob/cur/secret"
        elif hostile == "hidden":
            name = b".hidden"
        elif hostile == "a directory":
            (cur / "folder:2,S").mkdir()
            name = b"folder:2,S"
        else:
            name = (uniques[1] + ":2,X").encode()
        notes.write_bytes(notes.read_bytes().replace(b"\n" + moved + b"\t", b"\n" + name + b"\t"))
        os.utime(cur, ns=(stamp, stamp))  # the stamp the note leads to
        scans.clear()
        maildrop = self.open(second, threads)
        assert "cur" in scans
        assert list(maildrop.messages.uids) == uniques
        assert list(maildrop.messages.sizes) == [3] * 4
        read = result_of(threads.clock, maybeDeferred(maildrop.open_message, 1))
        assert read.read(100) == bodies[1]  # type: ignore[union-attr]
        read.close()  # type: ignore[union-attr]
        maildrop.close()

    @pytest.mark.parametrize(
        "damage",
        ["garbage", "cut short", "another version", "lying", "fifo", "directory", "symbolic link"],
    )
    def test_a_damaged_note_is_ignored_and_said_once(
        self,
        tmp_path: Path,
        maildir: Path,
        threads: TimedClockThreads,
        scans: list[str],
        damage: str,
        logged: Logged,
    ) -> None:
        """
        The note file is in the Maildir, which its owner can write: when it
        is not a whole note of pop3d's (or not a regular file, or says what
        is not so), the other store reads new/ and cur/ as it did without
        notes and lists exactly what is there; the damage is logged once,
        not at every login.  The next QUIT replaces the file, never writing
        through a link.
        """
        first, second, bodies, uniques = self.noted_quit(tmp_path, maildir, threads)
        notes = maildir / maildir_module.CHANGE_NOTES
        text = notes.read_bytes()
        assert text.startswith(b"pop3d-changes 1\n") and text.endswith(b"\nend\n")
        notes.unlink()
        elsewhere = tmp_path / "elsewhere"
        if damage == "garbage":
            notes.write_bytes(b"\x00\xff not a note \n")
        elif damage == "cut short":
            notes.write_bytes(text[: len(text) // 2])
        elif damage == "another version":
            notes.write_bytes(text.replace(b"pop3d-changes 1\n", b"pop3d-changes 9\n"))
        elif damage == "lying":
            # Well formed, but the files it says were renamed never were.
            notes.write_bytes(text.replace(uniques[1].encode(), uniques[0].encode()))
        elif damage == "fifo":
            os.mkfifo(notes)
        elif damage == "directory":
            notes.mkdir()
        else:
            elsewhere.write_bytes(text)
            notes.symlink_to(elsewhere)
        for attempt in range(2):
            if attempt:
                self.long_ago(maildir)  # a change the note does not lead to
            # (First: new/ and cur/ as the QUIT left them, the stamps the
            # note leads to: the file is read and its damage, or lie, met.)
            scans.clear()
            maildrop = self.open(second, threads)
            assert {"cur", "new"} <= set(scans)
            assert list(maildrop.messages.uids) == uniques
            assert list(maildrop.messages.sizes) == [3] * 4
            maildrop.close()
        said = [
            formatEvent(event)
            for event in logged.events
            if maildir_module.CHANGE_NOTES in str(event)
        ]
        assert len(said) == (0 if damage == "lying" else 1), said
        assert all(said_once.startswith(f"ignoring {notes}: ") for said_once in said)
        self.retrieve_and_quit(self.open(first, threads), threads, maildir, 2, bodies[2])
        if damage == "symbolic link":
            assert elsewhere.read_bytes() == text
        if damage != "directory":
            assert notes.read_bytes().startswith(b"pop3d-changes 1\n")
