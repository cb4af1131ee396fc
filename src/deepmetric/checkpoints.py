"""Checkpoints as data, not code: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``RUN_DIR/checkpoints/NAME/`` holding

- ``model.safetensors``: the model's ``state_dict``;
- ``state.safetensors`` + ``state.json``: any nested state (optimizer, scheduler, sampler, RNG,
  counters) as a JSON tree whose tensors are stored in the safetensors file by name;
- ``config.yaml``: the resolved config of the run;
- ``complete``: a small JSON manifest (each file's size), written last. A folder is *complete*
  when the manifest is there and every file it lists has the listed size (a folder written by an
  older deepmetric, with no manifest, counts as complete when its four files are there).

``checkpoints/latest`` is a text file naming the checkpoint to resume from. Names such as
``epoch0003-batch000120`` are zero-padded, so name order is training order. Loading never
unpickles anything.

How a save proceeds: the files go into a fresh ``.tmp-NAME-XXXXXXXX`` folder, each file is
fsynced, the manifest is written and fsynced last, then the folder itself. For a same-name save,
the old ``NAME`` is first renamed aside to ``.old-NAME-XXXXXXXX`` (a ``NAME`` that is not
complete, damaged by hand or by the disk, becomes ``NAME.damaged-XXXXXXXX``, kept and never
deleted); then the new folder is renamed
to ``NAME``, ``latest`` is replaced atomically (temporary file, fsync, ``os.replace``), the aside
folder is deleted and old checkpoints are pruned (renamed to ``.del-...`` and then deleted). The
parent folder is fsynced after every rename. Leftovers of an interrupted save (``.tmp-*``,
``.del-*``, a stray ``.latest.tmp``) are removed by the next save; an ``.old-*`` folder is renamed
back to its name if that name is missing, removed otherwise.

The guarantee. If the process is killed at *any* instant of :func:`save_checkpoint` (SIGKILL, an
exception, Ctrl-C), :func:`latest_checkpoint` afterwards returns a complete checkpoint that holds
either the state before the save or the state it was writing, never a mixture and never an error
(provided one save had completed before). It returns what ``latest`` names when that is complete;
otherwise it falls back, with a warning, to the ``.old-*`` folder of that name (a kill between the
two renames of a same-name save) or else to the newest complete checkpoint by name (a folder damaged
or removed by hand). What fsync adds: once :func:`save_checkpoint` has returned, the checkpoint and
the ``latest`` pointer are on the disk and survive a power loss or an OS crash, and a power loss in
the middle of a save gives the same old-or-new outcome as a kill; this holds on local file systems
that honour fsync (ext4, XFS, btrfs; on macOS fsync stops short of the drive's own cache) and not on
storage that acknowledges writes it has not made. One process writes a run folder at a time: two
concurrent writers to the same ``checkpoints/`` are not supported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

#: The folder of a run folder that holds its checkpoints.
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL = "model.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_TREE = "state.json"
CONFIG = "config.yaml"
COMPLETE = "complete"
FILES = (MODEL, STATE_TENSORS, STATE_TREE, CONFIG)
TMP = ".tmp-"  # a new checkpoint being written
OLD = ".old-"  # the checkpoint a same-name save replaces, until the new one is in place
DEL = ".del-"  # a checkpoint being deleted
DAMAGED = ".damaged-"  # NAME.damaged-XXXXXXXX: an incomplete NAME a same-name save set aside
POINTER_TMP = f".{LATEST}.tmp"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a file size limit, a read-only folder):
    one line naming the checkpoint and the cause; ``errno`` is the failed call's. The
    checkpoints saved before it are untouched, and the partial folder is removed."""


def _save_failure(root: Path, name: str, error: Exception) -> CheckpointSaveError:
    """The :class:`CheckpointSaveError` for ``error``, after removing (best effort) the partial
    ``.tmp-NAME-*`` folder, so that a full disk gets its space back at once."""
    number = getattr(error, "errno", None)
    if number is None:  # safetensors' writer says "... I/O error: ... (os error 28)"
        found = re.search(r"os error (\d+)", str(error))
        number = int(found.group(1)) if found else None
    cause = f"{os.strerror(number)} ({errno.errorcode.get(number, number)})" if number else error
    if root.is_dir():
        for partial in root.glob(f"{TMP}{name}-*"):
            shutil.rmtree(partial, ignore_errors=True)
    failure = CheckpointSaveError(
        f"cannot save checkpoint {root / name}: {cause}; the checkpoints saved before it are kept"
    )
    failure.errno = number
    return failure


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


# ---- durable file-system steps -------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:  # write access: Windows refuses to flush a read-only handle
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (renames, new files) durable. POSIX only: Windows
    cannot open a folder, and NTFS journals renames itself."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _check_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or name == LATEST
        or "/" in name
        or "\\" in name
        or name.strip() != name
    ):
        raise ValueError(
            f"checkpoint name {name!r} must be a plain folder name, not {LATEST!r}, with no "
            "path separator, no leading dot and no surrounding spaces"
        )


def _problem(path: Path) -> str | None:
    """``None`` if ``path`` is a complete checkpoint folder, else what is wrong with it."""
    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a folder"
    marker = path / COMPLETE
    if not marker.exists():
        missing = [f for f in FILES if not (path / f).is_file()]
        if not missing:
            return None  # written by an older deepmetric, before the manifest
        return f"is incomplete (no {COMPLETE!r} manifest; {', '.join(missing)} missing)"
    try:
        sizes = json.loads(marker.read_text(encoding="utf-8"))["files"]
        listed = {str(f): int(sizes[f]) for f in FILES}
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has an unreadable {COMPLETE!r} manifest ({error!r})"
    for file, size in listed.items():
        try:
            actual = (path / file).stat().st_size
        except FileNotFoundError:
            return f"is incomplete ({file} missing)"
        if actual != size:
            return f"is damaged ({file} has {actual} bytes, the manifest says {size})"
    return None


def _aside_name(folder: str) -> str:
    """``NAME`` from ``.old-NAME-XXXXXXXX``."""
    return folder[len(OLD) :].rpartition("-")[0]


def _complete(root: Path) -> list[tuple[str, bool, Path]]:
    """``(name, not_aside, path)`` of every complete checkpoint, ``.old-*`` folders included,
    sorted so the last is the newest (a real folder beats an aside one of the same name)."""
    found = []
    for path in root.iterdir():
        if path.name.startswith(OLD):
            name, real = _aside_name(path.name), False
        elif path.name.startswith(".") or path.name == LATEST:
            continue
        else:
            name, real = path.name, True
        if name and _problem(path) is None:
            found.append((name, real, path))
    return sorted(found)


def _clean_leftovers(root: Path) -> None:
    """Remove what an interrupted save left behind; put back an aside folder that is the only
    copy of its checkpoint (a kill between the two renames of a same-name save)."""
    changed = False
    for path in sorted(root.iterdir()):
        if path.name.startswith((TMP, DEL)) or path.name == POINTER_TMP:
            _remove(path)
            changed = True
        elif path.name.startswith(OLD):
            name = _aside_name(path.name)
            final = root / name
            if name and _problem(final) is not None and _problem(path) is None:
                if final.exists() or final.is_symlink():
                    doomed = root / f"{DEL}{name}-{secrets.token_hex(4)}"
                    os.rename(final, doomed)
                    _fsync_dir(root)
                    _remove(doomed)
                os.rename(path, final)
            else:
                _remove(path)
            changed = True
    if changed:
        _fsync_dir(root)


def _point_latest(root: Path, name: str) -> None:
    pointer = root / POINTER_TMP
    _write_durably(pointer, (name + "\n").encode("utf-8"))
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, current: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints and ``current`` (what ``latest`` names);
    leave folders that are not complete checkpoints alone."""
    names = sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and p.name != LATEST and _problem(p) is None
    )
    kept = {*names[-keep:], current}
    doomed = []
    for name in names:
        if name not in kept:
            target = root / f"{DEL}{name}-{secrets.token_hex(4)}"
            os.rename(root / name, target)  # gone from view at once; deleted below
            doomed.append(target)
    if doomed:
        _fsync_dir(root)
    for target in doomed:
        shutil.rmtree(target)


# ---- public API -----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``name``, point ``latest`` at it, keep the newest ``keep``; its folder.

    Crash-safe and durable as the module docstring says: a kill at any instant leaves the old
    or the new checkpoint loadable. Saving a name that exists replaces it. A write that fails
    (full disk, file size limit, read-only folder) raises :class:`CheckpointSaveError`, with
    the checkpoints before it intact. ``keep`` (at least 1) counts complete checkpoints; the
    one just saved is always kept, even when its name sorts before the others."""
    _check_name(name)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, tensors)).encode("utf-8")  # fails before touching the disk
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        final = _write_checkpoint(root, name, model_tensors, tensors, tree, config_yaml)
    except (OSError, SafetensorError) as error:  # ENOSPC, EFBIG, EROFS, EACCES, ...
        raise _save_failure(root, name, error) from error
    _prune(root, name, keep)
    return final


def _write_checkpoint(
    root: Path,
    name: str,
    model_tensors: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    tree: bytes,
    config_yaml: str,
) -> Path:
    """The steps of :func:`save_checkpoint` up to and including the ``latest`` pointer."""
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(root.parent)
    _clean_leftovers(root)

    token = secrets.token_hex(4)
    tmp = root / f"{TMP}{name}-{token}"
    tmp.mkdir()
    save_file(model_tensors, str(tmp / MODEL))
    _fsync_file(tmp / MODEL)
    save_file(tensors, str(tmp / STATE_TENSORS))
    _fsync_file(tmp / STATE_TENSORS)
    _write_durably(tmp / STATE_TREE, tree)
    _write_durably(tmp / CONFIG, config_yaml.encode("utf-8"))
    sizes = {f: (tmp / f).stat().st_size for f in FILES}
    _write_durably(tmp / COMPLETE, json.dumps({"files": sizes}).encode("utf-8"))
    _fsync_dir(tmp)

    final = root / name
    aside = None
    if final.exists() or final.is_symlink():
        if _problem(final) is not None:  # damaged by hand or by the disk: kept, never deleted
            os.rename(final, root / f"{name}{DAMAGED}{token}")
        else:
            aside = root / f"{OLD}{name}-{token}"
            os.rename(final, aside)  # the old one stays findable: latest_checkpoint looks at .old-*
        _fsync_dir(root)
    os.rename(tmp, final)
    _fsync_dir(root)
    _point_latest(root, name)
    if aside is not None:
        _remove(aside)
    return final


class CheckpointFallback(RuntimeWarning):
    """The checkpoint ``checkpoints/latest`` names is missing or damaged: an older one is used
    (the message says which and why; the command line prints it as one line)."""


def find_latest(run_dir: str | Path) -> tuple[Path, str | None]:
    """The checkpoint :func:`latest_checkpoint` returns, and why it is not the one
    ``checkpoints/latest`` names (``None`` when it is), without a warning."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        raise CheckpointError(f"no checkpoint in {run_dir} (no {root} folder)")
    pointer = root / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        why = f"{pointer} does not exist"
    except (OSError, ValueError) as error:
        why = f"{pointer} is unreadable ({error})"
    else:
        try:
            _check_name(name)
        except ValueError:
            why = f"{pointer} holds {name!r}, which is not a checkpoint name"
        else:
            problem = _problem(root / name)
            if problem is None:
                return root / name, None
            why = f"{pointer} names {name}, which {problem}"
            asides = [p for n, real, p in _complete(root) if n == name and not real]
            if asides:  # a kill between the two renames of a same-name save: its old folder
                return asides[-1], f"{why}; falling back to {asides[-1]}"
    found = _complete(root)
    if not found:
        others = [
            f"{p.name} {_problem(p)}"
            for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith((TMP, DEL))
        ]
        detail = "; ".join(others) if others else "no checkpoint folder either"
        raise CheckpointError(f"no usable checkpoint in {root}: {why}; {detail}")
    path = found[-1][2]
    return path, f"{why}; falling back to {path}"


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint to resume from: the folder ``checkpoints/latest`` names when it is
    complete; otherwise, with a :class:`CheckpointFallback` warning (a ``RuntimeWarning``)
    saying why, the ``.old-*`` folder of that same name (left by a kill between the two renames
    of a same-name save) or else the newest complete checkpoint by name. ``CheckpointError``
    naming each problem when there is none.
    """
    path, why = find_latest(run_dir)
    if why is not None:
        warnings.warn(why, CheckpointFallback, stacklevel=2)
    return path


def holds_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds checkpoints, usable or not: a ``checkpoints/latest`` pointer or
    a checkpoint folder (what an interrupted save leaves, ``.tmp-*``, ``.del-*``, does not
    count: a run killed during its first save holds none)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return False
    return any(
        p.name == LATEST or not p.name.startswith(".") or p.name.startswith(OLD)
        for p in root.iterdir()
    )


class Loaded(NamedTuple):
    """A checkpoint read back by :func:`load_latest`."""

    folder: Path
    model_state: dict[str, torch.Tensor]
    state: dict[str, Any]
    #: why this is not the checkpoint ``checkpoints/latest`` names (``None``: it is)
    fallback: str | None


def load_latest(run_dir: str | Path) -> Loaded:
    """The newest checkpoint of ``run_dir`` that loads: the one :func:`latest_checkpoint` picks,
    else (when its files do not parse) the next complete one by name, newest first. Falling
    back warns (:class:`CheckpointFallback`, one line saying which checkpoint and why);
    ``CheckpointError`` naming every damaged checkpoint when none loads. Nothing is written."""
    first, why = find_latest(run_dir)
    root = Path(run_dir) / CHECKPOINTS_DIR
    reasons = [why.rpartition("; falling back to ")[0]] if why is not None else []
    others = [p for _, _, p in reversed(_complete(root)) if p != first]
    for folder in [first, *others]:
        try:
            model_state, state = load_checkpoint(folder)
        except CheckpointError as error:
            reasons.append(str(error))
            continue
        if folder != first:
            why = f"{'; '.join(reasons)}; falling back to {folder}"
        if why is not None:
            warnings.warn(why, CheckpointFallback, stacklevel=2)
        return Loaded(folder, model_state, state, why)
    incomplete = [
        f"{p.name} {_problem(p)}"
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith((TMP, DEL)) and _problem(p) is not None
    ]
    raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(reasons + incomplete)}")


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``folder / name``; :class:`CheckpointError` naming
    it when it is anything else. Only the safetensors parser ever reads it: a pickle is
    recognised by its first bytes for the message, never loaded."""
    file = folder / name
    try:
        return load_file(str(file))
    except (SafetensorError, ValueError) as error:
        reason = str(error)
    with open(file, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive (the format of torch.save), not a safetensors file"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        what = "a Python pickle (the old format of torch.save), not a safetensors file"
    else:
        what = f"not a safetensors file ({reason})"
    raise CheckpointError(
        f"checkpoint {folder} is corrupt: {file} is {what}; refused: checkpoints are "
        "safetensors and JSON only, never unpickled"
    ) from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_state, state)`` from a checkpoint folder, with clear errors for broken files.

    Only safetensors and JSON are parsed: a pickle (``torch.save``) in place of a safetensors
    file is reported as corrupt, never unpickled."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    try:
        model_state = _read_tensors(path, MODEL)
        tensors = _read_tensors(path, STATE_TENSORS)
        tree = json.loads((path / STATE_TREE).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {error.filename} missing"
        ) from None
    except CheckpointError:
        raise
    except (ValueError, OSError) as error:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_TREE}: {error}") from None
    try:
        return model_state, _decode(tree, tensors)
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor {error} missing") from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_TREE}: {error}") from None


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict: for each key in sorted order, the key, the dtype, the shape and
    the tensor's bytes (C order, native byte order). The model identity of a run, of its ONNX
    export, and of the weights a saved threshold was chosen for."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- does a checkpoint fit the model? ------------------------------------------------------

#: how many tensor names a mismatch message shows per kind
_SHOWN = 4


def _shape(shape: Any) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _mismatch_text(
    shapes: list[tuple[str, str, str]], missing: list[str], unexpected: list[str]
) -> str:
    parts = []
    if shapes:
        described = [f"{k} is {c} in the checkpoint, {m} in the model" for k, c, m in shapes]
        parts.append("; ".join(described[:_SHOWN]))
        if len(shapes) > _SHOWN:
            parts[-1] += f"; ... ({len(shapes)} tensors of another shape in all)"
    if missing:
        parts.append(f"missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_listed(unexpected)}")
    return "; ".join(parts)


def state_mismatch(
    model_state: Mapping[str, torch.Tensor], checkpoint_state: Mapping[str, torch.Tensor]
) -> str | None:
    """Why ``checkpoint_state`` cannot load into a model whose ``state_dict()`` is
    ``model_state`` (strictly, as ``load_state_dict`` does), in one line naming the tensors
    (``"fc.weight is 16x256 in the checkpoint, 32x256 in the model; missing from the
    checkpoint: ..."``), or ``None`` when it fits."""
    shapes = [
        (k, _shape(v.shape), _shape(model_state[k].shape))
        for k, v in checkpoint_state.items()
        if k in model_state
        and isinstance(v, torch.Tensor)  # not a module's extra state (a dict)
        and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    missing = [k for k in model_state if k not in checkpoint_state]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    if not (shapes or missing or unexpected):
        return None
    return _mismatch_text(shapes, missing, unexpected)


def load_model_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str | Path
) -> None:
    """``module.load_state_dict(state)`` (strict), or first a :class:`CheckpointError` of one
    line naming ``source`` and every mismatched tensor (see :func:`state_mismatch`) instead
    of torch's long ``RuntimeError``: a checkpoint of another architecture (another
    ``model.dim``, backbone or mode) than the configured model."""
    why = state_mismatch(module.state_dict(), state)
    if why is not None:
        raise CheckpointError(
            f"{source} does not fit the configured model ({type(module).__name__}): {why} "
            "(a checkpoint of another architecture, e.g. another model.dim?)"
        )
    module.load_state_dict(state)
