"""GPU suite of the CuPy backend (marked ``cuda``: skipped without a CUDA device and CuPy).

Truth is the torch reference on CPU in float32: torch on CUDA divides by a scalar
as a multiplication by its reciprocal, the kernels and the CPU reference divide,
so float32 spikes and potentials must match the CPU reference bit for bit. For
float16 the kernels compute in float from half inputs: their forward equals the
float32 reference on the upcast inputs, and their gradients obey the
flash-attention rule (error at most twice that of torch's own float16 run) as well
as a tight bound against the float32 backward from the saved half ``h_seq``.
A call-count sentinel makes a silent torch fallback fail.
"""

import pytest
import torch
import torch.nn as nn

from snnkit import functional, surrogate
from snnkit.memopt import BitSpikeCompressor, GCContainer
from snnkit.memopt import _bitpack_cuda as bitpack
from snnkit.neuron import IFNode, LIFNode, _reference
from snnkit.neuron._cuda import ops

from ..neuron.cuda_emu import kernels as _shared  # configurations and references shared with the CPU emulation

pytestmark = pytest.mark.cuda
DEVICE = "cuda"

SURROGATES, NEURONS, CONFIGS = _shared.SURROGATES, _shared.NEURONS, _shared.CONFIGS
_f16_reference, _ref_backward = _shared.f16_reference, _shared.ref_backward
_run = _shared.run
IDS = ["-".join(c) for c in CONFIGS]


@pytest.fixture
def sentinel(monkeypatch):
    """Counts kernel launches by name; a torch fallback leaves it empty."""
    calls = []
    real = ops._cupy_launcher

    def counting(name, *args):
        calls.append(name)
        return real(name, *args)

    monkeypatch.setattr(ops, "_cupy_launcher", counting)
    return calls


def _params(neuron, hard, detach, sg, tau=3.0, v_th=0.6, v_reset=-0.2):
    kind, di = NEURONS[neuron]
    return _reference.NeuronParams(kind, v_th, v_reset if hard else None, detach, SURROGATES[sg](), tau, di)


def _inputs(shape, seed=0):
    return _shared.inputs(shape, seed=seed)


def _cuda(*ts, dtype=torch.float32):
    return [t.to(DEVICE, dtype) for t in ts]


@pytest.mark.parametrize("width", ["scalar", "vec"])
@pytest.mark.parametrize("neuron,reset,detach,sg,store", CONFIGS, ids=IDS)
def test_float32_matches_cpu_reference(neuron, reset, detach, sg, store, width, sentinel):
    p = _params(neuron, reset == "hard", detach == "detach", sg)
    store = store == "store"
    x, v, gs, gv = _inputs((6, 7, 301 if width == "scalar" else 300))
    ref = _run(lambda a, b: _reference.multistep(a, b, p, store), x, v, gs, gv, store)
    xc, vc = _cuda(x, v)
    got = _run(lambda a, b: ops.multistep(a, b, p, store), xc, vc, gs, gv, store)
    assert sentinel == _shared.launched(p, torch.float32, width == "vec")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", ["scalar", "vec"])
@pytest.mark.parametrize("neuron,reset,detach,sg,store", CONFIGS, ids=IDS)
def test_float16_flash_attention_rule(neuron, reset, detach, sg, store, width, sentinel):
    p = _params(neuron, reset == "hard", detach == "detach", sg)
    store = store == "store"
    x, v, gs, gv = _inputs((5, 4, 257 if width == "scalar" else 256), seed=1)
    x, v, gs, gv = (t.half() for t in (x, v, gs, gv))  # the values every run sees
    gv_used = gv if store else gv[-1]
    truth = _run(lambda a, b: _reference.multistep(a, b, p, store), x.float(), v.float(), gs.float(), gv.float(), store)
    pt = _run(lambda a, b: _reference.multistep(a, b, p, store), *_cuda(x, v, dtype=torch.float16), gs, gv, store)
    xk, vk = (t.to(DEVICE).requires_grad_() for t in (x, v))
    spike, v_out = ops.multistep(xk, vk, p, store)
    (h16,) = spike.grad_fn.saved_tensors
    ((spike * gs.to(DEVICE)).sum() + (v_out * gv_used.to(DEVICE)).sum()).backward()
    assert sentinel == _shared.launched(p, torch.float16, width == "vec")
    assert spike.dtype == v_out.dtype == h16.dtype == torch.float16
    ref_spike, ref_v, ref_h = _f16_reference(x, v, p, store)
    assert torch.equal(spike.cpu(), ref_spike) and torch.equal(v_out.cpu(), ref_v) and torch.equal(h16.cpu(), ref_h)
    gx, gv0 = _ref_backward(h16.float().cpu(), p, store, gs.float(), gv_used.float())
    torch.testing.assert_close(xk.grad.float().cpu(), gx.half().float(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(vk.grad.float().cpu(), gv0.half().float(), rtol=2e-3, atol=1e-3)
    # flash-attention rule against float32 truth: at most twice torch's own float16 error
    for got, t, torch16 in ((xk.grad, truth[2], pt[2]), (vk.grad, truth[3], pt[3])):
        err = (got.float().cpu() - t).abs().max()
        assert err <= 2 * (torch16.float() - t).abs().max() + 1e-3


@pytest.mark.parametrize("shape", [(1, 1), (1, 4097), (3, 1), (2, 3, 5, 7), (4, 1000003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_odd_sizes_and_t1(shape, dtype, sentinel):
    p = _params("lif", True, False, "sigmoid", tau=2.0, v_th=1.0, v_reset=0.0)
    x, v, gs, gv = _inputs(shape, seed=2)
    x, v = x.to(dtype), v.to(dtype)
    ref = _run(lambda a, b: _reference.multistep(a, b, p, False), x.float(), v.float(), gs, gv, False)
    got = _run(lambda a, b: ops.multistep(a, b, p, False), *_cuda(x, v, dtype=dtype), gs, gv, False)
    assert len(sentinel) == 2
    tol = dict(rtol=1e-5, atol=1e-5)
    if dtype == torch.float16:  # exact forward; backward from the same half h_seq
        ref[0], ref[1], h16 = _f16_reference(x, v, p, False)
        grads = _ref_backward(h16.float(), p, False, gs.half().float(), gv[-1].half().float())
        ref[2], ref[3] = (g.half() for g in grads)
        tol = dict(rtol=2e-3, atol=1e-3)
    assert torch.equal(got[0], ref[0].to(dtype)) and torch.equal(got[1], ref[1].to(dtype))
    torch.testing.assert_close(got[2].float(), ref[2].float(), **tol)
    torch.testing.assert_close(got[3].float(), ref[3].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_misaligned_input_takes_the_scalar_forward(dtype, sentinel):
    p = _params("lif", True, False, "atan")
    x, v, gs, _ = _inputs((4, 4096), seed=5)
    x, v, gs = _cuda(x, v, gs, dtype=dtype)
    buf = torch.zeros(x.numel() + 1, device=DEVICE, dtype=dtype)
    buf[1:] = x.reshape(-1)
    buf.requires_grad_()
    x_al, runs = x.clone().requires_grad_(), []
    for xin in (buf[1:].view_as(x), x_al):  # contiguous, N divisible by the width; the first is 2 or 4 bytes off
        sentinel.clear()
        spike, v_last = ops.multistep(xin, v, p)
        (spike * gs).sum().backward()
        runs.append((list(sentinel), spike, v_last))
    (odd_calls, *odd), (calls, *aligned) = runs
    scalar, vec = _shared.launched(p, dtype, False), _shared.launched(p, dtype, True)
    assert calls == vec and odd_calls == [scalar[0], vec[1]]
    assert all(torch.equal(a, b) for a, b in zip(odd, aligned))
    assert torch.equal(buf.grad[1:].view_as(x), x_al.grad)


def test_large_n_forward_and_backward(sentinel):
    p = _params("lif", False, True, "atan")
    x, v, gs, gv = _inputs((4, 2**23 + 5), seed=3)
    ref = _run(lambda a, b: _reference.multistep(a, b, p, False), x, v, gs, gv, False)
    got = _run(lambda a, b: ops.multistep(a, b, p, False), *_cuda(x, v), gs, gv, False)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_nodes_use_the_kernels_in_m_mode_and_torch_in_s_mode(sentinel):
    x = torch.rand(8, 3, 50, device=DEVICE) * 1.5
    for cls in (IFNode, LIFNode):
        kernel = cls(step_mode="m", backend="cupy", store_v_seq=True)
        plain = cls(step_mode="m", backend="torch", store_v_seq=True)
        assert torch.equal(kernel(x), plain(x.cpu()).to(DEVICE))
        assert torch.equal(kernel.v_seq.cpu(), plain.v_seq) and torch.equal(kernel.v.cpu(), plain.v)
    assert len(sentinel) == 2  # forward only: no gradient needed, no backward
    single = LIFNode(step_mode="s", backend="cupy")
    single(x[0])
    assert len(sentinel) == 2  # "s" mode runs the torch step (documented fallback)


def test_runs_on_the_current_torch_stream():
    p = _params("lif", True, False, "sigmoid")
    x, v, _, _ = _inputs((16, 1 << 20), seed=4)
    ref_s, ref_v = _reference.multistep(x, v, p, False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc, vc = _cuda(x, v)
        spike, v_last = ops.multistep(xc, vc, p, False)
        spike_cpu = spike.to("cpu", non_blocking=False)
    stream.synchronize()
    assert torch.equal(spike_cpu, ref_s) and torch.equal(v_last.cpu(), ref_v)


def test_errors():
    p = _params("if", True, False, "rect")
    x = torch.rand(4, 6, 5, device=DEVICE)
    with pytest.raises(ValueError, match="needs contiguous tensors, got a non-contiguous x_seq"):
        ops.multistep(x.transpose(1, 2), torch.zeros(5, 6, device=DEVICE), p)
    with pytest.raises(ValueError, match="needs CUDA tensors, got x_seq on cuda:0 and v on cpu"):
        ops.multistep(x, torch.zeros(6, 5), p)
    with pytest.raises(ValueError, match="x_seq is torch.float32 but the state v is torch.float16"):
        ops.multistep(x, torch.zeros(6, 5, device=DEVICE, dtype=torch.float16), p)
    with pytest.raises(ValueError, match="supports float32 and float16 tensors, got torch.float64"):
        ops.multistep(x.double(), torch.zeros(6, 5, device=DEVICE, dtype=torch.float64), p)
    with pytest.raises(ValueError, match=r"v of shape \(5, 6\) does not match x_seq\[0\] of shape \(6, 5\)"):
        ops.multistep(x, torch.zeros(5, 6, device=DEVICE), p)


# --- bit packing -----------------------------------------------------------------------


BIT_DTYPES = list(_shared.BIT_TORCH_DTYPES.values())


@pytest.mark.parametrize("dtype", BIT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("numel", [1, 9, 4096, 1000003])
def test_bitpack_round_trip_and_cpu_layout(dtype, numel):
    s = (torch.rand(numel) < 0.2).to(dtype)
    packed, flag = bitpack.pack(s.to(DEVICE))
    assert flag.dtype == torch.bool and flag.shape == () and not flag and packed.numel() == (numel + 7) // 8
    cpu = BitSpikeCompressor()
    assert torch.equal(packed.cpu(), cpu.compress(s).payload[0].cpu())  # same layout as the CPU path
    out = bitpack.unpack(packed, numel, dtype)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), s)


def test_bitpack_flags_invalid_and_compressor_refuses():
    s = torch.zeros(1001, device=DEVICE)
    s[500] = 0.5
    _, flag = bitpack.pack(s)
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag)
    comp = BitSpikeCompressor()
    with pytest.raises(ValueError, match="BitSpikeCompressor"):
        comp.decompress(comp.compress(s), s.shape)


# --- end to end: GC training step with the cupy backend ---------------------------------


def _net(backend):
    torch.manual_seed(7)
    lin1, lin2 = nn.Linear(40, 64), nn.Linear(64, 10)
    node1 = LIFNode(step_mode="m", backend=backend, detach_reset=True)
    node2 = IFNode(step_mode="m", backend=backend, v_reset=None, surrogate_function=surrogate.ATan())
    return lin1, node1, lin2, node2


def _seq(lin1, node1, lin2, node2, gc):
    """Two blocks; with ``gc`` each is a GC segment (the second stores its spike input as bits)."""
    if not gc:
        return nn.Sequential(lin1, node1, lin2, node2)
    return nn.Sequential(GCContainer(None, lin1, node1), GCContainer(BitSpikeCompressor(), lin2, node2))


@pytest.mark.parametrize("backend_plain", ["torch", "cupy"])
def test_gc_with_cupy_equals_plain(backend_plain, sentinel):
    x = torch.rand(6, 32, 40, device=DEVICE) * 2
    nets = {}
    for name, backend, gc in (("gc", "cupy", True), ("plain", backend_plain, False)):
        net = _seq(*_net(backend), gc=gc).to(DEVICE)
        functional.reset_net(net)
        out = net(x)
        out.sum().backward()
        nets[name] = (net, out)
    (gc_net, gc_out), (plain_net, plain_out) = nets["gc"], nets["plain"]
    assert any("_bwd_" in n for n in sentinel)
    assert torch.equal(gc_out, plain_out)
    for (name, a), b in zip(gc_net.named_parameters(), plain_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    gc_v = [m.v for m in gc_net.modules() if isinstance(m, (LIFNode, IFNode))]
    plain_v = [m.v for m in plain_net.modules() if isinstance(m, (LIFNode, IFNode))]
    assert all(torch.equal(a, b) for a, b in zip(gc_v, plain_v))
