"""
SCRAM-SHA-256 (RFC 5802, RFC 7677): the client proves it knows the
password without sending it, and the server proves it knows the user's
keys.  Offered on unencrypted connections too.

The exchange, in RFC 5034's terms::

    C: AUTH SCRAM-SHA-256
    S: +                                  (empty challenge)
    C: n,,n=user,r=<client nonce>         (client-first)
    S: + r=<nonce>,s=<salt>,i=<count>     (server-first)
    C: c=biws,r=<nonce>,p=<proof>         (client-final)
    S: + v=<server signature>             (server-final, only for a good proof)
    C:                                    (empty)
    S: +OK

The mechanism reads the user's salt and iteration count from the
`IScramKeySource` that the server's verifiers give it (the check of
`IScramSHA256Credentials`, `pop3d.sasl.IVerifiers.lookup`), checks the proof
to decide whether to send ``v=``, and in the end hands the server
`ScramCredentials` whose ``verify`` the checker calls to decide the login
itself (a password file does so with `verify_scram`, registered in
`pop3d.credchecks.PASSWORD_CHECKS`).  A wrong proof gets no ``v=``: the login fails at once, through
the session's usual failed-login path.  An unknown user gets a salt made up
from the user name (stable for the life of the process, unpredictable from
outside) and the usual iteration count, so that it looks like any other.

Limits: no channel binding (``p=`` is refused, so there is no
SCRAM-SHA-256-PLUS; ``y`` is accepted, as RFC 5802 section 6 allows a server
without channel binding); no SASLprep (user names and passwords are compared
as the client sends them, as Dovecot does); an authorization identity must be
the user itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.credchecks import PASSWORD_CHECKS, PasswordCheck, PasswordLookup
from pop3d.passwords import SCRAM_ITERATIONS, PasswordScheme, ScramSHA256Scheme, scram_salt
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    IScramKeySource,
    IScramSHA256Credentials,
    IVerifiers,
    SASLError,
    SASLFailure,
    ScramKeys,
    decode_saslname,
)

log = Logger()

_PRINTABLE_NONCE = re.compile(rb"[\x21-\x2b\x2d-\x7e]+")


@implementer(IScramSHA256Credentials)
class ScramCredentials:
    """
    A client-final message: the proof over ``auth_message``, made with the
    salt and iteration count the server sent.
    """

    def __init__(
        self, username: bytes, auth_message: bytes, proof: bytes, salt: bytes, iterations: int
    ) -> None:
        self.username = username
        self.auth_message = auth_message
        self.proof = proof
        self.salt = salt
        self.iterations = iterations

    def verify(self, keys: ScramKeys) -> bool:
        """
        RFC 5802 section 3: ClientKey = ClientProof XOR HMAC(StoredKey,
        AuthMessage), and H(ClientKey) must be StoredKey.  Keys made with
        another salt or count than the ones the client used never match.
        """
        signature = hmac.digest(keys.stored_key, self.auth_message, "sha256")
        client_key = bytes(p ^ s for p, s in zip(self.proof, signature, strict=False))
        proven = hmac.compare_digest(hashlib.sha256(client_key).digest(), keys.stored_key)
        same_parameters = hmac.compare_digest(keys.salt, self.salt) and (
            keys.iterations == self.iterations
        )
        return proven and same_parameters and len(self.proof) == len(signature)


def server_signature(keys: ScramKeys, auth_message: bytes) -> bytes:
    return hmac.digest(keys.server_key, auth_message, "sha256")


def _random_nonce() -> bytes:
    return secrets.token_urlsafe(24).encode("ascii")


@implementer(ISASLMechanism)
class ScramSHA256:
    """
    The SCRAM-SHA-256 mechanism.  ``make_nonce`` gives the server's part of
    the nonce (random by default; tests inject RFC 7677's).
    """

    name = b"SCRAM-SHA-256"
    sends_password = False

    def __init__(self, make_nonce: Callable[[], bytes] = _random_nonce) -> None:
        self._make_nonce = make_nonce

    def usable(self, verifiers: IVerifiers) -> bool:
        return _key_source(verifiers) is not None

    def start(self, context: ExchangeContext) -> ISASLExchange:
        return _ScramExchange(_key_source(context.verifiers), self._make_nonce())


def _key_source(verifiers: IVerifiers) -> IScramKeySource | None:
    """The keys of the check that will verify the credentials, if it gives any."""
    source: IScramKeySource | None = verifiers.lookup(IScramSHA256Credentials, IScramKeySource)
    return source


def unescape_saslname(value: bytes) -> bytes:
    """RFC 5802 section 5.1: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is an error."""
    unescaped = decode_saslname(value)
    if unescaped is None:
        raise SASLError("malformed SCRAM user name", SASLFailure.MALFORMED)
    return unescaped


def escape_saslname(value: bytes) -> bytes:
    return value.replace(b"=", b"=3D").replace(b",", b"=2C")


@implementer(ISASLExchange)
class _ScramExchange:
    def __init__(self, source: IScramKeySource | None, server_nonce: bytes) -> None:
        self._source = source
        self._server_nonce = server_nonce
        self._step = self._client_first
        self._asked = False
        # Set by the client-first message:
        self._gs2_header = b""
        self._client_first_bare = b""
        self._username = b""
        self._nonce = b""
        self._server_first = b""
        self._keys: ScramKeys | None = None
        self._salt = b""
        self._iterations = 0
        # Set by a client-final message with a good proof:
        self._credentials: ScramCredentials | None = None

    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        try:
            return self._step(response)
        except SASLError as error:
            return fail(error)

    def _client_first(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        if response is None:
            if self._asked:
                raise SASLError("expected the SCRAM client-first message", SASLFailure.UNEXPECTED)
            # No initial response: ask for the client-first message.
            self._asked = True
            return succeed(Challenge(b""))
        flag, authzid_field, bare = _split(response, 3, "client-first")
        if flag.startswith(b"p="):
            raise SASLError("SCRAM channel binding is not supported", SASLFailure.UNSUPPORTED)
        if flag not in (b"n", b"y"):
            raise SASLError("malformed SCRAM client-first message")
        authzid = b""
        if authzid_field:
            if not authzid_field.startswith(b"a="):
                raise SASLError("malformed SCRAM client-first message")
            authzid = unescape_saslname(authzid_field[2:])
        attributes = bare.split(b",")
        if attributes[0].startswith(b"m="):
            raise SASLError("SCRAM mandatory extensions are not supported", SASLFailure.UNSUPPORTED)
        if (
            len(attributes) < 2
            or not attributes[0].startswith(b"n=")
            or not attributes[1].startswith(b"r=")
        ):
            raise SASLError("malformed SCRAM client-first message")
        username = unescape_saslname(attributes[0][2:])
        client_nonce = attributes[1][2:]
        if not username or not _PRINTABLE_NONCE.fullmatch(client_nonce):
            raise SASLError("malformed SCRAM client-first message")
        if authzid and authzid != username:
            raise SASLError("not authorized to act as another user", SASLFailure.NOT_AUTHORIZED)
        self._gs2_header = flag + b"," + authzid_field + b","
        self._client_first_bare = bare
        self._username = username
        self._nonce = client_nonce + self._server_nonce
        self._step = self._refuse
        return self._lookup(username).addCallback(self._send_server_first)

    def _lookup(self, username: bytes) -> Deferred[ScramKeys | None]:
        source = self._source
        if source is None:
            return succeed(None)

        def broken(failure: Failure) -> None:
            # A broken key source must not tell which users exist.
            log.failure("SCRAM key source {source} failed", failure, source=source)
            return None

        keys: Deferred[ScramKeys | None] = maybeDeferred(source.scram_sha256_keys, username)
        return keys.addErrback(broken)

    def _send_server_first(self, keys: ScramKeys | None) -> Challenge:
        self._keys = keys
        if keys is None:
            self._salt, self._iterations = scram_salt(self._username), SCRAM_ITERATIONS
        else:
            self._salt, self._iterations = keys.salt, keys.iterations
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            base64.b64encode(self._salt),
            self._iterations,
        )
        self._step = self._client_final
        return Challenge(self._server_first)

    def _client_final(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        self._step = self._refuse
        message = response or b""
        without_proof, separator, proof_b64 = message.rpartition(b",p=")
        attributes = without_proof.split(b",")
        if not separator or len(attributes) < 2:
            raise SASLError("malformed SCRAM client-final message")
        binding, nonce = attributes[0], attributes[1]
        if not binding.startswith(b"c=") or not nonce.startswith(b"r="):
            raise SASLError("malformed SCRAM client-final message")
        if _b64decode(binding[2:]) != self._gs2_header:
            raise SASLError("SCRAM channel binding data does not match the client-first message")
        if not hmac.compare_digest(nonce[2:], self._nonce):
            raise SASLError("SCRAM nonce does not match")
        proof = _b64decode(proof_b64)
        if proof is None or len(proof) != hashlib.sha256().digest_size:
            raise SASLError("malformed SCRAM client proof")
        auth_message = b",".join([self._client_first_bare, self._server_first, without_proof])
        credentials = ScramCredentials(
            self._username, auth_message, proof, self._salt, self._iterations
        )
        keys = self._keys
        if keys is None or not credentials.verify(keys):
            # No v= for a wrong proof: the checker refuses these credentials
            # and the session answers as for any failed login.
            return succeed(Authenticate(credentials, self._username))
        self._credentials = credentials
        self._step = self._client_done
        signature = base64.b64encode(server_signature(keys, auth_message))
        return succeed(Challenge(b"v=" + signature))

    def _client_done(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        self._step = self._refuse
        if response:
            raise SASLError("expected an empty response after the SCRAM server-final message")
        assert self._credentials is not None
        return succeed(Authenticate(self._credentials, self._username))

    def _refuse(self, response: bytes | None) -> Deferred[Challenge | Authenticate]:
        raise SASLError("the SCRAM exchange is over", SASLFailure.UNEXPECTED)


def _split(message: bytes, count: int, what: str) -> list[bytes]:
    parts = message.split(b",", count - 1)
    if len(parts) != count:
        raise SASLError(f"malformed SCRAM {what} message")
    return parts


def _b64decode(value: bytes) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        return None


# -- in a password file -----------------------------------------------------------------

_DUMMY_SCRAM_KEYS = ScramKeys(
    secrets.token_bytes(16), SCRAM_ITERATIONS, secrets.token_bytes(32), secrets.token_bytes(32)
)


def verify_scram(lookup: PasswordLookup, credentials: Any) -> Deferred[bool]:
    """
    The proof against the keys of the lookup's entry (stored or derived); an
    unknown user's against made-up keys, after the same work.
    """

    def verify(keys: ScramKeys | None) -> bool:
        matched = bool(credentials.verify(keys or _DUMMY_SCRAM_KEYS))
        return matched and keys is not None

    return lookup.scram_keys().addCallback(verify)


def _possible(schemes: Collection[PasswordScheme]) -> bool:
    return any(scheme.plaintext or isinstance(scheme, ScramSHA256Scheme) for scheme in schemes)


PASSWORD_CHECKS.register(PasswordCheck(IScramSHA256Credentials, verify_scram, possible=_possible))
