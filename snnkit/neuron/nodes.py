"""IF and LIF neuron modules: thin wrappers around :mod:`snnkit.neuron._reference`."""
import math
import numbers
import warnings
from typing import Optional

import torch

from .. import surrogate as _surrogate
from .._context import in_gc_1st_forward, in_gc_recompute
from ..base import MemoryModule
from . import _reference

__all__ = ["BaseNode", "IFNode", "LIFNode"]

BACKENDS = ("torch", "cupy")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        from . import _cuda

        _cuda.check_available()
    return backend


class BaseNode(MemoryModule):
    """Base class of spiking neurons with membrane memory ``v``.

    Subclasses define the charge; fire and reset are shared (see :mod:`snnkit.neuron`).

    Args:
        v_threshold: Firing threshold ``V_th``.
        v_reset: Reset potential for hard reset, or ``None`` for soft reset
            (subtract ``V_th`` on a spike).
        surrogate_function: Spike function with surrogate gradient.
        detach_reset: Detach the spike in the reset term.
        step_mode: ``"s"`` (input ``[N, *]``) or ``"m"`` (input ``[T, N, *]``).
        backend: ``"torch"`` (everywhere) or ``"cupy"`` (fused CUDA kernels).
        store_v_seq: In ``"m"`` mode keep the potential sequence as ``self.v_seq``
            (``None`` before the first such step and after :meth:`reset`).

    Integer and bool inputs are promoted to the dtype of the state ``v`` (a tensor),
    else to ``torch.get_default_dtype()``.

    Raises:
        ValueError: for an unknown ``step_mode`` or ``backend``, or a bad parameter.
        RuntimeError: for ``backend="cupy"`` without CuPy or without a CUDA device.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = 0.0,
        surrogate_function: _surrogate.SurrogateFunction = _surrogate.Sigmoid(),
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
    ):
        super().__init__(step_mode)
        if not (isinstance(v_threshold, numbers.Real) and math.isfinite(v_threshold)):
            raise ValueError(f"v_threshold must be a finite number, got {v_threshold!r}")
        if v_reset is not None and not (isinstance(v_reset, numbers.Real) and math.isfinite(v_reset)):
            raise ValueError(f"v_reset must be a finite number or None (soft reset), got {v_reset!r}")
        if not isinstance(surrogate_function, _surrogate.SurrogateFunction):
            raise ValueError(
                f"surrogate_function must be a snnkit.surrogate.SurrogateFunction, got {type(surrogate_function).__name__}"
            )
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.surrogate_function = surrogate_function
        self.detach_reset = bool(detach_reset)
        self.backend = backend
        self.store_v_seq = bool(store_v_seq)
        self.v_seq = None
        self.register_memory("v", 0.0 if v_reset is None else float(v_reset))

    def reset(self) -> None:
        """Put ``v`` back to its reset value and ``v_seq`` to ``None``."""
        super().reset()
        self.v_seq = None

    def detach(self) -> None:
        """Detach ``v`` (and ``v_seq``) from the autograd graph (truncated BPTT)."""
        super().detach()
        if isinstance(self.v_seq, torch.Tensor):
            self.v_seq = self.v_seq.detach()

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str):
        self.__dict__["_backend"] = _check_backend(value)

    def _params(self) -> _reference.NeuronParams:
        raise NotImplementedError

    def _initial_v(self, like: torch.Tensor) -> torch.Tensor:
        v = self.v
        if isinstance(v, torch.Tensor):
            if v.shape != like.shape:
                raise ValueError(
                    f"{type(self).__name__}: input of shape {tuple(like.shape)} does not match the state v of shape "
                    f"{tuple(v.shape)}; call functional.reset_net(net) between batches of different shapes"
                )
            return v
        return torch.full_like(like, v)

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, an integer or bool one promoted to the dtype of a tensor state ``v`` or the default dtype."""
        if x.is_floating_point() or x.is_complex():
            return x
        v = self.v
        return x.to(v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else torch.get_default_dtype())

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._float_input(x)
        spike, self.v = _reference.step(x, self._initial_v(x), self._params())
        return spike

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} in step_mode='m' expects a sequence [T, N, *], got shape {tuple(x_seq.shape)}; "
                "use step_mode='s' for a single step"
            )
        x_seq = self._float_input(x_seq)
        if not len(x_seq):  # an empty sequence: no spikes, the state as it was
            if self.store_v_seq:
                self._set_v_seq(torch.empty_like(x_seq))
            return x_seq.clone()  # empty, and part of the graph
        if self.backend == "cupy":
            from ._cuda import ops

            v = self._initial_v(x_seq[0])  # the kernels take contiguous tensors, as the torch backend takes any
            spike_seq, v_out = ops.multistep(x_seq.contiguous(), v.contiguous(), self._params(), self.store_v_seq)
        else:
            # A fresh (float) state stays a float: multistep expands it for the first step only.
            v = self.v if not isinstance(self.v, torch.Tensor) else self._initial_v(x_seq[0])
            spike_seq, v_out = _reference.multistep(x_seq, v, self._params(), self.store_v_seq)
        if self.store_v_seq:
            self._set_v_seq(v_out)
            v_out = v_out[-1]
        self.v = v_out
        return spike_seq

    def _set_v_seq(self, v_seq: torch.Tensor) -> None:
        """Keep ``v_seq``: from a plain forward, or the first forward of a GC segment (never its recompute)."""
        if in_gc_recompute():
            return
        if in_gc_1st_forward():  # Python shows it once per calling line
            warnings.warn(
                f"{type(self).__name__}(store_v_seq=True) inside a GC segment: v_seq is recorded without a "
                "gradient (it is not an output of the segment), and in a TCGCContainer it holds the last chunk "
                "only; keep nodes whose v_seq you train on or read outside GC segments",
                UserWarning,
                stacklevel=3,
            )
        self.v_seq = v_seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        return self.single_step_forward(x)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode!r}, backend={self.backend!r}"
        )


class IFNode(BaseNode):
    """Integrate-and-fire neuron: ``H[t] = V[t-1] + X[t]``.

    Example:
        >>> import torch
        >>> from snnkit import neuron
        >>> node = neuron.IFNode(step_mode="m")
        >>> node(torch.tensor([[0.6], [0.6], [0.6]])).flatten()
        tensor([0., 1., 0.])
    """

    def _params(self):
        return _reference.NeuronParams("if", self.v_threshold, self.v_reset, self.detach_reset, self.surrogate_function)


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron.

    ``decay_input=True``: ``H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau``;
    ``decay_input=False``: ``H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]``.

    Args:
        tau: Membrane time constant, ``>= 1``.
        decay_input: Whether the input is divided by ``tau`` too.
        v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq:
            As in :class:`BaseNode`, in this order after ``tau`` and ``decay_input``.

    Example:
        >>> import torch
        >>> from snnkit import neuron
        >>> node = neuron.LIFNode(tau=2.0, step_mode="m")
        >>> node(torch.full((4, 1), 1.5)).flatten()
        tensor([0., 1., 0., 1.])
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = 0.0,
        surrogate_function: _surrogate.SurrogateFunction = _surrogate.Sigmoid(),
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
    ):
        if not (isinstance(tau, numbers.Real) and math.isfinite(tau) and tau >= 1.0):
            raise ValueError(f"tau must be a finite number >= 1, got {tau!r}")
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq)
        self.tau = float(tau)
        self.decay_input = bool(decay_input)

    def _params(self):
        return _reference.NeuronParams(
            "lif", self.v_threshold, self.v_reset, self.detach_reset, self.surrogate_function, self.tau, self.decay_input
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()
