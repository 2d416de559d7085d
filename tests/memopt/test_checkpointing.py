"""GC segments against the plain network: outputs, states and every gradient."""
import copy
import pickle
import threading
import warnings
import weakref

import pytest
import torch
import torch.nn as nn

from snnkit import base, functional, layer, neuron
from snnkit.memopt import (
    BaseSpikeCompressor,
    BitSpikeCompressor,
    BooleanSpikeCompressor,
    GCContainer,
    MemoryTracker,
    NullSpikeCompressor,
    SparseSpikeCompressor,
    TCGCContainer,
    Uint8SpikeCompressor,
    in_gc_1st_forward,
    input_compressed_gc,
    query_autocast,
)

COMPRESSORS = [NullSpikeCompressor, BooleanSpikeCompressor, Uint8SpikeCompressor, BitSpikeCompressor, SparseSpikeCompressor]
NODES = {
    "if-hard": lambda m: neuron.IFNode(v_threshold=0.5, step_mode=m),
    "if-soft": lambda m: neuron.IFNode(v_threshold=0.5, v_reset=None, step_mode=m),
    "lif-hard-detach": lambda m: neuron.LIFNode(tau=2.0, v_threshold=0.4, detach_reset=True, step_mode=m),
    "lif-soft-nodecay": lambda m: neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None, v_threshold=0.3, step_mode=m),
}
T, N = 6, 3


def _blocks(node, m, dtype, bn=False):
    blocks = []
    for i, (fi, fo) in enumerate([(5, 7), (7, 4)]):
        mods = [layer.Linear(fi, fo, step_mode=m)]
        if bn:
            mods.append(layer.BatchNorm1d(fo, step_mode=m))
        mods.append(NODES[node](m))
        blocks.append(nn.Sequential(*mods))
    return nn.Sequential(*blocks).to(dtype)


def _gc_net(plain, comp):
    return nn.Sequential(*[GCContainer(comp(), *copy.deepcopy(list(b))) for b in plain])


def _spikes(*shape, dtype=torch.float32, p=0.4):
    return (torch.rand(*shape) < p).to(dtype)


def _step(net, x, m, grad_seed=1):
    """One forward over the sequence and a backward with a fixed output gradient."""
    x = x.detach().clone().requires_grad_()
    out = net(x) if m == "m" else torch.stack([net(x[t]) for t in range(x.shape[0])])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), x.grad, [p.grad for p in net.parameters()], [
        s.detach() if isinstance(s, torch.Tensor) else s for s in base.extract_memories(net)
    ]


def _assert_same(a, b, exact, atol=1e-12):
    out_a, gx_a, gp_a, st_a = a
    out_b, gx_b, gp_b, st_b = b
    pairs = [(out_a, out_b), (gx_a, gx_b), *zip(gp_a, gp_b), *zip(st_a, st_b)]
    assert len(gp_a) == len(gp_b) and len(st_a) == len(st_b)
    for u, v in pairs:
        assert (u is None) == (v is None)
        if isinstance(u, torch.Tensor):
            if exact:
                assert torch.equal(u, v), (u - v).abs().max()
            else:
                torch.testing.assert_close(u, v, rtol=0, atol=atol)
        else:
            assert u == v


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("node", list(NODES))
@pytest.mark.parametrize("m", ["m", "s"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_plain(comp, node, m, dtype):
    plain = _blocks(node, m, dtype)
    gc = _gc_net(plain, comp)
    x = _spikes(T, N, 5, dtype=dtype)
    ref = _step(plain, x, m)
    got = _step(gc, x, m)
    # "m": the same ops in the same order -> bit-identical. "s": parameter gradients of T
    # segments are summed by the outer backward in another order than a plain graph.
    _assert_same(ref, got, exact=(dtype == torch.float32 and m == "m"), atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert any(float(s.abs().sum()) > 0 for s in ref[3])  # the nets did spike


@pytest.mark.parametrize("comp", [NullSpikeCompressor, BitSpikeCompressor], ids=lambda c: c.__name__)
def test_conv_bn_stack_and_running_stats(comp):
    def block(ci, co):
        return nn.Sequential(
            layer.Conv2d(ci, co, 3, padding=1, step_mode="m"),
            layer.BatchNorm2d(co, step_mode="m"),
            neuron.LIFNode(v_threshold=0.5, step_mode="m"),
        )

    plain = nn.Sequential(block(2, 4), block(4, 3)).double()
    gc = _gc_net(plain, comp)
    x = _spikes(4, 2, 2, 6, 6, dtype=torch.float64)
    for _ in range(2):  # two steps: statistics and num_batches_tracked updated once each
        _assert_same(_step(plain, x, "m"), _step(gc, x, "m"), exact=False)
        functional.reset_net(plain), functional.reset_net(gc)
    for bp, bg in zip(plain, gc):
        assert int(bp[1].num_batches_tracked) == int(bg[1].num_batches_tracked) == 2
        assert torch.equal(bp[1].running_mean, bg[1].running_mean)
        assert torch.equal(bp[1].running_var, bg[1].running_var)


def _bn_stats(bn):
    return int(bn.num_batches_tracked), bn.running_mean.clone(), bn.running_var.clone()


def _assert_same_stats(a, b):
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_bn_stats_move_in_the_forward_as_in_a_plain_step():
    # a forward alone (no backward) updates the statistics once, as a plain forward does
    torch.manual_seed(0)
    plain = nn.Sequential(layer.BatchNorm1d(3, step_mode="m"), neuron.IFNode(step_mode="m"))
    gc = GCContainer(None, *copy.deepcopy(list(plain)))
    x = torch.randn(4, 5, 3, requires_grad=True)
    plain(x), gc(x)
    _assert_same_stats(_bn_stats(plain[0]), _bn_stats(gc[0]))
    assert _bn_stats(gc[0])[0] == 1


def test_bn_stats_of_single_steps_move_in_forward_order_once():
    # T single-step calls are recomputed last to first: the moving average must still see t = 0, 1, ...
    torch.manual_seed(0)
    plain = nn.Sequential(layer.Linear(3, 3), layer.BatchNorm1d(3), neuron.IFNode(v_threshold=0.3))
    gc = GCContainer(None, *copy.deepcopy(list(plain)))
    xs = torch.randn(6, 5, 3)
    for net in (plain, gc):
        sum(net(x).sum() for x in xs).backward()
    _assert_same_stats(_bn_stats(plain[1]), _bn_stats(gc[1]))
    assert _bn_stats(gc[1])[0] == 6


@pytest.mark.parametrize("second", ["retain_graph", "autograd.grad"])
def test_bn_stats_move_once_when_backward_runs_twice(second):
    torch.manual_seed(0)
    plain = nn.Sequential(layer.BatchNorm1d(3, step_mode="m"), neuron.IFNode(step_mode="m"))
    gc = GCContainer(None, *copy.deepcopy(list(plain)))
    x = torch.randn(4, 5, 3, requires_grad=True)
    for net in (plain, gc):
        loss = net(x).sum()
        if second == "retain_graph":
            loss.backward(retain_graph=True)
            loss.backward()
        else:
            torch.autograd.grad(loss, x, retain_graph=True)
            torch.autograd.grad(loss, x)
    _assert_same_stats(_bn_stats(plain[0]), _bn_stats(gc[0]))


def test_state_flows_across_two_m_calls_and_tbptt():
    plain = _blocks("lif-hard-detach", "m", torch.float64)
    gc = _gc_net(plain, BitSpikeCompressor)
    x1, x2 = _spikes(T, N, 5, dtype=torch.float64), _spikes(T, N, 5, dtype=torch.float64)
    g = torch.randn(2 * T, N, 4, dtype=torch.float64)

    def run(net, detach_between):
        a = net(x1)
        if detach_between:  # truncated BPTT: backward, detach the state, go on
            (a * g[:T]).sum().backward()
            functional.detach_net(net)
            b = net(x2)
            (b * g[T:]).sum().backward()
        else:
            b = net(x2)
            (torch.cat([a, b]) * g).sum().backward()
        return torch.cat([a, b]).detach(), [p.grad.clone() for p in net.parameters()]

    for tbptt in (False, True):
        for net in (plain, gc):
            net.zero_grad(), functional.reset_net(net)
        ref, got = run(plain, tbptt), run(gc, tbptt)
        assert torch.equal(ref[0], got[0])
        for u, v in zip(ref[1], got[1]):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_live_state_after_backward_is_state_after_forward():
    gc = _gc_net(_blocks("lif-hard-detach", "m", torch.float32), BitSpikeCompressor)
    out = gc(_spikes(T, N, 5))
    after_forward = base.extract_memories(gc)
    out.sum().backward()
    after_backward = base.extract_memories(gc)
    assert all(a is b for a, b in zip(after_forward, after_backward))
    assert all(a.grad_fn is not None for a in after_forward)  # still in the graph for the next call


def test_recomputed_states_are_dropped_before_the_nested_backward():
    # The recompute's final states are only graph outputs: the modules hold the live
    # states again while the segment's backward runs, so the recomputed ones can go.
    lin, node = layer.Linear(5, 4, step_mode="m"), neuron.LIFNode(v_threshold=0.3, step_mode="m")
    gc = GCContainer(BitSpikeCompressor(), lin, node)
    out = gc(_spikes(T, N, 5).requires_grad_())
    live, seen = node.v, []
    lin.register_full_backward_hook(lambda m, gi, go: seen.append(node.v is live))
    out.sum().backward()
    assert seen == [True]


@pytest.mark.parametrize("pool", [layer.MaxPool2d, layer.AvgPool2d])
@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.__name__)
def test_segments_starting_with_a_pool_are_exact_and_decompress_once(comp, pool):
    """The pool keeps no input, so the recompute needs the input once (not again in backward)."""
    torch.manual_seed(0)

    def block(ci, co):
        return nn.Sequential(pool(2, step_mode="m"), layer.Conv2d(ci, co, 3, padding=1, step_mode="m"),
                             layer.BatchNorm2d(co, step_mode="m"), neuron.LIFNode(v_threshold=0.3, step_mode="m"))

    plain = nn.Sequential(block(2, 3), block(3, 4))
    calls = []

    class Counting(comp):
        def decompress(self, c, shape=None):
            calls.append(1)
            return super().decompress(c, shape)

    gc = _gc_net(plain, Counting)
    x = _spikes(T, N, 2, 8, 8)
    _assert_same(_step(plain, x, "m"), _step(gc, x, "m"), exact=True)
    assert len(calls) == 2  # one per segment


def test_each_module_recomputed_exactly_once():
    calls = []
    gc = GCContainer(BitSpikeCompressor(), layer.Linear(5, 4, step_mode="m"), neuron.IFNode(step_mode="m"))
    for i, mod in enumerate(gc):
        mod.register_forward_hook(lambda *_, i=i: calls.append((i, in_gc_1st_forward(), torch.is_grad_enabled())))
    gc(_spikes(T, N, 5)).sum().backward()
    assert calls == [(0, True, False), (1, True, False), (0, False, True), (1, False, True)]


def test_in_gc_1st_forward_inside_outside_recompute_and_other_thread():
    seen = {}

    def probe(x):
        key = "recompute" if torch.is_grad_enabled() else "first"
        seen[key] = in_gc_1st_forward()
        box = []
        th = threading.Thread(target=lambda: box.append(in_gc_1st_forward()))
        th.start(), th.join()
        seen[key + "-thread"] = box[0]
        return x * 2

    assert in_gc_1st_forward() is False
    x = torch.randn(3, requires_grad=True)
    y = input_compressed_gc(probe, None, x)
    assert in_gc_1st_forward() is False
    y.sum().backward()
    assert seen == {"first": True, "first-thread": False, "recompute": False, "recompute-thread": False}
    assert in_gc_1st_forward() is False


def test_nested_segments_keep_the_flag_and_gradients():
    inner = GCContainer(BitSpikeCompressor(), layer.Linear(5, 5, step_mode="m"), neuron.IFNode(step_mode="m"))
    plain = nn.Sequential(copy.deepcopy(inner).double(), layer.Linear(5, 2, step_mode="m")).double()
    plain_ref = nn.Sequential(nn.Sequential(*copy.deepcopy(list(plain[0]))), copy.deepcopy(plain[1]))
    outer = GCContainer(None, *copy.deepcopy(list(plain)))
    x = _spikes(T, N, 5, dtype=torch.float64)
    _assert_same(_step(plain_ref, x, "m"), _step(outer, x, "m"), exact=False)


def _seeded_steps(plain, gc, x, mode, seed):
    """One step of each net from the same global RNG state: ``(plain result, GC result)``."""
    out = []
    for net in (plain, gc):
        torch.manual_seed(seed)
        out.append(_step(net, x, mode))
    return out


def test_dropout_rng_replay():
    def net():
        torch.manual_seed(3)
        return nn.Sequential(
            layer.Linear(5, 8, step_mode="m"),
            nn.Dropout(0.5),
            layer.Dropout(0.3, step_mode="m"),
            neuron.LIFNode(v_threshold=0.3, step_mode="m"),
        ).double()

    plain = net()
    gc = GCContainer(BitSpikeCompressor(), *copy.deepcopy(list(plain)))
    x = _spikes(T, N, 5, dtype=torch.float64)
    ref, got = _seeded_steps(plain, gc, x, "m", seed=7)
    _assert_same(ref, got, exact=True)
    assert torch.equal(plain[2].mask, gc[2].mask)
    # The backward does not consume random numbers of the global stream.
    functional.reset_net(gc)
    torch.manual_seed(9)
    gc(x).sum().backward()
    after = torch.rand(1)
    functional.reset_net(gc)
    torch.manual_seed(9)
    with torch.no_grad():
        gc(x)
    assert torch.equal(after, torch.rand(1))


def test_dropout_mask_state_in_single_step_mode():
    torch.manual_seed(2)
    plain = nn.Sequential(layer.Linear(5, 6), layer.Dropout(0.5), neuron.IFNode(v_threshold=0.2)).double()
    gc = GCContainer(None, *copy.deepcopy(list(plain)))
    x = _spikes(T, N, 5, dtype=torch.float64)
    ref, got = _seeded_steps(plain, gc, x, "s", seed=4)
    _assert_same(ref, got, exact=False)


def test_bf16_cpu_autocast_replay():
    plain = nn.Sequential(layer.Linear(5, 8, step_mode="m"), neuron.LIFNode(v_threshold=0.3, step_mode="m"))
    gc = GCContainer(BitSpikeCompressor(), *copy.deepcopy(list(plain)))
    x = _spikes(T, N, 5)
    outs = []
    for net in (plain, gc):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert query_autocast() == ("cpu", torch.bfloat16, True)
            out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        outs.append((out, [p.grad for p in net.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for u, v in zip(outs[0][1], outs[1][1]):
        assert torch.equal(u, v)
    assert query_autocast() == ("cpu", torch.get_autocast_dtype("cpu"), False)


class _Mix(nn.Module):
    """Two sequence inputs, a non-sequence input, two outputs, a neuron inside."""

    def __init__(self):
        super().__init__()
        self.lin = layer.Linear(5, 4, step_mode="m")
        self.lin2 = layer.Linear(3, 4, step_mode="m")
        self.node = neuron.LIFNode(v_threshold=0.3, step_mode="m")

    def forward(self, x, y, scale):
        return self.node(self.lin(x) + self.lin2(y) * scale), self.lin2(y).tanh()


@pytest.mark.parametrize("n_chunk", [1, 2, 3, 8, 10])
def test_tc_chunks(n_chunk):
    Tn = 8
    plain = _Mix().double()
    tc = TCGCContainer(BitSpikeCompressor(), copy.deepcopy(plain), n_chunk=n_chunk, n_seq_inputs=2, n_outputs=2)
    x = _spikes(Tn, N, 5, dtype=torch.float64)
    y = torch.randn(Tn, N, 3, dtype=torch.float64)
    results = []
    for net, mod in ((plain, plain), (tc, tc[0])):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        scale = torch.full((4,), 1.5, dtype=torch.float64, requires_grad=True)
        if net is tc and n_chunk > Tn:
            with pytest.warns(UserWarning, match="n_chunk=10 is larger than T=8"):
                a, b = net(xs, ys, scale)
        else:
            a, b = net(xs, ys, scale)
        ((a * 1.3).sum() + (b * b).sum()).backward()
        results.append((a, b, xs.grad, ys.grad, scale.grad, mod.node.v, *[p.grad for p in mod.parameters()]))
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_tc_accepts_single_step_layers_inside_seq_to_ann_container():
    """SeqToANNContainer flattens time into the batch, so its single-step children are fine in a chunk."""
    torch.manual_seed(0)
    inner = layer.SeqToANNContainer(layer.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1).double())
    plain = nn.Sequential(inner, neuron.LIFNode(v_threshold=0.2, step_mode="m"))
    tc = TCGCContainer(BitSpikeCompressor(), *copy.deepcopy(plain), n_chunk=3)
    x = _spikes(T, N, 2, 6, 6, dtype=torch.float64)
    grads = []
    for net in (plain, tc):
        out = net(x)
        (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads.append([out, net[1].v, *[p.grad for p in net.parameters()]])
    for a, b in zip(*grads):  # parameter gradients are sums over chunks: another order of additions
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="module '0.1' is in step_mode='s'"):
        TCGCContainer(None, nn.Sequential(nn.Identity(), layer.Linear(2, 2)), n_chunk=2)(torch.randn(4, 3, 2))


def test_tc_errors_and_attributes():
    with pytest.raises(ValueError, match="n_chunk >= 1, got 0"):
        TCGCContainer(None, nn.Linear(2, 2), n_chunk=0)
    tc = TCGCContainer(None, nn.Linear(2, 2), n_chunk=2, n_seq_inputs=2)
    assert (tc.n_chunk, tc.n_seq_inputs, tc.n_outputs) == (2, 2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        tc(torch.randn(4, 2), torch.randn(3, 2))


def test_torch_batchnorm_in_a_segment_warns_that_statistics_update_twice():
    # What the warning is about: torch's BatchNorm counts the first forward and the recompute.
    torch_bn = nn.BatchNorm1d(4)
    gc = _warned(lambda: GCContainer(None, layer.SeqToANNContainer(nn.Linear(3, 4), torch_bn)), "'0.1' in a GCContainer")
    gc(torch.randn(T, N, 3)).sum().backward()
    assert torch_bn.num_batches_tracked.item() == 2
    _warned(lambda: TCGCContainer(None, nn.Linear(3, 4), nn.BatchNorm1d(4), n_chunk=2), "'1' in a TCGCContainer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GCContainer(None, layer.SeqToANNContainer(nn.Linear(3, 4), layer.BatchNorm1d(4)))
        GCContainer(None, layer.SeqToANNContainer(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)))


def _warned(make, where):
    with pytest.warns(UserWarning, match=rf"torch.nn.BatchNorm1d at {where}.*twice.*snnkit.layer.BatchNorm1d"):
        return make()


def test_invalid_input_raises_in_backward_naming_the_compressor():
    gc = GCContainer(BitSpikeCompressor(), layer.Linear(5, 4, step_mode="m"), neuron.IFNode(step_mode="m"))
    for bad in (0.5, 2.0, -1.0, float("nan")):
        x = _spikes(T, N, 5)
        x[1, 1, 1] = bad
        out = gc(x)  # no host sync in the forward
        with pytest.raises(ValueError, match="BitSpikeCompressor can only store 0 or 1.*NullSpikeCompressor.*Uint8"):
            out.sum().backward()
        functional.reset_net(gc)
    # check=False: the caller vouches for the input.
    gc.x_compressor = BitSpikeCompressor(check=False)
    gc(_spikes(T, N, 5)).sum().backward()


def test_caller_tensors_not_modified_and_params_get_grads_without_input_grad():
    gc = GCContainer(BitSpikeCompressor(), layer.Linear(5, 4, step_mode="m"), neuron.IFNode(step_mode="m"))
    x = _spikes(T, N, 5)
    out = gc(x)
    assert not x.requires_grad and out.requires_grad
    out.sum().backward()
    assert x.grad is None and gc[0].weight.grad is not None


def test_autograd_grad_and_no_grad():
    plain = _blocks("if-hard", "m", torch.float64)
    gc = _gc_net(plain, BitSpikeCompressor)
    x = _spikes(T, N, 5, dtype=torch.float64)
    ref = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
    got = torch.autograd.grad(gc(x).sum(), list(gc.parameters()))
    for u, v in zip(ref, got):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in gc.parameters())
    functional.reset_net(plain), functional.reset_net(gc)
    with torch.no_grad():
        assert torch.equal(plain(x), gc(x))


def test_closure_parameters_get_gradients():
    w = torch.randn(4, 5, requires_grad=True)
    x = torch.randn(3, 5)
    input_compressed_gc(lambda t: (t @ w.t()).sin(), None, x).sum().backward()
    torch.testing.assert_close(w.grad, (x @ w.t()).cos().t() @ x)


def test_deepcopy_pickle_repr():
    gc = GCContainer(BitSpikeCompressor(), layer.Linear(5, 4, step_mode="m"), neuron.IFNode(step_mode="m"))
    tc = TCGCContainer(Uint8SpikeCompressor(check=False), layer.Linear(5, 4, step_mode="m"), n_chunk=3)
    x = _spikes(T, N, 5)
    for mod in (gc, tc):
        for clone in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
            assert type(clone) is type(mod) and clone.x_compressor == mod.x_compressor
            assert torch.equal(clone(x), mod(x))
            functional.reset_net(mod)
    assert repr(gc).startswith("GCContainer(\n  x_compressor=BitSpikeCompressor()\n  (0): Linear(")
    assert "x_compressor=Uint8SpikeCompressor(check=False), n_chunk=3, n_seq_inputs=1, n_outputs=1" in repr(tc)
    with pytest.raises(TypeError, match="x_compressor must be a BaseSpikeCompressor"):
        GCContainer("bit", nn.Linear(2, 2))


# --- the seed documentation's examples, verbatim apart from the imports -----------------------
def test_seed_example_input_compressed_gc():
    import torch
    import torch.nn as nn  # noqa: F401
    from snnkit.memopt import input_compressed_gc
    from snnkit.memopt import NullSpikeCompressor

    def simple_forward(x, weight):
        return torch.matmul(x, weight.t())

    x = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True)
    result = input_compressed_gc(simple_forward, NullSpikeCompressor(), x, weight)
    loss = result.sum()
    loss.backward()

    torch.testing.assert_close(x.grad, weight.sum(0).expand(5, 3))
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(4, 3))


def test_seed_example_to_gc_function():
    import torch
    from snnkit.memopt import to_gc_function
    from snnkit.memopt import NullSpikeCompressor

    x = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True)
    compressor = NullSpikeCompressor()

    # Usage 1: as decorator
    @to_gc_function(compressor)
    def decorated_forward(x, weight):
        return torch.matmul(x, weight.t())

    result1 = decorated_forward(x, weight)

    # Usage 2: as conversion function
    def simple_forward(x, weight):
        return torch.matmul(x, weight.t())

    converted_forward = to_gc_function(compressor, simple_forward)
    result2 = converted_forward(x, weight)

    assert torch.equal(result1, x @ weight.t()) and torch.equal(result2, result1)
    (result1.sum() + result2.sum()).backward()
    torch.testing.assert_close(weight.grad, 2 * x.detach().sum(0).expand(4, 3))


def test_seed_example_gc_container():
    import torch
    import torch.nn as nn
    from snnkit.memopt import GCContainer
    from snnkit.memopt import NullSpikeCompressor

    container = GCContainer(NullSpikeCompressor(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))

    x = torch.randn(3, 10, requires_grad=True)
    result = container(x)

    plain = nn.Sequential(*copy.deepcopy(list(container)))
    assert torch.equal(result, plain(x))
    result.sum().backward()
    plain(x).sum().backward()
    for p, q in zip(container.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_seed_example_tc_gc_container():
    import torch
    import torch.nn as nn
    from snnkit.memopt import TCGCContainer
    from snnkit.memopt import NullSpikeCompressor

    # Basic usage
    tc_container = TCGCContainer(
        NullSpikeCompressor(),
        nn.Linear(10, 20),
        nn.ReLU(),
        nn.Linear(20, 5),
        n_chunk=4,
    )
    x_seq = torch.randn(8, 3, 10, requires_grad=True)  # T=8
    result = tc_container(x_seq)
    print(f"Input shape: {x_seq.shape}")
    print(f"Output shape: {result.shape}")

    assert result.shape == (8, 3, 5)
    torch.testing.assert_close(result, nn.Sequential(*list(tc_container))(x_seq), rtol=0, atol=1e-6)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_recompute_frees_input_and_memory_reuse_is_not_mistaken_for_it():
    # x + 1 lets the decompressed input go; x' * 2 may land at its old address; sin saves it.
    mods = [_Fn(lambda x: x + 1), _Fn(lambda x: x * 2), _Fn(torch.sin), layer.Linear(5, 3)]
    plain = nn.Sequential(*copy.deepcopy(mods)).double()
    gc = GCContainer(BitSpikeCompressor(), *copy.deepcopy(mods)).double()
    for shape in [(4, 5), (64, 5), (4096, 5)]:
        x = _spikes(*shape, dtype=torch.float64)
        _assert_same(_step(plain, x, "s"), _step(gc, x, "s"), exact=True)


def test_each_input_is_freed_once_the_module_that_takes_it_returns():
    # In the first forward and in the recompute the segment keeps no module's input
    # alive after that module returns: the third module sees the second's input gone.
    seen = []

    def remember(x):
        seen.append(weakref.ref(x.untyped_storage()))
        return x * 2

    def check(x):
        checked.append(seen[-1]() is None)
        return x + 1

    checked = []
    gc = GCContainer(BitSpikeCompressor(), _Fn(lambda x: x * 3), _Fn(remember), _Fn(check), layer.Linear(5, 3))
    gc(_spikes(4, 5).requires_grad_()).sum().backward()
    assert checked == [True, True]


def test_input_compressed_gc_on_a_stateful_module_passes_its_state():
    plain = _blocks("lif-hard-detach", "m", torch.float64)
    gc_mod = copy.deepcopy(plain)
    x = _spikes(T, N, 5, dtype=torch.float64)
    results = []
    for net, run in ((plain, plain), (gc_mod, lambda t: input_compressed_gc(gc_mod.forward, BitSpikeCompressor(), t))):
        xs = x.clone().requires_grad_()
        out = torch.cat([run(xs), run(xs)])  # two calls: state flows from the first to the second
        out.sum().backward()
        results.append((out, xs.grad, *[p.grad for p in net.parameters()]))
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def _tc_backward_peak(tc, x):
    y = tc(x)
    with MemoryTracker() as mt:
        y.sum().backward()
    return mt.peak_bytes


def test_tc_backward_keeps_one_full_input_gradient():
    # The chunks' input gradients are concatenated once (no full-size zero padding per
    # chunk, which needed 2 full-size tensors plus the waiting chunk gradients).
    torch.manual_seed(0)
    tc = TCGCContainer(None, layer.Linear(4096, 1, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"), n_chunk=4)
    ref = nn.Sequential(*copy.deepcopy(list(tc)))
    x = torch.rand(8, 2, 4096, requires_grad=True)
    x_bytes, w_bytes = x.numel() * 4, tc[0].weight.numel() * 4
    # the chunk gradients and their concatenation, plus weight gradients
    assert _tc_backward_peak(tc, x) <= 2 * x_bytes + 2 * w_bytes  # was 3.56 * x_bytes
    xr = x.detach().clone().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("dense", [True, False])
def test_tc_chunks_get_their_own_output_gradient_unless_it_is_expanded(dense):
    # Own copies free each chunk's part of a full output gradient after that chunk; an
    # expanded gradient (from a sum) is a view: copying would materialise it.
    torch.manual_seed(0)
    tc = TCGCContainer(None, layer.Linear(3, 5, step_mode="m"), neuron.IFNode(step_mode="m"), n_chunk=4)
    seen = []
    tc[1].register_full_backward_hook(lambda m, gi, go: seen.append(go[0]._base is None))
    out = tc(torch.rand(8, 2, 3, requires_grad=True))
    (out * torch.randn_like(out) if dense else out).sum().backward()
    assert seen == [dense] * 4


def test_tc_backward_sums_chunk_parameter_gradients_in_place():
    # Each chunk's weight gradient is added into the first one: at most 2 copies alive.
    torch.manual_seed(0)
    tc = TCGCContainer(None, layer.Conv2d(128, 128, 3, padding=1, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"),
                       n_chunk=4)
    x = torch.rand(8, 1, 128, 2, 2)
    w_bytes, x_bytes = tc[0].weight.numel() * 4, x.numel() * 4
    assert _tc_backward_peak(tc, x) <= 2 * w_bytes + 2 * x_bytes  # was 3 * w_bytes


class _SharedGrad(nn.Module):
    """Two parameters that receive the very same gradient tensor in every chunk of one time step."""

    def __init__(self):
        super().__init__()
        self.lin = layer.Linear(5, 4, step_mode="m")
        self.p1 = nn.Parameter(torch.randn(1, N, 4))
        self.p2 = nn.Parameter(torch.randn(1, N, 4))
        self.node = neuron.LIFNode(v_threshold=0.3, step_mode="m")

    def forward(self, x):
        return self.node(torch.relu(self.lin(x) + self.p1 + self.p2) * 1.5)


@pytest.mark.parametrize("n_chunk", [4, 8])
def test_tc_parameter_gradients_shared_between_parameters_and_hooks_once(n_chunk):
    torch.manual_seed(0)
    plain = _SharedGrad().double()
    tc = TCGCContainer(None, copy.deepcopy(plain), n_chunk=n_chunk)
    fired = {}
    for name, p in tc.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.__setitem__(name, fired.get(name, 0) + 1))
    x = torch.randn(8, N, 5, dtype=torch.float64)
    g = torch.randn(8, N, 4, dtype=torch.float64)
    grads = []
    for net, mod in ((plain, plain), (tc, tc[0])):
        xs = x.clone().requires_grad_()
        (net(xs) * g).sum().backward()
        grads.append([xs.grad, *[p.grad for p in mod.parameters()]])
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    assert fired == {name: 1 for name, _ in tc.named_parameters()}


def test_recompute_takes_from_the_payload_by_storage_identity_not_address():
    """The recompute saves views of its decompressed input as references to the payload.

    Only tensors of that very storage qualify: another storage at the same address (a
    numpy alias here; in a real run, memory reused after the input was freed) must be
    saved as itself, or backward would read the payload's values in its place.
    """
    from snnkit.memopt.checkpointing import _input_from_payload

    comp = BitSpikeCompressor()
    x = (torch.rand(64) < 0.5).float()
    c = comp.compress(x)
    alias = torch.from_numpy(x.numpy())
    assert alias.data_ptr() == x.data_ptr()
    assert alias.untyped_storage()._cdata != x.untyped_storage()._cdata
    w = torch.ones(64, requires_grad=True)
    with _input_from_payload(x, comp, c):
        from_x = (x[::2] * w[::2]).sum().grad_fn.next_functions[0][0]
        from_alias = (alias * w).sum().grad_fn.next_functions[0][0]
    saved_x, saved_alias = from_x._saved_self, from_alias._saved_self
    assert saved_x.data_ptr() != x.data_ptr() and torch.equal(saved_x, x[::2])  # rebuilt from the payload
    assert saved_alias.data_ptr() == alias.data_ptr()  # kept as itself
    hooks = _input_from_payload(saved_x, comp, c)
    del saved_x, from_x  # the input is freed: nothing is taken from the payload any more
    z = torch.ones(32)
    with hooks:
        saved_z = (z * w[:32]).sum().grad_fn.next_functions[0][0]._saved_self
    assert saved_z.data_ptr() == z.data_ptr()


# ---------------------------------------------------------------------------------------------
# In-place first modules, integer chunked inputs, partial backward, nested arguments, frozen
# parameters and double backward: each against the plain network (or a clear error).
# ---------------------------------------------------------------------------------------------
def _pre_post():
    torch.manual_seed(0)
    return nn.Linear(4, 4).double(), nn.Linear(4, 3).double()


def _in_place_step(make, x, pre, residual=False, x_grad=True):
    """Outputs and every gradient of ``pre -> make() (-> + residual use of its input)``."""
    pre = copy.deepcopy(pre)
    block = make()
    h = pre(x) if x_grad else x.clone()
    out = block(h)
    if residual:
        out = out + h[..., :3]  # h was written in place by the block
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * g).sum().backward()
    return [out.detach(), *[p.grad for p in (*pre.parameters(), *block.parameters())]]


class _Flip(nn.Module):
    """``1 - x`` written into ``x``: binary values stay binary, every value changes."""

    inplace = True

    def forward(self, x):
        return x.mul_(-1).add_(1)


class _Ones(nn.Module):
    """``x * 1`` with a parameter: binary values stay binary, and the result requires grad."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", ["x-grad", "residual", "no-x-grad", "only-module"])
def test_in_place_first_module_is_exact(comp, case):
    pre, post = _pre_post()
    x = torch.randn(T, N, 4, dtype=torch.float64)
    if comp in (BooleanSpikeCompressor, BitSpikeCompressor, Uint8SpikeCompressor):
        pre, x = _Ones(), _spikes(T, N, 4, dtype=torch.float64)  # values these compressors store
    mods = lambda: [_Flip()] + ([] if case == "only-module" else [copy.deepcopy(post)])
    kw = dict(residual=case == "residual", x_grad=case != "no-x-grad")
    ref = _in_place_step(lambda: nn.Sequential(*mods()), x, pre, **kw)
    got = _in_place_step(lambda: GCContainer(comp(), *mods()), x, pre, **kw)
    assert len(ref) == len(got)
    for u, v in zip(ref, got):
        assert (u is None and v is None) or torch.equal(u, v), (u - v).abs().max()


def _spy(seen: list) -> type:
    """A NullSpikeCompressor class that appends every tensor it keeps to ``seen``."""

    class Spy(NullSpikeCompressor):
        def _compress(self, s):
            seen.append(s)
            return s

    return Spy


def test_in_place_first_module_copies_only_then_and_survives_retain_graph():
    seen = []
    Spy = _spy(seen)
    _, post = _pre_post()
    x = torch.randn(T, N, 4, dtype=torch.float64)
    GCContainer(Spy(), nn.LeakyReLU(0.1), copy.deepcopy(post))(x)
    assert seen.pop() is x  # no copy in the common case
    results = []
    for block in (nn.Sequential, lambda *m: GCContainer(Spy(), *m)):
        net = block(nn.LeakyReLU(0.1, inplace=True), copy.deepcopy(post))
        xi = x.clone()
        loss = net(xi).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        results.append(net[1].weight.grad)
    assert seen.pop().untyped_storage().data_ptr() != xi.untyped_storage().data_ptr()  # a copy was kept
    assert torch.equal(*results)


class _Twice(nn.Module):
    def forward(self, x):
        return x.mul_(2)


def test_in_place_write_without_inplace_attribute():
    _, post = _pre_post()
    x = torch.randn(T, N, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified its input x_seq in place.*SparseSpikeCompressor"):
        GCContainer(None, _Twice(), copy.deepcopy(post))(x.clone())
    ref = _in_place_step(lambda: nn.Sequential(_Twice(), copy.deepcopy(post)), x, nn.Identity(), x_grad=False)
    got = _in_place_step(lambda: GCContainer(SparseSpikeCompressor(), _Twice(), copy.deepcopy(post)), x, nn.Identity(), x_grad=False)
    for u, v in zip(ref, got):
        assert torch.equal(u, v)


def test_tc_in_place_first_module():
    pre, post = _pre_post()
    x = torch.randn(T, N, 4, dtype=torch.float64)
    # Same chunks, out of place vs in place: the same bits; with an input that requires grad, an error.
    make = lambda inplace: TCGCContainer(None, nn.LeakyReLU(0.1, inplace=inplace), copy.deepcopy(post), n_chunk=3)
    ref = _in_place_step(lambda: make(False), x, pre, x_grad=False)
    got = _in_place_step(lambda: make(True), x, pre, x_grad=False)
    for u, v in zip(ref, got):
        assert (u is None and v is None) or torch.equal(u, v)
    with pytest.raises(RuntimeError, match="TCGCContainer modified its input in place"):
        _in_place_step(lambda: make(True), x, pre)


class _ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


@pytest.mark.parametrize("n_chunk", [1, 3])
@pytest.mark.parametrize("kind", ["int", "bool"])
def test_tc_integer_and_bool_inputs_give_parameter_gradients(n_chunk, kind):
    torch.manual_seed(0)
    if kind == "int":
        mods, x = [layer.SeqToANNContainer(nn.Embedding(10, 4).double())], torch.randint(0, 10, (T, N))
    else:
        mods, x = [_ToDouble(), layer.Linear(4, 3, step_mode="m").double()], torch.rand(T, N, 4) > 0.5
    plain = nn.Sequential(*mods)
    tc = TCGCContainer(None, *copy.deepcopy(mods), n_chunk=n_chunk)
    for net in (plain, tc):
        (net(x) * torch.arange(1.0, 1 + T).view(T, 1, *[1] * (2 if kind == "int" else 1))).sum().backward()
    for p, q in zip(plain.parameters(), tc.parameters()):
        assert q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = layer.Linear(5, 4, step_mode="m")

    def forward(self, x, scale):
        return self.lin(x) * scale


@pytest.mark.parametrize("partial", ["autograd.grad", "backward-inputs"])
def test_tc_partial_backward_leaves_no_stale_parameter_gradients(partial):
    torch.manual_seed(0)
    plain = _Scaled().double()
    tc = TCGCContainer(None, copy.deepcopy(plain), n_chunk=2)
    x = _spikes(T, N, 5, dtype=torch.float64)
    results = []
    for net in (plain, tc):
        scale = torch.full((4,), 1.5, dtype=torch.float64, requires_grad=True)
        loss = (net(x, scale) * torch.arange(1.0, 1 + T).view(T, 1, 1)).sum()
        if partial == "autograd.grad":
            torch.autograd.grad(loss, [scale], retain_graph=True)
        else:
            loss.backward(inputs=[scale], retain_graph=True)
        loss.backward()
        results.append([scale.grad, *[p.grad for p in net.parameters()]])
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_double_backward_raises():
    torch.manual_seed(0)
    gc = GCContainer(None, nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = gc(x).sum() + (x**3).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out, x, create_graph=True)
    gc(x).sum().backward()  # first order still works
    assert gc[0].weight.grad is not None


class _AddSkips(nn.Module):
    def forward(self, x, skips, extra):
        return x + (skips[0] + skips[1][0]) * extra["w"]


def test_tensors_in_nested_arguments_get_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    inputs = torch.randn(4, 2, 4, dtype=torch.float64)
    results = []
    for gc in (False, True):
        x, a, b, w = (t.clone().requires_grad_() for t in inputs)
        net = (GCContainer(None, _AddSkips(), copy.deepcopy(lin)) if gc else nn.Sequential(_AddSkips(), copy.deepcopy(lin)))
        out = net(x, [a, (b,)], {"w": w}) if gc else net[1](net[0](x, [a, (b,)], {"w": w}))
        (out * torch.arange(1.0, 7).view(2, 3)).sum().backward()
        results.append([out, x.grad, a.grad, b.grad, w.grad, *[p.grad for p in net.parameters()]])
    for u, v in zip(*results):
        assert v is not None and torch.equal(u, v)


@pytest.mark.parametrize("container", ["gc", "tc"])
def test_parameter_frozen_between_forward_and_backward(container):
    torch.manual_seed(0)
    mods = [layer.Linear(5, 4, step_mode="m").double(), layer.Linear(4, 3, step_mode="m").double()]
    wrap = (lambda *m: GCContainer(None, *m)) if container == "gc" else (lambda *m: TCGCContainer(None, *m, n_chunk=2))
    x = _spikes(T, N, 5, dtype=torch.float64)
    results = []
    for net in (nn.Sequential(*copy.deepcopy(mods)), wrap(*copy.deepcopy(mods))):
        out = net(x)
        net[0].weight.requires_grad_(False)
        out.sum().backward()
        results.append([p.grad for p in net.parameters()])
    assert results[0][0] is None and results[1][0] is None
    for u, v in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_query_autocast_sees_devices_other_than_cpu_and_cuda():
    if not torch.amp.is_autocast_available("xpu"):
        pytest.skip("this torch build has no xpu autocast")
    with torch.autocast("xpu", dtype=torch.float16):
        assert query_autocast() == ("xpu", torch.float16, True)


def test_in_place_first_module_on_a_view_gives_the_base_its_gradient():
    lin = nn.Linear(4, 3).double()
    a0 = torch.randn(T + 1, N, 4, dtype=torch.float64)
    results = []
    for gc in (False, True):
        a = a0.clone().requires_grad_()
        b = a * 1.5
        mods = [nn.ELU(inplace=True), copy.deepcopy(lin)]
        net = GCContainer(None, *mods) if gc else nn.Sequential(*mods)
        out = net(b[1:])  # a view of b, written in place by the ELU
        (out.sum() + (b * b).sum()).backward()
        results.append([out.detach(), a.grad, *[p.grad for p in net.parameters()]])
    for u, v in zip(*results):
        assert torch.equal(u, v)


class _SameMemory(BaseSpikeCompressor):
    """Keeps a reshaped view of its input (the memory of x_seq itself)."""

    def _compress(self, s):
        return s.view(-1)

    def _decompress(self, payload, shape, dtype):
        return payload.view(shape)


def test_in_place_write_into_an_input_a_compressor_keeps_a_view_of_raises():
    x = torch.randn(T, N, 4)
    with pytest.raises(RuntimeError, match="_SameMemory keeps x_seq's memory"):
        GCContainer(_SameMemory(), nn.Identity(), nn.ELU(inplace=True), nn.Linear(4, 3))(x)


def test_container_arguments_without_tensors_reach_the_function_as_they_are():
    log, opts = [], {"log": []}

    def f(x, log, opts):
        log.append(1)
        opts["log"].append(1)
        return x * 2

    x = torch.randn(T, N, 4, requires_grad=True)
    input_compressed_gc(f, None, x, log, opts).sum().backward()
    assert len(log) == 2 and opts["log"] == [1, 1]  # first forward and recompute, into the caller's objects


def test_dropout_of_ours_with_inplace_is_not_copied_first():
    seen = []
    x = torch.randn(T, N, 4)
    GCContainer(_spy(seen)(), layer.Dropout(0.5, inplace=True), nn.Linear(4, 3))(x)
    assert seen.pop() is x


def test_in_place_first_module_with_a_compressor_keeping_the_input_memory_is_exact():
    lin = nn.Linear(4, 3).double()
    x0 = torch.randn(T, N, 4, dtype=torch.float64)
    results = []
    for net in (nn.Sequential(nn.ReLU(inplace=True), copy.deepcopy(lin)),
                GCContainer(_SameMemory(), nn.ReLU(inplace=True), copy.deepcopy(lin))):
        out = net(x0.clone())
        out.sum().backward()
        results.append([out.detach(), *[p.grad for p in net.parameters()]])
    for u, v in zip(*results):
        assert torch.equal(u, v)
