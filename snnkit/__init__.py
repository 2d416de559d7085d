"""snnkit: stateful spiking neural networks that train in far less memory."""
__version__ = "0.1.0"

from . import base, functional, layer, memopt, neuron, surrogate  # noqa: E402

__all__ = ["base", "functional", "layer", "memopt", "neuron", "surrogate", "__version__"]
