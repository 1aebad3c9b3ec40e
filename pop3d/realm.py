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

from pop3d.dovecotvars import VariableError, Variables, expand
from pop3d.errors import MaildropUnavailable
from pop3d.stores.interfaces import (
    IClosesAtOnce,
    IMaildrop,
    IMaildropStore,
    IOpensAtOnce,
    MailLocationError,
)
from pop3d.userdb import (
    AuthenticatedUser,
    IUserDatabase,
    IUserMaildrop,
    LoginContext,
    UserMaildrop,
    UserSettings,
)

log = Logger()

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
    if name.isascii() and name.isprintable():
        # Letters, digits, punctuation, symbols and the space: none unsafe.
        return True
    return all(unicodedata.category(c) not in _UNSAFE_CATEGORIES for c in name)


def mailbox_name(avatar_id: bytes | str) -> str | None:
    """The text form of an avatar id, or None if it is not a safe name."""
    if isinstance(avatar_id, bytes):
        try:
            avatar_id = avatar_id.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return avatar_id if is_safe_mailbox_name(avatar_id) else None


#: What a realm gives a login (``IRealm.requestAvatar``): the avatar's
#: interface, the avatar, its logout.
Avatar = tuple[type[Interface], object, Callable[[], None]]


def _nothing() -> None:
    pass


#: The settings of a user no database gave any (nearly every login): made
#: once, not a frozen dataclass of five fields per login.
_NO_SETTINGS = UserSettings()


@implementer(IRealm)
class MaildropRealm:
    """
    Opens the maildrop of an authenticated user in a store.

    An avatar id that is not a safe mailbox name fails the login exactly as a
    wrong password does, so it is never used as a path and never tells the
    client anything.

    A checker backed by a user database gives an
    `pop3d.userdb.AuthenticatedUser`: its networks are checked against the
    login's `pop3d.userdb.LoginContext` (the ``mind``), its settings are
    completed by ``userdb`` (`pop3d.userdb.IUserDatabase`, Dovecot's
    ``user_query``), and a per-user ``mail`` location is opened in the store
    ``locations`` makes for it instead of ``store``.  Asked for
    `pop3d.userdb.IUserMaildrop` first, the realm gives the maildrop with its
    user and settings (the driver applies a per-user ``expire``).
    """

    def __init__(
        self,
        store: IMaildropStore,
        *,
        userdb: IUserDatabase | None = None,
        locations: Callable[[str], IMaildropStore] | None = None,
    ) -> None:
        self.store = store
        self.userdb = userdb
        self.locations = locations

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> Avatar | Deferred[Avatar]:
        # The avatar itself when the store opened the maildrop at once
        # (`IOpensAtOnce`: nearly every login), as IRealm allows.
        wanted = [i for i in interfaces if i in (IUserMaildrop, IMaildrop)]
        if not wanted:
            raise NotImplementedError("MaildropRealm provides IUserMaildrop and IMaildrop")
        user = avatarId if isinstance(avatarId, AuthenticatedUser) else None
        name = mailbox_name(user.name if user is not None else avatarId)
        if name is None:
            raise UnauthorizedLogin()
        context = mind if isinstance(mind, LoginContext) else None
        if user is not None and not user.allows(context):
            log.info(
                "login of {user} refused: {rip} is not in its allow_nets",
                user=name,
                rip=context.remote_ip if context is not None else None,
            )
            raise UnauthorizedLogin()
        prefetched = user.settings if user is not None else _NO_SETTINGS
        if self.userdb is None:
            # Most servers: no user database to ask, the maildrop is opened now.
            return self._open(name, prefetched, wanted[0])
        settings = self.userdb.lookup(name, context).addCallback(_completed, prefetched, name)
        return settings.addCallback(lambda found: self._open(name, found, wanted[0]))

    def _open(self, name: str, settings: UserSettings, wanted: Any) -> Avatar | Deferred[Avatar]:
        store = self._store_for(name, settings)
        opened: IMaildrop | Deferred[IMaildrop]
        if IOpensAtOnce.providedBy(store):
            # Its failure raised here is the login's, as a failed Deferred's is.
            opened = store.open_at_once(name)
            if not isinstance(opened, Deferred):
                return _avatar(opened, name, settings, wanted)
        else:
            opened = maybeDeferred(store.open, name)
        return opened.addCallback(_avatar, name, settings, wanted)

    def _store_for(self, name: str, settings: UserSettings) -> IMaildropStore:
        if settings.mail is None:
            return self.store
        if self.locations is None:
            raise MaildropUnavailable("this server has no per-user mail locations", permanent=True)
        try:
            location = user_mail_location(settings.mail, name, settings.home)
            return self.locations(location)
        except (MailLocationError, VariableError) as error:
            log.error(
                "mail location {location!r} of {user} cannot be used: {error}",
                location=settings.mail,
                user=name,
                error=str(error),
            )
            raise MaildropUnavailable(
                "the mail location of this user is misconfigured", permanent=True
            ) from None


def _avatar(maildrop: IMaildrop, name: str, settings: UserSettings, wanted: Any) -> Avatar:
    # The maildrop's close() releases it; cred's logout has nothing to do.
    if wanted is IUserMaildrop:
        return (IUserMaildrop, UserMaildrop(maildrop, name, settings), _nothing)
    return (IMaildrop, maildrop, _nothing)


def _completed(found: UserSettings | None, prefetched: UserSettings, name: str) -> UserSettings:
    """The userdb's answer over what the checker prefetched; no answer: no login."""
    if found is None:
        log.info("login of {user} refused: not in the user database", user=name)
        raise UnauthorizedLogin()
    return prefetched.merged(found)


def user_mail_location(location: str, user: str, home: str | None) -> str:
    """
    A Dovecot ``mail`` field made into a ``--mail-location``: ``~`` is the
    home, Dovecot's variables (``%u``, ``%n``, ``%d``, ``%h``) are the
    user's, and Dovecot's ``:KEY=VALUE`` options after the path (``INDEX``,
    ``LAYOUT``...) are dropped: pop3d keeps no index.
    """
    scheme, separator, rest = location.partition(":")
    if not separator:
        raise MailLocationError(f"expected SCHEME:PATH, got {location!r}")
    path = rest.split(":", 1)[0]
    # Variables first, in the template as configured (parsed once for every
    # user), then the user's home, which is no template.
    tilde = path.startswith("~")
    path = expand(path[1:] if tilde else path, Variables(user=user, home=home))
    if tilde:
        if not home:
            raise MailLocationError(f"{location!r} starts with '~' but the user has no home")
        path = home.rstrip("/") + path
    return f"{scheme}:{path}"


def release(maildrop: IMaildrop | None, logout: Callable[[], None] | None, log: Logger) -> None:
    """
    Give back what a login took: close the maildrop (which unlocks it; a
    failure goes to ``log``, there is no one left to tell) and log the
    avatar out.
    """
    if maildrop is not None and IClosesAtOnce.providedBy(maildrop):
        try:
            maildrop.close_at_once()
        except Exception:
            log.failure("releasing maildrop failed")
    elif maildrop is not None:
        maybeDeferred(maildrop.close).addErrback(
            lambda failure: log.failure("releasing maildrop failed", failure)
        )
    if logout is not None:
        logout()
