"""Which device computes: ``auto`` or a torch device name, checked before anything is
allocated, so a device that cannot be used is one line naming why."""

from __future__ import annotations

import torch

from deepmetric.config import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available (the current GPU), else CPU; otherwise the named device
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked: a name that is no device, CUDA on a
    machine without it, or a GPU index this machine does not have is a one-line
    ``ConfigError`` (nothing is allocated here)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {str(name)!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU"
            raise ConfigError(f"device {str(name)!r}: CUDA is not available here ({why})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {str(name)!r}: this machine has {count} GPU{'s' * (count != 1)} "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(name)!r}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"device {str(name)!r}: not available here")
    return device


__all__ = ["resolve_device"]
