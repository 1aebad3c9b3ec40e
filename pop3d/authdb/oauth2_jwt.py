"""
Local validation of JWT access tokens (RFC 7519) for `pop3d.authdb.oauth2`:
no request to the OAuth2 server per login.

Keys come from either

- Dovecot's ``local_validation_key_dict``, only in its ``fs:posix:prefix=DIR``
  form: the key of a token is the file ``DIR/<azp>/<ALG>/<kid>`` (``azp``
  and ``kid`` default to ``default``, ``/`` and ``%`` in them written
  ``%2f``/``%25``, ALG upper case), holding the base64 secret for HS256/384/512
  or a PEM public key for RS*, PS*, ES*; or
- ``jwks_url`` (pop3d's own setting): a JWK Set (RFC 7517 section 5), from a
  file or an ``http(s)://`` URL, the key chosen by the token's ``kid``.

The checks are Dovecot's: the signature with an allowed algorithm (never
``none``; the key's type must fit the algorithm), ``exp`` required and not
past, ``nbf`` and ``iat`` not in the future, ``iss`` one of ``issuers`` when
that is set, ``aud`` holding ``client_id`` when that is set, every
configured ``scope`` in the token's ``scope``.  Time is the injected clock's.

joserfc does the JOSE work (rather than PyJWT): keys of every type from
JWK, PEM or raw secrets, a JWK Set whose key the token's ``kid`` selects,
and only the algorithms listed (``none`` is never one), with the key's type
checked against the algorithm.  The claims are checked here, as Dovecot
checks them, against the injected clock's time (PyJWT reads the system
clock itself), so tests use a `twisted.internet.task.Clock`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from joserfc.jws import extract_compact

#: Dovecot's algorithms (its docs, "Local validation"): no EdDSA, never "none".
ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)

Key = OctKey | RSAKey | ECKey


class NotAJWT(Exception):
    """The token is not a JWT at all: ask the OAuth2 server instead, if there is one."""


class TokenInvalid(Exception):
    """A JWT that fails validation; the text says why (for the log, never the token)."""


class KeyUnavailable(Exception):
    """The keys could not be read (a file, the JWKS URL): not the token's fault."""


@dataclass(frozen=True)
class ClaimRules:
    """What the claims of a token must satisfy."""

    issuers: tuple[str, ...] = ()
    client_id: str | None = None
    scopes: tuple[str, ...] = ()


def token_header(token: str) -> Mapping[str, Any]:
    """The protected header of a compact JWS, unverified; `NotAJWT` if it is none."""
    if token.count(".") != 2:
        raise NotAJWT()
    try:
        header = extract_compact(token.encode("ascii")).protected
    except (JoseError, ValueError, binascii.Error, UnicodeError) as error:
        raise NotAJWT() from error
    if not isinstance(header, dict) or "alg" not in header:
        raise NotAJWT()
    return header


def unverified_claims(token: str) -> Mapping[str, Any]:
    """The claims before verification: only to find the key (``azp``)."""
    try:
        payload = extract_compact(token.encode("ascii")).payload
        claims = json.loads(payload)
    except (JoseError, ValueError, binascii.Error, UnicodeError) as error:
        raise TokenInvalid("the token's claims are not JSON") from error
    if not isinstance(claims, dict):
        raise TokenInvalid("the token's claims are not a JSON object")
    return claims


def escape_identifier(identifier: str) -> str:
    """Dovecot's escaping of ``azp`` and ``kid`` in key paths: ``/`` and ``%`` as hex."""
    return identifier.replace("%", "%25").replace("/", "%2f")


def key_dict_path(prefix: str, azp: str | None, alg: str, kid: str | None) -> str | None:
    """
    The file of a key in an ``fs:posix:prefix=`` dict, or None if the names
    would leave the directory (``.``, ``..``).
    """
    parts = [escape_identifier(azp or "default"), alg.upper(), escape_identifier(kid or "default")]
    if any(part in ("", ".", "..") for part in parts):
        return None
    return os.path.join(prefix, *parts)


def load_dict_key(path: str, alg: str) -> Key:
    """A key file of the dict: base64 secret (HS*) or PEM public key (RS*, PS*, ES*)."""
    with open(path, "rb") as stream:
        content = stream.read(1 << 20)
    try:
        if alg.startswith("HS"):
            secret = base64.b64decode(b"".join(content.split()), validate=True)
            if not secret:
                raise ValueError("empty secret")
            return OctKey.import_key(secret)
        if alg.startswith(("RS", "PS")):
            return RSAKey.import_key(content)
        return ECKey.import_key(content)
    except (JoseError, ValueError, TypeError, binascii.Error) as error:
        raise KeyUnavailable(f"{path}: not a key for {alg}") from error


def parse_jwks(content: bytes) -> KeySet:
    """A JWK Set document (RFC 7517 section 5)."""
    try:
        document = json.loads(content)
        return KeySet.import_key_set(document)
    except (JoseError, ValueError, TypeError, KeyError) as error:
        raise KeyUnavailable("not a JWK Set") from error


def validate(
    token: str,
    key: Key | KeySet,
    rules: ClaimRules,
    now: Callable[[], float],
) -> dict[str, Any]:
    """
    The claims of ``token`` if its signature (by ``key``) and its claims are
    good; `TokenInvalid` saying why otherwise.
    """
    header = token_header(token)
    alg = str(header["alg"])
    if alg.upper() not in ALGORITHMS or alg != alg.upper():
        raise TokenInvalid(f"algorithm {alg[:20]!r} is not allowed")
    if isinstance(key, KeySet) and "kid" in header:
        # Only the key the token names; joserfc would else try them all.
        named = [k for k in key.keys if k.kid == header["kid"]]
        if not named:
            raise TokenInvalid("no key with the token's kid")
        chosen: Any = named[0]
    else:
        chosen = key
    try:
        decoded = jwt.decode(token, chosen, algorithms=[alg])
    except (JoseError, ValueError, TypeError) as error:
        raise TokenInvalid(f"bad signature or key ({type(error).__name__})") from error
    claims = dict(decoded.claims)
    check_claims(claims, rules, int(now()))
    return claims


def check_claims(claims: Mapping[str, Any], rules: ClaimRules, now: int) -> None:
    """Dovecot's checks of a JWT's claims (its oauth2-jwt.c), at time ``now``."""
    exp = _time_claim(claims, "exp")
    if exp is None:
        raise TokenInvalid("missing 'exp'")
    nbf = _time_claim(claims, "nbf") or now
    iat = _time_claim(claims, "iat") or now
    if nbf > now:
        raise TokenInvalid("not valid yet ('nbf')")
    if iat > now:
        raise TokenInvalid("issued in the future ('iat')")
    if exp < now:
        raise TokenInvalid("expired ('exp')")
    if exp < iat or exp < nbf:
        raise TokenInvalid("conflicting time claims")
    if rules.issuers:
        issuer = claims.get("iss")
        if not isinstance(issuer, str):
            raise TokenInvalid("missing 'iss'")
        if issuer not in rules.issuers:
            raise TokenInvalid("issuer not allowed")
    if rules.client_id is not None:
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if rules.client_id not in audiences:
            raise TokenInvalid("client_id not in 'aud'")
    if rules.scopes:
        granted = claims.get("scope")
        if not isinstance(granted, str):
            raise TokenInvalid("missing 'scope'")
        have = {scope.lower() for scope in granted.replace(",", " ").split()}
        if not all(scope.lower() in have for scope in rules.scopes):
            raise TokenInvalid("scope not granted")


def _time_claim(claims: Mapping[str, Any], name: str) -> int | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TokenInvalid(f"malformed {name!r}")
    return int(value)
