"""The functional core against golden values and a hand-written float64 BPTT reference."""
import itertools
import math

import numpy as np
import pytest
import torch

from snnkit import surrogate
from snnkit.neuron._reference import _charge, _tau_divisor, charge
from snnkit.neuron.functional import NeuronParams, multistep, step

SURROGATE_DERIVATIVES = {  # written from the formulas, independently of snnkit.surrogate
    "Sigmoid": lambda x, a: a * (1 / (1 + np.exp(-a * x))) * (1 - 1 / (1 + np.exp(-a * x))),
    "ATan": lambda x, a: (a / 2) / (1 + (math.pi / 2 * a * x) ** 2),
    "PiecewiseQuadratic": lambda x, a: np.where(np.abs(x) > 1 / a, 0.0, a - a * a * np.abs(x)),
    "Rect": lambda x, a: np.where(np.abs(x) < 0.5 / a, a, 0.0),
}


def numpy_bptt(x, v0, kind, tau, decay_input, v_th, v_reset, detach_reset, sg_name, alpha, grad_s, grad_v_last):
    """Forward and backward of T steps, by hand, in float64."""
    T = x.shape[0]
    vr = 0.0 if v_reset is None else v_reset
    h, s, v = np.zeros_like(x), np.zeros_like(x), v0.copy()
    for t in range(T):
        if kind == "if":
            h[t] = v + x[t]
        elif decay_input:
            h[t] = v + (x[t] - (v - vr)) / tau
        else:
            h[t] = v - (v - vr) / tau + x[t]
        s[t] = (h[t] >= v_th).astype(np.float64)
        v = h[t] * (1 - s[t]) + v_reset * s[t] if v_reset is not None else h[t] - v_th * s[t]
    dh_dv = 1.0 if kind == "if" else 1 - 1 / tau
    dh_dx = 1 / tau if (kind == "lif" and decay_input) else 1.0
    sg = SURROGATE_DERIVATIVES[sg_name](h - v_th, alpha)
    grad_x = np.zeros_like(x)
    g_v = grad_v_last.copy()  # dL/dV[t]
    for t in reversed(range(T)):
        if v_reset is not None:
            dv_dh = (1 - s[t]) + (0.0 if detach_reset else (v_reset - h[t]) * sg[t])
        else:
            dv_dh = 1.0 - (0.0 if detach_reset else v_th * sg[t])
        g_h = grad_s[t] * sg[t] + g_v * dv_dh
        grad_x[t] = g_h * dh_dx
        g_v = g_h * dh_dv
    return s, v, grad_x, g_v


CONFIGS = [
    c
    for c in itertools.product(["if", "lif"], [True, False], [0.0, -0.2, None], [False, True], list(SURROGATE_DERIVATIVES))
    if c[0] == "lif" or c[1]  # decay_input only applies to LIF
]


def _assert_multistep_matches_numpy(sg, sg_name, kind, decay_input, v_reset, detach_reset):
    """Spikes, final state and gradients of :func:`multistep` against :func:`numpy_bptt` (float64)."""
    p = NeuronParams(kind, 1.0, v_reset, detach_reset, sg, tau=1.7, decay_input=decay_input)
    x = torch.rand(7, 3, 4, dtype=torch.float64) * 2.4 - 0.3
    v0 = torch.rand(3, 4, dtype=torch.float64) * 0.4
    grad_s, grad_v = torch.randn(7, 3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x.requires_grad_(), v0.requires_grad_()
    spikes, v_last = multistep(x, v0, p)
    (spikes * grad_s).sum().add((v_last * grad_v).sum()).backward()
    ref = numpy_bptt(x.detach().numpy(), v0.detach().numpy(), kind, 1.7, decay_input, 1.0, v_reset,
                     detach_reset, sg_name, sg.alpha, grad_s.numpy(), grad_v.numpy())
    np.testing.assert_array_equal(spikes.detach().numpy(), ref[0])
    np.testing.assert_allclose(v_last.detach().numpy(), ref[1], atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), ref[2], atol=1e-12)
    np.testing.assert_allclose(v0.grad.numpy(), ref[3], atol=1e-12)
    assert spikes.sum() > 0 and (spikes == 0).sum() > 0  # the test exercises both branches


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset,sg_name", CONFIGS)
def test_multistep_matches_hand_written_bptt(kind, decay_input, v_reset, detach_reset, sg_name):
    _assert_multistep_matches_numpy(getattr(surrogate, sg_name)(), sg_name, kind, decay_input, v_reset, detach_reset)


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset,sg_name", CONFIGS[::3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multistep_equals_single_steps_bit_for_bit(kind, decay_input, v_reset, detach_reset, sg_name, dtype):
    p = NeuronParams(kind, 0.8, v_reset, detach_reset, getattr(surrogate, sg_name)(), 3.0, decay_input)
    x = (torch.rand(9, 2, 33, dtype=dtype) * 1.2).requires_grad_()
    v0 = torch.zeros(2, 33, dtype=dtype)
    spikes, v_seq = multistep(x, v0, p, store_v_seq=True)
    grad = torch.randn_like(spikes)
    (gx_multi,) = torch.autograd.grad((spikes * grad).sum() + v_seq.sum(), x)
    v, outs, vs = v0, [], []
    for t in range(9):
        s, v = step(x[t], v, p)
        outs.append(s)
        vs.append(v)
    assert torch.equal(torch.stack(outs), spikes) and torch.equal(torch.stack(vs), v_seq)
    (gx_single,) = torch.autograd.grad((torch.stack(outs) * grad).sum() + torch.stack(vs).sum(), x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gx_multi, gx_single, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("v_reset", [0.0, -0.2])
@pytest.mark.parametrize("tau", [2.0, 1.7, 3.0, 1.0001, 100.0])
def test_lif_charge_rounds_like_one_operation_at_a_time(dtype, decay_input, v_reset, tau):
    """The charge, one ``addcdiv`` pass in the time loop, equals numpy's division and additions, bit for bit.

    Magnitudes from subnormal to 1e30, both signs, signed zeros, infinities and NaN;
    an odd length, so that vectorised loops and their scalar tails are both used.
    """
    rng = np.random.default_rng(11)
    n = 40_001
    scale = np.logspace(-42 if dtype == np.float32 else -310, 30, n)
    x = (rng.standard_normal(n) * rng.permutation(scale)).astype(dtype)
    v = (rng.standard_normal(n) * rng.permutation(scale)).astype(dtype)
    x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -0.0, 0.0]
    v[:8] = [-0.0, 0.0, 1.0, np.inf, 2.0, np.nan, -np.inf, 0.0]
    t, vr = dtype(tau), dtype(v_reset)
    with np.errstate(all="ignore"):
        vmr = v - vr if v_reset != 0.0 else v
        expected = (x - vmr) / t + v if decay_input else (v - vmr / t) + x
    p = NeuronParams("lif", 1.0, v_reset, False, surrogate.Sigmoid(), tau=tau, decay_input=decay_input)
    xt, vt = torch.from_numpy(x), torch.from_numpy(v)
    divisor = _tau_divisor(p, xt, vt)
    assert divisor is not None  # the time loop's one-pass form is used for these dtypes
    for form in (lambda out: charge(xt, vt, p, out=out), lambda out: _charge(xt, vt, p, divisor, out)):
        np.testing.assert_array_equal(form(None).numpy(), expected)
        # the no-grad form writes into a buffer of the time loop
        np.testing.assert_array_equal(form(torch.empty(n, dtype=xt.dtype)).numpy(), expected)


def test_lif_charge_keeps_separate_passes_where_one_pass_would_round_differently():
    p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid(), tau=1.7)
    x32 = torch.rand(5)
    assert _tau_divisor(p, x32, 0.0) is not None and _tau_divisor(p, x32, torch.rand(5)) is not None
    for x, v in ((x32.half(), 0.0), (x32.bfloat16(), 0.0), (x32, torch.rand(5, dtype=torch.float64))):
        assert _tau_divisor(p, x, v) is None  # tau would be rounded to half, or the dtypes mixed
    assert _tau_divisor(NeuronParams("if", 1.0, 0.0, False, surrogate.Sigmoid()), x32, 0.0) is None


@pytest.mark.parametrize("decay_input", [True, False])
def test_multistep_of_a_1d_sequence_equals_single_steps_bit_for_bit(decay_input):
    # x_seq [T]: every operand of a step's charge is 0-dim, where a divisor of another
    # dtype would win type promotion and round the charge once in that dtype.
    p = NeuronParams("lif", 1.0, -0.2, False, surrogate.Sigmoid(), tau=1.7, decay_input=decay_input)
    x = torch.rand(3000, generator=torch.Generator().manual_seed(4)) * 1.5
    spikes, v_seq = multistep(x, torch.zeros(()), p, store_v_seq=True)
    v, outs, vs = torch.zeros(()), [], []
    for x_t in x:
        s_t, v = step(x_t, v, p)
        outs.append(s_t)
        vs.append(v)
    assert torch.equal(torch.stack(outs), spikes) and torch.equal(torch.stack(vs), v_seq)


def test_golden_lif_trajectory():
    # tau = 2, v_reset = 0, constant input 1.5: H = V + (1.5 - V)/2.
    # t0: H = 0.75 -> no spike, V = 0.75; t1: H = 1.125 -> spike, V = 0; t2: H = 0.75; t3: H = 1.125 -> spike.
    p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid(), 2.0, True)
    spikes, v_seq = multistep(torch.full((4, 1), 1.5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), p, True)
    assert spikes.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert v_seq.flatten().tolist() == [0.75, 0.0, 0.75, 0.0]


def test_golden_if_soft_reset_trajectory():
    # IF soft reset, input 0.7: V = 0.7, 1.4 -> spike -> 0.4, 1.1 -> spike -> 0.1, 0.8
    p = NeuronParams("if", 1.0, None, False, surrogate.Sigmoid())
    spikes, v_seq = multistep(torch.full((4, 1), 0.7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), p, True)
    assert spikes.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(v_seq.flatten().numpy(), [0.7, 0.4, 0.1, 0.8], atol=1e-15)


def test_functions_do_not_modify_inputs():
    p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid(), 2.0, False)
    x, v = torch.rand(5, 4) * 2, torch.rand(4)
    x0, v00 = x.clone(), v.clone()
    multistep(x, v, p)
    step(x[0], v, p)
    assert torch.equal(x, x0) and torch.equal(v, v00)


@pytest.mark.parametrize("store_v_seq", [False, True])
def test_no_grad_path_equals_autograd_path(store_v_seq):
    p = NeuronParams("lif", 1.0, None, False, surrogate.ATan(), 2.0, False)
    x = torch.rand(6, 3, 17) * 2
    v0 = torch.rand(3, 17)
    with torch.no_grad():
        s_ng, v_ng = multistep(x, v0, p, store_v_seq)
    s_g, v_g = multistep(x.clone().requires_grad_(), v0, p, store_v_seq)
    assert s_g.requires_grad and not s_ng.requires_grad
    assert torch.equal(s_ng, s_g) and torch.equal(v_ng, v_g)


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset,sg_name", CONFIGS[::2])
def test_backward_with_retained_graph_repeats_bit_for_bit(kind, decay_input, v_reset, detach_reset, sg_name):
    # Backward writes grad_h over the saved H unless autograd keeps the graph: a
    # retained graph must give the same gradients again, equal to a one-shot backward.
    p = NeuronParams(kind, 0.9, v_reset, detach_reset, getattr(surrogate, sg_name)(), 2.5, decay_input)
    x = (torch.rand(6, 2, 19) * 2.2).requires_grad_()
    v0 = (torch.rand(2, 19) * 0.3).requires_grad_()
    grad_s, grad_v = torch.randn(6, 2, 19), torch.randn(2, 19)

    def loss():
        spikes, v_last = multistep(x, v0, p)
        return (spikes * grad_s).sum() + (v_last * grad_v).sum()

    once = torch.autograd.grad(loss(), (x, v0))
    retained = loss()
    first = torch.autograd.grad(retained, (x, v0), retain_graph=True)
    second = torch.autograd.grad(retained, (x, v0))
    for a, b, c in zip(once, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)


# Custom surrogates written the ways a SurrogateFunction subclass may write its derivative,
# each with the formula of a built-in (so numpy_bptt above is the reference).
class _RectByDerivative(surrogate.SurrogateFunction):
    """``derivative(x)`` overridden without an ``inplace`` flag, returning a new tensor."""

    def primitive(self, x):
        return torch.clamp(x * self.alpha + 0.5, 0.0, 1.0)

    def derivative(self, x):
        return (x.abs() < 0.5 / self.alpha).to(x.dtype) * self.alpha


class _ATanIgnoringInplace(surrogate.SurrogateFunction):
    """``derivative(x, inplace)`` overridden, ignoring ``inplace`` (a new tensor)."""

    def primitive(self, x):
        return torch.atan(x * (math.pi / 2 * self.alpha)) / math.pi + 0.5

    def derivative(self, x, inplace=False):
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x) ** 2)


class _SigmoidOutOfPlace(surrogate.SurrogateFunction):
    """``_derivative_`` that returns a new tensor instead of overwriting ``x``."""

    def primitive(self, x):
        return torch.sigmoid(x * self.alpha)

    def _derivative_(self, x):
        s = torch.sigmoid(self.alpha * x)
        return self.alpha * s * (1 - s)


CUSTOM = {"Rect": _RectByDerivative, "ATan": _ATanIgnoringInplace, "Sigmoid": _SigmoidOutOfPlace}


@pytest.mark.parametrize("sg_name", list(CUSTOM))
@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset", list(dict.fromkeys(c[:4] for c in CONFIGS)))
def test_multistep_gradients_with_custom_surrogate_derivatives(kind, decay_input, v_reset, detach_reset, sg_name):
    _assert_multistep_matches_numpy(CUSTOM[sg_name](1.5), sg_name, kind, decay_input, v_reset, detach_reset)


@pytest.mark.parametrize("kind,decay_input,v_reset,detach_reset,sg_name", CONFIGS[::5])
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_non_spiking_surrogate_multistep_equals_single_steps(kind, decay_input, v_reset, detach_reset, sg_name,
                                                             store_v_seq):
    # spiking=False: the "spikes" are the smooth primitive, as in T single steps (and SpikingJelly).
    p = NeuronParams(kind, 0.8, v_reset, detach_reset, getattr(surrogate, sg_name)(spiking=False), 2.5, decay_input)
    x = (torch.rand(6, 2, 5, dtype=torch.float64) * 1.5).requires_grad_()
    v0 = (torch.rand(2, 5, dtype=torch.float64) * 0.3).requires_grad_()
    out_m, v_m = multistep(x, v0, p, store_v_seq)
    v, outs, vs = v0, [], []
    for t in range(6):
        s, v = step(x[t], v, p)
        outs.append(s)
        vs.append(v)
    out_s, v_s = torch.stack(outs), (torch.stack(vs) if store_v_seq else v)
    assert torch.equal(out_m, out_s) and torch.equal(v_m, v_s)
    assert not torch.equal(out_m, (out_m >= 0.5).to(out_m))  # not 0/1 spikes
    g = torch.randn_like(out_m)
    grads_m = torch.autograd.grad((out_m * g).sum() + v_m.sum(), (x, v0))
    grads_s = torch.autograd.grad((out_s * g).sum() + v_s.sum(), (x, v0))
    for a, b in zip(grads_m, grads_s):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        assert torch.equal(multistep(x, 0.0, p, store_v_seq)[0], multistep(x, torch.zeros_like(v0), p)[0])


@pytest.mark.parametrize("grad", [False, True])
def test_multistep_of_an_empty_sequence(grad):
    p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid())
    x = torch.zeros(0, 2, 3, requires_grad=grad)
    v0 = torch.full((2, 3), 0.25)
    spikes, v = multistep(x, v0, p)
    assert spikes.shape == (0, 2, 3) and torch.equal(v, v0)
    if grad:
        spikes.sum().backward()
        assert x.grad.shape == (0, 2, 3)
