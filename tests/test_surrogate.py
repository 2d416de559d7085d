import pytest
import torch

from snnkit import surrogate

ALL = [surrogate.Sigmoid, surrogate.ATan, surrogate.PiecewiseQuadratic, surrogate.Rect]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_derivative_matches_finite_differences_of_primitive(cls, alpha):
    sg = cls(alpha=alpha)
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    # Stay away from the kinks of the piecewise surrogates.
    kinks = torch.tensor([1 / alpha, 0.5 / alpha, 0.0], dtype=torch.float64)
    x = x[(x.abs().unsqueeze(1) - kinks).abs().min(1).values > 1e-3]
    eps = 1e-6
    fd = (sg.primitive(x + eps) - sg.primitive(x - eps)) / (2 * eps)
    torch.testing.assert_close(sg.derivative(x), fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_spiking_forward_is_heaviside_and_backward_is_derivative(cls):
    sg = cls()
    x = torch.tensor([-2.0, -0.1, 0.0, 0.1, 2.0], dtype=torch.float64, requires_grad=True)
    y = sg(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    torch.testing.assert_close(x.grad, sg.derivative(x.detach()))


@pytest.mark.parametrize("cls", ALL)
def test_non_spiking_mode_is_primitive_and_inplace_derivative(cls):
    sg = cls(spiking=False)
    x = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(sg(x), sg.primitive(x))
    buf = x.clone()
    out = sg.derivative(buf, inplace=True)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, sg.derivative(x))


@pytest.mark.parametrize("cls", ALL)
def test_cuda_derivative_text_carries_alpha(cls):
    code = cls(alpha=3.0).cuda_derivative("x", "y")
    assert "y =" in code and "x" in code
    assert code != cls(alpha=5.0).cuda_derivative("x", "y")
    assert cls(alpha=3.0).key == (cls.__name__, 3.0)


def test_sigmoid_and_atan_values_match_known_formulas():
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(surrogate.Sigmoid(4.0).derivative(x)[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(surrogate.ATan(2.0).derivative(x)[0], torch.tensor(1.0, dtype=torch.float64))
    assert surrogate.Rect(1.0).derivative(torch.tensor([0.49, 0.5])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "2"])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        surrogate.Sigmoid(alpha=alpha)


def test_inplace_derivative_lands_in_x_for_an_out_of_place_derivative_():
    class OutOfPlace(surrogate.SurrogateFunction):  # the Sigmoid formula, returning a new tensor
        def _derivative_(self, x):
            s = torch.sigmoid(self.alpha * x)
            return self.alpha * s * (1 - s)

    x = torch.randn(20, dtype=torch.float64)
    buf = x.clone()
    out = OutOfPlace(4.0).derivative(buf, inplace=True)
    assert out is buf
    torch.testing.assert_close(buf, surrogate.Sigmoid(4.0).derivative(x))


def test_numpy_scalar_alpha():
    np = pytest.importorskip("numpy")
    sg = surrogate.ATan(alpha=np.float32(3.0))
    assert type(sg.alpha) is float and sg.key == surrogate.ATan(3.0).key
