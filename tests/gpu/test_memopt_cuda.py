"""memopt on CUDA: the tracker against the caching allocator, and a planned net's gradients.

The allocator rounds every block up to 512 bytes and keeps cuBLAS/cuDNN
workspaces; tensors here are multiples of 512 bytes and every net is stepped once
before it is measured, so the tracker's peak must match
``torch.cuda.max_memory_allocated`` closely.
"""
import copy

import pytest
import torch
import torch.nn as nn

from snnkit import functional, layer, neuron
from snnkit.memopt import MemoryTracker, memory_optimization

pytestmark = pytest.mark.cuda
MiB = 2**20


def _allocator_peak(fn, net=None):
    """Peak allocated above the start while ``fn`` runs; ``net``'s old gradients and state are freed first."""
    if net is not None:
        functional.reset_net(net)
        net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_tracker_hand_computed_on_cuda():
    def work():
        a = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        b = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        del a
        c = torch.empty(3 * MiB, dtype=torch.uint8, device="cuda")
        return b, c

    with MemoryTracker() as mt:
        out = work()
    assert mt.peak_bytes == 5 * MiB and mt.current_bytes == 5 * MiB
    del out
    assert _allocator_peak(work) == 5 * MiB


def _mlp(backend):
    torch.manual_seed(0)
    mods = []
    for _ in range(3):
        mods += [layer.Linear(512, 512, step_mode="m"), neuron.LIFNode(step_mode="m", backend=backend)]
    return nn.Sequential(*mods).cuda()


def _step(net, x):
    functional.reset_net(net)
    net.zero_grad(set_to_none=True)
    net(x).sum().backward()


@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_tracker_matches_allocator_on_a_training_step(backend):
    net, x = _mlp(backend), torch.rand(8, 64, 512, device="cuda")
    _step(net, x)  # warm: gradients allocated once, workspaces created
    with MemoryTracker() as mt:
        _step(net, x)
    alloc = _allocator_peak(lambda: _step(net, x), net)
    print(f"{backend}: tracker {mt.peak_bytes / MiB:.2f} MiB, allocator {alloc / MiB:.2f} MiB")
    assert 0.95 * alloc <= mt.peak_bytes <= 1.05 * alloc


class Block(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.conv = layer.Conv2d(ci, co, 3, padding=1, bias=False, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m", backend="cupy", detach_reset=True)

    def forward(self, x):
        return self.sn(self.conv(x))

    def __spatial_split__(self):
        return self.conv, self.sn


def test_planned_net_on_cuda_keeps_gradients_and_lowers_the_allocator_peak():
    torch.manual_seed(0)
    plain = nn.Sequential(Block(2, 32), Block(32, 64), Block(64, 64), Block(64, 64)).cuda()
    x = (torch.rand(8, 4, 2, 32, 32, device="cuda") < 0.3).float()
    planned = memory_optimization(copy.deepcopy(plain), (Block,), x, temporal=False)
    grads = []
    for net in (plain, planned):
        _step(net, x)
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    peaks = [_allocator_peak(lambda n=n: _step(n, x), n) for n in (plain, planned)]
    print(f"allocator peak plain {peaks[0] / MiB:.1f} MiB, planned {peaks[1] / MiB:.1f} MiB")
    assert peaks[1] < peaks[0]
