"""
The ``--mail-location`` plug-ins: finding them, and the two pop3d ships
(``maildir:`` and ``mbox:``, declared in ``twisted/plugins/pop3d_plugin.py``
like any other's).  See `pop3d.stores.interfaces.IMailLocationPlugin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Interface, implementedBy, implementer

from pop3d.stores.common import MaildirTemplateError, check_template
from pop3d.stores.interfaces import (
    IMaildropLocks,
    IMaildropStore,
    IMailLocationPlugin,
    MailLocationError,
)
from pop3d.stores.maildir import LISTING_CACHE_MESSAGES, MaildirStore, default_lock_table
from pop3d.stores.mbox import MboxFormat, MboxStore
from pop3d.stores.posix import LockFiles, LockTable
from pop3d.uidl import UIDLFormatError, check_format


def installed_mail_locations() -> list[IMailLocationPlugin]:
    """Every mail location plug-in on the path, by scheme (the first of a scheme wins)."""
    found: dict[str, IMailLocationPlugin] = {}
    for plugin in getPlugins(IMailLocationPlugin):
        found.setdefault(plugin.scheme, plugin)
    return [found[scheme] for scheme in sorted(found)]


def find_mail_location(
    location: str, plugins: Sequence[IMailLocationPlugin]
) -> tuple[IMailLocationPlugin, str]:
    """
    The plug-in of ``plugins`` a ``SCHEME:ARGUMENT`` location names, and the
    ARGUMENT; `MailLocationError` naming the installed schemes if none does.
    """
    scheme, separator, argument = location.partition(":")
    for plugin in plugins:
        if separator and plugin.scheme == scheme:
            return plugin, argument
    schemes = ", ".join(plugin.scheme for plugin in plugins)
    raise MailLocationError(
        f"{location!r}: expected SCHEME:ARGUMENT, SCHEME one of the installed stores: {schemes}"
    )


def checked_template(argument: str) -> str:
    """A path template argument, or `MailLocationError` naming --mail-location."""
    try:
        check_template(argument)
    except MaildirTemplateError as error:
        raise MailLocationError(f"--mail-location: {error}") from error
    return argument


def _interfaces_of(store: type) -> tuple[type[Interface], ...]:
    """The interfaces a store class declares (`IRetrievalTimesStore`...)."""
    return tuple(implementedBy(store))  # type: ignore[no-untyped-call]


@implementer(IPlugin, IMailLocationPlugin)
class MaildirLocation:
    """``maildir:PATH``: one Maildir per user (`MaildirStore`)."""

    scheme = "maildir"
    help = (
        "Maildirs (options: --lock-table, --nfs-locks, --uidl-format, --reuse-x-uidl, "
        "--listing-cache, --counting-processes)"
    )
    argument_help = "PATH with {user}, {local} or {domain}, e.g. maildir:/srv/mail/{user}"
    store_interfaces = _interfaces_of(MaildirStore)

    def check(self, argument: str, options: Mapping[str, object]) -> None:
        checked_template(argument)
        if options.get("mbox-format") is not None:
            raise MailLocationError(
                "--mbox-format applies to mbox files (--mail-location mbox:PATH), not Maildirs"
            )
        uidl_format = options.get("uidl-format")
        if uidl_format is not None:
            try:
                check_format(str(uidl_format))
            except UIDLFormatError as error:
                raise MailLocationError(f"--uidl-format: {error}") from None
        if options.get("nfs-locks") and options.get("lock-table"):
            raise MailLocationError("--nfs-locks and --lock-table exclude each other")

    def make(
        self,
        argument: str,
        options: Mapping[str, Any],
        threads: IReactorThreads,
        clock: IReactorTime,
    ) -> IMaildropStore:
        locks: IMaildropLocks = (
            LockFiles(clock, threads=threads)
            if options.get("nfs-locks")
            else LockTable(options.get("lock-table") or default_lock_table(argument))
        )
        return MaildirStore(
            argument,
            reactor=threads,
            uidl_format=options.get("uidl-format"),
            reuse_x_uidl=bool(options.get("reuse-x-uidl")),
            listing_cache=int(options.get("listing-cache", LISTING_CACHE_MESSAGES)),
            locks=locks,
            counting=options.get("counting"),
        )


@implementer(IPlugin, IMailLocationPlugin)
class MboxLocation:
    """``mbox:PATH``: one mbox file per user (`MboxStore`)."""

    scheme = "mbox"
    help = "mbox files, locked with dotlocks (option: --mbox-format)"
    argument_help = "PATH with {user}, {local} or {domain}, e.g. mbox:/var/mail/{user}"
    store_interfaces = _interfaces_of(MboxStore)

    def check(self, argument: str, options: Mapping[str, object]) -> None:
        checked_template(argument)
        if options.get("uidl-format") is not None:
            raise MailLocationError(
                "--uidl-format applies to Maildirs; mbox UIDLs reuse X-UIDL headers"
            )
        if options.get("nfs-locks") or options.get("lock-table"):
            raise MailLocationError(
                "--nfs-locks and --lock-table apply to Maildirs; mbox files have dotlocks"
            )
        self._format(options)

    def make(
        self,
        argument: str,
        options: Mapping[str, Any],
        threads: IReactorThreads,
        clock: IReactorTime,
    ) -> IMaildropStore:
        return MboxStore(argument, reactor=threads, clock=clock, format=self._format(options))

    @staticmethod
    def _format(options: Mapping[str, object]) -> MboxFormat:
        """The --mbox-format value (mboxo by default)."""
        value = options.get("mbox-format")
        if value is None:
            return MboxFormat.MBOXO
        try:
            return MboxFormat(value)
        except ValueError:
            choices = " or ".join(kind.value for kind in MboxFormat)
            raise MailLocationError(f"--mbox-format {value!r}: expected {choices}") from None


class MailLocations:
    """
    The stores of per-user mail locations (a user database's ``mail``
    field, `pop3d.realm.user_mail_location`): each made once by the
    installed plug-in of its scheme, with the server's store options, and
    kept for the next login (at most ``max_stores``, the least recently used
    dropped first).

    Maildirs opened through a per-user location lock in the server's lock
    table (or with lock files under ``--nfs-locks``), as every other
    Maildir it serves: one user, one lock, wherever their mail is.
    """

    def __init__(
        self,
        plugins: list[IMailLocationPlugin],
        options: Mapping[str, Any],
        threads: IReactorThreads,
        clock: IReactorTime,
        *,
        default_template: str,
        max_stores: int = 1024,
    ) -> None:
        self._plugins = plugins
        shared = dict(options)
        if not shared.get("nfs-locks") and not shared.get("lock-table"):
            shared["lock-table"] = default_lock_table(default_template)
        self._options = shared
        self._threads = threads
        self._clock = clock
        self._max_stores = max_stores
        self._stores: dict[str, IMaildropStore] = {}

    def __call__(self, location: str) -> IMaildropStore:
        """The store of ``location`` (``SCHEME:PATH``), or `MailLocationError`."""
        store = self._stores.pop(location, None)
        if store is None:
            plugin, argument = find_mail_location(location, self._plugins)
            # The location alone: the server's options were checked against
            # its own location at start-up.  A user's location takes those
            # that apply to it (a Maildir, the lock table) and ignores the
            # rest, which are not its to refuse (an mbox, --nfs-locks).
            plugin.check(argument, {})
            store = plugin.make(argument, self._options, self._threads, self._clock)
            if len(self._stores) >= self._max_stores:
                del self._stores[next(iter(self._stores))]
        self._stores[location] = store
        return store
