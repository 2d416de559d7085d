"""Whole-network helpers: reset state, switch step mode or backend, detach state.

Each is a plain walk over ``net.modules()``; there is no cache to invalidate
after modules are swapped.

Example:
    >>> import torch, torch.nn as nn
    >>> from snnkit import functional, layer, neuron
    >>> net = nn.Sequential(layer.Linear(4, 3), neuron.LIFNode())
    >>> functional.set_step_mode(net, "m")
    >>> out = net(torch.rand(8, 2, 4))
    >>> functional.reset_net(net)
    >>> net[1].v
    0.0
"""
import torch.nn as nn

from .base import MemoryModule, StepModule, _check_step_mode
from .neuron import BaseNode
from .neuron.nodes import _check_backend

__all__ = ["reset_net", "set_step_mode", "set_backend", "detach_net"]


def reset_net(net: nn.Module) -> None:
    """Reset the memories of every :class:`~snnkit.base.MemoryModule` in ``net``."""
    for m in net.modules():
        if isinstance(m, MemoryModule):
            m.reset()


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` (``"s"`` or ``"m"``) of every :class:`~snnkit.base.StepModule` in ``net``."""
    _check_step_mode(step_mode)
    for m in net.modules():
        if isinstance(m, StepModule):
            m.step_mode = step_mode


def set_backend(net: nn.Module, backend: str, instance=BaseNode) -> None:
    """Set ``backend`` of every module of type ``instance`` (default: all neurons).

    Raises:
        ValueError: for an unknown backend.
        RuntimeError: for ``"cupy"`` without CuPy or a CUDA device.
    """
    _check_backend(backend)  # also when the net has no neuron
    for m in net.modules():
        if isinstance(m, instance):
            m.backend = backend


def detach_net(net: nn.Module) -> None:
    """Detach every memory in ``net`` from the autograd graph (truncated BPTT)."""
    for m in net.modules():
        if isinstance(m, MemoryModule):
            m.detach()
