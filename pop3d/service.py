"""
The service that listens on endpoints for a POP3Factory.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pop3d.protocol import describe_address


class POP3Service(Service):
    """
    Listens on every endpoint with one factory.  Unlike a bare
    StreamServerEndpointService, a failure to listen is raised from
    startService (so twistd does not run on with nothing listening), and
    `when_listening` tells which ports were bound (useful with port 0).
    It listens in ``privilegedStartService`` when that is called (twistd
    does, before ``--uid``/``--gid`` drop root), else in ``startService``.
    """

    log = Logger()

    def __init__(
        self,
        endpoints: Sequence[IStreamServerEndpoint],
        factory: IProtocolFactory,
        *,
        announcement: str = "pop3d listening on {address}",
    ) -> None:
        self._endpoints = list(endpoints)
        # The log line for each port (scripts wait for "listening on").
        self._announcement = announcement
        self._factory = factory
        self._ports: list[IListeningPort] = []
        self._listening: Deferred[list[IListeningPort]] | None = None

    def privilegedStartService(self) -> None:
        # twistd calls this before it gives up root (--uid/--gid): ports
        # below 1024 are bound here.
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        attempts = [
            endpoint.listen(self._factory).addCallback(self._listening_on)
            for endpoint in self._endpoints
        ]
        failed_at_once: list[Failure] = []

        def note(failure: Failure) -> Failure:
            failed_at_once.append(failure)
            return failure

        for attempt in attempts:
            attempt.addErrback(note)
        self._listening = gatherResults(attempts, consumeErrors=True).addCallback(
            lambda _: list(self._ports)
        )
        if failed_at_once:
            # The usual failures (port in use, permission denied) are known
            # at once: raise them, so that twistd stops instead of running on
            # with nothing listening.
            self._listening.addErrback(lambda _: None)
            failed_at_once[0].raiseException()

    def _listening_on(self, port: IListeningPort) -> None:
        self._ports.append(port)
        self.log.info(self._announcement, address=describe_address(port.getHost()))

    def when_listening(self) -> Deferred[list[IListeningPort]]:
        """Fires with the listening ports once all endpoints listen."""
        assert self._listening is not None, "the service is not started"
        return self._listening

    def stopService(self) -> Deferred[None]:
        super().stopService()
        ports, self._ports = self._ports, []
        stopped = [maybeDeferred(port.stopListening) for port in ports]
        return gatherResults(stopped).addCallback(lambda _: None)
