"""No leaks: 200 training steps of GC nets on CPU keep live tensor bytes flat.

Live bytes come from :class:`snnkit.memopt.MemoryTracker` (every storage created
during the steps, watched by a weak reference), read after each step with no
``gc.collect()`` in between, so a reference cycle holding a graph or a state would show
up as a saw-tooth. Independently, the tensors Python's garbage collector can reach are
counted after the warm-up and at the end.
"""
import gc
import warnings
import weakref

import pytest
import torch

from snnkit import functional, memopt, neuron

from ._nets import data, make_net, run_seq

pytestmark = pytest.mark.slow

STEPS, WARMUP = 200, 3


def _tensor_count():
    gc.collect()  # only here: garbage of earlier tests must not count
    with warnings.catch_warnings():  # isinstance() on deprecated torch module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _step(net, opt, x, t, step_mode):
    opt.zero_grad(set_to_none=False)
    ((run_seq(net, x, step_mode).mean(0) - t) ** 2).mean().backward()
    opt.step()
    functional.reset_net(net)


@pytest.mark.parametrize("kind,step_mode,T", [("gc", "m", 4), ("tc", "m", 4), ("gc", "s", 2)])
def test_live_bytes_flat_over_200_steps(kind, step_mode, T):
    net = make_net(kind, step_mode=step_mode, width=32, n_chunk=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    bit = memopt.BitSpikeCompressor()  # a round trip builds its one-time unpacking table outside the count
    bit.decompress(bit.compress(torch.ones(8)), (8,))
    live, counts = [], {}
    with memopt.MemoryTracker() as mt:
        for i in range(STEPS):
            x, t = data(seed=i, T=T, N=8)  # fresh data every step
            _step(net, opt, x, t, step_mode)
            live.append(mt.current_bytes)
            if i in (WARMUP, STEPS - 1):
                counts[i] = _tensor_count()
    steady = live[WARMUP:]
    growth_per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    assert max(steady) == min(steady), f"live bytes vary after warm-up: {min(steady)}..{max(steady)} ({growth_per_step:+.1f} B/step)"
    # No growth (earlier tests' leftovers, e.g. compile caches, may still go away meanwhile).
    assert counts[STEPS - 1] <= counts[WARMUP], f"tensor objects: {counts}"
    # What stays alive: parameters' grads and Adam's two moments, plus the last batch.
    n_param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert steady[0] <= 3 * n_param_bytes + T * 8 * (6 + 4) * 4 + 1024


@pytest.mark.parametrize("kind", ["plain", "gc", "tc"])
def test_reset_net_releases_states(kind):
    """After backward and reset_net, no neuron state tensor of the step is alive."""
    net = make_net(kind, n_chunk=2)
    x, t = data()
    y = net(x)
    refs = [weakref.ref(m.v) for m in net.modules() if isinstance(m, neuron.BaseNode)]
    assert refs and all(r() is not None for r in refs)
    ((y.mean(0) - t) ** 2).mean().backward()
    del y
    functional.reset_net(net)
    assert all(m.v == 0.0 for m in net.modules() if isinstance(m, neuron.BaseNode) and m.v_reset is not None)
    assert [r() for r in refs] == [None] * len(refs)  # freed by reference counting, no gc.collect needed
