"""Checkpoints as data, not code: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``RUN_DIR/checkpoints/NAME/`` holding

- ``model.safetensors``: the model's ``state_dict``;
- ``state.safetensors`` + ``state.json``: any nested state (optimizer, scheduler, sampler, RNG,
  counters) as a JSON tree whose tensors are stored in the safetensors file by name;
- ``config.yaml``: the resolved config of the run.

It is written to a temporary folder and renamed into place, then ``checkpoints/latest`` (a text
file naming the newest checkpoint) is replaced atomically, so an interruption at any moment
leaves the previous checkpoint intact. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able tree; tensors move into ``tensors`` and leave a reference behind."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep their type
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``name`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
        str(tmp / "model.safetensors"),
    )
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(tree))
    (tmp / "config.yaml").write_text(config_yaml)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[
        :-keep
    ]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder ``checkpoints/latest`` names; ``CheckpointError`` if there is none."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {run_dir} (no {root / LATEST})") from None
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{root / LATEST} names {name}, which does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_state, state)`` from a checkpoint folder, with clear errors for broken files."""
    path = Path(path)
    try:
        model_state = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
        tree = json.loads((path / "state.json").read_text())
    except FileNotFoundError as error:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {error.filename} missing"
        ) from None
    except (SafetensorError, json.JSONDecodeError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: {error}") from None
    try:
        return model_state, _decode(tree, tensors)
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor {error} missing") from None
