"""
The file mechanics the local-file stores share, each written once:

- opening without surprises: `DIRECTORY_FLAGS`, `READ_FLAGS` and
  `CREATE_FLAGS` never follow a symbolic link (``O_NOFOLLOW``), never block
  on a FIFO planted as a file, never leak a descriptor to a child;
  `open_directory` follows no link below the part of a path the
  administrator chose; `open_same_directory` opens a directory again only
  if it is still the one first opened; `read_small_file`; `unlink_quietly`;
- `unavailable`, the one mapping of an `OSError` to the error a client sees;
- `PROCESS_LOCKS`, the one registry of the maildrops this process holds
  (``fcntl`` locks never conflict within one process);
- `DotLock`, the one lock file created with ``O_CREAT|O_EXCL``: the mbox
  dotlock ``FILE.lock`` and the Maildir lock file ``pop3d.lock``;
- the two kinds of Maildir locks (RFC 1939 section 4: a maildrop is served
  to one session at a time, across processes), described below.

`LockTable`, the default: every maildrop lock of a process is a one-byte
``fcntl`` write lock in one lock file shared by all servers of the host, at
an offset derived from the Maildir's device and inode.  A lock costs one
system call and no descriptor of its own, so an idle session holds only its
socket; the kernel releases the locks of a process that dies, however it
dies.  Every server of a Maildir tree must use the same lock file.

`LockFiles`, for Maildirs shared by several machines over NFS (where fcntl
locks depend on the lock daemon): a lock is a `DotLock` in the Maildir
(atomic on local file systems and on NFSv3 and later), naming its holder:
host name, process id and an incarnation token (boot id and process start
time), so that a lock left by a process that has died, on this machine, is
known for stale at once, even when its process id has been given to a new
process since.  A lock of another machine is stale when it has not been
refreshed for `LOCK_STALE_SECONDS`; holders refresh theirs every
`LOCK_REFRESH_SECONDS`.  Creating and removing a file costs more than an
fcntl lock (on the benchmark machine, about 0.1 ms per login).

A stale `DotLock` is never removed by name: between judging it stale and
removing it, another server may have broken it too and made its own, which
removing by name would take away.  It is renamed aside, checked to be the
file judged stale, and only then removed (or put back).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from pop3d.errors import MaildropLocked, MaildropUnavailable
from pop3d.stores.common import run_blocking
from pop3d.stores.interfaces import IMaildropLocks

#: A lock whose file has not been touched for this long is taken for the
#: leftover of a holder that is gone (between Postfix's 500 seconds and
#: procmail's 1024, like the mbox dotlock).
LOCK_STALE_SECONDS = 10 * 60
#: How often held locks are touched; well under `LOCK_STALE_SECONDS`.
LOCK_REFRESH_SECONDS = 60
#: `LockFiles`' lock file in the root of every locked Maildir.  No leading
#: dot: Maildir++ treats dot-names in the root as folders.
LOCK_FILE_NAME = "pop3d.lock"

#: What every open of a file in a maildrop adds: never follow a symbolic
#: link, never block on (or take as a terminal) a FIFO or a device planted
#: where a file should be (it is refused right after), never leak the
#: descriptor to a child process.
SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: A directory of a maildrop, for use as ``dir_fd``.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A file read.
READ_FLAGS = os.O_RDONLY | SAFE_OPEN
#: A file read by the server for itself (a message's size counted), not for
#: a client: its access time is left alone.  Linux grants ``O_NOATIME`` to
#: the file's owner and to root only (anyone else gets EPERM: open with
#: `READ_FLAGS` then).  Without it, the first read of a file delivered or
#: renamed since it was last read writes its inode (relatime): about half
#: the kernel's time of counting a large Maildir (issue 14).
UNSEEN_READ_FLAGS = READ_FLAGS | getattr(os, "O_NOATIME", 0)
#: A new file of the server's, created or not at all (add the access mode).
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | SAFE_OPEN

log = Logger()


@dataclass(frozen=True)
class LockOwner:
    """
    Who holds a lock, as written in its file: ``HOST PID INCARNATION LOCKID``
    (the lock id tells one lock of a process from the next).
    """

    host: str
    pid: int
    incarnation: str

    def line(self, lock_id: str = "-") -> bytes:
        text = f"{self.host} {self.pid} {self.incarnation} {lock_id}\n"
        return text.encode("utf-8", "surrogateescape")

    @classmethod
    def parse(cls, text: bytes) -> LockOwner | None:
        """The owner named on the last line (a PID may come first: `DotLock`)."""
        lines = text.splitlines()
        fields = (lines[-1] if lines else b"").decode("utf-8", "surrogateescape").split()
        if len(fields) not in (3, 4) or not (fields[1].isascii() and fields[1].isdigit()):
            return None
        return cls(fields[0], int(fields[1]), fields[2])

    def is_gone(self) -> bool:
        """
        True only when this owner is known to be dead: it ran on this host,
        in this boot and this process-id namespace, and its process (this
        incarnation of its pid) no longer exists.  Anything else (another
        host, a container sharing the host name, a /proc that hides
        processes) is left to the stale timeout.
        """
        here = this_process()
        if self.host != here.host or self.incarnation == "-" or here.incarnation == "-":
            return False
        if self.incarnation.rpartition(":")[0] != here.incarnation.rpartition(":")[0]:
            return False
        now = _incarnation(self.pid)
        # No such process, or a later one that was given its pid.
        return now == _GONE or (now != "-" and now != self.incarnation)


_GONE = "gone"


@lru_cache(maxsize=1)
def _this_boot() -> str | None:
    """The boot id and process-id namespace of this process, or None."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            boot = file.read().strip().replace("-", "")
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{namespace}"


def _incarnation(pid: int) -> str:
    """
    ``BOOTID:PIDNS:STARTTIME`` of a process of this namespace, `_GONE` if
    there is no such process, or "-" when it cannot be known.
    """
    boot = _this_boot()
    if boot is None:
        return "-"
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat_line = file.read()
    except FileNotFoundError:
        return _GONE
    except OSError:
        return "-"
    # The command name (field 2) may hold spaces and parentheses.
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    return f"{boot}:{fields[19].decode('ascii')}"


_current: LockOwner | None = None


def this_process() -> LockOwner:
    """The owner this process writes into its locks (recomputed after fork)."""
    global _current
    pid = os.getpid()
    if _current is None or _current.pid != pid:
        _current = LockOwner(socket.gethostname() or "localhost", pid, _incarnation(pid))
    return _current


# -- opening, reading, removing --------------------------------------------------


def open_directory(path: str, *, trusted: str = "") -> int:
    """
    A descriptor of the directory ``path`` (for ``dir_fd``), following no
    symbolic link below ``trusted``: the part of the path that the
    administrator chose (``/var/mail``, which may be a link), of which
    ``path`` is ``trusted`` itself or a descendant.  Without ``trusted``, only
    the last component may not be a link.  Raises `OSError` (``ELOOP`` for
    a link).
    """
    trusted = os.path.abspath(trusted) if trusted else ""
    path = os.path.abspath(path)
    if not trusted or not (path == trusted or path.startswith(trusted.rstrip("/") + "/")):
        return os.open(path, DIRECTORY_FLAGS)
    fd = os.open(trusted, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path[len(trusted) :].split("/"):
            if part:
                below = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_file(name: str, dir_fd: int, limit: int = 512) -> bytes | None:
    """
    Up to ``limit`` octets of the file ``name`` in the directory ``dir_fd``
    (a lock file, say), never through a link; None if it cannot be read.
    """
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def open_same_directory(path: str, identity: tuple[int, int]) -> int | None:
    """
    A descriptor of the directory ``path`` (never through a link) if it is
    still the one ``identity`` (device, inode) names; None if another was
    put in its place.  Raises `OSError` if it cannot be opened.
    """
    fd = open_directory(path)
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (info.st_dev, info.st_ino) != identity:
        os.close(fd)
        return None
    return fd


#: File systems on which a read(2) of a regular file returns fewer octets
#: than asked only at the end of the file: local disks and memory.  Not FUSE,
#: 9p, NFS or CIFS (which may return less mid-file), nor overlay (whose
#: lower layers may be any of these).
SHORT_READ_IS_END = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs"})


def short_read_is_end(directory_fd: int, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """
    Whether a read of a regular file of the directory ``directory_fd`` that
    returns fewer octets than asked has reached the end of the file: the
    directory's device is mounted (every mount of it, in ``mountinfo``) as
    one of `SHORT_READ_IS_END`.  False when that cannot be told (no
    ``/proc``, a device not listed, as a Btrfs subvolume's is not).
    """
    try:
        device = os.fstat(directory_fd).st_dev
        wanted = f"{os.major(device)}:{os.minor(device)}"
        with open(mountinfo, "rb") as file:
            lines = file.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return False
    kinds = set()
    for line in lines:
        # ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE ...
        fields = line.split()
        if len(fields) > 7 and fields[2] == wanted and "-" in fields[6:-1]:
            kinds.add(fields[fields.index("-", 6) + 1])
    return bool(kinds) and kinds <= SHORT_READ_IS_END


def unlink_quietly(name: str, dir_fd: int) -> None:
    """Remove ``name`` if it is there; a failure is logged, not raised (cleaning up)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warn("cannot remove {name}: {error}", name=name, error=error)


def unavailable(what: str, path: str, error: OSError) -> MaildropUnavailable:
    """
    The error a client sees for ``error`` while doing ``what`` to ``path``
    (logged here, with the path, which the client is not told):
    ``SYS/PERM`` for what needs an administrator (permissions, a link or a
    file where a directory or a file should be, a read-only file system),
    ``SYS/TEMP`` for what may pass (RFC 3206).
    """
    # ELOOP: a symbolic link where a directory, a message, an mbox or a
    # lock file should be.
    permanent = isinstance(error, (PermissionError, NotADirectoryError, IsADirectoryError)) or (
        error.errno in (errno.ELOOP, errno.EINVAL, errno.EROFS, errno.ENAMETOOLONG)
    )
    log.error("{what} {path}: {error}", what=what, path=path, error=error)
    return MaildropUnavailable(what, permanent=permanent)


# -- what this process holds ------------------------------------------------------


class _KnowsLocksOfThisProcess(Protocol):
    def _forget_after_fork(self) -> None:
        """In a forked child: what it knows of the parent's locks is not the child's."""


#: Every live object that knows what this process holds (held weakly: one
#: store per per-user mail location may come and go).  A forked child makes
#: each forget it once, at the fork, instead of comparing ``os.getpid()``
#: (a system call) at every lock and unlock.
_KNOWING_LOCKS: weakref.WeakSet[_KnowsLocksOfThisProcess] = weakref.WeakSet()


def _forget_locks_after_fork() -> None:
    for knowing in list(_KNOWING_LOCKS):
        knowing._forget_after_fork()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


class ProcessLocks:
    """
    The maildrops this process holds, by any hashable key naming a lock
    (fcntl locks never conflict within one process, so every store that
    relies on them also claims its lock here).  Thread-safe: stores take
    locks in the thread pool.  A forked child starts with none.
    """

    def __init__(self) -> None:
        self._held: set[object] = set()
        self._mutex = threading.Lock()
        _KNOWING_LOCKS.add(self)

    def _forget_after_fork(self) -> None:
        # A new mutex too: a thread of the parent may have held the old one
        # at the fork, and that thread does not exist in the child.
        self._held, self._mutex = set(), threading.Lock()

    def claim(self, key: object) -> None:
        """Record ``key`` as held; `MaildropLocked` if it already is."""
        with self._mutex:
            held = self._held
            if key in held:
                raise MaildropLocked()
            held.add(key)

    def release(self, key: object) -> bool:
        """Forget ``key``; whether it was held (releasing twice is harmless)."""
        with self._mutex:
            held = self._held
            if key not in held:
                return False
            held.discard(key)
            return True

    def release_all(self, belongs: Callable[[object], bool]) -> None:
        """Forget every held key for which ``belongs(key)`` is true."""
        with self._mutex:
            held = self._held
            for key in [key for key in held if belongs(key)]:
                held.discard(key)


#: The one registry of this process (two stores composed over one tree, or
#: two tables on one lock file, share what this process holds).
PROCESS_LOCKS = ProcessLocks()


# -- the dotlock ----------------------------------------------------------------


class DotLock:
    """
    A held lock file ``name``, created with ``O_CREAT|O_EXCL`` and never
    followed.  Its content names this lock: holder and a random lock id
    (inode numbers are reused at once, so only the content tells this lock
    from a later one of the same name).  It is refreshed or removed only
    while the file at its name still has that content.

    Each operation takes a descriptor of the lock's directory, or opens the
    directory again by its path (never through a link) and goes on only if
    it is still the directory the lock was taken in; so a holder needs no
    descriptor between operations.
    """

    def __init__(
        self, directory: str, identity: tuple[int, int], name: str, content: bytes
    ) -> None:
        self.path = os.path.join(directory, name)
        self.content = content
        self._directory = directory
        self._identity = identity
        self._name = name
        self._held = True
        # A refresh runs in the thread pool; a release on the reactor thread
        # waits for it, so that no lock file is touched once released.
        self._using = threading.Lock()

    @classmethod
    def acquire(
        cls,
        name: str,
        *,
        dir_fd: int,
        directory: str,
        stale_seconds: float = LOCK_STALE_SECONDS,
        now: Callable[[], float] = time.time,
        pid_first: bool = False,
        links_are_locks: bool = False,
    ) -> DotLock:
        """
        Create the lock file ``name`` in the directory open as ``dir_fd``
        (whose path is ``directory``), breaking a stale one: one whose
        holder is known to be gone, or not refreshed for ``stale_seconds``
        by ``now``.  With ``pid_first`` the file starts with the holder's
        PID on a line of its own, which liblockfile reads (mbox dotlocks).
        A symbolic link at the name is refused (``SYS/PERM``: in a
        directory of the user's, only the user put it there), or with
        ``links_are_locks`` taken for another program's lock, broken when
        stale (in a mail spool, where other programs lock too).
        Raises `MaildropLocked` if it is held, `MaildropUnavailable` if it
        cannot be created (or something other than a lock file is in the
        way).
        """
        path = os.path.join(directory, name)
        for attempt in range(2):
            try:
                fd = _create(name, dir_fd)
            except FileExistsError:
                if attempt == 0 and _break_if_stale(
                    name, dir_fd, path, stale_seconds, now, links_are_locks
                ):
                    continue
                raise MaildropLocked() from None
            except OSError as error:
                raise unavailable("cannot create the lock file", path, error) from error
            content = _lock_content(pid_first)
            try:
                os.write(fd, content)
                info = os.fstat(dir_fd)
            except BaseException as error:
                os.close(fd)
                unlink_quietly(name, dir_fd)
                if isinstance(error, OSError):
                    raise unavailable("cannot write the lock file", path, error) from error
                raise
            os.close(fd)
            return cls(directory, (info.st_dev, info.st_ino), name, content)
        raise MaildropLocked()

    @contextmanager
    def _place(self, dir_fd: int | None) -> Iterator[int | None]:
        """The lock's directory: ``dir_fd``, or opened again (None if replaced)."""
        if dir_fd is not None:
            yield dir_fd
            return
        fd = open_same_directory(self._directory, self._identity)
        if fd is None:
            log.warn("{path} was replaced; its lock is gone", path=self._directory)
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _is_ours(self, fd: int) -> bool:
        return read_small_file(self._name, fd) == self.content

    def refresh(self, dir_fd: int | None = None) -> None:
        """Tell others this lock is alive (touch its file), if it is still ours."""
        with self._using:
            self._refresh(dir_fd)

    def _refresh(self, dir_fd: int | None) -> None:
        if not self._held:
            return
        try:
            with self._place(dir_fd) as fd:
                if fd is None:
                    return
                if self._is_ours(fd):
                    os.utime(self._name, dir_fd=fd, follow_symlinks=False)
                else:
                    log.warn("the lock {path} was taken from this session", path=self.path)
        except OSError as error:
            log.warn("cannot refresh {path}: {error}", path=self.path, error=error)

    def ensure(self, dir_fd: int | None = None) -> bool:
        """
        Whether the lock is (again) ours, refreshed: another program may have
        broken it as stale.  If nobody holds it now it is taken again.
        """
        if not self._held:
            return False
        try:
            with self._place(dir_fd) as fd:
                if fd is None:
                    return False
                found = read_small_file(self._name, fd)
                if found == self.content:
                    os.utime(self._name, dir_fd=fd, follow_symlinks=False)
                    return True
                if found is not None or exists(self._name, fd):
                    return False
                created = _create(self._name, fd)
                try:
                    os.write(created, self.content)
                finally:
                    os.close(created)
        except OSError as error:
            log.warn("cannot take the lock {path} again: {error}", path=self.path, error=error)
            return False
        log.warn("the lock {path} had been removed by another program", path=self.path)
        return True

    def release(self, dir_fd: int | None = None) -> None:
        """Remove the lock file if it is still ours; releasing twice is harmless."""
        with self._using:
            self._release(dir_fd)

    def _release(self, dir_fd: int | None) -> None:
        if not self._held:
            return
        try:
            with self._place(dir_fd) as fd:
                # Never remove a lock that another program holds now.
                if fd is not None and self._is_ours(fd):
                    os.unlink(self._name, dir_fd=fd)
        except OSError as error:
            log.warn("cannot remove {path}: {error}", path=self.path, error=error)
        finally:
            self._held = False


def _create(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_WRONLY | CREATE_FLAGS, 0o600, dir_fd=dir_fd)


def exists(name: str, dir_fd: int) -> bool:
    """Whether anything (a link too, never followed) is at ``name`` in ``dir_fd``."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _lock_content(pid_first: bool) -> bytes:
    # The lock id tells this lock from a later one in the same file.
    owner = this_process().line(lock_id=os.urandom(8).hex())
    return b"%d\n" % os.getpid() + owner if pid_first else owner


def _break_if_stale(
    name: str,
    dir_fd: int,
    path: str,
    stale_seconds: float,
    now: Callable[[], float],
    links_are_locks: bool,
) -> bool:
    """Remove a lock file left by a holder that is gone; True if removed."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True  # released meanwhile
    except OSError:
        return False
    if not (stat.S_ISREG(found.st_mode) or (links_are_locks and stat.S_ISLNK(found.st_mode))):
        # Not a lock any program made: a link, a directory or a FIFO planted there.
        log.error("{path} is not a lock file", path=path)
        raise MaildropUnavailable("the lock file is not a file", permanent=True)
    content = read_small_file(name, dir_fd)
    owner = LockOwner.parse(content) if content is not None else None
    age = now() - found.st_mtime
    if owner is not None and owner.is_gone():
        reason = f"its process {owner.pid} is gone"
    elif age > stale_seconds:
        reason = f"not refreshed for {age:.0f} seconds"
    else:
        return False
    # Moved aside, then checked: removing it by name could remove a lock
    # that another server made after breaking this one itself.
    aside = f"{name}.stale.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError as error:
        log.warn("cannot remove stale lock {path}: {error}", path=path, error=error)
        return False
    moved = os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
    if (moved.st_dev, moved.st_ino) != (found.st_dev, found.st_ino) or (
        read_small_file(aside, dir_fd) != content
    ):
        # Not the file judged stale: a fresh lock.  Put it back unless yet
        # another one was made meanwhile (then its holder finds it gone).
        try:
            os.link(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            pass
        unlink_quietly(aside, dir_fd)
        return False
    unlink_quietly(aside, dir_fd)
    log.warn("removed stale lock {path}: {reason}", path=path, reason=reason)
    return True


class LockRefresher:
    """
    Touches every held lock each `LOCK_REFRESH_SECONDS` on ``clock``, so that
    servers on other machines do not take them for stale; in the thread pool
    of ``threads`` if given (a refresh is file work, over NFS).  Runs only
    while some lock is held.
    """

    def __init__(
        self,
        clock: IReactorTime | None,
        interval: float = LOCK_REFRESH_SECONDS,
        threads: IReactorThreads | None = None,
    ) -> None:
        self._clock = clock
        self._threads = threads
        self._interval = interval
        self._held: set[DotLock] = set()
        self._loop: LoopingCall | None = None

    def add(self, lock: DotLock) -> None:
        self._held.add(lock)
        if self._clock is not None and self._loop is None:
            self._loop = LoopingCall(self.refresh_all)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=False)

    def discard(self, lock: DotLock) -> None:
        self._held.discard(lock)
        if not self._held and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def refresh_all(self) -> Deferred[None]:
        refreshing = run_blocking(self._threads, _refresh, list(self._held))
        refreshing.addErrback(lambda failure: log.failure("refreshing locks failed", failure))
        return refreshing


def _refresh(locks: list[DotLock]) -> None:
    for lock in locks:
        lock.refresh()


@implementer(IMaildropLocks)
class LockFiles:
    """NFS-safe lock files named ``name`` in each Maildir (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime | None,
        *,
        threads: IReactorThreads | None = None,
        name: str = LOCK_FILE_NAME,
        stale_seconds: float = LOCK_STALE_SECONDS,
    ) -> None:
        self.name = name
        self.stale_seconds = stale_seconds
        self._refresher = LockRefresher(clock, threads=threads)

    def refresh(self) -> Deferred[None]:
        """Touch every held lock now (the clock does it every minute)."""
        return self._refresher.refresh_all()

    def acquire(self, directory: str, dir_fd: int, info: os.stat_result) -> Callable[[], None]:
        lock = DotLock.acquire(
            self.name, dir_fd=dir_fd, directory=directory, stale_seconds=self.stale_seconds
        )
        self._refresher.add(lock)

        def release() -> None:
            self._refresher.discard(lock)
            lock.release()

        return release


@implementer(IMaildropLocks)
class LockTable:
    """
    fcntl byte-range locks in the lock file at ``path`` (see the module
    docstring), each also claimed in `PROCESS_LOCKS` (as the lock file's
    device, inode and the offset): fcntl locks never conflict within one
    process.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._file_id: tuple[int, int] = (0, 0)
        # What the ranges this process locked are released through: a
        # forked child gets its own, so that it never unlocks (nor thinks
        # it holds) its parent's.
        self._holder = object()
        _KNOWING_LOCKS.add(self)

    def _forget_after_fork(self) -> None:
        # The child inherits the descriptor but not the locks: it opens
        # the file again when it first locks.  The inherited descriptor is
        # closed, not leaked: fcntl locks belong to a process, so closing
        # it in the child cannot release the parent's.
        fd, self._fd, self._holder = self._fd, None, object()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _file(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | SAFE_OPEN, 0o600)
            except OSError as error:
                log.error("cannot open the lock file {path}: {error}", path=self.path, error=error)
                raise MaildropUnavailable("cannot open the lock file") from error
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                # Another user's file could hold every maildrop locked.
                os.close(fd)
                log.error("{path} is not a file of this server's user", path=self.path)
                raise MaildropUnavailable("the lock table is not ours", permanent=True)
            # Two tables on one file in one process (two stores composed
            # over one tree) share what this process holds: the key names
            # the file, not the table.
            self._fd, self._file_id = fd, (info.st_dev, info.st_ino)
        return self._fd

    def acquire(self, directory: str, dir_fd: int, info: os.stat_result) -> Callable[[], None]:
        digest = hashlib.blake2b(b"%d:%d" % (info.st_dev, info.st_ino), digest_size=8).digest()
        # 62 bits: a positive offset that any off_t holds.
        offset = int.from_bytes(digest, "big") >> 2
        fd = self._file()
        key = ("lock table", *self._file_id, offset)
        PROCESS_LOCKS.claim(key)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as error:
            PROCESS_LOCKS.release(key)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise MaildropLocked() from None
            raise MaildropUnavailable("cannot lock the maildrop") from error
        return _HeldRange(self, offset, self._holder)

    def _release(self, offset: int, holder: object) -> None:
        if holder is not self._holder or self._fd is None:
            return
        if not PROCESS_LOCKS.release(("lock table", *self._file_id, offset)):
            return
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
        except OSError as error:
            log.warn("cannot unlock {path}: {error}", path=self.path, error=error)

    def close(self) -> None:
        """
        Release every lock this process holds in the file, through any table
        (closing a descriptor drops them all: fcntl's rule); for shutdown.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            file_id = self._file_id
            PROCESS_LOCKS.release_all(
                lambda key: isinstance(key, tuple) and key[:3] == ("lock table", *file_id)
            )
            os.close(fd)


class _HeldRange:
    """Releases one lock of a `LockTable` (small: one per idle session)."""

    __slots__ = ("_holder", "_offset", "_table")

    def __init__(self, table: LockTable, offset: int, holder: object) -> None:
        self._table: LockTable | None = table
        self._offset = offset
        self._holder = holder

    def __call__(self) -> None:
        # Twice is harmless: the offset may since be another session's.
        table, self._table = self._table, None
        if table is not None:
            table._release(self._offset, self._holder)
