"""Property-based tests (hypothesis): neurons, compressors and GC exactness on random inputs.

``max_examples`` is small so that the file stays well under a minute on 2 cores.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snnkit import functional, layer, memopt, neuron, surrogate

from ._nets import data, make_net, run_seq

SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SURROGATES = [surrogate.Sigmoid(), surrogate.ATan(), surrogate.PiecewiseQuadratic(), surrogate.Rect()]


@st.composite
def node_configs(draw):
    kind = draw(st.sampled_from(["if", "lif"]))
    kw = dict(
        v_threshold=draw(st.floats(0.2, 2.0)),
        v_reset=draw(st.sampled_from([None, 0.0, -0.3, 0.25])),
        detach_reset=draw(st.booleans()),
        surrogate_function=draw(st.sampled_from(SURROGATES)),
    )
    if kind == "lif":
        kw.update(tau=draw(st.floats(1.0, 6.0)), decay_input=draw(st.booleans()))
    return kind, kw


def _node(kind, kw, step_mode):
    cls = neuron.LIFNode if kind == "lif" else neuron.IFNode
    return cls(step_mode=step_mode, **kw)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3)


def _randn(shape, seed, dtype, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul_(scale).add_(0.5).to(dtype)


def _run_single_steps(node, x_seq):
    return torch.stack([node(x) for x in x_seq])


@SETTINGS
@given(cfg=node_configs(), T=st.integers(1, 6), shape=shapes, seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_multistep_equals_single_steps_and_spikes_are_binary(cfg, T, shape, seed, dtype):
    kind, kw = cfg
    x_seq = _randn([T, *shape], seed, dtype)
    m, s = _node(kind, kw, "m"), _node(kind, kw, "s")
    spikes_m = m(x_seq)
    spikes_s = _run_single_steps(s, x_seq)
    assert spikes_m.dtype == dtype and spikes_m.shape == x_seq.shape
    assert torch.equal(spikes_m, spikes_s)
    assert torch.equal(m.v, s.v)
    assert bool(((spikes_m == 0) | (spikes_m == 1)).all())
    # The state starts again from the reset value after reset_net.
    functional.reset_net(m)
    assert m.v == (0.0 if kw["v_reset"] is None else kw["v_reset"])
    assert torch.equal(m(x_seq), spikes_m)


@SETTINGS
@given(cfg=node_configs(), T=st.integers(1, 6), shape=shapes, seed=st.integers(0, 2**16))
def test_gradients_finite_and_equal_between_step_modes(cfg, T, shape, seed):
    kind, kw = cfg
    x0 = _randn([T, *shape], seed, torch.float64)
    w_s, w_v = _randn([T, *shape], seed + 1, torch.float64), _randn(shape, seed + 2, torch.float64)
    grads = []
    for mode in ("m", "s"):
        node = _node(kind, kw, mode)
        x = x0.clone().requires_grad_(True)
        spikes = node(x) if mode == "m" else _run_single_steps(node, x)
        ((spikes * w_s).sum() + (node.v * w_v).sum()).backward()
        grads.append(x.grad)
    g_m, g_s = grads
    assert bool(torch.isfinite(g_m).all())
    torch.testing.assert_close(g_m, g_s, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- compressors

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
shapes0 = st.lists(st.integers(0, 9), min_size=0, max_size=4)  # empty and odd sizes included


def _compressors(memopt):
    names = ["BooleanSpikeCompressor", "Uint8SpikeCompressor", "BitSpikeCompressor", "SparseSpikeCompressor",
             "NullSpikeCompressor"]
    return [getattr(memopt, n) for n in names]


@SETTINGS
@given(shape=shapes0, dtype=st.sampled_from(DTYPES), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       which=st.integers(0, 4))
def test_compressor_round_trip_is_exact(shape, dtype, density, seed, which):
    comp = _compressors(memopt)[which]()
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(shape, generator=g) < density).to(dtype)
    c = comp.compress(s)
    back = comp.decompress(c, s.shape)
    assert back.dtype == dtype and back.shape == s.shape
    assert torch.equal(back, s)


@SETTINGS
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), bad=st.sampled_from([0.5, 2.0, -1.0, float("nan")]),
       dtype=st.sampled_from([torch.float32, torch.float64]), which=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_strictly_binary_compressor_rejects_non_binary_input(shape, bad, dtype, which, seed):
    """A non-binary value inside a GC segment with a strict compressor must raise, never give a wrong gradient."""
    strict = [c for c in _compressors(memopt) if c.requires_strictly_binary]
    assert {c.__name__ for c in strict} >= {"BooleanSpikeCompressor", "BitSpikeCompressor"}
    cls = strict[which % len(strict)]
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(2, 2, *shape, generator=g) < 0.5).to(dtype)  # [T, N, *, features]
    x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = bad
    x.requires_grad_(True)
    seg = memopt.GCContainer(cls(), layer.Linear(shape[-1], 3, step_mode="m"), neuron.IFNode(step_mode="m"))
    seg.to(dtype)
    with pytest.raises(ValueError, match=cls.__name__):
        seg(x).sum().backward()


# ---------------------------------------------------------------- pools


@st.composite
def pool_configs(draw):
    k = draw(st.sampled_from([1, 2, 3, (2, 3), (3, 2)]))
    kw = dict(kernel_size=k, stride=draw(st.sampled_from([None, 1, 2, k])), padding=0,
              ceil_mode=draw(st.booleans()))
    kh, kw_ = (k, k) if isinstance(k, int) else k
    if draw(st.booleans()) and min(kh, kw_) >= 2:
        kw["padding"] = 1
    return kw


@SETTINGS
@given(cfg=pool_configs(), kind=st.sampled_from(["max", "avg"]), n=st.integers(1, 3), c=st.integers(1, 3),
       h=st.integers(3, 9), w=st.integers(3, 9), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]), binary=st.booleans())
def test_pools_equal_torch_bit_for_bit(cfg, kind, n, c, h, w, seed, dtype, binary):
    """snnkit's pools (lean paths where windows do not overlap, torch's elsewhere) against torch's functions."""
    x0 = _randn([n, c, h, w], seed, dtype)
    if binary:  # ties everywhere
        x0 = (x0 > 0.5).to(dtype)
    ours = (layer.MaxPool2d if kind == "max" else layer.AvgPool2d)(**cfg)
    ref = nn.functional.max_pool2d if kind == "max" else nn.functional.avg_pool2d
    g_out = None
    results = []
    for f in (ours, lambda x: ref(x, **cfg)):
        x = x0.clone().requires_grad_(True)
        y = f(x)
        if g_out is None:
            g_out = _randn(list(y.shape), seed + 1, dtype)
        y.backward(g_out)
        results.append((y.detach(), x.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GC exactness


@st.composite
def stacks(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
    cfgs = [draw(node_configs()) for _ in range(depth)]
    return widths, cfgs


def _stack(widths, cfgs, step_mode):
    blocks = []
    for i, (kind, kw) in enumerate(cfgs):
        blocks.append([layer.Linear(widths[i], widths[i + 1], step_mode=step_mode).double(), _node(kind, kw, step_mode)])
    return blocks


@SETTINGS
@given(stack=stacks(), T=st.integers(1, 5), N=st.integers(1, 3), seed=st.integers(0, 2**16),
       wrap=st.sampled_from(["gc", "tc1", "tc2", "tc3"]), comp=st.integers(0, 4))
def test_gc_exact_on_random_stacks(stack, T, N, seed, wrap, comp):
    """Plain and GC-wrapped copies of a random stack: same outputs, final states and gradients (float64)."""
    widths, cfgs = stack
    torch.manual_seed(seed)
    blocks = _stack(widths, cfgs, "m")
    plain = nn.Sequential(*[m for b in blocks for m in b])
    blocks_gc = copy.deepcopy(blocks)
    wrapped = []
    for i, b in enumerate(blocks_gc):
        # The first block gets real input; later ones get spikes and may use any compressor.
        c = memopt.NullSpikeCompressor() if i == 0 else _compressors(memopt)[comp]()
        if wrap == "gc":
            wrapped.append(memopt.GCContainer(c, *b))
        else:
            wrapped.append(memopt.TCGCContainer(c, *b, n_chunk=int(wrap[2:])))
    gc = nn.Sequential(*wrapped)
    x0 = _randn([T, N, widths[0]], seed, torch.float64)
    outs, grads, states = [], [], []
    for net in (plain, gc):
        x = x0.clone().requires_grad_(True)
        clipped = net is gc and wrap != "gc" and int(wrap[2:]) > T
        with pytest.warns(UserWarning, match="larger than T") if clipped else contextlib.nullcontext():
            y = net(x)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad] + [p.grad for p in net.parameters()])
        states.append([m.v for m in net.modules() if isinstance(m, neuron.BaseNode)])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)



@SETTINGS
@given(depth=st.integers(1, 2), pools=st.lists(st.sampled_from(["max", "avg"]), min_size=2, max_size=2),
       channels=st.lists(st.integers(1, 3), min_size=3, max_size=3), hw=st.integers(4, 9),
       T=st.integers(1, 4), seed=st.integers(0, 2**16), wrap=st.sampled_from(["gc", "tc2"]), comp=st.integers(0, 4))
def test_gc_exact_on_random_pooled_conv_stacks(depth, pools, channels, hw, T, seed, wrap, comp):
    """Blocks that start with a pool (which keeps no input for backward): GC equals plain (float64)."""
    torch.manual_seed(seed)
    blocks = []
    for i in range(depth):
        pool = (layer.MaxPool2d if pools[i] == "max" else layer.AvgPool2d)(2, step_mode="m")
        conv = layer.Conv2d(channels[i], channels[i + 1], 3, padding=1, step_mode="m").double()
        blocks.append([pool, conv, neuron.LIFNode(v_threshold=0.3, step_mode="m")])
    plain = nn.Sequential(*[m for b in blocks for m in b])
    wrapped = []
    for i, b in enumerate(copy.deepcopy(blocks)):
        c = memopt.NullSpikeCompressor() if i == 0 else _compressors(memopt)[comp]()
        wrapped.append(memopt.GCContainer(c, *b) if wrap == "gc" else memopt.TCGCContainer(c, *b, n_chunk=2))
    gc = nn.Sequential(*wrapped)
    x0 = _randn([T, 2, channels[0], hw * 2, hw * 2 + 1], seed, torch.float64)
    results = []
    for net in (plain, gc):
        x = x0.clone().requires_grad_(True)
        with pytest.warns(UserWarning, match="larger than T") if net is gc and wrap == "tc2" and T < 2 \
                else contextlib.nullcontext():
            y = net(x)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        results.append([y.detach(), x.grad, *[p.grad for p in net.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tcgc_refuses_single_step_modules():
    """In "s" mode dim 0 is the batch: splitting it would carry state across samples."""
    x, _ = data(T=4, N=6)
    tc = make_net("tc", step_mode="s", n_chunk=2)
    with pytest.raises(ValueError, match="TCGCContainer splits its inputs along time .* step_mode='s'"):
        run_seq(tc, x, "s")
