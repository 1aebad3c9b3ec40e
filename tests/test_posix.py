"""
The file mechanics the local-file stores share (`pop3d.stores.posix`): the
one dotlock, the one in-process lock registry, opening directories without
following links users could plant.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pop3d.errors import MaildropLocked
from pop3d.stores.mbox import DOTLOCK_STALE_SECONDS, MboxStore
from pop3d.stores.posix import (
    PROCESS_LOCKS,
    DotLock,
    LockOwner,
    LockTable,
    ProcessLocks,
    open_directory,
    open_same_directory,
    short_read_is_end,
    unavailable,
)
from pop3d.wire import ResponseCode


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def make_stale(lock: Path) -> None:
    lock.write_bytes(b"")  # another program's lock, of no pop3d
    then = time.time() - DOTLOCK_STALE_SECONDS - 30
    os.utime(lock, (then, then), follow_symlinks=False)


def test_a_stale_dotlock_another_server_broke_and_retook_meanwhile_stays_its_own(
    tmp_path: Path, directory: int
) -> None:
    """
    RFC 1939 section 4 (one session per maildrop).  Two servers find the same
    stale dotlock; the other one breaks it and takes its own between this
    one's judging it stale and removing it.  Removing it by name would take
    the other's fresh lock away and let both serve the maildrop; moved aside
    and checked, the fresh lock is put back and this server is refused.
    """
    lock = tmp_path / "alice.lock"
    make_stale(lock)
    others: list[DotLock] = []

    def when_the_other_server_gets_ahead() -> float:
        # Asked once the stale lock was judged: the other server acts now.
        if not others:
            others.append(DotLock.acquire("alice.lock", dir_fd=directory, directory=str(tmp_path)))
        return time.time()

    with pytest.raises(MaildropLocked):
        DotLock.acquire(
            "alice.lock",
            dir_fd=directory,
            directory=str(tmp_path),
            stale_seconds=DOTLOCK_STALE_SECONDS,
            now=when_the_other_server_gets_ahead,
        )
    [other] = others
    assert lock.read_bytes() == other.content
    assert sorted(os.listdir(tmp_path)) == ["alice.lock"]
    other.release(directory)
    assert not lock.exists()


def test_a_stale_dotlock_is_broken_and_the_new_one_names_its_holder(
    tmp_path: Path, directory: int
) -> None:
    lock = tmp_path / "alice.lock"
    make_stale(lock)
    held = DotLock.acquire("alice.lock", dir_fd=directory, directory=str(tmp_path), pid_first=True)
    pid_line, owner_line = lock.read_bytes().splitlines()
    assert pid_line == b"%d" % os.getpid()  # liblockfile reads the PID there
    owner = LockOwner.parse(owner_line)
    assert owner is not None and owner.pid == os.getpid()
    held.release()
    assert not lock.exists()


def test_a_dotlock_of_a_process_that_is_gone_is_broken_at_once(
    tmp_path: Path, directory: int
) -> None:
    """A pop3d killed with SIGKILL does not keep its maildrop locked for 10 minutes."""
    held = DotLock.acquire("alice.lock", dir_fd=directory, directory=str(tmp_path))
    with pytest.raises(MaildropLocked):
        DotLock.acquire("alice.lock", dir_fd=directory, directory=str(tmp_path))
    here = LockOwner.parse(held.content)
    assert here is not None
    # What a process of this boot that has exited leaves behind.
    gone = LockOwner(here.host, 2**22 + 1, here.incarnation.rpartition(":")[0] + ":1")
    (tmp_path / "alice.lock").write_bytes(gone.line("dead"))
    again = DotLock.acquire("alice.lock", dir_fd=directory, directory=str(tmp_path))
    assert (tmp_path / "alice.lock").read_bytes() == again.content
    again.release()


def test_the_process_registry_refuses_a_second_claim_until_released() -> None:
    locks = ProcessLocks()
    locks.claim(("mbox", 1, 2, "alice"))
    with pytest.raises(MaildropLocked):
        locks.claim(("mbox", 1, 2, "alice"))
    locks.claim(("mbox", 1, 2, "bob"))
    assert locks.release(("mbox", 1, 2, "alice"))
    assert not locks.release(("mbox", 1, 2, "alice"))
    locks.claim(("mbox", 1, 2, "alice"))


def _forked(check: Callable[[], None]) -> Callable[[], str]:
    """
    Fork a child that runs ``check`` once the parent calls what this
    returns, which then waits for the child and says what went wrong
    there ("" if nothing).  The child never returns into pytest.
    """
    go_read, go_write = os.pipe()
    told_read, told_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b""
        try:
            os.read(go_read, 1)
            check()
        except BaseException as error:  # everything goes back to the parent
            outcome = repr(error).encode("utf-8", "replace") or b"?"
        finally:
            os.write(told_write, outcome)
            os._exit(0)
    os.close(go_read)
    os.close(told_write)

    def run() -> str:
        os.write(go_write, b"!")
        os.close(go_write)
        with os.fdopen(told_read, "rb") as told:
            outcome = told.read()
        os.waitpid(pid, 0)
        return outcome.decode("utf-8")

    return run


def _open_files() -> list[str]:
    """What this process's descriptors name (Linux: /proc/self/fd)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return names


@pytest.mark.process
def test_a_forked_child_holds_none_of_its_parents_locks(tmp_path: Path) -> None:
    """
    A child forked while its parent holds a maildrop neither holds it nor
    can unlock it: the parent's release called in the child leaves the
    parent's lock, and later the child's own, alone; the child's table
    and registry start empty (once the parent lets the maildrop go, the
    child may lock it).  The lock state is reset at the fork, not compared
    against the process id at every lock and unlock.
    """
    table = LockTable(str(tmp_path / "locks"))
    (tmp_path / "alice").mkdir()
    alice = os.open(tmp_path / "alice", os.O_RDONLY | os.O_DIRECTORY)

    def lock_alice() -> Callable[[], None]:
        return table.acquire(str(tmp_path / "alice"), alice, os.fstat(alice))

    try:
        release = lock_alice()
        PROCESS_LOCKS.claim(("test", "bob"))

        def while_the_parent_holds_it() -> None:
            # The parent's descriptor of the table is not kept open in the child.
            assert str(tmp_path / "locks") not in _open_files()
            release()  # the parent's: not the child's to undo
            with pytest.raises(MaildropLocked):
                lock_alice()
            PROCESS_LOCKS.claim(("test", "bob"))  # the parent's claim is not the child's

        def once_the_parent_let_it_go() -> None:
            lock_alice()
            release()  # the parent's again: the child's own lock stays
            with pytest.raises(MaildropLocked):
                lock_alice()

        assert _forked(while_the_parent_holds_it)() == ""
        # The parent's lock held through all that: a second child is refused too.
        assert _forked(while_the_parent_holds_it)() == ""
        later = _forked(once_the_parent_let_it_go)
        release()
        assert later() == ""
        with pytest.raises(MaildropLocked):
            PROCESS_LOCKS.claim(("test", "bob"))  # the parent's own claims stay
    finally:
        PROCESS_LOCKS.release(("test", "bob"))
        table.close()
        os.close(alice)


def test_a_directory_is_opened_through_the_administrators_link_only(tmp_path: Path) -> None:
    """Above the trusted part links are followed (/var/mail); below it, never."""
    spool = tmp_path / "spool"
    (spool / "alice").mkdir(parents=True)
    (tmp_path / "mail").symlink_to(spool)
    (spool / "mallory").symlink_to(spool / "alice")
    fd = open_directory(str(tmp_path / "mail" / "alice"), trusted=str(tmp_path / "mail"))
    assert os.fstat(fd).st_ino == (spool / "alice").stat().st_ino
    os.close(fd)
    with pytest.raises(OSError) as refused:
        open_directory(str(tmp_path / "mail" / "mallory"), trusted=str(tmp_path / "mail"))
    assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_an_mbox_below_a_users_linked_directory_is_refused(tmp_path: Path) -> None:
    """
    ``/home/{user}/Mail/inbox``: a user who makes ``Mail`` a link to another
    user's directory gets ``-ERR [SYS/PERM]``, not the other's mail.
    """
    (tmp_path / "bob" / "Mail").mkdir(parents=True)
    (tmp_path / "bob" / "Mail" / "inbox").write_bytes(b"From x\nSubject: bob's\n\nsecret\n")
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "Mail").symlink_to(tmp_path / "bob" / "Mail")
    store = MboxStore(f"{tmp_path}/{{user}}/Mail/inbox")
    failures: list[BaseException] = []
    store.open("alice").addErrback(lambda failure: failures.append(failure.value))
    [error] = failures
    assert getattr(error, "code", None) is ResponseCode.SYS_PERM


def test_errors_that_need_an_administrator_are_permanent() -> None:
    """RFC 3206 section 4: SYS/PERM for what will not pass by itself, SYS/TEMP otherwise."""
    assert unavailable("x", "/p", OSError(errno.ELOOP, "link")).code is ResponseCode.SYS_PERM
    assert unavailable("x", "/p", OSError(errno.EROFS, "ro")).code is ResponseCode.SYS_PERM
    assert unavailable("x", "/p", PermissionError(errno.EACCES, "no")).code is ResponseCode.SYS_PERM
    assert unavailable("x", "/p", OSError(errno.EIO, "io")).code is ResponseCode.SYS_TEMP


def test_a_short_read_is_the_end_on_local_file_systems_only(tmp_path: Path, directory: int) -> None:
    """
    A directory's file system is found by its device in mountinfo: a short
    read ends a file on a local disk, never on FUSE, 9p, NFS or overlay, nor
    where the device is not listed or mountinfo cannot be read.
    """
    device = os.fstat(directory).st_dev
    here = f"{os.major(device)}:{os.minor(device)}"

    def mounted(*lines: str) -> str:
        path = tmp_path / "mountinfo"
        path.write_text("".join(line + "\n" for line in lines))
        return str(path)

    def entry(device: str, kind: str, optional: str = "shared:1") -> str:
        return f"29 1 {device} / /srv/mail rw,relatime {optional} - {kind} /dev/x rw"

    other = "0:999"
    for kind, expected in [
        ("ext4", True),
        ("xfs", True),
        ("tmpfs", True),
        ("fuse.sshfs", False),
        ("9p", False),
        ("nfs4", False),
        ("overlay", False),
    ]:
        assert short_read_is_end(directory, mounted(entry(here, kind))) is expected, kind
    # Optional fields vary in number (none here): the type follows "-".
    assert short_read_is_end(directory, mounted(entry(here, "ext4", optional="")))
    # Every mount of the device must be local.
    assert not short_read_is_end(
        directory, mounted(entry(here, "ext4"), entry(here, "fuse.mergerfs"))
    )
    assert not short_read_is_end(directory, mounted(entry(other, "ext4")))
    assert not short_read_is_end(directory, mounted("29 1 " + here + " / /x rw -"))
    assert not short_read_is_end(directory, str(tmp_path / "no-such-mountinfo"))
    # The real table: /proc is no disk.
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not short_read_is_end(proc)
    finally:
        os.close(proc)


def test_a_directory_is_reopened_only_if_it_is_still_the_same(tmp_path: Path) -> None:
    """
    A Maildir, a lock's directory or a directory a counting helper reads is
    opened again by path only if it is the one first opened: one moved away
    and replaced (another user's, say) is refused, and no descriptor kept.
    """
    path = tmp_path / "Maildir"
    path.mkdir()
    info = path.stat()
    identity = (info.st_dev, info.st_ino)
    fd = open_same_directory(str(path), identity)
    assert fd is not None
    try:
        assert os.path.samestat(os.fstat(fd), info)
    finally:
        os.close(fd)
    path.rename(tmp_path / "moved")
    path.mkdir()
    before = os.listdir("/proc/self/fd")
    assert open_same_directory(str(path), identity) is None
    assert os.listdir("/proc/self/fd") == before
    path.rmdir()
    path.symlink_to(tmp_path / "moved")
    # Never through a link, even to the very directory (Linux says ENOTDIR
    # for a link opened with O_DIRECTORY and O_NOFOLLOW).
    with pytest.raises(NotADirectoryError):
        open_same_directory(str(path), identity)
