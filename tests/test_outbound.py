"""The request a target receives, built as plain values (no network)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.model import RetryConfig, RouteConfig, SourceConfig, TargetConfig, VerifyConfig
from relay.outbound import StoredRequest, TransformError, build_request, signature_headers
from relay.rules import compile_expression

STRIPE_EVENT = {
    "id": "evt_1",
    "type": "invoice.paid",
    "data": {"object": {"id": "in_42", "amount_paid": 1200}},
}


def target(**overrides: Any) -> TargetConfig:
    settings: dict[str, Any] = {
        "name": "chat", "url": "https://chat.example/hook", "method": "POST", "timeout_s": 5.0,
        "concurrency": 1, "rate_limit": None, "headers": {}, "sign": None,
        "retry": RetryConfig(3, 1.0, 10.0, 3600.0), "retry_on": frozenset(), "pause_after": 5,
        "ordered": False, "order_key": None,
    }  # fmt: skip
    return TargetConfig(**{**settings, **overrides})


def route(**overrides: Any) -> RouteConfig:
    settings: dict[str, Any] = {
        "name": "r", "source": "stripe", "filter": None, "transform": None, "set_headers": {},
        "drop_headers": (), "targets": ("chat",),
    }  # fmt: skip
    return RouteConfig(**{**settings, **overrides})


def stripe_source() -> SourceConfig:
    verify = VerifyConfig("stripe", ("whsec_x",), 300.0, "", "sha256", "hex", "", "", "", "")
    return SourceConfig(
        name="stripe", path="/hooks/stripe", methods=("POST",), verify=verify, dedupe=None,
        max_body_bytes=1 << 20, rate_limit=None, burst=None, allow_from=(), ack_status=202,
        challenge="",
    )  # fmt: skip


def stored(headers: list[tuple[str, str]], body: bytes = b'{"a": 1}') -> StoredRequest:
    return StoredRequest(
        delivery_id="dlv_1", event_id="evt_9", source="stripe", method="POST",
        path="/hooks/stripe", query="", headers=headers, body=body, received_at_ms=0,
    )  # fmt: skip


def test_original_headers_pass_except_hop_by_hop_host_and_length() -> None:
    """The target sees the sender's headers, minus those that belong to one connection."""
    request = build_request(
        target=target(), route=route(), source=None, attempt=2, now_s=0.0,
        request=stored([
            ("Host", "relay.example"), ("Content-Length", "8"), ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"), ("Transfer-Encoding", "chunked"), ("User-Agent", "Stripe/1.0"),
            ("Content-Type", "application/json"), ("X-Repeat", "a"), ("X-Repeat", "b"),
        ]),
    )  # fmt: skip
    assert list(request.headers.items()) == [
        ("User-Agent", "Stripe/1.0"), ("Content-Type", "application/json"),
        ("X-Repeat", "a"), ("X-Repeat", "b"), ("webhook-id", "dlv_1"),
        ("X-Relay-Event-Id", "evt_9"), ("X-Relay-Source", "stripe"), ("X-Relay-Attempt", "2"),
    ]  # fmt: skip
    assert request.body == b'{"a": 1}'
    assert request.transformed is False


def test_target_headers_then_route_drop_then_route_set() -> None:
    """Target headers replace originals; a route drops (any case) and then sets its own."""
    request = build_request(
        target=target(headers={"Authorization": "Bearer t", "X-Env": "prod"}),
        route=route(drop_headers=("stripe-signature", "x-env"), set_headers={"X-Origin": "stripe"}),
        source=stripe_source(), attempt=1, now_s=0.0,
        request=stored([("Authorization", "Basic old"), ("Stripe-Signature", "t=1,v1=ab")]),
    )  # fmt: skip
    assert request.headers.getall("Authorization") == ["Bearer t"]
    assert "Stripe-Signature" not in request.headers
    assert "X-Env" not in request.headers
    assert request.headers["X-Origin"] == "stripe"


def test_transform_reshapes_the_body_and_drops_the_signature() -> None:
    """A transform's result is the JSON body; the source signature no longer applies and goes."""
    transform = compile_expression(
        "{text: format('Stripe {}: {}', body.type, body.data.object.id)}"
    )
    request = build_request(
        target=target(), route=route(transform=transform), source=stripe_source(),
        attempt=1, now_s=0.0,
        request=stored(
            [("Stripe-Signature", "t=1,v1=ab"), ("Content-Type", "application/json; charset=utf-8"),
             ("Content-Encoding", "identity"), ("X-Keep", "yes")],
            orjson.dumps(STRIPE_EVENT),
        ),
    )  # fmt: skip
    assert request.body == b'{"text":"Stripe invoice.paid: in_42"}'
    assert request.transformed is True
    assert request.headers["Content-Type"] == "application/json"
    assert "Stripe-Signature" not in request.headers
    assert "Content-Encoding" not in request.headers
    assert request.headers["X-Keep"] == "yes"


def test_a_transform_that_raises_is_a_transform_error() -> None:
    """A transform failing on this payload names the failure, for the dead delivery's reason."""
    broken = compile_expression("{n: length(body.missing)}")
    with pytest.raises(TransformError, match=r"transform failed: .*length\(\)"):
        build_request(
            target=target(), route=route(transform=broken), source=stripe_source(),
            attempt=1, now_s=0.0,
            request=stored([("Content-Type", "application/json")]),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("scheme", "header", "expected"),
    [
        ("github", "", {"x-hub-signature-256", "x-hub-signature"}),
        ("stripe", "", {"stripe-signature"}),
        ("slack", "", {"x-slack-signature", "x-slack-request-timestamp"}),
        ("shopify", "", {"x-shopify-hmac-sha256"}),
        ("standard", "", {"webhook-signature", "webhook-timestamp"}),
        ("hmac", "X-Signature", {"x-signature"}),
        ("token", "X-Gitlab-Token", {"x-gitlab-token"}),
        ("basic", "", {"authorization"}),
    ],
)
def test_each_scheme_names_its_signature_headers(
    scheme: str, header: str, expected: set[str]
) -> None:
    """What is dropped from a transformed request depends on how the source was verified."""
    verify = VerifyConfig(scheme, ("s",), 300.0, header, "sha256", "hex", "", "", "u", "p")  # type: ignore[arg-type]
    assert signature_headers(verify) == expected
    assert signature_headers(None) == frozenset()
