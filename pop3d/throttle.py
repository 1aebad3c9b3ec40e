"""
Slowing down password guessing, without stranding real clients.

Every failed login is answered only after a delay (like Dovecot's
auth_failure_delay), and the delay grows for an address that keeps failing,
as Dovecot's auth penalty does: 2, 4, 8, then at most 15 seconds, short of
the time most clients wait for a reply.  A client that retries the *same*
wrong credentials (a mail client polling with a stale saved password, or
many such clients behind one NAT address) does not raise the delay: only a
new guess does.  Addresses of trusted networks (a webmail host, a proxy that
throttles on its own) are answered at once.

The wait is a timer on the injected clock, so it never holds up other
sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

# IPNetwork is re-exported: the options and the factory name it from here.
from pop3d.addresses import IPNetwork as IPNetwork
from pop3d.addresses import in_networks, ip_address_of
from pop3d.credchecks import as_bytes

#: Addresses remembered at most; the least recently failing are forgotten first.
MAX_REMEMBERED_PEERS = 10_000

#: Dovecot's AUTH_PENALTY_MAX_SECS: the longest a failed login waits.
MAXIMUM_DELAY = 15.0

#: Credentials per address recognised when retried (Dovecot keeps 10 too).
REMEMBERED_CREDENTIALS = 10

#: Bytes of the keyed digest kept per credentials: a chance collision
#: (a new guess taken for a retry) is one in 2**64.
FINGERPRINT_SIZE = 8

#: IPv6 addresses are counted per /64, the usual size of one site's LAN, so
#: a guesser cannot start afresh from each of its 2**64 addresses.
IPV6_PREFIX = 64


class TrustedNetworks:
    """
    Networks whose clients are exempt from the per-address defences (like
    Dovecot's login_trusted_networks).  An IPv4 client reached over an IPv6
    socket (``::ffff:192.0.2.10``) is matched as its IPv4 address; a host
    that is no IP address (a UNIX socket) is never trusted.
    """

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(network) for network in networks
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        if not self.networks or not isinstance(host, str):
            return False
        return in_networks(host, self.networks)


@dataclass(slots=True)
class _Record:
    """What is known of one address's recent failures."""

    #: How many distinct guesses raised its delay (not beyond the maximum).
    level: int
    #: When it last failed with credentials not among ``recent`` (a new
    #: guess): it is forgotten ``forget_after`` later.
    last_guess: float
    #: Fingerprints of its latest failed credentials, oldest first.
    recent: list[bytes] = field(default_factory=list)


class CredentialFingerprints:
    """
    Recognises credentials seen before without keeping any secret: a keyed
    digest (HMAC-SHA256 with a key made for this process and never stored)
    of the user name and password, truncated.  Only credentials that carry
    the password itself can be recognised (USER/PASS, SASL PLAIN and LOGIN);
    APOP, CRAM-MD5 and SCRAM answer a challenge that differs in every
    session, so a retry of those looks like a new guess.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def __call__(self, credentials: ICredentials | None) -> bytes | None:
        """The fingerprint of ``credentials``, or None if they cannot be recognised."""
        if credentials is None or not IUsernamePassword.providedBy(credentials):
            return None
        username = as_bytes(credentials.username)
        password = as_bytes(credentials.password)
        digest = hmac.new(self._key, digestmod=hashlib.sha256)
        # The name's length first: ("ab", "c") and ("a", "bc") differ.
        digest.update(len(username).to_bytes(4, "big"))
        digest.update(username)
        digest.update(password)
        return digest.digest()[:FINGERPRINT_SIZE]


class FailureDelay:
    """
    ``base`` seconds for an address's first failed login, doubling with each
    further failure with credentials not among its last few, up to
    ``maximum``; a failure that retries recent credentials waits as long as
    the address's current delay, without raising it.  An address that made no
    new guess for ``forget_after`` seconds starts again from ``base``.
    A ``base`` of 0 turns the delay off; clients in ``trusted`` networks are
    never delayed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 2.0,
        maximum: float = MAXIMUM_DELAY,
        forget_after: float = 900.0,
        trusted: Iterable[IPNetwork] = (),
        fingerprints: CredentialFingerprints | None = None,
    ) -> None:
        self._clock = clock
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self.trusted = TrustedNetworks(trusted)
        self._fingerprints = fingerprints or CredentialFingerprints()
        self._peers: OrderedDict[str, _Record] = OrderedDict()

    def trusts(self, peer_host: str) -> bool:
        """Whether ``peer_host`` is in a trusted network (exempt from per-address limits)."""
        return peer_host in self.trusted

    def delay_for_failure(self, peer_host: str, credentials: ICredentials | None = None) -> float:
        """
        Record a failed login from ``peer_host`` with ``credentials`` (None:
        not known); how long to wait to answer it.
        """
        if self.base <= 0 or self.trusts(peer_host):
            return 0.0
        now = self._clock.seconds()
        key = _penalty_key(peer_host)
        record = self._peers.pop(key, None)
        if record is None or now - record.last_guess > self.forget_after:
            record = _Record(0, now)
        fingerprint = self._fingerprints(credentials)
        retried = fingerprint is not None and fingerprint in record.recent
        if not retried:
            # A guesser kept at the maximum is remembered as long as it guesses.
            record.last_guess = now
            if record.level == 0 or self._delay(record.level) < self.maximum:
                record.level += 1
        if fingerprint is not None:
            if retried:
                record.recent.remove(fingerprint)
            record.recent.append(fingerprint)
            del record.recent[:-REMEMBERED_CREDENTIALS]
        self._peers[key] = record
        while len(self._peers) > MAX_REMEMBERED_PEERS:
            self._peers.popitem(last=False)
        return self._delay(record.level)

    def _delay(self, level: int) -> float:
        return float(min(self.base * 2 ** (level - 1), self.maximum))

    def wait(self, seconds: float) -> Deferred[None]:
        if seconds <= 0:
            return succeed(None)
        return deferLater(self._clock, seconds, lambda: None)


def _penalty_key(host: str) -> str:
    """The address failures are counted under: IPv4 as is, IPv6 by its /64."""
    address = ip_address_of(host)
    if address is None:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
