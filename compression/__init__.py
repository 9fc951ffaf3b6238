"""Compression for fedge. Update codecs, error feedback and sparse aggregation are numpy and
bytes (imported here); model compression, `compression.lora` (peft), `compression.pruning`
(torch-pruning) and `compression.qat` (torch), is imported by the training modes that use it.

Imports nothing else of fedge, so the agent, the server and the benchmarks share one implementation.
"""

from compression.aggregate import SparseAccumulator, gram_matrix, order_statistic_mean
from compression.codecs import STAGES, CodecError, CodecSpecError, SparseTensor, TensorSpec, UpdateCodec
from compression.error_feedback import ErrorFeedback

__all__ = [
    "STAGES",
    "CodecError",
    "CodecSpecError",
    "ErrorFeedback",
    "SparseAccumulator",
    "SparseTensor",
    "TensorSpec",
    "UpdateCodec",
    "gram_matrix",
    "order_statistic_mean",
]
