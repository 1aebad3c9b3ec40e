"""
Password schemes (pop3d.passwords) against hashes made by real Dovecot
(``doveadm pw``, Dovecot 2.3.19.1), and the ``python -m pop3d pw`` command.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import io
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from pop3d.__main__ import main
from pop3d.passwords import (
    BCRYPT_MAX_PASSWORD,
    DEFAULT_SCHEME,
    MD5_INITIAL_STATE,
    SCHEMES,
    PasswordSchemeError,
    cram_md5_context,
    get_scheme,
    hmac_md5_from_context,
    md5_crypt,
    md5_resume,
    parse_scram_secret,
    scram_keys,
    sha_crypt,
    split_scheme,
    verify_password,
)

HORSE = b"correct horse"
UMLAUTS = "pässwörd".encode()
LONG = b"The quick brown fox jumps over the lazy dog, then over the lazy cat, then home again."

# Made with ``doveadm pw -s SCHEME [-r ROUNDS] -p PASSWORD`` (Dovecot 2.3.19.1).
DOVECOT_VECTORS: list[tuple[bytes, bytes]] = [
    (b"{PLAIN}correct horse", HORSE),
    (b"{CLEARTEXT}correct horse", HORSE),
    (b"{CRAM-MD5}38b57fd1a0c4b46c814aa05f20318edd71c455380655f2c0ac35c5b359528d29", HORSE),
    (b"{CRAM-MD5}4a60bd37924fc5d45b4c92ce695bac86cb234bc3028aab2a71a225cb0dedfbb9", UMLAUTS),
    # A key longer than a block is hashed first (RFC 2104).
    (b"{CRAM-MD5}f03b654611c4dcb3e1fae0358b135066396b5b7346334f3e39c4566106684363", b"k" * 80),
    (
        b"{SHA512-CRYPT}$6$DIDFPj2jIZ1ezu9i$XXq..exMy09oIQ8xPf4sd/Qn8lcfEk24ar/ArzeBNBEFv97FfMf"
        b"M12VYVq4Xhls074rUMl.j/t/TIi10hDw1s0",
        HORSE,
    ),
    (
        b"{SHA512-CRYPT}$6$rounds=10000$r5vEzTa.SSzn6wWO$LI9WUpHWfxyZzIEOb0SvRas2w4z3yqKzUZS2Hu"
        b"eqeyYONzxrsbp3Pml0rI0arEcy4R6DVMho7U..pT72gfgy2/",
        HORSE,
    ),
    (
        b"{SHA512-CRYPT}$6$4jSzO1vO2wMClFZb$cEdaMCi8jzPbF78am4ajeZAbs6zAQYzIhlRezsoxBLKNKhUfqmR"
        b"J0PQULrNJMDFLEGyfRaOhyo5Jdrt422uaU.",
        UMLAUTS,
    ),
    (
        b"{SHA512-CRYPT}$6$3VtTZDW6xIMzUExe$VHINSCpIWtbDEToddmVElusx.fShZxFrdHdXK4P9q3FbLn.PuuS"
        b"AMwFTyB70kA3ZAaccgLFJDjS1aRWZleMn31",
        LONG,
    ),
    (b"{SHA256-CRYPT}$5$Wqb4j8WK5gTIv99T$7eU5oyJdSZlK2jcIyL1zK8pUMUtV7Wuy0Yy1lRgZ194", HORSE),
    (
        b"{SHA256-CRYPT}$5$rounds=1000$eQlmfZbU7bQylL.S$VK9GKBhUcRnSQ17cIzOZjjWcS/6Y2owmx/nvgfv"
        b"YArB",
        HORSE,
    ),
    (b"{SHA256-CRYPT}$5$zPawdE07E8K5DHVr$EKznXaGQCxDRkW2OfJby/3YAvHf1VcsAPxL0TH0gpl0", LONG),
    (b"{MD5-CRYPT}$1$z0xfQ/dG$oAEfoULFbrYIyCgBHITl60", HORSE),
    (b"{MD5-CRYPT}$1$LpaWrYFR$S9TWxb2PfF7yXn4PXj88s0", UMLAUTS),
    (b"{MD5-CRYPT}$1$Zi2mfBh0$qKbdIvZ.8UVvWge4Ie4TA.", LONG),
    (b"{BLF-CRYPT}$2y$05$8.EtBsQSSze1Ukke2iJSYeKMwJDqIk2FOpNWYeJSHnt5rACuzI4PC", HORSE),
    (b"{BLF-CRYPT}$2y$10$CxI6oUNeefg/jVRQ3dF/uu9sxOtrBdKtik7e4GBO2xzKBwsdiNP4u", HORSE),
    (b"{BLF-CRYPT}$2y$05$MrZgss56wV83ksVDzIlMxuAW1tgSghj4Qnq/UijspR0fw6rzyEh2W", UMLAUTS),
    (
        b"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$tEhxqjcv5GX9WXz/LczJww$qzVmcj86KYqC7opf75Sn"
        b"hfga08lUGOl8K8thS4tIBvE",
        HORSE,
    ),
    (
        b"{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$onR2OBu5iTInh7YjD66aeA$XEvnV6t5VpGB9ckVT3+9Aj"
        b"GjZXbSRM0R01Nlb4Rj18Y",
        HORSE,
    ),
    (
        b"{SSHA512}2XGZ0paJ2wth6jlu7zNDt92dzSiZteSfzD4Hf52cwy278Fsinw2qOX5ViVOv1UYnLd/uvJOtKmyeF"
        b"PvTp/Ypst1M/bQ=",
        HORSE,
    ),
    (
        b"{SSHA512}ycPzN9SLgJGB78DW4tQ0+Vr9UFN2Qsw24OxZyyg37RH5MEIH89Ebivh4yq8qUY8sK5ri8qS1IO85v"
        b"YQ9K+aK4opYVCM=",
        UMLAUTS,
    ),
    (b"{SSHA}jywsvTvr3oQPHXVgOQLqwOIaNfVCvOLW", HORSE),
    (b"{SSHA}5QFJ22eJiIo+Ihn/nRmKW8ifPZFg9Ub3", UMLAUTS),
    (b"{SHA}L55TUjtiq8FBorTWAZ0jy6g129A=", HORSE),
    (b"{SHA}9Rfd8dMqES/xrVXGbRsSyzjn6Pc=", UMLAUTS),
    (b"{SMD5}wM0dBu1yRsi/q6ulCt1W1XVh9ko=", HORSE),
    (b"{SMD5}FjbYGphCb/iIEctz8gxD1eaO+YQ=", UMLAUTS),
    # Dovecot's {CRYPT} makes bcrypt hashes.
    (b"{CRYPT}$2y$05$i05j7Nkj4OX.ReQnDhrRHOLRp9P2AuSJ9aQP4rjGG.UQsiZ3xsbcC", HORSE),
    (b"{CRYPT}$2y$05$Ci9ItI8A2D5ONGwCcy8FT.FUyJW39WSqfmIxHfAROiyTyvPD2D4CO", UMLAUTS),
    (
        b"{SCRAM-SHA-256}4096,sX7qYEBSBRXbLXCdE/63BQ==,4R+yUgPOSMvlLbJCIXJkdS+GDZm7fb/+MNRqpij0l"
        b"xE=,jCB7ex4JVZHcF9ubxHObPHeJFv1br0HEiGlkovFYsuY=",
        HORSE,
    ),
    (
        b"{SCRAM-SHA-256}4096,PVe9vMAaq+pDYQpRidrxjw==,W0v2udUlXsO4eDYOvddVj/RqjfjAj/xIKyyyw4TOM"
        b"P0=,hIQ2tpvP05+v3KXct4VWZIY4MI5Xv1NrltWzAte4dIE=",
        UMLAUTS,
    ),
]

# Made with OpenLDAP 2.5's ``slappasswd -h SCHEME [-c CRYPT-FORMAT] -s PASSWORD``
# ({SSHA512} with ``-o module-load=pw-sha2.la``): the userPassword values an
# LDAP directory holds.
SLAPPASSWD_VECTORS: list[tuple[bytes, bytes]] = [
    (b"{SSHA}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    (b"{SSHA}Yyu8/gZJxJCA/Mt+FJv+CEogtsohMw3c", UMLAUTS),
    (b"{SHA}L55TUjtiq8FBorTWAZ0jy6g129A=", HORSE),
    (b"{SHA}9Rfd8dMqES/xrVXGbRsSyzjn6Pc=", UMLAUTS),
    (b"{SMD5}X8tf42S2eBHunXDTPvLTGwMmOzY=", HORSE),
    (b"{SMD5}O+7Dd7adxJ8kOYLNSg9V3SX5Ol4=", UMLAUTS),
    (
        b"{SSHA512}HB6DmleHAvmP11+M0XzS4DxlZFahTeF4Q4xSt5Pc2Y0hGtpwesTZZ/K8WzalL6zU9I5fJJvrajAw6"
        b"MF8CQRw8v3DizcVc9l0",
        HORSE,
    ),
    # slappasswd's default {CRYPT}: traditional DES, 8 bytes of the password.
    (b"{CRYPT}XXsTqXqb60.nU", b"horse"),
    (b"{CRYPT}MtZANfLX3peK2", b"password"),
    (b"{CRYPT}$1$Wz/kzrof$918CawWcJIG7i4uOaVJEF1", HORSE),
    (b"{CRYPT}$5$QKJGpc2eE4cuMQEZ$iN7BSvgclQiaj5opnts8yWmq0D.x3q1fp29xIakC7zB", HORSE),
    (
        b"{CRYPT}$6$rUNH2UKG8yivNmDd$u/W8HtEadwidOJces2S/3LMgZLAEazeRDTrE9jUDPY25/oVwaDI10QHTMIhPs"
        b"dehdUqYBRHaiJztIOgirZRUX/",
        HORSE,
    ),
    (
        b"{CRYPT}$6$l5zRiO5sngF3SonS$op92ZDbyKihTBa4yj/9xqy6D16sRax92uOBH2o.QaA6EgUVbV0t1rSsC9En.WpF"
        b"DLqcTADpCMG1.FecKDSxa81",
        UMLAUTS,
    ),
    (b"{CRYPT}$2b$05$GP5DDMUcSl4zhZkvqhH2XeqerWNJsSph7HrF1p.Nv2NlaVcZObW1K", HORSE),
    # Scheme names in a directory are often lower case.
    (b"{ssha}FckBsJexufHVyL0PAPf3kT6jHGdKJ7Hs", HORSE),
    (b"{crypt}$1$Wz/kzrof$918CawWcJIG7i4uOaVJEF1", HORSE),
]

#: ``doveadm pw -s BLF-CRYPT -p`` with 72 "a" followed by "bcd".
BCRYPT_75_BYTES = b"$2y$05$SWIIlJXYw3JVjwcaw8yN0umz2oYSSom1VbkGrX7HEoKju3Augd6Mm"


def _wrong(password: bytes) -> bytes:
    """The password with its last byte changed."""
    return password[:-1] + bytes([password[-1] ^ 1])


class TestDovecotVectors:
    def test_every_scheme_has_a_vector(self) -> None:
        assert {split_scheme(stored)[0] for stored, _ in DOVECOT_VECTORS} == set(SCHEMES)

    @pytest.mark.parametrize("stored,password", DOVECOT_VECTORS)
    def test_right_password(self, stored: bytes, password: bytes) -> None:
        assert verify_password(stored, password)

    @pytest.mark.parametrize("stored,password", DOVECOT_VECTORS)
    def test_wrong_password(self, stored: bytes, password: bytes) -> None:
        assert not verify_password(stored, _wrong(password))
        assert not verify_password(stored, password + b"x")

    @pytest.mark.parametrize("stored,password", DOVECOT_VECTORS)
    def test_stored_secret_is_well_formed(self, stored: bytes, password: bytes) -> None:
        name, secret = split_scheme(stored)
        get_scheme(name).check(secret)


class TestSlappasswdVectors:
    """What OpenLDAP writes into userPassword, read as Dovecot reads it."""

    @pytest.mark.parametrize("stored,password", SLAPPASSWD_VECTORS)
    def test_right_password(self, stored: bytes, password: bytes) -> None:
        assert verify_password(stored, password)

    @pytest.mark.parametrize("stored,password", SLAPPASSWD_VECTORS)
    def test_wrong_password(self, stored: bytes, password: bytes) -> None:
        assert not verify_password(stored, _wrong(password))
        assert not verify_password(stored, b"x" + password)

    @pytest.mark.parametrize("stored,password", SLAPPASSWD_VECTORS)
    def test_stored_secret_is_well_formed(self, stored: bytes, password: bytes) -> None:
        name, secret = split_scheme(stored)
        get_scheme(name).check(secret)

    def test_des_crypt_reads_eight_bytes_as_crypt3_does(self) -> None:
        assert verify_password(b"{CRYPT}MtZANfLX3peK2", b"password and more")
        assert not verify_password(b"{CRYPT}MtZANfLX3peK2", b"passwor")
        assert not verify_password(b"{CRYPT}MtZANfLX3peK2", b"password\x00")

    @pytest.mark.parametrize(
        "secret,message",
        [
            (b"$y$j9T$salt$hash", r"unsupported crypt\(3\) hash '\$y\$'"),
            (b"$7$CU..../....$hash", r"unsupported crypt\(3\) hash '\$7\$'"),
            (b"tooshort", "expected a crypt"),
            (b"$6$salt$short", r"expected a crypt\(3\) \$6\$ hash"),
        ],
    )
    def test_crypt_hashes_pop3d_cannot_read_are_refused_up_front(
        self, secret: bytes, message: str
    ) -> None:
        with pytest.raises(PasswordSchemeError, match=message):
            SCHEMES["CRYPT"].check(secret)

    @pytest.mark.parametrize(
        "name,secret",
        [
            # 20 bytes of SHA-1 and a 1-byte salt; a 19-byte salt; 4 bytes too many.
            ("SSHA", b"A" * 28),
            ("SSHA", b"A" * 52),
            ("SHA", b"A" * 32),
            ("SMD5", b"AAAAAAAAAAAAAAAAAAAAAA=="),
            ("SSHA", b"not base64!"),
        ],
    )
    def test_malformed_ldap_digests(self, name: str, secret: bytes) -> None:
        with pytest.raises(PasswordSchemeError):
            SCHEMES[name].check(secret)


class TestCramMD5:
    """Dovecot stores the HMAC-MD5 states: outer then inner, 32-bit words little-endian."""

    # doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf
    CONTEXT = "d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"

    def test_rfc2195_example_from_the_stored_context(self) -> None:
        scheme = SCHEMES["CRAM-MD5"]
        assert isinstance(scheme, type(get_scheme("cram-md5")))
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        context = self.CONTEXT.encode()
        verify_response = scheme.verify_response  # type: ignore[attr-defined]
        assert verify_response(context, challenge, b"b913a602c7eda7a495b4e6e7334d3890")
        assert verify_response(context, challenge, b"B913A602C7EDA7A495B4E6E7334D3890")
        assert not verify_response(context, challenge, b"b913a602c7eda7a495b4e6e7334d3891")
        assert not verify_response(context, challenge + b" ", b"b913a602c7eda7a495b4e6e7334d3890")

    def test_byte_order(self) -> None:
        """The first 16 bytes are the outer state (key XOR 0x5c) in MD5's own byte order."""
        context = cram_md5_context(b"tanstaaftanstaaf")
        assert context.hex() == self.CONTEXT
        outer_block = bytes(k ^ 0x5C for k in b"tanstaaftanstaaf".ljust(64, b"\x00"))
        # MD5 of one block then nothing: resuming with no data pads and finishes.
        assert md5_resume(MD5_INITIAL_STATE, outer_block, 0) == hashlib.md5(outer_block).digest()

    @pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 119, 120, 200])
    def test_pure_python_md5_matches_hashlib(self, length: int) -> None:
        data = os.urandom(length)
        assert md5_resume(MD5_INITIAL_STATE, data, 0) == hashlib.md5(data).digest()

    @pytest.mark.parametrize("key", [b"", b"k", b"x" * 64, b"y" * 65, b"z" * 200])
    def test_resumed_hmac_matches_hmac(self, key: bytes) -> None:
        message = os.urandom(100)
        assert hmac_md5_from_context(cram_md5_context(key), message) == hmac.digest(
            key, message, "md5"
        )


class TestCrypt:
    """Ulrich Drepper's SHA-crypt specification vectors, and glibc's rounds clamp."""

    @pytest.mark.parametrize(
        "setting,password,expected",
        [
            (
                b"$5$saltstring",
                b"Hello world!",
                b"$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
            ),
            (
                b"$5$rounds=10000$saltstringsaltstring",
                b"Hello world!",
                b"$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
            ),
            (
                b"$5$rounds=10$roundstoolow",
                b"the minimum number is still observed",
                b"$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
            ),
            (
                b"$6$saltstring",
                b"Hello world!",
                b"$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiB"
                b"FdcbYEdFCoEOfaS35inz1",
            ),
            (
                b"$6$rounds=1400$anotherlongsaltstring",
                b"a very much longer text to encrypt.  This one even stretches over more"
                b"than one line.",
                b"$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6Io"
                b"YN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
            ),
            (
                b"$6$rounds=10$roundstoolow",
                b"the minimum number is still observed",
                b"$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSkl"
                b"Zt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
            ),
        ],
    )
    def test_specification_vectors(self, setting: bytes, password: bytes, expected: bytes) -> None:
        digest = "sha512" if setting.startswith(b"$6$") else "sha256"
        assert sha_crypt(password, setting, digest) == expected

    def test_md5_crypt_takes_the_salt_from_a_whole_hash(self) -> None:
        assert md5_crypt(HORSE, b"z0xfQ/dG") == b"$1$z0xfQ/dG$oAEfoULFbrYIyCgBHITl60"

    @pytest.mark.parametrize("name", ["MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT"])
    def test_a_nul_byte_never_matches(self, name: str) -> None:
        scheme = SCHEMES[name]
        secret = scheme.hash(b"abc", None if name != "BLF-CRYPT" else 4)
        assert scheme.verify(secret, b"abc")
        assert not scheme.verify(secret, b"abc\x00")
        assert not scheme.verify(secret, b"abc\x00def")


class TestCryptThroughLibpass:
    """
    MD5-crypt and SHA-crypt are computed by libpass; where libpass and glibc
    write or read a hash differently, pop3d answers as glibc and Dovecot do.
    """

    HELLO_SHA512 = (
        b"svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
    )

    def test_explicit_default_rounds_are_written_back(self) -> None:
        """glibc keeps ``rounds=5000$`` when the setting names it (libpass would drop it)."""
        expected = b"$6$rounds=5000$saltstring$" + self.HELLO_SHA512
        assert sha_crypt(b"Hello world!", b"$6$rounds=5000$saltstring", "sha512") == expected
        assert verify_password(b"{SHA512-CRYPT}" + expected, b"Hello world!")

    def test_stored_rounds_below_the_minimum_never_match(self) -> None:
        """glibc clamps rounds=10 to 1000 and writes that, so a stored rounds=10 never matched."""
        clamped = sha_crypt(b"pw", b"$6$rounds=10$roundstoolow", "sha512")
        assert clamped.startswith(b"$6$rounds=1000$roundstoolow$")
        stored = b"$6$rounds=10$" + clamped[len(b"$6$rounds=1000$") :]
        assert not SCHEMES["SHA512-CRYPT"].verify(stored, b"pw")

    @pytest.mark.parametrize(
        "name,secret",
        [
            ("SHA512-CRYPT", b"$6$ab!cd$" + HELLO_SHA512),
            ("SHA256-CRYPT", b"$5$s\xc3\xa4lt$" + b"a" * 43),
            ("MD5-CRYPT", b"$1$ab:c$" + b"a" * 22),
        ],
    )
    def test_salt_outside_the_crypt_alphabet_is_refused_up_front(
        self, name: str, secret: bytes
    ) -> None:
        with pytest.raises(PasswordSchemeError, match=r"salt in \./0-9A-Za-z"):
            SCHEMES[name].check(secret)

    @pytest.mark.parametrize("name", ["MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT"])
    def test_a_huge_password_is_refused_not_an_error(self, name: str) -> None:
        scheme = SCHEMES[name]
        secret = scheme.hash(b"x" * 100)
        assert scheme.verify(secret, b"x" * 100)
        assert not scheme.verify(secret, b"x" * 5000)


class TestBcrypt72Bytes:
    """
    Dovecot's bcrypt silently uses only the first 72 bytes (checked with
    ``doveadm pw -t``: 72 "a", 72 "a" + "bcd" and 72 "a" + "zzz" all verify
    against the hash of 72 "a" + "bcd"; 71 "a" does not).
    """

    def test_dovecot_hash_of_75_bytes(self) -> None:
        scheme = SCHEMES["BLF-CRYPT"]
        assert scheme.verify(BCRYPT_75_BYTES, b"a" * 72 + b"bcd")
        assert scheme.verify(BCRYPT_75_BYTES, b"a" * 72)
        assert scheme.verify(BCRYPT_75_BYTES, b"a" * 72 + b"zzz" * 100)
        assert not scheme.verify(BCRYPT_75_BYTES, b"a" * 71)

    def test_hashing_a_long_password(self) -> None:
        scheme = SCHEMES["BLF-CRYPT"]
        secret = scheme.hash(b"b" * 100, 4)
        assert secret.startswith(b"$2y$04$")
        assert scheme.verify(secret, b"b" * BCRYPT_MAX_PASSWORD)
        assert not scheme.verify(secret, b"b" * (BCRYPT_MAX_PASSWORD - 1))


class TestHashing:
    @pytest.mark.parametrize("name", sorted(SCHEMES))
    def test_round_trip(self, name: str) -> None:
        scheme = SCHEMES[name]
        rounds = {"BLF-CRYPT": 4, "ARGON2ID": 1, "ARGON2I": 1}.get(name)
        secret = scheme.hash(UMLAUTS, rounds)
        scheme.check(secret)
        assert scheme.verify(secret, UMLAUTS)
        assert not scheme.verify(secret, _wrong(UMLAUTS))

    def test_dovecot_formats(self) -> None:
        assert SCHEMES["BLF-CRYPT"].hash(HORSE, 4).startswith(b"$2y$04$")
        assert SCHEMES["SHA512-CRYPT"].hash(HORSE).startswith(b"$6$")
        assert SCHEMES["SHA256-CRYPT"].hash(HORSE, 2000).startswith(b"$5$rounds=2000$")
        assert parse_scram_secret(SCHEMES["SCRAM-SHA-256"].hash(HORSE)).iterations == 4096
        assert SCHEMES["ARGON2ID"].hash(HORSE, 1).startswith(b"$argon2id$v=19$m=65536,t=1,p=1$")

    @pytest.mark.parametrize(
        "name,rounds", [("SHA512-CRYPT", 999), ("BLF-CRYPT", 3), ("SCRAM-SHA-256", 100)]
    )
    def test_too_few_rounds_refused(self, name: str, rounds: int) -> None:
        with pytest.raises(PasswordSchemeError):
            SCHEMES[name].hash(HORSE, rounds)

    @pytest.mark.parametrize(
        "stored,password",
        # Argon2 separately, once (test_argon2_dummy): each check costs 64 MiB.
        [(stored, password) for stored, password in DOVECOT_VECTORS if b"{ARGON2" not in stored],
    )
    def test_dummies_cost_the_same_and_match_nothing(self, stored: bytes, password: bytes) -> None:
        name, secret = split_scheme(stored)
        scheme = SCHEMES[name]
        dummy = scheme.dummy_like(secret)
        scheme.check(dummy)
        assert dummy != secret
        assert scheme.cost(dummy) == scheme.cost(secret)
        assert not scheme.verify(dummy, password)

    def test_argon2_dummy(self) -> None:
        scheme = SCHEMES["ARGON2I"]
        secret = scheme.hash(HORSE, 1)
        dummy = scheme.dummy_like(secret)
        assert scheme.cost(dummy) == scheme.cost(secret) == (1, 32768, 1)

    def test_scram_keys_are_rfc5802(self) -> None:
        """RFC 7677's user: StoredKey = H(HMAC(SaltedPassword, "Client Key"))."""
        salt = bytes.fromhex("5b6d99689d12358eec6c4b1412436fa0")
        keys = scram_keys(b"pencil", salt, 4096)
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        assert keys.stored_key == hashlib.sha256(client_key).digest()
        assert keys.server_key == hmac.digest(salted, b"Server Key", "sha256")


class TestSchemeNames:
    def test_unknown_scheme(self) -> None:
        with pytest.raises(PasswordSchemeError, match=r"unsupported password scheme \{SHA1\}"):
            get_scheme("sha1")

    def test_names_are_case_insensitive(self) -> None:
        assert get_scheme("blf-crypt") is SCHEMES["BLF-CRYPT"]

    def test_default_is_argon2id(self) -> None:
        assert DEFAULT_SCHEME == "ARGON2ID"

    @pytest.mark.parametrize(
        "name,secret",
        [
            ("CRAM-MD5", b"abc"),
            ("SHA512-CRYPT", b"$5$salt$hash"),
            ("MD5-CRYPT", b"$1$salt"),
            ("BLF-CRYPT", b"$2y$05$short"),
            ("ARGON2ID", b"$argon2i$v=19$m=32768,t=4,p=1$c2FsdA$aGFzaA"),
            ("SSHA512", b"bm90IGxvbmcgZW5vdWdo"),
            ("SCRAM-SHA-256", b"4096,c2FsdA==,a2V5"),
        ],
    )
    def test_malformed_secrets(self, name: str, secret: bytes) -> None:
        with pytest.raises(PasswordSchemeError):
            SCHEMES[name].check(secret)


def run_pw(
    *arguments: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "pop3d", *arguments],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.process
class TestPwCommand:
    def test_default_scheme_from_stdin(self) -> None:
        result = run_pw("pw", stdin=b"correct horse\n")
        line = result.stdout.decode().strip()
        assert line.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
        assert verify_password(line.encode(), HORSE)

    def test_scheme_and_crlf(self) -> None:
        result = run_pw("pw", "-s", "blf-crypt", "-r", "4", stdin=b"correct horse\r\n")
        line = result.stdout.strip()
        assert line.startswith(b"{BLF-CRYPT}$2y$04$")
        assert verify_password(line, HORSE)

    def test_test_option(self) -> None:
        stored = DOVECOT_VECTORS[5][0].decode()
        assert run_pw("pw", "-t", stored, "-p", "correct horse").stdout.endswith(b"(verified)\n")
        refused = run_pw("pw", "-t", stored, "-p", "wrong", check=False)
        assert refused.returncode == 1 and b"mismatch" in refused.stderr

    @pytest.mark.parametrize(
        "arguments,message",
        [(("pw", "-s", "SHA1"), b"unsupported password scheme {SHA1}"), ((), b"COMMAND")],
    )
    def test_usage_errors_have_no_traceback(
        self, arguments: tuple[str, ...], message: bytes
    ) -> None:
        result = run_pw(*arguments, stdin=b"x\n", check=False)
        assert result.returncode == 2
        assert message in result.stderr and b"Traceback" not in result.stderr
        assert result.stdout == b""


Runner = Callable[..., tuple[int, bytes, bytes]]


class FakeStdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class TestPwCommandInProcess:
    """The same command, run in this process (faster) for the finer cases."""

    @pytest.fixture
    def run(
        self, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> Runner:
        def run(
            *arguments: str | None, stdin: bytes = b"", prompts: list[str] | None = None
        ) -> tuple[int, bytes, bytes]:
            """Run main(arguments); ``run(None)`` runs main() on sys.argv."""
            monkeypatch.setattr(sys, "stdin", FakeStdin(stdin, tty=prompts is not None))
            answers = iter(prompts or [])
            monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
            try:
                status = main(None if arguments == (None,) else [str(a) for a in arguments])
            except SystemExit as exit:
                status = int(exit.code or 0)
            out, err = capsysbinary.readouterr()
            return status, out, err

        return run

    def test_password_option(self, run: Runner) -> None:
        status, out, _ = run("pw", "-s", "SHA256-CRYPT", "-p", "pässwörd")
        assert status == 0 and verify_password(out.strip(), UMLAUTS)

    def test_only_the_first_line_of_stdin(self, run: Runner) -> None:
        status, out, _ = run("pw", "-s", "SSHA512", stdin=b"first\nsecond\n")
        assert status == 0 and verify_password(out.strip(), b"first")

    def test_prompt_asks_twice(self, run: Runner) -> None:
        status, out, _ = run("pw", "-s", "SSHA512", prompts=["pässwörd", "pässwörd"])
        assert status == 0 and verify_password(out.strip(), UMLAUTS)

    def test_prompts_that_differ(self, run: Runner) -> None:
        status, out, err = run("pw", prompts=["one", "two"])
        assert (status, out) == (1, b"") and b"do not match" in err

    def test_list(self, run: Runner) -> None:
        status, out, _ = run("pw", "-l")
        listed = out.decode().split("\n")
        assert status == 0 and "ARGON2ID (default)" in listed and "SCRAM-SHA-256" in listed

    @pytest.mark.parametrize(
        "arguments,stdin,message,status",
        [
            (("pw", "-s", "SHA1"), b"x\n", b"unsupported password scheme {SHA1}", 2),
            (("pw",), b"", b"empty password", 1),
            (("pw", "-s", "PLAIN"), b"a:b\n", b"cannot be stored in a passwd-file", 1),
            (("pw", "-s", "PLAIN", "-r", "5"), b"x\n", b"takes no -r", 2),
            (("pw", "-s", "BLF-CRYPT", "-r", "99"), b"x\n", b"cost (4-31", 2),
            (("pw", "-r", "many"), b"x\n", b"invalid int value", 2),
            (("pw", "-t", "{SHA512-CRYPT}$6$x", "-p", "x"), b"", b"crypt(3) $6$", 2),
            (("pw", "-t", "no-scheme", "-p", "x"), b"", b"no {SCHEME} prefix", 2),
            ((), b"", b"required: COMMAND", 2),
            (("frobnicate",), b"", b"invalid choice", 2),
        ],
    )
    def test_usage_errors_are_clear(
        self,
        run: Runner,
        arguments: tuple[str, ...],
        stdin: bytes,
        message: bytes,
        status: int,
    ) -> None:
        result, out, err = run(*arguments, stdin=stdin)
        assert result == status
        assert message in err and out == b""

    def test_console_script_needs_no_command_word(
        self, run: Runner, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``pop3d-pw`` (setup.cfg's console script) is ``python -m pop3d pw``."""
        monkeypatch.setattr(sys, "argv", ["/usr/local/bin/pop3d-pw", "-s", "SSHA512"])
        status, out, _ = run(None, stdin=b"x\n")
        assert status == 0 and verify_password(out.strip(), b"x")


@pytest.mark.parametrize(
    ("alias", "scheme"), [("MD5", "MD5-CRYPT"), ("md5", "MD5-CRYPT"), ("BLF", "BLF-CRYPT")]
)
def test_dovecots_scheme_aliases_name_the_same_scheme(alias: str, scheme: str) -> None:
    """Dovecot reads ``{MD5}$1$...`` as MD5-crypt and ``{BLF}`` as bcrypt; so does pop3d."""
    assert get_scheme(alias) is get_scheme(scheme)
    stored_as = get_scheme("MD5")
    assert stored_as.verify(b"$1$z0xfQ/dG$oAEfoULFbrYIyCgBHITl60", HORSE)
