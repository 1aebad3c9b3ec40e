"""
Exclusive maildrop locks that hold across processes (RFC 1939 section 8:
a maildrop is served to one session at a time).
"""

from __future__ import annotations

import errno
import fcntl
import os

from pop3d.errors import MaildropLocked, MaildropUnavailable


class MaildropLock:
    """
    An ``flock`` on a lock file, held through its own open file description.

    Because the kernel ties the lock to the open file, two sessions conflict
    whether they run in one process or in two, and the lock vanishes with a
    process that dies, however it dies: a stale lock cannot outlive its
    holder.  The lock file itself is never removed (removing a lock file that
    another process may be about to lock would let two holders in).
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: str, *, dir_fd: int | None = None) -> MaildropLock:
        """
        Take the lock at ``path`` (relative to ``dir_fd`` if given) without
        waiting.  Raises `MaildropLocked` if it is held, `MaildropUnavailable`
        if the lock file cannot be opened (or is a symbolic link).
        """
        # O_NONBLOCK: a FIFO put there by the Maildir's owner must not block.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600, dir_fd=dir_fd)
        except OSError as error:
            permanent = isinstance(error, PermissionError) or error.errno == errno.ELOOP
            raise MaildropUnavailable(
                "cannot create the maildrop lock file", permanent=permanent
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MaildropLocked() from error
            raise MaildropUnavailable("cannot lock the maildrop") from error
        return cls(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock; releasing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing the only descriptor of the open file releases the flock.
            os.close(fd)
