"""
The cred realm: an authenticated avatar id becomes a locked maildrop.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from pop3d.stores.interfaces import IMaildrop, IMaildropStore

MAX_MAILBOX_NAME_OCTETS = 255

# Control characters (C0 and C1), line and paragraph separators, surrogates;
# format characters (the invisible and direction-changing ones: U+200B,
# U+202E), private-use and unassigned characters: nothing that could break a
# path, a log line or a terminal, or show one name as another.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn"})


def is_safe_mailbox_name(name: str) -> bool:
    """
    Whether a user name may be used to find a maildrop.

    Names are substituted into paths, so anything that could leave the
    configured root is refused: path separators, ``.``/``..``, NUL and other
    control characters (ASCII's and Unicode's), and names longer than 255
    octets.  Other UTF-8 names are safe (RFC 6856 section 2.2).
    """
    encoded = name.encode("utf-8", "surrogateescape")
    if not 0 < len(encoded) <= MAX_MAILBOX_NAME_OCTETS:
        return False
    if name in (".", "..") or name.startswith("."):
        return False
    if "/" in name or "\\" in name or ".." in name:
        return False
    return all(unicodedata.category(c) not in _UNSAFE_CATEGORIES for c in name)


def mailbox_name(avatar_id: bytes | str) -> str | None:
    """The text form of an avatar id, or None if it is not a safe name."""
    if isinstance(avatar_id, bytes):
        try:
            avatar_id = avatar_id.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return avatar_id if is_safe_mailbox_name(avatar_id) else None


def _nothing() -> None:
    pass


@implementer(IRealm)
class MaildropRealm:
    """
    Opens the maildrop of an authenticated user in a store.

    An avatar id that is not a safe mailbox name fails the login exactly as a
    wrong password does, so it is never used as a path and never tells the
    client anything.
    """

    def __init__(self, store: IMaildropStore) -> None:
        self.store = store

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> Deferred[tuple[type[Interface], object, Callable[[], None]]]:
        if IMaildrop not in interfaces:
            raise NotImplementedError("MaildropRealm only provides IMaildrop")
        name = mailbox_name(avatarId)
        if name is None:
            raise UnauthorizedLogin()
        opened: Deferred[IMaildrop] = maybeDeferred(self.store.open, name)

        def avatar(maildrop: IMaildrop) -> tuple[type[Interface], object, Callable[[], None]]:
            # The maildrop's close() releases it; cred's logout has nothing to do.
            return (IMaildrop, maildrop, _nothing)

        return opened.addCallback(avatar)


def release(maildrop: IMaildrop | None, logout: Callable[[], None] | None, log: Logger) -> None:
    """
    Give back what a login took: close the maildrop (which unlocks it; a
    failure goes to ``log``, there is no one left to tell) and log the
    avatar out.
    """
    if maildrop is not None:
        maybeDeferred(maildrop.close).addErrback(
            lambda failure: log.failure("releasing maildrop failed", failure)
        )
    if logout is not None:
        logout()
