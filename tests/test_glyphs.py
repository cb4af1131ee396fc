"""The glyph set (deepmetric.data.glyphs): small sets of the ``latin`` preset, whose fonts
(fonts-dejavu-core, fonts-liberation) CI installs with ``make fonts GLYPH_PRESET=latin``."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from deepmetric.cli import main as cli_main
from deepmetric.config import load_config
from deepmetric.data import glyphs, load_dataset
from deepmetric.data.datasets import IDX_FILES, DatasetError, load_idx, save_idx
from deepmetric.training import train

QUIET = {"progress": lambda _: None}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("glyphs") / "set"
    manifest = glyphs.make_glyph_set(out, preset="latin", classes=30, faces=4, **QUIET)
    return out, manifest


def test_the_set_has_every_face_of_every_class_and_disjoint_splits(small):
    out, manifest = small
    with np.load(out / "glyphs.npz") as z:
        a = {k: z[k] for k in z.files}
    assert a["x"].dtype == np.uint8 and a["x"].shape[1:] == (28, 28)
    assert a["y"].dtype == np.int32 and a["y_test"].dtype == np.int32
    train_ids, test_ids = set(a["y"].tolist()), set(a["y_test"].tolist())
    assert len(train_ids) == 24 and len(test_ids) == 6 and not train_ids & test_ids
    assert manifest["classes"] == {"train": 24, "test": 6}
    assert a["x"].shape[0] == 24 * 4 and a["x_test"].shape[0] == 6 * 4
    assert list(a["faces"]) == [f["name"] for f in manifest["faces"]]
    for y, face in ((a["y"], a["face"]), (a["y_test"], a["face_test"])):
        for c in np.unique(y):  # one image per face, every face once
            assert sorted(face[y == c].tolist()) == [0, 1, 2, 3]
    names = list(a["classes"])
    chars = manifest["train_characters"] + manifest["test_characters"]
    assert names == [glyphs.class_name(ch) for ch in chars]
    assert all(a["x"].reshape(len(a["x"]), -1).max(axis=1) > 0)  # every image has ink


def test_the_manifest_records_the_fonts_and_the_arrays(small):
    out, manifest = small
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == manifest
    for face in saved["faces"]:
        assert face["sha256"] == hashlib.sha256(Path(face["file"]).read_bytes()).hexdigest()
        assert face["package"] in glyphs.packages("latin")
    assert saved["pillow"] and saved["freetype"] and len(saved["arrays_sha256"]) == 64


def test_the_same_arguments_make_the_same_set_and_another_seed_another_split(small, tmp_path):
    _, manifest = small
    again = glyphs.make_glyph_set(
        tmp_path / "a", preset="latin", classes=30, faces=4, folder=False, **QUIET
    )
    assert again["arrays_sha256"] == manifest["arrays_sha256"]
    other = glyphs.make_glyph_set(
        tmp_path / "b", preset="latin", classes=30, faces=4, seed=1, folder=False, **QUIET
    )
    assert other["test_characters"] != manifest["test_characters"]


def test_glyphs_are_centred_and_the_reference_spans_most_of_the_canvas():
    face = glyphs.PRESETS["latin"].faces[0]
    img = glyphs.render_face(face, "H+", size=28, reference="H")
    rows = np.flatnonzero(img[0].max(axis=1) > 64)
    assert 20 <= rows[-1] - rows[0] + 1 <= 25  # 80 % of 28 = 22.4, up to rounding and blur
    for im in img:
        w = im.astype(float)
        cy = (w.sum(axis=1) * np.arange(28)).sum() / w.sum()
        cx = (w.sum(axis=0) * np.arange(28)).sum() / w.sum()
        assert abs(cy - 13.5) < 1.5 and abs(cx - 13.5) < 1.5


def test_a_character_the_face_lacks_is_an_empty_image():
    face = glyphs.PRESETS["latin"].faces[0]  # DejaVu Sans has no hanzi
    img = glyphs.render_face(face, "A国", size=28, reference="H")
    assert img[0].max() > 0 and img[1].max() == 0


def test_the_three_forms_load_as_the_same_data(small):
    out, _ = small
    npz = load_dataset(f"npz:{out / 'glyphs.npz'}", "test")
    idx = load_dataset(f"idx:{out / 'idx'}", "test")
    folder = load_dataset(f"folder:{out / 'folder'}", "test", size=28, mode="L")
    assert np.array_equal(npz.x.numpy(), idx.x.numpy()) and npz.y.tolist() == idx.y.tolist()
    by_name = {}
    for x, y in zip(npz.x, npz.y):
        by_name.setdefault(npz.classes[int(y)], []).append(x.numpy().tobytes())
    folder_by_name = {}
    for x, y in zip(folder.x, folder.y):
        folder_by_name.setdefault(folder.classes[int(y)], []).append(x.numpy().tobytes())
    assert {k: sorted(v) for k, v in by_name.items()} == {
        k: sorted(v) for k, v in folder_by_name.items()
    }


def test_idx_labels_beyond_255_are_int32_and_read_back(tmp_path):
    labels = np.array([0, 255, 256, 3754, 70000], dtype=np.int32)
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    save_idx(tmp_path / "l", labels)
    assert (tmp_path / "l").read_bytes()[:4] == bytes([0, 0, 0x0C, 1])
    assert load_idx(tmp_path / "l").tolist() == labels.tolist()
    for im, lab in IDX_FILES.values():
        save_idx(tmp_path / im, images)
        save_idx(tmp_path / lab, labels)
    ds = load_dataset(f"idx:{tmp_path}", "train")
    assert ds.y.tolist() == labels.tolist()
    save_idx(tmp_path / "train-labels-idx1-ubyte", -labels - 1)
    with pytest.raises(DatasetError, match="negative labels"):
        load_dataset(f"idx:{tmp_path}", "train")
    with pytest.raises(ValueError, match="uint8 or int32"):
        save_idx(tmp_path / "f", np.zeros(3, dtype=np.float32))


def test_a_run_trains_and_evaluates_on_the_glyph_npz_with_ids_beyond_255(small, tmp_path):
    out, _ = small
    with np.load(out / "glyphs.npz") as z:
        a = {k: z[k] for k in z.files}
    a["y"], a["y_test"] = a["y"] * 100, a["y_test"] * 100  # ids up to 2,900
    a["classes"] = np.array([f"c{i}" for i in range(100 * len(a["classes"]))])
    np.savez(tmp_path / "wide.npz", **a)
    overrides = [
        f"data=npz:{tmp_path / 'wide.npz'}",
        f"out={tmp_path / 'run'}",
        "model.dim=16",
        "train.p=6",
        "train.k=4",
        "epochs=1",
        "train.val_fraction=0.25",
        "train.device=cpu",
    ]
    train(load_config(None, overrides), stream=None)
    argv = ["evaluate", str(tmp_path / "run"), "--no-map", "--device", "cpu"]
    assert cli_main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["data"]["items"] == 6 * 4
    assert set(metrics["data"]["class_names"][2400:2901:100]) <= {f"c{i}" for i in range(2901)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "klingon"}, "unknown glyph preset 'klingon'"),
        ({"faces": 99}, "has 22 faces; 99 were asked"),
        ({"faces": 1}, "faces must be at least 2"),
        ({"classes": 500}, "has 84 characters; 500 classes were asked"),
        ({"classes": 3}, "each needs at least 2"),
        ({"test_fraction": 1.5}, "test_fraction must be in"),
    ],
)
def test_bad_requests_are_one_line_errors(kwargs, message, tmp_path):
    args = {"preset": "latin", "faces": 2, **kwargs}
    with pytest.raises(glyphs.GlyphError, match=message):
        glyphs.make_glyph_set(tmp_path / "x", **args, **QUIET)
    assert not (tmp_path / "x").exists()  # nothing written


def test_a_missing_font_package_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glyphs, "FONT_ROOT", tmp_path / "no-fonts")
    argv = ["--preset", "latin", "--faces", "2", "--out", str(tmp_path / "x")]
    assert glyphs.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0 of the 2 faces asked are installed" in err
    assert "fonts-dejavu-core" in err and "make data-glyphs" in err
    assert glyphs.main(["--preset", "latin", "--packages"]) == 0
    assert capsys.readouterr().out.split() == ["fonts-dejavu-core", "fonts-liberation"]
