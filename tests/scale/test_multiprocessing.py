"""GC containers in other processes: a DataLoader worker, and a pickle sent to a child.

Both use the ``fork`` start method (no re-import of torch, so the file stays fast);
the DDP tests cover ``spawn``. The child's results travel back through a pipe and are
compared with the same computation in the parent.
"""
import multiprocessing
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from snnkit import functional, memopt

from ._nets import data, make_net

fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")


def _grads(net, seed):
    """Forward and backward of ``net`` on the batch of ``seed``; outputs and gradients."""
    x, t = data(seed=seed)
    for p in net.parameters():
        p.grad = None
    y = net(x)
    ((y.mean(0) - t) ** 2).mean().backward()
    functional.reset_net(net)
    return y.detach(), [p.grad for p in net.parameters()]


class _GradDataset(Dataset):
    """Each item is a GC forward/backward computed inside the worker."""

    def __init__(self, net):
        self.net = net

    def __len__(self):
        return 3

    def __getitem__(self, i):
        torch.set_num_threads(1)
        return _grads(self.net, seed=i)


@fork
@pytest.mark.parametrize("kind", ["gc", "tc"])
def test_gc_container_in_dataloader_worker(kind):
    net = make_net(kind)
    loader = DataLoader(_GradDataset(net), batch_size=None, num_workers=1, multiprocessing_context="fork")
    got = list(loader)
    for i, (y, g) in enumerate(got):
        y_ref, g_ref = _grads(net, seed=i)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _child(blob, conn):
    torch.set_num_threads(1)
    net = pickle.loads(blob)
    try:
        result = (repr(net), _grads(net, seed=5))
    except Exception as e:  # reported by the parent
        result = f"{type(e).__name__}: {e}"
    conn.send_bytes(pickle.dumps(result))  # plain pickle: tensors by value, not shared memory
    conn.close()


@fork
def test_pickled_gc_net_trains_in_a_child_process():
    net = make_net("tc", compressor=memopt.SparseSpikeCompressor())
    _grads(net, seed=0)  # used once: state reset, grads present
    blob = pickle.dumps(net)
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(blob, child))
    proc.start()
    assert parent.poll(60), "child did not answer within 60 s"
    result = pickle.loads(parent.recv_bytes())
    proc.join(10)
    assert not isinstance(result, str), result
    text, (y, g) = result
    assert text == repr(net) and "TCGCContainer" in text and "SparseSpikeCompressor" in text
    y_ref, g_ref = _grads(pickle.loads(blob), seed=5)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
