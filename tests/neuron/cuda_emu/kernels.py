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
BIT_DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8")


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
    """The torch reference backward (float32) from a given ``h_seq``: ``(grad_x, grad_v0)``."""
    ctx = type("Ctx", (), {})()
    ctx.saved_tensors, ctx.p, ctx.store_v_seq, ctx.needs_input_grad = (h,), p, store, (True, True, False, False)
    gx, gv0, _, _ = _reference._MultiStep.backward(ctx, grad_spike, grad_v)
    return gx, gv0


def launched(p, dtype, vec):
    """Names of the forward and backward kernels a run of ``p`` on ``dtype`` launches (``vec``: vectorised)."""
    spec = ops.spec_for(p, dtype)
    spec = ops._vectorised(spec) if vec else spec
    return [codegen.forward_name(spec), codegen.backward_name(spec)]
