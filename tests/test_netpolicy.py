"""Outbound network policy (SPEC §4): link-local refused unless allowed, deny/allow networks.

The resolver tests use a fake inner resolver; the end-to-end tests send with relay's
own HTTP client (`relay.http1`) to a real server on 127.0.0.1. No traffic goes
anywhere else: every connection the client opens is recorded before it is made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from relay.http1 import Client, PolicyRefusal
from relay.model import Address, ServerConfig
from relay.netpolicy import NetworkPolicy, PolicyRefused, PolicyResolver, check_host

from conftest import Receiver

DEFAULT = NetworkPolicy.of()
LINK_LOCAL_ADVICE = "is link-local (refused by default; allow it with server.allow_networks)"


# --- NetworkPolicy.refusal -----------------------------------------------------


def test_metadata_address_is_refused_by_default() -> None:
    """169.254.169.254 (cloud metadata) is refused, and the reason says how to allow it."""
    assert DEFAULT.refusal("169.254.169.254") == f"169.254.169.254 {LINK_LOCAL_ADVICE}"
    assert (
        DEFAULT.refusal(ipaddress.ip_address("169.254.0.1")) == f"169.254.0.1 {LINK_LOCAL_ADVICE}"
    )


@pytest.mark.parametrize("address", ["fe80::1", "fe80::1%eth0", "febf:ffff::1"])
def test_ipv6_link_local_is_refused_by_default(address: str) -> None:
    """fe80::/10 is refused, scoped (fe80::1%eth0, as getaddrinfo returns it) or not."""
    assert DEFAULT.refusal(address) == f"{address} {LINK_LOCAL_ADVICE}"


def test_ipv4_mapped_link_local_is_refused() -> None:
    """::ffff:169.254.169.254 reaches the metadata service too: refused, judged as IPv4."""
    reason = DEFAULT.refusal("::ffff:169.254.169.254")
    assert reason == f"::ffff:a9fe:a9fe (IPv4-mapped 169.254.169.254) {LINK_LOCAL_ADVICE}"
    assert DEFAULT.refusal("::ffff:a9fe:a9fe") == reason


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "10.0.0.1", "2001:db8::1"]
)
def test_loopback_and_other_addresses_are_allowed_by_default(address: str) -> None:
    """Only link-local is refused by default: loopback (local targets) and the rest are allowed."""
    assert DEFAULT.refusal(address) is None


def test_deny_networks_refuses_and_names_the_network() -> None:
    """An address in server.deny_networks is refused with the matching network named."""
    policy = NetworkPolicy.of(deny_networks=["10.0.0.0/8", "fd00::/8"])
    assert policy.refusal("10.1.2.3") == "10.1.2.3 is in server.deny_networks 10.0.0.0/8"
    assert policy.refusal("fd12::3") == "fd12::3 is in server.deny_networks fd00::/8"
    assert policy.refusal("::ffff:10.1.2.3") == (
        "::ffff:a01:203 (IPv4-mapped 10.1.2.3) is in server.deny_networks 10.0.0.0/8"
    )
    assert policy.refusal("192.168.1.1") is None


def test_deny_networks_can_refuse_loopback() -> None:
    """An operator can refuse loopback targets with deny_networks."""
    policy = NetworkPolicy.of(deny_networks=["127.0.0.0/8", "::1/128"])
    assert policy.refusal("127.0.0.1") == "127.0.0.1 is in server.deny_networks 127.0.0.0/8"
    assert policy.refusal("::1") == "::1 is in server.deny_networks ::1/128"


def test_allow_networks_overrides_the_builtin_link_local_refusal() -> None:
    """allow_networks lets exactly the allowed link-local addresses through."""
    policy = NetworkPolicy.of(allow_networks=["169.254.169.254/32", "fe80::1/128"])
    assert policy.refusal("169.254.169.254") is None
    assert policy.refusal("::ffff:169.254.169.254") is None
    assert policy.refusal("fe80::1") is None
    assert policy.refusal("169.254.1.1") == f"169.254.1.1 {LINK_LOCAL_ADVICE}"
    assert policy.refusal("fe80::2") == f"fe80::2 {LINK_LOCAL_ADVICE}"


def test_allow_networks_overrides_deny_networks() -> None:
    """allow wins over deny, even when the denied network is the more specific one."""
    policy = NetworkPolicy.of(deny_networks=["10.9.0.0/16"], allow_networks=["10.0.0.0/8"])
    assert policy.refusal("10.9.1.1") is None
    wider = NetworkPolicy.of(deny_networks=["10.0.0.0/8"], allow_networks=["10.9.0.0/16"])
    assert wider.refusal("10.9.1.1") is None
    assert wider.refusal("10.1.1.1") == "10.1.1.1 is in server.deny_networks 10.0.0.0/8"


def test_ipv4_mapped_networks_in_config_mean_their_ipv4_form() -> None:
    """A network written as ::ffff:a.b.c.d/n in config matches a.b.c.d/(n-96) both ways."""
    policy = NetworkPolicy.of(
        deny_networks=["::ffff:10.0.0.0/104"], allow_networks=["::ffff:169.254.169.254/128"]
    )
    assert policy.deny_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.refusal("10.1.2.3") == "10.1.2.3 is in server.deny_networks 10.0.0.0/8"
    assert policy.refusal("169.254.169.254") is None


def test_allowing_all_of_ipv6_does_not_allow_mapped_link_local() -> None:
    """allow_networks ::/0 allows IPv6 targets, not ::ffff:169.254.169.254 (IPv4 in disguise)."""
    policy = NetworkPolicy.of(allow_networks=["::/0"])
    assert policy.refusal("fe80::1") is None
    assert policy.refusal("::ffff:169.254.169.254") is not None


def test_something_that_is_not_an_address_is_refused() -> None:
    """A resolver answer that is not an IP address is refused rather than trusted."""
    assert DEFAULT.refusal("metadata.internal") == "'metadata.internal' is not an IP address"


def test_policy_from_the_server_table() -> None:
    """The policy of [server] uses its deny_networks and allow_networks."""
    server = ServerConfig(
        listen=Address("127.0.0.1", 0), admin=Address("127.0.0.1", 0), admin_token="",
        journal=Path("relay.db"), sync="full", retention_s=1.0, max_body_bytes=1,
        read_timeout_s=1.0, idle_timeout_s=1.0, shutdown_grace_s=1.0, tls_cert=None,
        tls_key=None, deny_networks=(ipaddress.ip_network("10.0.0.0/8"),),
        allow_networks=(ipaddress.ip_network("169.254.169.254/32"),),
    )  # fmt: skip
    policy = NetworkPolicy.from_server(server)
    assert policy.refusal("10.0.0.1") == "10.0.0.1 is in server.deny_networks 10.0.0.0/8"
    assert policy.refusal("169.254.169.254") is None


# --- check_host -----------------------------------------------------------------


def check_url(url: str, policy: NetworkPolicy) -> str | None:
    """check_host on a URL's host, as the client parses it."""
    return check_host(URL(url).raw_host or "", policy)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://[fe80::1]:8080/x", "fe80::1"),
        ("https://[fe80::1%25eth0]/x", "fe80::1%25eth0"),
    ],
)
def test_ip_literal_urls_are_checked(url: str, address: str) -> None:
    """A target URL with a link-local IP literal is refused with the policy's reason."""
    assert check_url(url, DEFAULT) == f"outbound network policy: {address} {LINK_LOCAL_ADVICE}"


def test_ip_literal_url_with_mapped_address_is_checked() -> None:
    """http://[::ffff:169.254.169.254]/ is refused like http://169.254.169.254/."""
    reason = check_url("http://[::ffff:169.254.169.254]/", DEFAULT)
    assert reason is not None
    assert "IPv4-mapped 169.254.169.254" in reason


def test_ip_literal_url_in_deny_networks_is_checked() -> None:
    """deny_networks applies to IP-literal URLs too."""
    policy = NetworkPolicy.of(deny_networks=["10.0.0.0/8"])
    assert check_url("http://10.1.2.3:9000/hook", policy) == (
        "outbound network policy: 10.1.2.3 is in server.deny_networks 10.0.0.0/8"
    )


def test_non_canonical_ipv4_literal_is_refused() -> None:
    """A legacy numeric host aiohttp treats as an IP literal (127.1, 2852039166) is refused."""
    assert check_url("http://2852039166/", DEFAULT) is not None
    assert check_url("http://169.254.169.254./", DEFAULT) is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]:8080/hook",
        "https://chat.example/hook",
        "http://metadata.internal/latest",
        "http://0xa9fea9fe/",  # not an IP literal to aiohttp: it goes to the resolver
    ],
)
def test_allowed_literals_and_hostnames_pass_check_url(url: str) -> None:
    """Allowed IP literals pass; hostnames are left to the resolver, which checks addresses."""
    assert check_url(url, DEFAULT) is None


# --- PolicyResolver with a fake inner resolver ------------------------------------


class FakeResolver(AbstractResolver):
    """Answers from a table of host → addresses; records every lookup; never touches DNS."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[tuple[str, int, int]] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append((host, port, family))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        self.closed = True


MIXED = ["169.254.169.254", "10.0.0.5", "127.0.0.1", "fe80::1%eth0", "::1"]


async def test_resolver_returns_only_allowed_addresses() -> None:
    """A host resolving to allowed and refused addresses is reached only at the allowed ones."""
    inner = FakeResolver({"mixed.internal": MIXED})
    resolver = PolicyResolver(NetworkPolicy.of(deny_networks=["10.0.0.0/8"]), inner)
    results = await resolver.resolve("mixed.internal", 8443, family=socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["127.0.0.1", "::1"]
    assert all(r["port"] == 8443 and r["hostname"] == "mixed.internal" for r in results)
    assert inner.lookups == [("mixed.internal", 8443, socket.AF_UNSPEC)]


async def test_resolver_refuses_a_host_with_only_refused_addresses() -> None:
    """A host resolving only to refused addresses fails with the policy's reason."""
    inner = FakeResolver({"metadata.internal": ["169.254.169.254", "fe80::1"]})
    resolver = PolicyResolver(DEFAULT, inner)
    with pytest.raises(PolicyRefused) as caught:
        await resolver.resolve("metadata.internal", 80)
    expected = (
        "outbound network policy refused every address of metadata.internal: "
        f"169.254.169.254 {LINK_LOCAL_ADVICE} (and 1 more refused address)"
    )
    assert str(caught.value) == expected
    assert caught.value.strerror == expected
    assert isinstance(caught.value, OSError)


async def test_resolver_passes_lookup_failures_and_close_through() -> None:
    """An unknown host fails as a DNS error, not a policy refusal; closing closes the inner one."""
    inner = FakeResolver({})
    resolver = PolicyResolver(DEFAULT, inner)
    with pytest.raises(socket.gaierror):
        await resolver.resolve("nowhere.internal", 80)
    await resolver.close()
    assert inner.closed


# --- end to end through relay's HTTP client ---------------------------------------


@pytest.fixture
async def receiver(receivers: Callable[[], Awaitable[Receiver]]) -> Receiver:
    """One real HTTP target on 127.0.0.1 (port chosen by the OS)."""
    return await receivers()


@pytest.fixture
async def connected(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The address of every connection the client opens, recorded before it is opened."""
    addresses: list[str] = []
    loop = asyncio.get_running_loop()
    real = loop.sock_connect

    async def recording(sock: socket.socket, address: Any) -> None:
        addresses.append(str(address[0]))
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", recording)
    return addresses


async def post(client: Client, url: str) -> int:
    try:
        response = await client.request("POST", url, [], b"{}", max_body_bytes=1024, timeout_s=10)
    finally:
        await client.close()
    return response.status


async def test_request_to_localhost_goes_through_the_policy_resolver(
    receiver: Receiver, connected: list[str]
) -> None:
    """A target named by hostname (localhost) is resolved, checked and delivered to."""
    assert await post(Client(DEFAULT), f"http://localhost:{receiver.port}/hook") == 200
    assert len(receiver.requests) == 1
    # localhost may resolve to ::1 as well; the receiver serves 127.0.0.1 only.
    assert "127.0.0.1" in connected
    assert set(connected) <= {"127.0.0.1", "::1"}


async def test_connection_goes_to_the_checked_address(
    receiver: Receiver, connected: list[str]
) -> None:
    """Of a host's addresses only the allowed ones are connected to; there is no second lookup."""
    inner = FakeResolver({"mixed.internal": ["169.254.169.254", "127.0.0.1"]})
    client = Client(DEFAULT, resolver=inner)
    assert await post(client, f"http://mixed.internal:{receiver.port}/hook") == 200
    assert connected == ["127.0.0.1"]
    assert len(inner.lookups) == 1
    assert receiver.requests[0].headers["Host"] == f"mixed.internal:{receiver.port}"


async def test_request_to_a_link_local_host_fails_without_connecting(
    connected: list[str],
) -> None:
    """A hostname resolving to the metadata address fails with the policy reason, unsent."""
    inner = FakeResolver({"metadata.internal": ["169.254.169.254"]})
    with pytest.raises(PolicyRefusal) as caught:
        await post(Client(DEFAULT, resolver=inner), "http://metadata.internal/latest/meta-data")
    assert str(caught.value) == (
        "outbound network policy refused every address of metadata.internal: "
        f"169.254.169.254 {LINK_LOCAL_ADVICE}"
    )
    assert connected == []


async def test_ip_literal_urls_skip_the_resolver(receiver: Receiver, connected: list[str]) -> None:
    """An allowed IP-literal URL is connected to as it is, without a lookup."""
    inner = FakeResolver({})
    assert await post(Client(DEFAULT, resolver=inner), receiver.url) == 200
    assert inner.lookups == []
    assert connected == ["127.0.0.1"]


async def test_link_local_ip_literal_is_refused_without_connecting(connected: list[str]) -> None:
    """http://169.254.169.254/ is refused by the policy before any connection."""
    with pytest.raises(PolicyRefusal) as caught:
        await post(Client(DEFAULT), "http://169.254.169.254/latest/meta-data")
    assert str(caught.value) == f"outbound network policy: 169.254.169.254 {LINK_LOCAL_ADVICE}"
    assert connected == []


async def test_hex_encoded_metadata_address_is_refused_after_resolution(
    connected: list[str],
) -> None:
    """http://0xa9fea9fe/ is no IP literal to the URL parser, but getaddrinfo makes it
    169.254.169.254: the resolved address is what is checked."""
    try:  # numeric parsing only: if this libc would send it to DNS, do not send anything
        socket.getaddrinfo("0xa9fea9fe", 80, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pytest.skip("this libc does not parse 0xa9fea9fe as an address")
    with pytest.raises(PolicyRefusal) as caught:
        await post(Client(DEFAULT), "http://0xa9fea9fe/latest/meta-data")
    assert f"169.254.169.254 {LINK_LOCAL_ADVICE}" in str(caught.value)
    assert connected == []
