"""Mixed precision: CPU bf16 ``torch.autocast`` inside GC segments and TC chunks.

The recompute replays the autocast state of the first forward, so a GC net under
autocast computes exactly what the plain net computes under autocast (same ops,
same dtypes, same order): outputs and gradients are compared bit for bit.
"""
import pytest
import torch

from snnkit import functional

from ._nets import data, make_net, run_seq


def _autocast_grads(net, x, t, step_mode, autocast=True, cache_enabled=True, chunks=1):
    """Loss gradients under CPU bf16 autocast; ``chunks`` feeds the sequence in time chunks."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=cache_enabled):
        y = torch.cat([run_seq(net, xc, step_mode) for xc in torch.tensor_split(x, chunks)])
        loss = ((y.float().mean(0) - t) ** 2).mean()
    loss.backward()
    out = (y.detach(), loss.detach(), [p.grad for p in net.parameters()])
    functional.reset_net(net)
    return out


def _assert_equal(got, ref, what):
    for i, (a, b) in enumerate(zip(ref, got)):
        assert b.dtype == torch.float32  # parameter gradients stay in the parameter dtype
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{what} {i}")


def test_bf16_autocast_gc_equals_plain_autocast():
    """One call per segment: bit for bit the plain autocast run."""
    x, t = data(T=6, N=5)
    y_ref, loss_ref, g_ref = _autocast_grads(make_net("plain"), x, t, "m")
    y, loss, g = _autocast_grads(make_net("gc"), x, t, "m")
    assert y_ref.dtype == torch.bfloat16 and y.dtype == torch.bfloat16  # autocast really ran
    assert float(y_ref.abs().mean()) > 0.0
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    _assert_equal(g, g_ref, "grad")


@pytest.mark.parametrize("kind,step_mode,chunks", [("gc", "s", 1), ("tc", "m", 3)])
def test_bf16_autocast_segments_called_several_times(kind, step_mode, chunks):
    """Segments called several times (T single steps, TC chunks) under autocast.

    Autocast casts a parameter to bf16 once per autocast region and caches the cast,
    so a plain run sums the bf16 gradients of all uses before the cast back to fp32.
    Each GC segment call recomputes its own cast, so its gradients are summed in fp32:
    the plain run with ``cache_enabled=False``. Outputs are bit for bit equal either
    way; the parameters inside GC segments match the uncached plain run (fed in the
    same time chunks) exactly, the plain head after them the cached plain run, and the
    two differ by bf16 rounding only.
    """
    x, t = data(T=6, N=5)
    net = make_net(kind, step_mode=step_mode, n_chunk=3)
    y, _, g = _autocast_grads(net, x, t, step_mode)
    y_c, _, g_cached = _autocast_grads(make_net("plain", step_mode=step_mode), x, t, step_mode)
    y_u, _, g_uncached = _autocast_grads(
        make_net("plain", step_mode=step_mode), x, t, step_mode, cache_enabled=False, chunks=chunks
    )
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    n_gc = sum(p.numel() > 0 for p in net[:-1].parameters())  # parameters inside the GC segments
    _assert_equal(g[:n_gc], g_uncached[:n_gc], "segment grad")
    _assert_equal(g[n_gc:], g_cached[n_gc:], "head grad")
    for a, b in zip(g, g_cached):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=2**-6 * scale)


def test_autocast_off_in_backward_still_replays_bf16():
    """Backward runs outside the autocast region; the recompute must still run in bf16."""
    x, t = data(T=4, N=5)
    _, _, g_amp = _autocast_grads(make_net("gc"), x, t, "m")
    _, _, g_fp32 = _autocast_grads(make_net("gc"), x, t, "m", autocast=False)
    _, _, g_ref = _autocast_grads(make_net("plain"), x, t, "m")
    for a, b, c in zip(g_ref, g_amp, g_fp32):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert any(not torch.equal(a, c) for a, c in zip(g_amp, g_fp32))  # bf16 really differs from fp32
