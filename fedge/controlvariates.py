"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020) as tensors of the global and the update.

The server's variate c and each site's change of its own variate c_i travel beside the model under
`PREFIX` + the parameter's name. So they go through the same codec (sparsified and quantized with
error feedback like any delta), the same validation (norm, finiteness), the same model hash, downlink
deltas and snapshots as the weights: no second channel to secure. Only trainable parameters have a
variate (LoRA: the adapters and the head); buffers and a FedBN site's layers have none.

A site's new variate is the mean of the raw minibatch gradients of its last local training. That is
the paper's option II for plain SGD (c_i - c + (x - y_i) / (K lr) expands to exactly that mean), and
it stays a gradient estimate under Adam, where (x - y_i) / (K lr) would not be one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import nn

from compression import ErrorFeedback

PREFIX = "scaffold_c."


def parameter_names(model: nn.Module, local: Collection[str] = ()) -> list[str]:
    """The parameters that get a variate: trainable, and not kept at the site."""
    return [name for name, p in model.named_parameters() if p.requires_grad and name not in local]


def variate_shapes(model: nn.Module, local: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """The variates a global carries for `model`, under the wire names (works on the meta device)."""
    params = dict(model.named_parameters())
    return {PREFIX + name: tuple(params[name].shape) for name in parameter_names(model, local)}


def zero_variates(model: nn.Module, local: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The server's c before round 1."""
    return {name: np.zeros(shape, np.float32) for name, shape in variate_shapes(model, local).items()}


def is_variate(name: str) -> bool:
    return name.startswith(PREFIX)


def split(weights: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the model's tensors, the variates by parameter name) of a global."""
    model = {k: v for k, v in weights.items() if not is_variate(k)}
    variates = {k.removeprefix(PREFIX): v for k, v in weights.items() if is_variate(k)}
    return model, variates


def correction(server: Mapping[str, np.ndarray], site: Mapping[str, np.ndarray], residual: ErrorFeedback | None = None) -> dict[str, np.ndarray]:
    """c - c_i for every parameter of `server`, with c_i as the server's c accounts for it.

    Under error feedback the server has received the site's variate less what still waits in its
    `residual`; correcting with that (not with the exact c_i) keeps c - c_i zero on average over
    the sites, whatever the codec dropped. A site with no variate yet has c_i = 0."""
    out = {}
    for name, c in server.items():
        own = site.get(name)
        if own is None or own.shape != c.shape:
            out[name] = c.astype(np.float32)
            continue
        unsent = residual.get(PREFIX + name, own.shape) if residual is not None else None
        out[name] = (c - (own - unsent if unsent is not None else own)).astype(np.float32)
    return out


def update_entries(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The site's change of its variate, under the wire names: what its update carries beside the model delta."""
    return {PREFIX + k: (v - old[k] if k in old and old[k].shape == v.shape else v).astype(np.float32) for k, v in new.items()}


class VariateStep:
    """The site's side of one local training: every gradient gets c - c_i added before the optimizer
    steps, and the raw gradients are averaged over the steps (the site's next c_i)."""

    def __init__(self, model: nn.Module, correction: Mapping[str, np.ndarray]):
        params = dict(model.named_parameters())
        unknown = sorted(set(correction) - set(params))
        if unknown:
            raise ValueError(f"control variates for parameters the model lacks: {unknown[:3]}")
        self.params = {name: params[name] for name in correction}
        self.correction = {name: torch.from_numpy(np.asarray(v, np.float32)).to(self.params[name].device) for name, v in correction.items()}
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        self.steps = 0

    def apply(self) -> None:
        """After backward, before the optimizer's step."""
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    p.grad = self.correction[name].clone().to(p.dtype)
                    continue
                self.sums[name] += p.grad.float()
                p.grad += self.correction[name].to(p.grad.dtype)
        self.steps += 1

    def mean_gradient(self) -> dict[str, np.ndarray]:
        return {name: (s / max(self.steps, 1)).cpu().numpy().astype(np.float32) for name, s in self.sums.items()}
