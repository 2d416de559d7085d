"""Tutorial 4: long sequences with TCGCContainer (state carried across time chunks)."""
# %% plain reference
import copy

import torch
import torch.nn as nn

from snnkit import functional, layer, neuron
from snnkit.memopt import BitSpikeCompressor, MemoryTracker, TCGCContainer

torch.manual_seed(0)
T = 128
body = nn.Sequential(layer.Linear(64, 256, step_mode="m"), neuron.LIFNode(step_mode="m"),
                     layer.Linear(256, 256, step_mode="m"), neuron.LIFNode(step_mode="m"))
x_seq = (torch.rand(T, 8, 64) < 0.2).float()  # a long spike train [T, N, 64]


def run(net):
    """One training step; returns the output, the gradients, the final state and the peak memory."""
    with MemoryTracker() as tracker:
        out = net(x_seq)
        out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    v_last = net[-1].v  # a TCGCContainer is a Sequential too: net[-1] is the last LIF
    functional.reset_net(net)
    return out, grads, v_last, tracker.peak_bytes


out_ref, grads_ref, v_ref, peak_ref = run(copy.deepcopy(body))
# %% chunked
peaks = {1: None, 4: None, 16: None}
for n_chunk in peaks:
    tc = TCGCContainer(BitSpikeCompressor(), *copy.deepcopy(body), n_chunk=n_chunk)
    out, grads, v_last, peaks[n_chunk] = run(tc)
    # chunk k starts from the state chunk k-1 ended with: outputs and states are the plain ones,
    # gradients equal them to float rounding (parameter gradients are summed chunk by chunk)
    assert torch.equal(out, out_ref)
    assert torch.equal(v_last, v_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    print(f"n_chunk={n_chunk:>2}: peak {peaks[n_chunk] / 2**20:6.2f} MiB (plain {peak_ref / 2**20:.2f} MiB)")
# one chunk recomputes the whole sequence at once: it peaks above plain when the segment is the whole net
assert peaks[16] < peaks[4] < peak_ref
