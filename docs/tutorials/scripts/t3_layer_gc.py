"""Tutorial 3: memopt per layer (GCContainer, compressors, apply_gc) and the memory it saves."""
# %% a network
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from snnkit import functional, layer, neuron
from snnkit.memopt import (BitSpikeCompressor, BooleanSpikeCompressor, GCContainer, MemoryTracker,
                           NullSpikeCompressor, SparseSpikeCompressor, apply_gc)


class Block(nn.Sequential):
    """Conv-BN-LIF: the unit that becomes one GC segment."""

    def __init__(self, c_in, c_out):
        super().__init__(layer.Conv2d(c_in, c_out, 3, padding=1, bias=False, step_mode="m"),
                         layer.BatchNorm2d(c_out, step_mode="m"), neuron.LIFNode(step_mode="m"))


torch.manual_seed(0)
plain = nn.Sequential(Block(2, 32), *[Block(32, 32) for _ in range(3)],
                      layer.Flatten(step_mode="m"), layer.Linear(32 * 16 * 16, 10, step_mode="m"))
x_seq = torch.rand(4, 8, 2, 16, 16)  # [T, N, C, H, W]
target = torch.randint(0, 10, (8,))
# %% one GC segment by hand
segment = GCContainer(BitSpikeCompressor(), layer.Linear(4, 3, step_mode="m"), neuron.LIFNode(step_mode="m"))
spikes_in = (torch.rand(6, 2, 4) > 0.5).float()  # binary: 1 bit per element is exact
segment(spikes_in).sum().backward()  # forward without a graph; the recompute runs in backward
assert segment[0].weight.grad is not None
# %% compressors
s = (torch.rand(4, 8, 32, 16, 16) < 0.1).float()  # 10% firing rate, float32: 1 MiB
sizes = {}
for comp in [NullSpikeCompressor(), BooleanSpikeCompressor(), BitSpikeCompressor(), SparseSpikeCompressor()]:
    c = comp.compress(s)
    assert torch.equal(comp.decompress(c, s.shape), s)  # lossless
    sizes[type(comp).__name__] = c.nbytes
    print(f"{type(comp).__name__:<24}{c.nbytes / 2**10:>9.0f} KiB")
# %% measure a training step
def step(net):
    loss = F.cross_entropy(net(x_seq).mean(0), target)
    loss.backward()
    functional.reset_net(net)
    return loss.item()


peaks, losses = {}, {}
for name, compress in [("plain", "off"), ("GC, no compression", None), ("GC, auto compress", "auto")]:
    net = copy.deepcopy(plain)
    if compress != "off":
        net = apply_gc(net, Block, compress=compress, dummy_input=x_seq)
    with MemoryTracker() as tracker:
        losses[name] = step(net)
    peaks[name] = tracker.peak_bytes
    print(f"{name:<22} peak {tracker.peak_bytes / 2**20:6.2f} MiB")
assert len(set(round(v, 5) for v in losses.values())) == 1  # the same loss in every mode
assert peaks["GC, auto compress"] < peaks["GC, no compression"] < peaks["plain"]
print(net[1])  # a block wrapped by apply_gc: GCContainer(x_compressor=BitSpikeCompressor(), ...)
# %% plot
fig, (ax1, ax2) = plt.subplots(1, 2)
ax1.bar(range(len(peaks)), [v / 2**20 for v in peaks.values()], color=["gray", "tab:blue", "tab:green"])
ax1.set_xticks(range(len(peaks)), [k.replace(", ", "\n").replace(" comp", "\ncomp") for k in peaks], fontsize=8)
ax1.set(ylabel="MiB", title="peak of one training step")
ax2.bar(range(len(sizes)), [v / 2**10 for v in sizes.values()], color="tab:purple")
ax2.set_xticks(range(len(sizes)), [k.replace("SpikeCompressor", "") for k in sizes], fontsize=8)
ax2.set(ylabel="KiB", title="stored input, 10% spikes")
fig.tight_layout()
