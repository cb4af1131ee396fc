"""deepmetric: deep metric learning with Siamese and triplet networks.

Submodules (imported on demand, nothing heavy runs at import time):
``distances`` (pairwise distance matrices), ``mining`` (which triplets and pairs count),
``losses`` (triplet, contrastive, lifted structured losses), ``neighbors`` (exact k-NN),
``models`` (networks), ``training`` (``fit`` and ``train``), ``evaluate`` (metrics, report).
``deepmetric.fit`` is :func:`deepmetric.training.fit.fit`, imported on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["fit"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from deepmetric.training.fit import fit

        return fit
    raise AttributeError(f"module 'deepmetric' has no attribute {name!r}")
