"""Two threads training two separate GC nets at once: both match a sequential run.

``in_gc_1st_forward`` is thread-local: one thread sitting inside the first forward
of a GC segment must not make another thread's BatchNorm skip (or repeat) its
running-statistics update.
"""
import copy
import threading

import torch
import torch.nn as nn

from snnkit import functional, layer, memopt, neuron
from snnkit.memopt import in_gc_1st_forward

from ._nets import data

STEPS, T, N = 8, 4, 6


class _Gate(nn.Module):
    """Identity that, in the first forward of its GC segment, pauses until released."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.armed = False

    def forward(self, x):
        if self.armed and in_gc_1st_forward():
            self.armed = False
            self.entered.set()
            if not self.release.wait(timeout=30):
                raise TimeoutError("gate was never released")
        return x


def _bn_net(memopt, seed, gate=None):
    torch.manual_seed(seed)
    blocks = [
        [layer.Linear(6, 12, step_mode="m"), layer.BatchNorm1d(12, step_mode="m"), neuron.LIFNode(step_mode="m")],
        [layer.Linear(12, 12, step_mode="m"), layer.BatchNorm1d(12, step_mode="m"), neuron.IFNode(step_mode="m")],
    ]
    if gate is not None:
        blocks[0].insert(0, gate)
    return nn.Sequential(
        memopt.GCContainer(memopt.NullSpikeCompressor(), *blocks[0]),
        memopt.TCGCContainer(memopt.BitSpikeCompressor(), *blocks[1], n_chunk=2),
        layer.Linear(12, 3, step_mode="m"),
    )


def _train(net, seed, steps=STEPS):
    x, t = data(seed=seed, T=T, N=N, d_out=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x).mean(0) - t) ** 2).mean().backward()
        opt.step()
        functional.reset_net(net)
    return net


def _snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_two_threads_train_two_gc_nets_like_sequential_runs():
    nets = [_bn_net(memopt, seed) for seed in (1, 2)]
    refs = [_snapshot(_train(copy.deepcopy(n), seed)) for n, seed in zip(nets, (1, 2))]
    errors = []

    def work(net, seed):
        try:
            _train(net, seed)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n, s)) for n, s in zip(nets, (1, 2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    for net, ref in zip(nets, refs):
        _assert_same(_snapshot(net), ref)
        assert int(net[0][1].num_batches_tracked) == STEPS  # BatchNorm updated once per step


def test_first_forward_flag_does_not_leak_into_another_thread():
    """Thread A is held inside its first forward while thread B trains a full step."""
    gate = _Gate()
    net_a, net_b = _bn_net(memopt, 1, gate), _bn_net(memopt, 2)
    ref_b = _snapshot(_train(copy.deepcopy(net_b), 2, steps=1))
    gate.armed = True
    errors = []

    def run_a():
        try:
            _train(net_a, 1, steps=1)
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=run_a)
    th.start()
    try:
        assert gate.entered.wait(timeout=30)
        assert not in_gc_1st_forward()  # A's flag is set in A's thread only
        _train(net_b, 2, steps=1)
    finally:
        gate.release.set()
        th.join(timeout=60)
    assert not errors, errors
    _assert_same(_snapshot(net_b), ref_b)
    assert int(net_b[0][1].num_batches_tracked) == 1
    assert int(net_a[0][2].num_batches_tracked) == 1
