"""
The server's certificate for STLS (RFC 2595), read from PEM files and read
again on demand (``twistd`` wires that to SIGHUP), so a renewed certificate
is used without a restart.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorThreads,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from pop3d.reloading import IReloadable, ReloadableFiles

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigurationError(ValueError):
    """A certificate or key that cannot be used; the message names the file."""


@implementer(IReloadable)
class ServerTLS:
    """
    ``certificate_path`` holds the server certificate, optionally followed by
    its chain; ``key_path`` the private key (both PEM; they may be the same
    file).  TLS 1.2 is the minimum (RFC 8314 section 4.1).

    The files are read at start-up (`TLSConfigurationError` if they cannot
    be used, the key not matching the certificate included) and again on
    `reload`, in the thread pool once `run_slow_work_in` gave one
    (`pop3d.reloading.ReloadableFiles`).  A handshake never waits for that
    reading: until the new pair is in use, it gets the one in use.  A pair
    that cannot be used is logged, naming the file, and the one in use kept.
    """

    def __init__(self, certificate_path: str, key_path: str) -> None:
        self.certificate_path = certificate_path
        self.key_path = key_path
        self._options = self._load()
        self._files = ReloadableFiles(
            certificate_path, self._load, self._use, (TLSConfigurationError,)
        )

    def run_slow_work_in(self, reactor: IReactorThreads) -> None:
        """Read the files again (`reload`) in ``reactor``'s thread pool."""
        self._files.threads = reactor

    def _load(self) -> CertificateOptions:
        """The pair in the files, its TLS context made (blocking file work)."""
        try:
            with open(self.certificate_path, "rb") as file:
                certificates = _PEM_CERTIFICATE.findall(file.read())
            with open(self.key_path, "rb") as file:
                key_pem = file.read()
        except OSError as error:
            raise TLSConfigurationError(f"cannot read {error.filename}: {error.strerror}") from None
        if not certificates:
            raise TLSConfigurationError(f"no PEM certificate in {self.certificate_path}")
        # cryptography's objects, not pyOpenSSL's: pyOpenSSL deprecates
        # passing its own X509 and PKey to a context.
        try:
            leaf, *chain = (x509.load_pem_x509_certificate(pem) for pem in certificates)
        except Exception as error:  # ValueError, as documented; any other is no certificate either
            # The parser's reason (it refuses some encodings OpenSSL takes),
            # which holds no secret: a certificate is public.
            raise TLSConfigurationError(
                f"unreadable PEM certificate in {self.certificate_path}: {error}"
            ) from None
        try:
            key = load_pem_private_key(key_pem, password=None)
        except TypeError:  # what cryptography raises for a key that needs a passphrase
            # Refused: a daemon has nobody to ask (OpenSSL would ask the terminal).
            raise TLSConfigurationError(
                f"the private key in {self.key_path} is encrypted: pop3d needs it without "
                "a passphrase"
            ) from None
        except Exception:  # ValueError, UnsupportedAlgorithm
            raise TLSConfigurationError(f"no PEM private key in {self.key_path}") from None
        options = CertificateOptions(
            # Twisted annotates these as pyOpenSSL's types; it hands them to
            # pyOpenSSL's Context, which takes cryptography's.
            privateKey=key,  # type: ignore[arg-type]
            certificate=leaf,  # type: ignore[arg-type]
            extraCertChain=chain,  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        try:
            # Made here, not at the first handshake: a key that does not
            # match is found now, and no handshake waits for the making.
            options.getContext()
        except (SSL.Error, TypeError) as error:  # TypeError: a kind of key TLS cannot use
            raise TLSConfigurationError(
                f"the private key in {self.key_path} cannot be used with the certificate in "
                f"{self.certificate_path}: {_reasons(error)}"
            ) from None
        return options

    def _use(self, options: CertificateOptions) -> None:
        self._options = options

    def reload(self) -> Deferred[None]:
        """
        `IReloadable` (SIGHUP): read the files again; fires once the new pair
        is in use, or the one in use kept (and the reason logged).
        """
        return self._files.read_again()

    def context_factory(self) -> CertificateOptions:
        """The pair in use, at once (even while the files are read again)."""
        return self._options


def _reasons(error: SSL.Error | TypeError) -> str:
    """OpenSSL's reasons (``key values mismatch``), without its library names."""
    stack = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return ", ".join(str(entry[-1]) for entry in stack) or str(error)


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentCertificate:
    """Makes each new TLS connection with the certificate loaded right now."""

    def __init__(self, tls: ServerTLS) -> None:
        self._tls = tls

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._tls.context_factory().getContext(), None)


@implementer(IStreamServerEndpoint)
class ImplicitTLSEndpoint:
    """
    Implicit TLS (RFC 8314 section 3.3) over any stream endpoint, with the
    certificate of a `ServerTLS`, so that a reload applies to new
    connections at once.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, tls: ServerTLS) -> None:
        self._wrapped = wrapped
        self._tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(tls_server_factory(protocolFactory, self._tls))


def tls_server_factory(factory: IProtocolFactory, tls: ServerTLS) -> TLSMemoryBIOFactory:
    """``factory`` behind implicit TLS with the current certificate of ``tls``."""
    return TLSMemoryBIOFactory(_CurrentCertificate(tls), False, factory)
