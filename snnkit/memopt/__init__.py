"""Memory optimisation: exact gradient checkpointing with spike-input compression.

* :mod:`~snnkit.memopt.checkpointing`: :func:`input_compressed_gc`,
  :func:`to_gc_function`, :class:`GCContainer`, :class:`TCGCContainer`,
  :func:`in_gc_1st_forward`, :func:`query_autocast` (its docstring states the
  invariants: exactness, explicit state, BatchNorm statistics updated once).
* :mod:`~snnkit.memopt.compress`: lossless spike compressors.
* :mod:`~snnkit.memopt.tracker`: :class:`MemoryTracker`, peak live tensor bytes
  on any device, CPU included.
* :mod:`~snnkit.memopt.pipeline`: :func:`apply_gc` / :func:`unwrap_gc` (per-layer
  switches) and the planner :func:`memory_optimization`.
"""
from . import checkpointing, compress, pipeline, tracker
from .checkpointing import (
    GCContainer,
    TCGCContainer,
    in_gc_1st_forward,
    input_compressed_gc,
    query_autocast,
    to_gc_function,
)
from .compress import (
    BaseSpikeCompressor,
    BitSpikeCompressor,
    BooleanSpikeCompressor,
    CompressedSpikes,
    NullSpikeCompressor,
    SparseSpikeCompressor,
    Uint8SpikeCompressor,
)
from .pipeline import MemOptSummary, apply_gc, memory_optimization, unwrap_gc
from .tracker import MemoryTracker

__all__ = [*checkpointing.__all__, *compress.__all__, *tracker.__all__, *pipeline.__all__]
