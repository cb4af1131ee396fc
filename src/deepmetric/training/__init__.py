"""Training: :func:`fit` over Python objects, :func:`train` over a config, and run folders.

Modules: ``fit`` (the loop), ``modes`` (batches + step loss per training mode), ``builders``
(config -> device, data, model, loss, mode, optimiser), ``schedule`` (the learning-rate plan),
``state`` (position, RNG, stop signals), ``log`` (log.jsonl, progress, diagnostics), ``run``
(run folders: train, resume, load a trained run).
"""

from deepmetric.training.builders import load_data, resolve_device
from deepmetric.training.fit import fit
from deepmetric.training.run import (
    TrainedRun,
    load_trained,
    open_trained,
    resume_config,
    test_report,
    train,
    untrained_network,
)

__all__ = [
    "TrainedRun",
    "fit",
    "load_data",
    "load_trained",
    "open_trained",
    "resolve_device",
    "resume_config",
    "test_report",
    "train",
    "untrained_network",
]
