"""Checkpoints survive a kill at any instant: simulated (at every step of a save) and real."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from deepmetric import checkpoints
from deepmetric.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _content(i: int) -> tuple[dict, dict, str]:
    """Model state, nested state and config of version ``i``: every part says ``i``."""
    model = {"w": torch.full((4, 3), float(i)), "b": torch.arange(3.0) + i}
    state = {"i": i, "opt": {0: {"m": torch.full((2,), float(i))}}, "pos": (i, "x"), "n": None}
    return model, state, f"seed: {i}\n"


def _save(run: Path, name: str, i: int, keep: int = 2) -> Path:
    return save_checkpoint(run, name, *_content(i), keep=keep)


def _check(path: Path) -> int:
    """The version in checkpoint ``path``, after checking every part of it agrees."""
    model, state = load_checkpoint(path)
    i = state["i"]
    want_model, want_state, config = _content(i)
    assert model.keys() == want_model.keys()
    assert all(torch.equal(model[k], want_model[k]) for k in model)
    assert torch.equal(state["opt"][0]["m"], want_state["opt"][0]["m"])
    assert state["pos"] == (i, "x") and state["n"] is None
    assert (path / "config.yaml").read_text() == config
    return i


def _version(run: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is allowed after a kill
        return _check(latest_checkpoint(run))


def _entries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


class Killed(BaseException):
    """A simulated kill: a BaseException, so no ``except Exception`` can tidy up after it."""


class KillSwitch:
    """Counts the file-system steps of a save; raises ``Killed`` at step ``kill_at``."""

    def __init__(self) -> None:
        self.calls = 0
        self.kill_at: int | None = None

    def arm(self, n: int) -> None:
        self.calls, self.kill_at = 0, n

    def disarm(self) -> None:
        self.kill_at = None

    def wrap(self, what: str, original):
        def step(*args, **kwargs):
            n, self.calls = self.calls, self.calls + 1
            if n != self.kill_at:
                return original(*args, **kwargs)
            self.kill_at = None
            if what == "rmtree":  # killed half-way through a deletion
                for folder, _, files in os.walk(args[0]):
                    if files:
                        os.unlink(os.path.join(folder, files[0]))
                        break
            elif what == "save_file":  # killed half-way through writing a file
                Path(args[1]).write_bytes(b"\x08\x00\x00")
            raise Killed(f"{what} #{n}")

        return step


@pytest.fixture
def kill_switch(monkeypatch):
    switch = KillSwitch()
    for owner, attr in [
        (os, "rename"),
        (os, "replace"),
        (os, "fsync"),
        (shutil, "rmtree"),
        (checkpoints, "save_file"),
    ]:
        original = getattr(owner, attr)
        if attr == "fsync":  # still a step, but not waited for: durability is tested apart
            original = lambda fd: None  # noqa: E731
        monkeypatch.setattr(owner, attr, switch.wrap(attr, original))
    return switch


E1, E2, E3, E4, E5 = (f"epoch{i:04d}-batch{10 * i:06d}" for i in range(1, 6))


@pytest.mark.parametrize("same_name", [True, False], ids=["same-name", "new-name"])
def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_checkpoint(
    tmp_path, kill_switch, same_name
):
    target = E2 if same_name else E3

    def prepare(run: Path) -> None:
        _save(run, E1, 1)
        _save(run, E2, 2)

    prepare(tmp_path / "count")
    kill_switch.arm(-1)
    _save(tmp_path / "count", target, 3)
    steps = kill_switch.calls
    assert steps >= 12  # 4 files + manifest + folder fsynced, renames, pointer, pruning
    for n in range(steps):
        run = tmp_path / f"kill{n}"
        prepare(run)
        kill_switch.arm(n)
        with pytest.raises(Killed):
            _save(run, target, 3)
        kill_switch.disarm()
        first = _version(run)
        assert first in (2, 3), f"kill at step {n}"
        # Killed again at the same step of the next save (which first cleans up the last one).
        kill_switch.arm(n)
        with contextlib.suppress(Killed):
            _save(run, E4, 4)
        kill_switch.disarm()
        assert _version(run) in (first, 4), f"second kill at step {n}"
        # A clean save removes every leftover and keeps the newest two.
        _save(run, E5, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _check(latest_checkpoint(run)) == 5
        entries = _entries(run)
        assert not [e for e in entries if e.startswith(".")], (n, entries)
        assert entries[-2:] == [E5, "latest"] and len(entries) == 3, (n, entries)


# Imports torch once, then forks a writer per round and SIGKILLs it after a random delay; the
# test checks the folder between rounds (one interpreter start instead of one per kill).
_KILLER = r"""
import os, random, signal, sys, time
import torch
from deepmetric.checkpoints import save_checkpoint

run, rounds = sys.argv[1], int(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
for r in range(rounds):
    pid = os.fork()
    if pid == 0:
        try:
            i = 1000 * (r + 1)
            while True:  # each name is saved twice: same-name and new-name saves alternate
                name = f"epoch{i // 2:06d}-batch000000"
                model = {"w": torch.full((4, 3), float(i)), "b": torch.arange(3.0) + i}
                state = {"i": i, "opt": {0: {"m": torch.full((2,), float(i))}}, "pos": (i, "x"),
                         "n": None}
                save_checkpoint(run, name, model, state, f"seed: {i}\n")
                i += 1
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.05, 0.4))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("killed" if killed else f"writer died by itself: {status}", flush=True)
    sys.stdin.readline()
os._exit(0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_a_real_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    run, rounds = tmp_path / "run", 5
    killer = subprocess.Popen(
        [sys.executable, "-c", _KILLER, str(run), str(rounds), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        previous = 0
        for r in range(rounds):
            assert killer.stdout.readline() == "killed\n", f"round {r}"
            i = _version(run)
            assert previous <= i < 1000 * (r + 2), f"round {r}"
            previous = i
            killer.stdin.write("go\n")
            killer.stdin.flush()
        assert killer.wait(timeout=30) == 0
    finally:
        if killer.poll() is None:
            killer.kill()
            killer.wait()
    assert previous >= 1000  # at least one save completed
    _save(run, "epoch9999-batch000000", 7)
    assert not [e for e in _entries(run) if e.startswith(".")]
    assert _check(latest_checkpoint(run)) == 7


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_every_file_and_folder_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record_rename(src, dst):
        events.append(("rename", f"{os.path.realpath(src)} -> {os.path.realpath(dst)}"))
        return rename(src, dst)

    def record_replace(src, dst):
        events.append(("replace", f"{os.path.realpath(src)} -> {os.path.realpath(dst)}"))
        return replace(src, dst)

    run = tmp_path / "run"
    _save(run, E1, 1)
    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    monkeypatch.setattr(os, "replace", record_replace)
    _save(run, E1, 2)  # same name: the old one goes aside first
    root = os.path.realpath(run / "checkpoints")
    synced = [p for kind, p in events if kind == "fsync"]
    moves = [i for i, (kind, _) in enumerate(events) if kind in ("rename", "replace")]
    assert len(moves) >= 3  # old aside, new in, latest pointer
    publish = next(i for i in moves if events[i][1].endswith(f"/{E1}") and "/.tmp-" in events[i][1])
    tmp = events[publish][1].split(" -> ")[0]
    before = {p for kind, p in events[:publish] if kind == "fsync"}
    names = ["model.safetensors", "state.safetensors", "state.json", "config.yaml", "complete"]
    assert {f"{tmp}/{f}" for f in names} | {tmp} <= before
    for i in moves:  # each rename is followed by an fsync of the folder it happened in
        assert events[i + 1] == ("fsync", root), events[i:]
    pointer = next(i for i in moves if events[i][0] == "replace")
    assert events[pointer - 1] == ("fsync", f"{root}/.latest.tmp")
    assert root in synced
    assert _version(run) == 2


def test_latest_naming_a_missing_or_damaged_folder_falls_back_with_a_warning(tmp_path):
    run = tmp_path / "run"
    _save(run, E1, 1)
    _save(run, E2, 2)
    shutil.rmtree(run / "checkpoints" / E2)
    with pytest.warns(RuntimeWarning, match=rf"names {E2}, which does not exist; falling back"):
        assert latest_checkpoint(run).name == E1
    _save(run, E3, 3)
    (run / "checkpoints" / E3 / "state.safetensors").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"damaged \(state.safetensors has 9 bytes"):
        assert _check(latest_checkpoint(run)) == 1
    (run / "checkpoints" / E1 / "complete").unlink()
    (run / "checkpoints" / E1 / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*state.json missing"):
        latest_checkpoint(run)


def test_a_kill_between_the_renames_of_a_same_name_save_falls_back_to_the_old_folder(tmp_path):
    run = tmp_path / "run"
    _save(run, E1, 1)
    _save(run, E2, 2)
    root = run / "checkpoints"
    os.rename(root / E2, root / f".old-{E2}-0123abcd")  # where the kill leaves it
    with pytest.warns(RuntimeWarning, match="does not exist; falling back"):
        path = latest_checkpoint(run)
    assert path.name == f".old-{E2}-0123abcd" and _check(path) == 2
    _save(run, E3, 3)  # puts the old folder back under its name, then prunes
    assert _entries(run) == [E2, E3, "latest"]
    assert _check(root / E2) == 2 and _version(run) == 3


def test_no_checkpoint_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"latest does not exist; no checkpoint folder"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist or is not a folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_missing_latest_pointer_falls_back_to_the_newest(tmp_path):
    _save(tmp_path, E1, 1)
    _save(tmp_path, E2, 2)
    (tmp_path / "checkpoints" / "latest").unlink()  # a kill before the first pointer write
    with pytest.warns(RuntimeWarning, match="latest does not exist; falling back"):
        assert _check(latest_checkpoint(tmp_path)) == 2


def test_stale_temporary_folders_are_removed_by_the_next_save(tmp_path):
    _save(tmp_path, E1, 1)
    root = tmp_path / "checkpoints"
    for stale in (f".tmp-{E2}-deadbeef", f".del-{E1}-deadbeef", f".old-{E1}-deadbeef"):
        (root / stale).mkdir()
        (root / stale / "model.safetensors").write_bytes(b"half")
    (root / ".latest.tmp").write_text(E2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the leftovers do not disturb loading
        assert _check(latest_checkpoint(tmp_path)) == 1
    _save(tmp_path, E2, 2)
    assert _entries(tmp_path) == [E1, E2, "latest"]


def test_pruning_keeps_the_newest_complete_ones_and_the_one_latest_names(tmp_path):
    for i, name in enumerate([E1, E2, E3, E4], 1):
        _save(tmp_path, name, i)
    assert _entries(tmp_path) == [E3, E4, "latest"]
    (tmp_path / "checkpoints" / "epoch0099-batch000000").mkdir()  # not a checkpoint: left alone
    _save(tmp_path, E5, 5)
    assert _entries(tmp_path) == [E4, E5, "epoch0099-batch000000", "latest"]
    assert _version(tmp_path) == 5
    early = "epoch0000-batch000001"  # sorts first, but latest names it: kept
    _save(tmp_path, early, 6)
    assert _entries(tmp_path) == [early, E4, E5, "epoch0099-batch000000", "latest"]
    _save(tmp_path, E5, 7, keep=1)
    assert _entries(tmp_path) == [E5, "epoch0099-batch000000", "latest"]
    assert _version(tmp_path) == 7
    with pytest.raises(ValueError, match="keep must be at least 1"):
        _save(tmp_path, E5, 8, keep=0)
    for bad in ("", "latest", ".hidden", "../escape", "a/b"):
        with pytest.raises(ValueError, match="checkpoint name"):
            _save(tmp_path, bad, 9)
    assert _version(tmp_path) == 7


class _Payload:
    """Unpickling this creates ``path``: proof that a file was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("file", ["model.safetensors", "state.safetensors"])
def test_a_pickle_in_place_of_safetensors_is_corrupt_and_never_unpickled(tmp_path, file):
    path = _save(tmp_path / "run", E1, 1)
    sentinel = tmp_path / "unpickled"
    torch.save({"w": _Payload(str(sentinel))}, path / file)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is corrupt")):
        load_checkpoint(path)
    assert not sentinel.exists()
    with pytest.raises(CheckpointError, match="damaged"):
        latest_checkpoint(tmp_path / "run")  # the manifest's size no longer matches
    (path / "state.json").write_text('{"__dict__": 5}')
    (path / file).unlink()
    _save(tmp_path / "other", E1, 1)
    shutil.copy(tmp_path / "other" / "checkpoints" / E1 / file, path / file)
    with pytest.raises(CheckpointError, match=r"corrupt: state\.json"):
        load_checkpoint(path)


# ---- files that are not safetensors; checkpoints of another architecture ------------------


def _legacy_pickle(obj: object, file: Path) -> None:
    torch.save(obj, file, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("file", ["model.safetensors", "state.safetensors"])
@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("random bytes", "not a safetensors file"),
        ("torch.save", "a zip archive (the format of torch.save)"),
        ("legacy torch.save", "a Python pickle (the old format of torch.save)"),
        ("empty", "not a safetensors file"),
    ],
)
def test_a_file_that_is_not_safetensors_is_refused_by_name(tmp_path, file, content, words):
    path = _save(tmp_path / "run", E1, 1)
    (path / "complete").unlink()  # as a folder of an older deepmetric: no sizes to compare
    sentinel = tmp_path / "unpickled"
    target = path / file
    if content == "random bytes":
        target.write_bytes(os.urandom(4096))
    elif content == "torch.save":
        torch.save({"w": _Payload(str(sentinel))}, target)
    elif content == "legacy torch.save":
        _legacy_pickle({"w": _Payload(str(sentinel))}, target)
    else:
        target.write_bytes(b"")
    assert latest_checkpoint(tmp_path / "run") == path  # complete by the old rule
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert f"{target} is {words}" in message and "never unpickled" in message, message
    assert "\n" not in message
    assert not sentinel.exists()  # never unpickled


def _net(dim: int) -> torch.nn.Module:
    torch.manual_seed(dim)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, dim))


def test_a_checkpoint_of_another_architecture_names_the_tensors():
    model, other = _net(8), _net(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = other.state_dict()
    with pytest.raises(CheckpointError) as caught:
        checkpoints.load_model_state(model, state, source="runs/x")
    message = str(caught.value)
    assert message.startswith("runs/x does not fit the configured model (Sequential): ")
    assert "2.weight is 32x16 in the checkpoint, 8x16 in the model" in message
    assert "2.bias is 32 in the checkpoint, 8 in the model" in message
    assert "0.weight" not in message and "\n" not in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    # missing and unexpected tensors
    odd = {k: v for k, v in model.state_dict().items() if k != "0.bias"}
    odd["3.weight"] = torch.zeros(2)
    why = checkpoints.state_mismatch(model.state_dict(), odd)
    assert why == "missing from the checkpoint: 0.bias; not in the model: 3.weight"
    # a checkpoint that fits is loaded
    twin = _net(8)
    checkpoints.load_model_state(model, twin.state_dict(), source="runs/x")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in twin.state_dict().items())


@pytest.fixture(scope="module")
def mismatched_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny run (model.dim=16) copied to a run folder whose config says model.dim=32, and
    another copy whose weights file is a torch.save pickle."""
    from synthetic import train_tiny_run, write_learnable_idx

    root = tmp_path_factory.mktemp("mismatch")
    data = write_learnable_idx(root / "toy", n_classes=4, n_train=8, n_test=4)
    run = train_tiny_run(data, root / "run")
    wider = root / "wider"
    shutil.copytree(run, wider)
    config = (wider / "config.yaml").read_text()
    assert "  dim: 16\n" in config
    (wider / "config.yaml").write_text(config.replace("  dim: 16\n", "  dim: 32\n"))
    pickled = root / "pickled"
    shutil.copytree(run, pickled)
    folder = latest_checkpoint(pickled)
    (folder / "complete").unlink()
    torch.save({"w": _Payload(str(root / "unpickled"))}, folder / "model.safetensors")
    image = root / "x.png"
    from PIL import Image

    Image.new("L", (28, 28), 128).save(image)
    return {"root": root, "wider": wider, "pickled": pickled, "image": image}


def _one_line(capsys, argv: list[object]) -> str:
    from deepmetric.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepmetric: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["evaluate", "embed", "train --resume"])
def test_the_command_line_says_what_does_not_fit_in_one_line(mismatched_run, capsys, command):
    wider, image = mismatched_run["wider"], mismatched_run["image"]
    out = mismatched_run["root"] / f"{command.split()[0]}.npy"
    argv = {
        "evaluate": ["evaluate", wider],
        "embed": ["embed", wider, image, "--out", out],
        "train --resume": ["train", "--resume", wider],
    }[command]
    line = _one_line(capsys, argv)
    prefix = "embedding_net." if command == "train --resume" else ""  # joint mode trains a head
    assert f"{wider}/checkpoints/" in line and "does not fit the configured model" in line, line
    assert f"{prefix}fc.weight is 16x256 in the checkpoint, 32x256 in the model" in line, line
    assert "another model.dim" in line and "torch.Size" not in line, line
    line = _one_line(capsys, [mismatched_run["pickled"] if a == wider else a for a in argv])
    assert "model.safetensors is a zip archive" in line and "never unpickled" in line, line
    assert not (mismatched_run["root"] / "unpickled").exists()
    assert not out.exists()


def test_train_resume_of_another_architecture_is_one_line_on_stderr(mismatched_run):
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "--resume", str(mismatched_run["wider"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert "embedding_net.fc.weight is 16x256 in the checkpoint, 32x256 in the model" in line
