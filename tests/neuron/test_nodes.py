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
