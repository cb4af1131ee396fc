"""deepmetric.runs.Run, the one owner of a run folder: its file names, opening (the hardened
loader, one-line errors), the embedding network (no head; input shape from preprocess.json, and
from the first layer for runs older than that file), the threshold record and its one writer,
and Embedder.load, the one way from a path to an embedder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.checkpoints import latest_checkpoint, load_checkpoint
from deepmetric.config import ConfigError
from deepmetric.data import Preprocessing
from deepmetric.files import write_atomically, write_text_atomically
from deepmetric.inference import Embedder
from deepmetric.models import EmbeddingNet, embedding_state
from deepmetric.runs import (
    CONFIG_FILE,
    PREPROCESS_FILE,
    THRESHOLD_FILE,
    VALIDATION_PROTOCOL,
    ModelIdentity,
    Run,
    Threshold,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    data = write_learnable_idx(root / "toy", n_classes=4, n_train=20, n_test=6)
    return {
        "data": data,
        "joint": train_tiny_run(data, root / "joint", "train.val_fraction=0.25"),
        "batch": train_tiny_run(data, root / "batch", "mode=batch", "epochs=2"),
    }


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained["joint"], tmp_path / "copy"))


def test_the_files_of_a_run_are_named_in_one_place(trained):
    run = Run.open(trained["joint"])
    assert run.config_path == trained["joint"] / CONFIG_FILE
    assert run.preprocess_path.name == PREPROCESS_FILE and run.preprocess_path.is_file()
    assert run.threshold_path.name == THRESHOLD_FILE
    assert run.checkpoints_dir.is_dir() and run.holds_checkpoints()
    assert run.log_path.is_file()
    assert run.eval_dir == trained["joint"] / "eval"
    assert run.config.run_dir == trained["joint"]
    assert not run.from_fit


def test_open_refuses_a_folder_without_config_and_a_damaged_config(tmp_path):
    with pytest.raises(ConfigError, match="is not a run folder"):
        Run.open(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        Run.open(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("model: {dim: many}\n")
    with pytest.raises(ConfigError, match=r"run config .*config\.yaml"):
        Run.open(tmp_path)


def test_only_epochs_may_change_on_open(trained):
    assert Run.open(trained["joint"], ["epochs=7"]).config.epochs == 7
    with pytest.raises(ConfigError, match="only epochs=N"):
        Run.open(trained["joint"], ["train.lr=1"])
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        Run.open(trained["joint"], ["epochs=0"])


def test_create_writes_the_config_that_open_reads(trained, tmp_path):
    config = Run.open(trained["joint"]).config
    made = Run.create(config, tmp_path / "new")
    assert made.config_path.is_file()
    assert Run.open(tmp_path / "new").config.model == config.model


@pytest.mark.parametrize("name", ["joint", "batch"])
def test_the_network_is_the_embedding_part_of_the_latest_checkpoint(trained, name):
    run = Run.open(trained[name])
    loaded = run.network()
    assert isinstance(loaded.net, EmbeddingNet) and not loaded.net.training
    assert loaded.latest and loaded.fallback is None
    assert loaded.checkpoint == latest_checkpoint(trained[name])
    saved, _ = load_checkpoint(loaded.checkpoint)
    want = embedding_state(saved)
    got = loaded.net.state_dict()
    assert sorted(got) == sorted(want)  # the joint head's weights are not in it
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_named_checkpoint_and_an_unknown_one(trained):
    run = Run.open(trained["batch"])
    names = sorted(p.name for p in run.checkpoints_dir.iterdir() if p.is_dir())
    older = next(n for n in names if n != latest_checkpoint(trained["batch"]).name)
    loaded = run.network(older)
    assert not loaded.latest and loaded.checkpoint.name == older
    assert not torch.equal(
        next(iter(loaded.net.state_dict().values())),
        next(iter(run.network().net.state_dict().values())),
    )
    with pytest.raises(ValueError, match="no checkpoint named 'nope'"):
        run.network("nope")
    with pytest.raises(ValueError, match="no checkpoint named"):
        run.network("../batch")


def test_the_input_shape_comes_from_preprocess_json_or_the_first_layer(run_copy):
    """Without preprocess.json (runs older than it) the network is rebuilt from its first
    layer's weights; both give the same embeddings."""
    run = Run.open(run_copy)
    assert run.preprocessing() == Preprocessing(1, 28, 28)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = run.network().net(x)
    run.preprocess_path.unlink()
    assert run.preprocessing() is None
    with torch.no_grad():
        got = Run.open(run_copy).network().net(x)
    assert torch.equal(got, want)


def test_a_damaged_preprocess_json_is_named(run_copy):
    (run_copy / PREPROCESS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=PREPROCESS_FILE):
        Run.open(run_copy).preprocessing()


def test_the_untrained_network_is_the_seeded_initial_one(trained):
    run = Run.open(trained["batch"])
    sample = torch.zeros(1, 1, 28, 28)
    state_before = torch.random.get_rng_state()
    a = run.untrained_network(sample).state_dict()
    b = run.untrained_network(sample).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained_state = run.network().net.state_dict()
    assert not all(torch.equal(a[k], trained_state[k]) for k in a)


def test_the_threshold_record_round_trips_through_its_one_writer(run_copy):
    run = Run.open(run_copy)
    record = Threshold(
        value=0.5, metric="euclidean", protocol=VALIDATION_PROTOCOL, validation_items=12
    )
    path = run.write_threshold(record)
    assert path == run.threshold_path
    assert run.threshold() == record
    assert json.loads(path.read_text())["threshold"] == 0.5
    assert not list(run_copy.glob("*.partial"))
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        run.threshold()
    path.unlink()
    assert run.threshold() is None


def test_the_model_identity_is_typed_and_its_dict_is_identity(trained):
    embedder = Embedder.load(trained["batch"], device="cpu")
    identity = embedder.model_identity
    assert isinstance(identity, ModelIdentity)
    assert identity.to_dict() == embedder.identity()
    assert identity.dim == embedder.dim and identity.metric == embedder.metric
    assert identity.preprocessing == Preprocessing(1, 28, 28).to_dict()


def test_embedder_load_takes_a_run_folder_or_onnx_and_names_anything_else(trained, tmp_path):
    embedder = Embedder.load(trained["batch"], device="cpu")
    assert embedder.source == str(trained["batch"])
    with pytest.raises(ValueError, match="does not exist"):
        Embedder.load(tmp_path / "missing")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match=r"neither a run folder nor an \.onnx file"):
        Embedder.load(other)


def test_atomic_writes_leave_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "record.json"
    write_text_atomically(target, "old")

    def fail(partial: Path) -> None:
        partial.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert not list(tmp_path.glob("*.partial"))
