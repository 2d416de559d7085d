"""Step-mode aware layers and containers.

In ``"m"`` mode a stateless layer gets ``[T, N, *]``, runs once on the flattened
``[T * N, *]`` batch and returns ``[T, N, *]``. :class:`Dropout` keeps one mask
for all time steps (until :func:`~snnkit.functional.reset_net`).

BatchNorm is GC-aware (see :mod:`snnkit.memopt`): inside the first, no-grad
forward of a checkpointed segment it normalises with the batch statistics
without touching the running statistics; the recompute in backward then runs
an ordinary training forward, which updates ``running_mean``, ``running_var``
and ``num_batches_tracked`` exactly once per step, as a plain step does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ._context import in_gc_1st_forward
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
    return y.view(x_seq.shape[0], x_seq.shape[1], *y.shape[1:])


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


def _step_layer(torch_cls, m_dims, doc):
    def __init__(self, *args, step_mode: str = "s", **kwargs):
        torch_cls.__init__(self, *args, **kwargs)
        self.step_mode = step_mode

    cls = type(torch_cls.__name__, (_StepLayer, torch_cls), {"__init__": __init__, "_m_dims": m_dims, "__doc__": doc})
    cls.__module__ = __name__
    return cls


_DOC = """:class:`torch.nn.{0}` with ``step_mode`` (``"m"``: input ``[T, N, {1}]``)."""
Linear = _step_layer(nn.Linear, None, _DOC.format("Linear", "*, in_features"))
Conv1d = _step_layer(nn.Conv1d, (4,), _DOC.format("Conv1d", "C, L"))
Conv2d = _step_layer(nn.Conv2d, (5,), _DOC.format("Conv2d", "C, H, W"))
AvgPool2d = _step_layer(nn.AvgPool2d, (5,), _DOC.format("AvgPool2d", "C, H, W"))
AdaptiveAvgPool2d = _step_layer(nn.AdaptiveAvgPool2d, (5,), _DOC.format("AdaptiveAvgPool2d", "C, H, W"))
Flatten = _step_layer(nn.Flatten, None, _DOC.format("Flatten", "*") + " Flattens each sample.")


def _window_max(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Max over non-overlapping ``kh x kw`` windows of ``[*, H, W]`` (floor mode), no indices.

    Elementwise maxima of the ``kh * kw`` strided views of a contiguous ``x``: on
    CPU several times faster than ``max_pool2d``, with the same result. NaN
    propagates, and on a tie (``-0.0`` against ``+0.0``) the earlier element of the
    window wins, as in ``max_pool2d``: on strided views ``torch.maximum`` runs its
    scalar loop, which returns its first argument on ties (pinned by
    ``tests/test_layer.py``).
    """
    h, w = x.shape[-2] // kh * kh, x.shape[-1] // kw * kw
    views = [x[..., i:h:kh, j:w:kw] for i in range(kh) for j in range(kw)]
    m = torch.maximum(views[0], views[1])
    for v in views[2:]:
        torch.maximum(m, v, out=m)
    return m


class _PoolSavingIndices(torch.autograd.Function):
    """``max_pool2d`` that keeps only its indices for backward, not its input.

    The backward adds the gradient to zeros at the indices, as ``max_pool2d``'s
    does (bit-identical, also in deterministic mode). The spikes fed to a pool
    therefore need not stay alive until backward.
    """

    @staticmethod
    def forward(ctx, x, kernel):
        y, idx = F.max_pool2d(x, kernel, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        planes, size = ctx.shape[:-2].numel(), ctx.shape[-2] * ctx.shape[-1]
        out = grad.new_zeros(planes, size)
        out.scatter_add_(1, idx.reshape(planes, -1), grad.reshape(planes, -1))
        return out.view(ctx.shape), None


class _FastMaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with two paths for non-overlapping windows.

    Without a gradient :func:`_window_max`, with one :class:`_PoolSavingIndices`.
    """

    def _windows(self, x):
        """``(kh, kw)`` when the windows do not overlap on ``x`` (a CPU float tensor), else ``None``."""
        if x.device.type != "cpu" or not x.is_floating_point() or x.dim() not in (3, 4) or not x.is_contiguous():
            return None
        if self.return_indices or self.ceil_mode:
            return None
        k, stride = _pair(self.kernel_size), _pair(self.stride if self.stride is not None else self.kernel_size)
        if k != stride or _pair(self.padding) != (0, 0) or _pair(self.dilation) != (1, 1) or k[0] * k[1] < 2:
            return None
        return k if x.shape[-2] >= k[0] and x.shape[-1] >= k[1] else None

    def forward(self, x):
        k = self._windows(x)
        if k is None:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PoolSavingIndices.apply(x, k)
        return _window_max(x, *k)


class MaxPool2d(_StepLayer, _FastMaxPool2d):
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
    """

    _m_dims = (5,)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        nn.MaxPool2d.__init__(self, *args, **kwargs)
        self.step_mode = step_mode


class _GCAwareBatchNorm(_StepLayer):
    """Skip the running-statistics update in the first forward of a GC segment."""

    def _bn_forward(self, x):
        if self.training and self.track_running_stats and in_gc_1st_forward():
            # Same output as a training forward; the recompute updates the statistics.
            self._check_input_dim(x)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    def forward(self, x):
        if self.step_mode == "m":
            return _seq_to_ann(self._bn_forward, x, type(self).__name__, self._m_dims)
        return self._bn_forward(x)


class BatchNorm1d(_GCAwareBatchNorm, nn.BatchNorm1d):
    """GC-aware :class:`torch.nn.BatchNorm1d` with ``step_mode`` (``"m"``: ``[T, N, C]`` or ``[T, N, C, L]``)."""

    _m_dims = (3, 4)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        nn.BatchNorm1d.__init__(self, *args, **kwargs)
        self.step_mode = step_mode


class BatchNorm2d(_GCAwareBatchNorm, nn.BatchNorm2d):
    """GC-aware :class:`torch.nn.BatchNorm2d` with ``step_mode`` (``"m"``: ``[T, N, C, H, W]``)."""

    _m_dims = (5,)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        nn.BatchNorm2d.__init__(self, *args, **kwargs)
        self.step_mode = step_mode


class Dropout(MemoryModule):
    """Dropout whose mask is drawn once and shared by every time step until reset.

    Args:
        p: Probability of an element being zeroed.
        step_mode: ``"s"`` or ``"m"``.

    Example:
        >>> import torch
        >>> from snnkit.layer import Dropout
        >>> d = Dropout(0.5, step_mode="m")
        >>> y = d(torch.ones(4, 2, 8))
        >>> bool((y[0] == y[3]).all())  # the same mask at every step
        True
    """

    def __init__(self, p: float = 0.5, step_mode: str = "s"):
        super().__init__(step_mode)
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
