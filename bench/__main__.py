"""`python -m bench`: relay against its baselines, in one run, as ratios (SPEC §10, issue 7).

Each server runs pinned to core 0 (where taskset exists) and wrk drives it from core 1,
at 64 connections for a bounded time, every scenario repeated (3 by default, medians
and spreads reported), scenarios interleaved round by round so that a noisy neighbour
hits them alike. Scenarios:

- baseline: a minimal aiohttp + uvloop handler that reads the body and answers 202;
- peer: adnanh/webhook (Debian package `webhook`) with one hook on a matching rule;
- ingest: relay, sync = "full", `verify = github` with correctly signed requests, one
  route filtered on `headers.x_github_event`, to a target that refuses connections (it
  pauses, so only ingest is measured);
- e2e: the same to a local receiver: delivered events/s, arrival-to-delivery p50/p99
  from the journal, and a check that delivered == accepted once drained;
- mix-ingest / mix-e2e: the same with the real GitHub corpus payloads (3-31 KB, each
  with its X-GitHub-Event) and 20 routes on the source (one per event type);
- backlog: 1,000,000 pending deliveries for a paused target: resident memory and time
  from start to /readyz 200; then the target comes back: the drain rate.

All traffic goes to 127.0.0.1. Usage: python -m bench [--seconds 5] [--runs 3]
[--backlog 1000000] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

from bench.harness import (
    Result,
    backlog_scenario,
    baseline_scenario,
    e2e_scenario,
    ingest_scenario,
    machine_description,
    peer_scenario,
)

GOALS = {
    "ingest / baseline": 0.6,
    "ingest / peer": 1.0,
    "e2e / baseline": 0.3,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--runs", type=int, default=3, help="repeats of each scenario")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="backlog size")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()
    scenarios: dict[str, Callable[[int], Result]] = {
        "baseline": baseline_scenario,
        "peer": peer_scenario,
        "ingest": lambda s: ingest_scenario(s, mix=False),
        "e2e": lambda s: e2e_scenario(s, mix=False),
        "mix-ingest": lambda s: ingest_scenario(s, mix=True),
        "mix-e2e": lambda s: e2e_scenario(s, mix=True),
    }
    chosen = [n for n in args.only.split(",") if n] or [*scenarios, "backlog"]
    print(machine_description())
    results: dict[str, list[Result]] = {name: [] for name in chosen if name in scenarios}
    for round_number in range(1, args.runs + 1):
        for name in results:
            result = scenarios[name](args.seconds)
            results[name].append(result)
            print(f"  round {round_number} {name:<11} {result.summary()}", flush=True)
    medians = report(results)
    ratios(medians)
    if "backlog" in chosen:
        backlog = backlog_scenario(args.backlog, args.seconds)
        print(f"\nbacklog: {backlog.summary()}")
    return 0


def report(results: dict[str, list[Result]]) -> dict[str, float]:
    print(f"\n{'scenario':<12}{'median/s':>10}{'spread':>9}{'p50 ms':>9}{'p99 ms':>9}  note")
    medians = {}
    for name, runs in results.items():
        if not runs or runs[0].skipped:
            print(f"{name:<12}{'skipped':>10}  {runs[0].skipped if runs else ''}")
            continue
        rates = [r.rate for r in runs]
        median = statistics.median(rates)
        medians[name] = median
        spread = (max(rates) - min(rates)) / median * 100 if median else 0.0
        p50 = statistics.median(r.p50_ms for r in runs)
        p99 = statistics.median(r.p99_ms for r in runs)
        print(f"{name:<12}{median:>10.0f}{spread:>8.0f}%{p50:>9.1f}{p99:>9.1f}  {runs[-1].note}")
    return medians


def ratios(medians: dict[str, float]) -> None:
    pairs = {
        "ingest / baseline": ("ingest", "baseline"),
        "ingest / peer": ("ingest", "peer"),
        "e2e / baseline": ("e2e", "baseline"),
        "mix-ingest / baseline": ("mix-ingest", "baseline"),
        "mix-e2e / baseline": ("mix-e2e", "baseline"),
    }
    print()
    for label, (top, bottom) in pairs.items():
        if top in medians and bottom in medians and medians[bottom]:
            ratio = medians[top] / medians[bottom]
            goal = GOALS.get(label)
            met = "met" if goal is not None and ratio >= goal else "NOT met"
            verdict = "" if goal is None else f" (goal >= {goal:.1f}: {met})"
            print(f"{label:<24}{ratio:6.2f}{verdict}")


if __name__ == "__main__":
    sys.exit(main())
