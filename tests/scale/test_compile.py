"""``torch.compile`` on spiking nets: the torch backend traces; GC segments run eagerly.

The backend is ``"aot_eager"``: it traces forward and backward like inductor does but
runs the traced graphs with eager kernels, so no C++ compiler is needed and the tests
stay fast. What is pinned:

* a plain net with the torch backend compiles to one graph with no graph break; its
  outputs equal eager bit for bit, its gradients to float32 rounding (the traced
  backward of the fused multistep function orders some sums differently);
* a net with ``GCContainer`` / ``TCGCContainer`` compiles too, but each segment is a
  graph break: the segment (a custom autograd function with a recompute in backward)
  runs eagerly, only the code around it is compiled, and results are bit for bit those
  of the eager GC net.
"""
import pytest
import torch

from ._nets import data, make_net

pytestmark = pytest.mark.slow

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _run(net, x):
    y = net(x)
    y.square().mean().backward()
    return y.detach(), [p.grad for p in net.parameters()]


def _compile_or_skip(net):
    """``(compiled net, counter)``; ``counter.frame_count`` counts the compiled graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    try:
        return torch.compile(net, backend=counter), counter
    except RuntimeError as e:  # e.g. a Python version torch.compile does not support
        pytest.skip(f"torch.compile is unavailable: {e}")


def _compiled_and_eager(kind, grad_rtol, grad_atol):
    """Compile a ``kind`` net, compare outputs (exact) and gradients with an eager twin; returns the counter."""
    x, _ = data(T=4, N=8)
    net, ref = make_net(kind), make_net(kind)
    compiled, counter = _compile_or_skip(net)
    y, g = _run(compiled, x)
    y_ref, g_ref = _run(ref, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)
    return counter


def test_compile_plain_net_one_graph_matches_eager():
    counter = _compiled_and_eager("plain", 1e-5, 1e-6)
    assert counter.frame_count == 1  # one graph, no break


def test_compile_gc_net_breaks_at_segments_and_stays_exact():
    """(``TCGCContainer`` behaves the same, with a break per chunk; not run here to save time.)"""
    counter = _compiled_and_eager("gc", 0, 0)
    assert counter.frame_count >= 2  # the graphs between the segments: each segment is a break
