"""MemoryTracker against hand-computed byte counts."""
import threading

import pytest
import torch

from snnkit.memopt import MemoryTracker

F32 = 4


def test_toy_forward_hand_counted():
    x = torch.ones(1000)
    with MemoryTracker() as mt:
        a = x * 2  # 4000
        b = a + 1  # 8000 alive
        del a  # 4000
        c = b.view(10, 100)  # view: +0
        d = b.sum()  # +4 -> 4004
        b.add_(1)  # in place: +0
        del b, c
    assert mt.peak_bytes == 8000
    assert mt.retained_bytes == 4 and mt.current_bytes == 4  # d
    assert mt.allocated_bytes == 8004 and mt.num_allocations == 3
    assert d.item() == 3000


def test_views_and_storage_counted_once():
    with MemoryTracker() as mt:
        a = torch.zeros(10, 10)
        parts = a.chunk(5)  # views of one storage
        t = a.t().contiguous()  # a copy
        del a
    assert mt.peak_bytes == 2 * 400 and mt.retained_bytes == 800
    del parts, t


def test_backward_is_seen():
    w = torch.randn(100, 50, requires_grad=True)
    x = torch.randn(20, 100)
    with MemoryTracker() as mt:
        y = (x @ w).relu()  # 20*50 floats, relu output 20*50
        del y
        loss = (x @ w).relu().sum()
        loss.backward()
        del loss
    # w.grad (100*50 floats) is created in backward and stays
    assert mt.retained_bytes == 100 * 50 * F32
    # Peak in the matmul's backward: w.grad (20000), the relu's input gradient (4000; the saved
    # relu output is already released), the loss (4) and its ones gradient (4).
    assert mt.peak_bytes == 100 * 50 * F32 + 20 * 50 * F32 + 4 + 4


def test_measure_and_reset_peak_and_nesting():
    def step(n):
        tmp = torch.empty(n, dtype=torch.float64)
        return tmp.sum()

    mt = MemoryTracker.measure(step, 1000)
    assert mt.peak_bytes == 8008 and mt.retained_bytes == 0
    with MemoryTracker() as outer:
        keep = torch.empty(100)
        with MemoryTracker() as inner:
            tmp = torch.empty(300)
            del tmp
        del keep
    assert inner.peak_bytes == 1200 and outer.peak_bytes == 1600 and outer.retained_bytes == 0


def test_baseline_counts_live_tensors_and_their_release():
    held = [torch.zeros(12345)]
    with MemoryTracker(baseline=True) as mt:
        assert mt.baseline_bytes >= 12345 * F32
        start = mt.current_bytes
        held.clear()  # frees a baseline tensor
        assert mt.current_bytes == start - 12345 * F32
    assert mt.peak_bytes == start


def test_other_threads_not_counted_and_no_callbacks_after_exit():
    box = []
    with MemoryTracker() as mt:
        th = threading.Thread(target=lambda: box.append(torch.zeros(1000)))
        th.start(), th.join()
        a = torch.zeros(10)
    assert mt.peak_bytes == 40
    del a  # freed after exit: the tracker's figures stay
    assert mt.current_bytes == 40 and mt.retained_bytes == 40
    with pytest.raises(RuntimeError, match="entered twice"):
        with mt:
            with mt:
                pass


def test_tensors_built_from_python_data_are_counted():
    with MemoryTracker() as mt:
        a = torch.tensor([1.0] * 1024)
        b = torch.as_tensor([2.0] * 1024)
    assert mt.peak_bytes == 2 * 4096 and mt.retained_bytes == 2 * 4096
    del a, b


def test_baseline_with_an_uninitialised_lazy_parameter_alive():
    lazy = torch.nn.LazyLinear(4)
    x = torch.ones(1024)
    with MemoryTracker(baseline=True) as mt:
        y = x * 2
    assert mt.baseline_bytes >= 4096 and mt.peak_bytes >= mt.baseline_bytes + 4096
    del lazy, y


def test_a_tensor_copied_from_an_array_is_counted_once():
    import numpy as np

    array = np.ones(1000, dtype=np.float32)
    with MemoryTracker() as mt:
        t = torch.tensor(array)  # a copy: 4000 bytes
        shared = torch.from_numpy(array)  # the array's memory: not a tensor allocation
    assert mt.allocated_bytes == 4000 and mt.num_allocations == 1
    del t, shared
