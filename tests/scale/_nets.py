"""Small spiking nets shared by the scale tests: a plain net and its GC / TC-GC twins.

Every builder draws the weights from the same seed in the same order, so the plain,
``gc`` and ``tc`` variants of one seed hold identical parameters and must compute the
same outputs and gradients.
"""
import torch
import torch.nn as nn

from snnkit import functional, layer, memopt, neuron

KINDS = ("plain", "gc", "tc", "closure")


def _blocks(seed, d_in, width, depth, step_mode):
    torch.manual_seed(seed)
    blocks, d = [], d_in
    for i in range(depth):
        node = (
            neuron.LIFNode(tau=2.0, step_mode=step_mode)
            if i % 2 == 0
            else neuron.IFNode(v_reset=None, step_mode=step_mode)  # soft reset
        )
        blocks.append([layer.Linear(d, width, step_mode=step_mode), node])
        d = width
    return blocks, d


def make_net(kind="plain", seed=0, d_in=6, width=16, d_out=4, depth=2, step_mode="m", n_chunk=2, compressor=None):
    """``[Linear -> LIF/IF] * depth -> Linear``; ``kind`` wraps each block in a GC segment.

    The first block sees real-valued input (``NullSpikeCompressor``), the others see
    spikes (``compressor``, default ``BitSpikeCompressor``).
    """
    blocks, d = _blocks(seed, d_in, width, depth, step_mode)
    head = layer.Linear(d, d_out, step_mode=step_mode)
    if kind == "plain":
        return nn.Sequential(*[m for b in blocks for m in b], head)
    if kind == "closure":  # GC through a plain function: the reentrant ``autograd.backward`` fallback
        blocks[0][0] = ClosureGC(blocks[0][0])
        return nn.Sequential(*[m for b in blocks for m in b], head)
    mods = []
    for i, b in enumerate(blocks):
        comp = memopt.NullSpikeCompressor() if i == 0 else (compressor or memopt.BitSpikeCompressor())
        if kind == "gc":
            mods.append(memopt.GCContainer(comp, *b))
        elif kind == "tc":
            mods.append(memopt.TCGCContainer(comp, *b, n_chunk=n_chunk))
        else:
            raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    return nn.Sequential(*mods, head)


class ClosureGC(nn.Module):
    """A stateless module checkpointed through a closure (not a module or bound method)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return memopt.input_compressed_gc(lambda x_: self.inner(x_) * 1.0, memopt.NullSpikeCompressor(), x)


def run_seq(net, x_seq, step_mode="m"):
    """Net output for ``x_seq`` ``[T, N, d_in]``: one multi-step call or ``T`` single-step calls."""
    if step_mode == "m":
        return net(x_seq)
    return torch.stack([net(x) for x in x_seq])


def loss_fn(y_seq, target):
    """Mean over time, then MSE with mean reduction over the batch."""
    return ((y_seq.mean(0) - target) ** 2).mean()


def train_step(net, opt, x_seq, target, step_mode="m"):
    """One SGD step; returns the loss and the gradients (clones) in parameter order."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(run_seq(net, x_seq, step_mode), target)
    loss.backward()
    grads = [p.grad.detach().clone() for p in net.parameters()]
    opt.step()
    functional.reset_net(net)
    return loss.detach(), grads


def data(seed=1, T=4, N=8, d_in=6, d_out=4, dtype=torch.float32):
    """Inputs scaled so that the neurons spike (about a third of the time)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, N, d_in, generator=g, dtype=dtype) * 3.0
    t = torch.rand(N, d_out, generator=g, dtype=dtype)
    return x, t


class StepLoop(nn.Module):
    """Run a single-step net over ``[T, N, *]`` inside one forward call.

    DDP needs one forward per backward: a single-step net goes under DDP wrapped in
    this loop, not called ``T`` times through the DDP wrapper.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_seq):
        return torch.stack([self.net(x) for x in x_seq])
