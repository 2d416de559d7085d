"""Private: a wrapped net saves and loads the ``state_dict`` of the original net.

``apply_gc`` and ``memory_optimization`` put containers at the blocks' sites,
which moves the blocks' modules to other paths (in a segment over blocks 0 and
1, ``features.1.conv.1.weight`` lives at ``features.0.4.0.weight``). The
original blocks still exist (each container keeps its own) and share every
module and tensor with the containers. So the parent of each site gets hooks:

* ``state_dict()``: the entries below the containers are replaced by the
  original blocks' own ``state_dict()`` at the sites: the plain net's keys,
  order, per-module metadata, shared-module aliases and a block's own state.
* ``load_state_dict()``: the original blocks stand at the sites while their
  keys load (torch's own recursion, metadata and error messages), then the
  containers go back. A dict with the wrapped structure's keys (as saved
  before the keys were kept) loads into the containers as it is; a dict that
  mixes both is an error.
"""
from typing import List, Tuple

import torch.nn as nn

from ._wrapping import _children, _is_ours, _original_block

_SWAPPED = "_snnkit_swapped_for_load"  # the (name, container) pairs the load post-hook puts back


def _save_original_keys(parent: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook of a site's parent: the original blocks' entries replace the containers'."""
    children = _children(parent)
    first = next((i for i, (_, child) in enumerate(children) if _is_ours(child)), None)
    if first is None:
        return
    # the entries of the children from the first container on are the last in the dict: re-made in order
    tail = [(prefix + name + ".", child) for name, child in children[first:]]
    below = tuple(p for p, _ in tail)
    moved = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(below)]}
    ours = tuple(p for p, child in tail if _is_ours(child))
    tensors = {id(t) for _, child in tail if _is_ours(child) for t in (*child.parameters(), *child.buffers())}
    keep_vars = any(id(v) in tensors for v in moved.values())  # state_dict(keep_vars=True) gave the tensors
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for path in [p for p in metadata if (p + ".").startswith(ours)]:
            del metadata[path]
    for p, child in tail:
        if _is_ours(child):
            _original_block(child).state_dict(destination=state_dict, prefix=p, keep_vars=keep_vars)
        else:
            state_dict.update((k, v) for k, v in moved.items() if k.startswith(p))


def _keys(pairs: List[Tuple[str, nn.Module]], prefix: str) -> set:
    return {prefix + k for name, module in pairs for k in module.state_dict(prefix=name + ".", keep_vars=True)}


def _load_original_keys(parent: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """``load_state_dict`` pre-hook of a site's parent: the original blocks stand at the sites while the children load."""
    ours = [(name, child) for name, child in _children(parent) if _is_ours(child)]
    if not ours:
        return
    below = [k for k in state_dict if k.startswith(tuple(prefix + name + "." for name, _ in ours))]
    original = _keys([(name, _original_block(child)) for name, child in ours], prefix)
    current = _keys(ours, prefix)
    wrapped = [k for k in below if k in current and k not in original]
    plain = [k for k in below if k in original and k not in current]
    if wrapped and plain:
        errors.append(
            f"snnkit.memopt: the state_dict mixes keys of the unwrapped net (e.g. {plain[0]!r}) and of the net "
            f"wrapped by apply_gc / memory_optimization (e.g. {wrapped[0]!r}); save it again from one net"
        )
        return
    if wrapped:  # the wrapped structure's keys: the containers load them
        return
    # Put back by the post-hook, after the children loaded (torch collects load errors and raises
    # only then); an exception from a module's own loading code would leave the original blocks here.
    parent.__dict__[_SWAPPED] = ours
    for name, child in ours:
        parent._modules[name] = _original_block(child)


def _put_containers_back(parent: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of a site's parent."""
    for name, child in parent.__dict__.pop(_SWAPPED, ()):
        parent._modules[name] = child


def _ours(hooks, fn) -> list:
    """Keys of ``hooks`` (a module's hook dict) that hold ``fn`` (torch keeps a pre-hook in a wrapper)."""
    return [k for k, h in hooks.items() if h is fn or getattr(h, "hook", None) is fn]


def _sync_keys(net: nn.Module) -> None:
    """Hooks on every parent of a container made by apply_gc / memory_optimization; none elsewhere.

    The walk does not enter those containers (a parent inside one keeps its hooks).
    """
    parents, todo = [], [net]
    while todo:
        parent = todo.pop()
        parents.append(parent)
        todo += [child for _, child in _children(parent) if not _is_ours(child)]
    for parent in parents:
        wanted = any(_is_ours(child) for _, child in _children(parent))
        for hooks, fn, register in (
            (parent._state_dict_hooks, _save_original_keys, parent._register_state_dict_hook),
            (parent._load_state_dict_pre_hooks, _load_original_keys,
             lambda fn: parent._register_load_state_dict_pre_hook(fn, with_module=True)),
            (parent._load_state_dict_post_hooks, _put_containers_back, parent.register_load_state_dict_post_hook),
        ):
            keys = _ours(hooks, fn)
            if wanted and not keys:
                register(fn)
            for k in keys if not wanted else ():
                del hooks[k]
