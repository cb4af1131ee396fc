"""Hostile tests of the gallery files (issue 24): an index of another gallery or with damaged
files is rebuilt, never trusted (D4); a locked or read-only database is one line and exit 2,
503 with Retry-After from the service (D6); a read-only gallery still answers reads (D7);
acknowledged enrolls reach the database file at a checkpoint, and ``gallery backup`` copies a
consistent snapshot while another process enrolls (D13); ``--k`` is capped (M3), invisible
characters are refused in names (M6), names are never printed raw and foreign SQLite
triggers are reported (M7).

Most tests use the fixed random linear model of ``test_reliability_gallery`` (no run folder);
those that need a model the command line can load use the tiny run of ``test_service``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability_gallery import EXAMPLES, _gallery, inputs, make_embedder
from test_service import Server, new_gallery, shared_run

from deepmetric.cli import main as cli_main
from deepmetric.distances import pairwise
from deepmetric.gallery import Gallery
from deepmetric.gallery.gallery import index_path
from deepmetric.gallery.index import FaissIndex, faiss_available
from deepmetric.gallery.store import GalleryReadOnlyError, GalleryStore, check_name

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str], list[str]]:
    """``deepmetric ARGS`` in this process: exit code, stdout lines and stderr lines."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out.splitlines(), err.splitlines()


def _run(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m deepmetric ARGS`` in a subprocess."""
    argv = [sys.executable, "-m", "deepmetric", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)


@contextmanager
def _write_lock(path: Path) -> Iterator[None]:
    """Another connection holds the gallery's write lock (``BEGIN IMMEDIATE``) meanwhile."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """``chattr +i path`` meanwhile (even root cannot write it); skips where chattr fails."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not allowed here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextmanager
def _read_only_view(folder: Path, view: Path) -> Iterator[Path]:
    """``folder`` bind-mounted read-only at ``view`` (a read-only file system even for root);
    skips where mounting is not allowed."""
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def _enrolled(path: Path) -> dict[str, int]:
    with GalleryStore.open(path) as store:
        return {info.name: info.examples for info in store.identities()}


# ------------------------------------------------------------------------------ D4


def _brute_nearest(path: Path, query: np.ndarray) -> tuple[str, float]:
    """The nearest identity to ``query`` (1, D) and its distance, from the database rows."""
    with GalleryStore.open(path) as store:
        examples = store.all_embeddings()
    d = pairwise(torch.from_numpy(query), torch.from_numpy(examples.embeddings), "euclidean")
    d = d[0].numpy()
    best = int(np.argmin(d))
    return examples.identities[best], float(d[best])


def test_an_index_of_another_gallery_is_rebuilt_not_trusted(tmp_path, capsys):
    a = _gallery(tmp_path / "a.db", 4)
    b = tmp_path / "b.db"
    with Gallery.create(b, make_embedder()) as gallery:  # same counts, other vectors
        for i in range(4):
            gallery.enroll(f"other {i}", inputs(10 + i))
    shutil.copyfile(b, a)  # a restore of the wrong file: a.db.index is A's, at generation 4
    query = make_embedder().embed(inputs(0)[:1]).numpy()
    want = _brute_nearest(a, query)
    assert want[1] > 0.1  # B holds nothing near A's person 0

    shutil.copyfile(a, tmp_path / "c.db")  # the same mix-up, for the check below
    shutil.copytree(index_path(a), index_path(tmp_path / "c.db"))

    with Gallery.open(a, make_embedder()) as gallery:
        [answer] = gallery.identify_embeddings(query, k=1)
        builds = gallery.index_builds
    assert answer.candidates[0].distance == pytest.approx(want[1], abs=1e-4)
    assert answer.candidates[0].identity == want[0] and builds == 1
    with Gallery.open(a, make_embedder()) as gallery:  # the rebuilt index is saved and bound
        assert gallery.index_builds == 0
    code, out, _ = _cli(capsys, "gallery", "check", tmp_path / "c.db")
    assert code == 1 and any("built from another gallery" in line for line in out), out


def _swap_rows(file: Path) -> None:
    """vectors.npy with its first and last rows swapped: same shape, dtype, header."""
    vectors = np.load(file)
    vectors[[0, -1]] = vectors[[-1, 0]]
    np.save(file, vectors)


def _swap_faiss_rows(file: Path, n: int) -> None:
    """index.faiss (flat) with its first and last vectors swapped: the codes are its last
    n * DIM float32 values, so faiss still reads it."""
    data = bytearray(file.read_bytes())
    size = len(data)
    row = len(make_embedder().embed(inputs(0)[:1])[0]) * 4
    start = size - n * row
    first, last = bytes(data[start : start + row]), bytes(data[size - row :])
    data[start : start + row], data[size - row :] = last, first
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_a_damaged_index_file_with_an_intact_header_is_rebuilt(tmp_path, kind):
    path = _gallery(tmp_path / "g.db", 4)
    folder = index_path(path)
    if kind == "exact":
        _swap_rows(folder / "vectors.npy")
    else:
        if not faiss_available():
            pytest.skip("faiss is not installed")
        with GalleryStore.open(path) as store:
            generation, examples = store.snapshot()
            gallery_id = store.gallery_id
        index = FaissIndex(dim=examples.embeddings.shape[1], metric="euclidean", kind="flat")
        index.add(examples.embeddings, examples.ids)
        index.generation, index.gallery_id = generation, gallery_id
        index.save(folder)
        with Gallery.open(path, make_embedder()) as gallery:
            assert gallery.index_builds == 0 and gallery.index.kind == "flat"  # bound, used
        _swap_faiss_rows(folder / "index.faiss", len(examples.ids))
    with Gallery.open(path, make_embedder()) as gallery:
        assert gallery.index_builds == 1  # the checksum differs: rebuilt from the database
        answers = gallery.identify_embeddings(
            make_embedder().embed(inputs(0)[:1]).numpy(), k=1
        ) + gallery.identify_embeddings(make_embedder().embed(inputs(3)[-1:]).numpy(), k=1)
    assert [a.identity for a in answers] == ["person 0", "person 3"]
    assert all(a.distance < 1e-4 for a in answers)


# ------------------------------------------------------------------------------ D6, D7


@pytest.fixture(scope="module")
def run_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[Path]]]:
    return shared_run(tmp_path_factory)


def _run_gallery(run_files, path: Path, classes: int = 2) -> Path:
    """A gallery of the tiny run with ``class 0`` .. ``class N-1`` enrolled."""
    run, files = run_files
    new_gallery(run, path)
    with Gallery.open(path) as gallery:
        for c in range(classes):
            gallery.enroll(f"class {c}", files[c][:2])
    return path


def test_a_locked_gallery_is_one_line_and_exit_2(tmp_path, capsys, run_files):
    """The command line's main() (in this process, to keep the test fast; the service test
    below holds the lock from another process)."""
    path = _run_gallery(run_files, tmp_path / "g.db")
    png = run_files[1][2][0]
    with _write_lock(path):
        started = time.monotonic()
        code, _, err = _cli(
            capsys,
            "gallery",
            "enroll",
            path,
            "new",
            png,
            "--busy-timeout",
            "0.5",
            "--device",
            "cpu",
        )
        took = time.monotonic() - started
    assert code == 2 and len(err) == 1, err
    assert "locked by another process" in err[0] and "try again later" in err[0], err
    assert took < 20  # the timeout given, not SQLite's 30 s default
    assert set(_enrolled(path)) == {"class 0", "class 1"}  # nothing written


def test_the_service_answers_503_with_retry_after_while_the_gallery_is_locked(tmp_path, run_files):
    run, files = run_files
    path = _run_gallery(run_files, tmp_path / "g.db")
    server = Server(run, path, "--busy-timeout", "0.5")
    try:
        http = server.client
        upload = [("files", (p.name, p.read_bytes(), "image/png")) for p in files[2][:1]]
        with _write_lock(path):
            locked = http.post("/identities", data={"identity": "class 2"}, files=upload)
            assert locked.status_code == 503, locked.text
            assert int(locked.headers["Retry-After"]) > 0
            assert "locked by another process" in locked.json()["error"]
            listed = http.get("/identities")  # reads go on
            assert listed.status_code == 200 and len(listed.json()) == 2
        again = http.post("/identities", data={"identity": "class 2"}, files=upload)
        assert again.status_code == 201, again.text  # the service recovered
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output
    assert set(_enrolled(path)) == {"class 0", "class 1", "class 2"}


def _reads_work_writes_say_read_only(capsys, path: Path, png: Path) -> None:
    code, out, _ = _cli(capsys, "gallery", "list", path)
    assert code == 0 and out[0].startswith("class 0\t2 examples"), out
    code, out, _ = _cli(capsys, "gallery", "identify", path, png, "--device", "cpu")
    assert code == 0 and out[0].startswith(f"{png}: "), out
    code, out, _ = _cli(capsys, "gallery", "check", path)
    assert code == 0 and out[-1].startswith(f"{path}: consistent"), out
    code, _, err = _cli(capsys, "gallery", "remove", path, "class 0", "--device", "cpu")
    assert code == 2 and len(err) == 1 and "read-only" in err[0], err
    assert "cannot remove 'class 0'" in err[0], err


def test_an_immutable_gallery_file_is_read_but_never_written(tmp_path, capsys, run_files):
    path = _run_gallery(run_files, tmp_path / "g.db")
    png = run_files[1][0][2]
    before = path.read_bytes()
    with _immutable(path):
        _reads_work_writes_say_read_only(capsys, path, png)
        with GalleryStore.open(path) as store:
            assert store.readonly
            with pytest.raises(GalleryReadOnlyError, match="read-only"):
                store.remove("class 1")
        with GalleryStore.open(path, readonly=False) as store:  # SQLite's own refusal
            assert not store.readonly
            with pytest.raises(GalleryReadOnlyError, match="attempt to write a readonly"):
                store.remove("class 1")
    assert path.read_bytes() == before
    assert _enrolled(path) == {"class 0": 2, "class 1": 2}


def test_a_gallery_on_a_read_only_file_system_is_read_but_never_written(
    tmp_path, capsys, run_files
):
    folder = tmp_path / "data"
    folder.mkdir()
    _run_gallery(run_files, folder / "g.db")
    with _read_only_view(folder, tmp_path / "ro") as view:
        _reads_work_writes_say_read_only(capsys, view / "g.db", run_files[1][0][2])
        done = _run("gallery", "list", view / "g.db")  # a real process too
        assert done.returncode == 0 and done.stdout.startswith("class 0\t2 examples"), done
        with GalleryStore.open(view / "g.db") as store:
            assert store.readonly and store.num_identities == 2
    assert _enrolled(folder / "g.db") == {"class 0": 2, "class 1": 2}


# ------------------------------------------------------------------------------ D13

_KILLED_ENROLL = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_reliability_gallery import inputs, make_embedder
from deepmetric.gallery import Gallery
gallery = Gallery.open(sys.argv[2], make_embedder())
for i in range(int(sys.argv[3]), int(sys.argv[4])):
    gallery.enroll(f"person {i}", inputs(i))
    print(i, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_after_a_sigkill_and_a_check_the_database_file_alone_holds_every_enroll(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 3)
    other = sqlite3.connect(path)  # another connection keeps it open (as the service would)
    other.execute("SELECT COUNT(*) FROM identities").fetchone()
    try:
        killed = subprocess.run(
            [sys.executable, "-c", _KILLED_ENROLL, str(TESTS), str(path), "3", "9"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        acknowledged = [f"person {int(i)}" for i in killed.stdout.split()]
        assert len(acknowledged) == 6
        assert Path(f"{path}-wal").stat().st_size > 0  # the enrolls live in the log
        code, out, _ = _cli(capsys, "gallery", "check", path, "--repair")
        assert code == 0, out
        shutil.copyfile(path, tmp_path / "copy.db")  # the database file alone
    finally:
        other.close()
    assert _enrolled(tmp_path / "copy.db") == {f"person {i}": EXAMPLES for i in range(9)}


def test_closing_a_gallery_folds_the_log_into_the_file(tmp_path):
    path = _gallery(tmp_path / "g.db", 2)
    other = sqlite3.connect(path)  # not the last connection: SQLite would keep the log
    other.execute("SELECT COUNT(*) FROM identities").fetchone()
    try:
        with Gallery.open(path, make_embedder()) as gallery:
            gallery.enroll("person 2", inputs(2))
        shutil.copyfile(path, tmp_path / "copy.db")
    finally:
        other.close()
    assert set(_enrolled(tmp_path / "copy.db")) == {"person 0", "person 1", "person 2"}


_ENROLLER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_reliability_gallery import inputs, make_embedder
from deepmetric.gallery import Gallery
with Gallery.open(sys.argv[2], make_embedder()) as gallery:
    for i in range(1000):
        gallery.enroll(f"person {i}", inputs(i))
        print(i, flush=True)
"""


def test_backup_while_another_process_enrolls(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 0)
    enroller = subprocess.Popen(
        [sys.executable, "-c", _ENROLLER, str(TESTS), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert enroller.stdout is not None
        for _ in range(20):  # 20 acknowledged enrolls, then back up while it goes on
            enroller.stdout.readline()
        copy = tmp_path / "copy.db"
        code, out, _ = _cli(capsys, "gallery", "backup", path, copy)
        assert code == 0 and out[0].startswith(f"backed up {path} to {copy}"), out
        assert enroller.poll() is None  # it was still enrolling
        code, _, err = _cli(capsys, "gallery", "backup", path, copy)
        assert code == 2 and len(err) == 1 and "already exists" in err[0], err
    finally:
        enroller.kill()
        enroller.wait()
    assert not Path(f"{copy}-wal").exists()  # one file
    copied = _enrolled(copy)
    assert len(copied) >= 20 and set(copied.values()) == {EXAMPLES}  # each enroll whole
    assert set(copied) == {f"person {i}" for i in range(len(copied))}  # a prefix: consistent
    with GalleryStore.open(copy) as store:
        assert store.problems() == []
    with Gallery.open(copy, make_embedder()) as gallery:  # usable: its index is rebuilt
        [answer] = gallery.identify_embeddings(make_embedder().embed(inputs(5)[:1]).numpy())
        assert answer.identity == "person 5"


# ------------------------------------------------------------------------------ minor


def test_identify_caps_k_as_the_service_does(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 3)
    code, _, err = _cli(capsys, "gallery", "identify", path, "x.png", "--k", "1000000000")
    assert code == 2 and len(err) == 1 and "--k must be between 1 and 100" in err[0], err
    with Gallery.open(path, make_embedder()) as gallery:  # the API allocates by identities
        [answer] = gallery.identify_embeddings(
            make_embedder().embed(inputs(1)[:1]).numpy(), k=1_000_000_000
        )
    assert answer.identity == "person 1" and len(answer.candidates) == 3


@pytest.mark.parametrize(
    "name", ["al\u200bice", "alice\u202e", "\ufeffbob", "a\u200db", "x\u3164", "soft\u00adhy"]
)
def test_invisible_characters_in_names_are_refused(tmp_path, name):
    path = _gallery(tmp_path / "g.db", 0)
    with pytest.raises(ValueError, match="invisible character"):
        check_name(name)
    with (
        Gallery.open(path, make_embedder()) as gallery,
        pytest.raises(ValueError, match="invisible character"),
    ):
        gallery.enroll(name, inputs(0))
    assert _enrolled(path) == {}


def test_joiners_inside_words_and_emoji_stay_allowed():
    for name in ["👨\u200d👩\u200d👧", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]:
        assert check_name(name) == name


def test_names_with_terminal_escapes_are_never_printed_raw(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 1)
    raw = sqlite3.connect(path)  # written by another tool, past check_name
    raw.execute("UPDATE identities SET name = ? WHERE name = 'person 0'", ("\x1b[2Jevil\x07",))
    raw.commit()
    raw.close()
    code, out, _ = _cli(capsys, "gallery", "list", path)
    assert code == 0 and "\x1b" not in "".join(out) and "\x07" not in "".join(out)
    assert out[0].startswith("\\x1b[2Jevil\\x07\t"), out


def test_check_reports_sqlite_triggers_it_did_not_create(tmp_path, capsys):
    path = _gallery(tmp_path / "g.db", 1)
    raw = sqlite3.connect(path)
    raw.execute(
        "CREATE TRIGGER spy AFTER INSERT ON examples BEGIN "
        "UPDATE meta SET value = value WHERE key = 'format'; END"
    )
    raw.commit()
    raw.close()
    code, out, _ = _cli(capsys, "gallery", "check", path)
    assert code == 1 and any("trigger" in line and "'spy'" in line for line in out), out
