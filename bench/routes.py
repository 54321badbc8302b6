"""Benchmark: the cost of many routes, on the real GitHub corpus (issue 3).

Two measurements in one run, as ratios, because these machines are noisy:

1. Route evaluation alone, in process: µs per event for one unfiltered route, for 20
   filtered routes evaluated one by one (plain JMESPath), and for the same 20 routes
   through `RouteSet` (the dispatch table). It first checks that both give identical
   decisions on every payload.
2. Ingest through the real daemon (sync = "full"): requests/s with 1 route and with 20
   routes (one matching each payload), driven by wrk at 64 connections with the corpus
   payloads in rotation, each with its X-GitHub-Event. The daemon is pinned to core 0
   and wrk to core 1 where taskset exists. Runs alternate, 3 of each; medians reported.

Usage: python bench/routes.py [--seconds 5] [--runs 3]   (needs wrk: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("RELAY_CORPUS") or REPO.parent / "shared" / "corpus" / "github")
sys.path.insert(0, str(REPO))

from relay.model import RouteConfig  # noqa: E402 - after the path set-up above
from relay.rules import RouteSet, compile_expression, decide_routes, request_document  # noqa: E402

INDEX = json.loads((CORPUS / "index.json").read_text())
EVENT_TYPES = [event for event, _ in Counter(e["event"] for e in INDEX).most_common(20)]
PAYLOADS = [e for e in INDEX if e["event"] in EVENT_TYPES]


def routes(count: int) -> list[RouteConfig]:
    if count == 1:
        return [RouteConfig("all", "github", None, None, {}, (), ("sink",))]
    return [
        RouteConfig(
            f"on-{event}",
            "github",
            compile_expression(f"headers.x_github_event == '{event}'"),
            None,
            {},
            (),
            ("sink",),
        )
        for event in EVENT_TYPES
    ]


def documents() -> list[dict[str, Any]]:
    return [
        request_document(
            event_id="evt_bench",
            source="github",
            method="POST",
            path="/hooks/github",
            query="",
            headers=[("Content-Type", "application/json"), ("X-GitHub-Event", e["event"])],
            body=(CORPUS / e["file"]).read_bytes(),
            received_at_ms=0,
            max_body_bytes=1 << 25,
        )
        for e in PAYLOADS
    ]


def per_event_us(decide: Any, docs: list[dict[str, Any]], rounds: int = 200) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        for document in docs:
            decide(document)
    return (time.perf_counter() - started) / (rounds * len(docs)) * 1e6


def evaluation() -> None:
    docs = documents()
    twenty = routes(20)
    route_set = RouteSet(twenty)
    for document in docs:
        assert route_set.decide(document) == decide_routes(twenty, document)
        assert sum(d.matched for d in route_set.decide(document)) == 1
    one = RouteSet(routes(1))
    figures = {
        "1 route": per_event_us(one.decide, docs),
        "20 routes, plain": per_event_us(lambda d: decide_routes(twenty, d), docs),
        "20 routes, RouteSet": per_event_us(route_set.decide, docs),
    }
    print(f"route evaluation over {len(docs)} corpus payloads (identical decisions: yes)")
    for name, us in figures.items():
        print(f"  {name:<22} {us:8.2f} µs/event")


def lua_script(folder: Path) -> Path:
    bodies = ",\n".join("[=====[" + (CORPUS / e["file"]).read_text() + "]=====]" for e in PAYLOADS)
    events = ", ".join(f'"{e["event"]}"' for e in PAYLOADS)
    script = folder / "corpus.lua"
    script.write_text(
        f"local bodies = {{{bodies}}}\nlocal events = {{{events}}}\nlocal i = 0\n"
        "request = function()\n  i = i % #bodies + 1\n"
        '  return wrk.format("POST", "/hooks/github", {["Content-Type"] = "application/json",'
        ' ["X-GitHub-Event"] = events[i]}, bodies[i])\nend\n'
    )
    return script


def config(folder: Path, count: int, port: int) -> Path:
    lines = [
        "[server]", f'listen = "127.0.0.1:{port}"', f'admin = "127.0.0.1:{port + 1}"',
        f'journal = "{folder / f"r{count}.db"}"', 'sync = "full"',
        "[log]", 'format = "json"', 'level = "warning"',
        "[sources.github]", 'max_body = "1MiB"', "[targets.sink]", 'url = "log:"',
    ]  # fmt: skip
    for route in routes(count):
        lines += ["[[routes]]", f'name = "{route.name}"', 'source = "github"']
        if route.filter is not None:
            lines.append(f'filter = "{route.filter.text}"')
        lines.append('targets = ["sink"]')
    path = folder / f"routes-{count}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def ingest(config_path: Path, port: int, script: Path, seconds: int) -> float:
    daemon = subprocess.Popen(
        [*pinned(0), sys.executable, "-m", "relay", "run", "-c", str(config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/readyz", timeout=1).close()
                break
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"daemon did not become ready: {daemon.stderr}")
            time.sleep(0.1)
        out = subprocess.run(
            [*pinned(1), "wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script),
             f"http://127.0.0.1:{port}/hooks/github"],
            capture_output=True, text=True, check=True, timeout=seconds + 30,
        ).stdout  # fmt: skip
        if "Non-2xx" in out:
            raise SystemExit(f"non-2xx answers during the run:\n{out}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert match, out
        return float(match[1])
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    evaluation()
    if not shutil.which("wrk"):
        print("ingest: skipped (wrk not found; apt-get install wrk)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        script = lua_script(folder)
        port = 18500 + os.getpid() % 1000
        results: dict[int, list[float]] = {1: [], 20: []}
        for _ in range(args.runs):
            for count in (1, 20):
                for stale in folder.glob(f"r{count}.db*"):
                    stale.unlink()
                rate = ingest(config(folder, count, port), port, script, args.seconds)
                results[count].append(rate)
    one, twenty = statistics.median(results[1]), statistics.median(results[20])
    print(f"ingest, corpus payloads, sync=full, 64 connections, {args.runs}x{args.seconds}s:")
    for count, rates in results.items():
        print(f"  {count:>2} route(s): median {statistics.median(rates):8.0f} req/s  runs {rates}")
    print(f"  ratio 20/1: {twenty / one:.2f} (goal >= 0.70)")


if __name__ == "__main__":
    main()
