"""Automatic memory planning: no GC vs apply_gc vs memory_optimization vs SpikingJelly's planner.

Run: ``python benchmarks/planner.py [--threads 2] [--nets vgg6,vgg8,sew] [--device cuda] [--batch 4]``.

For each net, one training step (forward, sum loss, backward) is measured with
:class:`snnkit.memopt.MemoryTracker` (peak live tensor bytes, CPU included) and
timed (median over ``--rounds`` rounds of the per-round ratio to no GC, see
``_timing.py``). Rows: the plain net; ``apply_gc`` (every
block a GC segment, compressors chosen by probing); ``memory_optimization``
(level 4); SpikingJelly 2.0.0's ``optimize_memory`` on the same architecture
built from SpikingJelly modules (its levels 2-4 profile on CUDA, so on CPU
only level 1 runs; on CUDA level 4 with the blocks' spatial splits and
temporal chunking allowed). Columns: peak MiB, ratio to no GC, step-time ratio to no
GC, planning seconds (best of ``--repeat`` plans) and planning time in plain steps.
On CUDA a column adds the step's ``torch.cuda.max_memory_allocated`` above
what was allocated before it, to validate the tracker against the allocator.
"""
import argparse
import copy
import time

import torch
import torch.nn as nn

from snnkit import functional, layer, neuron
from snnkit.memopt import MemoryTracker, apply_gc, memory_optimization

from _common import cuda_step_peak, reset
from _timing import paired_ratio, round_robin

T, N = 8, 4


# ----------------------------------------------------------------------------- nets (snnkit or SpikingJelly modules)


def _libs(lib):
    if lib == "snnkit":
        return layer, neuron
    from spikingjelly.activation_based import layer as sj_layer, neuron as sj_neuron

    return sj_layer, sj_neuron


class ConvBlock(nn.Module):
    """[MaxPool] -> Conv3x3 -> BN -> LIF, multi-step; spatially splittable into (pool+conv+bn, neuron)."""

    def __init__(self, lib, c_in, c_out, pool):
        super().__init__()
        L, Nr = _libs(lib)
        mods = ([L.MaxPool2d(2)] if pool else []) + [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), L.BatchNorm2d(c_out)]
        self.conv = L.SeqToANNContainer(*mods)
        self.sn = Nr.LIFNode(tau=2.0, step_mode="m", detach_reset=True)

    def forward(self, x):
        return self.sn(self.conv(x))

    def __spatial_split__(self):
        return self.conv, self.sn


class SEWBlock(nn.Module):
    """SEW residual block: out = sn(bn(conv(sn(bn(conv(x)))))) + x."""

    def __init__(self, lib, c):
        super().__init__()
        self.a = ConvBlock(lib, c, c, False)
        self.b = ConvBlock(lib, c, c, False)

    def forward(self, x):
        return self.b(self.a(x)) + x


class Net(nn.Module):
    def __init__(self, blocks, c_last, spatial):
        super().__init__()
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_last * spatial * spatial, 10)

    def forward(self, x):
        y = self.features(x)
        return self.head(y.flatten(2)).mean(0)


def vgg(lib, spec):
    blocks, c = [], 2
    for s in spec.split(","):
        pool, c_out = s.startswith("p"), int(s.lstrip("p"))
        blocks.append(ConvBlock(lib, c, c_out, pool))
        c = c_out
    pools = spec.count("p")
    return Net(blocks, c, 48 >> pools)


def sew(lib):
    blocks = [ConvBlock(lib, 2, 32, False), SEWBlock(lib, 32), ConvBlock(lib, 32, 64, True), SEWBlock(lib, 64),
              ConvBlock(lib, 64, 128, True), SEWBlock(lib, 128)]
    return Net(blocks, 128, 12)


NETS = {
    "vgg6": ("6-block VGG 32,p64,128,p128,128,p128", lambda lib: vgg(lib, "32,p64,128,p128,128,p128"), (ConvBlock,)),
    "vgg8": ("8-block VGG 64,p128,256,p256,512,p512,512,p512",
             lambda lib: vgg(lib, "64,p128,256,p256,512,p512,512,p512"), (ConvBlock,)),
    "sew": ("SEW-ResNet (3 stages, residual adds)", sew, (ConvBlock, SEWBlock)),
}


# ----------------------------------------------------------------------------- measuring


def step(net, x):
    reset(net)
    for p in net.parameters():
        p.grad = None
    net(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def peak_of(net, x):
    """(tracker peak, CUDA allocator peak above the start or None) of one step."""
    step(net, x)  # warm up
    with MemoryTracker() as tracker:
        step(net, x)
    return tracker.peak_bytes, (cuda_step_peak(net, lambda: step(net, x)) if x.is_cuda else None)


def _sj_split(m):
    """Parts for SpikingJelly's spatial split: the blocks' own split, a SEW block's halves, else the children."""
    if hasattr(m, "__spatial_split__"):
        return m.__spatial_split__()
    return (m.a, m.b) if isinstance(m, SEWBlock) else tuple(m.children())


def sj_planner(make, x, level, repeat):
    """SpikingJelly's ``optimize_memory`` on the same architecture: (net, best plan time).

    Its blocks are the ``ConvBlock``s, SEW's included: given ``SEWBlock`` as well (as
    snnkit is), it wraps the residual blocks whole and peaks higher (137.4 MiB on SEW
    at level 1 on CPU, against 110.9 MiB).
    """
    try:
        from spikingjelly.activation_based.memopt import optimize_memory
    except Exception as e:  # optional peer
        return None, f"absent ({type(e).__name__})"
    extra = {} if level == 1 else dict(split_fn=_sj_split, can_chunk=lambda m: True)
    best = float("inf")
    for _ in range(repeat):  # best of --repeat plans, each of a fresh net, as for snnkit
        net = make("spikingjelly").to(x.device)
        t0 = time.perf_counter()
        try:
            optimize_memory(net, (ConvBlock,), lambda m: m(x), level=level, **extra)
        except Exception as e:
            return None, f"failed: {type(e).__name__}: {str(e)[:80]}"
        best = min(best, time.perf_counter() - t0)
    note = f"level {level}" + (" (levels 2-4 need CUDA)" if level == 1 and not x.is_cuda else "")
    return (net, best), note


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="plans per net (the best time is reported)")
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds over all variants")
    parser.add_argument("--nets", default="vgg6,vgg8,sew")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=N, help=f"batch size N (default {N})")
    parser.add_argument("--sj-level", type=int, default=None, help="SpikingJelly planner level (default: 4 on CUDA, else 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sj_level = args.sj_level or (4 if dev.type == "cuda" else 1)
    mib = 2.0**20
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"one training step, [T={T}, N={args.batch}, 2, 48, 48] Poisson event counts, float32, {where}, torch {torch.__version__}")
    for key in args.nets.split(","):
        title, make, types = NETS[key]
        torch.manual_seed(0)
        x = torch.poisson(torch.full((T, args.batch, 2, 48, 48), 0.3)).to(dev)
        plain = make("snnkit").to(dev)
        functional.reset_net(plain)
        gc_net = apply_gc(copy.deepcopy(plain), types, dummy_input=x)
        step(plain, x)  # warm up before timing the planner
        functional.reset_net(plain)  # no state with a graph in the copies
        tp = float("inf")
        for _ in range(args.repeat):  # best of --repeat plans, each of a fresh copy, as the step times
            planned = copy.deepcopy(plain)
            t_plan = time.perf_counter()
            planned, summary = memory_optimization(planned, types, x, return_summary=True)
            tp = min(tp, time.perf_counter() - t_plan)
        variants = [("no GC", plain, None, ""), ("apply_gc", gc_net, None, ""), ("memory_optimization", planned, tp, "")]
        sj, note = sj_planner(make, x, sj_level, args.repeat)
        if sj is not None:
            sj_net, sj_time = sj
            variants.append(("SpikingJelly optimize_memory", sj_net, sj_time, note))
        times = round_robin([lambda net=v[1]: step(net, x) for v in variants], args.rounds)
        t0 = min(times[0])
        ratios = [paired_ratio(t, times[0])[0] for t in times]
        rows = [(name, *peak_of(net, x), r, plan, nt) for (name, net, plan, nt), r in zip(variants, ratios)]
        peak0 = rows[0][1]
        if sj is None:
            rows.append(("SpikingJelly optimize_memory", None, None, None, None, note))
        cuda = dev.type == "cuda"
        print(f"\n{title}")
        print(f"{'variant':<30} {'peak MiB':>9}{' cuda MiB' if cuda else ''} {'x less':>7} {'step x':>7} {'plan s':>7} "
              f"{'plan/steps':>10}  note")
        for name, peak, alloc, t, plan, note in rows:
            if peak is None:
                print(f"{name:<30} {'-':>9}{'        -' if cuda else ''} {'-':>7} {'-':>7} {'-':>7} {'-':>10}  {note}")
                continue
            plan_s = f"{plan:7.3f}" if plan is not None else f"{'-':>7}"
            plan_r = f"{plan / t0:10.2f}" if plan is not None else f"{'-':>10}"
            alloc_s = f" {alloc / mib:8.1f}" if cuda else ""
            print(f"{name:<30} {peak / mib:9.1f}{alloc_s} {peak0 / peak:7.2f} {t:7.2f} {plan_s} {plan_r}  {note}")
        print(summary)


if __name__ == "__main__":
    main()
