"""Outbound network policy: which addresses relay may deliver to (SPEC §4).

This module owns the outbound address check: `NetworkPolicy` refuses link-local
addresses (169.254.0.0/16 and fe80::/10, where cloud metadata services live) by
default, refuses `[server] deny_networks`, and lets `[server] allow_networks`
override both; loopback is allowed. An IPv4-mapped IPv6 address
(::ffff:169.254.169.254) is judged by its IPv4 form. The check runs on resolved
addresses: `PolicyResolver` wraps a resolver (aiohttp's ThreadedResolver, i.e.
getaddrinfo, by default) and drops refused addresses, raising `PolicyRefused`
when none remain; `relay.http1` connects only to the addresses it returned (no
second lookup). An IP-literal host is never looked up: `check_host` judges it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address

from relay.model import IPNetwork, ServerConfig

IPAddress = IPv4Address | IPv6Address

# Refused unless allowed (SPEC §4): link-local, home of the cloud metadata services
# at 169.254.169.254 (AWS, GCP, Azure, OpenStack) and of fe80:: neighbours.
LINK_LOCAL_NETWORKS: tuple[IPNetwork, ...] = (
    IPv4Network("169.254.0.0/16"),
    IPv6Network("fe80::/10"),
)
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def _unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 form of an IPv4-mapped IPv6 address (::ffff:a.b.c.d); others unchanged."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network(value: IPNetwork | str) -> IPNetwork:
    """A network from config or a CIDR string; an IPv4-mapped IPv6 network in its IPv4 form."""
    network = ipaddress.ip_network(value, strict=False) if isinstance(value, str) else value
    if isinstance(network, IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        ipv4 = int(network.network_address) & 0xFFFF_FFFF
        return IPv4Network((ipv4, network.prefixlen - 96))
    return network


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """The outbound address policy: built-in link-local refusal, `deny_networks`, `allow_networks`.

    `allow_networks` wins over both refusals; nothing else (loopback included) is refused.
    """

    deny_networks: tuple[IPNetwork, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "deny_networks", tuple(map(_network, self.deny_networks)))
        object.__setattr__(self, "allow_networks", tuple(map(_network, self.allow_networks)))

    @classmethod
    def of(
        cls,
        deny_networks: Iterable[IPNetwork | str] = (),
        allow_networks: Iterable[IPNetwork | str] = (),
    ) -> NetworkPolicy:
        """A policy from networks or CIDR strings ("10.0.0.1/8" as in config; bad: ValueError)."""
        return cls(tuple(map(_network, deny_networks)), tuple(map(_network, allow_networks)))

    @classmethod
    def from_server(cls, server: ServerConfig) -> NetworkPolicy:
        """The policy of a `[server]` table."""
        return cls.of(server.deny_networks, server.allow_networks)

    def refusal(self, address: str | IPAddress) -> str | None:
        """None when relay may connect to `address`, else a one-line reason naming the policy.

        A string that is not an IP address is refused (fail closed).
        """
        try:
            given = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        checked = _unmapped(given)
        shown = str(given) if checked is given else f"{given} (IPv4-mapped {checked})"
        # Allow matches the IPv4 form only, so allowing ::/0 cannot allow ::ffff:169.254.x.x;
        # deny matches either form (fail closed).
        if any(checked in network for network in self.allow_networks):
            return None
        for network in self.deny_networks:
            if checked in network or given in network:
                return f"{shown} is in server.deny_networks {network}"
        if any(checked in network for network in LINK_LOCAL_NETWORKS):
            return (
                f"{shown} is link-local (refused by default; allow it with server.allow_networks)"
            )
        return None


class PolicyRefused(OSError):
    """Every address of a host was refused by the outbound network policy.

    An `OSError` (as a failed lookup is) whose `strerror` and str() are the reason.
    """

    def __init__(self, host: str, reasons: Sequence[str]) -> None:
        more = len(reasons) - 1
        reason = f"outbound network policy refused every address of {host}: {reasons[0]}"
        if more:
            reason += f" (and {more} more refused address{'es' if more > 1 else ''})"
        super().__init__(errno.EACCES, reason)
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class PolicyResolver(AbstractResolver):
    """An aiohttp resolver that returns only the addresses `policy` allows.

    `inner` does the lookup (default `aiohttp.ThreadedResolver()`, which needs a running
    loop). `close` closes `inner`; a `TCPConnector` given a resolver never closes it.
    """

    def __init__(self, policy: NetworkPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """`inner`'s answer without refused addresses; PolicyRefused if it had only those."""
        resolved = await self._inner.resolve(host, port, family=family)
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for result in resolved:
            reason = self.policy.refusal(result["host"])
            if reason is None:
                allowed.append(result)
            else:
                reasons.append(reason)
        if reasons and not allowed:
            raise PolicyRefused(host, reasons)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def check_host(host: str, policy: NetworkPolicy) -> str | None:
    """The refusal reason for an IP-literal host; None if allowed, or a hostname (which
    `PolicyResolver` checks once resolved). "IP literal" is aiohttp's own test
    (`helpers.is_ip_address`, as yarl parses URLs), so legacy forms such as 2852039166
    count as literals and, not being addresses `ipaddress` accepts, are refused."""
    if not is_ip_address(host):
        return None
    reason = policy.refusal(host)
    return None if reason is None else f"outbound network policy: {reason}"
