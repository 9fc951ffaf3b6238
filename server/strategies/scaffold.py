"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each site's drift under label skew."""

from __future__ import annotations

from dataclasses import dataclass

from server.strategies.base import register_strategy
from server.strategies.fedavg import FedAvg


@register_strategy("scaffold")
@dataclass(frozen=True)
class Scaffold(FedAvg):
    """Each site adds c - c_i to every gradient of its local training, where c estimates the
    federation's gradient and c_i its own, so a site whose labels are nearly all one class steps
    roughly where the pooled data would; it then sends its model delta and the change of c_i.

    The variates travel as tensors of the model (`fedge.controlvariates`): the global carries c,
    the update Delta c_i, both through the announced codecs. So FedAvg's sample-weighted mean over
    the uplink manifest is the whole rule: it moves the model by the mean delta and c by the mean
    Delta c_i (the paper's server step with every site taking part and a global lr of 1).

    Cost: about twice FedAvg's bytes each way (a variate per trainable parameter), the sum of the
    raw gradients on the site, and nothing new in server state (c is part of the global and its
    checkpoints).
    """

    def announce(self) -> dict[str, object]:
        return {"control_variates": True}
