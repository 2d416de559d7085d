"""Thread-local flags shared by memopt and GC-aware layers (a leaf module).

``memopt`` sets the flag while it runs the first (no-grad) forward of a
checkpointed segment; layers with side effects (BatchNorm running statistics)
read it without importing ``memopt``.
"""
import contextlib
import threading

_local = threading.local()


def in_gc_1st_forward() -> bool:
    """Return True only inside the first (no-grad) forward of a GC segment.

    The flag is thread-local and nesting-safe: a segment inside a segment keeps
    it set until the outer first forward ends.

    Example:
        >>> from snnkit.memopt import in_gc_1st_forward
        >>> in_gc_1st_forward()
        False
    """
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def gc_1st_forward():
    """Mark the enclosed code as the first forward of a GC segment."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
