"""Private: a wrapped net's ``state_dict`` keys are those of the original net.

``apply_gc`` and ``memory_optimization`` put containers at the blocks' sites,
which moves the blocks' parameters to other paths (``features.1.conv.weight``
becomes ``features.0.4.0.weight`` inside a segment over blocks 0 and 1). The
parent of each site gets two hooks: ``state_dict()`` renames the keys below
its GC children back to the original paths, and ``load_state_dict()``
renames original keys to the current ones before the children load them. So
a checkpoint loads into the plain net, into the same net planned differently,
and back (a dict with the current keys, e.g. from an earlier version, loads
too). The paths are matched by module identity when a hook runs, so nothing
goes stale when the plan changes; a parent without GC children is left as it is.
"""
from typing import Dict, List

import torch.nn as nn

from ._wrapping import _children, _is_ours, _original_block


def _renamed_paths(parent: nn.Module) -> Dict[str, str]:
    """Module paths below the GC children of ``parent``: current path -> original path (relative to ``parent``)."""
    ours = [(name, child) for name, child in _children(parent) if _is_ours(child)]
    original: Dict[int, List[str]] = {}
    for name, child in ours:
        for path, m in _original_block(child).named_modules(prefix=name, remove_duplicate=False):
            original.setdefault(id(m), []).append(path)
    renamed = {}
    for name, child in ours:
        for path, m in child.named_modules(prefix=name, remove_duplicate=False):
            paths = original.get(id(m))
            if paths:  # a module at two paths (shared) takes them in order
                renamed[path] = paths.pop(0)
    return renamed


def _ours_prefixes(parent: nn.Module, prefix: str) -> tuple:
    return tuple(prefix + name + "." for name, child in _children(parent) if _is_ours(child))


def _rename(key: str, prefix: str, paths: Dict[str, str]) -> str:
    """``prefix + path + "." + name`` with ``path`` renamed by ``paths`` (keys that do not match stay)."""
    path, dot, name = key[len(prefix) :].rpartition(".")
    return prefix + paths[path] + dot + name if dot and path in paths else key


def _save_original_keys(parent: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook of a site's parent: keys and metadata below its GC children get their original paths."""
    paths = _renamed_paths(parent)
    if not paths:
        return
    ours = _ours_prefixes(parent, prefix)
    below = [k for k in state_dict if k.startswith(prefix)]  # the parent's own entries are the last ones
    for key, value in [(k, state_dict.pop(k)) for k in below]:
        state_dict[_rename(key, prefix, paths) if key.startswith(ours) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per module path; a container's own entry has no original module: dropped
        moved = [(p[len(prefix) :], metadata.pop(p)) for p in list(metadata) if (p + ".").startswith(ours)]
        metadata.update((prefix + paths[p], entry) for p, entry in moved if p in paths)


def _load_original_keys(parent: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """``load_state_dict`` pre-hook of a site's parent: original keys below its GC children get the current paths.

    A dict whose keys below the GC children are all current keys is left as it is.
    """
    paths = _renamed_paths(parent)
    if not paths:
        return
    parent.__dict__[_LOADING] = (prefix, paths)  # for the post-hook, which is not given the prefix
    current = {prefix + k for name, child in _children(parent) if _is_ours(child)
               for k in child.state_dict(prefix=name + ".", keep_vars=True)}
    below = [k for k in state_dict if k.startswith(_ours_prefixes(parent, prefix))]
    if all(k in current for k in below):
        return
    back = {original: path for path, original in paths.items()}
    for key, value in [(k, state_dict.pop(k)) for k in below]:
        state_dict[_rename(key, prefix, back)] = value


def _name_missing_keys(parent: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: missing keys below the GC children are reported by their original names."""
    prefix, paths = parent.__dict__.pop(_LOADING, (None, None))
    if paths:
        ours, missing = _ours_prefixes(parent, prefix), incompatible_keys.missing_keys
        missing[:] = [_rename(k, prefix, paths) if k.startswith(ours) else k for k in missing]


_LOADING = "_snnkit_loading_keys"


def _ours(hooks, fn) -> list:
    """Keys of ``hooks`` (a module's hook dict) that hold ``fn`` (torch keeps a pre-hook in a wrapper)."""
    return [k for k, h in hooks.items() if h is fn or getattr(h, "hook", None) is fn]


def _sync_keys(net: nn.Module) -> None:
    """Hooks on every parent of a GC child made by apply_gc / memory_optimization; none elsewhere.

    The walk does not enter those children: their keys are renamed once, by their parent.
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
            (parent._load_state_dict_post_hooks, _name_missing_keys, parent.register_load_state_dict_post_hook),
        ):
            keys = _ours(hooks, fn)
            if wanted and not keys:
                register(fn)
            for k in keys if not wanted else ():
                del hooks[k]
