"""Thread-local flags shared by memopt and GC-aware layers (a leaf module).

``memopt`` sets one flag while it runs the first (no-grad) forward of a
checkpointed segment and another while it recomputes a segment in backward;
modules with side effects (BatchNorm running statistics, a neuron's ``v_seq``)
read them without importing ``memopt``.
"""
import contextlib
import threading

_local = threading.local()


def _depth(name: str) -> int:
    return getattr(_local, name, 0)


@contextlib.contextmanager
def _inside(name: str):
    setattr(_local, name, _depth(name) + 1)
    try:
        yield
    finally:
        setattr(_local, name, _depth(name) - 1)


def in_gc_1st_forward() -> bool:
    """Return True only inside the first (no-grad) forward of a GC segment.

    The flag is thread-local and nesting-safe: a segment inside a segment keeps
    it set until the outer first forward ends.

    Example:
        >>> from snnkit.memopt import in_gc_1st_forward
        >>> in_gc_1st_forward()
        False
    """
    return _depth("first_forward") > 0


def gc_1st_forward():
    """Mark the enclosed code as the first forward of a GC segment."""
    return _inside("first_forward")


def in_gc_recompute() -> bool:
    """Return True inside the recompute of a GC segment (backward), nested segments' forwards included.

    Example:
        >>> from snnkit._context import in_gc_recompute
        >>> in_gc_recompute()
        False
    """
    return _depth("recompute") > 0


def gc_recompute():
    """Mark the enclosed code as the recompute of a GC segment."""
    return _inside("recompute")
