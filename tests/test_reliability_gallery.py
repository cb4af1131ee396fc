"""Gallery reliability, for real: ``deepmetric gallery check [--repair]`` on galleries whose
index files the tests delete, truncate, edit or replace by an old copy; and a gallery process
SIGKILLed at random instants of a bulk enroll and of a bulk remove, after which the database
holds exactly what was acknowledged (plus at most the one write in flight, whole) and the
check passes once the index is repaired.

The model is a fixed random linear map (12 -> 8), so that everything here runs in seconds.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.checkpoints import weights_sha256
from deepmetric.cli import main as cli_main
from deepmetric.gallery import Gallery
from deepmetric.gallery.check import check_gallery
from deepmetric.gallery.gallery import index_path
from deepmetric.gallery.index import FaissIndex, faiss_available, load_index
from deepmetric.gallery.store import GalleryStore
from deepmetric.inference import Embedder, Threshold

TESTS = Path(__file__).parent
IN, DIM = 12, 8
#: examples per enrolled identity
EXAMPLES = 3


def make_embedder(metric: str = "euclidean") -> Embedder:
    """The test model: a fixed random (12 -> 8) linear map, same in every process."""
    w = torch.randn(IN, DIM, generator=torch.Generator().manual_seed(1234))
    return Embedder(
        forward=lambda x: x.flatten(1) @ w,
        preprocessing=None,
        metric=metric,
        dim=DIM,
        weights_sha256=weights_sha256({"w": w}),
        threshold=Threshold(value=0.5, metric=metric, protocol="test"),
    )


def inputs(i: int) -> torch.Tensor:
    """The model inputs (EXAMPLES, 12) of identity ``person {i}``."""
    return torch.randn(EXAMPLES, IN, generator=torch.Generator().manual_seed(i))


def _gallery(path: Path, n: int, metric: str = "euclidean", removed: tuple[int, ...] = ()) -> Path:
    """A closed gallery at ``path`` with ``person 0`` .. ``person n-1``, minus ``removed``."""
    with Gallery.create(path, make_embedder(metric)) as gallery:
        for i in range(n):
            gallery.enroll(f"person {i}", inputs(i))
        for i in removed:
            gallery.remove(f"person {i}")
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    """``deepmetric ARGS`` in this process: exit code and stdout lines."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out.splitlines()


def _answers(path: Path, metric: str = "euclidean") -> list[list[tuple[str, float]]]:
    """Identify every enrolled identity's first input (k = 3) with the saved index."""
    with Gallery.open(path, make_embedder(metric)) as gallery:
        names = [info.name for info in gallery.identities()]
        queries = torch.stack([inputs(int(n.split()[1]))[0] for n in names])
        return [[tuple(c) for c in a.candidates] for a in gallery.identify(queries, k=3)]


# ------------------------------------------------------------------------------ check


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_a_consistent_gallery_passes_with_every_index_kind(tmp_path, capsys, metric):
    path = _gallery(tmp_path / "g.db", 6, metric, removed=(2,))  # one tombstone in the index
    saved = load_index(index_path(path))
    assert saved.removed == EXAMPLES and len(saved) == 5 * EXAMPLES
    report = check_gallery(path)
    assert report.ok and report.problems == [] and report.repaired == []
    assert (report.identities, report.examples) == (5, 15)
    code, out = _cli(capsys, "gallery", "check", path)
    assert code == 0 and out == [f"{path}: consistent (5 identities, 15 examples, generation 7)"]
    kinds = ["flat", "hnsw"] if faiss_available() else []
    for kind in kinds:  # the same examples in a faiss index: ids and vectors agree too
        with GalleryStore.open(path) as store:
            generation, examples = store.snapshot()
        index = FaissIndex(dim=DIM, metric=metric, kind=kind)
        index.add(examples.embeddings, examples.ids)
        index.generation = generation
        index.save(index_path(path))
        assert check_gallery(path).problems == [], kind


def _damage_stale(path: Path, old: Path) -> None:
    """The index as it was before the last writes (a copy taken then)."""
    shutil.rmtree(index_path(path))
    shutil.copytree(old, index_path(path))


def _damage_vectors(path: Path) -> None:
    """Same shape, same ids, same generation: one vector changed (the open does not notice)."""
    file = index_path(path) / "vectors.npy"
    vectors = np.load(file)
    vectors[0] += 0.5  # person 0's first example: live
    np.save(file, vectors)


def _damage_tombstone(path: Path) -> None:
    """A live entry marked removed in alive.npy, header.json left as it was."""
    file = index_path(path) / "alive.npy"
    alive = np.load(file)
    alive[np.flatnonzero(alive)[0]] = False
    np.save(file, alive)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "deleted": (lambda p: shutil.rmtree(index_path(p)), ["is missing"]),
    "vectors truncated": (lambda p: _truncate(index_path(p) / "vectors.npy"), ["cannot be read"]),
    "header truncated": (lambda p: _truncate(index_path(p) / "header.json"), ["not valid JSON"]),
    "ids file deleted": (lambda p: (index_path(p) / "ids.npy").unlink(), ["cannot be read"]),
    "out of date": (
        None,
        [
            "out of date: saved at generation 4, the database is at 7",
            "lacks 6 of the database's 15 examples",
            "holds 3 examples that are not in the database",
        ],
    ),
    "vectors edited": (_damage_vectors, ["1 vectors differ from the database's embeddings"]),
    "tombstone flipped": (
        _damage_tombstone,
        ["header.json says 15 live entries, its tombstones (alive.npy) leave 14", "lacks 1 of"],
    ),
    "leftover of a save": (
        lambda p: (p.parent / f".{index_path(p).name}.ab12cd34").mkdir(),
        ["1 leftover(s) of interrupted saves of"],
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_reported_then_repaired(tmp_path, capsys, damage):
    path = tmp_path / "g.db"
    with Gallery.create(path, make_embedder()) as gallery:
        for i in range(4):
            gallery.enroll(f"person {i}", inputs(i))
    old = tmp_path / "old.index"
    shutil.copytree(index_path(path), old)  # saved at generation 4, 12 examples
    with Gallery.open(path, make_embedder()) as gallery:
        for i in (4, 5):  # two more enrolls and a remove after that copy
            gallery.enroll(f"person {i}", inputs(i))
        gallery.remove("person 1")
    want = _answers(path)
    hurt, words = DAMAGE[damage]
    if hurt is None:
        _damage_stale(path, old)
    else:
        hurt(path)

    report = check_gallery(path)
    assert not report.ok and report.repaired == []
    assert {p.kind for p in report.problems} == {"index"}
    assert all(p.repairable for p in report.problems)
    messages = " | ".join(p.message for p in report.problems)
    for word in words:
        assert word in messages, messages
    code, out = _cli(capsys, "gallery", "check", path)
    assert code == 1 and len(out) == len(report.problems) + 1, out
    assert all(line.startswith(f"{path}: index: ") for line in out[:-1]), out
    assert "--repair rebuilds the index" in out[-1]

    code, out = _cli(capsys, "gallery", "check", path, "--repair")
    assert code == 0, out
    assert any("repaired: rebuilt" in line and "15 examples, generation 7" in line for line in out)
    assert (
        out[-1] == f"{path}: consistent after the repair (5 identities, 15 examples, generation 7)"
    )
    assert not list(tmp_path.glob(".g.db.index.*"))  # leftovers removed
    assert check_gallery(path).ok
    code, out = _cli(capsys, "gallery", "check", path)
    assert code == 0 and out[-1].endswith("consistent (5 identities, 15 examples, generation 7)")
    with Gallery.open(path, make_embedder()) as gallery:
        assert gallery.index_builds == 0  # the repaired index is current: used as saved
    got = _answers(path)
    assert [[n for n, _ in a] for a in got] == [[n for n, _ in a] for a in want]
    assert [[d for _, d in a] for a in got] == [
        pytest.approx([d for _, d in a], abs=1e-4) for a in want
    ]


def test_a_folder_that_is_not_an_index_is_never_deleted(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 2)
    folder = index_path(path)
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, out = _cli(capsys, "gallery", "check", path, "--repair")
    assert code == 1
    assert any("holds files that are not an index (notes.txt)" in line for line in out), out
    assert any("--repair cannot fix this" in line for line in out), out
    assert (folder / "notes.txt").read_text() == "mine"


def test_database_and_model_problems_are_reported_not_repaired(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 3)
    db = sqlite3.connect(path)
    db.execute("UPDATE examples SET embedding = x'0000' WHERE id = 2")  # 2 bytes, not 32
    db.commit()
    db.close()
    report = check_gallery(path, repair=True)
    assert not report.ok and report.repaired == []
    assert [p.kind for p in report.problems] == ["database"]
    assert "examples 2 do not hold 8 float32 values" in report.problems[0].message
    code, out = _cli(capsys, "gallery", "check", path, "--repair")
    assert code == 1 and "(--repair cannot fix this)" in out[0], out

    other = _gallery(tmp_path / "other.db", 2)
    with GalleryStore.open(other) as store:
        store.set_meta("source", str(tmp_path / "gone"))  # a model that was moved away
    code, out = _cli(capsys, "gallery", "check", other)
    assert code == 1 and "no longer exists" in out[0], out
    wrong = make_embedder()
    wrong_w = torch.zeros(IN, DIM)
    other_model = Embedder(
        forward=lambda x: x.flatten(1) @ wrong_w,
        preprocessing=None,
        metric="euclidean",
        dim=DIM,
        weights_sha256=weights_sha256({"w": wrong_w}),
        threshold=wrong.threshold,
    )
    report = check_gallery(other, embedder=other_model)
    assert [p.kind for p in report.problems] == ["model"]
    assert "weights_sha256 differ" in report.problems[0].message
    assert check_gallery(other, embedder=make_embedder()).ok


def test_the_recorded_model_is_loaded_and_compared(tmp_path, capsys):
    from synthetic import train_tiny_run, write_learnable_idx

    run = train_tiny_run(write_learnable_idx(tmp_path / "toy", 4, 8, 4), tmp_path / "run")
    plain = Embedder.from_run(run, calibrate=False)
    threshold = Threshold(
        0.5, plain.metric, "test", weights_sha256=plain.identity()["weights_sha256"]
    )
    (run / "threshold.json").write_text(json.dumps(threshold.to_json()))
    good = tmp_path / "good.db"
    Gallery.create(good, Embedder.from_run(run, calibrate=False), source=run).close()
    code, out = _cli(capsys, "gallery", "check", good)  # loads the run: the same model
    assert code == 0, out
    wrong = tmp_path / "wrong.db"  # made by another model, but records the run as its source
    Gallery.create(wrong, make_embedder(), source=run).close()
    code, out = _cli(capsys, "gallery", "check", wrong, "--repair")
    assert code == 1 and out[0].startswith(f"{wrong}: model: the model {run.resolve()}"), out
    assert "(weights_sha256, preprocessing, dim differ) (--repair cannot fix this)" in out[0]
    code, out = _cli(capsys, "gallery", "check", good, "--run", run)
    assert code == 0, out


def test_gallery_check_method_on_an_open_gallery(tmp_path):
    path = _gallery(tmp_path / "g.db", 3)
    with Gallery.open(path, make_embedder()) as gallery:
        gallery.enroll("person 3", inputs(3))  # not saved yet: check saves it first
        assert gallery.check().ok
        _damage_vectors(path)
        report = gallery.check()
        assert [p.kind for p in report.problems] == ["index"]
        builds = gallery.index_builds
        report = gallery.check(repair=True)
        assert report.ok and report.repaired and gallery.index_builds == builds
        [answer] = gallery.identify(inputs(3)[:1], k=1)
        assert answer.identity == "person 3" and answer.distance < 1e-5
    assert check_gallery(path).ok


# ------------------------------------------------------------------------------ SIGKILL

# Imports torch and the gallery once, then per line of stdin ("enroll FIRST DELAY", "remove 0
# DELAY" or "reindex 0 DELAY") forks a child that opens the gallery and enrolls (person FIRST,
# FIRST + 1, ...) or removes (sorted by name) identities one at a time, printing each
# acknowledged write at once, or rebuilds and saves the index in a loop; SIGKILLs it DELAY
# seconds (chosen at random by the test) after its first acknowledged write, reaps it and says
# how it died. (The parent kills: a child not yet reaped keeps its pid, so no other process
# can be hit.)
# The delay runs from the first acknowledged write, not from the fork: the fork, opening the
# gallery (rebuilding its index when a kill left it stale) and the first write take a time of
# their own that grows with the machine's load, and the reindex rounds' delays (59, 158 and
# 67 ms) once all ran out before the first rebuild was saved, on a 16-core machine running 12
# pytest workers: 0 reindexes acknowledged in 3 rounds. (On a loaded 2-core machine, counted
# from the fork: 64 enrolls, 55 removes and 6 reindexes acknowledged; from the first write:
# 793, 574 and 37.) Counted from the first write, every round acknowledges at least one, and
# the kill still lands at a random instant of a later write (a save of the index, for
# reindex). A child that never acknowledges (a hang) is killed after 60 s and fails the round;
# one that dies fails it too (not SIGKILLed).
_DRIVER = r"""
import json, os, select, signal, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from test_reliability_gallery import inputs, make_embedder
from deepmetric.gallery import Gallery


def say(record):  # one write() of a whole line: a kill never leaves half of one
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


while line := sys.stdin.readline():
    task, first, delay = line.split()
    wrote, written = os.pipe()  # one byte from the child after its first acknowledged write
    pid = os.fork()
    if pid == 0:
        os.close(wrote)
        code = 1

        def acknowledge(record):
            global written
            say(record)
            if written is not None:
                os.write(written, b"1")
                os.close(written)
                written = None

        try:
            torch.set_num_threads(1)
            gallery = Gallery.open(sys.argv[1], make_embedder())
            if task == "enroll":
                for i in range(int(first), int(first) + 1_000_000):
                    ids = gallery.enroll(f"person {i}", inputs(i))
                    acknowledge({"enrolled": f"person {i}", "ids": ids})
            elif task == "remove":
                for name in sorted(info.name for info in gallery.identities()):
                    gallery.remove(name)
                    acknowledge({"removed": name})
            else:  # rebuild and save the index again and again: kills land in saves
                while True:
                    acknowledge({"reindexed": gallery.reindex()})
            gallery.close()
            say({"finished": True})
            code = 0
        finally:
            os._exit(code)
    os.close(written)
    select.select([wrote], [], [], 60)  # the first acknowledged write, or the child's end
    os.close(wrote)
    time.sleep(float(delay))
    os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still the child's
    _, status = os.waitpid(pid, 0)
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    say({"reaped": status, "signal": signum})
"""

BASE = 500  # identities enrolled before the kills, so the bulk removes never run out


def _lines(stream) -> queue.Queue:
    """Lines of ``stream`` (parsed JSON), read by a thread so the pipe never fills."""
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            try:
                out.put(json.loads(line))
            except ValueError:
                out.put({"garbled": line})
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _round(lines: queue.Queue, driver: subprocess.Popen, task: str) -> list[dict]:
    """One child of the driver, run until killed: its acknowledgements, then how it died."""
    driver.stdin.write(task + "\n")
    driver.stdin.flush()
    got = []
    while not got or "reaped" not in got[-1]:
        got.append(lines.get(timeout=90))
        assert got[-1] is not None, "the driver died"
        assert "garbled" not in got[-1], got[-1]
    return got


def _state(path: Path) -> dict[str, list[int]]:
    """Identity name -> its example ids, from the database (after an integrity check)."""
    with GalleryStore.open(path) as store:
        assert store.problems() == []
        examples = store.all_embeddings()
        owners: dict[str, list[int]] = {}
        for i, name in zip(examples.ids.tolist(), examples.identities):
            owners.setdefault(name, []).append(i)
        assert sorted(owners) == sorted(info.name for info in store.identities())
        if not owners:
            return owners
        want = make_embedder().embed(torch.cat([inputs(int(n.split()[1])) for n in owners]))
        got = np.concatenate(
            [examples.embeddings[np.isin(examples.ids, ids)] for ids in owners.values()]
        )
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)  # whole, and as enrolled
    return owners


def _check_after_kill(path: Path, capsys, repair: bool) -> list[str]:
    """Only index problems (the index lags: it is saved on close), fixed by --repair; their
    messages."""
    report = check_gallery(path)
    assert {p.kind for p in report.problems} <= {"index"}, report.problems
    assert all(p.repairable for p in report.problems)
    if repair:
        code, out = _cli(capsys, "gallery", "check", path, "--repair")
        assert code == 0, out
        code, out = _cli(capsys, "gallery", "check", path)
        assert code == 0, out
    return [p.message for p in report.problems]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_during_bulk_enroll_and_bulk_remove(tmp_path, capsys, request):
    path = tmp_path / "g.db"
    embedder = make_embedder()
    Gallery.create(path, embedder).close()
    vectors = embedder.embed(torch.cat([inputs(i) for i in range(BASE)])).numpy()
    with GalleryStore.open(path) as store:
        for i in range(BASE):
            store.add(f"person {i}", vectors[EXAMPLES * i : EXAMPLES * (i + 1)])
    acknowledged = {f"person {i}" for i in range(BASE)}  # present for sure
    rng = random.Random(7)
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(path), str(TESTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = _lines(driver.stdout)
    kills = {"enroll": 0, "remove": 0, "reindex": 0}
    writes = {"enroll": 0, "remove": 0, "reindex": 0}
    in_flight = {"enroll": 0, "remove": 0}  # committed, never acknowledged
    saves = {"intact": 0, "missing": 0, "leftovers": 0}  # the index after a kill in reindex
    try:
        for r, task in enumerate(["enroll"] * 4 + ["remove"] * 4 + ["reindex"] * 3):
            first = 10_000 * (r + 1)
            delay = rng.uniform(0.1, 0.5) if task == "enroll" else rng.uniform(0.05, 0.3)
            got = _round(lines, driver, f"{task} {first} {delay:.3f}")
            end = got[-1]
            finished = any("finished" in g for g in got)
            assert finished or end["signal"] == signal.SIGKILL, end
            assert len(got) >= 2, f"round {r} ({task}): no write acknowledged within 60 s"
            kills[task] += not finished
            before = acknowledged
            state = _state(path)
            if task == "enroll":
                done = [g for g in got if "enrolled" in g]
                writes[task] += len(done)
                for g in done:  # every acknowledged enroll: there, with the ids it returned
                    assert state[g["enrolled"]] == g["ids"]
                extra = set(state) - before - {g["enrolled"] for g in done}
                assert extra <= {f"person {first + len(done)}"}, extra  # the one in flight
                in_flight[task] += len(extra)
                assert before <= set(state)
            elif task == "reindex":
                writes[task] += sum("reindexed" in g for g in got)
                assert set(state) == before  # the database is not touched
            else:
                done = [g["removed"] for g in got if "removed" in g]
                writes[task] += len(done)
                assert done == sorted(before)[: len(done)]
                assert not set(done) & set(state)  # every acknowledged remove: gone
                lost = before - set(done) - set(state)
                next_one = sorted(before)[len(done) : len(done) + 1]
                assert lost <= set(next_one), lost  # the one in flight, at most
                in_flight[task] += len(lost)
                assert set(state) <= before
            acknowledged = set(state)  # with the write in flight when it committed
            assert all(len(ids) == EXAMPLES for ids in state.values())  # nothing partial
            if task != "reindex":  # on odd rounds; else the next open rebuilds and saves
                _check_after_kill(path, capsys, repair=r % 2 == 1)
                continue
            found = _check_after_kill(path, capsys, repair=True)
            # a save is a whole new folder swapped in: never a partial or unreadable index,
            # at worst none (killed between the two renames) and a leftover folder beside it
            assert all("is missing" in m or "leftover" in m for m in found), found
            saves["missing"] += any("is missing" in m for m in found)
            saves["leftovers"] += any("leftover" in m for m in found)
            saves["intact"] += not found
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
    assert kills["enroll"] >= 3 and kills["remove"] >= 3 and kills["reindex"] == 3, kills
    assert writes["enroll"] >= 10 and writes["remove"] >= 10 and writes["reindex"] >= 3, writes
    if request.config.getoption("capture") == "no":  # pytest -s: the figures
        with capsys.disabled():
            print(
                f"\nSIGKILLs {kills}, acknowledged writes {writes}, in flight {in_flight}, "
                f"index after a kill in reindex: {saves}"
            )
    _check_after_kill(path, capsys, repair=True)
    with Gallery.open(path, embedder) as gallery:
        assert gallery.index_builds == 0 and len(gallery) == len(acknowledged)
        name = sorted(acknowledged)[-1]
        [answer] = gallery.identify(inputs(int(name.split()[1]))[:1], k=1)
        assert answer.identity == name and answer.distance < 1e-5
