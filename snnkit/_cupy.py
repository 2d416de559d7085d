"""Shared CuPy plumbing of the CUDA kernels: compile once, launch on torch's current stream.

CuPy is imported on first use only. Both kernel families (the neurons' and the
bit packing of memopt) launch through :func:`launch`.
"""
import functools
import warnings

import torch

BLOCK = 256


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
