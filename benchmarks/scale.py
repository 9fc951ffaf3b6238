"""Scale: N simulated sites against a real `fedge server` over a real Mosquitto, 3 rounds each.

Each site is its own MQTT client (own connection, client id, Ed25519 key, signed status and last
will) in one process (`scalelib.swarm`); the server is the real CLI in a subprocess with
`--trusted-keys` holding every site's key and `--signing-key`, so every status, announcement and
update is signed and checked. Updates are random top-1% deltas of the model's real manifest,
encoded by the real codec (`topk:0.01|q8`). Training and the downlink download are left out: the
sites read the signed announcement but do not fetch the global's chunks (a real agent does; that
fan-out is the broker's cost of N x model size per round, not measured here).

Per N and model: seconds from the round's last update acknowledged by the broker to the next
round's global announced (median over the rounds followed by another), server CPU seconds per
update (from round 1's announcement to `finished`), server and broker peak RSS (VmHWM), and the
server's intake (updates accepted per second, from the round's first update published to its last
accepted, read from the server's log lines).

    python benchmarks/scale.py --report benchmarks/results/scale.json
    python benchmarks/scale.py --sites 1000 --models resnet-1.2M --profile runs/scale-prof --report runs/scale-prof/scale.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedge.broker import MosquittoProcess, free_port  # noqa: E402
from fedge.models import ModelConfig  # noqa: E402
from server.provision import DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_MESSAGES  # noqa: E402

MODELS = {
    "cnn-93k": ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28),
    "resnet-1.2M": ModelConfig(arch="resnet", in_channels=1, num_classes=2, image_size=28,
                               options={"widths": (32, 64, 128, 256), "blocks": (1, 1, 1, 1)}),
}  # fmt: skip
CODEC = "topk:0.01|q8"
METRICS = {
    "last_update_to_global_s": "last update acked -> next global announced (s)",
    "server_cpu_s_per_update": "server CPU s per update",
    "server_peak_rss_mb": "server peak RSS (MB)",
    "broker_peak_rss_mb": "broker peak RSS (MB)",
    "messages_per_s": "server intake (updates/s)",
}
ACCEPT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO fedge\.server: round (\d+): update from ")


def raise_fd_limit() -> int:
    """A socket per site, plus the broker's (it inherits this limit): soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def broker_config(folder: Path, port: int, max_queued: int) -> Path:
    """Plain loopback Mosquitto with the queue limits `fedge provision broker` writes (Mosquitto's own: 1000 messages)."""
    conf = folder / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "set_tcp_nodelay true",
        f"max_queued_messages {max_queued}", f"max_queued_bytes {DEFAULT_MAX_QUEUED_BYTES}", f"max_packet_size {4 << 20}",
        "log_dest stderr", "log_type error", "log_type warning", "log_type notice", "connection_messages false", "",
    ]), encoding="utf-8")  # fmt: skip
    return conf


def prepare(folder: Path, model: str, sites: int) -> tuple[Path, dict[str, Any], dict[str, tuple[int, ...]]]:
    """The initial checkpoint the server starts from, every site's key (public halves in trusted/),
    and the shapes of what a site sends (the model's float state, as the agent's full mode)."""
    import torch

    from fedge import weights as W
    from fedge.checkpoint import save_checkpoint
    from fedge.models import build_model
    from fedge.protocol.signing import Signer

    torch.manual_seed(0)
    net = build_model(MODELS[model])
    ckpt = save_checkpoint(folder / "init.safetensors", net.state_dict(), MODELS[model])
    shapes = {k: tuple(v.shape) for k, v in W.float_state(net).items()}
    trusted = folder / "trusted"
    trusted.mkdir()
    Signer.generate().save(folder / "server.key", folder / "server.pub")
    signers = {}
    for i in range(sites):
        name = f"site-{i:04d}"
        signers[name] = Signer.generate()
        (trusted / f"{name}.pub").write_bytes(signers[name].public_pem())
    return ckpt, signers, shapes


def server_command(folder: Path, ckpt: Path, port: int, sites: int, rounds: int, workers: int, profile: Path | None) -> list[str]:
    prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
    return prefix + [
        "-m", "fedge.cli.main", "server", "--broker", f"mqtt://127.0.0.1:{port}", "--federation", "scale", "--init", str(ckpt),
        "--rounds", str(rounds), "--min-clients", str(sites), "--codec", CODEC, "--round-timeout", "1800",
        "--checkpoint-dir", str(folder / "server"), "--trusted-keys", str(folder / "trusted"),
        "--signing-key", str(folder / "server.key"), "--max-samples", "1000", "--decode-workers", str(workers),
    ]  # fmt: skip


def accepted_times(log: Path) -> dict[int, list[float]]:
    """Round -> the times (epoch s) the server logged accepting each update."""
    out: dict[int, list[float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = ACCEPT.match(line)
        if m:
            out.setdefault(int(m.group(2)), []).append(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def run_one(model: str, sites: int, rounds: int, folder: Path, max_queued: int, workers: int, profile: Path | None) -> dict[str, Any]:
    from scalelib.meter import Meter
    from scalelib.swarm import Swarm

    from fedge.protocol.signing import Verifier

    folder.mkdir(parents=True)
    ckpt, signers, shapes = prepare(folder, model, sites)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FEDGE_DATA_DIR"}  # the server needs no dataset
    started = time.time()
    with MosquittoProcess(broker_config(folder, port, max_queued), port, folder / "mosquitto.log") as broker:
        server_log = folder / "server.log"
        with server_log.open("wb") as out:
            server = subprocess.Popen(server_command(folder, ckpt, port, sites, rounds, workers, profile), stdout=out, stderr=subprocess.STDOUT, env=env)
        swarm = Swarm(port, "scale", signers, Verifier.from_pems({"server": (folder / "server.pub").read_bytes()}), shapes)
        try:
            with Meter({"server": server.pid, "broker": broker.pid}) as meter:

                def alive(done: bool) -> bool:
                    if server.poll() is not None and not done:
                        raise RuntimeError(f"fedge server exited with {server.returncode}: {server_log.read_text(errors='replace')[-3000:]}")
                    return done

                swarm.connect()
                swarm.run_until(lambda: alive(1 in swarm.rounds), 900, "round 1 announced")
                cpu0 = meter.cpu("server")
                swarm.run_until(lambda: alive(swarm.finished_at is not None), 3600, "federation finished")
                cpu1 = meter.cpu("server")
                server.wait(timeout=120)
                meter.sample()
        finally:
            swarm.close()
            if server.poll() is None:
                server.kill()
                server.wait()
    wall = time.time() - started
    accepts = accepted_times(server_log)
    times = swarm.rounds
    gaps = [times[r + 1].announced - times[r].last_ack for r in range(1, rounds)]
    intake = [len(accepts.get(r, [])) / max(1e-3, max(accepts.get(r, [0.0])) - times[r].first_publish) for r in range(1, rounds + 1)]
    updates = sum(times[r].updates for r in times)
    log_text = server_log.read_text(errors="replace")
    refusals = re.search(r"refused inputs this run, by kind: (\{.*\})", log_text)
    broker_text = (folder / "mosquitto.log").read_text(errors="replace")
    return {
        "sites": sites,
        "model": model,
        "params": int(sum(math.prod(s) for s in shapes.values())),
        "rounds": rounds,
        "decode_workers": workers,
        "last_update_to_global_s": round(statistics.median(gaps), 3) if gaps else None,
        "last_update_to_global_s_per_round": [round(g, 3) for g in gaps],
        "last_update_to_finished_s": round(swarm.finished_at - times[rounds].last_ack, 3) if swarm.finished_at else None,
        "server_cpu_s_per_update": round((cpu1 - cpu0) / max(1, updates), 5),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "server_peak_rss_mb": round(meter.stats["server"].peak_rss / 2**20, 1),
        "broker_peak_rss_mb": round(meter.stats["broker"].peak_rss / 2**20, 1),
        "messages_per_s": round(statistics.median(intake), 1),
        "updates_sent": updates,
        "updates_accepted": sum(len(v) for v in accepts.values()),
        "update_bytes_mean": round(sum(times[r].update_bytes for r in times) / max(1, updates)),
        "resent_after_reannouncement": sum(times[r].resent for r in times),
        "site_encode_s_per_round": [round(times[r].encode_s, 2) for r in sorted(times)],
        "server_refusals": json.loads(refusals.group(1)) if refusals else {},
        "broker_dropped_warnings": broker_text.count("being dropped"),
        "wall_s": round(wall, 1),
    }


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model (decoding in the round loop), each metric at the largest N over its value at N=100, and the log-log slope
    between them (1: linear in N, 0: flat, above 1: worse than linear)."""
    out: dict[str, dict[str, float]] = {}
    for model in sorted({r["model"] for r in results}):
        rows = {r["sites"]: r for r in results if r["model"] == model and not r["decode_workers"]}
        if 100 not in rows or max(rows) <= 100:
            continue
        big = max(rows)
        for key in ("last_update_to_global_s", "server_cpu_s", "server_peak_rss_mb", "broker_peak_rss_mb"):
            a, b = rows[100][key], rows[big][key]
            if a and b:
                out.setdefault(model, {})[f"{key}_x{big}/100"] = round(b / a, 2)
                out[model][f"{key}_loglog_slope"] = round(math.log(b / a) / math.log(big / 100), 2)
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = grid.flat
    for ax, (key, title) in zip(axes, METRICS.items()):
        for model, workers in sorted({(r["model"], r["decode_workers"]) for r in results}):
            rows = sorted((r for r in results if (r["model"], r["decode_workers"]) == (model, workers) and r[key] is not None),
                          key=lambda r: r["sites"])  # fmt: skip
            series = f"{model}, {workers} decode workers" if workers else model
            ax.plot([r["sites"] for r in rows], [r[key] for r in rows], marker="o" if not workers else "s", label=series,
                    linestyle="-" if not workers else "--")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("simulated sites")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    legend = grid.flat[len(METRICS)]
    legend.axis("off")
    legend.legend(*grid.flat[0].get_legend_handles_labels(), loc="center", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--replot", action="store_true", help="Only redraw the PNG beside an existing --report")
    parser.add_argument("--sites", default="10,100,300,1000")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--broker-max-queued",
        type=int,
        default=DEFAULT_MAX_QUEUED_MESSAGES,
        help="Mosquitto max_queued_messages (`fedge provision broker` writes this default; Mosquitto's own is 1000)",
    )
    parser.add_argument("--decode-workers", default="0", help="fedge server --decode-workers; a comma list runs each")
    parser.add_argument("--pool-from", type=int, default=300, help="Run decode workers > 0 only from this many sites on")
    parser.add_argument("--profile", type=Path, help="Run the server under cProfile; .prof files and the top functions go here")
    parser.add_argument("--workdir", type=Path, help="Keep checkpoints and logs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.report.read_text())["results"], args.report.with_suffix(".png"))
        return
    fds = raise_fd_limit()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedge-scale-") as tmp:
        work = args.workdir or Path(tmp)
        for model in args.models.split(","):
            for n in map(int, args.sites.split(",")):
                if n + 64 > fds:
                    raise SystemExit(f"{n} sites need more file descriptors than RLIMIT_NOFILE allows ({fds}); raise the hard limit")
                for workers in map(int, args.decode_workers.split(",")):
                    if workers and n < args.pool_from:
                        continue
                    prof = None
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        prof = args.profile / f"server-{model}-{n}-w{workers}.prof"
                    row = run_one(model, n, args.rounds, work / f"{model}-{n}-w{workers}", args.broker_max_queued, workers, prof)
                    if prof is not None:
                        row["profile_top"] = profile_top(prof)
                    results.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "profile_top"}), flush=True)
    report = {
        "benchmark": "scale", "codec": CODEC, "broker": "mosquitto " + mosquitto_version(),
        "broker_max_queued_messages": args.broker_max_queued,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "rlimit_nofile": fds},
        "date": dt.date.today().isoformat(), "results": results, "growth_from_100": growth(results),
    }  # fmt: skip
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(results, args.report.with_suffix(".png"))
    print(json.dumps(report["growth_from_100"], indent=2))


def profile_top(path: Path, count: int = 25) -> dict[str, list[str]]:
    """The functions with the most own time, and the server's own functions by cumulative time
    (cProfile measures the server's main thread: the round loop)."""
    import io
    import pstats

    def listing(order: str, *restrict: object) -> list[str]:
        text = io.StringIO()
        pstats.Stats(str(path), stream=text).sort_stats(order).print_stats(*restrict)
        lines = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        return lines[start:]

    return {"by_own_time": listing("tottime", count),
            "server_by_cumulative_time": listing("cumulative", r"server/(rounds|intake)\.py|fedge/rounds/update\.py|strategies/", count)}  # fmt: skip


def mosquitto_version() -> str:
    out = subprocess.run([MosquittoProcess.binary(), "-h"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split("version")[-1].strip() if out else "?"


if __name__ == "__main__":
    main()
