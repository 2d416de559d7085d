"""Stateful modules and the state save/restore hooks that memopt builds on.

A :class:`MemoryModule` declares its state ("memories") with
:meth:`~MemoryModule.register_memory`. State is never updated in place: every
step assigns a new tensor, so a snapshot taken with
:meth:`~MemoryModule.save_memories` stays valid after the module moves on.

Module-tree helpers (:func:`memories`, :func:`named_memories`,
:func:`extract_memories`, :func:`load_memories`) walk a network depth-first in
registration order (the order of :meth:`torch.nn.Module.named_modules`), and
within a module in the order its memories were registered.
"""
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

__all__ = [
    "StepModule",
    "MemoryModule",
    "memories",
    "named_memories",
    "extract_memories",
    "load_memories",
]

_STEP_MODES = ("s", "m")


def _check_step_mode(mode):
    if mode not in _STEP_MODES:
        raise ValueError(f"step_mode must be 's' (single step) or 'm' (multi step), got {mode!r}")
    return mode


class StepModule:
    """Mixin for modules that run in single-step (``"s"``) or multi-step (``"m"``) mode.

    In ``"s"`` mode the input is one time step ``[N, *]``; in ``"m"`` mode a whole
    sequence ``[T, N, *]``, time first.
    """

    @property
    def step_mode(self) -> str:
        return self.__dict__.get("_step_mode", "s")

    @step_mode.setter
    def step_mode(self, mode: str):
        self.__dict__["_step_mode"] = _check_step_mode(mode)


def _own_copy(value: Any) -> Any:
    """A tensor reset value's copy for the state: a write to the state cannot reach the reset value.

    Connected to it in autograd when it requires grad (a learnable initial state), and
    an ordinary tensor also when made under ``torch.inference_mode``.
    """
    if not isinstance(value, torch.Tensor):
        return value
    with torch.inference_mode(False), torch.set_grad_enabled(value.requires_grad):
        return value.clone()


class MemoryModule(nn.Module, StepModule):
    """A module with state ("memories") and save/restore hooks.

    Example:
        >>> import torch
        >>> from snnkit.base import MemoryModule
        >>> class Counter(MemoryModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_memory("count", 0.0)
        ...     def forward(self, x):
        ...         self.count = self.count + x
        ...         return self.count
        >>> c = Counter()
        >>> snapshot = c.save_memories()
        >>> c(torch.ones(2))
        tensor([1., 1.])
        >>> c.load_memories(snapshot); c.count
        0.0
    """

    def __init__(self, step_mode: str = "s"):
        super().__init__()
        self.__dict__["_memories"] = {}
        self.__dict__["_memory_reset_values"] = {}
        self.step_mode = step_mode

    def register_memory(self, name: str, value: Any) -> None:
        """Declare the state variable ``name`` with reset value ``value``.

        Raises:
            ValueError: if ``name`` is already an attribute of the module.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"cannot register memory {name!r}: the name must be a Python identifier")
        if name in self._memories or hasattr(self, name):
            raise ValueError(f"cannot register memory {name!r}: the module already has an attribute of that name")
        self._memories[name] = _own_copy(value)  # an in-place write to the state cannot reach the reset value
        self._memory_reset_values[name] = value

    def __getattr__(self, name: str):
        memories_ = self.__dict__.get("_memories")
        if memories_ is not None and name in memories_:
            return memories_[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        memories_ = self.__dict__.get("_memories")
        if memories_ is not None and name in memories_:
            memories_[name] = value
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_memories", {}):
            del self._memories[name]
            del self._memory_reset_values[name]
        else:
            super().__delattr__(name)

    def reset(self) -> None:
        """Put every memory back to its reset value (no in-place writes; a tensor value is a fresh copy)."""
        self._memories.update({k: _own_copy(v) for k, v in self._memory_reset_values.items()})

    def _replicate_for_data_parallel(self):
        # nn.DataParallel copies __dict__ shallowly: each replica needs a state dict of its own.
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_memories"] = dict(self._memories)
        return replica

    def memories(self) -> Iterator[Any]:
        """Iterate over the current state values, in registration order."""
        return iter(list(self._memories.values()))

    def named_memories(self) -> Iterator[Tuple[str, Any]]:
        """Iterate over ``(name, value)`` pairs of the current state."""
        return iter(list(self._memories.items()))

    def save_memories(self) -> Dict[str, Any]:
        """Return a snapshot of the state (tensors referenced, not cloned)."""
        return dict(self._memories)

    def load_memories(self, snapshot: Dict[str, Any]) -> None:
        """Put a snapshot taken with :meth:`save_memories` back.

        Raises:
            ValueError: if the snapshot's names differ from the module's memories.
        """
        if set(snapshot) != set(self._memories):
            raise ValueError(
                f"snapshot has memories {sorted(snapshot)}, but {type(self).__name__} has {sorted(self._memories)}"
            )
        self._memories.update(snapshot)

    def detach(self) -> None:
        """Detach every tensor memory from the autograd graph (truncated BPTT)."""
        for name, value in self._memories.items():
            if isinstance(value, torch.Tensor):
                self._memories[name] = value.detach()

    def _apply(self, fn, *args, **kwargs):
        # Keep tensor memories on the module's device/dtype after .to()/.cuda().
        out = super()._apply(fn, *args, **kwargs)
        for table in (self._memories, self._memory_reset_values):
            for name, value in table.items():
                if isinstance(value, torch.Tensor):
                    table[name] = fn(value)
        return out

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode!r}"


def _memory_modules(module: nn.Module) -> Iterator[Tuple[str, MemoryModule]]:
    for prefix, m in module.named_modules():
        if isinstance(m, MemoryModule):
            yield prefix, m


def _memory_module_list(module: nn.Module) -> List[MemoryModule]:
    """The memory modules of the tree in ``named_modules`` order, without building names.

    memopt walks a segment's tree several times per step; this walk is about four
    times cheaper than ``named_modules``.
    """
    out: List[MemoryModule] = []
    seen = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, MemoryModule):
            out.append(m)
        for child in m._modules.values():
            if child is not None:
                visit(child)

    visit(module)
    return out


def named_memories(module: nn.Module) -> Iterator[Tuple[str, Any]]:
    """Iterate over ``(dotted_name, value)`` of every memory in the tree.

    Example:
        >>> import torch.nn as nn
        >>> from snnkit import base, neuron
        >>> net = nn.Sequential(nn.Linear(2, 2), neuron.IFNode())
        >>> [name for name, _ in base.named_memories(net)]
        ['1.v']
    """
    for prefix, m in _memory_modules(module):
        for name, value in m.named_memories():
            yield (f"{prefix}.{name}" if prefix else name), value


def memories(module: nn.Module) -> Iterator[Any]:
    """Iterate over the values of every memory in the tree, in the fixed order."""
    for m in _memory_module_list(module):
        yield from m.memories()


def extract_memories(module: nn.Module) -> List[Any]:
    """Return the tree's memories as a flat list (see :func:`load_memories`)."""
    return list(memories(module))


def load_memories(module: nn.Module, values: List[Any]) -> None:
    """Load a flat list from :func:`extract_memories` back into the tree.

    Raises:
        ValueError: if the list length differs from the number of memories.
    """
    values = list(values)
    modules = _memory_module_list(module)
    expected = sum(len(m._memories) for m in modules)
    if len(values) != expected:
        raise ValueError(f"load_memories got {len(values)} values, but the module tree has {expected} memories")
    i = 0
    for m in modules:
        names = list(m._memories)
        m.load_memories(dict(zip(names, values[i : i + len(names)])))
        i += len(names)
