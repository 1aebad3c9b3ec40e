"""
TLS with real clients on loopback: STLS (RFC 2595) with poplib, curl and
openssl s_client; implicit TLS (RFC 8314) with curl pop3s://; the STARTTLS
injection attempt over a real socket; certificate reload on SIGHUP (in
the thread pool: a handshake meanwhile uses the certificate in use).
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test.iosim import connectedServerAndClient

from pop3d.tap import parse_tls
from pop3d.testing import deliver_to_maildir
from pop3d.tls import ServerTLS, tls_server_factory

from .clock_threads import ClockThreads, result_of
from .conftest import USERS, Logged, RunningServer, require_program, start_service
from .test_endpoints import _self_signed, make_certificate

MESSAGE = b"Subject: secret\n\n.dotted\nline\n"
EXPECTED = b"Subject: secret\r\n\r\n.dotted\r\nline\r\n"


async def _tls_server(tmp_path: Path, listen: list[str] | None = None) -> RunningServer:
    key, cert = _self_signed(tmp_path)
    server = await start_service(
        tmp_path,
        listen or ["tcp:0:interface=127.0.0.1"],
        ["--tls-cert", str(cert), "--tls-key", str(key)],
    )
    deliver_to_maildir(str(server.maildir("alice")), MESSAGE)
    return server


def _client_context(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))


@pytest_twisted.ensureDeferred
async def test_poplib_stls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:

        def fetch() -> tuple[bytes, list[bytes], dict[str, list[str]]]:
            client = poplib.POP3(server.host, server.port, timeout=10)
            assert "STLS" in client.capa()
            client.stls(context=_client_context(tmp_path))
            capabilities = client.capa()
            client.user("alice")
            client.pass_(USERS["alice"])
            status, lines, _ = client.retr(1)
            client.quit()
            return status, lines, capabilities

        _status, lines, capabilities = await deferToThread(fetch)
        assert lines == [b"Subject: secret", b"", b".dotted", b"line"]
        assert "STLS" not in capabilities
    finally:
        await server.service.stopService()


async def _curl_fetches_message_1(tmp_path: Path, url: str, *options: str) -> None:
    out, err, code = await getProcessOutputAndValue(
        require_program("curl"),
        [
            *("--disable", "--silent", "--show-error", *options),
            *("--cacert", str(tmp_path / "cert.pem")),
            *("--user", f"alice:{USERS['alice']}", url),
        ],
        env={"PATH": os.defpath},
    )
    assert code == 0, err
    assert out == EXPECTED


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl_requires_stls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:
        url = f"pop3://{server.host}:{server.port}/1"
        await _curl_fetches_message_1(tmp_path, url, "--ssl-reqd")
    finally:
        await server.service.stopService()


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_curl_implicit_tls(tmp_path: Path) -> None:
    """RFC 8314 section 3.3: pop3s://, TLS from the first byte."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    _self_signed(tmp_path)
    server = await _tls_server(
        tmp_path, [f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
    )
    try:
        await _curl_fetches_message_1(tmp_path, f"pop3s://{server.host}:{server.port}/1")
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_implicit_tls_with_the_reloadable_certificate(tmp_path: Path) -> None:
    """``--listen ssl:PORT`` without privateKey= uses --tls-cert/--tls-key."""
    server = await _tls_server(tmp_path, ["ssl:0:interface=127.0.0.1"])
    try:

        def fetch() -> tuple[list[bytes], dict[str, list[str]]]:
            context = _client_context(tmp_path)
            client = poplib.POP3_SSL(server.host, server.port, context=context, timeout=10)
            capabilities = client.capa()
            client.user("alice")
            client.pass_(USERS["alice"])
            lines = client.retr(1)[1]
            client.quit()
            return lines, capabilities

        lines, capabilities = await deferToThread(fetch)
        assert lines == [b"Subject: secret", b"", b".dotted", b"line"]
        # The connection is secure already: no STLS on offer.
        assert "STLS" not in capabilities
    finally:
        await server.service.stopService()


@pytest.mark.peer
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_starttls(tmp_path: Path) -> None:
    server = await _tls_server(tmp_path)
    try:
        script = f"USER alice\nPASS {USERS['alice']}\nSTAT\nQUIT\n".encode()

        def converse() -> bytes:
            import subprocess

            result = subprocess.run(
                [
                    require_program("openssl"),
                    "s_client",
                    "-quiet",
                    "-starttls",
                    "pop3",
                    "-connect",
                    f"{server.host}:{server.port}",
                    "-CAfile",
                    str(tmp_path / "cert.pem"),
                    "-verify_return_error",
                ],
                input=script,
                capture_output=True,
                timeout=30,
                check=False,
            )
            return result.stdout

        out = await deferToThread(converse)
        assert b"+OK maildrop has 1 messages" in out
        assert f"+OK 1 {len(EXPECTED)}".encode() in out
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_commands_injected_before_the_handshake_are_not_run(tmp_path: Path) -> None:
    """RFC 2595 section 4; the classic STARTTLS command injection."""
    server = await _tls_server(tmp_path)
    try:

        def attack() -> list[bytes]:
            raw = socket.create_connection((server.host, server.port), timeout=10)
            reader = raw.makefile("rb")
            reader.readline()  # greeting
            raw.sendall(b"STLS\r\nCAPA\r\nUSER alice\r\n")
            assert reader.readline() == b"+OK begin TLS negotiation\r\n"
            secure = _client_context(tmp_path).wrap_socket(raw, server_hostname="localhost")
            secure.sendall(b"NOOP\r\nPASS " + USERS["alice"].encode() + b"\r\n")
            replies = secure.makefile("rb")
            lines = [replies.readline(), replies.readline()]
            secure.close()
            return lines

        noop, password = await deferToThread(attack)
        assert noop == b"-ERR command not valid in this state\r\n"  # NOOP, not CAPA
        assert password == b"-ERR send USER first\r\n"  # the injected USER did not run
    finally:
        await server.service.stopService()


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
@pytest_twisted.ensureDeferred
async def test_certificate_is_reloaded_on_sighup(
    tmp_path: Path, logged: Logged, implicit: bool
) -> None:
    server = await _tls_server(tmp_path, _listening(implicit))
    try:
        first = await deferToThread(_server_certificate, server, implicit)
        _self_signed(tmp_path)  # a renewed certificate, same files
        await _hang_up(logged, f"reloaded {tmp_path / 'cert.pem'}")
        second = await deferToThread(_server_certificate, server, implicit)
        assert first != second
        assert second == _der(tmp_path / "cert.pem")
    finally:
        await server.service.stopService()


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
@pytest_twisted.ensureDeferred
async def test_a_handshake_while_sighup_reads_the_files_uses_the_certificate_in_use(
    tmp_path: Path, logged: Logged, implicit: bool
) -> None:
    """
    SIGHUP reads the certificate in the thread pool: here it is a FIFO
    that gives the renewed certificate only once the client's handshake is
    done, so the reading is under way all along.  The handshake gets the
    certificate in use, without waiting (on the reactor thread, that reading
    would hold every session until the socket timeout fails the client).
    """
    server = await _tls_server(tmp_path, _listening(implicit))
    certificate = tmp_path / "cert.pem"
    try:
        old = _der(certificate)
        renewed_key, renewed_certificate = _self_signed(_made(tmp_path / "renewed"))
        os.replace(renewed_key, tmp_path / "key.pem")
        os.mkfifo(tmp_path / "cert.fifo")
        os.replace(tmp_path / "cert.fifo", certificate)
        reloaded = _hang_up(logged, f"reloaded {certificate}")

        def handshake_then_renew() -> bytes:
            try:
                return _server_certificate(server, implicit)
            finally:
                # The reading ends once the FIFO has its writer, and its end.
                with open(certificate, "wb") as fifo:
                    fifo.write(renewed_certificate.read_bytes())

        during = await deferToThread(handshake_then_renew)
        await reloaded
        after = await deferToThread(_server_certificate, server, implicit)
    finally:
        await server.service.stopService()
    assert during == old
    assert after == _der(renewed_certificate)
    assert logged.texts("keeping the previous") == []


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
@pytest_twisted.ensureDeferred
async def test_sighup_with_a_key_that_does_not_match_keeps_the_certificate_in_use(
    tmp_path: Path, logged: Logged, implicit: bool
) -> None:
    """
    A renewed certificate whose key is not in place yet: TLS goes on with
    the pair in use (it used to fail every handshake until the next SIGHUP),
    and the log says so once, naming the files.
    """
    server = await _tls_server(tmp_path, _listening(implicit))
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        old = _der(certificate)
        _renewed_key, renewed_certificate = _self_signed(_made(tmp_path / "renewed"))
        os.replace(renewed_certificate, certificate)
        await _hang_up(
            logged,
            f"keeping the previous {certificate}: the private key in {key} cannot be used "
            f"with the certificate in {certificate}: key values mismatch",
        )
        served = [await deferToThread(_server_certificate, server, implicit) for _ in range(2)]
    finally:
        await server.service.stopService()
    assert served == [old, old]
    assert len(logged.texts(str(certificate))) == 1


def _listening(implicit: bool) -> list[str] | None:
    """Implicit TLS (``ssl:``), or STLS on the usual port."""
    return ["ssl:0:interface=127.0.0.1"] if implicit else None


def _hang_up(logged: Logged, line: str) -> Deferred[None]:
    """SIGHUP to this process, whose server logs ``line`` when it is done."""
    done = logged.when(line)
    os.kill(os.getpid(), signal.SIGHUP)
    return done


def _server_certificate(server: RunningServer, implicit: bool) -> bytes:
    raw = socket.create_connection((server.host, server.port), timeout=10)
    if not implicit:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STLS\r\n")
        reader.readline()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(raw) as secure:
        certificate = secure.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


@pytest.mark.peer
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest_twisted.ensureDeferred
async def test_curl_sasl_mechanisms(tmp_path: Path, mechanism: str) -> None:
    """Each SASL mechanism against an independent client (curl's own SASL)."""
    server = await _tls_server(tmp_path)
    try:
        url = f"pop3://{server.host}:{server.port}/1"
        await _curl_fetches_message_1(
            tmp_path, url, "--ssl-reqd", "--login-options", f"AUTH={mechanism}"
        )
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_stls_behind_haproxy_counts_as_secure(tmp_path: Path) -> None:
    """The PROXY-protocol wrapper must not hide that STLS made the link secure."""
    server = await _tls_server(tmp_path, ["haproxy:tcp:0:interface=127.0.0.1"])
    try:

        def converse() -> list[bytes]:
            raw = socket.create_connection((server.host, server.port), timeout=10)
            raw.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 110\r\n")
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"STLS\r\n")
            reader.readline()
            secure = _client_context(tmp_path).wrap_socket(raw, server_hostname="localhost")
            secure.sendall(b"CAPA\r\nUSER alice\r\nSTLS\r\n")
            replies = secure.makefile("rb")
            lines = []
            while (line := replies.readline()) != b".\r\n":
                lines.append(line)
            lines += [replies.readline(), replies.readline()]
            secure.close()
            return lines

        lines = await deferToThread(converse)
    finally:
        await server.service.stopService()
    assert b"USER\r\n" in lines and b"STLS\r\n" not in lines
    assert lines[-2:] == [b"+OK send PASS\r\n", b"-ERR TLS is already active\r\n"]


# -- SIGHUP: the files are read in the thread pool ------------------------------------


def test_a_reload_is_read_in_the_thread_pool_and_handshakes_meanwhile_use_the_certificate_in_use(
    tmp_path: Path, logged: Logged
) -> None:
    """
    SIGHUP's reading of --tls-cert/--tls-key is handed to the thread pool;
    a handshake that starts meanwhile neither waits nor fails: it gets the
    certificate in use, and the renewed one once it is read.
    """
    key, certificate = _self_signed(tmp_path)
    old = _der(certificate)
    tls = ServerTLS(str(certificate), str(key))
    threads = ClockThreads(Clock())
    tls.run_slow_work_in(threads.as_reactor)
    _self_signed(tmp_path)  # renewed, same files
    reloaded = tls.reload()
    assert threads.handed_over == 1
    assert not reloaded.called
    assert _certificate_served(tls) == old
    assert result_of(threads.clock, reloaded) is None
    assert _certificate_served(tls) == _der(certificate) != old
    assert logged.texts("reload") == [f"reloaded {certificate}"]


def _unreadable(certificate: Path, key: Path) -> None:
    certificate.unlink()


def _not_pem(certificate: Path, key: Path) -> None:
    certificate.write_bytes(certificate.read_bytes().replace(b"-----BEGIN ", b"-----START "))


def _key_not_pem(certificate: Path, key: Path) -> None:
    key.write_bytes(b"not a key\n")


def _key_encrypted(certificate: Path, key: Path) -> None:
    """A key behind a passphrase: refused, never asked for on the terminal."""
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"passphrase")
    )
    key.write_bytes(encrypted)


def _key_tls_cannot_use(certificate: Path, key: Path) -> None:
    """An X25519 key: a key-agreement key, which no TLS certificate is signed with."""
    unusable = x25519.X25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    key.write_bytes(unusable)


def _damaged(certificate: Path, key: Path) -> None:
    pem = certificate.read_bytes().split(b"\n")
    certificate.write_bytes(b"\n".join([pem[0], b"AAAA", pem[-2], b""]))


def _key_of_another_certificate(certificate: Path, key: Path) -> None:
    _self_signed(_made(certificate.parent / "other"))[0].replace(key)


@pytest.mark.parametrize(
    "breakage,reason",
    [
        (_unreadable, "cannot read {certificate}: No such file or directory"),
        (_not_pem, "no PEM certificate in {certificate}"),
        (
            _damaged,
            "unreadable PEM certificate in {certificate}: error parsing asn1 value: "
            "ParseError {{ kind: UnexpectedTag {{ actual: Tag {{ value: 0, constructed: false, "
            "class: Universal }} }} }}",
        ),
        (_key_not_pem, "no PEM private key in {key}"),
        (
            _key_encrypted,
            "the private key in {key} is encrypted: pop3d needs it without a passphrase",
        ),
        (
            _key_tls_cannot_use,
            "the private key in {key} cannot be used with the certificate in {certificate}: "
            "Unsupported key type",
        ),
        (
            _key_of_another_certificate,
            "the private key in {key} cannot be used with the certificate in {certificate}: "
            "key values mismatch",
        ),
    ],
    ids=[
        "unreadable",
        "not-pem",
        "damaged-pem",
        "key-not-pem",
        "key-encrypted",
        "key-tls-cannot-use",
        "key-mismatch",
    ],
)
def test_a_broken_pair_keeps_the_certificate_in_use_and_is_logged_once_naming_the_file(
    tmp_path: Path,
    logged: Logged,
    breakage: Callable[[Path, Path], None],
    reason: str,
) -> None:
    key, certificate = _self_signed(tmp_path)
    old = _der(certificate)
    tls = ServerTLS(str(certificate), str(key))
    threads = ClockThreads(Clock())
    tls.run_slow_work_in(threads.as_reactor)
    breakage(certificate, key)
    result_of(threads.clock, tls.reload())
    assert [_certificate_served(tls) for _ in range(2)] == [old, old]
    assert logged.texts("reload") + logged.texts("keeping") == [
        f"keeping the previous {certificate}: " + reason.format(certificate=certificate, key=key)
    ]


def test_the_chain_after_the_certificate_is_served_and_the_key_may_share_its_file(
    tmp_path: Path,
) -> None:
    """
    ``--tls-cert`` holds the server's certificate, then the intermediate
    that signed it; the key may be in that same file.  A client that trusts
    only the root verifies the server: the intermediate came in the handshake.
    """
    root_key, root = make_certificate("pop3d test root", authority=True)
    intermediate_key, intermediate = make_certificate(
        "pop3d test intermediate", authority=True, issuer=(root_key, root)
    )
    server_key, server = make_certificate("localhost", issuer=(intermediate_key, intermediate))
    both = tmp_path / "server.pem"
    both.write_bytes(
        server.public_bytes(Encoding.PEM)
        + intermediate.public_bytes(Encoding.PEM)
        + server_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    tls = ServerTLS(str(both), str(both))
    trusting_the_root = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(root.public_bytes(Encoding.PEM))
    )
    assert _certificate_served(tls, trusting_the_root) == server.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    "breakage,reason",
    [
        (
            _key_of_another_certificate,
            "the private key in {key} cannot be used with the certificate in {certificate}: "
            "key values mismatch",
        ),
        (
            _key_encrypted,
            "the private key in {key} is encrypted: pop3d needs it without a passphrase",
        ),
    ],
    ids=["key-mismatch", "key-encrypted"],
)
def test_a_pair_that_cannot_be_used_is_refused_at_start_up_naming_the_files(
    tmp_path: Path, breakage: Callable[[Path, Path], None], reason: str
) -> None:
    key, certificate = _self_signed(tmp_path)
    breakage(certificate, key)
    with pytest.raises(usage.UsageError) as refused:
        parse_tls(str(certificate), str(key))
    assert str(refused.value) == "--tls-cert/--tls-key: " + reason.format(
        certificate=certificate, key=key
    )


def _certificate_served(
    tls: ServerTLS, client_options: IOpenSSLClientConnectionCreator | None = None
) -> bytes:
    """
    The certificate a client gets in an implicit TLS handshake now (in
    memory); the client verifies nothing unless given its ``client_options``.
    """
    server = tls_server_factory(Factory.forProtocol(Protocol), tls)
    client = TLSMemoryBIOFactory(
        client_options or CertificateOptions(), True, Factory.forProtocol(Protocol)
    )
    client_side, _, pump = connectedServerAndClient(
        lambda: server.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000)),
        lambda: client.buildProtocol(IPv4Address("TCP", "127.0.0.1", 995)),
    )
    pump.flush()
    certificate = client_side.getPeerCertificate()
    assert certificate is not None, "the handshake failed"
    return cast(bytes, certificate.to_cryptography().public_bytes(Encoding.DER))


def _der(certificate: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certificate.read_text())


def _made(directory: Path) -> Path:
    directory.mkdir()
    return directory
