"""Private: the planner behind :func:`~snnkit.memopt.memory_optimization` (cost model, measuring, search).

How it measures and what limits it is described in :mod:`snnkit.memopt.pipeline`.
"""
import copy
import dataclasses
import logging
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import _disable_current_modes

from .. import base
from ..base import StepModule
from ._wrapping import (
    _choose_compressor,
    _group,
    _is_binary,
    _Merged,
    _nbytes,
    _run,
    _Site,
    _runs_in_sequence,
    _spatial_parts,
    _SpatialSplit,
    _StateGuard,
    _tensors,
    _wrap,
)
from .checkpointing import _single_step_modules
from .compress import BaseSpikeCompressor, NullSpikeCompressor
from .tracker import MemoryTracker, _SavedBytes

_log = logging.getLogger(__package__ + ".pipeline")  # the planner logs under the public module's name


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
        self.rest: tuple = ()  # the block's other arguments (its last call's)
        self.state: List[Any] = []
        self.binary = False
        self.in_bytes = self.out_bytes = self.state_bytes = 0
        # measured by the cut step; they stay 0 for a block it does not reach or whose output needs no grad
        self.fwd_gc = self.bwd_gc = self.plain_saved = self.plain_new = 0
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.block.parameters() if p.requires_grad)
        self.t_fwd = 0.0
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
        self.t_fwd *= scale

    @property
    def cost(self) -> _Cost:
        return self.costs[self.config]

    def multistep(self) -> bool:
        """Whether the block runs a sequence ``[T, N, *]`` at once (a temporal split is possible)."""
        steps = [m for m in self.block.modules() if isinstance(m, StepModule)]
        return (
            any(m.step_mode == "m" for m in steps)
            and not _single_step_modules(self.block)  # single-step layers inside SeqToANNContainer are fine
            and self.x is not None
            and self.x.dim() >= 2
            and not any(isinstance(a, torch.Tensor) for a in self.rest)  # only the first input is chunked
        )


def _phases(blocks: List[_Block], cost=None) -> List[Tuple[int, int]]:
    """Estimated ``(forward, backward)`` peak of each block of the plan, in bytes.

    ``cost(b)`` picks each block's configuration (default: the current one, ``b.cost``).
    """
    cost = cost or (lambda b: b.cost)
    out, before = [], 0
    grads_after = sum(b.param_bytes for b in blocks)
    for b in blocks:
        c = cost(b)
        grads_after -= b.param_bytes
        out.append((before + b.in_bytes + c.fwd, before + c.retained + b.out_bytes + c.bwd + grads_after))
        before += c.retained
    return out


def _model_peak(blocks: List[_Block], cost=None) -> Tuple[int, int, str]:
    """Estimated step peak of the plan: ``(bytes, block index, "forward" | "backward")``."""
    phases = _phases(blocks, cost)
    events = [(f, k, "forward") for k, (f, _) in enumerate(phases)] + [(b, k, "backward") for k, (_, b) in enumerate(phases)]
    return max(events, default=(-1, 0, "forward"))


def _own_peak(b: _Block, key) -> int:
    """Estimated peak of block ``b`` alone in configuration ``key``."""
    return max(_phases([b], cost=lambda _: b.costs[key])[0])


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


# ----------------------------------------------------------------------------- planner: measuring


def _loss(out, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        try:
            return loss_fn(out)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            shapes = ", ".join(str(list(t.shape)) for t in _tensors(out))
            raise ValueError(f"snnkit.memopt: loss_fn failed on the net's output of shape {shapes} ({e})") from e
    outs = [t for t in _tensors(out) if t.requires_grad]
    if not outs:
        raise ValueError("snnkit.memopt: the net's output does not require grad, so there is no backward to plan for")
    return sum(t.sum() for t in outs)


def _batch_slice(net: nn.Module, inputs: tuple, batch_dim: Optional[int]) -> Tuple[tuple, float]:
    """The inputs cut to one sample along the batch dimension, and the batch size (the scale)."""
    if batch_dim is None:
        batch_dim = int(any(isinstance(m, StepModule) and m.step_mode == "m" for m in net.modules()))
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() <= batch_dim or first.shape[batch_dim] <= 1:
        return inputs, 1.0
    n = first.shape[batch_dim]
    # A copy, not a view: a view would count the whole batch's storage wherever the
    # slice is saved for backward (the first block's input, for one).
    cut = tuple(
        t.narrow(batch_dim, 0, 1).clone()
        if isinstance(t, torch.Tensor) and t.dim() > batch_dim and t.shape[batch_dim] == n
        else t
        for t in inputs
    )
    return cut, float(n)


def _cut_step(net: nn.Module, blocks: List[_Block], inputs: tuple, loss_fn) -> float:
    """One training step of the layer-wise GC net, cut at every block (see the module docstring).

    Fills each block's input, state, sizes, times and ``gc``/``plain`` measurements; returns its wall time.
    """
    by_id = {id(b.site.get()): b for b in blocks}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    cuts, open_trackers, handles = [], [], []

    def pre(container, args):
        b = by_id[id(container)]
        b.calls += 1
        xs = _tensors(args)
        b.x = xs[0].detach() if xs else None
        b.rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
        # binary only if every call's input is (as apply_gc's probe decides)
        b.binary = (b.calls == 1 or b.binary) and _is_binary(b.x)
        b.in_bytes += _nbytes(b.x)  # sizes and times add up over the calls of a block called several times
        # cut the state too, as the output is cut: a block called again must not reach back
        # into its previous call's graph when the cuts run backward one by one
        b.state = [m.detach() if isinstance(m, torch.Tensor) else m for m in base.extract_memories(b.block)]
        base.load_memories(b.block, b.state)
        b.state_bytes += _nbytes(b.state)
        # Each tensor input a leaf of its own: the block's backward stops there, and its gradient
        # goes on to the cuts before it from here (not through what the loss's backward freed).
        leaves = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
                       for a in args)
        tracker = MemoryTracker()
        tracker.__enter__()
        open_trackers.append((tracker, time.perf_counter(), [(a, t) for a, t in zip(args, leaves) if t is not a]))
        return leaves

    def post(container, args, out):
        b = by_id[id(container)]
        tracker, t0, pairs = open_trackers.pop()
        tracker.__exit__(None, None, None)
        b.t_fwd += time.perf_counter() - t0
        b.fwd_gc, b.out_bytes = max(b.fwd_gc, tracker.peak_bytes), max(b.out_bytes, _nbytes(out))
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return None
        leaf = out.detach().requires_grad_()
        x = b.x.untyped_storage().data_ptr() if b.x is not None else None
        cuts.append((b, out, leaf, pairs, (x, _nbytes(b.x))))
        return leaf

    for b in blocks:
        container = b.site.get()
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
        b, out, leaf, pairs, (x_ptr, x_bytes) = cuts.pop()
        grad, leaf.grad = leaf.grad, None
        if grad is None:
            continue
        with _SavedBytes(params) as saved, MemoryTracker() as tracker:
            torch.autograd.backward(out, grad)
        b.bwd_gc = max(b.bwd_gc, tracker.peak_bytes)
        new = sum(saved.storages.values())
        b.plain_saved += new
        b.plain_new += new - (x_bytes if x_ptr in saved.storages else 0)
        del out, leaf, grad
        _pass_on(pairs, [c[2] for c in cuts])
    return time.perf_counter() - t_start


def _pass_on(pairs, upstream: List[torch.Tensor]) -> None:
    """Hand the gradients of a block's input leaves on to the cut outputs before it (``upstream``)."""
    ids = {id(t) for t in upstream}
    for orig, leaf in pairs:
        g, leaf.grad = leaf.grad, None
        if g is None:
            continue
        if id(orig) in ids:  # straight from the block before
            orig.grad = g if orig.grad is None else orig.grad + g
        elif orig.grad_fn is not None and upstream:
            try:  # through modules between the blocks (a pool, a residual add)
                torch.autograd.backward(orig, g, inputs=upstream)
            except RuntimeError:  # their graph went with the loss's backward: that branch is not measured
                _log.debug("memory_optimization: a block input's gradient does not reach the blocks before it")


def _measure_candidate(b: _Block, module: nn.Module) -> _Cost:
    """Run ``module`` (a replacement of block ``b``) alone on the block's recorded input: its costs."""
    base.load_memories(b.block, b.state)
    x = b.x.detach().requires_grad_(b.x.is_floating_point())
    with MemoryTracker() as tracker:
        out = module(x, *b.rest)
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
    packed = b.scaled(_compressed_bytes(comp, b.x))  # of one call (the last; calls are alike)
    null = isinstance(comp, NullSpikeCompressor)
    kept = (b.in_bytes if null else packed * b.calls) + b.state_bytes
    b.costs["gc"] = _Cost(kept, b.fwd_gc + packed, b.bwd_gc + (0 if null else b.in_bytes // max(b.calls, 1)))
    b.costs["plain"] = _Cost(b.plain_saved + b.state_bytes, b.fwd_gc + b.plain_new, max(0, b.bwd_gc - b.plain_new))
    b.compressors["gc"] = type(comp).__name__
    b.compressors["plain"] = "-"


def _spatial_candidate(b: _Block, compress, comp: BaseSpikeCompressor) -> Optional[nn.Module]:
    parts = _spatial_parts(b.block)
    if parts is None or b.rest:  # parts take one input each
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


def _measure(b: _Block, key, module: Optional[nn.Module]) -> Optional[int]:
    """Measure candidate ``key`` of ``b`` (``module``, or None: there is none); its own estimated peak."""
    if module is None:
        return None
    try:
        b.costs[key], b.modules[key] = _measure_candidate(b, module), module
    except (RuntimeError, ValueError) as e:  # e.g. BatchNorm given one value per channel by a chunk of the slice
        _log.debug("memory_optimization: %s as %s does not run on the sample (%s)", b.path, key, e)
        return None
    own = _own_peak(b, key)
    _log.debug("memory_optimization: %s as %s -> own peak %d", b.path, key, own)
    return own


def _objective(blocks: List[_Block]) -> List[int]:
    """Estimated peaks of all blocks, highest first: compared lexicographically (the peak, then the next...)."""
    return sorted((max(phases) for phases in _phases(blocks)), reverse=True)


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


# ----------------------------------------------------------------------------- planner: search


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
                n, own = 2, _own_peak(b, b.config)
                while n <= b.x.shape[0]:
                    b.compressors[("temporal", n)] = type(comp).__name__
                    now = _measure(b, ("temporal", n), _wrap(b.block, copy.deepcopy(comp), n_chunk=n))
                    if now is None or now >= own:
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
        ok = b.calls == 1 and _runs_in_sequence(b.site.parent) and b.multistep()
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


def _family(chain: List[_Block], size: int, n_chunk: int, tail=(0, None)) -> List[Tuple[int, int, Any]]:
    """Groups ``(start, end, kind)`` of ``size`` blocks, each a temporal segment of ``n_chunk`` chunks.

    ``tail = (plain, light)``: the last ``plain`` groups run as plain blocks, and
    ``light`` makes the segment before them lighter to run: one GC segment without
    chunks (``"whole"``, kind ``None``), or that without its last block, which runs
    plain (``"split"``).
    """
    groups = [(k, min(k + size, len(chain)), n_chunk) for k in range(0, len(chain), size)]
    plain, light = min(tail[0], len(groups) - 1), tail[1]  # a tail chosen for smaller segments: one stays
    keep = len(groups) - plain
    out = groups[:keep]
    if light is not None:
        start, end, _ = out.pop()
        if light == "whole":
            out.append((start, end, None))
        else:
            out += ([(start, end - 1, None)] if end - start > 1 else []) + [(end - 1, end, "plain")]
    for start, end, _ in groups[keep:]:
        out += [(i, i + 1, "plain") for i in range(start, end)]
    return out


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
        self.scaled_peak, self._fixed, self._fixed_keys, self._next = 0.0, 0, set(), False

    def _track(self, t: torch.Tensor) -> None:
        self._next = tuple(t.shape) in self.fixed_shapes
        super()._track(t)

    def _add(self, storage, is_new: bool) -> None:
        before = self.current_bytes
        super()._add(storage, is_new)
        if self.current_bytes > before and self._next:
            self._fixed_keys.add(storage._cdata)
            self._fixed += self.current_bytes - before
        self.scaled_peak = max(self.scaled_peak, self.scaled_current())

    def scaled_current(self) -> float:
        """``fixed + scale * rest`` of the bytes alive now."""
        return self._fixed + self.scale * (self.current_bytes - self._fixed)

    def _free(self, key) -> None:
        if key in self._fixed_keys:
            self._fixed_keys.discard(key)
            if key in self._live and self._active:
                self._fixed -= self._live[key][0]
        super()._free(key)


def _sample_peak(net: nn.Module, inputs: tuple, loss_fn, scale: float = 1.0, pre_hooks=()) -> int:
    """Peak live tensor bytes of one real training step, scaled to the batch (state and gradients left alone).

    ``pre_hooks``: ``(module, fn)`` pairs; ``fn(tracker, args)`` runs before each call of ``module``.
    """
    shapes = {tuple(p.shape) for p in net.parameters() if p.requires_grad}
    with _StateGuard(net):
        for p in net.parameters():
            p.grad = None
        with _ScaledTracker(scale, shapes) as tracker:
            handles = [m.register_forward_pre_hook(lambda _, args, fn=fn: fn(tracker, args)) for m, fn in pre_hooks]
            try:
                _loss(_run(net, inputs), loss_fn).backward()
            finally:
                for h in handles:
                    h.remove()
    return int(round(tracker.scaled_peak))


class _Replay(nn.Module):
    """Stands in for the blocks before a suffix of a chain: gives the input the suffix got in the reference step.

    It holds what it is given (the chain's input, and through its graph what came
    before the chain) until the replay's step is over, as the real step holds it
    until its backward gets there: else the replay would free it after the
    suffix's entry and measure its growth from too high a start.
    """

    def __init__(self, x: torch.Tensor, requires_grad: bool):
        super().__init__()
        self.x, self.requires_grad, self.held = x, requires_grad, ()

    def forward(self, *args):
        self.held = args
        if not self.requires_grad:
            return self.x.clone()
        # Not a leaf, as the real input is not: the autograd engine runs the gradient
        # node of a leaf as soon as it can, that of an earlier node after the suffix's
        # nodes, and the replay reads what is alive when the gradient leaves the suffix.
        return self.x.clone().requires_grad_().clone()


_LIGHTER = ("plain", "split", "whole")  # lighter last segments, the most recompute saved first


@dataclasses.dataclass
class _Mark:
    """What the reference step saw where a segment starts (scaled bytes)."""

    live: float  # alive at the segment's entry
    x: torch.Tensor  # the segment's input (a copy)
    requires_grad: bool
    exit: Optional[float] = None  # alive when the gradient left the segment and what follows it


class _Search:
    """Temporal segments over consecutive blocks, measured by real steps on ``inputs`` (one sample).

    A candidate plan is ``(size, n, tails)``: segments of ``size`` blocks and
    ``n`` chunks, and per chain a tail of :func:`_family`. A full step of a plan
    with no tails also records a :class:`_Mark` where each segment starts. A
    lighter tail changes the step from that entry on, so it is measured by a
    *replay*: a step in which the chain's blocks before the suffix are replaced
    by the recorded input, much cheaper than a full step. Until the gradient
    leaves the suffix, the replay's growth over the entry plus the live bytes
    recorded there bound the real step; after that, the real step runs as the
    reference did, and a tail that leaves more alive there than the reference
    did (tensors kept on modules, e.g. a neuron's ``v_seq``) is not kept.
    """

    def __init__(self, net, chains, inputs, loss_fn, compress, scale):
        self.net, self.chains, self.inputs, self.loss_fn = net, chains, inputs, loss_fn
        self.compress, self.scale = compress, scale
        self.tried: Dict[tuple, int] = {}
        self.marks: Dict[Tuple[int, int], _Mark] = {}  # (chain, segment start) -> mark

    def _put(self, size, n, tails) -> None:
        for chain, tail in zip(self.chains, tails):
            _put_groups(chain, _family(chain, size, min(n, chain[0].steps), tail), self.compress)

    def _step(self, key, what: str, pre_hooks=()) -> int:
        try:
            self.tried[key] = _sample_peak(self.net, self.inputs, self.loss_fn, self.scale, pre_hooks)
        except (RuntimeError, ValueError) as e:  # e.g. BatchNorm given one value per channel by a chunk of the slice
            _log.debug("memory_optimization: %s does not run on the sample (%s)", what, e)
            self.tried[key] = sys.maxsize
        return self.tried[key]

    def full(self, size, n, tails, record=False) -> int:
        """The estimated peak of a plan, by one step (``record``: mark the segment entries, anew)."""
        key = (size, n, tuple(tails))
        if key not in self.tried or record:
            self._put(size, n, tails)
            hooks = []
            if record:
                self.marks = {}
                for i, (chain, tail) in enumerate(zip(self.chains, tails)):
                    for start, _, _ in _family(chain, size, min(n, chain[0].steps), tail)[1:]:
                        hooks.append((chain[start].site.get(), self._recorder(i, start)))
            self._step(key, str(key), hooks)
            _log.debug("memory_optimization: %d-block temporal segments of %d chunks, tails %s -> %d",
                       size, n, tails, self.tried[key])
        return self.tried[key]

    def _recorder(self, i, start):
        def record(tracker, args):
            x = args[0]
            with _disable_current_modes():  # the copy is not part of the step
                copy = x.detach().clone()
            mark = self.marks[(i, start)] = _Mark(tracker.scaled_current(), copy, x.requires_grad)
            if x.requires_grad:
                x.register_hook(lambda grad: setattr(mark, "exit", tracker.scaled_current()))

        return record

    def replay(self, size, n, tails, i, start, best) -> int:
        """The estimated peak of a plan that differs from the recorded one in chain ``i`` from block ``start`` on.

        A plan that must peak above ``best`` is not run (its bound is returned): where its
        plain blocks alone keep more at the end of the forward, or where a segment without
        chunks saves more in its recompute.
        """
        key = (size, n, tuple(tails))
        if key in self.tried:
            return self.tried[key]
        mark = self.marks[(i, start)]
        chain = self.chains[i]
        groups = [(s, e, kind) for s, e, kind in _family(chain, size, min(n, chain[0].steps), tails[i]) if e > start]
        plain = [k for s, e, kind in groups if kind == "plain" for k in range(s, e)]
        bounds = []
        if plain:  # at the end of the forward, what the plain blocks keep is alive at once
            kept = sum(chain[k].costs["plain"].retained for k in plain)
            bounds.append(mark.live + kept - (chain[start].in_bytes if plain[0] == start else 0))  # input in both
        # what the recompute of a segment without chunks saves is alive at once when its backward starts
        # (its input is the compressed one; the later blocks' inputs are recomputed and saved)
        bounds += [chain[s].plain_new + sum(chain[k].plain_saved for k in range(s + 1, e))
                   for s, e, kind in groups if kind is None]
        bound = max(bounds, default=0)
        if bound > best:
            _log.debug("memory_optimization: tails %s hold at least %d at once", tails, bound)
            self.tried[key] = bound
            return bound
        self._put(size, n, tails)
        for b in chain[: start - 1]:
            b.site.put(nn.Identity())
        stand_in = _Replay(mark.x, mark.requires_grad)
        chain[start - 1].site.put(stand_in)
        entry, exit_ = [], []

        def restart(tracker, args):  # the peak from the suffix's entry on
            entry.append(tracker.scaled_current())
            tracker.scaled_peak = entry[-1]
            if args[0].requires_grad:
                args[0].register_hook(lambda grad: exit_.append(tracker.scaled_current()))

        peak = self._step(key, f"{key} (replayed from block {start} of chain {i})",
                          [(chain[start].site.get(), restart)])
        stand_in.held = ()  # the step is over: what came before the chain may go
        if peak != sys.maxsize and entry:
            estimate = mark.live + peak - entry[0]
            if exit_ and mark.exit is not None:
                more = (exit_[0] - entry[0]) - (mark.exit - mark.live)  # left alive beyond the reference
                _log.debug("memory_optimization: tails %s leave %d more alive after their backward", tails, more)
                # what it leaves (tensors kept on modules, e.g. a neuron's v_seq) stays through the
                # rest of the step, which this replay does not see: such a tail is not kept
                if more > 0:
                    estimate = max(estimate, best + more)
            self.tried[key] = int(round(estimate))
        _log.debug("memory_optimization: tails %s, replayed from block %d -> %d", tails, start, self.tried[key])
        return self.tried[key]


def _search_groups(net, chains, inputs, loss_fn, compress, deadline: float, scale: float, best: int,
                   max_trials: int):
    """Search temporal segments (see :class:`_Search`); ``best`` is the estimated peak of the current plan.

    Returns ``(peak, {chain index: groups}, first)``; ``{}`` keeps the current
    plan, and ``first`` is ``(peak, groups)`` of the first candidate (measured
    whole, where ``best`` may come from the block model, which does not see
    what lies around the blocks).
    """
    saved = [b.site.get() for c in chains for b in c]
    search = _Search(net, chains, inputs, loss_fn, compress, scale)
    try:
        return _climb(search, best, deadline, max_trials)
    finally:  # back to the plan of the analytic stages; the caller applies the choice
        k = 0
        for chain in chains:
            for b in chain:
                b.site.put(saved[k])
                k += 1


def _climb(search: _Search, best, deadline, max_trials):
    """Segments of 2 blocks and 4 chunks, lighter chain ends, then larger segments or more chunks.

    Larger segments and more chunks are measured without tails (recording new
    marks) and kept when the peak goes down; the ends are then made lighter again.
    """
    chains = search.chains
    size, n, bare = 2, 4, [(0, None)] * len(chains)
    t0 = time.perf_counter()
    first = search.full(size, n, bare, record=True)
    first = (first, {i: _family(c, size, min(n, c[0].steps)) for i, c in enumerate(chains)})
    if first[0] >= best:
        return best, {}, first
    best, now = first[0], time.perf_counter()
    step_s = now - t0
    limit = min(deadline, now + (max_trials - 1) * step_s)
    replay_s = step_s / 2  # the last replay's time (a guess until one ran)
    tails = list(bare)

    def affordable(cost) -> bool:
        return time.perf_counter() + cost <= limit

    def lighten(i) -> bool:
        """Make chain ``i``'s end lighter while the peak does not rise; False when out of time."""
        nonlocal replay_s
        groups = -(-len(chains[i]) // size)
        while tails[i][1] is None and tails[i][0] + 1 < groups:  # the first segment stays (replays start after it)
            start = (groups - tails[i][0] - 1) * size
            kept = False
            for light in _LIGHTER:
                if light == "split" and min(start + size, len(chains[i])) - start == 1:
                    continue  # a one-block segment: the same as plain
                if not affordable(replay_s):
                    return False
                cand = list(tails)
                cand[i] = (tails[i][0] + 1, None) if light == "plain" else (tails[i][0], light)
                t = time.perf_counter()
                kept = search.replay(size, n, cand, i, start, best) <= best
                replay_s = time.perf_counter() - t
                if kept:
                    tails[i] = cand[i]
                    break
            if not kept:
                break
        return True

    def lighten_all() -> None:
        # the chain whose segments run last first: a lighter end changes the step only from its entry on
        last = {i: k for k, (i, _) in enumerate(search.marks)}
        for i in sorted(last, key=last.get, reverse=True):
            if not lighten(i):
                return

    lighten_all()
    longest, steps = max(len(c) for c in chains), min(c[0].steps for c in chains)
    moved = True
    while moved and affordable(step_s):  # larger segments or more chunks, while the peak goes down
        moved = False
        for cand in ((size + 1, n), (size, 2 * n)):
            key = cand + (tuple(bare),)
            if 1 <= cand[0] <= longest and 2 <= cand[1] <= steps and key not in search.tried and affordable(step_s):
                if search.full(*cand, bare, record=True) < best:
                    best, (size, n), moved = search.tried[key], cand, True
                    tails = list(bare)
                    lighten_all()
                    break
    return best, {i: _family(c, size, min(n, c[0].steps), tails[i]) for i, c in enumerate(chains)}, first


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
            "action": "gc" if n is None else "temporal",  # None: one segment of several blocks, not chunked
            "parts": n or 1,
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
