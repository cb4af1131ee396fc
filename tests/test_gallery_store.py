"""The gallery store: round trips, names as data, transactions, crashes, concurrent readers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deepmetric.gallery.index import ExactIndex, top_identities
from deepmetric.gallery.store import (
    MAX_NAME_LENGTH,
    GalleryError,
    GalleryExistsError,
    GalleryNotFoundError,
    GalleryStore,
    NotAGalleryError,
    UnknownExampleError,
    UnknownIdentityError,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR fake but signed"
TRICKY_NAMES = [
    "'; DROP TABLE identities; --",
    'Robert"); DROP TABLE examples;--',
    "O'Brien",
    "a/b\\c",
    "../../etc/passwd",
    "%_*? LIKE [x]",
    "Zoë Ångström",
    "名字 名前",
    "🙂👍🏽 family: 👨\u200d👩\u200d👧",  # zero-width joiners (format characters) are fine
    "é",  # composed é (NFC): "e\u0301", decomposed, is the same name (see below)
    "x" * MAX_NAME_LENGTH,
    "inner  spaces\u00a0ok",
]


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture
def store(tmp_path):
    with GalleryStore.create(tmp_path / "g.db", meta={"dim": 4, "metric": "cosine"}) as s:
        yield s


def _snapshot(s: GalleryStore):
    ex = s.all_embeddings()
    return ex.ids.tolist(), ex.identities, _bits(ex.embeddings).tolist(), s.generation


# --------------------------------------------------------------------------- round trips


def test_embeddings_round_trip_bit_for_bit_and_survive_reopening(tmp_path):
    path = tmp_path / "g.db"
    special = np.array(
        [[0.0, -0.0, 1e-45, -3.4028235e38], [np.float32(1 / 3), 1e-38, 7.0, -1.5]],
        dtype=np.float32,
    )
    with GalleryStore.create(path, meta={"dim": 4, "metric": "euclidean", "model": {"a": 1}}) as s:
        ids_a = s.add("a", special)
        ids_b = s.add("b", _rows(3, 4, 0).astype(np.float64))  # float64 in, float32 stored
        ids_a2 = s.add("a", _rows(2, 4, 1))
        assert ids_a == [1, 2] and ids_b == [3, 4, 5] and ids_a2 == [6, 7]
        before = _snapshot(s)
    with GalleryStore.open(path) as s:
        assert _snapshot(s) == before
        ex = s.all_embeddings()
        assert ex.ids.dtype == np.int64 and ex.embeddings.dtype == np.float32
        np.testing.assert_array_equal(_bits(ex.embeddings[:2]), _bits(special))
        np.testing.assert_array_equal(_bits(ex.embeddings[2:5]), _bits(_rows(3, 4, 0)))
        assert ex.identities == ["a", "a", "b", "b", "b", "a", "a"]
        some = s.examples([7, 1, 3])
        assert some.ids.tolist() == [7, 1, 3] and some.identities == ["a", "a", "b"]
        np.testing.assert_array_equal(_bits(some.embeddings), _bits(ex.embeddings[[6, 0, 2]]))
        assert s.identity_of([3, 1, 3]) == ["b", "a", "b"]
        meta = s.meta
        assert (s.dim, s.metric, meta["model"], meta["threshold"]) == (
            4,
            "euclidean",
            {"a": 1},
            None,
        )
        assert meta["schema_version"] == 1 and meta["format"] == "deepmetric-gallery"
        assert [(i.name, i.examples) for i in s.identities()] == [("a", 4), ("b", 3)]
        assert (s.num_identities, s.num_examples) == (2, 7)
    raw = sqlite3.connect(path)  # the file itself: WAL, little-endian float32 blobs
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    blob = raw.execute("SELECT embedding FROM examples WHERE id = 1").fetchone()[0]
    assert blob == special[0].astype("<f4").tobytes()
    raw.close()


def test_names_are_data_stored_and_returned_exactly(store):
    for i, name in enumerate(TRICKY_NAMES):
        store.add(name, _rows(2, 4, i), metadata={"note": name})
    infos = {info.name: info for info in store.identities()}
    assert set(infos) == set(TRICKY_NAMES) and len(infos) == len(TRICKY_NAMES)
    for name in TRICKY_NAMES:
        assert infos[name].metadata == {"note": name} and infos[name].examples == 2
        assert name in store
    ex = store.all_embeddings()
    assert ex.identities == [n for n in TRICKY_NAMES for _ in range(2)]
    assert store.identity_of(ex.ids.tolist()) == ex.identities
    assert "e\u0301" in store and "é" in store and "E\u0301" not in store  # NFC: one name
    store.remove("'; DROP TABLE identities; --")
    store.remove("../../etc/passwd")
    assert store.num_identities == len(TRICKY_NAMES) - 2  # the tables are all still there
    assert store.num_examples == 2 * (len(TRICKY_NAMES) - 2)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("", ValueError, "empty"),
        (" alice", ValueError, "whitespace"),
        ("alice\n", ValueError, "whitespace"),
        ("al\tice", ValueError, "control character"),
        ("al\x00ice", ValueError, "control character"),
        ("x" * (MAX_NAME_LENGTH + 1), ValueError, "at most"),
        ("\ud800", ValueError, "not valid Unicode"),
        (42, TypeError, "must be a str"),
        (None, TypeError, "must be a str"),
    ],
)
def test_bad_names_are_refused_and_nothing_is_written(store, name, error, message):
    store.add("ok", _rows(1, 4, 0))
    before = _snapshot(store)
    with pytest.raises(error, match=message):
        store.add(name, _rows(1, 4, 1))
    assert _snapshot(store) == before and store.num_identities == 1


def test_bad_embeddings_are_refused_and_nothing_is_written(store):
    store.add("ok", _rows(2, 4, 0))
    before = _snapshot(store)
    nan = _rows(3, 4, 1)
    nan[1, 2] = np.nan
    inf = _rows(3, 4, 1)
    inf[2, 0] = -np.inf
    cases = [
        (nan, ValueError, r"NaN or inf .* row\(s\) \[1\]"),
        (inf, ValueError, r"row\(s\) \[2\]"),
        (np.full((1, 4), 1e39), ValueError, "NaN or inf"),  # finite float64, inf float32
        (_rows(3, 5, 1), ValueError, "dimension 4"),
        (_rows(3, 4, 1)[0], ValueError, "2-D"),
        (np.ones((2, 4), dtype=np.int32), ValueError, "floating point"),
        (np.zeros((0, 4), np.float32), ValueError, "at least one row"),
    ]
    for emb, error, message in cases:
        with pytest.raises(error, match=message):
            store.add("new", emb)
        with pytest.raises(error, match=message):
            store.add("ok", emb)
    with pytest.raises(ValueError, match="2 thumbnails for 3"):
        store.add("new", _rows(3, 4, 1), thumbnails=[None, PNG])
    with pytest.raises(ValueError, match="not a PNG"):
        store.add("new", _rows(1, 4, 1), thumbnails=[b"GIF89a..."])
    with pytest.raises(ValueError, match="JSON"):
        store.add("new", _rows(1, 4, 1), metadata={"x": float("nan")})
    with pytest.raises(TypeError, match="metadata"):
        store.add("new", _rows(1, 4, 1), metadata=[("x", 1)])
    assert _snapshot(store) == before and "new" not in store


def test_a_write_failing_inside_the_transaction_leaves_nothing(tmp_path):
    path = tmp_path / "g.db"
    with GalleryStore.create(path, meta={"dim": 4, "metric": "euclidean"}) as s:
        s.add("first", _rows(3, 4, 0))  # ids 1..3
        before = _snapshot(s)
        raw = sqlite3.connect(path)  # a trigger that fails the 5th insert of the next add
        raw.execute(
            "CREATE TRIGGER boom AFTER INSERT ON examples WHEN NEW.id = 8 "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        raw.commit()
        raw.close()
        with pytest.raises(sqlite3.IntegrityError, match="boom"):
            s.add("second", _rows(10, 4, 1), metadata={"a": 1})  # ids 4..13
        with pytest.raises(sqlite3.IntegrityError, match="boom"):
            s.add("first", _rows(10, 4, 1), metadata={"a": 1})
        assert _snapshot(s) == before
        assert "second" not in s and s.identity("first").metadata == {}
        s.add("third", _rows(2, 4, 2))  # the store still works after the rollbacks
        assert s.num_examples == 5


# --------------------------------------------------------------------------- semantics


def test_generation_counts_changes_to_the_examples(store):
    assert store.generation == 0
    store.add("a", _rows(2, 4, 0))
    store.add("a", _rows(1, 4, 1))
    store.add("b", _rows(1, 4, 2))
    assert store.generation == 3
    store.set_meta("threshold", {"value": 0.4, "far": 1e-3})
    store.set_metadata("a", {"x": 1})
    assert store.generation == 3  # an index does not depend on these
    with pytest.raises(ValueError):
        store.add("c", np.full((1, 4), np.nan, np.float32))
    with pytest.raises(UnknownIdentityError):
        store.remove("nobody")
    assert store.generation == 3
    store.remove("a")
    assert store.generation == 4 and store.meta["threshold"] == {"value": 0.4, "far": 1e-3}


def test_metadata_merges_on_enroll_and_is_replaced_by_set_metadata(store):
    store.add("a", _rows(1, 4, 0), metadata={"x": 1, "y": 2})
    store.add("a", _rows(1, 4, 1), metadata={"y": 3, "z": [1, "two"]})
    store.add("a", _rows(1, 4, 2))  # no metadata: unchanged
    assert store.identity("a").metadata == {"x": 1, "y": 3, "z": [1, "two"]}
    store.set_metadata("a", {"only": True})
    assert store.identity("a") == store.identities()[0]
    assert store.identity("a").metadata == {"only": True} and store.identity("a").examples == 3


def test_remove_returns_the_example_ids_and_ids_are_never_reused(store):
    a = store.add("a", _rows(3, 4, 0))
    b = store.add("b", _rows(2, 4, 1))
    assert store.remove("b") == b
    c = store.add("c", _rows(2, 4, 2))
    assert min(c) > max(b)  # AUTOINCREMENT: a stale index never confuses b's ids with c's
    assert store.example_ids("a") == a and store.example_ids("c") == c
    with pytest.raises(UnknownIdentityError, match="no identity named 'b'") as info:
        store.remove("b")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownExampleError, match="no example with id 4, 5"):
        store.identity_of([1, 4, 5])
    with pytest.raises(UnknownExampleError):
        store.examples([4])
    with pytest.raises(UnknownIdentityError):
        store.thumbnail("b")
    raw = store._db.execute("SELECT COUNT(*) FROM examples WHERE id IN (4, 5)").fetchone()
    assert raw[0] == 0  # the cascade deleted the examples


def test_thumbnails(store):
    store.add("a", _rows(3, 4, 0), thumbnails=[None, PNG, PNG + b"2"])
    store.add("b", _rows(1, 4, 1))
    assert store.thumbnail("a") == PNG  # the first example that has one
    assert store.thumbnail("b") is None
    assert [store.example_thumbnail(i) for i in (1, 2, 3)] == [None, PNG, PNG + b"2"]


def test_meta(store):
    store.set_meta("model", {"name": "resnet", "sha256": "ab" * 32})
    store.set_meta("note", "ünïcode")
    assert store.meta["model"]["name"] == "resnet" and store.meta["note"] == "ünïcode"
    for key in ("dim", "metric", "generation", "schema_version", "format", "created"):
        with pytest.raises(ValueError, match="set by the store"):
            store.set_meta(key, 1)
    with pytest.raises(ValueError, match="JSON"):
        store.set_meta("x", {1, 2})


# --------------------------------------------------------------------------- files


def test_create_refuses_to_overwrite_and_checks_meta(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"precious")
    with pytest.raises(GalleryExistsError, match="already exists") as info:
        GalleryStore.create(path, meta={"dim": 4, "metric": "cosine"})
    assert isinstance(info.value, FileExistsError) and path.read_bytes() == b"precious"
    new = tmp_path / "new.db"
    for meta, message in [
        ({"metric": "cosine"}, "dim"),
        ({"dim": 0, "metric": "cosine"}, "dim"),
        ({"dim": 4, "metric": "manhattan"}, "metric"),
        ({"dim": 4, "metric": "cosine", "generation": 5}, "set by the store"),
    ]:
        with pytest.raises(ValueError, match=message):
            GalleryStore.create(new, meta=meta)
        assert not new.exists()


def test_open_refuses_what_is_not_a_gallery(tmp_path):
    with pytest.raises(GalleryNotFoundError, match="no gallery file") as info:
        GalleryStore.open(tmp_path / "missing.db")
    assert isinstance(info.value, FileNotFoundError)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(NotAGalleryError, match="not an SQLite file"):
        GalleryStore.open(text)
    other = tmp_path / "other.db"
    raw = sqlite3.connect(other)
    raw.execute("CREATE TABLE t (x)")
    raw.commit()
    raw.close()
    with pytest.raises(NotAGalleryError, match="not a deepmetric gallery"):
        GalleryStore.open(other)
    newer = tmp_path / "newer.db"
    GalleryStore.create(newer, meta={"dim": 2, "metric": "cosine"}).close()
    raw = sqlite3.connect(newer)
    raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(2),))
    raw.commit()
    raw.close()
    with pytest.raises(NotAGalleryError, match="schema version 2, newer"):
        GalleryStore.open(newer)
    assert issubclass(NotAGalleryError, GalleryError)


# --------------------------------------------------------------------------- processes

_KILL_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from deepmetric.gallery.store import GalleryStore
    store = GalleryStore.open(sys.argv[1])
    rows = np.random.default_rng(0).random((int(sys.argv[2]), 64), dtype=np.float32)
    print("ready", flush=True)
    store.add("victim", rows)
    print("done", flush=True)
    """
)

_WRITER_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from deepmetric.gallery.store import GalleryStore
    store = GalleryStore.open(sys.argv[1])
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        store.add(f"person {i}", np.random.default_rng(i).random((int(sys.argv[3]), 16),
                                                                 dtype=np.float32))
        time.sleep(0.01)
    print("done", flush=True)
    """
)


def _child(code: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_process_killed_mid_write_leaves_the_previous_state(tmp_path):
    path = tmp_path / "g.db"
    with GalleryStore.create(path, meta={"dim": 64, "metric": "cosine"}) as s:
        s.add("before", _rows(5, 64, 0))
        before = _snapshot(s)
    wal = Path(f"{path}-wal")
    child = _child(_KILL_CHILD, path, 300_000)  # ~80 MB of rows, ~1.5 s to insert
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        # the transaction is under way once its pages spill into the WAL
        while child.poll() is None and time.monotonic() < deadline:
            if wal.exists() and wal.stat().st_size > 8 << 20:
                break
            time.sleep(0.001)
        mid_wal = wal.stat().st_size if wal.exists() else 0
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, (child.returncode, err)
    assert "done" not in out and mid_wal > 8 << 20  # really killed in the middle of the add
    with GalleryStore.open(path) as s:
        assert _snapshot(s) == before and "victim" not in s
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        s.add("after", _rows(2, 64, 1))  # and the store is writable again
        assert s.num_examples == 7 and s.generation == before[3] + 1


def test_readers_see_whole_writes_while_another_process_writes(tmp_path):
    path = tmp_path / "g.db"
    batches, batch = 25, 2000
    GalleryStore.create(path, meta={"dim": 16, "metric": "euclidean"}).close()
    reader = GalleryStore.open(path)
    child = _child(_WRITER_CHILD, path, batches, batch)
    seen = set()
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        while child.poll() is None:
            ex = reader.all_embeddings()  # one read transaction: a consistent snapshot
            counts = Counter(ex.identities)
            assert all(c == batch for c in counts.values()), counts  # never part of an add
            assert sorted(counts) == sorted(f"person {i}" for i in range(len(counts)))
            infos = reader.identities()
            assert all(info.examples == batch for info in infos)
            seen.add(len(counts))
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0 and "done" in out, err
    assert len(seen - {0, batches}) >= 2, seen  # the reads really overlapped the writes
    ex = reader.all_embeddings()
    for i in range(batches):
        rows = ex.embeddings[np.array(ex.identities) == f"person {i}"]
        expected = np.random.default_rng(i).random((batch, 16), dtype=np.float32)
        np.testing.assert_array_equal(_bits(rows), _bits(expected))
    assert reader.generation == batches
    reader.close()


# --------------------------------------------------------------------------- with an index


def test_store_to_index_to_identities(store):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 4)).astype(np.float32)
    for i, c in enumerate(centres):
        store.add(f"p{i}", c + 0.01 * rng.standard_normal((3 + 10 * (i == 0), 4)))
    ex = store.all_embeddings()
    index = ExactIndex(dim=store.dim, metric=store.metric)
    index.add(ex.embeddings, ex.ids)
    index.generation = store.generation
    matches = top_identities(index, centres[[0, 3]], 3, store.identity_of, fetch=2)
    assert [m[0] for m in matches.identities] == ["p0", "p3"]
    assert all(len(set(m)) == 3 for m in matches.identities)
    index.remove(store.remove("p0"))
    assert index.generation != store.generation  # the caller can tell the index is stale
    matches = top_identities(index, centres[[0]], 5, store.identity_of)
    assert "p0" not in matches.identities[0] and len(matches.identities[0]) == 4
