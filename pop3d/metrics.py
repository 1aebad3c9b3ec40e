"""
Prometheus metrics of a POP3 server (``--metrics ENDPOINT``).

`Metrics` holds the instruments, on a registry of its own (not
prometheus_client's global one, so that several factories in one process
do not collide).  Pass one as ``POP3Factory(metrics=...)``; without one
nothing is counted and nothing costs.  `metrics_site` serves a registry
over HTTP in the Prometheus text format.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from pop3d.logformat import method_token
from pop3d.service import POP3Service
from pop3d.wire import ResponseCode, Verb

#: Latency buckets in seconds: a login or an UPDATE takes milliseconds to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REPLY_CODES: list[tuple[bool, ResponseCode | None]] = [(True, None), (False, None)] + [
    (False, code) for code in ResponseCode
]


def _reply_code(ok: bool, code: ResponseCode | None) -> str:
    if code is not None:
        return code.value
    return "ok" if ok else "err"


class Metrics:
    """
    The counters, gauges and histograms of one server, registered on
    ``registry`` (a new `CollectorRegistry` by default).  The driver and
    the protocol call the methods below where things happen.

    With ``tally`` (the default) counts are kept in a plain dictionary and
    added to the instruments when the registry is collected (or on
    `flush`): cheap on every command.  Without it each count goes to its
    instrument at once, as a worker process must (`workers_registry`: the
    parent reads the workers' values, it never collects theirs).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, tally: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # First, so that a collection flushes before it reads the instruments.
        r.register(_FlushFirst(self))
        self.sessions_active = Gauge(
            "pop3d_sessions_active",
            "Connections being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions = Counter("pop3d_sessions", "Connections served.", registry=r)
        self.logins = Counter(
            "pop3d_logins",
            "Login attempts by method and result (ok, credentials, in-use, ...).",
            ["method", "result"],
            registry=r,
        )
        self.commands = Counter(
            "pop3d_commands",
            "Command lines by verb (unknown: not a POP3 verb).",
            ["verb"],
            registry=r,
        )
        self.replies = Counter(
            "pop3d_replies",
            "Status replies by response code (ok, err, or the RFC 2449/3206 code).",
            ["code"],
            registry=r,
        )
        self.message_octets = Counter(
            "pop3d_message_octets_sent",
            "Octets of messages sent by RETR and TOP.",
            registry=r,
        )
        self.retrieved = Counter(
            "pop3d_messages_retrieved", "Messages retrieved whole (RETR).", registry=r
        )
        self.deleted = Counter(
            "pop3d_messages_deleted",
            "Messages marked deleted (DELE) in ended sessions.",
            registry=r,
        )
        self.lock_conflicts = Counter(
            "pop3d_lock_conflicts",
            "Logins refused because the maildrop was in use (IN-USE).",
            registry=r,
        )
        self.login_seconds = Histogram(
            "pop3d_login_seconds",
            "Time from a login command to its answer (checking and opening the maildrop).",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.update_seconds = Histogram(
            "pop3d_update_seconds",
            "Time the store takes for the UPDATE state (removing, marking seen).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tls_sessions = Counter(
            "pop3d_tls_logins",
            "Successful logins over TLS, by TLS version.",
            ["version"],
            registry=r,
        )
        self.tls_handshakes = Counter(
            "pop3d_tls_handshakes",
            "TLS handshakes completed (STLS and implicit TLS), by TLS version.",
            ["version"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "pop3d_tls_handshake_failures",
            "TLS handshakes that failed (no common version or cipher, a client that"
            " refused the certificate, ...).",
            registry=r,
        )
        self.auth_seconds = Histogram(
            "pop3d_auth_seconds",
            "Time the credential check of a login takes (password hash, lookup), by result.",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_open_seconds = Histogram(
            "pop3d_store_open_seconds",
            "Time the store takes to open a maildrop (at login: lock, listing) or a"
            " message (RETR, TOP; one read ahead: the check that it is unchanged).",
            ["object"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Counting is on every command's path, and an increment of a
        # prometheus_client counter takes a lock: the counts are tallied in
        # a plain dictionary (by labelled child, looked up once here) and
        # added to the counters when the registry is collected (a scrape)
        # or `flush` is called (the workers, every FLUSH_INTERVAL).
        self._pending: MutableMapping[Counter | Gauge, int] = (
            defaultdict(int) if tally else _AtOnce()
        )
        self._verb_counters = {
            verb.value.encode("ascii"): self.commands.labels(verb.value) for verb in Verb
        }
        self._unknown_verb = self.commands.labels("unknown")
        self._reply_counters = {key: self.replies.labels(_reply_code(*key)) for key in _REPLY_CODES}
        self._login_counters: dict[tuple[str, str], Counter] = {}
        self._login_ok = self.login_seconds.labels("ok")
        self._login_failed = self.login_seconds.labels("failed")
        self._auth_ok = self.auth_seconds.labels("ok")
        self._auth_failed = self.auth_seconds.labels("failed")
        self._maildrop_open = self.store_open_seconds.labels("maildrop")
        self._message_open = self.store_open_seconds.labels("message")

    def flush(self) -> None:
        """Adds the tallied counts to the prometheus_client instruments."""
        pending = self._pending
        if isinstance(pending, defaultdict):
            self._pending = defaultdict(int)
            for instrument, count in pending.items():
                instrument.inc(count)

    # -- what the factory, protocol and driver report -------------------------

    def session_started(self) -> None:
        pending = self._pending
        pending[self.sessions] += 1
        pending[self.sessions_active] += 1

    def session_ended(self) -> None:
        self._pending[self.sessions_active] -= 1

    def command(self, line: bytes) -> None:
        word = line.partition(b" ")[0]
        counter = self._verb_counters.get(word) or self._verb_counters.get(word.upper())
        self._pending[counter or self._unknown_verb] += 1

    def reply(self, ok: bool, code: ResponseCode | None) -> None:
        counter = self._reply_counters.get((ok, code))
        if counter is None:  # a +OK with a code: not sent today
            counter = self.replies.labels(_reply_code(ok, code))
        self._pending[counter] += 1

    def login(self, method: str, result: str, seconds: float, tls_version: str | None) -> None:
        """A login by ``method`` (the session's: ``USER``, ``SASL PLAIN``) ended in ``result``."""
        key = (method, result)
        counter = self._login_counters.get(key)
        if counter is None:
            # The method as the logs write it (USER, APOP, SASL/PLAIN).
            token = method_token(method)
            counter = self._login_counters[key] = self.logins.labels(token, result)
        pending = self._pending
        pending[counter] += 1
        (self._login_ok if result == "ok" else self._login_failed).observe(seconds)
        if result == "in-use":
            pending[self.lock_conflicts] += 1
        if result == "ok" and tls_version is not None:
            pending[self.tls_sessions.labels(tls_version)] += 1

    def login_timing(self, timing: LoginTiming, result: str, now: float) -> None:
        """
        How long the checker and the store took for a login that ended in
        ``result`` at ``now``, as `TimingRealm` noted in ``timing``.
        """
        checked = timing.checked
        if checked is None:
            # The checker refused (or failed): the realm was never asked.
            self._auth_failed.observe(now - timing.started)
            return
        self._auth_ok.observe(checked - timing.started)
        opened = timing.opened if timing.opened is not None else now
        self._maildrop_open.observe(opened - checked)

    def message_opened(self, seconds: float) -> None:
        """The store took ``seconds`` to open a message (RETR, TOP), or to fail to."""
        self._message_open.observe(seconds)

    def tls_handshake(self, version: str) -> None:
        """A TLS handshake completed (STLS or implicit TLS) with ``version`` (``TLSv1.3``)."""
        self._pending[self.tls_handshakes.labels(version)] += 1

    def tls_handshake_failed(self) -> None:
        self._pending[self.tls_handshake_failures] += 1

    def session_counts(self, retrieved: int, deleted: int, octets: int) -> None:
        pending = self._pending
        if retrieved:
            pending[self.retrieved] += retrieved
        if deleted:
            pending[self.deleted] += deleted
        if octets:
            pending[self.message_octets] += octets

    def update(self, seconds: float) -> None:
        self.update_seconds.observe(seconds)


class LoginTiming:
    """
    The mind of a login (``Portal.login``'s second argument) while metrics
    are kept: when the login started, and, noted by `TimingRealm`, when the
    checker had accepted the credentials and when the maildrop was open.
    ``context`` is the mind the realm inside `TimingRealm` gets (the
    login's `pop3d.userdb.LoginContext`).
    """

    __slots__ = ("checked", "context", "opened", "started")

    def __init__(self, started: float, context: object = None) -> None:
        self.started = started
        self.context = context
        self.checked: float | None = None
        self.opened: float | None = None


@implementer(IRealm)
class TimingRealm:
    """
    ``realm``, noting in a `LoginTiming` mind when it is asked (the checker
    has accepted the credentials: the end of the check) and when the
    avatar is ready (the maildrop is open), on ``clock``.  Outermost, so
    that what it times is the checker and everything the realm does.
    """

    def __init__(self, realm: IRealm, clock: IReactorTime) -> None:
        self._realm = realm
        self._clock = clock

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Deferred[Any]:
        if not isinstance(mind, LoginTiming):
            return maybeDeferred(self._realm.requestAvatar, avatarId, mind, *interfaces)
        mind.checked = self._clock.seconds()
        opening: Deferred[Any] = maybeDeferred(
            self._realm.requestAvatar, avatarId, mind.context, *interfaces
        )

        def opened(result: object) -> object:
            mind.opened = self._clock.seconds()
            return result

        return opening.addBoth(opened)


class _AtOnce(MutableMapping["Counter | Gauge", int]):
    """Tallies nothing: ``tallies[instrument] += n`` increments ``instrument`` by n."""

    def __getitem__(self, instrument: Counter | Gauge) -> int:
        return 0

    def __setitem__(self, instrument: Counter | Gauge, count: int) -> None:
        instrument.inc(count)

    def __delitem__(self, instrument: Counter | Gauge) -> None:
        pass

    def __iter__(self) -> Iterator[Counter | Gauge]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _FlushFirst(Collector):
    """
    Registered before the instruments (a registry collects in the order of
    registration): yields nothing, but flushes the tallies of ``metrics``
    so that a scrape sees every count.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return []


class MetricsPage(Resource):
    """
    ``registry`` in the Prometheus text format, or OpenMetrics when the
    scraper asks for it (Accept).  Rendered in the reactor thread, where
    the counts are made: prometheus_client's own MetricsResource runs in a
    thread (WSGI) and fails on a ``unix:`` endpoint (no host).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)


def metrics_site(registry: CollectorRegistry) -> Site:
    """An HTTP site serving ``registry`` at ``/metrics`` (and at ``/``)."""
    root = Resource()
    resource = MetricsPage(registry)
    root.putChild(b"metrics", resource)
    root.putChild(b"", resource)
    return Site(root)


def metrics_service(endpoint: IStreamServerEndpoint, registry: CollectorRegistry) -> POP3Service:
    """
    A service named ``metrics`` that serves ``registry`` on ``endpoint``
    while it runs (its ``when_listening`` tells the port).
    """
    # Not "listening on": that is how scripts find the POP3 port in the log.
    service = POP3Service(
        [endpoint], metrics_site(registry), announcement="pop3d metrics at http://{address}/metrics"
    )
    service.setName("metrics")  # type: ignore[no-untyped-call]
    return service


#: Where prometheus_client's multiprocess mode keeps each process's values.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"


class RemoveOnStop(Service):
    """Removes ``directory`` (the workers' metrics files) when the server stops."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        shutil.rmtree(self._directory, ignore_errors=True)


def workers_registry(directory: str) -> CollectorRegistry:
    """
    A registry summing what the workers (started with
    ``PROMETHEUS_MULTIPROC_DIR=directory`` in their environment) count.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def forget_process(directory: str, pid: int) -> None:
    """
    Process ``pid``, a worker counting into ``directory``, has exited: its
    live gauges (sessions active) leave the sum; its counters stay in it.
    """
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
