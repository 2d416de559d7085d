import copy
import pickle

import pytest
import torch
import torch.nn as nn

from snnkit import base, neuron
from snnkit.base import MemoryModule


class Acc(MemoryModule):
    def __init__(self):
        super().__init__()
        self.register_memory("total", 0.0)
        self.register_memory("count", torch.zeros(()))

    def forward(self, x):
        self.total = self.total + x
        self.count = self.count + 1
        return self.total


def test_register_read_write_reset():
    m = Acc()
    assert m.total == 0.0
    m(torch.ones(3))
    assert torch.equal(m.total, torch.ones(3)) and m.count.item() == 1
    m.reset()
    assert m.total == 0.0 and m.count.item() == 0
    assert [name for name, _ in m.named_memories()] == ["total", "count"]


def test_register_twice_or_shadowing_raises():
    m = Acc()
    with pytest.raises(ValueError, match="already has an attribute"):
        m.register_memory("total", 1.0)
    with pytest.raises(ValueError, match="already has an attribute"):
        m.register_memory("forward", 1.0)


def test_snapshot_stays_valid_and_restores_identical_rerun():
    m = Acc()
    m(torch.tensor([1.0, 2.0]))
    snap = m.save_memories()
    first = m(torch.tensor([3.0, 4.0])).clone()
    assert torch.equal(snap["total"], torch.tensor([1.0, 2.0]))  # untouched by the step
    m.load_memories(snap)
    assert torch.equal(m(torch.tensor([3.0, 4.0])), first)


def test_load_snapshot_with_wrong_names_raises():
    with pytest.raises(ValueError, match="snapshot has memories"):
        Acc().load_memories({"total": 0.0})


def test_step_mode_validation():
    m = Acc()
    m.step_mode = "m"
    assert m.step_mode == "m"
    with pytest.raises(ValueError, match="'s' .* or 'm'.*got 'x'"):
        m.step_mode = "x"
    with pytest.raises(ValueError, match="step_mode must be"):
        neuron.IFNode(step_mode="multi")


def test_tree_helpers_order_and_names():
    net = nn.Sequential(Acc(), nn.Sequential(nn.Linear(2, 2), Acc()), neuron.LIFNode())
    names = [n for n, _ in base.named_memories(net)]
    assert names == ["0.total", "0.count", "1.1.total", "1.1.count", "2.v"]
    net(torch.ones(2))
    values = base.extract_memories(net)
    assert len(values) == 5 and values == list(base.memories(net))
    before = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
    net(torch.ones(2))
    base.load_memories(net, values)
    for a, b in zip(base.extract_memories(net), before):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_load_memories_wrong_length_names_both():
    net = nn.Sequential(Acc(), neuron.IFNode())
    with pytest.raises(ValueError, match="got 2 values.* has 3 memories"):
        base.load_memories(net, [0.0, 0.0])


def test_detach_and_device_move():
    m = Acc()
    x = torch.ones(2, requires_grad=True)
    m(x)
    assert m.total.requires_grad
    m.detach()
    assert not m.total.requires_grad
    m.to(torch.float64)
    assert m.count.dtype == torch.float64


def test_deepcopy_and_pickle_keep_memories():
    m = Acc()
    m(torch.ones(2))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone.total, torch.ones(2))
        clone.reset()
        assert clone.total == 0.0 and torch.equal(m.total, torch.ones(2))


def test_fast_walk_matches_named_modules_order_with_shared_modules():
    shared = neuron.LIFNode()
    inner = nn.Sequential(neuron.IFNode(), nn.Linear(2, 2), shared)
    net = nn.Sequential(shared, inner, nn.ModuleList([inner, neuron.IFNode(), None]), shared)
    net.add_module("late", neuron.LIFNode())
    expected = [m for _, m in base._memory_modules(net)]
    assert base._memory_module_list(net) == expected and len(expected) == 4  # each module once
    values = [torch.full((1,), float(i)) for i in range(4)]
    base.load_memories(net, values)
    assert base.extract_memories(net) == values and [v for _, v in base.named_memories(net)] == values


class _Acc(MemoryModule):
    def __init__(self):
        super().__init__()
        self.register_memory("acc", torch.zeros(3))

    def forward(self, x):
        self.acc += x  # in place, against the contract: it must not reach the reset value
        return self.acc


def test_a_tensor_reset_value_is_not_the_state():
    m = _Acc()
    m(torch.ones(3))
    m.reset()
    assert torch.equal(m.acc, torch.zeros(3))
    m(torch.ones(3))
    m.reset()
    assert torch.equal(m.acc, torch.zeros(3))


def test_data_parallel_replicas_keep_states_of_their_own():
    node = neuron.IFNode()
    replicas = [node._replicate_for_data_parallel() for _ in range(2)]  # what nn.DataParallel makes
    replicas[0](torch.ones(2, 3))
    replicas[1](torch.ones(1, 3))
    assert replicas[0].v.shape == (2, 3) and replicas[1].v.shape == (1, 3) and node.v == 0.0


@pytest.mark.parametrize("name", ["", "a.b", 1])
def test_memory_names_must_be_identifiers(name):
    with pytest.raises(ValueError, match="must be a Python identifier"):
        MemoryModule().register_memory(name, 0.0)


class _Learned(MemoryModule):
    def __init__(self):
        super().__init__()
        self.v0 = nn.Parameter(torch.full((3,), 0.5))
        self.register_memory("v", self.v0)  # a learnable initial state

    def forward(self, x):
        self.v = self.v * 0.5 + x
        return self.v


def test_a_learnable_initial_state_gets_gradients_after_reset_and_inference():
    m = _Learned()
    with torch.inference_mode():
        m(torch.ones(3))
        m.reset()  # the state made here must still train
    m(torch.ones(3)).sum().backward()
    assert torch.equal(m.v0.grad, torch.full((3,), 0.5))
