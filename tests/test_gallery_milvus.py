"""A gallery's vectors in Milvus, tested with Milvus Lite in process (files under tmp_path):
the index contract against the exact index, the same gallery scenario on both backends, a
process SIGKILLed between the database write and the collection write (repaired on open), the
refusals (another gallery's collection, another dim or metric, an unreachable server, a file
another process holds) as one line, and ``deepmetric serve`` on a Milvus-backed gallery.

A Milvus server or cluster (``milvus://HOST:PORT/COLLECTION``) is not tested here: only that an
unreachable address is one line naming it, at once.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability_gallery import EXAMPLES, inputs, make_embedder
from test_service import KEY, WRITE, Server, cli, enroll, files_field, shared_run

from deepmetric.cli import main as cli_main
from deepmetric.gallery import Gallery
from deepmetric.gallery import index as index_module
from deepmetric.gallery.check import check_gallery
from deepmetric.gallery.index import ExactIndex
from deepmetric.gallery.milvus_index import (
    MilvusIndex,
    MilvusIndexError,
    parse_index_spec,
    target_of,
)
from deepmetric.gallery.store import GalleryStore

TESTS = Path(__file__).parent
METRICS = ["euclidean", "squared_euclidean", "cosine"]


def _lite(tmp_path: Path, collection: str = "") -> str:
    return f"milvus-lite:{tmp_path / 'vectors.db'}" + (f"#{collection}" if collection else "")


def _assert_same_distances(metric: str, got: np.ndarray, want: np.ndarray) -> None:
    """Equal within float32 rounding. The exact index's euclidean distance is
    ``sqrt(|q|^2 + |x|^2 - 2 q.x)``: near 0 its cancellation leaves sqrt(a few ulps of |x|^2)
    (1e-3 for these rows), so euclidean distances are compared squared."""
    assert (np.isinf(got) == np.isinf(want)).all()
    finite = np.isfinite(want)
    got, want = got[finite].astype(np.float64), want[finite].astype(np.float64)
    if metric == "euclidean":
        got, want = got**2, want**2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


# ------------------------------------------------------------------------------ the index


@pytest.mark.parametrize("metric", METRICS)
def test_index_contract_against_the_exact_index(tmp_path, metric):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[[5, 9, 40]] = x[7]  # ties: four equal vectors
    x[11] = 0.0  # a zero row (cosine: distance 1 to everything)
    ids = np.arange(300, dtype=np.int64) * 3 + 1
    target = parse_index_spec(_lite(tmp_path, f"c_{metric}"), "g")
    exact = ExactIndex(dim=16, metric=metric)
    index = MilvusIndex(target, dim=16, metric=metric, gallery_id="abc", create=True)
    try:
        for part in (slice(0, 120), slice(120, 300)):
            exact.add(x[part], ids[part])
            index.add(x[part], ids[part])
        queries = np.concatenate([rng.standard_normal((25, 16)), x[[7, 11, 200]]])

        def agree(k: int, searched: MilvusIndex = index) -> None:
            want, got = exact.search(queries, k), searched.search(queries, k)
            _assert_same_distances(metric, got.distances, want.distances)
            if metric != "cosine":
                assert (got.ids == want.ids).all(), k
                return
            # the zero query is at distance 1 of everything: all tied, so by insertion order
            # (exact) or by id (milvus), which differ once removed ids came back
            assert (got.ids[:-2] == want.ids[:-2]).all() and (got.ids[-1] == want.ids[-1]).all()
            live = np.sort(exact.ids)
            assert (got.ids[-2, : min(k, live.size)] == live[:k]).all()

        assert len(index) == 300 and 1 in index and 2 not in index
        for k in (1, 10, 400):  # 400 > live: padding
            agree(k)
        gone = ids[::4]
        exact.remove(gone)
        index.remove(gone)
        assert len(index) == len(exact) == 225 and int(gone[0]) not in index
        agree(10)
        agree(250)
        exact.add(x[:2], gone[:2])  # a removed id may come back
        index.add(x[:2], gone[:2])
        agree(10)
        with pytest.raises(ValueError, match="already in the index"):
            index.add(x[:1], ids[1:2])
        with pytest.raises(KeyError, match="not in the index"):
            index.remove([int(gone[5]), int(ids[1])])
        assert len(index) == 227  # nothing changed by the refused calls
        index.generation = 7
        index.save()
    finally:
        index.close()
    again = MilvusIndex(target, gallery_id="abc")  # reload: dim and metric from the collection
    try:
        assert (again.dim, again.metric, again.generation, len(again)) == (16, metric, 7, 227)
        assert (again.ids == np.sort(exact.ids)).all()
        agree(10, again)
        ids_m, vectors_m = again.live_vectors()
        ids_e, vectors_e = exact.live_vectors()
        order = np.argsort(ids_e)
        assert (ids_m == ids_e[order]).all()
        np.testing.assert_allclose(vectors_m, vectors_e[order], rtol=1e-6, atol=1e-6)
    finally:
        again.close()


def test_index_refuses_another_gallery_dim_or_metric(tmp_path):
    target = parse_index_spec(_lite(tmp_path, "c"), "g")
    MilvusIndex(target, dim=8, metric="euclidean", gallery_id="one", create=True).close()
    cases = [
        ({"dim": 8, "metric": "euclidean", "gallery_id": "two"}, "another gallery"),
        ({"dim": 4, "metric": "euclidean", "gallery_id": "one"}, "8-d euclidean"),
        ({"dim": 8, "metric": "cosine", "gallery_id": "one"}, "8-d euclidean"),
    ]
    for kwargs, words in cases:
        with pytest.raises(MilvusIndexError, match=words) as error:
            MilvusIndex(target, create=True, **kwargs)
        assert "\n" not in str(error.value) and "#c" in str(error.value)
    with pytest.raises(MilvusIndexError, match="does not exist") as missing:
        MilvusIndex(parse_index_spec(_lite(tmp_path, "other"), "g"), dim=8, metric="cosine")
    assert missing.value.repairable


def test_index_specs():
    lite = parse_index_spec("milvus-lite:v.db", "/x/my-people.2.db")
    assert lite.lite and lite.uri == str(Path("v.db").absolute()) and lite.collection == "my_people"
    assert parse_index_spec("milvus-lite:/v.db#g1", "x.db").collection == "g1"
    server = parse_index_spec("milvus://db.example.org/people", "x.db")
    assert (server.uri, server.collection, server.lite) == (
        "http://db.example.org:19530",
        "people",
        False,
    )
    assert str(server) == "milvus://db.example.org:19530/people"
    assert parse_index_spec(None, "x.db") is None and parse_index_spec("local", "x.db") is None
    assert server.hnsw is None and lite.hnsw is None
    hnsw = parse_index_spec("milvus-lite:/v.db#g1?index=hnsw", "x.db")
    assert (hnsw.collection, hnsw.hnsw) == ("g1", (32, 80, 64))  # the local HNSW's defaults
    tuned = parse_index_spec("milvus://h:1/c?index=hnsw&ef_search=128&m=16", "x.db")
    assert tuned.hnsw == (16, 80, 128)
    for target in (hnsw, tuned, server, lite):  # written and read back, as spec and record
        assert parse_index_spec(str(target), "x.db") == target
        assert target_of({"index": target.to_json()}) == target
    bad = {
        "faiss": "--index must be",
        "milvus-lite:v.sqlite": "*.db",
        "milvus://host:19530": "HOST:PORT/COLLECTION",
        "milvus://host:99999/c": "port",
        "milvus://host/9lives": "collection name",
        "milvus://root:Secret@host:19530/c": "DEEPMETRIC_MILVUS_TOKEN",
        "milvus://h/c?index=ivf": "index=hnsw is the one",
        "milvus://h/c?m=16": "index=hnsw is the one",
        "milvus://h/c?index=hnsw&nprobe=4": "after \\? write index=hnsw",
        "milvus://h/c?index=hnsw&m=1": "m must be an integer in 2..2048",
        "milvus-lite:v.db?index=hnsw&ef_search=x": "ef_search must be an integer",
    }
    for spec, words in bad.items():
        with pytest.raises(ValueError, match=words.replace("*", r"\*")) as error:
            parse_index_spec(spec, "x.db")
        assert "Secret" not in str(error.value)


# ------------------------------------------------------------------------------ the gallery


def _answers(gallery: Gallery, queries: torch.Tensor) -> list[list[tuple[str, float]]]:
    return [[tuple(c) for c in a.candidates] for a in gallery.identify(queries, k=3)]


def _assert_same_answers(metric: str, got: list, want: list) -> None:
    assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in want]
    _assert_same_distances(
        metric,
        np.array([d for row in got for _, d in row], dtype=np.float32),
        np.array([d for row in want for _, d in row], dtype=np.float32),
    )


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_the_same_gallery_on_the_exact_index_and_on_milvus(tmp_path, metric, monkeypatch):
    """One gallery scenario on the exact index, faiss flat, a Milvus FLAT and a Milvus HNSW
    collection: the same identities at the same distances at every step."""
    embedder = make_embedder(metric)
    queries = torch.stack([inputs(i)[0] + 0.05 for i in range(10)])
    queries[9] = inputs(3)[1]  # an enrolled example itself: distance 0
    answers: dict[str, list] = {}
    hnsw = _lite(tmp_path) + "?index=hnsw&m=16&ef_search=32"  # ef >= the hits: exact here
    backends = (("exact", None), ("flat", None), ("milvus", _lite(tmp_path)), ("hnsw", hnsw))
    exact_max = index_module.EXACT_MAX
    for backend, spec in backends:
        # the local index is exact up to EXACT_MAX examples, faiss above: -1 makes it faiss
        monkeypatch.setattr(index_module, "EXACT_MAX", -1 if backend == "flat" else exact_max)
        path = tmp_path / f"{backend}.db"
        got = answers[backend] = []
        with Gallery.create(path, embedder, index=spec) as gallery:
            assert gallery.index.kind == (backend if spec is None else "milvus")
            if spec is not None:
                index = gallery.index
                described = index._client.describe_index(index.target.collection, "vector")
                assert described["index_type"] == ("HNSW" if backend == "hnsw" else "FLAT")
            for i in range(8):
                gallery.enroll(f"person {i}", inputs(i))
            got.append(_answers(gallery, queries))
            gallery.remove("person 2")
            gallery.remove("person 5")
            gallery.enroll("person 8", inputs(8))
            gallery.enroll("person 3", inputs(9))  # more examples of an enrolled identity
            got.append(_answers(gallery, queries))
            assert gallery.reindex() == 8 * EXAMPLES
            got.append(_answers(gallery, queries))
        with Gallery.open(path, embedder) as gallery:  # reopened: the same index, not rebuilt
            assert gallery.index_builds == 0
            got.append(_answers(gallery, queries))
        assert check_gallery(path).ok
    for backend in ("flat", "milvus", "hnsw"):
        for step, (got, want) in enumerate(zip(answers[backend], answers["exact"])):
            _assert_same_answers(metric, got, want)
            assert want[9][0][0] == "person 3", step
    # the milvus gallery records its collection: reopened, it uses it (and nothing else)
    with GalleryStore.open(tmp_path / "milvus.db") as store:
        assert store.meta["index"] == {
            "backend": "milvus-lite",
            "uri": str(tmp_path / "vectors.db"),
            "collection": "milvus",
        }
    with GalleryStore.open(tmp_path / "hnsw.db") as store:
        hnsw_params = {"m": 16, "ef_construction": 80, "ef_search": 32}
        assert store.meta["index"]["hnsw"] == hnsw_params
    assert not (tmp_path / "milvus.db.index").exists()


def test_two_galleries_on_one_collection_follow_each_other(tmp_path):
    """Two Gallery objects on one file (as the service's worker threads): a write by one is
    seen by the other, which reads the collection's ids again instead of rebuilding it."""
    path = tmp_path / "g.db"
    embedder = make_embedder()
    Gallery.create(path, embedder, index=_lite(tmp_path)).close()
    with Gallery.open(path, embedder) as one, Gallery.open(path, embedder) as two:
        one.enroll("person 1", inputs(1))
        [answer] = two.identify(inputs(1)[:1], k=1)
        assert answer.identity == "person 1" and two.index_builds == 1
        two.remove("person 1")
        two.enroll("person 2", inputs(2))
        [answer] = one.identify(inputs(1)[:1], k=2)
        assert [c.identity for c in answer.candidates] == ["person 2"]
        lines: list[str] = []
        one._progress = lines.append
        one.identify(inputs(2)[:1], k=1)
        assert lines == []  # caught up by reading, nothing to repair
    assert check_gallery(path).ok


def test_check_reports_and_repairs_the_collection(tmp_path, capsys):
    path = tmp_path / "g.db"
    embedder = make_embedder()
    with Gallery.create(path, embedder, index=_lite(tmp_path)) as gallery:
        for i in range(4):
            gallery.enroll(f"person {i}", inputs(i))
    target = parse_index_spec(_lite(tmp_path, "g"), path)
    with GalleryStore.open(path) as store:
        first = store.example_ids("person 0")
    index = MilvusIndex(target)
    index._delete(np.asarray(first[:1]))  # behind the gallery's back
    index.close()
    report = check_gallery(path)
    assert not report.ok and [p.kind for p in report.problems] == ["index"]
    assert "lacks 1 of the database's 12 examples" in report.problems[0].message
    capsys.readouterr()
    assert cli_main(["gallery", "check", str(path), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt {target} from the database: 12 examples" in out
    assert f"{path}: consistent after the repair" in out
    assert cli_main(["gallery", "check", str(path)]) == 0
    with Gallery.open(path, embedder) as gallery:
        [answer] = gallery.identify(inputs(0)[:1], k=1)
        assert answer.identity == "person 0" and gallery.index_builds == 0


# ------------------------------------------------------------------------------ SIGKILL

# Opens the gallery argv[1] (its helpers from tests/, argv[2]), replaces MilvusIndex.<argv[4]>
# by a stop: it prints "stopped" and sleeps, so the parent SIGKILLs it right there; then
# enrolls "person 99" or removes "person 1" (argv[3]). MilvusIndex.add / .remove run after the
# database committed and before the collection changed; .save after the collection changed and
# before it records the generation.
_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from test_reliability_gallery import inputs, make_embedder
from deepmetric.gallery import Gallery
from deepmetric.gallery.milvus_index import MilvusIndex

task, hook = sys.argv[3], sys.argv[4]
real = getattr(MilvusIndex, hook)

def stop(self, *args, **kwargs):
    print("stopped", flush=True)
    time.sleep(120)

setattr(MilvusIndex, hook, stop)
gallery = Gallery.open(sys.argv[1], make_embedder())
if task == "enroll":
    gallery.enroll("person 99", inputs(99))
else:
    gallery.remove("person 1")
print("not stopped", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(
    ("task", "hook"), [("enroll", "add"), ("remove", "remove"), ("enroll", "save")]
)
def test_a_kill_between_the_two_writes_is_repaired_on_open(tmp_path, task, hook):
    path = tmp_path / "g.db"
    embedder = make_embedder()
    with Gallery.create(path, embedder, index=_lite(tmp_path)) as gallery:
        for i in range(3):
            gallery.enroll(f"person {i}", inputs(i))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(TESTS), task, hook],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 90)
        assert ready, "the child never reached the collection write"
        assert child.stdout.readline().strip() == "stopped"
        os.kill(child.pid, signal.SIGKILL)  # between the two writes
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with GalleryStore.open(path) as store:  # the database has the write
        names = [info.name for info in store.identities()]
        assert names == (
            ["person 0", "person 1", "person 2", "person 99"]
            if task == "enroll"
            else ["person 0", "person 2"]
        )
        generation = store.generation
    report = check_gallery(path)  # the collection is behind
    assert not report.ok and {p.kind for p in report.problems} == {"index"}
    assert any(f"records generation {generation - 1}" in p.message for p in report.problems)
    lines: list[str] = []
    with Gallery.open(path, embedder, progress=lines.append) as gallery:
        assert len(lines) == 1 and "repaired on open" in lines[0], lines
        changed = f"{EXAMPLES} vectors added" if task == "enroll" else f"{EXAMPLES} removed"
        if hook == "save":
            changed = "0 vectors added, 0 removed"
        assert changed in lines[0] and f"generation {generation - 1}" in lines[0]
        [found, gone] = gallery.identify(torch.stack([inputs(99)[0], inputs(1)[0]]), k=4)
        if task == "enroll":
            assert found.identity == "person 99" and found.distance < 1e-5
        else:
            assert "person 1" not in [c.identity for c in gone.candidates]
    assert check_gallery(path).ok


# ------------------------------------------------------------------------------ refusals


def _one_line(error: pytest.ExceptionInfo, *words: str) -> None:
    text = str(error.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    embedder = make_embedder()
    first = tmp_path / "first.db"
    with Gallery.create(first, embedder, index=_lite(tmp_path, "people")) as gallery:
        gallery.enroll("person 0", inputs(0))
        gallery_id = gallery._store.gallery_id

    # a new gallery on a collection that exists: refused before the file is made
    second = tmp_path / "second.db"
    with pytest.raises(MilvusIndexError) as error:
        Gallery.create(second, embedder, index=_lite(tmp_path, "people"))
    _one_line(error, "#people exists already", f"gallery id {gallery_id}")
    assert not second.exists()

    # a gallery whose record names another gallery's collection: refused at open
    Gallery.create(second, embedder, index=_lite(tmp_path, "mine")).close()
    with GalleryStore.open(second) as store:
        record = {**store.meta["index"], "collection": "people"}
        store.set_meta("index", record)
        before = (store.generation, store.num_examples)
    with pytest.raises(MilvusIndexError) as error:
        Gallery.open(second, embedder)
    _one_line(error, "#people holds the vectors of another gallery", gallery_id)
    with GalleryStore.open(second) as store:
        assert (store.generation, store.num_examples) == before

    # the gallery's own collection replaced by one of another dim or metric
    target = parse_index_spec(_lite(tmp_path, "people"), first)
    for dim, metric in ((4, "euclidean"), (8, "cosine")):
        index = MilvusIndex(target, check=False, dim=dim, metric=metric, gallery_id=gallery_id)
        index._recreate()  # dropped and made again, empty, with that dim and metric
        index.close()
        with pytest.raises(MilvusIndexError) as error:
            Gallery.open(first, embedder)
        _one_line(error, f"holds {dim}-d {metric} vectors", "this gallery 8-d euclidean")
        with GalleryStore.open(first) as store:
            assert store.num_examples == EXAMPLES and store.generation == 1
    assert not check_gallery(first).ok
    assert check_gallery(first, repair=True).ok  # its own: rebuilt from the database
    with Gallery.open(first, embedder) as gallery:
        assert gallery.identify(inputs(0)[:1], k=1)[0].identity == "person 0"


def test_an_unreachable_server_is_one_line_at_once(tmp_path, capsys):
    port = _unused_port()
    path = tmp_path / "g.db"
    start = time.monotonic()
    with pytest.raises(MilvusIndexError) as error:
        Gallery.create(path, make_embedder(), index=f"milvus://127.0.0.1:{port}/people")
    assert time.monotonic() - start < 10
    _one_line(error, f"cannot reach Milvus at http://127.0.0.1:{port}")
    assert not path.exists()
    # a recorded server that went away: the open says which
    Gallery.create(path, make_embedder()).close()
    with GalleryStore.open(path) as store:
        store.set_meta(
            "index", {"backend": "milvus", "uri": f"http://127.0.0.1:{port}", "collection": "c"}
        )
    start = time.monotonic()
    with pytest.raises(MilvusIndexError) as error:
        Gallery.open(path, make_embedder())
    assert time.monotonic() - start < 10
    _one_line(error, f"127.0.0.1:{port}")
    report = check_gallery(path)
    assert [(p.kind, p.repairable) for p in report.problems] == [("index", False)]
    capsys.readouterr()
    assert cli_main(["gallery", "check", str(path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"cannot reach Milvus at http://127.0.0.1:{port}" in out and "Traceback" not in out


# ------------------------------------------------------------------------------ CLI, service


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_run(tmp_path_factory)


def _error_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 and one error line naming ``words`` (as tests/test_gallery.py's CLI errors)."""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("deepmetric: error: ")]
    assert done.returncode == 2 and errors == lines[-1:], done.stderr
    assert "Traceback" not in done.stderr and all(w in errors[0] for w in words), errors


def test_cli_and_service_on_a_milvus_lite_gallery(trained, tmp_path):
    run, files = trained
    path, vectors = tmp_path / "people.db", tmp_path / "vectors.db"
    port = _unused_port()
    server_spec = f"milvus://127.0.0.1:{port}/people"
    done = cli(
        "gallery", "create", str(path), "--run", str(run), "--index", server_spec, check=False
    )
    _error_line(done, f"cannot reach Milvus at http://127.0.0.1:{port}")
    assert not path.exists()
    done = cli(
        "gallery", "create", str(path), "--run", str(run), "--index", f"milvus-lite:{vectors}"
    )
    assert f"(and milvus-lite:{vectors}#people)" in done.stdout
    queries = [files[0][3], files[1][3], files[4][3]]
    server = Server(run, path, key=KEY)
    try:
        for c in (0, 1, 2, 3):
            r = enroll(server.client, f"class {c}", *files[c][:2])
            assert r.status_code == 201, r.text
        r = server.client.delete("/identities/class 3", headers=WRITE)
        assert r.status_code == 200, r.text
        r = server.client.post("/identify", files=files_field(*queries), data={"k": "2"})
        assert r.status_code == 200, r.text
        served = r.json()
        # Milvus Lite: one process at a time; the command line says so in one line
        done = cli(
            "gallery", "identify", str(path), str(queries[0]), "--device", "cpu", check=False
        )
        _error_line(done, "is open in another process", str(vectors))
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output
    assert served[0]["candidates"][0]["identity"] == "class 0"  # a trained model
    assert all("class 3" not in [x["identity"] for x in s["candidates"]] for s in served)
    # the same answers from the command line, on the collection the server left
    args = ("gallery", "identify", str(path), *map(str, queries), "--k", "2", "--json")
    by_cli = [json.loads(line) for line in cli(*args, "--device", "cpu").stdout.splitlines()]
    assert [s["identity"] for s in served] == [c["identity"] for c in by_cli]
    for s, c in zip(served, by_cli):
        assert [x["identity"] for x in s["candidates"]] == [x["identity"] for x in c["candidates"]]
        assert [x["distance"] for x in s["candidates"]] == pytest.approx(
            [x["distance"] for x in c["candidates"]], abs=1e-5
        )
    report = check_gallery(path)
    assert report.ok and (report.identities, report.examples) == (3, 6)


def test_milvus_lite_opens_with_an_http_proxy_in_the_environment(trained, tmp_path):
    """The embedded server is on loopback: a proxy the environment names (a refusing one here,
    with no_proxy empty, as behind many firewalls) must not carry its gRPC connection."""
    refuse = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(http_proxy=refuse, https_proxy=refuse, HTTP_PROXY=refuse, HTTPS_PROXY=refuse)
    env["no_proxy"] = ""
    gallery = tmp_path / "g.db"
    argv = [sys.executable, "-m", "deepmetric", "gallery", "create", str(gallery)]
    argv += ["--run", str(trained[0]), "--index", _lite(tmp_path), "--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert gallery.is_file() and (tmp_path / "vectors.db").is_dir()


def test_serve_creates_a_milvus_lite_gallery_with_index(trained, tmp_path):
    run, files = trained
    path, vectors = tmp_path / "served.db", tmp_path / "served_vectors.db"
    spec = f"milvus-lite:{vectors}"
    server = Server(run, path, "--index", spec)
    try:
        assert enroll(server.client, "class 0", *files[0][:2]).status_code == 201
    finally:
        code, output = server.stop()
    assert code == 0 and f"vectors in {spec}#served" in output, output
    with GalleryStore.open(path) as store:
        assert store.meta["index"]["uri"] == str(vectors)
    server = Server(run, path, "--index", spec)  # a restart with the same command line
    try:
        r = server.client.post("/identify", files=files_field(files[0][3]))
        assert r.status_code == 200 and r.json()[0]["candidates"][0]["identity"] == "class 0"
    finally:
        code, output = server.stop()
    assert code == 0, output
    done = cli("serve", str(run), "--gallery", str(path), "--index", "local", check=False)
    _error_line(done, f"{path} exists and keeps its vectors in {spec}#served")
    done = cli(
        "serve", str(run), "--gallery", str(tmp_path / "new.db"), "--index", "x.txt", check=False
    )
    _error_line(done, '--index must be "local"', "x.txt")
    assert not (tmp_path / "new.db").exists()
