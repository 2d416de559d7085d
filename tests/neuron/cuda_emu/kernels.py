"""Kernel configurations and float16 references shared by the emulation, nvcc and GPU tests."""
import itertools

import torch

from snnkit import surrogate
from snnkit.memopt import _bitpack_cuda as bitpack
from snnkit.neuron import _reference
from snnkit.neuron._cuda import codegen, ops

SURROGATES = {
    "sigmoid": lambda: surrogate.Sigmoid(alpha=4.0),
    "atan": lambda: surrogate.ATan(alpha=2.0),
    "pwq": lambda: surrogate.PiecewiseQuadratic(alpha=1.0),
    "rect": lambda: surrogate.Rect(alpha=1.0),
}
NEURONS = {"if": ("if", False), "lif": ("lif", True), "lif_ndi": ("lif", False)}
BIT_DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8")  # kernel dtypes (bool runs as uint8)
#: every dtype the bit packing takes, by name
BIT_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float64": torch.float64, "uint8": torch.uint8, "bool": torch.bool}  # fmt: skip
#: (neuron, reset, detach, surrogate, store) of every neuron kernel configuration
CONFIGS = list(itertools.product(NEURONS, ("hard", "soft"), ("detach", "nodetach"), SURROGATES, ("store", "last")))


def all_kernels():
    """``[(name, params, source), ...]`` of every configuration, each name once."""
    out = {}
    for (neuron, di), hard, detach, sg, dt, vec in itertools.product(
        NEURONS.values(), (True, False), (True, False), SURROGATES.values(), tuple(codegen.DTYPES), (False, True)
    ):
        spec = codegen.make_spec(neuron, di, hard, detach, sg(), dt, codegen.VECTOR_WIDTH[dt] if vec else 1)
        out[codegen.forward_name(spec)] = (codegen.forward_params(spec), codegen.forward_source(spec))
        out[codegen.backward_name(spec)] = (codegen.backward_params(spec), codegen.backward_source(spec))
    for dt in BIT_DTYPES:
        out[bitpack.pack_name(dt)] = (bitpack.pack_params(dt), bitpack.pack_source(dt))
        out[bitpack.unpack_name(dt)] = (bitpack.unpack_params(dt), bitpack.unpack_source(dt))
    return [(name, params, src) for name, (params, src) in out.items()]



def f16_reference(x16, v16, p, store):
    """What the float16 kernels compute: float32 steps with H rounded to half before firing.

    Returns ``(spike_seq, v_seq or v_last, h_seq)``, rounded to half as the kernels store them.
    """
    v, spikes, vs, hs = v16.float(), [], [], []
    for x in x16.float():
        h = _reference.charge(x, v, p).half().float()
        s = (h >= p.v_threshold).float()
        v = _reference.reset(h, s, p)
        spikes.append(s), vs.append(v), hs.append(h)
    v_out = torch.stack(vs) if store else v
    return torch.stack(spikes).half(), v_out.half(), torch.stack(hs).half()


def ref_backward(h, p, store, grad_spike, grad_v):
    """The torch reference backward (float32) from a given ``h_seq``: ``(grad_x, grad_v0)``.

    Run as autograd runs it: without a graph (it is first-order only and raises otherwise).
    """
    ctx = type("Ctx", (), {})()
    ctx.saved_tensors, ctx.p, ctx.store_v_seq, ctx.needs_input_grad = (h,), p, store, (True, True, False, False)
    with torch.no_grad():
        gx, gv0, _, _ = _reference._MultiStep.backward(ctx, grad_spike, grad_v)
    return gx, gv0


def launched(p, dtype, vec):
    """Names of the forward and backward kernels a run of ``p`` on ``dtype`` launches (``vec``: vectorised)."""
    spec = ops.spec_for(p, dtype)
    spec = ops._vectorised(spec) if vec else spec
    return [codegen.forward_name(spec), codegen.backward_name(spec)]


def inputs(shape, dtype=torch.float32, seed=0):
    """``(x, v, grad_spike, grad_v)`` for a run of shape ``[T, N...]``: seeded, about half the neurons firing."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 0.8 + 0.35).to(dtype)
    v = (torch.rand(shape[1:], generator=g) * 0.5).to(dtype)
    gs = torch.randn(shape, generator=g).to(dtype)
    gv = torch.randn(shape, generator=g).to(dtype)
    return x, v, gs, gv


def run(fn, x, v, gs, gv, store):
    """Forward ``fn(x, v)``, then backward of <spike, gs> + <v_out, gv>; outputs and grads on CPU."""
    x = x.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    spike, v_out = fn(x, v)
    gv_used = gv if store else gv[-1]
    ((spike * gs.to(spike)).sum() + (v_out * gv_used.to(v_out)).sum()).backward()
    return [t.detach().cpu() for t in (spike, v_out, x.grad, v.grad)]
