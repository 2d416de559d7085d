"""CPU-only checks of the generated CUDA sources and of the launch layer's pure parts."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from snnkit import surrogate
from snnkit.neuron import _reference
from snnkit.neuron._cuda import codegen, ops

SURROGATES = (surrogate.Sigmoid(), surrogate.ATan(), surrogate.PiecewiseQuadratic(), surrogate.Rect())


def _all_specs():
    for (neuron, di), hard, detach, sg, dt in itertools.product(
        (("if", False), ("lif", True), ("lif", False)), (True, False), (True, False), SURROGATES, ("float32", "float16")
    ):
        yield codegen.make_spec(neuron, di, hard, detach, sg, dt)


def test_names_follow_the_spec():
    spec = codegen.make_spec("lif", True, True, False, surrogate.Sigmoid(), "float32")
    assert codegen.forward_name(spec) == "snnkit_lif_fwd_f32_hard"
    assert codegen.backward_name(spec) == "snnkit_lif_bwd_f32_hard_sigmoid_4p0"
    spec = codegen.make_spec("lif", False, False, True, surrogate.ATan(alpha=3.5), "float16")
    assert codegen.forward_name(spec) == "snnkit_lif_ndi_fwd_f16_soft"
    assert codegen.backward_name(spec) == "snnkit_lif_ndi_bwd_f16_soft_detach_atan_3p5"
    spec = codegen.make_spec("if", True, True, False, surrogate.Rect(), "float32")
    assert not spec.decay_input and codegen.forward_name(spec) == "snnkit_if_fwd_f32_hard"


def test_names_unique_and_sources_deterministic():
    specs = list(_all_specs())
    assert len(specs) == 96
    bwd = {codegen.backward_name(s): codegen.backward_source(s) for s in specs}
    assert len(bwd) == 96 and len(set(bwd.values())) == 96  # one name, one source per spec
    fwd = {codegen.forward_name(s): codegen.forward_source(s) for s in specs}
    assert len(fwd) == 12 and len(set(fwd.values())) == 12  # forward ignores detach and surrogate
    for s in specs:  # rebuilt from scratch: same text; the name is inside the source
        again = codegen.make_spec(s.neuron, s.decay_input, s.hard_reset, s.detach_reset, SURROGATES[0], s.dtype)
        assert codegen.forward_source(again) == fwd[codegen.forward_name(s)]
        assert f" {codegen.backward_name(s)}(" in bwd[codegen.backward_name(s)]


def test_spec_is_a_hashable_cache_key():
    a = codegen.make_spec("lif", True, False, True, surrogate.Sigmoid(alpha=2.0), "float32")
    b = codegen.make_spec("lif", True, False, True, surrogate.Sigmoid(alpha=2.0), "float32")
    c = codegen.make_spec("lif", True, False, True, surrogate.Sigmoid(alpha=2.5), "float32")
    assert a == b and hash(a) == hash(b) and a != c
    assert codegen.backward_name(a) != codegen.backward_name(c)
    with pytest.raises(AttributeError):
        a.neuron = "if"


@pytest.mark.parametrize("sg", SURROGATES, ids=lambda s: type(s).__name__)
def test_backward_inlines_the_surrogate_derivative(sg):
    spec = codegen.make_spec("lif", True, True, False, sg, "float32")
    src = codegen.backward_source(spec)
    assert sg.cuda_derivative("hx", "sg") in src
    assert "const float hx = h - v_threshold;" in src


def test_arithmetic_in_reference_order():
    lif = codegen.make_spec("lif", True, True, False, surrogate.Sigmoid(), "float32")
    ndi = codegen.make_spec("lif", False, False, False, surrogate.Sigmoid(), "float32")
    if_ = codegen.make_spec("if", False, True, True, surrogate.Sigmoid(), "float32")
    assert "h = (x - (v_reset == 0.0f ? v : v - v_reset)) / tau + v;" in codegen.forward_source(lif)
    assert "h = -(v_reset == 0.0f ? v : v - v_reset) / tau + v + x;" in codegen.forward_source(ndi)
    assert "h = v + x;" in codegen.forward_source(if_)
    assert "const float s = (h >= v_threshold) ? 1.0f : 0.0f;" in codegen.forward_source(lif)
    assert "v = h - h * s + v_reset * s;" in codegen.forward_source(lif)
    assert "v = h + s * (-v_threshold);" in codegen.forward_source(ndi)
    assert "grad_x_seq[k] = grad_h / tau;" in codegen.backward_source(lif)  # decay_input scales dX
    assert "grad_x_seq[k] = grad_h;" in codegen.backward_source(ndi)
    assert "dv_dh" not in codegen.backward_source(
        codegen.make_spec("if", False, False, True, surrogate.Sigmoid(), "float32")
    ).replace("// dV/dH = 1 (soft reset, detached)", "")
    assert "1.0f / tau" not in codegen.forward_source(lif)  # divide, as the reference does
    assert codegen.NVCC_OPTIONS == ("--fmad=false",)


def test_float16_loads_and_stores_half_computes_float():
    spec = codegen.make_spec("lif", True, True, False, surrogate.Sigmoid(), "float16")
    src = codegen.forward_source(spec)
    assert src.startswith("// snnkit") and "#include <cuda_fp16.h>" in src
    assert "const __half* __restrict__ x_seq" in src and "const float x = __half2float(x_seq[k]);" in src
    assert "spike_seq[k] = __float2half_rn(s);" in src
    f32 = codegen.forward_source(codegen.make_spec("lif", True, True, False, surrogate.Sigmoid(), "float32"))
    assert "half" not in f32


def test_params_match_the_signature():
    spec = codegen.make_spec("if", False, False, False, surrogate.Sigmoid(), "float32")
    names = [n for _, n in codegen.forward_params(spec)]
    assert names == ["x_seq", "v_init", "spike_seq", "h_seq", "v_out", "v_threshold", "v_reset", "tau",
                     "store_v_seq", "T", "N"]  # fmt: skip
    src = codegen.forward_source(spec)
    for t, n in codegen.forward_params(spec):
        assert f"{t} {n}" in src
    for t, n in codegen.backward_params(spec):
        assert f"{t} {n}" in codegen.backward_source(spec)


def test_spec_validation():
    sg = surrogate.Sigmoid()
    with pytest.raises(ValueError, match="neuron must be 'if' or 'lif', got 'alif'"):
        codegen.make_spec("alif", False, True, False, sg, "float32")
    with pytest.raises(ValueError, match="dtype must be one of .*got 'float64'"):
        codegen.make_spec("lif", True, True, False, sg, "float64")
    with pytest.raises(ValueError, match="decay_input applies to 'lif' only"):
        codegen.KernelSpec("if", True, True, False, "float32", "sigmoid_4p0", "")
    with pytest.raises(ValueError, match="vec must be 1 or 8 for float16, got 4"):
        codegen.make_spec("lif", True, True, False, sg, "float16", vec=4)
    with pytest.raises(ValueError, match="surrogate must be a C identifier fragment, got 'sig-moid'"):
        codegen.KernelSpec("lif", True, True, False, "float32", "sig-moid", "")
    from snnkit.memopt import _bitpack_cuda as bitpack

    with pytest.raises(ValueError, match="bit packing supports .*'int32'.*, got 'float8'"):
        bitpack.pack_name("float8")


def test_vectorised_names_and_choice():
    sg = surrogate.Sigmoid()
    spec = codegen.make_spec("lif", True, True, False, sg, "float32")
    vec = ops.launch_spec(spec, 8, [torch.zeros(8)])
    assert vec.vec == 4 and codegen.forward_name(vec) == "snnkit_lif_fwd_f32x4_hard"
    assert "struct __align__(16) snnkit_f32x4" in codegen.forward_source(vec)
    assert ops.launch_spec(spec, 6, [torch.zeros(6)]) is spec  # 6 neurons: not a multiple of 4
    assert ops.launch_spec(spec, 8, [torch.zeros(9)[1:]]) is spec  # 4 bytes off alignment
    assert ops.launch_spec(spec, 8, [torch.zeros(8), None]) == vec  # absent tensors do not count


def test_kernel_scalars_follow_the_reference():
    p = _reference.NeuronParams("lif", 0.7, None, False, surrogate.Sigmoid(), tau=3.0)
    sc = ops.kernel_scalars(p)
    assert sc == {"v_threshold": 0.7, "v_reset": 0.0, "tau": 3.0, "leak": _reference._leak(p)}
    p = _reference.NeuronParams("if", 1.0, -0.5, True, surrogate.Rect(), tau=5.0)
    assert ops.kernel_scalars(p) == {"v_threshold": 1.0, "v_reset": -0.5, "tau": 1.0, "leak": 1.0}


def test_launch_layer_errors_on_cpu():
    p = _reference.NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid())
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="backend='cupy' needs CUDA tensors, got x_seq on cpu"):
        ops.multistep(x, torch.zeros(4), p)
    with pytest.raises(ValueError, match="supports float32 and float16 tensors, got torch.float64"):
        ops.spec_for(p, torch.float64)


def test_import_never_loads_cupy():
    code = (
        "import sys, snnkit, snnkit.neuron._cuda.ops, snnkit.neuron._cuda.codegen, snnkit.memopt._bitpack_cuda;"
        "assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_for_caches_per_surrogate_and_accepts_unhashable_ones():
    sg = surrogate.Sigmoid()
    p = _reference.NeuronParams("lif", 1.0, 0.0, False, sg)
    assert ops.spec_for(p, torch.float32) is ops.spec_for(p, torch.float32)
    sg.alpha = 2.0  # a changed surrogate gets a new spec, not the cached one
    assert ops.spec_for(p, torch.float32).surrogate == "sigmoid_2p0"

    class ByValue(surrogate.Sigmoid):
        def __eq__(self, other):  # defines __eq__ only: instances are unhashable
            return isinstance(other, ByValue)

    q = _reference.NeuronParams("lif", 1.0, 0.0, False, ByValue())
    assert ops.spec_for(q, torch.float16).surrogate == "byvalue_4p0"


def test_launch_arguments_follow_the_c_types_of_both_kernel_families():
    import numpy as np

    from snnkit import _cupy
    from snnkit.memopt import _bitpack_cuda as bitpack

    t = torch.zeros(4)
    conv = _cupy._converters(bitpack.pack_params("float32"))
    args = [f(a) for f, a in zip(conv, (t, t, t, 11))]
    assert [type(a) for a in args] == [np.uint64] * 3 + [np.int64] and int(args[0]) == t.data_ptr()
    spec = next(iter(_all_specs()))
    conv = _cupy._converters(tuple(codegen.forward_params(spec)))  # 5 pointers, 3 floats, 2 ints, a long long
    args = [f(a) for f, a in zip(conv, (t, t, t, None, t, 1.0, 0.0, 2.0, 0, 8, 4))]
    assert [type(a) for a in args] == [np.uint64] * 5 + [np.float32] * 3 + [np.int32] * 2 + [np.int64]
    assert int(args[3]) == 0  # None: a null pointer (h_seq not saved)


def test_spec_for_rejects_non_spiking_surrogates():
    p = _reference.NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid(spiking=False))
    with pytest.raises(ValueError, match="spiking=False; use backend='torch'"):
        ops.spec_for(p, torch.float32)


class _SigmoidWithOwnDerivative(surrogate.Sigmoid):
    """Overrides the torch derivative but inherits Sigmoid's CUDA one."""

    def derivative(self, x, inplace=False):
        return torch.ones_like(x)


class _NoCuda(surrogate.SurrogateFunction):
    def derivative(self, x, inplace=False):
        return torch.ones_like(x)


class _WithCuda(_NoCuda):
    def cuda_derivative(self, x, out):
        return f"{out} = 1.0f;"


class _OwnDerivative_(surrogate.Rect):
    def _derivative_(self, x):
        return torch.ones_like(x)


@pytest.mark.parametrize("cls", [_SigmoidWithOwnDerivative, _NoCuda, _OwnDerivative_])
def test_spec_for_rejects_a_surrogate_without_a_matching_cuda_derivative(cls):
    # The kernel would otherwise inline a formula other than the torch derivative's (or none).
    p = _reference.NeuronParams("if", 1.0, 0.0, False, cls(1.0))
    with pytest.raises(ValueError, match=f"{cls.__name__}.cuda_derivative"):
        ops.spec_for(p, torch.float32)


def test_spec_for_accepts_a_custom_surrogate_with_its_cuda_derivative():
    p = _reference.NeuronParams("if", 1.0, 0.0, False, _WithCuda(1.0))
    spec = ops.spec_for(p, torch.float32)
    assert spec.surrogate == "_withcuda_1p0" and spec.surrogate_code == "sg = 1.0f;"


def _c_reads_float32(literal: str) -> np.float32:
    """The float32 a C compiler makes of ``literal`` (``"1.5f"``): the exact decimal rounded once, ties to even."""
    from fractions import Fraction

    q = Fraction(literal.removesuffix("f"))
    guess = np.float32(float(q))  # at most one float32 ulp off (rounded twice)
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1))


def test_surrogate_literals_are_the_float32_torch_uses():
    """A literal rounds decimal -> float once; it must land where torch's double -> float32 cast does.

    The values are exact midpoints between two float32 (the audit's cfloat.py), where ``repr`` of the
    double (the shortest decimal that reads back as that double) may lie on either side of the midpoint.
    """
    rng = np.random.default_rng(0)
    floats = rng.uniform(0.1, 8.0, 500).astype(np.float32).astype(np.float64)
    midpoints = [np.array(np.uint64(np.array(f).view(np.uint64) | np.uint64(1 << 28))).view(np.float64).item()
                 for f in floats]  # fmt: skip
    values = [1 + 2**-24, 0.5 / (1 + 2**-24), 4.0, 1 / 3, 0.1, 1e-30, 3e38, *midpoints]
    for v in values:
        literal = surrogate._c_float(v)
        torch_value = torch.tensor(v, dtype=torch.float32).item()
        assert literal.endswith("f") and _c_reads_float32(literal) == np.float32(torch_value), (v, literal)
    assert surrogate._c_float(4.0) == "4.0f" and surrogate._c_float(1 / 3) == "0.33333334f"
    assert surrogate._c_float(1e39) == "(1.0f / 0.0f)"  # beyond float32: infinity, as torch.tensor(1e39)
    assert surrogate._c_float(1 + 2**-24) == "1.0f"  # the midpoint rounds to even, not up
    for sg in (surrogate.Sigmoid(midpoints[0]), surrogate.PiecewiseQuadratic(midpoints[1]),
               surrogate.Rect(midpoints[2])):
        assert surrogate._c_float(sg.alpha) in sg.cuda_derivative("x", "out")
