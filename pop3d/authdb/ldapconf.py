"""
Dovecot's ``dovecot-ldap.conf.ext`` (Dovecot 2.3), read into `LdapSettings`:
which servers, how to bind, the filters and which attributes become which
Dovecot fields.  No LDAP library is needed to read it.

Attribute lists (``pass_attrs``, ``user_attrs``) are Dovecot 2.3's:

- ``ldapAttr=field``: the field takes the attribute's (first) value;
- ``ldapAttr``: the field has the attribute's name;
- ``ldapAttr=field=template``: the field is the template, when the entry
  has the attribute;
- ``=field=template``: the field is always the template;
- ``!ldapAttr``: the attribute is fetched (for templates) but is no field.

Templates hold Dovecot's ``%`` variables (`pop3d.dovecotvars`) and
``%{ldap:attr}`` / ``%{ldap:attr:default}``, the value of another attribute
of the entry.  Dovecot 2.2's sub-queries (``@field``, ``%{ldap_ptr:...}``)
are refused with the line they are on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar
from urllib.parse import urlsplit

from pop3d.dovecotconf import ConfigFileError, ConfigValue, read_conf_ext
from pop3d.dovecotvars import (
    Lookup,
    Template,
    VariableError,
    Variables,
    check_template,
    parse_template,
)
from pop3d.passwords import PasswordSchemeError, get_scheme

#: Every key of Dovecot 2.3's dovecot-ldap.conf.ext (an unknown key is an error).
LDAP_KEYS = frozenset(
    {
        "hosts",
        "uris",
        "dn",
        "dnpass",
        "sasl_bind",
        "sasl_mech",
        "sasl_realm",
        "sasl_authz_id",
        "tls",
        "tls_ca_cert_file",
        "tls_ca_cert_dir",
        "tls_cipher_suite",
        "tls_cert_file",
        "tls_key_file",
        "tls_require_cert",
        "ldaprc_path",
        "debug_level",
        "auth_bind",
        "auth_bind_userdn",
        "ldap_version",
        "base",
        "deref",
        "scope",
        "user_attrs",
        "user_filter",
        "pass_attrs",
        "pass_filter",
        "iterate_attrs",
        "iterate_filter",
        "default_pass_scheme",
        "blocking",
    }
)

# Dovecot 2.3's defaults (src/auth/db-ldap.c).
DEFAULT_PASS_ATTRS = "uid=user,userPassword=password"  # noqa: S105 - field names
DEFAULT_USER_ATTRS = "homeDirectory=home,uidNumber=uid,gidNumber=gid"
DEFAULT_FILTER = "(&(objectClass=posixAccount)(uid=%u))"
DEFAULT_PASS_SCHEME = "CRYPT"  # noqa: S105 - a scheme name


class Scope(Enum):
    """``scope``: how far below ``base`` a search goes."""

    BASE = "base"
    ONELEVEL = "onelevel"
    SUBTREE = "subtree"


class Deref(Enum):
    """``deref``: when aliases are followed."""

    NEVER = "never"
    SEARCHING = "searching"
    FINDING = "finding"
    ALWAYS = "always"


class RequireCert(Enum):
    """``tls_require_cert``: how the server's certificate is checked (libldap's TLS_REQCERT)."""

    NEVER = "never"
    HARD = "hard"
    DEMAND = "demand"
    ALLOW = "allow"
    TRY = "try"


# -- templates ------------------------------------------------------------------------


#: ``%{ldap:attr}`` and ``%{ldap:attr:default}``: another attribute of the entry.
_LDAP_LOOKUPS = frozenset({"ldap"})


@dataclass(frozen=True)
class FieldTemplate:
    """A field's value made of text, ``%`` variables and ``%{ldap:...}`` values."""

    template: Template

    @classmethod
    def parse(cls, text: str) -> FieldTemplate:
        if "%{ldap_ptr:" in text:
            raise VariableError(f"%{{ldap_ptr:...}} sub-queries are not supported in {text!r}")
        template = parse_template(text, _LDAP_LOOKUPS)
        for part in template.parts:
            if isinstance(part, Lookup) and "@" in part.key:
                raise VariableError(f"unsupported %{{ldap:...}} reference in {text!r}")
        return cls(template)

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(part.key for part in self.template.parts if isinstance(part, Lookup))

    def expand(self, variables: Variables, entry: Mapping[str, str]) -> str:
        def attribute(lookup: Lookup) -> str:
            value = entry.get(lookup.key.lower())
            return value if value is not None else (lookup.default or "")

        return self.template.expand(variables, lookup=attribute)


@dataclass(frozen=True)
class AttributeMapping:
    """One item of ``pass_attrs`` / ``user_attrs``."""

    #: The LDAP attribute whose value (or presence) this item needs; None
    #: for ``=field=template``.
    attribute: str | None
    #: The Dovecot field; None for ``!attr`` (fetched for templates only).
    field: str | None
    #: The field's value when it is not the attribute's own.
    template: FieldTemplate | None = None

    def value(self, variables: Variables, entry: Mapping[str, str]) -> str | None:
        """The field's value for ``entry`` (attribute names lower case), None if absent."""
        if self.attribute is not None and self.attribute.lower() not in entry:
            return None
        if self.template is not None:
            return self.template.expand(variables, entry)
        assert self.attribute is not None
        return entry[self.attribute.lower()]


def parse_attribute_list(setting: ConfigValue) -> tuple[AttributeMapping, ...]:
    """A ``*_attrs`` value as its mappings; a bad item names the file and line."""
    mappings: list[AttributeMapping] = []
    for raw in setting.value.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            mappings.append(_mapping(item))
        except VariableError as error:
            raise setting.error(str(error)) from None
    return tuple(mappings)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9;.-]*")


def _mapping(item: str) -> AttributeMapping:
    if item.startswith("@"):
        raise VariableError(f"{item!r}: @ sub-queries are not supported")
    if item.startswith("!"):
        return AttributeMapping(_attribute_name(item[1:], item), None)
    attribute, equals, rest = item.partition("=")
    attribute = attribute.strip()
    if not equals:
        name = _attribute_name(attribute, item)
        return AttributeMapping(name, name)
    field, equals, template = rest.partition("=")
    field = field.strip()
    if not field:
        raise VariableError(f"{item!r}: no field name after '='")
    # "field:protected" and such suffixes are Dovecot's multi-userdb options.
    field = field.split(":", 1)[0]
    if not attribute:
        if not equals:
            raise VariableError(f"{item!r}: '=field' needs '=template' after it")
        return AttributeMapping(None, field, FieldTemplate.parse(template.strip()))
    name = _attribute_name(attribute, item)
    if equals:
        return AttributeMapping(name, field, FieldTemplate.parse(template.strip()))
    return AttributeMapping(name, field)


def _attribute_name(name: str, item: str) -> str:
    if not _NAME.fullmatch(name):
        raise VariableError(f"{item!r}: {name!r} is not an LDAP attribute name")
    return name


def requested_attributes(mappings: Sequence[AttributeMapping]) -> list[str] | None:
    """The attributes a search asks for; None (all of them) for an empty list."""
    if not mappings:
        return None
    names: dict[str, str] = {}
    for mapping in mappings:
        wanted = [mapping.attribute] if mapping.attribute is not None else []
        if mapping.template is not None:
            wanted += mapping.template.attributes
        for name in wanted:
            names.setdefault(name.lower(), name)
    # An empty list would mean "all"; "1.1" means none (RFC 4511 4.5.1.8).
    return list(names.values()) or ["1.1"]


def entry_fields(
    mappings: Sequence[AttributeMapping], variables: Variables, entry: Mapping[str, str]
) -> dict[str, str]:
    """The Dovecot fields of ``entry`` (attribute name, lower case -> first value)."""
    if not mappings:
        return dict(entry)
    fields: dict[str, str] = {}
    for mapping in mappings:
        if mapping.field is None:
            continue
        value = mapping.value(variables, entry)
        if value is not None:
            fields[mapping.field] = value
    return fields


# -- the whole file --------------------------------------------------------------------


@dataclass(frozen=True)
class LdapSettings:
    """A dovecot-ldap.conf.ext, checked."""

    path: str
    #: ``ldap://``/``ldaps://``/``ldapi://`` URIs, tried in order by libldap.
    uris: tuple[str, ...]
    bind_dn: str | None
    bind_password: str | None
    base: str
    scope: Scope
    deref: Deref
    pass_filter: str
    pass_attrs: tuple[AttributeMapping, ...]
    user_filter: str
    user_attrs: tuple[AttributeMapping, ...]
    #: The file sets user_filter or user_attrs: it serves as a userdb.
    userdb: bool
    auth_bind: bool
    auth_bind_userdn: str | None
    starttls: bool
    tls_ca_cert_file: str | None
    tls_ca_cert_dir: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_cipher_suite: str | None
    tls_require_cert: RequireCert | None
    ldap_version: int
    default_pass_scheme: str

    def pass_field_names(self) -> set[str]:
        return {m.field for m in self.pass_attrs if m.field is not None}


def read_ldap_settings(path: str) -> LdapSettings:
    """Read and check ``path``; `ConfigFileError` names the file and line of a mistake."""
    values = read_conf_ext(path, LDAP_KEYS)
    return ldap_settings(values, path)


def ldap_settings(values: Mapping[str, ConfigValue], path: str) -> LdapSettings:
    """`LdapSettings` from the values `pop3d.dovecotconf` read."""

    def text(key: str, default: str | None = None) -> str | None:
        found = values.get(key)
        if found is None or found.value == "":
            return default
        return found.value

    def setting(key: str, default: str) -> ConfigValue:
        return values.get(key) or ConfigValue(default, path, 0)

    uris = _uris(values)
    if not uris:
        raise ConfigFileError(path, 0, "neither uris nor hosts is set")
    base = values.get("base")
    if base is None or not base.value.strip():
        raise ConfigFileError(path, base.line if base else 0, "base is not set")
    _checked_template(base)
    if _yes(values, "sasl_bind"):
        raise values["sasl_bind"].error("sasl_bind = yes is not supported by pop3d")
    scope = _choice(setting("scope", "subtree"), Scope)
    deref = _choice(setting("deref", "never"), Deref)
    require = values.get("tls_require_cert")
    tls_require_cert = (
        _choice(require, RequireCert) if require is not None and require.value else None
    )
    version = setting("ldap_version", "3")
    if version.value.strip() not in ("2", "3"):
        raise version.error(f"ldap_version {version.value!r}: expected 2 or 3")
    scheme = setting("default_pass_scheme", DEFAULT_PASS_SCHEME)
    try:
        scheme_name = get_scheme(scheme.value.strip()).name
    except PasswordSchemeError as error:
        raise scheme.error(str(error)) from None
    pass_filter = setting("pass_filter", DEFAULT_FILTER)
    user_filter = setting("user_filter", DEFAULT_FILTER)
    for template in (pass_filter, user_filter):
        _checked_template(template)
    userdn = values.get("auth_bind_userdn")
    if userdn is not None and userdn.value:
        _checked_template(userdn)
    for key in ("blocking", "auth_bind", "tls", "sasl_bind"):
        _yes(values, key)
    # iterate_*, debug_level, ldaprc_path and blocking are accepted and
    # unused: pop3d lists no users, logs through twisted.logger, and always
    # asks from its thread pool.
    pass_attrs = parse_attribute_list(setting("pass_attrs", DEFAULT_PASS_ATTRS))
    user_attrs = parse_attribute_list(setting("user_attrs", DEFAULT_USER_ATTRS))
    return LdapSettings(
        path=path,
        uris=uris,
        bind_dn=text("dn"),
        bind_password=text("dnpass"),
        base=base.value.strip(),
        scope=scope,
        deref=deref,
        pass_filter=pass_filter.value,
        pass_attrs=pass_attrs,
        user_filter=user_filter.value,
        user_attrs=user_attrs,
        userdb="user_filter" in values or "user_attrs" in values,
        auth_bind=_yes(values, "auth_bind"),
        auth_bind_userdn=text("auth_bind_userdn"),
        starttls=_yes(values, "tls"),
        tls_ca_cert_file=text("tls_ca_cert_file"),
        tls_ca_cert_dir=text("tls_ca_cert_dir"),
        tls_cert_file=text("tls_cert_file"),
        tls_key_file=text("tls_key_file"),
        tls_cipher_suite=text("tls_cipher_suite"),
        tls_require_cert=tls_require_cert,
        ldap_version=int(version.value.strip()),
        default_pass_scheme=scheme_name,
    )


def _uris(values: Mapping[str, ConfigValue]) -> tuple[str, ...]:
    uris = values.get("uris")
    if uris is not None and uris.value.strip():
        found = tuple(uris.value.split())
        for uri in found:
            parts = urlsplit(uri)
            if parts.scheme not in ("ldap", "ldaps", "ldapi"):
                raise uris.error(f"{uri!r} is not an ldap://, ldaps:// or ldapi:// URI")
        return found
    hosts = values.get("hosts")
    if hosts is not None and hosts.value.strip():
        # "host" or "host:port", space separated (Dovecot's hosts).
        return tuple(f"ldap://{host}" for host in hosts.value.split())
    return ()


_E = TypeVar("_E", bound=Enum)


def _yes(values: Mapping[str, ConfigValue], key: str) -> bool:
    found = values.get(key)
    return found is not None and found.boolean(key)


def _choice(setting: ConfigValue, kind: type[_E]) -> _E:
    word = setting.value.strip().lower()
    for member in kind:
        if member.value == word:
            return member
    choices = ", ".join(str(member.value) for member in kind)
    raise setting.error(f"{setting.value!r} is not one of {choices}")


def _checked_template(setting: ConfigValue) -> None:
    try:
        check_template(setting.value)
    except VariableError as error:
        raise setting.error(str(error)) from None
