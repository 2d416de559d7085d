"""Step-time ratios that hold up on a shared, noisy machine.

Each round times every variant once, one after another, so the variants of a
round see the same load; the ratio of a variant to its baseline is taken per
round and the median over rounds is reported (with the interquartile range).
On the 2-core build machine, whose speed drifts by 10-30% over seconds, this
is far steadier than a ratio of best times. Each timed step follows an
untimed step of the same variant, so that it finds the allocator as its own
steps leave it, not as the previous variant did (on CPU a step after a
larger one page-faults less).
"""
import statistics
import time
from typing import Callable, List, Sequence, Tuple


def round_robin(steps: Sequence[Callable[[], None]], repeat: int) -> List[List[float]]:
    """``times[i][r]``: seconds of ``steps[i]`` in round ``r``."""
    times: List[List[float]] = [[] for _ in steps]
    for _ in range(repeat):
        for i, step in enumerate(steps):
            step()
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> Tuple[float, float, float]:
    """``(median, first quartile, third quartile)`` of the per-round ratios ``times / base``."""
    ratios = [t / b for t, b in zip(times, base)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3

