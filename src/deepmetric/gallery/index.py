"""Search indexes over gallery examples, derived from the store (which stays the truth).

Contract (as faiss), common to every index (:class:`GalleryIndex`):

- ``add(embeddings (n, D) float, ids (n,) int64 >= 0)``: ids are the store's example ids,
  unique among the live entries (a removed id may come back).
- ``remove(ids)``: tombstones. Removed entries are filtered out of every search at once; the
  storage is compacted by :meth:`~GalleryIndex.rebuild`, called automatically when the
  tombstones exceed ``rebuild_fraction`` (default :data:`REBUILD_FRACTION`) of the stored
  entries, or explicitly.
- ``search(queries (q, D), k) -> SearchResult(distances (q, k) float32, ids (q, k) int64)``,
  each row nearest first; when fewer than k live entries exist (or an approximate index finds
  fewer) the row is padded with id -1 and distance ``inf``.
- ``len(index)``: live entries. ``save(path)`` / ``load(path)`` / :func:`load_index`: a
  folder (``header.json``, ``ids.npy``, ``alive.npy`` and ``vectors.npy`` or a faiss
  ``index.faiss`` written by ``faiss.write_index``); no pickle anywhere. ``header.json``
  records the sha256 of every other file, checked at load: a damaged file, even one whose
  own header still parses, is an :class:`IndexFileError`, never a wrong answer. It also
  records :attr:`~GalleryIndex.generation` and :attr:`~GalleryIndex.gallery_id` (what the
  index was built from, set by whoever builds it).

Distances are those of :mod:`deepmetric.distances` whatever the index: ``"euclidean"`` is the
true L2 distance ``||q - x||`` (faiss's squared L2 goes through a square root),
``"squared_euclidean"`` is ``||q - x||^2``, ``"cosine"`` is ``1 - cos(q, x)`` in [0, 2] (faiss:
inner product of L2-normalised vectors; a zero vector has distance 1 to everything). So one
open-set threshold means the same thing for every index.

Indexes:

- :class:`ExactIndex`: torch, exact; the distances of :func:`deepmetric.distances.pairwise`
  (same formulas, on rows stored normalised) and the k-smallest selection of
  :mod:`deepmetric.neighbors` (ties by insertion order), in chunks of queries. Vectors live
  in one growing buffer (capacity doubles: amortised O(1) copy per added row).
- :class:`FaissIndex`: ``kind="flat"`` (exact, ``IndexFlatL2`` / ``IndexFlatIP``) or
  ``kind="hnsw"`` (approximate, ``IndexHNSWFlat``: parameters ``m``, ``ef_construction``,
  ``ef_search``). Rows are faiss's sequential ids; an id map (row -> example id) sits beside
  it, and tombstones reach faiss as an ``IDSelectorBitmap`` of the live rows, so a search with
  removals still returns k live hits (HNSW filters while it walks the graph; with many removals
  its recall drops until the rebuild, which re-adds the live vectors).
- :func:`make_index`: picks one of these from the expected size (crossovers measured, see
  :data:`EXACT_MAX` and :data:`FLAT_MAX`).

Identities, not examples: :func:`top_identities` turns example hits into the k nearest
distinct identities, fetching more hits from the index while one identity's many examples
crowd the example top-k.

Threads: torch and faiss use their own thread settings (``torch.set_num_threads``,
``faiss.omp_set_num_threads``); this module changes neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.checks import integer_at_least
from deepmetric.distances import METRICS, Metric, check_metric, paired
from deepmetric.gallery.store import Examples, GalleryStore
from deepmetric.neighbors import smallest_k

try:  # optional: faiss flat / HNSW indexes
    import faiss as _faiss  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _faiss = None

__all__ = [
    "EXACT_MAX",
    "FLAT_MAX",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "HNSW_M",
    "INDEX_SUFFIX",
    "REBUILD_FRACTION",
    "ExactIndex",
    "FaissIndex",
    "GalleryIndex",
    "IdentityMatches",
    "IndexFileError",
    "SearchResult",
    "build_index",
    "check_sums",
    "faiss_available",
    "hnsw_ef_search",
    "identity_lookup",
    "index_path",
    "load_index",
    "make_index",
    "top_identities",
]

#: tombstones above this fraction of the stored entries trigger an automatic rebuild
REBUILD_FRACTION = 0.25

# Crossovers of make_index, measured with `benchmarks/gallery_index.py --crossover --queries 500`
# (D = 128, L2-normalised random vectors, cosine, k = 10, 2 threads on a 2-core machine that two
# training jobs were also using: noisy). Batch q/s (torch / flat / hnsw) and 1-query ms:
#   N =   1,000: 4,556 / 11,118 / 16,286 q/s;  0.17 / 0.03 / 0.05 ms; hnsw build   0.9 s
#   N =   5,000: 4,363 /  7,694 / 10,990 q/s;  0.24 / 0.07 / 0.08 ms; hnsw build   1.8 s
#   N =  20,000: 2,966 /  3,227 /  5,552 q/s;  1.89 / 0.63 / 0.16 ms; hnsw build   7.7 s
#   N =  50,000: 1,469 /    848 /  5,953 q/s; 23.95 / 6.92 / 0.21 ms; hnsw build  16.6 s
#   N = 100,000: 1,000 /    379 /  3,086 q/s; 24.01 / 24.0 / 0.26 ms; hnsw build  64.6 s
#   N = 200,000:   304 /    136 /  3,732 q/s; 50.08 / 48.0 / 0.30 ms; hnsw build 117.9 s
#: ExactIndex (torch) up to this many entries, FaissIndex(kind="flat") above: up to 5,000 every
#: index answers a query in < 0.25 ms, so the dependency-free torch index is used; above it
#: faiss flat is ~3x faster per query (0.63 against 1.89 ms at 20,000)
EXACT_MAX = 5_000
#: FaissIndex(kind="flat") up to this many entries, FaissIndex(kind="hnsw") above: around 50,000
#: exact flat search falls below ~1,000 q/s and past ~5 ms a query, while HNSW stays near
#: 0.2 ms at a build cost (17 s at 50,000) and recall < 1
FLAT_MAX = 50_000

# HNSW defaults, measured with benchmarks/gallery_index.py --n 200000 (cosine, 2 threads, the
# same shared machine; probes = enrolled embeddings + noise, cos ~0.9): M = 32,
# efConstruction = 80 built 200,000 vectors in 144 s; batch q/s and recall@1 vs exact
# (probes / random strangers) by efSearch: 16: 4,311 q/s, 0.817 / 0.108; 32: 2,358, 0.935 /
# 0.202; 64: 1,356, 0.994 / 0.321; 128: 730, 1.000 / 0.494; 256: 391, 1.000 / 0.699.
# efSearch = 64 is the smallest meeting recall@1 >= 0.95 on probes at >= 1,000 q/s. Strangers
# (no enrolled match) have nearly equal distances to everything, so their exact nearest is
# hard to find and does not matter: the open-set threshold rejects them either way.
#: neighbours per node (faiss ``M``)
HNSW_M = 32
#: candidate list while building (faiss ``efConstruction``)
HNSW_EF_CONSTRUCTION = 80
#: candidate list while searching (faiss ``efSearch``); raised to k when k is larger
HNSW_EF_SEARCH = 64

_FORMAT = "deepmetric-index"
_VERSION = 1
#: bytes of distance matrix an ExactIndex search holds at a time
_CHUNK_BYTES = 64 << 20


def faiss_available() -> bool:
    """Whether ``import faiss`` works (FaissIndex needs it)."""
    return _faiss is not None


class SearchResult(NamedTuple):
    """``distances`` (q, k) float32, ascending per row, ``inf`` padding; ``ids`` (q, k)
    int64, -1 padding."""

    distances: np.ndarray
    ids: np.ndarray


class IndexFileError(ValueError):
    """A saved index folder is missing, not an index, or inconsistent."""


# --------------------------------------------------------------------------- validation


def _check_matrix(x: object, dim: int, name: str, *, allow_empty: bool) -> np.ndarray:
    """(n, dim) finite float -> C-contiguous float32 (a copy only when needed)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {array.dtype}")
    if array.shape[1] != dim:
        raise ValueError(f"{name} must have dimension {dim} (the index's), got {array.shape[1]}")
    if array.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must hold at least one row, got 0")
    with np.errstate(over="ignore"):  # too large for float32: inf, refused just below
        out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
    return out


def _check_ids(ids: object, n: int | None, name: str = "ids") -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if n is not None and array.shape[0] != n:
        raise ValueError(f"got {array.shape[0]} {name} for {n} embeddings")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be >= 0 (-1 marks padding), got {int(array.min())}")
    if np.unique(array).size != array.size:
        raise ValueError(f"{name} contain duplicates")
    return array


def _grow(array: np.ndarray, need: int, fill: Any) -> np.ndarray:
    """``array`` with room for at least ``need`` entries (capacity doubles)."""
    if need <= array.shape[0]:
        return array
    out = np.full(max(need, 2 * array.shape[0], 256), fill, dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


# --------------------------------------------------------------------------- contract


class GalleryIndex(ABC):
    """The common part of every index: the id map, tombstones, padding, save / load.

    Subclasses store vectors by row (0, 1, ... in insertion order) and implement
    ``_add_rows``, ``_search_rows``, ``_compact``, ``_save_data`` and ``_load_data``.
    """

    #: "exact", "flat" or "hnsw" ("milvus": :class:`~deepmetric.gallery.milvus_index.MilvusIndex`)
    kind: str
    _type: ClassVar[str]
    #: the vectors live outside this process (a database every change reaches at once, e.g.
    #: Milvus), not in memory saved to a folder
    external: ClassVar[bool] = False

    def __init__(
        self, *, dim: int, metric: Metric, rebuild_fraction: float | None = REBUILD_FRACTION
    ) -> None:
        integer_at_least("dim", dim)
        check_metric(metric)
        if rebuild_fraction is not None and not 0.0 < rebuild_fraction <= 1.0:
            raise ValueError(f"rebuild_fraction must be in (0, 1] or None, got {rebuild_fraction}")
        self.dim = dim
        self.metric: Metric = metric
        self.rebuild_fraction = rebuild_fraction
        #: the store generation this index reflects, for whoever builds it; saved with it
        self.generation: int | None = None
        #: the random id of the gallery it was built from (see the store); saved with it
        self.gallery_id: str | None = None
        self._row_ids = np.empty(0, dtype=np.int64)  # row -> example id (capacity-grown)
        self._alive = np.empty(0, dtype=bool)  # row -> not removed
        self._n = 0  # rows stored, live and removed
        self._dead = 0  # removed rows not yet compacted
        self._max_id = -1  # the largest id ever added (fast duplicate check)

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _add_rows(self, x: np.ndarray) -> None:
        """Store (m, D) float32 rows as rows n .. n + m - 1."""

    @abstractmethod
    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, k) distances and rows of the k nearest live rows; k <= live entries. Rows
        may be -1 (distance inf) where an approximate index found fewer."""

    @abstractmethod
    def _compact(self, keep: np.ndarray) -> None:
        """Keep only rows ``keep`` (ascending), renumbered 0 .. len(keep) - 1."""

    @abstractmethod
    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32: the stored vectors of ``rows`` (normalised for cosine)."""

    @abstractmethod
    def _params(self) -> dict[str, Any]:
        """Constructor arguments beyond dim / metric / rebuild_fraction (for save)."""

    @abstractmethod
    def _save_data(self, folder: Path) -> None: ...

    @abstractmethod
    def _load_data(self, folder: Path, n: int) -> None: ...

    # ------------------------------------------------------------------ contract

    def __len__(self) -> int:
        """Live entries (added and not removed)."""
        return self._n - self._dead

    @property
    def device(self) -> torch.device:
        """Where the vectors live and searches compute (the CPU unless :meth:`to` moved them;
        arguments and results are numpy arrays whatever it is)."""
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> GalleryIndex:
        """Move the stored vectors to ``device`` (in place; returns ``self``). An index that
        only runs on the CPU (faiss) stays there."""
        return self

    def close(self) -> None:
        """Release what the index holds outside this process's memory (a connection); nothing
        for an in-memory index."""
        return None

    @property
    def removed(self) -> int:
        """Tombstones: removed entries still stored (0 after a rebuild)."""
        return self._dead

    @property
    def ids(self) -> np.ndarray:
        """The live ids (int64, insertion order)."""
        return self._row_ids[: self._n][self._alive[: self._n]].copy()

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,) int64, vectors (n, D) float32)`` of the live entries in insertion order,
        as the index stores them: L2-normalised for ``"cosine"``, as added otherwise (what
        ``deepmetric gallery check`` compares with the database)."""
        rows = np.flatnonzero(self._alive[: self._n])
        if rows.size == 0:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        return self._row_ids[rows].copy(), np.asarray(self._row_vectors(rows), dtype=np.float32)

    def __contains__(self, example_id: object) -> bool:
        if isinstance(example_id, bool) or not isinstance(example_id, (int, np.integer)):
            return False
        live = self._alive[: self._n]
        return bool(np.any(self._row_ids[: self._n][live] == int(example_id)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, metric={self.metric!r},"
            f" live={len(self)}, removed={self._dead})"
        )

    def add(self, embeddings: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        """Add (n, D) finite float embeddings under the (n,) ids (int64 >= 0, unique, none of
        them live already). Converted to float32; nothing is added on a ``ValueError``."""
        x = _check_matrix(embeddings, self.dim, "embeddings", allow_empty=True)
        new = _check_ids(ids, x.shape[0])
        if new.size == 0:
            return
        if new.min() <= self._max_id and len(self):  # slow path only when ids come back
            clash = new[np.isin(new, self.ids)]
            if clash.size:
                raise ValueError(f"ids already in the index: {clash[:10].tolist()}")
        n, m = self._n, new.size
        self._add_rows(x)
        self._row_ids = _grow(self._row_ids, n + m, -1)
        self._alive = _grow(self._alive, n + m, False)
        self._row_ids[n : n + m] = new
        self._alive[n : n + m] = True
        self._n = n + m
        self._max_id = max(self._max_id, int(new.max()))
        self._changed()

    def remove(self, ids: np.ndarray | Sequence[int]) -> None:
        """Remove the entries with these ids (all must be live: ``KeyError`` naming the
        others, and nothing removed). Rebuilds when tombstones exceed ``rebuild_fraction``."""
        gone = _check_ids(ids, None)
        if gone.size == 0:
            return
        rows = np.flatnonzero(self._alive[: self._n])
        rows = rows[np.isin(self._row_ids[rows], gone)]
        if rows.size != gone.size:
            missing = np.setdiff1d(gone, self._row_ids[rows])
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        self._alive[rows] = False
        self._dead += rows.size
        self._changed()
        if self.rebuild_fraction is not None and self._dead > self.rebuild_fraction * self._n:
            self.rebuild()

    def rebuild(self) -> None:
        """Drop the tombstones: compact the storage to the live entries (same results)."""
        if self._dead == 0:
            return
        keep = np.flatnonzero(self._alive[: self._n])
        self._compact(keep)
        self._row_ids = self._row_ids[keep].copy()
        self._alive = np.ones(keep.size, dtype=bool)
        self._n, self._dead = keep.size, 0
        self._changed()

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The k nearest live entries of each query.

        Args:
            queries: (q, D) finite floats (q may be 0).
            k: >= 1; may exceed ``len(self)``: the rest of each row is padding.

        Returns:
            :class:`SearchResult`: distances (q, k) float32 ascending (the module's metric
            definitions), ids (q, k) int64; padding: distance ``inf``, id -1.
        """
        q = _check_matrix(queries, self.dim, "queries", allow_empty=True)
        integer_at_least("k", k)
        dist = np.full((q.shape[0], k), np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        kk = min(k, len(self))
        if kk and q.shape[0]:
            d, rows = self._refine(q, *self._search_rows(q, kk))
            found = rows >= 0
            dist[:, :kk] = np.where(found, d, np.inf)
            ids[:, :kk] = np.where(found, self._row_ids[np.where(found, rows, 0)], -1)
        return SearchResult(dist, ids)

    def _refine(
        self, q: np.ndarray, d: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The hits' distances again, by :func:`deepmetric.distances.paired` (``|q - x|``),
        and the hits re-sorted by them. A search computes ``|q|^2 + |x|^2 - 2 q.x``, which
        cancellation makes coarse near 0 (in tests/test_hostile_gallery.py a stored vector came
        back at 2.8e-3 from itself, float32); the k hits' own distances cost O(q k D). An
        external index's hits are kept as it found them."""
        if self.external:
            return d, rows
        found = rows >= 0
        out = np.empty(d.shape, dtype=np.float32)
        step = max(1, (1 << 22) // max(1, rows.shape[1] * self.dim))  # (step, k, D) at a time
        for s in range(0, len(q), step):
            part = np.where(found[s : s + step], rows[s : s + step], 0)
            vectors = self._row_vectors(part.ravel())
            queries = np.repeat(q[s : s + step], part.shape[1], axis=0)  # row i: query i // k
            pairs = paired(torch.from_numpy(vectors), torch.from_numpy(queries), self.metric)
            out[s : s + step] = pairs.numpy().reshape(part.shape)
        out[~found] = np.inf
        order = np.argsort(out, axis=1, kind="stable")
        return np.take_along_axis(out, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def _changed(self) -> None:
        """Called after every add / remove / rebuild (caches keyed on the rows drop here)."""
        return None

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> None:
        """Write the index to the folder ``path`` (replaced if it holds a saved index; any
        other existing path is refused). Written to a temporary folder first, then swapped in."""
        path = Path(path)
        if path.exists() and not (path / "header.json").is_file():
            raise FileExistsError(f"{path} exists and is not a saved index; not overwriting it")
        header = {
            "format": _FORMAT,
            "version": _VERSION,
            "type": self._type,
            "kind": self.kind,
            "dim": self.dim,
            "metric": self.metric,
            "rebuild_fraction": self.rebuild_fraction,
            "params": self._params(),
            "generation": self.generation,
            "gallery_id": self.gallery_id,
            "stored": self._n,
            "live": len(self),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            np.save(tmp / "ids.npy", self._row_ids[: self._n], allow_pickle=False)
            np.save(tmp / "alive.npy", self._alive[: self._n], allow_pickle=False)
            self._save_data(tmp)
            header["sha256"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / "header.json").write_text(json.dumps(header, indent=1))
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "index")
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        """Read an index saved by :meth:`save` (this class's, or any with
        ``GalleryIndex.load``); ``IndexFileError`` for a missing or inconsistent folder."""
        index = load_index(path)
        if cls is not GalleryIndex and not isinstance(index, cls):
            raise IndexFileError(f"{path} holds a {type(index).__name__}, not a {cls.__name__}")
        return index


def _read_header(path: Path) -> dict[str, Any]:
    file = path / "header.json"
    if not file.is_file():
        raise IndexFileError(f"no saved index at {path} (no header.json)")
    try:
        header = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise IndexFileError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise IndexFileError(f"{path} is not a saved deepmetric index")
    if header.get("version") != _VERSION:
        raise IndexFileError(
            f"{path} is index format version {header.get('version')}; this code reads {_VERSION}"
        )
    if header.get("metric") not in METRICS or header.get("type") not in _TYPES:
        raise IndexFileError(f"{path}: unknown metric or index type in header.json")
    return header


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_sums(path: Path, header: dict[str, Any]) -> None:
    """Every file ``header.json`` lists has the sha256 it records (an index saved before
    checksums were recorded has none to check)."""
    sums = header.get("sha256")
    if sums is None:
        return
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise IndexFileError(f"{path}: bad sha256 record in header.json")
    for name, want in sums.items():
        file = path / str(name)
        if file.parent != path or not file.is_file():
            raise IndexFileError(f"{path}: {name} is missing")
        if _sha256(file) != want:
            raise IndexFileError(
                f"{file} does not match the sha256 recorded in header.json (damaged or "
                "replaced): rebuild the index from the database"
            )


def _load_array(file: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise IndexFileError(f"cannot read {file}: {error}") from None
    if array.dtype != dtype or array.shape != shape:
        raise IndexFileError(
            f"{file} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}"
        )
    return array


def load_index(path: str | Path, *, verify: bool = True) -> GalleryIndex:
    """Read any index saved by :meth:`GalleryIndex.save`; ``verify=False`` skips the sha256
    check of its files (for ``gallery check``, which compares the content itself)."""
    path = Path(path)
    header = _read_header(path)
    n = header.get("stored")
    if not isinstance(n, int) or n < 0:
        raise IndexFileError(f"{path}: bad entry count in header.json")
    cls = _TYPES[header["type"]]
    try:
        index = cls(
            dim=header["dim"],
            metric=header["metric"],
            rebuild_fraction=header["rebuild_fraction"],
            **header["params"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise IndexFileError(f"{path}: bad header.json: {error}") from None
    ids = _load_array(path / "ids.npy", np.int64, (n,))
    alive = _load_array(path / "alive.npy", np.bool_, (n,))
    live = ids[alive]
    if (live.size and live.min() < 0) or np.unique(live).size != live.size:
        raise IndexFileError(f"{path}: the live ids are negative or not unique")
    index._load_data(path, n)
    if verify:  # last: a file of the wrong shape or type is named as such above
        check_sums(path, header)
    index._row_ids, index._alive, index._n = ids.copy(), alive.copy(), n
    index._dead = int(n - alive.sum())
    index._max_id = int(ids.max()) if n else -1
    index.generation = header.get("generation")
    gallery_id = header.get("gallery_id")
    index.gallery_id = gallery_id if isinstance(gallery_id, str) else None
    index._changed()
    return index


# --------------------------------------------------------------------------- torch exact


class ExactIndex(GalleryIndex):
    """Exact search in torch: the distance to every stored row, removed rows masked to
    ``inf``, the k smallest by ``neighbors``' selection (ties: the earlier-added entry).

    Distances are :func:`deepmetric.distances.pairwise`'s, by the same formulas: cosine
    ``clamp(1 - q_n . x_n, 0, 2)`` with ``F.normalize``d rows; euclidean
    ``sqrt(clamp(||q||^2 + ||x||^2 - 2 q . x, 0))`` (no sqrt for squared_euclidean). The
    rows are stored normalised (cosine) and their squared norms kept (euclidean), so a search
    costs one matrix product per chunk of queries, O(q N D), and re-checks nothing: calling
    ``pairwise`` itself re-validated (``isfinite``) and re-normalised all N stored rows on
    every call, 85 % of a one-query search at N = 20,000 (13 ms against 2 ms).

    Memory: the (N, D) float32 buffer (capacity doubles: amortised O(1) copy per added row,
    up to 2x while it grows) plus one (chunk, N) distance block per search, chunk = queries
    fitting in 64 MiB.

    Device: the vectors live on ``device`` (the CPU, or a GPU: ``cuda``, ``cuda:N``) and each
    search computes there; queries and results are numpy arrays on the CPU either way. Not
    saved: a loaded index is on the CPU until :meth:`to` moves it.

    Args:
        dim: embedding dimension D.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        rebuild_fraction: see the module docstring (``None``: only explicit rebuilds).
        device: where the vectors live (default the CPU).
    """

    kind = "exact"
    _type = "exact"

    def __init__(
        self,
        *,
        dim: int,
        metric: Metric = "euclidean",
        rebuild_fraction: float | None = REBUILD_FRACTION,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dim=dim, metric=metric, rebuild_fraction=rebuild_fraction)
        self._device = torch.device(device)
        empty = {"dtype": torch.float32, "device": self._device}
        self._vectors = torch.empty((0, dim), **empty)  # normalised for cosine
        self._sq = torch.empty(0, **empty)  # squared norms (euclidean metrics)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> ExactIndex:
        self._device = torch.device(device)
        self._vectors, self._sq = self._vectors.to(self._device), self._sq.to(self._device)
        return self

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as stored, and their squared norms (cosine: unused zeros)."""
        if self.metric == "cosine":
            return F.normalize(x, dim=1), torch.zeros(x.shape[0], device=x.device)
        return x, (x * x).sum(dim=1)

    def _add_rows(self, x: np.ndarray) -> None:
        n, m = self._n, x.shape[0]
        if n + m > self._vectors.shape[0]:  # amortised growth: capacity at least doubles
            cap = max(n + m, 2 * self._vectors.shape[0], 256)
            grown = torch.empty((cap, self.dim), device=self._device)
            sq = torch.empty(cap, device=self._device)
            grown[:n], sq[:n] = self._vectors[:n], self._sq[:n]
            self._vectors, self._sq = grown, sq
        rows, sq = self._rows(torch.from_numpy(x).to(self._device))
        self._vectors[n : n + m], self._sq[n : n + m] = rows, sq

    def _distances(self, q: torch.Tensor) -> torch.Tensor:
        """(c, N) distances of the queries ``q`` (c, D) to every stored row."""
        refs = self._vectors[: self._n]
        rows, sq = self._rows(q)
        if self.metric == "cosine":
            one = torch.ones((), device=q.device)
            return torch.addmm(one, rows, refs.T, alpha=-1.0).clamp_(0.0, 2.0)
        d = torch.addmm(self._sq[None, : self._n], rows, refs.T, alpha=-2.0)
        d.add_(sq[:, None]).clamp_min_(0.0)
        return d.sqrt_() if self.metric == "euclidean" else d

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dead = None
        if self._dead:
            dead = torch.from_numpy(np.flatnonzero(~self._alive[: self._n])).to(self._device)
        chunk = max(1, min(4096, _CHUNK_BYTES // (4 * self._n)))
        queries = torch.from_numpy(q).to(self._device)
        dists, rows = [], []
        with torch.no_grad():
            for start in range(0, q.shape[0], chunk):
                d = self._distances(queries[start : start + chunk])
                if dead is not None:
                    d[:, dead] = torch.inf
                vals, idx = smallest_k(d, k)
                dists.append(vals)
                rows.append(idx)
        return torch.cat(dists).cpu().numpy(), torch.cat(rows).cpu().numpy()

    def _compact(self, keep: np.ndarray) -> None:
        rows = torch.from_numpy(keep).to(self._device)
        self._vectors, self._sq = self._vectors[rows].clone(), self._sq[rows].clone()

    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[torch.from_numpy(rows).to(self._device)].cpu().numpy()

    def _params(self) -> dict[str, Any]:
        return {}

    def _save_data(self, folder: Path) -> None:
        vectors = self._vectors[: self._n].cpu().numpy()
        np.save(folder / "vectors.npy", vectors, allow_pickle=False)

    def _load_data(self, folder: Path, n: int) -> None:
        vectors = _load_array(folder / "vectors.npy", np.float32, (n, self.dim))
        if not np.isfinite(vectors).all():
            raise IndexFileError(f"{folder / 'vectors.npy'} contains NaN or inf")
        self._vectors = torch.from_numpy(vectors.copy()).to(self._device)  # as stored
        self._sq = (self._vectors * self._vectors).sum(dim=1)


# --------------------------------------------------------------------------- faiss


class FaissIndex(GalleryIndex):
    """A faiss index: ``kind="flat"`` (exact) or ``kind="hnsw"`` (approximate).

    Args:
        dim: embedding dimension D.
        metric: ``"euclidean"`` / ``"squared_euclidean"`` (faiss L2; euclidean takes the
            square root) or ``"cosine"`` (inner product of L2-normalised vectors,
            distance ``1 - ip``).
        kind: ``"flat"`` or ``"hnsw"``.
        m: HNSW neighbours per node (faiss ``M``); more: better recall, more memory
            (about ``2 m`` int32 links per vector) and slower build.
        ef_construction: HNSW build-time candidate list; more: a better graph, slower build.
        ef_search: HNSW search-time candidate list (raised to k when k is larger); more:
            better recall, slower search. Settable later through :attr:`ef_search`.
        rebuild_fraction: see the module docstring. A rebuild of an HNSW index re-adds every
            live vector (it costs a build).

    Raises:
        ImportError: faiss is not installed (``pip install faiss-cpu``).
    """

    _type = "faiss"

    def __init__(
        self,
        *,
        dim: int,
        metric: Metric = "euclidean",
        kind: Literal["flat", "hnsw"] = "flat",
        m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        rebuild_fraction: float | None = REBUILD_FRACTION,
    ) -> None:
        if _faiss is None:
            raise ImportError("FaissIndex needs faiss: pip install faiss-cpu")
        super().__init__(dim=dim, metric=metric, rebuild_fraction=rebuild_fraction)
        if kind not in ("flat", "hnsw"):
            raise ValueError(f'kind must be "flat" or "hnsw", got {kind!r}')
        for value, name in ((m, "m"), (ef_construction, "ef_construction")):
            integer_at_least(name, value)
        integer_at_least("ef_search", ef_search)
        self.kind = kind
        self.m, self.ef_construction, self._ef_search = m, ef_construction, ef_search
        self._index = self._new_index()
        self._selector: tuple[np.ndarray, Any] | None = None

    @property
    def ef_search(self) -> int:
        """HNSW search-time candidate list (ignored by a flat index)."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        integer_at_least("ef_search", value)
        self._ef_search = value
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = value

    def _new_index(self) -> Any:
        assert _faiss is not None
        inner = self.metric == "cosine"
        if self.kind == "flat":
            return (_faiss.IndexFlatIP if inner else _faiss.IndexFlatL2)(self.dim)
        kind = _faiss.METRIC_INNER_PRODUCT if inner else _faiss.METRIC_L2
        index = _faiss.IndexHNSWFlat(self.dim, self.m, kind)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self._ef_search
        return index

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.metric != "cosine":
            return x
        assert _faiss is not None
        x = x.copy()
        _faiss.normalize_L2(x)  # leaves zero rows at zero: distance 1, as distances.py
        return x

    def _add_rows(self, x: np.ndarray) -> None:
        self._index.add(self._prepare(x))

    def _changed(self) -> None:
        self._selector = None

    def _search_params(self) -> Any:
        assert _faiss is not None
        hnsw = self.kind == "hnsw"
        if not self._dead:
            return None
        if self._selector is None:
            bitmap = np.packbits(self._alive[: self._n], bitorder="little")
            # the selector points into bitmap: keep both alive together
            self._selector = (bitmap, _faiss.IDSelectorBitmap(self._n, _faiss.swig_ptr(bitmap)))
        params = _faiss.SearchParametersHNSW() if hnsw else _faiss.SearchParameters()
        params.sel = self._selector[1]
        if hnsw:
            params.efSearch = self._ef_search
        return params

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        score, rows = self._index.search(self._prepare(q), k, params=self._search_params())
        if self.metric == "cosine":
            dist = np.clip(1.0 - score, 0.0, 2.0)
        else:
            dist = np.maximum(score, 0.0)
            if self.metric == "euclidean":
                dist = np.sqrt(dist)
        return dist.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    def _compact(self, keep: np.ndarray) -> None:
        vectors = self._index.reconstruct_n(0, self._n)[keep]
        self._index = self._new_index()
        if vectors.shape[0]:
            self._index.add(vectors)

    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._index.reconstruct_n(0, self._n)[rows]

    def _params(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self._ef_search,
        }

    def _save_data(self, folder: Path) -> None:
        assert _faiss is not None
        _faiss.write_index(self._index, str(folder / "index.faiss"))

    def _load_data(self, folder: Path, n: int) -> None:
        assert _faiss is not None
        file = folder / "index.faiss"
        if not file.is_file():
            raise IndexFileError(f"{folder}: index.faiss is missing")
        try:
            index = _faiss.read_index(str(file))
        except RuntimeError as error:
            raise IndexFileError(f"cannot read {file}: {error}") from None
        if index.ntotal != n or index.d != self.dim:
            raise IndexFileError(
                f"{file} holds {index.ntotal} vectors of dimension {index.d}, expected {n} of "
                f"dimension {self.dim}"
            )
        if self.kind == "hnsw":
            index.hnsw.efSearch = self._ef_search
        self._index = index


_TYPES: dict[str, type[GalleryIndex]] = {"exact": ExactIndex, "faiss": FaissIndex}


def make_index(*, dim: int, metric: Metric, size_hint: int) -> GalleryIndex:
    """The index for a gallery of about ``size_hint`` examples: :class:`ExactIndex` up to
    :data:`EXACT_MAX`, ``FaissIndex(kind="flat")`` up to :data:`FLAT_MAX`,
    ``FaissIndex(kind="hnsw")`` above (HNSW defaults). Without faiss, always ExactIndex."""
    integer_at_least("size_hint", size_hint, 0)
    if _faiss is None or size_hint <= EXACT_MAX:
        return ExactIndex(dim=dim, metric=metric)
    if size_hint <= FLAT_MAX:
        return FaissIndex(dim=dim, metric=metric, kind="flat")
    return FaissIndex(dim=dim, metric=metric, kind="hnsw", ef_search=hnsw_ef_search(size_hint))


def hnsw_ef_search(size: int) -> int:
    """The HNSW search list for a gallery of ``size`` examples: recall falls as the graph grows,
    so the list grows with it. Measured with ``benchmarks/inference.py`` (M = 32,
    efConstruction = 80, 128-d, probes = enrolled vectors + noise, 2 threads): 200,000 rows,
    efSearch 64: recall@1 0.995 at 1,911 queries/s; 500,000, efSearch 128: 0.994 at 1,001
    (loaded machine); 1,000,000 (quiet machine): efSearch 128: 0.941 at 1,534 q/s, 192: 0.982
    at 1,223, 256: 0.992 at 1,004."""
    if size <= 200_000:
        return HNSW_EF_SEARCH
    if size <= 500_000:
        return 128
    return 192


# --------------------------------------------------------------------------- identities


class IdentityMatches(NamedTuple):
    """The k nearest distinct identities of each query, each with its nearest example.

    ``identities``: q lists of at most k identities, nearest first (shorter when the index
    holds fewer distinct identities); ``distances`` (q, k) float32 and ``example_ids`` (q, k)
    int64: the distance to, and id of, that identity's nearest example; padding inf / -1.
    """

    identities: list[list[Hashable]]
    distances: np.ndarray
    example_ids: np.ndarray


def identity_lookup(
    ids: np.ndarray | Sequence[int], identities: Sequence[Hashable]
) -> Callable[[np.ndarray], list[Hashable]]:
    """An in-memory ``identity_of`` for :func:`top_identities` from parallel sequences (e.g.
    the ``ids`` and ``identities`` of ``GalleryStore.all_embeddings()``)."""
    table = dict(zip(np.asarray(ids).tolist(), identities, strict=True))

    def identity_of(example_ids: np.ndarray) -> list[Hashable]:
        try:
            return [table[i] for i in np.asarray(example_ids).tolist()]
        except KeyError as error:
            raise KeyError(f"example id {error.args[0]} has no identity") from None

    return identity_of


def top_identities(
    index: GalleryIndex,
    queries: np.ndarray,
    k: int,
    identity_of: Callable[[np.ndarray], Sequence[Hashable]],
    *,
    fetch: int | None = None,
) -> IdentityMatches:
    """The k nearest distinct identities of each query.

    An identity's distance is that of its nearest example (the first of its hits in the
    index's order). Each query starts with ``fetch`` example hits (default ``4 k``, at least
    16); queries whose hits hold fewer than k distinct identities are searched again with
    twice as many, until k are found or the index is exhausted (all live entries fetched, or
    an approximate index returned padding).

    Args:
        index: any :class:`GalleryIndex`.
        queries: (q, D) floats.
        k: identities wanted per query, >= 1.
        identity_of: maps a 1-D int64 array of example ids to their identities (hashable),
            e.g. ``GalleryStore.identity_of`` or :func:`identity_lookup`.
        fetch: the first number of example hits per query.

    Returns:
        :class:`IdentityMatches`.
    """
    integer_at_least("k", k)
    if fetch is not None:
        integer_at_least("fetch", fetch)
    q = _check_matrix(queries, index.dim, "queries", allow_empty=True)
    n_q, live = q.shape[0], len(index)
    names: list[list[Hashable]] = [[] for _ in range(n_q)]
    dist = np.full((n_q, k), np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    want = max(k, fetch if fetch is not None else max(4 * k, 16))
    pending = np.arange(n_q) if live else np.arange(0)
    while pending.size:
        want = min(want, live)
        hits = index.search(q[pending], want)
        found = np.unique(hits.ids[hits.ids >= 0])
        owner = dict(zip(found.tolist(), identity_of(found), strict=True))
        still = []
        for row, qi in enumerate(pending):
            seen: dict[Hashable, tuple[float, int]] = {}
            for d, i in zip(hits.distances[row].tolist(), hits.ids[row].tolist()):
                if i < 0:
                    break
                seen.setdefault(owner[i], (d, i))
                if len(seen) == k:
                    break
            exhausted = want >= live or hits.ids[row, -1] < 0
            if len(seen) == k or exhausted:
                names[qi] = list(seen)
                for j, (d, i) in enumerate(seen.values()):
                    dist[qi, j], ids[qi, j] = d, i
            else:
                still.append(qi)
        pending = np.asarray(still, dtype=np.int64)
        want *= 2
    return IdentityMatches(names, dist, ids)


# --------------------------------------------------------------------------- a gallery's index

#: the index folder of gallery ``G`` is ``G`` + this suffix
INDEX_SUFFIX = ".index"


def index_path(path: str | Path) -> Path:
    """The index folder of the gallery file ``path``: ``path`` + :data:`INDEX_SUFFIX`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def build_index(store: GalleryStore, snapshot: tuple[int, Examples] | None = None) -> GalleryIndex:
    """A new index (type chosen for its size by :func:`make_index`) of every example of
    ``store``, stamped with the generation the examples were read at; ``snapshot``: a
    ``store.snapshot()`` already read."""
    generation, examples = store.snapshot() if snapshot is None else snapshot
    index = make_index(dim=store.dim, metric=store.metric, size_hint=len(examples.ids))  # type: ignore[arg-type]
    index.add(examples.embeddings, examples.ids)
    index.generation = generation
    index.gallery_id = store.gallery_id
    return index
