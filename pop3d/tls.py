"""
The server's certificate for STLS (RFC 2595), read from PEM files and read
again on demand (``twistd`` wires that to SIGHUP), so a renewed certificate
is used without a restart.
"""

from __future__ import annotations

import re

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

log = Logger()

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigurationError(ValueError):
    """A certificate or key that cannot be used."""


class ServerTLS:
    """
    ``certificate_path`` holds the server certificate, optionally followed by
    its chain; ``key_path`` the private key (both PEM; they may be the same
    file).  TLS 1.2 is the minimum (RFC 8314 section 4.1).
    """

    def __init__(self, certificate_path: str, key_path: str) -> None:
        self.certificate_path = certificate_path
        self.key_path = key_path
        self._options = self._load()

    def _load(self) -> CertificateOptions:
        try:
            with open(self.certificate_path, "rb") as file:
                certificates = _PEM_CERTIFICATE.findall(file.read())
            with open(self.key_path, "rb") as file:
                key = KeyPair.load(file.read(), format=1)  # FILETYPE_PEM
        except OSError as error:
            raise TLSConfigurationError(f"cannot read {error.filename}: {error.strerror}") from None
        except Exception as error:  # OpenSSL's errors are of many types
            raise TLSConfigurationError(f"cannot load the private key: {error}") from None
        if not certificates:
            raise TLSConfigurationError(f"no PEM certificate in {self.certificate_path}")
        try:
            leaf, *chain = (Certificate.loadPEM(pem) for pem in certificates)
            return CertificateOptions(
                privateKey=key.original,
                certificate=leaf.original,
                extraCertChain=[c.original for c in chain],
                raiseMinimumTo=TLSVersion.TLSv1_2,
            )
        except Exception as error:
            raise TLSConfigurationError(f"unusable certificate or key: {error}") from None

    def reload(self) -> None:
        """Read the files again; on failure keep the old ones and log why."""
        try:
            self._options = self._load()
        except TLSConfigurationError as error:
            log.error("keeping the previous TLS certificate: {error}", error=error)
        else:
            log.info("TLS certificate reloaded from {path}", path=self.certificate_path)

    def context_factory(self) -> CertificateOptions:
        return self._options


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
