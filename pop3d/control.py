"""
``--control PATH``: a UNIX socket through which ``python -m pop3d who`` and
``python -m pop3d kick`` (like ``doveadm who`` / ``doveadm kick``) see and
end the sessions of a running server.

The protocol is one JSON object a line.  A client connects, sends one
request and reads one answer; the server then closes the connection:

- ``{"command": "who"}`` -> ``{"sessions": [{"user", "peer", "state",
  "since", "worker"}, ...]}``, the sessions that have logged in: ``peer`` is
  the real client (behind a PROXY header too), ``state`` the RFC 1939 state
  (``TRANSACTION`` or ``UPDATE``), ``since`` the login time (ISO 8601, UTC,
  from the injected clock), ``worker`` the serving process's id;
- ``{"command": "kick", "user": NAME}`` -> ``{"kicked": N}``: NAME's
  sessions are told ``-ERR [SYS/TEMP] disconnected by the administrator``
  (one in the middle of a reply is cut off) and dropped without UPDATE
  (RFC 1939 section 6: nothing marked by DELE is removed); a session
  already in UPDATE is left to finish it;
- anything else -> ``{"error": TEXT}``.

The socket is the owner's only (mode 0600).  A path that is a symbolic link
or not a socket is refused; a socket nobody answers on (left by a server
that died) is removed; one a running server answers on is refused.

With ``--workers N`` each worker listens on ``PATH.PID`` (its own process
id) and the parent on ``PATH``; the parent asks every worker it runs and
answers with the sessions of all of them (or the sum of their kicks).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from pop3d.protocol import Phase, POP3Protocol
from pop3d.session import State

log = Logger()

#: The longest request line a control client may send.
MAX_REQUEST = 4096
#: Seconds the parent waits for a worker's answer.
WORKER_TIMEOUT = 5.0

#: The RFC 1939 state each session state belongs to.
RFC_STATE = {
    State.AUTHORIZATION: "AUTHORIZATION",
    State.USER_GIVEN: "AUTHORIZATION",
    State.SASL_STEP: "AUTHORIZATION",
    State.SASL_CHALLENGED: "AUTHORIZATION",
    State.LOGIN_PENDING: "AUTHORIZATION",
    State.TRANSACTION: "TRANSACTION",
    State.OPENING_MESSAGE: "TRANSACTION",
    State.UPDATE: "UPDATE",
    State.CLOSED: "UPDATE",
}


class ControlError(Exception):
    """The control socket cannot be used: the message names it."""


SessionRow = dict[str, Any]


class Sessions(Protocol):
    """What the control socket answers from: this process's sessions, or the workers'."""

    def who(self) -> Deferred[list[SessionRow]]: ...

    def kick(self, user: str) -> Deferred[int]: ...


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class LocalSessions:
    """The sessions of ``connections()`` (a factory's), served by process ``pid``."""

    def __init__(
        self, connections: Callable[[], Iterable[POP3Protocol]], *, pid: int | None = None
    ) -> None:
        self._connections = connections
        # Asked when needed: twistd may fork (daemonize) after this is made.
        self._pid = pid

    def _logged_in(self) -> list[POP3Protocol]:
        return [
            protocol
            for protocol in list(self._connections())
            if protocol.phase is not Phase.CLOSED and protocol.session.user is not None
        ]

    def who(self) -> Deferred[list[SessionRow]]:
        rows = []
        for protocol in self._logged_in():
            session = protocol.session
            since = protocol.driver.logged_in_at
            rows.append(
                {
                    "user": session.user,
                    "peer": session.peer,
                    "state": RFC_STATE[session.state],
                    "since": iso_time(since) if since is not None else None,
                    "worker": os.getpid() if self._pid is None else self._pid,
                }
            )
        rows.sort(key=lambda row: (row["user"], row["since"] or ""))
        return succeed(rows)

    def kick(self, user: str) -> Deferred[int]:
        kicked = 0
        for protocol in self._logged_in():
            state = protocol.session.state
            if protocol.session.user != user or state in (State.UPDATE, State.CLOSED):
                continue
            # Told why (-ERR [SYS/TEMP]), then dropped as a vanished client
            # is: no UPDATE (RFC 1939 section 6).
            protocol.kick()
            kicked += 1
        if kicked:
            log.info("kicked {count} sessions of {user}", count=kicked, user=user)
        return succeed(kicked)


class WorkerSessions:
    """In the parent of ``--workers``: the sessions of every worker, asked at ``PATH.PID``."""

    def __init__(
        self, reactor: IReactorUNIX, path: str, worker_pids: Callable[[], Sequence[int]]
    ) -> None:
        self._reactor = reactor
        self._path = path
        self._worker_pids = worker_pids

    def _ask_all(self, request: dict[str, str]) -> Deferred[list[dict[str, Any]]]:
        asked = [
            ask(self._reactor, worker_path(self._path, pid), request) for pid in self._worker_pids()
        ]

        def answers(results: list[tuple[bool, Any]]) -> list[dict[str, Any]]:
            found = []
            for ok, result in results:
                if ok:
                    found.append(result)
                else:
                    log.warn(
                        "a worker did not answer on its control socket: {error}",
                        error=cast(Failure, result).getErrorMessage(),
                    )
            return found

        return DeferredList(asked, consumeErrors=True).addCallback(answers)

    def who(self) -> Deferred[list[SessionRow]]:
        def merged(answers: list[dict[str, Any]]) -> list[SessionRow]:
            rows = [row for answer in answers for row in answer.get("sessions", [])]
            rows.sort(key=lambda row: (row["user"], row["since"] or ""))
            return rows

        return self._ask_all({"command": "who"}).addCallback(merged)

    def kick(self, user: str) -> Deferred[int]:
        return self._ask_all({"command": "kick", "user": user}).addCallback(
            lambda answers: sum(int(answer.get("kicked", 0)) for answer in answers)
        )


def worker_path(path: str, pid: int) -> str:
    """Where the worker with process id ``pid`` listens."""
    return f"{path}.{pid}"


class _ControlServer(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self._answered = False

    def lineReceived(self, line: bytes) -> None:
        if self._answered:
            return
        self._answered = True
        try:
            request = json.loads(line)
            command = request["command"] if isinstance(request, dict) else None
        except (ValueError, KeyError):
            command = None
        answer: Deferred[dict[str, Any]]
        if command == "who":
            answer = self._sessions.who().addCallback(lambda rows: {"sessions": rows})
        elif command == "kick" and isinstance(request.get("user"), str):
            answer = self._sessions.kick(request["user"]).addCallback(
                lambda count: {"kicked": count}
            )
        else:
            answer = succeed(
                {"error": 'expected {"command": "who"} or {"command": "kick", "user": NAME}'}
            )
        answer.addErrback(self._failed)
        answer.addCallback(self._reply)

    def _failed(self, failure: Failure) -> dict[str, Any]:
        log.failure("the control request failed", failure)
        return {"error": "internal error (logged)"}

    def _reply(self, answer: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(answer).encode() + b"\n")
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> int | None:
        self._answered = True
        self._reply({"error": "request too long"})
        return None


class ControlFactory(Factory):
    # Its own line says where it listens.
    noisy = False

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def buildProtocol(self, addr: object) -> _ControlServer:
        return _ControlServer(self.sessions)


class _Asker(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, request: dict[str, str]) -> None:
        self.request = request
        self.answer: Deferred[dict[str, Any]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(json.loads(line))
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.answer.called:
            self.answer.errback(reason)


def ask(reactor: IReactorUNIX, path: str, request: dict[str, str]) -> Deferred[dict[str, Any]]:
    """Send ``request`` to the control socket at ``path``; fires with its answer."""
    asker = _Asker(request)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=WORKER_TIMEOUT)
    connected = endpoint.connect(Factory.forProtocol(lambda: asker))
    clock = cast(IReactorTime, reactor)

    def give_up() -> None:
        if not asker.answer.called:
            asker.answer.errback(ControlError(f"{path}: no answer"))
            if asker.transport is not None:
                asker.transport.abortConnection()  # type: ignore[attr-defined]

    deadline = clock.callLater(WORKER_TIMEOUT, give_up)

    def done(result: object) -> object:
        if deadline.active():
            deadline.cancel()
        return result

    def not_connected(failure: Failure) -> None:
        if not asker.answer.called:
            asker.answer.errback(failure)

    connected.addErrback(not_connected)
    return asker.answer.addBoth(done)


def prepare_socket_path(path: str) -> None:
    """
    Make ``path`` free for a new control socket: refuse a link, a file that
    is not a socket and a socket a running server answers on; remove a
    socket of ours nobody answers on.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ControlError(f"--control {path}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ControlError(f"--control {path}: is a symbolic link; refusing to use it")
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"--control {path}: exists and is not a socket; refusing to replace it")
    if info.st_uid != os.geteuid():
        raise ControlError(f"--control {path}: a socket of another user; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Left by a server that is gone.
        os.unlink(path)
        return
    except OSError as error:
        raise ControlError(f"--control {path}: {error.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"--control {path}: a running server is listening there")


class ControlService(Service):
    """Listens on the control socket at ``path`` (mode 0600) for ``sessions``."""

    def __init__(self, reactor: IReactorUNIX, path: str, sessions: Sessions) -> None:
        self._reactor = reactor
        self.path = path
        self._sessions = sessions
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        prepare_socket_path(self.path)
        # Bound here, so that a failure stops the start with its reason.
        self._port = self._reactor.listenUNIX(self.path, ControlFactory(self._sessions), mode=0o600)
        log.info("control socket at {path}", path=self.path)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is None:
            return None
        return cast("Deferred[None]", port.stopListening())


# -- the client side (python -m pop3d who / kick) --------------------------------


def request(path: str, message: dict[str, str], timeout: float = 30.0) -> dict[str, Any]:
    """Blocking: send ``message`` to the control socket at ``path``; its answer."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        try:
            client.connect(path)
        except OSError as error:
            raise ControlError(
                f"cannot reach the pop3d control socket {path}: {error.strerror or error} "
                "(is twistd pop3d running with --control?)"
            ) from None
        client.sendall(json.dumps(message).encode() + b"\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError as error:
        raise ControlError(f"control socket {path}: {error}") from None
    finally:
        client.close()
    try:
        answer = json.loads(received)
    except ValueError:
        raise ControlError(f"control socket {path}: no answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"control socket {path}: unexpected answer")
    if "error" in answer:
        raise ControlError(f"control socket {path}: {answer['error']}")
    return answer


def format_who(rows: Sequence[SessionRow]) -> str:
    """A table: one line a session, as ``doveadm who`` prints."""
    header = ("USER", "PEER", "STATE", "SINCE", "WORKER")
    table = [header] + [
        (
            str(row["user"]),
            str(row["peer"]),
            str(row["state"]),
            str(row["since"] or "-"),
            str(row["worker"]),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in table
    )
