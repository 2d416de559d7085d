"""Turn GC on per block (:func:`apply_gc`) and plan it automatically (:func:`memory_optimization`).

:func:`apply_gc` wraps every block of the given types in a
:class:`~snnkit.memopt.GCContainer` and picks its input compressor by probing
the block's input once (binary spikes -> :class:`~snnkit.memopt.BitSpikeCompressor`,
anything else -> :class:`~snnkit.memopt.NullSpikeCompressor`).
:func:`unwrap_gc` puts the original blocks back.

:func:`memory_optimization` goes further, in four levels:

1. layer-wise GC (every block a GC segment),
2. spatial split of the segment that holds the peak (``nn.Sequential`` children,
   or the modules a block returns from ``__spatial_split__()``, which must
   compose sequentially to the block's forward),
3. temporal split: of the segment that holds the peak (a
   :class:`~snnkit.memopt.TCGCContainer` with 2, 4, 8, ... chunks), and
   temporal segments that span several consecutive blocks (children of one
   ``nn.Sequential``, multi-step): one ``TCGCContainer`` runs the blocks
   together chunk by chunk, so the gradient between them only ever exists
   for one chunk of time steps,
4. greedy unwrap: segments whose recompute buys the least memory per second go
   back to plain modules as long as the peak does not rise (and, for the
   multi-block segments, the last blocks of each chain).

Each step is kept only if the estimated peak goes down (unwrap: does not go up).

How the planner measures
------------------------
Planning never runs a full training step per candidate. It runs one *cut*
step of the layer-wise GC net on **one sample** of the batch (bytes and times
are scaled by the batch size; parameter gradients are not): each block's
output is detached into a fresh leaf, so every block's forward and backward
can be measured on its own with a nested :class:`~snnkit.memopt.MemoryTracker`
(peak of live tensor bytes on any device, CPU included). The same step
records, through saved-tensor hooks in the recompute, what the plain block
would keep for backward. From these numbers the peak of a plan of single-block
segments is computed: the forward of block ``k`` peaks at
``sum(retained[j] for j < k) + input[k] + forward_excess[k]``, its backward at
``sum(retained[j] for j <= k) + grad_output[k] + backward_excess[k] +
parameter_grads(j > k)``; spatial and temporal candidates of the peak block
are measured by running that block alone on its recorded input. Temporal
segments over several blocks are not additive, so they are measured by real
steps, again on one sample (on CPU a half to one full step each, as the
chunks run many small operators): segments of 2 blocks and 4 chunks, then the
last segments of each chain unwrapped while the peak does not rise, then
larger segments and more chunks while it goes down, within ``budget`` (3 plain
steps by default: ``budget - 1`` candidates, and a wall-clock deadline of
``budget`` estimated plain steps).
``verify=True`` adds one real full-batch step that measures the final plan.

What holds the peak
-------------------
With every block a GC segment, a step peaks in the backward recompute of the
largest block: its decompressed input, what its layers save for backward
(convolution input, BatchNorm input, the neurons' ``h_seq``), the float32
gradient of its output and the gradient of its input are all alive at once,
on top of the compressed inputs of the blocks before it. A spatial split
shrinks what the recompute keeps, at the price of storing the float
pre-activation between the parts. A temporal split of one block divides its
recompute by the number of chunks but not the float32 gradients flowing into
and out of it (``grad_output`` and ``grad_input`` span all ``T`` steps): on
the 6-block benchmark VGG (``[8, 4, 2, 48, 48]``) the first block's output
gradient alone is 9 MiB, and single-block plans stop near 40 MiB (2.5x). A
temporal segment over two blocks removes the full-size gradient between them,
which is what brings that net to 32 MiB (3.2x). What remains at the peak
(measured breakdown, 6-block VGG, 2-block segments of 4 chunks):

* the neuron states a temporal segment keeps to restart each chunk: ``n - 1``
  time steps of every neuron's membrane potential, plus the final state each
  module holds anyway (12.7 MiB of the 32 MiB, the largest item: more chunks
  lower the recompute but raise this, which is why 8 chunks lose to 4);
* the full-size float32 gradient at a segment boundary and the gradient of
  the segment's input being assembled (4.5 MiB and 2.25 MiB);
* one chunk's recompute: convolution and BatchNorm outputs, ``h_seq``, the
  max-pool input (decompressed) and indices (int64), their gradients (about
  12 MiB);
* parameter gradients. A temporal segment adds its chunks' parameter
  gradients in place into one sum and returns it once, but the gradients of
  all weights are alive by the end of backward. On the 8-block VGG
  (35.4 MiB of float32 weights, 512-channel 3x3 convolutions of 9 MiB each)
  this dominates: the parameter gradients (35.4 MiB) and the neurons' final
  states (7.9 MiB) alone are 43.3 MiB, more than its 6x target (42.2 MiB), so
  no plan of this kind can reach 6x on it.

Exactness: GC and spatial splits reproduce the plain gradients exactly. A
temporal split computes BatchNorm batch statistics per chunk of time steps, so
with BatchNorm in training mode inside a temporally split block outputs and
gradients differ from the plain net (as with any per-chunk normalisation);
pass ``temporal=False`` to rule temporal splits out.
"""
import copy
import dataclasses
import logging
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import base
from ..base import StepModule
from . import compress as _compress
from .checkpointing import GCContainer, TCGCContainer
from .compress import BaseSpikeCompressor, BitSpikeCompressor, NullSpikeCompressor
from .tracker import MemoryTracker

__all__ = ["apply_gc", "unwrap_gc", "memory_optimization", "MemOptSummary"]

_log = logging.getLogger(__name__)
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
        and bool(((x == 0) | (x == 1)).all())
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


def _find_blocks(net: nn.Module, types: Tuple[type, ...]) -> List[_Site]:
    sites: List[_Site] = []

    def walk(parent, prefix):
        for name, child in parent.named_children():
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
        for m in net.modules():  # measure from a fresh state, as a training step starts
            if isinstance(m, base.MemoryModule):
                m.reset()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
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


def _wrap(block: nn.Module, compressor: BaseSpikeCompressor, n_chunk: Optional[int] = None) -> nn.Module:
    if n_chunk is None:
        container = GCContainer(compressor, block)
    else:
        container = TCGCContainer(compressor, block, n_chunk=n_chunk)
    setattr(container, _MARK, True)
    container.train(block.training)
    return container


class _SpatialSplit(nn.Sequential):
    """A block cut into parts that run one after another, each its own GC segment."""

    def __init__(self, block: nn.Module, segments: Sequence[nn.Module]):
        super().__init__(*segments)
        self.__dict__["_block"] = block  # the original block, kept out of the module tree
        setattr(self, _MARK, True)
        self.train(block.training)


class _Merged(nn.Module):
    """Placeholder at the site of a block that runs inside the temporal segment of an earlier sibling."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["_block"] = block  # kept out of the module tree: its parameters live in the segment
        setattr(self, _MARK, True)
        self.train(block.training)

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"runs inside the temporal segment before it ({type(self.__dict__['_block']).__name__})"


def _group(blocks: Sequence[nn.Module], compressor: BaseSpikeCompressor, n_chunk: Optional[int]) -> nn.Module:
    """Consecutive sibling blocks as one GC segment (``n_chunk``: temporal chunks)."""
    container = _wrap(blocks[0], compressor, n_chunk)
    for i, block in enumerate(blocks[1:], 1):
        container.add_module(str(i), block)
    return container


def _original(container: nn.Module) -> nn.Module:
    if isinstance(container, (_SpatialSplit, _Merged)):
        block = container.__dict__["_block"]
    else:
        block = container[0]
    block.train(container.training)
    return block


# ----------------------------------------------------------------------------- public: apply_gc / unwrap_gc


def apply_gc(net: nn.Module, block_types, compress: Union[str, BaseSpikeCompressor, None] = "auto", dummy_input=None):
    """Wrap every submodule of the given types in a :class:`~snnkit.memopt.GCContainer`, in place.

    Blocks inside an existing GC segment, and blocks already wrapped, are left
    alone; nested containers (``nn.Sequential``, ``nn.ModuleList``, custom
    modules, residual blocks) are searched recursively, and a matching block is
    wrapped as a whole (the search does not enter it).

    Args:
        net: The network, modified in place.
        block_types: A module type or a tuple of types to wrap.
        compress: How each block's input is stored: ``"auto"`` (probe the
            inputs with one no-grad forward of ``dummy_input``: binary ->
            :class:`~snnkit.memopt.BitSpikeCompressor`, otherwise
            :class:`~snnkit.memopt.NullSpikeCompressor`; without ``dummy_input``
            every block gets ``NullSpikeCompressor``, and the log says so),
            ``"bit"``, ``None`` (no compression) or a compressor instance (each
            block gets a copy). A block's own ``x_compressor`` attribute (an
            instance, or a class name such as ``"Uint8SpikeCompressor"``) wins.
        dummy_input: A tensor or tuple of the net's inputs, for ``"auto"``.
            Probing leaves the net's state (memories, BatchNorm statistics, RNG,
            gradients) as it was.

    Returns:
        ``net``.

    Raises:
        TypeError: if ``block_types`` is not a module type (or tuple of them).
        ValueError: for an unknown ``compress``, a bad ``x_compressor``
            attribute, a root module that is itself a block, or a
            ``dummy_input`` the net cannot run.

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit import layer, neuron
        >>> from snnkit.memopt import GCContainer, apply_gc, unwrap_gc
        >>> class Block(nn.Sequential):
        ...     pass
        >>> net = nn.Sequential(layer.Linear(4, 8, step_mode="m"), neuron.IFNode(step_mode="m"),
        ...                     Block(layer.Linear(8, 8, step_mode="m"), neuron.IFNode(step_mode="m")),
        ...                     Block(layer.Linear(8, 8, step_mode="m"), neuron.IFNode(step_mode="m")))
        >>> net = apply_gc(net, Block, dummy_input=torch.rand(3, 2, 4))
        >>> isinstance(net[2], GCContainer), type(net[2].x_compressor).__name__
        (True, 'BitSpikeCompressor')
        >>> type(unwrap_gc(net)[2]).__name__
        'Block'
    """
    types = _check_block_types(block_types)
    _check_compress(compress)
    if isinstance(net, types) and not (isinstance(net, GCContainer) or _is_ours(net)):
        raise ValueError(
            f"snnkit.memopt: the root module {type(net).__name__} is itself one of block_types; "
            "wrap its children or pass a parent module"
        )
    sites = _find_blocks(net, types)
    if not sites:
        names = ", ".join(t.__name__ for t in types)
        warnings.warn(
            f"snnkit.memopt: apply_gc found no unwrapped submodule of type {names} in {type(net).__name__}; "
            "the net is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return net
    binary: Dict[int, bool] = {}
    if compress == "auto":
        if dummy_input is None:
            _log.info("apply_gc: no dummy_input, so every block without x_compressor gets NullSpikeCompressor")
        else:
            binary = _probe_binary(net, [s.block for s in sites], _as_inputs(dummy_input))
    done: Dict[int, nn.Module] = {}
    for site in sites:
        key = id(site.block)
        if key not in done:
            comp = _choose_compressor(site.block, compress, binary.get(key))
            done[key] = _wrap(site.block, comp)
            _log.debug("apply_gc: %s (%s) -> GCContainer(%s)", site.path, type(site.block).__name__, type(comp).__name__)
        site.put(done[key])
    return net


def unwrap_gc(net: nn.Module) -> nn.Module:
    """Undo :func:`apply_gc` and :func:`memory_optimization`: put the original blocks back, in place.

    Only containers made by those two functions are removed; a
    :class:`~snnkit.memopt.GCContainer` built by hand stays.

    Returns:
        ``net``.
    """

    def walk(parent):
        for name, child in list(parent.named_children()):
            if _is_ours(child):
                setattr(parent, name, _original(child))
            else:
                walk(child)

    walk(net)
    return net


# ----------------------------------------------------------------------------- planner: data


@dataclasses.dataclass
class _Cost:
    """Bytes a block costs in one configuration (see the module docstring)."""

    retained: int  # kept from the block's forward until its backward
    fwd: int  # forward peak above the live bytes at its entry (output included)
    bwd: int  # backward peak above the live bytes at its start


class _Block:
    """One planner unit: a block, its recorded input and its costs per configuration."""

    def __init__(self, site: _Site):
        self.site, self.block, self.path = site, site.block, site.path
        self.calls = 0
        self.x: Optional[torch.Tensor] = None
        self.state: List[Any] = []
        self.binary = False
        self.in_bytes = self.out_bytes = self.state_bytes = 0
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.block.parameters() if p.requires_grad)
        self.t_fwd = self.t_bwd = 0.0
        self.costs: Dict[Any, _Cost] = {}
        self.modules: Dict[Any, nn.Module] = {}
        self.compressors: Dict[Any, str] = {}
        self.config: Any = "gc"
        self.tried = False
        self.scale = 1.0  # measured on a slice of the batch: bytes and times times this

    def scaled(self, nbytes: int, fixed: int = 0) -> int:
        """Bytes at the full batch from bytes measured on the slice (``fixed``: batch-independent part)."""
        return int(round(fixed + (nbytes - fixed) * self.scale))

    def rescale(self, scale: float) -> None:
        self.scale = scale
        for name in ("in_bytes", "out_bytes", "state_bytes", "fwd_gc", "plain_saved", "plain_new"):
            setattr(self, name, self.scaled(getattr(self, name)))
        self.bwd_gc = self.scaled(self.bwd_gc, self.param_bytes)
        self.t_fwd, self.t_bwd = self.t_fwd * scale, self.t_bwd * scale

    @property
    def cost(self) -> _Cost:
        return self.costs[self.config]

    def multistep(self) -> bool:
        steps = [m for m in self.block.modules() if isinstance(m, StepModule)]
        return bool(steps) and all(m.step_mode == "m" for m in steps) and self.x is not None and self.x.dim() >= 2


def _model_events(blocks: List[_Block]) -> List[int]:
    peaks, before = [], 0
    grads_after = sum(b.param_bytes for b in blocks)
    for b in blocks:
        c = b.cost
        grads_after -= b.param_bytes
        peaks.append(max(before + b.in_bytes + c.fwd, before + c.retained + b.out_bytes + c.bwd + grads_after))
        before += c.retained
    return peaks


def _model_peak(blocks: List[_Block]) -> Tuple[int, int, str]:
    """Estimated step peak of the current plan: ``(bytes, block index, "forward" | "backward")``."""
    best = (-1, 0, "forward")
    before = 0
    grads_after = sum(b.param_bytes for b in blocks)
    for k, b in enumerate(blocks):
        c = b.cost
        grads_after -= b.param_bytes
        fwd = before + b.in_bytes + c.fwd
        bwd = before + c.retained + b.out_bytes + c.bwd + grads_after
        best = max(best, (fwd, k, "forward"), (bwd, k, "backward"))
        before += c.retained
    return best


class _Progress:
    """tqdm when installed, else one line per stage on stderr; silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.bar, self.enabled, self.total, self.n = None, enabled, total, 0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="memory_optimization", leave=False)

    def step(self, stage: str) -> None:
        self.n += 1
        _log.debug("memory_optimization: %s", stage)
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
            self.bar.update(1)
        elif self.enabled:
            print(f"memory_optimization [{self.n}/{self.total}] {stage}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- planner: summary


@dataclasses.dataclass
class MemOptSummary:
    """What :func:`memory_optimization` did, and what it expects.

    Attributes:
        rows: One dict per block, in forward order: ``path``, ``type``,
            ``action`` (``"gc"``, ``"spatial"``, ``"temporal"`` or
            ``"unwrapped"``), ``parts`` (spatial parts or temporal chunks, 1
            otherwise), ``compressor`` (class names, ``"/"``-joined for spatial
            parts, ``"-"`` when unwrapped), ``retained_bytes`` and
            ``recompute_s`` (forward time the plan recomputes in backward),
            ``segment`` (path of the block whose site holds the block's GC
            segment: itself, or the first block of a temporal segment over
            several consecutive blocks, whose other sites hold placeholders;
            ``retained_bytes`` is not modelled for those and reads 0).
        peak_before: Peak live tensor bytes of a plain step (estimated from
            the measurements, calibrated by the verification step).
        peak_after: Peak of a step of the planned net (measured when
            ``verified``, else estimated).
        peak_after_estimate: The planner's own estimate of ``peak_after``.
        est_slowdown: Estimated step time of the plan over a plain step.
        plain_step_s: Estimated time of a plain step.
        planning_s: Wall time of planning.
        level: The level the planner ran.
        verified: Whether ``peak_after`` was measured on a real step.
    """

    rows: List[Dict[str, Any]]
    peak_before: int
    peak_after: int
    peak_after_estimate: int
    est_slowdown: float
    plain_step_s: float
    planning_s: float
    level: int
    verified: bool

    @property
    def wrapped(self) -> List[str]:
        """Paths of blocks that are GC segments (any kind)."""
        return [r["path"] for r in self.rows if r["action"] != "unwrapped"]

    @property
    def spatial(self) -> List[str]:
        return [r["path"] for r in self.rows if r["action"] == "spatial"]

    @property
    def temporal(self) -> Dict[str, int]:
        return {r["path"]: r["parts"] for r in self.rows if r["action"] == "temporal"}

    @property
    def unwrapped(self) -> List[str]:
        return [r["path"] for r in self.rows if r["action"] == "unwrapped"]

    @property
    def compressors(self) -> Dict[str, str]:
        return {r["path"]: r["compressor"] for r in self.rows}

    @property
    def ratio(self) -> float:
        """``peak_before / peak_after``."""
        return self.peak_before / max(self.peak_after, 1)

    def __str__(self) -> str:
        mib = 2.0**20
        head = f"{'block':<24} {'type':<18} {'action':<10} {'parts':>5} {'compressor':<40} {'kept MiB':>9} {'recompute ms':>12}"
        lines = [f"memory_optimization (level {self.level})", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['path'][:24]:<24} {r['type'][:18]:<18} {r['action']:<10} {r['parts']:>5} "
                f"{r['compressor'][:40]:<40} {r['retained_bytes'] / mib:>9.2f} {1e3 * r['recompute_s']:>12.1f}"
            )
        kind = "measured" if self.verified else "estimated"
        lines += [
            "-" * len(head),
            f"peak before {self.peak_before / mib:.1f} MiB (estimated), after {self.peak_after / mib:.1f} MiB ({kind}): "
            f"{self.ratio:.2f}x less",
            f"estimated slowdown {self.est_slowdown:.2f}x of a plain step ({1e3 * self.plain_step_s:.0f} ms); "
            f"planning took {self.planning_s:.2f} s",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- planner: measuring


def _loss(out, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out)
    outs = [t for t in _tensors(out) if t.requires_grad]
    if not outs:
        raise ValueError("snnkit.memopt: the net's output does not require grad, so there is no backward to plan for")
    return sum(t.sum() for t in outs)


class _SavedBytes:
    """Saved-tensor hooks that add up the distinct storages autograd keeps (parameters excluded)."""

    def __init__(self, exclude: set):
        self.exclude, self.storages = exclude, {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)


def _batch_slice(net: nn.Module, inputs: tuple, batch_dim: Optional[int]) -> Tuple[tuple, float]:
    """The inputs cut to one sample along the batch dimension, and the batch size (the scale)."""
    if batch_dim is None:
        batch_dim = int(any(isinstance(m, StepModule) and m.step_mode == "m" for m in net.modules()))
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() <= batch_dim or first.shape[batch_dim] <= 1:
        return inputs, 1.0
    n = first.shape[batch_dim]
    cut = tuple(
        t.narrow(batch_dim, 0, 1) if isinstance(t, torch.Tensor) and t.dim() > batch_dim and t.shape[batch_dim] == n else t
        for t in inputs
    )
    return cut, float(n)


def _cut_step(net: nn.Module, blocks: List[_Block], inputs: tuple, loss_fn) -> float:
    """One training step of the layer-wise GC net, cut at every block (see the module docstring).

    Fills each block's input, state, sizes, times and ``gc``/``plain`` measurements; returns its wall time.
    """
    by_id = {id(b.site.parent._modules[b.site.name]): b for b in blocks}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    cuts, open_trackers, handles = [], [], []

    def pre(container, args):
        b = by_id[id(container)]
        b.calls += 1
        xs = _tensors(args)
        b.x = xs[0].detach() if xs else None
        b.binary, b.in_bytes = _is_binary(b.x), _nbytes(b.x)
        b.state = base.extract_memories(b.block)
        b.state_bytes = _nbytes(b.state)
        tracker = MemoryTracker()
        tracker.__enter__()
        open_trackers.append((tracker, time.perf_counter()))

    def post(container, args, out):
        b = by_id[id(container)]
        tracker, t0 = open_trackers.pop()
        tracker.__exit__(None, None, None)
        b.t_fwd, b.fwd_gc = time.perf_counter() - t0, tracker.peak_bytes
        b.out_bytes = _nbytes(out)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return None
        leaf = out.detach().requires_grad_()
        cuts.append((b, out, leaf))
        return leaf

    for b in blocks:
        container = b.site.parent._modules[b.site.name]
        handles += [container.register_forward_pre_hook(pre), container.register_forward_hook(post)]
    t_start = time.perf_counter()
    try:
        out = _run(net, inputs)
    finally:
        for h in handles:
            h.remove()
        while open_trackers:
            open_trackers.pop()[0].__exit__(None, None, None)
    loss = _loss(out, loss_fn)
    del out
    loss.backward()
    del loss
    while cuts:
        b, out, leaf = cuts.pop()
        grad, leaf.grad = leaf.grad, None
        if grad is None:
            continue
        t0 = time.perf_counter()
        with _SavedBytes(params) as saved, MemoryTracker() as tracker:
            torch.autograd.backward(out, grad)
        b.t_bwd, b.bwd_gc = time.perf_counter() - t0, tracker.peak_bytes
        x_ptr = b.x.untyped_storage().data_ptr() if b.x is not None else None
        b.plain_saved = sum(saved.storages.values())
        b.plain_new = b.plain_saved - (b.in_bytes if x_ptr in saved.storages else 0)
        del out, leaf, grad
    return time.perf_counter() - t_start


def _measure_candidate(b: _Block, module: nn.Module) -> _Cost:
    """Run ``module`` (a replacement of block ``b``) alone on the block's recorded input: its costs."""
    base.load_memories(b.block, b.state)
    x = b.x.detach().requires_grad_(b.x.is_floating_point())
    with MemoryTracker() as tracker:
        out = module(x)
    fwd, retained = tracker.peak_bytes, tracker.retained_bytes - _nbytes(out)
    with MemoryTracker() as tracker:
        out.backward(torch.ones_like(out))
    for p in module.parameters():
        p.grad = None
    return _Cost(max(b.scaled(retained), 0), b.scaled(fwd), b.scaled(tracker.peak_bytes, b.param_bytes))


def _compressed_bytes(comp: BaseSpikeCompressor, x: torch.Tensor) -> int:
    if isinstance(comp, NullSpikeCompressor):
        return 0
    try:
        return int(comp.compress(x).nbytes)
    except (ValueError, RuntimeError):
        return x.numel() * x.element_size()


def _gc_and_plain_costs(b: _Block, comp: BaseSpikeCompressor) -> None:
    packed = b.scaled(_compressed_bytes(comp, b.x))
    null = isinstance(comp, NullSpikeCompressor)
    kept = (b.in_bytes if null else packed) + b.state_bytes
    b.costs["gc"] = _Cost(kept, b.fwd_gc + packed, b.bwd_gc + (0 if null else b.in_bytes))
    b.costs["plain"] = _Cost(b.plain_saved + b.state_bytes, b.fwd_gc + b.plain_new, max(0, b.bwd_gc - b.plain_new))
    b.compressors["gc"] = type(comp).__name__
    b.compressors["plain"] = "-"


def _spatial_parts(block: nn.Module) -> Optional[List[nn.Module]]:
    split = getattr(block, "__spatial_split__", None)
    if callable(split):
        parts = list(split())
        if not all(isinstance(p, nn.Module) for p in parts):
            raise TypeError(f"snnkit.memopt: {type(block).__name__}.__spatial_split__() must return nn.Modules")
    elif isinstance(block, nn.Sequential):
        parts = list(block)
    else:
        return None
    return parts if len(parts) >= 2 else None


def _spatial_candidate(b: _Block, compress, comp: BaseSpikeCompressor) -> Optional[nn.Module]:
    parts = _spatial_parts(b.block)
    if parts is None:
        return None
    base.load_memories(b.block, b.state)
    binary, h = [], b.x
    with torch.no_grad():
        for part in parts:
            binary.append(_is_binary(h))
            h = part(h)
    comps = [comp if i == 0 and getattr(p, "x_compressor", None) is None else _choose_compressor(p, compress, binary[i])
             for i, p in enumerate(parts)]
    b.compressors[("spatial", len(parts))] = "/".join(type(c).__name__ for c in comps)
    return _SpatialSplit(b.block, [_wrap(p, c) for p, c in zip(parts, comps)])


def _measure(b: _Block, key, module: Optional[nn.Module]) -> bool:
    """Measure candidate ``key`` of ``b``; False when there is none or it does not lower the block's own peak."""
    if module is None:
        return False
    b.costs[key], b.modules[key] = _measure_candidate(b, module), module
    old, b.config = b.config, key
    own = _model_events([b])[0]
    b.config = old
    _log.debug("memory_optimization: %s as %s -> own peak %d", b.path, key, own)
    return True


def _objective(blocks: List[_Block]) -> List[int]:
    """Estimated peaks of all blocks, highest first: compared lexicographically (the peak, then the next...)."""
    return sorted(_model_events(blocks), reverse=True)


def _descend(blocks: List[_Block]) -> None:
    """Coordinate descent over the measured configurations (never ``plain``): only better objectives are kept."""
    for _ in range(3):
        changed = False
        for b in blocks:
            keys = [k for k in b.costs if k != "plain"]
            best_key, best = b.config, _objective(blocks)
            for key in keys:
                b.config = key
                obj = _objective(blocks)
                if obj < best:
                    best_key, best = key, obj
            changed |= best_key != b.config
            b.config = best_key
        if not changed:
            return


# ----------------------------------------------------------------------------- planner: public


def _plan(blocks: List[_Block], level: int, compress, temporal: bool, progress: _Progress, split: bool = True) -> int:
    if level >= 2 and split:
        progress.step("split the peak segment")
        while True:
            _, k, phase = _model_peak(blocks)
            b = blocks[k]
            if b.tried:
                break
            b.tried = True
            _log.debug("memory_optimization: the peak is in the %s of %s", phase, b.path)
            comp = _choose_compressor(b.block, compress, b.binary)
            if not isinstance(comp, NullSpikeCompressor):  # replace the estimate by a measurement
                b.costs["gc"] = _measure_candidate(b, _wrap(b.block, copy.deepcopy(comp)))
            _measure(b, ("spatial", 0), _spatial_candidate(b, compress, comp))
            if level >= 3 and temporal and b.multistep():
                n, own = 2, _model_events([b])[0]
                while n <= b.x.shape[0]:
                    b.compressors[("temporal", n)] = type(comp).__name__
                    _measure(b, ("temporal", n), _wrap(b.block, copy.deepcopy(comp), n_chunk=n))
                    old, b.config = b.config, ("temporal", n)
                    now = _model_events([b])[0]
                    b.config = old
                    if now >= own:
                        break
                    n, own = n * 2, now
            _descend(blocks)
    best = _model_peak(blocks)[0]
    if level >= 4:
        progress.step("greedy unwrap")
        order = sorted(
            (b for b in blocks if b.calls == 1),
            key=lambda b: (b.costs["plain"].retained - b.cost.retained) / max(b.t_fwd, 1e-9),
        )
        for b in order:
            old, b.config = b.config, "plain"
            peak = _model_peak(blocks)[0]
            if peak <= best:
                best = peak
                _log.debug("memory_optimization: unwrapped %s -> estimated peak %d", b.path, peak)
            else:
                b.config = old
    return best


def _chains(blocks: List[_Block]) -> List[List[_Block]]:
    """Runs of blocks that are consecutive children of one ``nn.Sequential`` (each run once, multi-step)."""
    chains: List[List[_Block]] = []
    for b in blocks:
        ok = b.calls == 1 and isinstance(b.site.parent, nn.Sequential) and b.multistep()
        b.steps = b.x.shape[0] if ok else 0
        prev = chains[-1][-1] if chains else None
        if ok and prev is not None and prev.site.parent is b.site.parent:
            names = list(b.site.parent._modules)
            if names.index(b.site.name) == names.index(prev.site.name) + 1:
                chains[-1].append(b)
                continue
        if ok:
            chains.append([b])
    return [c for c in chains if len(c) >= 2]


def _family(chain: List[_Block], size: int, n_chunk: int, plain_tail: int = 0) -> List[Tuple[int, int, Any]]:
    """Groups ``(start, end, kind)`` of ``size`` blocks, each a temporal segment, the last ``plain_tail`` plain."""
    groups = [(k, min(k + size, len(chain)), n_chunk) for k in range(0, len(chain), size)]
    for start, end, _ in groups[len(groups) - plain_tail :] if plain_tail else []:
        groups.remove((start, end, n_chunk))
        groups += [(i, i + 1, "plain") for i in range(start, end)]
    return groups


def _put_groups(chain: List[_Block], groups, compress) -> None:
    for start, end, kind in groups:
        head = chain[start]
        if kind == "plain":
            for b in chain[start:end]:
                b.site.put(b.block)
            continue
        comp = _choose_compressor(head.block, compress, head.binary)
        head.site.put(_group([b.block for b in chain[start:end]], comp, kind))
        for b in chain[start + 1 : end]:
            b.site.put(_Merged(b.block))


class _ScaledTracker(MemoryTracker):
    """A tracker whose :attr:`scaled_peak` is the peak of ``fixed + scale * rest`` bytes.

    ``fixed`` are storages of tensors shaped like a parameter (parameter
    gradients and their per-chunk copies, which do not grow with the batch),
    ``rest`` everything else: on a one-sample step with ``scale`` the batch
    size this estimates the peak of the full batch.
    """

    def __init__(self, scale: float, fixed_shapes: set):
        super().__init__()
        self.scale, self.fixed_shapes = scale, fixed_shapes
        self.scaled_peak, self._fixed, self._rest, self._kind, self._next = 0.0, 0, 0, {}, False

    def _track(self, t: torch.Tensor) -> None:
        self._next = tuple(t.shape) in self.fixed_shapes
        super()._track(t)

    def _add(self, storage, is_new: bool) -> None:
        key = storage._cdata
        if storage.nbytes() == 0 or key in self._live:
            return
        super()._add(storage, is_new)
        self._kind[key] = (self._next, storage.nbytes())
        if self._next:
            self._fixed += storage.nbytes()
        else:
            self._rest += storage.nbytes()
        self.scaled_peak = max(self.scaled_peak, self._fixed + self.scale * self._rest)

    def _free(self, key) -> None:
        kind = self._kind.pop(key, None)
        if kind is not None and self._active:
            if kind[0]:
                self._fixed -= kind[1]
            else:
                self._rest -= kind[1]
        super()._free(key)


def _sample_peak(net: nn.Module, inputs: tuple, loss_fn, scale: float = 1.0) -> int:
    """Peak live tensor bytes of one real training step, scaled to the batch (state and gradients left alone)."""
    shapes = {tuple(p.shape) for p in net.parameters() if p.requires_grad}
    with _StateGuard(net):
        for p in net.parameters():
            p.grad = None
        with _ScaledTracker(scale, shapes) as tracker:
            _loss(_run(net, inputs), loss_fn).backward()
    return int(round(tracker.scaled_peak))


def _search_groups(net, chains, inputs, loss_fn, compress, deadline: float, scale: float, best: int,
                   max_trials: int):
    """Temporal segments over consecutive blocks, measured by real steps on ``inputs`` (one sample).

    From segments of 2 blocks and 4 chunks, the last segments of each chain
    are unwrapped, then larger segments and more chunks are tried; every
    candidate is one step, and the search stops after ``max_trials`` candidates
    or when ``deadline`` passes (the first candidate always runs). ``best``
    is the estimated peak of the current plan. Returns ``(peak, {chain index:
    groups})``; ``{}`` keeps the current plan.
    """
    saved = [b.site.parent._modules[b.site.name] for c in chains for b in c]
    longest, steps = max(len(c) for c in chains), min(c[0].steps for c in chains)
    tried: Dict[Tuple[int, int, int], int] = {}

    def trial(size, n, tail=0) -> int:
        key = (size, n, tail)
        if key not in tried:
            for chain in chains:
                _put_groups(chain, _family(chain, size, min(n, chain[0].steps), tail), compress)
            tried[key] = _sample_peak(net, inputs, loss_fn, scale)
            _log.debug("memory_optimization: %d-block temporal segments of %d chunks, last %d plain -> %d",
                       size, n, tail, tried[key])
        return tried[key]

    try:
        return _climb(trial, tried, best, longest, steps, deadline, chains, max_trials)
    finally:  # back to the plan of the analytic stages; the caller applies the choice
        k = 0
        for chain in chains:
            for b in chain:
                b.site.put(saved[k])
                k += 1


def _climb(trial, tried, best, longest, steps, deadline, chains, max_trials):
    def more() -> bool:
        return time.perf_counter() <= deadline and len(tried) < max_trials

    if trial(2, 4) >= best:
        return best, {}
    best, (size, n), tail = tried[(2, 4, 0)], (2, 4), 0
    groups = min(-(-len(c) // size) for c in chains)
    while more() and tail + 1 < groups:  # unwrap the last segments while the peak does not rise
        if trial(size, n, tail + 1) > best:
            break
        best, tail = tried[(size, n, tail + 1)], tail + 1
    moved = True
    while moved and more():  # then larger segments or more chunks, while the peak goes down
        moved = False
        for cand in ((size + 1, n), (size, 2 * n)):
            if 1 <= cand[0] <= longest and 2 <= cand[1] <= steps and cand + (tail,) not in tried and more():
                if trial(*cand, tail) < best:
                    best, (size, n), moved = tried[(*cand, tail)], cand, True
                    break
    return best, {i: _family(c, size, min(n, c[0].steps), tail) for i, c in enumerate(chains)}


def _realize(b: _Block, compress) -> nn.Module:
    if b.config == "plain":
        return b.block
    if b.config == "gc":
        return _wrap(b.block, _choose_compressor(b.block, compress, b.binary))
    return b.modules[b.config]


def _row(b: _Block) -> Dict[str, Any]:
    if getattr(b, "group", None) is not None and b.group[1] != "plain":
        head, n = b.group
        return {
            "path": b.path,
            "type": type(b.block).__name__,
            "action": "temporal",
            "parts": n,
            "compressor": b.compressors.get("gc", "-") if head == b.path else "-",
            "retained_bytes": 0,
            "recompute_s": b.t_fwd,
            "segment": head,
        }
    key = b.config
    action = {"plain": "unwrapped", "gc": "gc"}.get(key) if isinstance(key, str) else key[0]
    parts = len(b.modules[key]) if action == "spatial" else (key[1] if action == "temporal" else 1)
    return {
        "path": b.path,
        "type": type(b.block).__name__,
        "action": action,
        "parts": parts,
        "compressor": b.compressors.get(key, "-"),
        "retained_bytes": b.cost.retained,
        "recompute_s": 0.0 if key == "plain" else b.t_fwd,
        "segment": b.path,
    }


def memory_optimization(
    net: nn.Module,
    block_types,
    dummy_input,
    level: int = 4,
    return_summary: bool = False,
    progress: bool = False,
    compress: Union[str, BaseSpikeCompressor, None] = "auto",
    temporal: bool = True,
    verify: bool = False,
    loss_fn=None,
    batch_dim: Optional[int] = None,
    budget: float = 3.0,
):
    """Plan gradient checkpointing for ``net`` automatically, in place.

    Levels: 0 nothing; 1 layer-wise GC (as :func:`apply_gc`); 2 + spatial split
    of the peak segment; 3 + temporal split; 4 + greedy unwrap. See the module
    docstring for how the peak is estimated without a training step per
    candidate, and for what limits it.

    Args:
        net: The network (its state, BatchNorm statistics, RNG and gradients
            are left as they were).
        block_types: Module type(s) whose instances become GC segments.
        dummy_input: A tensor or tuple of the net's inputs for one
            representative training step.
        level: 0 to 4.
        return_summary: Also return a :class:`MemOptSummary`.
        progress: Show a progress bar (tqdm when installed, else lines on stderr).
        compress: Compressor policy, as in :func:`apply_gc`.
        temporal: Allow temporal splits (BatchNorm inside one normalises per
            chunk: pass ``False`` when gradients must match a plain net exactly).
        verify: Measure the final plan with one real full-batch step (else
            report the estimate; off by default, as it costs a step).
        loss_fn: Maps the net's output to a scalar loss (default: sum of the outputs).
        batch_dim: The batch dimension of ``dummy_input`` (default: 1 for nets
            with multi-step modules, else 0). Blocks are measured on one sample
            and the bytes scaled by the batch size, which makes planning cost
            a fraction of a step; nets that do not run on one sample are
            measured on the whole batch.
        budget: Planning budget in plain training steps (see the module
            docstring); more lets the segment search try more candidates.

    Returns:
        ``net``, or ``(net, summary)`` with ``return_summary=True``.

    Raises:
        ValueError: for a bad ``level`` or ``compress``, or a ``dummy_input``
            the net cannot run.
        TypeError: for bad ``block_types``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit import layer, neuron
        >>> from snnkit.memopt import memory_optimization
        >>> class Block(nn.Sequential):
        ...     pass
        >>> net = nn.Sequential(*[Block(layer.Linear(16, 16, step_mode="m"), neuron.IFNode(step_mode="m"))
        ...                       for _ in range(3)])
        >>> net, summary = memory_optimization(net, Block, torch.rand(4, 2, 16), return_summary=True)
        >>> len(summary.rows)
        3
    """
    if level not in (0, 1, 2, 3, 4):
        raise ValueError(f"snnkit.memopt: level must be 0, 1, 2, 3 or 4, got {level!r}")
    types = _check_block_types(block_types)
    _check_compress(compress)
    if level > 0:  # the first dispatch mode of a process pays a one-time import of torch internals (~1 s)
        with MemoryTracker():
            torch.zeros(1).add_(1)
    t_start = time.perf_counter()
    sites = _find_blocks(net, types) if level > 0 else []
    if level > 0 and not sites:
        warnings.warn(
            f"snnkit.memopt: memory_optimization found no unwrapped submodule of type "
            f"{', '.join(t.__name__ for t in types)} in {type(net).__name__}; the net is unchanged",
            UserWarning,
            stacklevel=2,
        )
    if not sites:
        summary = MemOptSummary([], 0, 0, 0, 1.0, 0.0, time.perf_counter() - t_start, level, False)
        return (net, summary) if return_summary else net
    if isinstance(net, types):
        raise ValueError(f"snnkit.memopt: the root module {type(net).__name__} is itself one of block_types")
    inputs = _as_inputs(dummy_input)
    bar = _Progress(progress, 2 + (level >= 2) + (level >= 3 and temporal) + (level >= 4) + verify)
    blocks = [_Block(s) for s in sites]
    for b in blocks:
        b.site.put(_wrap(b.block, NullSpikeCompressor()))
    try:
        with _StateGuard(net):
            bar.step("measure one cut step of the layer-wise GC net")
            sliced, scale = _batch_slice(net, inputs, batch_dim)
            try:
                step_s = _cut_step(net, blocks, sliced, loss_fn) * scale
            except ValueError:
                if scale == 1.0:
                    raise
                _log.debug("memory_optimization: the net does not run on a slice of the batch; measuring it whole")
                blocks = [_Block(b.site) for b in blocks]
                step_s, scale = _cut_step(net, blocks, inputs, loss_fn), 1.0
                sliced = inputs
            for b in blocks:
                b.rescale(scale)
            for b in blocks:
                if b.calls == 0:  # not reached by dummy_input: leave it a GC segment, costs nothing here
                    b.x, b.tried = torch.zeros(0), True
                    b.costs = {"gc": _Cost(0, 0, 0), "plain": _Cost(0, 0, 0)}
                    b.compressors = {"gc": "NullSpikeCompressor", "plain": "-"}
                else:
                    _gc_and_plain_costs(b, _choose_compressor(b.block, compress, b.binary))
            if any(b.calls > 1 for b in blocks) and level > 1:
                _log.info("memory_optimization: a block runs more than once per step; planning stops at level 1")
                level = 1
            chains = _chains(blocks) if level >= 3 and temporal else []
            # every block in a chain: the segment search below replaces the single-block splits
            covered = {id(b) for c in chains for b in c} >= {id(b) for b in blocks if b.calls > 0}
            estimate = _plan(blocks, level, compress, temporal, bar, split=not covered)
    except BaseException:
        for b in blocks:
            b.site.put(b.block)
        bar.close()
        raise
    plain_step = max(step_s - sum(b.t_fwd for b in blocks), 1e-9)
    for b in blocks:
        b.x, b.state, b.group = None, [], None
        b.site.put(_realize(b, compress))
    if chains:
        bar.step("temporal segments over consecutive blocks")
        deadline = t_start + (budget - 0.4) * plain_step
        try:
            trials = max(1, int(round(budget)) - 1)  # the cut step costs about half a step, a candidate up to one
            sample, choice = _search_groups(net, chains, sliced, loss_fn, compress, deadline, scale, estimate, trials)
        except BaseException:
            for b in blocks:
                b.site.put(b.block)
            bar.close()
            raise
        if choice:
            estimate = sample
            for i, chain in enumerate(chains):
                _put_groups(chain, choice[i], compress)
                for start, end, kind in choice[i]:
                    for b in chain[start:end]:
                        b.group = (chain[start].path, kind)
                        b.config = "plain" if kind == "plain" else b.config
    recompute = sum(b.t_fwd for b in blocks if b.config != "plain")
    measured = estimate
    if verify:
        bar.step("verify the plan with one step")
        with _StateGuard(net):
            for p in net.parameters():
                p.grad = None
            with MemoryTracker() as tracker:
                _loss(_run(net, inputs), loss_fn).backward()
            measured = tracker.peak_bytes
    for b in blocks:
        b.config, old = "plain", b.config
        b.config_final = old
    before = _model_peak(blocks)[0] + (measured - estimate)
    for b in blocks:
        b.config = b.config_final
    bar.step("done")
    bar.close()
    summary = MemOptSummary(
        rows=[_row(b) for b in blocks],
        peak_before=max(before, 0),
        peak_after=measured,
        peak_after_estimate=estimate,
        est_slowdown=(plain_step + recompute) / plain_step,
        plain_step_s=plain_step,
        planning_s=time.perf_counter() - t_start,
        level=level,
        verified=verify,
    )
    _log.debug("memory_optimization:\n%s", summary)
    return (net, summary) if return_summary else net
