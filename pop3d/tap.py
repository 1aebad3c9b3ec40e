"""
``twistd pop3d``: command-line options and the service they describe.
"""

from __future__ import annotations

import atexit
import gc
import ipaddress
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.cred import strcred
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)
from twisted.logger import ILogObserver, Logger, globalLogPublisher

# Not re-exported by twisted.protocols.haproxy, whose endpoint wrapper needs an
# endpoint; a worker has an inherited socket instead.
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.python import usage
from twisted.python.threadable import isInIOThread

from pop3d.authdb.ldap import LdapChecker
from pop3d.authdb.sql import SQLChecker
from pop3d.checkers import FirstMatchChecker, PasswdFileChecker, accept_wire_bytes
from pop3d.control import (
    ControlError,
    ControlService,
    LocalSessions,
    WorkerSessions,
    prepare_socket_path,
    worker_path,
)
from pop3d.credchecks import most_specific_first
from pop3d.factory import DEFAULT_LOGIN_FAILURE_DELAY, DEFAULT_MECHANISMS, POP3Factory
from pop3d.i18n import BUILTIN_LANGUAGES, ENGLISH, Languages
from pop3d.lifecycle import GracefulStop
from pop3d.logformat import DEFAULT_LOGOUT_FORMAT, LogoutFormat, LogoutFormatError
from pop3d.logindelay import LoginDelayRealm, LoginHistoryFile, default_login_history
from pop3d.metrics import (
    MULTIPROCESS_DIRECTORY,
    Metrics,
    RemoveOnStop,
    TimingRealm,
    forget_process,
    metrics_service,
    workers_registry,
)
from pop3d.protocol import DEFAULT_TIMEOUT
from pop3d.readahead import DEFAULT_LIMIT as DEFAULT_READ_AHEAD_LIMIT
from pop3d.realm import MaildropRealm
from pop3d.reloading import IReloadable
from pop3d.sasl import ICramMD5Credentials, ISASLMechanism, IScramSHA256Credentials
from pop3d.sasl.oauth2 import IOAuth2BearerToken
from pop3d.service import POP3Service
from pop3d.session import SessionPolicy
from pop3d.stores.common import run_blocking
from pop3d.stores.counting import CountingProcesses
from pop3d.stores.interfaces import (
    ICountingStore,
    IMaildropStore,
    IMailLocationPlugin,
    IRetrievalTimesStore,
    MailLocationError,
)
from pop3d.stores.locations import (
    MailLocations,
    find_mail_location,
    installed_mail_locations,
)
from pop3d.stores.maildir import LISTING_CACHE_MESSAGES
from pop3d.throttle import MAXIMUM_DELAY, IPNetwork
from pop3d.tls import ImplicitTLSEndpoint, ServerTLS, TLSConfigurationError, tls_server_factory
from pop3d.userdb import IUserDatabase, IUserSettingsSource
from pop3d.wire import ClientWorkarounds, UnknownWorkaround
from pop3d.workers import (
    AdoptedPorts,
    InheritedSocket,
    SharedLog,
    WorkerLogLines,
    WorkerPool,
    worker_command,
)

log = Logger()

DEFAULT_LISTEN = "tcp:110"


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = (
        "--mail-location maildir:/srv/mail/{user} --auth passwd-file:/etc/pop3d/passwd "
        "[--listen tcp:110] [--timeout SECONDS]"
    )
    longdesc = (
        "Serve POP3 (RFC 1939) from Maildirs or mbox files.  --listen takes any Twisted endpoint "
        "(tcp:, tcp6:, unix:, ssl:, systemd:, haproxy:...) and may be repeated; "
        "--auth takes any twisted.cred checker (passwd-file:, memory:, file:, ...) "
        "and may be repeated."
    )
    supportedInterfaces = (
        IUsernamePassword,
        IUsernameHashedPassword,
        ICramMD5Credentials,
        IScramSHA256Credentials,
        IOAuth2BearerToken,
    )
    optFlags = [
        [
            "reuse-x-uidl",
            None,
            "Serve a Maildir message's X-UIDL header (qpopper and others wrote one) as its UIDL.",
        ],
        [
            "allow-plaintext-auth",
            None,
            "Accept USER/PASS and SASL PLAIN/LOGIN on connections that are neither "
            "TLS nor local (refused by default: RFC 2595 2.3, RFC 8314 4.1).",
        ],
        [
            "nfs-locks",
            None,
            "Lock Maildirs with lock files in them, safe for servers on several "
            "machines sharing the Maildirs over NFS (see docs/scaling.rst).",
        ],
    ]
    optParameters = [
        [
            "mail-location",
            "m",
            None,
            "Where maildrops are: maildir:PATH (Maildirs) or mbox:PATH (mbox "
            "files), where PATH may use {user}, {local} and {domain} (e.g. "
            "maildir:/srv/mail/{user}, mbox:/var/mail/{user}), or SCHEME:ARGUMENT "
            "of an installed store plug-in (see --help-mail-location).",
        ],
        [
            "timeout",
            "t",
            str(DEFAULT_TIMEOUT),
            "Inactivity autologout in seconds; at least 600 (RFC 1939 section 3).",
        ],
        ["hostname", None, None, "Host name in APOP timestamps (default: this host's name)."],
        [
            "uidl-format",
            None,
            None,
            "UIDLs of another server to keep (Dovecot's variables %u %v %f %m, e.g. "
            "%08Xu%08Xv); by default Dovecot's when a dovecot-uidlist is present.",
        ],
        [
            "mbox-format",
            None,
            None,
            "How the mbox files' writers quote body lines starting with 'From ': "
            "mboxo (Postfix local, procmail, mail.local; the default: lines are served "
            "as stored) or mboxrd (one '>' is removed from lines matching ^>+From ).",
        ],
        [
            "lock-table",
            None,
            None,
            "The file that holds this host's Maildir locks; every server of the same "
            "Maildirs must use the same one (default: .pop3d-locks in the directory "
            "above the first {placeholder} of the Maildir path).",
        ],
        [
            "listing-cache",
            None,
            str(LISTING_CACHE_MESSAGES),
            "Messages of recently opened Maildirs whose listing is kept in memory "
            "(0: none; see docs/scaling.rst for NFS).",
        ],
        [
            "read-ahead",
            None,
            str(DEFAULT_READ_AHEAD_LIMIT),
            "Octets of messages read ahead for clients that retrieve messages in order, "
            "all sessions together (0: none are read ahead).",
        ],
        [
            "counting-processes",
            None,
            "auto",
            "Helper processes that count message sizes with the serving process when a "
            "large Maildir is read in full, as at its first login ('auto': one where this "
            "process may use two cores or more, none with --workers; 0: none).",
        ],
        ["tls-cert", None, None, "PEM certificate (and chain) for STLS; re-read on SIGHUP."],
        ["tls-key", None, None, "PEM private key for STLS; re-read on SIGHUP."],
        ["max-connections", None, None, "Most connections at once (default: no limit)."],
        [
            "workers",
            None,
            "1",
            "Worker processes sharing the listening sockets ('auto': one per core).",
        ],
        ["worker-sockets", None, None, "(internal: the sockets a worker inherits)"],
        [
            "control",
            None,
            None,
            "UNIX socket (mode 0600) for 'python -m pop3d who' and 'kick'; with "
            "--workers, each worker also listens on PATH.PID.",
        ],
        [
            "metrics",
            None,
            None,
            "Endpoint serving Prometheus metrics over HTTP, e.g. tcp:9110:interface=127.0.0.1 "
            "(with --workers: the sum of all workers).",
        ],
        ["max-connections-per-ip", None, None, "Most connections at once from one address."],
        [
            "language",
            None,
            ENGLISH,
            "The language 'LANG *' chooses for replies (RFC 6856 section 3): "
            + ", ".join(language.tag for language in BUILTIN_LANGUAGES.all)
            + ".",
        ],
        [
            "login-failure-delay",
            None,
            str(DEFAULT_LOGIN_FAILURE_DELAY),
            "Seconds before a failed login is answered (0: at once); doubles for each new "
            f"guess from the same address, up to {MAXIMUM_DELAY:g}.",
        ],
        [
            "logout-format",
            None,
            DEFAULT_LOGOUT_FORMAT,
            "The end of the log line of a session that ends, as Dovecot's "
            "pop3_logout_format: %t/%p TOP count/octets, %r/%b RETR count/octets, "
            "%d deleted count, %{deleted_bytes}, %m/%s messages/octets in the "
            "maildrop at login, %u a hash of its UIDL list, %% a percent sign "
            "(long names such as %{top_count} work too).",
        ],
        [
            "client-workarounds",
            None,
            None,
            "Dovecot's pop3_client_workarounds, separated by spaces or commas: "
            "outlook-no-nuls (NUL octets sent as 0x80), oe-ns-eoh (a blank line "
            "after a header that has none).  Default: none.",
        ],
        [
            "expire",
            None,
            "never",
            "Days a message is kept after it was first retrieved (RETR), then deleted "
            "at a QUIT; 0: retrieved messages are deleted at QUIT; never: nothing "
            "is deleted but what the client deletes (RFC 2449 EXPIRE).",
        ],
        [
            "login-delay",
            None,
            None,
            "Seconds a user must wait between logins, announced and enforced "
            "(RFC 2449 LOGIN-DELAY; default: none).",
        ],
        [
            "login-history",
            None,
            None,
            "The SQLite file of last logins for --login-delay, shared by every "
            "process of this host (default: .pop3d-logins beside the default --lock-table).",
        ],
        [
            "sasl-mechanisms",
            None,
            None,
            "The SASL mechanisms AUTH offers, in this order, separated by spaces or "
            "commas: "
            + ", ".join(m.name.decode("ascii") for m in DEFAULT_MECHANISMS)
            + " (default: each of them, in that order, that the --auth checkers can verify).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["trusted-networks"] = []
        self.arguments: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept to start --workers with the same options.
        self.arguments = list(options if options is not None else sys.argv[1:])
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to listen on, e.g. tcp:110, tcp:1110:interface=127.0.0.1,
        ssl:995:privateKey=key.pem:certKey=cert.pem (repeatable; default tcp:110).
        """
        self["listen"].append(description)

    def opt_trusted_network(self, network: str) -> None:
        """A network (e.g. 192.0.2.10/32) spared login delays, per-IP limits (repeatable)."""
        self["trusted-networks"].append(parse_network(network))

    def opt_auth(self, description: str) -> None:
        """A twisted.cred checker, e.g. passwd-file:/etc/pop3d/passwd (repeatable)."""
        try:
            super().opt_auth(description)
        except usage.UsageError as error:
            # Name the option and the checker type, never the argument: it
            # may hold a password (memory:alice:secret).
            auth_type = description.split(":", 1)[0]
            reason = str(error).removeprefix("Unexpected error: ")
            raise usage.UsageError(f"--auth {auth_type}: {reason}") from None

    def opt_help_mail_location(self) -> None:
        """Show the kinds of --mail-location installed (store plug-ins), and exit."""
        sys.stdout.write(mail_location_help(installed_mail_locations()))
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        plugin, argument = parse_mail_location(self["mail-location"])
        self["mail-location-plugin"] = plugin
        # The argument is also where the default lock table and login
        # history go (beside the first {placeholder} of a path).
        self["maildir-template"] = argument
        self["timeout"] = parse_timeout(self["timeout"])
        self["login-failure-delay"] = parse_delay(self["login-failure-delay"])
        for limit in ("max-connections", "max-connections-per-ip"):
            self[limit] = parse_limit(limit, self[limit])
        self["listing-cache"] = parse_count("listing-cache", self["listing-cache"])
        self["read-ahead"] = parse_count("read-ahead", self["read-ahead"])
        self["client-workarounds"] = parse_client_workarounds(self["client-workarounds"])
        try:
            self["logout-format"] = LogoutFormat.parse(self["logout-format"])
        except LogoutFormatError as error:
            raise usage.UsageError(f"--logout-format: {error}") from None
        self["sasl-mechanisms"] = parse_sasl_mechanisms(self["sasl-mechanisms"])
        self["tls"] = parse_tls(self["tls-cert"], self["tls-key"])
        self["expire"] = parse_expire(self["expire"], plugin)
        self["login-delay"], self["login-history"] = parse_login_delay(
            self["login-delay"], self["login-history"], self["maildir-template"]
        )
        self["languages"] = parse_language(self["language"])
        try:
            plugin.check(argument, self)
        except MailLocationError as error:
            raise usage.UsageError(str(error)) from None
        if not self.get("credCheckers"):
            raise usage.UsageError("--auth is required, e.g. --auth passwd-file:/etc/pop3d/passwd")
        self["workers"] = parse_workers(self["workers"], self["listen"])
        self["counting-processes"] = parse_counting_processes(
            self["counting-processes"],
            # A worker is started with the parent's options less --workers.
            one_process=self["workers"] == 1 and self["worker-sockets"] is None,
            store=plugin,
            # A user database may give a user a location of its own (a Maildir).
            per_user=user_database(self["credCheckers"]) is not None,
        )
        if self["control"] is not None and self["worker-sockets"] is None:
            try:
                prepare_socket_path(self["control"])
            except ControlError as error:
                raise usage.UsageError(str(error)) from None
        if self["worker-sockets"] is not None:
            # A worker: the parent listens; these are its sockets.
            try:
                self["worker-sockets"] = InheritedSocket.parse_all(self["worker-sockets"])
            except ValueError as error:
                raise usage.UsageError(f"--worker-sockets: {error}") from None
            self["endpoints"] = []
            return
        from twisted.internet import reactor

        self["endpoints"] = [
            parse_endpoint(reactor, description, self["tls"]) for description in self["listen"]
        ]
        if self["metrics"] is not None:
            self["metrics-endpoint"] = parse_metrics_endpoint(reactor, self["metrics"])


def parse_language(tag: str) -> Languages:
    """--language: one of the languages pop3d has texts in."""
    try:
        return BUILTIN_LANGUAGES.with_preferred(tag)
    except ValueError:
        offered = ", ".join(language.tag for language in BUILTIN_LANGUAGES.all)
        raise usage.UsageError(f"--language {tag}: not one of {offered}") from None


def parse_mail_location(location: str | None) -> tuple[IMailLocationPlugin, str]:
    """
    The store plug-in a --mail-location SCHEME:ARGUMENT names, and the
    ARGUMENT (the plug-in checks it, with the store options, in postOptions).
    """
    if not location:
        raise usage.UsageError("--mail-location is required, e.g. maildir:/srv/mail/{user}")
    try:
        return find_mail_location(location, installed_mail_locations())
    except MailLocationError as error:
        raise usage.UsageError(
            f"--mail-location {error} (twistd pop3d --help-mail-location tells more)"
        ) from None


def mail_location_help(plugins: Sequence[IMailLocationPlugin]) -> str:
    """What --help-mail-location shows: each installed scheme, its argument and its help."""
    lines = ["Usage: --mail-location SCHEME:ARGUMENT", ""]
    for plugin in plugins:
        lines += [f"  {plugin.scheme}:{plugin.argument_help}", f"      {plugin.help}"]
    return "\n".join(lines) + "\n"


def parse_timeout(value: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        raise usage.UsageError(f"--timeout {value!r}: expected a number of seconds") from None
    if seconds < DEFAULT_TIMEOUT:
        raise usage.UsageError(
            f"--timeout {seconds}: RFC 1939 requires an autologout timer of at least "
            f"{DEFAULT_TIMEOUT} seconds"
        )
    return seconds


def parse_delay(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAXIMUM_DELAY:
        raise usage.UsageError(
            f"--login-failure-delay {value!r}: expected seconds between 0 and {MAXIMUM_DELAY:g}"
        )
    return seconds


def parse_network(value: str) -> IPNetwork:
    """A --trusted-network value: an IPv4 or IPv6 network, or one address."""
    try:
        # Host bits may be set: 192.0.2.10/24 means the network 192.0.2.0/24.
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise usage.UsageError(
            f"--trusted-network {value!r}: expected an IPv4 or IPv6 network, "
            "e.g. 192.0.2.10/32 or 2001:db8::/64"
        ) from None


def parse_expire(value: str, store: IMailLocationPlugin) -> int | None:
    """--expire: days (0 or more), or None for never."""
    if value.lower() == "never":
        return None
    if not value.isdigit() or len(value) > 6:
        raise usage.UsageError(f"--expire {value!r}: expected a number of days or 'never'")
    days = int(value)
    if days and IRetrievalTimesStore not in store.store_interfaces:
        raise usage.UsageError(
            f"--expire {days}: this --mail-location cannot record when messages were "
            "retrieved (Maildirs can); use --expire 0 or never"
        )
    return days


def parse_login_delay(
    value: str | None, history: str | None, template: str
) -> tuple[int | None, str | None]:
    """
    The --login-delay seconds (None: no delay) and the --login-history file,
    whose place is checked now (a missing directory, a link or a directory
    in its place is an error at start-up); the serving process makes it.
    """
    if value is not None and not (value.isascii() and value.isdigit()):
        raise usage.UsageError(f"--login-delay {value!r}: expected a whole number of seconds")
    if value is None or int(value) == 0:
        if history is not None:
            raise usage.UsageError("--login-history needs --login-delay")
        return None, None
    path = history or default_login_history(template)
    try:
        LoginHistoryFile(path).check_place()
    except OSError as error:
        raise usage.UsageError(f"--login-history {path}: {error}") from None
    return int(value), path


def parse_limit(option: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise usage.UsageError(f"--{option} {value!r}: expected a positive whole number")
    return int(value)


def parse_count(option: str, value: str) -> int:
    if not value.isdigit():
        raise usage.UsageError(f"--{option} {value!r}: expected a whole number (0 or more)")
    return int(value)


def parse_counting_processes(
    value: str,
    *,
    one_process: bool,
    store: IMailLocationPlugin,
    per_user: bool = False,
    cores: int | None = None,
) -> int:
    """
    --counting-processes: a number, or 'auto': one helper for a server of
    one process on two cores or more; none for workers, which use the cores,
    nor where every maildrop is of the --mail-location ``store`` and its
    stores count no sizes with helpers (no `ICountingStore`: mbox files),
    unlike where users may have ``per_user`` locations of their own.
    """
    counts = ICountingStore in store.store_interfaces or per_user
    if value == "auto":
        # The cores this process may run on (taskset, a container's cpuset).
        available = cores if cores is not None else len(os.sched_getaffinity(0))
        return 1 if available >= 2 and one_process and counts else 0
    processes = parse_count("counting-processes", value)
    if processes and not counts:
        raise usage.UsageError(
            f"--counting-processes {processes}: {store.scheme}: locations count no message "
            "sizes in helper processes (Maildirs do), and no user has a location of "
            "their own (no user database); use --counting-processes 0 or auto"
        )
    return processes


def parse_client_workarounds(value: str | None) -> ClientWorkarounds:
    try:
        return ClientWorkarounds.parse(value or "")
    except UnknownWorkaround as error:
        raise usage.UsageError(f"--client-workarounds: {error}") from None


def parse_sasl_mechanisms(
    value: str | None, known: Sequence[ISASLMechanism] = DEFAULT_MECHANISMS
) -> list[ISASLMechanism] | None:
    """
    --sasl-mechanisms: the mechanisms named (case-insensitive, separated by
    spaces or commas), in that order; None (the factory's default) without it.
    """
    if value is None:
        return None
    by_name = {mechanism.name.decode("ascii"): mechanism for mechanism in known}
    offered = ", ".join(by_name)
    names = list(dict.fromkeys(value.replace(",", " ").upper().split()))
    if not names:
        raise usage.UsageError(f"--sasl-mechanisms names no mechanism; known: {offered}")
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise usage.UsageError(
            f"--sasl-mechanisms: unknown mechanism {', '.join(unknown)}; known: {offered}"
        )
    return [by_name[name] for name in names]


def parse_tls(certificate: str | None, key: str | None) -> ServerTLS | None:
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise usage.UsageError("--tls-cert and --tls-key go together")
    try:
        return ServerTLS(certificate, key)
    except TLSConfigurationError as error:
        raise usage.UsageError(f"--tls-cert/--tls-key: {error}") from None


#: Endpoint kinds whose sockets worker processes can share.
_SHAREABLE = ("tcp:", "tcp6:", "unix:", "systemd:")


def parse_workers(value: str, listen: Sequence[str]) -> int:
    count = os.cpu_count() or 1 if value == "auto" else int(value) if value.isdigit() else 0
    if count < 1:
        raise usage.UsageError(f"--workers {value!r}: expected a positive number or 'auto'")
    if count > 1:
        for description in listen:
            inner = description.removeprefix("haproxy:")
            ours = inner.startswith("ssl:") and "privateKey=" not in inner
            if not (ours or inner.startswith(_SHAREABLE)):
                raise usage.UsageError(
                    f"--listen {description!r}: with --workers, use tcp:, tcp6:, unix:, "
                    "systemd: or ssl:PORT with --tls-cert/--tls-key (optionally behind haproxy:)"
                )
    return count


def worker_factory(description: str, factory: Any, tls: ServerTLS | None) -> Any:
    """The wrapping a --listen kind puts around the factory, in a worker."""
    if description.startswith("haproxy:"):
        return HAProxyWrappingFactory(worker_factory(description[8:], factory, tls))
    if description.startswith("ssl:"):
        assert tls is not None
        return tls_server_factory(factory, tls)
    return factory


def parse_metrics_endpoint(reactor: Any, description: str) -> Any:
    """--metrics: any Twisted server endpoint."""
    from twisted.internet.endpoints import serverFromString

    try:
        return serverFromString(reactor, description)
    except Exception as error:  # endpoint parsers raise many types
        raise usage.UsageError(f"--metrics {description!r}: {error}") from error


def parse_endpoint(reactor: Any, description: str, tls: ServerTLS | None = None) -> Any:
    """
    A server endpoint.  ``ssl:PORT[:...]`` without ``privateKey=`` (also
    behind ``haproxy:``) uses the --tls-cert/--tls-key certificate, re-read on
    SIGHUP like the one of STLS; with ``privateKey=`` it is Twisted's own
    ``ssl:`` endpoint.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        inner = description.removeprefix("haproxy:")
        if inner.startswith("ssl:") and "privateKey=" not in inner:
            if tls is None:
                raise ValueError("ssl: needs privateKey= (or --tls-cert and --tls-key)")
            # Behind haproxy: the PROXY header comes first, in the clear,
            # then the TLS handshake: PROXY outside, TLS inside.
            wrapper = description[: len(description) - len(inner)]
            plain = serverFromString(reactor, wrapper + "tcp:" + inner[4:])
            return ImplicitTLSEndpoint(plain, tls)
        return serverFromString(reactor, description)
    except Exception as error:  # endpoint parsers raise many types
        raise usage.UsageError(f"--listen {description!r}: {error}") from error


def build_portal(
    realm: IRealm, checkers: Sequence[Any], threads: IReactorThreads | None = None
) -> Portal:
    """
    A portal over all the checkers given, in order: several checkers for the
    same kind of credentials are tried one after another.  With ``threads``,
    slow password hashes run in its thread pool.
    """
    prepared = [accept_wire_bytes(checker) for checker in checkers]
    if threads is not None:
        for checker in prepared:
            if isinstance(checker, PasswdFileChecker | LdapChecker | SQLChecker):
                # bcrypt, Argon2, SHA-crypt, PBKDF2 (and LDAP searches, SQL queries):
                # in the thread pool.
                checker.run_slow_work_in(threads)

    def can_check(checker: Any, interface: Any) -> bool:
        # Credentials of a derived type are credentials of the base type too
        # (CRAM-MD5's are hashed-password ones): a checker of the base type
        # verifies them.
        return any(interface.isOrExtends(offered) for offered in checker.credentialInterfaces)

    # The portal takes the first registered interface that credentials
    # provide: derived types go first, to the checkers made for them.
    interfaces: list[Any] = most_specific_first(
        interface for checker in prepared for interface in checker.credentialInterfaces
    )
    portal = Portal(realm)
    for interface in interfaces:
        serving = [c for c in prepared if can_check(c, interface)]
        portal.registerChecker(FirstMatchChecker(serving, [interface]), interface)
    return portal


def user_database(checkers: Sequence[Any]) -> IUserDatabase | None:
    """
    The user database of the ``--auth`` checkers (Dovecot's userdb): the
    first checker that also looks users up (`IUserDatabase`), if any.
    """
    for checker in checkers:
        if IUserDatabase.providedBy(checker):
            return checker
    return None


def build_store(options: Options, threads: IReactorThreads, clock: IReactorTime) -> IMaildropStore:
    """The store --mail-location names, made by its plug-in (postOptions checked it)."""
    plugin: IMailLocationPlugin = options["mail-location-plugin"]
    return plugin.make(options["maildir-template"], options, threads, clock)


#: Seconds a thread may hold the interpreter lock while another waits.
SWITCH_INTERVAL = 0.001


def control_service(options: Options, factory: POP3Factory, service: MultiService) -> IService:
    """``--control PATH``: this process's sessions, or (the parent of workers) theirs."""
    from twisted.internet import reactor

    unix = cast(IReactorUNIX, reactor)
    path: str = options["control"]
    if options["worker-sockets"] is not None:
        return ControlService(
            unix, worker_path(path, os.getpid()), LocalSessions(lambda: factory.connections)
        )
    if options["workers"] > 1:
        pool = cast(WorkerPool, service.getServiceNamed("workers"))
        return ControlService(unix, path, WorkerSessions(unix, path, pool.worker_pids))
    return ControlService(unix, path, LocalSessions(lambda: factory.connections))


def worker_log_observer() -> ILogObserver:
    """
    The log of a worker (``twistd --logger pop3d.tap.worker_log_observer``):
    every event as a line of JSON on standard output, which the parent
    (`WorkerPool`) reads and logs as its own, with the worker's time, system,
    namespace and level.  So the workers' lines are in the parent's
    ``--logfile`` (or syslog, or standard output), in its format, written by
    one process.

    While the reactor runs, the lines logged close together go out together
    (see `pop3d.workers.WorkerLogLines`).
    """
    return _log_lines(sys.stdout, None)


def worker_shared_log_observer() -> ILogObserver:
    """
    The log of a worker whose parent logs to its standard output
    (``twistd -n`` without ``--logfile``): the worker's standard output is
    that same output, and the worker writes its lines there itself, as
    twistd writes the parent's (`pop3d.workers.SharedLog`); only a line too
    long to be written whole goes to the parent, as JSON on standard error.
    """
    sys.stdout.flush()
    return _log_lines(sys.stderr, SharedLog(sys.stdout.fileno(), sys.stdout.encoding))


def session_log(options: Options) -> ILogObserver:
    """
    Where the sessions' log lines go.  One process under ``twistd -n``
    logging to standard output: pop3d writes them there itself, as twistd
    would (`pop3d.workers.SharedLog`; twistd's observer cost a short
    session a sixth of its work), and twistd's observer writes only the
    lines too long for one write.  Otherwise through twisted.logger (a
    worker's whole log is pop3d's already).
    """
    if options["worker-sockets"] is not None or options["workers"] > 1:
        return globalLogPublisher
    fd = twistd_log_descriptor(options)
    if fd is None or sys.__stdout__ is None:
        return globalLogPublisher
    shared = SharedLog(fd, sys.__stdout__.encoding, overflow=globalLogPublisher)
    # Each line written at once, as twistd writes its own: out before the
    # reply that follows it, in order with the process's other lines.
    return _log_lines(None, shared, at_once=True)


def _log_lines(
    output: IO[str] | None, shared: SharedLog | None, at_once: bool = False
) -> ILogObserver:
    # twistd calls a worker's observer's factory once it has installed the
    # reactor, and makeService a single process's: the log is put together
    # here, in the composition root, as the service is.
    from twisted.internet import reactor

    core = cast(IReactorCore, reactor)
    lines = WorkerLogLines(
        output,
        cast(IReactorTime, reactor),
        (lambda: False) if at_once else (lambda: core.running and isInIOThread()),
        shared=shared,
    )
    # What the last turn kept, however the process ends: twistd stopped by
    # a signal kills itself with it (no atexit), after the reactor stopped.
    core.addSystemEventTrigger("after", "shutdown", lines.flush)
    atexit.register(lines.flush)
    return lines


def twistd_log_descriptor(options: Options) -> int | None:
    """
    The descriptor twistd writes this process's log to, when it is one the
    workers can share: standard output (``twistd -n`` without
    ``--logfile``, or ``--logfile -``); None when twistd logs to a file
    (which it rotates), to syslog, or through ``--logger``, or when pop3d
    does not run under twistd.
    """
    twistd = getattr(options, "parent", None)
    if not isinstance(twistd, usage.Options):
        return None
    if twistd.get("logger") or twistd.get("syslog"):
        return None
    logfile = twistd.get("logfile")
    if logfile == "-" or (twistd.get("nodaemon") and not logfile):
        return sys.__stdout__.fileno() if sys.__stdout__ is not None else None
    return None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    clock: IReactorTime = reactor
    threads = cast(IReactorThreads, reactor)
    # The reactor thread answers every session; the thread pool reads large
    # Maildirs.  Hand the interpreter lock back to the reactor sooner than
    # the default 5 ms, so a fresh session is not kept waiting by a scan.
    sys.setswitchinterval(SWITCH_INTERVAL)
    serving = options["workers"] == 1 or options["worker-sockets"] is not None
    # Every store made from the options (per-user locations too) shares them.
    counting = (
        CountingProcesses(options["counting-processes"], threads, clock=clock)
        if serving and options["counting-processes"]
        else None
    )
    options["counting"] = counting
    store = build_store(options, threads, clock)
    userdb = user_database(options["credCheckers"])
    realm: IRealm = MaildropRealm(
        store,
        userdb=userdb,
        locations=MailLocations(
            installed_mail_locations(),
            options,
            threads,
            clock,
            default_template=options["maildir-template"],
        ),
    )
    if options["login-delay"] is not None:
        history = LoginHistoryFile(options["login-history"], reactor=threads)
        realm = LoginDelayRealm(
            realm, history, delay=options["login-delay"], clock=clock, per_user=userdb is not None
        )
    metrics = serving_metrics(options)
    if metrics is not None:
        # Outermost: asked as the checker accepts, it times checker and store.
        realm = TimingRealm(realm, clock)
    portal = build_portal(realm, options["credCheckers"], threads)
    if options["tls"] is not None:
        # SIGHUP reads the certificate and key in the thread pool.
        options["tls"].run_slow_work_in(threads)
    factory = POP3Factory(
        portal,
        clock=clock,
        timeout=options["timeout"],
        hostname=options["hostname"],
        login_failure_delay=options["login-failure-delay"],
        policy=SessionPolicy(
            allow_plaintext_auth=bool(options["allow-plaintext-auth"]),
            login_delay=options["login-delay"],
            expire_days=options["expire"],
            logout_format=options["logout-format"],
            # Users from a database may have their own LOGIN-DELAY and EXPIRE.
            per_user=any(
                IUserDatabase.providedBy(checker) or IUserSettingsSource.providedBy(checker)
                for checker in options["credCheckers"]
            ),
        ),
        tls=options["tls"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        client_workarounds=options["client-workarounds"],
        trusted_networks=options["trusted-networks"],
        languages=options["languages"],
        mechanisms=options["sasl-mechanisms"],
        metrics=metrics,
        session_log=session_log(options),
        read_ahead_limit=options["read-ahead"],
    )
    service = MultiService()
    if counting is not None:
        counting.setServiceParent(service)
    reload: Callable[[], object] = reload_configuration(options)
    if serving:
        # Added first, so stopped after the listeners (MultiService stops
        # its children in reverse): no session arrives once it closes them.
        GracefulStop(lambda: factory.connections, clock=clock).setServiceParent(service)
    # Before the listeners: SIGHUP is handled by the time anyone can connect.
    ReloadOnHangup(lambda: reload()).setServiceParent(service)
    workers: WorkerPool | None = None
    if options["worker-sockets"] is not None:
        factories = [
            worker_factory(description, factory, options["tls"])
            for description in options["listen"]
        ]
        if len(factories) != len(options["worker-sockets"]):
            raise usage.UsageError("--worker-sockets does not match --listen")
        adopted = AdoptedPorts(cast(IReactorSocket, reactor), options["worker-sockets"], factories)
        adopted.setServiceParent(service)
    elif options["workers"] > 1:
        # Under systemd (twistd -n, its log on standard output, the journal)
        # the workers write their lines there themselves: the parent would
        # spend as much as a worker's whole session rewriting them.
        shared_log = twistd_log_descriptor(options)
        workers = WorkerPool(
            cast(IReactorProcess, reactor),
            options["endpoints"],
            worker_command(options.arguments, shared_log=shared_log is not None),
            options["workers"],
            options["listen"],
            shared_log=shared_log,
        )
        workers.setName("workers")
        workers.setServiceParent(service)
        reload = lambda: workers.signal_workers("HUP")  # noqa: E731
    else:
        pop3 = POP3Service(options["endpoints"], factory)
        pop3.setName("pop3")
        pop3.setServiceParent(service)
    if options["control"] is not None:
        control_service(options, factory, service).setServiceParent(service)
    if options["metrics"] is not None and options["worker-sockets"] is None:
        # After the POP3 listeners: their "listening on" line comes first.
        add_metrics_endpoint(options, metrics, service, workers, threads)
    # Everything alive now (modules, classes, the reactor: ~50,000 objects)
    # lives as long as the process.  Frozen, it is left out of every full
    # collection, each of which holds the GIL, and so every session, for as
    # long as it walks them.
    gc.collect()
    gc.freeze()
    return service


def serving_metrics(options: Options) -> Metrics | None:
    """
    What this process counts: nothing without --metrics, nothing in the
    parent of workers (they count, it sums), else a `Metrics`.
    """
    if options["metrics"] is None or options["workers"] > 1:
        return None
    # A worker writes each count at once to the files the parent reads.
    return Metrics(tally=options["worker-sockets"] is None)


def _in_background(work: Deferred[None], what: str) -> None:
    work.addErrback(lambda failure: log.failure(what, failure))


def add_metrics_endpoint(
    options: Options,
    metrics: Metrics | None,
    service: MultiService,
    pool: WorkerPool | None = None,
    threads: IReactorThreads | None = None,
) -> None:
    """
    Serves --metrics: this process's metrics, or with --workers (``pool``)
    the sum of theirs, through prometheus_client's multiprocess mode in a
    private directory, named to the workers (only) in the variable
    prometheus_client reads.
    """
    if pool is None:
        assert metrics is not None
        registry = metrics.registry
    else:
        directory = tempfile.mkdtemp(prefix="pop3d-metrics-")
        pool.environment[MULTIPROCESS_DIRECTORY] = directory
        # A worker's files are removed in the thread pool, not on the
        # reactor thread that answers the other sessions.
        pool.on_worker_exit = lambda pid: _in_background(
            run_blocking(threads, forget_process, directory, pid), "forgetting a worker's metrics"
        )
        registry = workers_registry(directory)
        RemoveOnStop(directory).setServiceParent(service)
    metrics_service(options["metrics-endpoint"], registry).setServiceParent(service)


def reload_configuration(options: Options) -> Callable[[], Deferred[Any]]:
    """
    What SIGHUP reads again, in the thread pool: the --tls-cert/--tls-key
    files (kept as they were if the new ones cannot be used) and the files
    of every --auth checker that provides `pop3d.reloading.IReloadable`
    (passwd files, which logins also re-read whenever they change; Dovecot's
    conf files): the Deferred fires once they are all read.
    """
    tls: ServerTLS | None = options["tls"]
    reloadable = [c for c in options["credCheckers"] if IReloadable.providedBy(c)]
    if tls is not None:
        reloadable.insert(0, tls)

    def reload() -> Deferred[Any]:
        return DeferredList([part.reload() for part in reloadable])

    return reload


class ReloadOnHangup(Service):
    """Runs ``reload`` in the reactor thread whenever the process gets SIGHUP."""

    def __init__(self, reload: Callable[[], object]) -> None:
        self._reload = reload
        self._previous: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        if self._previous is None:
            self._install()

    def _install(self) -> None:
        from twisted.internet import reactor

        def on_hangup(signum: int, frame: object) -> None:
            cast(IReactorFromThreads, reactor).callFromThread(self._reload)

        self._previous = signal.signal(signal.SIGHUP, on_hangup) or signal.SIG_DFL

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
