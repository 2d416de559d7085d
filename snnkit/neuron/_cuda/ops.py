"""Launch layer of the CuPy backend: fused multistep IF/LIF on torch CUDA tensors.

:func:`multistep` has exactly the contract of :func:`snnkit.neuron._reference.multistep`
(``(spike_seq, v_last)`` or ``(spike_seq, v_seq)``, gradients to ``x_seq`` and ``v``)
and runs one forward kernel over all ``T`` steps and one backward kernel (BPTT)
instead of ``O(T)`` torch ops. See :mod:`snnkit.neuron._cuda.codegen` for the kernels
and what they save for backward (``h_seq`` only, and nothing when no gradient is needed).

* CuPy is imported on first use, never at ``import snnkit``.
* Kernels are compiled with ``cupy.RawModule`` (options ``--fmad=false``, no fast
  math) once per kernel specification and device, and cached in-process (CuPy also
  keeps its on-disk cache).
* Tensors are passed by pointer, no copies; kernels run on torch's current stream
  of the tensors' device, so they order correctly with surrounding torch work.
* Each launch takes the vectorised kernels (``VECTOR_WIDTH`` neurons per thread,
  16-byte loads and stores) when ``N`` is a multiple of that width and every
  tensor it touches is 16-byte aligned, and the one-neuron-per-thread kernels
  otherwise (odd sizes, views at odd offsets); both compute the same values.
* Inputs must be contiguous CUDA tensors of one device and one dtype
  (``float32`` or ``float16``); anything else raises a ``ValueError`` that says what
  arrived and what to do. Gradients arriving in backward are made contiguous here.
* First-order gradients only: the backward is a kernel that builds no graph, so a
  backward with ``create_graph=True`` raises a ``RuntimeError`` (as the torch
  backend's hand-written backward does) instead of returning gradients whose
  second-order terms through the neurons are silently missing.
* Only ``step_mode="m"`` runs the kernels. In ``step_mode="s"`` a ``backend="cupy"``
  node uses the torch step of :mod:`snnkit.neuron._reference` on the same device:
  a one-step kernel would save one or two launches over torch's few elementwise
  ops, not worth a second kernel family.

The autograd function takes a *launcher* (``launcher(name, source, params,
n_threads, args)``), so the same code path can run the sources on CPU under an
emulator in the tests; :func:`multistep` always uses the CuPy launcher.
"""
import dataclasses
import functools
from typing import Tuple

import torch

from ... import _cupy
from ... import surrogate as _surrogate
from .. import _reference
from .._reference import NeuronParams
from . import codegen

__all__ = ["multistep", "kernel_scalars", "spec_for", "launch_spec"]

_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def spec_for(p: NeuronParams, dtype: torch.dtype) -> codegen.KernelSpec:
    """The kernel specification of neuron parameters ``p`` for tensors of ``dtype``.

    Raises:
        ValueError: for an unsupported dtype, a surrogate with ``spiking=False``, or a
            surrogate whose ``cuda_derivative`` does not mirror its torch derivative.
    """
    if not p.surrogate.spiking:
        raise ValueError(
            f"backend='cupy' fires Heaviside spikes only, but the surrogate {type(p.surrogate).__name__} has "
            "spiking=False; use backend='torch' for a non-spiking surrogate"
        )
    if dtype not in _TORCH_DTYPES:
        raise ValueError(
            f"backend='cupy' supports float32 and float16 tensors, got {dtype}; "
            "cast the input with .float() or .half(), or use backend='torch'"
        )
    args = (p.kind, p.decay_input, p.hard_reset, p.detach_reset, p.surrogate.key, p.surrogate, _TORCH_DTYPES[dtype])
    try:
        return _spec(*args)
    except TypeError:  # an unhashable custom surrogate: build the spec uncached
        return _spec.__wrapped__(*args)


@functools.lru_cache(maxsize=256)
def _spec(kind, decay_input, hard_reset, detach_reset, surrogate_key, surrogate, dtype):
    # Cached per surrogate object; surrogate_key makes a surrogate whose alpha changed since a new entry.
    if isinstance(surrogate, _surrogate.SurrogateFunction) and not _surrogate._cuda_derivative_matches(surrogate):
        name = type(surrogate).__name__
        raise ValueError(
            f"backend='cupy' inlines the surrogate's cuda_derivative, but {name} does not define one next to its "
            f"torch derivative (it defines derivative or _derivative_ without a cuda_derivative of its own); "
            f"implement {name}.cuda_derivative(x, out) with the same formula, or use backend='torch'"
        )
    return codegen.make_spec(kind, decay_input, hard_reset, detach_reset, surrogate, dtype)


def kernel_scalars(p: NeuronParams) -> dict:
    """Scalar kernel arguments, rounded to float32 from the same Python values the reference uses."""
    tau = p.tau if p.kind == "lif" else 1.0
    leak = 1.0 if p.kind == "if" else 1.0 - 1.0 / p.tau  # in double, like _reference._leak
    return {"v_threshold": p.v_threshold, "v_reset": p.v_rest, "tau": tau, "leak": leak}


def launch_spec(spec: codegen.KernelSpec, n: int, tensors) -> codegen.KernelSpec:
    """``spec`` vectorised when ``n`` neurons and the ``tensors`` (``None`` skipped) allow 16-byte accesses."""
    if n % codegen.VECTOR_WIDTH[spec.dtype] == 0 and all(t.data_ptr() % 16 == 0 for t in tensors if t is not None):
        return _vectorised(spec)
    return spec


@functools.lru_cache(maxsize=256)
def _vectorised(spec: codegen.KernelSpec) -> codegen.KernelSpec:
    return dataclasses.replace(spec, vec=codegen.VECTOR_WIDTH[spec.dtype])


@functools.lru_cache(maxsize=None)
def _forward_kernel(spec: codegen.KernelSpec):
    """``(name, source, params)`` of the forward kernel, built once per spec."""
    return codegen.forward_name(spec), codegen.forward_source(spec), tuple(codegen.forward_params(spec))


@functools.lru_cache(maxsize=None)
def _backward_kernel(spec: codegen.KernelSpec):
    """``(name, source, params)`` of the backward kernel, built once per spec."""
    return codegen.backward_name(spec), codegen.backward_source(spec), tuple(codegen.backward_params(spec))


# --- CuPy launcher -------------------------------------------------------------------


def _cupy_launcher(name, source, params, n_threads, args):
    _cupy.launch_kernel(name, source, params, n_threads, args, codegen.NVCC_OPTIONS)


# --- autograd ------------------------------------------------------------------------


class _FusedMultiStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq, v, p, store_v_seq, launcher):
        spec = spec_for(p, x_seq.dtype)
        T, N = x_seq.shape[0], v.numel()
        sc = kernel_scalars(p)
        spike_seq = torch.empty_like(x_seq)
        save = any(ctx.needs_input_grad[:2])
        h_seq = torch.empty_like(x_seq) if save else None
        v_out = torch.empty_like(x_seq) if store_v_seq else torch.empty_like(v)
        if N > 0:
            scalars = (sc["v_threshold"], sc["v_reset"], sc["tau"], int(store_v_seq), T, N)
            args = (x_seq, v, spike_seq, h_seq, v_out, *scalars)
            run = launch_spec(spec, N, args[:5])
            launcher(*_forward_kernel(run), N // run.vec, args)
        elif not store_v_seq:
            v_out = v.clone()
        if save:
            ctx.save_for_backward(h_seq)
        ctx.spec, ctx.sc, ctx.store_v_seq, ctx.launcher = spec, sc, store_v_seq, launcher
        return spike_seq, v_out

    @staticmethod
    def backward(ctx, grad_spike_seq, grad_v):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' outputs would carry no graph
            raise RuntimeError(
                "snnkit: backend='cupy' neurons compute a first-order gradient in a CUDA kernel, so double "
                "backward (create_graph=True, e.g. a gradient penalty) would miss their second-order terms; "
                "compute such penalties without the neurons in the graph"
            )
        (h_seq,) = ctx.saved_tensors
        spec, sc = ctx.spec, ctx.sc
        T = h_seq.shape[0]
        N = h_seq[0].numel() if T > 0 else 0
        grad_x = torch.empty_like(h_seq)
        grad_v0 = torch.empty(h_seq.shape[1:], dtype=h_seq.dtype, device=h_seq.device)
        if N > 0:
            args = (
                grad_spike_seq.contiguous(),
                grad_v.contiguous(),
                h_seq,
                grad_x,
                grad_v0,
                sc["v_threshold"],
                sc["v_reset"],
                sc["tau"],
                sc["leak"],
                int(ctx.store_v_seq),
                T,
                N,
            )
            run = launch_spec(spec, N, args[:5])
            ctx.launcher(*_backward_kernel(run), N // run.vec, args)
        elif T == 0 and not ctx.store_v_seq:
            grad_v0 = grad_v.clone()
        else:
            grad_v0.zero_()
        return grad_x, (grad_v0 if ctx.needs_input_grad[1] else None), None, None, None


def _check(x_seq: torch.Tensor, v: torch.Tensor) -> None:
    if not (x_seq.is_cuda and v.is_cuda):
        raise ValueError(
            f"backend='cupy' needs CUDA tensors, got x_seq on {x_seq.device} and v on {v.device}; "
            "move the network and its input to a CUDA device, or use backend='torch'"
        )
    if x_seq.device != v.device:
        raise ValueError(
            f"backend='cupy': x_seq is on {x_seq.device} but the state v is on {v.device}; "
            "keep the input and the network on one device (call functional.reset_net(net) after moving it)"
        )
    if x_seq.dtype != v.dtype:
        raise ValueError(
            f"backend='cupy': x_seq is {x_seq.dtype} but the state v is {v.dtype}; "
            "call functional.reset_net(net) after changing the input dtype"
        )
    if x_seq.dim() < 1 or tuple(v.shape) != tuple(x_seq.shape[1:]):
        raise ValueError(
            f"backend='cupy': v of shape {tuple(v.shape)} does not match x_seq[0] of shape {tuple(x_seq.shape[1:])}"
        )
    for name, t in (("x_seq", x_seq), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(
                f"backend='cupy' needs contiguous tensors, got a non-contiguous {name} with strides {t.stride()}; "
                "call .contiguous() on the input first"
            )


def multistep(
    x_seq: torch.Tensor, v: torch.Tensor, p: NeuronParams, store_v_seq: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused CUDA version of :func:`snnkit.neuron._reference.multistep` (same contract).

    Args:
        x_seq: Input ``[T, N, *]``, contiguous, float32 or float16, on a CUDA device.
        v: State before the first step, shaped like ``x_seq[0]``, same device and dtype.
        p: Neuron parameters.
        store_v_seq: Return the potential sequence ``[T, N, *]`` instead of the last one.

    Returns:
        ``(spike_seq, v_seq)`` if ``store_v_seq`` else ``(spike_seq, v_last)``.

    Raises:
        ValueError: for CPU tensors, mixed devices or dtypes, non-contiguous tensors,
            or an unsupported dtype.

    Example:
        >>> import torch
        >>> from snnkit import surrogate
        >>> from snnkit.neuron._reference import NeuronParams
        >>> p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid())
        >>> x = torch.rand(8, 4, 16, device="cuda")  # doctest: +SKIP
        >>> spike_seq, v = multistep(x, torch.zeros_like(x[0]), p)  # doctest: +SKIP
    """
    _check(x_seq, v)
    return _apply(x_seq, v, p, store_v_seq, _cupy_launcher)


def _apply(x_seq, v, p, store_v_seq, launcher):
    """The fused call; inputs that need no graph are detached, so ``h_seq`` is neither written nor kept."""
    if not _reference.needs_graph(x_seq, v):
        x_seq, v = x_seq.detach(), v.detach()
    return _FusedMultiStep.apply(x_seq, v, p, bool(store_v_seq), launcher)

