"""Surrogate spike functions: Heaviside forward, smooth derivative backward.

Each surrogate keeps three things side by side so they cannot drift:
``primitive`` (the smooth function), ``derivative`` (its torch derivative, used
in backward) and ``cuda_derivative`` (the same derivative as CUDA C, inlined by
the fused kernels of the CuPy backend). The formulas are SpikingJelly's.

Example:
    >>> import torch
    >>> from snnkit import surrogate
    >>> sg = surrogate.Sigmoid(alpha=4.0)
    >>> x = torch.tensor([-1.0, 0.0, 0.5], requires_grad=True)
    >>> sg(x)
    tensor([0., 1., 1.], grad_fn=<_SpikeBackward>)
    >>> sg(x).sum().backward(); x.grad
    tensor([0.0707, 1.0000, 0.4200])
"""
import math
import numbers

import numpy as np
import torch
import torch.nn as nn

__all__ = ["SurrogateFunction", "Sigmoid", "ATan", "PiecewiseQuadratic", "Rect", "heaviside"]


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """``1`` where ``x >= 0``, else ``0``, in the dtype of ``x``."""
    return (x >= 0).to(x.dtype)


def _c_float(value: float) -> str:
    """A C float literal (``4.0f``) of exactly the float32 that torch makes of ``value``.

    ``value`` is rounded once, double to float32 (to nearest even), as torch rounds
    a Python scalar used with a float32 tensor. The literal is the shortest decimal
    that reads back as that float32, so the compiler's decimal-to-float conversion
    returns it unchanged (``repr`` of the double would be rounded decimal to float
    directly, which differs next to float32 midpoints). Beyond the float32 range
    the value is an infinity, as in torch.
    """
    with np.errstate(over="ignore"):
        f = np.float32(value)
    if np.isinf(f):
        return "(-1.0f / 0.0f)" if f < 0 else "(1.0f / 0.0f)"
    return np.format_float_positional(f, unique=True, trim="0") + "f"


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, surrogate):
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return heaviside(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * ctx.surrogate.derivative(x), None


class SurrogateFunction(nn.Module):
    """Base class: ``forward`` is the Heaviside step with a surrogate gradient.

    Args:
        alpha: Sharpness of the surrogate.
        spiking: If True (default) ``forward`` returns spikes; if False it returns
            the smooth primitive, whose autograd derivative equals ``derivative``.

    Subclasses implement :meth:`primitive`; the derivative, either by overriding
    :meth:`derivative` (``derivative(x)`` returning a new tensor) or as
    ``_derivative_(x)`` (overwriting ``x`` and returning it, which saves the
    multi-step backward a buffer); and, for ``backend="cupy"``,
    :meth:`cuda_derivative`, in the same class as the derivative it mirrors.
    """

    def __init__(self, alpha: float, spiking: bool = True):
        super().__init__()
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{type(self).__name__}: alpha must be a positive finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.spiking = spiking

    @property
    def key(self):
        """Hashable identity used to cache kernels: ``(class name, alpha)``."""
        return (type(self).__name__, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return _Spike.apply(x, self)
        return self.primitive(x)

    def primitive(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The surrogate derivative at ``x`` (computed in ``x``'s memory and returned as ``x`` if ``inplace``)."""
        if not inplace:
            return self._derivative_(x.clone())
        out = self._derivative_(x)
        return out if out is x else x.copy_(out)  # an _derivative_ that made a new tensor

    def _derivative_(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cuda_derivative(self, x: str, out: str) -> str:
        """CUDA C statements that set the ``float`` variable ``out`` to the derivative at ``x``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, spiking={self.spiking}"


def _owner(sg: SurrogateFunction, name: str) -> type:
    """The class in ``sg``'s MRO that defines ``name``."""
    return next(c for c in type(sg).__mro__ if name in c.__dict__)


def _derivative_in_place(sg: SurrogateFunction) -> bool:
    """Whether ``sg.derivative(x, inplace=True)`` is the base one, which returns ``x`` overwritten."""
    return _owner(sg, "derivative") is SurrogateFunction


def _cuda_derivative_matches(sg: SurrogateFunction) -> bool:
    """Whether ``sg.cuda_derivative`` is defined, in a class at or below every torch derivative it mirrors."""
    cuda = _owner(sg, "cuda_derivative")
    return cuda is not SurrogateFunction and all(issubclass(cuda, _owner(sg, n)) for n in ("derivative", "_derivative_"))


class Sigmoid(SurrogateFunction):
    r"""``g(x) = sigmoid(alpha x)``, ``g'(x) = alpha (s - s^2)`` with ``s = sigmoid(alpha x)``."""

    def __init__(self, alpha: float = 4.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    def primitive(self, x):
        return torch.sigmoid(x * self.alpha)

    def _derivative_(self, x):
        s = x.mul_(self.alpha).sigmoid_()
        return s.addcmul_(s, s, value=-1.0).mul_(self.alpha)  # (s - s^2) alpha

    def cuda_derivative(self, x, out):
        a = _c_float(self.alpha)
        return f"{{ const float sg_s = 1.0f / (1.0f + expf(-({x}) * {a})); {out} = (sg_s - sg_s * sg_s) * {a}; }}"


class ATan(SurrogateFunction):
    r"""``g(x) = atan(pi/2 alpha x)/pi + 1/2``, ``g'(x) = (alpha/2) / (1 + (pi/2 alpha x)^2)``."""

    def __init__(self, alpha: float = 2.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    def primitive(self, x):
        return torch.atan(x * (math.pi / 2 * self.alpha)) / math.pi + 0.5

    def _derivative_(self, x):
        a = self.alpha / 2
        ax = x.mul_(math.pi * a)
        return ax.mul_(ax).add_(1.0).reciprocal_().mul_(a)

    def cuda_derivative(self, x, out):
        a = _c_float(self.alpha / 2)
        pa = _c_float(math.pi * self.alpha / 2)
        return f"{{ const float sg_ax = ({x}) * {pa}; {out} = {a} / (1.0f + sg_ax * sg_ax); }}"


class PiecewiseQuadratic(SurrogateFunction):
    r"""``g'(x) = alpha - alpha^2 |x|`` for ``|x| <= 1/alpha``, else 0."""

    def __init__(self, alpha: float = 1.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    def primitive(self, x):
        a = self.alpha
        inside = (x.abs() <= 1.0 / a).to(x.dtype)
        above = (x > 1.0 / a).to(x.dtype)
        return above + inside * (-(a * a) / 2 * x * x.abs() + a * x + 0.5)

    def _derivative_(self, x):
        a = self.alpha
        x_abs = x.abs_()
        outside = x_abs > 1.0 / a
        return x_abs.mul_(-(a * a)).add_(a).masked_fill_(outside, 0.0)

    def cuda_derivative(self, x, out):
        a, a2, w = _c_float(self.alpha), _c_float(-(self.alpha**2)), _c_float(1.0 / self.alpha)
        return f"{{ const float sg_abs = fabsf({x}); {out} = (sg_abs > {w}) ? 0.0f : sg_abs * {a2} + {a}; }}"


class Rect(SurrogateFunction):
    r"""``g(x) = clip(alpha x + 1/2, 0, 1)``, ``g'(x) = alpha`` for ``|x| < 0.5/alpha``, else 0."""

    def __init__(self, alpha: float = 1.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    def primitive(self, x):
        return torch.clamp(x * self.alpha + 0.5, 0.0, 1.0)

    def _derivative_(self, x):
        return x.abs_().lt_(0.5 / self.alpha).mul_(self.alpha)

    def cuda_derivative(self, x, out):
        a, w = _c_float(self.alpha), _c_float(0.5 / self.alpha)
        return f"{out} = (fabsf({x}) < {w}) ? {a} : 0.0f;"
