"""Lossless compressors for the spike input a GC segment keeps for its recompute.

A GC segment (:class:`~snnkit.memopt.GCContainer`) stores its input ``x_seq``
compressed and decompresses it when backward recomputes the segment. Every
compressor here round-trips its valid input exactly (any shape, ``numel == 0``,
odd sizes; float16/32/64 and bfloat16):

=======================  ==========================  =======================
compressor               valid input                 bytes per element
=======================  ==========================  =======================
NullSpikeCompressor      anything                    unchanged (no copy)
BooleanSpikeCompressor   0 or 1                      1
Uint8SpikeCompressor     integers 0..255 (counts)    1
BitSpikeCompressor       0 or 1                      1/8 (8 spikes a byte)
SparseSpikeCompressor    anything (stores values)    (4 + itemsize) per nonzero
=======================  ==========================  =======================

``+0.0`` and ``-0.0`` both count as "no spike" and come back as ``+0.0``
(Boolean, Uint8, Bit); Sparse keeps even the sign of zero.

No silent data loss:
    Boolean, Uint8 and Bit cannot represent other values. While compressing they
    compute an on-device flag (one extra elementwise comparison and a reduction,
    no host synchronisation); :meth:`BaseSpikeCompressor.decompress`, which a GC
    segment calls when its backward runs, reads the flag (one host sync per
    segment) and raises :class:`ValueError` naming the compressor if the input
    held anything else (0.5, 2.0, -1, NaN, ...). Construct with ``check=False`` to
    skip both the comparison and the sync when the input is known to be valid.
    Cost: Bit packing on CPU counts, chunk by chunk beside the packing, the ones
    against the nonzeros (about 2.5 ms per 10 million float32 elements on a 2-core
    CPU, where packing alone takes about 3 ms); on CUDA the packing kernel sets
    the flag itself.

Bit order of :class:`BitSpikeCompressor`: element ``8 * j + i`` of the flattened
input is bit ``i`` (least significant first) of byte ``j``; the last byte is
zero-padded. CUDA inputs use the kernels of ``snnkit.memopt._bitpack_cuda``
(imported on first CUDA use), which follow the same layout.

Example:
    >>> import torch
    >>> from snnkit.memopt import BitSpikeCompressor
    >>> s = torch.tensor([[0., 1., 1.], [1., 0., 0.]])
    >>> comp = BitSpikeCompressor()
    >>> c = comp.compress(s)
    >>> c.payload[0]
    tensor([14], dtype=torch.uint8)
    >>> torch.equal(comp.decompress(c, s.shape), s)
    True
"""
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "CompressedSpikes",
    "BaseSpikeCompressor",
    "NullSpikeCompressor",
    "BooleanSpikeCompressor",
    "Uint8SpikeCompressor",
    "BitSpikeCompressor",
    "SparseSpikeCompressor",
]


class CompressedSpikes:
    """What :meth:`BaseSpikeCompressor.compress` returns.

    Attributes:
        payload: Tuple of tensors holding the data.
        dtype: ``dtype`` of the original tensor.
        shape: Shape of the original tensor.
        flag: ``None`` when nothing was checked (``check=False``, a compressor
            that accepts any values, or an empty input to a strictly-binary
            compressor), else a 0-dim tensor on the input's device, True (nonzero)
            when the input was not valid for the compressor (read once, by
            ``decompress``).

    Example:
        >>> import torch
        >>> from snnkit.memopt import BitSpikeCompressor
        >>> c = BitSpikeCompressor().compress(torch.tensor([[1., 0., 1.], [0., 0., 1.]]))
        >>> c
        CompressedSpikes(payload_shapes=[(1,)], dtype=torch.float32, shape=(2, 3))
        >>> c.nbytes
        1
    """

    __slots__ = ("payload", "dtype", "shape", "flag", "_single")

    def __init__(self, payload, dtype: torch.dtype, shape: Sequence[int], flag: Optional[torch.Tensor] = None):
        self._single = not isinstance(payload, tuple)
        self.payload = (payload,) if self._single else payload
        self.dtype = dtype
        self.shape = torch.Size(shape)
        self.flag = flag

    def __repr__(self):
        sizes = [tuple(p.shape) for p in self.payload]
        return f"CompressedSpikes(payload_shapes={sizes}, dtype={self.dtype}, shape={tuple(self.shape)})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the payload tensors."""
        return sum(p.numel() * p.element_size() for p in self.payload)


class BaseSpikeCompressor:
    """Base class of spike compressors.

    Subclasses implement :meth:`_compress` (returning a tensor or a tuple of
    tensors) and :meth:`_decompress`; strictly-binary ones set
    ``requires_strictly_binary = True`` and get the validity check for free
    (or override :meth:`_compress_checked` to fuse it with the compression).

    Args:
        check: Detect input the compressor cannot represent (see the module
            docstring for the cost). Ignored by compressors that accept anything.

    Example:
        >>> import torch
        >>> from snnkit.memopt import BaseSpikeCompressor
        >>> class HalfCompressor(BaseSpikeCompressor):  # exact for 0/1 spikes
        ...     requires_strictly_binary = True
        ...     def _compress(self, s):
        ...         return s.to(torch.float16)
        ...     def _decompress(self, payload, shape, dtype):
        ...         return payload.to(dtype).view(shape)
        >>> comp = HalfCompressor()
        >>> s = torch.tensor([1., 0., 1.])
        >>> torch.equal(comp.decompress(comp.compress(s), s.shape), s)
        True
    """

    requires_strictly_binary: bool = False
    _valid_values = "0 or 1"

    def __init__(self, check: bool = True):
        self.check = bool(check)

    def __repr__(self):
        return f"{type(self).__name__}()" if self.check else f"{type(self).__name__}(check=False)"

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.__dict__.items()))))

    # -- public -------------------------------------------------------------------------------
    def compress(self, s: torch.Tensor) -> CompressedSpikes:
        """Compress ``s``; never modifies it and never synchronises with the device.

        Raises:
            TypeError: if ``s`` is not a tensor.
        """
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"snnkit.memopt: {type(self).__name__}.compress expects a tensor, got {type(s).__name__}")
        with torch.no_grad():
            payload, flag = self._compress_checked(s)
        return CompressedSpikes(payload, s.dtype, s.shape, flag if self.check else None)

    def decompress(self, c: CompressedSpikes, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Return the tensor that was compressed into ``c`` (shape ``shape``, default ``c.shape``).

        Raises:
            ValueError: if the compressed input held values the compressor cannot represent.
        """
        self.validate(c)
        shape = c.shape if shape is None else torch.Size(shape)
        with torch.no_grad():
            payload = c.payload[0] if c._single else c.payload
            return self._decompress(payload, shape, c.dtype)

    def validate(self, c: CompressedSpikes) -> None:
        """Raise if ``c`` came from invalid input (reads the device flag once).

        Raises:
            ValueError: naming the compressor and suggesting one that fits.
        """
        flag, c.flag = c.flag, None
        if flag is not None and bool(flag):
            c.flag = flag  # stay invalid
            raise ValueError(
                f"snnkit.memopt: {type(self).__name__} can only store {self._valid_values}, but a checkpointed input "
                f"held other values (for example 0.5, 2.0, -1 or NaN), so its gradient would be wrong. Use "
                f"NullSpikeCompressor (any values) or Uint8SpikeCompressor (integer counts 0..255) for this segment, "
                f"or SparseSpikeCompressor for sparse real values."
            )

    # -- for subclasses -----------------------------------------------------------------------
    def _compress(self, s: torch.Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _compress(s)")

    def _decompress(self, payload: Any, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _decompress(payload, shape, dtype)")

    def _compress_checked(self, s: torch.Tensor) -> Tuple[Any, Optional[torch.Tensor]]:
        """Return ``(payload, flag)``; ``flag`` is nonzero when ``s`` is not strictly binary."""
        flag = _invalid_binary(s) if (self.requires_strictly_binary and self.check) else None
        return self._compress(s), flag


def _invalid_binary(s: torch.Tensor, truth: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """0-dim device tensor, True where ``s`` holds anything but 0 and 1 (no host sync).

    ``s`` differs from its truth values ``s != 0`` (pass them as ``truth`` when
    already computed) exactly where it is not 0 or 1: NaN, 0.5, 2, -1, ...
    One fused comparison and a reduction, with a 1-byte temporary.
    """
    if s.numel() == 0:
        return None
    return torch.ne(s, s != 0 if truth is None else truth).any()


class NullSpikeCompressor(BaseSpikeCompressor):
    """Keep the input as it is (no compression, any values, no copy).

    Example:
        >>> import torch
        >>> from snnkit.memopt import NullSpikeCompressor
        >>> x = torch.randn(3)
        >>> comp = NullSpikeCompressor()
        >>> comp.decompress(comp.compress(x), x.shape) is x
        True
    """

    def _compress(self, s):
        return s

    def _decompress(self, payload, shape, dtype):
        return payload if payload.shape == shape else payload.reshape(shape)


class BooleanSpikeCompressor(BaseSpikeCompressor):
    """Store binary spikes as ``torch.bool`` (1 byte each).

    Example:
        >>> import torch
        >>> from snnkit.memopt import BooleanSpikeCompressor
        >>> s = torch.tensor([0., 1., 1.], dtype=torch.float16)
        >>> comp = BooleanSpikeCompressor()
        >>> comp.decompress(comp.compress(s), s.shape)
        tensor([0., 1., 1.], dtype=torch.float16)
    """

    requires_strictly_binary = True

    def _compress_checked(self, s):
        truth = s != 0
        return truth, (_invalid_binary(s, truth) if self.check else None)

    def _decompress(self, payload, shape, dtype):
        return payload.to(dtype).reshape(shape)  # the payload keeps the input's strides


class Uint8SpikeCompressor(BaseSpikeCompressor):
    """Store integer spike counts ``0..255`` as ``torch.uint8`` (1 byte each).

    Binary spikes are a special case; anything that is not an integer in
    ``0..255`` (0.5, -1, 256, NaN) is flagged like a strictly-binary compressor's
    invalid input, so it never turns silently into a wrong gradient.

    Example:
        >>> import torch
        >>> from snnkit.memopt import Uint8SpikeCompressor
        >>> s = torch.tensor([0., 3., 255.])
        >>> comp = Uint8SpikeCompressor()
        >>> comp.decompress(comp.compress(s), s.shape)
        tensor([  0.,   3., 255.])
    """

    _valid_values = "integers 0..255"

    def _compress_checked(self, s):
        if s.dtype == torch.uint8:
            return s.clone(), None
        u = s.to(torch.uint8)
        return u, (torch.ne(s, u).any() if self.check else None)

    def _decompress(self, payload, shape, dtype):
        return payload.to(dtype).reshape(shape)  # the payload keeps the input's strides


_BIT_CHUNK = 1 << 18  # elements per numpy call: numpy's temporaries stay small and in cache


def _bit_pack(s: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of zeros and ones 8 per byte, least significant bit first.

    CPU: numpy's ``packbits`` on the truth values (``-0.0`` is zero), a chunk at a
    time into a torch tensor, so that the payload is torch memory (seen by
    :class:`~snnkit.memopt.MemoryTracker`) and numpy's temporaries stay small.
    Other devices: :func:`_bit_pack_torch`.
    """
    return _bit_pack_checked(s, check=False)[0]


def _bit_pack_checked(s: torch.Tensor, check: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`_bit_pack` and, with ``check``, a 0-dim flag: True where ``s`` is not strictly binary.

    On CPU the check runs chunk by chunk beside the packing (no input-sized
    temporary): a chunk is binary exactly when it has as many elements equal to 1
    as nonzero elements (NaN, 0.5, 2, -1 are nonzero but not 1). bfloat16 and
    other devices use :func:`_invalid_binary`.
    """
    s, flag = s.detach(), None
    if s.device.type != "cpu" or s.dtype == torch.bfloat16:
        truth = s != 0
        flag = _invalid_binary(s, truth) if check else None
        if s.device.type != "cpu":
            return _bit_pack_torch(truth), flag
        s, check = truth, False  # numpy has no bfloat16; the flag is computed above
    flat, n = s.numpy(), s.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    packed = out.numpy()
    truth = np.empty(min(n, _BIT_CHUNK), dtype=np.bool_)
    bad = False
    for i in range(0, n, _BIT_CHUNK):
        chunk = flat[i : i + _BIT_CHUNK]
        t = np.not_equal(chunk, 0, out=truth[: len(chunk)])
        packed[i // 8 : (i + len(chunk) + 7) // 8] = np.packbits(t, bitorder="little")
        bad = bad or (check and np.count_nonzero(chunk == 1) != np.count_nonzero(t))
    return out, (torch.tensor(bad) if check and n else flag)


def _bit_unpack(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_bit_pack`: a flat tensor of ``numel`` zeros and ones of ``dtype``."""
    if packed.device.type != "cpu":
        return _bit_unpack_torch(packed, numel, dtype)
    src = packed.detach().numpy()
    out = torch.empty(numel, dtype=dtype)
    for i in range(0, numel, _BIT_CHUNK):
        count = min(_BIT_CHUNK, numel - i)
        bits = np.unpackbits(src[i // 8 : (i + count + 7) // 8], count=count, bitorder="little")
        out[i : i + count] = torch.from_numpy(bits)
    return out


def _bit_pack_torch(s: torch.Tensor) -> torch.Tensor:
    """:func:`_bit_pack` in torch operations only, for devices without kernels of ours (e.g. MPS)."""
    u = (s if s.dtype == torch.bool else s != 0).view(torch.uint8)
    if u.numel() % 8:
        u = torch.cat([u, u.new_zeros(8 - u.numel() % 8)])
    # Each group of 8 bytes (one 0/1 each) read as a little-endian int64 and
    # multiplied so that byte i lands in bit 56 + i; carries never reach there.
    return u.view(-1, 8).view(torch.int64).mul(0x0102040810204080).bitwise_right_shift_(56).view(-1).to(torch.uint8)


def _bit_unpack_torch(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_bit_unpack` in torch operations only."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)[:numel].to(dtype)


class BitSpikeCompressor(BaseSpikeCompressor):
    """Pack binary spikes 8 to a byte (1/32 of float32).

    CPU tensors use numpy's ``packbits``/``unpackbits``, CUDA tensors the kernels
    of ``snnkit.memopt._bitpack_cuda``, other devices torch operations. See the module docstring for
    the bit order and the validity check.

    Example:
        >>> import torch
        >>> from snnkit.memopt import BitSpikeCompressor
        >>> s = (torch.rand(2, 5) > 0.5).float()
        >>> comp = BitSpikeCompressor()
        >>> c = comp.compress(s)
        >>> c.payload[0].numel()  # 10 spikes in 2 bytes
        2
        >>> torch.equal(comp.decompress(c, s.shape), s)
        True
    """

    requires_strictly_binary = True

    def _compress_checked(self, s):
        if s.is_cuda:
            from . import _bitpack_cuda

            return _bitpack_cuda.pack(s)  # compress() drops the flag when check is off
        return _bit_pack_checked(s.reshape(-1), self.check)

    def _decompress(self, payload, shape, dtype):
        numel = shape.numel()
        if payload.is_cuda:
            from . import _bitpack_cuda

            return _bitpack_cuda.unpack(payload, numel, dtype).view(shape)
        return _bit_unpack(payload, numel, dtype).view(shape)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SparseSpikeCompressor(BaseSpikeCompressor):
    """Store the positions and values of the nonzero elements (exact for any input).

    Pays ``4 + itemsize`` bytes per nonzero (8 for int64 positions above 2**31
    elements), so it saves memory when fewer than about ``itemsize / (4 + itemsize)``
    of the elements are nonzero (a 50% firing rate for float32). Finding the
    nonzeros synchronises with the device once per compression.

    Example:
        >>> import torch
        >>> from snnkit.memopt import SparseSpikeCompressor
        >>> s = torch.tensor([0., 0., 1., 0., 2.5])
        >>> comp = SparseSpikeCompressor()
        >>> c = comp.compress(s)
        >>> c.payload
        (tensor([2, 4], dtype=torch.int32), tensor([1.0000, 2.5000]))
        >>> comp.decompress(c, s.shape)
        tensor([0.0000, 0.0000, 1.0000, 0.0000, 2.5000])
    """

    def _compress(self, s):
        flat = s.reshape(-1)
        if flat.is_floating_point() and flat.element_size() in _SAME_SIZE_INT:
            nonzero = flat.view(_SAME_SIZE_INT[flat.element_size()]) != 0  # keeps -0.0 and NaN
        else:
            nonzero = flat != 0
        idx = torch.nonzero(nonzero).view(-1)
        values = flat[idx]
        if flat.numel() < 2**31:
            idx = idx.to(torch.int32)
        return idx, values

    def _decompress(self, payload, shape, dtype):
        idx, values = payload
        out = torch.zeros(shape.numel(), dtype=dtype, device=values.device)
        out[idx.long()] = values
        return out.view(shape)
