"""Gradient checkpointing with spike-input compression (filled in by the memopt modules)."""
from .._context import in_gc_1st_forward

__all__ = ["in_gc_1st_forward"]
