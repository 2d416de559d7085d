"""Bytes saved for backward: GC + BitSpikeCompressor keeps at most 1/8 of the plain net's."""
import torch
import torch.nn as nn

from snnkit import layer, neuron
from snnkit.memopt import BitSpikeCompressor, GCContainer
from snnkit.memopt.tracker import _SavedBytes

T, N, WIDTH, LAYERS = 8, 16, 256, 4


def _saved_bytes(net, x):
    """Sum of the bytes of every storage saved for backward during the forward, each once.

    Parameters are left out: they are alive anyway, and a GC segment does not save them.
    """
    with _SavedBytes({p.untyped_storage().data_ptr() for p in net.parameters()}) as saved:
        out = net(x)
    return saved.nbytes, out


def _mlp(gc):
    blocks = []
    for _ in range(LAYERS):
        mods = [layer.Linear(WIDTH, WIDTH, step_mode="m"), neuron.LIFNode(v_threshold=0.3, step_mode="m")]
        blocks.append(GCContainer(BitSpikeCompressor(), *mods) if gc else nn.Sequential(*mods))
    return nn.Sequential(*blocks)


def test_gc_with_bit_compression_saves_at_most_one_eighth():
    x = (torch.rand(T, N, WIDTH) < 0.3).float()
    torch.manual_seed(0)
    plain = _mlp(gc=False)
    torch.manual_seed(0)
    gc = _mlp(gc=True)
    plain_bytes, out_plain = _saved_bytes(plain, x)
    gc_bytes, out_gc = _saved_bytes(gc, x)
    assert torch.equal(out_plain, out_gc)
    # plain: per layer the Linear input and the neuron's h_seq, T*N*WIDTH float32 each
    seq = T * N * WIDTH * 4
    assert plain_bytes == LAYERS * 2 * seq
    # GC: per layer the packed input (seq / 32) and a validity flag
    assert gc_bytes * 8 <= plain_bytes, (gc_bytes, plain_bytes)
    assert gc_bytes <= LAYERS * (seq // 32 + 64)
