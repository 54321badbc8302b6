"""The pieces of `python -m bench`: servers started pinned, wrk runs, scenario set-ups.

Everything here runs real processes on 127.0.0.1 and bounds every load in time. The
relay's figures for the end-to-end scenarios come from its own journal, read with the
sqlite3 module exactly as an operator would read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("RELAY_CORPUS") or REPO.parent / "shared" / "corpus" / "github")
SECRET = "bench-github-secret"  # noqa: S105 - a throwaway secret for signing bench requests
CONNECTIONS = 64
ONE_KIB_BODY = json.dumps({"ref": "refs/heads/main", "pad": "x" * 990}).encode()

BASELINE_SERVER = """
import sys, uvloop
from aiohttp import web
async def handle(request):
    await request.read()
    return web.Response(status=202, body=b'{"id":"x","deliveries":1}', content_type="application/json")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
"""

RECEIVER_SERVER = BASELINE_SERVER.replace("status=202", "status=200")


@dataclass
class Result:
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    note: str = ""
    skipped: str = ""

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return (
            f"{self.rate:8.0f}/s  p50 {self.p50_ms:6.1f} ms  p99 {self.p99_ms:7.1f} ms  {self.note}"
        )


def machine_description() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {os.cpu_count()} cores, {cpu}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; wrk {CONNECTIONS} connections; "
        f"taskset {'yes' if shutil.which('taskset') else 'no'}"
    )


def free_port(avoid: tuple[int, ...] = ()) -> int:
    """A loopback port P with P + 1 free too (relay: listen on P, admin on P + 1)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if {port, port + 1} & set(avoid):
                continue
            with contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return port
    raise RuntimeError("no free pair of loopback ports")


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


@contextlib.contextmanager
def process(
    command: list[str], ready_url: str, **kwargs: object
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server, wait (bounded) until `ready_url` answers, stop it afterwards."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(ready_url, timeout=1).close()
                break
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[-3:]} did not start: {child.stderr.read()[-2000:]!r}")
            time.sleep(0.05)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(url: str, script: Path, seconds: int) -> Result:
    out = subprocess.run(
        [*pinned(1), "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    percentiles = {
        p: float(v) * _UNITS_MS[u]
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    note = f"{errors[1]} non-2xx!" if errors else ""
    return Result(rate, percentiles.get("50", 0.0), percentiles.get("99", 0.0), note)


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def lua_script(folder: Path, requests: list[tuple[bytes, str]]) -> Path:
    """A wrk script cycling through (body, X-GitHub-Event), each correctly signed."""
    bodies = ",\n".join("[=====[" + body.decode() + "]=====]" for body, _ in requests)
    events = ", ".join(f'"{event}"' for _, event in requests)
    sigs = ", ".join(f'"{signature(body)}"' for body, _ in requests)
    script = folder / "requests.lua"
    script.write_text(
        f"local bodies = {{{bodies}}}\nlocal events = {{{events}}}\nlocal sigs = {{{sigs}}}\n"
        "local i = 0\nrequest = function()\n  i = i % #bodies + 1\n"
        '  return wrk.format("POST", nil, {["Content-Type"] = "application/json",'
        ' ["X-GitHub-Event"] = events[i], ["X-Hub-Signature-256"] = sigs[i],'
        ' ["X-GitHub-Delivery"] = tostring(i)}, bodies[i])\nend\n'
    )
    return script


def corpus_requests() -> list[tuple[bytes, str]]:
    index = json.loads((CORPUS / "index.json").read_text())
    return [((CORPUS / e["file"]).read_bytes(), e["event"]) for e in index]


def baseline_scenario(seconds: int) -> Result:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, process(
        [*pinned(0), sys.executable, "-c", BASELINE_SERVER, str(port)],
        f"http://127.0.0.1:{port}/",
    ):  # fmt: skip
        script = lua_script(Path(tmp), [(ONE_KIB_BODY, "push")])
        return run_wrk(f"http://127.0.0.1:{port}/hooks/github", script, seconds)


def _find_webhook() -> str | None:
    found = shutil.which("webhook")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "webhook"], capture_output=True, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=300,
        )  # fmt: skip
        found = shutil.which("webhook")
    return found


def peer_scenario(seconds: int) -> Result:
    webhook = _find_webhook()
    if webhook is None:
        return Result(skipped="adnanh/webhook not installed (Debian package `webhook`)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        hooks = Path(tmp) / "hooks.json"
        rule = {"match": {"type": "value", "value": "push",
                          "parameter": {"source": "header", "name": "X-GitHub-Event"}}}  # fmt: skip
        hooks.write_text(json.dumps([{"id": "github", "success-http-response-code": 202,
                                      "trigger-rule": rule}]))  # fmt: skip
        with process(
            [*pinned(0), webhook, "-hooks", str(hooks), "-ip", "127.0.0.1", "-port", str(port)],
            f"http://127.0.0.1:{port}/",
        ):  # fmt: skip
            script = lua_script(Path(tmp), [(ONE_KIB_BODY, "push")])
            return run_wrk(f"http://127.0.0.1:{port}/hooks/github", script, seconds)


def relay_config(folder: Path, port: int, target_url: str, mix: bool, sync: str = "full") -> Path:
    events = (
        [e for e, _ in Counter(ev for _, ev in corpus_requests()).most_common(20)]
        if mix else ["push"]
    )  # fmt: skip
    lines = [
        "[server]", f'listen = "127.0.0.1:{port}"', f'admin = "127.0.0.1:{port + 1}"',
        f'journal = "{folder / "relay.db"}"', f'sync = "{sync}"', "[log]", 'format = "json"',
        'level = "warning"', "[sources.github]",
        f'verify = {{ scheme = "github", secret = "{SECRET}" }}', 'max_body = "1MiB"',
        "[targets.sink]", f'url = "{target_url}"', "concurrency = 16",
    ]  # fmt: skip
    for event in events:
        lines += ["[[routes]]", f'name = "on-{event}"', 'source = "github"',
                  f"filter = \"headers.x_github_event == '{event}'\"", 'targets = ["sink"]']  # fmt: skip
    path = folder / "relay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ingest_scenario(seconds: int, *, mix: bool, sync: str = "full") -> Result:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = relay_config(folder, port, "http://127.0.0.1:9/refused", mix, sync)
        requests = corpus_requests() if mix else [(ONE_KIB_BODY, "push")]
        script = lua_script(folder, requests)
        with process(
            [*pinned(0), sys.executable, "-m", "relay", "run", "-c", str(config)],
            f"http://127.0.0.1:{port + 1}/readyz", cwd=REPO,
        ):  # fmt: skip
            result = run_wrk(f"http://127.0.0.1:{port}/hooks/github", script, seconds)
        result.note = (result.note + " " + _journal_note(folder / "relay.db")).strip()
        return result


def _journal_note(journal: Path) -> str:
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        (events,) = conn.execute("SELECT count(*) FROM events").fetchone()
    return f"{events} events journaled"


def e2e_scenario(seconds: int, *, mix: bool) -> Result:
    port = free_port()
    receiver_port = free_port(avoid=(port, port + 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = relay_config(folder, port, f"http://127.0.0.1:{receiver_port}/hook", mix)
        requests = corpus_requests() if mix else [(ONE_KIB_BODY, "push")]
        script = lua_script(folder, requests)
        with process(
            [*pinned(1), sys.executable, "-c", RECEIVER_SERVER, str(receiver_port)],
            f"http://127.0.0.1:{receiver_port}/",
        ), process(
            [*pinned(0), sys.executable, "-m", "relay", "run", "-c", str(config)],
            f"http://127.0.0.1:{port + 1}/readyz", cwd=REPO,
        ):  # fmt: skip
            ingest = run_wrk(f"http://127.0.0.1:{port}/hooks/github", script, seconds)
            drained = _wait_drained(folder / "relay.db", deadline_s=120)
        return _delivery_figures(folder / "relay.db", ingest, drained)


def _wait_drained(journal: Path, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            (pending,) = conn.execute(
                "SELECT count(*) FROM deliveries WHERE status = 'pending'"
            ).fetchone()
        if pending == 0:
            return True
        time.sleep(0.5)
    return False


def _delivery_figures(journal: Path, ingest: Result, drained: bool) -> Result:
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        (accepted,) = conn.execute("SELECT count(*) FROM deliveries").fetchone()
        rows = conn.execute(
            "SELECT a.started_at_ms + a.ms, e.received_at_ms FROM deliveries d"
            " JOIN events e ON e.id = d.event_id"
            " JOIN attempts a ON a.delivery_id = d.id AND a.n = d.attempts"
            " WHERE d.status = 'delivered' ORDER BY 1"
        ).fetchall()
    if not rows:
        return Result(note="nothing delivered")
    latencies = sorted(done - arrived for done, arrived in rows)
    first_arrival = min(arrived for _, arrived in rows)
    span_s = max((rows[-1][0] - first_arrival) / 1000, 1e-3)
    check = (
        "delivered == accepted"
        if len(rows) == accepted and drained
        else (f"delivered {len(rows)} != accepted {accepted}!")
    )  # fmt: skip  (accepted: every delivery the accepted events created)
    return Result(
        rate=len(rows) / span_s,
        p50_ms=latencies[len(latencies) // 2],
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        note=f"ingest {ingest.rate:.0f}/s; {check}",
    )


@dataclass
class BacklogResult:
    count: int
    ready_s: float
    rss_mib: float
    drain_rate: float

    def summary(self) -> str:
        return (
            f"{self.count:,} pending for a paused target: ready in {self.ready_s:.2f} s, "
            f"resident {self.rss_mib:.0f} MiB; once the target is back: "
            f"drain {self.drain_rate:.0f} deliveries/s"
        )


def backlog_scenario(count: int, seconds: int) -> BacklogResult:
    from bench.backlog import config_text, make_backlog, rss_bytes

    port = free_port()
    receiver_port = free_port(avoid=(port, port + 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        journal = folder / "relay.db"
        make_backlog(journal, count)
        pause_s = 8.0  # the target probes again after this: the receiver is "back" then
        with contextlib.closing(sqlite3.connect(journal)) as conn, conn:
            conn.execute(
                "UPDATE targets SET paused_until_ms = ?", (int((time.time() + pause_s) * 1000),)
            )
        config = folder / "relay.toml"
        config.write_text(config_text(journal, port, f"http://127.0.0.1:{receiver_port}/hook"))
        with process(
            [*pinned(1), sys.executable, "-c", RECEIVER_SERVER, str(receiver_port)],
            f"http://127.0.0.1:{receiver_port}/",
        ):  # fmt: skip
            started = time.monotonic()
            with process(
                [*pinned(0), sys.executable, "-m", "relay", "run", "-c", str(config)],
                f"http://127.0.0.1:{port + 1}/readyz", cwd=REPO,
            ) as daemon:  # fmt: skip
                ready_s = time.monotonic() - started
                rss_mib = rss_bytes(daemon.pid) / 2**20
                time.sleep(max(0.0, pause_s - (time.monotonic() - started)) + 1)
                before, at = delivered_count(journal), time.monotonic()
                time.sleep(seconds * 2)
                rate = (delivered_count(journal) - before) / (time.monotonic() - at)
    return BacklogResult(count, ready_s, rss_mib, rate)


def delivered_count(journal: Path) -> int:
    """How many deliveries the journal holds as delivered (read as an operator would)."""
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        (delivered,) = conn.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'delivered'"
        ).fetchone()
    return int(delivered)
