"""Pure numpy/bytes compression for fedge: update codecs, error feedback and sparse aggregation.

Imports nothing else of fedge, so the agent, the server and the benchmarks share one implementation.
"""

from compression.aggregate import SparseAccumulator, gram_matrix, order_statistic_mean
from compression.codecs import STAGES, CodecError, CodecSpecError, SparseTensor, TensorSpec, UpdateCodec
from compression.error_feedback import ErrorFeedback

__all__ = ["STAGES", "CodecError", "CodecSpecError", "ErrorFeedback", "SparseAccumulator", "SparseTensor", "TensorSpec", "UpdateCodec", "gram_matrix", "order_statistic_mean"]
