"""Fused LIF kernels on GPU: time and achieved bandwidth against the device's copy bandwidth.

Run: ``python benchmarks/gpu/bench_neuron.py [--out benchmarks/gpu/results.md] [--quick]``
(``benchmarks/gpu/run.sh`` runs the GPU tests and this). For T in {4, 16, 64},
N in {2^20, 2^24}, float32 and float16, it times a multi-step ``LIFNode`` (tau=2,
hard reset to 0, Sigmoid surrogate) forward (training forward: ``h_seq`` saved) and
forward+backward, for snnkit ``backend="cupy"``, snnkit ``backend="torch"`` and, when
installed, SpikingJelly's ``LIFNode`` with ``backend="cupy"`` / ``"triton"`` (or its
default backend when it has no ``backend`` argument), all in the same run.

Bandwidth counts the bytes a fused kernel must move, ``e`` bytes an element:
forward ``(3T + 2) N e`` (read x, write spike and h, read v0, write v),
backward ``(3T + 2) N e`` (read grad_spike and h, write grad_x, read grad_v,
write grad_v0). The copy bandwidth is ``2 * bytes / time`` of a 1 GiB
device-to-device ``copy_``. Times are medians of CUDA-event-timed repeats.
"""
import argparse
import datetime
import os
import statistics
import sys

import torch

from snnkit import neuron, surrogate
from snnkit.neuron._cuda import ops
from snnkit.neuron._reference import NeuronParams

TS = (4, 16, 64)
NS = (1 << 20, 1 << 24)
DTYPES = (torch.float32, torch.float16)


def cuda_time_ms(fn, repeat=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs():
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), repeat=20)
    return 2 * src.numel() * 4 / ms / 1e6


def _sj_nodes():
    """{label: factory} for SpikingJelly LIF nodes, or {label: reason} when unavailable."""
    try:
        from importlib.metadata import version as _version

        from spikingjelly.activation_based import neuron as sj_neuron

        version = _version("spikingjelly")
    except Exception as e:  # noqa: BLE001 - optional peer
        return {"SpikingJelly": f"not installed ({type(e).__name__})"}
    out = {}
    for backend in ("cupy", "triton"):
        label = f"SJ {backend}"
        try:
            sj_neuron.LIFNode(step_mode="m", backend=backend)
            out[label] = lambda b=backend: sj_neuron.LIFNode(step_mode="m", backend=b)
        except TypeError:
            out[label] = f"SpikingJelly {version} has no backend argument"
        except Exception as e:  # noqa: BLE001
            out[label] = f"unavailable: {type(e).__name__}: {str(e)[:60]}"
    if all(isinstance(v, str) for v in out.values()):
        out[f"SJ {version} default"] = lambda: sj_neuron.LIFNode(step_mode="m")
    return out


def kernels_only_ms(x, grad, launches=10):
    """(forward, backward) ms of the bare kernels, ``launches`` back to back (no node, no autograd)."""
    p = NeuronParams("lif", 1.0, 0.0, False, surrogate.Sigmoid(), 2.0, True)
    T, N = x.shape[0], x[0].numel()
    sc = ops.kernel_scalars(p)
    x, spike, h, grad_x = x.detach(), torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    v0, v_out, gv, gv0 = (torch.zeros_like(x[0]) for _ in range(4))
    fargs = (x, v0, spike, h, v_out, sc["v_threshold"], sc["v_reset"], sc["tau"], 0, T, N)
    bargs = (grad, gv, h, grad_x, gv0, sc["v_threshold"], sc["v_reset"], sc["tau"], sc["leak"], 0, T, N)
    spec = ops.launch_spec(ops.spec_for(p, x.dtype), N, fargs[:5] + bargs[:5])
    fwd = (*ops._forward_kernel(spec), N // spec.vec, fargs)
    bwd = (*ops._backward_kernel(spec), N // spec.vec, bargs)
    times = []
    for kernel in (fwd, bwd):
        times.append(cuda_time_ms(lambda k=kernel: [ops._cupy_launcher(*k) for _ in range(launches)]) / launches)
    return times


def scalar_kernels_ms(x, grad):
    """fwd+bwd ms of the one-neuron-per-thread kernels (vectorisation switched off for the call)."""
    vectorising = ops.launch_spec
    ops.launch_spec = lambda spec, n, tensors: spec
    try:
        return time_node(neuron.LIFNode(step_mode="m", backend="cupy"), x, grad, with_forward=False)[1]
    finally:
        ops.launch_spec = vectorising


def time_node(node, x, grad, with_forward=True):
    """(forward ms or None, forward+backward ms) of a multi-step node, reset before each call."""

    def fwd():
        node.reset()
        node(x)

    def fwd_bwd():
        node.reset()
        x.grad = None
        node(x).backward(grad)

    return (cuda_time_ms(fwd) if with_forward else None), cuda_time_ms(fwd_bwd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.environ.get("SNNKIT_BENCH_RESULTS", os.path.join("benchmarks", "gpu", "results.md"))
    ap.add_argument("--out", default=default_out, help="results file (markdown)")
    ap.add_argument("--quick", action="store_true", help="N = 2^20 only")
    ap.add_argument("--dtype", choices=["float32", "float16"], help="one dtype only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_neuron: no CUDA device; nothing to measure", file=sys.stderr)
        return 2

    copy_bw = copy_bandwidth_gbs()
    peers = _sj_nodes()
    runnable = {k: v for k, v in peers.items() if not isinstance(v, str)}
    header = ["dtype", "T", "N", "cupy fwd ms", "fwd GB/s (% copy)", "cupy fwd+bwd ms", "fwd+bwd GB/s (% copy)",
              "1 neuron/thread fwd+bwd ms", "kernel-only fwd GB/s (% copy)", "kernel-only bwd GB/s (% copy)",
              "torch fwd+bwd ms", "torch / cupy"]  # fmt: skip
    header += [f"{k} fwd+bwd ms" for k in runnable] + [f"{k} / cupy" for k in runnable]
    rows = []
    for dtype in [d for d in DTYPES if args.dtype in (None, str(d).replace("torch.", ""))]:
        e = torch.finfo(dtype).bits // 8
        for T in TS:
            for N in NS[:1] if args.quick else NS:
                x = torch.rand(T, N, device="cuda", dtype=dtype).mul_(1.5).requires_grad_()
                grad = torch.randn(T, N, device="cuda", dtype=dtype)
                fwd_bytes = (3 * T + 2) * N * e
                node = neuron.LIFNode(step_mode="m", backend="cupy")
                f_ms, fb_ms = time_node(node, x, grad)
                fwd_bw, fb_bw = fwd_bytes / f_ms / 1e6, 2 * fwd_bytes / fb_ms / 1e6
                scalar_ms = scalar_kernels_ms(x, grad)
                kf_bw, kb_bw = (fwd_bytes / ms / 1e6 for ms in kernels_only_ms(x, grad))
                tnode = neuron.LIFNode(step_mode="m", backend="torch")
                _, t_ms = time_node(tnode, x, grad, with_forward=False)
                row = [str(dtype).replace("torch.", ""), T, f"2^{N.bit_length() - 1}", f"{f_ms:.3f}",
                       f"{fwd_bw:.0f} ({100 * fwd_bw / copy_bw:.0f}%)", f"{fb_ms:.3f}",
                       f"{fb_bw:.0f} ({100 * fb_bw / copy_bw:.0f}%)", f"{scalar_ms:.3f}",
                       f"{kf_bw:.0f} ({100 * kf_bw / copy_bw:.0f}%)", f"{kb_bw:.0f} ({100 * kb_bw / copy_bw:.0f}%)", f"{t_ms:.3f}",
                       f"{t_ms / fb_ms:.1f}x"]  # fmt: skip
                peer_ms = []
                for factory in runnable.values():
                    try:
                        sj = factory().to(device="cuda", dtype=dtype)
                        peer_ms.append(time_node(sj, x, grad, with_forward=False)[1])
                    except Exception as err:  # noqa: BLE001 - report, keep going
                        peer_ms.append(f"failed: {type(err).__name__}")
                row += [f"{m:.3f}" if isinstance(m, float) else m for m in peer_ms]
                row += [f"{m / fb_ms:.2f}x" if isinstance(m, float) else "-" for m in peer_ms]
                rows.append(row)
                print(" | ".join(map(str, row)), flush=True)
                del x, grad, node, tnode
                torch.cuda.empty_cache()

    lines = [
        f"# snnkit fused LIF kernels: GPU benchmark ({datetime.date.today()})",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"measured device copy bandwidth {copy_bw:.0f} GB/s (read + write).",
        "",
        "LIFNode(tau=2, v_reset=0, Sigmoid), step_mode='m'; medians of 10 CUDA-event-timed runs,",
        "each a whole node call (reset, launch overhead included). 'cupy' runs the vectorised kernels",
        "(16-byte accesses: 4 float32 or 8 float16 neurons a thread); '1 neuron/thread' the scalar ones.",
        "'kernel-only': the forward or backward kernel alone, 10 launches back to back (no node, no autograd).",
        "GB/s counts the bytes a fused kernel must move: forward (3T+2)N, backward (3T+2)N elements.",
        "'x / cupy' columns: that implementation's time divided by snnkit cupy's (above 1: snnkit faster).",
        "",
    ]
    lines += [f"* {k}: {v}" for k, v in peers.items() if isinstance(v, str)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"results appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
