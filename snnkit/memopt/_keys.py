"""Private: a wrapped net saves and loads the ``state_dict`` of the original net.

``apply_gc`` and ``memory_optimization`` put containers at the blocks' sites,
which moves the blocks' modules to other paths (in a segment over blocks 0 and
1, ``features.1.conv.1.weight`` lives at ``features.0.4.0.weight``). The
original blocks still exist (each container keeps its own) and share their
modules with the containers (a module replaced inside a container later goes
into the original block too, see ``_sync_blocks``). So the parent of each
site gets hooks:

* ``state_dict()``: the entries below the containers are replaced by the
  original blocks' own ``state_dict()`` at the sites: the plain net's keys,
  order, per-module metadata, shared-module aliases and a block's own state.
* ``load_state_dict()``: while the parent's children load, the original blocks
  stand at the sites (torch's own recursion: metadata, error messages), then
  the containers go back. If the load raises, they go back at the next
  forward of the parent or after that of the last block, or at the next save
  or load. A dict with the wrapped structure's keys (as saved before the keys
  were kept) loads into the containers as it is; a dict that mixes both is an
  error.
"""
import functools
from typing import List, Tuple

import torch.nn as nn

from ._wrapping import _children, _is_ours, _original_block, _sync_blocks

_SWAPPED = "_snnkit_swapped_for_load"  # the (name, container) pairs the load post-hook puts back


def _put_containers_back(parent: nn.Module, *_) -> None:
    """Load post-hook (and forward pre-hook, and before a save or load) of a site's parent.

    After a load that raised, also the forward hook of the last original block
    standing at a site.
    """
    ours, handles = parent.__dict__.pop(_SWAPPED, ((), ()))
    for handle in handles:
        handle.remove()
    for name, child in ours:
        block = parent._modules[name]
        shared = {id(m) for m in block.modules()}
        for m in child.modules():  # train()/eval() while the block stood there did not reach these
            if id(m) not in shared:
                m.training = block.training
        parent._modules[name] = child


def _heal(net: nn.Module) -> None:
    """Containers back everywhere in ``net`` after a load that raised (before the net is wrapped or unwrapped)."""
    for module in list(net.modules()):
        _put_containers_back(module)


def _ours_children(parent: nn.Module) -> List[Tuple[str, nn.Module]]:
    _put_containers_back(parent)  # after a load that raised
    ours = [(name, child) for name, child in _children(parent) if _is_ours(child)]
    for _, child in ours:
        _sync_blocks(child)
    return ours


def _note_keep_vars(parent: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook of a site's parent: the post-hook is not given ``keep_vars``."""
    parent.__dict__[_KEEP_VARS] = keep_vars


_KEEP_VARS = "_snnkit_keep_vars"


def _save_original_keys(parent: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook of a site's parent: the original blocks' entries replace the containers'."""
    keep_vars = parent.__dict__.pop(_KEEP_VARS, False)
    ours = dict(_ours_children(parent))
    children = _children(parent)
    first = next((i for i, (name, _) in enumerate(children) if name in ours), None)
    if first is None:
        return
    # the entries of the children from the first container on are the last in the dict: re-made in order
    tail = [(prefix + name + ".", name, child) for name, child in children[first:]]
    moved = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(tuple(t[0] for t in tail))]}
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        below = tuple(prefix + name + "." for name in ours)
        for path in [p for p in metadata if (p + ".").startswith(below)]:
            del metadata[path]
    for p, name, child in tail:
        if name in ours:
            _original_block(child).state_dict(destination=state_dict, prefix=p, keep_vars=keep_vars)
        else:
            state_dict.update((k, v) for k, v in moved.items() if k.startswith(p))


def _keys(pairs, prefix: str) -> set:
    return {prefix + k for name, module in pairs for k in module.state_dict(prefix=name + ".", keep_vars=True)}


def _load_original_keys(parent: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """``load_state_dict`` pre-hook of a site's parent: the original blocks stand at the sites while the children load."""
    ours = _ours_children(parent)
    if not ours:
        return
    below = [k for k in state_dict if k.startswith(tuple(prefix + name + "." for name, _ in ours))]
    original = _keys([(name, _original_block(child)) for name, child in ours], prefix)
    other = [k for k in below if k not in original]
    current = _keys(ours, prefix) if other else set()  # keys of the wrapped structure: only looked at if needed
    wrapped = [k for k in other if k in current]
    if wrapped and any(k in original and k not in current for k in below):
        errors.append(
            f"snnkit.memopt: the state_dict mixes keys of the unwrapped net and of the net wrapped by apply_gc / "
            f"memory_optimization (e.g. {wrapped[0]!r}); save it again from one net"
        )
        for k in below:  # nothing of it loads into the blocks
            del state_dict[k]
        return
    if wrapped:  # the wrapped structure's keys: the containers load them
        return
    blocks = [_original_block(child) for _, child in ours]
    # after a load that raised, the last block's next forward puts the containers back once it is done: a
    # parent its own parent iterates (a ModuleList) is not called, and swapping while the loop runs would
    # hand it a placeholder in place of a block that has not run yet
    handles = [blocks[-1].register_forward_hook(functools.partial(_put_containers_back, parent))]
    parent.__dict__[_SWAPPED] = (ours, handles)
    for (name, _), block in zip(ours, blocks):
        parent._modules[name] = block


def _ours(hooks, fn) -> list:
    """Keys of ``hooks`` (a module's hook dict) that hold ``fn`` (torch keeps a pre-hook in a wrapper)."""
    return [k for k, h in hooks.items() if h is fn or getattr(h, "hook", None) is fn]


def _sync_keys(net: nn.Module) -> None:
    """Hooks on every parent of a container made by apply_gc / memory_optimization; none elsewhere.

    The walk does not enter those containers (a parent inside one keeps its hooks).
    The callers :func:`_heal` the net first.
    """
    parents, todo = [], [net]
    while todo:
        parent = todo.pop()
        parents.append(parent)
        todo += [child for _, child in _children(parent) if not _is_ours(child)]
    for parent in parents:
        wanted = any(_is_ours(child) for _, child in _children(parent))
        for hooks, fn, register in (
            (parent._state_dict_pre_hooks, _note_keep_vars, parent.register_state_dict_pre_hook),
            (parent._state_dict_hooks, _save_original_keys, parent._register_state_dict_hook),
            (parent._load_state_dict_pre_hooks, _load_original_keys,
             lambda fn: parent._register_load_state_dict_pre_hook(fn, with_module=True)),
            (parent._load_state_dict_post_hooks, _put_containers_back, parent.register_load_state_dict_post_hook),
            (parent._forward_pre_hooks, _put_containers_back, parent.register_forward_pre_hook),
        ):
            keys = _ours(hooks, fn)
            if wanted and not keys:
                hooks.move_to_end(register(fn).id, last=False)  # before the user's: they see the original keys
            for k in keys if not wanted else ():
                del hooks[k]
