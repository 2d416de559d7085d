"""Step-mode aware layers and containers.

In ``"m"`` mode a stateless layer gets ``[T, N, *]``, runs once on the flattened
``[T * N, *]`` batch and returns ``[T, N, *]``. :class:`Dropout` keeps one mask
for all time steps (until :func:`~snnkit.functional.reset_net`).

BatchNorm is GC-aware (see :mod:`snnkit.memopt`): the first forward of a
checkpointed segment is an ordinary training forward, which updates
``running_mean``, ``running_var`` and ``num_batches_tracked`` in the order of a
plain step; the recompute in backward normalises with the same batch
statistics without touching the running ones, so they move exactly once per
step (also when a backward runs twice, or single steps are recomputed in
reverse order).

:class:`MaxPool2d` and :class:`AvgPool2d` keep no input for backward where
their windows do not overlap (indices for max pooling, nothing for average
pooling), so the spikes entering a pool are not kept alive until backward;
outputs and gradients are torch's bit for bit.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _pool
from ._context import in_gc_recompute
from .base import MemoryModule, StepModule

__all__ = [
    "SeqToANNContainer",
    "Linear",
    "Conv1d",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "AvgPool2d",
    "MaxPool2d",
    "AdaptiveAvgPool2d",
    "Flatten",
    "Dropout",
]


def _seq_to_ann(fn, x_seq: torch.Tensor, name: str, m_dims) -> torch.Tensor:
    if m_dims is not None and x_seq.dim() not in m_dims:
        shapes = " or ".join(f"{d}-D" for d in m_dims)
        raise ValueError(
            f"{name} in step_mode='m' expects a {shapes} sequence [T, N, ...], got shape {tuple(x_seq.shape)}"
        )
    if x_seq.dim() < 2:
        raise ValueError(f"{name} in step_mode='m' expects a sequence [T, N, ...], got shape {tuple(x_seq.shape)}")
    y = fn(x_seq.flatten(0, 1))
    t, n = x_seq.shape[:2]
    if isinstance(y, tuple):  # e.g. a pool with return_indices=True
        return tuple(part.view(t, n, *part.shape[1:]) for part in y)
    return y.view(t, n, *y.shape[1:])


class SeqToANNContainer(nn.Sequential):
    """Run stateless modules on a sequence ``[T, N, *]`` as one ``[T * N, *]`` batch.

    Example:
        >>> import torch, torch.nn as nn
        >>> from snnkit.layer import SeqToANNContainer
        >>> f = SeqToANNContainer(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> f(torch.randn(8, 2, 1, 5, 5)).shape
        torch.Size([8, 2, 4, 3, 3])
    """

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return _seq_to_ann(super().forward, x_seq, type(self).__name__, None)


class _StepLayer(StepModule):
    """Mixin: ``"s"`` mode is the torch layer; ``"m"`` mode flattens time into the batch."""

    _m_dims = None  # allowed input dims in "m" mode (None: any >= 2)

    def forward(self, x):
        if self.step_mode == "m":
            return _seq_to_ann(super().forward, x, type(self).__name__, self._m_dims)
        return super().forward(x)

    def extra_repr(self):
        return f"{super().extra_repr()}, step_mode={self.step_mode!r}"


def _step_layer(torch_cls, m_dims, doc, name=None):
    def __init__(self, *args, step_mode: str = "s", **kwargs):
        torch_cls.__init__(self, *args, **kwargs)
        self.step_mode = step_mode

    attrs = {"__init__": __init__, "_m_dims": m_dims, "__doc__": doc}
    cls = type(name or torch_cls.__name__, (_StepLayer, torch_cls), attrs)
    cls.__module__ = __name__
    return cls


_DOC = """:class:`torch.nn.{0}` with ``step_mode`` (``"m"``: input ``[T, N, {1}]``)."""
Linear = _step_layer(nn.Linear, None, _DOC.format("Linear", "*, in_features"))
Conv1d = _step_layer(nn.Conv1d, (4,), _DOC.format("Conv1d", "C, L"))
Conv2d = _step_layer(nn.Conv2d, (5,), _DOC.format("Conv2d", "C, H, W"))
AdaptiveAvgPool2d = _step_layer(nn.AdaptiveAvgPool2d, (5,), _DOC.format("AdaptiveAvgPool2d", "C, H, W"))
Flatten = _step_layer(nn.Flatten, None, _DOC.format("Flatten", "*") + " Flattens each sample.")


class _LeanMaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with two paths for non-overlapping windows (see :mod:`snnkit._pool`)."""

    def _windows(self, x):
        return None if self.return_indices else _pool.windows(self, x)

    def forward(self, x):
        k = self._windows(x)
        if k is None:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _pool.MaxPoolSavingIndices.apply(x, k)
        return _pool.window_max(x, *k)


class _LeanAvgPool2d(nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` that keeps only the input's shape for non-overlapping windows."""

    def _windows(self, x):
        return _pool.windows(self, x)

    def forward(self, x):
        k = self._windows(x) if torch.is_grad_enabled() and x.requires_grad else None
        if k is None:
            return super().forward(x)
        return _pool.AvgPoolSavingShape.apply(x, k, self.divisor_override)


MaxPool2d = _step_layer(
    _LeanMaxPool2d,
    (5,),
    """:class:`torch.nn.MaxPool2d` with ``step_mode`` (``"m"``: input ``[T, N, C, H, W]``).

    Where the windows do not overlap (``stride == kernel_size``, no padding or
    dilation, no indices, floor mode) on a contiguous CPU float tensor, two
    paths give torch's results bit for bit: without a gradient (inference, the
    first forward of a GC segment) a faster elementwise max, and with one a
    pool that keeps only its indices for backward, not its input (torch keeps
    both: on the benchmark VGG the no-GC peak drops from 102.6 to 84.7 MiB, and
    a GC recompute need not decompress its input a second time). Everything
    else is torch's.

    Example:
        >>> import torch
        >>> from snnkit.layer import MaxPool2d
        >>> pool = MaxPool2d(2, step_mode="m")
        >>> x = torch.arange(16.0).view(1, 1, 1, 4, 4)
        >>> with torch.no_grad():
        ...     pool(x).flatten()
        tensor([ 5.,  7., 13., 15.])
    """,
    "MaxPool2d",
)


AvgPool2d = _step_layer(
    _LeanAvgPool2d,
    (5,),
    """:class:`torch.nn.AvgPool2d` with ``step_mode`` (``"m"``: input ``[T, N, C, H, W]``).

    Where a gradient is needed and the windows do not overlap (``stride ==
    kernel_size``, no padding, floor mode) on a contiguous CPU float tensor, it
    keeps only the input's shape for backward, not the input (torch keeps the
    input), with torch's outputs and gradients bit for bit. Everything else is
    torch's.

    Example:
        >>> import torch
        >>> from snnkit.layer import AvgPool2d
        >>> pool = AvgPool2d(2, step_mode="m")
        >>> x = torch.arange(16.0).view(1, 1, 1, 4, 4).requires_grad_()
        >>> y = pool(x)
        >>> y.flatten()
        tensor([ 2.5000,  4.5000, 10.5000, 12.5000], grad_fn=<ViewBackward0>)
        >>> y.sum().backward()
        >>> x.grad.flatten()[:4]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """,
    "AvgPool2d",
)


class _GCAwareBatchNorm(_StepLayer):
    """Skip the running-statistics update in the recompute of a GC segment."""

    def _bn_forward(self, x):
        if self.training and self.track_running_stats and in_gc_recompute():
            # Same output as a training forward; the first forward updated the statistics.
            self._check_input_dim(x)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    def forward(self, x):
        if self.step_mode == "m":
            return _seq_to_ann(self._bn_forward, x, type(self).__name__, self._m_dims)
        return self._bn_forward(x)


class BatchNorm1d(_GCAwareBatchNorm, nn.BatchNorm1d):
    """GC-aware :class:`torch.nn.BatchNorm1d` with ``step_mode`` (``"m"``: ``[T, N, C]`` or ``[T, N, C, L]``).

    Example:
        >>> import torch
        >>> from snnkit.layer import BatchNorm1d
        >>> bn = BatchNorm1d(3, step_mode="m")
        >>> bn(torch.randn(4, 2, 3)).shape
        torch.Size([4, 2, 3])
    """

    _m_dims = (3, 4)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        nn.BatchNorm1d.__init__(self, *args, **kwargs)
        self.step_mode = step_mode


class BatchNorm2d(_GCAwareBatchNorm, nn.BatchNorm2d):
    """GC-aware :class:`torch.nn.BatchNorm2d` with ``step_mode`` (``"m"``: ``[T, N, C, H, W]``).

    Example:
        >>> import torch
        >>> from snnkit.layer import BatchNorm2d
        >>> from snnkit.memopt import GCContainer
        >>> segment = GCContainer(None, BatchNorm2d(3, step_mode="m"))
        >>> segment(torch.randn(4, 2, 3, 5, 5, requires_grad=True)).sum().backward()
        >>> segment[0].num_batches_tracked  # updated once per step, as without GC
        tensor(1)
    """

    _m_dims = (5,)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        nn.BatchNorm2d.__init__(self, *args, **kwargs)
        self.step_mode = step_mode


class Dropout(MemoryModule):
    """Dropout whose mask is drawn once and shared by every time step until reset.

    Args:
        p: Probability of an element being zeroed.
        step_mode: ``"s"`` or ``"m"``.
        inplace: Accepted as :class:`torch.nn.Dropout` takes it; the mask is
            applied out of place either way.

    Example:
        >>> import torch
        >>> from snnkit.layer import Dropout
        >>> d = Dropout(0.5, step_mode="m")
        >>> y = d(torch.ones(4, 2, 8))
        >>> bool((y[0] == y[3]).all())  # the same mask at every step
        True
    """

    def __init__(self, p: float = 0.5, step_mode: str = "s", *, inplace: bool = False):
        super().__init__(step_mode)
        self.inplace = inplace  # accepted as torch.nn.Dropout takes it; the mask is applied out of place
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p!r}")
        self.p = p
        self.register_memory("mask", None)

    def _apply_mask(self, x, like):
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            self.mask = F.dropout(torch.ones_like(like), self.p, training=True)
        return x * self.mask

    def forward(self, x):
        if self.step_mode == "m":
            if x.dim() < 2:
                raise ValueError(f"Dropout in step_mode='m' expects [T, N, ...], got shape {tuple(x.shape)}")
            return self._apply_mask(x, x[0])
        return self._apply_mask(x, x)

    def extra_repr(self):
        return f"p={self.p}, step_mode={self.step_mode!r}"
