"""
Dovecot's password schemes: checking a password against a stored
``{SCHEME}secret``, and making new ones (``python -m pop3d pw``).

Every scheme is an object with the same small contract (`PasswordScheme`):
``check`` says whether a stored secret is well formed (so that a bad
passwd-file is an error at start-up, not at the first login), ``verify``
compares a password with it in constant time, ``hash`` makes a new secret.
The output of each scheme is byte-for-byte what Dovecot 2.3 stores (see the
vectors made with ``doveadm pw`` in tests/test_passwords.py), so files move
between Dovecot and pop3d in both directions.

Schemes:

``{PLAIN}``, ``{CLEARTEXT}``
    The password itself.  The only schemes that can serve APOP.
``{CRAM-MD5}``
    Dovecot's HMAC-MD5 context: the MD5 states after the outer and the
    inner padded key block (RFC 2104), 16 bytes each, outer first, each the
    four 32-bit words A, B, C, D little-endian, in hex.  Serves USER/PASS
    and SASL CRAM-MD5 (RFC 2195) without knowing the password; checking a
    CRAM-MD5 response resumes MD5 from those states, which neither hashlib
    nor libpass can do (both only give finished digests), hence the small
    pure-Python MD5 compression function below.
``{MD5-CRYPT}``, ``{SHA256-CRYPT}``, ``{SHA512-CRYPT}``
    ``$1$``, ``$5$`` and ``$6$`` crypt(3) hashes (``$5$rounds=N$`` too),
    computed by libpass (the maintained fork of passlib) as glibc does; the
    crypt module is gone from Python 3.13.  Salts are in crypt's alphabet
    (``./0-9A-Za-z``), as every crypt(3) and ``doveadm pw`` makes them.
``{BLF-CRYPT}``
    bcrypt (``$2y$``, ``$2b$``, ``$2a$``), through the bcrypt package.  Like
    Dovecot, only the first 72 bytes of a password count: Dovecot's bcrypt
    silently ignores the rest, so a longer password verifies whenever its
    first 72 bytes do.
``{ARGON2ID}``, ``{ARGON2I}``
    Argon2 (RFC 9106) PHC strings, through argon2-cffi.
``{SHA}``, ``{SSHA}``, ``{SMD5}``, ``{SSHA512}``
    The LDAP forms (RFC 2307 ``userPassword``, OpenLDAP's ``slappasswd``):
    base64 of SHA-1, SHA-1, MD5 or SHA-512 of the password followed by a
    salt of 4-16 bytes (``{SHA}`` has none), then the salt; computed by
    libpass's ``ldap_*`` handlers.
``{CRYPT}``
    Any crypt(3) hash above (``$1$``, ``$5$``, ``$6$``, ``$2b$``...) or
    traditional DES crypt, as OpenLDAP's ``{CRYPT}`` stores them; new ones
    are bcrypt, as Dovecot makes them.
``{SCRAM-SHA-256}``
    ``iterations,salt,StoredKey,ServerKey`` (base64): the SCRAM verifier of
    RFC 5802 / RFC 7677.  Serves USER/PASS and SASL SCRAM-SHA-256.

A password that contains a NUL byte never matches a crypt-style hash
(glibc and Dovecot read passwords as C strings and could not have stored it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import struct
from collections.abc import Hashable
from typing import Any

import argon2
import bcrypt
from passlib import hash as libpass_hash  # type: ignore[import-untyped]

from pop3d.sasl import ScramKeys


class PasswordSchemeError(ValueError):
    """A stored secret that its scheme cannot read, or bad hashing options."""


class PasswordScheme:
    """
    One ``{SCHEME}``.  Subclasses override `verify`, `hash` and, for stored
    secrets with a structure, `check` and `cost`.
    """

    #: The name between the braces, upper case.
    name: str = ""
    #: The stored secret is the password itself (APOP needs that).
    plaintext = False
    #: Checking a password costs enough (a key-derivation function) that it
    #: must not run on the reactor thread.
    slow = False
    #: What ``-r`` means for `hash`, for the pw command's help.
    rounds_help = "not used"

    def check(self, secret: bytes) -> None:
        """Raise `PasswordSchemeError` unless ``secret`` is well formed."""

    def verify(self, secret: bytes, password: bytes) -> bool:
        """Whether ``password`` matches ``secret`` (a well-formed secret)."""
        raise NotImplementedError

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        """A new secret for ``password`` (without the ``{SCHEME}`` prefix)."""
        raise NotImplementedError

    def cost(self, secret: bytes) -> Hashable:
        """
        What makes checking ``secret`` cost what it costs (rounds, memory):
        secrets of one scheme with equal costs take the same time to check.
        """
        return None

    def dummy_like(self, secret: bytes) -> bytes:
        """
        A secret that no password is known for and that costs the same to
        check as ``secret``: what an unknown user is checked against.
        """
        return self.hash(secrets.token_hex(16).encode("ascii"), self._rounds_of(secret))

    def _rounds_of(self, secret: bytes) -> int | None:
        return None


# -- plaintext ----------------------------------------------------------------


class PlainScheme(PasswordScheme):
    plaintext = True

    def __init__(self, name: str) -> None:
        self.name = name

    def verify(self, secret: bytes, password: bytes) -> bool:
        return hmac.compare_digest(password, secret)

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        return password

    def dummy_like(self, secret: bytes) -> bytes:
        return secrets.token_hex(8).encode("ascii")


# -- MD5 that can resume from a saved state (for {CRAM-MD5}) -----------------
#
# Our own code on purpose: Dovecot's {CRAM-MD5} secret is MD5's internal state
# after one block, not a digest, so checking a response needs MD5's compression
# function without the finalisation.  hashlib and libpass only give finished
# digests; libpass has no CRAM-MD5 context scheme at all.

_MASK = 0xFFFFFFFF
_MD5_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_MD5_CONSTANTS = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
MD5_INITIAL_STATE = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)

MD5State = tuple[int, int, int, int]


def md5_compress(state: MD5State, block: bytes) -> MD5State:
    """The MD5 compression function (RFC 1321 section 3.4) on one 64-byte block."""
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) % 16
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) % 16
        else:
            f = c ^ (b | (~d & _MASK))
            g = (7 * i) % 16
        f = (f + a + _MD5_CONSTANTS[i] + words[g]) & _MASK
        shift = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def md5_resume(state: MD5State, data: bytes, already_hashed: int) -> bytes:
    """
    The MD5 digest of a message whose first ``already_hashed`` bytes (a
    multiple of 64) left MD5 in ``state``, followed by ``data``.
    """
    if already_hashed % 64:
        raise ValueError("MD5 can only resume at a block boundary")
    total = already_hashed + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", total * 8)
    for offset in range(0, len(padded), 64):
        state = md5_compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def cram_md5_context(password: bytes) -> bytes:
    """
    Dovecot's ``{CRAM-MD5}`` secret (raw, 32 bytes): the MD5 states after
    the outer and the inner HMAC key block, outer first, little-endian words.
    """
    key = hashlib.md5(password).digest() if len(password) > 64 else password
    key = key.ljust(64, b"\x00")
    outer = md5_compress(MD5_INITIAL_STATE, bytes(k ^ 0x5C for k in key))
    inner = md5_compress(MD5_INITIAL_STATE, bytes(k ^ 0x36 for k in key))
    return struct.pack("<8I", *outer, *inner)


def hmac_md5_from_context(context: bytes, message: bytes) -> bytes:
    """HMAC-MD5 of ``message`` with the key whose Dovecot context is given."""
    words = struct.unpack("<8I", context)
    outer: MD5State = (words[0], words[1], words[2], words[3])
    inner: MD5State = (words[4], words[5], words[6], words[7])
    return md5_resume(outer, md5_resume(inner, message, 64), 64)


class CramMD5Scheme(PasswordScheme):
    name = "CRAM-MD5"
    _FORMAT = re.compile(rb"[0-9a-fA-F]{64}")

    def check(self, secret: bytes) -> None:
        if not self._FORMAT.fullmatch(secret):
            raise PasswordSchemeError("expected 64 hexadecimal digits")

    def verify(self, secret: bytes, password: bytes) -> bool:
        return hmac.compare_digest(cram_md5_context(password), bytes.fromhex(secret.decode()))

    def verify_response(self, secret: bytes, challenge: bytes, response: bytes) -> bool:
        """Whether ``response`` (hex) is the RFC 2195 digest of ``challenge``."""
        context = bytes.fromhex(secret.decode("ascii"))
        expected = hmac_md5_from_context(context, challenge).hex().encode("ascii")
        return hmac.compare_digest(expected, response.lower())

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        return cram_md5_context(password).hex().encode("ascii")

    def dummy_like(self, secret: bytes) -> bytes:
        return secrets.token_hex(32).encode("ascii")


# -- crypt(3): $1$, $5$, $6$ ---------------------------------------------------

_CRYPT_ALPHABET = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _crypt_salt(length: int) -> bytes:
    return bytes(secrets.choice(_CRYPT_ALPHABET) for _ in range(length))


def _libpass_checksum(handler: Any, password: bytes, salt: bytes, rounds: int | None) -> bytes:
    """
    The checksum part (after the last ``$``) of libpass's ``handler`` for
    ``password`` with this salt and rounds; the caller writes the prefix as
    glibc does (libpass leaves out ``rounds=5000$`` even where glibc keeps it).
    """
    settings: dict[str, object] = {"salt": salt.decode("ascii", "replace")}
    if rounds is not None:
        settings["rounds"] = rounds
    try:
        hashed: str = handler.using(**settings).hash(password)
    except ValueError as error:  # a salt outside crypt's alphabet, a NUL byte
        raise PasswordSchemeError(f"cannot compute the crypt(3) hash: {error}") from error
    return hashed.encode("ascii").rpartition(b"$")[2]


def md5_crypt(password: bytes, salt: bytes) -> bytes:
    """FreeBSD/glibc ``$1$`` crypt (salt: up to 8 characters), through libpass."""
    salt = salt[:8]
    return b"$1$" + salt + b"$" + _libpass_checksum(libpass_hash.md5_crypt, password, salt, None)


SHA_CRYPT_DEFAULT_ROUNDS = 5000
SHA_CRYPT_MIN_ROUNDS = 1000
SHA_CRYPT_MAX_ROUNDS = 999_999_999


def sha_crypt(password: bytes, setting: bytes, digest_name: str = "sha512") -> bytes:
    """
    Ulrich Drepper's SHA-crypt as glibc implements it, through libpass
    (rounds clamped to 1000-999999999 as glibc does): ``setting`` is
    ``$5$salt`` or ``$6$salt`` with an optional ``rounds=N$`` before the
    salt (and may be a whole hash: what follows the salt is ignored).
    """
    magic = b"$6$" if digest_name == "sha512" else b"$5$"
    if not setting.startswith(magic):
        raise PasswordSchemeError(f"expected a {magic.decode()} hash")
    rest = setting[len(magic) :]
    rounds = SHA_CRYPT_DEFAULT_ROUNDS
    custom_rounds = False
    if rest.startswith(b"rounds="):
        number, separator, after = rest[len(b"rounds=") :].partition(b"$")
        if not separator or not number.isdigit():
            raise PasswordSchemeError("malformed rounds=")
        rounds = min(max(int(number), SHA_CRYPT_MIN_ROUNDS), SHA_CRYPT_MAX_ROUNDS)
        custom_rounds = True
        rest = after
    salt = rest.split(b"$", 1)[0][:16]
    handler = libpass_hash.sha512_crypt if digest_name == "sha512" else libpass_hash.sha256_crypt
    checksum = _libpass_checksum(handler, password, salt, rounds)
    prefix = magic + (b"rounds=%d$" % rounds if custom_rounds else b"") + salt
    return prefix + b"$" + checksum


class _CryptScheme(PasswordScheme):
    slow = True
    _FORMAT: re.Pattern[bytes]
    _MAGIC = b""
    #: The libpass handler that verifies this scheme's hashes.
    _libpass: Any

    def check(self, secret: bytes) -> None:
        if not self._FORMAT.fullmatch(secret):
            raise PasswordSchemeError(
                f"expected a crypt(3) {self._MAGIC.decode()} hash (salt in ./0-9A-Za-z)"
            )

    def verify(self, secret: bytes, password: bytes) -> bool:
        if b"\x00" in password:
            return False
        try:
            return bool(self._libpass.verify(password, secret.decode("ascii")))
        except ValueError:
            # rounds= below 1000 (glibc clamps them and writes rounds=1000, so
            # such a stored hash never matched) or a password over libpass's
            # 4096-byte limit (longer than any POP3 command line): no match.
            return False


class MD5CryptScheme(_CryptScheme):
    name = "MD5-CRYPT"
    _MAGIC = b"$1$"
    _FORMAT = re.compile(rb"\$1\$[./0-9A-Za-z]{0,8}\$[./0-9A-Za-z]{22}")
    _libpass = libpass_hash.md5_crypt

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        return md5_crypt(password, _crypt_salt(8))


class SHACryptScheme(_CryptScheme):
    rounds_help = f"rounds (1000-999999999, default {SHA_CRYPT_DEFAULT_ROUNDS})"

    def __init__(self, name: str, digest_name: str, magic: bytes, length: int) -> None:
        self.name = name
        self._digest_name = digest_name
        self._MAGIC = magic
        self._FORMAT = re.compile(
            re.escape(magic) + rb"(rounds=[0-9]+\$)?[./0-9A-Za-z]{0,16}\$[./0-9A-Za-z]{%d}" % length
        )
        self._libpass = (
            libpass_hash.sha512_crypt if digest_name == "sha512" else libpass_hash.sha256_crypt
        )

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        setting = self._MAGIC
        if rounds is not None:
            if not SHA_CRYPT_MIN_ROUNDS <= rounds <= SHA_CRYPT_MAX_ROUNDS:
                raise PasswordSchemeError(f"{self.name} takes {self.rounds_help}")
            setting += b"rounds=%d$" % rounds
        return sha_crypt(password, setting + _crypt_salt(16), self._digest_name)

    def _rounds_of(self, secret: bytes) -> int | None:
        match = re.match(rb"\$[56]\$rounds=([0-9]+)\$", secret)
        if match is None:
            return None
        return min(max(int(match.group(1)), SHA_CRYPT_MIN_ROUNDS), SHA_CRYPT_MAX_ROUNDS)

    def cost(self, secret: bytes) -> Hashable:
        return self._rounds_of(secret) or SHA_CRYPT_DEFAULT_ROUNDS


# -- bcrypt ---------------------------------------------------------------------

#: bcrypt reads at most this many bytes of a password; Dovecot ignores the
#: rest (a 100-byte password verifies against the hash of its first 72).
BCRYPT_MAX_PASSWORD = 72
BCRYPT_DEFAULT_COST = 10


class BcryptScheme(PasswordScheme):
    name = "BLF-CRYPT"
    slow = True
    rounds_help = f"cost (4-31, default {BCRYPT_DEFAULT_COST})"
    _FORMAT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./0-9A-Za-z]{53}")

    def check(self, secret: bytes) -> None:
        if not self._FORMAT.fullmatch(secret):
            raise PasswordSchemeError("expected a bcrypt $2y$ hash")

    def verify(self, secret: bytes, password: bytes) -> bool:
        if b"\x00" in password:
            return False
        try:
            return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], secret)
        except ValueError:
            return False

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        if b"\x00" in password:
            raise PasswordSchemeError("bcrypt cannot hash a password with a NUL byte")
        cost = BCRYPT_DEFAULT_COST if rounds is None else rounds
        if not 4 <= cost <= 31:
            raise PasswordSchemeError(f"{self.name} takes a {self.rounds_help}")
        hashed = bcrypt.hashpw(password[:BCRYPT_MAX_PASSWORD], bcrypt.gensalt(cost))
        # $2b$ and $2y$ are the same algorithm; Dovecot writes $2y$.
        return b"$2y$" + hashed[4:]

    def _rounds_of(self, secret: bytes) -> int | None:
        return int(secret[4:6])

    def cost(self, secret: bytes) -> Hashable:
        return self._rounds_of(secret)


# -- Argon2 ---------------------------------------------------------------------


class Argon2Scheme(PasswordScheme):
    slow = True
    rounds_help = "time cost (passes over memory)"

    def __init__(self, name: str, kind: argon2.Type, time_cost: int, memory_cost: int) -> None:
        self.name = name
        self._type = kind
        self._prefix = b"$argon2id$" if kind is argon2.Type.ID else b"$argon2i$"
        # Dovecot's defaults (libsodium's "moderate" limits for each type).
        self._time_cost = time_cost
        self._memory_cost = memory_cost

    def _parameters(self, secret: bytes) -> argon2.Parameters:
        if not secret.startswith(self._prefix):
            raise PasswordSchemeError(f"expected an {self._prefix.decode()} hash")
        try:
            return argon2.extract_parameters(secret.decode("ascii"))
        except (argon2.exceptions.InvalidHashError, UnicodeDecodeError) as error:
            raise PasswordSchemeError("malformed Argon2 hash") from error

    def check(self, secret: bytes) -> None:
        self._parameters(secret)

    def verify(self, secret: bytes, password: bytes) -> bool:
        try:
            return argon2.low_level.verify_secret(secret, password, self._type)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    def _hasher(self, time_cost: int, memory_cost: int, parallelism: int) -> argon2.PasswordHasher:
        return argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=self._type,
        )

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        time_cost = self._time_cost if rounds is None else rounds
        if not 1 <= time_cost <= 1000:
            raise PasswordSchemeError(f"{self.name} takes a {self.rounds_help} of 1-1000")
        hasher = self._hasher(time_cost, self._memory_cost, 1)
        return hasher.hash(password).encode("ascii")

    def cost(self, secret: bytes) -> Hashable:
        parameters = self._parameters(secret)
        return (parameters.time_cost, parameters.memory_cost, parameters.parallelism)

    def dummy_like(self, secret: bytes) -> bytes:
        parameters = self._parameters(secret)
        hasher = argon2.PasswordHasher.from_parameters(parameters)
        return hasher.hash(secrets.token_hex(16)).encode("ascii")


# -- the LDAP digests: {SHA}, {SSHA}, {SMD5}, {SSHA512} ------------------------
#
# RFC 2307's userPassword forms, as OpenLDAP's slappasswd writes them (and
# Dovecot reads and writes them): base64 of the digest, followed for the
# salted ones by the salt.  libpass's ldap_* handlers compute and compare.

#: The salt lengths libpass reads; OpenLDAP writes 4 ({SMD5}) or 8 bytes,
#: Dovecot 4.
LDAP_SALT_SIZES = range(4, 17)


class LdapDigestScheme(PasswordScheme):
    """
    ``{SHA}`` (SHA-1), ``{SSHA}`` (salted SHA-1), ``{SMD5}`` (salted MD5),
    ``{SSHA512}`` (salted SHA-512): ``base64(digest(password + salt) + salt)``.
    """

    def __init__(self, name: str, handler: Any, digest_size: int, salted: bool) -> None:
        self.name = name
        self._handler = handler
        self._digest_size = digest_size
        self._salted = salted

    def check(self, secret: bytes) -> None:
        try:
            raw = base64.b64decode(secret, validate=True)
        except binascii.Error as error:
            raise PasswordSchemeError("expected base64") from error
        salt_size = len(raw) - self._digest_size
        if not self._salted:
            if salt_size:
                raise PasswordSchemeError(f"expected {self._digest_size} bytes in base64")
        elif salt_size not in LDAP_SALT_SIZES:
            raise PasswordSchemeError(
                f"expected the {self._digest_size}-byte digest and a salt of 4-16 bytes"
            )

    def verify(self, secret: bytes, password: bytes) -> bool:
        try:
            return bool(self._handler.verify(password, b"{%s}%s" % (self.name.encode(), secret)))
        except ValueError:
            return False

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        hashed: str = self._handler.hash(password)
        return hashed.encode("ascii").partition(b"}")[2]


# -- {CRYPT}: whatever crypt(3) reads ----------------------------------------------

_DES_CRYPT = re.compile(rb"[./0-9A-Za-z]{13}")


class CryptScheme(PasswordScheme):
    """
    ``{CRYPT}``: a crypt(3) hash of any kind pop3d knows, told apart by its
    prefix as crypt(3) does: ``$1$`` (MD5-crypt), ``$5$``/``$6$``
    (SHA-crypt), ``$2a$``/``$2b$``/``$2y$`` (bcrypt), or 13 characters of
    traditional DES crypt (only the first 8 bytes of a password count).
    What OpenLDAP's ``slappasswd -h {CRYPT} -c FORMAT`` and Dovecot write.
    New hashes are bcrypt, as ``doveadm pw -s CRYPT`` makes them.
    """

    name = "CRYPT"
    slow = True
    rounds_help = "bcrypt cost (4-31)"

    def __init__(self, kinds: dict[bytes, PasswordScheme], bcrypt_scheme: PasswordScheme) -> None:
        self._kinds = kinds
        self._bcrypt = bcrypt_scheme

    def _kind(self, secret: bytes) -> PasswordScheme | None:
        """The scheme of a modular crypt hash, None for DES crypt."""
        for prefix, kind in self._kinds.items():
            if secret.startswith(prefix):
                return kind
        if _DES_CRYPT.fullmatch(secret):
            return None
        shown = secret[: secret.find(b"$", 1) + 1] if secret.startswith(b"$") else b""
        raise PasswordSchemeError(
            f"unsupported crypt(3) hash {shown.decode('ascii', 'replace')!r}; pop3d reads "
            "$1$, $5$, $6$, $2a$, $2b$, $2y$ and 13-character DES hashes"
            if shown
            else "expected a crypt(3) hash ($6$..., $2y$..., or 13 characters of DES crypt)"
        )

    def check(self, secret: bytes) -> None:
        kind = self._kind(secret)
        if kind is not None:
            kind.check(secret)

    def verify(self, secret: bytes, password: bytes) -> bool:
        kind = self._kind(secret)
        if kind is not None:
            return kind.verify(secret, password)
        if b"\x00" in password:
            return False
        try:
            return bool(libpass_hash.des_crypt.verify(password, secret.decode("ascii")))
        except ValueError:
            return False

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        return self._bcrypt.hash(password, rounds)

    def cost(self, secret: bytes) -> Hashable:
        kind = self._kind(secret)
        return ("DES", None) if kind is None else (kind.name, kind.cost(secret))

    def dummy_like(self, secret: bytes) -> bytes:
        kind = self._kind(secret)
        if kind is not None:
            return kind.dummy_like(secret)
        dummy: str = libpass_hash.des_crypt.hash(secrets.token_hex(4))
        return dummy.encode("ascii")


# -- SCRAM-SHA-256 ----------------------------------------------------------------

#: Iterations for SCRAM keys: Dovecot's fixed count and RFC 7677's minimum.
#: Keys derived on demand for a plaintext password use it too.
SCRAM_ITERATIONS = 4096
_SCRAM_SALT_KEY = secrets.token_bytes(32)


def scram_keys(password: bytes, salt: bytes, iterations: int) -> ScramKeys:
    """The SCRAM-SHA-256 verifier of a password (RFC 5802 section 3)."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return ScramKeys(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", "sha256"),
    )


def scram_salt(username: bytes) -> bytes:
    """
    A salt for ``username`` that stays the same for the life of the process
    and cannot be predicted from outside it: used for users whose keys are
    derived on demand from a plaintext password and for users that do not
    exist, so that the two cannot be told apart.
    """
    return hmac.digest(_SCRAM_SALT_KEY, b"pop3d SCRAM salt\x00" + username, "sha256")[:16]


def parse_scram_secret(secret: bytes) -> ScramKeys:
    """Dovecot's ``iterations,salt,StoredKey,ServerKey`` (base64 fields)."""
    fields = secret.split(b",")
    if len(fields) != 4 or not fields[0].isdigit():
        raise PasswordSchemeError("expected iterations,salt,StoredKey,ServerKey")
    try:
        salt, stored_key, server_key = (base64.b64decode(f, validate=True) for f in fields[1:])
    except binascii.Error as error:
        raise PasswordSchemeError("expected base64 salt and keys") from error
    iterations = int(fields[0])
    if iterations < 1 or not salt or len(stored_key) != 32 or len(server_key) != 32:
        raise PasswordSchemeError("expected iterations, a salt and two 32-byte keys")
    return ScramKeys(salt, iterations, stored_key, server_key)


def format_scram_secret(keys: ScramKeys) -> bytes:
    return b"%d,%s,%s,%s" % (
        keys.iterations,
        base64.b64encode(keys.salt),
        base64.b64encode(keys.stored_key),
        base64.b64encode(keys.server_key),
    )


class ScramSHA256Scheme(PasswordScheme):
    name = "SCRAM-SHA-256"
    slow = True
    rounds_help = f"iteration count (at least 4096, default {SCRAM_ITERATIONS})"

    def check(self, secret: bytes) -> None:
        parse_scram_secret(secret)

    def verify(self, secret: bytes, password: bytes) -> bool:
        stored = parse_scram_secret(secret)
        derived = scram_keys(password, stored.salt, stored.iterations)
        return hmac.compare_digest(derived.stored_key, stored.stored_key)

    def hash(self, password: bytes, rounds: int | None = None) -> bytes:
        iterations = SCRAM_ITERATIONS if rounds is None else rounds
        if iterations < 4096:
            raise PasswordSchemeError(f"{self.name} takes an {self.rounds_help}")
        return format_scram_secret(scram_keys(password, secrets.token_bytes(16), iterations))

    def cost(self, secret: bytes) -> Hashable:
        return parse_scram_secret(secret).iterations

    def dummy_like(self, secret: bytes) -> bytes:
        iterations = parse_scram_secret(secret).iterations
        keys = ScramKeys(secrets.token_bytes(16), iterations, bytes(32), bytes(32))
        return format_scram_secret(keys)


# -- registry ---------------------------------------------------------------------


def _schemes() -> dict[str, PasswordScheme]:
    md5_crypt_scheme = MD5CryptScheme()
    sha256_crypt_scheme = SHACryptScheme("SHA256-CRYPT", "sha256", b"$5$", 43)
    sha512_crypt_scheme = SHACryptScheme("SHA512-CRYPT", "sha512", b"$6$", 86)
    bcrypt_scheme = BcryptScheme()
    crypt_kinds: dict[bytes, PasswordScheme] = {
        b"$1$": md5_crypt_scheme,
        b"$5$": sha256_crypt_scheme,
        b"$6$": sha512_crypt_scheme,
        b"$2a$": bcrypt_scheme,
        b"$2b$": bcrypt_scheme,
        b"$2y$": bcrypt_scheme,
    }
    every = [
        PlainScheme("PLAIN"),
        PlainScheme("CLEARTEXT"),
        CramMD5Scheme(),
        md5_crypt_scheme,
        sha256_crypt_scheme,
        sha512_crypt_scheme,
        bcrypt_scheme,
        CryptScheme(crypt_kinds, bcrypt_scheme),
        Argon2Scheme("ARGON2I", argon2.Type.I, time_cost=4, memory_cost=32768),
        Argon2Scheme("ARGON2ID", argon2.Type.ID, time_cost=3, memory_cost=65536),
        LdapDigestScheme("SHA", libpass_hash.ldap_sha1, 20, salted=False),
        LdapDigestScheme("SSHA", libpass_hash.ldap_salted_sha1, 20, salted=True),
        LdapDigestScheme("SMD5", libpass_hash.ldap_salted_md5, 16, salted=True),
        LdapDigestScheme("SSHA512", libpass_hash.ldap_salted_sha512, 64, salted=True),
        ScramSHA256Scheme(),
    ]
    return {scheme.name: scheme for scheme in every}


SCHEMES: dict[str, PasswordScheme] = _schemes()

#: What ``python -m pop3d pw`` makes without ``-s``: Argon2id is memory-hard
#: (RFC 9106's first recommendation), has no 72-byte limit and Dovecot
#: reads it; its cost is Dovecot's default (3 passes over 64 MiB).
DEFAULT_SCHEME = "ARGON2ID"


#: Dovecot's other names for schemes: ``{MD5}`` is its MD5-crypt, ``{BLF}``
#: bcrypt, wherever a stored password or a default_pass_scheme names them.
SCHEME_ALIASES = {"MD5": "MD5-CRYPT", "BLF": "BLF-CRYPT"}


def get_scheme(name: str) -> PasswordScheme:
    """The scheme called ``name`` (any case, or Dovecot's alias); else `PasswordSchemeError`."""
    upper = name.upper()
    try:
        return SCHEMES[SCHEME_ALIASES.get(upper, upper)]
    except KeyError:
        raise PasswordSchemeError(
            f"unsupported password scheme {{{name.upper()}}}; supported: "
            + ", ".join(f"{{{s}}}" for s in sorted(SCHEMES))
        ) from None


def verify_password(stored: bytes, password: bytes) -> bool:
    """Check ``password`` against a whole ``{SCHEME}secret`` (for tools and tests)."""
    name, secret = split_scheme(stored)
    scheme = get_scheme(name)
    scheme.check(secret)
    return scheme.verify(secret, password)


def split_scheme(stored: bytes) -> tuple[str, bytes]:
    """``{SCHEME}secret`` as ("SCHEME", secret)."""
    if not stored.startswith(b"{") or b"}" not in stored:
        raise PasswordSchemeError("the password has no {SCHEME} prefix (e.g. {PLAIN})")
    name, _, secret = stored[1:].partition(b"}")
    return name.decode("ascii", "replace").upper(), secret
