"""Use a trained model: :class:`Embedder` turns images into embeddings and decides whether two
images show the same thing.

An Embedder comes from a run folder (:meth:`Embedder.from_run`: the network on CPU or CUDA) or
from an exported ONNX file (:meth:`Embedder.from_onnx`: onnxruntime; the file carries the
preprocessing, metric, threshold and model identity, the identity checked against the graph's
weights). Both give the same embeddings (to 1e-5) and the same :meth:`Embedder.identity`.

**Preprocessing** is ``RUN_DIR/preprocess.json``, written by ``train`` for image data. Runs
made before it existed fall back to deriving it from the config and the data the run trained
on (the training split is loaded once: its (C, H, W), scaled by 1/255); a run of ``fit()`` on
Python objects has none unless given (``preprocessing=``), and then takes tensors only.

**The threshold** is ``RUN_DIR/threshold.json`` (written by ``deepmetric evaluate`` or
:func:`calibrate_threshold`) when it was chosen for these weights (its ``weights_sha256``, or,
for a file without one, the latest checkpoint). Otherwise ``from_run`` calibrates one on the
run's validation split, saves it (for the latest checkpoint) and says so once. A run without a
validation split gets no threshold: :attr:`Embedder.threshold` and :meth:`Embedder.verify` then
raise ``ValueError`` saying how to get one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from deepmetric.checkpoints import weights_sha256
from deepmetric.checks import positive_int
from deepmetric.config import Config, tuple_kind
from deepmetric.data import Preprocessing
from deepmetric.data.preprocess import Inputs
from deepmetric.data.training_data import load_data
from deepmetric.devices import resolve_device
from deepmetric.distances import check_metric, paired
from deepmetric.evaluate.threshold import fit_threshold, threshold_of_pairs
from deepmetric.evaluate.tuples import validation_pair_distances
from deepmetric.files import Progress, print_stderr
from deepmetric.inference.onnx_file import read_onnx
from deepmetric.runs import (
    THRESHOLD_FILE,
    VALIDATION_PROTOCOL,
    ModelIdentity,
    Run,
    Threshold,
    far_protocol,
)

Forward = Callable[[torch.Tensor], torch.Tensor]


class Verification(NamedTuple):
    """One decision: ``same`` is ``distance <= threshold``."""

    distance: float
    threshold: float
    same: bool

    def to_json(self, a: str | None, b: str | None, metric: str) -> dict[str, Any]:
        """The record of ``deepmetric verify --json`` and the service's ``POST /verify``:
        ``{"a", "b", "distance", "threshold", "same", "metric"}`` (``a``, ``b``: the inputs'
        names as given)."""
        return {
            "a": a,
            "b": b,
            "distance": self.distance,
            "threshold": self.threshold,
            "same": self.same,
            "metric": metric,
        }


class Embedder:
    """Images in, embeddings (N, D) out; pairs in, same / different out.

    Build one with :meth:`from_run` or :meth:`from_onnx`. The constructor takes the parts
    (keyword-only) and only checks them: ``forward`` maps float32 model inputs on the CPU to
    (B, D) embeddings on the CPU; ``preprocessing`` (``None``: tensors only); ``threshold``
    (``None``: ``no_threshold`` says why); ``module`` (the torch network, for export);
    ``device``: where ``forward`` computes (the network's device; the CPU for ONNX).

    Example::

        emb = Embedder.from_run("runs/fashion_mnist")
        vectors = emb.embed(["a.png", "b.png"])          # (2, 128) float32
        same = emb.verify("a.png", "b.png")[0].same
    """

    def __init__(
        self,
        *,
        forward: Forward,
        preprocessing: Preprocessing | None,
        metric: str,
        dim: int,
        weights_sha256: str,
        threshold: Threshold | None = None,
        no_threshold: str = "no threshold was given",
        module: nn.Module | None = None,
        source: str = "",
        device: torch.device | str = "cpu",
    ) -> None:
        check_metric(metric)
        positive_int("dim", dim)
        if threshold is not None and threshold.metric != metric:
            raise ValueError(f"the threshold is in {threshold.metric} distance, not {metric}")
        self._forward = forward
        self.preprocessing = preprocessing
        self._metric = metric
        self._dim = dim
        self._weights = weights_sha256
        self._threshold = threshold
        self._no_threshold = no_threshold
        self.module = module
        self.source = source
        self._device = torch.device(device)

    # ------------------------------------------------------------------ properties

    @property
    def metric(self) -> str:
        """The distance the model was trained with: ``euclidean``, ``squared_euclidean`` or
        ``cosine``."""
        return self._metric

    @property
    def dim(self) -> int:
        """D, the embedding size."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Where the model computes (``from_run``: the ``device`` asked for; ONNX: the CPU).
        Inputs and embeddings are CPU tensors whatever it is."""
        return self._device

    @property
    def has_threshold(self) -> bool:
        return self._threshold is not None

    @property
    def threshold(self) -> Threshold:
        """The verification threshold; ``ValueError`` (saying how to get one) when there is
        none."""
        if self._threshold is None:
            raise ValueError(self._no_threshold)
        return self._threshold

    @property
    def model_identity(self) -> ModelIdentity:
        """What makes two Embedders interchangeable (:class:`~deepmetric.runs.ModelIdentity`):
        the weights' sha256 (see :func:`weights_sha256`), the preprocessing, ``dim``,
        ``metric``."""
        pre = self.preprocessing.to_dict() if self.preprocessing is not None else None
        return ModelIdentity(self._weights, pre, self._dim, self._metric)

    def identity(self) -> dict[str, Any]:
        """:attr:`model_identity` as a plain dict: ``weights_sha256``, ``preprocessing`` (a
        dict, or ``None``), ``dim``, ``metric``."""
        return self.model_identity.to_dict()

    def __repr__(self) -> str:
        return f"Embedder({self.source!r}, dim={self._dim}, metric={self._metric!r})"

    # ------------------------------------------------------------------ work

    def preprocess(self, inputs: Inputs) -> torch.Tensor:
        """Model inputs float32 (N, C, H, W) from paths, PIL images, arrays or tensors (see
        :meth:`deepmetric.data.Preprocessing.apply`). Without preprocessing (vector data, or a
        ``fit()`` run): float tensors (N, ...) only, passed through."""
        if self.preprocessing is not None:
            return self.preprocessing.apply(inputs)
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(
                f"{self.source or 'this model'} has no recorded preprocessing (not image data, "
                "or trained by fit() on Python objects): pass model inputs as a float tensor "
                "(N, ...), or give Embedder.from_run a preprocessing="
            )
        if not inputs.is_floating_point() or inputs.dim() < 2:
            raise ValueError(
                f"inputs must be a float tensor (N, ...), got {inputs.dtype} {tuple(inputs.shape)}"
            )
        return inputs.detach().to("cpu", torch.float32)

    def embed(self, inputs: Inputs, batch_size: int = 256) -> torch.Tensor:
        """Embeddings float32 (N, D) on the CPU, ``batch_size`` inputs preprocessed and run at a
        time (eval mode, no autograd)."""
        positive_int("batch_size", batch_size)
        out = []
        for chunk in _chunks(inputs, batch_size):
            x = self.preprocess(chunk)
            if len(x):
                out.append(self._forward(x))
        return torch.cat(out) if out else torch.zeros(0, self._dim)

    def verify(self, a: Inputs, b: Inputs) -> list[Verification]:
        """Decide pairs ``(a[i], b[i])``: ``same`` when their distance ``<= threshold``.

        ``a`` and ``b`` hold the same number of items, or one of them a single item, which is
        then compared with each item of the other (one against many).
        """
        t = self.threshold.value
        ea, eb = self.embed(a), self.embed(b)
        if len(ea) != len(eb) and 1 not in (len(ea), len(eb)):
            raise ValueError(
                f"verify needs as many a as b (or one of either), got {len(ea)} and {len(eb)}"
            )
        if len(ea) == 0 or len(eb) == 0:
            return []
        ea, eb = torch.broadcast_tensors(ea, eb)
        distances = paired(ea.contiguous(), eb.contiguous(), self._metric).tolist()
        return [Verification(d, t, d <= t) for d in distances]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        checkpoint: str = "latest",
        device: str | torch.device = "auto",
        *,
        calibrate: bool = True,
        preprocessing: Preprocessing | None = None,
        progress: Progress = print_stderr,
    ) -> Embedder:
        """The network of ``run_dir`` at ``checkpoint`` (``latest`` or a name in
        ``RUN_DIR/checkpoints``) on ``device`` (``auto``: CUDA when available, else CPU).

        The threshold: ``threshold.json`` when it belongs to these weights; otherwise, with
        ``calibrate``, one chosen on the validation split (saved for the latest checkpoint;
        ``progress`` gets one line saying so). A ``fit()`` run is rebuilt with its registered
        builder (see :meth:`deepmetric.runs.Run.network`).
        """
        run = _load_run(run_dir, checkpoint, device)
        embedder = _build(run, preprocessing)
        if embedder.has_threshold or not calibrate:
            return embedder
        try:
            threshold = _calibrate(embedder, run, far=None)
        except ValueError as error:
            return embedder._with_threshold(None, str(error))
        progress(
            f"{run.run_dir} had no threshold for these weights: chose {threshold.value:.4f} "
            f"({threshold.metric}) on its validation split ({threshold.validation_items} "
            f"items); {_save(run, threshold)}"
        )
        return embedder._with_threshold(threshold, "")

    def _with_threshold(self, threshold: Threshold | None, why: str) -> Embedder:
        """The same model with another threshold (or none, ``why``)."""
        return Embedder(
            forward=self._forward,
            preprocessing=self.preprocessing,
            metric=self._metric,
            dim=self._dim,
            weights_sha256=self._weights,
            threshold=threshold,
            no_threshold=why,
            module=self.module,
            source=self.source,
            device=self._device,
        )

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str | torch.device = "auto",
        calibrate: bool = False,
        progress: Progress = print_stderr,
    ) -> Embedder:
        """The one way from a path to an Embedder: a run folder (:meth:`from_run` on
        ``device``, its threshold chosen and saved when it has none only with ``calibrate``)
        or an exported ``.onnx`` file (:meth:`from_onnx`). Anything else is a one-line
        ``ValueError`` naming the path: missing, or neither."""
        path = Path(source)
        if path.is_dir():
            return cls.from_run(path, device=device, calibrate=calibrate, progress=progress)
        if path.suffix.lower() == ".onnx" and path.is_file():
            return cls.from_onnx(path)
        if not path.exists():
            raise ValueError(f"the model {path} does not exist (moved or deleted?)")
        raise ValueError(f"{path}: neither a run folder nor an .onnx file")

    @classmethod
    def from_onnx(cls, path: str | Path) -> Embedder:
        """An exported model (``deepmetric export``): onnxruntime on the CPU, default threads;
        preprocessing, metric and threshold from the file's metadata, the identity computed
        from the graph's weights (a file changed after its export has not its run's identity,
        nor its threshold: see :mod:`deepmetric.inference.export`)."""
        return cls(**read_onnx(path)._asdict())


# ---------------------------------------------------------------------------- helpers


def _chunks(inputs: Inputs, size: int) -> list[Any]:
    """``inputs`` cut into batches of at most ``size`` items (along N for arrays/tensors)."""
    from PIL import Image

    if isinstance(inputs, str | os.PathLike | Image.Image):
        return [inputs]
    if isinstance(inputs, np.ndarray) and inputs.ndim == 2:  # one (H, W) image
        return [inputs]
    if isinstance(inputs, np.ndarray | torch.Tensor):
        return [inputs[i : i + size] for i in range(0, len(inputs), size)] or [inputs]
    if isinstance(inputs, Sequence):
        items = list(inputs)
        return [items[i : i + size] for i in range(0, len(items), size)]
    raise ValueError(
        f"cannot embed a {type(inputs).__name__}: give image paths, PIL images, a numpy array "
        "or a tensor (or a list of paths / images)"
    )


class _Run(NamedTuple):
    run: Run
    net: nn.Module
    device: torch.device
    latest: bool  # the checkpoint is the one ``checkpoints/latest`` names, and it loaded

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def config(self) -> Config:
        return self.run.config


def _load_run(run_dir: str | Path, checkpoint: str, device: str | torch.device) -> _Run:
    torch_device = resolve_device(device)  # a bad or absent device: said before any loading
    run = Run.open(run_dir)
    loaded = run.network(checkpoint)
    loaded.net.to(torch_device).eval()
    return _Run(run, loaded.net, torch_device, loaded.latest)


def _build(run: _Run, preprocessing: Preprocessing | None) -> Embedder:
    """The Embedder of a loaded run, with its saved threshold when that fits the weights."""
    pre = preprocessing or run.run.inference_preprocessing()
    weights = weights_sha256(run.net.state_dict())
    threshold, why = _saved_threshold(run, weights)
    return Embedder(
        forward=_torch_forward(run.net, run.device),
        preprocessing=pre,
        metric=run.config.loss.metric,
        dim=_output_dim(run.net, run.config, pre),
        weights_sha256=weights,
        threshold=threshold,
        no_threshold=why,
        module=run.net,
        source=str(run.run_dir),
        device=run.device,
    )


def _output_dim(net: nn.Module, config: Config, pre: Preprocessing | None) -> int:
    """D: one forward pass when the input shape is known, else the network's ``dim``."""
    if pre is None:
        return int(getattr(net, "dim", config.model.dim))
    device = next(net.parameters()).device
    with torch.inference_mode():
        return int(net(torch.zeros(1, *pre.shape, device=device)).shape[1])


def _torch_forward(net: nn.Module, device: torch.device) -> Forward:
    net.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.to(device)).float().cpu()

    return forward


def _saved_threshold(run: _Run, weights: str) -> tuple[Threshold | None, str]:
    """``threshold.json`` when it belongs to these weights (and metric), else why not."""
    path = run.run.threshold_path
    saved = run.run.threshold()
    if saved is None:
        return None, f"{run.run_dir} has no {THRESHOLD_FILE}"
    if saved.metric != run.config.loss.metric:
        return None, f"{path} is in {saved.metric} distance, the model in {run.config.loss.metric}"
    if saved.weights_sha256 is None and run.latest:  # by `deepmetric evaluate`: latest weights
        return saved, ""
    if saved.weights_sha256 == weights:
        return saved, ""
    return None, f"{path} was chosen for other weights"


def _no_validation(run: _Run) -> str:
    config = run.config
    if config.from_fit:
        return (
            f"{run.run_dir} was trained by fit() on Python objects, so its validation data is "
            "not in the run folder: choose a threshold on held-out labelled data with "
            f"deepmetric.inference.calibrate_threshold({str(run.run_dir)!r}, data=(inputs, "
            "labels)); never on the pairs it will judge"
        )
    return (
        f"{run.run_dir} has no validation split (train.val_fraction=0), and a threshold must be "
        "chosen on data the model did not train on: retrain with train.val_fraction=0.1 (or "
        "train.val_classes=[...]), or choose one on held-out labelled data with "
        f"deepmetric.inference.calibrate_threshold({str(run.run_dir)!r}, data=(inputs, labels))"
    )


def _calibrate(
    embedder: Embedder,
    run: _Run,
    *,
    far: float | None,
    data: tuple[Inputs, Any] | None = None,
) -> Threshold:
    """Choose the threshold on the run's validation split (or on ``data``, held out)."""
    if data is not None:
        inputs, labels = data
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        emb = embedder.embed(inputs)
        if len(emb) != len(y):
            raise ValueError(f"data: {len(emb)} inputs but {len(y)} labels")
        rule = "" if far is None else f" at a false accept rate <= {far:g}"
        protocol = (
            f"threshold chosen on held-out data given by the caller{rule}, not on these pairs"
        )
    elif tuple_kind(run.config.data) is not None:  # a pairs: / triplets: run
        return _calibrate_on_pairs(embedder, run, far=far)
    else:
        no_split = run.config.train.val_fraction == 0 and run.config.train.val_classes is None
        if run.config.from_fit or no_split:
            raise ValueError(_no_validation(run))
        try:
            _, val = load_data(run.config)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{run.run_dir}: its validation split, to choose a threshold on, cannot be "
                f"loaded: {error}"
            ) from None
        if len(val) == 0:
            raise ValueError(_no_validation(run))
        y, emb = val.y, embedder.embed(val.inputs[:])
        protocol = VALIDATION_PROTOCOL if far is None else far_protocol(far)
    try:
        value = fit_threshold(emb, y, metric=embedder.metric, far=far, seed=run.config.seed)
    except ValueError as error:
        raise ValueError(f"{run.run_dir}: cannot choose a threshold: {error}") from None
    return Threshold(
        value=value,
        metric=embedder.metric,
        protocol=protocol,
        far=far,
        validation_items=len(y),
        weights_sha256=embedder.model_identity.weights_sha256,
    )


def _calibrate_on_pairs(embedder: Embedder, run: _Run, *, far: float | None) -> Threshold:
    """The threshold of a ``pairs:`` run, chosen on its validation pairs
    (:func:`~deepmetric.evaluate.tuples.validation_pair_distances`); a ``triplets:`` run has
    no same / different label to choose one on."""
    config, where = run.config, str(run.run_dir)
    held_out = (
        "choose one on held-out labelled data with deepmetric.inference.calibrate_threshold("
        f"{where!r}, data=(inputs, labels))"
    )
    if tuple_kind(config.data) == "triplets":
        raise ValueError(
            f"{where} trained on triplets ({config.data}): a triplet says which of two images is "
            f"closer, not whether two are the same, so it gives no threshold: {held_out}"
        )
    if config.train.val_fraction == 0:
        raise ValueError(
            f"{where} has no validation pairs (train.val_fraction=0), and a threshold must be "
            f"chosen on pairs the model did not train on: retrain with train.val_fraction=0.1, "
            f"or {held_out}"
        )
    try:
        dist, same, pairs = validation_pair_distances(embedder.embed, config)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{where}: its validation pairs, to choose a threshold on, cannot be loaded: {error}"
        ) from None
    try:
        value = threshold_of_pairs(dist, same, far=far)
    except ValueError as error:
        raise ValueError(f"{where}: cannot choose a threshold: {error}") from None
    return Threshold(
        value=value,
        metric=embedder.metric,
        protocol=VALIDATION_PROTOCOL if far is None else far_protocol(far),
        far=far,
        validation_items=pairs,
        weights_sha256=embedder.model_identity.weights_sha256,
    )


def _save(run: _Run, threshold: Threshold) -> str:
    """Save into ``threshold.json`` for the latest checkpoint; say where (or why not)."""
    if not run.latest:
        return f"not saved ({THRESHOLD_FILE} is for the latest checkpoint, left as it is)"
    return f"saved to {run.run.write_threshold(threshold)}"


def calibrate_threshold(
    run_dir: str | Path,
    far: float | None = None,
    *,
    checkpoint: str = "latest",
    device: str | torch.device = "auto",
    data: tuple[Inputs, Any] | None = None,
    save: bool = True,
    progress: Progress = print_stderr,
) -> Threshold:
    """Choose the verification threshold of a run and save it in ``RUN_DIR/threshold.json``
    (``save=False``: only return it, e.g. for a gallery that keeps its own).

    On the run's validation split only (:func:`deepmetric.data.training_data.load_data`),
    never on data it will judge: ``far=None``: the accuracy-maximising threshold (as
    ``deepmetric evaluate``);
    ``far=1e-3``: the largest threshold with a false accept rate ``<= far`` on the validation
    pairs. ``data=(inputs, labels)``: held-out labelled data instead (for runs without a
    validation split). Saved only for the latest checkpoint. Raises ``ValueError`` (saying how
    to get a validation split) when there is none.
    """
    if far is not None and not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    run = _load_run(run_dir, checkpoint, device)
    embedder = _build(run, None)
    threshold = _calibrate(embedder, run, far=far, data=data)
    where = _save(run, threshold) if save else "not saved"
    rule = "best accuracy" if far is None else f"FAR <= {far:g}"
    progress(
        f"threshold {threshold.value:.4f} ({threshold.metric}, {rule}) chosen on "
        f"{threshold.validation_items} held-out items; {where}"
    )
    return threshold


__all__ = ["Embedder", "Verification", "calibrate_threshold", "print_stderr", "weights_sha256"]
