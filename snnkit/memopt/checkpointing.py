"""Exact gradient checkpointing (GC) of stateful segments, with a compressed input.

A GC segment runs its forward once without building a graph, keeps only its
input ``x_seq`` (compressed by a :mod:`~snnkit.memopt.compress` compressor),
its other tensor arguments, the states it started from and the RNG/autocast
context, and recomputes the forward with a graph when backward reaches it.

NOTE [ Invariants of a GC segment ]
    1. Exactness: outputs, final states and all gradients equal those of the plain
       (uncheckpointed) run bit for bit (in a :class:`TCGCContainer` of several
       chunks, parameter gradients are summed chunk by chunk and equal the plain
       ones to float rounding): the recompute replays the CPU RNG state, the CUDA
       RNG states of the devices of the argument tensors (no other device is
       touched, so no CUDA context is created by accident), and the autocast state
       of the first forward.
    2. State is explicit: with stateful modules inside, the memories (taken with
       :func:`snnkit.base.extract_memories`) enter the checkpointed function as
       inputs and leave it as outputs. Gradients therefore flow through the
       state across calls (``"s"`` mode over ``T`` calls, consecutive ``"m"``
       calls, time chunks, truncated BPTT). Memories that are not tensors yet
       (floats before the first step, ``None`` dropout masks) are constants.
       An unchanged tensor state that needs no gradient stays non-differentiable;
       a tensor state first created inside a segment (a dropout mask drawn there)
       is an output of the segment and so carries a ``grad_fn`` (values and
       gradients are unaffected). Plain attributes such as ``v_seq``
       (``store_v_seq=True``) are not memories: the recompute sets them again,
       to equal values.
    3. Live state is untouched by backward: the recompute loads the saved
       states, and right after it (before the nested backward, so that the
       recomputed final states can be freed) every module gets back the
       memories it had when backward started (those of the latest forward).
    4. Side effects happen once: the first forward runs inside
       ``snnkit._context.gc_1st_forward()``, so
       :func:`~snnkit.memopt.in_gc_1st_forward` is True there and False in the
       recompute, which runs inside ``snnkit._context.gc_recompute()``.
       :class:`snnkit.layer.BatchNorm1d` and ``BatchNorm2d`` update
       ``running_mean``, ``running_var`` and ``num_batches_tracked`` in the first
       forward, in the order of a plain step, and normalise with the batch
       statistics without updating in the recompute: exactly once per training step,
       also when a backward runs twice (``retain_graph``) or single steps are
       recomputed in reverse order. (``torch.nn.BatchNorm`` modules would update
       twice; use the snnkit layers inside GC segments. A :class:`GCContainer` built
       around one that tracks statistics warns.) A neuron's ``v_seq``
       (``store_v_seq=True``) is set by the first forward only, without a graph (it
       is no output of the segment), and in a :class:`TCGCContainer` holds the last
       chunk only; the neuron warns.
    5. The caller's tensors are never modified (no ``requires_grad_`` on inputs;
       only an in-place first module writes into its input, as without GC).
       The parameters of the modules of a segment are explicit inputs of the
       checkpointed function, so it works without any input requiring grad; one
       frozen between forward and backward gets no gradient, as in autograd.
       Tensors nested in list, tuple or dict arguments are inputs too.
    6. In-place first modules: the input is compressed before the first forward writes
       into it. A compressor that keeps the input's memory
       (:class:`~snnkit.memopt.NullSpikeCompressor` keeps the input itself) compresses
       a copy when the first module has ``inplace=True`` (``nn.ReLU``, ...); any
       other write into memory the compressor keeps raises. The written input is
       marked as modified by the segment, so its later uses get their gradients
       through it (to float rounding, not bit for bit, when it is a view whose base
       is used as well). (:class:`TCGCContainer` raises if its input requires grad:
       chunks are views.)
    7. No double backward: with ``create_graph=True`` a segment's backward raises,
       since the compressed input has no graph for the second-order terms.

Implementation and distributed training:
    The segment is a custom :class:`torch.autograd.Function` whose backward
    recomputes the forward and runs a nested ("reentrant") autograd pass over the
    recomputed graph. For modules (:class:`GCContainer`, or a module/bound method
    given to :func:`~snnkit.memopt.input_compressed_gc`) the nested pass is
    :func:`torch.autograd.grad` with the parameters among its inputs: it captures
    their gradients without running their accumulators, so nothing inside it
    touches ``.grad`` or fires a hook. The gradients leave the segment's backward
    like any other, and the outer pass sums the contributions of every call of the
    segment (``T`` calls in ``"s"`` mode) before running each parameter's
    accumulator once. The chunks of one :class:`TCGCContainer` call sum their
    parameter gradients themselves and hand the total to the outer pass once per
    call (see below). DDP's reducer hooks therefore fire once per
    step, in the outer graph task, after the last contribution, and its final
    callback runs at the end of the outer pass, as in a plain network
    (``tests/scale/test_ddp.py`` records this). ``torch.autograd.grad`` works on
    a GC network too. Plain functions (closures over parameters) fall back to
    ``torch.autograd.backward`` inside backward, which accumulates into the
    leaves directly (the behaviour of ``torch.utils.checkpoint(use_reentrant=True)``):
    under DDP such a function must run once per step, or DDP needs
    ``static_graph=True``.

Memory of the recompute:
    The decompressed input is not kept by the recomputed graph: tensors that the
    recompute saves and that share its storage are saved as a reference to the
    compressed payload and decompressed again when needed (unless modified in
    place). The storage is recognised by identity (a weak reference), never by
    address: once the input is freed, a tensor of the recompute may be allocated
    at its address, and saving that tensor as the input gave wrong gradients that
    came and went with the allocator's state (first seen under DDP with
    single-step segments). The recomputed outputs are released before the nested
    backward starts.

Memory of temporal chunks (:class:`TCGCContainer`):
    One autograd node splits the sequences of a call into chunks and takes the
    segment's parameters; each chunk passes a zero-size handle of it instead of
    the parameters. Its backward runs once, after every chunk's backward, and
    (1) concatenates the chunks' input gradients into the one full-size input
    gradient (per-chunk slicing would pad every chunk gradient to a full-size
    zero tensor, two of them alive at once, while the chunk gradients wait);
    (2) returns the parameter gradients that the chunks added up in place, in
    the order their backwards ran (the first chunk gradient becomes the sum
    unless it may share memory with another tensor, then the first sum does),
    so at most two copies of a weight gradient exist and the sum has the bits
    of autograd's. Both are exact. A full-size input gradient is made only at
    the end (the chunk gradients, together one full size, wait until then), so
    while the chunks recompute no more is kept than before; a buffer written by
    the chunks would instead hold a full-size gradient during every chunk's
    recompute, where the peak of multi-block segments lies. (3) The chunks'
    outputs are joined by a concatenation whose backward gives every chunk a
    copy of its part of the output gradient, so each part is freed after its
    chunk's backward rather than with the last chunk (an expanded gradient,
    e.g. from a sum, stays views).

Example:
    >>> import torch
    >>> from snnkit import layer, neuron
    >>> from snnkit.memopt import GCContainer, BitSpikeCompressor
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> block = GCContainer(BitSpikeCompressor(), layer.Linear(4, 3, step_mode="m"), neuron.LIFNode(step_mode="m"))
    >>> x_seq = (torch.rand(6, 2, 4) > 0.5).float()
    >>> block(x_seq).sum().backward()
    >>> block[0].weight.grad.shape
    torch.Size([3, 4])
"""
import contextlib
import warnings
import weakref
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .. import base
from ..layer import BatchNorm1d, BatchNorm2d, Dropout, SeqToANNContainer
from .._context import gc_1st_forward, gc_recompute, in_gc_1st_forward
from .compress import BaseSpikeCompressor, CompressedSpikes, NullSpikeCompressor

__all__ = [
    "in_gc_1st_forward",
    "query_autocast",
    "input_compressed_gc",
    "to_gc_function",
    "GCContainer",
    "TCGCContainer",
]

_Tensor = torch.Tensor


def query_autocast() -> Tuple[str, torch.dtype, bool]:
    """Return the current autocast setting as ``(device_type, dtype, enabled)``.

    When autocast is off this is ``("cpu", torch.get_autocast_dtype("cpu"), False)``.

    Example:
        >>> import torch
        >>> from snnkit.memopt import query_autocast
        >>> query_autocast()
        ('cpu', torch.bfloat16, False)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     query_autocast()
        ('cpu', torch.bfloat16, True)
    """
    for device_type in _AUTOCAST_DEVICES:
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type), True
    return "cpu", torch.get_autocast_dtype("cpu"), False


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu", "xla", "mtia")


def _as_compressor(x_compressor) -> BaseSpikeCompressor:
    if x_compressor is None:
        return NullSpikeCompressor()
    if isinstance(x_compressor, type) and issubclass(x_compressor, BaseSpikeCompressor):
        return x_compressor()
    if not isinstance(x_compressor, BaseSpikeCompressor):
        raise TypeError(
            f"snnkit.memopt: x_compressor must be a BaseSpikeCompressor instance or None, got "
            f"{type(x_compressor).__name__}; use e.g. BitSpikeCompressor()"
        )
    return x_compressor


# ---------------------------------------------------------------------------------------------
# Context capture and replay (see Invariant 1)
# ---------------------------------------------------------------------------------------------
class _Context:
    """RNG and autocast state of a first forward, replayed by the recompute."""

    __slots__ = ("cpu_rng", "cuda_devices", "cuda_rng", "autocast")

    def __init__(self, tensors):
        self.cpu_rng = torch.get_rng_state()
        # Only the CUDA devices of the argument tensors, as torch.utils.checkpoint does.
        self.cuda_devices = sorted({t.get_device() for t in tensors if t.is_cuda})
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        types = {"cpu"} | {t.device.type for t in tensors}
        cache = torch.is_autocast_cache_enabled()
        self.autocast = [
            (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt), cache)
            for dt in sorted(types)
            if dt == "cpu" or torch.amp.is_autocast_available(dt)
        ]

    @contextlib.contextmanager
    def replay(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.cuda_devices))
            torch.set_rng_state(self.cpu_rng)
            for d, state in zip(self.cuda_devices, self.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            for dt, enabled, dtype, cache in self.autocast:
                stack.enter_context(torch.autocast(dt, dtype=dtype, enabled=enabled, cache_enabled=cache))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(gc_recompute())
            yield


# ---------------------------------------------------------------------------------------------
# Flattening of arguments, states and outputs
# ---------------------------------------------------------------------------------------------
_SLOT = object()  # where a tensor goes in a template


def _split(values) -> Tuple[list, list]:
    """``(template, tensors)``: the template has ``_SLOT`` where a tensor was."""
    template, tensors = [], []
    for v in values:
        if isinstance(v, _Tensor):
            template.append(_SLOT)
            tensors.append(v)
        else:
            template.append(v)
    return template, tensors


def _merge(template, tensors) -> list:
    it = iter(tensors)
    return [next(it) if v is _SLOT else v for v in template]


def _split_args(args) -> Tuple[tuple, list]:
    """:func:`_split`, with the tensors inside list, tuple and dict arguments as inputs too.

    A container that holds a tensor reaches the function rebuilt around the
    tensors it gets (so that they get gradients); any other argument is passed as it is.
    """
    leaves, specs = [], []
    for a in args:
        if isinstance(a, (list, tuple, dict)) and any(isinstance(t, _Tensor) for t in tree_leaves(a)):
            flat, spec = tree_flatten(a)
        else:
            flat, spec = [a], None
        leaves += flat
        specs.append((spec, len(flat)))
    template, tensors = _split(leaves)
    return (specs, template), tensors


def _merge_args(template, tensors) -> list:
    specs, leaf_template = template
    leaves, out, i = _merge(leaf_template, tensors), [], 0
    for spec, n in specs:
        out.append(leaves[i] if spec is None else tree_unflatten(leaves[i : i + n], spec))
        i += n
    return out


class _Segment:
    """Everything about one checkpointed call that is not a saved tensor."""

    __slots__ = (
        "fn",
        "fn_boxed",
        "compressor",
        "module",
        "stateful",
        "params",
        "arg_template",
        "state_template",
        "n_in",
        "out_template",
        "out_is_tensor",
        "state_out_template",
        "context",
        "x_shape",
        "c_dtype",
        "c_single",
        "c_n",
        "c_has_flag",
        "acc",
        "x_written",
        "x_dirty",
    )

    def __init__(self, fn, compressor, module, stateful, fn_boxed=None):
        self.fn, self.compressor, self.module, self.stateful = fn, compressor, module, stateful
        # fn_boxed(box, *args) takes its input from box.pop(), so that the recompute
        # does not keep the decompressed input alive after the first module used it.
        self.fn_boxed = fn_boxed
        # Set for the chunks of a TCGCContainer call: their parameter gradients go to acc.
        self.acc: Optional[_ParamAccumulator] = None


class _GCFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seg: _Segment, x: _Tensor, *tensors):
        n_args, n_states, n_params, _ = seg.n_in
        arg_tensors = tensors[:n_args]
        state_tensors = tensors[n_args : n_args + n_states]
        seg.context = _Context((x, *arg_tensors, *state_tensors))
        # Compress before running, so that an in-place first module does not change what is
        # replayed; NullSpikeCompressor keeps x itself, so it gets a copy if x may be written.
        c = seg.compressor.compress(x)
        if _first_in_place(seg.module) and _shares_storage(c.payload, x):  # e.g. NullSpikeCompressor keeps x
            c = seg.compressor.compress(x.clone())
        args = _merge_args(seg.arg_template, arg_tensors)
        version = x._version
        with gc_1st_forward():
            if seg.stateful:
                base.load_memories(seg.module, _merge(seg.state_template, state_tensors))
            out = seg.fn(x, *args)
        seg.x_written = x._version != version
        if seg.x_written and _shares_storage(c.payload, x):
            raise RuntimeError(
                f"snnkit.memopt: the first forward of a GC segment modified its input x_seq in place, and "
                f"{type(seg.compressor).__name__} keeps x_seq's memory itself, so the recompute would start from "
                "the modified values and give wrong gradients. Make the operation out of place, or use a "
                "compressor that stores a copy (e.g. SparseSpikeCompressor, which takes any values)."
            )
        seg.out_is_tensor = isinstance(out, _Tensor)
        seg.out_template, out_tensors = _split([out] if seg.out_is_tensor else out)
        state_out_tensors = []
        if seg.stateful:
            seg.state_out_template, state_out_tensors = _split(base.extract_memories(seg.module))
            # An unchanged state that needs no grad stays non-differentiable (e.g. a dropout mask).
            frozen = {id(t) for t in state_tensors if not t.requires_grad}
            constant = [s for s in state_out_tensors if id(s) in frozen]
            if constant:
                ctx.mark_non_differentiable(*constant)
        seg.x_shape = x.shape
        seg.c_dtype, seg.c_single, seg.c_n = c.dtype, c._single, len(c.payload)
        seg.c_has_flag = c.flag is not None
        extra = (c.flag,) if c.flag is not None else ()
        ctx.save_for_backward(*arg_tensors, *state_tensors, *c.payload, *extra)
        ctx.seg = seg
        ctx.set_materialize_grads(False)
        # x written in place is an output too (see _Written): later uses of x get its gradient through the segment.
        seg.x_dirty = seg.x_written and x.requires_grad
        written = ()
        if seg.x_dirty:
            # Outputs that alias x must be no views of it: x is marked modified after this function.
            storage = x.untyped_storage()._cdata
            out_tensors = [t.detach() if t.untyped_storage()._cdata == storage else t for t in out_tensors]
            written = (x.new_zeros(()).expand(x.shape),)
        return (*out_tensors, *state_out_tensors, *written)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "snnkit.memopt: a GC segment does not support double backward (create_graph=True, e.g. a gradient "
                "penalty): its input is stored without its graph, so second-order terms would be lost. Run this "
                "part of the network without gradient checkpointing."
            )
        seg: _Segment = ctx.seg
        n_args, n_states, n_params, n_dummy = seg.n_in
        saved = ctx.saved_tensors
        arg_tensors = saved[:n_args]
        state_tensors = saved[n_args : n_args + n_states]
        payload = saved[n_args + n_states : n_args + n_states + seg.c_n]
        c = CompressedSpikes(payload[0] if seg.c_single else tuple(payload), seg.c_dtype, seg.x_shape)
        if seg.c_has_flag:
            c.flag = saved[-1]
        seg.compressor.validate(c)  # raises ValueError on invalid input (one host sync)
        needs = ctx.needs_input_grad
        x_needs = needs[1]
        arg_leaves = [t.detach().requires_grad_(needs[2 + i]) for i, t in enumerate(arg_tensors)]
        state_leaves = [t.detach().requires_grad_(needs[2 + n_args + i]) for i, t in enumerate(state_tensors)]
        params = seg.params

        live = base.extract_memories(seg.module) if seg.module is not None else None
        box: List[_Tensor] = []
        try:
            with seg.context.replay():
                root, anchor = _recompute(seg, c, x_needs, arg_leaves, state_leaves, grads, box)
        finally:
            # Before the nested backward: the recomputed final states are graph outputs, not needed there.
            if live is not None:
                base.load_memories(seg.module, live)
        if root is None:
            grads_in = [None] * (n_args + n_states + n_params)
        elif seg.module is not None:
            # A parameter frozen since the forward gets no gradient, as in autograd.
            leaves = (*arg_leaves, *state_leaves, *params)
            inputs = [t for t in (anchor, *leaves) if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(root, inputs, allow_unused=True) if inputs else ())
            if anchor is not None:
                next(got)
            grads_in = [next(got) if t.requires_grad else None for t in leaves]
            if seg.acc is not None:
                seg.acc.add(grads_in[n_args + n_states :], grads)
                del grads_in[n_args + n_states :]
        else:
            torch.autograd.backward(root)
            grads_in = [t.grad for t in (*arg_leaves, *state_leaves)]
        grad_x = box[0] if (box and x_needs) else None
        if seg.acc is not None:  # the handle of the chunked call (see _Chunks)
            return (None, grad_x, *grads_in, seg.acc.handle_grad())
        return (None, grad_x, *grads_in, *([None] * n_dummy))


class _Source(torch.autograd.Function):
    """The decompressed input of a recompute; its gradient lands in ``box``.

    Its only input is a tiny anchor, so nothing but the saved-tensor hooks of
    the recompute (which point at the compressed payload) refers to the
    decompressed tensor once the forward is done.
    """

    @staticmethod
    def forward(ctx, anchor, x_box, box):
        # x comes in a list: an output that is not an input is no view, so it may be modified in place.
        ctx.box = box
        return x_box.pop()

    @staticmethod
    def backward(ctx, grad):
        ctx.box.append(grad)
        return None, None, None


class _Written(torch.autograd.Function):
    """Mark ``x``, written in place by a segment, as modified there, as autograd does for an in-place op.

    Later uses of ``x`` send their gradient to ``handle``, the segment's output that stands for ``x``.
    (A separate node: a view may only be marked dirty by a function with one output.)
    """

    @staticmethod
    def forward(ctx, x, handle):
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        # x's own (old) value reaches the loss only through the segment; a view's base needs a tensor here.
        return grad.new_zeros(()).expand_as(grad), grad


class _Inject(torch.autograd.Function):
    """A scalar root whose backward hands ``grads`` to ``tensors``, without keeping the tensors."""

    @staticmethod
    def forward(ctx, grads, *tensors):
        ctx.grads = grads
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grads, ctx.grads = ctx.grads, None
        return (None, *grads)


def _recompute(seg, c, x_needs, arg_leaves, state_leaves, grads, box):
    """Rerun the segment with a graph; return ``(root, anchor)`` (``root`` None: nothing to do)."""
    x = seg.compressor.decompress(c, seg.x_shape)
    if seg.x_written and _shares_storage(c.payload, x):
        x = x.clone()  # the recompute writes into x: keep the payload as it is (for retain_graph)
    anchor = None
    if x_needs:
        anchor = torch.empty(0, device=x.device, requires_grad=True)
        x = _Source.apply(anchor, [x.detach()], box)
    else:
        x = x.detach()
    x_written = x if seg.x_dirty else None  # an output of the segment (see _GCFunction.forward)
    hooks = contextlib.nullcontext()
    if not isinstance(seg.compressor, NullSpikeCompressor) and x.numel() > 0:
        hooks = _input_from_payload(x, seg.compressor, c)
    args = _merge_args(seg.arg_template, arg_leaves)
    with hooks:
        if seg.stateful:
            base.load_memories(seg.module, _merge(seg.state_template, state_leaves))
        if seg.fn_boxed is not None:
            box_in = [x]
            del x
            out = seg.fn_boxed(box_in, *args)
        else:
            out = seg.fn(x, *args)
            del x
        _, out_tensors = _split([out] if seg.out_is_tensor else out)
        del out
        if seg.stateful:
            out_tensors += _split(base.extract_memories(seg.module))[1]
        if x_written is not None:
            out_tensors.append(x_written)
            del x_written
    pairs = [(t, g) for t, g in zip(out_tensors, grads) if g is not None and t.requires_grad]
    del out_tensors
    if not pairs:
        return None, anchor
    root = _Inject.apply([g for _, g in pairs], *[t for t, _ in pairs])
    return root, anchor


def _input_from_payload(x: _Tensor, compressor, c):
    """Saved-tensor hooks: save views of ``x`` as references to the compressed payload."""
    # A weak reference, not the address: once x is freed its memory may hold another tensor.
    storage_ref, version, dtype = weakref.ref(x.untyped_storage()), x._version, x.dtype

    def pack(t):
        storage = storage_ref()
        if (
            storage is not None
            and t.dtype == dtype
            and t._version == version
            and t.untyped_storage()._cdata == storage._cdata
        ):
            return (_FROM_PAYLOAD, t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(p):
        if type(p) is tuple and p[0] is _FROM_PAYLOAD:
            return compressor.decompress(c, c.shape).as_strided(p[1], p[2], p[3])
        return p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


_FROM_PAYLOAD = object()


# ---------------------------------------------------------------------------------------------
# Temporal chunks: one node owns the input and parameter gradients of a chunked call
# ---------------------------------------------------------------------------------------------
class _ParamAccumulator:
    """The parameter gradients of the chunks of one :class:`TCGCContainer` call, summed in place."""

    # No reference to the handle (an output of _Chunks, whose ctx holds this): no cycle through the graph.
    # The sum belongs to one backward pass (graph task): a pass that does not reach _Chunks
    # (autograd.grad w.r.t. another input, backward(inputs=...)) must not leave its sum to the next.
    __slots__ = ("params", "handle_meta", "grads", "owned", "task")

    def __init__(self, params):
        self.params, self.handle_meta = params, None
        self.grads: Optional[list] = None
        self.owned: List[bool] = []
        self.task = None

    def add(self, grads, grad_outputs):
        """Add one chunk's gradients, in the order the chunks' backwards run (as autograd would)."""
        task = torch._C._current_graph_task_id()
        if self.grads is None or self.task != task:
            self.grads, self.owned, self.task = [None] * len(grads), [False] * len(grads), task
        # Storages seen among this chunk's tensors: a gradient may be shared (two parameters
        # added to the same tensor get the same gradient) or be the outer gradient itself.
        seen: dict = {}
        for t in (*grads, *grad_outputs):
            if t is not None:
                ptr = t.untyped_storage().data_ptr()
                seen[ptr] = seen.get(ptr, 0) + 1
        for i, g in enumerate(grads):
            if g is None:
                continue
            old = self.grads[i]
            own = g._base is None and g.is_contiguous() and seen[g.untyped_storage().data_ptr()] == 1
            if old is None:
                self.grads[i], self.owned[i] = g, own
            elif self.owned[i]:
                old.add_(g)  # the same bits as old + g
            else:
                self.grads[i], self.owned[i] = (g.add_(old) if own else old + g), True

    def handle_grad(self) -> _Tensor:
        dtype, device = self.handle_meta
        return torch.zeros(0, dtype=dtype, device=device)

    def take(self) -> list:
        grads, self.grads, self.owned = self.grads, None, []
        if grads is None or self.task != torch._C._current_graph_task_id():
            return [None] * len(self.params)
        return grads


class _Chunks(torch.autograd.Function):
    """Split the sequences of a chunked call along dim 0; pass the parameters on as one handle.

    Its backward runs once, after every chunk's: it concatenates the chunks'
    input gradients (one full-size tensor per sequence, no zero padding) and
    returns the parameter gradients that the chunks summed into ``acc``, so
    that they leave through the outer graph once per call.
    """

    @staticmethod
    def forward(ctx, acc, n, n_seqs, *tensors):
        seqs = tensors[:n_seqs]
        ctx.acc, ctx.n, ctx.n_seqs = acc, n, n_seqs
        split = [torch.tensor_split(s, n) for s in seqs]
        ctx.sizes = [[p.shape[0] for p in parts] for parts in split]
        ctx.meta = [(s.shape, s.dtype, s.device) for s in seqs]
        pieces = [p for parts in split for p in parts]
        frozen = [p for i, parts in enumerate(split) if not ctx.needs_input_grad[3 + i] for p in parts]
        # A floating handle: an integer one (token ids, bool spikes) could not carry a gradient.
        s0 = seqs[0]
        handle = s0.new_empty(0, dtype=s0.dtype if s0.is_floating_point() else torch.get_default_dtype())
        acc.handle_meta = (handle.dtype, handle.device)
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        ctx.set_materialize_grads(False)
        return (*pieces, handle)

    @staticmethod
    def backward(ctx, *grads):
        n, n_seqs = ctx.n, ctx.n_seqs
        out = []
        for i in range(n_seqs):
            parts = grads[i * n : (i + 1) * n]
            if not ctx.needs_input_grad[3 + i] or all(g is None for g in parts):
                out.append(None)
                continue
            shape, dtype, device = ctx.meta[i]
            parts = [
                g if g is not None else torch.zeros((k, *shape[1:]), dtype=dtype, device=device)
                for g, k in zip(parts, ctx.sizes[i])
            ]
            out.append(torch.cat(parts, dim=0))
            del parts
        return (None, None, None, *out, *ctx.acc.take())


class _Join(torch.autograd.Function):
    """``torch.cat`` of the chunks' outputs along dim 0 whose backward gives each chunk its own gradient.

    ``cat``'s backward hands out views of the one output gradient, which stays
    alive until the last chunk (the first in time) is done; copies let each
    chunk's part go as soon as that chunk's backward has run (the copies and the
    gradient exist together only while this node runs, when no chunk is being
    recomputed). A gradient that is not contiguous (expanded from a sum) stays
    views: copies would make it.
    """

    @staticmethod
    def forward(ctx, *parts):
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.sizes)
        return tuple(g.clone() for g in parts) if grad.is_contiguous() else parts


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _owner_module(fn) -> Optional[nn.Module]:
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _checkpoint(fn, compressor, x, args, module=None, stateful=False, fn_boxed=None, acc=None, handle=None):
    if not torch.is_grad_enabled():
        return fn(x, *args)
    if not isinstance(x, _Tensor):
        raise TypeError(f"snnkit.memopt: x_seq must be a tensor, got {type(x).__name__}")
    seg = _Segment(fn, compressor, module, stateful, fn_boxed)
    seg.arg_template, arg_tensors = _split_args(args)
    state_tensors = []
    if stateful:
        seg.state_template, state_tensors = _split(base.extract_memories(module))
    dummy = []
    if acc is not None:
        # The parameters enter once per chunked call, through the handle (see _Chunks).
        seg.acc, seg.params, params, dummy = acc, acc.params, [], [handle]
    else:
        seg.params = params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if module is None and not any(t.requires_grad for t in (x, *arg_tensors)):
            # A closure may use parameters: keep the segment in the graph (Invariant 5).
            dummy = [torch.empty(0, requires_grad=True)]
    seg.n_in = (len(arg_tensors), len(state_tensors), len(params), len(dummy))
    outs = _GCFunction.apply(seg, x, *arg_tensors, *state_tensors, *params, *dummy)
    n_out = sum(v is _SLOT for v in seg.out_template)
    out = _merge(seg.out_template, outs[:n_out])
    if stateful:
        base.load_memories(module, _merge(seg.state_out_template, outs[n_out : len(outs) - seg.x_dirty]))
    if seg.x_dirty:
        if acc is not None:
            raise RuntimeError(
                "snnkit.memopt: the first module of a TCGCContainer modified its input in place, which its "
                "chunks (views of one input that requires grad) cannot do. Make the operation out of place, "
                "or use a GCContainer."
            )
        _Written.apply(x, outs[-1])
    return out[0] if seg.out_is_tensor else tuple(out)


def input_compressed_gc(f_forward: Callable, x_compressor: BaseSpikeCompressor, x_seq: _Tensor, *args):
    """Gradient checkpointing of ``f_forward(x_seq, *args)`` with ``x_seq`` stored compressed.

    Only the compressed ``x_seq``, the other tensor arguments (as they are) and
    the RNG/autocast state are kept; the forward is recomputed in backward.
    Without grad enabled it just calls ``f_forward``. If ``f_forward`` is an
    ``nn.Module`` or a bound method of one, its parameters become explicit inputs
    of the segment, and its memories too if it has any (see the module
    docstring); a plain function must not change module state (use
    :class:`GCContainer` for stateful modules).

    Args:
        f_forward: The function to checkpoint; returns a tensor or a tuple.
        x_compressor: Compressor for ``x_seq`` (``None``: no compression).
        x_seq: Main input, typically a spike sequence.
        *args: Other arguments, stored without compression (tensors nested in
            lists, tuples and dicts included).

    Returns:
        What ``f_forward`` returns (a tensor or a tuple).

    Raises:
        TypeError: if ``x_seq`` is not a tensor or the compressor is not one.
        ValueError: in backward, if ``x_seq`` held values the compressor cannot store.
        RuntimeError: if ``f_forward`` writes into ``x_seq`` in place where the
            compressor keeps it (see the module docstring), or in a double backward.

    Example:
        >>> import torch
        >>> from snnkit.memopt import input_compressed_gc, NullSpikeCompressor
        >>> def simple_forward(x, weight):
        ...     return torch.matmul(x, weight.t())
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> weight = torch.randn(4, 3, requires_grad=True)
        >>> result = input_compressed_gc(simple_forward, NullSpikeCompressor(), x, weight)
        >>> result.sum().backward()
        >>> torch.allclose(x.grad, weight.sum(0).expand(5, 3))
        True
    """
    module = _owner_module(f_forward)
    stateful = module is not None and _has_state(module)
    return _checkpoint(f_forward, _as_compressor(x_compressor), x_seq, args, module, stateful)


def _first_in_place(module: Optional[nn.Module]) -> bool:
    """Whether the first module of ``module`` (through ``nn.Sequential``) has ``inplace=True``, e.g. ``nn.ReLU``."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return getattr(module, "inplace", False) is True and not isinstance(module, Dropout)  # ours is out of place


def _shares_storage(payload, x: _Tensor) -> bool:
    key = x.untyped_storage()._cdata
    return any(isinstance(p, _Tensor) and p.untyped_storage()._cdata == key for p in payload)


def _has_state(module: nn.Module) -> bool:
    return any(isinstance(m, base.MemoryModule) for m in module.modules())


def _warn_statistics_updated_twice(container: nn.Module) -> None:
    """Warn about BatchNorm layers that a segment would make update their statistics twice a step."""
    for name, m in container.named_modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and not isinstance(m, (BatchNorm1d, BatchNorm2d))
        ):
            warnings.warn(
                f"snnkit.memopt: torch.nn.{type(m).__name__} at {name!r} in a "
                f"{type(container).__name__} updates its running statistics twice per training step (in the "
                "first forward and in the recompute); use snnkit.layer.BatchNorm1d/BatchNorm2d, which update "
                "them once",
                stacklevel=3,
            )
            return


def to_gc_function(x_compressor: BaseSpikeCompressor, f_forward: Optional[Callable] = None) -> Callable:
    """Wrap ``f_forward`` with :func:`input_compressed_gc` (decorator or converter).

    Args:
        x_compressor: Compressor for the first argument.
        f_forward: The function; ``None`` returns a decorator.

    Returns:
        The checkpointed function.

    Example:
        >>> import torch
        >>> from snnkit.memopt import to_gc_function, NullSpikeCompressor
        >>> @to_gc_function(NullSpikeCompressor())
        ... def decorated_forward(x, weight):
        ...     return torch.matmul(x, weight.t())
        >>> x, w = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        >>> decorated_forward(x, w).shape
        torch.Size([5, 4])
        >>> converted = to_gc_function(NullSpikeCompressor(), torch.matmul)
        >>> converted(x, w.t()).shape
        torch.Size([5, 4])
    """
    compressor = _as_compressor(x_compressor)

    def convert(fn):
        def gc_forward(x_seq, *args):
            return input_compressed_gc(fn, compressor, x_seq, *args)

        gc_forward.__name__ = getattr(fn, "__name__", "gc_forward")
        gc_forward.__qualname__ = getattr(fn, "__qualname__", gc_forward.__name__)
        gc_forward.__doc__ = getattr(fn, "__doc__", None)
        gc_forward.__wrapped__ = fn
        return gc_forward

    return convert if f_forward is None else convert(f_forward)


class _FollowsOutside:
    """``.to()``/``.half()`` and ``train()``/``eval()`` also reach ``__dict__["_outside"]``.

    A segment the planner builds from blocks' parts holds the parts only; the
    modules of the blocks it does not run (the blocks themselves, a split
    container) keep their own tensors and mode in step with the segment.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for module in self.__dict__.get("_outside", ()):
            module._apply(fn, recurse=False)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.__dict__.get("_outside", ()):
            module.training = mode
        return self


class GCContainer(_FollowsOutside, nn.Sequential):
    """A GC segment built like :class:`torch.nn.Sequential`.

    Stores its input compressed with ``x_compressor`` and recomputes the
    modules in backward. With stateful modules (:class:`snnkit.base.MemoryModule`)
    inside, their memories enter and leave the segment as explicit tensors (see
    the module docstring); the result equals the plain ``nn.Sequential`` run.

    Args:
        x_compressor: Spike compressor for the input (``None``: :class:`NullSpikeCompressor`).
        *args: The modules. The first gets ``(x, *args)`` of :meth:`forward`,
            the others the previous output.

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit.memopt import GCContainer, NullSpikeCompressor
        >>> container = GCContainer(NullSpikeCompressor(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
        >>> x = torch.randn(3, 10, requires_grad=True)
        >>> result = container(x)
        >>> result.shape
        torch.Size([3, 5])
        >>> container
        GCContainer(
          x_compressor=NullSpikeCompressor()
          (0): Linear(in_features=10, out_features=20, bias=True)
          (1): ReLU()
          (2): Linear(in_features=20, out_features=5, bias=True)
        )
    """

    def __init__(self, x_compressor: Optional[BaseSpikeCompressor], *args):
        super().__init__(*args)
        self.x_compressor = _as_compressor(x_compressor)
        _warn_statistics_updated_twice(self)

    def extra_repr(self) -> str:
        return f"x_compressor={self.x_compressor!r}"

    def super_forward(self, input, *args):
        """Run the modules in order without checkpointing (``nn.Sequential.forward``)."""
        return self._super_forward_boxed([input], *args)

    def _super_forward_boxed(self, box, *args):
        input = box.pop()  # the only reference: freed once the first module is done with it
        for i, module in enumerate(self):
            input = module(input, *args) if i == 0 else module(input)
        return input

    def stateless_forward(self, x, *args):
        """Checkpointed forward for modules without state."""
        return _checkpoint(self.super_forward, self.x_compressor, x, args, self, False, self._super_forward_boxed)

    def stateful_forward(self, x, *args):
        """Checkpointed forward passing the memories in and out as explicit tensors."""
        return _checkpoint(self.super_forward, self.x_compressor, x, args, self, True, self._super_forward_boxed)

    def forward(self, x, *args):
        """Checkpointed forward: :meth:`stateful_forward` if any module has state."""
        if _has_state(self):
            return self.stateful_forward(x, *args)
        return self.stateless_forward(x, *args)


def _single_step_modules(module: nn.Module, path: str = "") -> List[str]:
    """Names of the modules (``module`` included) in ``step_mode='s'`` that see a sequence as it is.

    A SeqToANNContainer flattens time into the batch, so its children are not looked at.
    """
    names = [path] if isinstance(module, base.StepModule) and module.step_mode == "s" else []
    if not isinstance(module, SeqToANNContainer):
        for name, child in module.named_children():
            names += _single_step_modules(child, f"{path}.{name}" if path else name)
    return names


class TCGCContainer(GCContainer):
    """A temporally chunked :class:`GCContainer`.

    Splits the first ``n_seq_inputs`` inputs along dim 0 (time) into
    ``min(n_chunk, T)`` chunks, runs each chunk as a GC segment with the state
    passed from chunk to chunk, and concatenates the ``n_outputs`` outputs along
    dim 0. Only one chunk's graph exists at a time in backward; each chunk gets
    its own copy of its part of the output gradient (freed after that chunk),
    the input gradient is assembled once at the end, and the chunks' parameter
    gradients are summed in place and leave the call once (see the module docstring).

    Args:
        x_compressor: Spike compressor (``None``: :class:`NullSpikeCompressor`).
        *args: The modules (positional).
        n_chunk: Number of chunks (keyword, ``>= 1``; clipped to ``T`` with a warning).
        n_seq_inputs: How many leading inputs are sequences to split (keyword).
        n_outputs: How many tensor outputs to concatenate (keyword).

    Raises:
        ValueError: for ``n_chunk``, ``n_seq_inputs`` or ``n_outputs`` below 1,
            sequence inputs of different lengths, or a module in ``step_mode="s"``
            (whose dim 0 is the batch, not time).

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit.memopt import TCGCContainer, NullSpikeCompressor
        >>> tc_container = TCGCContainer(
        ...     NullSpikeCompressor(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5), n_chunk=4
        ... )
        >>> x_seq = torch.randn(8, 3, 10, requires_grad=True)  # T=8
        >>> tc_container(x_seq).shape
        torch.Size([8, 3, 5])
    """

    def __init__(self, x_compressor, *args, n_chunk: int = 1, n_seq_inputs: int = 1, n_outputs: int = 1):
        super().__init__(x_compressor, *args)
        for name, value in (("n_chunk", n_chunk), ("n_seq_inputs", n_seq_inputs), ("n_outputs", n_outputs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"snnkit.memopt: TCGCContainer needs an integer {name} >= 1, got {value!r}")
        self.n_chunk, self.n_seq_inputs, self.n_outputs = n_chunk, n_seq_inputs, n_outputs

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_chunk={self.n_chunk}, n_seq_inputs={self.n_seq_inputs}, "
            f"n_outputs={self.n_outputs}"
        )

    def _chunk_forward(self, acc, handle, x, *args):
        """One chunk as a GC segment (``acc`` None: as :meth:`GCContainer.forward`)."""
        return _checkpoint(
            self.super_forward, self.x_compressor, x, args, self, _has_state(self), self._super_forward_boxed, acc, handle
        )

    def forward(self, x_seq, *args):
        """Run the chunks one after another; returns one tensor or ``n_outputs`` tensors."""
        n_seq = self.n_seq_inputs
        if 1 + len(args) < n_seq:
            raise ValueError(
                f"snnkit.memopt: TCGCContainer has n_seq_inputs={n_seq}, but forward got {1 + len(args)} inputs"
            )
        single = _single_step_modules(self)
        if single:
            raise ValueError(
                f"snnkit.memopt: TCGCContainer splits its inputs along time (dim 0), but module {single[0]!r} is in "
                "step_mode='s', where dim 0 is the batch; use step_mode='m' (functional.set_step_mode(block, 'm')) "
                "or a GCContainer"
            )
        seqs, rest = (x_seq, *args[: n_seq - 1]), args[n_seq - 1 :]
        T = x_seq.shape[0]
        lengths = [s.shape[0] for s in seqs]
        if any(n != T for n in lengths):
            raise ValueError(f"snnkit.memopt: TCGCContainer sequence inputs differ in length along dim 0: {lengths}")
        n = min(self.n_chunk, max(T, 1))
        if self.n_chunk > max(T, 1):
            warnings.warn(
                f"snnkit.memopt: TCGCContainer n_chunk={self.n_chunk} is larger than T={T}; using {n} chunks",
                stacklevel=2,
            )
        acc = None
        params = [p for p in self.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (params or any(s.requires_grad for s in seqs)):
            acc = _ParamAccumulator(params)
            *flat, handle = _Chunks.apply(acc, n, len(seqs), *seqs, *params)
            pieces = [flat[i * n : (i + 1) * n] for i in range(len(seqs))]
            del flat
        else:
            pieces, handle = [torch.tensor_split(s, n) for s in seqs], None
        outs = []
        for k in range(n):
            out = self._chunk_forward(acc, handle, *(p[k] for p in pieces), *rest)
            outs.append((out,) if isinstance(out, _Tensor) else tuple(out))
            del out
        if any(len(o) != self.n_outputs for o in outs):
            raise ValueError(
                f"snnkit.memopt: TCGCContainer has n_outputs={self.n_outputs}, but its modules returned {len(outs[0])}"
            )
        cat = []
        for i in range(self.n_outputs):
            parts = [o[i] for o in outs]
            cat.append(parts[0] if n == 1 else _Join.apply(*parts))
            del parts
        return cat[0] if self.n_outputs == 1 else tuple(cat)
