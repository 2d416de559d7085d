"""Tutorial 6: the CuPy backend (the GPU part runs only where CUDA and CuPy are available)."""
# %% availability
import time

import torch

from snnkit import functional, neuron

try:
    neuron.LIFNode(step_mode="m", backend="cupy")
    has_cupy = True
except RuntimeError as err:  # no CuPy, or no CUDA device: the message says which
    print(f"CuPy backend not available here: {err}")
    assert "CuPy" in str(err) or "CUDA" in str(err)
    has_cupy = False
# %% speed
def time_fwd_bwd(node, x_seq, repeat=50):
    """Milliseconds per forward + backward of a multi-step neuron."""
    for _ in range(5):  # warm-up (the first cupy call compiles the kernels)
        node(x_seq).sum().backward()
        functional.reset_net(node)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        node(x_seq).sum().backward()
        functional.reset_net(node)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / repeat


if has_cupy:
    for dtype in (torch.float32, torch.float16):
        x_seq = torch.randn(32, 64, 4096, device="cuda", dtype=dtype, requires_grad=True)
        ms = {}
        for backend in ("torch", "cupy"):
            lif = neuron.LIFNode(step_mode="m", backend=backend)
            ms[backend] = time_fwd_bwd(lif, x_seq)
        print(f"{dtype}: torch {ms['torch']:.3f} ms, cupy {ms['cupy']:.3f} ms, "
              f"{ms['torch'] / ms['cupy']:.1f}x faster")
# %% a whole network
if has_cupy:
    net = torch.nn.Sequential(torch.nn.Linear(128, 256), neuron.LIFNode()).cuda()
    functional.set_step_mode(net, "m")
    functional.set_backend(net, "cupy")  # every neuron; raises the same clear error without CuPy
    with torch.autocast("cuda", dtype=torch.float16):
        out = net(torch.rand(16, 32, 128, device="cuda"))
    out.sum().backward()
