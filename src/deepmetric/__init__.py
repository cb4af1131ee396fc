"""deepmetric: deep metric learning with Siamese and triplet networks.

Submodules (imported on demand, nothing heavy runs at import time):
``distances`` (pairwise distance matrices), ``mining`` (which triplets and pairs count),
``losses`` (triplet, contrastive, lifted structured losses).
"""

__version__ = "0.1.0"
