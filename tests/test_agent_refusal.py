"""An operator can pin a site's uplink codec and training mode: rounds that ask for others are skipped."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.cli.main import app
from fedge.protocol import RoundAnnouncement, TransferInfo


def _announcement(mode: str, codec: str = "q4,ef|zstd") -> RoundAnnouncement:  # servers announce the canonical spec
    transfer = TransferInfo(transfer="0" * 32, chunks=1, bytes=1, sha256="0" * 64)
    return RoundAnnouncement(
        round=1,
        deadline=0.0,
        model_sha256="0" * 64,
        downlink=transfer,
        downlink_kind="full",
        uplink_codec=codec,
        train={"mode": mode},
        federation="demo",
        sender="server",
        run="0" * 32,
    )


@pytest.mark.parametrize(
    ("pinned", "ann", "reason"),
    [
        ({"mode": "lora"}, _announcement("full"), "training mode 'full'"),
        ({"codec": "q4,ef|zstd:3"}, _announcement("lora", codec="ternary,ef|zstd:3"), "codec 'ternary,ef|zstd:3'"),
    ],
)
def test_a_round_outside_what_the_site_pinned_is_skipped_without_training(tmp_path, pinned, ann, reason) -> None:
    agent = Agent(AgentConfig(broker="mqtt://127.0.0.1:1", site="s1", state_dir=tmp_path, **pinned), task=None)

    assert reason in agent._refusal(ann)
    agent._train_and_send(ann)  # no model, no session: it would fail if it trained or published

    assert agent.answered == ann and agent.rounds_done == []
    assert (
        Agent(AgentConfig(broker="mqtt://127.0.0.1:1", site="s1", state_dir=tmp_path, **pinned), task=None)._refusal(_announcement(pinned.get("mode", "lora")))
        is None
    )


def test_an_unknown_mode_is_a_usage_error_that_lists_the_modes(tmp_path) -> None:
    result = CliRunner().invoke(app, ["agent", "--broker", "mqtt://127.0.0.1:1", "--site", "s1", "--mode", "sparse", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "'full', 'lora', 'pruned' or 'qat'" in result.output
