"""Non-IID site splits: each site gets a Dirichlet(alpha) share of every class (label skew)."""

from __future__ import annotations

import numpy as np


def dirichlet_split(labels: np.ndarray, num_sites: int, alpha: float = 0.5, seed: int = 0, min_size: int = 10) -> list[np.ndarray]:
    """Index arrays, one per site. Smaller alpha means stronger skew; resampled until every site
    holds at least `min_size` samples so no site trains on an empty shard."""
    if num_sites < 1:
        raise ValueError("num_sites must be >= 1")
    if len(labels) < num_sites * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {num_sites} sites {min_size} samples each; use fewer sites")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(idx)).astype(int)[:-1]
            for site, part in enumerate(np.split(idx, cuts)):
                shards[site].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"alpha={alpha} leaves some site with fewer than {min_size} samples; raise alpha")
