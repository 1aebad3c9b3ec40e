"""
A small OAuth2 provider for the tests, in twisted.web: RFC 7662 token
introspection (``/introspect``, answering ``{"active": false}`` for unknown
tokens), a userinfo endpoint (``/userinfo``, 401 for unknown tokens, as
Google's and Microsoft's), a tokeninfo endpoint (``/tokeninfo?access_token=``),
and a JWK Set (``/jwks.json``); and the JWTs and keys the tests sign with.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

ISSUER = "https://id.example.test"


@dataclass
class Seen:
    """One request the provider answered: how the token came."""

    method: str
    path: str
    query_token: str | None
    bearer: str | None
    form_token: str | None
    basic: tuple[str, str] | None
    content_type: str | None


@dataclass
class ProviderState:
    #: token -> the fields introspection gives for it (besides "active": true).
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    #: Answer every request with this status (e.g. 500) when set.
    status: int | None = None
    #: Never answer (the requests wait here) when True.
    stall: bool = False
    stalled: list[Request] = field(default_factory=list)
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})


class IdentityProvider(Resource):
    isLeaf = True

    def __init__(self, state: ProviderState) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> bytes | int:
        state = self.state
        path = (request.path or b"").decode()
        query = _arg(request, b"token") or _arg(request, b"access_token")
        authorization = (request.getHeader(b"authorization") or b"").decode().strip()
        bearer = authorization[7:] if authorization.lower().startswith("bearer ") else None
        basic = None
        if authorization.lower().startswith("basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            basic = (user, password)
        form = None
        if request.method == b"POST":
            form = _arg(request, b"token")
            query = None
        state.seen.append(
            Seen(
                request.method.decode(),
                path,
                query,
                bearer,
                form,
                basic,
                (request.getHeader(b"content-type") or b"").decode() or None,
            )
        )
        if state.stall:
            state.stalled.append(request)
            return NOT_DONE_YET
        if state.status is not None:
            request.setResponseCode(state.status)
            return b"unavailable"
        request.setHeader(b"content-type", b"application/json")
        if path == "/garbage":
            return b"<html>not JSON</html>"
        if path == "/jwks.json":
            return json.dumps(state.jwks).encode()
        token = bearer or form or query
        fields = state.tokens.get(token or "")
        if path == "/introspect":
            # RFC 7662 section 2.2: an unknown token is just inactive.
            answer = {"active": True, **fields} if fields is not None else {"active": False}
            return json.dumps(answer).encode()
        if path in ("/userinfo", "/tokeninfo"):
            if fields is None:
                request.setResponseCode(401)
                return json.dumps({"error": "invalid_token"}).encode()
            return json.dumps(fields).encode()
        request.setResponseCode(404)
        return b"{}"


def _arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode() if values else None


def listen(reactor: Any, state: ProviderState) -> IListeningPort:
    """The provider on an ephemeral loopback port."""
    port: IListeningPort = reactor.listenTCP(
        0, Site(IdentityProvider(state)), interface="127.0.0.1"
    )
    return port


# -- JWTs --------------------------------------------------------------------------------


def ec_key(kid: str) -> ECKey:
    key = ECKey.generate_key("P-256", parameters={"kid": kid})
    return key


def jwks_of(*keys: ECKey) -> dict[str, Any]:
    """The public JWK Set of ``keys``."""
    return KeySet(list(keys)).as_dict(private=False)


def sign(
    key: Any,
    claims: dict[str, Any],
    *,
    alg: str = "ES256",
    kid: str | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    """A compact JWS of ``claims``."""
    protected: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        protected["kid"] = kid
    protected.update(header or {})
    return jwt.encode(protected, claims, key, algorithms=[alg])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """An ``alg: none`` JWT (RFC 7519 section 6), which must never be accepted."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."
