"""Private: wrapping blocks in GC segments, finding them, and probing a net (used by pipeline and _planner)."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import base
from ..layer import SeqToANNContainer
from . import compress as _compress
from .checkpointing import GCContainer, TCGCContainer, _FollowsOutside
from .compress import BaseSpikeCompressor, BitSpikeCompressor, NullSpikeCompressor, _invalid_binary

_MARK = "_snnkit_auto_gc"  # set on every container that apply_gc / memory_optimization made


# ----------------------------------------------------------------------------- helpers


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _is_binary(x) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.numel() > 0
        and not bool(_invalid_binary(x))
    )


def _check_block_types(block_types) -> Tuple[type, ...]:
    types = tuple(block_types) if isinstance(block_types, (tuple, list, set)) else (block_types,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(
            f"snnkit.memopt: block_types must be an nn.Module subclass or a tuple of them, got {block_types!r}"
        )
    return types


def _check_compress(compress) -> None:
    if compress is None or compress in ("auto", "bit") or isinstance(compress, BaseSpikeCompressor):
        return
    raise ValueError(
        f"snnkit.memopt: compress must be 'auto', 'bit', None or a BaseSpikeCompressor instance, got {compress!r}"
    )


def _as_inputs(dummy_input) -> tuple:
    return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)


def _shapes(inputs) -> str:
    return ", ".join(str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)


def _run(net: nn.Module, inputs: tuple):
    try:
        return net(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"snnkit.memopt: {type(net).__name__} failed on dummy_input of shape {_shapes(inputs)} ({e}); "
            "pass an input the net accepts (multi-step nets take [T, N, ...])"
        ) from e


def _is_ours(m: nn.Module) -> bool:
    return bool(getattr(m, _MARK, False))


class _Site:
    """Where a block lives: ``parent.<name>``, dotted ``path``."""

    def __init__(self, parent, name, path, block):
        self.parent, self.name, self.path, self.block = parent, name, path, block

    def put(self, module: nn.Module) -> None:
        setattr(self.parent, self.name, module)

    def get(self) -> nn.Module:
        """The module at the site now (the block or what replaced it)."""
        return self.parent._modules[self.name]


def _children(parent: nn.Module):
    """``(name, child)`` of every child slot, a module shared by two slots at both (``named_children`` skips repeats)."""
    return [(name, child) for name, child in parent._modules.items() if child is not None]


def _find_blocks(net: nn.Module, types: Tuple[type, ...]) -> List[_Site]:
    sites: List[_Site] = []
    seen = set()  # (parent, name): a shared parent is walked once

    def walk(parent, prefix):
        for name, child in _children(parent):
            if (id(parent), name) in seen:
                continue
            seen.add((id(parent), name))
            path = f"{prefix}{name}"
            if isinstance(child, GCContainer) or _is_ours(child):
                continue  # already a GC segment: never wrap twice, never look inside
            if isinstance(child, types):
                sites.append(_Site(parent, name, path, child))
            else:
                walk(child, path + ".")

    walk(net, "")
    return sites


class _StateGuard:
    """Snapshot memories, buffers, RNG and gradients and reset the memories; put everything back on exit."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __enter__(self):
        net = self.net
        self.mem = base.extract_memories(net)
        self.buffers = [(b, b.detach().clone()) for b in net.buffers()]
        self.grads = [(p, p.grad) for p in net.parameters()]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.fresh()
        return self

    def fresh(self) -> None:
        """Buffers as on entry, no gradients (a step would add into them in place), fresh memories."""
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for p in self.net.parameters():
            p.grad = None
        for m in self.net.modules():  # measure from a fresh state, as a training step starts
            if isinstance(m, base.MemoryModule):
                m.reset()

    def __exit__(self, *exc):
        self.fresh()  # also clears what reset() clears besides the memories (a neuron's v_seq)
        for p, g in self.grads:
            p.grad = g
        base.load_memories(self.net, self.mem)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        return False


def _probe_binary(net: nn.Module, blocks: Sequence[nn.Module], inputs: tuple) -> Dict[int, bool]:
    """One no-grad forward: is each block's first tensor input binary? (id(block) -> bool)."""
    seen: Dict[int, bool] = {}

    def hook(module, args):
        xs = _tensors(args)
        seen[id(module)] = seen.get(id(module), True) and bool(xs) and _is_binary(xs[0])

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    try:
        with _StateGuard(net), torch.no_grad():
            _run(net, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _compressor_from_attr(block: nn.Module, value) -> BaseSpikeCompressor:
    if isinstance(value, BaseSpikeCompressor):
        return value
    cls = getattr(_compress, value, None) if isinstance(value, str) else None
    if not (isinstance(cls, type) and issubclass(cls, BaseSpikeCompressor)):
        raise ValueError(
            f"snnkit.memopt: {type(block).__name__}.x_compressor must be a BaseSpikeCompressor instance or the "
            f"name of a compressor class in snnkit.memopt.compress (e.g. 'BitSpikeCompressor'), got {value!r}"
        )
    return cls()


def _choose_compressor(block: nn.Module, compress, binary: Optional[bool]) -> BaseSpikeCompressor:
    override = getattr(block, "x_compressor", None)
    if override is not None:
        return _compressor_from_attr(block, override)
    if compress is None:
        return NullSpikeCompressor()
    if isinstance(compress, BaseSpikeCompressor):
        return copy.deepcopy(compress)
    if compress == "bit" or binary:
        return BitSpikeCompressor()
    return NullSpikeCompressor()


def _wrap(block: nn.Module, compressor: BaseSpikeCompressor, n_chunk: Optional[int] = None, more=()) -> nn.Module:
    """``block`` (then the modules in ``more``) as one GC segment (``n_chunk``: temporal chunks)."""
    if n_chunk is None:
        container = GCContainer(compressor, block, *more)
    else:
        container = TCGCContainer(compressor, block, *more, n_chunk=n_chunk)
    setattr(container, _MARK, True)
    container.training = block.training  # not .train(): that would reset the modes inside the block
    return container


class _SpatialSplit(_FollowsOutside, nn.Sequential):
    """A block cut into parts that run one after another, each its own GC segment (``segments[i][0]``: part i)."""

    def __init__(self, block: nn.Module, segments: Sequence[nn.Module]):
        super().__init__(*segments)
        self.__dict__["_block"] = block  # the original block, kept out of the module tree
        self.__dict__["_slots"] = [[self, str(i), seg, None, None] for i, seg in enumerate(segments)] + [
            [seg, "0", seg[0], *_slot_of(block, seg[0])] for seg in segments]
        self.__dict__["_outside"] = _outside(self, [block])
        setattr(self, _MARK, True)
        self.training = block.training


class _Merged(nn.Module):
    """Placeholder at the site of a block that runs inside the temporal segment of an earlier sibling."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["_block"] = block  # kept out of the module tree: its parameters live in the segment
        setattr(self, _MARK, True)
        self.training = block.training

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"runs inside the temporal segment before it ({type(self.__dict__['_block']).__name__})"


def _runs_in_sequence(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` that runs its children one after another (its forward not overridden)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _spatial_parts(block: nn.Module) -> Optional[List[nn.Module]]:
    """The parts that run one after another to make ``block`` (``__spatial_split__``, a Sequential's children)."""
    split = getattr(block, "__spatial_split__", None)
    if callable(split):
        parts = list(split())
        if not all(isinstance(p, nn.Module) for p in parts):
            raise TypeError(f"snnkit.memopt: {type(block).__name__}.__spatial_split__() must return nn.Modules")
    elif _runs_in_sequence(block):
        parts = list(block)
    else:
        return None
    return parts if len(parts) >= 2 else None


def _one_by_one(part: nn.Module, slots: list) -> List[nn.Module]:
    """A SeqToANNContainer of several modules as one container per module (the same result)."""
    if type(part) is SeqToANNContainer and len(part) > 1:
        pieces = [SeqToANNContainer(m) for m in part]
        slots += [[piece, "0", m, part, name] for piece, (name, m) in zip(pieces, part._modules.items())]
        return pieces
    return [part]


def _slot_of(root: nn.Module, module: nn.Module) -> Tuple[Optional[nn.Module], Optional[str]]:
    """``(parent, name)``: the first slot of ``root``'s tree that holds ``module`` (``(None, None)``: none)."""
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is module:
                return parent, name
    return None, None


def _group(blocks: Sequence[nn.Module], compressor: BaseSpikeCompressor, n_chunk: Optional[int]) -> nn.Module:
    """Consecutive sibling blocks as one GC segment (``n_chunk``: temporal chunks).

    Blocks that split spatially run as their parts: a block's own forward holds
    its input until it returns, the segment frees it once the first part is done.
    """
    modules, slots, owners = [], [], []
    for block in blocks:
        for part in _spatial_parts(block) or [block]:
            pieces = _one_by_one(part, slots)
            modules += pieces
            owners += [block] * len(pieces)
    container = _wrap(modules[0], compressor, n_chunk, modules[1:])
    container.__dict__["_block"] = blocks[0]  # the original first block, kept out of the module tree
    slots += [[container, str(k), m, *_slot_of(block, m)] for k, (m, block) in enumerate(zip(modules, owners))]
    container.__dict__["_slots"] = slots
    container.__dict__["_outside"] = _outside(container, blocks)
    return container


def _outside(container: nn.Module, blocks: Sequence[nn.Module]) -> List[nn.Module]:
    """The modules of ``blocks`` that ``container``'s tree does not hold (see ``_FollowsOutside``)."""
    inside = {id(m) for m in container.modules()}
    out = {id(m): m for block in blocks for m in block.modules() if id(m) not in inside}
    return list(out.values())


def _sync_blocks(module: nn.Module) -> None:
    """Put into the original blocks the modules that replaced theirs inside ``module`` since it was made.

    A segment holds the blocks' parts in slots of its own (and one container per
    module of a split SeqToANNContainer): a module put there later (e.g. by
    ``convert_sync_batchnorm`` or an adapter) goes to the original block's slot too,
    so that saving, loading and :func:`unwrap_gc` see what runs. A slot of the
    segment's own (a whole block, a per-module container) cannot be followed.

    Raises:
        RuntimeError: if such a slot holds another module than the planner put there.
    """
    for entry in module.__dict__.get("_slots", ()):
        holder, name, put, parent, slot = entry
        now = holder._modules.get(name)
        if now is put:
            continue
        if parent is None:
            raise RuntimeError(
                f"snnkit.memopt: the {type(put).__name__} that apply_gc / memory_optimization put at slot {name!r} "
                f"of a {type(holder).__name__} was replaced by {type(now).__name__}; the original block cannot take "
                "that replacement, so saving, loading or unwrap_gc would use the old module. Replace modules inside "
                "the blocks (a convolution, a BatchNorm) instead, or put the old one back."
            )
        parent._modules[slot] = entry[2] = now


def _original_block(module: nn.Module) -> nn.Module:
    """The block that ``module`` (made by apply_gc / memory_optimization) stands for at its site."""
    block = module.__dict__.get("_block")
    return module[0] if block is None else block


def _original(container: nn.Module) -> nn.Module:
    """The original block of ``container``, ready to go back to its site (its mode followed the container's)."""
    _sync_blocks(container)
    return _original_block(container)
