"""Int8 quantization-aware training with plain fake-quantize ops.

Every `nn.Linear`/`nn.Conv2d` becomes a subclass that fake-quantizes its input (per tensor, range
observed during training) and its weight (per output channel), both symmetric with zero point 0.
`torch.fake_quantize_per_*_affine` pass gradients straight through and export to ONNX as
QuantizeLinear/DequantizeLinear pairs, the explicit-quantization form TensorRT consumes; torch.ao's
eager/FX flow is deprecated and is not used.

Parameter names are unchanged (`fc1.weight` stays `fc1.weight`); each layer adds one buffer,
`input_amax`, the observed absolute maximum of its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ONNX QuantizeLinear's int8 range. Scales are amax / 127, so values land in [-127, 127]
# (symmetric); -128 is only allowed because the exporter accepts no narrower int8 range.
QMIN, QMAX = -128, 127
_QSCALE = 127.0


class _FakeQuant:
    """Input observer and fake-quantizers shared by the quantized layer types."""

    weight: nn.Parameter
    input_amax: torch.Tensor
    momentum: float

    def _init_quant(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"qat momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        # 0 means "not observed yet": the first training batch sets the range.
        # Shape (1,), not a 0-d scalar: numpy turns 0-d differences into scalars the codecs refuse.
        self.register_buffer("input_amax", torch.zeros(1, device=self.weight.device))  # type: ignore[attr-defined]

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # type: ignore[attr-defined]
            with torch.no_grad():
                batch = x.detach().abs().amax().to(self.input_amax.dtype)
                ema = self.momentum * self.input_amax + (1.0 - self.momentum) * batch
                self.input_amax.copy_(torch.where(self.input_amax > 0, ema, batch))
        scale = (self.input_amax.clamp_min(1e-8) / _QSCALE).detach().reshape(())
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)

    def _quant_weight(self) -> torch.Tensor:
        w = self.weight
        scale = (w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / _QSCALE).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)


class QuantLinear(nn.Linear, _FakeQuant):  # type: ignore[misc]  # both bases declare weight
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _FakeQuant):  # type: ignore[misc]  # both bases declare weight
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias)


def _quantized(module: nn.Module, momentum: float) -> nn.Module:
    """A quantized layer sharing `module`'s parameters (same tensors, same names)."""
    new: nn.Module
    if type(module) is nn.Linear:
        new = QuantLinear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    elif type(module) is nn.Conv2d:
        # The module's own 2-d geometry, which torch types as tuple[int, ...].
        new = QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,  # type: ignore[arg-type]
            module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta",  # type: ignore[arg-type]
        )  # fmt: skip
    else:
        return module
    new.weight, new.bias = module.weight, module.bias
    new._init_quant(momentum)  # type: ignore[operator]
    new.train(module.training)
    return new


def quantize_layers(model: nn.Module, momentum: float = 0.9) -> nn.Module:
    """Replace every plain Linear/Conv2d of `model` by its fake-quantized twin, in place."""
    for name, child in list(model.named_children()):
        replacement = _quantized(child, momentum)
        if replacement is child:
            quantize_layers(child, momentum)
        else:
            setattr(model, name, replacement)
    return model


def unobserved_layers(model: nn.Module) -> list[str]:
    """Quantized layers whose input range was never observed (their int8 export would be wrong)."""
    return [n for n, m in model.named_modules() if isinstance(m, _FakeQuant) and float(m.input_amax) <= 0]


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Observe input ranges from `batches` without training (e.g. on the server before round 1)."""
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    model.train(was_training)
