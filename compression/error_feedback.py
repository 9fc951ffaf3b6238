"""Error-feedback residuals: what compression dropped last round is added back before the next.

x' = delta + residual; send C(x'); residual = x' - decode(C(x')). The agent keeps one store per
federation and saves `to_bytes()` beside its state, so a restart does not forget what it still owes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compression.codecs.base import CodecError


class ErrorFeedback:
    """Residuals keyed by tensor name (float32, the tensor's shape)."""

    def __init__(self) -> None:
        self._residuals: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._residuals)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The residual for `name`, or None before its first round."""
        residual = self._residuals.get(name)
        if residual is not None and residual.shape != tuple(shape):
            raise CodecError(
                f"error-feedback residual for {name!r} has shape {residual.shape}, the update has {tuple(shape)}; "
                "the model changed: start from a fresh ErrorFeedback() (delete the saved residual file)"
            )
        return residual

    def update(self, residuals: Mapping[str, np.ndarray]) -> None:
        for name, value in residuals.items():
            self._residuals[name] = np.ascontiguousarray(value, dtype=np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        loaded: dict[str, np.ndarray] = {}
        for name, value in state.items():
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.floating) or not bool(np.isfinite(array).all()):
                raise CodecError(f"error-feedback residual {name!r} must be finite floats; delete the residual file to reset it")
            loaded[name] = np.ascontiguousarray(array, dtype=np.float32)
        self._residuals = loaded

    def to_bytes(self) -> bytes:
        """safetensors bytes; the owner writes them atomically beside its own state."""
        return st_save(self.state_dict(), metadata={"format": "fedge-error-feedback", "schema_version": "1"})

    def load_bytes(self, data: bytes, source: str = "residual file") -> ErrorFeedback:
        """Replace this store's residuals with the serialized ones; returns self for chaining."""
        try:
            state = st_load(data)
        except SafetensorError as exc:
            raise CodecError(f"{source} is not a readable residual file ({exc}); delete it to reset error feedback") from exc
        self.load_state_dict(state)
        return self
