"""Hostile run folders and configs (issue 24: D8, D9, D11, M2, M4, M9, M11): every checkpoint
damaged, a run's ``config.yaml`` with ``!!python`` tags, deep nesting or duplicate keys,
``preprocess.json`` (and ONNX metadata) declaring huge inputs, a negative threshold, a seed
out of range, a damaged latest checkpoint. Each is one line on stderr and exit code 2 (or, for
a damaged latest checkpoint, one warning line), and nothing saved in the run is changed.

Real run folders trained here (a tiny IDX data set, two epochs on the CPU) and the real
command line: ``deepmetric`` processes where the exact stderr matters, ``cli.main`` in this
process for the many commands that share one code path."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.checkpoints import load_checkpoint, weights_sha256
from deepmetric.cli import main as cli_main
from deepmetric.config import ConfigError, load_config
from deepmetric.inference.threshold import Threshold, write_threshold
from deepmetric.training import resume_config, train

DEEPMETRIC = [sys.executable, "-m", "deepmetric"]
E1, E2 = "epoch0001-batch000000", "epoch0002-batch000000"
#: validation items, so that verify can calibrate; the toy patterns are not mirror-symmetric
TINY = ("epochs=2", "mode=batch", "train.val_fraction=0.25", "train.augment=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "toy", 4, n_train=8, n_test=4)


@pytest.fixture(scope="module")
def pristine(data, tmp_path_factory) -> Path:
    """A finished two-epoch run (checkpoints E1 and E2); tests copy it, never change it."""
    return train_tiny_run(data, tmp_path_factory.mktemp("runs") / "run", *TINY)


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "a.png"
    Image.new("L", (28, 28), 128).save(path)
    return path


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line(capsys, argv: list[object]) -> str:
    """``deepmetric ARGV`` in this process: exit code 2 and one line on stderr; that line."""
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepmetric: error: "), err
    return lines[0]


def _process(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEEPMETRIC, *map(str, argv)], capture_output=True, text=True, timeout=120
    )


# ---- D8: --resume of a run whose checkpoints are all damaged ------------------------------


def test_resume_with_every_checkpoint_damaged_is_refused_and_changes_nothing(run):
    for name in (E1, E2):  # cut short: the manifest's sizes no longer match
        (run / "checkpoints" / name / "model.safetensors").write_bytes(b"damaged")
    before = _files(run)
    done = _process("train", "--resume", run, "epochs=3")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "training from the start" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"deepmetric: error: cannot resume {run}: "), line
    assert f"{E1} is damaged" in line and f"{E2} is damaged" in line, line
    assert "nothing in" in line and "was changed" in line, line
    assert _files(run) == before  # checkpoints, log.jsonl, config.yaml, preprocess.json


def test_damage_that_keeps_the_sizes_is_refused_too_and_a_new_run_may_not_overwrite(run, capsys):
    for name in (E1, E2):  # the same number of bytes: found when the files are parsed
        model = run / "checkpoints" / name / "model.safetensors"
        model.write_bytes(b"\xff" * model.stat().st_size)
    before = _files(run)
    line = _one_line(capsys, ["train", "--resume", run, "epochs=3"])
    assert f"cannot resume {run}" in line and line.count("is corrupt") == 2, line
    assert _files(run) == before
    config = run / "config.yaml"
    line = _one_line(capsys, ["train", config, f"out={run}", "epochs=3"])
    assert "already holds a run" in line, line
    assert _files(run) == before


def test_resume_from_the_previous_epoch_keeps_the_damaged_latest_aside(run, capsys):
    damaged = run / "checkpoints" / E2 / "model.safetensors"
    damaged.write_bytes(b"damaged")
    assert cli_main(["train", "--resume", str(run), "epochs=3"]) == 0
    err = capsys.readouterr().err
    assert f"deepmetric: warning: {run}/checkpoints/latest names {E2}" in err, err
    assert "RuntimeWarning" not in err and "warnings.warn" not in err, err
    [kept] = (run / "checkpoints").glob(f"{E2}.damaged-*")
    assert (kept / "model.safetensors").read_bytes() == b"damaged"  # never deleted
    assert resume_config(run).epochs == 3


# ---- D9 / M11: a run's config.yaml read by the hardened loader ----------------------------

HOSTILE_CONFIGS = {
    "python tag": "!!python/object/apply:os.system ['echo pwned']\n",
    "duplicate key": None,  # the run's own config.yaml with `seed:` twice
}
#: 5,000-deep nesting: Python's recursion limit, met while parsing (one process below)
DEEP = "model:\n  builder_args: " + "[" * 5000 + "]" * 5000 + "\n"


def _commands(run: Path, image: Path, tmp: Path) -> dict[str, list[object]]:
    return {
        "verify": ["verify", run, image, image],
        "embed": ["embed", run, image, "--out", tmp / "e.npy"],
        "evaluate": ["evaluate", run],
        "export": ["export", run, "--out", tmp / "m.onnx"],
        "gallery": ["gallery", "create", tmp / "g.db", "--run", run],
        "serve": ["serve", run, "--gallery", tmp / "s.db", "--port", "9"],
        "train --resume": ["train", "--resume", run, "epochs=3"],
    }


@pytest.mark.parametrize("hostile", list(HOSTILE_CONFIGS))
def test_a_hostile_run_config_is_one_line_for_every_command(run, image, tmp_path, capsys, hostile):
    config = run / "config.yaml"
    text = HOSTILE_CONFIGS[hostile] or config.read_text().replace("seed: 0\n", "seed: 0\nseed: 1\n")
    config.write_text(text)
    before = _files(run)
    for command, argv in _commands(run, image, tmp_path).items():
        line = _one_line(capsys, argv)
        assert f"run config {config} is not valid YAML" in line, (command, line)
        if hostile == "duplicate key":
            assert "duplicate key 'seed'" in line, line
    assert _files(run) == before
    assert not any(tmp_path.glob("[egms].*")), list(tmp_path.iterdir())  # nothing created


def test_deep_nesting_in_a_run_config_is_one_line_from_the_process(run, image):
    (run / "config.yaml").write_text(DEEP)
    done = _process("verify", run, image, image)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert f"run config {run}/config.yaml is not valid YAML: nested too deeply" in line, line


def test_duplicate_keys_in_a_config_file_are_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\ntrain:\n  lr: 0.1\n  k: 4\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(line 5, column 3\)"):
        load_config(config)
    line = _one_line(capsys, ["train", config])
    assert "duplicate key 'lr'" in line, line
    merged = tmp_path / "merged.yaml"  # a YAML merge key may still be overridden
    merged.write_text("x: &base {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown key 'x'"):
        load_config(merged)


# ---- D11: sizes of preprocess.json and of ONNX metadata -------------------------------------


def test_huge_sizes_in_preprocess_json_are_refused_before_any_allocation(run, image, capsys):
    pre = run / "preprocess.json"
    record = json.loads(pre.read_text())
    for key in ("height", "width"):
        record[key] = 100_000
    pre.write_text(json.dumps(record))
    line = _one_line(capsys, ["verify", run, image, image])
    assert f"{pre}: preprocessing height must be <= 1024, got 100000" in line, line
    line = _one_line(capsys, ["train", f"image_size={100_000}"])
    assert "image_size must be <= 1024" in line, line


def test_huge_sizes_in_onnx_metadata_are_refused(tmp_path, image, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    pre = {"channels": 1, "height": 100_000, "width": 100_000}
    meta = {"format": "1", "preprocessing": json.dumps(pre), "metric": "euclidean"}
    meta |= {"dim": "4", "threshold": "null", "weights_sha256": "0" * 64}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"deepmetric.{key}", value
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    line = _one_line(capsys, ["verify", path, image, image])
    assert "preprocessing height must be <= 1024, got 100000" in line, line


# ---- M2: seeds ----------------------------------------------------------------------------


def test_a_seed_beyond_64_bits_is_refused_and_the_largest_one_trains(data, tmp_path, capsys):
    line = _one_line(capsys, ["train", f"seed={2**63}", f"out={tmp_path / 'x'}"])
    assert line == f"deepmetric: error: seed must be < 2**63 (a 64-bit integer), got {2**63}"
    line = _one_line(capsys, ["train", "seed=-1", f"out={tmp_path / 'x'}"])
    assert "seed must be >= 0" in line, line
    assert not (tmp_path / "x").exists()
    # augmentation derives per-batch seeds from it: they stay in torch's range
    big = train_tiny_run(data, tmp_path / "big", f"seed={2**63 - 1}", "train.augment=true")
    assert (big / "checkpoints" / "latest").read_text().strip() == E1


# ---- M4: threshold.json ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf])
def test_a_negative_or_non_finite_threshold_is_refused(run, image, capsys, value):
    path = run / "threshold.json"
    path.write_text(json.dumps({"threshold": value, "metric": "euclidean"}))
    before = path.read_bytes()
    line = _one_line(capsys, ["verify", run, image, image])
    assert str(path) in line and "threshold must be" in line, line
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="threshold must be"):
        Threshold(value=value, metric="euclidean", protocol="p")


# ---- M9: a damaged latest checkpoint ------------------------------------------------------


def test_a_damaged_latest_falls_back_in_one_line_and_keeps_threshold_json(run, image):
    latest_weights = load_checkpoint(run / "checkpoints" / E2)[0]
    embedding = {k.removeprefix("embedding_net."): v for k, v in latest_weights.items()}
    record = Threshold(
        value=0.7, metric="euclidean", protocol="p", weights_sha256=weights_sha256(embedding)
    )
    write_threshold(run / "threshold.json", record)
    (run / "checkpoints" / E2 / "state.json").write_text("{}")  # another size: damaged
    before = _files(run)
    done = _process("verify", run, image, image, "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    warning = f"deepmetric: warning: {run}/checkpoints/latest names {E2}, which is damaged"
    assert lines[0].startswith(warning) and lines[0].endswith(
        f"falling back to {run}/checkpoints/{E1}"
    )
    assert ".py:" not in done.stderr and "RuntimeWarning" not in done.stderr, done.stderr
    assert "not saved" in done.stderr, done.stderr  # calibrated for epoch 1, not written
    assert _files(run) == before  # threshold.json still the one of epoch 2's weights
    assert json.loads(done.stdout)["same"] is True


def test_evaluate_on_a_fallback_checkpoint_leaves_threshold_json(run, capsys):
    record = Threshold(value=0.7, metric="euclidean", protocol="p", weights_sha256="e" * 64)
    write_threshold(run / "threshold.json", record)
    before = (run / "threshold.json").read_bytes()
    (run / "checkpoints" / E2 / "model.safetensors").write_bytes(b"damaged")
    argv = ["evaluate", str(run), "--no-map", "--ways", "2", "--shots", "1", "--episodes", "5"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "deepmetric: warning:" in err and "falling back" in err, err
    assert (run / "threshold.json").read_bytes() == before


def test_fallback_through_a_file_that_does_not_parse(run, tmp_path):
    model = run / "checkpoints" / E2 / "model.safetensors"
    model.write_bytes(b"\x00" * model.stat().st_size)  # sizes intact: found when parsed
    with pytest.warns(RuntimeWarning, match=rf"{E2}.*is corrupt.*falling back to .*{E1}"):
        summary = train(resume_config(run, ["epochs=3"]), resume=True, stream=None)
    assert summary["epochs"] == 3
