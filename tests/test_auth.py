"""
Authentication beyond USER/PASS, bytes in and bytes out: SASL AUTH
(RFC 5034, RFC 4616 PLAIN, RFC 2195 CRAM-MD5, LOGIN), STLS (RFC 2595) and the
plaintext policy (RFC 2595 section 2.3, RFC 8314 section 4.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import Attribute, alsoProvides, implementer

from pop3d.checkers import PasswdFileChecker
from pop3d.credchecks import PASSWORD_CHECKS, PasswordCheck, PasswordChecks, PasswordLookup
from pop3d.factory import DEFAULT_MECHANISMS, POP3Factory
from pop3d.passwords import PasswordScheme
from pop3d.realm import MaildropRealm
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    IVerifiers,
    SASLError,
    SASLFailure,
)
from pop3d.tap import build_portal
from pop3d.testing import MemoryStore
from pop3d.tls import ServerTLS

from .conftest import Wire

REMOTE_PEER = IPv4Address("TCP", "198.51.100.7", 50000)


AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"
DISALLOWED = b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def continuation(line: bytes) -> bytes:
    """The data of a ``+ base64`` line."""
    assert line.startswith(b"+ ") and line.endswith(b"\r\n"), line
    return base64.b64decode(line[2:-2])


def capabilities(wire: Wire) -> list[bytes]:
    answer = wire.command(b"CAPA")
    assert answer.startswith(b"+OK capability list follows\r\n")
    return answer.split(b"\r\n")[1:-2]


class _TLSCapableTransport(StringTransport):
    """A StringTransport that can "start TLS", as a TCP transport can."""

    def __init__(self, peerAddress: IPv4Address) -> None:
        super().__init__(peerAddress=peerAddress)
        self.tls_started_with: object = None
        self.buffered_before_tls = b""

    def startTLS(self, context_factory: object) -> None:
        self.tls_started_with = context_factory
        alsoProvides(self, ISSLTransport)


class TLSWire(Wire):
    def __init__(self, factory: POP3Factory, peer: IPv4Address = REMOTE_PEER) -> None:
        super().__init__(factory, peer, _TLSCapableTransport(peer))


@pytest.fixture
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    from .test_endpoints import _self_signed

    key, cert = _self_signed(tmp_path_factory.mktemp("tls"))
    return ServerTLS(str(cert), str(key))


@pytest.fixture
def local(factory: POP3Factory, store: MemoryStore) -> Wire:
    store.deliver("alice", b"Subject: hi\n\nhi\n")
    return Wire(factory)


class TestSASL:
    """RFC 5034 section 4 (AUTH), with the mechanisms' own RFCs."""

    def test_auth_without_argument_lists_mechanisms(self, local: Wire) -> None:
        assert local.command(b"AUTH") == (
            b"+OK available authentication mechanisms\r\n" + b"CRAM-MD5\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        )

    def test_plain_with_initial_response(self, local: Wire) -> None:
        """RFC 4616 section 2: [authzid] NUL authcid NUL passwd."""
        answer = local.command(b"AUTH PLAIN " + b64(b"\x00alice\x00wonderland"))
        assert answer.startswith(b"+OK maildrop has 1 messages")

    def test_plain_without_initial_response(self, local: Wire) -> None:
        assert local.command(b"AUTH PLAIN") == b"+ \r\n"
        answer = local.command(b64(b"alice\x00alice\x00wonderland"))
        assert answer.startswith(b"+OK maildrop has 1")

    def test_plain_wrong_password(self, local: Wire) -> None:
        assert local.command(b"AUTH PLAIN " + b64(b"\x00alice\x00nope")) == AUTH_FAILED
        # As if AUTH never happened: the session goes on in AUTHORIZATION.
        assert local.command(b"STAT") == b"-ERR command not valid in this state\r\n"

    def test_plain_refuses_another_authorization_identity(self, local: Wire) -> None:
        answer = local.command(b"AUTH PLAIN " + b64(b"bob\x00alice\x00wonderland"))
        assert answer.startswith(b"-ERR [AUTH] ")
        assert answer == b"-ERR [AUTH] not authorized to act as another user\r\n"

    @pytest.mark.parametrize(
        "command,reply",
        [
            (b"AUTH PLAIN " + b64(b"\x00alice"), b"-ERR malformed PLAIN response\r\n"),
            (
                b"AUTH PLAIN " + b64("\x00alice\x00wönder\x07land".encode()),
                b"-ERR the user name or password contains characters that are not allowed\r\n",
            ),
            (b"AUTH CRAM-MD5 " + b64(b"alice"), b"-ERR CRAM-MD5 takes no initial response\r\n"),
        ],
    )
    def test_a_mechanisms_refusal_is_worded_by_the_server(
        self, local: Wire, command: bytes, reply: bytes
    ) -> None:
        """RFC 5034 section 4: a failed exchange is -ERR, no [AUTH] unless about identity."""
        assert local.command(command) == reply

    @pytest.mark.parametrize(
        "response", [b"\x00alice", b"alice", b"\x00\x00pw", b"a\x00b\x00c\x00d"]
    )
    def test_plain_malformed(self, local: Wire, response: bytes) -> None:
        assert local.command(b"AUTH PLAIN " + b64(response)).startswith(b"-ERR ")

    def test_empty_initial_response_is_an_equals_sign(self, local: Wire) -> None:
        """RFC 5034 section 4: "=" stands for an empty initial response."""
        assert local.command(b"AUTH PLAIN =").startswith(b"-ERR ")

    def test_login(self, local: Wire) -> None:
        assert continuation(local.command(b"AUTH LOGIN")) == b"Username:"
        assert continuation(local.command(b64(b"alice"))) == b"Password:"
        assert local.command(b64(b"wonderland")).startswith(b"+OK maildrop has 1")

    def test_login_with_initial_response(self, local: Wire) -> None:
        assert continuation(local.command(b"AUTH LOGIN " + b64(b"alice"))) == b"Password:"
        assert local.command(b64(b"wonderland")).startswith(b"+OK")

    def test_cram_md5(self, local: Wire) -> None:
        """RFC 2195 section 2."""
        challenge = continuation(local.command(b"AUTH CRAM-MD5"))
        assert challenge.startswith(b"<") and challenge.endswith(b"@pop.example.test>")
        digest = hmac.new(b"wonderland", challenge, hashlib.md5).hexdigest().encode()
        assert local.command(b64(b"alice " + digest)).startswith(b"+OK maildrop has 1")

    def test_cram_md5_wrong_digest(self, local: Wire) -> None:
        challenge = continuation(local.command(b"AUTH CRAM-MD5"))
        digest = hmac.new(b"nope", challenge, hashlib.md5).hexdigest().encode()
        assert local.command(b64(b"alice " + digest)) == AUTH_FAILED

    def test_cram_md5_challenges_differ(self, factory: POP3Factory) -> None:
        first = continuation(Wire(factory).command(b"AUTH CRAM-MD5"))
        second = continuation(Wire(factory).command(b"AUTH CRAM-MD5"))
        assert first != second

    def test_cram_md5_takes_no_initial_response(self, local: Wire) -> None:
        assert local.command(b"AUTH CRAM-MD5 " + b64(b"x")).startswith(b"-ERR ")

    def test_cancel(self, local: Wire) -> None:
        """RFC 5034 section 4: "*" cancels the exchange with -ERR."""
        local.command(b"AUTH LOGIN")
        assert local.command(b"*") == b"-ERR authentication cancelled\r\n"
        assert local.login().startswith(b"+OK")

    def test_bad_base64_in_a_response(self, local: Wire) -> None:
        local.command(b"AUTH LOGIN")
        assert local.command(b"not base64!") == b"-ERR invalid base64\r\n"
        assert local.command(b"CAPA").startswith(b"+OK")

    def test_bad_base64_in_the_initial_response(self, local: Wire) -> None:
        assert local.command(b"AUTH PLAIN ***") == b"-ERR invalid base64\r\n"

    def test_unknown_mechanism(self, local: Wire) -> None:
        assert local.command(b"AUTH X-NOPE") == b"-ERR unsupported authentication mechanism\r\n"

    def test_mechanism_names_are_case_insensitive(self, local: Wire) -> None:
        assert local.command(b"AUTH plain " + b64(b"\x00alice\x00wonderland")).startswith(b"+OK")

    def test_long_responses_are_accepted(self, local: Wire) -> None:
        long_password = b"p" * 3000
        answer = local.command(b"AUTH PLAIN " + b64(b"\x00alice\x00" + long_password))
        assert answer == AUTH_FAILED

    def test_auth_after_login_is_refused(self, local: Wire) -> None:
        local.login()
        assert local.command(b"AUTH PLAIN").startswith(b"-ERR ")

    def test_sasl_stays_in_capa_after_login(self, local: Wire) -> None:
        before = capabilities(local)
        local.login()
        after = capabilities(local)
        assert b"SASL CRAM-MD5 PLAIN LOGIN" in before and b"SASL CRAM-MD5 PLAIN LOGIN" in after

    def test_failed_sasl_logins_count_towards_the_limit(self, local: Wire) -> None:
        for _ in range(3):
            local.command(b"AUTH PLAIN " + b64(b"\x00alice\x00nope"))
        assert local.closed


class TestPlaintextPolicy:
    """RFC 2595 section 2.3, RFC 8314 section 4.1: no cleartext passwords
    over a connection that is neither encrypted nor local."""

    @pytest.fixture
    def remote(self, factory: POP3Factory, store: MemoryStore) -> Wire:
        store.deliver("alice", b"Subject: hi\n\nhi\n")
        return Wire(factory, REMOTE_PEER)

    def test_user_is_refused_the_same_whatever_the_credentials(self, remote: Wire) -> None:
        assert remote.command(b"USER alice") == DISALLOWED
        assert remote.command(b"USER mallory") == DISALLOWED

    @pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
    def test_password_mechanisms_are_refused(self, remote: Wire, mechanism: bytes) -> None:
        assert remote.command(b"AUTH " + mechanism) == DISALLOWED

    def test_capa_does_not_offer_what_would_be_refused(self, remote: Wire) -> None:
        offered = capabilities(remote)
        assert b"USER" not in offered
        assert b"SASL CRAM-MD5" in offered

    def test_apop_and_cram_md5_stay_available(self, remote: Wire) -> None:
        challenge = continuation(remote.command(b"AUTH CRAM-MD5"))
        digest = hmac.new(b"wonderland", challenge, hashlib.md5).hexdigest().encode()
        assert remote.command(b64(b"alice " + digest)).startswith(b"+OK")

    def test_the_administrator_may_allow_it(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore
    ) -> None:
        from pop3d.session import SessionPolicy

        factory = make_factory(policy=SessionPolicy(allow_plaintext_auth=True))
        remote = Wire(factory, REMOTE_PEER)
        assert remote.command(b"USER alice") == b"+OK send PASS\r\n"

    def test_local_peers_may(self, local: Wire) -> None:
        assert local.command(b"USER alice") == b"+OK send PASS\r\n"


class TestSTLS:
    """RFC 2595 section 4."""

    @pytest.fixture
    def remote_tls(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore, tls: ServerTLS
    ) -> TLSWire:
        store.deliver("alice", b"Subject: hi\n\nhi\n")
        return TLSWire(make_factory(tls=tls))

    def test_offered_before_tls(self, remote_tls: TLSWire) -> None:
        assert b"STLS" in capabilities(remote_tls)

    def test_stls_starts_tls(self, remote_tls: TLSWire, tls: ServerTLS) -> None:
        assert remote_tls.command(b"STLS") == b"+OK begin TLS negotiation\r\n"
        transport = remote_tls.transport
        assert isinstance(transport, _TLSCapableTransport)
        assert transport.tls_started_with is tls.context_factory()

    def test_pipelined_commands_after_stls_are_discarded(self, remote_tls: TLSWire) -> None:
        """The STARTTLS command-injection bug: nothing sent in the clear after
        STLS may be executed once TLS is up."""
        answer = remote_tls.send(b"STLS\r\nCAPA\r\nUSER alice\r\n")
        assert answer == b"+OK begin TLS negotiation\r\n"
        # After the handshake, the injected USER did not happen.
        assert remote_tls.command(b"PASS wonderland").startswith(b"-ERR ")

    def test_capabilities_are_recomputed_after_the_handshake(self, remote_tls: TLSWire) -> None:
        before = capabilities(remote_tls)
        remote_tls.command(b"STLS")
        after = capabilities(remote_tls)
        assert b"USER" not in before and b"USER" in after
        assert b"STLS" in before and b"STLS" not in after
        assert b"SASL CRAM-MD5 PLAIN LOGIN" in after

    def test_login_after_stls(self, remote_tls: TLSWire) -> None:
        remote_tls.command(b"STLS")
        assert remote_tls.login().startswith(b"+OK maildrop has 1")

    def test_stls_twice(self, remote_tls: TLSWire) -> None:
        remote_tls.command(b"STLS")
        assert remote_tls.command(b"STLS") == b"-ERR TLS is already active\r\n"

    def test_stls_after_login(
        self, make_factory: Callable[..., POP3Factory], tls: ServerTLS
    ) -> None:
        wire = TLSWire(make_factory(tls=tls), IPv4Address("TCP", "127.0.0.1", 1))
        wire.login()
        assert wire.command(b"STLS") == b"-ERR command not valid in this state\r\n"

    def test_stls_without_a_certificate(self, local: Wire) -> None:
        assert local.command(b"STLS") == b"-ERR STLS is not available\r\n"
        assert b"STLS" not in capabilities(local)


class TestThirdPartyMechanism:
    """A mechanism is an object given to the factory; the protocol is untouched."""

    def test_a_new_mechanism_is_offered_and_used(
        self, make_factory: Callable[..., POP3Factory], store: MemoryStore
    ) -> None:
        from twisted.cred.credentials import UsernamePassword
        from twisted.internet.defer import succeed
        from zope.interface import implementer

        from pop3d.sasl import (
            Authenticate,
            Challenge,
            ISASLExchange,
            ISASLMechanism,
        )

        @implementer(ISASLExchange)
        class TokenExchange:
            def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
                if response is None:
                    return succeed(Challenge(b"token?"))
                user, _, token = response.partition(b":")
                return succeed(Authenticate(UsernamePassword(user, token), user))

        @implementer(ISASLMechanism)
        class XToken:
            name = b"X-TOKEN"
            sends_password = False

            def usable(self, verifiers: object) -> bool:
                return True

            def start(self, context: ExchangeContext) -> ISASLExchange:
                return TokenExchange()

        store.deliver("alice", b"Subject: hi\n\nhi\n")
        wire = Wire(make_factory(mechanisms=[XToken()]), REMOTE_PEER)
        assert b"SASL X-TOKEN" in capabilities(wire)
        assert continuation(wire.command(b"AUTH X-TOKEN")) == b"token?"
        assert wire.command(b64(b"alice:wonderland")).startswith(b"+OK maildrop has 1")

    def test_a_new_credential_type_and_its_checker(self, clock: Clock, store: MemoryStore) -> None:
        """
        A mechanism that yields its own kind of credentials, and the checker
        that verifies them: written here, composed through public seams
        (build_portal, POP3Factory(mechanisms=...)); no pop3d module changes.
        """
        tokens = {b"alice": b"s3cret-token"}
        store.deliver("alice", b"Subject: hi\n\nhi\n")
        with_checker = build_portal(
            MaildropRealm(store), [_memory_checker(), _TokenChecker(tokens)]
        )
        mechanisms = [_XToken(), *DEFAULT_MECHANISMS]
        wire = Wire(_factory(with_checker, clock, mechanisms), REMOTE_PEER)
        # Offered first, as given; PLAIN and LOGIN are not on this connection.
        assert b"SASL X-TOKEN CRAM-MD5" in capabilities(wire)
        assert wire.command(b"AUTH X-TOKEN") == b"+ " + b64(b"token?") + b"\r\n"
        assert wire.command(b64(b"no colon")) == b"-ERR malformed X-TOKEN response\r\n"
        assert wire.command(b"AUTH X-TOKEN " + b64(b"alice:guess")) == AUTH_FAILED
        answer = wire.command(b"AUTH X-TOKEN " + b64(b"alice:s3cret-token"))
        assert answer == b"+OK maildrop has 1 messages (19 octets)\r\n"

        # Without its checker the mechanism is not offered (RFC 5034 section 4).
        without = build_portal(MaildropRealm(store), [_memory_checker()])
        wire = Wire(_factory(without, clock, mechanisms), REMOTE_PEER)
        assert b"SASL CRAM-MD5" in capabilities(wire)
        assert wire.command(b"AUTH X-TOKEN") == b"-ERR unsupported authentication mechanism\r\n"

    def test_a_password_file_learns_a_new_credential_type(
        self, clock: Clock, store: MemoryStore, tmp_path: Path
    ) -> None:
        """
        The credential type's module adds its check to the password checks
        the passwd-file checker is given; the checker itself is unchanged.
        """
        checks = PasswordChecks(
            [*PASSWORD_CHECKS, PasswordCheck(_IDigestCredentials, _verify_digest, _plaintext)]
        )
        passwd = tmp_path / "passwd"
        passwd.write_bytes(b"alice:{PLAIN}wonderland::\n")
        checker = PasswdFileChecker(str(passwd), checks=checks)
        assert _IDigestCredentials in checker.credentialInterfaces
        store.deliver("alice", b"Subject: hi\n\nhi\n")
        portal = build_portal(MaildropRealm(store), [checker])
        wire = Wire(_factory(portal, clock, [_XDigest()]), REMOTE_PEER)
        assert b"SASL X-DIGEST" in capabilities(wire)
        assert wire.command(b"AUTH X-DIGEST") == b"+ " + b64(b"nonce-1") + b"\r\n"
        wrong = hmac.new(b"nope", b"nonce-1", hashlib.sha256).hexdigest().encode()
        assert wire.command(b64(b"alice " + wrong)) == AUTH_FAILED
        wire.command(b"AUTH X-DIGEST")
        right = hmac.new(b"wonderland", b"nonce-1", hashlib.sha256).hexdigest().encode()
        answer = wire.command(b64(b"alice " + right))
        assert answer == b"+OK maildrop has 1 messages (19 octets)\r\n"

        # A file whose entries cannot verify it does not advertise it.
        passwd.write_bytes(b"alice:{CRAM-MD5}" + b"0" * 64 + b"::\n")
        assert (
            _IDigestCredentials not in PasswdFileChecker(str(passwd), checks).credentialInterfaces
        )


# -- a third party's mechanisms, credential types and checker, as written outside pop3d --


def _memory_checker() -> InMemoryUsernamePasswordDatabaseDontUse:
    return InMemoryUsernamePasswordDatabaseDontUse(alice=b"wonderland")


def _factory(portal: Portal, clock: Clock, mechanisms: list[ISASLMechanism]) -> POP3Factory:
    return POP3Factory(
        portal,
        clock=clock,
        hostname="pop.example.test",
        login_failure_delay=0,
        mechanisms=mechanisms,
    )


class _ITokenCredentials(ICredentials):
    username: bytes = Attribute("who")
    token: bytes = Attribute("a bearer token")


@implementer(_ITokenCredentials)
@dataclass(frozen=True)
class _TokenCredentials:
    username: bytes
    token: bytes


@implementer(ICredentialsChecker)
class _TokenChecker:
    credentialInterfaces = (_ITokenCredentials,)

    def __init__(self, tokens: dict[bytes, bytes]) -> None:
        self._tokens = tokens

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        expected = self._tokens.get(credentials.username)
        if expected is not None and hmac.compare_digest(expected, credentials.token):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


@implementer(ISASLExchange)
class _TokenExchange:
    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if response is None:
            return succeed(Challenge(b"token?"))
        user, colon, token = response.partition(b":")
        if not colon:
            return fail(SASLError("malformed X-TOKEN response", SASLFailure.MALFORMED))
        return succeed(Authenticate(_TokenCredentials(user, token), user))


@implementer(ISASLMechanism)
class _XToken:
    name = b"X-TOKEN"
    sends_password = False

    def usable(self, verifiers: IVerifiers) -> bool:
        return bool(verifiers.can_verify(_ITokenCredentials))

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _TokenExchange()


class _IDigestCredentials(ICredentials):
    """HMAC-SHA-256 of a server nonce, keyed with the password."""

    username: bytes = Attribute("who")
    nonce: bytes = Attribute("the server's challenge")
    digest: bytes = Attribute("hex")


@implementer(_IDigestCredentials)
@dataclass(frozen=True)
class _DigestCredentials:
    username: bytes
    nonce: bytes
    digest: bytes


def _verify_digest(lookup: PasswordLookup, credentials: Any) -> bool:
    entry = lookup.entry
    if entry is None or not entry.kind.plaintext:
        return False
    expected = hmac.new(entry.secret, credentials.nonce, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, credentials.digest)


def _plaintext(schemes: Collection[PasswordScheme]) -> bool:
    return any(scheme.plaintext for scheme in schemes)


@implementer(ISASLExchange)
class _DigestExchange:
    def __init__(self) -> None:
        self._sent = False

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if not self._sent:
            self._sent = True
            return succeed(Challenge(b"nonce-1"))
        user, _, digest = (response or b"").rpartition(b" ")
        return succeed(Authenticate(_DigestCredentials(user, b"nonce-1", digest), user))


@implementer(ISASLMechanism)
class _XDigest:
    name = b"X-DIGEST"
    sends_password = False

    def usable(self, verifiers: IVerifiers) -> bool:
        return bool(verifiers.can_verify(_IDigestCredentials))

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _DigestExchange()
