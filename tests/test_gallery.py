"""The gallery on real tiny runs: enroll / identify / remove, the open-set decision and its
threshold, the model identity check, the derived index (saved, reused, refreshed after another
process wrote, rebuilt), ``deepmetric gallery ...`` through the command line, and
``demo-oneshot`` on tiny data."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import train_tiny_run, write_learnable_idx
from tiny_data import make_idx_dir

from deepmetric.cli import main as cli_main
from deepmetric.data import load_dataset
from deepmetric.distances import pairwise
from deepmetric.gallery import Gallery, ModelMismatchError, UnknownIdentityError
from deepmetric.gallery.gallery import index_path
from deepmetric.gallery.store import GalleryExistsError, GalleryStore
from deepmetric.inference import Embedder, calibrate_threshold

CLASSES = 6


def _train(root: Path, data: Path, name: str, *extra: str) -> Path:
    extra = ("mode=batch", "epochs=2", "train.val_fraction=0.25", *extra)
    return train_tiny_run(data, root / name, *extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gallery")
    data = write_learnable_idx(root / "toy", n_classes=CLASSES, n_train=30, n_test=10)
    test = load_dataset(f"idx:{data}", "test")
    files: dict[int, list[Path]] = {c: [] for c in range(CLASSES)}
    for i in range(len(test)):  # the test images as PNG files, one folder per class
        c = int(test.y[i])
        folder = root / "pngs" / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (test.x[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        files[c].append(folder / f"{i:03d}.png")
    a = _train(root, data, "a")
    # on the CPU, as the tests' own distances (tests/test_cuda.py runs a gallery on CUDA)
    a_embedder = Embedder.from_run(a, device="cpu", progress=lambda _: None)  # + threshold.json
    return {
        "root": root,
        "data": data,
        "files": files,
        "a": a,
        "b": _train(root, data, "b", "seed=1"),
        "embedder": a_embedder,
    }


def _brute(embedder: Embedder, enrolled: dict[str, list[Path]], queries: list[Path]):
    """Per query: {identity: distance to its nearest example}, by the distances module."""
    q = embedder.embed(queries)
    out: list[dict[str, float]] = [{} for _ in queries]
    for name, paths in enrolled.items():
        d = pairwise(q, embedder.embed(paths), embedder.metric).min(dim=1).values
        for row, value in enumerate(d.tolist()):
            out[row][name] = value
    return out


def _enroll_classes(gallery: Gallery, env: dict, classes, per_class: int = 2) -> dict:
    enrolled = {f"class {c}": env["files"][c][:per_class] for c in classes}
    for name, paths in enrolled.items():
        gallery.enroll(name, paths)
    return enrolled


# ------------------------------------------------------------------------------ Python API


def test_enroll_identify_remove_round_trip(env, tmp_path):
    emb = env["embedder"]
    with Gallery.create(tmp_path / "g.db", emb) as gallery:
        enrolled = _enroll_classes(gallery, env, range(4))
        assert [(i.name, i.examples) for i in gallery.identities()] == [
            (f"class {c}", 2) for c in range(4)
        ]
        queries = [p for c in range(CLASSES) for p in env["files"][c][2:5]]
        answers = gallery.identify(queries, k=3)
        want = _brute(emb, enrolled, queries)
        assert len(answers) == len(queries)
        for answer, truth in zip(answers, want):
            names = [c.identity for c in answer.candidates]
            assert len(names) == 3 and len(set(names)) == 3  # identities, each once
            nearest = sorted(truth.items(), key=lambda kv: kv[1])[:3]
            assert names == [n for n, _ in nearest]
            assert [c.distance for c in answer.candidates] == pytest.approx(
                [d for _, d in nearest], abs=1e-5
            )
            assert answer.distance == answer.candidates[0].distance
            expected = names[0] if answer.distance <= answer.threshold else None
            assert answer.identity == expected
        # the enrolled classes' own queries are mostly recognised (a trained model)
        own = [a.candidates[0].identity for a in answers[:12]]
        truth_names = [f"class {c}" for c in range(4) for _ in range(3)]
        assert sum(o == t for o, t in zip(own, truth_names)) >= 9
        builds = gallery.index_builds
        removed = gallery.remove("class 1")
        assert len(removed) == 2 and "class 1" not in gallery and len(gallery) == 3
        again = gallery.identify(queries, k=5)
        assert all("class 1" not in [c.identity for c in a.candidates] for a in again)
        assert all(len(a.candidates) == 3 for a in again)  # fewer identities than k
        assert gallery.index_builds == builds  # incremental: never a rebuild per change
        with pytest.raises(UnknownIdentityError, match="class 1"):
            gallery.remove("class 1")
        png = gallery.thumbnail("class 0")
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and max(image.size) <= 64
        with pytest.raises(UnknownIdentityError):
            gallery.thumbnail("class 1")


def test_enroll_arrays_and_tensors_with_thumbnails(env, tmp_path):
    emb = env["embedder"]
    test = load_dataset(f"idx:{env['data']}", "test")
    with Gallery.create(tmp_path / "g.db", emb) as gallery:
        lines: list[str] = []
        ids = gallery.enroll(
            "tensor", test.x[:3], metadata={"from": "tensor"}, batch_size=2, progress=lines.append
        )
        assert lines == ["tensor: 2 / 3 examples embedded", "tensor: 3 / 3 examples embedded"]
        pixels = (test.x[3:5, 0] * 255).round().to(torch.uint8).numpy()  # (2, 28, 28)
        ids += gallery.enroll("array", pixels)
        assert len(ids) == 5 and gallery.num_examples == 5
        assert gallery.identity("tensor").metadata == {"from": "tensor"}
        with Image.open(io.BytesIO(gallery.thumbnail("tensor"))) as image:
            back = np.asarray(image.convert("L").resize((28, 28)))
        assert np.abs(back.astype(int) - (test.x[0, 0] * 255).numpy()).mean() < 40
        [answer] = gallery.identify(test.x[:1], k=2)  # an enrolled example finds itself
        # at distance 0 up to rounding: the index's euclidean distance is
        # sqrt(|q|^2 + |x|^2 - 2 q.x), whose float32 cancellation near 0 leaves up to
        # sqrt(a few ulps of |x|^2) = 1e-3 of these unit vectors (4.9e-4 here, on the CPU with
        # the enrolled batch of 2 and the query batch of 1; 2.4e-4 on CUDA)
        assert answer.identity == "tensor" and answer.distance < 2e-3
        assert answer.candidates[1].distance > 100 * answer.distance
        with pytest.raises(ValueError, match="no images"):
            gallery.enroll("nobody", [])


def test_unknown_for_an_empty_gallery_and_for_strangers(env, tmp_path):
    emb = env["embedder"]
    with Gallery.create(tmp_path / "g.db", emb) as gallery:
        empty = gallery.identify(env["files"][0][:2], k=3)
        assert [(a.identity, a.distance, a.candidates) for a in empty] == [
            (None, float("inf"), [])
        ] * 2
        enrolled = _enroll_classes(gallery, env, [0], per_class=1)
        strangers = [p for c in range(3, CLASSES) for p in env["files"][c]]
        answers = gallery.identify(strangers, k=1)
        want = _brute(emb, enrolled, strangers)
        far = [i for i, w in enumerate(want) if w["class 0"] > gallery.threshold.value]
        assert len(far) >= len(strangers) // 2  # strangers lie beyond the threshold ...
        assert all(answers[i].identity is None for i in far)  # ... and are unknown
        assert all(a.candidates[0].identity == "class 0" for a in answers)


def test_threshold_comes_from_the_run(env, tmp_path):
    emb = env["embedder"]
    with Gallery.create(tmp_path / "g.db", emb) as gallery:
        assert gallery.threshold == emb.threshold
        assert (
            gallery.threshold.value
            == json.loads((env["a"] / "threshold.json").read_text())["threshold"]
        )
    with GalleryStore.open(tmp_path / "g.db") as store:
        meta = store.meta
    assert meta["threshold"] == emb.threshold.to_json()
    assert meta["model"] == emb.identity() and meta["source"] == str(env["a"].resolve())
    # far=: calibrated on the run's validation split; the run's own threshold.json untouched
    run = Path(shutil.copytree(env["a"], tmp_path / "run"))
    saved = (run / "threshold.json").read_bytes()
    run_emb = Embedder.from_run(run, device="cpu", calibrate=False)
    with Gallery.create(tmp_path / "far.db", run_emb, far=0.0) as gallery:
        t = gallery.threshold
    assert (run / "threshold.json").read_bytes() == saved
    independent = calibrate_threshold(run, far=0.0, device="cpu", progress=lambda _: None)
    assert t.far == 0.0 and t.value == independent.value and t.value < emb.threshold.value
    with pytest.raises(ValueError, match="run folder"):
        Gallery.create(tmp_path / "x.db", run_emb, far=0.01, source=tmp_path / "m.onnx")
    with pytest.raises(GalleryExistsError):
        Gallery.create(tmp_path / "far.db", run_emb)


def test_refuses_another_model(env, tmp_path):
    with Gallery.create(tmp_path / "g.db", env["embedder"]):
        pass
    other = Embedder.from_run(env["b"], progress=lambda _: None)
    assert other.identity()["weights_sha256"] != env["embedder"].identity()["weights_sha256"]
    with pytest.raises(ModelMismatchError) as caught:
        Gallery.open(tmp_path / "g.db", other)
    message = str(caught.value)
    assert "weights_sha256" in message and str(env["a"].resolve()) in message
    assert str(env["b"]) in message
    with Gallery.open(tmp_path / "g.db") as gallery:  # no embedder: loaded from the source
        assert gallery.embedder.identity() == env["embedder"].identity()


def test_index_is_saved_and_reused_while_current(env, tmp_path):
    path = tmp_path / "g.db"
    with Gallery.create(path, env["embedder"]) as gallery:
        _enroll_classes(gallery, env, range(3))
        queries = env["files"][4][:3]
        before = gallery.identify(queries)
    header = index_path(path) / "header.json"
    with GalleryStore.open(path) as store:
        assert json.loads(header.read_text())["generation"] == store.generation == 3
    stamp = header.stat().st_mtime_ns
    with Gallery.open(path, env["embedder"]) as gallery:
        assert gallery.index_builds == 0  # loaded, not rebuilt
        assert gallery.identify(queries) == before
    assert header.stat().st_mtime_ns == stamp  # nothing changed: not saved again
    with Gallery.open(path, env["embedder"]) as gallery:
        gallery.remove("class 2")
        assert gallery.index_builds == 0
    assert json.loads(header.read_text())["generation"] == 4  # saved on close
    shutil.rmtree(index_path(path))  # derived: deleting it loses nothing
    with Gallery.open(path, env["embedder"]) as gallery:
        assert gallery.index_builds == 1 and len(gallery.index) == 4
        assert header.is_file()
        builds = gallery.index_builds
        assert gallery.reindex() == 4 and gallery.index_builds == builds + 1
        assert [a.candidates for a in gallery.identify(queries)] == [
            [c for c in b.candidates if c.identity != "class 2"] for b in before
        ]


def test_another_process_enrolls_and_the_index_is_refreshed(env, tmp_path):
    path = tmp_path / "g.db"
    probe = env["files"][5][0]
    with Gallery.create(path, env["embedder"]) as gallery:
        _enroll_classes(gallery, env, range(2))
        builds = gallery.index_builds
        done = _cli("gallery", "enroll", path, "newcomer", probe, "--device", "cpu")
        assert done.returncode == 0, done.stderr
        [answer] = gallery.identify(probe)
        # embedded by another process (other thread count): equal to float32 rounding, and
        # sqrt(rounding) for the euclidean distance
        assert answer.identity == "newcomer" and answer.distance < 2e-3
        assert gallery.index_builds == builds + 1 and len(gallery.index) == 5
        done = _cli("gallery", "remove", path, "newcomer")
        assert done.returncode == 0, done.stderr
        gallery.enroll("class 5", env["files"][5][1:3])  # our write after theirs: rebuilt
        [answer] = gallery.identify(probe)
        assert "newcomer" not in [c.identity for c in answer.candidates]
        assert len(gallery.index) == gallery.num_examples == 6


def test_removals_between_the_search_and_the_name_lookup_are_answered_consistently(env, tmp_path):
    """Another writer removes a hit's identity at the worst instant, every time:
    after this gallery's index search, before it reads the names of the hits. The answer is
    the gallery as one snapshot saw it (after the first removal), never an error (a retry
    loop would meet the same race again)."""
    path = tmp_path / "g.db"
    probe = env["files"][1][4]
    with Gallery.create(path, env["embedder"]) as gallery:
        _enroll_classes(gallery, env, range(4))
        [before] = gallery.identify(probe)
        assert before.candidates[0].identity == "class 1"
        lookup = gallery._store.identity_of
        other = Gallery.open(path, env["embedder"])
        removed = []

        def remove_then_look_up(ids):  # the other writer strikes between search and lookup
            hit = lookup(ids[:1])[0]  # the identity of one of the hits
            other.remove(hit)
            removed.append(hit)
            return lookup(ids)

        gallery._store.identity_of = remove_then_look_up
        try:
            [answer] = gallery.identify(probe)
        finally:
            gallery._store.identity_of = lookup
            other.close()
        assert len(removed) == 1  # one race, then the snapshot answered
        everyone = {f"class {c}" for c in range(4)}
        assert {c.identity for c in answer.candidates} == everyone - set(removed)
        assert len(gallery.index) == gallery.num_examples == 6


# ------------------------------------------------------------------------------ command line


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_create_enroll_identify_list_remove_reindex(env, tmp_path):
    g = tmp_path / "people.db"
    done = _cli("gallery", "create", g, "--run", env["a"], "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "threshold" in done.stdout and index_path(g).is_dir()
    enroll_dir = tmp_path / "enroll"
    for c in (1, 2):
        (enroll_dir / f"class {c}").mkdir(parents=True)
        for p in env["files"][c][:2]:
            shutil.copy(p, enroll_dir / f"class {c}" / p.name)
    done = _cli("gallery", "enroll", g, "--from-dir", enroll_dir, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if "enrolled" in line]
    assert len(progress) == 2 and "[2/2]" in progress[1]
    done = _cli(
        "gallery", "enroll", g, "class 0", *env["files"][0][:2], "--json", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["identity"] == "class 0" and len(record["examples"]) == 2
    queries = [env["files"][c][5] for c in (0, 1, 2, 4)]
    done = _cli("gallery", "identify", g, *queries, "--k", "2", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["input"] for r in records] == [str(q) for q in queries]
    with Gallery.open(g, device="cpu") as gallery:
        want = gallery.identify(queries, k=2)
    for r, w in zip(records, want):
        assert set(r) == {"input", "identity", "distance", "threshold", "candidates"}
        assert r["identity"] == w.identity and r["distance"] == pytest.approx(w.distance)
        assert [c["identity"] for c in r["candidates"]] == [c.identity for c in w.candidates]
        assert r["identity"] == (
            r["candidates"][0]["identity"] if r["distance"] <= r["threshold"] else None
        )
    done = _cli("gallery", "list", g, "--json")
    listed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["identity"], r["examples"]) for r in listed] == [
        ("class 0", 2),
        ("class 1", 2),
        ("class 2", 2),
    ]
    # the rest in-process (same entry point, no new interpreter each)
    assert cli_main(["gallery", "identify", str(g), str(queries[0])]) == 0
    assert cli_main(["gallery", "remove", str(g), "class 1"]) == 0
    assert cli_main(["gallery", "reindex", str(g)]) == 0
    assert cli_main(["gallery", "list", str(g)]) == 0
    with GalleryStore.open(g) as store:
        assert [i.name for i in store.identities()] == ["class 0", "class 2"]
        assert json.loads((index_path(g) / "header.json").read_text())["live"] == 4


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("deepmetric: error: ")]
    assert errors == lines[-1:] and "Traceback" not in err, err
    assert all(w in errors[0] for w in words), errors[0]


def test_cli_errors_are_one_line(env, tmp_path, capsys):
    g = tmp_path / "g.db"
    good = env["files"][0][0]
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not a gallery")
    cases = [
        (["gallery", "create", g, "--run", env["a"]], None),
        (["gallery", "create", g, "--run", env["a"]], ["already exists"]),
        (["gallery", "enroll", g, "x", tmp_path / "gone.png"], ["gone.png", "no such"]),
        (["gallery", "enroll", g, "x", tmp_path / "broken.png"], ["broken.png"]),
        (["gallery", "enroll", g, "x"], ["IDENTITY FILE"]),
        (["gallery", "identify", g, tmp_path / "gone.png"], ["gone.png"]),
        (["gallery", "remove", g, "nobody"], ["no identity named 'nobody'"]),
        (["gallery", "identify", g, good, "--run", env["b"]], ["another model", "weights"]),
        (["gallery", "list", tmp_path / "nowhere.db"], ["no gallery file", "nowhere.db"]),
        (["gallery", "identify", tmp_path / "notes.txt", good], ["not a deepmetric gallery"]),
        (["gallery", "create", tmp_path / "n.db", "--run", tmp_path / "norun"], ["norun"]),
    ]
    for args, words in cases:
        code = cli_main([str(a) for a in args])
        err = capsys.readouterr().err
        if words is None:
            assert code == 0, err
        else:
            _one_line_error(code, err, *words)
    with GalleryStore.open(g) as store:
        assert store.num_examples == 0  # nothing was written by the failed enrolls


def test_demo_oneshot_on_tiny_data(tmp_path):
    data = make_idx_dir(tmp_path / "tiny", classes=10, n_train=16, n_test=6)
    run = tmp_path / "oneshot"
    args = ["--run", run, "--strangers", "20", f"data=idx:{data}", "epochs=1", "model.dim=16"]
    (run / "checkpoints").mkdir(parents=True)  # a run killed before its first save: train it
    done = _cli("demo-oneshot", *args)
    assert done.returncode == 0, done.stderr
    assert "reusing" not in done.stdout
    out = done.stdout
    for label in (
        "one-shot accuracy",
        "accepted answers",
        "genuine queries accepted",
        "strangers rejected",
    ):
        match = re.search(rf"{label}[^:]*: (?:accuracy )?([0-9.]+|nan)", out)
        assert match, out
        assert match.group(1) == "nan" or 0.0 <= float(match.group(1)) <= 1.0
    assert "20 strangers" in out and "4 classes never trained on" in out
    assert "20 genuine queries" in out  # 4 classes x (6 test images - 1 enrolled)
    figure = run / "oneshot" / "oneshot.png"
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size[0] > 400
    again = _cli("demo-oneshot", *args)  # the run is reused, the demo gallery made afresh
    assert again.returncode == 0 and "reusing the trained run" in again.stdout


def test_demo_oneshot_config_must_name_the_seen_classes(tmp_path):
    config = tmp_path / "plain.yaml"
    config.write_text("epochs: 1\n")
    done = _cli("demo-oneshot", "--config", config, "--run", tmp_path / "run")
    assert done.returncode == 2 and "set train.classes" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_demo_oneshot_on_a_glyph_set_enrolls_a_named_face_and_unseen_strangers(tmp_path):
    from deepmetric.data.glyphs import make_glyph_set

    make_glyph_set(
        tmp_path / "g", preset="latin", classes=40, faces=4, folder=False, progress=lambda _: None
    )
    data = f"data=npz:{tmp_path / 'g' / 'glyphs.npz'}"  # 32 training, 8 test characters
    run = tmp_path / "run"
    common = ["--run", run, data, "epochs=1", "model.dim=16", "train.p=8", "train.k=4"]
    args = [*common, "train.val_classes=4", "mode=batch", "loss.name=multi_similarity"]
    done = _cli(
        "demo-oneshot",
        *args,
        "--enroll",
        "5",
        "--stranger-classes",
        "3",
        "--enroll-face",
        "dejavu-serif",
        "--far",
        "0.05",
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "5 classes never trained on" in out and "(face dejavu-serif)" in out
    assert "15 genuine queries" in out  # 5 classes x (4 faces - 1 enrolled)
    assert "12 strangers (every test image of 3 other unseen classes)" in out
    assert "at a false accept rate <= 0.05 on its pairs" in out
    with GalleryStore.open(run / "oneshot" / "gallery.db") as store:
        assert store.num_examples == 5
    for extra, message in (
        (["--enroll-face", "comic-sans"], "no face 'comic-sans'"),
        (["--enroll", "6", "--stranger-classes", "3"], "8 unseen test classes: too few"),
    ):
        bad = _cli("demo-oneshot", *args, *extra)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert bad.stderr.strip().count("\n") == 0
