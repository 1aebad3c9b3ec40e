"""
Shared fixtures.

Protocol tests drive bytes through a `Wire` (a StringTransport and a Clock);
end-to-end tests start the real service, as ``twistd pop3d`` builds it, on a
loopback port (`running_server`).
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from pop3d.factory import POP3Factory
from pop3d.protocol import POP3Protocol
from pop3d.service import POP3Service
from pop3d.session import SessionPolicy
from pop3d.stores.interfaces import IMaildropStore
from pop3d.tap import Options, makeService
from pop3d.testing import MemoryStore, memory_portal

LOOPBACK_PEER = IPv4Address("TCP", "127.0.0.1", 40000)

USERS = {"alice": "wonderland", "bob": "builder"}


class Wire:
    """
    One connection to a POP3Protocol, driven with bytes: what the client
    sends goes in, what the server wrote comes out.
    """

    def __init__(
        self,
        factory: POP3Factory,
        peer: IPv4Address = LOOPBACK_PEER,
        transport: StringTransport | None = None,
    ) -> None:
        self.protocol: POP3Protocol = factory.buildProtocol(peer)
        self.transport = transport if transport is not None else StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        """Everything the server wrote since the last take."""
        written = self.transport.value()
        self.transport.clear()
        return bytes(written)

    def send(self, data: bytes) -> bytes:
        """Deliver raw bytes from the client; return the server's answer."""
        self.protocol.dataReceived(data)
        return self.take()

    def command(self, line: bytes) -> bytes:
        return self.send(line + b"\r\n")

    def login(self, user: bytes = b"alice", password: bytes = b"wonderland") -> bytes:
        self.command(b"USER " + user)
        return self.command(b"PASS " + password)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def disconnect(self) -> None:
        self.protocol.connectionLost(None)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def make_factory(clock: Clock, store: MemoryStore) -> Callable[..., POP3Factory]:
    def make(*, store: IMaildropStore = store, **overrides: object) -> POP3Factory:
        """A factory of ``USERS`` over ``store`` (the ``store`` fixture's by default)."""
        options: dict[str, object] = {
            "clock": clock,
            "hostname": "pop.example.test",
            "policy": SessionPolicy(),
            # Failed logins are answered at once unless a test is about the wait.
            "login_failure_delay": 0,
        }
        options.update(overrides)
        return POP3Factory(memory_portal(store, USERS), **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def factory(make_factory: Callable[..., POP3Factory]) -> POP3Factory:
    return make_factory()


@pytest.fixture
def wire(factory: POP3Factory) -> Wire:
    return Wire(factory)


#: Seconds `Logged.when` waits for a line before it fails (it comes at once when all is well).
LOG_PATIENCE = 10.0


@implementer(ILogObserver)
class Logged:
    """
    Every event logged (through twisted.logger's global publisher) while it
    observes: with the `logged` fixture, from the fixture's set-up (after
    the fixtures named before it) to the test's end.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self._awaited: dict[str, Deferred[None]] = {}

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        if self._awaited:
            awaited = self._awaited.pop(formatEvent(event), None)
            if awaited is not None:
                awaited.callback(None)

    def texts(self, fragment: str = "") -> list[str]:
        """Each event as its log line (`formatEvent`), those with ``fragment`` in it."""
        return [text for text in map(formatEvent, self.events) if fragment in text]

    def with_fields(self) -> str:
        """Each event's line and all its fields: what a secret must appear in nowhere."""
        return "\n".join(f"{formatEvent(event)} {event!r}" for event in self.events)

    def when(self, text: str) -> Deferred[None]:
        """
        Fires when the line ``text`` is logged (call it before what logs it);
        fails after `LOG_PATIENCE` seconds without it.
        """
        # Imported here: conftest is read before pytest-twisted installs its reactor.
        from twisted.internet import reactor

        self._awaited[text] = awaited = Deferred()
        return awaited.addTimeout(LOG_PATIENCE, cast(IReactorTime, reactor))


@pytest.fixture
def logged() -> Iterator[Logged]:
    """What the code under test logs, from here to the test's end."""
    observer = Logged()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


@dataclass
class RunningServer:
    """A pop3d service built by the twistd plugin, listening on loopback."""

    host: str
    port: int
    mail_root: Path
    passwd: Path
    service: MultiService

    def maildir(self, user: str) -> Path:
        return self.mail_root / user


def write_passwd(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}:{{PLAIN}}{secret}::\n" for name, secret in users.items()))
    return path


async def start_service(
    tmp_path: Path, listen: list[str], extra: Sequence[str] = ()
) -> RunningServer:
    """
    Start the service exactly as ``twistd pop3d`` makes it (Options,
    makeService) on the given endpoints, over a Maildir root in tmp_path.
    The first endpoint's address is the server's host and port.
    """
    mail_root = tmp_path / "mail"
    mail_root.mkdir(exist_ok=True)
    passwd = write_passwd(tmp_path / "passwd", USERS)
    arguments = [part for description in listen for part in ("--listen", description)]
    options = Options()
    options.parseOptions(
        [
            *arguments,
            "--mail-location",
            f"maildir:{mail_root}/{{user}}",
            "--auth",
            f"passwd-file:{passwd}",
            # No helper process per server (tests/test_counting.py starts them).
            "--counting-processes",
            "0",
            *extra,
        ]
    )
    service = makeService(options)
    # makeService freezes what lives as long as the server; this process
    # outlives many servers, and its tests count on collections.
    gc.unfreeze()
    assert isinstance(service, MultiService)
    pop3 = service.getServiceNamed("pop3")
    assert isinstance(pop3, POP3Service)
    service.startService()
    ports = await pop3.when_listening()
    address = ports[0].getHost()
    return RunningServer(
        getattr(address, "host", ""), getattr(address, "port", 0), mail_root, passwd, service
    )


@pytest_twisted.async_yield_fixture
async def running_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The twistd-built service on an ephemeral 127.0.0.1 port."""
    server = await start_service(tmp_path, ["tcp:0:interface=127.0.0.1"])
    try:
        yield server
    finally:
        await server.service.stopService()


def pytest_configure(config: pytest.Config) -> None:
    # The suite must not depend on the developer's locale or home directory.
    os.environ.setdefault("LC_ALL", "C.UTF-8")


def require_program(name: str) -> str:
    """
    The path of an external program a test needs.  Outside CI a missing one
    skips the test with a hint; in CI (which installs them) it fails.
    """
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {name}); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
