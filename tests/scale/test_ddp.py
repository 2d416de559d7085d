"""DistributedDataParallel over plain and GC spiking nets: 2 CPU processes (gloo) vs one process.

Each rank trains on its half of the batch; DDP averages the per-rank mean losses'
gradients, which equals the gradient of the mean loss over the concatenated batch.
So gradients and updated weights after every step must equal a single-process run on
the whole batch (float64, so the only difference is the order of the averaging).

Process start-up is the cost (about 5 s on 2 cores: importing torch, and the first
``DistributedDataParallel`` imports ``torch._dynamo``), so one spawn runs every case and
its result is cached for the parametrised tests that read it.
"""
import datetime
import functools
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from ._nets import StepLoop, data, make_net, memopt_or_skip, train_step

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")

WORLD, N, T, STEPS, LR = 2, 8, 4, 2, 0.5

# (name, kind, step_mode, DDP keyword arguments)
PLAIN_CASES = (
    ("plain-m", "plain", "m", {}),
    ("plain-s", "plain", "s", {}),
)
GC_CASES = (
    ("gc-m", "gc", "m", {}),
    ("tc-m", "tc", "m", {}),
    ("tc-m-static", "tc", "m", {"static_graph": True}),
    ("closure-m", "closure", "m", {}),
    ("closure-s-static", "closure", "s", {"static_graph": True}),
)
# A plain function checkpointed with input_compressed_gc runs a reentrant
# ``autograd.backward`` that accumulates into the parameters itself: DDP's hook of a
# parameter used in several such segments (T single steps) fires once per segment.
LIMIT_CASES = (("closure-s", "closure", "s", {}),)
# Known bug (reported): GC segments called once per time step (single-step mode)
# under DDP with 2 ranks give wrong parameter gradients inside the segments, now and
# then with the default settings (about 1 spawn in 3), every time with
# gradient_as_bucket_view=True. One process, plain nets and multi-step GC/TC are exact.
FLAKY_CASES = (
    ("gc-s", "gc", "s", {}),
    ("gc-s-static", "gc", "s", {"static_graph": True}),
    ("gc-s-bucket-view", "gc", "s", {"gradient_as_bucket_view": True}),
)


def _has_memopt():
    from snnkit import memopt

    return hasattr(memopt, "TCGCContainer")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(kind, step_mode):
    net = make_net(kind, step_mode=step_mode).double()
    return StepLoop(net) if step_mode == "s" else net


def _train(model, x, t):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for _ in range(STEPS):
        loss, grads = train_step(model, opt, x, t)
        history.append((loss, grads, [p.detach().clone() for p in model.parameters()]))
    return history


def _case(kind, step_mode, ddp_kwargs, rank):
    x, t = data(T=T, N=N * WORLD, dtype=torch.float64)
    lo, hi = rank * N, (rank + 1) * N
    model = DDP(_model(kind, step_mode), find_unused_parameters=False, **ddp_kwargs)
    return _train(model, x[:, lo:hi], t[lo:hi])


def _worker(rank, port, cases, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, kind, step_mode, kw in cases:
            try:
                results[name] = _case(kind, step_mode, kw, rank)
            except Exception as e:  # recorded and asserted on by the parent
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _run_all():
    """Spawn ``WORLD`` ranks running every case; return each rank's results."""
    cases = PLAIN_CASES + (GC_CASES + LIMIT_CASES + FLAKY_CASES if _has_memopt() else ())
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(_free_port(), cases, out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"DDP ranks did not finish within 120 s (cases {[c[0] for c in cases]})")
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(WORLD)]


def _reference(kind, step_mode):
    x, t = data(T=T, N=N * WORLD, dtype=torch.float64)
    return _train(_model(kind, step_mode), x, t)


def _assert_matches_single_process(results, name, kind, step_mode):
    ref = _reference(kind, step_mode)
    for rank, res in enumerate(results):
        got = res[name]
        assert not isinstance(got, str), f"rank {rank}, case {name}: {got}"
        for step, ((_, g_ref, w_ref), (_, g, w)) in enumerate(zip(ref, got)):
            for i, (a, b) in enumerate(zip(g_ref, g)):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank} step {step} grad {i}")
            for i, (a, b) in enumerate(zip(w_ref, w)):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank} step {step} w {i}")
    # Rank losses are local means; their average is the global mean loss.
    for step in range(STEPS):
        mean = sum(r[name][step][0] for r in results) / WORLD
        torch.testing.assert_close(mean, ref[step][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,kind,step_mode,kw", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_ddp_plain_net_matches_single_process(name, kind, step_mode, kw):
    _assert_matches_single_process(_run_all(), name, kind, step_mode)


@pytest.mark.parametrize("name,kind,step_mode,kw", GC_CASES, ids=[c[0] for c in GC_CASES])
def test_ddp_gc_net_matches_single_process(name, kind, step_mode, kw):
    memopt_or_skip()
    _assert_matches_single_process(_run_all(), name, kind, step_mode)


_XFAIL = pytest.mark.xfail(strict=False, reason="known bug: DDP + GC segments in single-step mode (see FLAKY_CASES)")


@pytest.mark.parametrize(
    "name,kind,step_mode,kw", [pytest.param(*c, marks=_XFAIL) for c in FLAKY_CASES], ids=[c[0] for c in FLAKY_CASES]
)
def test_ddp_gc_single_step_segments(name, kind, step_mode, kw):
    memopt_or_skip()
    _assert_matches_single_process(_run_all(), name, kind, step_mode)


def test_ddp_closure_segments_reused_across_steps_need_static_graph():
    """Pinned limitation: documented in docs/guides/distributed.rst."""
    memopt_or_skip()
    for rank, res in enumerate(_run_all()):
        got = res["closure-s"]
        assert isinstance(got, str), f"rank {rank}: closure-s trained without error; update the docs"
        assert "marked as ready twice" in got and "inner.bias" in got, got
