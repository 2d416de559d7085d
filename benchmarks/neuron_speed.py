"""Multi-step LIF forward+backward speed: snnkit torch backend vs SpikingJelly 2.0.0.

Run: ``python benchmarks/neuron_speed.py [--threads 2]``. SpikingJelly is optional
(``pip install --no-deps spikingjelly==2.0.0 loguru``); without it only snnkit is timed.
Prints milliseconds per forward+backward and the ratio SpikingJelly / snnkit.
"""
import argparse
import time

import torch

from snnkit import neuron

SHAPES = [(8, 32, 4096), (32, 16, 4096)]


def time_fwd_bwd(nodes, x, grad, repeat):
    """Median ms of forward+backward per node; the nodes take turns, so load hits all alike."""

    def once(node):
        node.reset()
        x.grad = None
        t0 = time.perf_counter()
        node(x).backward(grad)
        return time.perf_counter() - t0

    for _ in range(10):  # warm up allocator and thread pool
        for node in nodes:
            once(node)
    times = [[] for _ in nodes]
    for _ in range(repeat):
        for i, node in enumerate(nodes):
            times[i].append(once(node))
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


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
        if theirs is None:
            (t_ours,) = time_fwd_bwd([ours], x, grad, args.repeat)
            print(f"{'x'.join(map(str, shape)):>16} {t_ours:9.2f} {'(absent)':>13} {'-':>9}")
            continue
        t_ours, t_theirs = time_fwd_bwd([ours, theirs], x, grad, args.repeat)
        print(f"{'x'.join(map(str, shape)):>16} {t_ours:9.2f} {t_theirs:13.2f} {t_theirs / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
