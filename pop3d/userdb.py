"""
What a user database tells pop3d about a user besides "the password is
right": the canonical name, the networks the user may log in from, and the
per-user settings (home, mail location, login delay, expiry) that Dovecot
calls userdb fields.

A checker that knows more than the name returns an `AuthenticatedUser` as
its avatar id; one that can look users up also provides `IUserDatabase`.
The realm (`pop3d.realm.MaildropRealm`) applies both.  The session's
connection is described to checkers and the realm by a `LoginContext`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from pop3d.addresses import IPNetwork, in_networks
from pop3d.errors import LoginRefused


@dataclass(frozen=True)
class LoginContext:
    """The connection a login comes over (Dovecot's ``%r``, ``%l``, ``%c``, ``%s``)."""

    #: The client's address (behind a PROXY-protocol proxy, the real one).
    remote_ip: str | None
    local_ip: str | None
    #: TLS is in use, or the client is on this machine.
    secured: bool
    service: str = "pop3"


def login_context_of(credentials: object) -> LoginContext | None:
    """
    The `LoginContext` the server attached to ``credentials`` (see
    `attach_login_context`), or None when there is none (credentials made by
    a test or an embedding application).
    """
    context = getattr(credentials, "login_context", None)
    return context if isinstance(context, LoginContext) else None


def attach_login_context(credentials: object, context: LoginContext) -> None:
    """
    Let checkers see where a login comes from.  Credentials that take no
    new attribute (``__slots__``) are left alone: their checkers get None.
    """
    try:
        credentials.login_context = context  # type: ignore[attr-defined]
    except AttributeError:
        pass


class UserFieldError(ValueError):
    """A user database returned a field value pop3d cannot use."""


@dataclass(frozen=True)
class UserSettings:
    """
    Per-user settings from a user database; None means "not set here": the
    server's own option applies.
    """

    #: The user's home directory (``~`` in `mail`).
    home: str | None = None
    #: A ``--mail-location`` for this user (``maildir:~/Maildir``).
    mail: str | None = None
    #: RFC 2449 LOGIN-DELAY in seconds for this user.
    login_delay: int | None = None
    #: ``--expire`` for this user in days (0: at QUIT) ...
    expire_days: int | None = None
    #: ... or never (``expire = never``).
    expire_never: bool = False

    @classmethod
    def from_fields(cls, values: Mapping[str, str | None], source: str) -> UserSettings:
        """
        Read Dovecot's field names ``home`` and ``mail`` and pop3d's
        ``login_delay`` and ``expire`` (``0``, days, or ``never``); other
        fields are ignored, empty (NULL) values are not set.  ``source``
        names the database in errors.
        """
        found = {name.lower(): value for name, value in values.items() if value not in (None, "")}
        settings: dict[str, Any] = {}
        if "home" in found:
            settings["home"] = found["home"]
        if "mail" in found:
            settings["mail"] = found["mail"]
        if "login_delay" in found:
            settings["login_delay"] = _whole_number(found["login_delay"], "login_delay", source)
        if "expire" in found:
            if str(found["expire"]).strip().lower() == "never":
                settings["expire_never"] = True
            else:
                settings["expire_days"] = _whole_number(found["expire"], "expire", source)
        return cls(**settings)

    def merged(self, other: UserSettings) -> UserSettings:
        """These settings with every field ``other`` sets taken from it."""
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) not in (None, False)
        }
        if changes.get("expire_never"):
            changes["expire_days"] = None
        elif changes.get("expire_days") is not None:
            changes["expire_never"] = False
        return replace(self, **changes)


def _whole_number(value: object, name: str, source: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserFieldError(f"{source}: {name} {value!r} is not a whole number") from None
    if number < 0:
        raise UserFieldError(f"{source}: {name} {value!r} is negative")
    return number


@dataclass(frozen=True)
class AuthenticatedUser:
    """
    An avatar id that says more than the name: what a checker backed by a
    user database (SQL, LDAP, OAuth2) returns.
    """

    #: The canonical name (Dovecot's ``user`` field): the maildrop's name.
    name: str
    #: Settings the checker already fetched (Dovecot's ``userdb_*`` fields).
    settings: UserSettings = field(default_factory=UserSettings)
    #: Dovecot's ``allow_nets``: the login is refused from anywhere else.
    allowed_networks: tuple[IPNetwork, ...] | None = None

    def allows(self, context: LoginContext | None) -> bool:
        """Whether a login over ``context`` may proceed."""
        if self.allowed_networks is None:
            return True
        return context is not None and in_networks(context.remote_ip, self.allowed_networks)


def parse_allow_nets(text: str) -> tuple[IPNetwork, ...]:
    """
    Dovecot's ``allow_nets`` value: addresses and networks separated by
    commas or spaces (``127.0.0.1, 192.168.0.0/16 ::1``).
    """
    networks: list[IPNetwork] = []
    for item in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UserFieldError(f"allow_nets: {item!r} is not an address or network") from None
    return tuple(networks)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
#: The fields that change the user's name: empty, they leave it as it is.
_NAME_FIELDS = frozenset({"user", "username", "domain"})


def passdb_user(user: str, fields: Mapping[str, str | None], source: str) -> AuthenticatedUser:
    """
    Who logs in as ``user``, whose password was verified, as the extra
    fields of a password database (SQL, LDAP) say; Dovecot's field names, in
    any case.  A None value (SQL's NULL) is not set; an empty one is, as in
    Dovecot (an empty ``nologin`` refuses, an empty ``allow_nets`` allows no
    network), but for the names, which it cannot change:

    - ``user``, or ``username`` and ``domain``: the canonical name;
    - ``nologin``: the login is refused (`pop3d.errors.LoginRefused`) with
      ``reason`` as the reply's text; without a reason, with the reply to a
      wrong password (Dovecot answers its "Authentication failed." then too);
    - ``allow_nets``: the networks the user may log in from;
    - ``userdb_*``: per-user settings (`UserSettings`), prefetched.

    A value pop3d cannot use (a network, a number) raises `UserFieldError`
    naming ``source``: the entry is the administrator's to mend.
    """
    name = user
    extra: dict[str, str] = {}
    prefetched: dict[str, str] = {}
    for key, value in fields.items():
        key = key.lower()
        if value is None or (not value and key in _NAME_FIELDS):
            continue
        # In the order given, as Dovecot applies them.
        if key == "user":
            name = value
        elif key == "username":
            _, at, domain = name.partition("@")
            name = value if "@" in value or not at else f"{value}@{domain}"
        elif key == "domain":
            name = name.partition("@")[0] + f"@{value}"
        elif key.startswith("userdb_"):
            prefetched[key.removeprefix("userdb_")] = value
        else:
            extra[key] = value
    if "nologin" in extra:
        reason = _UNPRINTABLE.sub(" ", extra.get("reason", "")).strip()
        raise LoginRefused(reason or None)
    try:
        networks = parse_allow_nets(extra["allow_nets"]) if "allow_nets" in extra else None
    except UserFieldError as error:
        raise UserFieldError(f"{source}: {error}") from None
    return AuthenticatedUser(name, UserSettings.from_fields(prefetched, source), networks)


class IUserDatabase(Interface):
    """
    An add-on a credentials checker may provide: it looks users up, as
    Dovecot's userdb does, after their password was verified.
    """

    def lookup(user: str, context: LoginContext | None) -> Deferred[UserSettings | None]:
        """
        The settings of ``user`` (the canonical name): a Deferred that fires
        with `UserSettings`, or None if the database does not know the user
        (the login then fails as a wrong password does).  A database that
        cannot answer fails it with `pop3d.errors.AuthUnavailable`.
        """


class IUserSettingsSource(Interface):
    """
    A marker a credentials checker provides when the avatar ids it returns
    may carry per-user settings (`AuthenticatedUser.settings`, Dovecot's
    ``userdb_*`` prefetch) without a separate `IUserDatabase`: the server
    then announces per-user LOGIN-DELAY and EXPIRE (RFC 2449 "USER").
    """


class IUserMaildrop(Interface):
    """
    The avatar `pop3d.realm.MaildropRealm` gives when asked for it: a
    maildrop with the user it belongs to and their settings.
    """

    maildrop = Attribute("The opened, locked `pop3d.stores.interfaces.IMaildrop`.")
    user = Attribute("The canonical user name (str).")
    settings = Attribute("The user's `UserSettings`.")


@implementer(IUserMaildrop)
@dataclass(frozen=True)
class UserMaildrop:
    """The `IUserMaildrop` a realm returns."""

    maildrop: Any
    user: str
    settings: UserSettings
