"""Every generated CUDA source, compiled unchanged with g++ and run on CPU, against the torch backend.

The sources are compiled under ``cuda_emu/cuda_emu.h`` (see ``cuda_emu/harness.py``)
and launched through the same autograd function and argument lists as on the GPU
(``ops._FusedMultiStep`` with an emulating launcher instead of CuPy's), so this
checks indexing, argument order, the arithmetic and the BPTT recurrence of every
configuration. float32 forward results must be bit-identical to the torch CPU
reference; float16 is modelled with g++'s ``_Float16`` (IEEE binary16,
round-to-nearest-even, as ``__float2half_rn``). What it cannot check: real
parallel execution, CUDA's own ``expf``/``atanf`` ulps, NVRTC quirks (the GPU suite
in ``tests/gpu`` does).
"""
import functools
import math
import shutil

import pytest
import torch

from snnkit import surrogate
from snnkit.memopt import _bitpack_cuda as bitpack
from snnkit.memopt import compress
from snnkit.neuron import _reference
from snnkit.neuron._cuda import codegen, ops

from .cuda_emu import harness
from .cuda_emu import kernels as _kernels

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


SURROGATES, NEURONS, CONFIGS = _kernels.SURROGATES, _kernels.NEURONS, _kernels.CONFIGS
f16_reference, ref_backward = _kernels.f16_reference, _kernels.ref_backward

_inputs, _run, BIT_DTYPES = _kernels.inputs, _kernels.run, _kernels.BIT_TORCH_DTYPES


#: every dtype the bit packing takes (the CPU path packs the same ones), by name
ALL_BIT_DTYPES = {
    **BIT_DTYPES, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
    "complex64": torch.complex64, "complex128": torch.complex128,
}  # fmt: skip


def _bit_kernels():
    """The bit packing kernels of every kernel dtype (integers of every width, complex)."""
    return [k for dt in bitpack._BIT_DTYPES for k in (
        (bitpack.pack_name(dt), bitpack.pack_params(dt), bitpack.pack_source(dt)),
        (bitpack.unpack_name(dt), bitpack.unpack_params(dt), bitpack.unpack_source(dt)))]  # fmt: skip


@functools.lru_cache(maxsize=None)
def _emulator():
    # Built once per process (and cached on disk by source hash); immutable afterwards.
    kernels = _kernels.all_kernels() + _bit_kernels()
    return harness.build(kernels), {name: src for name, _, src in kernels}


class EmuLauncher:
    """Drop-in for the CuPy launcher: runs the compiled source on CPU tensors; counts calls."""

    def __init__(self, block=64):
        self.emu, self.sources = _emulator()
        self.block = block
        self.calls = []

    def __call__(self, name, source, params, n_threads, args):
        assert self.sources[name] == source, f"{name}: launched source differs from the compiled one"
        assert len(args) == len(params)
        conv = []
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.device.type == "cpu" and a.is_contiguous()
                conv.append(a.data_ptr())
            else:
                conv.append(a)
        self.calls.append(name)
        self.emu.launch(name, n_threads, *conv, block=self.block)


def _params(neuron, hard, detach, sg, variant):
    kind, di = NEURONS[neuron]
    v_th, v_reset, tau = [(1.0, 0.0, 2.0), (0.6, -0.2, 3.0)][variant]
    return _reference.NeuronParams(kind, v_th, v_reset if hard else None, detach, SURROGATES[sg](), tau, di)


# 111 neurons: 2 blocks and a partial one, one neuron per thread; 108: 4 per thread (27 threads)
WIDTHS = {"scalar": 37, "vec": 36}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("neuron,reset,detach,sg,store", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_kernels_match_torch_float32(neuron, reset, detach, sg, store, variant, width):
    p = _params(neuron, reset == "hard", detach == "detach", sg, variant)
    store = store == "store"
    x, v, gs, gv = _inputs((7, 3, WIDTHS[width]), torch.float32, seed=variant)
    launcher = EmuLauncher(block=16)
    got = _run(lambda a, b: ops._FusedMultiStep.apply(a, b, p, store, launcher), x, v, gs, gv, store)
    ref = _run(lambda a, b: _reference.multistep(a, b, p, store), x, v, gs, gv, store)
    assert launcher.calls == _kernels.launched(p, torch.float32, width == "vec")
    assert 0.05 < ref[0].mean() < 0.95  # the test exercises both branches of the reset
    assert torch.equal(got[0], ref[0])  # spikes, bit for bit
    assert torch.equal(got[1], ref[1])  # v_seq or v_last, bit for bit
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", ["scalar", "vec"])
@pytest.mark.parametrize("neuron,reset,detach,sg,store", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_kernels_match_torch_float16(neuron, reset, detach, sg, store, width):
    # Kernels load/store half and compute in float (H rounded to half before
    # firing): the forward equals f16_reference bit for bit; the backward equals
    # the float32 reference backward from the saved half h_seq, rounded once.
    p = _params(neuron, reset == "hard", detach == "detach", sg, 1)
    store = store == "store"
    x, v, gs, gv = _inputs((5, 2, 45 if width == "scalar" else 48), torch.float16, seed=3)  # 96 = 12 x 8
    launcher = EmuLauncher(block=8)
    _check_fused_against_reference(p, x, v, gs, gv, store, launcher)
    assert launcher.calls == _kernels.launched(p, torch.float16, width == "vec")


def test_no_h_seq_without_a_graph():
    """Under no_grad (as in the first forward of a GC segment) nothing is written for backward."""
    p = _params("lif", True, False, "sigmoid", 0)
    x, v, _, _ = _inputs((4, 64), torch.float32, seed=7)
    h_args = []

    class Recording(EmuLauncher):
        def __call__(self, name, source, params, n_threads, args):
            h_args.append(args[3])
            super().__call__(name, source, params, n_threads, args)

    expected = ops._apply(x, v, p, False, Recording())  # neither input requires grad
    for xin, vin in ((x.clone().requires_grad_(), v), (x, v.clone().requires_grad_())):
        with torch.no_grad():
            got = ops._apply(xin, vin, p, False, Recording())
        assert all(torch.equal(a, b) and a.grad_fn is None for a, b in zip(got, expected))
    assert h_args == [None, None, None]
    ops._apply(x.clone().requires_grad_(), v, p, False, Recording())
    assert isinstance(h_args[-1], torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_input_takes_the_scalar_forward(dtype):
    p = _params("lif", True, False, "sigmoid", 1)
    x, v, gs, _ = _inputs((4, 64), dtype, seed=6)
    buf = torch.zeros(x.numel() + 1, dtype=dtype)
    buf[1:] = x.reshape(-1)
    buf.requires_grad_()
    x_odd = buf[1:].view_as(x)  # contiguous, N divisible by the width, but not 16-byte aligned
    x_al, runs = x.clone().requires_grad_(), []
    for xin in (x_odd, x_al):
        launcher = EmuLauncher()
        spike, v_last = ops._FusedMultiStep.apply(xin, v, p, False, launcher)
        (spike * gs).sum().backward()
        runs.append((launcher.calls, spike, v_last))
    (odd_calls, *odd), (calls, *aligned) = runs
    scalar, vec = _kernels.launched(p, dtype, False), _kernels.launched(p, dtype, True)
    assert calls == vec and odd_calls == [scalar[0], vec[1]]  # backward's own tensors are aligned
    assert all(torch.equal(a, b) for a, b in zip(odd, aligned))
    assert torch.equal(buf.grad[1:].view_as(x), x_al.grad)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5, 3), (4, 1), (3, 64), (2, 65)])
def test_odd_shapes_and_single_step(shape):
    p = _params("lif", True, False, "sigmoid", 1)
    x, v, gs, gv = _inputs(shape, torch.float32, seed=5)
    got = _run(lambda a, b: ops._FusedMultiStep.apply(a, b, p, False, EmuLauncher()), x, v, gs, gv, False)
    ref = _run(lambda a, b: _reference.multistep(a, b, p, False), x, v, gs, gv, False)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [37, 40])  # one neuron per thread; vectorised for both dtypes
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_grad_forward_skips_h_seq(store, dtype, n):
    p = _params("lif", False, False, "atan", 1)
    x, v, _, _ = _inputs((6, n), dtype, seed=1)
    launcher = EmuLauncher(block=8)
    with torch.no_grad():
        spike, v_out = ops._FusedMultiStep.apply(x, v, p, store, launcher)
    assert spike.grad_fn is None
    assert launcher.calls == _kernels.launched(p, dtype, n == 40)[:1]
    if dtype == torch.float16:
        ref_spike, ref_v, _ = f16_reference(x, v, p, store)
    else:
        ref_spike, ref_v = _reference.multistep(x, v, p, store)
    assert torch.equal(spike, ref_spike) and torch.equal(v_out, ref_v)


def _check_fused_against_reference(p, x, v, gs, gv, store, launcher):
    """Forward and backward of the fused function (``launcher``) against the reference.

    float32: forward bit for bit and gradients to ``1e-5`` of ``_reference.multistep``;
    float16: the forward equals ``f16_reference`` bit for bit (``h_seq`` too); the
    backward equals the float32 reference backward from the saved half ``h_seq``,
    rounded once.
    """
    if x.dtype == torch.float32:
        got = _run(lambda a, b: ops._FusedMultiStep.apply(a, b, p, store, launcher), x, v, gs, gv, store)
        ref = _run(lambda a, b: _reference.multistep(a, b, p, store), x, v, gs, gv, store)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-6)
        return
    xk, vk = x.clone().requires_grad_(), v.clone().requires_grad_()
    spike, v_out = ops._FusedMultiStep.apply(xk, vk, p, store, launcher)
    assert spike.dtype == v_out.dtype == torch.float16
    ref_spike, ref_v, ref_h = f16_reference(x, v, p, store)
    assert torch.equal(spike, ref_spike) and torch.equal(v_out, ref_v)
    (h16,) = spike.grad_fn.saved_tensors
    assert torch.equal(h16, ref_h)
    (spike * gs).sum().add_((v_out * (gv if store else gv[-1])).sum()).backward()
    gx, gv0 = ref_backward(h16.float(), p, store, gs.float(), (gv if store else gv[-1]).float())
    torch.testing.assert_close(xk.grad.float(), gx.half().float(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(vk.grad.float(), gv0.half().float(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("width", ["scalar", "vec"])
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_step_backward_at_every_width(dtype, store, width):
    """T == 1: the backward's peeled last step is its only step (store_v_seq: the loop runs once)."""
    p = _params("lif", True, False, "sigmoid", 1)
    n = {"scalar": 37, "vec": 40}[width]  # 40: 10 x 4 float32 or 5 x 8 float16
    x, v, gs, gv = _inputs((1, n), dtype, seed=8)
    launcher = EmuLauncher(block=4)
    _check_fused_against_reference(p, x, v, gs, gv, store, launcher)
    assert launcher.calls == _kernels.launched(p, dtype, width == "vec")


@pytest.mark.parametrize("n", [37, 40])
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_time_sequence(dtype, store, n):
    """T == 0: the forward kernel runs with no step (v_last = v), the backward launches nothing."""
    p = _params("lif", True, False, "sigmoid", 1)
    v = torch.rand(n, dtype=dtype).requires_grad_()
    x = torch.zeros(0, n, dtype=dtype, requires_grad=True)
    launcher = EmuLauncher(block=8)
    spike, v_out = ops._FusedMultiStep.apply(x, v, p, store, launcher)
    assert launcher.calls == _kernels.launched(p, dtype, n == 40)[:1]
    assert spike.shape == (0, n) and torch.equal(v_out, torch.zeros(0, n, dtype=dtype) if store else v.detach())
    gv = torch.randn(v_out.shape).to(dtype)
    grad_x, grad_v = torch.autograd.grad((v_out * gv).sum() + spike.sum(), (x, v), allow_unused=True)
    assert grad_x.shape == (0, n) and len(launcher.calls) == 1
    assert torch.equal(grad_v, torch.zeros(n, dtype=dtype) if store else gv)


@pytest.mark.parametrize("t", [0, 3])
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_neurons_launches_nothing(dtype, store, t):
    """N == 0: no kernel runs; shapes and (empty) gradients as the reference's."""
    p = _params("lif", True, False, "sigmoid", 1)
    x = torch.zeros(t, 2, 0, dtype=dtype, requires_grad=True)
    v = torch.zeros(2, 0, dtype=dtype, requires_grad=True)
    launcher = EmuLauncher()
    spike, v_out = ops._FusedMultiStep.apply(x, v, p, store, launcher)
    assert spike.shape == x.shape and v_out.shape == (x.shape if store else v.shape)
    assert v_out.dtype == spike.dtype == dtype and v_out is not v
    grad_x, grad_v = torch.autograd.grad(spike.sum() + v_out.sum(), (x, v), allow_unused=True)
    assert grad_x.shape == x.shape and grad_v.shape == v.shape and grad_v.dtype == dtype
    assert launcher.calls == []
    if t:  # the reference needs a step
        ref = _reference.multistep(x, v, p, store)
        assert [r.shape for r in ref] == [spike.shape, v_out.shape]


def test_double_backward_raises_instead_of_dropping_second_order_terms():
    """The backward kernels build no graph: create_graph=True must fail loudly, not give a partial graph."""
    p = _params("lif", True, False, "sigmoid", 1)
    x, v, gs, _ = _inputs((3, 37), torch.float32, seed=9)
    for store in (False, True):
        xk = x.clone().requires_grad_()
        spike, v_out = ops._FusedMultiStep.apply(xk, v, p, store, EmuLauncher())
        loss = (spike * gs).sum() + v_out.sum()
        with pytest.raises(RuntimeError, match="backend='cupy' .* double backward .*create_graph=True"):
            torch.autograd.grad(loss, xk, create_graph=True)
        (grad_x,) = torch.autograd.grad(loss, xk)  # first order as before
        xr = x.clone().requires_grad_()
        spike_r, v_r = _reference.multistep(xr, v, p, store)
        (grad_r,) = torch.autograd.grad((spike_r * gs).sum() + v_r.sum(), xr)
        torch.testing.assert_close(grad_x, grad_r, rtol=1e-5, atol=1e-6)


def test_grad_only_to_x():
    p = _params("lif_ndi", False, True, "rect", 1)
    x, v, gs, _ = _inputs((4, 33), torch.float32, seed=2)
    xk = x.clone().requires_grad_()
    spike, _ = ops._FusedMultiStep.apply(xk, v, p, False, EmuLauncher())
    (spike * gs).sum().backward()
    xr = x.clone().requires_grad_()
    (_reference.multistep(xr, v, p, False)[0] * gs).sum().backward()
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-6)


class _Gauss(surrogate.SurrogateFunction):
    """A custom surrogate: ``derivative`` overridden (a new tensor, no ``inplace``) with its CUDA form."""

    def derivative(self, x):
        return self.alpha / (2 * math.pi) ** 0.5 * torch.exp(-0.5 * (self.alpha * x) ** 2)

    def cuda_derivative(self, x, out):
        c, a2 = f"{self.alpha / (2 * math.pi) ** 0.5!r}f", f"{-0.5 * self.alpha**2!r}f"
        return f"{out} = {c} * expf(({x}) * ({x}) * {a2});"


@pytest.mark.parametrize("hard,detach", [(True, False), (True, True), (False, False), (False, True)])
def test_custom_surrogate_kernels_match_torch_and_single_steps(hard, detach):
    p = _reference.NeuronParams("lif", 1.0, 0.0 if hard else None, detach, _Gauss(1.5), 2.0, True)
    spec = ops.spec_for(p, torch.float32)
    kernels = [(codegen.forward_name(spec), codegen.forward_params(spec), codegen.forward_source(spec)),
               (codegen.backward_name(spec), codegen.backward_params(spec), codegen.backward_source(spec))]
    emu = harness.build(kernels, n_units=1)

    def launcher(name, source, params, n_threads, args):
        emu.launch(name, n_threads, *[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])

    x, v, gs, gv = _inputs((6, 3, 37), torch.float32, seed=4)
    got = _run(lambda a, b: ops._FusedMultiStep.apply(a, b, p, False, launcher), x, v, gs, gv, False)
    ref = _run(lambda a, b: _reference.multistep(a, b, p, False), x, v, gs, gv, False)

    def single_steps(a, b):
        spikes = []
        for t in range(a.shape[0]):
            s, b = _reference.step(a[t], b, p)
            spikes.append(s)
        return torch.stack(spikes), b

    steps = _run(single_steps, x, v, gs, gv, False)
    for other in (ref, steps):
        assert torch.equal(got[0], other[0]) and torch.equal(got[1], other[1])
        torch.testing.assert_close(got[2], other[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[3], other[3], rtol=1e-5, atol=1e-6)


# --- bit packing ---------------------------------------------------------------------


def torch_pack(s: torch.Tensor) -> torch.Tensor:
    """Reference layout: element i -> byte i // 8, bit i % 8."""
    bits = (s.reshape(-1) != 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 1027])
@pytest.mark.parametrize("dtype", list(ALL_BIT_DTYPES))
def test_bitpack_matches_torch_and_round_trips(dtype, numel):
    s = (torch.rand(numel) < 0.3).to(ALL_BIT_DTYPES[dtype])
    launcher = EmuLauncher()
    packed, flag = bitpack._pack(s, launcher)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(packed, torch_pack(s))
    cpu_pack = getattr(compress, "_bit_pack", None)  # the CPU path of BitSpikeCompressor
    if cpu_pack is not None:
        assert torch.equal(packed, cpu_pack((s != 0).reshape(-1)))
    assert flag.dtype == torch.bool and flag.shape == () and not flag  # like the CPU path's flag
    out = bitpack._unpack(packed, numel, s.dtype, launcher)
    assert out.dtype == s.dtype and torch.equal(out, s)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan"), float("inf"), "next above 1"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_bitpack_flags_non_binary(dtype, bad):
    s = torch.zeros(21, dtype=BIT_DTYPES[dtype])
    s[3] = 1.0
    s[17] = 1.0 + torch.finfo(s.dtype).eps if bad == "next above 1" else bad
    assert s[17].item() != 1.0
    _, flag = bitpack._pack(s, EmuLauncher())
    assert flag.item() != 0


def test_bitpack_negative_zero_is_zero_and_uint8_two_is_flagged():
    s = torch.tensor([-0.0, 1.0, 0.0, -0.0, 1.0])
    packed, flag = bitpack._pack(s, EmuLauncher())
    assert flag.item() == 0 and packed.tolist() == [0b10010]
    packed, flag = bitpack._pack(torch.tensor([0, 1, 2], dtype=torch.uint8), EmuLauncher())
    assert flag.item() != 0 and packed.tolist() == [0b110]  # 2 is nonzero: its bit is set, as on CPU


_FLOAT_SPECIALS = [0.0, 1.0, -0.0, float("nan"), 0.5, 2.0, -1.0, float("inf"), -float("inf"), 1e-30]
_INT_SPECIALS = [0, 1, 2, 127, 255, -1, -128]
_COMPLEX_SPECIALS = [0j, 1 + 0j, complex(1.0, -0.0), complex(-0.0, -0.0), complex(0.0, -0.0), 1j, -1 + 0j, 1 + 1j,
                     complex(0, float("nan")), complex(float("nan"), 0)]  # fmt: skip


def _special_values(dtype):
    if dtype.is_complex:
        return torch.tensor(_COMPLEX_SPECIALS, dtype=dtype)
    if dtype.is_floating_point:
        return torch.tensor(_FLOAT_SPECIALS).to(dtype)
    if dtype == torch.bool:
        return torch.tensor([False, True])
    info = torch.iinfo(dtype)
    return torch.tensor([v for v in _INT_SPECIALS if info.min <= v <= info.max], dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(ALL_BIT_DTYPES))
def test_bitpack_matches_the_cpu_packer_on_any_values(dtype):
    """Non-binary input: the kernel stores the CPU path's payload (bit = s != 0) and flag, per value and mixed."""
    dtype = ALL_BIT_DTYPES[dtype]
    values = _special_values(dtype)
    launcher = EmuLauncher(block=4)
    g = torch.Generator().manual_seed(0)
    mixed = values[torch.randint(len(values), (203,), generator=g)]
    binary = (torch.rand(203, generator=g) < 0.3).to(dtype)
    cases = [values[i : i + 1] for i in range(len(values))] + [mixed, binary]
    for s in cases:
        packed, flag = bitpack._pack(s, launcher)
        cpu_packed, cpu_flag = compress._bit_pack_checked(s, check=True)
        assert torch.equal(packed, cpu_packed), (s, packed, cpu_packed)
        assert flag.dtype == cpu_flag.dtype == torch.bool and flag.shape == cpu_flag.shape == ()
        assert bool(flag) == bool(cpu_flag), s
        out = bitpack._unpack(packed, s.numel(), dtype, launcher)
        assert torch.equal(out, compress._bit_unpack(cpu_packed, s.numel(), dtype))


def test_bitpack_empty_input_has_no_flag_like_the_cpu_path():
    launcher = EmuLauncher()
    for dtype in (torch.float32, torch.int32, torch.bool):
        packed, flag = bitpack._pack(torch.zeros(2, 0, dtype=dtype), launcher)
        assert packed.shape == (0,) and flag is None
        assert compress._bit_pack_checked(torch.zeros(0, dtype=dtype), check=True)[1] is None
        assert bitpack._unpack(packed, 0, dtype, launcher).shape == (0,)
    assert launcher.calls == []


def test_bitpack_errors():
    f8 = torch.zeros(3).to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="snnkit.memopt: bit packing supports .*torch.int32.* got torch.float8_e5m2"):
        bitpack._pack(f8, EmuLauncher())
    with pytest.raises(TypeError, match="unsupported ScalarType Float8"):  # numpy has no float8: nor can the CPU path
        compress._bit_pack_checked(f8, check=True)
    with pytest.raises(ValueError, match="at least 2 bytes for 9 values"):
        bitpack._unpack(torch.zeros(1, dtype=torch.uint8), 9, torch.float32, EmuLauncher())
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        bitpack.pack(torch.zeros(3))
