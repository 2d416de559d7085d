"""Shared CuPy plumbing of the CUDA kernels: compile once, launch on torch's current stream.

CuPy is imported on first use only. Both kernel families (the neurons' and the
bit packing of memopt) declare their kernels with :func:`signature` and launch
through :func:`launch_kernel`.
"""
import functools
import warnings

import torch

BLOCK = 256


def signature(name: str, params) -> str:
    """``extern "C" __global__ void name(...)`` for ``params`` ``[(C type, name), ...]``."""
    args = ",\n    ".join(f"{t} {n}" for t, n in params)
    return f'extern "C" __global__ void {name}(\n    {args})'


@functools.lru_cache(maxsize=None)
def _converters(params: tuple) -> tuple:
    """One function per kernel parameter turning a Python argument into CuPy's typed scalar."""
    import numpy as np

    def pointer(t):
        return np.uint64(0 if t is None else t.data_ptr())

    def convert(c_type):
        if "*" in c_type:
            return pointer
        return np.float32 if "float" in c_type else np.int64 if "long long" in c_type else np.int32

    return tuple(convert(t) for t, _ in params)


def launch_kernel(name: str, source: str, params: tuple, n_threads: int, args: tuple, options: tuple = ()) -> None:
    """Compile (once) and launch kernel ``name`` of ``source`` with ``args`` matching ``params``.

    The device is that of the first tensor argument; ``None`` stands for a null pointer.
    """
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    fn = function(name, source, device.index, options)
    launch(fn, n_threads, tuple(f(a) for f, a in zip(_converters(params), args)), device)


@functools.lru_cache(maxsize=None)
def function(name: str, source: str, device: int, options: tuple = ()):
    """Kernel ``name`` of ``source`` compiled for ``device`` (cached in-process; CuPy caches on disk)."""
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=source, options=options).get_function(name)


@functools.lru_cache(maxsize=64)
def _stream(pointer: int, device: int):
    """A CuPy handle of the CUDA stream at ``pointer``, made once (launch overhead matters for small N)."""
    import cupy

    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for Stream.from_external
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(pointer, device)


def launch(fn, n_threads: int, args: tuple, device: torch.device) -> None:
    """Run ``fn`` over ``n_threads`` threads (blocks of :data:`BLOCK`) on torch's current stream of ``device``."""
    stream = _stream(torch.cuda.current_stream(device).cuda_stream, device.index)
    grid = ((n_threads + BLOCK - 1) // BLOCK,)
    if torch.cuda.current_device() == device.index:  # the usual case: no device switch (cheaper launch)
        fn(grid, (BLOCK,), args, stream=stream)
        return
    import cupy

    with cupy.cuda.Device(device.index):
        fn(grid, (BLOCK,), args, stream=stream)
