r"""Spiking neurons: IF and LIF, single-step and multi-step, hard and soft reset.

Every neuron runs three stages per time step ``t``:

.. math::

    H[t] &= f(V[t-1], X[t]) && \text{charge} \\
    S[t] &= \Theta(H[t] - V_{th}) && \text{fire (surrogate gradient in backward)} \\
    V[t] &= \begin{cases} H[t]\,(1 - S[t]) + V_{reset}\,S[t] & \text{hard reset} \\
            H[t] - V_{th}\,S[t] & \text{soft reset (} v\_reset=None \text{)} \end{cases}

with ``f(V, X) = V + X`` for IF, and for LIF
``V + (X - (V - V_reset)) / tau`` (``decay_input=True``) or
``V - (V - V_reset) / tau + X`` (``decay_input=False``); ``V_reset = 0`` in the
charge when ``v_reset is None``. ``detach_reset=True`` detaches ``S`` in the
reset term only. The functional core lives in :mod:`snnkit.neuron.functional`.
"""
from .nodes import BaseNode, IFNode, LIFNode

__all__ = ["BaseNode", "IFNode", "LIFNode"]
