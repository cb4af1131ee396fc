"""Hostile tests of the minor defects of issue 24: re-running ``gallery enroll --from-dir``
after a kill enrolls nothing twice (M5); identity names are one identity whatever their Unicode
normalisation, in the store, the command line and the service, and older galleries that hold
non-NFC names still reach them (M6); ``evaluate --data folder:`` makes its inputs with the
run's ``preprocess.json``, as ``embed`` does (M8); NaN / inf pixels are refused when the data is
loaded, not reported as a diverged training (M10).

The tests that need a model use the tiny run of ``test_service`` (28 x 28 grayscale IDX data).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_service import Server, new_gallery, shared_run

from deepmetric import fit
from deepmetric.cli import main as cli_main
from deepmetric.data import ArrayDataset, DatasetError, load_dataset
from deepmetric.evaluate.run import retrieval_and_verification
from deepmetric.gallery import Gallery, GalleryStore
from deepmetric.inference import Embedder
from deepmetric.losses import TripletLoss
from deepmetric.training import resume_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NFD, NFC = "Zoe\u0308", "Zo\u00eb"  # "Zoë" decomposed (as macOS names folders) and composed


def _run(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m deepmetric ARGS`` in a subprocess."""
    argv = [sys.executable, "-m", "deepmetric", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)


def _enrolled(path: Path) -> dict[str, int]:
    with GalleryStore.open(path) as store:
        return {info.name: info.examples for info in store.identities()}


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str], list[str]]:
    """``deepmetric ARGS`` in this process (faster than a subprocess): exit code, stdout and
    stderr lines."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out.splitlines(), err.splitlines()


@pytest.fixture(scope="module")
def service_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[Path]]]:
    return shared_run(tmp_path_factory)


# ------------------------------------------------------------------------------ M5


def _identity_folder(root: Path, names: dict[str, list[Path]]) -> Path:
    for name, files in names.items():
        (root / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / name / f.name)
    return root


def test_enroll_from_dir_run_again_skips_what_was_enrolled(service_run, tmp_path, capsys):
    run, files = service_run
    g = new_gallery(run, tmp_path / "g.db")
    people = {"alice": files[0][:2], "bob": files[1][:3], NFD: files[2][:2]}
    everyone = _identity_folder(tmp_path / "all", people)
    # what a killed run leaves: whole identities (each is one transaction), not the rest
    killed = _identity_folder(tmp_path / "killed", {"alice": people["alice"]})
    done = _run("gallery", "enroll", g, "--from-dir", killed, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    done = _run("gallery", "enroll", g, "--from-dir", everyone, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "1 already enrolled with the same images, skipped" in done.stdout, done.stdout
    assert _enrolled(g) == {"alice": 2, "bob": 3, NFC: 2}  # each example once; NFC name
    code, out, _ = _cli(capsys, "gallery", "enroll", g, "--from-dir", everyone, "--device", "cpu")
    assert code == 0 and "3 already enrolled with the same images, skipped" in out[-1], out
    assert _enrolled(g) == {"alice": 2, "bob": 3, NFC: 2}


def test_enroll_from_dir_refuses_a_name_enrolled_with_other_images(service_run, tmp_path, capsys):
    run, files = service_run
    g = new_gallery(run, tmp_path / "g.db")
    with Gallery.open(g, device="cpu") as gallery:
        gallery.enroll("bob", files[1][5:7])  # bob: two other images, same count
        gallery.enroll("carol", files[3][:1])  # carol: one of her folder's two
    folder = _identity_folder(
        tmp_path / "dir", {"alice": files[0][:2], "bob": files[1][:2], "carol": files[3][:2]}
    )
    before = _enrolled(g)
    code, _, err = _cli(capsys, "gallery", "enroll", g, "--from-dir", folder, "--device", "cpu")
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert "'bob' (2 examples)" in line and "'carol' (1 examples)" in line, line
    assert "'alice'" not in line and "nothing was enrolled" in line, line
    assert _enrolled(g) == before  # not merged, and alice not enrolled either


# ------------------------------------------------------------------------------ M6


def test_nfc_and_nfd_names_are_one_identity_in_the_store(tmp_path):
    rows = np.eye(4, dtype=np.float32)
    with GalleryStore.create(tmp_path / "g.db", meta={"dim": 4, "metric": "cosine"}) as store:
        store.add("e\u0301", rows[:1])
        store.add("\u00e9", rows[1:2])
        assert [i.name for i in store.identities()] == ["\u00e9"]
        assert store.identity("e\u0301").examples == 2
        assert store.example_ids("e\u0301") == store.example_ids("\u00e9")
        assert store.remove("e\u0301") and store.num_identities == 0


def test_a_non_nfc_name_of_an_older_gallery_stays_reachable(tmp_path):
    path = tmp_path / "old.db"
    rows = np.eye(4, dtype=np.float32)
    with GalleryStore.create(path, meta={"dim": 4, "metric": "cosine"}) as store:
        store.add("placeholder", rows[:1])
    with sqlite3.connect(path) as db:  # as code before NFC wrote it: stored decomposed
        db.execute("UPDATE identities SET name = ?", (NFD,))
    with GalleryStore.open(path) as store:
        assert NFD in store and NFC in store  # the exact name, and its NFC spelling
        store.add(NFC, rows[1:2])  # joins the stored identity: no look-alike second one
        assert [(i.name, i.examples) for i in store.identities()] == [(NFD, 2)]
        assert store.identity(NFC).name == NFD
        assert len(store.remove(NFC)) == 2 and store.num_identities == 0


def test_the_service_treats_nfc_and_nfd_as_one_identity(service_run, tmp_path):
    run, files = service_run
    server = Server(run, new_gallery(run, tmp_path / "g.db"))
    try:
        http = server.client
        up = [("files", (p.name, p.read_bytes(), "image/png")) for p in files[0][:2]]
        r = http.post("/identities", data={"identity": NFD}, files=up)
        assert r.status_code == 201 and r.json()["identity"] == NFC, r.text
        more = [("files", (p.name, p.read_bytes(), "image/png")) for p in files[0][2:3]]
        r = http.post("/identities", data={"identity": NFC}, files=more)
        assert r.status_code == 201, r.text
        assert [(i["identity"], i["examples"]) for i in http.get("/identities").json()] == [
            (NFC, 3)
        ]
        query = [("files", (p.name, p.read_bytes(), "image/png")) for p in files[0][3:4]]
        r = http.post("/identify", files=query)
        assert r.status_code == 200 and r.json()[0]["candidates"][0]["identity"] == NFC, r.text
        for spelling in (NFD, NFC):
            r = http.get(f"/identities/{spelling}/thumbnail")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = http.delete(f"/identities/{NFD}")
        assert r.status_code == 200 and len(r.json()["examples"]) == 3, r.text
        assert http.get("/identities").json() == []
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output


# ------------------------------------------------------------------------------ M8


def test_evaluate_on_a_folder_uses_the_runs_preprocessing(service_run, tmp_path, capsys):
    run, files = service_run
    assert json.loads((run / "preprocess.json").read_text())["channels"] == 1  # 28 x 28 gray
    folder, inputs = tmp_path / "rgb", []
    for c in range(3):  # 40 x 40 RGB: another size and mode than the training data
        (folder / f"c{c}").mkdir(parents=True)
        for f in files[c]:
            image = Image.open(f).convert("RGB").resize((40, 40), Image.Resampling.BICUBIC)
            image.putpixel((0, 0), (255, 0, 0))  # colour: not a gray image in an RGB file
            image.save(folder / f"c{c}" / f.name)
            inputs.append(folder / f"c{c}" / f.name)
    out = tmp_path / "eval"
    code, _, err = _cli(
        capsys, "evaluate", run, "--data", f"folder:{folder}", "--split", "train", "--out", out,
        "--no-map", "--episodes", "10", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    # `deepmetric embed RUN FILE...` is the run's Embedder on the files: the same, in process
    emb = Embedder.from_run(run, device="cpu", calibrate=False).embed(inputs)
    labels = torch.arange(3).repeat_interleave(len(files[0]))
    config = resume_config(run)
    want = retrieval_and_verification(
        emb, labels, metric=config.loss.metric, margin=config.loss.margin, threshold=None,
        seed=config.seed,
    )  # fmt: skip
    assert metrics["data"]["items"] == len(inputs)
    got, expected = metrics["verification"], want["verification"]
    assert got["fold_thresholds"] == pytest.approx(expected["fold_thresholds"], abs=1e-5)
    assert got["eer_threshold"] == pytest.approx(expected["eer_threshold"], abs=1e-5)
    for row, wanted in zip(metrics["per_class"], want["per_class"], strict=True):
        assert row["margin_mean"] == pytest.approx(wanted["margin_mean"], abs=1e-5)


# ------------------------------------------------------------------------------ M10


def _nan_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    x[7, 0, :2, 0] = np.inf
    np.savez(path, x=x, y=np.repeat(np.arange(3), 4))
    return path


def test_nan_pixels_are_refused_when_the_data_is_loaded(tmp_path, capsys):
    path = _nan_npz(tmp_path / "nan.npz")
    with pytest.raises(DatasetError, match=r"nan\.npz: x holds 3 non-finite values .* 2 of"):
        load_dataset(f"npz:{path}")
    code, _, err = _cli(capsys, "train", f"data=npz:{path}", f"out={tmp_path / 'run'}")
    assert code == 2 and len(err) == 1 and err[0].startswith("deepmetric: error:"), err
    line = err[0]
    assert "3 non-finite values" in line and str(path) in line, line
    assert "diverged" not in line and not (tmp_path / "run" / "checkpoints").exists()


def test_fit_names_non_finite_inputs_not_a_divergence(tmp_path):
    x = torch.rand(16, 4)
    x[5, 1] = float("nan")
    data = ArrayDataset(x, torch.arange(4).repeat_interleave(4))
    net = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="train_data holds 1 non-finite input values"):
        fit(net, data, loss=TripletLoss(), epochs=1, p=2, k=2, stream=None, device="cpu")

    class Plain(torch.utils.data.Dataset):  # not an ArrayDataset: read item by item
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return x[i], int(data.y[i])

    with pytest.raises(ValueError, match=r"the batch of step \d+ holds 1 non-finite"):
        fit(net, Plain(), loss=TripletLoss(), epochs=4, p=4, k=4, stream=None, device="cpu")
