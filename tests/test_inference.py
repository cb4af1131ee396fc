"""Embedder on real runs: preprocessing recorded by training, batching, verification, the
threshold (from the validation split only, at best accuracy or at a FAR), the model identity,
and ``deepmetric embed`` / ``verify`` through the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.checkpoints import latest_checkpoint
from deepmetric.cli import main as cli_main
from deepmetric.data import Preprocessing, load_dataset
from deepmetric.distances import paired
from deepmetric.evaluate import choose_threshold, verification_pairs
from deepmetric.inference import Embedder, calibrate_threshold, threshold_at_far
from deepmetric.inference.threshold import VALIDATION_PROTOCOL
from deepmetric.models import embed
from deepmetric.training import load_data, load_trained


def _train(root: Path, data: Path, name: str, *extra: str) -> Path:
    return train_tiny_run(data, root / name, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference")
    data = write_learnable_idx(root / "toy", n_classes=4, n_train=30, n_test=10)
    test = load_dataset(f"idx:{data}", "test")
    pngs = root / "pngs"
    pngs.mkdir()
    for i in range(12):  # the first 12 test images as PNG files, in a subfolder too
        folder = pngs if i < 6 else pngs / "more"
        folder.mkdir(exist_ok=True)
        pixels = (test.x[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return {
        "root": root,
        "data": data,
        "pngs": pngs,
        "val": _train(root, data, "val", "train.val_fraction=0.25"),
        "noval": _train(root, data, "noval", "train.val_fraction=0", "mode=batch"),
    }


@pytest.fixture()
def run(runs, tmp_path) -> Path:
    """A fresh copy of the run with a validation split, without threshold.json."""
    copy = Path(shutil.copytree(runs["val"], tmp_path / "run"))
    (copy / "threshold.json").unlink(missing_ok=True)
    return copy


def _files(runs) -> list[Path]:
    return sorted(runs["pngs"].rglob("*.png"))


# ------------------------------------------------------------------- preprocessing, embed


def test_training_records_the_preprocessing(runs):
    for name in ("val", "noval"):
        record = json.loads((runs[name] / "preprocess.json").read_text())
        assert Preprocessing.from_dict(record) == Preprocessing(1, 28, 28)


def test_a_run_without_preprocess_json_derives_it_from_its_data(run):
    (run / "preprocess.json").unlink()
    emb = Embedder.from_run(run, calibrate=False)
    assert emb.preprocessing == Preprocessing(1, 28, 28)


def test_embed_equals_the_network_on_the_training_tensors(runs):
    emb = Embedder.from_run(runs["val"], device="cpu", calibrate=False)
    _, net = load_trained(runs["val"])
    test = load_dataset(f"idx:{runs['data']}", "test")
    order = [int(p.stem) for p in _files(runs)]
    want = embed(net, test.x[order])
    got = emb.embed(_files(runs))
    assert got.dtype == torch.float32 and got.shape == (12, 16) and got.device.type == "cpu"
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert emb.dim == 16 and emb.metric == "euclidean"


def test_embed_in_batches_equals_embed_at_once(runs):
    # equal to float32 rounding: the CPU convolution kernels differ with the batch size
    emb = Embedder.from_run(runs["val"], device="cpu", calibrate=False)
    files = _files(runs)
    whole = emb.embed(files, batch_size=256)
    for size in (1, 5):
        assert torch.allclose(emb.embed(files, batch_size=size), whole, atol=1e-5, rtol=0)
    x = emb.preprocess(files)
    assert torch.allclose(emb.embed(x, batch_size=4), whole, atol=1e-5, rtol=0)
    assert emb.embed([]).shape == (0, 16)
    with pytest.raises(ValueError, match="batch_size"):
        emb.embed(files, batch_size=0)


def test_identity_hashes_the_checkpoint_tensors_in_sorted_key_order(runs):
    emb = Embedder.from_run(runs["val"], calibrate=False)
    state = load_file(latest_checkpoint(runs["val"]) / "model.safetensors")
    prefix = "embedding_net."  # joint mode: the classifier head is not part of the model
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}\0{str(t.dtype)[6:]}\0{list(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    identity = emb.identity()
    assert identity == {
        "weights_sha256": h.hexdigest(),
        "preprocessing": Preprocessing(1, 28, 28).to_dict(),
        "dim": 16,
        "metric": "euclidean",
    }
    other = Embedder.from_run(runs["noval"], calibrate=False).identity()
    assert other["weights_sha256"] != identity["weights_sha256"]


# --------------------------------------------------------------------------- threshold


def _validation_threshold(run_dir: Path) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Recomputed independently: the validation split, the network, the evaluate pairs."""
    config, net = load_trained(run_dir)
    _, val = load_data(config)
    e = embed(net, val.x)
    i, j, same = verification_pairs(val.y, seed=config.seed)
    d = paired(e[i], e[j], config.loss.metric)
    return choose_threshold(d, same), d, same


def test_threshold_is_chosen_on_the_validation_split_saved_and_said_once(run):
    said: list[str] = []
    emb = Embedder.from_run(run, device="cpu", progress=said.append)  # as _validation_threshold
    assert len(said) == 1 and "validation split" in said[0] and "saved" in said[0]
    value, _, _ = _validation_threshold(run)
    assert emb.threshold.value == value
    saved = json.loads((run / "threshold.json").read_text())
    _, val = load_data(load_trained(run)[0])
    assert saved["threshold"] == value and saved["metric"] == "euclidean"
    assert saved["protocol"] == VALIDATION_PROTOCOL and saved["far"] is None
    assert saved["validation_items"] == len(val)
    again = Embedder.from_run(run, device="cpu", progress=said.append)  # loaded, not chosen
    assert len(said) == 1 and again.threshold == emb.threshold


def test_the_protocol_text_is_the_one_evaluate_writes():
    from deepmetric.evaluate.run import VALIDATION_PROTOCOL as EVALUATE_PROTOCOL

    assert VALIDATION_PROTOCOL == EVALUATE_PROTOCOL


def test_a_threshold_for_other_weights_is_chosen_again(run):
    record = {"threshold": 9.0, "metric": "euclidean", "weights_sha256": "0" * 64}
    (run / "threshold.json").write_text(json.dumps(record))
    said: list[str] = []
    emb = Embedder.from_run(run, device="cpu", progress=said.append)
    assert len(said) == 1 and emb.threshold.value == _validation_threshold(run)[0]
    # a file without weights (as `deepmetric evaluate` writes) is the latest checkpoint's
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.5, "metric": "euclidean"}))
    assert Embedder.from_run(run, progress=said.append).threshold.value == 0.5
    assert len(said) == 1


def test_threshold_at_a_false_accept_rate(run):
    _, d, same = _validation_threshold(run)
    negatives = d[~same]
    for far in (0.0, 0.05, 0.2):
        t = calibrate_threshold(run, far=far, device="cpu", progress=lambda _: None)
        assert json.loads((run / "threshold.json").read_text())["far"] == far
        rate = float((negatives <= t.value).double().mean())
        assert rate <= far  # FAR on the validation pairs within the target
        above = d[d > t.value]
        if len(above):  # the largest such threshold: accepting the next distance exceeds it
            assert float((negatives <= above.min()).double().mean()) > far
    best = calibrate_threshold(run, device="cpu", progress=lambda _: None)
    assert best.far is None and best.value == _validation_threshold(run)[0]


def test_threshold_at_far_on_known_pairs():
    d = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    same = torch.tensor([True, True, False, True, False, False])
    assert threshold_at_far(d, same, 0.0) == pytest.approx(0.25)  # accepts 0.1, 0.2 only
    assert threshold_at_far(d, same, 1 / 3) == pytest.approx(0.45)  # one negative of three
    assert threshold_at_far(d, same, 1.0) == pytest.approx(0.65)
    d2 = torch.tensor([0.1, 0.2])
    assert threshold_at_far(d2, torch.tensor([False, True]), 0.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="far must be in"):
        threshold_at_far(d, same, 1.5)


def test_no_validation_split_no_threshold_and_a_clear_error(runs, tmp_path):
    run = Path(shutil.copytree(runs["noval"], tmp_path / "noval"))
    said: list[str] = []
    emb = Embedder.from_run(run, progress=said.append)
    assert said == [] and not (run / "threshold.json").exists()
    assert emb.embed(_files(runs)).shape == (12, 16)  # embedding needs no threshold
    with pytest.raises(ValueError, match=r"no validation split.*val_fraction"):
        emb.verify(_files(runs)[0], _files(runs)[1])
    with pytest.raises(ValueError, match="no validation split"):
        calibrate_threshold(run)
    test = load_dataset(f"idx:{runs['data']}", "test")  # held-out labelled data instead
    t = calibrate_threshold(run, data=(test.x, test.y), progress=said.append)
    assert "held-out data" in t.protocol and t.validation_items == len(test)
    assert Embedder.from_run(run).threshold == t


# ------------------------------------------------------------------------------ verify


def test_verify_decides_distance_at_most_threshold(runs, run):
    emb = Embedder.from_run(run, device="cpu", progress=lambda _: None)  # a self-distance < 1e-5
    files = _files(runs)
    a, b = files[:6], files[6:]
    results = emb.verify(a, b)
    want = paired(emb.embed(a), emb.embed(b), "euclidean")
    assert [r.distance for r in results] == pytest.approx(want.tolist(), abs=1e-6)
    t = emb.threshold.value
    assert all(r.threshold == t and r.same == (r.distance <= t) for r in results)
    one_vs_many = emb.verify(files[0], files)  # one against each
    assert len(one_vs_many) == 12 and one_vs_many[0].same and one_vs_many[0].distance < 1e-5
    with pytest.raises(ValueError, match="as many a as b"):
        emb.verify(files[:2], files[:3])


def test_unknown_checkpoint_and_non_run_folder(runs, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint named 'epoch9'"):
        Embedder.from_run(runs["val"], checkpoint="epoch9")
    with pytest.raises(ValueError, match="not a run folder"):
        Embedder.from_run(tmp_path)


# ------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()  # progress lines may come before the error
    errors = [line for line in lines if line.startswith("deepmetric: error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    assert all(w in errors[0] for w in words), errors[0]


def test_cli_embed_writes_npy_and_the_input_list(runs, tmp_path):
    out = tmp_path / "emb.npy"
    files = _files(runs)
    args = ("--out", out, "--batch-size", "5", "--device", "cpu")  # 1e-6 from batches of 256
    done = _cli("embed", runs["val"], runs["pngs"], *args)
    assert done.returncode == 0, done.stderr
    assert "embedded 12 images" in done.stdout
    array = np.load(out, allow_pickle=False)
    listing = json.loads(out.with_suffix(".json").read_text())
    assert listing["inputs"] == [str(f) for f in files] and listing["shape"] == [12, 16]
    emb = Embedder.from_run(runs["val"], device="cpu", calibrate=False)
    assert listing["model"] == emb.identity()
    assert np.allclose(array, emb.embed(files).numpy(), atol=1e-6)


def test_cli_verify_text_and_json(runs, run):
    a, b = _files(runs)[0], _files(runs)[7]
    done = _cli("verify", run, a, b, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert set(record) >= {"a", "b", "distance", "threshold", "same"}
    assert record["a"] == str(a) and record["same"] == (record["distance"] <= record["threshold"])
    assert "validation split" in done.stderr and (run / "threshold.json").exists()
    text = _cli("verify", run, a, a)
    assert text.returncode == 0 and text.stdout.startswith("same: euclidean distance 0.0000")
    assert text.stderr == ""  # the saved threshold: no second message


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    good = _files(runs)[0]
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:40])
    _one_line_error(_cli("verify", runs["val"], good, tmp_path / "gone.png"), "gone.png")
    _one_line_error(_cli("verify", runs["val"], good, tmp_path / "broken.png"), "broken.png")
    _one_line_error(_cli("embed", tmp_path, good, "--out", tmp_path / "e.npy"), "not a run")
    capsys.readouterr()
    in_process = [  # the same entry point, without a new interpreter each
        (["embed", runs["val"], good, "--out", tmp_path / "e.txt"], ".npy"),
        (["embed", runs["val"], tmp_path / "empty", "--out", tmp_path / "e.npy"], "no such"),
        (["verify", runs["noval"], good, good], "no validation split"),
    ]
    for args, words in in_process:
        code = cli_main([str(a) for a in args])
        err = capsys.readouterr().err
        _one_line_error(subprocess.CompletedProcess(args, code, "", err), words)
