"""Every command and API on CUDA, against the CPU result of the same run; and, on a machine
without CUDA, ``--device cuda`` as one clear line.

With CUDA (skipped without): ``train`` (and ``fit``) on ``cuda`` and ``cuda:0``, ``evaluate``,
``embed``, ``verify``, ``export``, ``gallery create / enroll / identify / reindex / check``,
``serve``, ``demo-oneshot``, ``Embedder`` and ``Gallery``, on tiny data written here: exit 0,
the files written, everything on the device that should be (the network, the gallery's
index), and the numbers equal to the CPU's within float tolerance. The CPU reference is the
same run folder (trained on the CPU) loaded on the CPU. ``--nproc 2`` with nccl needs two GPUs;
with fewer GPUs than processes, ``auto`` trains on the CPU (said once) and ``cuda`` is an error.

Tolerances: CUDA convolutions run in TF32 by default on Ampere and later
(``torch.backends.cudnn.allow_tf32``), 10 mantissa bits, so embeddings (unit vectors) agree with
the CPU's to about 1e-3, not 1e-6 (:data:`EMB_ATOL`, :data:`DIST_ATOL`); an answer (same /
different, the identity found) must be the CPU's unless the CPU's own distance lies within that
tolerance of the threshold or of the runner-up.

Without CUDA: every command given ``--device cuda`` or ``cuda:0`` (``train.device=cuda`` for
``train``, with and without ``--nproc 2``) exits 2 with one line saying CUDA is not available,
before any work; the APIs raise ``ConfigError`` saying so.
"""

from __future__ import annotations

import json
import os
import re
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
from tiny_data import make_idx_dir
from torch import nn

from deepmetric import distributed
from deepmetric.checkpoints import latest_checkpoint
from deepmetric.cli import main as cli_main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import load_dataset
from deepmetric.evaluate import evaluate_run
from deepmetric.gallery import Gallery, GalleryStore
from deepmetric.gallery.index import ExactIndex, load_index
from deepmetric.inference import Embedder, calibrate_threshold
from deepmetric.losses import TripletLoss
from deepmetric.models import embed, module_device, register_model
from deepmetric.training import fit, load_trained, resolve_device, train, untrained_network

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
without_cuda = pytest.mark.skipif(CUDA, reason="CUDA is available here")
DEVICES = ["cuda", "cuda:0"]
#: embeddings (unit vectors) of CUDA against the CPU: TF32 convolutions
EMB_ATOL = 5e-3
#: distances between them
DIST_ATOL = 1e-2
CLASSES = 4
#: SGD (a step linear in the gradient), float32, every step logged: CPU and CUDA comparable
SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.amp=false", "train.log_every=1")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda")


@pytest.fixture(scope="module")
def data(root) -> Path:
    return write_learnable_idx(root / "toy", n_classes=CLASSES, n_train=30, n_test=10)


@pytest.fixture(scope="module")
def run(root, data) -> Path:
    """A tiny run trained on the CPU with a validation split, its threshold chosen on the CPU
    and saved (so that every device verifies against the same threshold)."""
    out = train_tiny_run(data, root / "run", "train.val_fraction=0.25", "mode=batch")
    Embedder.from_run(out, device="cpu", progress=lambda _: None)
    return out


@pytest.fixture(scope="module")
def cpu_embedder(run) -> Embedder:
    return Embedder.from_run(run, device="cpu", calibrate=False)


@pytest.fixture(scope="module")
def pngs(root, data) -> dict[int, list[Path]]:
    """The test images as PNG files, one folder per class."""
    test = load_dataset(f"idx:{data}", "test")
    files: dict[int, list[Path]] = {c: [] for c in range(CLASSES)}
    for i in range(len(test)):
        c = int(test.y[i])
        folder = root / "pngs" / f"class {c}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (test.x[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        files[c].append(folder / f"{i:03d}.png")
    return files


def _queries(pngs: dict[int, list[Path]]) -> list[Path]:
    return [p for c in range(CLASSES) for p in pngs[c][2:5]]


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    """``deepmetric ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _on(device: str) -> torch.device:
    """The device ``device`` names, with its index (``cuda``: the current GPU)."""
    d = torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if d.type == "cuda" and d.index is None
        else d
    )


def _answers(records: list) -> list[dict[str, float]]:
    """Identify answers (JSON records or Identification tuples) as {identity: distance}, with
    the accepted identity under the key ``None``."""
    out = []
    for r in records:
        if isinstance(r, dict):  # a JSON record
            pairs = [(c["identity"], c["distance"]) for c in r["candidates"]]
            accepted = r["identity"]
        else:
            pairs = [(c.identity, c.distance) for c in r.candidates]
            accepted = r.identity
        out.append({**dict(pairs), None: accepted})
    return out


def _same_answers(got: list, want: list, threshold: float) -> None:
    """CUDA's answers against the CPU's: every identity at the same distance (DIST_ATOL), and
    the same accepted identity unless the CPU's decision was that close to a tie."""
    got, want = _answers(got), _answers(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), (g, w)
        for name in w.keys() - {None}:
            assert g[name] == pytest.approx(w[name], abs=DIST_ATOL), (name, g, w)
        ranked = sorted(d for k, d in w.items() if k is not None)
        near_tie = len(ranked) > 1 and ranked[1] - ranked[0] < 2 * DIST_ATOL
        if abs(ranked[0] - threshold) > 2 * DIST_ATOL and not near_tie:
            assert g[None] == w[None], (g, w)


# ------------------------------------------------------------------------------ train, fit


@pytest.fixture(scope="module")
def cpu_sgd_run(root, data) -> Path:
    return train_tiny_run(data, root / "cpu_sgd", *SGD, "train.val_fraction=0.25")


def _model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    prefix = "embedding_net."  # joint mode: the head is not the embedding network
    return {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith("head.")}


def _steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_train_on_cuda_follows_the_cpu_run(device, data, cpu_sgd_run, tmp_path):
    out = train_tiny_run(
        data, tmp_path / "run", *SGD, "train.val_fraction=0.25", f"train.device={device}"
    )
    config, net = load_trained(out)
    assert config.train.device == device  # the run says where it trained
    gpu, cpu = _model_weights(out), _model_weights(cpu_sgd_run)
    assert gpu.keys() == cpu.keys() and all(torch.isfinite(v).all() for v in gpu.values())
    # the same first loss (same weights, same batch), and the weights moved where the CPU
    # run's moved: their distance is a small part of the way both went from the initial ones
    first_gpu, first_cpu = _steps(out)[0], _steps(cpu_sgd_run)[0]
    assert first_gpu["step"] == first_cpu["step"] == 1
    assert first_gpu["loss"] == pytest.approx(first_cpu["loss"], rel=1e-2, abs=1e-4)
    init = untrained_network(config, torch.zeros(1, 1, 28, 28)).state_dict()
    keys = [k for k in init if k in cpu and cpu[k].is_floating_point()]
    moved = torch.cat([(cpu[k] - init[k]).flatten() for k in keys]).norm()
    apart = torch.cat([(gpu[k] - cpu[k]).flatten() for k in keys]).norm()
    assert moved > 0 and apart < 0.1 * moved, (float(apart), float(moved))
    summary = [r for r in map(json.loads, (out / "log.jsonl").open()) if r["kind"] == "summary"]
    assert len(summary) == 1 and 0 <= summary[0]["test_precision_at_1"] <= 1
    x = load_dataset(f"idx:{data}", "test").x  # the saved weights run alike on either device
    on_cpu = embed(net, x)
    torch.testing.assert_close(embed(net.to(device), x), on_cpu, rtol=0, atol=EMB_ATOL)


@needs_cuda
def test_train_with_amp_on_cuda_uses_float16_and_stays_finite(data, tmp_path):
    out = train_tiny_run(data, tmp_path / "amp", "train.amp=true", "train.device=cuda")
    weights = _model_weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert all(np.isfinite(r["loss"]) for r in _steps(out))


class TinyNet(nn.Module):
    """A user's own network for fit(): flatten -> linear -> L2 normalisation."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc(x.flatten(1)), dim=1)


register_model("test_cuda.tiny_net")(TinyNet)


def _fit(data: Path, device: str, out: Path) -> nn.Module:
    torch.manual_seed(0)
    options = {"optimizer": "sgd", "lr": 0.05, "amp": False, "builder": "test_cuda.tiny_net"}
    return fit(
        TinyNet(),
        load_dataset(f"idx:{data}", "train"),
        loss=TripletLoss(margin=0.2),
        epochs=1,
        p=4,
        k=8,
        out=out,
        device=device,
        stream=None,
        **options,
    )


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_fit_on_cuda_equals_fit_on_the_cpu(device, data, tmp_path):
    net = _fit(data, device, tmp_path / "gpu")
    assert module_device(net) == _on(device)  # trained in place, on the device
    x = load_dataset(f"idx:{data}", "test").x
    got = embed(net, x)  # where the network is
    assert got.device.type == "cpu" and torch.isfinite(got).all()
    cpu_net = _fit(data, "cpu", tmp_path / "cpu")
    for (k, a), b in zip(net.state_dict().items(), cpu_net.state_dict().values(), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4, msg=k)  # float32 matmuls
    config, loaded = load_trained(tmp_path / "gpu")  # rebuilt on the CPU by its builder
    assert config.train.device == device
    torch.testing.assert_close(embed(loaded, x), got, rtol=0, atol=EMB_ATOL)


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def cpu_metrics(run, root) -> dict:
    return evaluate_run(
        run, out=root / "eval_cpu", device="cpu", embedding_map=False, progress=lambda _: None
    )


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_on_cuda(device, run, cpu_metrics, tmp_path, capsys):
    out = tmp_path / "eval"
    code, printed, err = _cli(capsys, "evaluate", run, "--out", out, "--no-map", "--device", device)
    assert code == 0, err
    assert "precision@1" in printed and "untrained network" in printed
    got = json.loads((out / "metrics.json").read_text())
    assert got["data"]["device"] == device
    assert (out / "report.html").is_file() and (out / "roc.png").is_file()
    want = cpu_metrics
    assert got["precision_at_1"] == pytest.approx(want["precision_at_1"], abs=0.05)
    assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=0.03)
    assert got["verification"]["roc_auc"] == pytest.approx(
        want["verification"]["roc_auc"], abs=0.03
    )
    for baseline in ("untrained_network_baseline", "raw_input_baseline"):  # the first: on CUDA
        for key in ("precision_at_1", "map_at_r"):
            assert got[baseline][key] == pytest.approx(want[baseline][key], abs=0.05), baseline


# ------------------------------------------------------------------ embed, verify, export


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_embed_on_cuda(device, run, pngs, cpu_embedder, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    folder = pngs[0][0].parent.parent
    code, printed, err = _cli(capsys, "embed", run, folder, "--out", out, "--device", device)
    assert code == 0 and f"embedded {CLASSES * 10} images" in printed, err
    got = np.load(out, allow_pickle=False)
    listing = json.loads(out.with_suffix(".json").read_text())
    files = [Path(p) for p in listing["inputs"]]
    assert got.shape == (CLASSES * 10, 16) and np.isfinite(got).all()
    assert listing["model"] == cpu_embedder.identity()  # the same weights, whatever the device
    np.testing.assert_allclose(got, cpu_embedder.embed(files).numpy(), rtol=0, atol=EMB_ATOL)


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_verify_on_cuda(device, run, pngs, cpu_embedder, capsys):
    pairs = [(pngs[0][0], pngs[0][0]), (pngs[0][1], pngs[0][2]), (pngs[0][1], pngs[3][1])]
    pairs += [(pngs[1][3], pngs[2][3]), (pngs[2][4], pngs[2][5])]
    for a, b in pairs:
        code, printed, err = _cli(capsys, "verify", run, a, b, "--json", "--device", device)
        assert code == 0, err
        got, want = json.loads(printed), cpu_embedder.verify(a, b)[0]
        assert got["threshold"] == want.threshold  # the run's, chosen on the CPU
        assert got["distance"] == pytest.approx(want.distance, abs=DIST_ATOL)
        if abs(want.distance - want.threshold) > 2 * DIST_ATOL:
            assert got["same"] == want.same, (a, b, got, want)


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_export_on_cuda(device, run, pngs, cpu_embedder, tmp_path, capsys):
    """The network is loaded on the device, chooses the missing threshold there (saved with the
    run), and is traced on the CPU: the file is the CPU model's."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "threshold.json").unlink()
    code, printed, err = _cli(
        capsys, "export", copy, "--out", tmp_path / "m.onnx", "--device", device
    )
    assert code == 0 and "threshold" in printed, err
    model = Embedder.from_onnx(tmp_path / "m.onnx")
    assert model.identity() == cpu_embedder.identity()
    files = _queries(pngs)
    torch.testing.assert_close(model.embed(files), cpu_embedder.embed(files), rtol=0, atol=1e-5)
    saved = json.loads((copy / "threshold.json").read_text())
    assert model.threshold.value == saved["threshold"]
    assert saved["weights_sha256"] == model.identity()["weights_sha256"]
    assert abs(saved["threshold"] - cpu_embedder.threshold.value) < 0.25  # distances agree to 1e-2


# ------------------------------------------------------------------------------ gallery


def _enroll_dir(pngs: dict[int, list[Path]], folder: Path) -> Path:
    """Two images of classes 0-2, one subfolder each (``gallery enroll --from-dir``)."""
    for c in range(3):
        (folder / f"class {c}").mkdir(parents=True)
        for p in pngs[c][:2]:
            shutil.copy(p, folder / f"class {c}" / p.name)
    return folder


def _gallery_commands(capsys, g: Path, run: Path, pngs, device: str, tmp: Path) -> list[dict]:
    """create, enroll (--from-dir, then files), identify, reindex, check on ``device``; the
    identify records."""
    dev = ("--device", device)
    code, printed, err = _cli(capsys, "gallery", "create", g, "--run", run, *dev)
    assert code == 0 and "threshold" in printed, err
    code, _, err = _cli(capsys, "gallery", "enroll", g, "--from-dir", _enroll_dir(pngs, tmp), *dev)
    assert code == 0, err
    code, _, err = _cli(capsys, "gallery", "enroll", g, "class 3", *pngs[3][:2], *dev)
    assert code == 0, err
    queries = _queries(pngs)
    code, printed, err = _cli(
        capsys, "gallery", "identify", g, *queries, "--k", "4", "--json", *dev
    )
    assert code == 0, err
    records = [json.loads(line) for line in printed.splitlines()]
    code, printed, err = _cli(capsys, "gallery", "reindex", g, *dev)
    assert code == 0 and "8 examples" in printed, err
    code, printed, err = _cli(capsys, "gallery", "check", g, *dev)
    assert code == 0 and "consistent" in printed, printed + err
    return records


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_gallery_commands_on_cuda(device, run, pngs, cpu_embedder, tmp_path, capsys):
    got = _gallery_commands(capsys, tmp_path / "g.db", run, pngs, device, tmp_path / "a")
    want = _gallery_commands(capsys, tmp_path / "c.db", run, pngs, "cpu", tmp_path / "b")
    _same_answers(got, want, cpu_embedder.threshold.value)
    with GalleryStore.open(tmp_path / "g.db") as a, GalleryStore.open(tmp_path / "c.db") as b:
        ea, eb = a.all_embeddings(), b.all_embeddings()
    assert ea.identities == eb.identities and np.isfinite(ea.embeddings).all()
    np.testing.assert_allclose(ea.embeddings, eb.embeddings, rtol=0, atol=EMB_ATOL)
    with Gallery.open(tmp_path / "g.db", device=device) as gallery:  # the model from the source
        assert gallery.embedder.device == torch.device(device)
        assert gallery.index.device.type == "cuda"  # the exact index, where the model runs


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_embedder_and_gallery_apis_on_cuda(device, run, pngs, cpu_embedder, tmp_path):
    emb = Embedder.from_run(run, device=device, calibrate=False)
    assert emb.device == torch.device(device) and module_device(emb.module) == _on(device)
    files = _queries(pngs)
    got = emb.embed(files)
    assert got.device.type == "cpu" and torch.isfinite(got).all()
    torch.testing.assert_close(got, cpu_embedder.embed(files), rtol=0, atol=EMB_ATOL)
    assert emb.identity() == cpu_embedder.identity() and emb.threshold == cpu_embedder.threshold
    a, b = files[:6], files[6:]
    for g, w in zip(emb.verify(a, b), cpu_embedder.verify(a, b), strict=True):
        assert g.distance == pytest.approx(w.distance, abs=DIST_ATOL)
        if abs(w.distance - w.threshold) > 2 * DIST_ATOL:
            assert g.same == w.same
    enrolled = {f"class {c}": pngs[c][:2] for c in range(CLASSES)}
    answers = []
    for path, model in ((tmp_path / "g.db", emb), (tmp_path / "c.db", cpu_embedder)):
        with Gallery.create(path, model) as gallery:
            assert gallery.index.device.type == model.device.type
            for name, paths in enrolled.items():
                gallery.enroll(name, paths)
            answers.append(gallery.identify(files, k=CLASSES))
            if model is emb:
                gallery.reindex()
                assert gallery.index.device.type == "cuda"
                # rebuilt on the GPU: the same answers up to float rounding (a matrix product
                # of another shape; seen on an H200: 0.51147 -> another last digit)
                _same_answers(gallery.identify(files, k=CLASSES), answers[0], emb.threshold.value)
    _same_answers(answers[0], answers[1], cpu_embedder.threshold.value)
    with Gallery.open(tmp_path / "g.db", device=device) as gallery:  # loaded, on the device
        assert gallery.embedder.device == torch.device(device)
        assert gallery.index.device.type == "cuda"
        _same_answers(gallery.identify(files, k=CLASSES), answers[1], emb.threshold.value)


@needs_cuda
def test_the_exact_index_on_cuda_answers_as_on_the_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g).numpy()
    q = torch.randn(20, 8, generator=g).numpy()
    for metric in ("euclidean", "squared_euclidean", "cosine"):
        cpu = ExactIndex(dim=8, metric=metric, rebuild_fraction=None)
        gpu = ExactIndex(dim=8, metric=metric, rebuild_fraction=None, device="cuda")
        for index in (cpu, gpu):
            index.add(x[:200], np.arange(200))
            index.add(x[200:], np.arange(200, 300))
            index.remove(np.arange(0, 300, 7))  # tombstones, then compacted
        assert gpu.device.type == "cuda" and gpu._vectors.device.type == "cuda"
        gpu.rebuild()  # compacted on the GPU; the CPU index keeps its tombstones
        a, b = cpu.search(q, 5), gpu.search(q, 5)
        assert np.array_equal(a.ids, b.ids), metric
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cpu.live_vectors()[1], gpu.live_vectors()[1], atol=1e-6)
        gpu.save(tmp_path / metric)
        loaded = load_index(tmp_path / metric)
        assert loaded.device.type == "cpu"
        c = loaded.to("cuda:0").search(q, 5)
        assert loaded.device == torch.device("cuda:0") and np.array_equal(c.ids, b.ids)


# -------------------------------------------------------------------- serve, demo-oneshot


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_serve_on_cuda(device, run, pngs, cpu_embedder, tmp_path):
    for name in ("fastapi", "uvicorn", "httpx", "multipart"):
        pytest.importorskip(name)
    from test_service import Server, files_field, new_gallery

    gallery = new_gallery(run, tmp_path / "g.db")
    server = Server(run, gallery, "--device", device)  # after the helper's --device cpu: wins
    try:
        for c in range(CLASSES):
            r = server.client.post(
                "/identities", data={"identity": f"class {c}"}, files=files_field(*pngs[c][:2])
            )
            assert r.status_code == 201, r.text
        queries = _queries(pngs)
        r = server.client.post("/identify", files=files_field(*queries), data={"k": str(CLASSES)})
        assert r.status_code == 200, r.text
        served = r.json()
        r = server.client.post("/embed", files=files_field(*queries[:3]))
        assert r.status_code == 200, r.text
        vectors = np.array(r.json()["embeddings"])
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output
    want = cpu_embedder.embed(queries[:3]).numpy()
    np.testing.assert_allclose(vectors, want, rtol=0, atol=EMB_ATOL)
    with Gallery.open(gallery, cpu_embedder) as cpu_gallery:  # what the server enrolled
        _same_answers(served, cpu_gallery.identify(queries, k=CLASSES), cpu_gallery.threshold.value)


@needs_cuda
@pytest.mark.parametrize("device", DEVICES)
def test_demo_oneshot_on_cuda(device, tmp_path, capsys):
    data = make_idx_dir(tmp_path / "tiny", classes=10, n_train=16, n_test=6)
    run = tmp_path / "oneshot"
    args = ["--run", run, "--strangers", "20", "--device", device, f"data=idx:{data}"]
    args += ["epochs=1", "model.dim=16", "model.backbone=small_cnn"]
    code, printed, err = _cli(capsys, "demo-oneshot", *args)
    assert code == 0, err
    assert "20 strangers" in printed and "4 classes never trained on" in printed
    assert load_trained(run)[0].train.device == device  # trained there
    assert (run / "oneshot" / "oneshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with GalleryStore.open(run / "oneshot" / "gallery.db") as store:
        assert store.num_identities == 4 and np.isfinite(store.all_embeddings().embeddings).all()
    for label in ("one-shot accuracy", "genuine queries accepted", "strangers rejected"):
        match = re.search(rf"{label}[^:]*: ([0-9.]+|nan)", printed)
        assert match and (match.group(1) == "nan" or 0 <= float(match.group(1)) <= 1), printed


# ------------------------------------------------------------------------------ --nproc


def _train_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deepmetric", "train", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _nproc_args(data: Path) -> list[str]:
    return [
        f"data=idx:{data}",
        "model.backbone=small_cnn",  # no BatchNorm: it would normalise each slice on its own
        "model.dim=16",
        "train.p=4",
        "train.k=8",
        "epochs=1",
        *SGD,
    ]


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_nproc_2_with_nccl_ends_with_the_weights_of_one_process(data, tmp_path):
    args = [*_nproc_args(data), "train.device=cuda"]
    one = _train_cli(*args, f"out={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = _train_cli(*args, f"out={tmp_path / 'two'}", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done:") == 1 and "gloo" not in two.stderr  # rank 0 reports
    a, b = _model_weights(tmp_path / "one"), _model_weights(tmp_path / "two")
    for key in a:  # TF32 convolutions on slices of the batch: not bit for bit
        torch.testing.assert_close(b[key], a[key], rtol=1e-2, atol=1e-3, msg=key)
    steps = [r["step"] for r in _steps(tmp_path / "two")]
    assert steps == list(range(1, len(steps) + 1))  # once each, by rank 0


@needs_cuda
@pytest.mark.skipif(GPUS > 2, reason="starts one process more than this machine has GPUs")
def test_nproc_beyond_the_gpus_auto_uses_the_cpu_and_cuda_is_one_line(data, tmp_path):
    n = GPUS + 1
    done = _train_cli(*_nproc_args(data), f"out={tmp_path / 'auto'}", "--nproc", n)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("training on the CPU (gloo)") == 1, done.stderr
    assert "Traceback" not in done.stderr
    refused = _train_cli(
        *_nproc_args(data), "train.device=cuda", f"out={tmp_path / 'c'}", "--nproc", n
    )
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert f"{n} processes need one GPU each" in refused.stderr
    assert not (tmp_path / "c").exists()  # said before any process started
    one_gpu = _train_cli(
        *_nproc_args(data), "train.device=cuda:0", f"out={tmp_path / 'd'}", "--nproc", 2
    )
    assert one_gpu.returncode == 2 and "names one GPU" in one_gpu.stderr, one_gpu.stderr


def test_the_process_plan_for_each_device(monkeypatch):
    """:func:`deepmetric.distributed.on_cuda` on a pretend machine with one GPU, and with
    none (the decision only; no process starts)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.on_cuda("auto", 1) and distributed.on_cuda("cuda", 1)
    assert distributed.on_cuda("cuda:0", 1)
    assert not distributed.on_cuda("auto", 2)  # the CPU, with gloo (init_from_env says so)
    assert not distributed.on_cuda("cpu", 2) and not distributed.on_cuda("cpu", 1)
    with pytest.raises(ValueError, match="2 processes need one GPU each and this machine has 1"):
        distributed.on_cuda("cuda", 2)
    with pytest.raises(ValueError, match="names one GPU for 2 processes"):
        distributed.on_cuda("cuda:0", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert not distributed.on_cuda("auto", 2) and not distributed.on_cuda("auto", 1)
    with pytest.raises(ValueError, match="CUDA is not available"):
        distributed.on_cuda("cuda", 1)


# --------------------------------------------------------------------- a device not here


def _one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepmetric: error: "), err
    assert all(w in lines[0] for w in words), lines[0]


def _every_command(device: str, where: Path) -> dict[str, list[object]]:
    """Each command with ``device``: paths that do not exist (the device is checked first)."""
    run, g, image = where / "run", where / "g.db", where / "x.png"
    dev = ["--device", device]
    return {
        "train": ["train", f"data=idx:{where / 'nowhere'}", f"out={run}", f"train.device={device}"],
        "train --nproc 2": [
            "train",
            f"data=idx:{where / 'nowhere'}",
            f"out={run}",
            f"train.device={device}",
            "--nproc",
            "2",
        ],
        "evaluate": ["evaluate", run, *dev],
        "embed": ["embed", run, image, "--out", where / "e.npy", *dev],
        "verify": ["verify", run, image, image, *dev],
        "export": ["export", run, "--out", where / "m.onnx", *dev],
        "gallery create": ["gallery", "create", g, "--run", run, *dev],
        "gallery enroll": ["gallery", "enroll", g, "someone", image, *dev],
        "gallery identify": ["gallery", "identify", g, image, *dev],
        "gallery reindex": ["gallery", "reindex", g, *dev],
        "gallery check": ["gallery", "check", g, *dev],
        "serve": ["serve", run, "--gallery", g, *dev],
        "demo-oneshot": ["demo-oneshot", "--run", run, f"data=idx:{where / 'nowhere'}", *dev],
    }


COMMANDS = list(_every_command("cuda", Path("x")))


@without_cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_cuda_is_one_line_for_every_command(command, device, tmp_path, capsys):
    argv = _every_command(device, tmp_path)[command]
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    _one_line(code, capsys.readouterr().err, "CUDA is not available")
    assert list(tmp_path.iterdir()) == []  # nothing was written


@without_cuda
def test_cuda_without_cuda_is_a_config_error_for_every_api(data, tmp_path):
    x = load_dataset(f"idx:{data}", "train")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        fit(TinyNet(), x, loss=TripletLoss(), epochs=1, device="cuda", stream=None)
    config = load_config(None, [f"data=idx:{data}", f"out={tmp_path / 'r'}", "train.device=cuda"])
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(config, stream=None)
    for api in (
        lambda: Embedder.from_run(tmp_path / "none", device="cuda:0"),
        lambda: calibrate_threshold(tmp_path / "none", device="cuda"),
        lambda: evaluate_run(tmp_path / "none", device="cuda"),
        lambda: resolve_device("cuda"),
    ):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            api()
    assert not (tmp_path / "r").exists()


@needs_cuda
def test_a_gpu_this_machine_lacks_is_one_line(run, tmp_path, capsys):
    missing = f"cuda:{GPUS}"
    for argv in (
        ["evaluate", run, "--device", missing],
        ["embed", run, run, "--out", tmp_path / "e.npy", "--device", missing],
        ["train", f"out={tmp_path / 'r'}", f"train.device={missing}"],
    ):
        capsys.readouterr()
        code = cli_main([str(a) for a in argv])
        _one_line(code, capsys.readouterr().err, f"device '{missing}'", f"has {GPUS} GPU")
    with pytest.raises(ConfigError, match=f"has {GPUS} GPU"):
        Embedder.from_run(run, device=missing)


def test_a_name_that_is_no_device_is_one_line(tmp_path, capsys):
    for argv in (
        ["embed", tmp_path, tmp_path, "--out", tmp_path / "e.npy", "--device", "gpu0"],
        ["gallery", "identify", tmp_path / "g.db", tmp_path, "--device", "cuda:x"],
    ):
        capsys.readouterr()
        code = cli_main([str(a) for a in argv])
        _one_line(code, capsys.readouterr().err, "is not a device")


def test_embed_never_moves_a_network_behind_its_back():
    net = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(embed(net, x), net(x).detach())  # where it is: the CPU
    with pytest.raises(ValueError, match="the network is on cpu, the inputs would go to meta"):
        embed(net, x, device="meta")
    assert module_device(net) == torch.device("cpu") and module_device(nn.ReLU()) is None
    assert embed(nn.Flatten(), x, device="cpu").shape == (3, 4)  # no parameters: as asked
