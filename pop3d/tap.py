"""
``twistd pop3d``: command-line options and the service they describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from twisted.application.service import IService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.python import usage

from pop3d.checkers import FirstMatchChecker, accept_wire_bytes
from pop3d.factory import DEFAULT_LOGIN_FAILURE_DELAY, POP3Factory
from pop3d.maildir import MaildirStore, MaildirTemplateError, check_template
from pop3d.protocol import DEFAULT_TIMEOUT
from pop3d.realm import MaildropRealm
from pop3d.service import POP3Service

DEFAULT_LISTEN = "tcp:110"


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = (
        "--mail-location maildir:/srv/mail/{user} --auth passwd-file:/etc/pop3d/passwd "
        "[--listen tcp:110] [--timeout SECONDS]"
    )
    longdesc = (
        "Serve POP3 (RFC 1939) from Maildirs.  --listen takes any Twisted endpoint "
        "(tcp:, tcp6:, unix:, ssl:, systemd:, haproxy:...) and may be repeated; "
        "--auth takes any twisted.cred checker (passwd-file:, memory:, file:, ...) "
        "and may be repeated."
    )
    supportedInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    optParameters = [
        [
            "mail-location",
            "m",
            None,
            "Where maildrops are: maildir:PATH, where PATH may use {user}, "
            "{local} and {domain} (e.g. maildir:/srv/mail/{user}).",
        ],
        [
            "timeout",
            "t",
            str(DEFAULT_TIMEOUT),
            "Inactivity autologout in seconds; at least 600 (RFC 1939 section 3).",
        ],
        ["hostname", None, None, "Host name in APOP timestamps (default: this host's name)."],
        [
            "login-failure-delay",
            None,
            str(DEFAULT_LOGIN_FAILURE_DELAY),
            "Seconds before a failed login is answered; doubles for a peer that keeps failing.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to listen on, e.g. tcp:110, tcp:1110:interface=127.0.0.1,
        ssl:995:privateKey=key.pem:certKey=cert.pem (repeatable; default tcp:110).
        """
        self["listen"].append(description)

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

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["maildir-template"] = parse_mail_location(self["mail-location"])
        self["timeout"] = parse_timeout(self["timeout"])
        self["login-failure-delay"] = parse_delay(self["login-failure-delay"])
        if not self.get("credCheckers"):
            raise usage.UsageError("--auth is required, e.g. --auth passwd-file:/etc/pop3d/passwd")
        from twisted.internet import reactor

        self["endpoints"] = [parse_endpoint(reactor, description) for description in self["listen"]]


def parse_mail_location(location: str | None) -> str:
    """The Maildir path template of a --mail-location value."""
    if not location:
        raise usage.UsageError("--mail-location is required, e.g. maildir:/srv/mail/{user}")
    kind, separator, path = location.partition(":")
    if not separator or kind != "maildir":
        raise usage.UsageError(
            f"--mail-location {location!r}: expected maildir:PATH, e.g. maildir:/srv/mail/{{user}}"
        )
    try:
        check_template(path)
    except MaildirTemplateError as error:
        raise usage.UsageError(f"--mail-location: {error}") from error
    return path


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
    if not 0 <= seconds <= 60:
        raise usage.UsageError(
            f"--login-failure-delay {value!r}: expected seconds between 0 and 60"
        )
    return seconds


def parse_endpoint(reactor: Any, description: str) -> Any:
    from twisted.internet.endpoints import serverFromString

    try:
        return serverFromString(reactor, description)
    except Exception as error:  # endpoint parsers raise many types
        raise usage.UsageError(f"--listen {description!r}: {error}") from error


def build_portal(realm: MaildropRealm, checkers: Sequence[Any]) -> Portal:
    """
    A portal over all the checkers given, in order: several checkers for the
    same kind of credentials are tried one after another.
    """
    prepared = [accept_wire_bytes(checker) for checker in checkers]
    portal = Portal(realm)
    interfaces: list[Any] = []
    for checker in prepared:
        for interface in checker.credentialInterfaces:
            if interface not in interfaces:
                interfaces.append(interface)
    for interface in interfaces:
        serving = [c for c in prepared if interface in c.credentialInterfaces]
        portal.registerChecker(FirstMatchChecker(serving, [interface]), interface)
    return portal


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    clock: IReactorTime = reactor
    store = MaildirStore(options["maildir-template"], reactor=cast(IReactorThreads, reactor))
    portal = build_portal(MaildropRealm(store), options["credCheckers"])
    factory = POP3Factory(
        portal,
        clock=clock,
        timeout=options["timeout"],
        hostname=options["hostname"],
        login_failure_delay=options["login-failure-delay"],
    )
    return POP3Service(options["endpoints"], factory)
