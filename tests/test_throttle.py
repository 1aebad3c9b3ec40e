"""
The failed-login delay as clients meet it (pop3d.throttle, like Dovecot's
auth penalty): 2, 4, 8, then at most 15 seconds for new guesses from one
address; a retry of the same wrong credentials does not raise it; trusted
networks are answered at once and not limited per address.  Time is a
Clock; replies are compared as literal bytes.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import poplib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from pop3d.driver import APOPCredentials
from pop3d.factory import POP3Factory
from pop3d.sasl.cram_md5 import CramMD5Credentials
from pop3d.session import SessionPolicy
from pop3d.tap import worker_factory
from pop3d.testing import deliver_to_maildir
from pop3d.throttle import CredentialFingerprints, FailureDelay, TrustedNetworks

from .conftest import USERS, Wire, start_service

#: RFC 1939 section 7 / RFC 3206 section 4: a failed login, [AUTH].
AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"
SEND_PASS = b"+OK send PASS\r\n"
#: RFC 1939 section 4, with an APOP timestamp (section 7).
GREETING = re.compile(rb"\+OK pop3d ready <[0-9a-f]+\.[0-9]+@pop\.example\.test>\r\n")
TOO_MANY = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"

#: Addresses far from loopback (documentation ranges).
CLIENT = IPv4Address("TCP", "198.51.100.7", 40000)
NEIGHBOUR = IPv4Address("TCP", "198.51.100.8", 40000)
WEBMAIL = IPv4Address("TCP", "192.0.2.10", 40000)


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.fixture
def penalised(make_factory: Callable[..., POP3Factory]) -> Callable[..., POP3Factory]:
    """Factories with the default 2 s delay; clients from afar may send passwords."""

    def make(**overrides: object) -> POP3Factory:
        options: dict[str, object] = {
            "login_failure_delay": 2,
            "policy": SessionPolicy(allow_plaintext_auth=True),
        }
        options.update(overrides)
        return make_factory(**options)

    return make


def answered_after(wire: Wire, clock: Clock, line: bytes) -> tuple[float, bytes]:
    """Send ``line``; how many seconds pass before it is answered, and the answer."""
    started = clock.seconds()
    answer = wire.command(line)
    while not answer and clock.seconds() - started < 60:
        # Quarter seconds add up exactly: no rounding at the boundary.
        clock.advance(0.25)
        answer = wire.take()
    return clock.seconds() - started, answer


def failed_login_delay(
    factory: POP3Factory,
    clock: Clock,
    password: bytes,
    user: bytes = b"alice",
    peer: IPv4Address | IPv6Address = CLIENT,
) -> float:
    """One USER/PASS with a wrong password, on a new connection: seconds to -ERR."""
    wire = Wire(factory, peer)  # type: ignore[arg-type]
    assert wire.command(b"USER " + user) == SEND_PASS
    seconds, answer = answered_after(wire, clock, b"PASS " + password)
    assert answer == AUTH_FAILED
    return seconds


class TestDelaySequence:
    def test_new_guesses_wait_2_4_8_then_15_seconds_at_most(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        guesses = [b"guess1", b"guess2", b"guess3", b"guess4", b"guess5", b"guess6"]
        delays = [failed_login_delay(factory, clock, guess) for guess in guesses]
        assert delays == [2, 4, 8, 15, 15, 15]

    def test_a_retried_wrong_password_keeps_the_delay_flat(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """A client polling with a stale saved password: 2 s each time, not 30."""
        factory = penalised()
        delays = [failed_login_delay(factory, clock, b"stale") for _ in range(6)]
        assert delays == [2, 2, 2, 2, 2, 2]

    def test_a_retry_waits_the_current_delay_without_raising_it(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """Behind one NAT address: a guesser raises the delay, a stale client does not."""
        factory = penalised()
        sequence = [b"stale", b"guess1", b"stale", b"stale", b"guess2", b"stale"]
        delays = [failed_login_delay(factory, clock, password) for password in sequence]
        assert delays == [2, 4, 4, 4, 8, 8]

    def test_the_same_password_for_another_user_is_a_new_guess(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        delays = [
            failed_login_delay(factory, clock, b"123456", user=user)
            for user in (b"alice", b"bob", b"mallory", b"alice")
        ]
        assert delays == [2, 4, 8, 8]

    def test_retries_on_one_connection_still_close_it_after_three(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        wire = Wire(penalised(), CLIENT)
        for _ in range(3):
            assert wire.command(b"USER alice") == SEND_PASS
            assert answered_after(wire, clock, b"PASS stale") == (2, AUTH_FAILED)
        assert wire.closed

    def test_sasl_plain_carries_the_password_so_its_retry_is_recognised(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """RFC 4616: the same stale password by AUTH PLAIN or USER/PASS is one guess."""
        factory = penalised()
        plain = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0stale")
        delays = []
        for _ in range(3):
            seconds, answer = answered_after(Wire(factory, CLIENT), clock, plain)
            assert answer == AUTH_FAILED
            delays.append(seconds)
        delays.append(failed_login_delay(factory, clock, b"stale"))
        assert delays == [2, 2, 2, 2]

    def test_apop_retries_cannot_be_recognised(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """
        RFC 1939 section 7: the digest covers the greeting's timestamp, new
        on every connection, so a retried APOP looks like a new guess.
        """
        factory = penalised()
        delays = []
        for _ in range(3):
            wire = Wire(factory, CLIENT)
            seconds, answer = answered_after(wire, clock, b"APOP alice " + b"0" * 32)
            assert answer == AUTH_FAILED
            delays.append(seconds)
        assert delays == [2, 4, 8]

    def test_an_address_is_forgiven_after_15_quiet_minutes(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        assert [failed_login_delay(factory, clock, g) for g in (b"a", b"b", b"c")] == [2, 4, 8]
        # 880 s after the 8 s answer: 888 s since the delay was raised.
        clock.advance(880)
        assert failed_login_delay(factory, clock, b"d") == 15
        clock.advance(901)
        assert failed_login_delay(factory, clock, b"e") == 2

    def test_a_guesser_kept_at_15_seconds_is_not_forgiven_while_it_guesses(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        guesses = [b"a", b"b", b"c", b"d"]
        assert [failed_login_delay(factory, clock, g) for g in guesses] == [2, 4, 8, 15]
        for guess in (b"e", b"f", b"g", b"h"):
            clock.advance(600)
            assert failed_login_delay(factory, clock, guess) == 15
        # A retry is no guess: it does not keep the address remembered.
        clock.advance(600)
        assert failed_login_delay(factory, clock, b"h") == 15
        clock.advance(600)
        assert failed_login_delay(factory, clock, b"h") == 2

    def test_other_addresses_have_their_own_delay(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        assert [failed_login_delay(factory, clock, g) for g in (b"a", b"b", b"c")] == [2, 4, 8]
        assert failed_login_delay(factory, clock, b"a", peer=NEIGHBOUR) == 2

    def test_zero_turns_the_delay_off(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised(login_failure_delay=0)
        guesses = [b"a", b"b", b"c", b"d", b"d", b"e"]
        assert [failed_login_delay(factory, clock, g) for g in guesses] == [0, 0, 0, 0, 0, 0]


class TestIPv6:
    def test_addresses_of_one_64_share_a_delay(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """A guesser cannot start afresh from each address of its /64."""
        factory = penalised()
        same_lan = [IPv6Address("TCP", f"2001:db8::{n}", 40000) for n in (1, 2, 3)]
        delays = [
            failed_login_delay(factory, clock, b"guess%d" % n, peer=peer)
            for n, peer in enumerate(same_lan)
        ]
        assert delays == [2, 4, 8]
        other_lan = IPv6Address("TCP", "2001:db8:0:1::1", 40000)
        assert failed_login_delay(factory, clock, b"guess", peer=other_lan) == 2

    def test_an_ipv4_client_on_an_ipv6_socket_counts_as_its_ipv4_address(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised()
        mapped = IPv6Address("TCP", "::ffff:198.51.100.7", 40000)
        assert failed_login_delay(factory, clock, b"a", peer=CLIENT) == 2
        assert failed_login_delay(factory, clock, b"b", peer=mapped) == 4

    def test_a_trusted_ipv6_network_is_answered_at_once(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised(trusted_networks=[network("2001:db8::/64")])
        inside = IPv6Address("TCP", "2001:db8::5", 40000)
        outside = IPv6Address("TCP", "2001:db8:1::5", 40000)
        assert [failed_login_delay(factory, clock, g, peer=inside) for g in (b"a", b"b")] == [0, 0]
        assert failed_login_delay(factory, clock, b"a", peer=outside) == 2


class TestTrustedNetworks:
    def test_failures_are_answered_at_once_and_do_not_close(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """A webmail host relays many users' logins, some of them mistyped."""
        factory = penalised(trusted_networks=[network("192.0.2.10/32")])
        wire = Wire(factory, WEBMAIL)
        for guess in (b"a", b"b", b"c", b"d", b"e"):
            assert wire.command(b"USER alice") == SEND_PASS
            assert wire.command(b"PASS " + guess) == AUTH_FAILED
        assert not wire.closed
        assert wire.login(b"bob", b"builder") == b"+OK maildrop has 0 messages (0 octets)\r\n"
        # Nothing was recorded against the host: its neighbour starts at 2 s.
        assert failed_login_delay(factory, clock, b"a", peer=NEIGHBOUR) == 2

    def test_an_ipv4_mapped_peer_is_matched_against_ipv4_networks(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised(trusted_networks=[network("192.0.2.0/24")])
        mapped = IPv6Address("TCP", "::ffff:192.0.2.10", 40000)
        assert failed_login_delay(factory, clock, b"a", peer=mapped) == 0

    def test_untrusted_neighbours_still_wait(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        factory = penalised(trusted_networks=[network("192.0.2.10/32")])
        outside = IPv4Address("TCP", "192.0.2.11", 40000)
        assert [failed_login_delay(factory, clock, g, peer=outside) for g in (b"a", b"b")] == [
            2,
            4,
        ]

    def test_not_limited_per_address(self, penalised: Callable[..., POP3Factory]) -> None:
        """The per-address limit still refuses others (RFC 3206 section 4: SYS/TEMP)."""
        factory = penalised(max_connections_per_ip=1, trusted_networks=[network("192.0.2.10/32")])
        webmail = [Wire(factory, WEBMAIL) for _ in range(3)]
        assert all(GREETING.fullmatch(w.greeting) for w in webmail)
        Wire(factory, CLIENT)
        refused = Wire(factory, CLIENT)
        assert refused.greeting == TOO_MANY
        assert refused.closed

    def test_behind_the_proxy_protocol_the_real_client_is_judged(
        self, penalised: Callable[..., POP3Factory], clock: Clock
    ) -> None:
        """
        Behind HAProxy (``haproxy:`` endpoints) the delay is for the client the
        PROXY header names, not for the proxy every client comes through.
        """
        factory = penalised(trusted_networks=[network("192.0.2.10/32")])
        proxied = worker_factory("haproxy:tcp:110", factory, None)
        proxy = IPv4Address("TCP", "10.0.0.1", 50000)

        def delay_for(client: str, password: bytes) -> float:
            protocol = proxied.buildProtocol(proxy)
            transport = StringTransport(peerAddress=proxy)
            protocol.makeConnection(transport)
            protocol.dataReceived(f"PROXY TCP4 {client} 192.0.2.1 40000 110\r\n".encode())
            protocol.dataReceived(b"USER alice\r\n")
            assert GREETING.fullmatch(transport.value().removesuffix(SEND_PASS))
            transport.clear()
            started = clock.seconds()
            protocol.dataReceived(b"PASS " + password + b"\r\n")
            while not transport.value() and clock.seconds() - started < 60:
                clock.advance(0.25)
            assert transport.value() == AUTH_FAILED
            return clock.seconds() - started

        assert delay_for("192.0.2.10", b"a") == 0
        assert [delay_for("198.51.100.7", g) for g in (b"a", b"b")] == [2, 4]
        # Another client behind the same proxy starts afresh.
        assert delay_for("198.51.100.8", b"a") == 2

    def test_behind_the_proxy_protocol_connections_count_per_client(
        self, penalised: Callable[..., POP3Factory]
    ) -> None:
        """
        ``--max-connections-per-ip`` behind HAProxy counts the clients the PROXY
        headers name, not the proxy all of them come through (RFC 3206
        section 4: SYS/TEMP, try again later).
        """
        factory = penalised(max_connections_per_ip=2)
        proxied = worker_factory("haproxy:tcp:110", factory, None)
        proxy = IPv4Address("TCP", "10.0.0.1", 50000)

        def connect(client: str) -> tuple[StringTransport, Any]:
            protocol = proxied.buildProtocol(proxy)
            transport = StringTransport(peerAddress=proxy)
            protocol.makeConnection(transport)
            protocol.dataReceived(f"PROXY TCP4 {client} 192.0.2.1 40000 110\r\n".encode())
            return transport, protocol

        # Five clients behind one proxy: each is served.
        for n in range(5):
            transport, protocol = connect(f"198.51.100.{10 + n}")
            protocol.dataReceived(b"USER alice\r\n")
            assert GREETING.fullmatch(transport.value().removesuffix(SEND_PASS))
        # One client's third connection: greeted before its address was
        # known, refused at its first command, and hung up.
        kept = [connect("198.51.100.7") for _ in range(2)]
        for transport, protocol in kept:
            protocol.dataReceived(b"CAPA\r\n")
            assert not transport.disconnecting
        third, protocol = connect("198.51.100.7")
        protocol.dataReceived(b"USER alice\r\n")
        greeting, refusal = third.value().split(b"\r\n", 1)
        assert GREETING.fullmatch(greeting + b"\r\n")
        assert refusal == TOO_MANY
        assert third.disconnecting
        # A PROXY v2 header (HAProxy's send-proxy-v2) names the client too.
        v2 = (
            b"\r\n\r\n\x00\r\nQUIT\n"  # signature
            + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 octets
            + bytes([198, 51, 100, 7, 192, 0, 2, 1])
            + (40001).to_bytes(2, "big")
            + (110).to_bytes(2, "big")
        )
        protocol = proxied.buildProtocol(proxy)
        transport = StringTransport(peerAddress=proxy)
        protocol.makeConnection(transport)
        protocol.dataReceived(v2 + b"CAPA\r\n")
        assert transport.value().endswith(b"\r\n" + TOO_MANY)
        # Once one of the client's connections closed, it may open another.
        kept[0][1].connectionLost(None)
        transport, protocol = connect("198.51.100.7")
        protocol.dataReceived(b"USER alice\r\n")
        assert GREETING.fullmatch(transport.value().removesuffix(SEND_PASS))


class TestFingerprints:
    """Retries are recognised without keeping any password."""

    def test_a_fingerprint_is_a_short_keyed_digest(self) -> None:
        fingerprints = CredentialFingerprints()
        stale = UsernamePassword(b"alice", b"stale")
        fingerprint = fingerprints(stale)
        assert fingerprint is not None and len(fingerprint) == 8
        assert fingerprints(UsernamePassword(b"alice", b"stale")) == fingerprint
        assert fingerprints(UsernamePassword("alice", "stale")) == fingerprint  # type: ignore[arg-type]
        for plain in (hashlib.sha256(b"alicestale").digest(), hashlib.md5(b"stale").digest()):
            assert fingerprint not in plain
        # Another process (another key) cannot match them.
        assert CredentialFingerprints()(stale) != fingerprint

    def test_user_name_and_password_cannot_trade_bytes(self) -> None:
        fingerprints = CredentialFingerprints()
        assert fingerprints(UsernamePassword(b"ab", b"c")) != fingerprints(
            UsernamePassword(b"a", b"bc")
        )

    def test_challenge_responses_have_none(self) -> None:
        fingerprints = CredentialFingerprints()
        apop = APOPCredentials(b"<1.2@host>", b"alice", b"0" * 32)
        cram = CramMD5Credentials(b"alice", b"<1.2@host>", b"0" * 32)
        assert fingerprints(apop) is None
        assert fingerprints(cram) is None

    def test_the_last_ten_credentials_of_an_address_are_recognised(self) -> None:
        # A maximum out of reach shows every raise.
        throttle = FailureDelay(Clock(), base=1, maximum=1e9)
        guesses = [UsernamePassword(b"alice", b"guess%d" % n) for n in range(11)]
        delays = [throttle.delay_for_failure("198.51.100.7", guess) for guess in guesses]
        assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        assert throttle.delay_for_failure("198.51.100.7", guesses[10]) == 1024
        assert throttle.delay_for_failure("198.51.100.7", guesses[1]) == 1024
        # The eleventh from last was forgotten: a new guess again.
        assert throttle.delay_for_failure("198.51.100.7", guesses[0]) == 2048


class TestTrustedNetworkMatching:
    def test_hosts_that_are_no_ip_address_are_never_trusted(self) -> None:
        everything = TrustedNetworks([network("0.0.0.0/0"), network("::/0")])
        assert "/run/pop3d/pop3.sock" not in everything
        assert "198.51.100.7" in everything
        assert "2001:db8::1" in everything
        assert "fe80::1%eth0" in everything

    def test_no_networks_trust_nobody(self) -> None:
        assert "127.0.0.1" not in TrustedNetworks()


@pytest_twisted.ensureDeferred
async def test_twistd_trusted_network_keeps_a_webmail_connection_open(tmp_path: Path) -> None:
    """
    End to end, ``--trusted-network`` as given to ``twistd pop3d``: poplib
    fails four logins on one connection, each answered at once (untrusted,
    they would wait 2 and 4 s and the third would close it), then logs in.
    """
    server = await start_service(
        tmp_path, ["tcp:0:interface=127.0.0.1"], ["--trusted-network", "127.0.0.1/32"]
    )
    # 19 bytes, 22 with CRLF line ends (RFC 1939 section 5: octets as sent).
    deliver_to_maildir(str(server.maildir("alice")), b"Subject: hi\n\nhello\n")

    def webmail() -> list[bytes]:
        client = poplib.POP3(server.host, server.port, timeout=10)
        answers = []
        for guess in ("typo1", "typo2", "typo3", "typo4"):
            client.user("alice")
            with pytest.raises(poplib.error_proto) as refused:
                client.pass_(guess)
            answers.append(refused.value.args[0])
        client.user("alice")
        answers.append(client.pass_(USERS["alice"]))
        client.quit()
        return answers

    try:
        answers = await deferToThread(webmail)
    finally:
        await server.service.stopService()
    assert answers == [b"-ERR [AUTH] invalid user name or password"] * 4 + [
        b"+OK maildrop has 1 messages (22 octets)"
    ]
