"""The pure functional neuron core (no module state, no in-place updates).

Example:
    >>> import torch
    >>> from snnkit import surrogate
    >>> from snnkit.neuron.functional import NeuronParams, step, multistep
    >>> p = NeuronParams("lif", v_threshold=1.0, v_reset=0.0, detach_reset=False,
    ...                  surrogate=surrogate.Sigmoid(), tau=2.0)
    >>> spike, v = step(torch.tensor([2.5]), torch.tensor([0.0]), p)
    >>> spike, v
    (tensor([1.]), tensor([0.]))
    >>> spike_seq, v_last = multistep(torch.full((3, 1), 1.5), torch.zeros(1), p)
    >>> spike_seq.flatten()
    tensor([0., 1., 0.])
"""
from ._reference import NeuronParams, charge, fire, multistep, reset, step

__all__ = ["NeuronParams", "charge", "fire", "reset", "step", "multistep"]
