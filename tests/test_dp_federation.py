"""A real federation (embedded broker, agent processes) with DP-SGD at the sites and DP-FedAvg at the
server: each site's epsilon reaches the server through its status, the server records its own."""

from __future__ import annotations

import json

import pytest

from fedge.cli.federation import FederationSettings, run_federation
from fedge.tasks.dp import PrivacyLedger

pytestmark = pytest.mark.integration


def test_record_and_client_level_dp_in_a_two_site_federation(medmnist_root, tmp_path):
    settings = FederationSettings(
        dataset="pneumoniamnist",
        data_dir=str(medmnist_root),
        clients=2,
        rounds=2,
        workdir=tmp_path / "run",
        model_options={"widths": [8, 16]},
        codec="topk:0.1,ef|q8|zstd",
        strategy="dp_fedavg",
        strategy_options={"noise_multiplier": 1.0, "max_norm": 5.0, "seed": 0},
        dp_noise_multiplier=1.0,
        dp_max_grad_norm=1.0,
    )
    report = run_federation(settings)
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["rejected_updates"] == 0
    central = report["privacy"]["client_level_central"]
    assert central["epsilon"] == pytest.approx(PrivacyLedger([(1.0, 1.0, 2)]).epsilon(1e-5)) and central["delta"] == 1e-5
    assert report["rounds"][1]["dp_epsilon"] == central["epsilon"] > report["rounds"][0]["dp_epsilon"]
    sites = report["privacy"]["record_level"]["sites_epsilon"]
    assert set(sites) == {"site-1", "site-2"}
    for site, epsilon in sites.items():
        ledger = PrivacyLedger.from_json((tmp_path / "run" / "agents" / site / "privacy.json").read_text())
        assert len(ledger.history) == 2 and all(s == 1.0 for s, _, _ in ledger.history)
        assert epsilon == pytest.approx(ledger.epsilon(1e-5)) and 0 < epsilon < 100
    assert json.loads((tmp_path / "run" / "checkpoints" / "state.json").read_text())["history"][-1]["dp_epsilon"] == central["epsilon"]
