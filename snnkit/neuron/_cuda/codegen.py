r"""CUDA C sources of the fused multistep IF/LIF kernels, built as plain strings.

Nothing here imports CuPy or touches a device: :func:`forward_source` and
:func:`backward_source` turn a frozen :class:`KernelSpec` into the text of one
``extern "C" __global__`` kernel, so the sources can be tested on any machine
(compiled with ``g++`` under an emulation header, and with ``nvcc`` where it is
installed).

Design and trade-offs:

* **One thread per neuron, the time loop inside the kernel.** The state ``v``
  stays in a register for all ``T`` steps; each step reads ``x[t]`` and writes
  ``spike[t]`` (plus ``h[t]`` when a backward will follow). The backward kernel
  walks ``t = T-1 .. 0`` (BPTT) with the gradient reaching ``V[t]`` in a register
  and the surrogate derivative inlined. Adjacent threads touch adjacent addresses,
  so every load and store is coalesced. The time loops are unrolled by 4 and
  hold no branch (the forward has one copy of the loop per combination of
  "save ``h_seq``" and ``store_v_seq``; the backward peels its last step), so a
  thread can have several independent loads in flight (the pointers are
  ``__restrict__``, so loads may move ahead of the stores).
* **Vectorised variant** (``vec`` > 1 in the spec, ``f32x4``/``f16x8`` in the name):
  each thread owns 4 float32 or 8 float16 neighbouring neurons and moves them with
  one 16-byte load or store per tensor and step, then runs the same per-neuron
  arithmetic on each. The launch layer picks it when ``N`` is a multiple of the width
  and the tensors are 16-byte aligned, the scalar kernel otherwise. Measured on an
  H200 (``benchmarks/gpu``, ``N = 2^24``): 1.2-1.3x faster than one neuron per
  thread in float32 and 1.6-1.7x in float16; the kernels alone move 92-99% of the
  device's copy bandwidth in float32 and float16.
* **Same arithmetic, same order as** :mod:`snnkit.neuron._reference` (one
  exception: the float16 backward multiplies by ``1/tau`` where the reference divides;
  the difference, at most a float ulp, disappears when the gradient is rounded to
  half, and the division made that kernel compute-bound): the charge
  divides by ``tau`` (no precomputed ``1/tau``), fire is ``h >= v_threshold``,
  the hard reset is ``h - h*s + v_reset*s`` and the soft reset ``h + s*(-v_th)``.
  Kernels are compiled without fast math and with ``--fmad=false``, so float32
  spikes and potentials equal the torch CPU reference bit for bit. (Torch on
  CUDA divides by a scalar as a multiplication by its reciprocal, so the exact
  reference is the CPU one.)
* **Saved for backward: only** ``h_seq`` (the pre-spike potential, ``[T, N]``,
  in the input dtype), like the torch path. Spikes and the surrogate derivative
  are recomputed from it in the backward kernel, which is cheap arithmetic in a
  bandwidth-bound kernel; saving ``sg`` or ``v_seq`` as well would double the
  memory that gradient checkpointing tries to avoid. When no gradient is needed
  (inference, the first forward of a GC segment) ``h_seq`` is not written at all,
  saving a quarter to a third of the forward's memory traffic.
* **float16**: values are loaded and stored as ``__half`` and computed in
  ``float`` registers, so one template serves both dtypes and odd ``N`` needs no
  padding. The state ``v`` stays in float across steps; only ``h`` is rounded to
  half right after the charge, before firing, because the backward sees the
  saved half ``h``: firing on the unrounded value would let forward and backward
  disagree about a spike near the threshold (a wrong ``1 - S`` in the hard reset
  gradient). The result is the float32 update with ``H`` rounded to half each
  step, closer to float32 than torch's all-half arithmetic. Half arithmetic
  (``half2``) is not used: the kernels are bandwidth-bound, and the vectorised
  kernels already move 8 halves per access.
* Parameters that vary per layer (``v_threshold``, ``v_reset``, ``tau``) are
  kernel arguments, so one compiled kernel serves every layer with the same
  structure; what changes the code (neuron, reset, ``detach_reset``, surrogate,
  dtype) is in the spec and in the kernel name.

Example:
    >>> from snnkit import surrogate
    >>> spec = make_spec("lif", decay_input=True, hard_reset=True, detach_reset=False,
    ...                  surrogate=surrogate.Sigmoid(), dtype="float32")
    >>> forward_name(spec), backward_name(spec)
    ('snnkit_lif_fwd_f32_hard', 'snnkit_lif_bwd_f32_hard_sigmoid_4p0')
    >>> "expf" in backward_source(spec)
    True
"""
from dataclasses import dataclass
from typing import List, Tuple

from ... import _cupy

__all__ = [
    "KernelSpec",
    "make_spec",
    "forward_name",
    "backward_name",
    "forward_source",
    "backward_source",
    "forward_params",
    "backward_params",
    "NVCC_OPTIONS",
    "DTYPES",
    "VECTOR_WIDTH",
]

#: dtype name -> (C type, short tag)
DTYPES = {"float32": ("float", "f32"), "float16": ("__half", "f16")}

#: dtype name -> neurons per thread of the vectorised kernels (16 bytes per load and store)
VECTOR_WIDTH = {"float32": 4, "float16": 8}

#: Compiler options the sources are written for: IEEE arithmetic, no contraction.
NVCC_OPTIONS = ("--fmad=false",)


@dataclass(frozen=True)
class KernelSpec:
    """What changes the code of a neuron kernel (the compile-cache key).

    Attributes:
        neuron: ``"if"`` or ``"lif"``.
        decay_input: LIF only: ``(x - (v - v_rest)) / tau + v`` if True, else
            ``-(v - v_rest) / tau + v + x`` (False for IF).
        hard_reset: Reset to ``v_reset`` (True) or subtract ``v_threshold`` (False).
        detach_reset: The reset term does not carry the spike's gradient.
        dtype: ``"float32"`` or ``"float16"`` (storage; arithmetic is float).
        surrogate: Name of the surrogate in the kernel name, e.g. ``"sigmoid_4p0"``.
        surrogate_code: CUDA statements setting ``float sg`` from ``float hx``.
        vec: Neurons per thread: 1 (any ``N``, any alignment) or
            :data:`VECTOR_WIDTH` of the dtype (16-byte loads and stores; needs
            ``N`` divisible by it and 16-byte aligned tensors).
    """

    neuron: str
    decay_input: bool
    hard_reset: bool
    detach_reset: bool
    dtype: str
    surrogate: str
    surrogate_code: str
    vec: int = 1

    def __post_init__(self):
        if self.neuron not in ("if", "lif"):
            raise ValueError(f"KernelSpec.neuron must be 'if' or 'lif', got {self.neuron!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.neuron == "if" and self.decay_input:
            raise ValueError("KernelSpec: decay_input applies to 'lif' only; pass decay_input=False for 'if'")
        if not self.surrogate.isidentifier():
            raise ValueError(f"KernelSpec.surrogate must be a C identifier fragment, got {self.surrogate!r}")
        if self.vec not in (1, VECTOR_WIDTH[self.dtype]):
            raise ValueError(
                f"KernelSpec.vec must be 1 or {VECTOR_WIDTH[self.dtype]} for {self.dtype}, got {self.vec!r}"
            )


def _tag(value: float) -> str:
    return repr(float(value)).replace("-", "m").replace(".", "p").replace("+", "")


def make_spec(
    neuron: str, decay_input: bool, hard_reset: bool, detach_reset: bool, surrogate, dtype: str, vec: int = 1
) -> KernelSpec:
    """Build a :class:`KernelSpec` from a surrogate object.

    Args:
        neuron: ``"if"`` or ``"lif"``.
        decay_input: Ignored (set False) for ``"if"``.
        hard_reset: True for a hard reset.
        detach_reset: True to detach the spike in the reset.
        surrogate: Anything with ``key`` (``(name, alpha)``) and
            ``cuda_derivative(x, out)``, e.g. :class:`snnkit.surrogate.Sigmoid`.
        dtype: ``"float32"`` or ``"float16"``.
        vec: Neurons per thread (1, or ``VECTOR_WIDTH[dtype]``).

    Returns:
        The frozen spec.
    """
    name, alpha = surrogate.key
    return KernelSpec(
        neuron=neuron,
        decay_input=bool(decay_input) and neuron == "lif",
        hard_reset=bool(hard_reset),
        detach_reset=bool(detach_reset),
        dtype=dtype,
        surrogate=f"{name.lower()}_{_tag(alpha)}",
        surrogate_code=surrogate.cuda_derivative("hx", "sg"),
        vec=vec,
    )


def _stem(spec: KernelSpec) -> str:
    return "lif" if spec.neuron == "lif" and spec.decay_input else ("lif_ndi" if spec.neuron == "lif" else "if")


def _dtype_tag(spec: KernelSpec) -> str:
    return DTYPES[spec.dtype][1] + (f"x{spec.vec}" if spec.vec > 1 else "")


def forward_name(spec: KernelSpec) -> str:
    """Kernel name, e.g. ``snnkit_lif_fwd_f32_hard`` (``lif_ndi``: ``decay_input=False``; ``f32x4``: vectorised)."""
    reset = "hard" if spec.hard_reset else "soft"
    return f"snnkit_{_stem(spec)}_fwd_{_dtype_tag(spec)}_{reset}"


def backward_name(spec: KernelSpec) -> str:
    """Kernel name, e.g. ``snnkit_lif_bwd_f32_soft_detach_atan_2p0``."""
    reset = "hard" if spec.hard_reset else "soft"
    detach = "_detach" if spec.detach_reset else ""
    return f"snnkit_{_stem(spec)}_bwd_{_dtype_tag(spec)}_{reset}{detach}_{spec.surrogate}"


# (C type with {T} for the storage type, name): the launch layer and the CPU
# emulation both pass arguments in this order.
_FWD_PARAMS = (
    ("const {T}* __restrict__", "x_seq"),  # [T, N]
    ("const {T}* __restrict__", "v_init"),  # [N]
    ("{T}* __restrict__", "spike_seq"),  # [T, N]
    ("{T}* __restrict__", "h_seq"),  # [T, N], or NULL: not saved (no backward)
    ("{T}* __restrict__", "v_out"),  # [T, N] if store_v_seq else [N]
    ("const float", "v_threshold"),
    ("const float", "v_reset"),  # hard reset: V_reset; the leak's rest potential V_rest
    ("const float", "tau"),
    ("const int", "store_v_seq"),
    ("const int", "T"),
    ("const long long", "N"),
)
_BWD_PARAMS = (
    ("const {T}* __restrict__", "grad_spike_seq"),  # [T, N]
    ("const {T}* __restrict__", "grad_v"),  # [T, N] if store_v_seq else [N]
    ("const {T}* __restrict__", "h_seq"),  # [T, N]
    ("{T}* __restrict__", "grad_x_seq"),  # [T, N]
    ("{T}* __restrict__", "grad_v_init"),  # [N]
    ("const float", "v_threshold"),
    ("const float", "v_reset"),
    ("const float", "tau"),
    ("const float", "leak"),  # dH[t]/dV[t-1]: 1 (IF) or 1 - 1/tau computed in double
    ("const int", "store_v_seq"),
    ("const int", "T"),
    ("const long long", "N"),
)


def _params(table, ctype: str) -> List[Tuple[str, str]]:
    return [(t.replace("{T}", ctype), n) for t, n in table]


def forward_params(spec: KernelSpec) -> List[Tuple[str, str]]:
    """``[(C type, name), ...]`` of the forward kernel, in argument order."""
    return _params(_FWD_PARAMS, DTYPES[spec.dtype][0])


def backward_params(spec: KernelSpec) -> List[Tuple[str, str]]:
    """``[(C type, name), ...]`` of the backward kernel, in argument order."""
    return _params(_BWD_PARAMS, DTYPES[spec.dtype][0])


def _io(spec: KernelSpec):
    """(header, load(expr) -> float, store(expr) -> stored) for the dtype."""
    if spec.dtype == "float16":
        return "#include <cuda_fp16.h>\n", "__half2float({})", "__float2half_rn({})"
    return "", "{}", "{}"


def _charge(spec: KernelSpec) -> str:
    if spec.neuron == "if":
        return "h = v + x;"
    # V_rest is subtracted only when nonzero, like the reference (v - 0 is v).
    vmr = "(v_reset == 0.0f ? v : v - v_reset)"
    if spec.decay_input:
        return f"h = (x - {vmr}) / tau + v;"
    return f"h = -{vmr} / tau + v + x;"


def _reset(spec: KernelSpec) -> str:
    if spec.hard_reset:
        # h - h*s + v_reset*s  (v_reset*s is exactly 0 when v_reset == 0)
        return "v = h - h * s + v_reset * s;"
    return "v = h + s * (-v_threshold);"


_FWD_TEMPLATE = r"""// snnkit fused multistep forward: {name}
{header}{signature}
{{{prologue}
    // Four copies of the time loop, so that no loop has a branch inside.
    if (h_seq) {{
        if (store_v_seq) {{{loop_h_vs}
        }} else {{{loop_h}
        }}
    }} else {{
        if (store_v_seq) {{{loop_vs}
        }} else {{{loop}
        }}
    }}{epilogue}
}}
"""

_FWD_SCALAR_PROLOGUE = r"""
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float v = {load_v};"""

_FWD_SCALAR_EPILOGUE = r"""
    if (!store_v_seq) v_out[i] = {store_v};"""

_FWD_LOOP = r"""
            #pragma unroll 4
            for (int t = 0; t < T; t++) {{
                const long long k = (long long)t * N + i;
                const float x = {load_x};
                float h;
                {charge}{round_h}
                const float s = (h >= v_threshold) ? 1.0f : 0.0f;
                spike_seq[k] = {store_s};{save_h}
                {reset}{save_v}
            }}"""

# Vectorised kernels: thread j owns the VEC neurons j*VEC .. j*VEC + VEC - 1 (VEC
# divides N) and moves them with one 16-byte load or store per tensor and step.
_VEC_STRUCT = r"""#ifndef SNNKIT_{TAG}_DEFINED
#define SNNKIT_{TAG}_DEFINED
struct __align__(16) snnkit_{tag} {{ {ctype} e[{vec}]; }};  // {vec} neurons, 16 bytes
#endif
"""

_VEC_PROLOGUE = r"""
    // thread j owns neurons j * {vec} .. j * {vec} + {last}; {vec} divides N
    typedef snnkit_{tag} vec_t;
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long M = N / {vec};
    if (j >= M{t_guard}) return;"""

_FWD_VEC_PROLOGUE = r"""
    float vv[{vec}];
    {{
        const vec_t a = ((const vec_t*)v_init)[j];
        #pragma unroll
        for (int e = 0; e < {vec}; e++) vv[e] = {load_a};
    }}"""

_FWD_VEC_EPILOGUE = r"""
    if (!store_v_seq) {{
        vec_t o;
        #pragma unroll
        for (int e = 0; e < {vec}; e++) o.e[e] = {store_vv};
        ((vec_t*)v_out)[j] = o;
    }}"""

_FWD_VEC_LOOP = r"""
            #pragma unroll 2
            for (int t = 0; t < T; t++) {{
                const long long k = (long long)t * M + j;
                const vec_t xv = ((const vec_t*)x_seq)[k];
                vec_t sv{decl_h}{decl_v};
                #pragma unroll
                for (int e = 0; e < {vec}; e++) {{
                    float v = vv[e];
                    const float x = {load_x};
                    float h;
                    {charge}{round_h}
                    const float s = (h >= v_threshold) ? 1.0f : 0.0f;
                    sv.e[e] = {store_s};{save_h}
                    {reset}{save_v}
                    vv[e] = v;
                }}
                ((vec_t*)spike_seq)[k] = sv;{put_h}{put_v}
            }}"""


def _vec_header(spec: KernelSpec, header: str) -> str:
    if spec.vec == 1:
        return header
    tag = _dtype_tag(spec)
    return header + _VEC_STRUCT.format(TAG=tag.upper(), tag=tag, ctype=DTYPES[spec.dtype][0], vec=spec.vec)


def _vec_prologue(spec: KernelSpec, t_guard: str = "") -> str:
    return _VEC_PROLOGUE.format(vec=spec.vec, last=spec.vec - 1, tag=_dtype_tag(spec), t_guard=t_guard)


def forward_source(spec: KernelSpec) -> str:
    """CUDA source of the forward kernel (``forward_name(spec)``).

    The forward does not depend on ``detach_reset`` or the surrogate; specs that
    differ only there give the same source and name.
    """
    header, load, store = _io(spec)
    name = forward_name(spec)
    round_h = "\n                h = __half2float(__float2half_rn(h));  // fire on the h that backward sees"
    vec = spec.vec > 1
    pad = "    " if vec else ""
    fields = dict(
        load_x=load.format("xv.e[e]" if vec else "x_seq[k]"),
        charge=_charge(spec),
        round_h=round_h.replace("\n", "\n" + pad) if spec.dtype == "float16" else "",
        store_s=store.format("s"),
        reset=_reset(spec),
    )
    if vec:
        frame = dict(
            prologue=_vec_prologue(spec) + _FWD_VEC_PROLOGUE.format(vec=spec.vec, load_a=load.format("a.e[e]")),
            epilogue=_FWD_VEC_EPILOGUE.format(vec=spec.vec, store_vv=store.format("vv[e]")),
        )

        def loop(h: bool, vs: bool) -> str:
            return _FWD_VEC_LOOP.format(
                vec=spec.vec,
                decl_h=", hv" if h else "",
                decl_v=", vo" if vs else "",
                save_h=f"\n                    hv.e[e] = {store.format('h')};" if h else "",
                save_v=f"\n                    vo.e[e] = {store.format('v')};" if vs else "",
                put_h="\n                ((vec_t*)h_seq)[k] = hv;" if h else "",
                put_v="\n                ((vec_t*)v_out)[k] = vo;" if vs else "",
                **fields,
            )

    else:
        frame = dict(
            prologue=_FWD_SCALAR_PROLOGUE.format(load_v=load.format("v_init[i]")),
            epilogue=_FWD_SCALAR_EPILOGUE.format(store_v=store.format("v")),
        )

        def loop(h: bool, vs: bool) -> str:
            return _FWD_LOOP.format(
                save_h=f"\n                h_seq[k] = {store.format('h')};" if h else "",
                save_v=f"\n                v_out[k] = {store.format('v')};" if vs else "",
                **fields,
            )

    return _FWD_TEMPLATE.format(
        name=name,
        header=_vec_header(spec, header),
        signature=_cupy.signature(name, forward_params(spec)),
        loop_h_vs=loop(True, True),
        loop_h=loop(True, False),
        loop_vs=loop(False, True),
        loop=loop(False, False),
        **frame,
    )


def _dv_dh(spec: KernelSpec) -> str:
    """Statements for ``dV[t]/dH[t]`` in the reference's order (empty: it is 1)."""
    indent = "\n            "
    if spec.hard_reset:
        code = "float dv_dh = (h < v_threshold) ? 1.0f : 0.0f;  // 1 - S"
        if not spec.detach_reset:  # + (-H) sg + V_reset sg
            code += indent + "dv_dh = dv_dh + (-1.0f * h) * sg;"
            code += indent + "if (v_reset != 0.0f) dv_dh = dv_dh + v_reset * sg;"
        return code
    if spec.detach_reset:
        return "// dV/dH = 1 (soft reset, detached)"
    return "const float dv_dh = sg * (-v_threshold) + 1.0f;  // 1 - V_th sg"


_BWD_TEMPLATE = r"""// snnkit fused multistep backward (BPTT): {name}
{header}{signature}
{{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N || T <= 0) return;
    // grad_h: the gradient reaching H[t + 1]; g: the one reaching V[t] from later steps
    float grad_h = 0.0f;{inv_tau}
    if (store_v_seq) {{  // grad_v is [T, N]: g = grad_v[t] + leak grad_h[t + 1]
        #pragma unroll 4
        for (int t = T - 1; t >= 0; t--) {{
            const long long k = (long long)t * N + i;
            const float g = {load_gv_k} + leak * grad_h;{step}
        }}
    }} else {{  // grad_v is [N]: it reaches V[T - 1] only
        {{
            const int t = T - 1;
            const long long k = (long long)t * N + i;
            const float g = {load_gv_i};{step}
        }}
        #pragma unroll 4
        for (int t = T - 2; t >= 0; t--) {{
            const long long k = (long long)t * N + i;
            const float g = leak * grad_h;{step}
        }}
    }}
    grad_v_init[i] = {store_gv0};
}}
"""

_BWD_VEC_TEMPLATE = r"""// snnkit fused multistep backward (BPTT): {name}
{header}{signature}
{{{prologue}
    // gh[e]: the gradient reaching H[t + 1]; g: the one reaching V[t] from later steps
    float gh[{vec}];{inv_tau}
    #pragma unroll
    for (int e = 0; e < {vec}; e++) gh[e] = 0.0f;
    if (store_v_seq) {{  // grad_v is [T, N]: g = grad_v[t] + leak gh[t + 1]
        #pragma unroll 2
        for (int t = T - 1; t >= 0; t--) {{
            const long long k = (long long)t * M + j;
            const vec_t gvv = ((const vec_t*)grad_v)[k];{body_gv_k}
        }}
    }} else {{  // grad_v is [N]: it reaches V[T - 1] only
        {{
            const int t = T - 1;
            const long long k = (long long)t * M + j;
            const vec_t gvv = ((const vec_t*)grad_v)[j];{body_gv_j}
        }}
        #pragma unroll 2
        for (int t = T - 2; t >= 0; t--) {{
            const long long k = (long long)t * M + j;{body_leak}
        }}
    }}
    vec_t o;
    #pragma unroll
    for (int e = 0; e < {vec}; e++) o.e[e] = {store_gv0};
    ((vec_t*)grad_v_init)[j] = o;
}}
"""

_BWD_VEC_BODY = r"""
            const vec_t hv = ((const vec_t*)h_seq)[k];
            const vec_t gsv = ((const vec_t*)grad_spike_seq)[k];
            vec_t gxv;
            #pragma unroll
            for (int e = 0; e < {vec}; e++) {{
                const float g = {g};{step}
            }}
            ((vec_t*)grad_x_seq)[k] = gxv;"""

_BWD_STEP = r"""
            const float h = {load_h};
            const float hx = h - v_threshold;
            float sg;
            {surrogate}
            {dv_dh}
            {gh} = sg * {load_gs} + {g_term};
            {gx} = {store_gx};"""


def backward_source(spec: KernelSpec) -> str:
    """CUDA source of the backward kernel (``backward_name(spec)``).

    It recomputes the surrogate derivative from ``h_seq`` (the only saved tensor)
    and runs BPTT in reverse time, in the order of the reference backward.
    """
    header, load, store = _io(spec)
    name = backward_name(spec)
    dv_dh = _dv_dh(spec)
    vec = spec.vec > 1
    gh = "gh[e]" if vec else "grad_h"
    decays = spec.neuron == "lif" and spec.decay_input
    # float16 stores grad_x rounded to half: a multiplication by 1/tau (at most one float
    # ulp from the division) is invisible there and takes the kernel off the compute limit.
    half = spec.dtype == "float16"
    grad_x = (f"{gh} * inv_tau" if half else f"{gh} / tau") if decays else gh
    inv_tau = "\n    const float inv_tau = 1.0f / tau;" if decays and half else ""
    step = _BWD_STEP.format(
        load_h=load.format("hv.e[e]" if vec else "h_seq[k]"),
        surrogate=spec.surrogate_code,
        dv_dh=dv_dh,
        gh=gh,
        load_gs=load.format("gsv.e[e]" if vec else "grad_spike_seq[k]"),
        g_term="g" if dv_dh.startswith("//") else "g * dv_dh",
        gx="gxv.e[e]" if vec else "grad_x_seq[k]",
        store_gx=store.format(grad_x),
    )
    common = dict(name=name, header=_vec_header(spec, header), signature=_cupy.signature(name, backward_params(spec)),
                  inv_tau=inv_tau)
    if not vec:
        return _BWD_TEMPLATE.format(
            step=step,
            load_gv_k=load.format("grad_v[k]"),
            load_gv_i=load.format("grad_v[i]"),
            store_gv0=store.format("grad_h * leak"),
            **common,
        )
    step = step.replace("\n", "\n    ")

    def body(g: str) -> str:
        return _BWD_VEC_BODY.format(vec=spec.vec, g=g, step=step)

    return _BWD_VEC_TEMPLATE.format(
        prologue=_vec_prologue(spec, " || T <= 0"),
        vec=spec.vec,
        body_gv_k=body(f"{load.format('gvv.e[e]')} + leak * gh[e]"),
        body_gv_j=body(load.format("gvv.e[e]")),
        body_leak=body("leak * gh[e]"),
        store_gv0=store.format("gh[e] * leak"),
        **common,
    )
