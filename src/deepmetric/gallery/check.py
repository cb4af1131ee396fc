"""``deepmetric gallery check``: does the saved index agree with the database?

The database ``G`` (SQLite) is the truth; the index folder ``G.index`` is derived from it and
saved when a :class:`~deepmetric.gallery.Gallery` closes. :func:`check_gallery` reads both
(and no model unless asked to) and reports each disagreement as one :class:`Problem`:

- ``database``: SQLite's integrity and foreign-key checks, embeddings of the wrong size, the
  generation counter (:meth:`~deepmetric.gallery.store.GalleryStore.problems`). Not repairable
  here: restore a backup.
- ``model``: the model record (its dim and metric those of the database; the threshold record
  readable and in the same metric) and, when a model is given or the recorded source can be
  loaded, its identity (weights hash, preprocessing, dim, metric) equal to the recorded one.
  Not repairable here: the embeddings were made by the recorded model.
- ``index``: the saved index exists and loads; its files have the sha256 its header.json
  records; it was built from this database (its gallery id); its dim and metric are the
  database's; it was saved at the database's generation; its live ids are exactly the
  database's example ids; its vectors are the database's embeddings (L2-normalised for
  cosine, float32 rounding allowed); ``header.json``'s live count agrees with the
  tombstones in ``alive.npy``; no leftovers of an interrupted save lie beside it.
  Repairable: ``repair=True`` rebuilds the index from the database, saves it in place of the
  old one, removes the leftovers, and checks again.

  A gallery whose vectors are in a Milvus collection
  (:mod:`~deepmetric.gallery.milvus_index`) has no folder: the collection is checked instead
  (reachable; made here, for this gallery, of its dim and metric; the generation it records;
  its ids and vectors against the database's), and the repair rebuilds it from the database
  (dropped, created, filled). A collection that cannot be reached, or holds another gallery's
  vectors or something else, is reported but never dropped.

The check first folds the write-ahead log into the database file
(:meth:`~deepmetric.gallery.store.GalleryStore.checkpoint`; not on a read-only gallery), so
that after it ``G`` alone holds every committed write, even when another process still has
the gallery open.

An index that is merely behind (saved at an older generation, e.g. by a process killed before
it closed the gallery) is reported too, although the next :meth:`Gallery.open` would rebuild
it: the check says what is on the disk now. Run a repair while no other process writes the
gallery; otherwise the index it saves may already be behind again (which the next open fixes).

Example::

    report = check_gallery("people.db", repair=True)
    report.ok, [p.message for p in report.problems], report.repaired
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from deepmetric.gallery.index import (
    GalleryIndex,
    IndexFileError,
    build_index,
    check_sums,
    index_path,
    load_index,
)
from deepmetric.gallery.milvus_index import MilvusIndex, MilvusIndexError, MilvusTarget, target_of
from deepmetric.gallery.store import Examples, GalleryError, GalleryStore
from deepmetric.inference import Embedder, Threshold

__all__ = ["CheckReport", "Problem", "check_gallery"]

#: the files a saved index folder may hold (anything else: not ours, never deleted)
INDEX_FILES = frozenset({"header.json", "ids.npy", "alive.npy", "vectors.npy", "index.faiss"})
#: how many ids a message shows
_SHOWN = 10


class Problem(NamedTuple):
    """One disagreement: ``kind`` (what it concerns), ``message`` (one sentence) and whether
    ``repair=True`` fixes it (by rebuilding the index from the database)."""

    kind: Literal["database", "model", "index"]
    message: str
    repairable: bool


class CheckReport(NamedTuple):
    """What :func:`check_gallery` found.

    ``problems``: found by the check; ``repaired``: what the repair did, one line each (empty
    when nothing was repaired); ``remaining``: the problems a second check found after the
    repair (``problems`` when nothing was repaired). ``identities``, ``examples`` and
    ``generation`` describe the database as read.
    """

    path: Path
    identities: int
    examples: int
    generation: int
    problems: list[Problem]
    repaired: list[str]
    remaining: list[Problem]

    @property
    def ok(self) -> bool:
        """Consistent: no problem, or none left after the repair."""
        return not self.remaining


def _ids(ids: np.ndarray) -> str:
    shown = ", ".join(map(str, ids[:_SHOWN].tolist()))
    return shown + (", ..." if ids.size > _SHOWN else "")


def _leftovers(folder: Path) -> list[Path]:
    """The temporary folders an interrupted :meth:`GalleryIndex.save` of ``folder`` left
    (``.NAME.XXXXXXXX`` and ``.NAME.old.XXXXXXXX`` beside it, named by ``tempfile``)."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(old\.)?[a-z0-9_]{{8}}")
    if not folder.parent.is_dir():
        return []
    return sorted(
        p for p in folder.parent.iterdir() if p.is_dir() and pattern.fullmatch(p.name) is not None
    )


def _model_problems(
    store: GalleryStore, meta: dict[str, Any], embedder: Embedder | None, device: str
) -> list[Problem]:
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem("model", message, False))

    record = meta.get("model")
    if not isinstance(record, dict):
        problem("no model record (a gallery store not made by Gallery.create)")
    elif record.get("dim") != store.dim or record.get("metric") != store.metric:
        problem(
            f"the model record says {record.get('dim')}-d {record.get('metric')}, the "
            f"database holds {store.dim}-d {store.metric} embeddings"
        )
    try:
        threshold = Threshold.from_json(meta.get("threshold"), "the threshold record")
    except ValueError as error:
        problem(str(error))
    else:
        if threshold.metric != store.metric:
            problem(
                f"the threshold is in {threshold.metric} distance, the gallery's is {store.metric}"
            )
    source = meta.get("source")
    if embedder is None and source:
        if not Path(source).exists():
            problem(f"the recorded model {source} no longer exists (give the model with --run)")
        else:
            try:
                embedder = Embedder.load(source, device=device)
            except (ValueError, OSError, RuntimeError, ImportError, GalleryError) as error:
                problem(f"the recorded model {source} cannot be loaded: {error}")
    if embedder is not None and isinstance(record, dict):
        given = embedder.identity()
        differ = [
            k
            for k in ("weights_sha256", "preprocessing", "dim", "metric")
            if given.get(k) != record.get(k)
        ]
        if differ:
            problem(
                f"the model {embedder.source or source or '(given)'} is not the one the gallery "
                f"was made with ({', '.join(differ)} differ)"
            )
    return problems


def _index_problems(
    folder: Path, store: GalleryStore, generation: int, examples: Examples
) -> list[Problem]:
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem("index", message, True))

    leftovers = _leftovers(folder)
    if leftovers:
        names = ", ".join(p.name for p in leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
        problem(f"{len(leftovers)} leftover(s) of interrupted saves of {folder}: {names}")
    if not folder.exists():
        problem(f"{folder} is missing (deleted, or never saved)")
        return problems
    try:
        index = load_index(folder, verify=False)  # the content is compared just below
        header = json.loads((folder / "header.json").read_text())
    except (IndexFileError, OSError, ValueError) as error:
        problem(f"{folder} cannot be read: {error}")
        return problems
    built_from = header.get("gallery_id")
    if built_from is not None and built_from != store.gallery_id:
        problem(
            f"{folder} was built from another gallery (gallery id {built_from}, this "
            f"database's is {store.gallery_id}): a database restored or copied over this one"
        )
    if index.dim != store.dim or index.metric != store.metric:
        problem(
            f"{folder} is a {index.dim}-d {index.metric} index, the database holds "
            f"{store.dim}-d {store.metric} embeddings"
        )
        return problems
    if index.generation != generation:
        problem(
            f"{folder} is out of date: saved at generation {index.generation}, the database is "
            f"at {generation}"
        )
    if header.get("live") != len(index):
        problem(
            f"{folder}/header.json says {header.get('live')} live entries, its tombstones "
            f"(alive.npy) leave {len(index)}"
        )
    problems += _content_problems(folder, index, examples)
    if not problems:  # damage the comparison cannot see (an HNSW graph's links, a tiny change)
        try:
            check_sums(folder, header)
        except (IndexFileError, OSError) as error:
            problem(str(error))
    return problems


def _content_problems(
    folder: Path | MilvusTarget, index: GalleryIndex, examples: Examples
) -> list[Problem]:
    """Ids and vectors of ``index`` (at ``folder``, for the messages) against the database's
    ``examples`` (ids ascending)."""
    problems: list[Problem] = []
    ids, vectors = index.live_vectors()
    missing = np.setdiff1d(examples.ids, ids)
    extra = np.setdiff1d(ids, examples.ids)
    if missing.size:
        problems.append(
            Problem(
                "index",
                f"{folder} lacks {missing.size} of the database's {examples.ids.size} examples "
                f"(ids {_ids(missing)})",
                True,
            )
        )
    if extra.size:
        problems.append(
            Problem(
                "index",
                f"{folder} holds {extra.size} examples that are not in the database "
                f"(ids {_ids(extra)}: removed, or never committed)",
                True,
            )
        )
    common = np.isin(ids, examples.ids)
    if not common.any():
        return problems
    want = examples.embeddings[np.searchsorted(examples.ids, ids[common])]
    if index.metric == "cosine":
        norms = np.linalg.norm(want, axis=1, keepdims=True)
        want = want / np.maximum(norms, 1e-12)
    same = np.isclose(vectors[common], want, rtol=1e-5, atol=1e-6).all(axis=1)
    if not same.all():
        bad = np.sort(ids[common][~same])
        problems.append(
            Problem(
                "index",
                f"{folder}: {bad.size} vectors differ from the database's embeddings "
                f"(ids {_ids(bad)})",
                True,
            )
        )
    return problems


def _collection_problems(
    target: MilvusTarget, store: GalleryStore, generation: int, examples: Examples
) -> list[Problem]:
    """The Milvus collection against the database (see the module docstring)."""
    try:
        index = MilvusIndex(
            target,
            dim=store.dim,
            metric=store.metric,  # type: ignore[arg-type]
            gallery_id=store.gallery_id,
        )
    except MilvusIndexError as error:
        return [Problem("index", str(error), error.repairable)]
    problems: list[Problem] = []
    try:
        if index.generation != generation:
            problems.append(
                Problem(
                    "index",
                    f"{target} is out of date: it records generation {index.generation}, the "
                    f"database is at {generation}",
                    True,
                )
            )
        problems += _content_problems(target, index, examples)
    except MilvusIndexError as error:
        problems.append(Problem("index", str(error), False))
    finally:
        index.close()
    return problems


def _repair_collection(
    target: MilvusTarget, store: GalleryStore, snapshot: tuple[int, Examples]
) -> tuple[list[str], list[Problem]]:
    """Rebuild the collection from the database: (what was done, what could not be)."""
    try:
        index = MilvusIndex(
            target,
            dim=store.dim,
            metric=store.metric,  # type: ignore[arg-type]
            gallery_id=store.gallery_id,
            check=False,
        )
        try:
            index.sync(store, snapshot, full=True)
        finally:
            index.close()
    except MilvusIndexError as error:
        return [], [Problem("index", str(error), False)]
    return [
        f"rebuilt {target} from the database: {len(index)} examples, generation "
        f"{index.generation}, milvus index"
    ], []


def _repair(
    folder: Path, store: GalleryStore, snapshot: tuple[int, Examples]
) -> tuple[list[str], list[Problem]]:
    """Rebuild and save the index, remove the leftovers: (what was done, what could not be)."""
    target = target_of(store.meta, store.path)
    if target is not None:
        return _repair_collection(target, store, snapshot)
    done: list[str] = []
    if folder.is_symlink() or folder.is_file():
        message = f"{folder} is not a folder: move it away, then run the repair again"
        return done, [Problem("index", message, False)]
    if folder.is_dir() and not (folder / "header.json").is_file():
        others = sorted(p.name for p in folder.iterdir() if p.name not in INDEX_FILES)
        if others:
            message = (
                f"{folder} holds files that are not an index ({', '.join(others[:3])}): move it "
                "away, then run the repair again"
            )
            return done, [Problem("index", message, False)]
        shutil.rmtree(folder)  # our own broken index: nothing else in it
    index = build_index(store, snapshot)
    index.save(folder)
    done.append(
        f"rebuilt {folder} from the database: {len(index)} examples, generation "
        f"{index.generation}, {index.kind} index"
    )
    leftovers = _leftovers(folder)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers:
        done.append(f"removed {len(leftovers)} leftover(s) of interrupted index saves")
    return done, []


def check_gallery(
    path: str | Path,
    *,
    repair: bool = False,
    embedder: Embedder | None = None,
    device: str = "auto",
    store: GalleryStore | None = None,
) -> CheckReport:
    """Check the gallery file ``path`` and its saved index (see the module docstring).

    Args:
        path: the gallery file; its index is ``path`` + ``.index``.
        repair: when an index problem is found, rebuild the index from the database, save it
            and check again (database and model problems are left as they are).
        embedder: the model to compare with the recorded model identity; ``None``: the
            recorded source is loaded (on ``device``) when there is one.
        store: an open store of ``path`` to use (left open); ``None``: opened and closed here.

    Returns:
        A :class:`CheckReport`; ``report.ok`` when consistent (after the repair, if any).

    Raises:
        GalleryNotFoundError / NotAGalleryError: no gallery at ``path``.
    """
    own = store is None
    if store is None:
        store = GalleryStore.open(path)
    try:
        store.checkpoint()  # fold the write-ahead log in: G alone then holds every write
        folder = index_path(store.path)
        problems, snapshot = _check(store, folder, embedder, device)
        done: list[str] = []
        remaining = problems
        if repair and any(p.repairable for p in problems):
            done, refused = _repair(folder, store, snapshot)
            if refused:
                remaining = problems + refused
            else:
                remaining, snapshot = _check(store, folder, embedder, device, model=False)
                remaining = [p for p in problems if p.kind == "model"] + remaining
        generation, examples = snapshot
        return CheckReport(
            store.path,
            store.num_identities,
            examples.ids.size,
            generation,
            problems,
            done,
            remaining,
        )
    finally:
        if own:
            store.close()


def _check(
    store: GalleryStore,
    folder: Path,
    embedder: Embedder | None,
    device: str,
    *,
    model: bool = True,
) -> tuple[list[Problem], tuple[int, Examples]]:
    """Every problem, and the database snapshot the index was compared with."""
    problems = [Problem("database", text, False) for text in store.problems()]
    if model:
        problems += _model_problems(store, store.meta, embedder, device)
    try:
        snapshot = store.snapshot()
    except GalleryError as error:  # a corrupt embedding: nothing to compare an index with
        if not any(p.kind == "database" for p in problems):
            problems.append(Problem("database", str(error), False))
        empty = Examples(np.empty(0, np.int64), [], np.empty((0, store.dim), np.float32))
        return problems, (-1, empty)
    try:
        target = target_of(store.meta, store.path)
    except GalleryError as error:
        return [*problems, Problem("index", str(error), False)], snapshot
    if target is not None:
        problems += _collection_problems(target, store, *snapshot)
    else:
        problems += _index_problems(folder, store, *snapshot)
    return problems, snapshot
