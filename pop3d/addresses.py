"""
Client addresses as transports and proxies give them: text that may name
an IP address.  One reading for every place that matches a client against
networks (trusted networks, a user's ``allow_nets``) or asks if it is local.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_address_of(host: str) -> IPAddress | None:
    """
    The IP address ``host`` names, without an IPv6 zone (``fe80::1%eth0``);
    an IPv4 client of a dual-stack IPv6 socket (``::ffff:192.0.2.10``) as
    its IPv4 address; None for anything else (a UNIX socket's path).
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(host: str | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``host`` is an IP address in one of ``networks``."""
    address = None if host is None else ip_address_of(host)
    return address is not None and any(address in network for network in networks)
