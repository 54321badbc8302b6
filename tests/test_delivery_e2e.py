"""End-to-end delivery: the real daemon relaying to real receivers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from conftest import Daemon, Receiver, eventually, server_toml

FAST_RETRY = 'retry = { attempts = 5, first = "50ms", max = "200ms", max_age = "1h" }'

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]


def one_route(tmp_path: Path, receiver: Receiver, target_settings: str = "") -> str:
    return (
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{receiver.url}"
{FAST_RETRY}
{target_settings}
[[routes]]
name = "app-to-svc"
source = "app"
targets = ["svc"]
"""
    )


async def test_fan_out_through_two_routes_to_two_targets(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """One event matched by two routes reaches both targets byte for byte, with relay's headers."""
    ci, chat = await receivers(), await receivers()
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.github]
[targets.ci]
url = "{ci.url}"
headers = {{ X-Target = "ci" }}
[targets.chat]
url = "{chat.url}"
[[routes]]
name = "to-ci"
source = "github"
targets = ["ci"]
[[routes]]
name = "to-chat"
source = "github"
targets = ["chat"]
"""
    )
    body = b'{"ref": "refs/heads/main",  "n": 1}'
    status, reply, _ = await daemon.post(
        "/hooks/github", body, {"X-GitHub-Event": "push", "Connection": "keep-alive"}
    )
    assert status == 202
    assert reply["deliveries"] == 2
    assert reply["id"].startswith("evt_")
    assert len(reply["id"]) == 30
    await eventually(lambda: ci.requests and chat.requests)
    for receiver in (ci, chat):
        request = receiver.requests[0]
        assert request.body == body
        assert request.headers["X-GitHub-Event"] == "push"
        assert request.headers["X-Relay-Event-Id"] == reply["id"]
        assert request.headers["X-Relay-Source"] == "github"
        assert request.headers["X-Relay-Attempt"] == "1"
        assert request.headers["webhook-id"].startswith("dlv_")
        assert request.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert ci.requests[0].headers["X-Target"] == "ci"
    assert "X-Target" not in chat.requests[0].headers
    assert ci.requests[0].headers["webhook-id"] != chat.requests[0].headers["webhook-id"]
    await eventually(lambda: daemon.query("SELECT status FROM events") == [("delivered",)])


async def test_concurrency_limit_holds_while_many_wait(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target with concurrency = 2 never has more than 2 requests open while 20 wait."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()
    daemon = await daemons(one_route(tmp_path, receiver, "concurrency = 2"))
    for n in range(20):
        status, _, _ = await daemon.post("/hooks/app", {"n": n})
        assert status == 202
    for held_so_far in range(2, 21, 2):  # each round: two requests held open, then released
        await eventually(
            lambda n=held_so_far: len(receiver.requests) == n and receiver.current == 2
        )
        held, receiver.gate = receiver.gate, asyncio.Event()
        assert held is not None
        held.set()
    await eventually(lambda: len(receiver.requests) == 20 and receiver.current == 0)
    await eventually(
        lambda: (
            daemon.query("SELECT count(*) FROM deliveries WHERE status = 'delivered'") == [(20,)]
        )
    )
    assert receiver.max_concurrent == 2


async def test_retries_until_the_target_recovers(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """500, 500, then 200: delivered on attempt 3 with the same webhook-id each time."""
    receiver = await receivers()
    receiver.script.extend([(500, {}, b"down"), (500, {}, b"down")])
    daemon = await daemons(one_route(tmp_path, receiver))
    status, reply, _ = await daemon.post("/hooks/app", {"hello": "world"})
    assert status == 202
    line = await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert line["attempt"] == 3
    assert [r.headers["X-Relay-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    failed = daemon.events("delivery.failed")
    assert [f["status"] for f in failed] == [500, 500]
    assert all(f["retry_in_s"] >= 0 for f in failed)
    await eventually(
        lambda: (
            daemon.query(
                "SELECT d.status, d.attempts, e.status"
                " FROM deliveries d JOIN events e ON e.id = d.event_id"
            )
            == [("delivered", 3, "delivered")]
        )
    )
    attempts = daemon.query("SELECT n, status FROM attempts ORDER BY n")
    assert attempts == [(1, 500), (2, 500), (3, 200)]


async def test_client_error_is_dead_at_once_with_the_reason(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A 400 is not retried: the delivery is dead after one attempt and says why."""
    receiver = await receivers()
    receiver.default = (400, {}, b"bad payload")
    daemon = await daemons(one_route(tmp_path, receiver))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    line = await daemon.wait_log("delivery.dead", event_id=reply["id"])
    assert line["reason"] == "HTTP 400"
    assert len(receiver.requests) == 1
    await eventually(lambda: daemon.query("SELECT status FROM events") == [("dead",)])
    assert daemon.query("SELECT status, last_error FROM deliveries") == [("dead", "HTTP 400")]
    assert daemon.query("SELECT response FROM attempts") == [(b"bad payload",)]


async def test_gives_up_after_the_configured_attempts(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target that keeps failing gets exactly `attempts` tries, then the delivery is dead."""
    receiver = await receivers()
    receiver.default = (503, {}, b"")
    daemon = await daemons(one_route(tmp_path, receiver))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    line = await daemon.wait_log("delivery.dead", event_id=reply["id"])
    assert line["reason"] == "gave up after 5 attempts: HTTP 503"
    assert len(receiver.requests) == 5


async def test_redirect_is_not_followed(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A 3xx is a failure: relay does not follow it to the Location it names."""
    receiver, elsewhere = await receivers(), await receivers()
    receiver.default = (302, {"Location": elsewhere.url}, b"")
    daemon = await daemons(one_route(tmp_path, receiver))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    line = await daemon.wait_log("delivery.dead", event_id=reply["id"])
    assert line["reason"] == "HTTP 302"
    assert elsewhere.requests == []


async def test_hanging_target_times_out_and_is_retried(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target that never answers is cut off at `timeout` and the delivery retried."""
    receiver = await receivers()
    hang = asyncio.Event()

    async def never() -> tuple[int, dict[str, str], bytes]:
        await hang.wait()
        return (200, {}, b"")

    receiver.script.append(never)
    daemon = await daemons(one_route(tmp_path, receiver, 'timeout = "300ms"'))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    failed = await daemon.wait_log("delivery.failed", event_id=reply["id"])
    assert failed["error"] == "timeout after 0.3s"
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"], attempt=2)
    hang.set()
    assert await daemon.ready() == 200


async def test_large_response_is_cut_at_64_kib(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Only the first 64 KiB of a target's answer is kept on the attempt."""
    receiver = await receivers()
    receiver.default = (200, {}, b"x" * 200_000)
    daemon = await daemons(one_route(tmp_path, receiver))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert daemon.query("SELECT length(response) FROM attempts") == [(65536,)]


async def test_log_target_writes_the_request_instead_of_sending(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A `log:` target logs the request it would send (secrets masked) and counts as delivered."""
    daemon = await daemons(
        server_toml(tmp_path)
        + """
[sources.demo]
[targets.console]
url = "log:"
headers = { Authorization = "Bearer very-secret-token" }
[[routes]]
name = "demo-to-console"
source = "demo"
targets = ["console"]
"""
    )
    _, reply, _ = await daemon.post("/hooks/demo", b'{"hello": "log"}')
    logged = await daemon.wait_log("delivery.logged", event_id=reply["id"])
    assert logged["body"] == '{"hello": "log"}'
    assert logged["method"] == "POST"
    assert logged["headers"]["Authorization"] == "***"
    assert logged["headers"]["X-Relay-Source"] == "demo"
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert not any("very-secret-token" in str(line) for line in daemon.lines)


async def test_unrouted_event_is_journaled_without_deliveries(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """An event no route takes is still accepted and kept, as `unrouted`."""
    daemon = await daemons(server_toml(tmp_path) + "[sources.lonely]\n")
    status, reply, _ = await daemon.post("/hooks/lonely", {"x": 1})
    assert (status, reply["deliveries"]) == (202, 0)
    assert daemon.query("SELECT id, status FROM events") == [(reply["id"], "unrouted")]


async def test_a_burst_is_delivered_exactly_once_each(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A backlog of 100 events, then 200 more posted 8 at a time while it drains: the lane
    reads the journal while new deliveries are handed to it from memory, and each of the
    300 reaches the target once, with its own webhook-id."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()
    daemon = await daemons(one_route(tmp_path, receiver, "concurrency = 4"))

    async def post_all(numbers: range) -> None:
        for n in numbers:
            status, _, _ = await daemon.post("/hooks/app", {"n": n})
            assert status == 202

    await post_all(range(100))
    await eventually(lambda: receiver.current == 4)
    receiver.gate.set()
    await asyncio.gather(*(post_all(range(100 + k, 300, 8)) for k in range(8)))
    await eventually(
        lambda: (
            daemon.query("SELECT count(*) FROM deliveries WHERE status = 'delivered'") == [(300,)]
        )
    )
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == 300
    assert daemon.query("SELECT count(*) FROM attempts") == [(300,)]
