"""Runnable demos. ``python -m snnkit.examples.digits`` trains a spiking CNN on real data.

The demos need the ``examples`` extra (``pip install -e ".[examples]"``: scikit-learn,
tqdm, matplotlib); they import those packages only when run.
"""
__all__ = ["digits"]
