"""Under every attack, no strategy returns a non-finite aggregate, and an in-process federation never
applies one; the benchmark's summary arithmetic."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from model_fixtures import load_benchmark

from compression import UpdateCodec
from fedge.data import ImageSplits
from fedge.tasks import ClassificationTask
from server.simulation import (
    ATTACKS,
    Adversary,
    Attack,
    AttackContext,
    InProcessFederation,
    SimulationSettings,
    get_attack,
)
from server.simulation.federation import finite_aggregate, flipped_task
from server.strategies import STRATEGIES, ClientUpdate, get_strategy
from server.strategies.fedadam import FedAdam
from server.strategies.fedavg import FedAvg
from server.validation import update_norm

HUGE = Attack(
    "huge",
    False,
    False,
    lambda c: ({k: np.full(v.shape, 6e4 if k.endswith(("running_mean", "running_var")) else 1e38, np.float32) for k, v in c.honest[0].items()}, c.max_samples),
    "1e38 (finite, NaN-free) in every weight, the fp16 maximum in BatchNorm statistics, with the largest sample count",
)
CODEC = "topk:0.2,ef|ternary|zstd"

# Rules that average as FedAvg does (non-IID strategies, server optimizers): not robust, by design.
AVERAGING = {n for n in STRATEGIES if issubclass(STRATEGIES.get(n), FedAvg | FedAdam)}


def _round(attack: Attack, n_honest: int = 6, attackers: int = 2, seed: int = 0) -> tuple[list[ClientUpdate], list]:
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (4, 2, 3, 3), "bn.running_var": (4,), "head.weight": (2, 4)}
    codec = UpdateCodec.from_spec(CODEC)
    manifest = UpdateCodec.manifest({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    honest = [{k: (rng.normal(size=s) * 0.01 + 0.02).astype(np.float32) for k, s in shapes.items()} for _ in range(n_honest)]
    updates = []
    for i, delta in enumerate(honest):
        decoded = codec.decode(codec.encode(delta, keep_dense=["bn.running_var"], seed=i), manifest)
        updates.append(ClientUpdate(f"h{i}", 50 + i, decoded, 0, update_norm(decoded)))
    for j in range(attackers):
        ctx = AttackContext(honest[j], honest, 50, 1_000_000, attackers, rng)
        forged, samples = attack.forge(ctx)
        decoded = codec.decode(codec.encode(forged, keep_dense=["bn.running_var"], seed=100 + j), manifest)
        updates.append(ClientUpdate(f"m{j}", samples, decoded, 0, update_norm(decoded)))
    return updates, manifest


@pytest.mark.parametrize("attack", [*ATTACKS, "huge"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_no_strategy_returns_a_non_finite_aggregate_under_attack(name: str, attack: str) -> None:
    if issubclass(STRATEGIES.get(name), FedAvg) and attack == "huge":  # fedavg, fedprox, fedbn
        pytest.skip(
            "FedAvg sums sample-weighted float32 like a dense average and may overflow; the server's guard "
            "(RoundServer._aggregate, tests/test_trust_unit.py) leaves such an update out"
        )
    updates, manifest = _round(HUGE if attack == "huge" else get_attack(attack))
    with np.errstate(over="raise", invalid="raise"):  # no overflow on the way either
        result = get_strategy(name).aggregate(updates, manifest)
    assert all(np.isfinite(v).all() for v in result.values())


@pytest.mark.parametrize("name", [n for n in sorted(STRATEGIES) if n not in AVERAGING | {"dp_fedavg"}])  # dp_fedavg adds noise on purpose
def test_robust_strategies_bound_the_attackers_pull(name: str) -> None:
    """Two x100 attackers among ten (trimmed mean's default beta 0.2 trims two a side): the robust
    aggregate stays near the honest updates' scale."""
    updates, manifest = _round(get_attack("scaled"), n_honest=8)
    honest_scale = max(u.norm for u in updates if u.client.startswith("h"))
    result = get_strategy(name).aggregate(updates, manifest)
    assert update_norm(result) <= 1.5 * honest_scale
    fedavg = get_strategy("fedavg").aggregate(updates, manifest)
    assert update_norm(fedavg) > 5 * honest_scale


def _tiny_task() -> ClassificationTask:
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8) for s, n in (("train", 120), ("val", 20), ("test", 40))}
    labels = {s: (images[s].reshape(len(images[s]), -1).mean(1) > 127).astype(np.int64) for s in images}
    labels["test"][:2] = [0, 1]
    return ClassificationTask(ImageSplits(images=images, labels=labels, name="tiny"))


@pytest.mark.integration
@pytest.mark.parametrize("attack", ["huge", "scaled", "sign_flip"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_in_process_federation_never_applies_a_non_finite_model(name: str, attack: str) -> None:
    # No norm bound, so the huge update reaches the strategy (and, for FedAvg, the guard).
    settings = SimulationSettings(sites=4, rounds=2, alpha=100.0, codec=CODEC, model_options={"widths": (2, 4)}, batch_size=16, max_update_norm=float("inf"))
    fed = InProcessFederation(settings, _tiny_task(), get_strategy(name), Adversary(HUGE if attack == "huge" else get_attack(attack), 1))
    result = fed.run()
    assert result["finite"] and all(np.isfinite(v).all() for v in fed.weights.values())
    # Round 1 hears all four sites; after a poisoned round (trimmed_mean trims nothing and multikrum
    # tolerates no attacker among four) honest steps may diverge, and their agents send nothing.
    assert len(result["malicious"]) == 1 and result["history"][0]["updates"] == 4


def test_finite_aggregate_leaves_out_the_largest_update_until_the_mean_is_finite() -> None:
    manifest = UpdateCodec.manifest({"w": np.zeros(3, np.float32)})
    big = ClientUpdate("a", 10, {"w": np.full(3, 3e38, np.float32)}, 0, 5e38)
    bigger = ClientUpdate("b", 10, {"w": np.full(3, 3.3e38, np.float32)}, 0, 6e38)
    small = ClientUpdate("c", 10, {"w": np.full(3, 1.0, np.float32)}, 0, 1.7)
    mean, left_out = finite_aggregate(get_strategy("fedavg"), [big, bigger, small], {"w": np.zeros(3, np.float32)}, manifest)
    assert left_out == ["b", "a"] and mean is not None and np.allclose(mean["w"], 1.0)
    assert finite_aggregate(get_strategy("fedavg"), [big, bigger], {"w": np.full(3, 3e38, np.float32)}, manifest)[0] is None


def test_label_flip_task_flips_only_train_labels() -> None:
    task = _tiny_task()
    flipped = flipped_task(task)
    assert (flipped.splits.labels["train"] == 1 - task.splits.labels["train"]).all()
    assert (flipped.splits.labels["test"] == task.splits.labels["test"]).all()


def test_alie_sits_inside_the_honest_spread() -> None:
    rng = np.random.default_rng(1)
    honest = [{"w": rng.normal(size=50).astype(np.float32)} for _ in range(8)]
    forged, _ = get_attack("alie").forge(AttackContext(None, honest, 10, 100, 2, rng))
    stack = np.stack([h["w"] for h in honest])
    assert (forged["w"] < stack.mean(0)).all() and (forged["w"] > stack.mean(0) - stack.std(0)).all()


def test_summary_means_and_acceptance() -> None:
    bench = load_benchmark("byzantine")
    args = argparse.Namespace(
        attacks=["sign_flip"],
        strategies=["fedavg", "median"],
        dataset="pneumoniamnist",
        sites=10,
        malicious=2,
        rounds=15,
        alpha=0.5,
        codec=CODEC,
        widths=[8],
        seeds=[0, 1],
    )
    runs = [
        {
            "attack": a,
            "strategy": s,
            "seed": seed,
            "final_auc": auc,
            "seconds_per_round": 1.0,
            "aggregate_seconds_per_round": 0.1,
            "finite": True,
            "outputs_nan": False,
            "rejected": 0,
            "left_out": 0,
        }
        for a, s, seed, auc in [
            ("none", "fedavg", 0, 0.94),
            ("none", "fedavg", 1, 0.96),
            ("sign_flip", "fedavg", 0, 0.6),
            ("sign_flip", "fedavg", 1, 0.7),
            ("sign_flip", "median", 0, 0.93),
            ("sign_flip", "median", 1, 0.94),
        ]
    ]
    report = bench.summarize(runs, args)
    assert report["clean_auc"] == pytest.approx(0.95)
    row = next(r for r in report["results"] if r["attack"] == "sign_flip" and r["strategy"] == "median")
    assert row["final_auc"] == pytest.approx(0.935) and row["final_auc_std"] == pytest.approx(np.std([0.93, 0.94], ddof=1))
    assert report["acceptance"]["met"] and report["acceptance"]["best_robust_under_sign_flip"] == "median"
