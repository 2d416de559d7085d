"""Tutorial 5: a stateful module of your own that works inside a GC segment."""
# %% the module
import copy

import torch
import torch.nn as nn

from snnkit import functional, layer, neuron
from snnkit.base import MemoryModule
from snnkit.memopt import GCContainer, NullSpikeCompressor, in_gc_1st_forward


class SynapticTrace(MemoryModule):
    """Low-pass filter of its input, ``trace[t] = decay * trace[t-1] + x[t]``, plus a call counter.

    The contract that makes it GC-safe:

    1. every state variable is declared with ``register_memory`` (GC passes it in and out),
    2. state is replaced, never modified in place (``self.trace = ...``, not ``+=``),
    3. side effects that must happen once per training step are skipped while
       ``in_gc_1st_forward()`` is True; the recompute in backward does them.
    """

    def __init__(self, decay: float = 0.8, step_mode: str = "s"):
        super().__init__(step_mode)
        self.decay = decay
        self.register_memory("trace", 0.0)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def single_step(self, x):
        self.trace = self.decay * self.trace + x  # a new tensor: snapshots stay valid
        return self.trace

    def forward(self, x):
        if self.training and not in_gc_1st_forward():
            self.steps_seen = self.steps_seen + (x.shape[0] if self.step_mode == "m" else 1)
        if self.step_mode == "s":
            return self.single_step(x)
        return torch.stack([self.single_step(x_t) for x_t in x])
# %% plain versus GC
torch.manual_seed(0)
plain = nn.Sequential(layer.Linear(8, 16, step_mode="m"), SynapticTrace(step_mode="m"),
                      neuron.LIFNode(step_mode="m"))
gc = GCContainer(NullSpikeCompressor(), *copy.deepcopy(plain))
x_seq = torch.rand(10, 4, 8)

results = []
for net in (plain, gc):
    out = net(x_seq)
    out.sum().backward()
    results.append((out, net[0].weight.grad.clone(), net[1].trace, int(net[1].steps_seen)))
    functional.reset_net(net)

(out_p, grad_p, trace_p, seen_p), (out_g, grad_g, trace_g, seen_g) = results
assert torch.equal(out_p, out_g)
torch.testing.assert_close(grad_g, grad_p)
assert torch.equal(trace_g, trace_p)  # the state after backward is the state after forward
assert seen_p == seen_g == 10  # the counter moved once, not twice
print(f"steps counted: plain {seen_p}, GC {seen_g}")
# %% state across segment calls
gc_s = GCContainer(None, layer.Linear(8, 16), SynapticTrace(), neuron.LIFNode())  # step_mode "s"
plain_s = nn.Sequential(*copy.deepcopy(list(gc_s)))
for net in (plain_s, gc_s):
    total = sum(net(x_t).sum() for x_t in x_seq)  # T calls; the state links them
    total.backward()
    functional.reset_net(net)
torch.testing.assert_close(gc_s[0].weight.grad, plain_s[0].weight.grad)
