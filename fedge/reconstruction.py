"""How far a decoded update is from the delta that was encoded: the one measurement `fedge
compress` and the codec benchmarks report, so their error columns mean the same thing."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from compression import SparseTensor


@dataclass(frozen=True)
class ReconstructionError:
    relative_l2: float  # ||decoded - reference|| / ||reference||; 0 when both are zero, inf when only the reference is
    max_abs: float


def reconstruction_error(
    reference: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray | SparseTensor], skip: Collection[str] = ()
) -> ReconstructionError:
    """Over the tensors of `decoded` not in `skip` (e.g. dense BatchNorm statistics that would hide
    the weights' error), summed in float64."""
    err_sq = ref_sq = max_abs = 0.0
    for name, value in decoded.items():
        if name in skip:
            continue
        recon = value.to_dense() if isinstance(value, SparseTensor) else value
        diff = recon.astype(np.float64) - reference[name]
        err_sq += float(np.sum(diff**2))
        ref_sq += float(np.sum(reference[name].astype(np.float64) ** 2))
        max_abs = max(max_abs, float(np.abs(diff).max(initial=0.0)))
    relative = (err_sq / ref_sq) ** 0.5 if ref_sq else (0.0 if err_sq == 0 else float("inf"))
    return ReconstructionError(relative, max_abs)
