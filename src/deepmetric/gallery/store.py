"""The gallery store: enrolled identities and their example embeddings in one SQLite file,
the source of truth from which every search index is derived.

Standard library ``sqlite3`` only, parameterised queries only (a name is data, never SQL), no
pickle: embeddings are raw little-endian float32 bytes, everything else is JSON text.

Schema (version :data:`SCHEMA_VERSION`)::

    meta        key TEXT PRIMARY KEY, value TEXT (JSON)
                  format          "deepmetric-gallery" (what marks the file as a gallery)
                  schema_version  int; a file with a newer version is refused
                  dim, metric     the embedding dimension and distance (fixed at create)
                  model           the model identity dict (what made the embeddings)
                  threshold       the open-set threshold record (any JSON, or null)
                  created         creation time, Unix seconds
                  generation      int, +1 by every add / remove (see below)
                  gallery_id      random hex, made at create (or at the first writable open
                                  of an older file): what a saved index is bound to
                  ...             any other JSON keys given to create / set_meta
    identities  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                metadata TEXT NOT NULL (a JSON object), created REAL (Unix seconds)
    examples    id INTEGER PRIMARY KEY AUTOINCREMENT (never reused, so an id held by a
                  stale index can never point at a different example),
                identity INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
                embedding BLOB NOT NULL (dim x float32, little-endian: exactly 4 dim bytes),
                thumbnail BLOB (PNG bytes, or NULL), created REAL (Unix seconds)
                + index examples_by_identity (identity, id)

Identity names are stored in Unicode NFC (canonical composition), otherwise as given (no case
folding, no stripping): any characters, quotes, slashes, ``'; DROP TABLE``, emoji. So
``"e\u0301"`` (e + combining acute, as macOS spells file names) and ``"\u00e9"`` are one
identity, ``"é"``, whichever spelling enrolls, identifies, removes or asks for its thumbnail.
A name is looked up as given, then in NFC, then among the non-NFC names that a gallery written
before names were normalised may hold (so those stay reachable by either spelling, and new
examples join them). Beyond NFC, names are validated, not altered: a ``str`` of 1 to
:data:`MAX_NAME_LENGTH` characters, no control characters (Unicode category Cc: tabs,
newlines, NUL, ...), no invisible characters (format characters such as zero-width spaces and
direction overrides, except a zero-width (non-)joiner between non-ASCII letters or emoji; line
/ paragraph separators; private use; blank letters such as the Hangul filler: a name hides
nothing), no leading or trailing whitespace (refused rather than stripped, so ``"alice"`` and
``"alice "`` can never be two identities that look the same), encodable as UTF-8 (no lone
surrogates), and not ``.`` or ``..`` (a browser and most HTTP clients resolve those as path
steps, so ``/identities/..`` could never reach them).

``generation`` counts changes to the example set, the one thing an index is derived from: every
:meth:`GalleryStore.add` and :meth:`GalleryStore.remove` adds 1 in the same transaction as the
change. An index built at generation g is current while the store's generation is still g.
Metadata and meta writes (:meth:`~GalleryStore.set_metadata`, :meth:`~GalleryStore.set_meta`)
leave it alone, so setting a threshold does not force a rebuild of a large index.

Transactions and durability: each write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction, so
it happens whole or not at all; a process killed in the middle leaves the previous state (the
uncommitted WAL frames are ignored on the next open). Journal mode WAL: readers in other
processes never block on a writer and see the state before or after each write, never a part.
``synchronous=FULL``: a committed write also survives a power cut or an OS crash (NORMAL only
guarantees that against a process crash). It costs one fsync per transaction, and since an
``add`` of any number of examples is one transaction, enrolling in batches makes it negligible
(see ``benchmarks/gallery_index.py``). Concurrent writers wait for each other up to
``timeout`` seconds. A store object belongs to the thread that opened it (sqlite3's default
check); several processes may open the same file. WAL needs a local file system (not NFS).
A committed write first lives in ``G-wal``; :meth:`GalleryStore.close` and
:meth:`GalleryStore.checkpoint` fold it into ``G`` (``PRAGMA wal_checkpoint(TRUNCATE)``, never
waiting for another process), and :meth:`GalleryStore.backup` copies a consistent snapshot with
SQLite's online backup while other processes write: copy ``G`` alone only after one of these.

Errors: SQLite's "database is locked" (another process held the write lock longer than
``timeout``) is :class:`GalleryBusyError`; a write to a gallery that cannot be written is
:class:`GalleryReadOnlyError`. A file (or folder) that cannot be written is opened read-only
(``mode=ro``; on a read-only file system without its ``-shm``, ``immutable=1`` when no
write-ahead log is left to read): every read works, every write raises
:class:`GalleryReadOnlyError`.

Example::

    with GalleryStore.create("people.db", meta={"dim": 128, "metric": "cosine"}) as store:
        ids = store.add("Ada Lovelace", emb)          # emb: (n, 128) float32
        examples = store.all_embeddings()              # ids, identities, (N, 128) float32
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

from deepmetric.checks import integer_at_least
from deepmetric.distances import METRICS

__all__ = [
    "FORMAT",
    "MAX_NAME_LENGTH",
    "MAX_THUMBNAIL_BYTES",
    "SCHEMA_VERSION",
    "Examples",
    "GalleryBusyError",
    "GalleryError",
    "GalleryExistsError",
    "GalleryNotFoundError",
    "GalleryReadOnlyError",
    "GalleryStore",
    "IdentityInfo",
    "NotAGalleryError",
    "UnknownExampleError",
    "UnknownIdentityError",
    "check_name",
]

#: the value of meta "format" in every gallery file
FORMAT = "deepmetric-gallery"
#: the schema this code writes; it opens files of this version or older
SCHEMA_VERSION = 1
#: the longest identity name, in characters (code points)
MAX_NAME_LENGTH = 256
#: the largest thumbnail accepted, in bytes
MAX_THUMBNAIL_BYTES = 1 << 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SQLITE_HEADER = b"SQLite format 3\x00"
#: meta keys only the store writes
_RESERVED = frozenset(
    {"format", "schema_version", "dim", "metric", "created", "generation", "gallery_id"}
)
#: bound parameters per statement (SQLite's default limit is 32766; stay far below)
_CHUNK = 500

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE identities ("
    " id INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL UNIQUE,"
    " metadata TEXT NOT NULL DEFAULT '{}',"
    " created REAL NOT NULL)",
    "CREATE TABLE examples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " identity INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,"
    " embedding BLOB NOT NULL,"
    " thumbnail BLOB,"
    " created REAL NOT NULL)",
    "CREATE INDEX examples_by_identity ON examples (identity, id)",
)


# --------------------------------------------------------------------------- errors


class GalleryError(Exception):
    """A gallery file cannot be created, opened or used as asked."""


class GalleryExistsError(GalleryError, FileExistsError):
    """:meth:`GalleryStore.create` was given a path that already exists."""


class GalleryNotFoundError(GalleryError, FileNotFoundError):
    """:meth:`GalleryStore.open` was given a path where there is no file."""


class NotAGalleryError(GalleryError, ValueError):
    """The file is not SQLite, not a deepmetric gallery, or of a newer schema version."""


class GalleryBusyError(GalleryError):
    """Another process held the gallery's write lock longer than the busy timeout: try again."""


class GalleryReadOnlyError(GalleryError):
    """A write to a gallery that cannot be written (read-only file, folder or file system)."""


class UnknownIdentityError(GalleryError, KeyError):
    """No identity of that name is enrolled."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no identity named {self.name!r} in the gallery"


class UnknownExampleError(GalleryError, KeyError):
    """No example with (some of) those ids."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(list(ids))
        self.ids = list(ids)

    def __str__(self) -> str:
        shown = ", ".join(map(str, self.ids[:10])) + (", ..." if len(self.ids) > 10 else "")
        return f"no example with id {shown} in the gallery ({len(self.ids)} unknown)"


# --------------------------------------------------------------------------- values


class IdentityInfo(NamedTuple):
    """One enrolled identity: its name, number of examples, metadata and creation time."""

    name: str
    examples: int
    metadata: dict[str, Any]
    created: float  # Unix seconds

    def to_json(self) -> dict[str, Any]:
        """The record of ``deepmetric gallery list --json`` and of each identity in the
        service's ``GET /identities``: ``{"identity", "examples", "metadata", "created"}``."""
        return {
            "identity": self.name,
            "examples": self.examples,
            "metadata": self.metadata,
            "created": self.created,
        }


class Examples(NamedTuple):
    """Example embeddings, row i of each field describing example ``ids[i]``.

    ``ids`` (N,) int64, ``identities`` N names, ``embeddings`` (N, D) float32.
    """

    ids: np.ndarray
    identities: list[str]
    embeddings: np.ndarray


#: blank letters that render as nothing (Hangul fillers, the blank Braille pattern)
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: what may stand on both sides of a zero-width (non-)joiner: letters, marks and symbols
_JOINABLE = ("L", "M", "S")


def _joins(name: str, i: int) -> bool:
    """Whether the zero-width (non-)joiner ``name[i]`` stands between two non-ASCII letters,
    marks or symbols (emoji sequences, Persian, Indic scripts), where it changes the
    rendering; between ASCII characters or at an end it only hides."""
    if i == 0 or i + 1 == len(name):
        return False
    near = (name[i - 1], name[i + 1])
    return all(ord(c) > 0x7F and unicodedata.category(c)[0] in _JOINABLE for c in near)


def _invisible(name: str) -> str | None:
    """The first invisible character of ``name``: a format character (Unicode Cf:
    zero-width spaces, direction overrides, soft hyphens, byte order marks) other than a
    zero-width (non-)joiner inside a word of a script that uses it or an emoji sequence, and
    the tag characters of an emoji flag; a line or paragraph separator; a private-use
    character; a blank letter. ``None`` when there is none."""
    for i, c in enumerate(name):
        if c in "\u200c\u200d" and _joins(name, i):
            continue
        if "\U000e0020" <= c <= "\U000e007f" and i > 0 and ord(name[i - 1]) > 0xFFFF:
            continue  # the tags of a subdivision flag (England, Scotland, Wales)
        if unicodedata.category(c) in ("Cf", "Zl", "Zp", "Co") or c in _BLANK_LETTERS:
            return c
    return None


def check_name(name: object) -> str:
    """Return ``name`` in Unicode NFC (the form it is stored in) if it is a valid identity
    name, else raise ``ValueError`` (``TypeError`` for a non-string). The rules, checked on
    the NFC form, are in the module docstring."""
    if not isinstance(name, str):
        raise TypeError(f"an identity name must be a str, got {type(name).__name__}")
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise ValueError("an identity name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"an identity name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}"
        )
    if name != name.strip():
        raise ValueError(f"identity name {name!r} has leading or trailing whitespace")
    if name in (".", ".."):
        raise ValueError(
            f"identity name {name!r} is a path step in a URL (browsers resolve it): choose another"
        )
    bad = [c for c in name if unicodedata.category(c) == "Cc"]
    if bad:
        raise ValueError(f"identity name {name!r} contains the control character {bad[0]!r}")
    hidden = _invisible(name)
    if hidden is not None:
        raise ValueError(
            f"identity name {name!r} contains the invisible character U+{ord(hidden):04X} "
            f"({unicodedata.name(hidden, 'unnamed')}): it would look like another name"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"identity name {name!r} is not valid Unicode ({error.reason})") from None
    return name


def _to_json(value: object, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable (no NaN / inf): {error}") from None


def _check_metadata(metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    if not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata keys must be str")
    out = dict(metadata)
    _to_json(out, "metadata")
    return out


def _check_embeddings(embeddings: object, dim: int) -> np.ndarray:
    """(n, dim) finite float -> C-contiguous little-endian float32 (n, dim), n >= 1."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, {dim}), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {array.dtype}")
    if array.shape[0] == 0:
        raise ValueError("embeddings must hold at least one row, got 0")
    if array.shape[1] != dim:
        raise ValueError(
            f"embeddings must have dimension {dim} (the gallery's), got {array.shape[1]}"
        )
    with np.errstate(over="ignore"):  # too large for float32: inf, refused just below
        out = np.ascontiguousarray(array, dtype="<f4")
    if not np.isfinite(out).all():
        bad = np.nonzero(~np.isfinite(out).all(axis=1))[0]
        raise ValueError(
            f"embeddings contain NaN or inf (after conversion to float32) in row(s) "
            f"{bad[:10].tolist()}; nothing was written"
        )
    return out


def _check_thumbnails(thumbnails: object, n: int) -> list[bytes | None]:
    if thumbnails is None:
        return [None] * n
    if isinstance(thumbnails, (bytes, bytearray, memoryview, str)):
        raise TypeError("thumbnails must be a list with one entry (bytes or None) per embedding")
    out = list(thumbnails)  # type: ignore[call-overload]
    if len(out) != n:
        raise ValueError(f"got {len(out)} thumbnails for {n} embeddings")
    for i, t in enumerate(out):
        if t is None:
            continue
        if not isinstance(t, (bytes, bytearray, memoryview)):
            raise TypeError(f"thumbnail {i} must be PNG bytes or None, got {type(t).__name__}")
        t = out[i] = bytes(t)
        if not t.startswith(_PNG_SIGNATURE):
            raise ValueError(f"thumbnail {i} is not a PNG file (no PNG signature)")
        if len(t) > MAX_THUMBNAIL_BYTES:
            raise ValueError(
                f"thumbnail {i} is {len(t)} bytes, more than the {MAX_THUMBNAIL_BYTES} allowed"
            )
    return out


def _check_ids(ids: object) -> list[int]:
    array = np.asarray(ids)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"example ids must be a 1-D sequence of integers, got {array.dtype}")
    return [int(i) for i in array]


# --------------------------------------------------------------------------- the store


#: the example-set version (see the module docstring), JSON text in the meta table
_READ_GENERATION = "SELECT value FROM meta WHERE key = 'generation'"


class GalleryStore:
    """A gallery file: identities, their example embeddings, thumbnails and metadata.

    Make one with :meth:`create` or :meth:`open`, not the constructor. Use it as a context
    manager or call :meth:`close`.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        *,
        timeout: float = 30.0,
        readonly: bool = False,
    ) -> None:
        self._db = connection
        self.path = path
        self.timeout = timeout
        #: opened read-only (the file or its folder cannot be written): every write refused
        self.readonly = readonly
        #: NFC form -> stored non-NFC names (older galleries), read at the first need
        self._legacy: dict[str, list[str]] | None = None
        meta = self.meta
        self.dim: int = int(meta["dim"])
        self.metric: str = str(meta["metric"])
        #: the random id an index is bound to (``None``: an older read-only file without one)
        self.gallery_id: str | None = meta.get("gallery_id")
        if self.gallery_id is None and not readonly:
            self.gallery_id = self._add_gallery_id()

    # ------------------------------------------------------------------ open / create

    @staticmethod
    def _connect(path: Path, timeout: float) -> sqlite3.Connection:
        uri = path.resolve().as_uri() + "?mode=rw"
        db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise GalleryError(f"{path}: could not switch to WAL journal mode (got {mode})")
            db.execute("PRAGMA synchronous = FULL")  # durable commits: see the module docstring
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _connect_readonly(path: Path, timeout: float) -> sqlite3.Connection:
        """A read-only connection: ``mode=ro`` (reads the write-ahead log as well); on a
        read-only file system where SQLite cannot make ``G-shm``, ``immutable=1``, but only
        when no write-ahead log is left whose writes it would miss."""
        uri = path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("PRAGMA query_only = ON")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as error:
            db.close()
            wal = Path(f"{path}-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                raise GalleryReadOnlyError(
                    f"{path} is read-only and its write-ahead log {wal.name} cannot be read "
                    f"without {path.name}-shm ({error}): copy the gallery with its -wal and "
                    "-shm files to a writable folder"
                ) from None
        db = sqlite3.connect(
            f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None
        )
        db.execute("PRAGMA query_only = ON")
        return db

    def _add_gallery_id(self) -> str | None:
        """Give an older file its random gallery id (best effort: never waits for another
        process's lock, and a file that turns out to be read-only keeps none)."""
        new = uuid.uuid4().hex
        try:
            self._db.execute("PRAGMA busy_timeout = 0")
            with self._write() as db:
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('gallery_id', ?)",
                    (json.dumps(new),),
                )
            return self.meta.get("gallery_id")
        except GalleryError:
            return None
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    def _sql_error(self, error: sqlite3.OperationalError, doing: str) -> GalleryError:
        """SQLite's operational errors as one-line gallery errors."""
        text = str(error)
        if "locked" in text or "busy" in text:
            return GalleryBusyError(
                f"{self.path} is locked by another process (it held the write lock longer "
                f"than {self.timeout:g} s) while trying to {doing}: try again later"
            )
        if "readonly" in text or "read-only" in text:
            return GalleryReadOnlyError(
                f"{self.path} is read-only ({text}): cannot {doing}; reads (list, identify, "
                "check) still work"
            )
        return GalleryError(f"{self.path}: SQLite error while trying to {doing}: {text}")

    @classmethod
    def create(
        cls, path: str | Path, *, meta: Mapping[str, Any], timeout: float = 30.0
    ) -> GalleryStore:
        """Create a new, empty gallery file at ``path`` (never overwrites one).

        Args:
            path: the file to create; it must not exist.
            meta: ``{"dim": int >= 1, "metric": "euclidean" | "squared_euclidean" |
                "cosine", ...}`` plus optionally ``"model"`` (the model identity dict),
                ``"threshold"`` and any other JSON values. ``format``, ``schema_version``,
                ``created`` and ``generation`` are the store's own.
            timeout: seconds a write waits for another process's write to finish.

        Raises:
            GalleryExistsError: ``path`` exists. ValueError: bad ``meta``.
        """
        path = Path(path)
        values = dict(meta)
        dim, metric = values.get("dim"), values.get("metric")
        integer_at_least('meta["dim"]', dim)
        if metric not in METRICS:
            raise ValueError(f'meta["metric"] must be one of {", ".join(METRICS)}, got {metric!r}')
        reserved = sorted((_RESERVED - {"dim", "metric"}) & values.keys())
        if reserved:
            raise ValueError(f"meta keys {reserved} are set by the store, not by the caller")
        if not all(isinstance(k, str) for k in values):
            raise TypeError("meta keys must be str")
        values.setdefault("model", None)
        values.setdefault("threshold", None)
        values.update(
            format=FORMAT,
            schema_version=SCHEMA_VERSION,
            created=time.time(),
            generation=0,
            gallery_id=uuid.uuid4().hex,
        )
        rows = [(k, _to_json(v, f"meta[{k!r}]")) for k, v in sorted(values.items())]
        try:
            with open(path, "xb"):  # claims the name atomically: never overwrites
                pass
        except FileExistsError:
            raise GalleryExistsError(f"{path} already exists; not overwriting it") from None
        try:
            db = cls._connect(path, timeout)
            try:
                db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.close()
                raise
        except BaseException:
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
            raise
        return cls(db, path, timeout=timeout)

    @classmethod
    def open(
        cls, path: str | Path, *, timeout: float = 30.0, readonly: bool | None = None
    ) -> GalleryStore:
        """Open an existing gallery file.

        Args:
            path: the gallery file.
            timeout: seconds a write waits for another process's write lock
                (:class:`GalleryBusyError` after that).
            readonly: ``None``: read-only when the file or its folder cannot be written (a
                read-only file, folder or file system), else read-write; ``True``: read-only.

        Raises:
            GalleryNotFoundError: no file at ``path``.
            NotAGalleryError: not an SQLite file, an SQLite file that is not a deepmetric
                gallery, or a gallery of a newer schema version than this code reads.
        """
        path = Path(path)
        if not path.is_file():
            raise GalleryNotFoundError(f"no gallery file at {path}")
        # The file is never opened outside SQLite: closing any descriptor of it would drop
        # every POSIX lock this process holds on it, including the shared lock of another
        # open GalleryStore (another thread's), and another process could then delete the
        # WAL under it and its later writes would be lost. SQLite checks the header itself;
        # only an empty file (which SQLite would take for a new database) is refused first.
        if path.stat().st_size < len(_SQLITE_HEADER):
            raise NotAGalleryError(f"{path} is not a deepmetric gallery: not an SQLite file")
        if readonly is None:
            folder = path.resolve().parent
            readonly = not (os.access(path, os.W_OK) and os.access(folder, os.W_OK))
        try:
            db = cls._connect_readonly(path, timeout) if readonly else cls._connect(path, timeout)
        except sqlite3.OperationalError as error:
            if "locked" in str(error):
                raise GalleryBusyError(
                    f"{path} is locked by another process (longer than {timeout:g} s): try "
                    "again later"
                ) from None
            if readonly:
                raise NotAGalleryError(
                    f"{path} is not a deepmetric gallery: not an SQLite file ({error})"
                ) from None
            try:  # access() said writable, SQLite could not write (e.g. a read-only mount)
                db, readonly = cls._connect_readonly(path, timeout), True
            except sqlite3.DatabaseError:
                raise NotAGalleryError(
                    f"{path} is not a deepmetric gallery: not an SQLite file ({error})"
                ) from None
        except sqlite3.DatabaseError as error:
            raise NotAGalleryError(
                f"{path} is not a deepmetric gallery: not an SQLite file ({error})"
            ) from None
        try:
            cls._check_format(db, path)
            return cls(db, path, timeout=timeout, readonly=readonly)
        except BaseException:
            db.close()
            raise

    @staticmethod
    def _check_format(db: sqlite3.Connection, path: Path) -> None:
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "identities", "examples"} <= tables:
                raise NotAGalleryError(
                    f"{path} is an SQLite file but not a deepmetric gallery (no gallery tables)"
                )
            rows = dict(
                db.execute(
                    "SELECT key, value FROM meta WHERE key IN ('format', 'schema_version')"
                ).fetchall()
            )
        except sqlite3.DatabaseError as error:
            raise NotAGalleryError(f"{path} is not a readable gallery: {error}") from None
        if json.loads(rows.get("format", "null")) != FORMAT:
            raise NotAGalleryError(
                f"{path} is an SQLite file but not a deepmetric gallery (meta format is "
                f"{rows.get('format')})"
            )
        version = json.loads(rows.get("schema_version", "null"))
        if not isinstance(version, int):
            raise NotAGalleryError(f"{path}: schema_version is missing or not an integer")
        if version > SCHEMA_VERSION:
            raise NotAGalleryError(
                f"{path} has gallery schema version {version}, newer than the {SCHEMA_VERSION} "
                "this deepmetric reads: upgrade deepmetric to open it"
            )

    def close(self) -> None:
        """Fold the write-ahead log into the file (:meth:`checkpoint`, best effort), then
        close the connection (idempotent)."""
        try:
            self.checkpoint()
        except (GalleryError, sqlite3.Error):
            pass  # closed already, or another process holds the lock: SQLite keeps the WAL
        finally:
            self._db.close()

    def checkpoint(self) -> bool:
        """Fold the write-ahead log ``G-wal`` into ``G`` and empty it (``PRAGMA
        wal_checkpoint(TRUNCATE)``), so that ``G`` alone holds every committed write.

        Never waits: returns ``False`` when another process is writing or reading an older
        snapshot at that instant (the log stays; SQLite folds it in later), and for a
        read-only gallery; ``True`` when the log was folded in entirely.
        """
        if self.readonly:
            return False
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            return False
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return not busy

    def backup(self, target: str | Path) -> Path:
        """Copy the gallery to the new file ``target`` with SQLite's online backup: one
        consistent snapshot (every write committed before it began, none after), taken while
        other processes go on reading and writing. Never overwrites: ``FileExistsError``
        when ``target`` exists. The copy is written beside ``target`` first, then linked in
        under its name, so a crash never leaves a half copy there. The index is not copied
        (it is derived: the copy's first open rebuilds it)."""
        target = Path(target)
        if target.exists():
            raise FileExistsError(f"{target} already exists; not overwriting it")
        folder = target.resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder for the copy")
        tmp = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            try:
                copy = sqlite3.connect(str(tmp), isolation_level=None)
                try:
                    self._db.backup(copy)  # all pages in one step: one read snapshot
                    copy.execute("PRAGMA journal_mode = DELETE")  # the copy is one file
                finally:
                    copy.close()
            except sqlite3.OperationalError as error:
                raise GalleryError(f"cannot write the copy {target}: {error}") from None
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            try:
                os.link(tmp, target)  # atomic, and never replaces an existing file
            except FileExistsError:
                raise FileExistsError(f"{target} already exists; not overwriting it") from None
            except OSError:  # a file system without hard links: the last check, then a rename
                if target.exists():
                    raise FileExistsError(f"{target} already exists; not overwriting it") from None
                os.rename(tmp, target)
        finally:
            for leftover in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)
        return target

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GalleryStore({str(self.path)!r}, dim={self.dim}, metric={self.metric!r})"

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _write(self, doing: str = "write to it") -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole, or rolled back on any exception. SQLite's
        lock and read-only errors become :class:`GalleryBusyError` /
        :class:`GalleryReadOnlyError` (nothing written)."""
        if self.readonly:
            raise GalleryReadOnlyError(
                f"{self.path} is read-only (the file or its folder cannot be written): cannot "
                f"{doing}; reads (list, identify, check) still work"
            )
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise self._sql_error(error, doing) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        try:
            self._db.execute("BEGIN")
        except sqlite3.OperationalError as error:
            raise self._sql_error(error, "read it") from None
        try:
            yield self._db
        finally:
            self._db.execute("COMMIT")

    def _bump_generation(self, db: sqlite3.Connection) -> None:
        (value,) = db.execute(_READ_GENERATION).fetchone()
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'generation'", (json.dumps(int(value) + 1),)
        )

    def _legacy_names(self, db: sqlite3.Connection) -> dict[str, list[str]]:
        """The stored names that are not in NFC (only a gallery written before names were
        normalised holds any), by their NFC form; read once (this code writes NFC names only,
        so the set can only shrink: each hit is checked again)."""
        if self._legacy is None:
            legacy: dict[str, list[str]] = {}
            # NFC leaves ASCII alone: only names with another character can be non-NFC
            for (stored,) in db.execute(
                "SELECT name FROM identities WHERE name GLOB '*[^\x01-\x7f]*' ORDER BY id"
            ):
                if not unicodedata.is_normalized("NFC", stored):
                    legacy.setdefault(unicodedata.normalize("NFC", stored), []).append(stored)
            self._legacy = legacy
        return self._legacy

    def _find(self, db: sqlite3.Connection, name: str) -> tuple[int, str] | None:
        """``(row id, metadata)`` of the identity ``name`` names (``None``: none): the exact
        stored name, else its NFC form, else a non-NFC stored name of an older gallery with
        that NFC form (see the module docstring)."""
        query = "SELECT id, metadata FROM identities WHERE name = ?"
        nfc = unicodedata.normalize("NFC", name)
        for candidate in dict.fromkeys([name, nfc]):
            row = db.execute(query, (candidate,)).fetchone()
            if row is not None:
                return int(row[0]), str(row[1])
        if nfc.isascii():
            return None
        for candidate in self._legacy_names(db).get(nfc, []):  # read only after a miss
            row = db.execute(query, (candidate,)).fetchone()
            if row is not None:
                return int(row[0]), str(row[1])
        return None

    def _identity_row(self, db: sqlite3.Connection, name: str) -> tuple[int, str]:
        found = self._find(db, name)
        if found is None:
            raise UnknownIdentityError(name)
        return found

    # ------------------------------------------------------------------ meta

    @property
    def meta(self) -> dict[str, Any]:
        """All meta values (a fresh dict; change them with :meth:`set_meta`)."""
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: Any) -> None:
        """Set meta ``key`` to the JSON value ``value`` (e.g. ``"threshold"``, ``"model"``).

        The store's own keys (format, schema_version, dim, metric, created, generation) are
        refused with ``ValueError``. Does not change :attr:`generation`.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"a meta key must be a non-empty str, got {key!r}")
        if key in _RESERVED:
            raise ValueError(f"meta {key!r} is set by the store and cannot be changed")
        text = _to_json(value, f"meta[{key!r}]")
        with self._write(f"set meta {key!r}") as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, text),
            )

    @property
    def generation(self) -> int:
        """The example-set version: +1 by every committed add or remove (read afresh, so it
        sees other processes' writes)."""
        (value,) = self._db.execute(_READ_GENERATION).fetchone()
        return int(json.loads(value))

    # ------------------------------------------------------------------ writes

    def add(
        self,
        identity: str,
        embeddings: np.ndarray,
        *,
        thumbnails: Sequence[bytes | None] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Enroll ``embeddings`` as examples of ``identity``, in one transaction.

        Args:
            identity: the name (see :func:`check_name`); a new name creates the identity, an
                enrolled one gets the examples added to its own.
            embeddings: (n, D) finite floats, n >= 1, D = the gallery's ``dim``; stored as
                float32 (converted first, then checked: a float64 too large for float32 is
                refused as inf).
            thumbnails: n entries, PNG bytes or ``None``, or ``None`` for none at all.
            metadata: a JSON object. For a new identity, its metadata; for an enrolled one it
                is merged into the existing metadata (``dict.update``: given keys replace,
                others stay). Use :meth:`set_metadata` to replace it whole.

        Returns:
            The n new example ids, ascending, in the order of the rows of ``embeddings``.

        Raises:
            ValueError / TypeError: bad input (NaN / inf, shape, name, thumbnail); nothing is
            written.
        """
        given, identity = identity, check_name(identity)  # stored in NFC
        rows = _check_embeddings(embeddings, self.dim)
        thumbs = _check_thumbnails(thumbnails, rows.shape[0])
        extra = _check_metadata({} if metadata is None else metadata)
        now = time.time()
        blobs = [r.tobytes() for r in rows]
        with self._write(f"enroll {identity!r}") as db:
            found = self._find(db, given)
            if found is None:
                cur = db.execute(
                    "INSERT INTO identities (name, metadata, created) VALUES (?, ?, ?)",
                    (identity, _to_json(extra, "metadata"), now),
                )
                row_id = int(cur.lastrowid)  # type: ignore[arg-type]
            else:
                row_id = int(found[0])
                if extra:
                    merged = {**json.loads(found[1]), **extra}
                    db.execute(
                        "UPDATE identities SET metadata = ? WHERE id = ?",
                        (_to_json(merged, "metadata"), row_id),
                    )
            (before,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM examples").fetchone()
            db.executemany(
                "INSERT INTO examples (identity, embedding, thumbnail, created) "
                "VALUES (?, ?, ?, ?)",
                ((row_id, b, t, now) for b, t in zip(blobs, thumbs)),
            )
            ids = [
                int(r[0])
                for r in db.execute(
                    "SELECT id FROM examples WHERE identity = ? AND id > ? ORDER BY id",
                    (row_id, before),
                )
            ]
            if len(ids) != len(blobs):  # pragma: no cover - a broken invariant, not input
                raise GalleryError(f"inserted {len(blobs)} examples but found {len(ids)}")
            self._bump_generation(db)
        return ids

    def remove(self, identity: str) -> list[int]:
        """Remove ``identity`` and all its examples, in one transaction.

        Returns:
            The ids of the removed examples, ascending (remove them from any index).

        Raises:
            UnknownIdentityError (a ``KeyError``): no identity of that name.
        """
        with self._write(f"remove {identity!r}") as db:
            row_id, _ = self._identity_row(db, identity)
            ids = [
                int(r[0])
                for r in db.execute(
                    "SELECT id FROM examples WHERE identity = ? ORDER BY id", (row_id,)
                )
            ]
            db.execute("DELETE FROM identities WHERE id = ?", (row_id,))  # cascades
            self._bump_generation(db)
        return ids

    def set_metadata(self, identity: str, metadata: Mapping[str, Any]) -> None:
        """Replace the metadata of ``identity`` with the JSON object ``metadata``."""
        text = _to_json(_check_metadata(metadata), "metadata")
        with self._write(f"set the metadata of {identity!r}") as db:
            row_id, _ = self._identity_row(db, identity)
            db.execute("UPDATE identities SET metadata = ? WHERE id = ?", (text, row_id))

    # ------------------------------------------------------------------ reads

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, str):
            return False
        with self._read() as db:
            return self._find(db, identity) is not None

    @property
    def num_identities(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    @property
    def num_examples(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def identities(self) -> list[IdentityInfo]:
        """Every enrolled identity, ordered by name (code point order)."""
        rows = self._db.execute(
            "SELECT i.name, COUNT(e.id), i.metadata, i.created FROM identities AS i "
            "LEFT JOIN examples AS e ON e.identity = i.id GROUP BY i.id ORDER BY i.name"
        ).fetchall()
        return [IdentityInfo(str(n), int(c), json.loads(m), float(t)) for n, c, m, t in rows]

    def identity(self, name: str) -> IdentityInfo:
        """One identity's :class:`IdentityInfo`; ``UnknownIdentityError`` if not enrolled."""
        with self._read() as db:
            row_id, _ = self._identity_row(db, name)
            row = db.execute(
                "SELECT i.name, COUNT(e.id), i.metadata, i.created FROM identities AS i "
                "LEFT JOIN examples AS e ON e.identity = i.id WHERE i.id = ? GROUP BY i.id",
                (row_id,),
            ).fetchone()
        return IdentityInfo(str(row[0]), int(row[1]), json.loads(row[2]), float(row[3]))

    def example_ids(self, identity: str) -> list[int]:
        """The example ids of ``identity``, ascending."""
        with self._read() as db:
            row_id, _ = self._identity_row(db, identity)
            return [
                int(r[0])
                for r in db.execute(
                    "SELECT id FROM examples WHERE identity = ? ORDER BY id", (row_id,)
                )
            ]

    def _decode(self, blob: bytes, example_id: int) -> bytes:
        if len(blob) != 4 * self.dim:
            raise GalleryError(
                f"{self.path}: example {example_id} has a {len(blob)}-byte embedding, expected "
                f"{4 * self.dim} (dim {self.dim} x float32): the file is corrupt"
            )
        return blob

    def examples(self, ids: Sequence[int] | np.ndarray | None = None) -> Examples:
        """Example embeddings: all of them ordered by id (``ids=None``), or the given ids in
        the given order (``UnknownExampleError`` if any is not in the gallery).

        Returns :class:`Examples`: ids (N,) int64, N identity names, embeddings (N, D)
        float32, bit for bit as stored. One read transaction: a consistent snapshot even while
        another process writes.
        """
        with self._read() as db:
            names = dict(db.execute("SELECT id, name FROM identities").fetchall())
            if ids is None:
                rows = db.execute(
                    "SELECT id, identity, embedding FROM examples ORDER BY id"
                ).fetchall()
            else:
                wanted = _check_ids(ids)
                found: dict[int, tuple[int, int, bytes]] = {}
                unique = list(dict.fromkeys(wanted))
                for start in range(0, len(unique), _CHUNK):
                    part = unique[start : start + _CHUNK]
                    marks = ",".join("?" * len(part))  # placeholders only; the ids are bound
                    for r in db.execute(
                        f"SELECT id, identity, embedding FROM examples WHERE id IN ({marks})",
                        part,
                    ):
                        found[int(r[0])] = r
                missing = [i for i in unique if i not in found]
                if missing:
                    raise UnknownExampleError(missing)
                rows = [found[i] for i in wanted]
        return self._to_examples(rows, names)

    def _to_examples(
        self, rows: Sequence[tuple[int, int, bytes]], names: Mapping[int, str]
    ) -> Examples:
        n = len(rows)
        out_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=n)
        data = b"".join(self._decode(r[2], r[0]) for r in rows)
        emb = np.frombuffer(data, dtype="<f4").reshape(n, self.dim).astype(np.float32)
        return Examples(out_ids, [names[r[1]] for r in rows], emb)

    def all_embeddings(self) -> Examples:
        """Every example, ordered by id: what an index is built from (see :meth:`examples`)."""
        return self.examples(None)

    def snapshot(self) -> tuple[int, Examples]:
        """``(generation, every example ordered by id)`` read in one transaction, so the two
        agree even while another process writes: what an index is built from and checked
        against."""
        with self._read() as db:
            (generation,) = db.execute(_READ_GENERATION).fetchone()
            names = dict(db.execute("SELECT id, name FROM identities").fetchall())
            rows = db.execute("SELECT id, identity, embedding FROM examples ORDER BY id").fetchall()
        return int(json.loads(generation)), self._to_examples(rows, names)

    def problems(self) -> list[str]:
        """What is wrong inside the database file, one sentence each (empty: nothing):
        SQLite's ``integrity_check`` and ``foreign_key_check``, embeddings of the wrong size,
        a generation that is not an integer >= 0, SQLite triggers (deepmetric creates none:
        someone else's code that runs on every write). Read only."""
        found: list[str] = []
        try:
            with self._read() as db:
                for (line,) in db.execute("PRAGMA integrity_check(20)"):
                    if line != "ok":
                        found.append(f"SQLite integrity check: {line}")
                orphans = db.execute("PRAGMA foreign_key_check").fetchall()
                if orphans:
                    found.append(f"{len(orphans)} rows refer to missing rows ({orphans[0][0]})")
                bad = [
                    int(r[0])
                    for r in db.execute(
                        "SELECT id FROM examples WHERE typeof(embedding) != 'blob' "
                        "OR length(embedding) != ? ORDER BY id LIMIT 11",
                        (4 * self.dim,),
                    )
                ]
                if bad:
                    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
                    found.append(
                        f"examples {shown} do not hold {self.dim} float32 values "
                        f"({4 * self.dim} bytes)"
                    )
                triggers = [
                    str(r[0])
                    for r in db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
                    )
                ]
                if triggers:
                    shown = ", ".join(repr(t) for t in triggers[:5])
                    found.append(
                        f"{len(triggers)} SQLite trigger(s) that deepmetric never creates: "
                        f"{shown}{', ...' if len(triggers) > 5 else ''} (they run on every "
                        "write: inspect them with sqlite3, then drop them)"
                    )
                row = db.execute(_READ_GENERATION).fetchone()
        except sqlite3.DatabaseError as error:
            return [*found, f"SQLite cannot read the file: {error}"]
        try:
            generation = json.loads(row[0]) if row is not None else None
        except ValueError:
            generation = None
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            found.append(f"meta generation is {row[0] if row else 'missing'}, not an integer >= 0")
        return found

    def identity_of(self, example_ids: Sequence[int] | np.ndarray) -> list[str]:
        """The identity name of each example id, in order (``UnknownExampleError`` if any id
        is not in the gallery; -1 is never an example id)."""
        wanted = _check_ids(example_ids)
        unique = list(dict.fromkeys(wanted))
        found: dict[int, str] = {}
        with self._read() as db:
            for start in range(0, len(unique), _CHUNK):
                part = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(part))
                for example_id, name in db.execute(
                    "SELECT e.id, i.name FROM examples AS e JOIN identities AS i "
                    f"ON i.id = e.identity WHERE e.id IN ({marks})",
                    part,
                ):
                    found[int(example_id)] = str(name)
        missing = [i for i in unique if i not in found]
        if missing:
            raise UnknownExampleError(missing)
        return [found[i] for i in wanted]

    def thumbnail(self, identity: str) -> bytes | None:
        """The thumbnail of ``identity``'s first example (lowest id) that has one, or
        ``None`` when none of its examples has a thumbnail."""
        with self._read() as db:
            row_id, _ = self._identity_row(db, identity)
            row = db.execute(
                "SELECT thumbnail FROM examples WHERE identity = ? AND thumbnail IS NOT NULL "
                "ORDER BY id LIMIT 1",
                (row_id,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def example_thumbnail(self, example_id: int) -> bytes | None:
        """The thumbnail of one example (``None`` if it has none)."""
        row = self._db.execute(
            "SELECT thumbnail FROM examples WHERE id = ?", (int(example_id),)
        ).fetchone()
        if row is None:
            raise UnknownExampleError([int(example_id)])
        return None if row[0] is None else bytes(row[0])
