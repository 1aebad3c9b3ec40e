"""
SASL SCRAM-SHA-256 (RFC 5802, RFC 7677): RFC 7677's example exchange, and
full exchanges against a client written here from RFC 5802's formulas alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from pop3d.checkers import PasswdFileChecker
from pop3d.credchecks import PortalVerifiers
from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    IScramKeySource,
    IScramSHA256Credentials,
    SASLError,
    ScramKeys,
)
from pop3d.sasl.scram import ScramSHA256, escape_saslname, unescape_saslname
from pop3d.stores.interfaces import IMaildrop
from pop3d.tap import build_portal
from pop3d.testing import MemoryStore
from tests.conftest import Wire

# -- a client from RFC 5802 section 3, independent of pop3d.passwords -------------


def hi(password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi(str, salt, i): PBKDF2 with HMAC-SHA-256, spelt out (RFC 5802 section 2.2)."""
    u = hmac.digest(password, salt + b"\x00\x00\x00\x01", "sha256")
    result = int.from_bytes(u, "big")
    for _ in range(iterations - 1):
        u = hmac.digest(password, u, "sha256")
        result ^= int.from_bytes(u, "big")
    return result.to_bytes(32, "big")


def keys_for(password: bytes, salt: bytes, iterations: int = 4096) -> ScramKeys:
    salted = hi(password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return ScramKeys(
        salt,
        iterations,
        hashlib.sha256(client_key).digest(),
        hmac.digest(salted, b"Server Key", "sha256"),
    )


class Client:
    def __init__(
        self,
        username: bytes,
        password: bytes,
        nonce: bytes = b"fyko+d2lbbFgONRv9qkxdawL",
        gs2_header: bytes = b"n,,",
    ) -> None:
        self.username = username
        self.password = password
        self.nonce = nonce
        self.gs2_header = gs2_header
        self.bare = b"n=" + escape_saslname(username) + b",r=" + nonce
        self.expected_server_signature = b""

    def first(self) -> bytes:
        return self.gs2_header + self.bare

    def final(self, server_first: bytes) -> bytes:
        fields = dict(field.split(b"=", 1) for field in server_first.split(b","))
        assert fields[b"r"].startswith(self.nonce) and len(fields[b"r"]) > len(self.nonce)
        salted = hi(self.password, base64.b64decode(fields[b"s"]), int(fields[b"i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = b"c=" + base64.b64encode(self.gs2_header) + b",r=" + fields[b"r"]
        auth_message = self.bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.expected_server_signature = hmac.digest(server_key, auth_message, "sha256")
        return without_proof + b",p=" + base64.b64encode(proof)

    def check_server_final(self, server_final: bytes) -> None:
        assert server_final == b"v=" + base64.b64encode(self.expected_server_signature)


# -- a portal whose checker knows keys ------------------------------------------------


@implementer(ICredentialsChecker, IScramKeySource)
class KeysChecker:
    credentialInterfaces = (IScramSHA256Credentials,)

    def __init__(self, users: dict[bytes, ScramKeys]) -> None:
        self.users = users
        self.asked: list[bytes] = []

    def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
        self.asked.append(username)
        return succeed(self.users.get(username))

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        keys = self.users.get(credentials.username)
        if keys is not None and credentials.verify(keys):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


def context_for(portal: Portal) -> ExchangeContext:
    return ExchangeContext(PortalVerifiers(portal), "pop.example.test", 0.0)


async def challenge(exchange: ISASLExchange, response: bytes | None) -> bytes:
    result = await exchange.step(response)
    assert isinstance(result, Challenge), result
    return result.data


async def authenticate(exchange: ISASLExchange, response: bytes | None) -> Authenticate:
    result = await exchange.step(response)
    assert isinstance(result, Authenticate), result
    return result


RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


@pytest.fixture
def rfc7677() -> tuple[KeysChecker, ISASLExchange]:
    checker = KeysChecker({b"user": keys_for(b"pencil", RFC7677_SALT)})
    portal = Portal(MaildropRealm(MemoryStore()), [checker])
    mechanism = ScramSHA256(make_nonce=lambda: RFC7677_SERVER_NONCE)
    return checker, mechanism.start(context_for(portal))


class TestRFC7677:
    @pytest_twisted.ensureDeferred
    async def test_example_exchange(self, rfc7677: tuple[KeysChecker, ISASLExchange]) -> None:
        """RFC 7677 section 3, byte for byte."""
        checker, exchange = rfc7677
        assert await challenge(exchange, None) == b""
        server_first = await challenge(exchange, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        assert server_first == (
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        )
        server_final = await challenge(
            exchange,
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        done = await authenticate(exchange, b"")
        assert done.username == b"user"
        assert IScramSHA256Credentials.providedBy(done.credentials)
        assert await checker.requestAvatarId(done.credentials) == b"user"
        with pytest.raises(SASLError):
            await exchange.step(b"")

    @pytest_twisted.ensureDeferred
    async def test_the_proof_is_checked_again_with_the_checkers_keys(
        self, rfc7677: tuple[KeysChecker, ISASLExchange]
    ) -> None:
        _, exchange = rfc7677
        client = Client(b"user", b"pencil", nonce=b"rOprNGfwEbeRWgbNEkqO")
        server_first = await challenge(exchange, client.first())
        client.check_server_final(await challenge(exchange, client.final(server_first)))
        done = await authenticate(exchange, b"")
        credentials = done.credentials
        assert credentials.verify(keys_for(b"pencil", RFC7677_SALT))  # type: ignore[attr-defined]
        assert not credentials.verify(keys_for(b"pencil", RFC7677_SALT, 4097))  # type: ignore[attr-defined]
        assert not credentials.verify(keys_for(b"pencil", b"other salt"))  # type: ignore[attr-defined]
        assert not credentials.verify(keys_for(b"pencils", RFC7677_SALT))  # type: ignore[attr-defined]

    @pytest_twisted.ensureDeferred
    async def test_initial_response(self, rfc7677: tuple[KeysChecker, ISASLExchange]) -> None:
        """AUTH SCRAM-SHA-256 <client-first> skips the empty challenge."""
        _, exchange = rfc7677
        server_first = await challenge(exchange, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        assert server_first.startswith(b"r=rOprNGfwEbeRWgbNEkqO%hvYD")


# -- full exchanges against the passwd-file checker ------------------------------------

# doveadm pw -s SCRAM-SHA-256 -p "correct horse" (Dovecot 2.3.19.1)
SCRAM_HORSE = (
    b"4096,sX7qYEBSBRXbLXCdE/63BQ==,4R+yUgPOSMvlLbJCIXJkdS+GDZm7fb/+MNRqpij0lxE=,"
    b"jCB7ex4JVZHcF9ubxHObPHeJFv1br0HEiGlkovFYsuY="
)
BLF_HORSE = b"$2y$05$8.EtBsQSSze1Ukke2iJSYeKMwJDqIk2FOpNWYeJSHnt5rACuzI4PC"


@pytest.fixture
def portal(tmp_path: Path) -> Portal:
    path = tmp_path / "passwd"
    path.write_bytes(
        b"scram:{SCRAM-SHA-256}" + SCRAM_HORSE + b"::\n"
        b"plain:{PLAIN}pencil::\n"
        b"a,b=c:{PLAIN}odd name::\n"
        b"blf:{BLF-CRYPT}" + BLF_HORSE + b"::\n"
    )
    return build_portal(MaildropRealm(MemoryStore()), [PasswdFileChecker(str(path))])


async def run_exchange(portal: Portal, client: Client) -> tuple[Authenticate, bytes | None, bytes]:
    """Drive an exchange: the final Authenticate, the server-final (if any), server-first."""
    exchange = ScramSHA256().start(context_for(portal))
    assert await challenge(exchange, None) == b""
    server_first = await challenge(exchange, client.first())
    result = await exchange.step(client.final(server_first))
    if isinstance(result, Authenticate):
        return result, None, server_first
    return await authenticate(exchange, b""), result.data, server_first


class TestFullExchange:
    def test_usable_over_the_passwd_file(self, portal: Portal) -> None:
        assert ScramSHA256().usable(PortalVerifiers(portal))
        assert ISASLMechanism.providedBy(ScramSHA256())
        assert ScramSHA256.name == b"SCRAM-SHA-256" and not ScramSHA256.sends_password

    def test_not_usable_without_a_key_source(self, tmp_path: Path) -> None:
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        memory_portal = build_portal(MaildropRealm(MemoryStore()), [memory])
        assert not ScramSHA256().usable(PortalVerifiers(memory_portal))
        path = tmp_path / "passwd"
        path.write_bytes(b"blf:{BLF-CRYPT}" + BLF_HORSE + b"\n")
        hashed = build_portal(MaildropRealm(MemoryStore()), [PasswdFileChecker(str(path))])
        assert not ScramSHA256().usable(PortalVerifiers(hashed))

    @pytest.mark.parametrize(
        "user,password",
        [(b"scram", b"correct horse"), (b"plain", b"pencil"), (b"a,b=c", b"odd name")],
    )
    @pytest_twisted.ensureDeferred
    async def test_login(self, portal: Portal, user: bytes, password: bytes) -> None:
        client = Client(user, password)
        done, server_final, _ = await run_exchange(portal, client)
        assert server_final is not None
        client.check_server_final(server_final)
        assert done.username == user
        _, maildrop, _ = await portal.login(done.credentials, None, IMaildrop)
        await IMaildrop(maildrop).close()

    @pytest.mark.parametrize(
        "user,password",
        [(b"scram", b"wrong"), (b"plain", b"wrong"), (b"nobody", b"x"), (b"blf", b"correct horse")],
    )
    @pytest_twisted.ensureDeferred
    async def test_refused_without_a_server_signature(
        self, portal: Portal, user: bytes, password: bytes
    ) -> None:
        done, server_final, _ = await run_exchange(portal, Client(user, password))
        assert server_final is None
        with pytest.raises(UnauthorizedLogin):
            await portal.login(done.credentials, None, IMaildrop)

    @pytest_twisted.ensureDeferred
    async def test_unknown_users_look_like_plaintext_users(self, portal: Portal) -> None:
        """Stable made-up salts, of the same size and count as derived ones."""

        def parameters(server_first: bytes) -> tuple[bytes, bytes]:
            match = re.fullmatch(rb"r=[^,]+,s=([^,]+),i=([0-9]+)", server_first)
            assert match is not None
            return match.group(1), match.group(2)

        seen: dict[bytes, bytes] = {}
        for user in [b"nobody", b"nobody", b"plain", b"someone"]:
            _, _, server_first = await run_exchange(portal, Client(user, b"x"))
            salt, count = parameters(server_first)
            assert count == b"4096" and len(base64.b64decode(salt)) == 16
            assert seen.setdefault(user, salt) == salt
        assert len(set(seen.values())) == 3

    def test_through_the_pop3_session(self, tmp_path: Path) -> None:
        """AUTH SCRAM-SHA-256 on the wire (RFC 5034), checks inline (no thread pool)."""
        path = tmp_path / "passwd"
        path.write_bytes(b"plain:{PLAIN}pencil::\n")
        portal = Portal(MaildropRealm(MemoryStore()), [PasswdFileChecker(str(path))])
        factory = POP3Factory(
            portal,
            clock=Clock(),
            hostname="pop.example.test",
            login_failure_delay=0,
            mechanisms=[ScramSHA256()],
        )
        wire = Wire(factory)
        assert b"SASL SCRAM-SHA-256\r\n" in wire.command(b"CAPA")
        client = Client(b"plain", b"pencil")
        assert wire.command(b"AUTH SCRAM-SHA-256") == b"+ \r\n"
        reply = wire.command(base64.b64encode(client.first()))
        assert reply.startswith(b"+ ") and reply.endswith(b"\r\n")
        reply = wire.command(base64.b64encode(client.final(base64.b64decode(reply[2:]))))
        assert reply.startswith(b"+ ")
        client.check_server_final(base64.b64decode(reply[2:]))
        assert wire.command(b"").startswith(b"+OK")
        assert wire.command(b"STAT").startswith(b"+OK 0 0")
        wire.command(b"QUIT")

    @pytest.mark.parametrize(
        "client_first,reply",
        [
            # The mechanism says why (unsupported, malformed, not authorized);
            # the POP3 side words it: RFC 5034 section 4, RFC 3206 [AUTH].
            (b"p=tls-unique,,n=plain,r=abc", b"-ERR SCRAM channel binding is not supported\r\n"),
            (b"n,,n=pl=2Xain,r=abc", b"-ERR malformed SCRAM user name\r\n"),
            (b"n,a=root,n=plain,r=abc", b"-ERR [AUTH] not authorized to act as another user\r\n"),
        ],
    )
    def test_refusals_through_the_pop3_session(
        self, tmp_path: Path, client_first: bytes, reply: bytes
    ) -> None:
        path = tmp_path / "passwd"
        path.write_bytes(b"plain:{PLAIN}pencil::\n")
        portal = build_portal(MaildropRealm(MemoryStore()), [PasswdFileChecker(str(path))])
        factory = POP3Factory(
            portal, clock=Clock(), hostname="pop.example.test", mechanisms=[ScramSHA256()]
        )
        wire = Wire(factory)
        assert wire.command(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client_first)) == reply
        # As if AUTH never happened (RFC 5034 section 4).
        assert wire.command(b"STAT") == b"-ERR command not valid in this state\r\n"


class TestMalformed:
    @pytest.mark.parametrize(
        "client_first,message",
        [
            (b"p=tls-unique,,n=user,r=abc", "channel binding is not supported"),
            (b"x,,n=user,r=abc", "malformed"),
            (b"n,,m=ext,n=user,r=abc", "mandatory extensions"),
            (b"n,,r=abc,n=user", "malformed"),
            (b"n,,n=,r=abc", "malformed"),
            (b"n,,n=user,r=", "malformed"),
            (b"n,,n=us=2Xer,r=abc", "malformed SCRAM user name"),
            (b"n,a=admin,n=user,r=abc", "another user"),
            (b"n,b=admin,n=user,r=abc", "malformed"),
            (b"n,,n=user", "malformed"),
            (b"", "malformed"),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_bad_client_first(
        self, rfc7677: tuple[KeysChecker, ISASLExchange], client_first: bytes, message: str
    ) -> None:
        _, exchange = rfc7677
        with pytest.raises(SASLError, match=message):
            await exchange.step(client_first)

    @pytest_twisted.ensureDeferred
    async def test_authzid_equal_to_the_user_is_fine(
        self, rfc7677: tuple[KeysChecker, ISASLExchange]
    ) -> None:
        _checker, exchange = rfc7677
        client = Client(b"user", b"pencil", gs2_header=b"n,a=user,")
        server_first = await challenge(exchange, client.first())
        client.check_server_final(await challenge(exchange, client.final(server_first)))
        assert (await authenticate(exchange, b"")).username == b"user"

    @pytest_twisted.ensureDeferred
    async def test_y_flag_is_fine_without_channel_binding(
        self, rfc7677: tuple[KeysChecker, ISASLExchange]
    ) -> None:
        """RFC 5802 section 6: "y" from a client that could bind, to a server that cannot."""
        _, exchange = rfc7677
        client = Client(b"user", b"pencil", gs2_header=b"y,,")
        server_first = await challenge(exchange, client.first())
        client.check_server_final(await challenge(exchange, client.final(server_first)))

    @pytest.mark.parametrize(
        "change,message",
        [
            (lambda m: m.replace(b"c=biws", b"c=eSws"), "channel binding data"),
            (lambda m: m.replace(b"c=biws,", b""), "malformed"),
            (lambda m: m.replace(b",r=fyko", b",r=fyk0"), "nonce"),
            (lambda m: m.rpartition(b",p=")[0], "malformed"),
            (lambda m: m.rpartition(b",p=")[0] + b",p=AAAA", "proof"),
            (lambda m: m.rpartition(b",p=")[0] + b",p=!!", "proof"),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_bad_client_final(
        self,
        rfc7677: tuple[KeysChecker, ISASLExchange],
        change: object,
        message: str,
    ) -> None:
        _, exchange = rfc7677
        client = Client(b"user", b"pencil")
        server_first = await challenge(exchange, client.first())
        final = change(client.final(server_first))  # type: ignore[operator]
        with pytest.raises(SASLError, match=message):
            await exchange.step(final)

    @pytest_twisted.ensureDeferred
    async def test_non_empty_answer_to_the_server_final(
        self, rfc7677: tuple[KeysChecker, ISASLExchange]
    ) -> None:
        _, exchange = rfc7677
        client = Client(b"user", b"pencil")
        server_first = await challenge(exchange, client.first())
        await challenge(exchange, client.final(server_first))
        with pytest.raises(SASLError, match="empty response"):
            await exchange.step(b"v=whatever")

    @pytest_twisted.ensureDeferred
    async def test_a_broken_key_source_looks_like_an_unknown_user(self) -> None:
        class Broken(KeysChecker):
            def scram_sha256_keys(self, username: bytes) -> Deferred[ScramKeys | None]:
                raise OSError("directory is down")

        portal = Portal(MaildropRealm(MemoryStore()), [Broken({})])
        _done, server_final, server_first = await run_exchange(portal, Client(b"user", b"x"))
        assert server_final is None and b",i=4096" in server_first


class TestSaslnames:
    @pytest.mark.parametrize(
        "escaped,name",
        [(b"user", b"user"), (b"a=2Cb", b"a,b"), (b"a=3Db", b"a=b"), (b"=3D=2C=3D", b"=,=")],
    )
    def test_round_trip(self, escaped: bytes, name: bytes) -> None:
        assert unescape_saslname(escaped) == name
        assert escape_saslname(name) == escaped

    @pytest.mark.parametrize("escaped", [b"a=b", b"a=", b"a=2", b"=2c"])
    def test_bad_escapes(self, escaped: bytes) -> None:
        with pytest.raises(SASLError):
            unescape_saslname(escaped)

    @pytest_twisted.ensureDeferred
    async def test_key_source_gets_the_unescaped_name(
        self, rfc7677: tuple[KeysChecker, ISASLExchange]
    ) -> None:
        checker, exchange = rfc7677
        await exchange.step(b"n,,n=a=2Cb=3Dc,r=abc")
        assert checker.asked == [b"a,b=c"]
