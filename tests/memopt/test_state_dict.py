"""state_dict / load_state_dict of nets changed by apply_gc and memory_optimization use the original keys."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from snnkit.memopt import NullSpikeCompressor, apply_gc, memory_optimization, unwrap_gc
from snnkit.memopt import _keys, _planner, _wrapping

from .test_pipeline import Block, ConvBlock, ConvNoBN, Nested, T, N, _conv_chain, _vgg


def _shared():
    """One block at two sites of a Sequential (its parameters saved under both paths, as torch does)."""
    b = Block(4, 4)
    return nn.Sequential(Block(3, 4), b, b, Block(4, 2))


def _randomize(net):
    """New values in every parameter and buffer, so that a load is seen."""
    with torch.no_grad():
        for t in net.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t))
            else:
                t.add_(7)
    return net


def _grouped(net):
    """Blocks 0-1 one 4-chunk temporal segment, block 2 a segment without chunks, block 3 plain."""
    blocks = [_planner._Block(s) for s in _wrapping._find_blocks(net, ConvBlock)]
    _planner._put_groups(blocks, [(0, 2, 4), (2, 3, None), (3, 4, "plain")], "bit")
    _keys._sync_keys(net)
    return net


def _spatial(net):
    """Block 1 split into its parts, each a GC segment; the others wrapped by apply_gc."""
    block = net[1]
    parts = [_wrapping._wrap(p, NullSpikeCompressor()) for p in block.__spatial_split__()]
    net[1] = _wrapping._SpatialSplit(block, parts)
    return apply_gc(net, ConvBlock, compress="bit")


def _planned(net, **kw):
    x = (torch.rand(T, N, 2, 6, 6) > 0.5).float()
    return memory_optimization(net, ConvBlock, x, **kw)


def _chain():
    return _conv_chain()[0]


def _chain_planned(net):
    """Multi-block temporal segments (with placeholders at the merged blocks' sites)."""
    net = memory_optimization(net, ConvNoBN, _conv_chain()[1])
    assert isinstance(net[1], _wrapping._Merged)
    return net


CASES = {
    "apply_gc, nested and residual": (Nested, lambda net: apply_gc(net, Block, compress="bit")),
    "apply_gc, one block at two sites": (_shared, lambda net: apply_gc(net, Block, compress="bit")),
    "spatial split": (lambda: _vgg((4, 6, 6)), _spatial),
    "multi-block segments": (lambda: _vgg((4, 6, 6, 6)), _grouped),
    "memory_optimization": (_chain, _chain_planned),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_has_the_original_keys(case):
    make, change = CASES[case]
    torch.manual_seed(0)
    net = make()
    plain = copy.deepcopy(net)
    params = list(net.parameters())
    change(net)
    assert any(_wrapping._is_ours(m) for m in net.modules())
    got, want = net.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # per-module metadata (versions) under the original module paths; containers' own entries dropped
    assert set(got._metadata) <= set(want._metadata)
    assert all(got._metadata[k] == want._metadata[k] for k in got._metadata)
    # the parameters keep their order, so an optimizer's state_dict matches them too
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoints_load_across_plain_and_wrapped(case):
    make, change = CASES[case]
    torch.manual_seed(0)
    net = make()
    wrapped = change(copy.deepcopy(net))
    saved = _randomize(copy.deepcopy(net)).state_dict()
    # a plain checkpoint into the wrapped net, strictly
    assert not wrapped.load_state_dict(saved).missing_keys
    assert all(torch.equal(wrapped.state_dict()[k], saved[k]) for k in saved)
    # and a checkpoint of the wrapped net into a plain one
    fresh = make()
    fresh.load_state_dict(wrapped.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)


def test_a_checkpoint_loads_into_the_net_planned_otherwise():
    torch.manual_seed(0)
    a = _grouped(_vgg((4, 6, 6, 6)))
    b = _planned(_vgg((4, 6, 6, 6)), level=1)  # one segment per block
    _randomize(a)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())
    x = torch.rand(T, N, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(unwrap_gc(a)(x), unwrap_gc(b)(x))


def test_current_keys_load_too():
    # a dict keyed by the wrapped structure (as state_dict gave before keys were kept) still loads
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    values = _randomize(copy.deepcopy(net))
    current = dict(values.named_parameters())
    current.update(values.named_buffers())
    assert any(k.startswith("0.4.") for k in current)  # block 1's parts inside the segment at site 0
    assert not net.load_state_dict(current).missing_keys
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), values.state_dict().values()))


def test_load_errors_name_the_original_keys():
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    saved = copy.deepcopy(net).state_dict()
    saved.pop("1.conv.0.weight")  # block 1's convolution, inside the segment at site 0
    saved["1.conv.9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "1\.conv\.0\.weight"'):
        net.load_state_dict(saved)
    result = net.load_state_dict(saved, strict=False)
    assert result.missing_keys == ["1.conv.0.weight"] and result.unexpected_keys == ["1.conv.9.weight"]


def test_unwrap_removes_the_hooks_and_copies_keep_them():
    torch.manual_seed(0)
    net = _planned(_vgg((4, 6, 6, 6)))
    want = copy.deepcopy(unwrap_gc(copy.deepcopy(net))).state_dict()
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        got = other.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    unwrap_gc(net)
    hooks = [(m._state_dict_hooks, m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks) for m in net.modules()]
    assert not any(h for three in hooks for h in three)
    assert list(net.state_dict()) == list(want)


def test_nested_parents_rename_once():
    # sites below sites' parents at several depths (a ModuleList of Sequentials, residual bodies)
    torch.manual_seed(0)
    net = apply_gc(Nested(), Block, compress="bit")
    hooked = [name for name, m in net.named_modules() if m._state_dict_hooks]
    assert hooked == ["", "stages.0", "stages.0.1", "stages.1"]
    assert list(net.stages.state_dict()) == list(Nested().stages.state_dict())
