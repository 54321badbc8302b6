"""End-to-end rules: filters at ingest and transforms at send time, in the real daemon."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from conftest import CORPUS, REPO, Daemon, Receiver, eventually, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]
INDEX = json.loads((CORPUS / "index.json").read_text())


async def post_corpus(daemon: Daemon) -> dict[str, str]:
    """Send every corpus payload with its X-GitHub-Event; event id -> file name."""
    sent = {}
    for entry in INDEX:
        status, reply, _ = await daemon.post(
            "/hooks/github", (CORPUS / entry["file"]).read_bytes(),
            {"X-GitHub-Event": entry["event"]},
        )  # fmt: skip
        assert status == 202, reply
        sent[reply["id"]] = entry["file"]
    return sent


async def test_github_routes_on_event_header_and_action(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Each corpus payload reaches exactly the targets whose route matches it, unchanged."""
    ci, triage = await receivers(), await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.github]
[targets.ci]
url = "{ci.url}"
[targets.triage]
url = "{triage.url}"
[[routes]]
name = "pushes"
source = "github"
filter = "headers.x_github_event == 'push'"
targets = ["ci"]
[[routes]]
name = "closed-prs"
source = "github"
filter = "headers.x_github_event == 'pull_request' && body.action == 'closed'"
targets = ["ci", "triage"]
[[routes]]
name = "issue-edits"
source = "github"
filter = "headers.x_github_event == 'issues' && body.action == 'edited'"
targets = ["triage"]
"""
    )
    sent = await post_corpus(daemon)
    by_file = {e["file"]: e for e in INDEX}

    def expected(*wanted: tuple[str, str | None]) -> list[str]:
        return sorted(
            event_id for event_id, file in sent.items()
            if any(by_file[file]["event"] == ev and action in (None, by_file[file]["action"])
                   for ev, action in wanted)
        )  # fmt: skip

    ci_ids = expected(("push", None), ("pull_request", "closed"))
    triage_ids = expected(("pull_request", "closed"), ("issues", "edited"))
    assert ci_ids
    assert triage_ids
    await eventually(lambda: len(ci.requests) == len(ci_ids))
    await eventually(lambda: len(triage.requests) == len(triage_ids))
    assert sorted(ci.event_ids()) == ci_ids
    assert sorted(triage.event_ids()) == triage_ids
    for request in ci.requests + triage.requests:
        assert request.body == (CORPUS / sent[request.headers["X-Relay-Event-Id"]]).read_bytes()
    unrouted = daemon.query("SELECT count(*) FROM events WHERE status = 'unrouted'")
    assert unrouted == [(len(sent) - len(set(ci_ids) | set(triage_ids)),)]


async def test_transform_reshapes_a_stripe_event_for_chat(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A Stripe-shaped event arrives at the chat target as the transform's JSON, byte for byte."""
    chat = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.stripe]
[targets.chat]
url = "{chat.url}"
[[routes]]
name = "payments-to-chat"
source = "stripe"
filter = "contains(['invoice.paid', 'charge.refunded'], body.type)"
transform = "{{text: format('Stripe {{}}: {{}}', body.type, body.data.object.id)}}"
set_headers = {{ "X-Origin" = "stripe" }}
drop_headers = ["Stripe-Signature"]
targets = ["chat"]
"""
    )
    event = {"id": "evt_1", "type": "invoice.paid", "data": {"object": {"id": "in_42"}}}
    ignored = {"id": "evt_2", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}
    await daemon.post("/hooks/stripe", ignored, {"Stripe-Signature": "t=1,v1=00"})
    status, reply, _ = await daemon.post("/hooks/stripe", event, {"Stripe-Signature": "t=1,v1=00"})
    assert (status, reply["deliveries"]) == (202, 1)
    await eventually(lambda: chat.requests)
    (request,) = chat.requests
    assert request.body == b'{"text":"Stripe invoice.paid: in_42"}'
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Origin"] == "stripe"
    assert "Stripe-Signature" not in request.headers


async def test_filter_errors_are_recorded_on_the_event(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A filter that raises on some payloads: those are still accepted, with the error kept."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "long-names"
source = "app"
filter = "length(body.name) > `3`"
targets = ["svc"]
"""
    )
    _, good, _ = await daemon.post("/hooks/app", {"name": "relay"})
    status, bad, _ = await daemon.post("/hooks/app", {"name": 12})
    assert status == 202
    assert bad["deliveries"] == 0
    await eventually(lambda: svc.event_ids() == [good["id"]])
    rows = dict(daemon.query("SELECT id, routes FROM events"))
    assert orjson.loads(rows[good["id"]]) == [
        {"name": "long-names", "matched": True, "error": None}
    ]
    (decision,) = orjson.loads(rows[bad["id"]])
    assert decision["matched"] is False
    assert "length()" in decision["error"]


async def test_a_raising_transform_makes_the_delivery_dead(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A transform that fails on a payload kills that delivery with the error as its reason."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "shout"
source = "app"
transform = "{{text: upper(body.text)}}"
targets = ["svc"]
"""
    )
    _, good, _ = await daemon.post("/hooks/app", {"text": "hi"})
    _, bad, _ = await daemon.post("/hooks/app", {"text": 5})
    dead = await daemon.wait_log("delivery.dead", event_id=bad["id"])
    assert dead["reason"].startswith("transform failed: ")
    await eventually(lambda: [r.body for r in svc.requests] == [b'{"text":"HI"}'])
    assert svc.event_ids() == [good["id"]]
    assert daemon.query("SELECT status FROM events WHERE id = ?", (bad["id"],)) == [("dead",)]


async def test_integers_beyond_64_bits_are_exact_for_filters_and_transforms(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A filter on a 20-digit id matches it exactly at ingest, and a transform sends it
    back digit for digit (orjson alone gives both a float)."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "big"
source = "app"
filter = "body.id == `18446744073709551617`"
transform = "{{id: body.id}}"
targets = ["svc"]
"""
    )
    _, reply, _ = await daemon.post("/hooks/app", b'{"id": 18446744073709551617}')
    assert reply["deliveries"] == 1
    await eventually(lambda: [r.body for r in svc.requests] == [b'{"id":18446744073709551617}'])


async def test_a_transform_error_quoting_a_lone_surrogate_is_stored(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A transform error that quotes a lone surrogate from the body (valid JSON) is stored
    with U+FFFD: the delivery ends dead at once, instead of failing its journal write and
    holding the lane off every 2 s until max_age."""
    svc = await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "size"
source = "app"
transform = "{{v: abs(body.s)}}"
targets = ["svc"]
"""
    )
    _, odd, _ = await daemon.post("/hooks/app", b'{"s": "\\ud800"}')
    dead = await daemon.wait_log("delivery.dead", event_id=odd["id"])
    assert "\ufffd" in dead["reason"]
    assert daemon.query("SELECT status FROM events WHERE id = ?", (odd["id"],)) == [("dead",)]
    assert not daemon.events("journal.write_failed")


async def test_fixing_a_transform_repairs_unfinished_deliveries(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Transforms run at send time: deliveries still pending after a config fix use the fix."""
    svc = await receivers()
    svc.default = (503, {}, b"down")
    config = (
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
retry = {{ attempts = 50, first = "50ms", max = "100ms" }}
[[routes]]
name = "reshape"
source = "app"
transform = "{{summary: body.wrong_field}}"
targets = ["svc"]
"""
    )
    daemon = await daemons(config)
    _, reply, _ = await daemon.post("/hooks/app", {"title": "fixed"})
    await eventually(lambda: svc.requests)
    assert svc.requests[0].body == b'{"summary":null}'
    assert await daemon.stop() == 0
    daemon.config_path.write_text(config.replace("body.wrong_field", "body.title"))
    svc.default = (200, {}, b"ok")
    seen = len(svc.requests)
    await daemon.start()
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert svc.requests[-1].body == b'{"summary":"fixed"}'
    assert len(svc.requests) > seen


def test_relay_test_shows_a_slack_handshake_as_the_daemon_answers_it(tmp_path: Path) -> None:
    """A Slack url_verification body on a `challenge = "slack"` source is a handshake: the
    dry run plans no route and no delivery, as the daemon journals nothing for it."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[sources.slack]\nverify = { scheme = "slack", secret = "s" }\nchallenge = "slack"\n'
        '[targets.console]\nurl = "log:"\n[[routes]]\nname = "r"\nsource = "slack"\n'
        'targets = ["console"]\n'
    )
    config.chmod(0o600)
    body = '{"type": "url_verification", "challenge": "abc"}'
    command = [sys.executable, "-m", "relay", "test", "-c", str(config), "--source", "slack",
               "--data", body]  # fmt: skip
    text = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert "a slack handshake: the daemon answers it with its challenge" in text.stdout
    plan = json.loads(
        subprocess.run(
            [*command, "--json"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    assert (plan["handshake"], plan["routes"], plan["requests"]) == ("slack", [], [])


def test_relay_test_masks_a_token_header_whatever_its_name(tmp_path: Path) -> None:
    """A token source's credential header (here `X-Shared`, a name that does not look like
    one) and a target header whose value comes from ${...} are shown as *** in `relay
    test`'s planned request unless --show-secrets."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[sources.shared]\nverify = { scheme = "token", secret = "topsecretvalue", '
        'header = "X-Shared" }\n[targets.console]\nurl = "log:"\n'
        'headers = { "X-Ci" = "${CI_TOKEN}" }\n[[routes]]\nname = "r"\n'
        'source = "shared"\ntargets = ["console"]\n'
    )
    config.chmod(0o600)
    command = [
        sys.executable, "-m", "relay", "test", "-c", str(config), "--source", "shared",
        "--data", "{}", "-H", "X-Shared: topsecretvalue",
    ]  # fmt: skip
    env = {**os.environ, "CI_TOKEN": "citoken-5678"}
    run = functools.partial(
        subprocess.run, capture_output=True, text=True, check=True, timeout=60, env=env
    )
    shown = run(command)
    assert "X-Shared: ***" in shown.stdout
    assert "X-Ci: ***" in shown.stdout
    assert "topsecretvalue" not in shown.stdout
    assert "citoken-5678" not in shown.stdout
    revealed = run([*command, "--show-secrets"])
    assert "X-Shared: topsecretvalue" in revealed.stdout
    assert "X-Ci: citoken-5678" in revealed.stdout


def test_relay_test_on_the_example_config() -> None:
    """`relay test` shows the route decision and the exact request, sending nothing."""
    command = [
        sys.executable, "-m", "relay", "test", "-c", str(REPO / "config.example.toml"),
        "--source", "demo", "--data", '{"hello": "world"}', "-H", "X-Trace: 7", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    plan = json.loads(result.stdout)
    assert plan["routes"] == [{"name": "demo-to-console", "matched": True, "error": None}]
    (request,) = plan["requests"]
    assert (request["target"], request["method"], request["url"]) == ("console", "POST", "log:")
    assert request["body"] == '{"hello": "world"}'
    headers = dict(request["headers"])
    assert headers["X-Trace"] == "7"
    assert headers["X-Relay-Attempt"] == "1"
    assert headers["webhook-id"].startswith("dlv_")
    text = subprocess.run(
        command[:-1], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "1 of 1 routes match" in text
    assert "POST log:" in text
