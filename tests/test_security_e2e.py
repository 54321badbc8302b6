"""End-to-end inbound security: provider-library signatures, dedupe, handshakes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
import slack_sdk.signature
import stripe
import svix.webhooks
import trustme

from conftest import CORPUS, REPO, Daemon, Receiver, eventually, free_port, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]

GITHUB_SECRET = "gh-secret-for-tests"
STRIPE_SECRET = "whsec_stripe_test_secret"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
META_TOKEN = "meta-verify-token"


def config(tmp_path: Path, url: str, listen_port: int = 0, **github: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in github.items())
    return (
        server_toml(tmp_path, listen_port=listen_port)
        + f"""
[sources.github]
verify = {{ scheme = "github", secret = ["old-rotated-secret", "{GITHUB_SECRET}"] }}
{extra}
[sources.stripe]
verify = {{ scheme = "stripe", secret = "{STRIPE_SECRET}" }}
dedupe = "1h"
[sources.slack]
verify = {{ scheme = "slack", secret = "{SLACK_SECRET}" }}
challenge = "slack"
[sources.svix]
verify = {{ scheme = "standard", secret = "{STANDARD_SECRET}" }}
[sources.meta]
verify = {{ scheme = "token", header = "X-Token", secret = "{META_TOKEN}" }}
challenge = "meta"
[targets.svc]
url = "{url}"
[[routes]]
name = "all-github"
source = "github"
targets = ["svc"]
[[routes]]
name = "all-stripe"
source = "stripe"
targets = ["svc"]
[[routes]]
name = "all-slack"
source = "slack"
targets = ["svc"]
[[routes]]
name = "all-svix"
source = "svix"
targets = ["svc"]
"""
    )


def github_headers(body: bytes, delivery: str, secret: str = GITHUB_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": "push",
    }


async def test_github_signature_checked_on_the_raw_body(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A correctly signed real payload is accepted; tampered or unsigned ones get a bare 401."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url))
    body = (CORPUS / "push.json").read_bytes()
    status, reply, _ = await daemon.post("/hooks/github", body, github_headers(body, "d-1"))
    assert status == 202
    tampered = body.replace(b"Codertocat", b"Codertocas", 1)
    status, reply, _ = await daemon.post("/hooks/github", tampered, github_headers(body, "d-2"))
    assert (status, reply) == (401, {"error": "unauthorized"})
    rejected = await daemon.wait_log("event.rejected", status=401)
    assert rejected is not None
    assert rejected["reason"] == "verify github: signature mismatch"
    status, _, _ = await daemon.post("/hooks/github", body, {"X-GitHub-Event": "push"})
    assert status == 401
    missing = "verify github: missing X-Hub-Signature-256"
    assert await daemon.wait_log("event.rejected", reason=missing)
    bad = github_headers(body, "d-3", secret="wrong")
    bad["X-Hub-Signature-256"] = "sha256=é" + bad["X-Hub-Signature-256"][8:]
    status, _, _ = await daemon.post("/hooks/github", body, bad)
    assert status == 401
    await eventually(lambda: len(svc.requests) == 1)
    assert svc.requests[0].body == body
    assert daemon.query("SELECT count(*) FROM events") == [(1,)]
    assert not any("gh-secret-for-tests" in str(line) for line in daemon.lines)


async def test_stripe_slack_and_standard_signatures_from_their_libraries(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Requests signed by stripe, slack_sdk and svix are accepted; a stale Stripe one is not."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url))
    now = int(time.time())
    stripe_body = orjson.dumps({"id": "evt_stripe_1", "type": "invoice.paid"})
    header = stripe.WebhookSignature.generate_signature_header(
        stripe_body.decode(), STRIPE_SECRET, now
    )
    assert (await daemon.post("/hooks/stripe", stripe_body, {"Stripe-Signature": header}))[0] == 202
    stale = stripe.WebhookSignature.generate_signature_header(
        stripe_body.decode(), STRIPE_SECRET, now - 600
    )
    assert (await daemon.post("/hooks/stripe", stripe_body, {"Stripe-Signature": stale}))[0] == 401

    slack_body = b'{"type": "event_callback", "event_id": "Ev1"}'
    signature = slack_sdk.signature.SignatureVerifier(SLACK_SECRET).generate_signature(
        timestamp=str(now), body=slack_body.decode()
    )
    slack_headers = {"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": str(now)}
    assert (await daemon.post("/hooks/slack", slack_body, slack_headers))[0] == 202

    svix_body = b'{"type": "user.created"}'
    signed = svix.webhooks.Webhook(STANDARD_SECRET).sign(
        "msg_1", datetime.fromtimestamp(now, UTC), svix_body.decode()
    )
    standard_headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signed,
    }
    assert (await daemon.post("/hooks/svix", svix_body, standard_headers))[0] == 202
    future = {**standard_headers, "webhook-timestamp": str(now + 3600)}
    assert (await daemon.post("/hooks/svix", svix_body, future))[0] == 401
    await eventually(lambda: len(svc.requests) == 3)


async def test_repeats_are_answered_as_duplicates_across_a_restart(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A provider's retry of a delivery it never saw acknowledged creates no second delivery."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url, dedupe='"24h"'))
    body = b'{"ref": "refs/heads/main"}'
    status, first, _ = await daemon.post("/hooks/github", body, github_headers(body, "gh-42"))
    assert (status, first["deliveries"]) == (202, 1)
    status, again, _ = await daemon.post("/hooks/github", body, github_headers(body, "gh-42"))
    assert (status, again) == (200, {"id": first["id"], "duplicate": True})
    duplicate = await daemon.wait_log("event.duplicate")
    assert duplicate is not None
    assert (duplicate["event_id"], duplicate["dedupe_key"]) == (first["id"], "gh-42")
    await daemon.stop()
    await daemon.start()
    status, after_restart, _ = await daemon.post(
        "/hooks/github", body, github_headers(body, "gh-42")
    )
    assert (status, after_restart["id"]) == (200, first["id"])
    status, other, _ = await daemon.post("/hooks/github", body, github_headers(body, "gh-43"))
    assert (status, other["deliveries"]) == (202, 1)
    await eventually(lambda: len(svc.requests) == 2)
    assert daemon.query("SELECT count(*) FROM events") == [(2,)]


async def test_stripe_dedupes_on_the_event_id_in_the_body(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Stripe's retries carry the same body.id with a fresh signature: still one delivery."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url))
    body = orjson.dumps({"id": "evt_same", "type": "charge.refunded"})
    replies = []
    for offset in (0, 1):
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode(), STRIPE_SECRET, int(time.time()) - offset
        )
        replies.append(await daemon.post("/hooks/stripe", body, {"Stripe-Signature": header}))
    assert [status for status, _, _ in replies] == [202, 200]
    assert replies[1][1] == {"id": replies[0][1]["id"], "duplicate": True}


async def test_provider_handshakes_are_answered_and_not_journaled(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Slack's url_verification and Meta's hub.challenge get their answers; nothing is stored."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url))
    now = str(int(time.time()))
    body = b'{"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "token": "x"}'  # noqa: E501 - Slack's documented example
    signature = slack_sdk.signature.SignatureVerifier(SLACK_SECRET).generate_signature(
        timestamp=now, body=body.decode()
    )
    status, reply, _ = await daemon.post(
        "/hooks/slack", body, {"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": now}
    )
    assert (status, reply) == (
        200,
        {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"},
    )
    odd = b'{"type": "url_verification", "challenge": "abc\\ud800"}'  # valid JSON
    signature = slack_sdk.signature.SignatureVerifier(SLACK_SECRET).generate_signature(
        timestamp=now, body=odd.decode()
    )
    status, reply, _ = await daemon.post(
        "/hooks/slack", odd, {"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": now}
    )
    assert (status, reply) == (200, {"challenge": "abc\ufffd"})  # not a 500
    query = {"hub.mode": "subscribe", "hub.verify_token": META_TOKEN, "hub.challenge": "1158201444"}
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.url("/hooks/meta"), params=query) as response:
            assert (response.status, await response.text()) == (200, "1158201444")
        wrong = {**query, "hub.verify_token": "guess"}
        async with session.get(daemon.url("/hooks/meta"), params=wrong) as response:
            assert response.status == 403
        async with session.put(daemon.url("/hooks/meta"), data=b"{}") as response:
            assert (response.status, response.headers["Allow"]) == (405, "GET, POST")
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


async def relay_command(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_relay_send_signs_like_the_provider(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay send` signs as GitHub, Stripe, Slack or Svix would, and the daemon accepts it."""
    svc = await receivers()
    daemon = await daemons(config(tmp_path, svc.url, listen_port=free_port()))
    for source in ("github", "stripe", "slack", "svix"):
        code, out, err = await relay_command(
            "send", source, "-c", str(daemon.config_path), "--data", f'{{"id": "x-{source}"}}',
            "-H", "X-GitHub-Event: ping",
        )  # fmt: skip
        assert (code, err) == (0, ""), (source, out)
        status, reply = out.split(" ", 1)
        assert status == "202"
        assert orjson.loads(reply)["deliveries"] == 1
    await eventually(lambda: len(svc.requests) == 4)
    assert {r.headers["X-Relay-Source"] for r in svc.requests} == {
        "github", "stripe", "slack", "svix",
    }  # fmt: skip
    await daemon.stop()
    code, _, err = await relay_command("send", "github", "-c", str(daemon.config_path))
    assert code == 69
    assert err.startswith("relay: daemon unreachable at http://127.0.0.1:")


async def test_tls_listener_serves_https(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """With tls_cert and tls_key the listener speaks HTTPS with that certificate."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    certificate.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    svc = await receivers()
    text = config(tmp_path, svc.url, listen_port=free_port()).replace(
        "[server]",
        f'[server]\ntls_cert = "{tmp_path / "server.pem"}"\ntls_key = "{tmp_path / "server.key"}"',
    )
    daemon = await daemons(text)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    body = b'{"secure": true}'
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"https://{daemon.listen}/hooks/github", data=body,
            headers={**github_headers(body, "tls-1"), "Content-Type": "application/json"},
            ssl=client_context,
        ) as response:  # fmt: skip
            assert response.status == 202
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.post(f"https://{daemon.listen}/hooks/github", data=body)
    code, out, _ = await relay_command(
        "send", "github", "-c", str(daemon.config_path), "--insecure", "--data", "{}"
    )
    assert code == 0
    assert out.startswith("202 ")
    await eventually(lambda: len(svc.requests) == 2)


async def test_allow_from_checks_the_peer_over_ipv4_and_ipv6(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """Only peers inside allow_from may post (IPv4 and IPv6 alike); others get a 403."""
    daemon = await daemons(
        server_toml(tmp_path).replace('listen = "127.0.0.1:0"', 'listen = "[::1]:0"')
        + """
[sources.v6]
allow_from = ["::1/128"]
[sources.v4only]
allow_from = ["127.0.0.0/8", "192.0.2.0/24"]
[sources.elsewhere]
allow_from = ["2001:db8::/32"]
"""
    )
    assert daemon.listen.startswith("[::1]:")
    assert (await daemon.post("/hooks/v6", b"{}"))[0] == 202
    status, reply, _ = await daemon.post("/hooks/v4only", b"{}")
    assert (status, reply) == (403, {"error": "source address not allowed"})
    assert (await daemon.post("/hooks/elsewhere", b"{}"))[0] == 403
    assert await daemon.wait_log("event.rejected", status=403, remote="::1") is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.url("/hooks/elsewhere")) as response,
    ):
        assert response.status == 405  # SPEC §3 order: the method is checked before the peer


async def test_a_client_that_hangs_up_does_not_abort_the_journal_write(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A sender that disconnects right after its body still gets its event kept and delivered."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )
    host, port = daemon.listen.rsplit(":", 1)
    for n in range(20):
        _, writer = await asyncio.open_connection(host, int(port))
        body = orjson.dumps({"n": n})
        writer.write(
            b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.transport.abort()  # gone before any answer
    await eventually(lambda: len(svc.requests) == 20)
    assert sorted(orjson.loads(r.body)["n"] for r in svc.requests) == list(range(20))


async def test_oversized_headers_get_a_4xx(tmp_path: Path, daemons: DaemonFactory) -> None:
    """A header line beyond 8 KiB, or too many headers, is refused with a 4xx."""
    daemon = await daemons(server_toml(tmp_path) + "[sources.app]\n")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            daemon.url("/hooks/app"), data=b"{}", headers={"X-Big": "y" * 20_000}
        ) as response:
            assert 400 <= response.status < 500
        many = {f"X-H{n}": "v" for n in range(200)}
        async with session.post(daemon.url("/hooks/app"), data=b"{}", headers=many) as response:
            assert 400 <= response.status < 500
    assert await daemon.ready() == 200


async def test_a_burst_over_the_rate_limit_gets_429s_and_the_rest_is_delivered(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Over rate_limit: 429 with Retry-After; every request that got a 202 is delivered."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
rate_limit = "5/m"
burst = 4
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )
    results = await asyncio.gather(*(daemon.post("/hooks/app", {"n": n}) for n in range(12)))
    accepted = [reply["id"] for status, reply, _ in results if status == 202]
    limited = [(reply, headers) for status, reply, headers in results if status == 429]
    assert len(accepted) == 4
    assert len(limited) == 8
    for reply, headers in limited:
        assert reply == {"error": "over rate_limit 5/60s"}
        assert 1 <= int(headers["Retry-After"]) <= 12
    await eventually(lambda: sorted(svc.event_ids()) == sorted(accepted))


async def test_dedupe_on_a_key_expression(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`dedupe = { key = "body.id" }` treats events with the same body.id as one."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
dedupe = {{ key = "body.id", window = "1h" }}
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )
    first = await daemon.post("/hooks/app", {"id": 7, "v": 1})
    repeat = await daemon.post("/hooks/app", {"id": 7, "v": 2})
    other = await daemon.post("/hooks/app", {"id": 8})
    no_key = [await daemon.post("/hooks/app", {"v": n}) for n in range(2)]
    assert [r[0] for r in (first, repeat, other, *no_key)] == [202, 200, 202, 202, 202]
    assert repeat[1] == {"id": first[1]["id"], "duplicate": True}
    await eventually(lambda: len(svc.requests) == 4)
