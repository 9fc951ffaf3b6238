"""Update codecs: importing the stage modules registers every stage by name."""

from compression.codecs import entropy as _entropy  # noqa: F401
from compression.codecs import quantize as _quantize  # noqa: F401
from compression.codecs import sparsify as _sparsify  # noqa: F401
from compression.codecs.base import STAGES, CodecError, CodecSpecError, SparseTensor, TensorSpec
from compression.codecs.pipeline import UpdateCodec

__all__ = ["STAGES", "CodecError", "CodecSpecError", "SparseTensor", "TensorSpec", "UpdateCodec"]
