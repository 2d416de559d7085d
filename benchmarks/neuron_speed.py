"""Multi-step LIF forward+backward speed: snnkit torch backend vs SpikingJelly 2.0.0.

Run: ``python benchmarks/neuron_speed.py [--threads 2]``. SpikingJelly is optional
(``pip install --no-deps spikingjelly==2.0.0 loguru``); without it only snnkit is timed.
Prints the median milliseconds per forward+backward and the speed-up, the median of
the per-round ratios SpikingJelly / snnkit (see ``_timing.py``).
"""
import argparse
import functools
import statistics

import torch

from snnkit import neuron

from _timing import paired_ratio, round_robin

SHAPES = [(8, 32, 4096), (32, 16, 4096)]


def time_fwd_bwd(nodes, x, grad, repeat):
    """Per-round seconds of forward+backward of each node, in rounds over the nodes (``_timing.py``)."""

    def once(node):
        node.reset()
        x.grad = None
        node(x).backward(grad)

    return round_robin([functools.partial(once, node) for node in nodes], repeat)


def spikingjelly_node():
    try:
        from spikingjelly.activation_based import neuron as sj_neuron
    except Exception:  # absent or broken optional dependency
        return None
    return sj_neuron.LIFNode(tau=2.0, step_mode="m")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours = neuron.LIFNode(tau=2.0, step_mode="m")
    theirs = spikingjelly_node()
    print(f"LIFNode multi-step forward+backward, float32, {args.threads} threads (median ms)")
    print(f"{'shape':>16} {'snnkit':>9} {'SpikingJelly':>13} {'speed-up':>9}")
    for shape in SHAPES:
        torch.manual_seed(0)
        x = (torch.rand(shape) * 1.5).requires_grad_()
        grad = torch.randn(shape)
        times = time_fwd_bwd([ours] if theirs is None else [ours, theirs], x, grad, args.repeat)
        ms = [1e3 * statistics.median(t) for t in times]
        if theirs is None:
            print(f"{'x'.join(map(str, shape)):>16} {ms[0]:9.2f} {'(absent)':>13} {'-':>9}")
            continue
        speedup = paired_ratio(times[1], times[0])[0]
        print(f"{'x'.join(map(str, shape)):>16} {ms[0]:9.2f} {ms[1]:13.2f} {speedup:8.2f}x")


if __name__ == "__main__":
    main()
