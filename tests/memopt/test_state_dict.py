"""state_dict / load_state_dict of nets changed by apply_gc and memory_optimization use the original keys."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from snnkit import functional, layer, neuron
from snnkit.memopt import GCContainer, NullSpikeCompressor, apply_gc, memory_optimization, unwrap_gc
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
            if not torch.is_tensor(t):  # extra state
                continue
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
    net = memory_optimization(net, ConvNoBN, _conv_chain()[1], budget=50)  # not cut short by a busy machine
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


class _Nest(nn.Sequential):
    """A block whose module paths ``X`` and ``0.X`` (wrapped) carry the same parameter names."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 3))


def test_ambiguous_and_mixed_dicts():
    torch.manual_seed(0)
    net = apply_gc(nn.Sequential(_Nest()), _Nest, compress=None)
    # "0.0.1.*" is the plain key of the second inner Linear and the wrapped key of the last Linear:
    # a partial dict of such keys is read as the plain net's (its keys are the canonical ones)
    part = {"0.0.1.weight": torch.full((3, 3), 7.0), "0.0.1.bias": torch.full((3,), 7.0)}
    result = net.load_state_dict(part, strict=False)
    inner, last = net[0][0][0][1], net[0][0][1]
    assert torch.equal(inner.weight, part["0.0.1.weight"]) and not torch.equal(last.weight, part["0.0.1.weight"])
    assert result.missing_keys == ["0.0.0.weight", "0.0.0.bias", "0.1.weight", "0.1.bias"]
    # a dict of wrapped keys loads as it is, also with an extra key
    wrapped = {k: torch.full_like(v, i) for i, (k, v) in enumerate(net[0].state_dict(prefix="0.").items())}
    assert "0.0.0.1.weight" in wrapped
    result = net.load_state_dict({**wrapped, "0.0.0.0.extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["0.0.0.0.extra"]
    assert all(torch.equal(t, wrapped[k]) for k, t in net[0].state_dict(prefix="0.", keep_vars=True).items())
    # keys only the plain net has, with keys only the wrapped net has: an error, nothing guessed
    with pytest.raises(RuntimeError, match="mixes keys of the unwrapped net"):
        net.load_state_dict({"0.1.weight": torch.zeros(3, 3), "0.0.0.0.weight": torch.zeros(3, 3)}, strict=False)


class _Scale(nn.Module):
    """Stored log(scale) in version 1, scale in version 2: older checkpoints are converted on load."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale

    def _load_from_state_dict(self, state_dict, prefix, metadata, *args):
        if metadata.get("version", 1) < 2:
            state_dict[prefix + "scale"] = state_dict[prefix + "scale"].exp()
        super()._load_from_state_dict(state_dict, prefix, metadata, *args)


class _Scaled(nn.Sequential):
    pass


class _OwnState(nn.Module):
    """A block with state its parts do not hold: a buffer, extra state, and an alias of a submodule."""

    def __init__(self, i, o):
        super().__init__()
        self.conv = layer.SeqToANNContainer(nn.Conv2d(i, o, 3, padding=1))
        self.sn = neuron.LIFNode(step_mode="m", v_threshold=0.5)
        self.first = self.conv[0]
        self.register_buffer("seen", torch.zeros(()))
        self.tag = 0

    def forward(self, x):
        return self.sn(self.conv(x))

    def __spatial_split__(self):
        return self.conv, self.sn

    def get_extra_state(self):
        return {"tag": self.tag}

    def set_extra_state(self, state):
        self.tag = state["tag"]


def test_versions_own_state_and_aliases_survive():
    torch.manual_seed(0)
    scaled = lambda: nn.Sequential(Block(3, 3), _Scaled(nn.Linear(3, 3), _Scale()))
    src = scaled()
    with torch.no_grad():
        src[1][1].scale.fill_(2.0)
    for net in (apply_gc(scaled(), _Scaled, compress=None), scaled()):  # the version is looked up as saved
        net.load_state_dict(src.state_dict())
        assert torch.equal(net.state_dict()["1.1.scale"], torch.full((3,), 2.0))
    # a block's own buffer and extra state, and an alias, when the block runs as its parts in a segment
    make = lambda: nn.Sequential(*[_OwnState(2 if i == 0 else 8, 8) for i in range(4)])
    net = memory_optimization(make(), _OwnState, (torch.rand(8, 4, 2, 12, 12) > 0.5).float(), budget=50)
    assert isinstance(net[1], _wrapping._Merged)
    plain = make()
    assert list(net.state_dict()) == list(plain.state_dict())
    assert "1.first.weight" in plain.state_dict() and "1._extra_state" in plain.state_dict()
    for block in plain:
        block.tag, block.seen = 5, torch.ones(())
    net.load_state_dict(_randomize(plain).state_dict())
    got, want = net.state_dict(), plain.state_dict()
    assert [got[f"{k}._extra_state"] for k in range(4)] == [{"tag": 5}] * 4
    assert all(torch.equal(got[k], want[k]) for k in want if torch.is_tensor(want[k]))


def test_load_errors_name_the_original_keys_and_put_the_containers_back():
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    structure = [type(m) for m in net]
    saved = copy.deepcopy(net).state_dict()
    saved["0.conv.0.weight"] = torch.zeros(1)
    saved["1.conv.9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as error:
        net.load_state_dict(saved)
    assert '"1.conv.9.weight"' in str(error.value) and "size mismatch for 0.conv.0.weight" in str(error.value)
    assert [type(m) for m in net] == structure


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = layer.Linear(3, 3, step_mode="m")

    def forward(self, x):
        return self.lin(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Inner(), layer.Linear(3, 3, step_mode="m")

    def forward(self, x):
        return self.b(self.a(x))


def test_containers_inside_containers():
    # apply_gc for the inner blocks, then for blocks that hold them: keys kept, and unwrap_gc undoes both
    torch.manual_seed(0)
    make = lambda: nn.Sequential(_Outer(), layer.Linear(3, 2, step_mode="m"))
    net = apply_gc(apply_gc(make(), _Inner, compress=None), _Outer, compress=None)
    assert isinstance(net[0][0].a, GCContainer)
    want = _randomize(make()).state_dict()
    net.load_state_dict(want)
    assert list(net.state_dict()) == list(want) and all(torch.equal(net.state_dict()[k], want[k]) for k in want)
    unwrap_gc(net)
    assert type(net[0]) is _Outer and type(net[0].a) is _Inner
    assert not any(m._state_dict_hooks for m in net.modules())


class _Reversed(nn.Module):
    """Registers its output layer first, so its parts run in another order than its parameters are listed."""

    def __init__(self, d):
        super().__init__()
        self.post, self.pre = layer.Linear(d, d, step_mode="m"), layer.Linear(d, d, step_mode="m")
        self.sn = neuron.IFNode(step_mode="m", v_threshold=0.5)

    def forward(self, x):
        return self.post(self.sn(self.pre(x)))

    def __spatial_split__(self):
        return self.pre, self.sn, self.post


def test_a_changed_parameter_order_is_warned_about():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(*[_Reversed(64) for _ in range(4)])
    x = (torch.rand(16, 8, 64) > 0.5).float()
    with pytest.warns(UserWarning, match="lists its parameters in another order"):
        net = memory_optimization(make(), _Reversed, x, budget=50)
    assert list(net.state_dict()) == list(make().state_dict())  # the checkpoint keys stay the plain net's


class _Failing(nn.Linear):
    def _load_from_state_dict(self, *args):
        raise KeyError("a module's own loading code failed")


def test_a_load_that_raises_leaves_the_segments_in_place_by_the_next_forward():
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    net.append(_Failing(3, 3))  # after the head: the sites' parent is still loading its children
    structure = [type(m) for m in net]
    with pytest.raises(KeyError):
        net.load_state_dict(net.state_dict())
    assert [type(m) for m in net][0] is ConvBlock  # the original blocks stood there when it raised
    failed = copy.deepcopy(net)
    net(torch.rand(T, N, 2, 6, 6))
    assert [type(m) for m in net] == structure
    unwrap_gc(failed)  # unwrap_gc (and apply_gc, memory_optimization) first put the containers back
    assert all(not _wrapping._is_ours(m) for m in failed.modules())
    assert not any(m._state_dict_hooks for m in failed.modules())


def test_modules_replaced_inside_segments_are_saved_loaded_and_unwrapped():
    # e.g. convert_sync_batchnorm or an adapter, after planning: the original blocks follow
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    old = {}
    for holder in [m for m in net.modules()]:
        for name, child in list(holder.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                new = nn.BatchNorm2d(child.num_features)
                old[id(new)] = child
                setattr(holder, name, _randomize(new))
    assert len(old) == 4
    running = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(id(m) in old for m in running)  # only the new ones run
    saved = net.state_dict()
    assert all(torch.equal(saved[f"{k}.conv.1.weight"], running[k].weight) for k in range(4))
    plain = _randomize(_vgg((4, 6, 6, 6)))
    net.load_state_dict(plain.state_dict())
    assert all(torch.equal(plain[k].conv[1].running_mean, running[k].running_mean) for k in range(4))
    unwrap_gc(net)
    assert [net[k].conv[1] for k in range(4)] == running


def test_user_state_dict_hooks_see_the_original_keys():
    seen = []
    net = nn.Sequential(Block(3, 3))
    net._register_state_dict_hook(lambda module, state_dict, prefix, metadata: seen.append(list(state_dict)))
    apply_gc(net, Block, compress=None)
    want = list(nn.Sequential(Block(3, 3)).state_dict())
    assert list(net.state_dict()) == want and seen == [want]


def test_a_failed_load_heals_when_the_blocks_are_called_one_by_one():
    # a parent iterated by its own parent's forward (a ModuleList) is not called: the blocks heal it
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([*(ConvBlock(2 if i == 0 else 4, 4) for i in range(3)), _Failing(3, 3)])

        def forward(self, x):
            for block in self.blocks:  # the list itself, as the swap changes it
                x = x if isinstance(block, _Failing) else block(x)
            return x

    torch.manual_seed(0)
    plain = Loop().double()
    for block in plain.blocks[:3]:
        block.sn.v_threshold = 0.05  # spikes in every block: a block left out shows in the output
    net = apply_gc(copy.deepcopy(plain), ConvBlock, compress="bit")
    with pytest.raises(KeyError):
        net.load_state_dict(net.state_dict())
    assert type(net.blocks[0]) is ConvBlock
    net.eval()  # while the original blocks stand at the sites
    plain.eval()
    x = 4 * torch.rand(T, N, 2, 6, 6, dtype=torch.float64)
    assert torch.equal(net(x), plain(x))
    blocks = net.blocks[:3]
    assert all(isinstance(b, GCContainer) and not b.training for b in blocks)
    assert not any(_wrapping._original_block(b)._forward_hooks for b in blocks)
    unwrap_gc(net)
    assert all(type(b) is ConvBlock and not b.training for b in net.blocks[:3])
    # blocks 0-1 in one segment: the first forward runs every block (none skipped for a placeholder)
    functional.reset_net(plain)
    net = copy.deepcopy(plain).train()
    sites = [_planner._Block(s) for s in _wrapping._find_blocks(net, ConvBlock)]
    _planner._put_groups(sites, [(0, 2, None), (2, 3, "plain")], None)
    _keys._sync_keys(net)
    with pytest.raises(KeyError):
        net.load_state_dict(net.state_dict())
    net.eval()
    with torch.no_grad():
        out, want = net(x), plain(x)
        assert want.count_nonzero() > 0 and torch.equal(out, want)
        assert isinstance(net.blocks[1], _wrapping._Merged) and torch.equal(net(x), plain(x))


def test_a_replacement_the_blocks_cannot_follow_is_an_error():
    torch.manual_seed(0)
    net = _grouped(_vgg((4, 6, 6, 6)))
    net[0][1] = nn.Identity()  # a per-module container of block 0 (its BatchNorm), replaced whole
    with pytest.raises(RuntimeError, match="replaced by Identity; the original block cannot take"):
        net.state_dict()


def test_keep_vars_gives_the_tensors_themselves():
    # also where the segments hold no tensor of their own: a block whose only state is its own buffer
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))
            self.sn = neuron.IFNode(step_mode="m")

        def forward(self, x):
            return self.sn(x)

        def __spatial_split__(self):
            return self.sn, nn.Identity()

    net = nn.Sequential(Counter(), Counter())
    blocks = [_planner._Block(s) for s in _wrapping._find_blocks(net, Counter)]
    _planner._put_groups(blocks, [(0, 2, 2)], None)
    _keys._sync_keys(net)
    kept = net.state_dict(keep_vars=True)
    assert kept["0.seen"] is net[0].__dict__["_block"].seen
    assert net.state_dict()["0.seen"] is not kept["0.seen"]  # detached without keep_vars, as torch does


def test_blocks_follow_dtype_and_mode_of_their_segments():
    # a block's own buffer and the split containers are outside the segment's tree: they follow it anyway
    make = lambda: nn.Sequential(*[_OwnState(2 if i == 0 else 8, 8) for i in range(4)])
    net = memory_optimization(make(), _OwnState, (torch.rand(8, 4, 2, 12, 12) > 0.5).float(), budget=50)
    assert isinstance(net[1], _wrapping._Merged)
    net.double().eval()
    assert all(v.dtype == torch.float64 for v in net.state_dict().values() if torch.is_tensor(v) and v.is_floating_point())
    unwrap_gc(net)
    assert all(not m.training for m in net.modules())
    assert all(t.dtype == torch.float64 for t in (*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())))
    net.train()
    x = (torch.rand(8, 4, 2, 12, 12) > 0.5).double()
    assert net(x).dtype == torch.float64
