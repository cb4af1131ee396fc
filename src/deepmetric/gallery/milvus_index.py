"""A gallery's vectors in Milvus: Milvus Lite (one local file) or a Milvus server / cluster.

The SQLite store stays the source of truth; the collection is derived from it, as the
``G.index/`` folder is for the in-memory indexes, but it lives outside the process: every
enroll / remove reaches it at once, and the next process finds it as it was left.

**Selecting it.** ``Gallery.create(path, embedder, index=SPEC)`` (``deepmetric gallery create G
--run RUN --index SPEC``) with SPEC (:func:`parse_index_spec`):

- ``milvus-lite:PATH.db`` (or ``milvus-lite:PATH.db#COLLECTION``): Milvus Lite, embedded in the
  process, its data in the folder ``PATH.db`` (made when missing; its parent must exist). The
  collection is named after the gallery file (``people.db``: ``people``) unless given. Milvus
  Lite lets one process at a time open a file (an advisory lock): while ``deepmetric serve``
  holds it, a ``deepmetric gallery ...`` command on the same gallery is refused in one line.
- ``milvus://HOST:PORT/COLLECTION``: a Milvus server or cluster (port 19530 when left out); the
  token (``user:password`` or an API key) is read from the environment variable
  :data:`TOKEN_ENV` (``DEEPMETRIC_MILVUS_TOKEN``), never from the command line or the gallery
  file. Connecting waits at most :data:`CONNECT_TIMEOUT` seconds.

Either spec may end in ``?index=hnsw`` (optionally ``&m=32&ef_construction=80&ef_search=64``,
the local HNSW's defaults): the collection gets an ``HNSW`` index instead of ``FLAT``, built
with ``M = m`` and ``efConstruction = ef_construction`` and searched with ``ef =
max(ef_search, hits wanted)`` (Milvus needs ``ef`` >= the hits asked for); approximate, as the
local HNSW index (a FLAT search visits every vector). Tested here on Milvus Lite only (whose
HNSW is faiss's), not on a server.

The choice is recorded in the gallery's meta record (key ``"index"``: :meth:`MilvusTarget.to_json`,
the Lite path absolute), so every later open uses the same collection. A collection that
exists already is refused at create (it holds another gallery's vectors, or something else),
before anything is written.

**The collection.** Fields ``id`` (INT64 primary key: the store's example ids, which SQLite
never reuses) and ``vector`` (FLOAT_VECTOR of the gallery's dim), a ``FLAT`` index (exact
search; ``HNSW`` when asked), consistency level ``Strong`` (a search sees every write that
returned). Its properties record ``deepmetric.format`` (:data:`FORMAT`),
``deepmetric.gallery_id`` (the store's random id), ``deepmetric.dim``, ``deepmetric.metric`` and
``deepmetric.generation`` (the store generation it reflects, written after each change):
opening a collection of another gallery, of another dim or metric, or one not made here is
refused in one line (:class:`MilvusIndexError`), before anything is written to the database.

**Metric mapping** (distances equal :class:`~deepmetric.gallery.index.ExactIndex`'s, i.e. those
of :mod:`deepmetric.distances`, within float32 rounding):

- ``"euclidean"``: Milvus ``L2``, which returns the *squared* distance ``||q - x||^2``: the
  distance is ``sqrt(max(d, 0))``;
- ``"squared_euclidean"``: Milvus ``L2`` as returned (``max(d, 0)``);
- ``"cosine"``: Milvus ``IP`` on rows L2-normalised here (stored normalised, queries normalised
  before the search; a zero row stays zero, so its distance is 1 to everything, as in
  ``distances.py``): the distance is ``clip(1 - ip, 0, 2)``. Milvus's own ``COSINE`` metric is
  not used: the stored rows are then exactly what ``gallery check`` compares, and a server's
  handling of zero vectors does not matter.

**Ties** (equal distances, e.g. an image enrolled twice): resolved by ascending example id.
Milvus orders tied hits arbitrarily, so a search fetches past the k-th hit while the hits tied
with it continue, then sorts by (distance, id). The exact index resolves ties by insertion
order; in a gallery the two agree, since examples are added in ascending id order (SQLite's
AUTOINCREMENT). Used directly with ids added out of order, the orders differ; and ties beyond
Milvus's largest result window (:data:`MAX_LIMIT` hits) cannot be resolved.

**Consistency and repair.** Every write goes to SQLite first (one transaction), then to the
collection (upsert / delete: idempotent), then the collection's ``deepmetric.generation``
property is set to the store's generation. A process killed between the two writes leaves the
collection behind the database with the old generation recorded; the next open sees that the
recorded generation (or the number of vectors) differs from the store's and repairs the
collection by difference (:meth:`MilvusIndex.follow`: the ids the database holds and the
collection lacks are upserted, with their vectors read from SQLite; ids the database no longer
holds are deleted). ``reindex`` and ``gallery check --repair`` rebuild the collection from the
database (dropped, created, filled). ``gallery check`` compares ids, vectors and generation.

**Limits.** Several processes on one Milvus server each follow the database by generation, as
the in-memory indexes do; a search racing another process's write may name an example that the
database no longer holds, which the gallery answers from a snapshot of the database (as it does
for its own indexes). A backup of the gallery file (``gallery backup``) points at the same
collection. Milvus returns at most :data:`MAX_LIMIT` hits per query.

**Logging.** pymilvus logs every failed call with a traceback on stderr, and milvus-lite logs a
failed start; this module reports every failure itself, as one :class:`MilvusIndexError`, so it
raises the ``pymilvus`` and ``milvus_lite`` loggers to CRITICAL when it first imports pymilvus.

Needs ``pymilvus`` (and ``milvus-lite`` for a local file): ``pip install 'deepmetric[milvus]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deepmetric.checks import integer_at_least
from deepmetric.distances import METRICS, Metric, check_metric
from deepmetric.gallery.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    GalleryIndex,
    SearchResult,
    _check_ids,
    _check_matrix,
)
from deepmetric.gallery.store import Examples, GalleryError, GalleryStore

__all__ = [
    "CONNECT_TIMEOUT",
    "FORMAT",
    "MAX_LIMIT",
    "TOKEN_ENV",
    "MilvusIndex",
    "MilvusIndexError",
    "MilvusTarget",
    "collection_absent",
    "parse_index_spec",
    "target_of",
]

#: the environment variable holding the token of a Milvus server (never the command line)
TOKEN_ENV = "DEEPMETRIC_MILVUS_TOKEN"
#: seconds a connection to a Milvus server may take
CONNECT_TIMEOUT = 10.0
#: seconds one call to a Milvus server may take
RPC_TIMEOUT = 120.0
#: Milvus's largest number of hits per query (its topk limit) and query window
MAX_LIMIT = 16_384
#: the value of the ``deepmetric.format`` property of every collection made here
FORMAT = "deepmetric-gallery-vectors"
#: the default port of a Milvus server
DEFAULT_PORT = 19530

_PREFIX = "deepmetric."
_ID, _VECTOR = "id", "vector"
#: queries per search request
_QUERIES = 256
#: bytes of vectors per insert request (a server refuses messages above 64 MiB)
_INSERT_BYTES = 4 << 20
#: ids per delete request
_DELETE = 4096
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


class MilvusIndexError(GalleryError, ValueError):
    """A Milvus collection cannot be used for this gallery (one line naming it): unreachable,
    another gallery's, of another dim or metric, not made here, or a failed call.
    ``repairable``: a rebuild from the database fixes it (the collection is missing)."""

    def __init__(self, message: str, *, repairable: bool = False) -> None:
        super().__init__(message)
        self.repairable = repairable


# --------------------------------------------------------------------------- where


@dataclass(frozen=True)
class MilvusTarget:
    """Where a gallery's vectors live: ``uri`` is the absolute path of a Milvus Lite file
    (``.../NAME.db``) or ``http://HOST:PORT`` of a server; ``collection`` the collection;
    ``hnsw`` the HNSW parameters ``(m, ef_construction, ef_search)`` of its index, or ``None``
    for a FLAT (exact) one."""

    uri: str
    collection: str
    hnsw: tuple[int, int, int] | None = None

    @property
    def lite(self) -> bool:
        """Milvus Lite (a local file), not a server."""
        return not self.uri.startswith("http://")

    def __str__(self) -> str:
        query = ""
        if self.hnsw is not None:
            m, ef_construction, ef_search = self.hnsw
            query = f"?index=hnsw&m={m}&ef_construction={ef_construction}&ef_search={ef_search}"
        if self.lite:
            return f"milvus-lite:{self.uri}#{self.collection}{query}"
        return f"milvus://{self.uri.removeprefix('http://')}/{self.collection}{query}"

    def to_json(self) -> dict[str, Any]:
        """The gallery's meta record ``"index"``."""
        backend = "milvus-lite" if self.lite else "milvus"
        record: dict[str, Any] = {
            "backend": backend,
            "uri": self.uri,
            "collection": self.collection,
        }
        if self.hnsw is not None:
            record["hnsw"] = dict(zip(_HNSW_KEYS, self.hnsw, strict=True))
        return record


#: the ``?index=hnsw&...`` parameters of a spec, in :attr:`MilvusTarget.hnsw`'s order
_HNSW_KEYS = ("m", "ef_construction", "ef_search")
#: the values each may take (Milvus's bounds for M; ef at most its largest result window)
_HNSW_BOUNDS = {"m": (2, 2048), "ef_construction": (1, MAX_LIMIT), "ef_search": (1, MAX_LIMIT)}


def _hnsw_value_ok(key: str, value: object) -> bool:
    low, high = _HNSW_BOUNDS[key]
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _hnsw_of(query: str, spec: str) -> tuple[int, int, int] | None:
    """The HNSW parameters of a spec's ``?...`` part (``""``: none, a FLAT index)."""
    if not query:
        return None
    values: dict[str, str] = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or key in values or key not in ("index", *_HNSW_KEYS):
            raise ValueError(
                f"--index {spec}: after ? write index=hnsw, then optionally "
                f"{', '.join(f'&{k}=N' for k in _HNSW_KEYS)} (got {part!r})"
            )
        values[key] = value
    if values.get("index") != "hnsw":
        raise ValueError(f"--index {spec}: index=hnsw is the one index to ask for (FLAT: no ?)")
    defaults = {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    out = []
    for key in _HNSW_KEYS:
        text = values.get(key, str(defaults[key]))
        if not (text.isdigit() and _hnsw_value_ok(key, int(text))):
            low, high = _HNSW_BOUNDS[key]
            raise ValueError(f"--index {spec}: {key} must be an integer in {low}..{high}")
        out.append(int(text))
    return out[0], out[1], out[2]


def _collection_name(text: str, spec: str) -> str:
    if not _NAME.fullmatch(text):
        raise ValueError(
            f"--index {spec}: {text!r} is not a Milvus collection name (a letter or _, then "
            "letters, digits or _, at most 255)"
        )
    return text


def parse_index_spec(spec: str | None, gallery: str | Path) -> MilvusTarget | None:
    """The index a gallery ``gallery`` is created with: ``None`` for ``None`` / ``"local"``
    (the ``G.index/`` folder, kind chosen by size); a :class:`MilvusTarget` for
    ``milvus-lite:PATH.db[#COLLECTION]`` (PATH made absolute; COLLECTION by default the gallery
    file's name without its suffix, other characters than letters, digits and _ as _) or
    ``milvus://HOST[:PORT]/COLLECTION``; ``ValueError`` naming the choices otherwise."""
    if spec is None or spec == "local":
        return None
    given, _, query = spec.partition("?")
    if spec.startswith("milvus-lite:"):
        where, _, name = given.removeprefix("milvus-lite:").partition("#")
        if not where.endswith(".db") or where == ".db":
            raise ValueError(f"--index {spec}: a Milvus Lite file must be named *.db")
        if not name:
            name = re.sub(r"\W", "_", Path(gallery).name.partition(".")[0], flags=re.ASCII)
            name = name if _NAME.fullmatch(name) else f"g_{name}"[:255]
        path = os.path.abspath(os.path.expanduser(where))  # as milvus-lite keys its servers
        return MilvusTarget(path, _collection_name(name, spec), _hnsw_of(query, spec))
    if spec.startswith("milvus://"):
        rest = given.removeprefix("milvus://")
        address, _, name = rest.partition("/")
        if "@" in address:
            raise ValueError(
                f"--index milvus://...@{spec.split('@', 1)[1]}: a token never goes in the "
                f"address (the command line shows it to every user): set {TOKEN_ENV}"
            )
        match = _HOST_PORT.fullmatch(address)
        if match is None or not name:
            raise ValueError(f"--index {spec}: write milvus://HOST:PORT/COLLECTION")
        port = int(match.group(2) or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise ValueError(f"--index {spec}: port {port} is not in 1..65535")
        return MilvusTarget(
            f"http://{match.group(1)}:{port}", _collection_name(name, spec), _hnsw_of(query, spec)
        )
    raise ValueError(
        f'--index must be "local", "milvus-lite:PATH.db[#COLLECTION]" or '
        f'"milvus://HOST:PORT/COLLECTION", got {spec!r}'
    )


def target_of(meta: Mapping[str, Any], where: object = "the gallery") -> MilvusTarget | None:
    """The Milvus collection a gallery's meta record names (key ``"index"``), or ``None`` for
    a gallery with the local index folder."""
    record = meta.get("index")
    if record is None:
        return None
    ok = isinstance(record, dict) and record.get("backend") in ("milvus", "milvus-lite")
    uri, name = (record.get("uri"), record.get("collection")) if ok else (None, None)
    if not (isinstance(uri, str) and isinstance(name, str) and _NAME.fullmatch(name)):
        raise GalleryError(f"{where}: its index record {record!r} is not understood")
    hnsw = record.get("hnsw")
    if hnsw is not None:
        values = [hnsw.get(key) if isinstance(hnsw, dict) else None for key in _HNSW_KEYS]
        if not all(_hnsw_value_ok(k, v) for k, v in zip(_HNSW_KEYS, values, strict=True)):
            raise GalleryError(f"{where}: its index record {record!r} is not understood")
        hnsw = (values[0], values[1], values[2])
    target = MilvusTarget(uri, name, hnsw)
    if target.lite != (record["backend"] == "milvus-lite"):
        raise GalleryError(f"{where}: its index record {record!r} is not understood")
    return target


# --------------------------------------------------------------------------- connections

_LITE_LOCK = threading.Lock()
#: open clients per Milvus Lite path in this process (its embedded server stops at 0)
_LITE_USERS: dict[str, int] = {}


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise MilvusIndexError(
            "a Milvus index needs pymilvus (and milvus-lite for a local file): "
            "pip install 'deepmetric[milvus]'"
        ) from None
    for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def _message(error: BaseException) -> str:
    """One line of a pymilvus / gRPC error."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())


#: gRPC options of the Milvus Lite client: no proxy for the server this process starts
LITE_GRPC_OPTIONS = {"grpc.enable_http_proxy": 0}


def _lock_held(folder: Path) -> bool:
    """Whether another process holds the Milvus Lite file ``folder`` (its ``LOCK`` flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    lock = folder / "LOCK"
    if not lock.is_file():
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _connect(target: MilvusTarget, timeout: float) -> Any:
    """A ``MilvusClient`` of ``target`` (one line naming it when that fails)."""
    pymilvus = _pymilvus()
    if not target.lite:
        token = os.environ.get(TOKEN_ENV, "")
        try:
            return pymilvus.MilvusClient(uri=target.uri, token=token, timeout=timeout)
        except Exception as error:  # MilvusException, gRPC errors: any of them, one line
            raise MilvusIndexError(
                f"cannot reach Milvus at {target.uri} (the index {target}): {_message(error)}"
            ) from None
    path = Path(target.uri)
    if not path.parent.is_dir():
        raise MilvusIndexError(f"{target}: the folder {path.parent} does not exist")
    if path.exists() and not path.is_dir():
        raise MilvusIndexError(f"{target}: {path} is a file, not a Milvus Lite data folder")
    with _LITE_LOCK:
        try:
            # the embedded server is on loopback: never through an HTTP proxy the
            # environment names (gRPC follows http_proxy otherwise, and fails)
            client = pymilvus.MilvusClient(uri=str(path), grpc_options=LITE_GRPC_OPTIONS)
        except Exception as error:
            if _lock_held(path):
                raise MilvusIndexError(
                    f"{target}: {path} is open in another process (Milvus Lite lets one "
                    "process at a time use a file: stop the other one, e.g. deepmetric serve, "
                    "or use a Milvus server)"
                ) from None
            raise MilvusIndexError(f"{target}: cannot open {path}: {_message(error)}") from None
        _LITE_USERS[str(path)] = _LITE_USERS.get(str(path), 0) + 1
    return client


def _disconnect(target: MilvusTarget, client: Any) -> None:
    """Close ``client``; the last client of a Milvus Lite file in this process stops its
    embedded server, so that another process can open the file."""
    with contextlib.suppress(Exception):
        client.close()
    if not target.lite:
        return
    with _LITE_LOCK:
        left = _LITE_USERS.get(target.uri, 1) - 1
        if left > 0:
            _LITE_USERS[target.uri] = left
            return
        _LITE_USERS.pop(target.uri, None)
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(target.uri)


@contextlib.contextmanager
def _rpc(target: MilvusTarget, doing: str) -> Iterator[None]:
    """Any failure of the calls inside as one :class:`MilvusIndexError` naming ``target``."""
    try:
        yield
    except MilvusIndexError:
        raise
    except Exception as error:  # MilvusException, gRPC errors
        raise MilvusIndexError(f"{target}: {doing} failed: {_message(error)}") from None


def collection_absent(target: MilvusTarget, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect to ``target`` and check that its collection does not exist yet (what a new
    gallery needs); one line naming it otherwise (whose vectors it holds). Writes nothing."""
    client = _connect(target, timeout)
    try:
        with _rpc(target, "looking for the collection"):
            if not client.has_collection(target.collection, timeout=RPC_TIMEOUT):
                return
            properties = _properties(client, target)
        owner = properties.get(_PREFIX + "gallery_id")
        if properties.get(_PREFIX + "format") != FORMAT:
            whose = "a collection not made by deepmetric"
        else:
            whose = f"the vectors of another gallery (gallery id {owner or '?'})"
        raise MilvusIndexError(
            f"{target} exists already and holds {whose}: a new gallery needs a new collection "
            "(name another one, or drop that one first)"
        )
    finally:
        _disconnect(target, client)


def _properties(client: Any, target: MilvusTarget) -> dict[str, str]:
    description = client.describe_collection(target.collection, timeout=RPC_TIMEOUT)
    properties = description.get("properties") or {}
    out = {str(k): str(v) for k, v in properties.items()}
    for field in description.get("fields", []):
        if field.get("name") == _VECTOR:
            out["_field_dim"] = str((field.get("params") or {}).get("dim"))
    return out


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- the index


class MilvusIndex(GalleryIndex):
    """The :class:`~deepmetric.gallery.index.GalleryIndex` contract over a Milvus collection
    (see the module docstring: metric mapping, ties, consistency).

    The collection holds the vectors; this object holds a client and the sorted live ids (for
    ``len``, ``in`` and the duplicate check of :meth:`add`), read from the collection when it
    opens or follows the database. There are no tombstones: Milvus deletes (and compacts) by
    itself, so :attr:`removed` is 0 and :meth:`rebuild` does nothing. :attr:`ids` are in
    ascending order. :meth:`save` records :attr:`generation` and :attr:`gallery_id` in the
    collection's properties; reopening is constructing again. Call :meth:`close` when done.

    Args:
        target: the collection (:func:`parse_index_spec`).
        dim, metric: the gallery's; ``None``: read from the existing collection.
        gallery_id: the store's random id: a collection recording another is refused.
        create: create the collection (stamped with dim, metric, gallery id) when missing;
            otherwise a missing collection is a (repairable) :class:`MilvusIndexError`.
        check: refuse a collection not made here, or of another gallery, dim or metric;
            ``False``: connect without looking (then :meth:`sync` with ``full=True``).
        timeout: seconds connecting to a server may take.

    Raises:
        MilvusIndexError: unreachable, refused (one line naming the collection and why).
    """

    kind = "milvus"
    _type = "milvus"
    external: ClassVar[bool] = True

    def __init__(
        self,
        target: MilvusTarget,
        *,
        dim: int | None = None,
        metric: Metric | None = None,
        gallery_id: str | None = None,
        create: bool = False,
        check: bool = True,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if dim is not None:
            integer_at_least("dim", dim)
        if metric is not None:
            check_metric(metric)
        self.target = target
        #: whether this object created the collection (it was missing)
        self.created = False
        self._client = _connect(target, timeout)
        self._closed = False
        self._dirty = False
        try:
            found = self._look() if check else None
            if found is None and (dim is None or metric is None):
                raise MilvusIndexError(
                    f"{target} does not exist: nothing to read its dim and metric from",
                    repairable=True,
                )
            if found is not None:
                self._refuse_other(found, dim, metric, gallery_id)
                dim = dim if dim is not None else int(found["_field_dim"])
                metric = metric if metric is not None else found[_PREFIX + "metric"]  # type: ignore[assignment]
            assert dim is not None and metric is not None
            super().__init__(dim=dim, metric=metric, rebuild_fraction=None)
            self.gallery_id = gallery_id
            self._live = np.empty(0, dtype=np.int64)
            if found is None and check:
                if not create:
                    raise MilvusIndexError(f"{target} does not exist", repairable=True)
                self._create()
            elif found is not None:
                self.gallery_id = gallery_id or found.get(_PREFIX + "gallery_id") or None
                self.generation = _int_or_none(found.get(_PREFIX + "generation"))
                with _rpc(target, "loading the collection"):
                    self._client.load_collection(target.collection, timeout=RPC_TIMEOUT)
                self._live = self._query_ids()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the collection

    @property
    def _milvus_metric(self) -> str:
        return "IP" if self.metric == "cosine" else "L2"

    def _look(self) -> dict[str, str] | None:
        """The collection's properties (and ``_field_dim``), ``None`` when it is missing."""
        with _rpc(self.target, "reading the collection"):
            if not self._client.has_collection(self.target.collection, timeout=RPC_TIMEOUT):
                return None
            return _properties(self._client, self.target)

    def _refuse_other(
        self,
        found: Mapping[str, str],
        dim: int | None,
        metric: str | None,
        gallery_id: str | None,
    ) -> None:
        target = self.target
        if found.get(_PREFIX + "format") != FORMAT:
            raise MilvusIndexError(
                f"{target} was not made by deepmetric (no {_PREFIX}format property): not "
                "using it; name another collection"
            )
        owner = found.get(_PREFIX + "gallery_id") or None
        if gallery_id is not None and owner is not None and owner != gallery_id:
            raise MilvusIndexError(
                f"{target} holds the vectors of another gallery (gallery id {owner}, this "
                f"one's is {gallery_id}): not using it; point this gallery at its own collection"
            )
        ours = gallery_id is not None and owner == gallery_id  # then a rebuild may replace it
        stored_dim = _int_or_none(found.get(_PREFIX + "dim"))
        field_dim = _int_or_none(found.get("_field_dim"))
        stored_metric = found.get(_PREFIX + "metric")
        if stored_metric not in METRICS or stored_dim is None or stored_dim != field_dim:
            raise MilvusIndexError(
                f"{target}: its dim / metric properties are damaged", repairable=ours
            )
        other_dim = dim is not None and dim != stored_dim
        if other_dim or (metric is not None and metric != stored_metric):
            raise MilvusIndexError(
                f"{target} holds {stored_dim}-d {stored_metric} vectors, this gallery "
                f"{dim}-d {metric}: not using it",
                repairable=ours,
            )

    def _stamp(self) -> dict[str, str]:
        return {
            _PREFIX + "format": FORMAT,
            _PREFIX + "gallery_id": self.gallery_id or "",
            _PREFIX + "dim": str(self.dim),
            _PREFIX + "metric": self.metric,
            _PREFIX + "generation": "" if self.generation is None else str(self.generation),
        }

    def _create(self) -> None:
        pymilvus = _pymilvus()
        client, name = self._client, self.target.collection
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=self.dim)
        params = client.prepare_index_params()
        hnsw = self.target.hnsw
        params.add_index(
            field_name=_VECTOR,
            index_name=_VECTOR,
            index_type="FLAT" if hnsw is None else "HNSW",
            metric_type=self._milvus_metric,
            params={} if hnsw is None else {"M": hnsw[0], "efConstruction": hnsw[1]},
        )
        lite = self.target.lite  # its embedded server lacks the call a waiting index build makes
        with _rpc(self.target, "creating the collection"):
            client.create_collection(
                name,
                schema=schema,
                index_params=None if lite else params,
                properties=self._stamp(),
                consistency_level="Strong",
                timeout=RPC_TIMEOUT,
            )
            if lite:
                client.create_index(name, params, sync=False, timeout=RPC_TIMEOUT)
            client.load_collection(name, timeout=RPC_TIMEOUT)
        self._live = np.empty(0, dtype=np.int64)
        self.created = True

    def _recreate(self) -> None:
        """Drop the collection (when it is this gallery's, or not stamped with any) and create
        it empty."""
        found = self._look()
        if found is not None:
            self._refuse_other(found, None, None, self.gallery_id)
            with _rpc(self.target, "dropping the collection"):
                self._client.drop_collection(self.target.collection, timeout=RPC_TIMEOUT)
        self._create()

    def _iterate(self, fields: list[str], batch: int) -> Iterator[list[dict[str, Any]]]:
        """Every row of the collection (``fields`` of it), in batches. Milvus Lite answers one
        query with all of them (its embedded server lacks the timestamp call an iterator
        starts with, and logs a traceback for it); a server is read with an iterator (a query
        holds at most :data:`MAX_LIMIT` rows)."""
        if self.target.lite:
            with _rpc(self.target, "reading the collection"):
                yield list(
                    self._client.query(
                        self.target.collection, filter=f"{_ID} >= 0", output_fields=fields
                    )
                )
            return
        with _rpc(self.target, "reading the collection"):
            iterator = self._client.query_iterator(
                self.target.collection,
                batch_size=batch,
                filter="",
                output_fields=fields,
                timeout=RPC_TIMEOUT,
            )
            try:
                while rows := iterator.next():
                    yield rows
            finally:
                iterator.close()

    def _query_ids(self) -> np.ndarray:
        """Every id in the collection, ascending."""
        ids = [row[_ID] for rows in self._iterate([_ID], MAX_LIMIT) for row in rows]
        return np.unique(np.asarray(ids, dtype=np.int64))

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Rows as stored: L2-normalised for cosine (a zero row stays zero), else as given."""
        if self.metric != "cosine":
            return x
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def _upsert(self, rows: np.ndarray, ids: np.ndarray) -> None:
        step = max(1, _INSERT_BYTES // (4 * self.dim))
        with _rpc(self.target, "writing vectors"):
            for start in range(0, ids.size, step):
                part = [
                    {_ID: int(i), _VECTOR: row}
                    for i, row in zip(ids[start : start + step], rows[start : start + step])
                ]
                self._client.upsert(self.target.collection, part, timeout=RPC_TIMEOUT)
        self._dirty = True

    def _delete(self, ids: np.ndarray) -> None:
        with _rpc(self.target, "deleting vectors"):
            for start in range(0, ids.size, _DELETE):
                part = [int(i) for i in ids[start : start + _DELETE]]
                self._client.delete(self.target.collection, ids=part, timeout=RPC_TIMEOUT)
        self._dirty = True

    # ------------------------------------------------------------------ contract

    def __len__(self) -> int:
        return int(self._live.size)

    @property
    def removed(self) -> int:
        """0: Milvus deletes at once (and compacts its storage by itself)."""
        return 0

    @property
    def ids(self) -> np.ndarray:
        """The live ids, ascending."""
        return self._live.copy()

    def __contains__(self, example_id: object) -> bool:
        if isinstance(example_id, bool) or not isinstance(example_id, (int, np.integer)):
            return False
        at = int(np.searchsorted(self._live, int(example_id)))
        return at < self._live.size and int(self._live[at]) == int(example_id)

    def __repr__(self) -> str:
        return (
            f"MilvusIndex({str(self.target)!r}, dim={self.dim}, metric={self.metric!r}, "
            f"live={len(self)})"
        )

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of every entry of the collection, ascending ids, as stored
        (L2-normalised for cosine); read from the collection, not from this object's ids."""
        batch = max(1, min(MAX_LIMIT, (8 << 20) // (4 * self.dim)))
        ids: list[int] = []
        vectors: list[Any] = []
        for rows in self._iterate([_ID, _VECTOR], batch):
            ids += [row[_ID] for row in rows]
            vectors += [row[_VECTOR] for row in rows]
        if not ids:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        out = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        return np.asarray(ids, dtype=np.int64)[order], out[order]

    def add(self, embeddings: np.ndarray, ids: np.ndarray | Sequence[int]) -> None:
        """Add (n, D) finite embeddings under the (n,) ids (int64 >= 0, unique, none of them
        live already): upserted into the collection. Nothing is added on a ``ValueError``."""
        x = _check_matrix(embeddings, self.dim, "embeddings", allow_empty=True)
        new = _check_ids(ids, x.shape[0])
        if new.size == 0:
            return
        clash = new[np.isin(new, self._live)]
        if clash.size:
            raise ValueError(f"ids already in the index: {clash[:10].tolist()}")
        self._upsert(self._prepare(x), new)
        self._live = np.union1d(self._live, new)

    def remove(self, ids: np.ndarray | Sequence[int]) -> None:
        """Delete the entries with these ids (all must be live: ``KeyError`` naming the
        others, and nothing removed)."""
        gone = _check_ids(ids, None)
        if gone.size == 0:
            return
        missing = np.setdiff1d(gone, self._live)
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        self._delete(gone)
        self._live = np.setdiff1d(self._live, gone)

    def rebuild(self) -> None:
        """Nothing to do: Milvus has no tombstones to drop here."""

    def _search_params(self, want: int) -> dict[str, Any]:
        """The metric, and for an HNSW index ``ef`` (at least the ``want`` hits asked for)."""
        if self.target.hnsw is None:
            return {"metric_type": self._milvus_metric}
        ef = max(self.target.hnsw[2], want)
        return {"metric_type": self._milvus_metric, "params": {"ef": ef}}

    def _hits(self, rows: np.ndarray, want: int) -> list[tuple[np.ndarray, ...]]:
        """Milvus's ``want`` nearest of each row (rows as stored), with their vectors; per row
        ``(ids, distances, compared, edge, slack)``: the distances in the gallery's metric by
        :class:`~deepmetric.gallery.index.ExactIndex`'s formulas (computed here from the
        vectors, row by row, so equal vectors get equal distances), ``compared`` the same in
        Milvus's terms (squared for L2, ``1 - ip`` for IP), ``edge`` Milvus's own distance of
        its last hit (what was not fetched is at least that far) and ``slack`` how far the two
        computations may differ (float32 rounding, generously)."""
        with _rpc(self.target, "searching"):
            found = self._client.search(
                self.target.collection,
                data=list(rows),
                limit=want,
                anns_field=_VECTOR,
                search_params=self._search_params(want),
                output_fields=[_VECTOR],
                timeout=RPC_TIMEOUT,
            )
        out = []
        for q, hits in zip(rows, found):
            hits = list(hits)[:want]
            ids = np.asarray([int(h["id"]) for h in hits], dtype=np.int64)
            x = np.asarray([h["entity"][_VECTOR] for h in hits], dtype=np.float32)
            x = x.reshape(ids.size, self.dim)
            edge = float(hits[-1]["distance"]) if hits else np.inf
            dot = (x * q).sum(axis=1, dtype=np.float32)
            if self.metric == "cosine":  # IP on normalised rows
                compared = np.clip(np.float32(1.0) - dot, 0.0, 2.0)
                edge, slack, dist = 1.0 - edge, 1e-5, compared
            else:  # L2: Milvus gives it squared
                sq_x, sq_q = (x * x).sum(axis=1, dtype=np.float32), np.float32((q * q).sum())
                compared = np.maximum((sq_x - np.float32(2.0) * dot) + sq_q, np.float32(0.0))
                scale = float(sq_q) + (float(sq_x[-1]) if ids.size else 0.0)
                slack = 1e-5 * max(scale, 1.0)
                dist = np.sqrt(compared) if self.metric == "euclidean" else compared
            out.append((ids, dist.astype(np.float32), compared, edge, slack))
        return out

    def _nearest(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each row, ties by ascending id: fetched from Milvus past the k-th
        hit while what it left out could be as near as the k-th (within the slack)."""
        cap = min(len(self), MAX_LIMIT)
        out_d = np.full((rows.shape[0], k), np.inf, dtype=np.float32)
        out_i = np.full((rows.shape[0], k), -1, dtype=np.int64)
        pending = np.arange(rows.shape[0])
        want = min(k + 1, cap)
        while pending.size:
            still = []
            for row, (ids, dist, compared, edge, slack) in zip(
                pending, self._hits(rows[pending], want)
            ):
                order = np.lexsort((ids, dist))
                more = ids.size == want and want < cap  # Milvus holds more than it gave
                if more and ids.size >= k and compared[order[k - 1]] + slack >= edge:
                    still.append(row)  # what was left out may tie with the k-th: fetch more
                    continue
                order = order[:k]
                out_d[row, : order.size], out_i[row, : order.size] = dist[order], ids[order]
            pending = np.asarray(still, dtype=np.int64)
            want = min(2 * want, cap)
        return out_d, out_i

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The k nearest entries of each query (see :meth:`GalleryIndex.search`): distances in
        the gallery's metric, ties by ascending id; at most :data:`MAX_LIMIT` hits, the rest
        padding."""
        q = _check_matrix(queries, self.dim, "queries", allow_empty=True)
        integer_at_least("k", k)
        dist = np.full((q.shape[0], k), np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        kk = min(k, len(self), MAX_LIMIT)
        if kk and q.shape[0]:
            rows = self._prepare(q)
            for start in range(0, rows.shape[0], _QUERIES):
                part = slice(start, start + _QUERIES)
                dist[part, :kk], ids[part, :kk] = self._nearest(rows[part], kk)
        return SearchResult(dist, ids)

    # ------------------------------------------------------------------ the database

    def sync(
        self,
        store: GalleryStore,
        snapshot: tuple[int, Examples] | None = None,
        *,
        full: bool = False,
    ) -> str:
        """Make the collection hold exactly the store's examples (``snapshot``: a
        ``store.snapshot()`` already read), then record the generation; returns what was done,
        in words. ``full``: drop and create the collection, then insert every example;
        otherwise by difference (upsert the ids it lacks, delete those the database no longer
        holds; vectors of ids present in both are not compared: ``gallery check`` does)."""
        generation, examples = store.snapshot() if snapshot is None else snapshot
        self.gallery_id = store.gallery_id
        if full:
            self.generation = None
            self._recreate()
            self._upsert(self._prepare(examples.embeddings), examples.ids)
            done = f"rebuilt from the database: {examples.ids.size} vectors"
        else:
            current = self._query_ids()
            extra = np.setdiff1d(current, examples.ids)
            missing = np.setdiff1d(examples.ids, current)
            if extra.size:
                self._delete(extra)
            if missing.size:
                rows = np.searchsorted(examples.ids, missing)
                self._upsert(self._prepare(examples.embeddings[rows]), missing)
            done = f"{missing.size} vectors added, {extra.size} removed"
        self._live = examples.ids.astype(np.int64, copy=True)
        self.generation = generation
        self.save()
        return done

    def follow(self, store: GalleryStore) -> str | None:
        """Catch up with the store: when the collection records the store's generation and
        holds as many vectors as the store examples, only re-read its ids (another handle or
        process wrote both) and return ``None``; otherwise :meth:`sync` by difference (the
        collection was left behind, e.g. by a process killed between the two writes) and
        return what it did."""
        found = self._look()
        if found is None:
            self.generation = None
            self._create()
            return self.sync(store)
        recorded = _int_or_none(found.get(_PREFIX + "generation"))
        if recorded is not None and recorded == store.generation:
            self._live = self._query_ids()
            if self._live.size == store.num_examples:
                self.generation = recorded
                return None
        return self.sync(store)

    def recorded_generation(self) -> int | None:
        """The generation the collection's properties record now (another process may have
        written since this object last looked)."""
        found = self._look()
        return None if found is None else _int_or_none(found.get(_PREFIX + "generation"))

    # ------------------------------------------------------------------ save / close

    def save(self, path: str | Path | None = None) -> None:
        """Record :attr:`generation` and :attr:`gallery_id` in the collection's properties
        (the vectors are in the collection already). ``path``: not used (a Milvus index has no
        folder); given one, ``ValueError``."""
        if path is not None:
            raise ValueError(f"a Milvus index lives in its collection {self.target}, not in {path}")
        properties = {
            _PREFIX + "generation": "" if self.generation is None else str(self.generation),
            _PREFIX + "gallery_id": self.gallery_id or "",
        }
        with _rpc(self.target, "recording the generation"):
            self._client.alter_collection_properties(
                self.target.collection, properties=properties, timeout=RPC_TIMEOUT
            )

    @classmethod
    def load(cls, path: Any) -> MilvusIndex:  # type: ignore[override]
        """The existing collection ``path`` (a :class:`MilvusTarget` or an index spec), its
        dim and metric read from it."""
        target = path if isinstance(path, MilvusTarget) else parse_index_spec(str(path), "g")
        if target is None:
            raise ValueError(f"{path} is not a Milvus index")
        return cls(target)

    def close(self) -> None:
        """Flush what was written (Milvus Lite: into its segment files) and disconnect
        (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if self._dirty:
                with contextlib.suppress(Exception):
                    self._client.flush(self.target.collection, timeout=RPC_TIMEOUT)
        finally:
            _disconnect(self.target, self._client)

    # ------------------------------------------------------------------ unused hooks

    def _add_rows(self, x: np.ndarray) -> None:  # pragma: no cover - add is overridden
        raise NotImplementedError

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover - search is overridden

    def _compact(self, keep: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError

    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {"target": str(self.target)}

    def _save_data(self, folder: Path) -> None:  # pragma: no cover
        raise NotImplementedError

    def _load_data(self, folder: Path, n: int) -> None:  # pragma: no cover
        raise NotImplementedError
