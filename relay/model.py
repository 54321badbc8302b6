"""The configuration as frozen, typed values.

This module owns the *shape* of relay's configuration (SPEC §2): one frozen
dataclass per table, with units in the field names (`timeout_s`,
`max_body_bytes`). Objects are built only by `relay.config.load`, which
validates everything once; the rest of the program reads them and never
checks them again. A reload builds a whole new `Config`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.rules import Expression

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SyncMode = Literal["full", "normal"]
LogFormat = Literal["auto", "json", "console"]
VerifyScheme = Literal["github", "stripe", "slack", "shopify", "standard", "hmac", "token", "basic"]
SignScheme = Literal["standard", "hmac"]


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `per_s` seconds, e.g. "600/m" is Rate(600, 60.0)."""

    count: int
    per_s: float

    @property
    def per_second(self) -> float:
        return self.count / self.per_s


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address
    admin: Address
    admin_token: str
    journal: Path
    sync: SyncMode
    retention_s: float
    max_body_bytes: int
    read_timeout_s: float
    idle_timeout_s: float
    shutdown_grace_s: float
    tls_cert: Path | None
    tls_key: Path | None
    deny_networks: tuple[IPNetwork, ...]
    allow_networks: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat
    level: str


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int
    first_s: float
    max_s: float
    max_age_s: float


@dataclass(frozen=True, slots=True)
class DefaultsConfig:
    timeout_s: float
    concurrency: int
    retry: RetryConfig
    pause_after: int


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    scheme: VerifyScheme
    secrets: tuple[str, ...]
    tolerance_s: float
    header: str
    algorithm: str
    encoding: str
    prefix: str
    id_header: str
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    window_s: float
    key: Expression | None


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str
    methods: tuple[str, ...]
    verify: VerifyConfig | None
    dedupe: DedupeConfig | None
    max_body_bytes: int
    rate_limit: Rate | None
    burst: int | None
    allow_from: tuple[IPNetwork, ...]
    ack_status: int
    challenge: str


@dataclass(frozen=True, slots=True)
class SignConfig:
    scheme: SignScheme
    secrets: tuple[str, ...]
    header: str
    algorithm: str
    encoding: str
    prefix: str


@dataclass(frozen=True, slots=True)
class TargetConfig:
    name: str
    url: str
    method: str
    timeout_s: float
    concurrency: int
    rate_limit: Rate | None
    headers: Mapping[str, str]
    sign: SignConfig | None
    retry: RetryConfig
    retry_on: frozenset[int]
    pause_after: int
    ordered: bool
    order_key: Expression | None

    @property
    def is_log(self) -> bool:
        return self.url == "log:"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    source: str
    filter: Expression | None
    transform: Expression | None
    set_headers: Mapping[str, str]
    drop_headers: tuple[str, ...]
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig
    log: LogConfig
    defaults: DefaultsConfig
    sources: Mapping[str, SourceConfig]
    targets: Mapping[str, TargetConfig]
    routes: tuple[RouteConfig, ...]
    # Dotted key paths whose value came from ${...} interpolation or is a secret
    # by its nature; `relay config` shows these as "***".
    secret_paths: frozenset[str] = field(default=frozenset())
    # Lower-cased names of target `headers` and route `set_headers` given a value by
    # ${...}: masked in log lines and in what the CLI prints, like credentials.
    secret_headers: frozenset[str] = field(default=frozenset())
    warnings: tuple[str, ...] = field(default=())

    def routes_of(self, source: str) -> tuple[RouteConfig, ...]:
        return tuple(r for r in self.routes if r.source == source)
