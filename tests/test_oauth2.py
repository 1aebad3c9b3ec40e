"""
OAuth2 logins: the SASL mechanisms OAUTHBEARER (RFC 7628) and XOAUTH2, byte
for byte through the POP3 session, and ``--auth oauth2:`` (Dovecot's
dovecot-oauth2.conf.ext) against a twisted.web provider on a loopback port:
RFC 7662 introspection in Dovecot's three modes, tokeninfo, local JWT
validation (a key dict directory, a JWK Set), outages.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage

from pop3d.authdb.oauth2 import (
    OAuth2Checker,
    OAuth2CheckerFactory,
    OAuth2Error,
    read_settings,
)
from pop3d.checkers import PasswdFileChecker
from pop3d.dovecotconf import ConfigFileError
from pop3d.errors import AuthUnavailable
from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm
from pop3d.sasl import SASLError, SASLFailure
from pop3d.sasl.oauth2 import (
    BearerTokenCredentials,
    TokenRefusal,
    oauthbearer_error,
    parse_oauthbearer,
    parse_xoauth2,
    xoauth2_error,
)
from pop3d.session import SessionPolicy
from pop3d.tap import Options, build_portal
from pop3d.testing import MemoryStore
from pop3d.userdb import AuthenticatedUser
from tests.clock_threads import ClockThreads, result_of
from tests.conftest import Logged, Wire
from tests.oauth2_provider import (
    ISSUER,
    ProviderState,
    ec_key,
    jwks_of,
    listen,
    sign,
    unsigned,
)

NOW = 1_900_000_000
ALICE = "alice@example.test"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def oauthbearer(token: str, user: str | None = ALICE) -> bytes:
    """RFC 7628 section 3.1's client response (with host and port, as section 4.1)."""
    authzid = f"a={user}" if user is not None else ""
    return (
        f"n,{authzid},\x01host=pop.example.test\x01port=110\x01auth=Bearer {token}\x01\x01"
    ).encode()


def xoauth2(token: str, user: str = ALICE) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "1234",
        "email": ALICE,
        "iss": ISSUER,
        "iat": NOW - 60,
        "exp": NOW + 3600,
        "scope": "openid mail",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


# -- the mechanisms' grammar -----------------------------------------------------------------


class TestOAuthBearerGrammar:
    def test_rfc_7628_example(self) -> None:
        """RFC 7628 section 4.1: the client response of the example exchange."""
        response = (
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        )
        credentials = parse_oauthbearer(response)
        assert credentials.username == b"user@example.com"
        assert credentials.token == b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="

    def test_without_authzid(self) -> None:
        """RFC 5801 section 4: the gs2-authzid is optional; the token says who."""
        credentials = parse_oauthbearer(b"n,,\x01auth=Bearer abc\x01\x01")
        assert (credentials.username, credentials.token) == (b"", b"abc")

    def test_escaped_authzid_and_case_of_the_scheme(self) -> None:
        """RFC 5801 section 4 (=2C, =3D); RFC 7235 section 2.1 (scheme case-insensitive)."""
        credentials = parse_oauthbearer(b"y,a=a=3Db=2Cc,\x01auth=bearer  t.o-k_e~n+/=\x01\x01")
        assert (credentials.username, credentials.token) == (b"a=b,c", b"t.o-k_e~n+/=")

    @pytest.mark.parametrize(
        "response",
        [
            b"",
            b"\x01",  # the dummy response, not a client response
            b"n,,\x01auth=Bearer abc\x01",  # no final kvsep
            b"n,,auth=Bearer abc\x01\x01",  # no kvsep after the gs2 header
            b"n,,\x01auth=Bearer abc",
            b"n,,\x01\x01",  # no auth
            b"n,,\x01auth=Basic YWxpY2U6eA==\x01\x01",
            b"n,,\x01auth=Bearer\x01\x01",
            b"n,,\x01auth=Bearer a b\x01\x01",  # not a b64token
            b"n,,\x01auth=Bearer a\x00b\x01\x01",
            b"n,,\x01auth=Bearer a=b\x01\x01",  # "=" only at the end
            b"n,,\x01auth=Bearer a\x01auth=Bearer b\x01\x01",  # twice
            b"n,,\x01h0st=x\x01auth=Bearer a\x01\x01",  # key = 1*ALPHA
            b"n,,\x01host\x01auth=Bearer a\x01\x01",
            b"n,a=bob,x\x01auth=Bearer a\x01\x01",
            b"n,b=bob,\x01auth=Bearer a\x01\x01",
            b"n,a=b=2x,\x01auth=Bearer a\x01\x01",  # bad escape
            b"n,a=\xff,\x01auth=Bearer a\x01\x01",  # not UTF-8
            b"F,n,,\x01auth=Bearer a\x01\x01",  # non-standard GSS-API flag
            b"x,,\x01auth=Bearer a\x01\x01",
        ],
    )
    def test_malformed(self, response: bytes) -> None:
        with pytest.raises(SASLError) as raised:
            parse_oauthbearer(response)
        assert raised.value.text == "malformed OAUTHBEARER response"
        assert raised.value.failure is SASLFailure.MALFORMED

    def test_channel_binding_is_not_supported(self) -> None:
        """RFC 7628 section 3.1: OAUTHBEARER has no channel binding."""
        with pytest.raises(SASLError) as raised:
            parse_oauthbearer(b"p=tls-unique,,\x01auth=Bearer a\x01\x01")
        assert raised.value.failure is SASLFailure.UNSUPPORTED

    def test_error_json(self) -> None:
        """RFC 7628 section 3.2.2: status, then scope and openid-configuration when known."""
        assert oauthbearer_error(TokenRefusal()) == b'{"status":"invalid_token"}'
        assert oauthbearer_error(
            TokenRefusal("mail", "https://id.example.test/.well-known/openid-configuration")
        ) == (
            b'{"status":"invalid_token","scope":"mail",'
            b'"openid-configuration":"https://id.example.test/.well-known/openid-configuration"}'
        )


class TestXOAuth2Grammar:
    def test_googles_example(self) -> None:
        """Google's XOAUTH2 documentation's initial client response."""
        response = base64.b64decode(
            b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
            b"YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        )
        credentials = parse_xoauth2(response)
        assert credentials.username == b"someuser@example.com"
        assert credentials.token == b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"

    @pytest.mark.parametrize(
        "response",
        [
            b"",
            b"user=a\x01auth=Bearer t\x01",  # one ^A short
            b"auth=Bearer t\x01\x01",  # no user
            b"user=\x01auth=Bearer t\x01\x01",
            b"user=a\x01\x01",
            b"user=a\x01auth=Bearer t u\x01\x01",
            b"user=a\nb\x01auth=Bearer t\x01\x01",
            b"user=a\x01user=b\x01auth=Bearer t\x01\x01",
            b"user=a\x01auth=Bearer t\x01auth=Bearer u\x01\x01",
        ],
    )
    def test_malformed(self, response: bytes) -> None:
        with pytest.raises(SASLError) as raised:
            parse_xoauth2(response)
        assert raised.value.text == "malformed XOAUTH2 response"

    def test_error_json(self) -> None:
        """Google's (and Dovecot's) XOAUTH2 error: status 401, schemes, scope."""
        assert (
            xoauth2_error(TokenRefusal()) == b'{"status":"401","schemes":"bearer","scope":"mail"}'
        )
        assert xoauth2_error(TokenRefusal("pop")) == (
            b'{"status":"401","schemes":"bearer","scope":"pop"}'
        )


def test_credentials_never_show_the_token() -> None:
    shown = repr(BearerTokenCredentials(b"alice", b"SECRET-TOKEN"))
    assert "SECRET" not in shown and "alice" in shown


# -- through the POP3 session, with JWTs checked against a JWK Set file --------------


def write_conf(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def signing_key() -> Any:
    return ec_key("k1")


@pytest.fixture
def jwks_conf(tmp_path: Path, signing_key: Any) -> Path:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(signing_key, ec_key("k2"))))
    return write_conf(
        tmp_path / "dovecot-oauth2.conf.ext",
        f"introspection_mode = local\njwks_url = {jwks}\nissuers = {ISSUER}\n",
    )


@pytest.fixture
def oauth2_wire(jwks_conf: Path, store: MemoryStore) -> Callable[..., Wire]:
    """A session whose only checker is ``--auth oauth2:`` over the JWK Set file, at NOW."""

    def make(conf: Path = jwks_conf, **policy: Any) -> Wire:
        clock = Clock()
        clock.advance(NOW)
        checker = OAuth2Checker(read_settings(str(conf)), reactor, clock=clock)
        portal = build_portal(MaildropRealm(store), [checker])
        factory = POP3Factory(
            portal,
            clock=clock,
            hostname="pop.example.test",
            policy=SessionPolicy(**policy),
            login_failure_delay=0,
        )
        return Wire(factory)

    return make


class TestThroughTheSession:
    def test_capa_offers_both(self, oauth2_wire: Callable[..., Wire]) -> None:
        """RFC 2449 section 6.9 / RFC 5034 section 3: the mechanisms on the SASL line."""
        wire = oauth2_wire()
        assert b"\r\nSASL OAUTHBEARER XOAUTH2\r\n" in wire.command(b"CAPA")

    def test_not_offered_without_an_oauth2_checker(self, tmp_path: Path) -> None:
        passwd = tmp_path / "passwd"
        passwd.write_text("alice:{PLAIN}wonderland::\n")
        portal = build_portal(MaildropRealm(MemoryStore()), [PasswdFileChecker(str(passwd))])
        wire = Wire(POP3Factory(portal, clock=Clock(), hostname="pop.example.test"))
        capa = wire.command(b"CAPA")
        assert b"OAUTHBEARER" not in capa and b"XOAUTH2" not in capa
        assert wire.command(b"AUTH OAUTHBEARER") == b"-ERR unsupported authentication mechanism\r\n"

    def test_initial_response(self, oauth2_wire: Callable[..., Wire], signing_key: Any) -> None:
        """RFC 5034 section 4: AUTH mechanism initial-response; RFC 7628 section 4.1."""
        wire = oauth2_wire()
        token = sign(signing_key, claims(), kid="k1")
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token)))
        assert answer == b"+OK maildrop has 0 messages (0 octets)\r\n"

    def test_continuation_without_a_user(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any, store: MemoryStore
    ) -> None:
        """RFC 5034 section 4: an empty challenge asks for the response; the token says who."""
        store.deliver(ALICE, b"Subject: hi\r\n\r\nhello\r\n")
        wire = oauth2_wire()
        token = sign(signing_key, claims(), kid="k1")
        assert wire.command(b"AUTH OAUTHBEARER") == b"+ \r\n"
        answer = wire.command(b64(oauthbearer(token, user=None)))
        assert answer == b"+OK maildrop has 1 messages (22 octets)\r\n"

    def test_refused_token_gets_the_error_challenge_then_err(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any
    ) -> None:
        """
        RFC 7628 section 3.2.2: the error JSON as a challenge; section 3.2.3:
        the client's %x01; then the failure (RFC 3206 [AUTH]).
        """
        wire = oauth2_wire()
        expired = sign(signing_key, claims(exp=NOW - 1), kid="k1")
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(expired)))
        assert answer == b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n"
        assert wire.command(b"AQ==") == b"-ERR [AUTH] invalid user name or password\r\n"
        # The session goes on: a good token works now.
        token = sign(signing_key, claims(), kid="k1")
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token)))
        assert answer.startswith(b"+OK maildrop has")

    def test_error_challenge_names_the_scope(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any, jwks_conf: Path
    ) -> None:
        """RFC 7628 section 3.2.2: "scope", the scopes that would do."""
        conf = write_conf(jwks_conf, jwks_conf.read_text() + "scope = mail pop\n")
        wire = oauth2_wire(conf)
        token = sign(signing_key, claims(scope="openid mail"), kid="k1")
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token)))
        challenge = base64.b64decode(answer.removeprefix(b"+ ").removesuffix(b"\r\n"))
        assert challenge == b'{"status":"invalid_token","scope":"mail pop"}'
        assert wire.command(b"AQ==") == b"-ERR [AUTH] invalid user name or password\r\n"

    def test_the_named_user_must_own_the_token(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any
    ) -> None:
        """The gs2 authzid (RFC 7628 section 3.1) is the user the token must be for."""
        wire = oauth2_wire()
        token = sign(signing_key, claims(), kid="k1")
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token, user="bob@x.test")))
        assert answer == b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n"
        assert wire.command(b"AQ==") == b"-ERR [AUTH] invalid user name or password\r\n"
        # The user name is compared as Dovecot's default username_format %Lu does.
        answer = wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(token, user=ALICE.upper())))
        assert answer.startswith(b"+OK maildrop has")

    def test_xoauth2(self, oauth2_wire: Callable[..., Wire], signing_key: Any) -> None:
        wire = oauth2_wire()
        token = sign(signing_key, claims(), kid="k1")
        assert wire.command(b"AUTH XOAUTH2 " + b64(xoauth2(token))).startswith(b"+OK maildrop")

    def test_xoauth2_refused_as_google_does(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any
    ) -> None:
        """Google's XOAUTH2: the error JSON as a challenge, an empty response, then the failure."""
        wire = oauth2_wire()
        forged = sign(ec_key("k1"), claims(), kid="k1")
        assert wire.command(b"AUTH XOAUTH2") == b"+ \r\n"
        answer = wire.command(b64(xoauth2(forged)))
        # {"status":"401","schemes":"bearer","scope":"mail"}
        assert answer == (
            b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n"
        )
        assert wire.command(b"") == b"-ERR [AUTH] invalid user name or password\r\n"

    @pytest.mark.parametrize(
        ("line", "reply"),
        [
            # RFC 5034 section 4: not base64.
            (b"AUTH OAUTHBEARER bm90IGJhc2U2NA=", b"-ERR invalid base64\r\n"),
            (
                b"AUTH OAUTHBEARER " + b64(b"n,,auth=Bearer x\x01\x01"),
                b"-ERR malformed OAUTHBEARER response\r\n",
            ),
            (
                b"AUTH XOAUTH2 " + b64(b"user=alice\x01auth=Bearer x\x01"),
                b"-ERR malformed XOAUTH2 response\r\n",
            ),
            (
                b"AUTH OAUTHBEARER " + b64(b"n,,\x01auth=Bearer " + b"A" * 9000 + b"\x01\x01"),
                b"-ERR line too long\r\n",
            ),
        ],
    )
    def test_bad_input_gets_err_and_the_session_goes_on(
        self, oauth2_wire: Callable[..., Wire], line: bytes, reply: bytes
    ) -> None:
        wire = oauth2_wire()
        assert wire.command(line) == reply
        assert not wire.closed
        assert wire.command(b"NOOP").startswith(b"-ERR")  # AUTHORIZATION state still
        assert wire.command(b"CAPA").startswith(b"+OK")

    def test_cancel_after_the_error_challenge(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any
    ) -> None:
        """RFC 5034 section 4: "*" cancels, at any step."""
        wire = oauth2_wire()
        expired = sign(signing_key, claims(exp=NOW - 1), kid="k1")
        wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(expired)))
        assert wire.command(b"*") == b"-ERR authentication cancelled\r\n"

    def test_offered_only_where_plaintext_logins_are(
        self, jwks_conf: Path, store: MemoryStore
    ) -> None:
        """A bearer token is replayable (RFC 6750 section 5.3): not over plain remote TCP."""
        from twisted.internet.address import IPv4Address

        checker = OAuth2Checker(read_settings(str(jwks_conf)), reactor, clock=Clock())
        portal = build_portal(MaildropRealm(store), [checker])
        factory = POP3Factory(portal, clock=Clock(), hostname="pop.example.test")
        wire = Wire(factory, peer=IPv4Address("TCP", "192.0.2.7", 40000))
        assert b"OAUTHBEARER" not in wire.command(b"CAPA")
        assert wire.command(b"AUTH OAUTHBEARER").startswith(b"-ERR [AUTH]")

    def test_tokens_are_never_logged(
        self, oauth2_wire: Callable[..., Wire], signing_key: Any, logged: Logged
    ) -> None:
        wire = oauth2_wire()
        good = sign(signing_key, claims(), kid="k1")
        bad = sign(signing_key, claims(exp=NOW - 1), kid="k1")
        wire.command(b"AUTH OAUTHBEARER " + b64(oauthbearer(bad)))
        wire.command(b"AQ==")
        wire.command(b"AUTH XOAUTH2 " + b64(xoauth2(good)))
        wire.command(b"QUIT")
        text = logged.with_fields()
        assert "login failed" in text and "login: " in text
        for token in (good, bad):
            for part in token.split("."):
                assert part not in text


# -- JWT validation ---------------------------------------------------------------------


@pytest.fixture
def jwt_checker(jwks_conf: Path) -> Callable[..., OAuth2Checker]:
    def make(conf: Path = jwks_conf, now: float = NOW) -> OAuth2Checker:
        clock = Clock()
        clock.advance(now)
        return OAuth2Checker(read_settings(str(conf)), reactor, clock=clock)

    return make


def login(checker: OAuth2Checker, token: str, user: bytes = b"") -> Any:
    """The checker's answer: the avatar id, or the failure's type."""
    result: list[Any] = []
    credentials = BearerTokenCredentials(user, token.encode())
    checker.requestAvatarId(credentials).addBoth(result.append)
    assert result, "the checker did not answer at once"
    outcome = result[0]
    if hasattr(outcome, "type"):
        return outcome.type
    return outcome


class TestJWT:
    def test_accepted(self, jwt_checker: Callable[..., OAuth2Checker], signing_key: Any) -> None:
        checker = jwt_checker()
        token = sign(signing_key, claims(), kid="k1")
        assert login(checker, token) == AuthenticatedUser(name=ALICE)

    @pytest.mark.parametrize(
        "changes",
        [
            {"exp": NOW - 1},  # expired
            {"exp": None},  # exp is required (Dovecot)
            {"nbf": NOW + 60},  # not yet valid
            {"iat": NOW + 60},  # issued in the future
            {"iss": "https://evil.example.test"},  # not one of issuers
            {"iss": None},
            {"exp": "tomorrow"},
            {"email": None},  # no username_attribute
        ],
    )
    def test_refused_claims(
        self,
        jwt_checker: Callable[..., OAuth2Checker],
        signing_key: Any,
        changes: dict[str, Any],
    ) -> None:
        """RFC 7519 sections 4.1.1 (iss), 4.1.4 (exp), 4.1.5 (nbf), 4.1.6 (iat)."""
        checker = jwt_checker()
        token = sign(signing_key, claims(**changes), kid="k1")
        assert login(checker, token) is UnauthorizedLogin

    def test_time_is_the_injected_clocks(
        self, jwt_checker: Callable[..., OAuth2Checker], signing_key: Any
    ) -> None:
        token = sign(signing_key, claims(), kid="k1")
        assert login(jwt_checker(now=NOW + 3599), token) == AuthenticatedUser(name=ALICE)
        assert login(jwt_checker(now=NOW + 3601), token) is UnauthorizedLogin

    def test_wrong_key(self, jwt_checker: Callable[..., OAuth2Checker]) -> None:
        """Signed by a key that is not in the set, under a kid that is."""
        token = sign(ec_key("k1"), claims(), kid="k1")
        assert login(jwt_checker(), token) is UnauthorizedLogin

    def test_kid_selects_the_key(
        self, jwt_checker: Callable[..., OAuth2Checker], signing_key: Any
    ) -> None:
        """RFC 7515 section 4.1.4: only the key the kid names verifies the token."""
        assert login(jwt_checker(), sign(signing_key, claims(), kid="k2")) is UnauthorizedLogin
        assert login(jwt_checker(), sign(signing_key, claims(), kid="k9")) is UnauthorizedLogin
        assert login(jwt_checker(), sign(signing_key, claims(), kid="k1")) == AuthenticatedUser(
            name=ALICE
        )

    def test_alg_none_is_refused(self, jwt_checker: Callable[..., OAuth2Checker]) -> None:
        """RFC 7519 section 6: an unsecured JWT is never accepted."""
        assert login(jwt_checker(), unsigned(claims())) is UnauthorizedLogin

    def test_hmac_with_the_public_key_is_refused(
        self, jwt_checker: Callable[..., OAuth2Checker], signing_key: Any
    ) -> None:
        """Algorithm confusion: HS256 keyed with the public key's bytes."""
        from joserfc.jwk import OctKey

        public = json.dumps(signing_key.as_dict(private=False)).encode()
        token = sign(OctKey.import_key(public), claims(), alg="HS256", kid="k1")
        assert login(jwt_checker(), token) is UnauthorizedLogin

    def test_not_a_jwt_is_refused_without_an_oauth2_server(
        self, jwt_checker: Callable[..., OAuth2Checker]
    ) -> None:
        assert login(jwt_checker(), "opaque-token") is UnauthorizedLogin

    @pytest_twisted.ensureDeferred
    async def test_the_key_dict_directory(self, tmp_path: Path) -> None:
        """
        Dovecot's local_validation_key_dict = fs:posix:prefix=DIR: the key of
        a token is DIR/<azp>/<ALG>/<kid> ("/" in a kid as %2f), base64 for
        HMAC, PEM for EC; read in the thread pool.
        """
        from joserfc.jwk import OctKey

        keys = tmp_path / "keys"
        secret = b"0123456789abcdef0123456789abcdef"
        (keys / "default" / "HS256").mkdir(parents=True)
        (keys / "default" / "HS256" / "default").write_bytes(base64.b64encode(secret))
        ec = ec_key("ignored")
        (keys / "mail-client" / "ES256").mkdir(parents=True)
        (keys / "mail-client" / "ES256" / "key%2f1").write_bytes(ec.as_pem(private=False))
        conf = write_conf(
            tmp_path / "dovecot-oauth2.conf.ext",
            f"introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={keys}/\n"
            "username_attribute = sub\n",
        )
        clock = Clock()
        clock.advance(NOW)
        checker = OAuth2Checker(read_settings(str(conf)), reactor, clock=clock)
        hs = sign(OctKey.import_key(secret), claims(sub="Carol"), alg="HS256")
        es = sign(ec, claims(sub="dave", azp="mail-client"), kid="key/1")
        wrong_dir = sign(ec, claims(sub="dave"), kid="key/1")
        traversal = sign(ec, claims(sub="dave", azp=".."), kid="key/1")
        assert await check(checker, hs) == AuthenticatedUser(name="carol")
        assert await check(checker, es) == AuthenticatedUser(name="dave")
        assert await check(checker, wrong_dir) is UnauthorizedLogin
        assert await check(checker, traversal) is UnauthorizedLogin


# -- introspection against the provider ---------------------------------------------


@pytest_twisted.async_yield_fixture
async def provider_url() -> AsyncIterator[tuple[str, ProviderState]]:
    state = ProviderState()
    state.tokens["good-token"] = {"email": ALICE, "username": "alice", "scope": "mail openid"}
    port = listen(reactor, state)
    host = port.getHost()
    try:
        yield f"http://127.0.0.1:{host.port}", state  # type: ignore[attr-defined]
    finally:
        for request in state.stalled:
            request.transport.abortConnection()  # type: ignore[union-attr]
        await port.stopListening()


def http_checker(tmp_path: Path, text: str, clock: Any = None) -> OAuth2Checker:
    conf = write_conf(tmp_path / "dovecot-oauth2.conf.ext", text)
    return OAuth2Checker(read_settings(str(conf)), reactor, clock=clock)


async def check(checker: OAuth2Checker, token: str, user: bytes = b"") -> Any:
    credentials = BearerTokenCredentials(user, token.encode())
    try:
        return await checker.requestAvatarId(credentials)
    except Exception as error:
        return type(error)


class TestIntrospection:
    @pytest_twisted.ensureDeferred
    async def test_auth_mode_is_the_default(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        """Dovecot: "auth" = GET with Authorization: Bearer <token> (RFC 6750 section 2.1)."""
        url, state = provider_url
        checker = http_checker(tmp_path, f"introspection_url = {url}/userinfo\n")
        assert await check(checker, "good-token") == AuthenticatedUser(name=ALICE)
        assert await check(checker, "other-token") is UnauthorizedLogin  # a 401
        seen = state.seen[0]
        assert (seen.method, seen.path, seen.bearer, seen.query_token) == (
            "GET",
            "/userinfo",
            "good-token",
            None,
        )

    @pytest_twisted.ensureDeferred
    async def test_get_mode(self, tmp_path: Path, provider_url: tuple[str, ProviderState]) -> None:
        """Dovecot: "get" = the token appended to the URL, then client_id and client_secret."""
        url, state = provider_url
        checker = http_checker(
            tmp_path,
            f"introspection_mode = get\nintrospection_url = {url}/introspect?token=\n"
            "client_id = pop3d\nclient_secret = s3cret\n",
        )
        assert await check(checker, "good-token") == AuthenticatedUser(name=ALICE)
        seen = state.seen[0]
        assert (seen.method, seen.query_token, seen.bearer) == ("GET", "good-token", None)
        assert await check(checker, "unknown") is UnauthorizedLogin  # RFC 7662: active false

    @pytest_twisted.ensureDeferred
    async def test_post_mode_with_basic_auth_from_the_url(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        """Dovecot: "post" = POST token=<token> (RFC 7662 section 2.1), Basic from the URL."""
        url, state = provider_url
        with_user = url.replace("http://", "http://pop3d:s%3Acret@")
        checker = http_checker(
            tmp_path,
            f"introspection_mode = post\nintrospection_url = {with_user}/introspect\n"
            "username_attribute = username\n",
        )
        assert await check(checker, "good-token", b"alice") == AuthenticatedUser(name="alice")
        seen = state.seen[0]
        assert (seen.method, seen.form_token, seen.bearer) == ("POST", "good-token", None)
        assert seen.basic == ("pop3d", "s:cret")
        assert seen.content_type == "application/x-www-form-urlencoded"
        assert await check(checker, "unknown") is UnauthorizedLogin
        assert await check(checker, "good-token", b"bob") is UnauthorizedLogin

    @pytest_twisted.ensureDeferred
    async def test_active_attribute_and_scope(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        url, state = provider_url
        state.tokens["disabled"] = {"email": "eve@x.test", "enabled": "no", "scope": "mail"}
        state.tokens["enabled"] = {"email": "Fay@X.test", "enabled": "yes", "scope": "mail"}
        state.tokens["no-scope"] = {"email": "gil@x.test", "enabled": "yes", "scope": "openid"}
        checker = http_checker(
            tmp_path,
            f"introspection_url = {url}/userinfo\nactive_attribute = enabled\n"
            "active_value = yes\nscope = mail\n",
        )
        assert await check(checker, "enabled") == AuthenticatedUser(name="fay@x.test")
        assert await check(checker, "disabled") is UnauthorizedLogin
        assert await check(checker, "no-scope") is UnauthorizedLogin

    @pytest_twisted.ensureDeferred
    async def test_username_format_u_keeps_the_case(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        url, state = provider_url
        state.tokens["t"] = {"email": "Hal@X.test"}
        checker = http_checker(
            tmp_path, f"introspection_url = {url}/userinfo\nusername_format = %u\n"
        )
        assert await check(checker, "t") == AuthenticatedUser(name="Hal@X.test")

    @pytest_twisted.ensureDeferred
    async def test_tokeninfo_then_introspection_for_missing_fields(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        """Dovecot's tokeninfo_url: the token appended; introspection if a field is missing."""
        url, state = provider_url
        state.tokens["tok"] = {"email": ALICE, "quota": "1"}
        checker = http_checker(
            tmp_path,
            f"tokeninfo_url = {url}/tokeninfo?access_token=\n"
            f"introspection_url = {url}/userinfo\nusername_attribute = email\n",
        )
        assert await check(checker, "tok") == AuthenticatedUser(name=ALICE)
        assert [seen.path for seen in state.seen] == ["/tokeninfo"]
        forced = http_checker(
            tmp_path,
            f"tokeninfo_url = {url}/tokeninfo?access_token=\nforce_introspection = yes\n"
            f"introspection_url = {url}/userinfo\n",
        )
        assert await check(forced, "tok") == AuthenticatedUser(name=ALICE)
        assert [seen.path for seen in state.seen] == ["/tokeninfo", "/tokeninfo", "/userinfo"]

    @pytest_twisted.ensureDeferred
    async def test_jwks_url(self, tmp_path: Path, provider_url: tuple[str, ProviderState]) -> None:
        url, state = provider_url
        key = ec_key("live")
        state.jwks = jwks_of(key)
        clock = Clock()
        clock.advance(NOW)
        checker = http_checker(
            tmp_path, f"introspection_mode = local\njwks_url = {url}/jwks.json\n", clock
        )
        assert await check(checker, sign(key, claims(), kid="live")) == AuthenticatedUser(
            name=ALICE
        )
        assert await check(checker, sign(key, claims(), kid="live")) == AuthenticatedUser(
            name=ALICE
        )
        # Fetched once; an unknown kid does not fetch again within a minute.
        assert await check(checker, sign(key, claims(), kid="gone")) is UnauthorizedLogin
        assert [seen.path for seen in state.seen] == ["/jwks.json"]


class TestOutages:
    @pytest_twisted.ensureDeferred
    async def test_server_error_is_unavailable_and_logged_once(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState], logged: Logged
    ) -> None:
        """A 5xx is no verdict on the token: -ERR [SYS/TEMP], logged once per outage."""
        url, state = provider_url
        checker = http_checker(tmp_path, f"introspection_url = {url}/userinfo?x=1\n")
        state.status = 503
        assert await check(checker, "good-token") is AuthUnavailable
        assert await check(checker, "good-token") is AuthUnavailable
        state.status = None
        assert await check(checker, "good-token") == AuthenticatedUser(name=ALICE)
        assert len(logged.texts("oauth2: token check unavailable")) == 1
        assert logged.texts("oauth2: token check unavailable") == [
            f"oauth2: token check unavailable: {url}/userinfo answered 503"
        ]
        assert len(logged.texts("oauth2: token check available again")) == 1
        assert "good-token" not in logged.with_fields()

    @pytest_twisted.ensureDeferred
    async def test_a_jwks_url_fetched_as_any_other_answer(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState], logged: Logged
    ) -> None:
        """A JWK Set is fetched with the bounds of every answer: too large is an outage."""
        url, state = provider_url
        clock = Clock()
        clock.advance(NOW)
        checker = http_checker(
            tmp_path, f"introspection_mode = local\njwks_url = {url}/jwks.json\n", clock
        )
        state.jwks = {"keys": [], "padding": "x" * (1 << 20)}
        assert await check(checker, sign(ec_key("live"), claims(), kid="live")) is AuthUnavailable
        assert logged.texts("oauth2: token check unavailable") == [
            f"oauth2: token check unavailable: {url}/jwks.json: answer larger than 1048576 bytes"
        ]

    @pytest_twisted.ensureDeferred
    async def test_slow_server_times_out(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        """timeout_msecs on the injected clock: no sleeping."""
        url, state = provider_url
        clock = Clock()
        checker = http_checker(
            tmp_path, f"introspection_url = {url}/userinfo\ntimeout_msecs = 2500\n", clock
        )
        state.stall = True
        answer = check(checker, "good-token")
        pending: Deferred[Any] = Deferred.fromCoroutine(answer)
        while not state.stalled:
            await _tick()
        assert not pending.called
        clock.advance(2.4)
        assert not pending.called
        clock.advance(0.2)
        assert await pending is AuthUnavailable

    @pytest_twisted.ensureDeferred
    async def test_nobody_listening(self, tmp_path: Path) -> None:
        port = listen(reactor, ProviderState())
        address = port.getHost()
        await port.stopListening()
        checker = http_checker(
            tmp_path,
            f"introspection_url = http://127.0.0.1:{address.port}/userinfo\n",  # type: ignore[attr-defined]
        )
        assert await check(checker, "good-token") is AuthUnavailable

    @pytest_twisted.ensureDeferred
    async def test_a_4xx_refuses_the_token(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        """Dovecot: a 4xx answer is a verdict (the token is refused), not an outage."""
        url, _ = provider_url
        checker = http_checker(tmp_path, f"introspection_url = {url}/nowhere\n")
        assert await check(checker, "good-token") is UnauthorizedLogin

    @pytest_twisted.ensureDeferred
    async def test_not_json_is_unavailable(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        url, _ = provider_url
        checker = http_checker(tmp_path, f"introspection_url = {url}/garbage\n")
        assert await check(checker, "good-token") is AuthUnavailable


async def _tick() -> None:
    """Let the reactor run once (the provider receives the request)."""
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0, lambda: None)


# -- the config file ---------------------------------------------------------------------


class TestConfig:
    def test_a_damaged_ca_certificate_is_a_usage_error_naming_the_file(
        self, tmp_path: Path
    ) -> None:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
        )
        conf = write_conf(
            tmp_path / "dovecot-oauth2.conf.ext",
            f"introspection_url = https://x/\ntls_ca_cert_file = {ca}\n",
        )
        with pytest.raises(ConfigFileError) as raised:
            OAuth2Checker(read_settings(str(conf)), reactor, clock=Clock())
        assert str(raised.value).startswith(f"{conf}:0: tls_ca_cert_file: unreadable certificate (")

    @pytest.mark.parametrize(
        ("text", "line", "reason"),
        [
            ("introspection_url = http://x/\nuse_grant_password = yes\n", 2, "use_grant_password"),
            ("introspection_url = http://x/\nintrospection_mode = fast\n", 2, "introspection_mode"),
            ("introspection_url = ftp://x/\n", 1, "not an http:// or https:// URL"),
            ("introspection_url = http://x/\nno_such_key = 1\n", 2, "no_such_key"),
            (
                "introspection_mode = local\nlocal_validation_key_dict = redis:host=x\n",
                2,
                "fs:posix:prefix",
            ),
            ("introspection_mode = local\n", 0, "introspection_url, tokeninfo_url"),
            ("introspection_url = http://x/\nusername_format = %n\n", 2, "username_format"),
            ("introspection_url = http://x/\ntimeout_msecs = soon\n", 2, "timeout_msecs"),
            ("introspection_url = http://x/\npass_attrs = proxy=y\n", 2, "pass_attrs"),
            ("introspection_url = http://x/\ntls_ca_cert_file = /nonexistent\n", 2, "no such"),
            (
                "introspection_url = http://x/\nforce_introspection = sure\n",
                2,
                "force_introspection 'sure': expected yes or no",
            ),
        ],
    )
    def test_refused_with_file_and_line(
        self, tmp_path: Path, text: str, line: int, reason: str
    ) -> None:
        conf = write_conf(tmp_path / "dovecot-oauth2.conf.ext", text)
        with pytest.raises(ConfigFileError) as raised:
            read_settings(str(conf))
        assert str(raised.value).startswith(f"{conf}:{line}: ")
        assert reason in str(raised.value)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "tokeninfo_url = https://www.googleapis.com/oauth2/v3/tokeninfo?access_token=\n"
                "introspection_url = https://www.googleapis.com/oauth2/v2/userinfo\n"
                "#force_introspection = yes\nusername_attribute = email\n",
                {
                    "introspection_mode": "auth",
                    "introspection": "https://www.googleapis.com/oauth2/v2/userinfo",
                    "tokeninfo": "https://www.googleapis.com/oauth2/v3/tokeninfo?access_token=",
                    "force_introspection": False,
                    "username_attribute": "email",
                },
            ),
            (
                "introspection_mode = post\n"
                "introspection_url = https://adminuser:adminpass@server.name:9443/oauth2/introspect\n"
                "username_attribute = username\nactive_attribute = active\nactive_value = true\n",
                {
                    "introspection_mode": "post",
                    "introspection": "https://server.name:9443/oauth2/introspect",
                    "username_attribute": "username",
                    "active_attribute": "active",
                    "active_value": "true",
                },
            ),
            (
                "introspection_mode = auth\nintrospection_url = https://graph.microsoft.com/v1.0/me\n"
                "username_attribute = mail\ndebug = yes\nmax_parallel_connections = 10\n"
                "use_grant_password = no\ngrant_url = https://x/token\nblocking = yes\n",
                {
                    "introspection_mode": "auth",
                    "introspection": "https://graph.microsoft.com/v1.0/me",
                    "username_attribute": "mail",
                },
            ),
        ],
        ids=["google", "wso2", "microsoft"],
    )
    def test_dovecots_example_files_are_accepted(
        self, tmp_path: Path, text: str, expected: dict[str, object]
    ) -> None:
        """The examples of Dovecot's oauth2 documentation, read as Dovecot reads them."""
        settings = read_settings(str(write_conf(tmp_path / "c.conf.ext", text)))
        found: dict[str, object] = {
            name: getattr(settings, name)
            for name in expected
            if name not in ("introspection", "tokeninfo")
        }
        if settings.introspection_url is not None:
            found["introspection"] = settings.introspection_url.url
        if "tokeninfo" in expected and settings.tokeninfo_url is not None:
            found["tokeninfo"] = settings.tokeninfo_url.url
        assert found == expected

    def test_post_url_password_is_kept_out_of_the_url(self, tmp_path: Path) -> None:
        conf = write_conf(
            tmp_path / "c.conf.ext",
            "introspection_mode = post\n"
            "introspection_url = https://adminuser:adminpass@server.name:9443/oauth2/introspect\n",
        )
        endpoint = read_settings(str(conf)).introspection_url
        assert endpoint is not None
        assert endpoint.url == "https://server.name:9443/oauth2/introspect"
        assert endpoint.basic_auth == ("adminuser", "adminpass")

    def test_usage_error_names_file_and_line(self, tmp_path: Path) -> None:
        conf = write_conf(
            tmp_path / "dovecot-oauth2.conf.ext",
            "introspection_url = http://x/\n\nuse_grant_password = yes\n",
        )
        options = Options()
        with pytest.raises(usage.UsageError) as raised:
            options.parseOptions(
                ["--mail-location", f"maildir:{tmp_path}/{{user}}", "--auth", f"oauth2:{conf}"]
            )
        assert f"{conf}:3: use_grant_password is not supported by pop3d" in str(raised.value)

    def test_factory_needs_a_path(self) -> None:
        with pytest.raises(OAuth2Error):
            OAuth2CheckerFactory(reactor).generateChecker("")

    def test_portal_registers_the_bearer_token_interface(self, jwks_conf: Path) -> None:
        from pop3d.sasl.oauth2 import IOAuth2BearerToken

        checker = OAuth2Checker(read_settings(str(jwks_conf)), reactor, clock=Clock())
        portal: Portal = build_portal(MaildropRealm(MemoryStore()), [checker])
        assert IOAuth2BearerToken in portal.listCredentialsInterfaces()


def test_the_readmes_example_is_accepted(tmp_path: Path) -> None:
    """README, "OAuth2 (--auth oauth2:)": its config file and command line start a server."""
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    section = readme.split("OAuth2 (``--auth oauth2:``)\n", 1)[1]
    block = section.split("    # /etc/pop3d/dovecot-oauth2.conf.ext\n", 1)[1].split("\n\n", 1)[0]
    conf = tmp_path / "dovecot-oauth2.conf.ext"
    conf.write_text("".join(line.removeprefix("    ") + "\n" for line in block.splitlines()))
    if not Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        conf.write_text(conf.read_text().replace("/etc/ssl/certs/ca-certificates.crt", ""))
    settings = read_settings(str(conf))
    assert settings.introspection_mode == "post"
    assert settings.introspection_url is not None
    assert settings.introspection_url.basic_auth == ("pop3d", "client-secret")
    command = section.split("twistd -n --pidfile= pop3d ", 1)[1].split("\n    curl", 1)[0]
    arguments = command.replace("\\\n", " ").replace("'", "").split()
    arguments = [
        f"maildir:{tmp_path}/{{user}}" if a.startswith("maildir:") else a for a in arguments
    ]
    arguments = [f"oauth2:{conf}" if a.startswith("oauth2:") else a for a in arguments]
    options = Options()
    options.parseOptions(arguments)
    assert [type(c).__name__ for c in options["credCheckers"]] == ["OAuth2Checker"]


class TestSeveralCheckers:
    """`FirstMatchChecker` (repeated --auth) with checkers that may be unavailable."""

    @pytest_twisted.ensureDeferred
    async def test_unavailable_is_not_a_wrong_password(
        self, tmp_path: Path, provider_url: tuple[str, ProviderState]
    ) -> None:
        from pop3d.checkers import FirstMatchChecker
        from pop3d.sasl.oauth2 import IOAuth2BearerToken

        url, state = provider_url
        down = http_checker(tmp_path, f"introspection_url = {url}/userinfo\n")
        other = tmp_path / "other"
        other.mkdir()
        up = http_checker(
            other, f"introspection_mode = get\nintrospection_url = {url}/introspect?token=\n"
        )
        both = FirstMatchChecker([down, up], [IOAuth2BearerToken])
        state.status = 503
        # Neither can tell: the service is unavailable, not the password wrong.
        assert await check(both, "good-token") is AuthUnavailable  # type: ignore[arg-type]
        state.status = None
        assert await check(both, "good-token") == AuthenticatedUser(name=ALICE)  # type: ignore[arg-type]
        assert await check(both, "nobodys-token") is UnauthorizedLogin  # type: ignore[arg-type]
        verdict = await both.check_token(BearerTokenCredentials(b"", b"nobodys-token"))
        assert verdict.user is None and verdict.refused == TokenRefusal()


@pytest_twisted.ensureDeferred
async def test_sighup_reads_the_file_again(
    tmp_path: Path, jwks_conf: Path, signing_key: Any, logged: Logged
) -> None:
    """IReloadable: new keys after a reload; a broken file is logged and the old one kept."""
    from pop3d.reloading import IReloadable

    clock = Clock()
    clock.advance(NOW)
    checker = OAuth2Checker(read_settings(str(jwks_conf)), reactor, clock=clock)
    assert IReloadable.providedBy(checker)
    rotated = ec_key("k3")
    token = sign(rotated, claims(), kid="k3")
    assert await check(checker, token) is UnauthorizedLogin
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(signing_key, rotated)))
    await checker.reload()
    assert await check(checker, token) == AuthenticatedUser(name=ALICE)
    jwks_conf.write_text(jwks_conf.read_text() + "use_grant_password = yes\n")
    await checker.reload()
    assert logged.texts(str(jwks_conf)) == [
        f"reloaded {jwks_conf}",
        f"keeping the previous {jwks_conf}: {jwks_conf}:4: use_grant_password is not supported "
        "by pop3d",
    ]
    assert await check(checker, token) == AuthenticatedUser(name=ALICE)


def test_a_reload_reads_the_files_in_the_thread_pool_and_logins_wait_for_it(
    tmp_path: Path, jwks_conf: Path, signing_key: Any, logged: Logged
) -> None:
    """
    SIGHUP's reading of the file, and of the JWK Set it names, is handed to
    the thread pool, not done on the reactor thread; a token checked
    meanwhile waits for it, and is validated with the new keys.
    """
    clock = Clock()
    clock.advance(NOW)
    threads = ClockThreads(clock)
    checker = OAuth2Checker(read_settings(str(jwks_conf)), threads.as_reactor, clock=clock)
    rotated = ec_key("k3")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(signing_key, rotated)))
    checker.reload()
    assert threads.handed_over == 1
    checked = Deferred.fromCoroutine(check(checker, sign(rotated, claims(), kid="k3")))
    assert not checked.called
    assert result_of(clock, checked) == AuthenticatedUser(name=ALICE)
    assert logged.texts("reloaded") == [f"reloaded {jwks_conf}"]


def test_a_broken_reload_keeps_the_settings_in_use_and_is_logged_once(
    jwks_conf: Path, signing_key: Any, logged: Logged
) -> None:
    clock = Clock()
    clock.advance(NOW)
    threads = ClockThreads(clock)
    checker = OAuth2Checker(read_settings(str(jwks_conf)), threads.as_reactor, clock=clock)
    jwks_conf.write_text(jwks_conf.read_text() + "introspection_mode = sideways\n")
    checker.reload()
    token = sign(signing_key, claims(), kid="k1")
    checks = [Deferred.fromCoroutine(check(checker, token)) for _ in range(2)]
    assert not any(checked.called for checked in checks)
    assert [result_of(clock, checked) for checked in checks] == [AuthenticatedUser(name=ALICE)] * 2
    assert logged.texts("keeping the previous") == [
        f"keeping the previous {jwks_conf}: {jwks_conf}:4: introspection_mode must be one of "
        "auth, get, post, local, not 'sideways'"
    ]
