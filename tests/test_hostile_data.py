"""Hostile data files (issue 24): an ``.npz`` whose headers declare more than it holds or whose
labels are huge values (D10), and an ONNX export whose weights were changed after the export
(D5). Real files made by hand, the CLI as a user runs it."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_service import new_gallery, shared_run

from deepmetric.config import load_config
from deepmetric.data.datasets import DatasetError, load_npz
from deepmetric.gallery import Gallery
from deepmetric.gallery.gallery import ModelMismatchError
from deepmetric.inference import Embedder, export_onnx
from deepmetric.losses import TripletLoss
from deepmetric.training import train
from deepmetric.training.modes import JointMode


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_refusal(done: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ D10 npz


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _lying_npz(path: Path, shape: tuple[int, ...], compress: int = zipfile.ZIP_STORED) -> Path:
    """``x.npy`` whose header declares ``shape`` float32 over a 100-byte payload."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("x.npy", header.getvalue() + bytes(100))
        z.writestr("y.npy", _npy(np.zeros(3, dtype=np.int64)))
    return path


def test_an_npz_header_declaring_more_than_the_file_holds_is_refused_before_allocating(
    tmp_path,
):
    for shape, compress in (
        ((1_000_000, 1_000_000), zipfile.ZIP_STORED),  # 4 TB over 100 bytes
        ((2**40, 4), zipfile.ZIP_DEFLATED),
        ((3, 2), zipfile.ZIP_STORED),  # 24 bytes declared, 100 held: also a lie
    ):
        path = _lying_npz(tmp_path / "lie.npz", shape, compress)
        with pytest.raises(DatasetError, match=r"lie\.npz: x declares shape .* but holds 100"):
            load_npz(path)
    # a deflated member whose directory entry claims far more than its bytes can inflate to
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy(np.zeros((4, 3), dtype=np.float32)))
        z.writestr("y.npy", _npy(np.arange(4)))
    raw = bytearray((tmp_path / "bomb.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "bomb.npz") as z:
        info = z.getinfo("x.npy")
    at = raw.find(b"PK\x01\x02")  # the central directory's first entry: x.npy's
    raw[at + 24 : at + 28] = (2**31).to_bytes(4, "little")  # its uncompressed size
    assert info.file_size < 2**31
    (tmp_path / "bomb.npz").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"bomb\.npz: x declares 2,147,483,648 bytes"):
        load_npz(tmp_path / "bomb.npz")
    # the CLI: one line, exit 2
    _lying_npz(tmp_path / "lie.npz", (1_000_000, 1_000_000))
    done = _cli("train", f"data=npz:{tmp_path / 'lie.npz'}", f"out={tmp_path / 'run'}")
    _one_line_refusal(done, "lie.npz", "declares shape (1000000, 1000000)")
    assert not (tmp_path / "run").exists()


def test_npz_labels_are_values_remapped_to_ids_never_sizes(tmp_path):
    big = [1_000_000_007, 2**62, 5, 2**62, 5, 1_000_000_007]
    np.savez(
        tmp_path / "v.npz",
        x=np.arange(18, dtype=np.float32).reshape(6, 3),
        y=np.array(big, dtype=np.int64),
        x_test=np.zeros((2, 3), dtype=np.float32),
        y_test=np.array([7, 2**62], dtype=np.int64),
    )
    train, test = load_npz(tmp_path / "v.npz"), load_npz(tmp_path / "v.npz", "test")
    names = ["5", "7", "1000000007", str(2**62)]
    assert train.classes == test.classes == names  # one id space over both splits
    assert train.y.tolist() == [2, 3, 0, 3, 0, 2] and test.y.tolist() == [1, 3]
    assert [train.classes[i] for i in train.y] == [str(v) for v in big]  # values kept for display
    assert train.num_classes == 4
    np.savez(tmp_path / "u.npz", x=np.zeros((2, 3)), y=np.array([2**64 - 1, 3], dtype=np.uint64))
    assert load_npz(tmp_path / "u.npz").classes == ["3", str(2**64 - 1)]
    # labels already 0..C-1 keep their ids and have no names, as before
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([1, 0, 1]))
    dense = load_npz(tmp_path / "d.npz")
    assert dense.y.tolist() == [1, 0, 1] and dense.classes is None
    # with class names, the labels index them: one outside is refused in one line
    np.savez(tmp_path / "n.npz", x=np.zeros((2, 2)), y=np.array([0, 9]), classes=np.array(["a"]))
    with pytest.raises(DatasetError, match=r"n\.npz: y has label 9, but classes names ids 0\.\.0"):
        load_npz(tmp_path / "n.npz")
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 2)), y=np.array([0.5, 2.0**62]))
    with pytest.raises(DatasetError, match="must be a 1-D integer array"):
        load_npz(tmp_path / "f.npz")


def test_the_joint_head_finds_label_values_without_a_lookup_table():
    labels = torch.tensor([2**62, 1_000_000_007] * 8)
    classes = torch.unique(labels)
    mode = JointMode(labels, TripletLoss(margin=0.2), p=2, k=4, seed=0, classes=classes)
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    logits = torch.randn(4, 2)
    y = torch.tensor([2**62, 1_000_000_007, 2**62, 3])  # 3: a class the head does not know
    step = mode.loss_of((emb, logits), y)
    known = torch.tensor([1, 0, 1])  # rows of 2**62 and 1e9+7 in the head
    ce = torch.nn.functional.cross_entropy(logits[:3], known)
    metric = TripletLoss(margin=0.2)(emb, y)
    torch.testing.assert_close(step.loss, metric + ce)


def test_a_run_trains_on_an_npz_with_huge_label_values(tmp_path):
    rng = np.random.default_rng(0)
    values = np.array([1_000_000_007, 2**62, 3, 2**40], dtype=np.int64)
    y = np.repeat(values, 8)
    x = rng.normal(size=(len(y), 6)).astype(np.float32) + np.repeat(np.eye(4, 6) * 4, 8, axis=0)
    np.savez(tmp_path / "huge.npz", x=x, y=y)
    overrides = [f"data=npz:{tmp_path / 'huge.npz'}", f"out={tmp_path / 'run'}", "mode=joint"]
    overrides += ["model.backbone=mlp", "model.dim=8", "train.p=4", "train.k=4", "epochs=1"]
    overrides += ["train.val_fraction=0", "train.device=cpu"]
    assert train(load_config(None, overrides), stream=None)["steps"] > 0


# ------------------------------------------------------------------------------ D5 ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    run, files = shared_run(tmp_path_factory)  # the service tests' tiny run, trained once
    root = tmp_path_factory.mktemp("hostile_onnx")
    onnx_path = export_onnx(run, root / "model.onnx", progress=lambda _: None)
    gallery = new_gallery(run, root / "g.db")
    return {"root": root, "run": run, "onnx": onnx_path, "gallery": gallery, "img": files[0][0]}


def _noisy(source: Path, out: Path) -> Path:
    """The export with noise added to its largest initializer, metadata kept."""
    proto = onnx.load(str(source))
    target = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(target)
    noisy = array + np.random.default_rng(0).normal(0, 1e-3, array.shape).astype(array.dtype)
    target.CopyFrom(numpy_helper.from_array(noisy, target.name))
    onnx.save(proto, str(out))
    return out


def test_an_unmodified_export_keeps_its_runs_identity(exported):
    model = Embedder.from_onnx(exported["onnx"])
    run = Embedder.from_run(exported["run"], calibrate=False)
    assert model.identity() == run.identity() and model.has_threshold
    with Gallery.open(exported["gallery"], embedder=model) as g:  # made with the run
        assert g.identify([exported["img"]])[0].candidates == []


def test_an_export_with_changed_weights_is_refused_by_the_runs_gallery(exported, tmp_path):
    noisy = _noisy(exported["onnx"], tmp_path / "noisy.onnx")
    model = Embedder.from_onnx(noisy)
    meta = {p.key: p.value for p in onnx.load(str(noisy)).metadata_props}
    assert (
        meta["deepmetric.weights_sha256"]
        == Embedder.from_onnx(exported["onnx"]).identity()["weights_sha256"]
    )  # the metadata still claims the run's weights...
    assert model.identity()["weights_sha256"] != meta["deepmetric.weights_sha256"]  # ...not trusted
    assert not model.has_threshold  # the run's threshold was chosen for other weights
    with pytest.raises(ModelMismatchError, match="another model"):
        Gallery.open(exported["gallery"], embedder=model)
    g, img = exported["gallery"], exported["img"]
    done = _cli("gallery", "enroll", g, "someone", img, "--run", noisy, "--device", "cpu")
    _one_line_refusal(done, "another model", "weights_sha256")
    assert Gallery.open(g, embedder=Embedder.from_onnx(exported["onnx"])).identities() == []


def test_an_int8_quantized_export_is_refused_by_the_runs_gallery(exported, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(exported["onnx"]), str(quantized), weight_type=QuantType.QInt8)
    meta = {p.key for p in onnx.load(str(quantized)).metadata_props}
    assert "deepmetric.weights_sha256" in meta  # quantization keeps the metadata
    model = Embedder.from_onnx(quantized)
    assert (
        model.identity()["weights_sha256"]
        != Embedder.from_onnx(exported["onnx"]).identity()["weights_sha256"]
    )
    with pytest.raises(ModelMismatchError, match=r"another model \(weights_sha256 differ"):
        Gallery.open(exported["gallery"], embedder=model)
    # the quantized file is usable on its own: a gallery of its own, without the run's threshold
    assert not model.has_threshold
    with pytest.raises(ValueError, match="not those it was exported with"):
        model.verify(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28))
