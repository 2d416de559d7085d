"""Private: pooling over non-overlapping windows with less kept for backward (used by :mod:`snnkit.layer`).

Where a pool's windows do not overlap, its backward needs no input values:
max pooling needs the indices of the maxima, average pooling nothing but the
input's shape. torch's pools keep the input anyway (the spikes entering every
pool of an SNN, until backward); these keep only what backward needs and give
torch's outputs and gradients bit for bit.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def windows(pool, x: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(kh, kw)`` when the windows of ``pool`` (a MaxPool2d or AvgPool2d) do not overlap on ``x``, else ``None``.

    Only for contiguous CPU float tensors ``[C, H, W]`` or ``[N, C, H, W]`` at least
    one window large, floor mode, no padding or dilation.
    """
    if x.device.type != "cpu" or not x.is_floating_point() or x.dim() not in (3, 4) or not x.is_contiguous():
        return None
    k, stride = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if pool.ceil_mode or k != stride or _pair(pool.padding) != (0, 0) or _pair(getattr(pool, "dilation", 1)) != (1, 1):
        return None
    return k if k[0] * k[1] >= 2 and x.shape[-2] >= k[0] and x.shape[-1] >= k[1] else None


def window_max(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Max over non-overlapping ``kh x kw`` windows of ``[*, H, W]`` (floor mode), no indices.

    Bit for bit ``max_pool2d`` (on a ``-0.0``/``+0.0`` tie the earlier element wins;
    NaN propagates with the bits ``max_pool2d`` gives it). For ``kw >= 2``, the
    elementwise maxima of the ``kh * kw`` strided views: there ``torch.maximum``
    runs its scalar loop, which returns its first argument on ties but a NaN of
    its own, so an input with NaN is handed to ``max_pool2d``. For ``kw == 1`` the
    views are contiguous and ``torch.maximum`` runs vectorised code, which returns
    the later element on ties: ``max_pool2d`` is used.
    """
    if kw == 1:
        return F.max_pool2d(x, (kh, kw))
    h, w = x.shape[-2] // kh * kh, x.shape[-1] // kw * kw
    views = [x[..., i:h:kh, j:w:kw] for i in range(kh) for j in range(kw)]
    m = torch.maximum(views[0], views[1])
    for v in views[2:]:
        torch.maximum(m, v, out=m)
    if m.sum().isnan():  # a NaN (or both infinities) in x: rare, and no allocation to find out
        return F.max_pool2d(x, (kh, kw))
    return m


class MaxPoolSavingIndices(torch.autograd.Function):
    """``max_pool2d`` that keeps only its indices for backward.

    The backward adds the gradient to zeros at the indices, as ``max_pool2d``'s
    does (bit-identical, also in deterministic mode).
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


class AvgPoolSavingShape(torch.autograd.Function):
    """``avg_pool2d`` that keeps nothing for backward but the input's shape.

    The backward spreads ``grad / divisor`` over each window and adds it to
    zeros (``+ 0.0``: a ``-0.0`` becomes ``+0.0``), as ``avg_pool2d``'s does;
    the rows and columns no window covers get zeros.
    """

    @staticmethod
    def forward(ctx, x, kernel, divisor):
        ctx.shape, ctx.kernel, ctx.divisor = x.shape, kernel, divisor
        return F.avg_pool2d(x, kernel, divisor_override=divisor)

    @staticmethod
    def backward(ctx, grad):
        (kh, kw), (oh, ow) = ctx.kernel, grad.shape[-2:]
        delta = torch.div(grad, ctx.divisor or kh * kw).add_(0.0)
        covered = (oh * kh, ow * kw) == tuple(ctx.shape[-2:])
        out = grad.new_empty(ctx.shape) if covered else grad.new_zeros(ctx.shape)
        region = out[..., : oh * kh, : ow * kw].unflatten(-1, (ow, kw)).unflatten(-3, (oh, kh))
        region.copy_(delta[..., :, None, :, None].expand(region.shape))
        return out, None, None
