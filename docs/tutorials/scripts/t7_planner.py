"""Tutorial 7: automatic planning with memory_optimization."""
# %% a network and its blocks
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from snnkit import functional, layer, neuron
from snnkit.memopt import MemoryTracker, memory_optimization


class Block(nn.Sequential):
    """Conv-BN-LIF; the planner may wrap it, split it in space or leave it plain."""

    def __init__(self, c_in, c_out):
        super().__init__(layer.Conv2d(c_in, c_out, 3, padding=1, bias=False, step_mode="m"),
                         layer.BatchNorm2d(c_out, step_mode="m"), neuron.LIFNode(step_mode="m"))


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(Block(2, 32), Block(32, 32), layer.MaxPool2d(2, step_mode="m"),
                         Block(32, 64), Block(64, 64), layer.MaxPool2d(2, step_mode="m"),
                         layer.Flatten(step_mode="m"), layer.Linear(64 * 4 * 4, 10, step_mode="m"))


x_seq = torch.rand(4, 8, 2, 16, 16)
target = torch.randint(0, 10, (8,))
# %% plan
net, summary = memory_optimization(make_net(), Block, x_seq, return_summary=True, temporal=False)
print(summary)
# %% check
def step(net):
    with MemoryTracker() as tracker:
        loss = F.cross_entropy(net(x_seq).mean(0), target)
        loss.backward()
    functional.reset_net(net)
    return loss.item(), tracker.peak_bytes


loss_plain, peak_plain = step(make_net())
loss_auto, peak_auto = step(net)
assert abs(loss_plain - loss_auto) < 1e-5  # the same training step
assert peak_auto < peak_plain
print(f"peak: plain {peak_plain / 2**20:.2f} MiB, planned {peak_auto / 2**20:.2f} MiB "
      f"({peak_plain / peak_auto:.2f}x less)")
# %% checkpoints
checkpoint = net.state_dict()  # the plain net's keys, whatever the plan (torch.save it as usual)
plain = make_net()
plain.load_state_dict(checkpoint)  # e.g. for inference without the planner
replanned = memory_optimization(make_net(), Block, x_seq, level=1)  # another plan: a segment per block
replanned.load_state_dict(checkpoint)  # to resume training
assert list(plain.state_dict()) == list(net.state_dict()) == list(replanned.state_dict())
# %% plot
fig, ax = plt.subplots()
ax.bar(["plain", "planned"], [peak_plain / 2**20, peak_auto / 2**20], color=["gray", "tab:green"])
ax.set(ylabel="MiB", title="peak of one training step (CPU, measured)")
fig.tight_layout()
