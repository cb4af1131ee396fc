"""Training end to end on a small IDX data set the tests write (no downloads)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import write_learnable_idx

from deepmetric.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from deepmetric.cli import main as cli_main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import augment
from deepmetric.runs import Run
from deepmetric.training import resume_config, train
from deepmetric.training.builders import build_model
from deepmetric.training.log import StepStats, warn_collapse


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "toy")


def _config(idx_dir: Path, out: Path, *overrides: str):
    base = [
        f"data=idx:{idx_dir}",
        f"out={out}",
        "train.device=cpu",  # bit-for-bit resumes, CPU bfloat16: the CPU's (test_cuda: CUDA)
        "mode=batch",
        "epochs=5",
        "model.dim=16",
        "train.p=3",
        "train.k=4",
        "train.batch_size=12",
        "train.log_every=5",
        "train.val_fraction=0.2",
        "train.augment=false",  # the synthetic patterns are not mirror-symmetric
    ]
    return load_config(None, base + list(overrides))


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def test_batch_mode_learns_and_writes_the_run_folder(idx_dir, tmp_path):
    config = _config(idx_dir, tmp_path / "run", "epochs=4", "loss.mining=batch_all")
    summary = train(config, stream=None)
    epochs = _records(tmp_path / "run", "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert summary["val_precision_at_1"] > 0.9  # 6 classes: chance is about 1/6
    assert summary["test_items"] == 120 and summary["test_precision_at_1"] > 0.9
    steps = _records(tmp_path / "run", "step")
    assert steps and all(0 <= s["active"] <= 1 and s["mean_dist"] > 0 for s in steps)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.loss.mining == "batch_all" and saved.epochs == 4
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name.startswith("epoch0004") and (ckpt / "config.yaml").exists()
    assert len([p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ["mode=siamese", "loss.name=contrastive", "loss.margin=1.0"],
        ["mode=triplet", "loss.margin=1.0"],
        ["mode=offline", "train.offline_every=3", "train.offline_p=4", "train.offline_k=6"],
        ["mode=joint", "loss.mining=semi_hard", "loss.softmax_weight=0.5"],
        ["loss.name=lifted", "loss.margin=1.0", "model.batch_norm=true"],
    ],
    ids=lambda o: o[0],
)
def test_every_mode_trains(idx_dir, tmp_path, overrides):
    config = _config(idx_dir, tmp_path / "run", "epochs=2", *overrides)
    summary = train(config, stream=None)
    epochs = _records(tmp_path / "run", "epoch")
    assert summary["steps"] > 0 and len(epochs) == 2
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] or summary["val_precision_at_1"] > 0.8


def test_open_set_run_reports_the_unseen_classes(idx_dir, tmp_path):
    config = _config(idx_dir, tmp_path / "run", "epochs=3", "train.classes=[0,1,2,3]")
    summary = train(config, stream=None)
    assert 0.3 < summary["unseen_classes_precision_at_1"] <= 1.0  # 2 unseen classes: chance 0.5


def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(idx_dir, tmp_path):
    full = _config(idx_dir, tmp_path / "full", "epochs=2", "train.schedule=step")
    train(full, stream=None)
    part = _config(idx_dir, tmp_path / "part", "epochs=1", "train.schedule=step")
    train(part, stream=None)
    train(resume_config(tmp_path / "part", ["epochs=2"]), resume=True, stream=None)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_mid_epoch_then_resume_equals_an_uninterrupted_run(idx_dir, tmp_path, signum):
    args = [
        f"data=idx:{idx_dir}",
        "model.dim=16",
        "train.p=3",
        "train.k=2",
        "train.log_every=1",
        "train.augment=true",
        "epochs=3",
        "train.device=cpu",  # bit for bit: one device's kernels
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deepmetric.cli", "train", *args]
    run = subprocess.run([*command, f"out={tmp_path / 'full'}"], env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()

    proc = subprocess.Popen([*command, f"out={tmp_path / 'cut'}"], env=env, stderr=subprocess.PIPE)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err.decode()
    assert b"checkpoint saved" in err
    state = load_checkpoint(latest_checkpoint(tmp_path / "cut"))[1]
    assert state["position"]["step"] < _records(tmp_path / "full", "summary")[0]["steps"]

    resumed = subprocess.run(
        [sys.executable, "-m", "deepmetric.cli", "train", "--resume", str(tmp_path / "cut")],
        env=env,
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log continues from the checkpoint: every step once, in order, as in the full run
    steps = [r["step"] for r in _records(tmp_path / "cut", "step")]
    assert steps == [r["step"] for r in _records(tmp_path / "full", "step")]
    assert len(_records(tmp_path / "cut", "summary")) == 1


def test_command_line_errors_are_clear(idx_dir, tmp_path, capsys):
    assert cli_main(["train", "train.lrr=0.1", f"out={tmp_path}/x"]) == 2
    assert "unknown key 'train.lrr'; valid keys:" in capsys.readouterr().err
    assert cli_main(["train", f"data=idx:{tmp_path}/nowhere", f"out={tmp_path}/y"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_an_existing_run_is_not_overwritten(idx_dir, tmp_path):
    config = _config(idx_dir, tmp_path / "run", "epochs=1")
    train(config, stream=None)
    before = _weights(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, stream=None)
    after = _weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_corrupt_checkpoint_gets_a_clear_error(idx_dir, tmp_path):
    train(_config(idx_dir, tmp_path / "run", "epochs=1"), stream=None)
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(ckpt)


def test_mode_and_loss_must_fit(idx_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.name=contrastive"):
        train(_config(idx_dir, tmp_path / "a", "mode=siamese"), stream=None)
    vectors = tmp_path / "vectors.npz"
    np.savez(vectors, x=np.random.default_rng(0).random((30, 8)), y=np.arange(30) % 3)
    with pytest.raises(ConfigError, match=r"model\.backbone=mlp"):
        train(_config(idx_dir, tmp_path / "b", f"data=npz:{vectors}"), stream=None)
    mlp = _config(idx_dir, tmp_path / "c", f"data=npz:{vectors}", "model.backbone=mlp", "epochs=1")
    assert train(mlp, stream=None)["steps"] > 0


def test_collapse_is_warned_about():
    config = load_config(None, ["loss.margin=0.2"])
    with pytest.warns(RuntimeWarning, match="embeddings have collapsed"):
        warn_collapse(StepStats(loss=0.2003, mean_dist=0.002), config.loss.margin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_collapse(StepStats(loss=0.15, mean_dist=0.9), config.loss.margin)


def test_augment_flips_and_shifts_within_bounds():
    x = torch.rand(16, 2, 7, 9)
    out = augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0), max_shift=2))
    for img, got in zip(x, out):
        candidates = []
        for flipped in (img, img.flip(-1)):
            padded = torch.nn.functional.pad(flipped, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    candidates.append(padded[:, dy : dy + 7, dx : dx + 9])
        assert any(torch.equal(got, c) for c in candidates)


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(idx_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # The step schedule multiplies the learning rate by 1e30 after epoch 1: epoch 2 diverges.
    args = [
        "train",
        f"data=idx:{idx_dir}",
        f"out={out}",
        "model.dim=16",
        "train.p=3",
        "train.k=4",
        "epochs=2",
        "model.normalize=false",
        "train.schedule=step",
        "train.step_size=1",
        "train.gamma=1e30",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err or "loss is" in err, err
    kept = latest_checkpoint(out)
    assert kept.name.startswith("epoch0001")
    assert all(torch.isfinite(w).all() for w in _weights(out).values())


def test_a_run_killed_before_its_first_checkpoint_starts_again(idx_dir, tmp_path):
    """A kill during the very first save leaves checkpoints/ with no complete checkpoint: a
    fresh start into the folder is allowed, and --resume trains from the beginning."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-epoch0001-batch000000-deadbeef").mkdir(parents=True)
    train(_config(idx_dir, run, "epochs=1"), stream=None)  # not "already holds a run"
    assert latest_checkpoint(run).name.startswith("epoch0001")
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text((run / "config.yaml").read_text())
    summary = train(resume_config(other), resume=True, stream=None)
    assert summary["epochs"] == 1 and latest_checkpoint(other).name.startswith("epoch0001")


def test_collapse_without_a_distance_margin_gives_no_margin_advice():
    with pytest.warns(RuntimeWarning, match=r"collapsed.*try a lower train\.lr$"):
        warn_collapse(StepStats(loss=0.9, mean_dist=0.0005), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.01 is no collapse without a margin to compare with
        warn_collapse(StepStats(loss=0.9, mean_dist=0.01), None)


@pytest.mark.parametrize(
    ("backbone", "shape"),
    [("small_cnn", (3, 28, 28)), ("vgg_small", (3, 28, 28)), ("resnet_small", (3, 28, 28))],
)
def test_a_saved_network_says_its_input_channels_whatever_its_key_order(backbone, shape, tmp_path):
    """Checkpoints come back with their keys sorted by name (safetensors): VGGSmall's
    ``backbone.fc`` then sorts before its first convolution, which names the channels (a run
    older than preprocess.json: the folder has none)."""
    config = load_config(None, [f"model.backbone={backbone}", "mode=batch"])
    state = build_model(config, torch.zeros(1, *shape), 1).state_dict()
    ordered = dict(sorted(state.items()))
    assert Run(tmp_path, config)._sample_input(ordered).shape == (1, 3, 28, 28)
    wrong = load_config(None, ["model.backbone=small_cnn", "mode=batch"])
    if backbone != "small_cnn":
        with pytest.raises(ConfigError, match=r"not a model\.backbone=small_cnn network"):
            Run(tmp_path, wrong)._sample_input(ordered)


def test_amp_dtype_per_device(monkeypatch):
    fit_module = importlib.import_module("deepmetric.training.fit")
    assert fit_module.autocast_dtype(False, torch.device("cpu")) is None
    assert fit_module.autocast_dtype(True, torch.device("cuda")) == torch.float16
    monkeypatch.setattr(fit_module, "native_bfloat16", lambda: True)
    assert fit_module.autocast_dtype(True, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(fit_module, "native_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="no hardware bfloat16"):
        assert fit_module.autocast_dtype(True, torch.device("cpu")) is None


@pytest.mark.skipif(
    not importlib.import_module("deepmetric.training.fit").native_bfloat16(),
    reason="this CPU has no hardware bfloat16",
)
def test_amp_on_the_cpu_trains_in_bfloat16_and_resumes_exactly(idx_dir, tmp_path):
    """train.amp=true on a CPU with hardware bfloat16: the network runs under bfloat16 autocast
    (its weights leave the float32 run's path), learns as well, and resumes bit for bit."""
    step = "train.schedule=step"  # the learning rate of epoch 1 does not depend on the total
    fp32 = _config(idx_dir, tmp_path / "fp32", "epochs=2", step, "train.amp=false")
    amp = _config(idx_dir, tmp_path / "amp", "epochs=2", step, "train.amp=true")
    s32, s16 = train(fp32, stream=None), train(amp, stream=None)
    a, b = _weights(tmp_path / "fp32"), _weights(tmp_path / "amp")
    assert all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # bfloat16 was used
    assert s16["test_precision_at_1"] >= s32["test_precision_at_1"] - 0.1
    part = _config(idx_dir, tmp_path / "part", "epochs=1", step, "train.amp=true")
    train(part, stream=None)
    train(resume_config(tmp_path / "part", ["epochs=2"]), resume=True, stream=None)
    c = _weights(tmp_path / "part")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_mirror_from_the_config_and_not_for_mlp(idx_dir, tmp_path):
    config = _config(idx_dir, tmp_path / "run", "model.mirror=true")
    net = build_model(config, torch.zeros(2, 1, 28, 28), 3)
    assert net.mirror
    with pytest.raises(ConfigError, match=r"model\.mirror=true"):
        build_model(
            _config(idx_dir, tmp_path / "m", "model.mirror=true", "model.backbone=mlp"),
            torch.zeros(2, 1, 28, 28),
            3,
        )
