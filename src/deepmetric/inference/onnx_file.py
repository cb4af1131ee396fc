"""Reading an exported ONNX file (``deepmetric export``): its graph run by onnxruntime on the
CPU, its metadata (format, preprocessing, metric, dim, threshold, model identity) read and
checked, and the sha256 of its graph's weights (:func:`graph_sha256`), which says whether the
file still holds the weights it was exported with. :mod:`deepmetric.inference.export` writes
these files; :meth:`deepmetric.inference.Embedder.from_onnx` builds on :func:`read_onnx`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from deepmetric.data import Preprocessing
from deepmetric.runs import Threshold

FORMAT = "1"
OPSET = 18
INPUT, OUTPUT = "input", "embedding"
_KEY = "deepmetric."


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ValueError(
            f"ONNX support needs onnx and onnxruntime ({error}): pip install 'deepmetric[onnx]'"
        ) from None
    return onnx, onnxruntime


class OnnxModel(NamedTuple):
    """What an Embedder over an exported file is made of (its constructor's arguments)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: Preprocessing | None
    metric: str
    dim: int
    weights_sha256: str
    threshold: Threshold | None
    no_threshold: str
    source: str


def graph_sha256(graph: Any) -> str:
    """sha256 of an ONNX graph's weights: its initializers sorted by name, then the tensors of
    its ``Constant`` nodes in node order; for each the name, the element type, the dims and the
    values' bytes (as :func:`onnx.numpy_helper.to_array` gives them: C order, little-endian),
    as a run's :func:`~deepmetric.checkpoints.weights_sha256` hashes its state dict. Any change
    to a weight (quantized, perturbed, renamed, reshaped) changes it."""
    from onnx import numpy_helper

    h = hashlib.sha256()

    def add(kind: str, name: str, tensor: Any) -> None:
        array = np.ascontiguousarray(numpy_helper.to_array(tensor))
        if array.dtype.byteorder == ">":
            array = array.byteswap().view(array.dtype.newbyteorder("<"))
        h.update(f"{kind}\0{name}\0{tensor.data_type}\0{list(tensor.dims)}\0".encode())
        h.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())

    for tensor in sorted(graph.initializer, key=lambda t: t.name):
        add("initializer", tensor.name, tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    add("constant", f"{node.name}/{','.join(node.output)}", attribute.t)
    return h.hexdigest()


def _metadata_value(meta: dict[str, str], key: str, path: Path) -> Any:
    if _KEY + key not in meta:
        raise ValueError(f"{path}: not a deepmetric export (no {_KEY + key} in its metadata)")
    text = meta[_KEY + key]
    if key in ("metric", "weights_sha256", "graph_sha256", "format"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: metadata {_KEY + key} is not valid JSON") from None


def read_onnx(path: str | Path) -> OnnxModel:
    """The parts of an Embedder over an exported file (see :meth:`Embedder.from_onnx
    <deepmetric.inference.Embedder.from_onnx>`): onnxruntime on the CPU, the metadata read and
    checked, the identity computed from the graph's weights."""
    onnx, ort = _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph = graph_sha256(onnx.load(str(path)).graph)
    except Exception as error:  # onnxruntime's own exception types: InvalidProtobuf, Fail, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: not a readable ONNX model ({reason})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if _metadata_value(meta, "format", path) != FORMAT:
        raise ValueError(f"{path}: export format {meta[_KEY + 'format']}, this deepmetric reads 1")
    pre = _metadata_value(meta, "preprocessing", path)
    threshold = _metadata_value(meta, "threshold", path)
    dim = _metadata_value(meta, "dim", path)
    try:
        preprocessing = Preprocessing.from_dict(pre) if pre is not None else None
        record = Threshold.from_json(threshold, f"{path}") if threshold is not None else None
    except ValueError as error:
        raise ValueError(f"{path}: metadata: {error}") from None

    weights = _metadata_value(meta, "weights_sha256", path)
    if meta.get(_KEY + "graph_sha256") != graph:  # not the weights exported: not the run's
        weights, record = graph, None
        why = (
            f"{path}: its weights are not those it was exported with (changed after the "
            "export, e.g. quantized), so it has no threshold and not its run's identity"
            if _KEY + "graph_sha256" in meta
            else f"{path}: exported by an older deepmetric (no {_KEY}graph_sha256): export the "
            "run again to use its threshold and its run's identity"
        )
    else:
        why = f"{path} carries no threshold (its run had none when it was exported)"

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(out[0])

    return OnnxModel(
        forward=forward,
        preprocessing=preprocessing,
        metric=_metadata_value(meta, "metric", path),
        dim=dim,
        weights_sha256=weights,
        threshold=record,
        no_threshold=why,
        source=str(path),
    )


__all__ = ["FORMAT", "INPUT", "OPSET", "OUTPUT", "OnnxModel", "graph_sha256", "read_onnx"]
