"""Pure functional IF/LIF core: the torch backend and the reference for the kernels.

Nothing here modifies its inputs in place. The single-step functions are plain
autograd code; :func:`multistep` runs the whole sequence in one
:class:`torch.autograd.Function` with a hand-written BPTT backward that saves
only the pre-spike potential ``h_seq``. Both use the same arithmetic, in the
same order, so ``T`` single steps and one multi-step call give bit-identical
spikes and states. The CUDA kernels follow that order too.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..surrogate import SurrogateFunction, _derivative_in_place


@dataclass(frozen=True, eq=False)
class NeuronParams:
    """Everything that defines an IF/LIF update, apart from the tensors."""

    kind: str  # "if" or "lif"
    v_threshold: float
    v_reset: Optional[float]  # None: soft reset
    detach_reset: bool
    surrogate: SurrogateFunction
    tau: float = 2.0
    decay_input: bool = True

    @property
    def hard_reset(self) -> bool:
        return self.v_reset is not None

    @property
    def v_rest(self) -> float:
        """The potential the leak decays to (``v_reset``, or 0 for soft reset)."""
        return 0.0 if self.v_reset is None else self.v_reset


def charge(x: torch.Tensor, v: torch.Tensor, p: NeuronParams, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Membrane potential ``H[t]`` after integrating ``x`` into ``V[t-1] = v``.

    ``out`` (no-grad use only) receives the result instead of a new tensor.
    """
    return _charge(x, v, p, None, out)


_ONE_PASS_DTYPES = (torch.float32, torch.float64)


def _tau_divisor(p: NeuronParams, x: torch.Tensor, v) -> Optional[torch.Tensor]:
    """``tau`` as a 0-dim CPU tensor for the time loop's one-pass LIF charge, or None.

    ``torch.addcdiv`` rounds ``V + (D / tau)`` as the division and the addition done
    one after the other would (:func:`charge`'s passes), so multi-step and single-step
    calls give the same bits. It takes ``tau`` only as a tensor, made here in the
    input's dtype: ``tau`` rounded as a scalar divisor is in float32 and float64, and
    no type promotion even where every operand is 0-dim (``x_seq`` of shape ``[T]``).
    Elsewhere the passes stay separate: float16/bfloat16 would round ``tau`` to their
    precision, and on CUDA ``addcdiv`` takes no CPU divisor. Single steps keep the
    separate passes too: making the tensor costs more than the pass it saves on small
    tensors. Made per call, never kept.
    """
    same = not isinstance(v, torch.Tensor) or (v.dtype == x.dtype and v.device == x.device)
    if p.kind == "lif" and same and x.device.type == "cpu" and x.dtype in _ONE_PASS_DTYPES:
        return torch.scalar_tensor(p.tau, dtype=x.dtype)
    return None  # mixed dtypes too: the passes would round in another dtype than the separate ones


def _charge(x, v, p, tau, out):
    """:func:`charge`; the division and the addition in one pass where ``tau`` (:func:`_tau_divisor`) is given."""
    if p.kind == "if":
        return torch.add(v, x, out=out)
    v_minus_rest = v - p.v_rest if p.v_rest != 0.0 else v
    if p.decay_input:  # (X - (V - V_rest)) / tau + V
        d = torch.sub(x, v_minus_rest, out=out)
        if tau is None:
            return d.div_(p.tau).add_(v)
        return torch.addcdiv(v, d, tau, out=d if out is not None else None)
    # -(V - V_rest) / tau + V + X
    if tau is None:
        return torch.div(v_minus_rest, p.tau, out=out).neg_().add_(v).add_(x)
    return torch.addcdiv(v, v_minus_rest, tau, value=-1.0, out=out).add_(x)


def fire(h: torch.Tensor, p: NeuronParams) -> torch.Tensor:
    """Spikes ``Heaviside(h - v_threshold)`` with the surrogate gradient."""
    return p.surrogate(h - p.v_threshold)


def reset(h: torch.Tensor, spike: torch.Tensor, p: NeuronParams, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Potential after the spike: hard ``H - H S + V_reset S`` or soft ``H - V_th S``.

    The hard form equals ``H (1 - S) + V_reset S`` bit for bit for finite ``H``.
    ``out`` (no-grad use only) receives the result instead of a new tensor.
    """
    s = spike.detach() if p.detach_reset else spike
    if p.hard_reset:
        v = torch.addcmul(h, h, s, value=-1.0, out=out)
        return v.add_(s, alpha=p.v_reset) if p.v_reset != 0.0 else v
    return torch.add(h, s, alpha=-p.v_threshold, out=out)


def step(x: torch.Tensor, v: torch.Tensor, p: NeuronParams) -> Tuple[torch.Tensor, torch.Tensor]:
    """One time step: charge, fire, reset. Returns ``(spike, v_next)``."""
    h = charge(x, v, p)
    spike = fire(h, p)
    return spike, reset(h, spike, p)


def multistep(
    x_seq: torch.Tensor, v: Union[torch.Tensor, float], p: NeuronParams, store_v_seq: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``T`` steps over ``x_seq`` ``[T, N, *]`` from the state ``v`` ``[N, *]``.

    ``v`` may be a float, the same potential everywhere (a fresh state): it is
    expanded in the first step only, so no ``[N, *]`` tensor of it outlives that step.
    Returns ``(spike_seq, v_seq)`` with ``v_seq`` ``[T, N, *]`` if ``store_v_seq``,
    else ``(spike_seq, v_last)``. Gradients flow to ``x_seq`` and ``v``; when
    none is needed (``torch.no_grad()``, inference, the first forward of a GC
    segment) nothing is kept for backward and ``h_seq`` is never stored.
    A surrogate with ``spiking=False`` (outputs not 0/1) runs ``T`` plain :func:`step` calls.
    """
    if not len(x_seq):  # no steps: no spikes (an empty tensor in the graph), the state as it was
        return x_seq * 0, (torch.empty_like(x_seq) if store_v_seq else v)
    if not p.surrogate.spiking:
        return _step_loop(x_seq, v, p, store_v_seq)
    if needs_graph(x_seq, v):
        return _MultiStep.apply(x_seq, v, p, store_v_seq)
    spike_seq, v_out, _ = _forward_loop(x_seq, v, p, store_v_seq, keep_h=False)
    return spike_seq, v_out


def _step_loop(x_seq, v, p, store_v_seq):
    """:func:`multistep` as ``T`` calls of :func:`step` (plain autograd)."""
    spikes, vs = [], []
    for x in x_seq:
        spike, v = step(x, v if isinstance(v, torch.Tensor) else torch.full_like(x, v), p)
        spikes.append(spike)
        vs.append(v)
    return torch.stack(spikes), (torch.stack(vs) if store_v_seq else v)


def needs_graph(x_seq: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a multi-step call must keep ``h_seq`` for backward (both backends decide here).

    Not under ``torch.no_grad()`` or inside another autograd function's forward
    (the first forward of a GC segment), even when an input requires grad.
    """
    return torch.is_grad_enabled() and (x_seq.requires_grad or (isinstance(v, torch.Tensor) and v.requires_grad))


def _forward_loop(x_seq, v, p, store_v_seq, keep_h):
    """The forward time loop: ``(spike_seq, v_seq or v_last, h_seq or None)``, no graph."""
    h_seq = torch.empty_like(x_seq) if keep_h else None
    h_buf = None if keep_h else torch.empty_like(x_seq[0])
    spike_seq = torch.empty_like(x_seq)
    v_seq = torch.empty_like(x_seq) if store_v_seq else None
    # Once v is a tensor of this loop's own (not the caller's state), each step resets into it.
    own = not isinstance(v, torch.Tensor)
    if own:
        v = torch.full_like(x_seq[0], v)
    tau = _tau_divisor(p, x_seq, v)
    for t in range(x_seq.shape[0]):
        h = _charge(x_seq[t], v, p, tau, out=h_seq[t] if keep_h else h_buf)
        spike = torch.ge(h, p.v_threshold, out=spike_seq[t])  # float 0/1: Heaviside(h - V_th)
        v = reset(h, spike, p, out=v if own else None)  # not into h: its buffer is reused
        own = True
        if store_v_seq:
            v_seq[t] = v
    return spike_seq, (v_seq if store_v_seq else v), h_seq


def _leak(p: NeuronParams) -> float:
    """dH[t]/dV[t-1]."""
    return 1.0 if p.kind == "if" else 1.0 - 1.0 / p.tau


def _sg(x: torch.Tensor, p: NeuronParams, in_place: bool) -> torch.Tensor:
    """The surrogate derivative at ``x``, in ``x``'s memory when ``in_place``.

    ``in_place``: ``p.surrogate.derivative`` is the base one, which computes in the
    memory it is given (the built-ins); an overridden one returns a new tensor.
    """
    return p.surrogate.derivative(x, inplace=True) if in_place else p.surrogate.derivative(x)


def _sg_into(h: torch.Tensor, p: NeuronParams, in_place: bool) -> torch.Tensor:
    """Overwrite ``h = H[t]`` with the surrogate derivative at ``H[t] - V_th`` and return it."""
    sg = _sg(h.sub_(p.v_threshold), p, in_place)
    return sg if sg is h else h.copy_(sg)


_keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_is_compiling = getattr(torch.compiler, "is_compiling", None)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (assumed under torch.compile, or where torch cannot tell)."""
    if _keeps_graph is None or _is_compiling is None:
        return True
    return _is_compiling() or _keeps_graph()


def _no_double_backward() -> None:
    """Raise in a hand-written backward asked for a graph (``create_graph=True``): it has none to give."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "snnkit: the multi-step neuron has a hand-written first-order backward, so double backward "
            "(create_graph=True, e.g. a gradient penalty) would miss its second-order terms; "
            "compute such penalties without the neurons in the graph"
        )


class _MultiStep(torch.autograd.Function):
    # Full-size temporaries are few and updated in place: on CPU a fresh
    # [T, N, *] allocation costs more than the arithmetic on it.
    @staticmethod
    def forward(ctx, x_seq, v, p, store_v_seq):
        spike_seq, v_out, h_seq = _forward_loop(x_seq, v, p, store_v_seq, keep_h=True)
        ctx.save_for_backward(h_seq)
        ctx.p, ctx.store_v_seq = p, store_v_seq
        return spike_seq, v_out

    @staticmethod
    def backward(ctx, grad_spike_seq, grad_v):
        _no_double_backward()
        # BPTT, t = T-1 .. 0, with g[t] the gradient reaching V[t]:
        #   grad_h[t] = grad_s[t] sg[t] + dV[t]/dH[t] g[t]
        #   g[t-1]    = leak grad_h[t] (+ grad of v_seq[t-1] when stored)
        # grad_h[t] overwrites H[t], which no later step reads; H is copied first
        # when autograd keeps the graph for another backward (retain_graph), and
        # under torch.compile, which traces this function (and plans memory itself).
        (h_seq,) = ctx.saved_tensors
        p = ctx.p
        leak = _leak(p)
        in_place = _derivative_in_place(p.surrogate)
        grad_h = h_seq.clone() if _graph_kept() else h_seq
        dv_dh = None if (p.detach_reset and not p.hard_reset) else torch.empty_like(h_seq[0])
        g = torch.empty_like(h_seq[0]) if ctx.store_v_seq else None
        for t in range(h_seq.shape[0] - 1, -1, -1):
            h = grad_h[t]  # H[t] until sg is written into it
            if p.hard_reset:  # dV/dH = (1 - S) [+ (V_reset - H) sg]
                torch.lt(h, p.v_threshold, out=dv_dh)
                if p.detach_reset:
                    sg = _sg_into(h, p, in_place)
                else:  # needs H and sg at once
                    sg_t = _sg(h - p.v_threshold, p, in_place)
                    dv_dh.addcmul_(h, sg_t, value=-1.0)
                    if p.v_reset != 0.0:
                        dv_dh.add_(sg_t, alpha=p.v_reset)
                    sg = h.copy_(sg_t)
            else:
                sg = _sg_into(h, p, in_place)
                if dv_dh is not None:  # dV/dH = 1 - V_th sg
                    torch.mul(sg, -p.v_threshold, out=dv_dh).add_(1.0)
            sg.mul_(grad_spike_seq[t])
            if ctx.store_v_seq:
                g_t = torch.add(grad_v[t], grad_h[t + 1], alpha=leak, out=g) if t + 1 < len(h_seq) else grad_v[t]
                value = 1.0
            else:
                g_t, value = (grad_h[t + 1], leak) if t + 1 < len(h_seq) else (grad_v, 1.0)
            if dv_dh is None:
                sg.add_(g_t, alpha=value)
            else:
                sg.addcmul_(g_t, dv_dh, value=value)
        del dv_dh, g  # freed before grad_v0 is made
        grad_v0 = grad_h[0] * leak if ctx.needs_input_grad[1] else None
        grad_x = grad_h.div_(p.tau) if (p.kind == "lif" and p.decay_input) else grad_h
        return grad_x, grad_v0, None, None
