"""Training: ``fit`` over Python objects, ``train`` over a config (being split out of
``deepmetric.train``; import from here)."""

from deepmetric.train import load_data, load_trained, resolve_device, resume_config, train

__all__ = ["load_data", "load_trained", "resolve_device", "resume_config", "train"]
