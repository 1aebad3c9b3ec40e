"""
``--auth oauth2:/etc/pop3d/dovecot-oauth2.conf.ext``: users who log in with
an OAuth 2.0 bearer token (SASL OAUTHBEARER or XOAUTH2, `pop3d.sasl.oauth2`),
checked as Dovecot's oauth2 passdb checks it, from the same config file.

How a token is checked (Dovecot's db-oauth2.c, in this order):

1. With ``local_validation_key_dict`` or ``jwks_url``: a JWT is validated
   here (`pop3d.authdb.oauth2_jwt`); a token that is no JWT goes on to the
   OAuth2 server if there is one, else it is refused.
2. With ``tokeninfo_url``: ``GET tokeninfo_url<token>``; then, with an
   ``introspection_url``, introspection too if ``force_introspection`` or the
   answer lacks ``username_attribute`` (or ``active_attribute``).
3. Else introspection (RFC 7662) at ``introspection_url``, by
   ``introspection_mode``: ``auth`` (the default: GET with
   ``Authorization: Bearer <token>``, unless the URL holds a user name and
   password, then those as HTTP Basic), ``get`` (GET with the token appended
   to the URL, then ``&client_id=`` and ``&client_secret=`` when set),
   ``post`` (POST ``token=<token>`` as a form, HTTP Basic from the URL's user
   and password).

A 2xx JSON object is the token's fields, a 4xx refuses the token; anything
else (another status, no answer within ``timeout_msecs``, a connection
refused, no JSON object) makes the server unavailable: the login gets
``-ERR [SYS/TEMP]`` (`pop3d.errors.AuthUnavailable`), and the outage is
logged once, and once when it ends.

The fields then decide (db_oauth2_process_fields): ``"active": false`` (RFC
7662 section 2.2) refuses; ``username_attribute`` (default ``email``) must
be there, and, formatted by ``username_format`` (``%Lu``, the default, lower
case; or ``%u``), is the user, who must be the one the client named, if it
named one; ``active_attribute`` must be there and equal ``active_value``
when that is set; the token's ``scope`` (or ``aud``) must hold every scope
of ``scope``.  The user is the `pop3d.userdb.AuthenticatedUser` the login
gets: no userdb is needed.

Tokens are never logged, nor a URL that holds one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from weakref import WeakKeyDictionary

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from pop3d.authdb import OutageLog
from pop3d.dovecotconf import ConfigFileError, ConfigValue, read_conf_ext
from pop3d.errors import AuthUnavailable
from pop3d.reloading import IReloadable, ReloadableFiles
from pop3d.sasl.oauth2 import (
    IOAuth2BearerToken,
    IOAuth2TokenVerifier,
    TokenCheck,
    TokenRefusal,
    is_b64token,
)
from pop3d.stores.common import run_blocking
from pop3d.userdb import AuthenticatedUser

log = Logger()


#: The modes of Dovecot's introspection_mode ("" is "auth").
INTROSPECTION_MODES = ("auth", "get", "post", "local")

#: What an answer of the OAuth2 server may weigh.
MAX_RESPONSE_BYTES = 1 << 20

#: Dovecot's timeout_msecs = 0 leaves its HTTP client's default: one minute.
DEFAULT_TIMEOUT = 60.0

#: How often a JWKS URL is fetched again when a token names a kid it lacks.
JWKS_REFRESH_INTERVAL = 60.0

#: Keys pop3d reads and uses.
USED_KEYS = frozenset(
    {
        "tokeninfo_url",
        "introspection_url",
        "introspection_mode",
        "force_introspection",
        "username_attribute",
        "username_format",
        "active_attribute",
        "active_value",
        "scope",
        "issuers",
        "client_id",
        "client_secret",
        "timeout_msecs",
        "tls_ca_cert_file",
        "local_validation_key_dict",
        "openid_configuration_url",
        # pop3d's own: a JWK Set (file or URL) for local validation.
        "jwks_url",
    }
)
#: Dovecot keys accepted and without effect here (pop3d's HTTP client, its own log).
IGNORED_KEYS = frozenset(
    {
        "grant_url",
        "debug",
        "blocking",
        "max_parallel_connections",
        "max_pipelined_requests",
        "max_idle_time_msecs",
        "send_auth_headers",
    }
)
#: Dovecot keys refused unless at their default (the value they must have).
UNSUPPORTED_KEYS: Mapping[str, tuple[str, ...]] = {
    "use_grant_password": ("", "no"),
    "pass_attrs": ("",),
    "rawlog_dir": ("",),
    "tls_ca_cert_dir": ("",),
    "tls_cert_file": ("",),
    "tls_key_file": ("",),
    "tls_cipher_suite": ("", "HIGH:!SSLv2"),
    "tls_allow_invalid_cert": ("", "no", "false"),
}
KEYS = USED_KEYS | IGNORED_KEYS | frozenset(UNSUPPORTED_KEYS)


@dataclass(frozen=True)
class Endpoint:
    """An URL without its user and password, and those (for HTTP Basic)."""

    url: str
    basic_auth: tuple[str, str] | None = None

    @classmethod
    def parse(cls, value: ConfigValue) -> Endpoint:
        parts = urlsplit(value.value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise value.error(f"not an http:// or https:// URL: {value.value!r}")
        if parts.username is None:
            return cls(value.value)
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:
            host = f"[{parts.hostname}]" + ("" if parts.port is None else f":{parts.port}")
        bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        return cls(bare, (unquote(parts.username), unquote(parts.password or "")))

    @property
    def shown(self) -> str:
        """For the log: the URL without user, password, query (which may hold a token)."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class OAuth2Settings:
    """A dovecot-oauth2.conf.ext, as pop3d uses it."""

    path: str
    introspection_url: Endpoint | None = None
    introspection_mode: str = "auth"
    tokeninfo_url: Endpoint | None = None
    force_introspection: bool = False
    username_attribute: str = "email"
    lower_case_user: bool = True
    active_attribute: str | None = None
    active_value: str | None = None
    scopes: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    client_id: str | None = None
    client_secret: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    tls_ca_cert_file: str | None = None
    key_dict_prefix: str | None = None
    jwks_url: str | None = None
    openid_configuration_url: str | None = None

    @property
    def local_validation(self) -> bool:
        return self.key_dict_prefix is not None or self.jwks_url is not None

    def refusal(self) -> TokenRefusal:
        """What a client whose token is refused is told (RFC 7628 section 3.2.2)."""
        return TokenRefusal(" ".join(self.scopes) or None, self.openid_configuration_url)


def read_settings(path: str) -> OAuth2Settings:
    """The settings of ``path``; `ConfigFileError` naming file and line for what pop3d cannot do."""
    values = read_conf_ext(path, KEYS)
    for key, allowed in UNSUPPORTED_KEYS.items():
        value = values.get(key)
        if value is not None and value.value.strip().lower() not in allowed:
            raise value.error(f"{key} is not supported by pop3d")
    text = {key: value.value.strip() for key, value in values.items()}
    mode_value = values.get("introspection_mode")
    mode = text.get("introspection_mode", "") or "auth"
    if mode not in INTROSPECTION_MODES:
        assert mode_value is not None
        raise mode_value.error(
            f"introspection_mode must be one of {', '.join(INTROSPECTION_MODES)}, not {mode!r}"
        )
    introspection = tokeninfo = None
    if text.get("introspection_url"):
        introspection = Endpoint.parse(values["introspection_url"])
    if text.get("tokeninfo_url"):
        tokeninfo = Endpoint.parse(values["tokeninfo_url"])
    prefix = None
    if text.get("local_validation_key_dict"):
        prefix = _key_dict_prefix(values["local_validation_key_dict"])
    jwks = text.get("jwks_url") or None
    if jwks is not None and not jwks.startswith(("http://", "https://")):
        if not os.path.isfile(jwks):
            raise values["jwks_url"].error(f"no such file: {jwks}")
    if introspection is None and tokeninfo is None and prefix is None and jwks is None:
        raise ConfigFileError(
            path,
            0,
            "one of introspection_url, tokeninfo_url, local_validation_key_dict "
            "or jwks_url must be set",
        )
    if mode == "local" and prefix is None and jwks is None:
        raise (mode_value or values["introspection_url"]).error(
            "introspection_mode = local needs local_validation_key_dict or jwks_url"
        )
    username_format = text.get("username_format", "%Lu") or "%Lu"
    if username_format not in ("%Lu", "%u", "%{user}", "%{user | lower}", "%{L:user}"):
        raise values["username_format"].error(
            f"username_format {username_format!r} is not supported (only %Lu or %u)"
        )
    timeout = DEFAULT_TIMEOUT
    if text.get("timeout_msecs"):
        raw = text["timeout_msecs"]
        if not raw.isdigit():
            raise values["timeout_msecs"].error(f"timeout_msecs must be a number, not {raw!r}")
        timeout = int(raw) / 1000 or DEFAULT_TIMEOUT
    ca_file = text.get("tls_ca_cert_file") or None
    if ca_file is not None and not os.path.isfile(ca_file):
        raise values["tls_ca_cert_file"].error(f"no such file: {ca_file}")
    return OAuth2Settings(
        path=path,
        introspection_url=introspection,
        introspection_mode=mode,
        tokeninfo_url=tokeninfo,
        force_introspection=values["force_introspection"].boolean("force_introspection")
        if "force_introspection" in values
        else False,
        username_attribute=text.get("username_attribute") or "email",
        lower_case_user=username_format != "%u" and username_format != "%{user}",
        active_attribute=text.get("active_attribute") or None,
        active_value=text.get("active_value") or None,
        scopes=tuple(text.get("scope", "").replace(",", " ").split()),
        issuers=tuple(text.get("issuers", "").replace(",", " ").split()),
        client_id=text.get("client_id") or None,
        client_secret=text.get("client_secret") or None,
        timeout=timeout,
        tls_ca_cert_file=ca_file,
        key_dict_prefix=prefix,
        jwks_url=jwks,
        openid_configuration_url=text.get("openid_configuration_url") or None,
    )


def _key_dict_prefix(value: ConfigValue) -> str:
    """The directory of an ``fs:posix:prefix=DIR`` dict: the only kind pop3d reads."""
    match = re.fullmatch(r"fs:posix:prefix=(\S+)", value.value.strip())
    if match is None:
        raise value.error(
            "local_validation_key_dict: only fs:posix:prefix=DIRECTORY is supported "
            f"(not {value.value.strip()!r})"
        )
    prefix = match.group(1)
    if not os.path.isdir(prefix):
        raise value.error(f"local_validation_key_dict: no such directory: {prefix}")
    return prefix


# -- outcomes ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Accepted:
    user: str


@dataclass(frozen=True)
class _Refused:
    #: Why, for the log (never the token).
    reason: str


@dataclass(frozen=True)
class _Unavailable:
    reason: str


_Outcome = _Accepted | _Refused | _Unavailable


class _Unreachable(Exception):
    """The OAuth2 server did not answer usefully (for the outage log)."""


# -- the checker ------------------------------------------------------------------


@implementer(ICredentialsChecker, IOAuth2TokenVerifier, IReloadable)
class OAuth2Checker:
    """
    Verifies `IOAuth2BearerToken` credentials as ``settings`` say.
    ``reactor`` makes the HTTP requests and keeps the time (timeouts, JWT
    expiry) unless ``clock`` is given; ``http`` replaces the treq client
    made from it.  SIGHUP (`IReloadable`) reads the file again.
    """

    credentialInterfaces = (IOAuth2BearerToken,)

    def __init__(
        self,
        settings: OAuth2Settings,
        reactor: Any,
        *,
        clock: IReactorTime | None = None,
        http: Any = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._http_given = http
        self._verdicts: WeakKeyDictionary[object, _Outcome] = WeakKeyDictionary()
        self._outage = OutageLog("oauth2: token check")
        # At start-up, before any session: a bad file is a usage error.
        self._use(_read_files(settings))
        path = settings.path
        self._file = ReloadableFiles(
            path, lambda: _read_files(read_settings(path)), self._use, (ConfigFileError,)
        )
        self._file.threads = cast(IReactorThreads, reactor)

    def _use(self, files: _Files) -> None:
        """Take what ``files`` hold, with fresh keys and HTTP client."""
        # Made on first use: a checker that validates JWTs from a file needs none.
        http = self._http_given
        if http is None and files.ca_certificates is not None:
            http = _treq_client(self._reactor, files.ca_certificates)
        self.settings = files.settings
        self._http_client = http
        self._jwks = files.jwks
        self._jwks_fetched_at: float | None = None
        # Dovecot keeps keys until it restarts (or reloads): so does this.
        self._dict_keys: dict[str, Any] = {}

    def reload(self) -> Deferred[None]:
        """
        `IReloadable` (SIGHUP): read the file again, and the JWK Set and CA
        files it names, in the thread pool (tokens checked meanwhile wait
        for it); if they cannot be used, keep the old ones.
        """
        return self._file.read_again()

    @property
    def _http(self) -> Any:
        if self._http_client is None:
            self._http_client = _treq_client(self._reactor, None)
        return self._http_client

    # -- IOAuth2TokenVerifier --------------------------------------------------------

    def check_token(self, credentials: IOAuth2BearerToken) -> Deferred[TokenCheck]:
        checked = Deferred.fromCoroutine(self._outcome(credentials))

        def verdict(outcome: _Outcome) -> TokenCheck:
            # Kept for the login that follows: one check per login.
            try:
                self._verdicts[credentials] = outcome
            except TypeError:
                pass  # credentials that cannot be weakly referenced are checked again
            if isinstance(outcome, _Accepted):
                return TokenCheck(user=outcome.user.encode("utf-8"))
            if isinstance(outcome, _Refused):
                return TokenCheck(refused=self.settings.refusal())
            return TokenCheck()

        return checked.addCallback(verdict)

    # -- ICredentialsChecker ---------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        if not IOAuth2BearerToken.providedBy(credentials):
            return fail(UnauthorizedLogin())
        known = self._verdicts.pop(credentials, None)
        outcome: Deferred[_Outcome] = (
            succeed(known)
            if known is not None
            else Deferred.fromCoroutine(self._outcome(credentials))
        )
        return outcome.addCallback(self._avatar)

    def _avatar(self, outcome: _Outcome) -> AuthenticatedUser:
        if isinstance(outcome, _Accepted):
            return AuthenticatedUser(name=outcome.user)
        if isinstance(outcome, _Unavailable):
            raise AuthUnavailable()
        raise UnauthorizedLogin()

    # -- checking ----------------------------------------------------------------------

    async def _outcome(self, credentials: IOAuth2BearerToken) -> _Outcome:
        # With what a reading of the files under way (SIGHUP) gives.
        await self._file.settled()
        if not is_b64token(credentials.token):
            return self._refused(credentials, "not a bearer token")
        token = credentials.token.decode("ascii")
        try:
            fields, validated_here = await self._fields(token)
        except _Unreachable as error:
            return self._unavailable(str(error))
        except _TokenRefused as refused:
            return self._refused(credentials, refused.reason)
        except Exception:
            # A bug: its traceback in the log, and the client told to come back.
            log.failure("oauth2: checking a token failed")
            return _Unavailable("internal error")
        self._available()
        return self._decide(credentials, fields, validated_here)

    async def _fields(self, token: str) -> tuple[Mapping[str, Any], bool]:
        """The token's fields, and whether they come from a JWT validated here."""
        settings = self.settings
        if settings.local_validation:
            from pop3d.authdb.oauth2_jwt import NotAJWT

            try:
                return await self._local(token), True
            except NotAJWT:
                if settings.introspection_url is None and settings.tokeninfo_url is None:
                    raise _TokenRefused("not a JWT") from None
        if settings.tokeninfo_url is not None:
            info = await self._request("GET", settings.tokeninfo_url, token, append_token=True)
            if settings.introspection_url is None or not (
                settings.force_introspection or not self._has_all_fields(info)
            ):
                return info, False
            merged = dict(info)
            merged.update(await self._introspect(token))
            return merged, False
        return await self._introspect(token), False

    def _has_all_fields(self, fields: Mapping[str, Any]) -> bool:
        settings = self.settings
        if settings.username_attribute not in fields:
            return False
        return settings.active_attribute is None or settings.active_attribute in fields

    async def _introspect(self, token: str) -> Mapping[str, Any]:
        settings = self.settings
        endpoint = settings.introspection_url
        assert endpoint is not None
        mode = settings.introspection_mode
        if mode == "get":
            return await self._request("GET", endpoint, token, append_token=True, client=True)
        if mode == "post":
            return await self._request("POST", endpoint, token, form=True)
        return await self._request("GET", endpoint, token, bearer=True)

    async def _request(
        self,
        method: str,
        endpoint: Endpoint,
        token: str,
        *,
        append_token: bool = False,
        client: bool = False,
        form: bool = False,
        bearer: bool = False,
    ) -> Mapping[str, Any]:
        url = endpoint.url
        headers: dict[bytes, list[bytes]] = {b"Accept": [b"application/json"]}
        data: bytes | None = None
        if append_token:
            # Dovecot's http_url_escape_param: the token as a query value.
            url += quote(token, safe="")
            if client and self.settings.client_id:
                url += "&client_id=" + quote(self.settings.client_id, safe="")
            if client and self.settings.client_secret:
                url += "&client_secret=" + quote(self.settings.client_secret, safe="")
        if form:
            headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
            data = b"token=" + quote(token, safe="").encode("ascii")
        if bearer and endpoint.basic_auth is None:
            headers[b"Authorization"] = [b"Bearer " + token.encode("ascii")]
        kwargs: dict[str, Any] = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
        if endpoint.basic_auth is not None:
            kwargs["auth"] = endpoint.basic_auth
        status, body = await self._fetch(method, url, endpoint, **kwargs)
        if 400 <= status < 500:
            raise _TokenRefused(f"{endpoint.shown} answered {status}")
        if not 200 <= status < 300:
            raise _Unreachable(f"{endpoint.shown} answered {status}")
        if not body.strip():
            # Dovecot: an empty answer is an empty set of fields.
            return {}
        try:
            fields = json.loads(body)
        except ValueError:
            raise _Unreachable(f"{endpoint.shown}: the answer is not JSON") from None
        if not isinstance(fields, dict):
            raise _Unreachable(f"{endpoint.shown}: the answer is not a JSON object")
        if "error" in fields:
            # An OAuth2 error (RFC 6749 section 5.2) with a 2xx: Dovecot refuses too.
            raise _TokenRefused(f"{endpoint.shown}: error {str(fields['error'])[:60]!r}")
        return fields

    async def _fetch(
        self, method: str, url: str, endpoint: Endpoint, **kwargs: Any
    ) -> tuple[int, bytes]:
        """
        The status and body of a request (within ``timeout_msecs``, at most
        `MAX_RESPONSE_BYTES`); `_Unreachable` when there is none.
        """
        try:
            requested: Deferred[Any] = self._http.request(method, url, **kwargs)
            requested.addTimeout(self.settings.timeout, self._clock)
            response = await requested
            body = await _bounded_content(response).addTimeout(self.settings.timeout, self._clock)
        except _TooLarge:
            too_large = f"{endpoint.shown}: answer larger than {MAX_RESPONSE_BYTES} bytes"
            raise _Unreachable(too_large) from None
        except Exception as error:
            # The exception's text may hold the URL, and so the token: its type only.
            raise _Unreachable(f"{endpoint.shown}: {type(error).__name__}") from None
        return int(response.code), body

    async def _local(self, token: str) -> Mapping[str, Any]:
        from pop3d.authdb.oauth2_jwt import (
            ClaimRules,
            KeyUnavailable,
            TokenInvalid,
            token_header,
            unverified_claims,
            validate,
        )

        settings = self.settings
        header = token_header(token)
        rules = ClaimRules(settings.issuers, settings.client_id, settings.scopes)
        try:
            if settings.key_dict_prefix is not None:
                azp = unverified_claims(token).get("azp")
                key: Any = await self._dict_key(
                    str(azp) if azp is not None else None,
                    str(header["alg"]),
                    str(header["kid"]) if "kid" in header else None,
                )
            else:
                key = await self._jwks_keys(header.get("kid"))
            return validate(token, key, rules, self._clock.seconds)
        except TokenInvalid as error:
            raise _TokenRefused(str(error)) from None
        except KeyUnavailable as error:
            raise _TokenRefused(f"no key: {error}") from None

    async def _dict_key(self, azp: str | None, alg: str, kid: str | None) -> Any:
        from pop3d.authdb.oauth2_jwt import KeyUnavailable, key_dict_path, load_dict_key

        prefix = self.settings.key_dict_prefix
        assert prefix is not None
        path = key_dict_path(prefix, azp, alg, kid)
        if path is None:
            raise KeyUnavailable("bad key name")
        cached = self._dict_keys.get(path)
        if cached is not None:
            return cached
        try:
            key = await run_blocking(
                cast(IReactorThreads, self._reactor), load_dict_key, path, alg.upper()
            )
        except OSError:
            raise KeyUnavailable(f"{alg.upper()} key {kid or 'default'!r} not found") from None
        # Cached until restart, as Dovecot does: rotate keys with new kids.
        self._dict_keys[path] = key
        return key

    async def _jwks_keys(self, kid: object) -> Any:
        from pop3d.authdb.oauth2_jwt import KeyUnavailable, parse_jwks

        url = self.settings.jwks_url
        assert url is not None
        if not url.startswith(("http://", "https://")):
            return self._jwks
        now = self._clock.seconds()
        known = self._jwks is not None and (
            kid is None or any(k.kid == kid for k in self._jwks.keys)
        )
        stale = self._jwks_fetched_at is None or now - self._jwks_fetched_at >= (
            JWKS_REFRESH_INTERVAL
        )
        if not known and stale:
            endpoint = Endpoint(url)
            status, body = await self._fetch("GET", url, endpoint)
            if status != 200:
                raise _Unreachable(f"{endpoint.shown} answered {status}")
            try:
                self._jwks = parse_jwks(body)
            except KeyUnavailable:
                raise _Unreachable(f"{endpoint.shown}: not a JWK Set") from None
            self._jwks_fetched_at = now
        if self._jwks is None:
            raise KeyUnavailable("no JWK Set")
        return self._jwks

    def _decide(
        self, credentials: IOAuth2BearerToken, fields: Mapping[str, Any], validated_here: bool
    ) -> _Outcome:
        settings = self.settings
        if fields.get("active") is False:
            return self._refused(credentials, "token not active")
        value = fields.get(settings.username_attribute)
        if not isinstance(value, str) or not value:
            return self._refused(credentials, f"no {settings.username_attribute!r} in the answer")
        user = value.lower() if settings.lower_case_user else value
        named = credentials.username.decode("utf-8", "replace")
        if named:
            wanted = named.lower() if settings.lower_case_user else named
            if wanted != user:
                return self._refused(credentials, "the token belongs to another user")
        if settings.active_attribute is not None:
            active = fields.get(settings.active_attribute)
            if active is None or (
                settings.active_value is not None and _text(active) != settings.active_value
            ):
                return self._refused(credentials, "account not active")
        if settings.scopes and not validated_here:
            # (A JWT's scope was checked with its other claims.)
            granted = fields.get("scope", fields.get("aud"))
            have = set(_text(granted).split()) if granted is not None else set()
            if not all(scope in have for scope in settings.scopes):
                return self._refused(credentials, "scope not granted")
        return _Accepted(user)

    def _refused(self, credentials: IOAuth2BearerToken, reason: str) -> _Outcome:
        log.info(
            "oauth2: token refused for {user}: {reason}",
            user=credentials.username.decode("utf-8", "replace") or "-",
            reason=reason,
        )
        return _Refused(reason)

    def _unavailable(self, reason: str) -> _Outcome:
        self._outage.failed(reason)
        return _Unavailable(reason)

    def _available(self) -> None:
        self._outage.succeeded()


class _TokenRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TooLarge(Exception):
    pass


def _text(value: object) -> str:
    """A JSON value as Dovecot compares it: true/false in lower case, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bounded_content(response: Any) -> Deferred[bytes]:
    """The body of ``response``, failing with `_TooLarge` past `MAX_RESPONSE_BYTES`."""
    import treq

    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > MAX_RESPONSE_BYTES:
            raise _TooLarge()
        chunks.append(data)

    collected: Deferred[None] = treq.collect(response, collect)
    return collected.addCallback(lambda _: b"".join(chunks))


@dataclass(frozen=True)
class _Files:
    """A dovecot-oauth2.conf.ext, and what the files it names hold."""

    settings: OAuth2Settings
    #: The JWK Set of a ``jwks_url`` that is a file.
    jwks: Any = None
    #: The certificates of ``tls_ca_cert_file``.
    ca_certificates: tuple[Any, ...] | None = None


def _read_files(settings: OAuth2Settings) -> _Files:
    """The JWK Set and CA files ``settings`` name, read (blocking); `ConfigFileError`: unusable."""
    jwks: Any = None
    if settings.jwks_url is not None and not settings.jwks_url.startswith(("http://", "https://")):
        from pop3d.authdb.oauth2_jwt import KeyUnavailable, parse_jwks

        try:
            with open(settings.jwks_url, "rb") as stream:
                jwks = parse_jwks(stream.read(MAX_RESPONSE_BYTES))
        except (OSError, KeyUnavailable) as error:
            raise ConfigFileError(settings.path, 0, f"jwks_url: {error}") from None
    certificates = None
    if settings.tls_ca_cert_file is not None:
        from twisted.internet.ssl import Certificate

        try:
            with open(settings.tls_ca_cert_file, "rb") as stream:
                pem = stream.read()
        except OSError as error:
            raise ConfigFileError(settings.path, 0, f"tls_ca_cert_file: {error}") from None
        try:
            certificates = tuple(
                Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
                for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
            )
        except Exception as error:  # OpenSSL's errors: a damaged certificate
            raise ConfigFileError(
                settings.path, 0, f"tls_ca_cert_file: unreadable certificate ({error})"
            ) from None
        if not certificates:
            raise ConfigFileError(settings.path, 0, "tls_ca_cert_file holds no certificate")
    return _Files(settings, jwks, certificates)


def _treq_client(reactor: Any, ca_certificates: tuple[Any, ...] | None) -> Any:
    """treq's HTTPClient over the reactor, trusting ``ca_certificates`` when given."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    policy = BrowserLikePolicyForHTTPS()
    if ca_certificates is not None:
        from twisted.internet.ssl import trustRootFromCertificates

        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(ca_certificates))
    pool = HTTPConnectionPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


# -- the strcred plug-in -------------------------------------------------------------


class OAuth2Error(ValueError):
    """``--auth oauth2:`` cannot be used (strcred shows it as a usage error)."""


@implementer(ICheckerFactory, IPlugin)
class OAuth2CheckerFactory:
    """The ``--auth oauth2:PATH`` plugin for twisted.cred.strcred."""

    authType = "oauth2"
    authHelp = (
        "OAuth2 bearer tokens (SASL OAUTHBEARER, XOAUTH2) checked as Dovecot's oauth2 passdb "
        "does, from its dovecot-oauth2.conf.ext: introspection (auth, get, post), tokeninfo, "
        "or local JWT validation.  Needs the 'oauth2' extra (treq, joserfc)."
    )
    argStringFormat = "Path to a dovecot-oauth2.conf.ext"
    credentialInterfaces = OAuth2Checker.credentialInterfaces

    def __init__(self, reactor: Any = None) -> None:
        self._reactor_given = reactor

    def generateChecker(self, argstring: str) -> OAuth2Checker:
        if not argstring:
            raise OAuth2Error(
                "oauth2 needs a path: --auth oauth2:/etc/pop3d/dovecot-oauth2.conf.ext"
            )
        try:
            import joserfc  # noqa: F401
            import treq  # noqa: F401
        except ImportError as error:
            raise OAuth2Error(
                f"needs {error.name}: pip install 'pop3d[oauth2]' (treq, joserfc)"
            ) from None
        try:
            settings = read_settings(argstring)
            return OAuth2Checker(settings, self._reactor())
        except ConfigFileError as error:
            raise OAuth2Error(str(error)) from None

    def _reactor(self) -> Any:
        if self._reactor_given is not None:
            return self._reactor_given
        # The composition root (twistd's process): the running reactor.
        from twisted.internet import reactor

        return reactor


__all__ = [
    "KEYS",
    "Endpoint",
    "OAuth2Checker",
    "OAuth2CheckerFactory",
    "OAuth2Error",
    "OAuth2Settings",
    "read_settings",
]
