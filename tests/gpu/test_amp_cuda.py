"""fp16 autocast with GradScaler on CUDA inside GC segments and TC chunks (see tests/scale/test_amp.py)."""
import pytest
import torch

from snnkit import functional

from ..scale._nets import data, make_net, run_seq

pytestmark = pytest.mark.cuda


def _scaled_grads(net, x, t, step_mode="m", cache_enabled=True):
    net.cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.autocast("cuda", dtype=torch.float16, cache_enabled=cache_enabled):
        y = run_seq(net, x.cuda(), step_mode)
        loss = ((y.float().mean(0) - t.cuda()) ** 2).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    functional.reset_net(net)
    return y.detach(), grads, [p.detach().clone() for p in net.parameters()]


def test_fp16_gradscaler_gc_equals_plain():
    x, t = data(T=6, N=5)
    y_ref, g_ref, w_ref = _scaled_grads(make_net("plain"), x, t)
    y, g, w = _scaled_grads(make_net("gc"), x, t)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g + w, g_ref + w_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind,step_mode", [("gc", "s"), ("tc", "m")])
def test_fp16_gradscaler_segments_called_several_times(kind, step_mode):
    """Segments called several times: equal to fp16 rounding (why: tests/scale/test_amp.py)."""
    x, t = data(T=6, N=5)
    y_ref, g_ref, _ = _scaled_grads(make_net("plain", step_mode=step_mode), x, t, step_mode)
    y, g, _ = _scaled_grads(make_net(kind, step_mode=step_mode, n_chunk=3), x, t, step_mode)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2**-8 * float(b.abs().max()))
