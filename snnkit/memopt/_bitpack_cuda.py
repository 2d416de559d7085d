"""CUDA bit packing for :class:`BitSpikeCompressor`: 8 spikes a byte, validity flag in the same pass.

Layout (the same as the CPU implementation in :mod:`snnkit.memopt.compress`):
element ``i`` of the flattened tensor goes to byte ``i // 8``, bit ``i % 8``
(little-endian within a byte); the last byte is zero-padded.

* :func:`pack` reads each value once, writes one byte per 8 values and, in the
  same pass, sets a flag when a value is neither 0 nor 1, so that a strictly
  binary compressor can refuse invalid input without a second read. Like the
  CPU path, the bit of an element is its truth value ``s != 0``: ``+0.0`` and
  ``-0.0`` pack to 0, any other value (1, but also NaN, 0.5, 2, -1) to 1, and
  the flag is set exactly where such a value is not 1. Values are tested by bit
  pattern, so one kernel serves every dtype of a width without fp16 headers
  (and integers of either signedness). A thread that sees an invalid value
  stores 1 into the flag; all writers store the same value, so no atomic is
  needed. The flag is a 0-dim ``bool`` tensor, like the CPU path's, and
  ``None`` for an empty input (nothing to check, no launch).
* :func:`unpack` writes one element per thread (coalesced stores), reading the
  byte it needs (the 8 threads of a byte hit the same cache line).
* CuPy is imported on first use; kernels are compiled once per dtype and device
  and run on torch's current stream, on the tensors' memory, without copies
  (a non-contiguous input is made contiguous first).

Example:
    >>> print(pack_source("float16").splitlines()[0])
    // snnkit bit packing: snnkit_bitpack_f16
"""
import functools
from typing import Optional, Tuple

import torch

from .. import _cupy

__all__ = ["pack", "unpack", "pack_source", "unpack_source", "pack_name", "unpack_name", "pack_params", "unpack_params"]

#: kernel dtype -> (tag, unsigned word type, words per element, bit pattern of 1 in the first
#: word, mask of the bits that make a word nonzero: all but the sign bit of a float part).
#: A complex element is two words (real, imaginary); its other words are 0 for the value 1.
_BIT_DTYPES = {
    "float32": ("f32", "unsigned int", 1, "0x3F800000u", "0x7FFFFFFFu"),
    "float16": ("f16", "unsigned short", 1, "0x3C00u", "0x7FFFu"),
    "bfloat16": ("bf16", "unsigned short", 1, "0x3F80u", "0x7FFFu"),
    "float64": ("f64", "unsigned long long", 1, "0x3FF0000000000000ull", "0x7FFFFFFFFFFFFFFFull"),
    "complex64": ("c64", "unsigned int", 2, "0x3F800000u", "0x7FFFFFFFu"),
    "complex128": ("c128", "unsigned long long", 2, "0x3FF0000000000000ull", "0x7FFFFFFFFFFFFFFFull"),
    "uint8": ("u8", "unsigned char", 1, "0x01u", "0xFFu"),  # every 1-byte integer and bool
    "int16": ("i16", "unsigned short", 1, "0x0001u", "0xFFFFu"),  # int16 and uint16
    "int32": ("i32", "unsigned int", 1, "0x00000001u", "0xFFFFFFFFu"),  # int32 and uint32
    "int64": ("i64", "unsigned long long", 1, "0x1ull", "0xFFFFFFFFFFFFFFFFull"),  # int64 and uint64
}
#: torch dtype -> kernel dtype: every dtype the CPU path packs (integers by width, as bit patterns)
_TORCH = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
    torch.bool: "uint8",
    torch.uint8: "uint8",
    torch.int8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
}
_TORCH.update({getattr(torch, f"uint{b}"): f"int{b}" for b in (16, 32, 64) if hasattr(torch, f"uint{b}")})


def _entry(dtype: str):
    if dtype not in _BIT_DTYPES:
        raise ValueError(f"snnkit.memopt: bit packing supports {tuple(_BIT_DTYPES)}, got {dtype!r}")
    return _BIT_DTYPES[dtype]


def pack_name(dtype: str) -> str:
    """Kernel name, e.g. ``snnkit_bitpack_f32``."""
    return f"snnkit_bitpack_{_entry(dtype)[0]}"


def unpack_name(dtype: str) -> str:
    """Kernel name, e.g. ``snnkit_bitunpack_f32``."""
    return f"snnkit_bitunpack_{_entry(dtype)[0]}"


@functools.lru_cache(maxsize=None)
def pack_params(dtype: str):
    """``[(C type, name), ...]`` of the pack kernel (one thread per output byte)."""
    u = _entry(dtype)[1]
    return (
        (f"const {u}* __restrict__", "s"),  # [numel]
        ("unsigned char* __restrict__", "packed"),  # [ceil(numel / 8)]
        ("unsigned char* __restrict__", "flag"),  # 0-dim bool, set to 1 on a non-binary value
        ("const long long", "numel"),
    )


@functools.lru_cache(maxsize=None)
def unpack_params(dtype: str):
    """``[(C type, name), ...]`` of the unpack kernel (one thread per element)."""
    u = _entry(dtype)[1]
    return (
        ("const unsigned char* __restrict__", "packed"),  # [ceil(numel / 8)]
        (f"{u}* __restrict__", "out"),  # [numel]
        ("const long long", "numel"),
    )


_PACK = r"""// snnkit bit packing: {name}
{signature}
{{
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b * 8 >= numel) return;
    unsigned int byte = 0;
    int bad = 0;
    for (int j = 0; j < 8; j++) {{
        const long long e = b * 8 + j;
        if (e >= numel) break;
        {load}
        if ({nonzero}) {{  // the truth value s != 0 (-0.0 is 0, NaN is not)
            byte |= 1u << j;
            if ({not_one}) bad = 1;
        }}
    }}
    packed[b] = (unsigned char)byte;
    if (bad) *flag = 1;
}}
"""

_UNPACK = r"""// snnkit bit unpacking: {name}
{signature}
{{
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= numel) return;
    {store}
}}
"""


def _pack_body(u: str, words: int, one: str, mask: str) -> dict:
    if words == 1:
        return dict(load=f"const {u} w0 = s[e];", nonzero=f"(w0 & ({u}){mask}) != 0", not_one=f"w0 != ({u}){one}")
    return dict(
        load=f"const {u} w0 = s[2 * e], w1 = s[2 * e + 1];",
        nonzero=f"((w0 | w1) & ({u}){mask}) != 0",
        not_one=f"w0 != ({u}){one} || (w1 & ({u}){mask}) != 0",
    )


def _unpack_body(u: str, words: int, one: str) -> str:
    bit = "((packed[e >> 3] >> (e & 7)) & 1)"
    if words == 1:
        return f"out[e] = {bit} ? ({u}){one} : ({u})0;"
    return f"out[2 * e] = {bit} ? ({u}){one} : ({u})0;\n    out[2 * e + 1] = ({u})0;"


@functools.lru_cache(maxsize=None)
def pack_source(dtype: str) -> str:
    """CUDA source of the pack kernel for elements of ``dtype`` (a name such as ``"float32"``)."""
    _, u, words, one, mask = _entry(dtype)
    name = pack_name(dtype)
    return _PACK.format(name=name, signature=_cupy.signature(name, pack_params(dtype)),
                        **_pack_body(u, words, one, mask))


@functools.lru_cache(maxsize=None)
def unpack_source(dtype: str) -> str:
    """CUDA source of the unpack kernel for elements of ``dtype``."""
    _, u, words, one, _ = _entry(dtype)
    name = unpack_name(dtype)
    return _UNPACK.format(name=name, signature=_cupy.signature(name, unpack_params(dtype)),
                          store=_unpack_body(u, words, one))


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _TORCH:
        raise ValueError(
            f"snnkit.memopt: bit packing supports {', '.join(map(str, _TORCH))} tensors, got {dtype}; "
            "cast the spikes to float32 first"
        )
    return _TORCH[dtype]


def _pack(s: torch.Tensor, launcher) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    name = _dtype_name(s.dtype)
    flat = s.contiguous().view(-1)
    if s.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    numel = flat.numel()
    packed = torch.empty((numel + 7) // 8, dtype=torch.uint8, device=s.device)
    if numel == 0:
        return packed, None  # nothing to check, like the CPU path
    flag = torch.zeros((), dtype=torch.bool, device=s.device)
    launcher(pack_name(name), pack_source(name), pack_params(name), packed.numel(), (flat, packed, flag, numel))
    return packed, flag


def _unpack(packed: torch.Tensor, numel: int, dtype: torch.dtype, launcher) -> torch.Tensor:
    name = _dtype_name(dtype)
    if packed.dtype != torch.uint8 or packed.numel() < (numel + 7) // 8:
        raise ValueError(
            f"snnkit.memopt: unpack needs a uint8 tensor of at least {(numel + 7) // 8} bytes for {numel} values, "
            f"got {packed.dtype} with {packed.numel()} elements"
        )
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel > 0:
        raw = out.view(torch.uint8) if dtype == torch.bool else out
        launcher(unpack_name(name), unpack_source(name), unpack_params(name), numel, (packed.contiguous(), raw, numel))
    return out


def _check_cuda(t: torch.Tensor, what: str) -> None:
    if not t.is_cuda:
        raise ValueError(f"snnkit.memopt: CUDA bit packing needs a CUDA tensor, got {what} on {t.device}")


def pack(s: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pack spikes ``s`` (any shape, on CUDA) into ``ceil(numel / 8)`` bytes.

    Args:
        s: CUDA tensor of 0s and 1s: floating (16, 32, 64 bits, bfloat16, complex),
            integer (signed or unsigned) or bool, as the CPU path.

    Returns:
        ``(packed, flag)``: ``packed`` is ``uint8`` ``[ceil(numel / 8)]``, bit ``s != 0``
        of each element; ``flag`` is a 0-dim ``bool`` tensor, True if a value was
        neither 0 nor 1 (such values pack to 1), or ``None`` when ``s`` is empty.

    Raises:
        ValueError: for a CPU tensor or an unsupported dtype.
    """
    _check_cuda(s, "s")
    return _pack(s, _cupy.launch_kernel)


def unpack(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` bits as a flat tensor of ``dtype`` (0s and 1s).

    Raises:
        ValueError: for a CPU tensor, an unsupported dtype, or too few bytes.
    """
    _check_cuda(packed, "packed")
    return _unpack(packed, numel, dtype, _cupy.launch_kernel)
