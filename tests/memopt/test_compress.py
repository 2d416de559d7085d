"""Compressors: exact round trips, sizes, and no silent loss on invalid input."""
import pytest
import torch

from snnkit.memopt import (
    BaseSpikeCompressor,
    BitSpikeCompressor,
    BooleanSpikeCompressor,
    NullSpikeCompressor,
    SparseSpikeCompressor,
    Uint8SpikeCompressor,
)
from snnkit.memopt.compress import _bit_pack, _bit_pack_torch, _bit_unpack, _bit_unpack_torch

ALL = [NullSpikeCompressor, BooleanSpikeCompressor, Uint8SpikeCompressor, BitSpikeCompressor, SparseSpikeCompressor]
STRICT = [BooleanSpikeCompressor, BitSpikeCompressor]
DTYPES = [torch.float16, torch.float32, torch.float64, torch.bfloat16]
SHAPES = [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 0, 3), (4, 1, 2, 3, 5), ()]


@pytest.mark.parametrize("comp", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_binary(comp, dtype, shape):
    s = (torch.rand(shape) < 0.5).to(dtype)
    c = comp().compress(s)
    out = comp().decompress(c, s.shape)
    assert out.dtype == dtype and out.shape == s.shape and torch.equal(out, s)
    assert torch.equal(comp().decompress(c), s)  # shape defaults to the compressed one


def test_round_trip_non_contiguous_input():
    s = (torch.rand(6, 10) < 0.5).float().t()[::2]
    for comp in ALL:
        assert torch.equal(comp().decompress(comp().compress(s), s.shape), s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uint8_counts_and_sparse_any_values(dtype):
    counts = torch.randint(0, 256, (5, 9)).to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        counts = counts.clamp(max=200 if dtype == torch.float16 else 256)
    c = Uint8SpikeCompressor()
    assert torch.equal(c.decompress(c.compress(counts), counts.shape), counts)
    x = torch.randn(4, 6).to(dtype) * (torch.rand(4, 6) < 0.3)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), -0.0, float("inf")
    sp = SparseSpikeCompressor()
    y = sp.decompress(sp.compress(x), x.shape)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(y.view(as_int), x.view(as_int))  # bit for bit: NaN, -0.0, inf kept


def test_sizes():
    s = (torch.rand(1000) < 0.1).float()
    assert BitSpikeCompressor().compress(s).nbytes == 125
    assert BooleanSpikeCompressor().compress(s).nbytes == 1000
    assert Uint8SpikeCompressor().compress(s).nbytes == 1000
    assert SparseSpikeCompressor().compress(s).nbytes == int((s != 0).sum()) * 8
    assert NullSpikeCompressor().compress(s).payload[0] is s


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_bit_layout_lsb_first(impl):
    pack, unpack = (_bit_pack, _bit_unpack) if impl == "numpy" else (_bit_pack_torch, _bit_unpack_torch)
    for dtype in (torch.bool, *DTYPES):
        b = torch.zeros(17, dtype=dtype)
        b[[0, 3, 8, 15, 16]] = 1
        packed = pack(b)
        assert packed.tolist() == [0b1001, 0b10000001, 0b1]
        assert torch.equal(unpack(packed, 17, dtype), b)
        # every byte value round trips
        allbytes = torch.arange(256).to(torch.uint8)
        assert torch.equal(pack(unpack(allbytes, 2048, dtype)), allbytes)


def test_bit_packing_chunk_boundaries_and_both_implementations_agree():
    n = 2 * (1 << 20) + 13  # three numpy chunks, the last one partial and not a multiple of 8
    s = (torch.rand(n) < 0.3).float()
    packed = _bit_pack(s)
    assert torch.equal(packed, _bit_pack_torch(s)) and packed.numel() == (n + 7) // 8
    assert torch.equal(_bit_unpack(packed, n, torch.float32), s)
    assert torch.equal(_bit_unpack_torch(packed, n, torch.float32), s)
    comp = BitSpikeCompressor()
    assert not bool(comp.compress(s).flag)
    for bad in (0.5, float("nan"), -1.0):  # in a later chunk than the first
        t = s.clone()
        t[(1 << 20) + 5] = bad
        assert bool(comp.compress(t).flag)


@pytest.mark.parametrize("comp", STRICT + [Uint8SpikeCompressor], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan"), 256.0, float("inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invalid_input_raises(comp, bad, dtype):
    if comp is Uint8SpikeCompressor and bad == 2.0:
        bad = 2.5
    s = (torch.rand(3, 11) < 0.5).to(dtype)
    s[2, 9] = bad
    c = comp().compress(s)  # no error (and no host sync) while compressing
    name = comp.__name__
    with pytest.raises(ValueError, match=rf"snnkit.memopt: {name} can only store .*NullSpikeCompressor.*Uint8"):
        comp().decompress(c, s.shape)
    with pytest.raises(ValueError, match=name):  # stays invalid
        comp().validate(c)


@pytest.mark.parametrize("comp", STRICT + [Uint8SpikeCompressor], ids=lambda c: c.__name__)
def test_check_off_skips_the_flag(comp):
    s = torch.tensor([0.0, 1.0, 0.5])
    c = comp(check=False).compress(s)
    assert c.flag is None
    comp(check=False).decompress(c, s.shape)  # no error: the caller vouched for the input
    assert repr(comp(check=False)) == f"{comp.__name__}(check=False)"


def test_negative_zero_is_no_spike():
    s = torch.tensor([-0.0, 1.0, 0.0])
    for comp in STRICT:
        out = comp().decompress(comp().compress(s), s.shape)
        assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0]))


def test_compressor_does_not_modify_input_and_rejects_non_tensors():
    s = (torch.rand(4, 4) < 0.5).float()
    before = s.clone()
    for comp in ALL:
        comp().compress(s)
    assert torch.equal(s, before) and s._version == 0
    with pytest.raises(TypeError, match="expects a tensor, got list"):
        BitSpikeCompressor().compress([1.0, 0.0])


def test_custom_subclass_gets_the_check():
    class Half(BaseSpikeCompressor):
        requires_strictly_binary = True

        def _compress(self, s):
            return s.half()

        def _decompress(self, payload, shape, dtype):
            return payload.to(dtype).view(shape)

    c = Half().compress(torch.tensor([1.0, 0.3]))
    with pytest.raises(ValueError, match="Half can only store 0 or 1"):
        Half().decompress(c)
    with pytest.raises(NotImplementedError, match="must implement _compress"):
        BaseSpikeCompressor().compress(torch.ones(1))


def test_equality_and_hash():
    assert BitSpikeCompressor() == BitSpikeCompressor() and BitSpikeCompressor() != BitSpikeCompressor(check=False)
    assert hash(BitSpikeCompressor()) == hash(BitSpikeCompressor())
    assert BitSpikeCompressor() != BooleanSpikeCompressor()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_cuda_matches_cpu(dtype):
    s = (torch.rand(3, 1001) < 0.3).to(dtype)
    comp = BitSpikeCompressor()
    c_cpu, c_gpu = comp.compress(s), comp.compress(s.cuda())
    assert torch.equal(c_gpu.payload[0].cpu().view(-1), c_cpu.payload[0])
    assert torch.equal(comp.decompress(c_gpu, s.shape).cpu(), s)
    s[1, 5] = 0.5
    with pytest.raises(ValueError, match="BitSpikeCompressor can only store 0 or 1"):
        comp.decompress(comp.compress(s.cuda()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flag_catches_values_next_to_zero_and_one(dtype):
    one, zero = torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)
    info = torch.finfo(dtype)
    near = [torch.nextafter(one, zero), torch.nextafter(one, 2 * one), torch.nextafter(zero, one),
            torch.nextafter(zero, -one), torch.tensor(info.max, dtype=dtype), torch.tensor(-info.max, dtype=dtype),
            torch.tensor(info.tiny, dtype=dtype), torch.tensor(-float("inf"), dtype=dtype)]
    for v in near:
        s = torch.zeros(9, dtype=dtype)
        s[4] = v
        with pytest.raises(ValueError, match="BitSpikeCompressor"):
            BitSpikeCompressor().decompress(BitSpikeCompressor().compress(s))


@pytest.mark.parametrize("comp", ALL, ids=lambda c: c.__name__)
def test_decompress_non_contiguous_input_to_another_shape(comp):
    s = (torch.rand(4, 3, 2) > 0.5).float().transpose(1, 2)
    assert torch.equal(comp().decompress(comp().compress(s), (4, 6)), s.reshape(4, 6))
