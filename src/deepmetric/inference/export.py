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
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deepmetric.data import Preprocessing
from deepmetric.inference.threshold import Threshold

if TYPE_CHECKING:
    from deepmetric.inference.embedder import Embedder, Progress

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
    from deepmetric.inference.embedder import Embedder, print_stderr

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
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        onnx.save(proto, str(partial))
        _check_export(ort, partial, module, example)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


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


def load_onnx(cls: type[Embedder], path: str | Path) -> Embedder:
    """An Embedder over an exported file (see :meth:`Embedder.from_onnx`)."""
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

    return cls(
        forward=forward,
        preprocessing=preprocessing,
        metric=_metadata_value(meta, "metric", path),
        dim=dim,
        weights_sha256=weights,
        threshold=record,
        no_threshold=why,
        source=str(path),
    )


__all__ = ["export_onnx", "graph_sha256", "load_onnx", "metadata"]
