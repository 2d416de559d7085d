"""Peak live tensor memory of any code, on any device, CPU included.

:class:`MemoryTracker` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
under the hood: every ATen operator that runs while it is active (also those of
autograd's backward on the same thread, and nested trackers) reports its
outputs; each output that is a new storage (not a view or an in-place result,
judged from the operator's schema) is counted once, by its storage, with its
``nbytes``, and watched with a weak reference so that its bytes leave the count
when the storage is freed. The result is the exact peak of bytes of tensor
storages that were alive at the same time, independent of allocator caching.

What it does not see: storages made outside the dispatcher (``torch.get_rng_state``,
tensors unpickled) and storages that a ``resize_`` grows after creation.
``torch.tensor`` of Python data is counted (and of an array, by its copy);
``torch.from_numpy`` and ``torch.as_tensor`` of an array, which share the array's
memory, are not. The overhead is a few microseconds per operator.

Example:
    >>> import torch
    >>> from snnkit.memopt import MemoryTracker
    >>> x = torch.ones(1024)  # 4 KiB, made before: not counted
    >>> with MemoryTracker() as mt:
    ...     y = x * 2        # +4 KiB
    ...     z = y.view(32, 32)  # a view: +0
    ...     w = (y + 1) * 3  # y + 1 (4 KiB) dies after the product (4 KiB)
    ...     del y, z
    >>> mt.peak_bytes, mt.retained_bytes, mt.allocated_bytes
    (12288, 4096, 12288)
"""
import gc
import weakref
from typing import Callable, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MemoryTracker"]

_FRESH: Dict[object, bool] = {}  # operator -> whether it can return a new storage
_LIFT_FRESH = torch.ops.aten.lift_fresh.default


def _returns_fresh(func) -> bool:
    fresh = _FRESH.get(func)
    if fresh is None:
        returns = func._schema.returns
        fresh = _FRESH[func] = any(r.alias_info is None for r in returns)
    return fresh


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: "MemoryTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _LIFT_FRESH:  # torch.tensor(data): its storage was made outside the dispatcher
            if out.untyped_storage().resizable():  # not an array's memory (from_numpy, as_tensor)
                self.tracker._track(out)
        elif _returns_fresh(func):
            track = self.tracker._track
            if isinstance(out, torch.Tensor):
                track(out)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    if isinstance(o, torch.Tensor):
                        track(o)
                    elif isinstance(o, (tuple, list)):
                        for p in o:
                            if isinstance(p, torch.Tensor):
                                track(p)
        return out


class MemoryTracker:
    """Measure the peak bytes of live tensor storage while a block of code runs.

    Use it as a context manager, or :meth:`measure` a callable (a training step).

    Args:
        baseline: Also count the tensors alive on entry (found through Python's
            garbage collector, so only tensors with a Python object), in
            :attr:`baseline_bytes` and in the peak; they leave the count when freed.

    Attributes:
        peak_bytes: Peak of the bytes alive at once (storages created inside, plus
            baseline storages when ``baseline=True``).
        current_bytes: Bytes counted and alive now.
        retained_bytes: Bytes of storages created inside and still alive (at exit).
        allocated_bytes: Total bytes of all storages created inside.
        num_allocations: Number of storages created inside.
        baseline_bytes: Bytes of the baseline tensors (0 without ``baseline``).

    Example:
        >>> import torch
        >>> from snnkit.memopt import MemoryTracker
        >>> w = torch.randn(256, 256, requires_grad=True)
        >>> def step():
        ...     (torch.randn(64, 256) @ w).relu().sum().backward()
        >>> mt = MemoryTracker.measure(step)
        >>> mt.peak_bytes >= 256 * 256 * 4  # at least the gradient of w
        True
        >>> mt.retained_bytes == 256 * 256 * 4  # w.grad stays
        True
    """

    def __init__(self, baseline: bool = False):
        self.baseline = bool(baseline)
        self._reset()

    def _reset(self):
        self.peak_bytes = 0
        self.current_bytes = 0
        self.retained_bytes = 0
        self.allocated_bytes = 0
        self.num_allocations = 0
        self.baseline_bytes = 0
        self._live: Dict[int, tuple] = {}  # storage id -> (nbytes, weakref, is_new)
        self._active = False
        self._mode = None

    def __repr__(self):
        return (
            f"MemoryTracker(peak_bytes={self.peak_bytes}, current_bytes={self.current_bytes}, "
            f"retained_bytes={self.retained_bytes}, allocated_bytes={self.allocated_bytes})"
        )

    # -- counting -----------------------------------------------------------------------------
    def _add(self, storage, is_new: bool) -> None:
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = storage._cdata
        if key in self._live:
            return
        ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._live[key] = (nbytes, ref, is_new)
        self.current_bytes += nbytes
        if is_new:
            self.allocated_bytes += nbytes
            self.num_allocations += 1
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or not self._active:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return
        self._add(storage, True)

    def _free(self, key) -> None:
        entry = self._live.pop(key, None)
        if entry is not None and self._active:
            self.current_bytes -= entry[0]

    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes alive now.

        Example:
            >>> import torch
            >>> from snnkit.memopt import MemoryTracker
            >>> with MemoryTracker() as mt:
            ...     a = torch.ones(256); del a
            ...     mt.reset_peak()
            ...     b = torch.ones(128)
            >>> mt.peak_bytes
            512
        """
        self.peak_bytes = self.current_bytes

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> "MemoryTracker":
        if self._active:
            raise RuntimeError("snnkit.memopt: a MemoryTracker cannot be entered twice at the same time")
        self._reset()
        self._active = True
        if self.baseline:
            for obj in gc.get_objects():
                if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
                    try:
                        self._add(obj.untyped_storage(), False)
                    except (RuntimeError, NotImplementedError, ValueError):  # no storage (an uninitialised lazy parameter)
                        pass
            self.baseline_bytes = self.current_bytes
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
        self.retained_bytes = sum(n for n, _, is_new in self._live.values() if is_new)
        self._active = False
        self._live = {}  # drops the weak references: no callbacks after exit

    @classmethod
    def measure(cls, fn: Callable, *args, baseline: bool = False, **kwargs) -> "MemoryTracker":
        """Run ``fn(*args, **kwargs)`` under a new tracker and return the tracker.

        The result of ``fn`` is dropped before the tracker exits, so
        :attr:`retained_bytes` is what ``fn`` left alive elsewhere (gradients,
        module state, a graph held by the module).

        Example:
            >>> import torch
            >>> from snnkit.memopt import MemoryTracker
            >>> MemoryTracker.measure(torch.zeros, 1000).peak_bytes
            4000
        """
        with cls(baseline=baseline) as mt:
            result = fn(*args, **kwargs)
            del result
        return mt


class _SavedBytes:
    """Saved-tensor hooks that add up the distinct storages autograd keeps for backward.

    ``storages`` maps each storage's address to its bytes; storages at the addresses
    in ``exclude`` (e.g. the parameters') are left out.
    """

    def __init__(self, exclude: Optional[set] = None):
        self.exclude, self.storages = exclude or set(), {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages saved so far."""
        return sum(self.storages.values())
