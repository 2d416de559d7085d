"""Train a spiking CNN on scikit-learn's bundled 8x8 digits (real data, offline).

Run ``python -m snnkit.examples.digits`` (or the console script ``snnkit-demo``);
``--help`` lists the options. The network is three Conv-BN-LIF blocks in
multi-step mode (input ``[T, N, 1, 8, 8]``, time first) and a linear read-out
whose output is averaged over time. ``--memopt layer`` wraps every block in a
:class:`~snnkit.memopt.GCContainer` (:func:`~snnkit.memopt.apply_gc`),
``--memopt auto`` lets :func:`~snnkit.memopt.memory_optimization` plan it, and
``--compare`` trains all three and prints accuracy, time per step and the peak
training memory measured by :class:`~snnkit.memopt.MemoryTracker`.

Several processes: ``torchrun --nproc_per_node 2 -m snnkit.examples.digits``
splits every batch across the ranks and trains with DistributedDataParallel
(gloo on CPU, NCCL on CUDA); rank 0 reports.

Needs the ``examples`` extra (scikit-learn, tqdm, matplotlib); tqdm and
matplotlib are optional (no bar, no plot without them).

Example:
    >>> from snnkit.examples.digits import SpikingCNN
    >>> import torch
    >>> net = SpikingCNN(width=4)
    >>> net(torch.rand(2, 3, 1, 8, 8)).shape  # [T, N, 1, 8, 8] -> [T, N, 10]
    torch.Size([2, 3, 10])
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional, layer, neuron, surrogate

__all__ = ["ConvBNLIF", "SpikingCNN", "load_digits", "train", "main"]

MODES = ("off", "layer", "auto")


class ConvBNLIF(nn.Sequential):
    """One block: 3x3 convolution, batch norm and LIF neurons, all in ``"m"`` mode.

    This is the block type given to :func:`~snnkit.memopt.apply_gc` and
    :func:`~snnkit.memopt.memory_optimization`.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        backend: Neuron backend, ``"torch"`` or ``"cupy"``.
    """

    def __init__(self, in_channels: int, out_channels: int, backend: str = "torch"):
        super().__init__(
            layer.Conv2d(in_channels, out_channels, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(out_channels, step_mode="m"),
            neuron.LIFNode(tau=2.0, detach_reset=True, surrogate_function=surrogate.ATan(), step_mode="m",
                           backend=backend),
        )


class SpikingCNN(nn.Sequential):
    """``[T, N, 1, 8, 8]`` -> logits ``[T, N, 10]``: three :class:`ConvBNLIF` blocks and a linear read-out.

    Args:
        width: Channels of the first two blocks (the third has ``2 * width``).
        backend: Neuron backend, ``"torch"`` or ``"cupy"``.
    """

    def __init__(self, width: int = 16, backend: str = "torch"):
        super().__init__(
            ConvBNLIF(1, width, backend),
            ConvBNLIF(width, width, backend),
            layer.MaxPool2d(2, step_mode="m"),
            ConvBNLIF(width, 2 * width, backend),
            layer.MaxPool2d(2, step_mode="m"),
            layer.Flatten(step_mode="m"),
            layer.Linear(2 * width * 4, 10, step_mode="m"),
        )


def load_digits(test_fraction: float = 0.2):
    """The 1797 digits of scikit-learn, scaled to ``[0, 1]``, in a fixed stratified split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images are ``[N, 1, 8, 8]`` float32.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    i_train, i_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=0, stratify=data.target
    )
    return x[i_train], y[i_train], x[i_test], y[i_test]


def _encode(x: torch.Tensor, T: int, encoding: str) -> torch.Tensor:
    """``[N, 1, 8, 8]`` -> ``[T, N, 1, 8, 8]``: repeated (direct) or Bernoulli spikes (poisson)."""
    x_seq = x.unsqueeze(0).expand(T, *x.shape)
    if encoding == "poisson":
        return torch.bernoulli(x_seq)
    return x_seq.contiguous()


def _progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr, or a minimal stand-in when tqdm is missing."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, disable=True if quiet else None, file=sys.stderr)
    except ImportError:
        return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _apply_memopt(net: nn.Module, mode: str, dummy: torch.Tensor):
    """Turn on memopt ``mode`` for ``net``; returns the net and a summary text (or ``None``)."""
    if mode == "off":
        return net, None
    from .. import memopt

    if mode == "layer":
        return memopt.apply_gc(net, (ConvBNLIF,), compress="auto", dummy_input=dummy), None
    # temporal=False: a temporal split would normalise BatchNorm per chunk of time steps
    net, summary = memopt.memory_optimization(net, (ConvBNLIF,), dummy, return_summary=True, temporal=False)
    return net, summary


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(y), 512):
        out = net(_encode(x[i:i + 512].to(args.device), args.T, args.encoding)).mean(0)
        correct += (out.argmax(1).cpu() == y[i:i + 512]).sum().item()
        functional.reset_net(net)
    return correct / len(y)


def _join_torchrun(args: argparse.Namespace) -> Tuple[int, int]:
    """Join the process group when launched by ``torchrun``; returns ``(rank, world_size)``.

    Each rank trains on its share of every batch and DDP averages the gradients, so
    the update equals a one-process step on the whole batch (BatchNorm statistics are
    per rank). CUDA ranks use NCCL and the GPU ``LOCAL_RANK``; CPU ranks use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train(args: argparse.Namespace, mode: str, data=None, rank: int = 0, world: int = 1) -> Dict:
    """Train one net with memopt ``mode`` and return its metrics.

    Args:
        args: Parsed options of :func:`main` (``T``, ``epochs``, ``batch_size``, ...).
        mode: ``"off"``, ``"layer"`` or ``"auto"``.
        data: ``load_digits()`` output (loaded when ``None``).
        rank, world: This process's rank and the number of processes (``torchrun``).

    Returns:
        A dict with ``memopt``, ``test_accuracy``, ``seconds`` (training and evaluation),
        ``step_seconds`` (mean wall time of a training step), ``peak_bytes`` (peak live
        tensor bytes of one training step), ``train_loss`` and ``test_accuracy_curve``
        (one value per epoch).
    """
    from ..memopt import MemoryTracker

    x_train, y_train, x_test, y_test = load_digits() if data is None else data
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    net = SpikingCNN(args.width, args.backend).to(device)
    dummy = _encode(x_train[: args.batch_size].to(device), args.T, args.encoding)
    net, summary = _apply_memopt(net, mode, dummy)
    functional.reset_net(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)

    def step(xb, yb):
        loss = F.cross_entropy(net(_encode(xb, args.T, args.encoding)).mean(0), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        functional.reset_net(net)
        return loss.item()

    losses, accs, step_times, peak, first_step = [], [], [], None, 0.0
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=gen)
        bar = _progress(steps_per_epoch, f"[{mode}] epoch {epoch + 1}/{args.epochs}", args.quiet)
        total = 0.0
        for i in range(0, len(y_train), args.batch_size):
            idx = order[i:i + args.batch_size][rank::world]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            t0 = time.perf_counter()
            if peak is None:  # measure the peak memory of the first full training step
                with MemoryTracker() as tracker:
                    loss = step(xb, yb)
                peak, first_step = tracker.peak_bytes, time.perf_counter() - t0
            else:
                loss = step(xb, yb)
                step_times.append(time.perf_counter() - t0)
            total += loss * len(idx) * world
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.close()
        losses.append(total / len(y_train))
        accs.append(_accuracy(net, x_test, y_test, args))
        if not args.quiet:
            print(f"[{mode}] epoch {epoch + 1}/{args.epochs}  train loss {losses[-1]:.4f}  "
                  f"test accuracy {100 * accs[-1]:.2f}%", flush=True)
    seconds = time.perf_counter() - t_start
    return {
        "memopt": mode,
        "test_accuracy": accs[-1],
        "seconds": round(seconds, 3),
        # the first step runs under the memory tracker: timed only when it is the only one
        "step_seconds": sum(step_times) / len(step_times) if step_times else first_step,
        "peak_bytes": int(peak),
        "train_loss": losses,
        "test_accuracy_curve": accs,
        "summary": None if summary is None else str(summary),
    }


def _plot(results: List[Dict], path: str) -> Optional[str]:
    """Loss/accuracy curves and the peak memory per mode, saved as a PNG; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc, ax_mem) = plt.subplots(1, 3, figsize=(12, 3.4))
    for r, style in zip(results, ("-o", "--s", ":^")):  # the modes overlap when GC is exact
        epochs = range(1, len(r["train_loss"]) + 1)
        ax_loss.plot(epochs, r["train_loss"], style, label=r["memopt"])
        ax_acc.plot(epochs, [100 * a for a in r["test_accuracy_curve"]], style, label=r["memopt"])
    ax_mem.bar([r["memopt"] for r in results], [r["peak_bytes"] / 2**20 for r in results], color="tab:green")
    ax_loss.set(title="train loss", xlabel="epoch")
    ax_acc.set(title="test accuracy (%)", xlabel="epoch")
    ax_mem.set(title="peak training memory (MiB)", xlabel="memopt")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(results: List[Dict]) -> str:
    base = results[0]["peak_bytes"]
    lines = [f"{'memopt':<7}{'test acc':>10}{'ms/step':>10}{'peak MiB':>11}{'vs off':>8}"]
    for r in results:
        lines.append(f"{r['memopt']:<7}{100 * r['test_accuracy']:>9.2f}%{1000 * r['step_seconds']:>10.1f}"
                     f"{r['peak_bytes'] / 2**20:>11.2f}{r['peak_bytes'] / base:>7.2f}x")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snnkit-demo",
        description="Train a spiking CNN (Conv-BN-LIF, multi-step) on scikit-learn's 8x8 digits.",
    )
    p.add_argument("--memopt", choices=MODES, default="off", help="gradient checkpointing: none, per block, planned")
    p.add_argument("--compare", action="store_true", help="train with off, layer and auto and print a table")
    p.add_argument("--backend", choices=("torch", "cupy"), default="torch", help="neuron backend")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--T", type=_positive_int, default=4, help="time steps per sample")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--width", type=_positive_int, default=16, help="channels of the first blocks")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="peak learning rate (Adam, one-cycle)")
    p.add_argument("--encoding", choices=("direct", "poisson"), default="direct",
                   help="direct: the image at every step; poisson: Bernoulli spikes with the pixel as rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for the PNG plot (created if missing; default ./out)")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    return p


def _check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.backend == "cupy":
        try:
            neuron.LIFNode(backend="cupy")
        except RuntimeError as e:
            parser.error(f"--backend cupy is not usable here: {e}")
        if not args.device.startswith("cuda"):
            parser.error(f"--backend cupy runs on CUDA tensors: add --device cuda (got --device {args.device})")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r} is not a torch device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs CUDA, but torch.cuda.is_available() is False; use --device cpu")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m snnkit.examples.digits``, ``snnkit-demo``).

    Returns:
        The exit status, ``0`` on success (argument errors exit with status 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_device(parser, args)
    rank, world = _join_torchrun(args)
    if rank != 0:  # one rank reports
        args.quiet, args.json, args.out = True, False, None
    try:
        data = load_digits()
    except ImportError as e:
        parser.error(f"the demo needs scikit-learn: pip install 'snnkit[examples]' ({e})")
    modes = list(MODES) if args.compare else [args.memopt]
    if not args.quiet:
        print(f"digits: {len(data[1])} train / {len(data[3])} test images, T={args.T}, epochs={args.epochs}, "
              f"batch {args.batch_size}, device {args.device}, backend {args.backend}", flush=True)
    results = [train(args, mode, data, rank, world) for mode in modes]
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    for r in results:
        if r["summary"] and not args.quiet:
            print(r["summary"])
    if args.compare:
        print(_table(results))
    else:
        r = results[0]
        print(f"memopt={r['memopt']}: test accuracy {100 * r['test_accuracy']:.2f}%, "
              f"{1000 * r['step_seconds']:.1f} ms per training step, "
              f"peak training memory {r['peak_bytes'] / 2**20:.2f} MiB, {r['seconds']:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    plot = _plot(results, os.path.join(args.out, "digits_compare.png" if args.compare else f"digits_{args.memopt}.png"))
    print(f"plot: {plot}" if plot else "plot skipped: matplotlib is not installed")
    if args.json:
        chosen = next(r for r in results if r["memopt"] == args.memopt)
        payload = {k: v for k, v in chosen.items() if k != "summary"}
        payload.update(T=args.T, epochs=args.epochs, device=args.device, backend=args.backend, plot=plot)
        if args.compare:
            payload["compare"] = [{k: v for k, v in r.items() if k != "summary"} for r in results]
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
