import pytest
import torch
import torch.nn as nn

from snnkit import functional, layer
from snnkit._context import gc_1st_forward, gc_recompute


@pytest.mark.parametrize(
    "ours,theirs,shape",
    [
        (layer.Linear(6, 3), nn.Linear(6, 3), (4, 2, 6)),
        (layer.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1), (4, 2, 2, 5, 5)),
        (layer.Conv1d(2, 3, 3), nn.Conv1d(2, 3, 3), (4, 2, 2, 7)),
        (layer.MaxPool2d(2), nn.MaxPool2d(2), (4, 2, 3, 6, 6)),
        (layer.AvgPool2d(2), nn.AvgPool2d(2), (4, 2, 3, 6, 6)),
        (layer.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1), (4, 2, 3, 6, 6)),
        (layer.Flatten(), nn.Flatten(), (4, 2, 3, 2, 2)),
        (layer.BatchNorm2d(3), nn.BatchNorm2d(3), (4, 2, 3, 5, 5)),
        (layer.BatchNorm1d(3), nn.BatchNorm1d(3), (4, 2, 3)),
    ],
)
def test_multi_step_equals_flattened_torch_layer(ours, theirs, shape):
    theirs.load_state_dict(ours.state_dict())
    ours.step_mode = "m"
    x = torch.randn(shape)
    expected = theirs(x.flatten(0, 1))
    out = ours(x)
    assert out.shape[:2] == shape[:2]
    torch.testing.assert_close(out.flatten(0, 1), expected)
    ours.step_mode = "s"
    torch.testing.assert_close(ours(x[0]), theirs(x[0]))


def _bits(t):
    """Bit patterns, so that -0.0 and +0.0 (and NaN payloads) count as different."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16 if t.element_size() == 2 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,shape", [(2, (5, 3, 8, 8)), (2, (2, 3, 7, 9)), (3, (2, 4, 10, 8)), ((2, 3), (3, 6, 7)), (2, (2, 1, 2, 2))])
def test_max_pool_fast_path_is_bit_identical_to_torch(kernel, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    # spikes, ties of -0.0 against +0.0 in both orders, NaN and infinities
    pick = torch.randint(0, 7, shape, generator=gen)
    values = torch.tensor([0.0, -0.0, 1.0, 0.5, float("nan"), float("inf"), -float("inf")])
    x = values[pick].to(dtype)
    pool = layer.MaxPool2d(kernel)
    assert pool._windows(x) is not None  # the fast path is taken
    with torch.no_grad():
        out = pool(x)
    assert torch.equal(_bits(out), _bits(nn.functional.max_pool2d(x, kernel)))


@pytest.mark.parametrize(
    "kwargs", [dict(kernel_size=2, stride=1), dict(kernel_size=2, padding=1), dict(kernel_size=2, ceil_mode=True),
               dict(kernel_size=2, dilation=2), dict(kernel_size=1), dict(kernel_size=2, return_indices=True)]
)
def test_max_pool_other_configurations_use_torch(kwargs):
    x = torch.randn(2, 3, 7, 7)
    pool = layer.MaxPool2d(**kwargs)
    assert pool._windows(x) is None
    out, expected = pool(x), nn.MaxPool2d(**kwargs)(x)
    if isinstance(out, tuple):
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    else:
        assert torch.equal(out, expected)


# (our pool, torch's function, whether it saves anything: indices for max, nothing for average)
POOLS = {
    "max": (lambda k: layer.MaxPool2d(k), lambda x, k: nn.functional.max_pool2d(x, k), True),
    "avg": (lambda k: layer.AvgPool2d(k), lambda x, k: nn.functional.avg_pool2d(x, k), False),
    "avg-divisor": (lambda k: layer.AvgPool2d(k, divisor_override=3),
                    lambda x, k: nn.functional.avg_pool2d(x, k, divisor_override=3), False),
}


@pytest.mark.parametrize("pool_kind", list(POOLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,shape", [(2, (5, 3, 8, 8)), (2, (2, 3, 7, 9)), (3, (2, 4, 10, 8)), ((2, 3), (3, 6, 7))])
def test_pool_gradient_keeps_no_input_and_is_bit_identical_to_torch(kernel, shape, dtype, pool_kind):
    make, reference, saves = POOLS[pool_kind]
    gen = torch.Generator().manual_seed(1)
    values = torch.tensor([0.0, -0.0, 1.0, 0.5, float("nan"), float("inf"), -float("inf")])
    x = values[torch.randint(0, 7, shape, generator=gen)].to(dtype).requires_grad_()
    pool = make(kernel)
    assert pool._windows(x) is not None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pool(x)
    assert bool(saved) == saves and not any(t.is_floating_point() for t in saved)  # never the input
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    grad.view(-1)[::5] = -0.0  # torch adds the gradient to zeros: -0.0 lands as +0.0
    grad.view(-1)[1] = float("nan")
    (got,) = torch.autograd.grad(out, x, grad)
    xr = x.detach().requires_grad_()
    expected_out = reference(xr, kernel)
    (expected,) = torch.autograd.grad(expected_out, xr, grad)
    # the same bits, apart from NaN payloads (bfloat16 arithmetic may make a different NaN)
    for a, b in ((out, expected_out), (got, expected)):
        nan = a.isnan()
        assert torch.equal(nan, b.isnan())
        assert torch.equal(_bits(a.masked_fill(nan, 0)), _bits(b.masked_fill(nan, 0)))


@pytest.mark.parametrize("pool_kind", list(POOLS))
def test_pool_gradient_in_multi_step_and_deterministic_mode(pool_kind):
    make, reference, _ = POOLS[pool_kind]
    x = (torch.rand(4, 2, 3, 6, 6) < 0.3).float().requires_grad_()  # many ties
    pool = make(2)
    pool.step_mode = "m"
    g = torch.randn(4, 2, 3, 3, 3)
    xr = x.detach().flatten(0, 1).requires_grad_()
    (expected,) = torch.autograd.grad(reference(xr, 2), xr, g.flatten(0, 1))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (got,) = torch.autograd.grad(pool(x), x, g)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(got.flatten(0, 1), expected)
    with torch.no_grad():
        assert torch.equal(pool(x), reference(xr, 2).view(4, 2, 3, 3, 3))


@pytest.mark.parametrize("pool_kind", list(POOLS))
def test_pool_second_order_gradients(pool_kind):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    pool = POOLS[pool_kind][0](2)
    assert pool._windows(x) is not None
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [(2, 1), (3, 1), (1, 2), 2, 3])
@pytest.mark.parametrize("width", [8, 33])  # 33: a row longer than one vector, and a partial one
def test_max_pool_fast_path_ties_and_nan_bits_match_torch(kernel, dtype, width):
    # Rows of -0.0 above rows of +0.0 (and the other way), NaN of either sign, anywhere in a window:
    # the earlier zero wins a tie and the last NaN of a window comes out, sign and payload included.
    gen = torch.Generator().manual_seed(2)
    values = torch.tensor([0.0, -0.0, 1.0, -float("inf"), float("nan"), -float("nan")])
    x = torch.zeros(2, 3, 6, width)
    x[:, 0, 0::2], x[:, 0, 1::2] = -0.0, 0.0
    x[:, 1, 0::2], x[:, 1, 1::2] = 0.0, -0.0
    x[:, 2] = values[torch.randint(0, 6, (2, 6, width), generator=gen)]
    x = x.to(dtype)
    pool = layer.MaxPool2d(kernel)
    assert pool._windows(x) is not None
    with torch.no_grad():
        out = pool(x)
    assert torch.equal(_bits(out), _bits(nn.MaxPool2d(kernel)(x)))
    assert out[:, 2].isnan().any() and torch.signbit(x[:, 2][x[:, 2].isnan()]).any()  # NaN of both signs occur


@pytest.mark.parametrize(
    "kwargs", [dict(kernel_size=2, stride=1), dict(kernel_size=2, padding=1), dict(kernel_size=2, ceil_mode=True),
               dict(kernel_size=1), dict(kernel_size=2, padding=1, count_include_pad=False)]
)
def test_avg_pool_other_configurations_use_torch(kwargs):
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    pool = layer.AvgPool2d(**kwargs)
    assert pool._windows(x) is None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pool(x)
    assert saved  # torch's pool, which keeps its input
    assert torch.equal(out, nn.AvgPool2d(**kwargs)(x))


def test_seq_to_ann_container():
    conv = nn.Conv2d(1, 2, 3)
    f = layer.SeqToANNContainer(conv)
    x = torch.randn(3, 2, 1, 5, 5)
    torch.testing.assert_close(f(x), conv(x.flatten(0, 1)).view(3, 2, 2, 3, 3))


def test_multi_step_shape_errors():
    with pytest.raises(ValueError, match="Conv2d in step_mode='m' expects a 5-D sequence"):
        layer.Conv2d(1, 1, 3, step_mode="m")(torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="step_mode must be"):
        layer.Linear(2, 2, step_mode="x")


def test_batchnorm_skips_stats_in_gc_recompute_only():
    bn = layer.BatchNorm2d(3, step_mode="m")
    x = torch.randn(2, 4, 3, 4, 4)
    with torch.no_grad(), gc_1st_forward():
        y_first = bn(x)
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, torch.zeros(3))
    stats = bn.running_mean.clone(), bn.running_var.clone()
    with gc_recompute():
        y = bn(x)
    assert torch.equal(y, y_first)  # the same batch statistics
    assert bn.num_batches_tracked.item() == 1 and torch.equal(bn.running_mean, stats[0])
    assert torch.equal(bn.running_var, stats[1])


def test_dropout_mask_shared_over_time_until_reset():
    d = layer.Dropout(0.5, step_mode="m")
    y1 = d(torch.ones(4, 3, 50))
    assert all(torch.equal(y1[0], y1[t]) for t in range(4))
    assert set(y1.unique().tolist()) <= {0.0, 2.0}
    y2 = d(torch.ones(4, 3, 50))
    assert torch.equal(y1, y2)
    functional.reset_net(d)
    assert d.mask is None
    d.eval()
    assert torch.equal(d(torch.ones(4, 3, 50)), torch.ones(4, 3, 50))
    with pytest.raises(ValueError, match="Dropout probability"):
        layer.Dropout(1.0)


def test_dropout_takes_torch_inplace_argument_keyword_only():
    with pytest.raises(TypeError):
        layer.Dropout(0.5, "m", True)  # positional: SpikingJelly's (p, step_mode) order stays
    d = layer.Dropout(0.5, "m", inplace=True)
    x = torch.ones(3, 2, 4)
    y = d(x)
    assert d.step_mode == "m" and torch.equal(x, torch.ones(3, 2, 4))  # out of place either way
    assert torch.equal(y[0], y[2])


def test_multi_step_max_pool_with_indices_returns_both_as_sequences():
    x = torch.randn(3, 2, 1, 4, 4)
    out, idx = layer.MaxPool2d(2, return_indices=True, step_mode="m")(x)
    ref_out, ref_idx = nn.MaxPool2d(2, return_indices=True)(x.flatten(0, 1))
    assert out.shape == (3, 2, 1, 2, 2) and torch.equal(out.flatten(0, 1), ref_out)
    assert torch.equal(idx.flatten(0, 1), ref_idx)
