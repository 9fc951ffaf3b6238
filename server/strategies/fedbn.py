"""FedBN (Li et al., 2021): normalisation layers stay at the sites; the rest is averaged as in FedAvg."""

from __future__ import annotations

from dataclasses import dataclass

from server.strategies.base import register_strategy
from server.strategies.fedavg import FedAvg


@register_strategy("fedbn")
@dataclass(frozen=True)
class FedBN(FedAvg):
    """Every site keeps its own normalisation layers (weights, biases, running statistics): with
    feature shift between sites (scanners, protocols), one shared set of statistics fits none.

    The rule itself is FedAvg; what differs is what travels. The announcement says `local_norm`,
    and server and agent both take the tensors of `fedge.weights.norm_layer_names` out of the
    model they exchange: the server's global (and its checkpoints) never hold them, the update
    manifest never names them, and each agent keeps its own across rounds and restarts. That saves
    their bytes both ways. The server's own model (evaluation, `final.safetensors`) has freshly
    initialised normalisation layers: a site's model is the global plus its own.
    """

    calibration_refusal = "each site keeps its own normalisation layers, so there is no one feature extractor whose features the sites could sum"

    def announce(self) -> dict[str, object]:
        return {"local_norm": True}
