"""Turn GC on per block (``apply_gc``) and plan it automatically (``memory_optimization``).

:func:`~snnkit.memopt.apply_gc` wraps every block of the given types in a
:class:`~snnkit.memopt.GCContainer` and picks its input compressor by probing
the block's input once (binary spikes -> :class:`~snnkit.memopt.BitSpikeCompressor`,
anything else -> :class:`~snnkit.memopt.NullSpikeCompressor`).
:func:`~snnkit.memopt.unwrap_gc` puts the original blocks back.

:func:`~snnkit.memopt.memory_optimization` goes further, in four levels:

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
   back to plain modules as long as the peak does not rise; at the end of a
   chain of multi-block segments, the last segments become lighter to run
   (plain blocks, or one segment without chunks) as long as the peak does not rise.

Each step is kept only if the estimated peak goes down (unwrap: does not go up).

How the planner measures
------------------------
Planning never runs a full training step per candidate. It runs one *cut*
step of the layer-wise GC net on **one sample** of the batch (bytes and times
are scaled by the batch size; parameter gradients are not): each block's
inputs and output are detached into fresh leaves, so every block's forward and backward
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
steps, again on one sample (on CPU about one full step each, as the chunks run
many small operators): first segments of 2 blocks and 4 chunks. That step
also records, where each segment starts, the live bytes and the segment's
input. Then the end of each chain is made lighter, segment by segment from
the last: the segment's blocks plain, else its last block plain and the rest
one segment without chunks, else the segment without chunks, whichever first
keeps the peak. Such a change alters the step from where it starts, so it is
measured by a *replay*: a step in which the chain's earlier blocks are replaced
by the recorded input (a fraction of a full step; the stand-in holds the
chain's input, and through its graph what came before the chain, to the end,
as the real step does). Until the gradient leaves the changed part, the
replay's growth above the start plus the live bytes recorded there bound the
real step (the real step can only have freed more by then); after that the
step runs as the first one did, and a change that leaves more alive there
than the first step did (tensors kept on modules, such as a neuron's
``v_seq``) is not kept. A change is not replayed where its plain blocks alone
would keep more than the peak at the end of the forward, or where what a segment
without chunks saves in its recompute (the blocks' saved tensors, measured by
the cut step) is more than the peak. Last, larger segments and more
chunks are tried (full steps, without lighter ends, which are then tried again)
while the peak goes down. In all, the search spends at most ``budget - 1``
times the time of its first step (``budget`` is 3 plain steps by default: the
cut step costs about one more), and stops at a deadline of ``budget``
estimated plain steps.
A lighter end is worth it where the last segments do not hold the peak: their
recompute runs first in backward, when little else is alive (on the SEW
benchmark net the last block runs plain and the one before unchunked at the
same peak, and the step is faster).
The block model does not see what lies between and after the blocks (pools,
the head, the loss), so when no multi-block search measured the final plan, one
more step of it on the sample (scaled) gives the reported peaks, if the budget
allows; the model's error on the plain net is corrected by the same amount. If
that measured peak is above the first multi-block segment plan's (which the
model's estimate had beaten), that segment plan is used instead.
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
gradient alone is 9 MiB, and single-block plans stop near 40 MiB. A
temporal segment over two blocks removes the full-size gradient between them,
which is what brings that net to 28 MiB (3.0x). Inside a temporal segment the
blocks run as their spatial parts, and a ``SeqToANNContainer`` of several
modules as one container per module, so a block's input is freed once the
module that reads it (a pool, a convolution) is done, not when the block
returns. What remains at the peak (measured breakdown, 6-block VGG, 2-block
segments of 4 chunks, in the recompute of a chunk of blocks 2-3):

* the neuron states a temporal segment keeps to restart each chunk: ``n - 1``
  time steps of every neuron's membrane potential, plus the final state each
  module holds anyway (11.3 MiB of the 28 MiB, the largest item: more chunks
  lower the recompute but raise this, which is why 8 chunks lose to 4);
* one chunk's recompute: convolution and BatchNorm outputs, ``h_seq``, the
  spikes (9 MiB at block 2's neuron);
* gradients waiting for the earlier chunks: each chunk's own copy of its
  output gradient, the state gradients between chunks and the input
  gradients of the chunks done (together about 4 MiB);
* parameter gradients. A temporal segment adds its chunks' parameter
  gradients in place into one sum and returns it once, but the gradients of
  all weights are alive by the end of backward. On the 8-block VGG
  (35.4 MiB of float32 weights, 512-channel 3x3 convolutions of 9 MiB each)
  this dominates: the parameter gradients (35.4 MiB) and the neurons' final
  states (7.9 MiB) alone are 43.3 MiB, more than its 6x target (35.5 MiB), so
  no plan of this kind can reach 6x on it.

Exactness: GC and spatial splits reproduce the plain gradients exactly. A
temporal split sums each parameter's gradient chunk by chunk, so its gradients
equal the plain ones to float rounding only (without BatchNorm, outputs and final
states are exact). It computes BatchNorm batch statistics per chunk of time steps, so
with BatchNorm in training mode inside a temporally split block outputs and
gradients differ from the plain net (as with any per-chunk normalisation);
pass ``temporal=False`` to rule temporal splits out.

What the planner leaves whole: it splits a block only where the parts are known
to compose to its forward (``__spatial_split__``, or an ``nn.Sequential`` that
does not override ``forward``), and spans temporal segments only over children
of such a Sequential. A block of several tensor inputs is a GC segment as a
whole; a block called more than once per step, or shared by several sites,
stops planning at level 1. Forward hooks of a block whose parts run separately
(spatial split, temporal segment) do not run; :func:`~snnkit.memopt.unwrap_gc`
brings the block back.

Checkpoints
-----------
Both functions put containers at the blocks' sites, which moves the blocks'
modules to other paths (inside a temporal segment over blocks 0 and 1,
``features.1.conv.1.weight`` lives at ``features.0.4.0.weight``), and the paths
depend on the plan. The original blocks still exist and share their modules
with the containers (a module inside a block replaced later, e.g. by
``convert_sync_batchnorm`` or an adapter, goes into the original block too;
replacing a container's own slot, a whole block or a per-module container, is
an error at the next save, load or unwrap), so the parent of each site gets
``state_dict`` and ``load_state_dict`` hooks:
``state_dict()`` gives the unwrapped net's entries (keys, order, per-module
metadata, and a block's own buffers or aliases that its parts do not hold),
and ``load_state_dict()`` loads into the original blocks, put at their sites
while the parent's children load, so errors name the unwrapped net's keys (if
a module's loading code raises, the containers go back at the next forward of
the parent or after that of the last block, or at the next save or load). A
checkpoint therefore loads into the plain net, into the net planned again (the
plan may differ from run to run), and back. A dict
saved with the wrapped structure's keys (before they were kept) loads too; one
that mixes both is an error. :func:`~snnkit.memopt.unwrap_gc` removes the hooks.
The keys are those of the plain net, not paths of the wrapped one:
``named_parameters()``, ``named_modules()``, ``get_submodule()``, a
container's own ``state_dict()``, and tools that follow keys as attribute paths
(``torch.func.functional_call``, ``torch.distributed.checkpoint``'s
``get_state_dict``) see the current structure; give them
``named_parameters()`` names, or call ``unwrap_gc`` first. The parameters keep
their order (so an optimizer's ``state_dict`` matches them) unless a block's
``__spatial_split__`` returns its parts in another order than the block
registers them; :func:`~snnkit.memopt.memory_optimization` warns then.
"""
import dataclasses
import logging
import time
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from ._planner import (
    _Block,
    _batch_slice,
    _chains,
    _Cost,
    _cut_step,
    _gc_and_plain_costs,
    _model_peak,
    _plan,
    _Progress,
    _put_groups,
    _realize,
    _row,
    _sample_peak,
    _search_groups,
)
from ._keys import _heal, _sync_keys
from ._wrapping import (
    _as_inputs,
    _check_block_types,
    _check_compress,
    _children,
    _choose_compressor,
    _find_blocks,
    _is_ours,
    _original,
    _probe_binary,
    _StateGuard,
    _wrap,
)
from .checkpointing import GCContainer
from .compress import BaseSpikeCompressor, NullSpikeCompressor
from .tracker import MemoryTracker

__all__ = ["apply_gc", "unwrap_gc", "memory_optimization", "MemOptSummary"]

_log = logging.getLogger(__name__)


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

    ``net.state_dict()`` and ``net.load_state_dict()`` keep the keys of the
    unwrapped net (see "Checkpoints" in the module docstring).

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
        >>> "2.0.weight" in net.state_dict()  # the unwrapped net's keys (not 2.0.0.weight)
        True
        >>> type(unwrap_gc(net)[2]).__name__
        'Block'
    """
    types = _check_block_types(block_types)
    _check_compress(compress)
    _heal(net)
    sites = _sites(net, types, "apply_gc")
    if not sites:
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
    _sync_keys(net)
    return net


def unwrap_gc(net: nn.Module) -> nn.Module:
    """Undo :func:`apply_gc` and :func:`memory_optimization`: put the original blocks back, in place.

    Only containers made by those two functions are removed; a
    :class:`~snnkit.memopt.GCContainer` built by hand stays.

    Returns:
        ``net``.

    Example:
        >>> import torch.nn as nn
        >>> from snnkit import layer, neuron
        >>> from snnkit.memopt import apply_gc, unwrap_gc
        >>> class Block(nn.Sequential):
        ...     pass
        >>> net = nn.Sequential(Block(layer.Linear(4, 4), neuron.IFNode()))
        >>> type(apply_gc(net, Block, compress="bit")[0]).__name__
        'GCContainer'
        >>> type(unwrap_gc(net)[0]).__name__
        'Block'
    """

    def walk(parent):
        for name, child in _children(parent):
            if _is_ours(child):
                child = _original(child)
                setattr(parent, name, child)
            walk(child)  # a restored block may hold containers of an earlier call (e.g. of its sub-blocks)

    _heal(net)
    walk(net)
    _sync_keys(net)
    return net


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
            segment: itself, or the first block of a segment over several
            consecutive blocks (``"temporal"``, or ``"gc"`` when not chunked),
            whose other sites hold placeholders; ``retained_bytes`` is not
            modelled for those and reads 0).
        peak_before: Peak live tensor bytes of a plain step (estimated from
            the measurements, calibrated by the sampled or verification step).
        peak_after: Peak of a step of the planned net (measured when
            ``verified``, else estimated).
        peak_after_estimate: The planner's own estimate of ``peak_after``.
        est_slowdown: Estimated step time of the plan over a plain step: one
            plain step plus the forwards the plan recomputes. A lower bound:
            it leaves out the cost of splitting work into temporal chunks and
            of compression (on the CPU benchmark nets: estimated 1.25, 1.26 and
            1.32x, measured 1.30-1.56, 1.14-1.35 and 1.29-1.52x on a noisy machine),
            and on a GPU the host time of small batches.
        plain_step_s: Time of a plain step as measured under the memory tracker
            (which slows every op; compare it only with ``recompute_s``).
        planning_s: Wall time of planning.
        level: The level the planner ran.
        verified: Whether ``peak_after`` was measured on a real step.

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit import layer, neuron
        >>> from snnkit.memopt import memory_optimization
        >>> class Block(nn.Sequential):
        ...     pass
        >>> net = nn.Sequential(*[Block(layer.Linear(16, 16, step_mode="m"), neuron.IFNode(step_mode="m"))
        ...                       for _ in range(2)])
        >>> _, summary = memory_optimization(net, Block, torch.rand(4, 2, 16), level=1, return_summary=True)
        >>> summary.wrapped, summary.level
        (['0', '1'], 1)
        >>> summary.peak_after <= summary.peak_before
        True
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
        """``peak_before / peak_after`` (1.0 when nothing was measured: level 0 or no block)."""
        if self.peak_before <= 0 or self.peak_after <= 0:
            return 1.0
        return self.peak_before / self.peak_after

    def __str__(self) -> str:
        mib = 2.0**20
        # Times are taken under the memory tracker, which slows every op alike:
        # only their ratios to the plain step are shown.
        head = f"{'block':<24} {'type':<18} {'action':<10} {'parts':>5} {'compressor':<40} {'kept MiB':>9} {'recompute %':>11}"
        lines = [f"memory_optimization (level {self.level})", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r['path'][:24]:<24} {r['type'][:18]:<18} {r['action']:<10} {r['parts']:>5} "
                f"{r['compressor'][:40]:<40} {r['retained_bytes'] / mib:>9.2f} "
                f"{100 * r['recompute_s'] / max(self.plain_step_s, 1e-9):>11.1f}"
            )
        kind = "measured" if self.verified else "estimated"
        lines += [
            "-" * len(head),
            f"peak before {self.peak_before / mib:.1f} MiB (estimated), after {self.peak_after / mib:.1f} MiB ({kind}): "
            f"{self.ratio:.2f}x less",
            f"estimated slowdown {self.est_slowdown:.2f}x of a plain step (recompute % is of a plain step); "
            f"planning took {self.planning_s:.2f} s",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- planner: public


def _sites(net: nn.Module, types: tuple, caller: str) -> list:
    """The unwrapped blocks of ``net`` to wrap; warns when there are none.

    Raises:
        ValueError: if ``net`` itself is a block (its own container could not replace it).
    """
    if isinstance(net, types) and not (isinstance(net, GCContainer) or _is_ours(net)):
        raise ValueError(
            f"snnkit.memopt: the root module {type(net).__name__} is itself one of block_types; "
            "wrap its children or pass a parent module"
        )
    sites = _find_blocks(net, types)
    if not sites:
        warnings.warn(
            f"snnkit.memopt: {caller} found no unwrapped submodule of type {', '.join(t.__name__ for t in types)} "
            f"in {type(net).__name__}; the net is unchanged",
            UserWarning,
            stacklevel=3,
        )
    return sites


def _put_back(blocks, bar) -> None:
    """Undo a failed plan: every block back at its site, the progress bar closed."""
    for b in blocks:
        b.site.put(b.block)
    bar.close()


def _use_groups(chains, choice, compress) -> None:
    """Put the segments of ``choice`` (``{chain index: groups}``) at the blocks' sites."""
    for i, chain in enumerate(chains):
        _put_groups(chain, choice[i], compress)
        for start, end, kind in choice[i]:
            for b in chain[start:end]:
                b.group = (chain[start].path, kind)
                b.config = "plain" if kind == "plain" else b.config


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
            The segment search spends at most ``budget - 1`` times its first
            candidate's time, that candidate included.

    The planned net's ``state_dict()`` and ``load_state_dict()`` keep the keys
    of the plain net, whatever the plan (see "Checkpoints" in the module docstring).

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
    _heal(net)
    order = [id(p) for p in net.parameters()]
    sites = _sites(net, types, "memory_optimization") if level > 0 else []
    if not sites:
        summary = MemOptSummary([], 0, 0, 0, 1.0, 0.0, time.perf_counter() - t_start, level, False)
        return (net, summary) if return_summary else net
    # detached: planning must not reach into a graph the inputs come from, nor fill their .grad
    inputs = tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                   for t in _as_inputs(dummy_input))
    bar = _Progress(progress, 2 + (level >= 2) + (level >= 3 and temporal) + (level >= 4) + verify)
    blocks = [_Block(s) for s in sites]
    for b in blocks:
        b.site.put(_wrap(b.block, NullSpikeCompressor()))
    try:
        with _StateGuard(net) as guard:
            bar.step("measure one cut step of the layer-wise GC net")
            sliced, scale = _batch_slice(net, inputs, batch_dim)
            try:
                step_s = _cut_step(net, blocks, sliced, loss_fn) * scale
            except ValueError:
                if scale == 1.0:
                    raise
                _log.debug("memory_optimization: the net does not run on a slice of the batch; measuring it whole")
                guard.fresh()
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
            shared = len({id(b.block) for b in blocks}) < len(blocks)  # one block at several sites
            if (shared or any(b.calls > 1 for b in blocks)) and level > 1:
                _log.info("memory_optimization: a block runs more than once per step; planning stops at level 1")
                level = 1
            chains = _chains(blocks) if level >= 3 and temporal else []
            # every block in a chain: the segment search below replaces the single-block splits
            covered = {id(b) for c in chains for b in c} >= {id(b) for b in blocks if b.calls > 0}
            estimate = _plan(blocks, level, compress, temporal, bar, split=not covered)
    except BaseException:
        _put_back(blocks, bar)
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
            sample, choice, first = _search_groups(net, chains, sliced, loss_fn, compress, deadline, scale,
                                                   estimate, trials)
        except BaseException:
            _put_back(blocks, bar)
            raise
        if choice:
            estimate = sample
            _use_groups(chains, choice, compress)
    calibration = 0  # what the block model misses (modules between blocks, the head, the loss)
    slice_step = 3.0 * plain_step / scale  # a tracked one-sample step of the plan, recompute included
    if not (chains and choice) and time.perf_counter() - t_start + slice_step <= budget * plain_step:
        sample = _sample_peak(net, sliced, loss_fn, scale)
        calibration, estimate = sample - estimate, sample
        if chains and first[0] < estimate:  # measured alike, the first segment plan is lower after all
            _log.debug("memory_optimization: the block plan measures %d, the segment plan %d", estimate, first[0])
            estimate = first[0]
            _use_groups(chains, first[1], compress)
    _sync_keys(net)
    if [id(p) for p in net.parameters()] != order:
        warnings.warn(
            "snnkit.memopt: the planned net lists its parameters in another order than the original (a block's "
            "__spatial_split__ returns its parts in another order than it registers them), so an optimizer "
            "state_dict saved with one does not fit the other: build the optimizer from the planned net, and "
            "load its checkpoints into nets planned alike (the model's state_dict keeps the original keys).",
            UserWarning,
            stacklevel=2,
        )
    measured = estimate
    if verify:
        bar.step("verify the plan with one step")
        measured = _sample_peak(net, inputs, loss_fn)
    before = _model_peak(blocks, cost=lambda b: b.costs["plain"])[0] + calibration + (measured - estimate)
    bar.step("done")
    bar.close()
    rows = [_row(b) for b in blocks]
    recompute = sum(r["recompute_s"] for r in rows)  # a block in a temporal segment is recomputed, whatever its config
    summary = MemOptSummary(
        rows=rows,
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
