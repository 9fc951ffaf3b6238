"""What serving the dashboard and Prometheus metrics costs a federation: the same seeded `fedge demo`
run with both off and with both on, alternating (off, on, off, on, ...) so that the machine's other
load falls on both alike. With them on, a separate poller process asks the dashboard's JSON every
2 s (what an open page does) and scrapes /metrics every 2 s (Prometheus' default is 15 s or more):
more load than an operator causes.

Per run the report gives the `fedge demo` command's wall time and the federation's own `seconds`
(report field: broker, server and agents from start to the final model), the CPU seconds of the demo
and its agent processes (user + system: much less sensitive than wall time to other work on a
shared machine), the demo process' own CPU seconds (the server with its dashboard and metrics,
sampled every 0.25 s until it exits) and, with them on, the poller's own CPU seconds, how many
polls and scrapes were answered and their median response time (request to last byte, client side:
an upper bound of the server's work per request); per setting the medians, the overhead of "on"
against "off" in percent, and the mean of the paired differences (each "on" run minus the "off"
run just before it).

    python benchmarks/watch_overhead.py --report benchmarks/results/watch-overhead.json
    python benchmarks/watch_overhead.py --report /tmp/w.json --pairs 1 --rounds 2 --clients 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

POLLER = r"""
import json, sys, time, urllib.request
urls = {"dashboard": sys.argv[1], "metrics": sys.argv[2]}
seconds = {name: [] for name in urls}
while True:
    for name, url in urls.items():
        started = time.perf_counter()
        try:
            urllib.request.urlopen(url, timeout=5).read()
            seconds[name].append(time.perf_counter() - started)
        except OSError:
            pass
    print(json.dumps(seconds), flush=True)
    time.sleep(2)
"""


def cpu_of_children() -> float:
    """User + system CPU seconds of every finished child process (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(args: argparse.Namespace, workdir: Path, watch: bool) -> dict[str, Any]:
    report = workdir / "report.json"
    command = [
        sys.executable, "-m", "fedge.cli.main", "demo", "--dataset", args.dataset, "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--workdir", str(workdir / "run"), "--report", str(report), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    poller = None
    if watch:
        dashboard, metrics = free_port(), free_port()
        command += ["--dashboard", f"127.0.0.1:{dashboard}", "--metrics-port", str(metrics)]
        poller = subprocess.Popen(
            [sys.executable, "-c", POLLER, f"http://127.0.0.1:{dashboard}/api/state", f"http://127.0.0.1:{metrics}/metrics"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    started, before = time.monotonic(), cpu_of_children()
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = (workdir / "stdout.txt").open("w+"), (workdir / "stderr.txt").open("w+")
    demo = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=os.environ | {"COLUMNS": "200"})
    server_cpu = 0.0  # the demo process alone (the server, its dashboard and metrics), sampled until it exits
    while demo.poll() is None:
        try:
            times = psutil.Process(demo.pid).cpu_times()
            server_cpu = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.25)
    wall, cpu = time.monotonic() - started, cpu_of_children() - before  # the demo and its agent processes
    out.seek(0)
    err.seek(0)
    result = subprocess.CompletedProcess(command, demo.returncode, out.read(), err.read())
    polled = None
    if poller is not None:
        before = cpu_of_children()
        poller.terminate()
        lines = poller.communicate(timeout=10)[0].splitlines()
        seconds = json.loads(lines[-1]) if lines else {"dashboard": [], "metrics": []}
        polled = {}
        for name, key in (("dashboard", "dashboard_polls"), ("metrics", "metrics_scrapes")):
            polled[key] = len(seconds[name])
            if seconds[name]:
                polled[f"{name}_median_ms"] = round(1000 * statistics.median(seconds[name]), 2)
        polled["poller_cpu_seconds"] = round(cpu_of_children() - before, 2)
    if result.returncode != 0:
        raise RuntimeError(f"fedge demo failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")
    data = json.loads(report.read_text())
    return {"watch": watch, "wall_seconds": round(wall, 2), "federation_seconds": data["seconds"], "cpu_seconds": round(cpu, 2),
            "server_process_cpu_seconds": round(server_cpu, 2),
            "final_auc": data["final"]["auc"], **(polled or {})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=3, help="off/on pairs")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=os.environ.get("FEDGE_DATA_DIR"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedge-watch-") as tmp:
        for pair in range(args.pairs):
            for watch in (False, True):
                run = run_demo(args, Path(tmp) / f"{pair}-{'on' if watch else 'off'}", watch)
                runs.append(run)
                print(json.dumps(run), flush=True)
    summary = {}
    for key in ("wall_seconds", "federation_seconds", "cpu_seconds", "server_process_cpu_seconds"):
        off = statistics.median(r[key] for r in runs if not r["watch"])
        on = statistics.median(r[key] for r in runs if r["watch"])
        offs, ons = [r[key] for r in runs if not r["watch"]], [r[key] for r in runs if r["watch"]]
        paired = statistics.mean(b - a for a, b in zip(offs, ons))
        summary[key] = {
            "off_median": off,
            "on_median": on,
            "overhead_percent": round(100 * (on - off) / off, 2),
            "paired_mean_difference_seconds": round(paired, 2),
            "paired_overhead_percent": round(100 * paired / statistics.mean(offs), 2),
        }
    report = {
        "what": "fedge demo wall time with the dashboard and Prometheus metrics off vs on (polled every 2 s)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("report", "data_dir")},
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "summary": summary,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
