import torch
import torch.nn as nn
import pytest

from snnkit import functional, layer, neuron


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(layer.Linear(4, 4), neuron.LIFNode()) for _ in range(2)])
        self.head = nn.Sequential(layer.Flatten(), neuron.IFNode())

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_set_step_mode_and_reset_net_on_nested_net():
    net = Custom()
    functional.set_step_mode(net, "m")
    assert all(m.step_mode == "m" for m in net.modules() if hasattr(m, "step_mode"))
    net(torch.rand(5, 2, 4) * 3)
    assert all(isinstance(m.v, torch.Tensor) for m in net.modules() if isinstance(m, neuron.BaseNode))
    functional.reset_net(net)
    assert all(m.v == 0.0 for m in net.modules() if isinstance(m, neuron.BaseNode))
    with pytest.raises(ValueError, match="step_mode must be"):
        functional.set_step_mode(net, "t")


def test_detach_net_cuts_the_graph_for_truncated_bptt():
    net = Custom()
    functional.set_step_mode(net, "m")
    x = (torch.rand(5, 2, 4) * 3).requires_grad_()
    net(x)
    functional.detach_net(net)
    assert all(not m.v.requires_grad for m in net.modules() if isinstance(m, neuron.BaseNode))
    net(torch.rand(5, 2, 4) * 3).sum().backward()
    assert x.grad is None


def test_set_backend_only_touches_instances():
    net = Custom()
    functional.set_backend(net, "torch", instance=neuron.LIFNode)
    with pytest.raises(ValueError, match="backend must be one of"):
        functional.set_backend(net, "numpy")


def test_set_backend_checks_the_name_on_a_net_without_neurons():
    with pytest.raises(ValueError, match="backend must be one of"):
        functional.set_backend(nn.Linear(2, 2), "bogus")
