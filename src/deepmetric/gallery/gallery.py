"""The gallery people use: enroll identities from images, identify new images, with an open-set
"unknown" answer.

A :class:`Gallery` ties together one model (:class:`~deepmetric.inference.Embedder`), one
store (:class:`~deepmetric.gallery.store.GalleryStore`, the source of truth) and one search
index derived from it (:func:`~deepmetric.gallery.index.make_index`).

**Files.** A gallery ``G`` (e.g. ``people.db``) is:

- ``G``: the SQLite database (identities, example embeddings, PNG thumbnails, and the meta
  record: the model identity, metric, dim, the threshold record and the model ``source``);
  ``G-wal`` and ``G-shm`` are SQLite's write-ahead log beside it while it is open: committed
  writes may live in ``G-wal`` until a checkpoint folds them into ``G`` (at every close and
  every ``gallery check``). Back it up with ``deepmetric gallery backup G COPY``
  (:meth:`GalleryStore.backup <deepmetric.gallery.store.GalleryStore.backup>`: SQLite's
  online backup, consistent while other processes write); never copy ``G`` alone while a
  ``G-wal`` lies beside it.
- ``G.index/``: the search index, derived from the database (``header.json`` with the store
  generation it reflects, the database's random gallery id and the sha256 of each file,
  ``ids.npy``, ``alive.npy``, ``vectors.npy`` or ``index.faiss``). Deleting it loses
  nothing: the next open rebuilds it.
- or, for a gallery created with ``index="milvus-lite:PATH.db"`` or
  ``"milvus://HOST:PORT/COLLECTION"``, a Milvus collection instead of ``G.index/``, recorded in
  the meta record (:mod:`~deepmetric.gallery.milvus_index`): every enroll / remove reaches it
  right after the database, it records the store generation it reflects, and an open finding
  it behind the database (a process killed between the two writes) catches it up.

**The decision.** For a query embedding ``q`` the index gives the k nearest distinct
identities, each with the distance to its nearest example:
``d(q, I) = min over examples e of I of d(q, e)`` (the gallery's metric). The answer is the
nearest identity ``I*`` when ``d(q, I*) <= t``, else ``None`` ("unknown"); ``t`` is the
threshold recorded at :meth:`Gallery.create`: the run's verification threshold, chosen on its
validation split (accuracy-maximising, or at a false accept rate with ``far=``), never on the
gallery's own data. An empty gallery answers unknown. The embedder's metric, the index's
metric and the threshold's metric are one and the same (checked at open).

**Model identity.** Embeddings of different models are not comparable, so the gallery keeps
the :meth:`~deepmetric.inference.Embedder.identity` of the model that made them (weights
sha256, preprocessing, dim, metric) and refuses to open with any other model
(:class:`ModelMismatchError`); an ONNX export of the same run has the same identity and is
accepted.

**Device.** The index computes where the model does (:attr:`Embedder.device`: ``Gallery.open``
and the CLI's ``--device`` load the model there; an ONNX model runs on the CPU): an exact
index keeps its vectors on that GPU, a faiss one stays on the CPU. Results are the same
either way (distances to float32 rounding).

**The index stays in step with the database.** The store's ``generation`` counts changes to
its examples. On open, the saved index is used when it was built from this database (the
same random gallery id: not a database restored or copied over this one), saved at the store's
current generation, holds as many examples and its files match their sha256; otherwise it is
rebuilt from the database and saved.
:meth:`Gallery.enroll` and :meth:`Gallery.remove` update the in-memory index incrementally
(never a rebuild per call); :meth:`Gallery.identify` first compares the generation with the
index's (one small query) and rebuilds when another process changed the database meanwhile.
:meth:`Gallery.close` saves the index when it changed; :meth:`Gallery.reindex` rebuilds it.
:meth:`Gallery.check` (``deepmetric gallery check [--repair]``) compares the saved index with
the database (ids, vectors, tombstones, generation) and rebuilds it when asked.

**After a crash** (a process killed at any instant, SIGKILL included): the database holds
every enroll / remove that returned, each whole, plus at most the one in flight (whole or not
at all: one transaction); the saved index may be behind the database, or missing, with a
leftover temporary folder beside it when the kill hit a save: the next open rebuilds it, and
``gallery check --repair`` removes the leftovers (``tests/test_reliability_gallery.py``).

Example::

    embedder = Embedder.from_run("runs/fashion_mnist")
    with Gallery.create("people.db", embedder) as gallery:
        gallery.enroll("ada", ["ada1.png", "ada2.png"])
        [answer] = gallery.identify("someone.png")
        answer.identity  # "ada", or None for unknown
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from deepmetric.checks import positive_int
from deepmetric.data.preprocess import Inputs, decode_image
from deepmetric.files import Progress
from deepmetric.gallery.index import (
    INDEX_SUFFIX,
    GalleryIndex,
    IdentityMatches,
    IndexFileError,
    build_index,
    index_path,
    load_index,
    top_identities,
)
from deepmetric.gallery.milvus_index import (
    MilvusIndex,
    collection_absent,
    parse_index_spec,
    target_of,
)
from deepmetric.gallery.shared import IndexSlot
from deepmetric.gallery.store import (
    GalleryError,
    GalleryExistsError,
    GalleryStore,
    IdentityInfo,
    UnknownExampleError,
    check_name,
)
from deepmetric.inference import Embedder, Threshold, calibrate_threshold

if TYPE_CHECKING:
    from deepmetric.gallery.check import CheckReport

__all__ = [
    "INDEX_SUFFIX",
    "MAX_CANDIDATES",
    "SAME_EXAMPLE_ATOL",
    "THUMBNAIL_SIZE",
    "Candidate",
    "Gallery",
    "Identification",
    "ModelMismatchError",
    "build_index",
    "index_path",
    "load_embedder",
]

#: thumbnails fit in this many pixels, longest side
THUMBNAIL_SIZE = 64
#: the most candidate identities the command line and the service answer per query
MAX_CANDIDATES = 100
#: embeddings of the same image equal to this, per value, on any device (CPU / CUDA differ)
SAME_EXAMPLE_ATOL = 5e-3


class ModelMismatchError(GalleryError, ValueError):
    """The gallery's embeddings were made by another model than the one given."""


class Candidate(NamedTuple):
    """An enrolled identity and the distance from the query to its nearest example."""

    identity: str
    distance: float

    def to_json(self) -> dict[str, Any]:
        """``{"identity", "distance"}``, as in :meth:`Identification.to_json`."""
        return {"identity": self.identity, "distance": self.distance}


class Identification(NamedTuple):
    """The answer for one query.

    ``identity``: the nearest identity when ``distance <= threshold``, else ``None``
    (unknown); ``distance``: to the nearest example of the nearest identity (``inf`` for an
    empty gallery); ``candidates``: the k nearest identities, each once, nearest first.
    """

    identity: str | None
    distance: float
    threshold: float
    candidates: list[Candidate]

    def to_json(self, input: str | None) -> dict[str, Any]:
        """The record of ``deepmetric gallery identify --json`` and of each file in the
        service's ``POST /identify``: ``{"input", "identity", "distance", "threshold",
        "candidates"}`` (``input``: the file's name as given; ``distance``: ``null`` when
        not finite, i.e. for an empty gallery)."""
        return {
            "input": input,
            "identity": self.identity,
            "distance": self.distance if math.isfinite(self.distance) else None,
            "threshold": self.threshold,
            "candidates": [c.to_json() for c in self.candidates],
        }


def _describe(identity: Mapping[str, Any]) -> str:
    weights = str(identity.get("weights_sha256", "?"))[:12]
    pre = identity.get("preprocessing")
    shape = "no preprocessing"
    if isinstance(pre, Mapping):
        shape = f"{pre.get('channels')}x{pre.get('height')}x{pre.get('width')} input"
    return f"weights {weights}..., {shape}, {identity.get('dim')}-d, {identity.get('metric')}"


def _source_of(embedder: Embedder, source: str | Path | None) -> str | None:
    """The absolute path the model can be reloaded from (a run folder or an .onnx file)."""
    chosen = source if source is not None else (embedder.source or None)
    return None if chosen is None else str(Path(chosen).resolve())


def load_embedder(source: str | Path, *, device: str = "auto") -> Embedder:
    """The Embedder of a run folder or an ``.onnx`` file (no threshold calibration: a
    gallery carries its own threshold)."""
    return Embedder.load(source, device=device)


def _far_threshold(
    embedder: Embedder, source: str | None, far: float, progress: Progress
) -> Threshold:
    """The threshold at false accept rate ``far`` on the run's validation split, chosen by
    :func:`calibrate_threshold`. The run's own ``threshold.json`` (what ``verify`` uses) is
    left as it was: the gallery keeps its threshold in its own meta record."""
    if source is None or not Path(source).is_dir():
        raise ValueError(
            f"far={far:g} chooses the threshold on the run's validation split, so it needs "
            f"the run folder, not {source or 'a model without a source'} (an ONNX file "
            "carries only the threshold it was exported with)"
        )
    run = Path(source)
    threshold = calibrate_threshold(
        run, far=far, device=embedder.device, save=False, progress=lambda _: None
    )  # where the given model runs: the distances it will be compared with
    if threshold.weights_sha256 != embedder.identity()["weights_sha256"]:
        raise ModelMismatchError(
            f"the threshold chosen on {run} is for the run's latest weights, not the ones "
            "given: create the gallery with the embedder of the run's latest checkpoint"
        )
    progress(
        f"threshold {threshold.value:.4f} ({threshold.metric}) chosen at a false accept rate "
        f"<= {far:g} on {threshold.validation_items} validation items of {run}; kept in the "
        "gallery (the run's threshold.json is unchanged)"
    )
    return threshold


# --------------------------------------------------------------------------- thumbnails


def _png(image: Any) -> bytes:
    """A PIL image as a PNG thumbnail of at most :data:`THUMBNAIL_SIZE` px, longest side."""
    from PIL import Image, ImageOps

    # A damaged EXIF block: the thumbnail as stored, unrotated (embedding it named the file).
    with contextlib.suppress(SyntaxError, ValueError, OSError, KeyError, TypeError):
        image = ImageOps.exif_transpose(image) or image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(wide.max()), 1.0)
        image = Image.fromarray(np.clip(wide / top * 255, 0, 255).astype(np.uint8), "L")
    elif image.mode not in ("L", "RGB", "RGBA", "LA"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _thumbnail_of_item(item: Any) -> bytes | None:
    """From the original image: a file path or a PIL image (``None`` if it cannot be read:
    the embedding of that item has already succeeded, so this is not fatal)."""
    from PIL import Image

    try:
        if isinstance(item, Image.Image):
            return _png(item)
        image = decode_image(item, str(item), size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        try:
            return _png(image)
        finally:
            image.close()
    except (OSError, ValueError):
        return None


def _thumbnail_of_input(x: torch.Tensor, scale: float) -> bytes:
    """From one preprocessed input (C, H, W): pixel = value / scale, clipped to 0..255."""
    from PIL import Image

    pixels = (x.detach().float() / scale).round().clamp(0, 255).to(torch.uint8).numpy()
    image = (
        Image.fromarray(pixels[0])
        if pixels.shape[0] == 1
        else Image.fromarray(np.ascontiguousarray(pixels[:3].transpose(1, 2, 0)))
    )
    return _png(image)


def _items(inputs: Inputs) -> list[Any] | None:
    """The inputs as a list of single images (paths / PIL images), or ``None`` for an array
    or tensor batch (then embedded whole)."""
    from PIL import Image

    if isinstance(inputs, str | os.PathLike | Image.Image):
        return [inputs]
    if isinstance(inputs, np.ndarray | torch.Tensor):
        return None
    if isinstance(inputs, Sequence):
        return list(inputs)
    raise ValueError(
        f"cannot enroll a {type(inputs).__name__}: give image paths, PIL images, a numpy "
        "array or a tensor (or a list of paths / images)"
    )


# --------------------------------------------------------------------------- the gallery


class Gallery:
    """Enroll identities, identify queries (open set), over one model and one gallery file.

    Make one with :meth:`create` or :meth:`open`. Use it as a context manager, or call
    :meth:`close` (which saves the index when it changed). A Gallery belongs to the thread
    that opened it; several processes may open the same file.

    Attributes:
        path: the gallery file. embedder: the model. threshold: the open-set
        :class:`~deepmetric.inference.Threshold`. source: where the model is reloaded from.
        index_builds: how often this object built its index from the database (0 when the
        saved index was current at open and nothing else changed the database since).
    """

    def __init__(
        self,
        *,
        store: GalleryStore,
        embedder: Embedder,
        threshold: Threshold,
        source: str | None,
        progress: Progress | None = None,
        slot: IndexSlot | None = None,
    ) -> None:
        self._store = store
        self.path = store.path
        self.embedder = embedder
        self.threshold = threshold
        self.source = source
        self._progress = progress
        self.index_builds = 0
        #: the index and its lock; shared with the other Gallery objects given the same slot
        self._slot = IndexSlot() if slot is None else slot
        #: the Milvus collection holding the vectors, or None: the index folder
        self._target = target_of(store.meta, store.path)
        metrics = {store.metric, embedder.metric, threshold.metric}
        if len(metrics) != 1:
            raise ModelMismatchError(
                f"{self.path}: one metric is needed end to end, got the gallery's "
                f"{store.metric}, the model's {embedder.metric} and the threshold's "
                f"{threshold.metric}"
            )
        if store.dim != embedder.dim:
            raise ModelMismatchError(
                f"{self.path} holds {store.dim}-d embeddings, the model makes {embedder.dim}-d"
            )
        with self._slot.lock.writing():
            if self._slot.index is None:
                self._slot.index = self._load_or_build()
                self._slot.gallery_id = store.gallery_id
            elif self._slot.gallery_id != store.gallery_id:
                raise GalleryError(
                    f"{self.path}: the shared index slot holds another gallery's index "
                    "(one slot serves one gallery file)"
                )
            self._slot.users += 1

    @property
    def _index(self) -> GalleryIndex:
        index = self._slot.index
        assert index is not None
        return index

    @_index.setter
    def _index(self, index: GalleryIndex) -> None:
        self._slot.index = index

    @property
    def _saved_generation(self) -> int | None:
        return self._slot.saved_generation

    @_saved_generation.setter
    def _saved_generation(self, generation: int | None) -> None:
        self._slot.saved_generation = generation

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: str | Path,
        embedder: Embedder,
        *,
        far: float | None = None,
        source: str | Path | None = None,
        progress: Progress | None = None,
        index: str | None = None,
    ) -> Gallery:
        """A new, empty gallery file at ``path`` for ``embedder`` (never overwrites one).

        Args:
            path: the gallery file to create (must not exist); its index goes to
                ``path`` + ``.index``.
            embedder: the model; its :meth:`~deepmetric.inference.Embedder.identity` is
                recorded and checked at every open.
            far: ``None``: the threshold is ``embedder.threshold`` (the run's, chosen on its
                validation split); a rate in [0, 1]: the largest threshold with a false accept
                rate ``<= far`` on the run's validation pairs (:func:`calibrate_threshold`;
                needs the run folder as ``source``). Never chosen on gallery data.
            source: how to reload the model (a run folder or ``.onnx`` file), stored as an
                absolute path; default ``embedder.source``.
            progress: gets one line per step worth saying (threshold calibration).
            index: where the vectors are searched: ``None`` / ``"local"``: the index folder
                ``path`` + ``.index`` (kind chosen by size); ``"milvus-lite:PATH.db"`` or
                ``"milvus://HOST:PORT/COLLECTION"``: a Milvus collection
                (:mod:`~deepmetric.gallery.milvus_index`), recorded in the gallery so every
                open uses it; it must not exist yet (checked before anything is written).

        Raises:
            GalleryExistsError: ``path`` exists. ValueError: no threshold (the message says
            how to get one), ``far`` without a run folder, or a bad ``index``.
            MilvusIndexError: the collection cannot be reached, or exists already.
        """
        path = Path(path)
        where = _source_of(embedder, source)
        if path.exists():  # before any work (calibration); the store refuses it again
            raise GalleryExistsError(f"{path} already exists; not overwriting it")
        target = parse_index_spec(index, path)
        if target is not None:  # reachable, and no collection of that name yet
            collection_absent(target)
        if far is not None:
            if not 0.0 <= far <= 1.0:
                raise ValueError(f"far must be in [0, 1], got {far}")
            threshold = _far_threshold(embedder, where, far, progress or (lambda _: None))
        else:
            threshold = embedder.threshold
        folder = index_path(path)
        if folder.exists():  # an orphan of a deleted gallery: never reuse it for this one
            if not (folder / "header.json").is_file():
                raise GalleryError(f"{folder} exists and is not a gallery index; move it away")
            shutil.rmtree(folder)
        meta = {
            "dim": embedder.dim,
            "metric": embedder.metric,
            "model": embedder.identity(),
            "threshold": threshold.to_json(),
            "source": where,
        }
        if target is not None:
            meta["index"] = target.to_json()
        store = GalleryStore.create(path, meta=meta)
        try:
            return cls(
                store=store,
                embedder=embedder,
                threshold=threshold,
                source=where,
                progress=progress,
            )
        except BaseException:
            store.close()
            if target is not None:  # the collection could not be made: no gallery either
                for leftover in (path, path.with_name(path.name + "-wal")):
                    leftover.unlink(missing_ok=True)
                path.with_name(path.name + "-shm").unlink(missing_ok=True)
            raise

    @classmethod
    def open(
        cls,
        path: str | Path,
        embedder: Embedder | None = None,
        *,
        device: str = "auto",
        progress: Progress | None = None,
        timeout: float = 30.0,
        slot: IndexSlot | None = None,
    ) -> Gallery:
        """Open an existing gallery (read-only when its file or folder cannot be written:
        identify works, enroll / remove raise ``GalleryReadOnlyError``).

        Args:
            path: the gallery file.
            embedder: the model; ``None``: reloaded from the stored source
                (``Embedder.from_run`` / ``from_onnx``, on ``device``).
            progress: gets one line when the index is rebuilt.
            timeout: seconds a write waits for another process's write lock
                (``GalleryBusyError`` after that).
            slot: an :class:`~deepmetric.gallery.shared.IndexSlot` to share one index with
                the other Gallery objects of this process on this file (one per thread: a
                service's workers); the first to open loads the index into it.

        Raises:
            GalleryNotFoundError / NotAGalleryError: no gallery at ``path``.
            ModelMismatchError: ``embedder`` is not the model the gallery was made with
            (weights, preprocessing, dim or metric differ); the message names both.
            ValueError: the stored source cannot be loaded.
        """
        store = GalleryStore.open(path, timeout=timeout)
        try:
            meta = store.meta
            stored = meta.get("model")
            source = meta.get("source")
            if not isinstance(stored, dict) or "threshold" not in meta or meta["threshold"] is None:
                raise GalleryError(
                    f"{store.path} is a gallery store without a model or threshold record "
                    "(not made by Gallery.create)"
                )
            threshold = Threshold.from_json(meta["threshold"], f"{store.path} threshold")
            if embedder is None:
                if not source:
                    raise ValueError(f"{store.path} records no model source: pass an embedder")
                try:
                    embedder = load_embedder(source, device=device)
                except ValueError as error:
                    raise ValueError(
                        f"{store.path}: cannot load its model: {error}; pass the model "
                        "explicitly (--run)"
                    ) from None
            given = embedder.identity()
            if given != stored:
                differ = [
                    k
                    for k in ("weights_sha256", "preprocessing", "dim", "metric")
                    if given.get(k) != stored.get(k)
                ]
                raise ModelMismatchError(
                    f"{store.path} was made with another model ({', '.join(differ)} differ): "
                    f"the gallery's is {source or '(no source)'} ({_describe(stored)}), the "
                    f"one given is {embedder.source or '(no source)'} ({_describe(given)}); "
                    "embeddings of different models cannot be compared: open it with its own "
                    "model, or create a new gallery and enroll again"
                )
            return cls(
                store=store,
                embedder=embedder,
                threshold=threshold,
                source=source,
                progress=progress,
                slot=slot,
            )
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Save the index if it changed and is current, then close the database (and the
        index, unless other Gallery objects of a shared slot still use it)."""
        with self._slot.lock.writing():
            self._slot.users -= 1
            try:
                if self._index.generation == self._store.generation:
                    self._save_index()
            finally:
                try:
                    if self._slot.users == 0:
                        self._index.close()
                finally:
                    self._store.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Gallery({str(self.path)!r}, identities={self._store.num_identities}, "
            f"examples={self._store.num_examples}, {self.embedder.dim}-d "
            f"{self.embedder.metric}, threshold={self.threshold.value:.4g})"
        )

    # ------------------------------------------------------------------ index

    @property
    def index_path(self) -> Path:
        """The folder the index is saved in: the gallery file + ``.index``."""
        return index_path(self.path)

    @property
    def index_location(self) -> str:
        """Where the index is: its folder, or the Milvus collection (``milvus-lite:PATH#NAME``,
        ``milvus://HOST:PORT/NAME``)."""
        return str(self.index_path if self._target is None else self._target)

    @property
    def index(self) -> GalleryIndex:
        """The in-memory search index (derived; do not change it directly)."""
        return self._index

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)

    def _build(self, *, full: bool = False) -> GalleryIndex:
        """A new index of every example in the database, at the store's generation, where the
        model computes (:attr:`Embedder.device`; faiss indexes stay on the CPU). A Milvus
        collection is brought up to date instead (by difference; ``full``: rebuilt)."""
        self.index_builds += 1
        if self._target is not None:
            assert isinstance(self._index, MilvusIndex)
            if full:
                self._index.sync(self._store, full=True)
            elif (done := self._index.follow(self._store)) is not None:
                self._say(f"{self._target} was behind {self.path}: caught up ({done})")
            return self._index
        return build_index(self._store).to(self.embedder.device)

    def _load_or_build(self) -> GalleryIndex:
        """The saved index when it reflects the database now, else a rebuilt (and saved) one."""
        store = self._store
        if self._target is not None:
            return self._open_collection()
        try:
            saved = load_index(self.index_path)
        except (IndexFileError, OSError):
            saved = None
        if (
            saved is not None
            and saved.gallery_id == store.gallery_id
            and saved.generation == store.generation
            and saved.dim == store.dim
            and saved.metric == store.metric
            and len(saved) == store.num_examples
        ):
            self._saved_generation = saved.generation
            return saved.to(self.embedder.device)
        if saved is not None and saved.gallery_id != store.gallery_id:
            self._say(f"{self.index_path} was built from another gallery: rebuilding it")
        elif saved is not None:
            self._say(f"{self.index_path} is out of date: rebuilding it from {self.path}")
        self._index = self._build()
        self._save_index()
        return self._index

    def _open_collection(self) -> MilvusIndex:
        """The gallery's Milvus collection (refused in one line when it is another gallery's,
        or of another dim or metric), repaired when it is behind the database (a process
        killed between its two writes), made when missing."""
        assert self._target is not None
        store = self._store
        index = MilvusIndex(
            self._target,
            dim=store.dim,
            metric=store.metric,  # type: ignore[arg-type]
            gallery_id=store.gallery_id,
            create=True,
        )
        try:
            recorded = index.generation
            done = index.follow(store)
        except BaseException:
            index.close()
            raise
        if done is not None and index.created:
            if store.num_examples:
                self._say(f"{self._target} was missing: made from {self.path} ({done})")
        elif done is not None:
            self._say(
                f"{self._target} was behind {self.path} (generation {recorded}, the database "
                f"is at {index.generation}): repaired on open ({done})"
            )
        self._saved_generation = index.generation
        return index

    def _save_index(self) -> None:
        """Save the index when the saved one differs. Best effort: the index is derived, so a
        failed save (another process saving at the same moment, a read-only folder) only
        means the next open rebuilds it."""
        if self._index.generation == self._saved_generation:
            return
        if self._index.external:  # the collection: record its generation
            self._index.save()
            self._saved_generation = self._index.generation
            return
        try:
            self._index.save(self.index_path)
        except FileExistsError:
            raise GalleryError(
                f"{self.index_path} exists and is not a gallery index; move it away"
            ) from None
        except OSError:
            return
        self._saved_generation = self._index.generation

    def _refresh(self) -> None:
        """Rebuild the index when the database changed behind it (another process wrote)."""
        if self._index.generation != self._store.generation:
            self._say(f"{self.path} changed in another process: rebuilding the index")
            self._index = self._build()

    def reindex(self) -> int:
        """Rebuild the index from the database (index type chosen for its size) and save it;
        returns the number of examples indexed."""
        with self._slot.lock.writing():
            self._index = self._build(full=True)
            self._saved_generation = None
            self._save_index()
            return len(self._index)

    def _after_write(self, before: int, apply: Callable[[GalleryIndex], None]) -> None:
        """Apply our own write to the index when it was the only change since ``before``
        (the store generation before it); otherwise another process wrote too: rebuild."""
        after = self._store.generation
        if self._index.generation == before and after == before + 1:
            apply(self._index)
            self._index.generation = after
            if self._index.external:  # the collection records it at once
                self._save_index()
        else:
            self._index = self._build()

    # ------------------------------------------------------------------ enroll / remove

    def enroll(
        self,
        identity: str,
        inputs: Inputs,
        metadata: Mapping[str, Any] | None = None,
        *,
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> list[int]:
        """Enroll one or more examples of ``identity`` (a new name, or more examples of an
        enrolled one).

        Args:
            identity: the name (any text; see :func:`~deepmetric.gallery.store.check_name`).
            inputs: whatever :meth:`Embedder.preprocess` takes: a path, a PIL image, a list
                of them, a numpy array (H, W) / (N, H, W[, C]), or model inputs (N, C, H, W).
            metadata: a JSON object kept with the identity (merged into an enrolled one's).
            batch_size: images embedded at a time.
            progress: gets a line per batch ("NAME: 256 / 1000 examples embedded").

        Every example is embedded and gets a PNG thumbnail (at most 64 px, longest side: from
        the original image for a file or PIL image, else from the preprocessed input), then all
        are written in one store transaction (all or nothing), then added to the index.

        Returns:
            The new example ids, in input order.
        """
        check_name(identity)
        positive_int("batch_size", batch_size)
        items = _items(inputs)
        pre = self.embedder.preprocessing
        chunks: list[torch.Tensor] = []
        thumbs: list[bytes | None] = []
        if items is None:  # one array / tensor batch
            x = self.embedder.preprocess(inputs)
            total = len(x)
            for start in range(0, total, batch_size):
                part = x[start : start + batch_size]
                chunks.append(self.embedder.embed(part, batch_size=batch_size))
                if pre is not None and part.dim() == 4:
                    thumbs += [_thumbnail_of_input(row, pre.scale) for row in part]
                else:
                    thumbs += [None] * len(part)
                if progress is not None:
                    progress(f"{identity}: {start + len(part)} / {total} examples embedded")
        else:
            total = len(items)
            for start in range(0, total, batch_size):
                part = items[start : start + batch_size]
                chunks.append(self.embedder.embed(part, batch_size=batch_size))
                thumbs += [_thumbnail_of_item(item) for item in part]
                if progress is not None:
                    progress(f"{identity}: {start + len(part)} / {total} examples embedded")
        if not chunks or sum(len(c) for c in chunks) == 0:
            raise ValueError(f"nothing to enroll for {identity!r}: no images given")
        embeddings = torch.cat(chunks).numpy()
        with self._slot.lock.writing():
            before = self._store.generation
            self._refresh_before_write(before)
            ids = self._store.add(identity, embeddings, thumbnails=thumbs, metadata=metadata)
            self._after_write(before, lambda index: index.add(embeddings, ids))
        return ids

    def holds(self, identity: str, inputs: Inputs, *, batch_size: int = 256) -> bool:
        """Whether ``identity`` is enrolled with exactly the examples ``inputs`` give (a
        re-run of an enroll that already happened): as many examples, and each embedding of
        ``inputs`` equal to one of the identity's own, one to one, within
        :data:`SAME_EXAMPLE_ATOL` per value (embeddings made on another device differ by
        rounding). ``False`` for a name not enrolled, or enrolled with other or fewer images.
        Embeds ``inputs`` only when the counts agree."""
        try:
            ids = self._store.example_ids(identity)
        except KeyError:  # UnknownIdentityError
            return False
        items = _items(inputs)
        if items is not None and len(items) != len(ids):
            return False
        new = self.embedder.embed(inputs, batch_size=batch_size).numpy()
        if len(new) != len(ids):
            return False
        free = np.ones(len(ids), dtype=bool)
        stored = self._store.examples(ids).embeddings
        for row in new:
            close = free & (np.abs(stored - row).max(axis=1) <= SAME_EXAMPLE_ATOL)
            if not close.any():
                return False
            free[int(np.argmax(close))] = False
        return True

    def check(self, *, repair: bool = False) -> CheckReport:
        """Check that the saved index agrees with the database, and the model record with
        this gallery's model (see :func:`deepmetric.gallery.check.check_gallery`); with
        ``repair``, rebuild the index from the database when it does not, and use it.

        The index is first saved when it changed and is current (as :meth:`close` would), so
        only what happened to the files behind this object's back is reported.
        """
        from deepmetric.gallery.check import check_gallery

        with self._slot.lock.writing():
            self._refresh()
            self._save_index()
            report = check_gallery(
                self.path, repair=repair, embedder=self.embedder, store=self._store
            )
            if report.repaired:
                self._saved_generation = None
                if isinstance(self._index, MilvusIndex):
                    self._index.follow(self._store)  # rebuilt by the check: read it again
                    self._saved_generation = self._index.generation
                else:
                    self._index = self._load_or_build()
            return report

    def _refresh_before_write(self, generation: int) -> None:
        """Bring a stale index up to date first, so our write can be applied to it alone."""
        if self._index.generation != generation:
            self._index = self._build()

    def remove(self, identity: str) -> list[int]:
        """Remove ``identity`` and all its examples; returns their ids.

        Raises:
            UnknownIdentityError (a ``KeyError``): no identity of that name.
        """
        with self._slot.lock.writing():
            before = self._store.generation
            self._refresh_before_write(before)
            ids = self._store.remove(identity)
            self._after_write(before, lambda index: index.remove(ids))
        return ids

    def identities(self) -> list[IdentityInfo]:
        """Every enrolled identity (name, examples, metadata, created), ordered by name."""
        return self._store.identities()

    def identity(self, name: str) -> IdentityInfo:
        """One identity's :class:`~deepmetric.gallery.store.IdentityInfo`
        (``UnknownIdentityError`` if not enrolled)."""
        return self._store.identity(name)

    def thumbnail(self, identity: str) -> bytes | None:
        """The PNG thumbnail of ``identity``'s first example (``None`` if it has none)."""
        return self._store.thumbnail(identity)

    def __len__(self) -> int:
        """The number of enrolled identities."""
        return self._store.num_identities

    def __contains__(self, identity: object) -> bool:
        return identity in self._store

    @property
    def num_examples(self) -> int:
        return self._store.num_examples

    # ------------------------------------------------------------------ identify

    def identify(
        self, inputs: Inputs, k: int = 5, *, batch_size: int = 256
    ) -> list[Identification]:
        """Identify each input: the nearest enrolled identity within the threshold, or
        unknown.

        Args:
            inputs: as :meth:`enroll` (one path gives a list of one answer).
            k: the number of candidate identities to return per input (>= 1).

        Returns:
            One :class:`Identification` per input: ``candidates`` the k nearest identities
            (each once, with the distance to its nearest example, ascending; fewer when fewer
            are enrolled); ``identity`` the first candidate when its ``distance <=
            threshold``, else ``None``; unknown with distance ``inf`` for an empty gallery.
        """
        positive_int("k", k)
        queries = self.embedder.embed(inputs, batch_size=batch_size).numpy()
        return self.identify_embeddings(queries, k=k)

    @contextmanager
    def _current(self) -> Iterator[None]:
        """Hold the index shared, once it reflects the database (rebuilt first, alone, when
        another process or thread wrote since)."""
        lock = self._slot.lock
        while True:
            with lock.reading():
                if self._index.generation == self._store.generation:
                    yield
                    return
            with lock.writing():
                self._refresh()

    def _search(self, queries: np.ndarray, k: int) -> IdentityMatches:
        """The k nearest identities of each query (held under :meth:`_current`)."""
        # never more candidates than identities: a huge k allocates nothing by k
        k = min(k, max(1, self._store.num_identities))
        try:
            return top_identities(self._index, queries, k, self._store.identity_of)
        except UnknownExampleError:
            # Another process removed examples between the search and the name lookup:
            # search an index built from one snapshot, naming the hits from that same snapshot
            # (no second read that could race again); the answer is the gallery as it was then.
            snapshot = self._store.snapshot()
            index = build_index(self._store, snapshot).to(self.embedder.device)
            self.index_builds += 1
            if self._index.external:  # this answer only; the collection catches up next time
                self._index.generation = None
            elif self._slot.users == 1:  # no other Gallery searches it: keep the new one
                self._index = index
            names = dict(zip(snapshot[1].ids.tolist(), snapshot[1].identities, strict=True))
            return top_identities(index, queries, k, lambda ids: [names[int(i)] for i in ids])

    def identify_embeddings(self, queries: np.ndarray, *, k: int = 5) -> list[Identification]:
        """:meth:`identify` for embeddings (q, D) already made by this gallery's model."""
        t = float(self.threshold.value)
        with self._current():
            matches = self._search(queries, k)
        out = []
        for row, names in enumerate(matches.identities):
            candidates = [
                Candidate(str(name), float(matches.distances[row, j]))
                for j, name in enumerate(names)
            ]
            if not candidates:
                out.append(Identification(None, float("inf"), t, []))
                continue
            best = candidates[0]
            accepted = best.distance <= t
            out.append(
                Identification(best.identity if accepted else None, best.distance, t, candidates)
            )
        return out
