"""
``--control``: `pop3d.control` on a Clock with StringTransports (who lists
the sessions, kick closes them without UPDATE), the socket's safety checks,
and the ``python -m pop3d who/kick`` commands' errors.  (tests/test_process_control.py
runs the real ``twistd pop3d --control`` and the real commands.)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from zope.interface import implementer

from pop3d import __main__ as cli
from pop3d.control import (
    ControlError,
    ControlFactory,
    LocalSessions,
    format_who,
    prepare_socket_path,
)
from pop3d.factory import POP3Factory
from pop3d.session import SessionPolicy
from pop3d.stores.interfaces import IMaildrop, IMaildropStore
from pop3d.tap import Options
from pop3d.testing import MemoryStore, memory_portal

from .conftest import USERS, Wire

#: 2026-12-05 14:00:00 UTC.
NOW = 1796479200.0
CLIENT = IPv4Address("TCP", "192.0.2.7", 51234)


def _result(deferred: Deferred) -> object:
    found: list[object] = []
    deferred.addBoth(found.append)
    assert found, "the Deferred has not fired"
    return found[0]


def test_who_lists_logged_in_sessions(
    make_factory: Callable[..., POP3Factory], clock: Clock
) -> None:
    """The real client's address, its RFC 1939 state and the login time on the server's clock."""
    factory = make_factory(policy=SessionPolicy(allow_plaintext_auth=True))
    clock.advance(NOW)
    waiting = Wire(factory, CLIENT)  # not logged in: not listed, as doveadm who
    alice = Wire(factory, CLIENT)
    assert alice.login().startswith(b"+OK ")
    clock.advance(90)
    bob = Wire(factory)
    bob.login(b"bob", b"builder")
    gone = Wire(factory)
    gone.login(b"bob", b"builder")
    gone.disconnect()

    rows = _result(LocalSessions(lambda: factory.connections, pid=4242).who())

    assert rows == [
        {
            "user": "alice",
            "peer": "192.0.2.7:51234",
            "state": "TRANSACTION",
            "since": "2026-12-05T14:00:00+00:00",
            "worker": 4242,
        },
        {
            "user": "bob",
            "peer": "127.0.0.1:40000",
            "state": "TRANSACTION",
            "since": "2026-12-05T14:01:30+00:00",
            "worker": 4242,
        },
    ]
    assert not waiting.closed
    assert format_who(rows) == (
        "USER   PEER             STATE        SINCE                      WORKER\n"
        "alice  192.0.2.7:51234  TRANSACTION  2026-12-05T14:00:00+00:00  4242\n"
        "bob    127.0.0.1:40000  TRANSACTION  2026-12-05T14:01:30+00:00  4242\n"
    )


def test_kick_closes_without_update(factory: POP3Factory, store: MemoryStore) -> None:
    """
    RFC 1939 section 6: a session ended other than by QUIT does not enter
    UPDATE: the message alice marked with DELE is still there, and her
    maildrop is unlocked.  Other users' sessions are untouched.
    """
    store.deliver("alice", b"Subject: keep\n\nbody\n")
    alice = Wire(factory)
    alice.login()
    assert alice.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
    bob = Wire(factory)
    bob.login(b"bob", b"builder")

    sessions = LocalSessions(lambda: factory.connections)
    assert _result(sessions.kick("alice")) == 1

    # Told why (RFC 3206 section 4: SYS/TEMP, come back later), then hung up.
    assert alice.take() == b"-ERR [SYS/TEMP] disconnected by the administrator\r\n"
    assert alice.closed
    alice.disconnect()
    assert store.messages("alice") == [b"Subject: keep\n\nbody\n"]
    assert not store.is_locked("alice")
    assert not bob.closed
    assert bob.command(b"STAT") == b"+OK 0 0\r\n"
    # Nobody left to kick: 0 (the command exits 1).
    assert _result(sessions.kick("alice")) == 0


@implementer(IMaildrop)
class _HeldRemoval:
    """A maildrop whose removal (UPDATE) waits until the test lets it finish."""

    def __init__(self, inner: IMaildrop, removals: list[Deferred[None]]) -> None:
        self._inner = inner
        self._removals = removals

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def remove(self, indexes: Sequence[int]) -> Deferred[None]:
        held: Deferred[None] = Deferred()
        self._removals.append(held)
        return held.addCallback(lambda _: self._inner.remove(indexes))


@implementer(IMaildropStore)
class _HeldStore:
    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self.removals: list[Deferred[None]] = []

    def open(self, mailbox: str) -> Deferred[IMaildrop]:
        return self._inner.open(mailbox).addCallback(_HeldRemoval, self.removals)


def test_kick_leaves_a_session_in_update_to_finish(clock: Clock, store: MemoryStore) -> None:
    """A session whose QUIT started UPDATE removes what its client deleted and answers."""
    held = _HeldStore(store)
    factory = POP3Factory(
        memory_portal(held, USERS),
        clock=clock,
        hostname="pop.example.test",
        policy=SessionPolicy(),
        login_failure_delay=0,
    )
    store.deliver("alice", b"Subject: gone\n\nbody\n")
    alice = Wire(factory)
    alice.login()
    assert alice.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert alice.command(b"QUIT") == b""
    assert len(held.removals) == 1

    sessions = LocalSessions(lambda: factory.connections, pid=1)
    assert [row["state"] for row in _result(sessions.who())] == ["UPDATE"]
    assert _result(sessions.kick("alice")) == 0

    held.removals[0].callback(None)
    assert alice.take().startswith(b"+OK ")
    assert store.messages("alice") == []


def _ask(factory: POP3Factory, request: bytes) -> tuple[bytes, bool]:
    server = ControlFactory(LocalSessions(lambda: factory.connections, pid=7)).buildProtocol(
        UNIXAddress(None)
    )
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(request)
    return transport.value(), bool(transport.disconnecting)


def test_control_protocol_lines(factory: POP3Factory, clock: Clock) -> None:
    """One JSON request a connection, one JSON answer, then the server hangs up."""
    clock.advance(NOW)
    Wire(factory).login()
    answer, closed = _ask(factory, b'{"command": "who"}\n')
    assert json.loads(answer) == {
        "sessions": [
            {
                "user": "alice",
                "peer": "127.0.0.1:40000",
                "state": "TRANSACTION",
                "since": "2026-12-05T14:00:00+00:00",
                "worker": 7,
            }
        ]
    }
    assert closed
    assert _ask(factory, b'{"command": "kick", "user": "nobody"}\n') == (
        b'{"kicked": 0}\n',
        True,
    )
    expected_error = (
        b'{"error": "expected {\\"command\\": \\"who\\"} or '
        b'{\\"command\\": \\"kick\\", \\"user\\": NAME}"}\n'
    )
    assert _ask(factory, b"who\n") == (expected_error, True)
    assert _ask(factory, b'{"command": "kick"}\n') == (expected_error, True)
    assert _ask(factory, b"[]\n") == (expected_error, True)


# -- the socket's path ------------------------------------------------------------


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "control"
    link.symlink_to(target)
    with pytest.raises(ControlError, match=r"control: is a symbolic link; refusing to use it"):
        prepare_socket_path(str(link))
    assert link.is_symlink()


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control"
    path.write_text("precious\n")
    with pytest.raises(ControlError, match=r"exists and is not a socket; refusing to replace it"):
        prepare_socket_path(str(path))
    assert path.read_text() == "precious\n"


def test_stale_socket_is_removed_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "control")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        with pytest.raises(ControlError, match=r"a running server is listening there"):
            prepare_socket_path(path)
    finally:
        listener.close()
    assert os.path.exists(path)  # closed without unlinking: stale
    prepare_socket_path(path)
    assert not os.path.exists(path)
    prepare_socket_path(path)  # nothing there: nothing to do


@pytest.mark.parametrize("command", [["who"], ["kick", "alice"]])
def test_command_names_the_missing_socket(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-server"
    with pytest.raises(SystemExit) as exited:
        cli.main([command[0], "--control", str(path), *command[1:]])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        f"python -m pop3d {command[0]}: cannot reach the pop3d control socket {path}: "
        "No such file or directory (is twistd pop3d running with --control?)\n"
    )


def test_twistd_option_refuses_a_file_with_a_usage_error(tmp_path: Path) -> None:
    """``twistd pop3d --control`` at an existing file: a usage error naming the option."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}wonderland::\n")
    occupied = tmp_path / "control"
    occupied.write_text("precious\n")
    options = Options()
    arguments = ["--mail-location", "maildir:/srv/{user}", "--auth", f"passwd-file:{passwd}"]
    with pytest.raises(
        usage.UsageError,
        match=rf"^--control {occupied}: exists and is not a socket; refusing to replace it$",
    ):
        options.parseOptions([*arguments, "--control", str(occupied)])
    assert occupied.read_text() == "precious\n"
