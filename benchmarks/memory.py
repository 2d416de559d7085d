"""Memory of one training step of a small spiking VGG: no GC vs checkpointing variants.

Blocks ``32,p64,128,p128,128,p128`` (``p``: MaxPool before the block), each
Conv3x3-BN-LIF, multi-step, input ``[T=8, N=4, 2, 48, 48]`` binary events.
Variants, side by side in one run:

* no GC (snnkit layers and neurons);
* ``torch.utils.checkpoint`` (non-reentrant) per block, state reloaded in the recompute;
* SpikingJelly's memopt per block with its bit compressor (if SpikingJelly is
  installed; its ratios are against its own no-GC run of the same weights);
* snnkit ``GCContainer`` + ``BitSpikeCompressor`` per block.

Columns: peak live tensor bytes of the step (:class:`snnkit.memopt.MemoryTracker`),
bytes still alive after the forward (what the graph and the state retain),
their ratio to no GC, the step-time ratio to no GC (median of the per-round
ratios over ``--repeat`` rounds, interquartile range in brackets, without the
tracker; see ``_timing.py``), the best step time, and whether all gradients
equal the no-GC run. Below the table, the recompute floor: the no-GC step plus
its forward without a graph (timed in the same rounds), over the no-GC step. A
checkpointed step recomputes every block once, so no such method can be faster;
what a method adds above the floor is its own cost (compression, bookkeeping).

On CUDA (``--device cuda``) a second peak column gives the step's
``torch.cuda.max_memory_allocated`` above what was allocated before it, the
allocator's own view, against which the tracker is validated.

Run: ``python benchmarks/memory.py [--repeat 3] [--threads 2] [--device cuda [--backend cupy]] [--batch 4]``.
"""
import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from snnkit import base, layer, neuron
from snnkit.memopt import BitSpikeCompressor, GCContainer, MemoryTracker
from snnkit.memopt.tracker import _SavedBytes

from _common import cuda_step_peak, reset
from _timing import paired_ratio, round_robin

CFG = ["32", "p64", "128", "p128", "128", "p128"]
T, N, C, H = 8, 4, 2, 48
MiB = 2**20


def snnkit_blocks(backend="torch"):
    blocks, ci = [], C
    for item in CFG:
        mods = []
        if item.startswith("p"):
            mods.append(layer.MaxPool2d(2, 2, step_mode="m"))
        co = int(item.lstrip("p"))
        mods += [
            layer.Conv2d(ci, co, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(co, step_mode="m"),
            neuron.LIFNode(tau=2.0, step_mode="m", backend=backend),
        ]
        blocks.append(nn.Sequential(*mods))
        ci = co
    return blocks


def head(ci):
    side = H // 2 ** sum(item.startswith("p") for item in CFG)
    return nn.Sequential(layer.Flatten(step_mode="m"), layer.Linear(ci * side * side, 10, step_mode="m"))


class VGG(nn.Module):
    def __init__(self, blocks, classifier):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.classifier = classifier

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.classifier(x)


class TorchCheckpoint(nn.Module):
    """``torch.utils.checkpoint`` around a stateful block: the recompute reloads the start state."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        start = base.extract_memories(self.block)

        def run(x):
            base.load_memories(self.block, start)
            return self.block(x)

        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


def build_variants(backend="torch"):
    torch.manual_seed(0)
    blocks, classifier = snnkit_blocks(backend), head(int(CFG[-1].lstrip("p")))
    plain = VGG(blocks, classifier)
    variants = {
        "no GC": (plain, None),
        "torch.utils.checkpoint": (VGG([TorchCheckpoint(b) for b in copy.deepcopy(blocks)], copy.deepcopy(classifier)), "no GC"),
        "snnkit GC + bit": (
            VGG([GCContainer(BitSpikeCompressor(), *copy.deepcopy(list(b))) for b in blocks], copy.deepcopy(classifier)),
            "no GC",
        ),
    }
    try:
        variants.update(spikingjelly_variants(plain))
    except ImportError:
        print("SpikingJelly not installed: its rows are skipped")
    return variants


def spikingjelly_variants(plain):
    from spikingjelly.activation_based import layer as sj_layer
    from spikingjelly.activation_based import memopt as sj_memopt
    from spikingjelly.activation_based import neuron as sj_neuron

    blocks = []
    for block in plain.blocks:
        mods = []
        for m in block:
            if isinstance(m, layer.MaxPool2d):
                mods.append(sj_layer.MaxPool2d(2, 2, step_mode="m"))
            elif isinstance(m, layer.Conv2d):
                c = sj_layer.Conv2d(m.in_channels, m.out_channels, 3, padding=1, bias=False, step_mode="m")
                c.weight.data.copy_(m.weight.data)
                mods.append(c)
            elif isinstance(m, layer.BatchNorm2d):
                mods.append(sj_layer.BatchNorm2d(m.num_features, step_mode="m"))
            else:
                mods.append(sj_neuron.LIFNode(tau=2.0, step_mode="m"))
        blocks.append(nn.Sequential(*mods))
    sj_plain = VGG(blocks, copy.deepcopy(plain.classifier))
    sj_gc = VGG(
        [sj_memopt.checkpoint_module(copy.deepcopy(b), compressor=sj_memopt.BitSpikeCompressor()) for b in blocks],
        copy.deepcopy(plain.classifier),
    )
    return {"SpikingJelly no GC": (sj_plain, None), "SpikingJelly memopt + bit": (sj_gc, "SpikingJelly no GC")}


def saved_bytes_ratio():
    """Bytes saved for backward by a 4-layer spiking MLP (T=8, N=16, width 256): GC + bit / plain."""
    x = (torch.rand(8, 16, 256, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    totals = []
    for gc in (False, True):
        blocks = []
        for _ in range(4):
            mods = [layer.Linear(256, 256, step_mode="m"), neuron.LIFNode(v_threshold=0.3, step_mode="m")]
            blocks.append(GCContainer(BitSpikeCompressor(), *mods) if gc else nn.Sequential(*mods))
        net = nn.Sequential(*blocks)
        # parameters left out: alive anyway, and a GC segment does not save them
        with _SavedBytes({p.untyped_storage().data_ptr() for p in net.parameters()}) as saved:
            net(x)
        totals.append(saved.nbytes)
    return totals


def step(net, x, y, tracker=None):
    net.zero_grad(set_to_none=True)
    out = net(x)
    retained = tracker.current_bytes if tracker is not None else 0
    F.cross_entropy(out.mean(0), y).backward()
    del out
    reset(net)
    if x.is_cuda:
        torch.cuda.synchronize()
    return retained


def forward_only(net, x):
    """The plain net's forward without a graph: what a full recompute of every block adds to a step."""
    with torch.no_grad():
        net(x)
    reset(net)
    if x.is_cuda:
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="torch", help="snnkit neuron backend: torch, or cupy (CUDA)")
    parser.add_argument("--batch", type=int, default=N, help=f"batch size N (default {N})")
    opts = parser.parse_args()
    dev = torch.device(opts.device)
    if dev.type == "cuda":  # deterministic convolutions, so that "exact" means bit-identical gradients
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if opts.threads:
        torch.set_num_threads(opts.threads)
    gen = torch.Generator().manual_seed(1)
    n = opts.batch
    x = (torch.rand(T, n, C, H, H, generator=gen) < 0.15).float()  # Poisson-like events
    y = torch.randint(0, 10, (n,), generator=gen)
    x, y = x.to(dev), y.to(dev)
    variants = build_variants(opts.backend)
    rows, grads, alloc = {}, {}, {}
    for name, (net, ref) in variants.items():
        net.to(dev).train()
        step(net, x, y)  # warm-up
        with MemoryTracker() as mt:
            retained = step(net, x, y, mt)
        grads[name] = [p.grad.clone() for p in net.parameters()]
        rows[name] = (mt.peak_bytes, retained)
        if dev.type == "cuda":
            alloc[name] = cuda_step_peak(net, lambda: step(net, x, y))
    # Timing without the tracker: rounds over all variants, the ratio to the baseline per round
    # (see benchmarks/_timing.py: robust to the load of a shared machine).
    names = list(variants)
    steps = [lambda net=variants[n][0]: step(net, x, y) for n in names]
    runs = round_robin(steps + [lambda: forward_only(variants["no GC"][0], x)], opts.repeat)
    times = dict(zip(names, runs))
    floor = paired_ratio([b + f for b, f in zip(times["no GC"], runs[-1])], times["no GC"])
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"spiking VGG {','.join(CFG)}, input [T={T}, N={n}, {C}, {H}, {H}], {where}, torch {torch.__version__}, snnkit backend {opts.backend}")
    cuda_col = f" {'cuda peak MiB':>14s}" if alloc else ""
    print(f"{'variant':28s} {'peak MiB':>9s}{cuda_col} {'after fwd MiB':>14s} {'peak ratio':>11s} {'time ratio (IQR)':>20s} {'step s':>7s}  grads equal")
    for name, (net, ref) in variants.items():
        peak, retained = rows[name]
        base_name = ref or name
        ratio = rows[base_name][0] / peak
        slow, lo, hi = paired_ratio(times[name], times[base_name])
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads[name], grads[base_name]))
        exact = all(torch.equal(a, b) for a, b in zip(grads[name], grads[base_name]))
        cuda_val = f" {alloc[name] / MiB:14.1f}" if alloc else ""
        print(
            f"{name:28s} {peak / MiB:9.1f}{cuda_val} {retained / MiB:14.2f} {ratio:10.2f}x {slow:6.2f}x ({lo:.2f}-{hi:.2f}) {min(times[name]):7.3f}  "
            f"{'exact' if exact else 'close' if same else 'NO'}"
        )
    print(
        f"recompute floor: no-GC step + its forward without a graph = {floor[0]:.2f}x ({floor[1]:.2f}-{floor[2]:.2f}); "
        "a method that recomputes every block once cannot go below it"
    )
    plain_saved, gc_saved = saved_bytes_ratio()
    print(
        f"saved for backward, 4-layer spiking MLP (T=8, N=16, width 256): plain {plain_saved / MiB:.2f} MiB, "
        f"snnkit GC + bit {gc_saved / MiB:.4f} MiB, ratio 1/{plain_saved / gc_saved:.0f} (target <= 1/8)"
    )


if __name__ == "__main__":
    main()
