"""
Several pop3d instances behind a real HAProxy (Debian's ``haproxy``), as
``docs/scaling.rst`` describes them: the configuration is
``contrib/haproxy/haproxy.cfg`` with loopback addresses, no daemon and no
syslog (HAProxy logs to its stderr, read by the test).  Two ``twistd pop3d``
processes listen with ``haproxy:`` endpoints on one Maildir root with
``--nfs-locks``; each says who it is in its APOP timestamp (``--hostname``).

Clients connect from addresses of their own in 127.0.0.0/8, so that the
client a pop3d names (the one the PROXY header gives) can be told from
HAProxy, which connects from 127.0.0.1.  Readiness is a line of output
(pop3d's listening port, HAProxy's first successful health check), never a
sleep.
"""

from __future__ import annotations

import poplib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3d.testing import deliver_to_maildir

from .conftest import require_program
from .test_endpoints import _self_signed
from .test_process import HOST, PATIENCE, Server, write_passwd

pytestmark = [pytest.mark.process, pytest.mark.peer]

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"
INSTANCES = ("mail-a", "mail-b")
POP3_PORT = re.compile(r"POP3Factory \(PROXY\) starting on (\d+)")
POP3S_PORT = re.compile(r"POP3Factory \(TLS\) \(PROXY\) starting on (\d+)")
#: RFC 1939 section 4 greeting with the section 7 timestamp naming the instance.
GREETING = re.compile(rb"\+OK pop3d ready <[0-9a-f]+\.[0-9]+@(mail-[ab])>")
#: RFC 3206 section 4: SYS/TEMP, the client may try again later.
TOO_MANY = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
#: pop3d's line at the end of a session (pop3d.driver), with the peer's address.
SESSION_LOG = re.compile(r"session [^:\n]+: user=\"(\w+)\" peer=([0-9.]+):")
MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n", b"Subject: three\n\n.third\n"]
#: What poplib hands back for each (lines without CRLF, a leading dot unstuffed).
RECEIVED = [
    [b"Subject: one", b"", b"first"],
    [b"Subject: two", b"", b"second"],
    [b"Subject: three", b"", b".third"],
]


def _sessions_logged(server: Server, expected: int) -> list[tuple[str, str]]:
    """
    (user, peer) of each session ``server`` logged, once it has logged
    ``expected`` of them (or PATIENCE passed): a session's line comes just
    after its "+OK bye", and the server's output is read by a thread.
    """
    deadline = time.monotonic() + PATIENCE
    while len(sessions := SESSION_LOG.findall(server.output)) < expected:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or server.next_line(remaining) is None:
            break
    return sessions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def generated_config(pop3: int, pop3s: int, backends: dict[str, tuple[int, int]]) -> str:
    """The contrib configuration on loopback ports, in the foreground, logging to stderr."""
    text = CONTRIB.read_text()
    replacements = [
        ("    log /dev/log local0\n", "    log stderr format raw local0\n"),
        ("    user haproxy\n", ""),
        ("    group haproxy\n", ""),
        ("    daemon\n", ""),
        # Within an unprivileged process's descriptor limit.
        ("    maxconn 20000\n", "    maxconn 200\n"),
        # Each check's outcome is logged: the test waits for the first.
        ("    option tcp-check\n", "    option tcp-check\n    option log-health-checks\n"),
        ("    bind :110\n", f"    bind {HOST}:{pop3}\n"),
        ("    bind :995\n", f"    bind {HOST}:{pop3s}\n"),
        ("192.0.2.11:110", f"{HOST}:{backends['mail-a'][0]}"),
        ("192.0.2.12:110", f"{HOST}:{backends['mail-b'][0]}"),
        ("192.0.2.11:995", f"{HOST}:{backends['mail-a'][1]}"),
        ("192.0.2.12:995", f"{HOST}:{backends['mail-b'][1]}"),
    ]
    for old, new in replacements:
        assert old in text, f"contrib/haproxy/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Client(poplib.POP3):
    """A poplib client connecting from ``source``, an address of 127.0.0.0/8."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__(HOST, port, timeout=PATIENCE)
        match = GREETING.fullmatch(self.getwelcome())
        assert match is not None, self.getwelcome()
        #: Which pop3d answered.
        self.instance = match.group(1).decode()

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )

    def log_in(self, user: str = "alice") -> bytes:
        self.user(user)
        return self.pass_("wonderland")


class Cluster:
    """HAProxy in front of two pop3d processes sharing one Maildir root."""

    def __init__(self, tmp_path: Path, *pop3d_options: str) -> None:
        require_program("haproxy")
        self.started: list[Server] = []
        self.mail_root = tmp_path / "mail"
        users = ["alice", *(f"user{n}" for n in range(8))]
        passwd = write_passwd(tmp_path, "".join(f"{u}:{{PLAIN}}wonderland::\n" for u in users))
        key, cert = _self_signed(tmp_path)
        self.instances: dict[str, Server] = {}
        backends: dict[str, tuple[int, int]] = {}
        for name in INSTANCES:
            server = self._start(
                [
                    "-n",
                    "--pidfile=",
                    "pop3d",
                    "--listen",
                    f"haproxy:tcp:0:interface={HOST}",
                    "--listen",
                    f"haproxy:ssl:0:interface={HOST}",
                    "--tls-cert",
                    str(cert),
                    "--tls-key",
                    str(key),
                    "--hostname",
                    name,
                    "--nfs-locks",
                    "--mail-location",
                    f"maildir:{self.mail_root}/{{user}}",
                    "--auth",
                    f"passwd-file:{passwd}",
                    *pop3d_options,
                ],
                tmp_path,
            )
            pop3 = int(server.wait_for(POP3_PORT).group(1))
            pop3s = int(server.wait_for(POP3S_PORT).group(1))
            self.instances[name] = server
            backends[name] = (pop3, pop3s)
        self.pop3, self.pop3s = free_port(), free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(generated_config(self.pop3, self.pop3s, backends))
        self.haproxy = self._start(["-db", "-f", str(config)], tmp_path, ["haproxy"])
        # Ready once every server passed its first health check: HAProxy
        # listens, and it found each pop3d's "+OK" greeting through a PROXY
        # header (and, for POP3S, through TLS).
        waiting = {f"{backend}/{name}" for backend in ("pop3d", "pop3d-tls") for name in INSTANCES}
        passed = re.compile(r"^Health check for server (\S+) succeeded")
        while waiting:
            waiting.discard(self.haproxy.wait_for(passed).group(1))

    def _start(self, arguments: list[str], cwd: Path, *program: list[str]) -> Server:
        server = Server(arguments, cwd, *program)
        self.started.append(server)
        return server

    def connect(self, source: str) -> Client:
        return Client(source, self.pop3)

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def cluster_options() -> list[str]:
    return []


@pytest.fixture
def cluster(tmp_path: Path, cluster_options: list[str]) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, *cluster_options)
    try:
        yield cluster
    finally:
        cluster.stop()


def raw_first_command(cluster: Cluster, source: str) -> tuple[bytes, bytes]:
    """Connect from ``source``; the greeting, and everything answered to USER until EOF."""
    with socket.create_connection(
        (HOST, cluster.pop3), PATIENCE, source_address=(source, 0)
    ) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        sock.sendall(b"USER alice\r\n")
        return greeting, reader.read()


@pytest.mark.parametrize("cluster_options", [["--max-connections-per-ip", "1"]])
def test_sessions_spread_and_each_client_is_judged_by_its_own_address(
    cluster: Cluster,
) -> None:
    """
    Sessions are spread over both instances (leastconn); each pop3d counts
    ``--max-connections-per-ip`` (here 1) and logs by the address of the client
    the PROXY header names, not by HAProxy's 127.0.0.1.
    """
    users = [f"user{n}" for n in range(8)]
    for user in users:
        deliver_to_maildir(str(cluster.mail_root / user), MESSAGES[0])
    # Six clients at once: more than one per instance, so HAProxy's own
    # address could not have been what was counted.
    clients = [cluster.connect(f"127.0.0.{20 + n}") for n in range(6)]
    try:
        assert sorted(client.instance for client in clients) == ["mail-a"] * 3 + ["mail-b"] * 3
        for user, client in zip(users, clients, strict=False):
            assert client.log_in(user) == b"+OK maildrop has 1 messages (23 octets)"
        # One client's own connections: one per instance is served, a third
        # is greeted (its address arrives with the PROXY header, after the
        # greeting) and refused at its first command.
        held = [cluster.connect("127.0.0.7") for _ in INSTANCES]
        assert sorted(client.instance for client in held) == sorted(INSTANCES)
        for user, client in zip(users[6:], held, strict=True):
            assert client.log_in(user) == b"+OK maildrop has 1 messages (23 octets)"
        greeting, answer = raw_first_command(cluster, "127.0.0.7")
        assert GREETING.fullmatch(greeting.removesuffix(b"\r\n"))
        assert answer == TOO_MANY
        for client in clients + held:
            assert client.quit() == b"+OK bye"
    finally:
        for client in clients + held:
            client.close()
    refusals = [
        line
        for server in cluster.instances.values()
        for line in server.lines
        if "too many connections" in line
    ]
    assert len(refusals) == 1 and "refusing connection from 127.0.0.7:" in refusals[0], refusals
    for server in cluster.instances.values():
        server.assert_healthy()
        sessions = _sessions_logged(server, 4)
        assert len(sessions) == 4, server.output
        assert "127.0.0.1" not in [peer for _, peer in sessions], server.output
    served = {
        (user, client.source, client.instance)
        for user, client in zip(users, clients + held, strict=True)
    }
    logged = {
        (user, peer, name)
        for name, server in cluster.instances.items()
        for user, peer in SESSION_LOG.findall(server.output)
    }
    assert logged == served


def test_one_maildrop_is_never_served_by_both_instances(cluster: Cluster) -> None:
    """
    RFC 1939 section 4 / RFC 2449 section 8.1.2: a maildrop another session
    holds is refused with [IN-USE], whichever instance holds it; POP3S is
    passed through HAProxy to pop3d's implicit TLS and shares the lock.
    """
    deliver_to_maildir(str(cluster.mail_root / "alice"), MESSAGES[0])
    holder = cluster.connect("127.0.0.31")
    try:
        assert holder.log_in() == b"+OK maildrop has 1 messages (23 octets)"
        # leastconn: the holder's instance has a session, the other none.
        contender = cluster.connect("127.0.0.32")
        try:
            assert contender.instance != holder.instance
            contender.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                contender.pass_("wonderland")
            assert refused.value.args[0] == b"-ERR [IN-USE] maildrop is locked by another session"
        finally:
            contender.close()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        secure = poplib.POP3_SSL(HOST, cluster.pop3s, context=context, timeout=PATIENCE)
        try:
            assert GREETING.fullmatch(secure.getwelcome())
            secure.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                secure.pass_("wonderland")
            assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
        finally:
            secure.close()
        assert holder.stat() == (1, 23)
        assert holder.quit() == b"+OK bye"
    finally:
        holder.close()
    for server in cluster.instances.values():
        server.assert_healthy()


def test_after_an_instance_is_killed_the_other_serves_every_message_once(
    cluster: Cluster,
) -> None:
    """
    SIGKILL one instance in the middle of a session: new sessions go to the
    other, which sees exactly the messages left: what a session deleted and
    QUIT is gone (RFC 1939 section 6), what the killed session marked with
    DELE is kept (it never reached UPDATE), and its lock does not hold.
    """
    maildir = cluster.mail_root / "alice"
    for message in MESSAGES:
        deliver_to_maildir(str(maildir), message)
    first = cluster.connect("127.0.0.41")
    try:
        assert first.log_in().startswith(b"+OK maildrop has 3 messages")
        uidls = [line.split()[1] for line in first.uidl()[1]]
        assert first.retr(1)[1] == RECEIVED[0]
        assert first.dele(1) == b"+OK message 1 deleted"
        assert first.quit().startswith(b"+OK")
    finally:
        first.close()

    doomed = cluster.connect("127.0.0.42")
    victim = cluster.instances[doomed.instance]
    survivor = next(name for name in INSTANCES if name != doomed.instance)
    try:
        assert doomed.log_in().startswith(b"+OK maildrop has 2 messages")
        assert doomed.retr(1)[1] == RECEIVED[1]
        assert doomed.dele(1) == b"+OK message 1 deleted"
        victim.kill()
    finally:
        doomed.close()

    # Until its health check notices, HAProxy learns that the host is dead
    # from a refused connection (retries, then redispatch to the other); a
    # bounded number of attempts is enough either way.
    served_by: list[str] = []
    for n in range(4):
        for _ in range(10):
            try:
                client = cluster.connect(f"127.0.0.{43 + n}")
            except (OSError, poplib.error_proto, AssertionError):
                continue
            try:
                served_by.append(client.instance)
                assert client.log_in() == b"+OK maildrop has 2 messages (50 octets)"
                assert [line.split()[1] for line in client.uidl()[1]] == uidls[1:]
                assert [client.retr(n)[1] for n in (1, 2)] == RECEIVED[1:]
                assert client.quit() == b"+OK bye"
            finally:
                client.close()
            break
    assert served_by == [survivor] * 4
    # The health check notices too: every later session is the survivor's.
    cluster.haproxy.wait_for(re.compile(rf"Server pop3d/{doomed.instance} is DOWN"))
    for n in range(3):
        client = cluster.connect(f"127.0.0.{50 + n}")
        try:
            assert client.instance == survivor
            assert client.log_in() == b"+OK maildrop has 2 messages (50 octets)"
            assert client.quit() == b"+OK bye"
        finally:
            client.close()
    cluster.instances[survivor].assert_healthy()
    remaining = sorted(path.name for path in (maildir / "cur").iterdir()) + sorted(
        path.name for path in (maildir / "new").iterdir()
    )
    assert [name.split(":")[0] for name in remaining] == sorted(uidl.decode() for uidl in uidls[1:])
