"""ONNX export of a trained embedding network, and loading an export back as an Embedder.

The file is self-contained: one graph ``input`` float32 (N, C, H, W) (what
:meth:`~deepmetric.inference.Embedder.preprocess` returns; N is dynamic) -> ``embedding``
float32 (N, D), with the L2 normalisation inside the graph when the model has it
(``model.normalize``: ``EmbeddingNet`` ends with it), plus ``metadata_props``:

- ``deepmetric.format``: ``1``;
- ``deepmetric.preprocessing``: the :class:`~deepmetric.data.Preprocessing` as JSON (``null``
  for vector inputs);
- ``deepmetric.metric``, ``deepmetric.dim``;
- ``deepmetric.threshold``: the ``threshold.json`` record as JSON (``null`` when the run has
  none: then the export embeds but cannot verify);
- ``deepmetric.weights_sha256``: the hash of the torch weights
  (:func:`~deepmetric.inference.embedder.weights_sha256`), so an export has the identity of its run;
- ``deepmetric.graph_sha256``: :func:`graph_sha256` of the graph as exported.

**Identity.** A loaded file's identity is computed from its graph's weights, not taken from the
metadata: :func:`graph_sha256` of the file must equal the recorded ``graph_sha256`` for it to
have its run's identity (``weights_sha256``) and threshold. A file whose weights were changed
after the export (an int8 ``quantize_dynamic``, noise added to one initializer) or an export
without the record (made by an older deepmetric: export it again) has the graph hash itself as
its ``weights_sha256`` and no threshold, so galleries made with the run or its export refuse it.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export), opset 18. In torch 2.13 it is
the default and the maintained one; it works offline (onnxscript is installed with the
``onnx`` extra), keeps the batch axis symbolic through the shape checks of ``EmbeddingNet``,
and is silent with ``verbose=False``. The legacy TorchScript exporter also works here but is
deprecated ("will be removed") and bakes Python conditions on tensor values into the trace as
constants. Every export is checked: onnxruntime must reproduce the torch embeddings of random
inputs to 1e-4, or the export fails.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.files import Progress, print_stderr, write_atomically
from deepmetric.inference.embedder import Embedder
from deepmetric.inference.onnx_file import (
    _KEY,
    FORMAT,
    INPUT,
    OPSET,
    OUTPUT,
    _require_onnx,
    graph_sha256,
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (e.g. 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _example(embedder: Embedder, module: torch.nn.Module) -> torch.Tensor:
    """Random inputs (2, ...) of the model's input shape, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    if embedder.preprocessing is not None:
        return torch.rand(2, *embedder.preprocessing.shape, generator=g)
    features = getattr(getattr(module, "backbone", None), "in_features", None)
    if isinstance(features, int):
        return torch.rand(2, features, generator=g)
    raise ValueError(
        f"{embedder.source}: the input shape is unknown (no preprocessing and no MLP backbone): "
        "export needs image data or a vector model"
    )


def metadata(embedder: Embedder, graph: str) -> dict[str, str]:
    """The ``metadata_props`` of an export of ``embedder`` whose graph hashes to ``graph``
    (:func:`graph_sha256`)."""
    identity = embedder.identity()
    threshold = embedder.threshold.to_json() if embedder.has_threshold else None
    return {
        _KEY + "format": FORMAT,
        _KEY + "preprocessing": json.dumps(identity["preprocessing"]),
        _KEY + "metric": identity["metric"],
        _KEY + "dim": str(identity["dim"]),
        _KEY + "threshold": json.dumps(threshold),
        _KEY + "weights_sha256": identity["weights_sha256"],
        _KEY + "graph_sha256": graph,
    }


def export_onnx(
    source: Embedder | str | Path,
    path: str | Path,
    *,
    opset: int = OPSET,
    progress: Progress | None = None,
) -> Path:
    """Export an Embedder built from a run (or the run folder ``source``) to ``path``.

    A run folder is loaded on the CPU with its threshold (calibrated on the validation split
    when missing, as :meth:`Embedder.from_run` does; ``progress`` gets that message). The file
    is written atomically (temporary file, then ``os.replace``). Returns ``path``.
    """
    onnx, ort = _require_onnx()
    if isinstance(source, Embedder):
        embedder = source
    else:
        embedder = Embedder.from_run(source, device="cpu", progress=progress or print_stderr)
    if embedder.module is None:
        raise ValueError(f"{embedder.source}: an ONNX model cannot be exported again")
    module = copy.deepcopy(embedder.module).cpu().eval()
    example = _example(embedder, module)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many kinds; say which, in one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"ONNX export failed: {type(error).__name__}: {reason}") from None
    proto = program.model_proto
    for key, value in metadata(embedder, graph_sha256(proto.graph)).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value

    def save(partial: Path) -> None:
        onnx.save(proto, str(partial))
        _check_export(ort, partial, module, example)

    return write_atomically(path, save)


def _check_export(ort: Any, path: Path, module: torch.nn.Module, example: torch.Tensor) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: example.numpy()})[0]
    with torch.inference_mode():
        want = module(example).float().numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-4):
        raise ValueError(
            f"ONNX export failed: onnxruntime differs from torch by "
            f"{float(np.abs(got - want).max()) if got.shape == want.shape else 'shape'}"
        )


__all__ = ["INPUT", "OUTPUT", "export_onnx", "graph_sha256", "metadata"]
