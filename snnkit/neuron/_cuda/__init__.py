"""CuPy backend: fused multistep CUDA kernels. Imported only when ``backend="cupy"`` is used."""


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
            "backend='cupy' needs CuPy, which is not installed: pip install 'snnkit[cuda12]' "
            "(or 'snnkit[cuda13]' for CUDA 13), or use backend='torch'"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend='cupy' needs a CUDA device, but torch.cuda.is_available() is False; use backend='torch' on CPU"
        )
