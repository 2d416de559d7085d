"""Helpers shared by the memory and planner benchmarks."""
import torch


def reset(net) -> None:
    """Reset every stateful module of ``net`` (snnkit's or SpikingJelly's: both have ``reset()``)."""
    for m in net.modules():
        if hasattr(m, "reset") and m is not net:
            m.reset()


def cuda_step_peak(net, run) -> int:
    """``torch.cuda.max_memory_allocated`` while ``run()`` steps ``net``, above what was allocated before.

    ``net``'s old gradients and state are freed first, as a tracker started at the step never sees them.
    """
    reset(net)
    net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
