"""
Maildrop locks that hold across processes (RFC 1939 section 8: a maildrop is
served to one session at a time), in two kinds.

`LockTable`, the default: every maildrop lock of a process is a one-byte
``fcntl`` write lock in one lock file shared by all servers of the host, at
an offset derived from the Maildir's device and inode.  A lock costs one
system call and no descriptor of its own, so an idle session holds only its
socket; the kernel releases the locks of a process that dies, however it
dies.  Every server of a Maildir tree must use the same lock file.

`LockFiles`, for Maildirs shared by several machines over NFS (where fcntl
locks depend on the lock daemon): a lock is a file in the Maildir created
with ``O_CREAT|O_EXCL`` (atomic on local file systems and on NFSv3 and
later), naming its holder: host name, process id and an incarnation token
(boot id and process start time), so that a lock left by a process that
has died, on this machine, is known for stale at once, even when its
process id has been given to a new process since.  A lock of another
machine is stale when it has not been refreshed for `LOCK_STALE_SECONDS`;
holders refresh theirs every `LOCK_REFRESH_SECONDS`.  Creating and removing
a file costs more than an fcntl lock (on the benchmark machine, about
0.1 ms per login).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

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

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

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
        fields = text.decode("utf-8", "surrogateescape").split()
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


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DotLock:
    """
    A held lock file.  Released by removing the file, but only while it is
    still the file this holder created (its content names this lock).  The
    directory is opened again for each operation, never through a symbolic
    link, and must still be the directory the lock was taken in.
    """

    def __init__(
        self, directory: str, identity: tuple[int, int], name: str, content: bytes
    ) -> None:
        self.path = os.path.join(directory, name)
        self._directory = directory
        self._identity = identity
        self._name = name
        self._content: bytes | None = content

    @classmethod
    def acquire(
        cls,
        name: str,
        *,
        dir_fd: int,
        directory: str,
        stale_seconds: float = LOCK_STALE_SECONDS,
        now: Callable[[], float] = time.time,
    ) -> DotLock:
        """
        Create the lock file ``name`` in the directory open as ``dir_fd``
        (whose path is ``directory``), breaking a stale one.  Raises
        `MaildropLocked` if it is held, `MaildropUnavailable` if it cannot
        be created (or something other than a lock file is in the way).
        """
        path = os.path.join(directory, name)
        for attempt in range(2):
            try:
                fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                if attempt == 0 and _break_if_stale(name, dir_fd, path, stale_seconds, now):
                    continue
                raise MaildropLocked() from None
            except OSError as error:
                permanent = isinstance(error, PermissionError) or error.errno in (
                    errno.ELOOP,
                    errno.EROFS,
                )
                raise MaildropUnavailable(
                    "cannot create the maildrop lock file", permanent=permanent
                ) from error
            try:
                # The lock id tells this lock from a later one in the same
                # file (inode numbers are reused at once).
                content = this_process().line(lock_id=os.urandom(8).hex())
                os.write(fd, content)
                info = os.fstat(dir_fd)
            except BaseException as error:
                os.close(fd)
                _unlink_quietly(name, dir_fd)
                if isinstance(error, OSError):
                    raise MaildropUnavailable("cannot write the maildrop lock file") from error
                raise
            os.close(fd)
            return cls(directory, (info.st_dev, info.st_ino), name, content)
        raise MaildropLocked()

    def _if_ours(self, action: Callable[[int], None]) -> None:
        """Do ``action(directory fd)`` if the lock file is still ours."""
        fd = os.open(self._directory, _DIRECTORY_FLAGS)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != self._identity:
                log.warn("{path} was replaced; its lock is gone", path=self._directory)
                return
            if _read_file(self._name, fd) != self._content:
                if self._content is None:
                    return  # released meanwhile (refreshes run in a thread)
                log.warn("maildrop lock {path} was taken from this session", path=self.path)
                return
            action(fd)
        finally:
            os.close(fd)

    def refresh(self) -> None:
        """Tell other machines this lock is alive (touch its file)."""
        if self._content is None:
            return
        try:
            self._if_ours(lambda fd: os.utime(self._name, dir_fd=fd, follow_symlinks=False))
        except OSError as error:
            log.warn("cannot refresh {path}: {error}", path=self.path, error=error)

    def release(self) -> None:
        """Remove the lock file if it is still ours; releasing twice is harmless."""
        if self._content is None:
            return
        try:
            self._if_ours(lambda fd: os.unlink(self._name, dir_fd=fd))
        except OSError as error:
            log.warn("cannot remove {path}: {error}", path=self.path, error=error)
        finally:
            self._content = None


def _break_if_stale(
    name: str, dir_fd: int, path: str, stale_seconds: float, now: Callable[[], float]
) -> bool:
    """Remove a lock file left by a holder that is gone; True if removed."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True  # released meanwhile
    except OSError:
        return False
    if not stat.S_ISREG(found.st_mode):
        # Not a lock any server made: a link or a directory planted there.
        log.error("{path} is not a lock file", path=path)
        raise MaildropUnavailable("the maildrop lock file is not a file", permanent=True)
    content = _read_file(name, dir_fd)
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
    if _read_file(aside, dir_fd) != content:
        # Not the file judged stale: a fresh lock.  Put it back unless yet
        # another one was made meanwhile (then its holder finds it gone).
        try:
            os.link(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            pass
        _unlink_quietly(aside, dir_fd)
        return False
    _unlink_quietly(aside, dir_fd)
    log.warn("removed stale maildrop lock {path}: {reason}", path=path, reason=reason)
    return True


def _read_file(name: str, dir_fd: int) -> bytes | None:
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 512)
    except OSError:
        return None
    finally:
        os.close(fd)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


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

    def acquire(self, directory: str, dir_fd: int) -> Callable[[], None]:
        lock = DotLock.acquire(
            self.name, dir_fd=dir_fd, directory=directory, stale_seconds=self.stale_seconds
        )
        self._refresher.add(lock)

        def release() -> None:
            self._refresher.discard(lock)
            lock.release()

        return release


#: Offsets held by this process, by lock file (device, inode).
_held_in_this_process: dict[tuple[int, int], set[int]] = {}


@implementer(IMaildropLocks)
class LockTable:
    """
    fcntl byte-range locks in the lock file at ``path`` (see the module
    docstring), plus a table of this process's own locks: fcntl locks never
    conflict within one process.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._held: set[int] = set()

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # A forked child inherits the descriptor but not the locks.
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o600)
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
            # over one tree) share what this process holds.
            held = _held_in_this_process.setdefault((info.st_dev, info.st_ino), set())
            self._fd, self._pid, self._held = fd, os.getpid(), held
        return self._fd

    def acquire(self, directory: str, dir_fd: int) -> Callable[[], None]:
        info = os.fstat(dir_fd)
        digest = hashlib.blake2b(b"%d:%d" % (info.st_dev, info.st_ino), digest_size=8).digest()
        # 62 bits: a positive offset that any off_t holds.
        offset = int.from_bytes(digest, "big") >> 2
        fd = self._file()
        if offset in self._held:
            raise MaildropLocked()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise MaildropLocked() from None
            raise MaildropUnavailable("cannot lock the maildrop") from error
        self._held.add(offset)
        return _HeldRange(self, offset, self._pid)

    def _release(self, offset: int, pid: int) -> None:
        if offset not in self._held or pid != os.getpid() or self._fd is None:
            return
        self._held.discard(offset)
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
        self._held.clear()
        if fd is not None:
            os.close(fd)


class _HeldRange:
    """Releases one lock of a `LockTable` (small: one per idle session)."""

    __slots__ = ("_offset", "_pid", "_table")

    def __init__(self, table: LockTable, offset: int, pid: int) -> None:
        self._table: LockTable | None = table
        self._offset = offset
        self._pid = pid

    def __call__(self) -> None:
        # Twice is harmless: the offset may since be another session's.
        table, self._table = self._table, None
        if table is not None:
            table._release(self._offset, self._pid)
