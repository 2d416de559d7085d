import importlib.util

import pytest
import torch
import torch.nn as nn

from snnkit import functional, neuron, surrogate


def make(cls, **kw):
    return cls(**kw) if cls is neuron.IFNode else cls(tau=1.5, **kw)


@pytest.mark.parametrize("cls", [neuron.IFNode, neuron.LIFNode])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_single_and_multi_step_modules_agree(cls, v_reset):
    x = torch.rand(6, 4, 10) * 1.5
    s_node, m_node = make(cls, v_reset=v_reset), make(cls, v_reset=v_reset, step_mode="m", store_v_seq=True)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs, vs = [], []
    for t in range(6):
        outs.append(s_node(xs[t]))
        vs.append(s_node.v)
    out_m = m_node(xm)
    assert torch.equal(torch.stack(outs), out_m)
    assert torch.equal(torch.stack(vs), m_node.v_seq) and torch.equal(s_node.v, m_node.v)
    torch.stack(outs).sum().backward()
    out_m.sum().backward()
    torch.testing.assert_close(xs.grad, xm.grad)


def test_state_carries_across_calls_and_reset():
    node = neuron.LIFNode(step_mode="m")
    x = torch.full((3, 1, 2), 1.5)  # spikes [0, 1, 0], then [1, 0, 1] from the carried state
    first = node(x)
    second = node(x)
    assert not torch.equal(first, second)  # state carried over
    node.reset()
    assert node.v == 0.0
    assert torch.equal(node(x), first)


def test_gradient_flows_through_state_across_calls():
    node = neuron.LIFNode(step_mode="m")
    x1 = (torch.rand(3, 2, 5) * 2).requires_grad_()
    x2 = torch.rand(3, 2, 5) * 2
    node(x1)
    node(x2).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [neuron.IFNode, neuron.LIFNode])
@pytest.mark.parametrize("grad", [False, True])
def test_fresh_state_is_expanded_for_the_first_step_only(cls, grad):
    # A fresh node (state a float) must peak no higher than one handed the same state as a
    # tensor made beforehand: the expanded initial state does not outlive the first step.
    from snnkit.memopt import MemoryTracker

    x = (torch.rand(5, 3, 64) * 2).requires_grad_(grad)
    results = []
    for fresh in (True, False):
        node = make(cls, step_mode="m")
        if not fresh:
            node.v = torch.zeros(3, 64)
        with MemoryTracker() as tracker:
            out = node(x)
        results.append((tracker.peak_bytes, out, node.v))
    (peak_fresh, out_fresh, v_fresh), (peak_given, out_given, v_given) = results
    assert peak_fresh <= peak_given
    assert torch.equal(out_fresh, out_given) and torch.equal(v_fresh, v_given)


def test_errors():
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cupy'\), got 'jax'"):
        neuron.LIFNode(backend="jax")
    with pytest.raises(ValueError, match="expects a sequence \\[T, N, \\*\\], got shape \\(5,\\)"):
        neuron.IFNode(step_mode="m")(torch.rand(5))
    with pytest.raises(ValueError, match="tau must be a finite number >= 1"):
        neuron.LIFNode(tau=0.5)
    with pytest.raises(ValueError, match="surrogate_function must be"):
        neuron.IFNode(surrogate_function=torch.sigmoid)
    node = neuron.IFNode()
    node(torch.rand(2, 3))
    with pytest.raises(ValueError, match="reset_net"):
        node(torch.rand(4, 3))


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None and torch.cuda.is_available(), reason="CUDA present")
def test_cupy_backend_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cupy' needs (CuPy|a CUDA device)"):
        neuron.LIFNode(backend="cupy")
    net = nn.Sequential(neuron.IFNode())
    with pytest.raises(RuntimeError, match="backend='cupy' needs"):
        functional.set_backend(net, "cupy")
    assert net[0].backend == "torch"


def test_default_surrogate_and_repr():
    node = neuron.LIFNode(tau=2)
    assert isinstance(node.surrogate_function, surrogate.Sigmoid) and node.tau == 2.0
    assert "tau=2.0" in repr(node) and "backend='torch'" in repr(node)




@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="SpikingJelly not installed")
@pytest.mark.parametrize("kind", ["if", "lif"])
@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_cross_check_with_spikingjelly(kind, v_reset, detach_reset):
    from spikingjelly.activation_based import neuron as sj_neuron

    kw = dict(v_reset=v_reset, detach_reset=detach_reset, step_mode="m")
    if kind == "if":
        ours, theirs = neuron.IFNode(**kw), sj_neuron.IFNode(**kw)
    else:
        ours, theirs = neuron.LIFNode(tau=2.0, **kw), sj_neuron.LIFNode(tau=2.0, **kw)
    x = torch.rand(8, 4, 16, dtype=torch.float64) * 1.5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa, sb = ours(xa), theirs.to(torch.float64)(xb)
    assert torch.equal(sa, sb)
    g = torch.randn_like(sa)
    sa.backward(g)
    sb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=1e-10)


class _Gauss(surrogate.SurrogateFunction):
    """A custom surrogate whose ``derivative`` returns a new tensor and takes no ``inplace`` flag."""

    def primitive(self, x):
        return 0.5 * (1 + torch.erf(x * self.alpha / 2**0.5))

    def derivative(self, x):
        return self.alpha / (2 * torch.pi) ** 0.5 * torch.exp(-0.5 * (self.alpha * x) ** 2)


@pytest.mark.parametrize("cls", [neuron.IFNode, neuron.LIFNode])
@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_custom_surrogate_multi_step_gradients_equal_single_steps(cls, v_reset, detach_reset):
    x = torch.rand(5, 3, 4, dtype=torch.float64) * 1.5
    kw = dict(v_reset=v_reset, detach_reset=detach_reset, surrogate_function=_Gauss(1.0))
    s_node, m_node = make(cls, **kw), make(cls, step_mode="m", **kw)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_s = torch.stack([s_node(xs[t]) for t in range(5)])
    out_m = m_node(xm)
    assert torch.equal(out_s, out_m)
    g = torch.randn_like(out_s)
    out_s.backward(g)
    out_m.backward(g)
    torch.testing.assert_close(xs.grad, xm.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="SpikingJelly not installed")
@pytest.mark.parametrize("kind", ["if", "lif"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_non_spiking_surrogate_in_both_step_modes_matches_spikingjelly(kind, v_reset):
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate

    kw = dict(v_reset=v_reset, step_mode="m")
    if kind == "if":
        theirs = sj_neuron.IFNode(surrogate_function=sj_surrogate.Sigmoid(spiking=False), **kw)
        ours = [neuron.IFNode(surrogate_function=surrogate.Sigmoid(spiking=False), **kw) for _ in range(2)]
    else:
        theirs = sj_neuron.LIFNode(tau=2.0, surrogate_function=sj_surrogate.Sigmoid(spiking=False), **kw)
        ours = [neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid(spiking=False), **kw) for _ in range(2)]
    ours[1].step_mode = "s"
    x = torch.rand(6, 3, 5, dtype=torch.float64) * 1.5
    xm, xs, xj = (x.clone().requires_grad_() for _ in range(3))
    out_m, out_s, out_j = ours[0](xm), torch.stack([ours[1](xs[t]) for t in range(6)]), theirs(xj)
    assert torch.equal(out_m, out_s)
    torch.testing.assert_close(out_m, out_j, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out_m)
    for out in (out_m, out_s, out_j):
        out.backward(g)
    torch.testing.assert_close(xm.grad, xs.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(xm.grad, xj.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cls", [neuron.IFNode, neuron.LIFNode])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_integer_and_bool_inputs_are_promoted_to_float(cls, dtype, step_mode):
    x_float = (torch.rand(6, 2, 5) < 0.5).float()
    x = x_float.to(dtype)

    def run(inp, v=None):
        node = make(cls, v_threshold=0.8, step_mode=step_mode)
        if v is not None:
            node.v = v
        out = node(inp) if step_mode == "m" else torch.stack([node(inp[t]) for t in range(6)])
        return out, node.v

    out, v = run(x)
    expected, v_expected = run(x_float)
    assert out.dtype == v.dtype == torch.get_default_dtype()
    assert torch.equal(out, expected) and torch.equal(v, v_expected) and out.sum() > 0
    out64, v64 = run(x, torch.zeros(2, 5, dtype=torch.float64))  # the dtype of a tensor state wins
    expected64, _ = run(x_float.double(), torch.zeros(2, 5, dtype=torch.float64))
    assert out64.dtype == v64.dtype == torch.float64 and torch.equal(out64, expected64)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="SpikingJelly not installed")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_input_matches_spikingjelly(dtype):
    from spikingjelly.activation_based import neuron as sj_neuron

    x = (torch.rand(6, 2, 5) < 0.5).to(dtype)
    ours, theirs = neuron.LIFNode(v_threshold=0.6, step_mode="m"), sj_neuron.LIFNode(v_threshold=0.6, step_mode="m")
    assert torch.equal(ours(x), theirs(x))


def test_v_seq_is_none_before_the_first_forward_and_after_reset():
    # As in SpikingJelly 2.0.0's BaseNode: v_seq starts as None, reset() clears it, detach() detaches it.
    node = neuron.IFNode(step_mode="m", store_v_seq=True)
    assert node.v_seq is None
    x = torch.rand(3, 2, 4, requires_grad=True)
    node(x)
    assert node.v_seq.shape == (3, 2, 4) and node.v_seq.grad_fn is not None
    functional.detach_net(node)
    assert node.v_seq.grad_fn is None
    functional.reset_net(node)
    assert node.v_seq is None and node.v == 0.0


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="SpikingJelly not installed")
def test_lif_positional_arguments_follow_spikingjelly_order():
    from spikingjelly.activation_based import neuron as sj_neuron

    sg = surrogate.ATan()
    args = (3.0, False, 0.5, None, sg, True, "m")
    ours, theirs = neuron.LIFNode(*args, "torch", True), sj_neuron.LIFNode(*args, True)
    for name in ("tau", "decay_input", "v_threshold", "v_reset", "detach_reset", "step_mode", "store_v_seq"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.surrogate_function is sg and ours.backend == "torch"


def test_numpy_scalar_hyper_parameters_are_accepted():
    np = pytest.importorskip("numpy")
    x = torch.rand(4, 2, 3) * 2
    ours = neuron.LIFNode(tau=np.float32(3.0), v_threshold=np.float32(0.5), v_reset=np.int64(0),
                          surrogate_function=surrogate.Sigmoid(np.float32(2.0)), step_mode="m")
    plain = neuron.LIFNode(tau=3.0, v_threshold=0.5, v_reset=0.0, surrogate_function=surrogate.Sigmoid(2.0),
                           step_mode="m")
    assert torch.equal(ours(x), plain(x)) and type(ours.tau) is float and ours.surrogate_function.alpha == 2.0
    with pytest.raises(ValueError, match="v_threshold must be a finite number"):
        neuron.IFNode(v_threshold=np.float32("nan"))


@pytest.mark.parametrize("node", [neuron.IFNode, neuron.LIFNode])
def test_multistep_neuron_double_backward_raises(node):
    n = node(step_mode="m")
    x = (torch.rand(4, 3, 5, dtype=torch.float64) * 2).requires_grad_()
    out = n(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((out * torch.randn_like(out)).sum(), x, create_graph=True)


@pytest.mark.parametrize("chunks", [0, 3])  # 0: a GCContainer, else a TCGCContainer of that many chunks
def test_v_seq_inside_gc_warns_and_the_recompute_leaves_it_alone(chunks):
    from snnkit.memopt import GCContainer, TCGCContainer

    node = neuron.LIFNode(step_mode="m", store_v_seq=True)
    seg = TCGCContainer(None, node, n_chunk=chunks) if chunks else GCContainer(None, node)
    x = torch.rand(6, 2, 3, requires_grad=True) * 2
    with pytest.warns(UserWarning, match="v_seq is recorded without a gradient"):
        out = seg(x)
    after_forward = node.v_seq.clone()
    assert after_forward.shape[0] == (6 // chunks if chunks else 6)  # a TCGCContainer keeps its last chunk
    out.sum().backward()
    assert torch.equal(node.v_seq, after_forward)  # not the recompute's (first) chunk


def test_an_empty_sequence_with_store_v_seq_leaves_the_state():
    n = neuron.LIFNode(step_mode="m", store_v_seq=True)
    n(torch.ones(2, 2, 3))
    v = n.v
    out = n(torch.zeros(0, 2, 3))
    assert out.shape == (0, 2, 3) and n.v_seq.shape == (0, 2, 3) and n.v is v


def test_an_empty_sequence_keeps_the_graph():
    x = torch.zeros(0, 2, 3, requires_grad=True)
    out = neuron.IFNode(step_mode="m")(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 2, 3)
