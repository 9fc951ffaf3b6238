"""Label-preserving augmentation for small imaging sets: random horizontal flip and a shift of up
to `MAX_SHIFT` pixels, drawn per image from the trainer's seeded generator.

Why: a site holding a few hundred 28x28 images (BreastMNIST has 546 in all, fewer per site)
overfits within a few epochs; flips and shifts are the MedMNIST-style augmentation that keeps a
small CNN learning (measured in benchmarks/noniid.py). One batched affine resample, not a per-image
loop, so it costs little beside the step; integer shifts with border padding keep pixel values
exact. Classification only: a denoiser's pairs would need the same transform on both images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SHIFT = 3  # pixels at 28x28: about a tenth of the field, as the anatomy is roughly centred


def augment_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """NCHW -> NCHW: each image flipped left-right with probability 1/2 and shifted by whole pixels
    in [-max_shift, max_shift] on each axis (edges repeated)."""
    n, _, h, w = x.shape
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    # affine_grid works in [-1, 1] (align_corners=True: the corner pixels' centres), so a pixel is 2/(size-1).
    theta[:, 0, 2] = shift[:, 0] * 2.0 / max(w - 1, 1)
    theta[:, 1, 2] = shift[:, 1] * 2.0 / max(h - 1, 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=True)
