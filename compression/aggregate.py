"""Server-side aggregation of decoded updates that never densifies a sparse one.

A sparse update touches only its k indices (unique by SparseTensor's contract, so a fancy-index
add is exact): cost O(k) per update instead of O(numel). The weighted mean's sums live in one flat
float32 buffer, the model's own precision and what a dense (Flower-style) average uses. The robust
rules' building blocks (order statistics per coordinate, the Gram matrix of the updates) work on
the explicit entries too, with implicit zeros counted but never materialised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from compression.codecs.base import CodecError, SparseTensor, TensorSpec


class SparseAccumulator:
    """sum(w * update) / sum(w) over the tensors of one manifest."""

    def __init__(self, manifest: list[TensorSpec]) -> None:
        self._specs = {spec.name: spec for spec in manifest}
        if len(self._specs) != len(manifest):
            raise CodecError("manifest repeats tensor names; one accumulator slot per tensor")
        self._offsets = dict(zip(self._specs, np.cumsum([0] + [s.numel for s in manifest]).tolist()))
        self._flat = np.zeros(sum(s.numel for s in manifest), dtype=np.float32)
        self._weight = 0.0

    @property
    def total_weight(self) -> float:
        return self._weight

    def _slot(self, buffer: np.ndarray, name: str) -> np.ndarray:
        start = self._offsets[name]
        return buffer[start : start + self._specs[name].numel]

    def add(self, decoded: Mapping[str, np.ndarray | SparseTensor], weight: float) -> None:
        """Add one client's decoded update with its weight (typically its sample count)."""
        if not (math.isfinite(weight) and weight > 0):
            raise CodecError(f"update weight must be a positive finite number (e.g. the sample count), got {weight!r}")
        if decoded.keys() != self._specs.keys():
            missing, extra = sorted(set(self._specs) - set(decoded)), sorted(set(decoded) - set(self._specs))
            raise CodecError(f"update does not match the round's manifest: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, update in decoded.items():
            if update.shape != self._specs[name].shape:
                raise CodecError(f"tensor {name!r}: update of shape {update.shape}, manifest says {self._specs[name].shape}")
        w = np.float32(weight)
        for name, update in decoded.items():
            slot = self._slot(self._flat, name)
            if isinstance(update, SparseTensor):
                slot[update.indices] += w * update.values
            else:
                slot += w * update.reshape(-1).astype(np.float32, copy=False)
        self._weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 arrays in manifest shapes (views of one fresh buffer)."""
        if self._weight == 0.0:
            raise CodecError("no updates were added; the round has nothing to aggregate")
        mean = self._flat * np.float32(1.0 / self._weight)
        return {name: self._slot(mean, name).reshape(spec.shape) for name, spec in self._specs.items()}


Column = Sequence[np.ndarray | SparseTensor]  # one tensor, as each of the n updates sent it


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the floats' order (sign bit flipped, negatives inverted)."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    return bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000)).astype(np.uint32)


def _from_sort_keys(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys >> 31, keys ^ np.uint32(0x80000000), ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _sparse_ranks(column: Sequence[SparseTensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every explicit entry's (index, value, rank) where rank is its 0-based place in its coordinate's
    sorted column of all n values, the implicit zeros of the updates that did not send it included.

    One uint64 sort of (index << 32 | order-preserving value bits) orders entries by coordinate and
    value at once, O(K log K) in the K explicit entries: nothing of size n x numel is built.
    """
    n = len(column)
    indices = np.concatenate([s.indices for s in column])
    keys = (indices.astype(np.uint64) << np.uint64(32)) | _sort_keys(np.concatenate([s.values for s in column])).astype(np.uint64)
    keys.sort()
    indices = (keys >> np.uint64(32)).astype(np.int64)
    values = _from_sort_keys((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    if not len(keys):
        return indices, values, indices
    starts = np.flatnonzero(np.r_[True, indices[1:] != indices[:-1]])
    counts = np.diff(np.r_[starts, len(indices)])
    position = np.arange(len(indices)) - np.repeat(starts, counts)
    negatives = np.repeat(np.add.reduceat((values < 0).astype(np.int64), starts), counts)
    # Sorted column: the negatives, then the n - count implicit zeros, then the non-negative entries.
    rank = position + np.where(position >= negatives, np.repeat(n - counts, counts), 0)
    return indices, values, rank


def order_statistic_mean(column: Column, lo: int, hi: int) -> np.ndarray:
    """Per coordinate, the mean of the order statistics lo..hi-1 (0-based, ascending) of the n values
    the updates hold there: the median is the window around (n-1)/2, a trimmed mean [b, n-b).

    All-sparse columns stay sparse (`_sparse_ranks`); a column with any dense update is stacked to
    n x numel and sorted (what a dense implementation does for every tensor). Sums are float64, so
    huge finite values do not overflow on the way to a finite mean.
    """
    n = len(column)
    if not 0 <= lo < hi <= n:
        raise CodecError(f"order statistic window [{lo}, {hi}) is not inside [0, {n})")
    shape = column[0].shape
    if all(isinstance(u, SparseTensor) for u in column):
        indices, values, rank = _sparse_ranks(column)  # type: ignore[arg-type]
        keep = (rank >= lo) & (rank < hi)
        sums = np.bincount(indices[keep], weights=values[keep].astype(np.float64), minlength=math.prod(shape))
        return (sums / (hi - lo)).astype(np.float32).reshape(shape)
    stack = np.stack([u.to_dense() if isinstance(u, SparseTensor) else u for u in column]).reshape(n, -1)
    stack.sort(axis=0)
    return stack[lo:hi].mean(axis=0, dtype=np.float64).astype(np.float32).reshape(shape)


def gram_matrix(updates: Sequence[Mapping[str, np.ndarray | SparseTensor]], manifest: list[TensorSpec]) -> np.ndarray:
    """G[i, j] = <update_i, update_j> in float64 over the whole manifest (distances follow from it).

    Tensors every update sent dense: one n x numel matrix product. The rest: all explicit entries
    sorted by coordinate once; a coordinate that m updates sent adds its m(m-1)/2 pairwise products,
    so the cost is O(K log K + sum of m^2) for K entries, at most O(n K) and O(K) when the updates
    touch different coordinates; nothing of size n x numel is built.
    """
    n = len(updates)
    gram = np.zeros((n, n))
    start = 0
    idx, owner, val = [], [], []
    for spec in manifest:
        column = [u[spec.name] for u in updates]
        if not any(isinstance(u, SparseTensor) for u in column):
            stack = np.stack([np.asarray(u, dtype=np.float64).reshape(-1) for u in column])
            gram += stack @ stack.T
        else:
            for i, u in enumerate(column):
                sparse = u if isinstance(u, SparseTensor) else SparseTensor(spec.shape, np.arange(spec.numel, dtype=np.int64), u.reshape(-1).astype(np.float32))
                idx.append(sparse.indices + start)
                owner.append(np.full(len(sparse.indices), i, dtype=np.int64))
                val.append(sparse.values.astype(np.float64))
        start += spec.numel
    if idx:
        gram += _sparse_gram(np.concatenate(idx), np.concatenate(owner), np.concatenate(val), n)
    return gram


def _sparse_gram(idx: np.ndarray, owner: np.ndarray, val: np.ndarray, n: int, chunk: int = 1 << 23) -> np.ndarray:
    gram = np.diag(np.bincount(owner, weights=val * val, minlength=n))
    order = np.argsort(idx, kind="stable")
    idx, owner, val = idx[order], owner[order], val[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    counts = np.diff(np.r_[starts, len(idx)])
    pairs = np.zeros(n * n)
    for m in np.unique(counts[counts > 1]).tolist():
        first, second = np.triu_indices(m, 1)
        group_starts = starts[counts == m]
        for g in range(0, len(group_starts), max(chunk // len(first), 1)):  # bounded memory per step
            pos = group_starts[g : g + max(chunk // len(first), 1), None] + np.arange(m)
            v, c = val[pos], owner[pos]
            pairs += np.bincount((c[:, first] * n + c[:, second]).reshape(-1), weights=(v[:, first] * v[:, second]).reshape(-1), minlength=n * n)
    square = pairs.reshape(n, n)
    return gram + square + square.T
