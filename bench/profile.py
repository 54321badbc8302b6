"""Where the daemon's time goes under load: py-spy on the bench's ingest or end-to-end set-up.

Starts relay exactly as `python -m bench` does (pinned to core 0, wrk on core 1), records
it with py-spy (`--gil`: only the thread holding the GIL, i.e. Python actually running)
for the length of the wrk run, and prints the functions with the most samples, by their
own time and by time including callees, with line numbers folded away. py-spy is not a
dependency of relay: `pip install py-spy` into the venv first.

Usage: python bench/profile.py [ingest|e2e] [--mix] [--seconds 6] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script (python bench/profile.py): the repository root is the import root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

# The frames every stack starts with: not worth a line of the ranking. (`Runner.run`
# stays: its own time is the event loop's native code and the system calls it makes.)
_ENTRY_FRAMES = ("_run_module_as_main", "_run_code", "<module>", "main (relay/cli.py",
                 "cmd_run", "run (uvloop", "Thread.")  # fmt: skip


def top(raw: Path, count: int) -> str:
    """py-spy's raw (collapsed) stacks as two rankings: own samples, and with callees."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        frames = [
            re.sub(r":\d+\)", ")", frame)
            for frame in stack.split(";")[1:]
            if not frame.startswith(_ENTRY_FRAMES)
        ]
        if not frames:
            continue
        samples += int(weight)
        own[frames[-1]] += int(weight)
        for frame in set(frames):
            total[frame] += int(weight)
    rows = [f"{samples} samples", "-- own time"]
    rows += [f"{n / samples:6.1%}  {name}" for name, n in own.most_common(count)]
    rows += ["-- including callees"]
    rows += [f"{n / samples:6.1%}  {name}" for name, n in total.most_common(count)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["ingest", "e2e"], nargs="?", default="ingest")
    parser.add_argument("--mix", action="store_true", help="the GitHub corpus, 20 routes")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("py-spy not found: pip install py-spy")
    port = harness.free_port()
    receiver_port = harness.free_port(avoid=(port, port + 1))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        target = (
            "http://127.0.0.1:9/refused"
            if args.scenario == "ingest"
            else f"http://127.0.0.1:{receiver_port}/hook"
        )
        config = harness.relay_config(folder, port, target, args.mix)
        requests = harness.corpus_requests() if args.mix else [(harness.ONE_KIB_BODY, "push")]
        script = harness.lua_script(folder, requests)
        if args.scenario == "e2e":
            receiver = [sys.executable, "-c", harness.RECEIVER_SERVER, str(receiver_port)]
            ready = f"http://127.0.0.1:{receiver_port}/"
            stack.enter_context(harness.process([*harness.pinned(1), *receiver], ready))
        relay = [sys.executable, "-m", "relay", "run", "-c", str(config)]
        daemon = stack.enter_context(
            harness.process([*harness.pinned(0), *relay],
                            f"http://127.0.0.1:{port + 1}/readyz", cwd=harness.REPO)
        )  # fmt: skip
        raw = folder / "profile.txt"
        recorder = subprocess.Popen(
            [spy, "record", "-p", str(daemon.pid), "-d", str(args.seconds), "-r", "250",
             "-f", "raw", "-o", str(raw), "--threads", "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/hooks/github"
        result = harness.run_wrk(url, script, args.seconds)
        recorder.wait(timeout=args.seconds + 60)
        print(f"{args.scenario}{' (mix)' if args.mix else ''}: {result.summary()}")
        print(top(raw, args.top))


if __name__ == "__main__":
    main()
