"""Webhook signatures (SPEC §2.1 verify schemes, §4 outbound signing, §1 `relay send`).

Requests are signed with the providers' own libraries (standardwebhooks, svix, stripe,
slack_sdk) and with their published test vectors, so that these tests prove relay
agrees with the senders, not only with itself. The clock is a fixed `now_s`; where a
provider library reads the real clock, it is frozen to the same instant.
"""

from __future__ import annotations

import base64
import hmac
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import slack_sdk.signature
import standardwebhooks.webhooks
import stripe
import svix.webhooks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay import signing
from relay.model import SignConfig, VerifyConfig
from relay.signing import (
    Verdict,
    new_standard_secret,
    provider_headers,
    sign,
    verify,
)

NOW = 1_700_000_000.0
BODY = '{"id": "evt_1", "object": "event", "type": "invoice.paid", "note": "héllo"}'.encode()
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_STANDARD_SECRET = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()
SECRET = "s3cret-for-tests"
OTHER_SECRET = "a-different-secret"

# The module of stripe.WebhookSignature, whose verify_header reads time.time().
STRIPE_WEBHOOK_MODULE = sys.modules[stripe.WebhookSignature.__module__]


def verify_config(
    scheme: Any,
    *secrets: str,
    tolerance_s: float = 300.0,
    header: str = "",
    algorithm: str = "sha256",
    encoding: str = "hex",
    prefix: str = "",
    id_header: str = "",
    username: str = "",
    password: str = "",
) -> VerifyConfig:
    return VerifyConfig(
        scheme=scheme,
        secrets=secrets,
        tolerance_s=tolerance_s,
        header=header,
        algorithm=algorithm,
        encoding=encoding,
        prefix=prefix,
        id_header=id_header,
        username=username,
        password=password,
    )


def sign_config(
    scheme: Any,
    *secrets: str,
    header: str = "",
    algorithm: str = "sha256",
    encoding: str = "hex",
    prefix: str = "",
) -> SignConfig:
    return SignConfig(
        scheme=scheme,
        secrets=secrets,
        header=header,
        algorithm=algorithm,
        encoding=encoding,
        prefix=prefix,
    )


def at(now_s: float) -> datetime:
    return datetime.fromtimestamp(now_s, tz=UTC)


@pytest.fixture
def frozen_provider_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeze the clocks standardwebhooks/svix and stripe read to NOW."""

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.fromtimestamp(NOW, tz)

    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", FrozenDatetime)
    monkeypatch.setattr(STRIPE_WEBHOOK_MODULE, "time", SimpleNamespace(time=lambda: NOW))


class FrozenSlackClock(slack_sdk.signature.Clock):
    def now(self) -> float:
        return NOW


# --- the schemes, each signed the way its provider signs ----------------------------
#
# `sign(secret, body, ts)` returns the request headers with an independent signer: the
# provider's library where one exists, else a few lines of hashlib/hmac here.


def _hex_mac(secret: str, message: bytes, algorithm: str = "sha256") -> str:
    return hmac.new(secret.encode(), message, algorithm).hexdigest()


def _b64_mac(secret: str, message: bytes, algorithm: str = "sha256") -> str:
    return base64.b64encode(hmac.new(secret.encode(), message, algorithm).digest()).decode()


def _github(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + _hex_mac(secret, body), "X-GitHub-Delivery": "d-1"}


def _stripe(secret: str, body: bytes, ts: float) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, int(ts))
    return {"Stripe-Signature": header}


def _slack(secret: str, body: bytes, ts: float) -> dict[str, str]:
    signature = slack_sdk.signature.SignatureVerifier(secret).generate_signature(
        timestamp=str(int(ts)), body=body
    )
    assert signature is not None
    return {"X-Slack-Request-Timestamp": str(int(ts)), "X-Slack-Signature": signature}


def _shopify(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"X-Shopify-Hmac-Sha256": _b64_mac(secret, body), "X-Shopify-Event-Id": "e-1"}


def _standard(secret: str, body: bytes, ts: float) -> dict[str, str]:
    signature = standardwebhooks.webhooks.Webhook(secret).sign("msg_1", at(ts), body.decode())
    return {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(ts)),
        "webhook-signature": signature,
    }


def _hmac(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"X-Signature": "sha512=" + _b64_mac(secret, body, "sha512"), "X-Request-Id": "r-1"}


def _bearer(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _gitlab(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"X-Gitlab-Token": secret, "X-Gitlab-Event-UUID": "g-1"}


def _basic(secret: str, body: bytes, ts: float) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"relay:{secret}".encode()).decode()}


@dataclass(frozen=True)
class Scheme:
    name: str
    config: Callable[..., VerifyConfig]  # secrets -> config
    sign: Callable[[str, bytes, float], dict[str, str]]
    secret: str
    other_secret: str
    required: tuple[str, ...]  # headers without which the request is rejected
    signature_header: str
    delivery_id: str | None
    timestamped: bool = False
    covers_body: bool = True

    def __str__(self) -> str:
        return self.name


def _basic_config(*secrets: str) -> VerifyConfig:
    # basic has no secret list: the "secret" is the password.
    return verify_config("basic", username="relay", password=secrets[-1])


SCHEMES = (
    Scheme(
        name="github",
        config=lambda *s: verify_config("github", *s),
        sign=_github,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("X-Hub-Signature-256",),
        signature_header="X-Hub-Signature-256",
        delivery_id="d-1",
    ),
    Scheme(
        name="stripe",
        config=lambda *s: verify_config("stripe", *s),
        sign=_stripe,
        secret="whsec_stripe_test_secret",
        other_secret=OTHER_SECRET,
        required=("Stripe-Signature",),
        signature_header="Stripe-Signature",
        delivery_id=None,
        timestamped=True,
    ),
    Scheme(
        name="slack",
        config=lambda *s: verify_config("slack", *s),
        sign=_slack,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("X-Slack-Signature", "X-Slack-Request-Timestamp"),
        signature_header="X-Slack-Signature",
        delivery_id=None,
        timestamped=True,
    ),
    Scheme(
        name="shopify",
        config=lambda *s: verify_config("shopify", *s),
        sign=_shopify,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("X-Shopify-Hmac-Sha256",),
        signature_header="X-Shopify-Hmac-Sha256",
        delivery_id="e-1",
    ),
    Scheme(
        name="standard",
        config=lambda *s: verify_config("standard", *s),
        sign=_standard,
        secret=STANDARD_SECRET,
        other_secret=OTHER_STANDARD_SECRET,
        required=("webhook-id", "webhook-timestamp", "webhook-signature"),
        signature_header="webhook-signature",
        delivery_id="msg_1",
        timestamped=True,
    ),
    Scheme(
        name="hmac",
        config=lambda *s: verify_config(
            "hmac",
            *s,
            header="X-Signature",
            algorithm="sha512",
            encoding="base64",
            prefix="sha512=",
            id_header="X-Request-Id",
        ),
        sign=_hmac,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("X-Signature",),
        signature_header="X-Signature",
        delivery_id="r-1",
    ),
    Scheme(
        name="token-bearer",
        config=lambda *s: verify_config("token", *s, header="Authorization"),
        sign=_bearer,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("Authorization",),
        signature_header="Authorization",
        delivery_id=None,
        covers_body=False,
    ),
    Scheme(
        name="token-gitlab",
        config=lambda *s: verify_config(
            "token", *s, header="X-Gitlab-Token", id_header="X-Gitlab-Event-UUID"
        ),
        sign=_gitlab,
        secret=SECRET,
        other_secret=OTHER_SECRET,
        required=("X-Gitlab-Token",),
        signature_header="X-Gitlab-Token",
        delivery_id="g-1",
        covers_body=False,
    ),
    Scheme(
        name="basic",
        config=_basic_config,
        sign=_basic,
        secret="pass:word",
        other_secret="password",
        required=("Authorization",),
        signature_header="Authorization",
        delivery_id=None,
        covers_body=False,
    ),
)
SIGNED = tuple(s for s in SCHEMES if s.covers_body)
ROTATING = tuple(s for s in SCHEMES if s.name != "basic")  # basic has one password, no list
TIMESTAMPED = tuple(s for s in SCHEMES if s.timestamped)


def headers_of(values: dict[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(values)


def check(
    scheme: Scheme, headers: dict[str, str], body: bytes = BODY, now_s: float = NOW
) -> Verdict:
    return verify(scheme.config(scheme.secret), headers_of(headers), body, now_s)


# --- every scheme: accept and reject ---------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_a_correctly_signed_request_is_accepted(scheme: Scheme) -> None:
    """A request signed by the provider with the configured secret is accepted, reason empty."""
    verdict = check(scheme, scheme.sign(scheme.secret, BODY, NOW))
    assert verdict == Verdict(True, "", scheme.delivery_id)


@pytest.mark.parametrize("scheme", SIGNED, ids=str)
def test_a_tampered_body_is_rejected(scheme: Scheme) -> None:
    """One byte changed in the body after signing: rejected as a signature mismatch."""
    headers = scheme.sign(scheme.secret, BODY, NOW)
    verdict = check(scheme, headers, body=BODY.replace(b"invoice", b"Invoice"))
    assert verdict == Verdict(False, "signature mismatch", None)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_a_request_signed_with_another_secret_is_rejected(scheme: Scheme) -> None:
    """A sender using a different secret (or password) is rejected with a mismatch reason."""
    verdict = check(scheme, scheme.sign(scheme.other_secret, BODY, NOW))
    assert not verdict.ok
    assert "mismatch" in verdict.reason
    assert verdict.delivery_id is None


@pytest.mark.parametrize(
    ("scheme", "missing"),
    [(scheme, header) for scheme in SCHEMES for header in scheme.required],
    ids=lambda value: str(value),
)
def test_a_missing_header_is_rejected_and_named(scheme: Scheme, missing: str) -> None:
    """Without one of its scheme's headers a request is rejected; the log says which one."""
    headers = scheme.sign(scheme.secret, BODY, NOW)
    del headers[missing]
    assert check(scheme, headers) == Verdict(False, f"missing {missing}", None)


@pytest.mark.parametrize(
    ("scheme", "missing"),
    [(scheme, header) for scheme in SCHEMES for header in scheme.required],
    ids=lambda value: str(value),
)
def test_an_empty_header_counts_as_missing(scheme: Scheme, missing: str) -> None:
    """A required header that is present but empty is rejected like a missing one."""
    headers = scheme.sign(scheme.secret, BODY, NOW)
    headers[missing] = ""
    assert check(scheme, headers) == Verdict(False, f"missing {missing}", None)


MALFORMED_VALUES = (
    "garbage",
    "sha256=é" + "0" * 63,
    "sha256=" + "zz" * 32,
    "sha1=" + "00" * 20,
    "v0=" + "é" * 64,
    "v1,!!!not-base64!!!",
    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
    "t=,v1=",
    "t=abc,v1=" + "00" * 32,
    f"t={int(NOW)}",
    "sha512=%%%%",
    "Bearer",
    "Bearer ",
    "Basic",
    "Basic !!!",
    "Basic " + base64.b64encode(b"relay").decode(),
    "Digest username=relay",
    "\udcff\udcfe",  # bytes that are not UTF-8, as aiohttp hands them over
    "\ud800",  # a lone surrogate
    "\x00\x01\x7f",
    " ",
)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("value", MALFORMED_VALUES)
def test_a_malformed_signature_header_is_rejected_without_raising(
    scheme: Scheme, value: str
) -> None:
    """Garbage, non-ASCII, wrong prefixes, bad base64 or hex in the signature header: a
    rejection with a reason, never an exception (so never a 500)."""
    headers = scheme.sign(scheme.secret, BODY, NOW)
    headers[scheme.signature_header] = value
    verdict = check(scheme, headers)
    assert verdict.ok is False
    assert verdict.reason
    assert verdict.delivery_id is None


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=str)
@pytest.mark.parametrize("offset_s", [-301.0, 301.0, -86400.0, 86400.0])
def test_a_timestamp_beyond_tolerance_either_way_is_rejected(
    scheme: Scheme, offset_s: float
) -> None:
    """A correctly signed request timestamped more than 5 minutes before or after now (a
    replay, or a sender clock that is off) is rejected and the log says by how much."""
    verdict = check(scheme, scheme.sign(scheme.secret, BODY, NOW + offset_s))
    assert not verdict.ok
    if offset_s < 0:
        assert verdict.reason == f"timestamp outside tolerance ({-offset_s:.0f}s old)"
    else:
        assert verdict.reason == f"timestamp outside tolerance ({offset_s:.0f}s in the future)"


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=str)
@pytest.mark.parametrize("offset_s", [-300.0, 300.0, -1.0, 0.0])
def test_a_timestamp_within_tolerance_is_accepted(scheme: Scheme, offset_s: float) -> None:
    """Up to the tolerance itself, in either direction, a request is on time."""
    assert check(scheme, scheme.sign(scheme.secret, BODY, NOW + offset_s)).ok


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=str)
def test_tolerance_comes_from_the_config(scheme: Scheme) -> None:
    """`tolerance = "30s"` rejects a request 31 s old that the default would let through."""
    headers = headers_of(scheme.sign(scheme.secret, BODY, NOW - 31))
    strict = replace(scheme.config(scheme.secret), tolerance_s=30.0)
    assert not verify(strict, headers, BODY, NOW).ok
    assert verify(scheme.config(scheme.secret), headers, BODY, NOW).ok


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=str)
def test_a_wrong_secret_on_a_stale_request_is_reported_as_a_mismatch(scheme: Scheme) -> None:
    """The signature is checked before the clock, so "timestamp outside tolerance" in the log
    always means a genuine but late request (replay or clock skew), never a wrong secret."""
    verdict = check(scheme, scheme.sign(scheme.other_secret, BODY, NOW - 3600))
    assert verdict.reason == "signature mismatch"


@pytest.mark.parametrize("scheme", ROTATING, ids=str)
def test_with_two_secrets_a_request_matching_only_the_second_is_accepted(
    scheme: Scheme,
) -> None:
    """Secret rotation: `secret = [old, new]` accepts a sender already using the new one."""
    config = scheme.config(scheme.other_secret, scheme.secret)
    headers = headers_of(scheme.sign(scheme.secret, BODY, NOW))
    assert verify(config, headers, BODY, NOW) == Verdict(True, "", scheme.delivery_id)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_header_names_are_case_insensitive(scheme: Scheme) -> None:
    """Senders that lower-case header names (HTTP/2 always does) are accepted, from a
    case-insensitive multidict or a plain dict."""
    lowered = {k.lower(): v for k, v in scheme.sign(scheme.secret, BODY, NOW).items()}
    config = scheme.config(scheme.secret)
    assert verify(config, CIMultiDict(lowered), BODY, NOW).ok
    assert verify(config, lowered, BODY, NOW).ok


@pytest.mark.parametrize("scheme", SIGNED, ids=str)
def test_a_body_that_is_not_utf8_is_verified_on_its_raw_bytes(scheme: Scheme) -> None:
    """Verification works on the raw body bytes, so binary payloads verify too."""
    body = bytes(range(256))
    config = scheme.config(scheme.secret)
    headers = provider_headers(config, body, NOW, "id-1")
    assert verify(config, CIMultiDict(headers), body, NOW).ok
    assert not verify(config, CIMultiDict(headers), body[:-1], NOW).ok


# --- published vectors ---------------------------------------------------------------


def test_github_documented_example_is_accepted() -> None:
    """GitHub's docs example ("Validating webhook deliveries") verifies: secret "It's a Secret
    to Everybody", payload "Hello, World!"."""
    config = verify_config("github", "It's a Secret to Everybody")
    headers = CIMultiDict(
        {
            "X-Hub-Signature-256": (
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
            ),
            "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        }
    )
    verdict = verify(config, headers, b"Hello, World!", NOW)
    assert verdict == Verdict(True, "", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert (
        provider_headers(config, b"Hello, World!", NOW, "x")["X-Hub-Signature-256"]
        == (headers["X-Hub-Signature-256"])
    )


SLACK_EXAMPLE_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_EXAMPLE_TS = 1531420618
SLACK_EXAMPLE_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow"
    b"&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner"
    b"&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands"
    b"%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_EXAMPLE_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


def test_slack_documented_example_is_accepted() -> None:
    """Slack's docs example ("Verifying requests from Slack") verifies with now at its
    timestamp, and is stale a day later."""
    config = verify_config("slack", SLACK_EXAMPLE_SECRET)
    headers = CIMultiDict(
        {
            "X-Slack-Request-Timestamp": str(SLACK_EXAMPLE_TS),
            "X-Slack-Signature": SLACK_EXAMPLE_SIGNATURE,
        }
    )
    assert verify(config, headers, SLACK_EXAMPLE_BODY, SLACK_EXAMPLE_TS).ok
    assert not verify(config, headers, SLACK_EXAMPLE_BODY, SLACK_EXAMPLE_TS + 86400).ok
    sent = provider_headers(config, SLACK_EXAMPLE_BODY, SLACK_EXAMPLE_TS, "x")
    assert sent["X-Slack-Signature"] == SLACK_EXAMPLE_SIGNATURE


# The Standard Webhooks reference vector. It does not ship in the standardwebhooks wheel;
# it is in the spec repository's libraries/python/tests/test_webhooks.py (test_sign_function)
# and svix's tests.
STANDARD_VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STANDARD_VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STANDARD_VECTOR_TS = 1614265330
STANDARD_VECTOR_BODY = b'{"test": 2432232314}'
STANDARD_VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_standard_webhooks_reference_vector_is_accepted_and_reproduced() -> None:
    """The Standard Webhooks reference vector verifies, with or without the whsec_ prefix,
    and relay's own signing reproduces it byte for byte."""
    headers = CIMultiDict(
        {
            "webhook-id": STANDARD_VECTOR_ID,
            "webhook-timestamp": str(STANDARD_VECTOR_TS),
            "webhook-signature": STANDARD_VECTOR_SIGNATURE,
        }
    )
    for secret in (STANDARD_VECTOR_SECRET, STANDARD_VECTOR_SECRET.removeprefix("whsec_")):
        config = verify_config("standard", secret)
        verdict = verify(config, headers, STANDARD_VECTOR_BODY, STANDARD_VECTOR_TS)
        assert verdict == Verdict(True, "", STANDARD_VECTOR_ID)
    signed = sign(
        sign_config("standard", STANDARD_VECTOR_SECRET),
        STANDARD_VECTOR_ID,
        STANDARD_VECTOR_BODY,
        STANDARD_VECTOR_TS + 0.999,
    )
    assert signed == {
        "webhook-id": STANDARD_VECTOR_ID,
        "webhook-timestamp": str(STANDARD_VECTOR_TS),
        "webhook-signature": STANDARD_VECTOR_SIGNATURE,
    }
    library = standardwebhooks.webhooks.Webhook(STANDARD_VECTOR_SECRET)
    expected = library.sign(STANDARD_VECTOR_ID, at(STANDARD_VECTOR_TS), '{"test": 2432232314}')
    assert expected == STANDARD_VECTOR_SIGNATURE


def test_standard_signature_list_with_other_versions_and_bad_entries_is_accepted() -> None:
    """A webhook-signature list mixing a wrong v1, a v2 and the right v1 is accepted (the
    reference library's multi-signature test): only one v1 entry has to match."""
    good = standardwebhooks.webhooks.Webhook(STANDARD_SECRET).sign("msg_1", at(NOW), BODY.decode())
    signatures = " ".join(
        [
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v1a,bm9wZQ==",
            "garbage",
            good,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        ]
    )
    headers = CIMultiDict(
        {"webhook-id": "msg_1", "webhook-timestamp": str(int(NOW)), "webhook-signature": signatures}
    )
    assert verify(verify_config("standard", STANDARD_SECRET), headers, BODY, NOW).ok


# --- agreement with the providers' libraries -------------------------------------------


def test_standard_and_svix_signatures_are_accepted() -> None:
    """What standardwebhooks and svix sign, relay accepts."""
    config = verify_config("standard", STANDARD_SECRET)
    for library in (standardwebhooks.webhooks.Webhook, svix.webhooks.Webhook):
        signature = library(STANDARD_SECRET).sign("msg_2", at(NOW), BODY.decode())
        headers = CIMultiDict(
            {
                "webhook-id": "msg_2",
                "webhook-timestamp": str(int(NOW)),
                "webhook-signature": signature,
            }
        )
        assert verify(config, headers, BODY, NOW) == Verdict(True, "", "msg_2")


@pytest.mark.usefixtures("frozen_provider_clocks")
def test_relay_standard_signatures_verify_with_standardwebhooks_and_svix() -> None:
    """What relay signs for a target, the receiver's standardwebhooks or svix library accepts."""
    headers = sign(sign_config("standard", STANDARD_SECRET), "dlv_01", BODY, NOW)
    standardwebhooks.webhooks.Webhook(STANDARD_SECRET).verify(BODY, headers, json_parse=False)
    svix.webhooks.Webhook(STANDARD_SECRET).verify(BODY, headers)
    tampered = BODY + b" "
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.webhooks.Webhook(STANDARD_SECRET).verify(
            tampered, headers, json_parse=False
        )


def _standard_cases() -> Iterator[tuple[str, dict[str, str], bytes]]:
    library = standardwebhooks.webhooks.Webhook(STANDARD_SECRET)
    other = standardwebhooks.webhooks.Webhook(OTHER_STANDARD_SECRET)

    def headers(signature: str, ts: float = NOW, msg_id: str = "msg_3") -> dict[str, str]:
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(ts)),
            "webhook-signature": signature,
        }

    good = library.sign("msg_3", at(NOW), BODY.decode())
    yield "valid", headers(good), BODY
    yield "tampered", headers(good), BODY + b"x"
    yield "other id", headers(good, msg_id="msg_4"), BODY
    yield "wrong secret", headers(other.sign("msg_3", at(NOW), BODY.decode())), BODY
    yield "stale", headers(library.sign("msg_3", at(NOW - 301), BODY.decode()), NOW - 301), BODY
    yield "future", headers(library.sign("msg_3", at(NOW + 301), BODY.decode()), NOW + 301), BODY
    yield "edge", headers(library.sign("msg_3", at(NOW - 299), BODY.decode()), NOW - 299), BODY
    yield "two", headers("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= " + good), BODY
    yield "v2 only", headers(good.replace("v1,", "v2,")), BODY


@pytest.mark.usefixtures("frozen_provider_clocks")
def test_standard_verification_agrees_with_standardwebhooks() -> None:
    """On valid, tampered, re-addressed, wrongly keyed, stale, future and multi-signature
    requests relay accepts exactly what standardwebhooks accepts."""
    config = verify_config("standard", STANDARD_SECRET)
    for name, headers, body in _standard_cases():
        try:
            standardwebhooks.webhooks.Webhook(STANDARD_SECRET).verify(
                body, headers, json_parse=False
            )
            theirs = True
        except standardwebhooks.webhooks.WebhookVerificationError:
            theirs = False
        assert verify(config, CIMultiDict(headers), body, NOW).ok is theirs, name


def _stripe_accepts(body: bytes, header: str, secret: str) -> bool:
    try:
        stripe.Webhook.construct_event(body, header, secret, tolerance=300)
    except stripe.SignatureVerificationError:
        return False
    return True


@pytest.mark.usefixtures("frozen_provider_clocks")
def test_stripe_verification_agrees_with_the_stripe_library() -> None:
    """relay accepts a Stripe-Signature exactly when stripe.Webhook.construct_event does:
    valid, tampered, wrong secret, stale, rotated-v1 lists, v0-only, no timestamp, garbage."""
    secret = "whsec_stripe_test_secret"
    generate = stripe.WebhookSignature.generate_signature_header
    now = int(NOW)
    good = generate(BODY.decode(), secret, now)
    signature = good.split("v1=")[1]
    cases = {
        "valid": (good, BODY),
        "tampered": (good, BODY + b" "),
        "wrong secret": (generate(BODY.decode(), OTHER_SECRET, now), BODY),
        "stale": (generate(BODY.decode(), secret, now - 301), BODY),
        "edge": (generate(BODY.decode(), secret, now - 300), BODY),
        "second v1": (f"t={now},v1={'0' * 64},v1={signature}", BODY),
        "extra fields": (f"t={now},v1={signature},v0={'0' * 64}", BODY),
        "v0 only": (f"t={now},v0={signature}", BODY),
        "no t": (f"v1={signature}", BODY),
        "garbage": ("garbage", BODY),
        "bad t": (f"t=x{now},v1={signature}", BODY),
        "other t": (f"t={now + 1},v1={signature}", BODY),
    }
    config = verify_config("stripe", secret)
    for name, (header, body) in cases.items():
        ours = verify(config, CIMultiDict({"Stripe-Signature": header}), body, NOW).ok
        assert ours is _stripe_accepts(body, header, secret), name


@pytest.mark.usefixtures("frozen_provider_clocks")
def test_stripe_future_timestamps_are_rejected_where_the_stripe_library_accepts_them() -> None:
    """SPEC §2.1 applies tolerance both ways; the stripe library only rejects stale ones, so a
    Stripe-Signature 10 minutes in the future is the one place relay is deliberately stricter."""
    secret = "whsec_stripe_test_secret"
    header = stripe.WebhookSignature.generate_signature_header(
        BODY.decode(), secret, int(NOW) + 600
    )
    assert _stripe_accepts(BODY, header, secret)
    verdict = verify(
        verify_config("stripe", secret), CIMultiDict({"Stripe-Signature": header}), BODY, NOW
    )
    assert verdict == Verdict(False, "timestamp outside tolerance (600s in the future)", None)


def test_slack_verification_agrees_with_slack_sdk() -> None:
    """relay accepts exactly what slack_sdk's SignatureVerifier accepts: valid, stale, future,
    tampered, wrong secret, missing headers."""
    verifier = slack_sdk.signature.SignatureVerifier(SECRET, clock=FrozenSlackClock())
    config = verify_config("slack", SECRET)
    cases = {
        "valid": (_slack(SECRET, BODY, NOW), BODY),
        "stale": (_slack(SECRET, BODY, NOW - 301), BODY),
        "future": (_slack(SECRET, BODY, NOW + 301), BODY),
        "edge": (_slack(SECRET, BODY, NOW + 300), BODY),
        "tampered": (_slack(SECRET, BODY, NOW), BODY + b"&x=1"),
        "wrong secret": (_slack(OTHER_SECRET, BODY, NOW), BODY),
        "no signature": ({"X-Slack-Request-Timestamp": str(int(NOW))}, BODY),
        "no timestamp": (
            {"X-Slack-Signature": _slack(SECRET, BODY, NOW)["X-Slack-Signature"]},
            BODY,
        ),
    }
    for name, (headers, body) in cases.items():
        theirs = verifier.is_valid_request(body, headers)
        assert verify(config, CIMultiDict(headers), body, NOW).ok is theirs, name


# --- scheme details ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("prefix", ["", "sha=", "v1:"])
def test_hmac_accepts_each_algorithm_encoding_and_prefix(
    algorithm: str, encoding: str, prefix: str
) -> None:
    """The generic hmac scheme checks `prefix` + hex/base64 HMAC-SHA1/256/512 of the body."""
    digest = hmac.new(SECRET.encode(), BODY, algorithm).digest()
    text = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    config = verify_config(
        "hmac", SECRET, header="X-Sig", algorithm=algorithm, encoding=encoding, prefix=prefix
    )
    assert verify(config, CIMultiDict({"X-Sig": prefix + text}), BODY, NOW).ok
    assert not verify(config, CIMultiDict({"X-Sig": prefix + text}), BODY + b".", NOW).ok
    if prefix:
        verdict = verify(config, CIMultiDict({"X-Sig": text}), BODY, NOW)
        assert verdict == Verdict(False, f"malformed X-Sig (expected prefix {prefix!r})", None)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("secret_chars", [1, 64, 65, 128, 129, 300])
def test_hmac_accepts_secrets_of_any_length(algorithm: str, secret_chars: int) -> None:
    """Secrets longer than the hash's block (64 bytes, 128 for SHA-512) are hashed first, as
    RFC 2104 says; a signature made by Python's hmac module is accepted at every length."""
    secret = "k" * secret_chars
    digest = hmac.new(secret.encode(), BODY, algorithm).hexdigest()
    config = verify_config("hmac", secret, header="X-Sig", algorithm=algorithm)
    assert verify(config, CIMultiDict({"X-Sig": digest}), BODY, NOW).ok
    other = verify_config("hmac", secret + "k", header="X-Sig", algorithm=algorithm)
    assert not verify(other, CIMultiDict({"X-Sig": digest}), BODY, NOW).ok


def test_hmac_hex_is_accepted_in_upper_case() -> None:
    """Hex is case-insensitive: a sender writing upper-case hex digits is accepted."""
    config = verify_config("hmac", SECRET, header="X-Sig")
    upper = hmac.new(SECRET.encode(), BODY, "sha256").hexdigest().upper()
    assert verify(config, CIMultiDict({"X-Sig": upper}), BODY, NOW).ok


def test_hmac_with_the_wrong_algorithm_says_so() -> None:
    """A sender using SHA-1 where sha256 is configured is told apart from a wrong secret."""
    config = verify_config("hmac", SECRET, header="X-Sig", algorithm="sha256")
    sha1 = hmac.new(SECRET.encode(), BODY, "sha1").hexdigest()
    verdict = verify(config, CIMultiDict({"X-Sig": sha1}), BODY, NOW)
    assert verdict == Verdict(
        False,
        "signature mismatch (20-byte signature, sha256 makes 32; check algorithm and encoding)",
        None,
    )


def test_hmac_without_id_header_has_no_delivery_id() -> None:
    """The hmac and token schemes name a delivery id only when `id_header` is set."""
    config = verify_config("hmac", SECRET, header="X-Sig")
    headers = provider_headers(config, BODY, NOW, "abc")
    assert headers.keys() == {"X-Sig"}
    assert verify(config, CIMultiDict({**headers, "X-Request-Id": "r"}), BODY, NOW) == Verdict(
        True, "", None
    )


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (f"Bearer {SECRET}", True),
        (f"bearer {SECRET}", True),
        (f"BEARER  {SECRET}", True),
        (SECRET, False),
        (f"Basic {SECRET}", False),
        (f"Bearer {SECRET}x", False),
        (f"Bearer {SECRET[:-1]}", False),
        ("Bearer ", False),
    ],
)
def test_token_in_authorization_needs_the_bearer_scheme(value: str, ok: bool) -> None:
    """With header Authorization the token is sent as "Bearer <secret>", any case of "Bearer"."""
    config = verify_config("token", SECRET, header="Authorization")
    assert verify(config, CIMultiDict({"Authorization": value}), b"", NOW).ok is ok


def test_token_default_header_is_authorization_bearer() -> None:
    """A token config with no header (SPEC default) checks Authorization: Bearer."""
    config = verify_config("token", SECRET)
    assert verify(config, CIMultiDict({"Authorization": f"Bearer {SECRET}"}), b"", NOW).ok
    assert provider_headers(config, b"", NOW, "x") == {"Authorization": f"Bearer {SECRET}"}


def test_token_in_a_custom_header_is_the_bare_secret() -> None:
    """GitLab style: X-Gitlab-Token carries the secret itself, with no "Bearer"."""
    config = verify_config("token", SECRET, header="X-Gitlab-Token")
    assert verify(config, CIMultiDict({"X-Gitlab-Token": SECRET}), b"", NOW).ok
    assert not verify(config, CIMultiDict({"X-Gitlab-Token": f"Bearer {SECRET}"}), b"", NOW).ok


def test_a_non_ascii_token_matches_its_utf8_bytes() -> None:
    """A secret with non-ASCII characters matches the same text sent as UTF-8, and nothing
    else: not its Latin-1 bytes as aiohttp would surrogate-escape them."""
    secret = "pässwört"
    config = verify_config("token", secret, header="X-Token")
    as_latin1 = secret.encode("latin-1").decode("utf-8", "surrogateescape")
    assert verify(config, CIMultiDict({"X-Token": secret}), b"", NOW).ok
    assert not verify(config, CIMultiDict({"X-Token": as_latin1}), b"", NOW).ok


@pytest.mark.parametrize(
    ("credentials", "ok"),
    [
        (b"relay:pass:word", True),
        (b"relay:pass:word2", False),
        (b"Relay:pass:word", False),
        (b"relay:", False),
        (b"relay", False),
        (b"", False),
    ],
)
def test_basic_checks_username_and_password(credentials: bytes, ok: bool) -> None:
    """HTTP Basic: both username and password must match (the password may contain ':')."""
    config = verify_config("basic", username="relay", password="pass:word")
    value = "Basic " + base64.b64encode(credentials).decode()
    assert verify(config, CIMultiDict({"Authorization": value}), b"", NOW).ok is ok


@pytest.mark.parametrize(
    ("scheme", "headers", "reason"),
    [
        ("github", {}, "missing X-Hub-Signature-256"),
        (
            "github",
            {"X-Hub-Signature-256": "sha1=" + "0" * 40},
            "malformed X-Hub-Signature-256 (expected sha256=<hex>)",
        ),
        (
            "stripe",
            {"Stripe-Signature": "v1=00"},
            "malformed Stripe-Signature (no t=<unix seconds>)",
        ),
        ("stripe", {"Stripe-Signature": "t=1,v0=00"}, "malformed Stripe-Signature (no v1=<hex>)"),
        (
            "slack",
            {"X-Slack-Signature": "v0=00", "X-Slack-Request-Timestamp": "1e9"},
            "malformed X-Slack-Request-Timestamp (expected unix seconds)",
        ),
        (
            "shopify",
            {"X-Shopify-Hmac-Sha256": "no!"},
            "malformed X-Shopify-Hmac-Sha256 (expected base64)",
        ),
        (
            "standard",
            {"webhook-id": "m", "webhook-timestamp": "-5", "webhook-signature": "v1,AA=="},
            "malformed webhook-timestamp (expected unix seconds)",
        ),
        (
            "standard",
            {"webhook-id": "m", "webhook-timestamp": "5", "webhook-signature": "v1a,AA=="},
            "malformed webhook-signature (no v1,<base64> entry)",
        ),
    ],
)
def test_rejection_reasons_name_the_failed_check(
    scheme: str, headers: dict[str, str], reason: str
) -> None:
    """The log line says which check failed and about which header, without its value."""
    config = verify_config(scheme, STANDARD_SECRET)
    assert verify(config, CIMultiDict(headers), BODY, NOW) == Verdict(False, reason, None)


@pytest.mark.parametrize(
    "stamp",
    [
        "+1700000000",
        " 1700000000",
        "1700000000 ",
        "1_700_000_000",
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",
    ],
)
def test_timestamps_must_be_plain_ascii_digits(stamp: str) -> None:
    """Timestamps are unix seconds in ASCII digits; signs, spaces, underscores and other
    scripts' digits (all of which Python's int() would take) are malformed."""
    config = verify_config("slack", SECRET)
    signature = "v0=" + _hex_mac(SECRET, f"v0:{stamp}:".encode() + BODY)
    headers = CIMultiDict({"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature})
    verdict = verify(config, headers, BODY, NOW)
    assert verdict == Verdict(
        False, "malformed X-Slack-Request-Timestamp (expected unix seconds)", None
    )


def test_a_rejected_request_names_no_delivery_id() -> None:
    """Only an accepted request's delivery id is reported, so a forged id never reaches dedupe."""
    headers = _github(OTHER_SECRET, BODY, NOW)
    verdict = verify(verify_config("github", SECRET), CIMultiDict(headers), BODY, NOW)
    assert verdict == Verdict(False, "signature mismatch", None)


def test_a_missing_or_empty_delivery_id_header_is_none() -> None:
    """A github request without X-GitHub-Delivery, or with it empty, is accepted with no
    delivery id (so dedupe never keys on "")."""
    headers = _github(SECRET, BODY, NOW)
    config = verify_config("github", SECRET)
    headers["X-GitHub-Delivery"] = ""
    assert verify(config, CIMultiDict(headers), BODY, NOW) == Verdict(True, "", None)
    del headers["X-GitHub-Delivery"]
    assert verify(config, CIMultiDict(headers), BODY, NOW) == Verdict(True, "", None)


def test_repeated_signature_headers_use_the_first() -> None:
    """With a signature header repeated, the first value is the one checked."""
    good = _github(SECRET, BODY, NOW)["X-Hub-Signature-256"]
    config = verify_config("github", SECRET)
    first_good = CIMultiDict([("X-Hub-Signature-256", good), ("X-Hub-Signature-256", "x")])
    first_bad = CIMultiDict([("X-Hub-Signature-256", "x"), ("X-Hub-Signature-256", good)])
    assert verify(config, first_good, BODY, NOW).ok
    assert not verify(config, first_bad, BODY, NOW).ok


# --- never raises --------------------------------------------------------------------

ALL_HEADERS = sorted(
    {name for scheme in SCHEMES for name in scheme.sign(scheme.secret, BODY, NOW)}
    | {"Authorization", "X-Sig"}
)
PREFIXES = ["", "sha256=", "v0=", "t=1700000000,v1=", "v1,", "Bearer ", "Basic ", "sha512="]
header_text = st.one_of(
    st.text(),
    st.text(st.characters(exclude_categories=())),  # with lone surrogates and controls
    st.binary().map(lambda raw: raw.decode("utf-8", "surrogateescape")),  # as aiohttp decodes
    st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), st.text()),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(SCHEMES),
    headers=st.dictionaries(st.sampled_from(ALL_HEADERS), header_text),
    body=st.binary(max_size=256),
)
def test_any_header_values_give_a_verdict_and_never_raise(
    scheme: Scheme, headers: dict[str, str], body: bytes
) -> None:
    """Whatever arrives — random text, control characters, non-UTF-8 bytes, lone surrogates —
    every scheme answers with a Verdict (a 401 at worst), never an exception (a 500)."""
    verdict = verify(scheme.config(scheme.secret), CIMultiDict(headers), body, NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.ok is False or verdict.reason == ""


@settings(max_examples=200, deadline=None)
@given(scheme=st.sampled_from(SIGNED), body=st.binary(max_size=256), flip=st.integers(0, 255))
def test_any_body_round_trips_and_any_changed_byte_is_rejected(
    scheme: Scheme, body: bytes, flip: int
) -> None:
    """For any body, the provider's signature verifies and a single changed byte does not."""
    config = scheme.config(scheme.secret)
    headers = CIMultiDict(provider_headers(config, body, NOW, "id"))
    assert verify(config, headers, body, NOW).ok
    changed = body + b"\x00" if not body else bytes([body[0] ^ (flip or 1)]) + body[1:]
    assert not verify(config, headers, changed, NOW).ok


# --- outbound signing (SPEC §4) ------------------------------------------------------


@pytest.mark.usefixtures("frozen_provider_clocks")
def test_standard_sign_with_two_secrets_gives_one_entry_each() -> None:
    """During rotation a target's signature carries one v1 entry per secret, and a receiver
    holding either secret accepts it."""
    config = sign_config("standard", STANDARD_SECRET, OTHER_STANDARD_SECRET)
    headers = sign(config, "dlv_01", BODY, NOW)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    assert all(entry.startswith("v1,") for entry in entries)
    for secret, entry in zip((STANDARD_SECRET, OTHER_STANDARD_SECRET), entries, strict=True):
        only = {**headers, "webhook-signature": entry}
        standardwebhooks.webhooks.Webhook(secret).verify(BODY, only, json_parse=False)
        svix.webhooks.Webhook(secret).verify(BODY, headers)


def test_standard_sign_has_a_fresh_timestamp_each_attempt_and_a_stable_id() -> None:
    """Each attempt gets its own timestamp and signature; webhook-id (the delivery id) stays."""
    config = sign_config("standard", STANDARD_SECRET)
    first = sign(config, "dlv_01", BODY, NOW)
    retry = sign(config, "dlv_01", BODY, NOW + 30.5)
    assert first["webhook-id"] == retry["webhook-id"] == "dlv_01"
    assert first["webhook-timestamp"] == str(int(NOW))
    assert retry["webhook-timestamp"] == str(int(NOW + 30))
    assert first["webhook-signature"] != retry["webhook-signature"]
    assert first.keys() == {"webhook-id", "webhook-timestamp", "webhook-signature"}


def test_standard_sign_verifies_with_relay_verify() -> None:
    """A relay in front of another relay: what one signs, the other's standard source accepts."""
    headers = sign(sign_config("standard", STANDARD_SECRET), "dlv_02", BODY, NOW)
    verdict = verify(verify_config("standard", STANDARD_SECRET), CIMultiDict(headers), BODY, NOW)
    assert verdict == Verdict(True, "", "dlv_02")


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_hmac_sign_is_accepted_by_the_matching_hmac_verify(algorithm: str, encoding: str) -> None:
    """`sign = { scheme = "hmac", ... }` puts prefix + encoded body HMAC in one header, which a
    source with the same settings accepts."""
    signing = sign_config(
        "hmac",
        SECRET,
        header="X-Relay-Signature",
        algorithm=algorithm,
        encoding=encoding,
        prefix="sig=",
    )
    headers = sign(signing, "dlv_03", BODY, NOW)
    assert headers.keys() == {"X-Relay-Signature"}
    digest = hmac.new(SECRET.encode(), BODY, algorithm).digest()
    encoded = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    assert headers["X-Relay-Signature"] == "sig=" + encoded
    checking = verify_config(
        "hmac",
        SECRET,
        header="X-Relay-Signature",
        algorithm=algorithm,
        encoding=encoding,
        prefix="sig=",
    )
    assert verify(checking, CIMultiDict(headers), BODY, NOW).ok


def test_hmac_sign_uses_the_first_secret() -> None:
    """With several hmac signing secrets the first one signs (one header holds one value)."""
    headers = sign(sign_config("hmac", SECRET, OTHER_SECRET, header="X-Sig"), "d", BODY, NOW)
    assert headers == {"X-Sig": _hex_mac(SECRET, BODY)}


# --- relay send: provider_headers ------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_provider_headers_round_trip_through_verify(scheme: Scheme) -> None:
    """`relay send` signs like the provider: its headers pass the source's own verify, as a
    multidict or a plain dict, and carry the delivery id where the scheme has one."""
    config = scheme.config(scheme.secret, scheme.other_secret)
    headers = provider_headers(config, BODY, NOW, "snd_01")
    expected_id = "snd_01" if scheme.delivery_id is not None else None
    assert verify(config, CIMultiDict(headers), BODY, NOW) == Verdict(True, "", expected_id)
    assert verify(config, headers, BODY, NOW).ok


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_provider_headers_match_the_providers_own_signing(scheme: Scheme) -> None:
    """`relay send` sends the very headers the provider (its library, where it has one) would:
    same names, same values, delivery id included where the scheme has one."""
    config = scheme.config(scheme.secret)
    ours = provider_headers(config, BODY, NOW, scheme.delivery_id or "unused")
    assert ours == scheme.sign(scheme.secret, BODY, NOW)


def test_new_standard_secret_is_whsec_base64_of_24_random_bytes() -> None:
    """`relay init` secrets are "whsec_" + base64 of 24 random bytes, usable by standardwebhooks
    and different every time."""
    secret = new_standard_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert new_standard_secret() != secret
    headers = sign(sign_config("standard", secret), "dlv_04", BODY, NOW)
    assert verify(verify_config("standard", secret), CIMultiDict(headers), BODY, NOW).ok
    library = standardwebhooks.webhooks.Webhook(secret)
    assert library.sign("dlv_04", at(NOW), BODY.decode()) == headers["webhook-signature"]


def test_a_reload_forgets_the_prepared_keys_of_old_secrets() -> None:
    """Keys prepared for verifying are dropped by `forget_keys` (a reload calls it), so a
    rotated-out secret is not kept in memory for the life of the process."""
    old = verify_config("github", "rotated-out-secret")
    digest = hmac.new(b"rotated-out-secret", BODY, "sha256").hexdigest()
    headers = {"X-Hub-Signature-256": f"sha256={digest}"}
    assert verify(old, headers, BODY, NOW).ok
    assert signing._keyed.cache_info().currsize > 0
    signing.forget_keys()
    assert signing._keyed.cache_info().currsize == 0
    assert signing._encoded.cache_info().currsize == 0
    assert verify(old, headers, BODY, NOW).ok  # prepared again when next needed
