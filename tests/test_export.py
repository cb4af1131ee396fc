"""ONNX export: onnxruntime equals torch, a dynamic batch axis, the metadata that makes the file
self-contained, the same identity as the run, and ``deepmetric export``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.data import load_dataset
from deepmetric.inference import Embedder, export_onnx
from deepmetric.training import load_trained


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    data = write_learnable_idx(root / "toy", n_classes=4, n_train=30, n_test=10)
    paths = {"root": root, "data": data}
    for name, val in (("val", "0.25"), ("noval", "0")):
        paths[name] = train_tiny_run(data, root / name, f"train.val_fraction={val}")
    paths["onnx"] = export_onnx(root / "val", root / "model.onnx", progress=lambda _: None)
    return paths


def _test_images(exported) -> torch.Tensor:
    return load_dataset(f"idx:{exported['data']}", "test").x


def test_onnxruntime_equals_torch_with_a_dynamic_batch(exported):
    _, net = load_trained(exported["val"])
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "input" and isinstance(graph_input.shape[0], str)
    assert graph_input.shape[1:] == [1, 28, 28]
    x = _test_images(exported)
    for n in (1, 7):
        got = session.run(["embedding"], {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            want = net(x[:n]).numpy()
        assert got.shape == (n, 16)
        assert np.abs(got - want).max() <= 1e-5
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2 norm in the graph


def test_metadata_makes_the_file_self_contained(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    run = Embedder.from_run(exported["val"], progress=lambda _: None)
    assert json.loads(meta["deepmetric.preprocessing"]) == run.preprocessing.to_dict()
    assert meta["deepmetric.metric"] == "euclidean" and meta["deepmetric.dim"] == "16"
    assert json.loads(meta["deepmetric.threshold"]) == run.threshold.to_json()
    assert meta["deepmetric.weights_sha256"] == run.identity()["weights_sha256"]
    saved = json.loads((exported["val"] / "threshold.json").read_text())
    assert json.loads(meta["deepmetric.threshold"]) == saved


def test_from_onnx_has_the_identity_threshold_and_embeddings_of_the_run(exported, tmp_path):
    run = Embedder.from_run(exported["val"], device="cpu", progress=lambda _: None)
    model = Embedder.from_onnx(exported["onnx"])
    assert model.identity() == run.identity()
    assert model.threshold == run.threshold
    assert model.preprocessing == run.preprocessing and model.metric == run.metric
    x = _test_images(exported)
    from PIL import Image

    files = []
    for i in range(7):
        pixels = (x[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    assert torch.allclose(model.embed(files, batch_size=3), run.embed(files), atol=1e-5, rtol=0)
    a, b = model.verify(files[:3], files[3:6]), run.verify(files[:3], files[3:6])
    assert [r.same for r in a] == [r.same for r in b]
    assert [r.distance for r in a] == pytest.approx([r.distance for r in b], abs=1e-5)


def test_bad_onnx_files_are_value_errors(exported, tmp_path):
    proto = onnx.load(str(exported["onnx"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="not a deepmetric export"):
        Embedder.from_onnx(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.onnx: not a readable ONNX model"):
        Embedder.from_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="no such file"):
        Embedder.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="cannot be exported again"):
        export_onnx(Embedder.from_onnx(exported["onnx"]), tmp_path / "again.onnx")


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_export_then_embed_and_verify_with_the_file(exported, tmp_path):
    out = tmp_path / "noval.onnx"
    done = _cli("export", exported["noval"], "--format", "onnx", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "input (N, 1, 28, 28)" in done.stdout and "no threshold" in done.stdout
    model = Embedder.from_onnx(out)
    assert model.identity() == Embedder.from_run(exported["noval"], calibrate=False).identity()
    with pytest.raises(ValueError, match="carries no threshold"):
        model.verify(_test_images(exported)[:1], _test_images(exported)[1:2])

    pixels = (_test_images(exported)[:2, 0] * 255).round().to(torch.uint8).numpy()
    from PIL import Image

    for i in range(2):
        Image.fromarray(pixels[i]).save(tmp_path / f"{i}.png")
    done = _cli("verify", exported["onnx"], tmp_path / "0.png", tmp_path / "1.png", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["same"] == (record["distance"] <= record["threshold"])
    assert record["threshold"] == Embedder.from_onnx(exported["onnx"]).threshold.value
    done = _cli("embed", exported["onnx"], tmp_path, "--out", tmp_path / "e.npy")
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "e.npy", allow_pickle=False).shape == (2, 16)


def test_a_mirror_averaging_network_exports_with_its_mirror_image(exported):
    run = train_tiny_run(exported["data"], exported["root"] / "mirror", "model.mirror=true")
    path = export_onnx(run, exported["root"] / "mirror.onnx", progress=lambda _: None)
    _, net = load_trained(run)
    assert net.mirror
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _test_images(exported)
    for n in (1, 7):
        got = session.run(["embedding"], {"input": x[:n].numpy()})[0]
        flipped = session.run(["embedding"], {"input": x[:n].flip(-1).numpy()})[0]
        with torch.no_grad():
            want = net(x[:n]).numpy()
        assert np.abs(got - want).max() <= 1e-5
        assert np.abs(got - flipped).max() <= 1e-5  # the graph averages both images
