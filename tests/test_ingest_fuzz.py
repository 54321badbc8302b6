"""Property: whatever bytes arrive, under whatever content type, ingest answers 202 or a 4xx.

One real daemon serves every generated example (hypothesis drives plain blocking HTTP
against it), so the property is checked on the real pipeline: parse, route, journal.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, server_toml

CONTENT_TYPES = [
    "application/json",
    "application/vnd.github+json; charset=utf-8",
    "application/x-www-form-urlencoded",
    "text/plain; charset=latin-1",
    "application/octet-stream",
    "",
    "multipart/form-data; boundary=x",
]


SCHEME_SETTINGS = {
    "github": 'scheme = "github", secret = "s3cret"',
    "stripe": 'scheme = "stripe", secret = "whsec_s3cret"',
    "slack": 'scheme = "slack", secret = "s3cret"',
    "shopify": 'scheme = "shopify", secret = "s3cret"',
    "standard": 'scheme = "standard", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"',
    "hmac": 'scheme = "hmac", secret = "s3cret", header = "X-Sig", prefix = "sha256="',
    "token": 'scheme = "token", header = "X-Gitlab-Token", secret = "s3cret"',
    "basic": 'scheme = "basic", username = "u", password = "p"',
}
SIGNATURE_HEADERS = [
    "X-Hub-Signature-256", "Stripe-Signature", "X-Slack-Signature",
    "X-Slack-Request-Timestamp", "X-Shopify-Hmac-Sha256", "webhook-id", "webhook-timestamp",
    "webhook-signature", "X-Sig", "X-Gitlab-Token", "Authorization",
]  # fmt: skip
HEADER_VALUE = st.binary(max_size=120).map(
    lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").strip()
)


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    host: str = ""
    port: int = 0
    lines: list[dict[str, object]] = field(default_factory=list)

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str | bytes]) -> int:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "relay.toml"
    config.write_text(
        server_toml(folder, max_body='"64KiB"')
        + """
[sources.app]
[targets.console]
url = "log:"
[[routes]]
name = "filtered"
source = "app"
filter = "length(body.items) > `1` || matches(body, 'x')"
targets = ["console"]
[[routes]]
name = "everything"
source = "app"
transform = "{seen: body}"
targets = ["console"]
"""
        + "".join(
            f"[sources.{scheme}]\nverify = {{ {settings} }}\n"
            for scheme, settings in SCHEME_SETTINGS.items()
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "run", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    running = RunningDaemon(process)
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = json.loads(raw)
            running.lines.append(line)
            if line.get("event") == "relay.started":
                host, port = str(line["listen"]).rsplit(":", 1)
                running.host, running.port = host, int(port)
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(30), "daemon did not start"
    yield running
    process.terminate()
    assert process.wait(30) == 0
    reader.join(10)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=2048), content_type=st.sampled_from(CONTENT_TYPES))
def test_any_body_gets_202_or_a_4xx(daemon: RunningDaemon, body: bytes, content_type: str) -> None:
    """Random bytes never make ingest fail: the answer is 202 or a 4xx, never a 5xx."""
    headers = {"Content-Type": content_type} if content_type else {}
    status = daemon.request("POST", "/hooks/app", body, headers)
    assert status == 202 or 400 <= status < 500


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    document=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_json_document_is_accepted(daemon: RunningDaemon, document: object) -> None:
    """Any well-formed JSON value is accepted, whatever the filters make of it."""
    body = json.dumps(document).encode()
    assert daemon.request("POST", "/hooks/app", body, {"Content-Type": "application/json"}) == 202


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    scheme=st.sampled_from(sorted(SCHEME_SETTINGS)),
    headers=st.dictionaries(st.sampled_from(SIGNATURE_HEADERS), HEADER_VALUE, max_size=5),
    body=st.binary(max_size=256),
)
def test_garbage_signature_headers_get_a_4xx_for_every_scheme(
    daemon: RunningDaemon, scheme: str, headers: dict[str, bytes], body: bytes
) -> None:
    """Random signature headers (non-ASCII, control bytes, empty) are a 401, never a 5xx."""
    sent: dict[str, str | bytes] = {**headers, "Content-Type": "application/json"}
    status = daemon.request("POST", f"/hooks/{scheme}", body, sent)
    assert 400 <= status < 500


def test_the_daemon_is_still_ready_after_the_fuzzing(daemon: RunningDaemon) -> None:
    """After all of the above, the daemon answers /readyz 200 and logged no internal error."""
    admin = next(line["admin"] for line in daemon.lines if line.get("event") == "relay.started")
    host, port = str(admin).rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/readyz")
    assert connection.getresponse().status == 200
    connection.close()
    assert not [line for line in daemon.lines if line.get("event") == "delivery.internal_error"]
    assert not [line for line in daemon.lines if line.get("level") == "critical"]
