"""CuPy backend: fused multistep CUDA kernels. Imported only when ``backend="cupy"`` is used.

* :mod:`.codegen` builds the kernel sources (pure strings, no CuPy): one thread per
  neuron, the time loop inside the kernel, arithmetic in the reference's order.
* :mod:`.ops` compiles them with CuPy, launches them on torch tensors and wraps them
  in an autograd function with the contract of the torch reference's ``multistep``.

Only ``step_mode="m"`` runs the fused kernels; in ``step_mode="s"`` a node with
``backend="cupy"`` runs the torch step on its CUDA tensors (same results).
The sources are verified on CPU (compiled with g++ under an emulation header and
compared with the torch backend for every configuration) and compiled with nvcc
for sm_80 and sm_90 where it is installed; see ``tests/neuron``.
"""


def check_available() -> None:
    """Raise a clear error if CuPy or a CUDA device is missing.

    Raises:
        RuntimeError: naming what is missing and how to fix it.
    """
    import torch

    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "backend='cupy' needs CuPy, which is not installed: pip install cupy-cuda12x "
            "(the 'cuda12' extra; cupy-cuda13x for CUDA 13), or use backend='torch'"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend='cupy' needs a CUDA device, but torch.cuda.is_available() is False; use backend='torch' on CPU"
        )
