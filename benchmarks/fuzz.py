"""Mutation fuzz campaign over every decoder and both message handlers (issue 18).

Targets: the envelope, chunk, codec payload, manifest, codec spec and signed record decoders, and
the agent's and the server's message handlers as they run (signed and unsigned deployments; the
agent then decodes what was announced). Case i of seed S is generated from `Random(f"{S}/{i}")`, so
any case replays alone (`--index I`). Per case: wall time and the `tracemalloc` traced peak
(tracing slows Python code, so a case over 1 s is timed again untraced, best of three on this
shared machine: that time is what "over 1 s" counts).

Counted: unexpected exceptions (a decoder raising anything but its family's error type), handler
escapes (anything leaving a handler), exceptions a handler's safety net caught (`handler-error`),
cases over 1 s, cases whose traced peak is over 100x their input and over 1 MiB (the floor is
the interpreter's own fixed cost), and cases that raised the process's peak RSS by over 256 MiB
(torch's allocator is invisible to tracemalloc). Failing inputs are shrunk before they are reported.

    python benchmarks/fuzz.py --report benchmarks/results/fuzz.json
    python benchmarks/fuzz.py --report /tmp/f.json --cases 2000 --seed 1
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import platform
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

SLOW_MS = 1000.0
MEMORY_RATIO = 100
MEMORY_FLOOR = 1 << 20
RSS_JUMP = 256 << 20  # one case raising the process's peak RSS by more than this is reported
KEEP_INPUT = 64 * 1024  # inputs up to this size are kept in the report as base64
PER_SIGNATURE = 3  # reported examples of one finding (all are counted)


def build_targets(folder: Path) -> list:
    from fuzzlib.decoders import ChunkTarget, CodecTarget, EnvelopeTarget, ManifestTarget, RecordTarget, SpecTarget
    from fuzzlib.handlers import AgentTarget, ServerTarget
    from fuzzlib.world import World

    world = World(folder)
    return [
        EnvelopeTarget(world), ChunkTarget(world), CodecTarget(world), ManifestTarget(world), SpecTarget(), RecordTarget(world),
        AgentTarget(world, True), AgentTarget(world, False), ServerTarget(world, True), ServerTarget(world, False),
    ]  # fmt: skip


def case_for(targets: list, seed: int, index: int):
    """(target, case) number `index` of the campaign with `seed`: reproducible one by one."""
    rng = random.Random(f"{seed}/{index}")
    target = rng.choices(targets, weights=[t.weight for t in targets])[0]
    return target, target.generate(rng)


def _entry(case, result, index: int, size: int, **extra: Any) -> dict[str, Any]:
    entry = {"target": case.target, "scenario": case.scenario, "index": index, "input_bytes": size, "ms": round(result.ms, 2),
             "traced_mb": round(result.traced_bytes / 2**20, 3), "meta": {k: v for k, v in case.meta.items() if k != "manifest" or len(v) < 50}}  # fmt: skip
    if len(case.blob) <= KEEP_INPUT:
        entry["input_b64"] = base64.b64encode(case.blob).decode()
    return entry | extra


class Campaign:
    """Runs the cases and keeps the totals and the worst cases for the report."""

    def __init__(self, targets: list, seed: int):
        self.targets = {t.name: t for t in targets}
        self.seed = seed
        self.stats = {t.name: Counter() for t in targets}
        self.max_ms = Counter()
        self.max_traced = Counter()
        self.unexpected: list[dict[str, Any]] = []
        self.signatures: Counter[str] = Counter()
        self.slow: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.worst: dict[str, list[tuple[float, dict[str, Any]]]] = {t.name: [] for t in targets}
        self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        self.rss_jumps: list[dict[str, Any]] = []

    def run(self, index: int) -> None:
        from fuzzlib.runner import minimize, run_prepared

        target, case = case_for(list(self.targets.values()), self.seed, index)
        prepared = target.prepare(case)
        size = target.input_bytes(prepared)
        result = run_prepared(target, prepared)
        stats = self.stats[target.name]
        stats["cases"] += 1
        stats[result.outcome] += 1
        self.max_ms[target.name] = max(self.max_ms[target.name], result.ms)
        self.max_traced[target.name] = max(self.max_traced[target.name], result.traced_bytes)
        if result.outcome in ("unexpected", "escape", "caught", "timeout"):
            key = f"{target.name}:{result.signature}"
            self.signatures[key] += 1
            if self.signatures[key] <= PER_SIGNATURE:
                small = minimize(target, case, result.signature) if result.outcome != "timeout" else case
                self.unexpected.append(
                    _entry(small, result, index, target.input_bytes(target.prepare(small)), kind=result.outcome, exception=result.error, original_bytes=size)
                )
        if result.ms > SLOW_MS:
            untraced = min(run_prepared(target, prepared, trace=False).ms for _ in range(3))  # best of 3: the machine is shared
            stats["over_1s"] += untraced > SLOW_MS
            self.slow.append(_entry(case, result, index, size, untraced_ms=round(untraced, 2)))
        ratio = result.traced_bytes / max(1, size)
        if ratio > MEMORY_RATIO and result.traced_bytes > MEMORY_FLOOR:
            stats["over_100x"] += 1
            self.memory.append(_entry(case, result, index, size, ratio=round(ratio, 1)))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # Linux: KiB
        if rss > self.peak_rss + RSS_JUMP:  # what tracemalloc cannot see (torch's allocator) raised the peak
            stats["rss_jumps"] += 1
            self.rss_jumps.append(_entry(case, result, index, size, rss_mb=round(rss / 2**20, 1), was_mb=round(self.peak_rss / 2**20, 1)))
        self.peak_rss = max(self.peak_rss, rss)
        worst = self.worst[target.name]
        worst.append((ratio * (result.traced_bytes > MEMORY_FLOOR) + result.ms / 1000, _entry(case, result, index, size, ratio=round(ratio, 1))))
        worst.sort(key=lambda w: -w[0])
        del worst[3:]

    def report(self, cases: int, seconds: float) -> dict[str, Any]:
        targets = {}
        for name, stats in self.stats.items():
            targets[name] = {
                "cases": stats["cases"], "accepted": stats["accepted"], "rejected": stats["rejected"],
                "unexpected": stats["unexpected"] + stats["escape"] + stats["caught"] + stats["timeout"],
                "handler_escapes": stats["escape"], "caught_by_handler": stats["caught"], "timeouts": stats["timeout"],
                "over_1s": stats["over_1s"], "over_100x_memory": stats["over_100x"], "rss_jumps": stats["rss_jumps"],
                "max_ms": round(self.max_ms[name], 2), "max_traced_mb": round(self.max_traced[name] / 2**20, 3),
            }  # fmt: skip
        totals = Counter()
        for t in targets.values():
            totals.update({k: v for k, v in t.items() if isinstance(v, int)})
        return {
            "cases": cases, "seed": self.seed, "seconds": round(seconds, 1), "python": platform.python_version(), "machine": platform.machine(),
            "limits": {"slow_ms": SLOW_MS, "memory_ratio": MEMORY_RATIO, "memory_floor_bytes": MEMORY_FLOOR},
            "totals": {k: totals[k] for k in ("unexpected", "handler_escapes", "caught_by_handler", "timeouts", "over_1s", "over_100x_memory", "rss_jumps")},
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "rss_jumps": self.rss_jumps[:20],
            "targets": targets,
            "findings": dict(self.signatures),
            "unexpected": self.unexpected,
            "slow": sorted(self.slow, key=lambda e: -e["ms"])[:20],
            "memory": sorted(self.memory, key=lambda e: -e["ratio"])[:20],
            "worst": {name: [e for _, e in w] for name, w in self.worst.items()},
        }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, action="append", help="run only these case numbers (replay)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # handlers log every refusal; the report counts them
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedge-fuzz-") as folder:
        campaign = Campaign(build_targets(Path(folder)), args.seed)
        indices = args.index or range(args.cases)
        for n, index in enumerate(indices, 1):
            campaign.run(index)
            if n % 5000 == 0:
                print(f"{n} cases, {time.perf_counter() - started:.0f} s, findings {sum(campaign.signatures.values())}", flush=True)
        report = campaign.report(len(indices), time.perf_counter() - started)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fuzz: {report['cases']} cases, seed {report['seed']}, {report['seconds']} s")
    columns = ("cases", "accepted", "rejected", "unexpected", "handler_escapes", "over_1s", "over_100x_memory", "max_ms", "max_traced_mb")
    table.add_column("target")
    for column in columns:
        table.add_column(column, justify="right")
    for name, stats in report["targets"].items():
        table.add_row(name, *(str(stats[c]) for c in columns))
    Console(width=160).print(table)
    for finding, count in report["findings"].items():
        print(f"  {count:6d}  {finding}")


if __name__ == "__main__":
    raise SystemExit(main())
