"""Training survives what the world does to it: SIGKILL at random instants (some of them inside
a checkpoint write), a full disk, a file size limit and a run folder that turns read-only while
training. Real ``deepmetric train`` processes on a tiny IDX data set the tests write; no mocks.

The kill test checks, after each of its 10 kills, that every checkpoint folder on disk loads and
that ``--resume`` goes on; at the end, that the weights (and the optimiser state) equal bit for
bit those of an uninterrupted run of the same command (CPU, one thread). The disk tests check a
one-line error naming the checkpoint and the cause (exit code 2, no traceback) and that the last
good checkpoint is intact and resumable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import write_learnable_idx

from deepmetric.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from deepmetric.config import load_config
from deepmetric.training import resume_config, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TRAIN = [sys.executable, "-m", "deepmetric", "train"]
#: 4 classes x 8 images, P x K = 2 x 4: an epoch is 4 steps and ends with a checkpoint
#: (3.3 MB of weights + 6.6 MB of optimiser state), so saves are frequent and take a while.
TINY = [
    "train.device=cpu",  # bit-for-bit resumes: the CPU's kernels, whatever GPUs are here
    "mode=batch",
    "model.dim=16",
    "train.p=2",
    "train.k=4",
    "train.val_fraction=0",
    "train.log_every=1",
    "loss.margin=1.0",
    "train.augment=true",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "tiny", n_classes=4, n_train=8)


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` every millisecond until it holds; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def _last_step(log: Path) -> int:
    """The step of the last complete step record in ``log.jsonl`` (0 if none)."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("kind") == "step":
                return record["step"]
    return 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _partial(root: Path) -> set[str]:
    """The entries an interrupted save leaves: ``.tmp-*``, ``.old-*``, ``.del-*``,
    ``.latest.tmp``."""
    return {p.name for p in root.iterdir() if p.name.startswith(".")} if root.is_dir() else set()


def _check_every_checkpoint(run: Path) -> tuple[int, bool]:
    """Every checkpoint folder on disk loads (the complete ones under their names and an
    ``.old-*`` one set aside by a same-name save); ``latest_checkpoint`` gives one that loads.
    Returns its optimiser step and whether it had to fall back (with a warning)."""
    root = run / "checkpoints"
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith((".tmp-", ".del-")):
            model, state = load_checkpoint(folder)
            assert model and state["position"]["step"] > 0, folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = latest_checkpoint(run)
    model, state = load_checkpoint(latest)
    assert set(model) == set(load_file(str(latest / "model.safetensors")))
    return state["position"]["step"], bool(caught)


def _time_a_save(run: Path, scratch: Path) -> float:
    """Seconds one save of the run's latest checkpoint takes here (the fastest of three)."""
    model, state = load_checkpoint(latest_checkpoint(run))
    times = []
    for i in range(3):
        start = time.perf_counter()
        save_checkpoint(scratch, f"timing{i}", model, state, "x: 1\n")
        times.append(time.perf_counter() - start)
    return min(times)


def _final_state(run: Path) -> tuple[dict, dict]:
    return load_checkpoint(latest_checkpoint(run))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in _tensors(v)]
    return []


def _steps(run: Path) -> list[tuple[int, float]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_random_instants_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    epochs = 40
    command = [*TRAIN, f"data=idx:{data}", *TINY, f"epochs={epochs}"]
    # the uninterrupted run, on the other core meanwhile
    full = subprocess.Popen(
        [*command, f"out={tmp_path / 'full'}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    run, rng = tmp_path / "cut", random.Random(20_240_917)
    root, log = run / "checkpoints", run / "log.jsonl"
    kills: list[dict] = []
    save_seconds = 0.015  # measured after the first kill
    started = time.monotonic()
    for i in range(10):
        in_save = i % 2 == 1  # odd kills aim at a checkpoint write; even ones at any instant
        before_tmp, before_log = _partial(root), _inode(log)
        args = [*command, f"out={run}"] if i == 0 else [*TRAIN, "--resume", str(run)]
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if i > 0:  # resumed: wait until it has truncated its log, i.e. it is training
                _wait(lambda old=before_log: _inode(log) != old, proc, "the resume")
            start_step = _last_step(log)
            if in_save:
                _wait(
                    lambda old=before_tmp: any(n.startswith(".tmp-") for n in _partial(root) - old),
                    proc,
                    "a checkpoint write",
                )
                delay = rng.uniform(0, 0.8 * save_seconds)  # inside the save, most likely
            else:  # a random step, then a random instant (the first kill: after a checkpoint)
                target = start_step + rng.randint(5 if i == 0 else 1, 14)
                _wait(lambda t=target: _last_step(log) >= t, proc, f"step {target}")
                delay = rng.uniform(0, 0.05)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()  # killed, not finished
        left = sorted(_partial(root) - before_tmp)
        step, fell_back = _check_every_checkpoint(run)
        assert not kills or step >= kills[-1]["checkpoint_step"]  # never goes back
        if i == 0:
            save_seconds = _time_a_save(run, tmp_path / "timing")
        kills.append(
            {
                "aimed_at_save": in_save,
                "delay": round(delay, 4),
                "leftovers": left,
                "checkpoint_step": step,
                "fallback": fell_back,
            }
        )
    killing = time.monotonic() - started

    resumed = subprocess.run([*TRAIN, "--resume", str(run)], env=ENV, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert full.wait(timeout=120) == 0, full.stderr.read().decode()
    full.stderr.close()

    mid_save = [k for k in kills if k["leftovers"]]
    print(
        f"\n{len(kills)} kills in {killing:.1f} s (a save takes {1000 * save_seconds:.0f} ms); "
        f"{len(mid_save)} left a save half done:"
    )
    for k in kills:
        print("  ", k)
    assert len(mid_save) >= 2, kills  # the kills aimed at saves do land in them
    assert kills[-1]["checkpoint_step"] < 4 * epochs  # the last resume had work left
    (model_a, state_a), (model_b, state_b) = _final_state(tmp_path / "full"), _final_state(run)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "weights differ"
    opt_a, opt_b = _tensors(state_a["optimizer"]), _tensors(state_b["optimizer"])
    assert len(opt_a) == len(opt_b) > 0 and all(map(torch.equal, opt_a, opt_b))
    assert state_a["position"] == state_b["position"]
    # the log has every step once, in order, with the same losses as the uninterrupted run
    assert _steps(run) == _steps(tmp_path / "full")
    assert not _partial(root)  # the final run's saves cleaned every leftover


# ------------------------------------------------------------------------- disk problems


def _first_epoch(data: Path, run: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """Train one epoch into ``run`` (in this process); the weights of its checkpoint."""
    config = load_config(None, [f"data=idx:{data}", f"out={run}", *TINY, "epochs=1", *overrides])
    train(config, stream=None)
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_clear_error(err: str, run_name: str, cause: str) -> None:
    """One error line naming the checkpoint it could not save and why; no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("deepmetric: error:")]
    assert errors == [err.splitlines()[-1]], err
    assert f"cannot save checkpoint {run_name}" in errors[0] and cause in errors[0], err
    assert errors[0].endswith("the checkpoints saved before it are kept"), err


def _assert_kept_and_resumable(run: Path, weights: dict[str, torch.Tensor]) -> None:
    """The last good checkpoint is the one before the failure, bit for bit, with no partial
    folder beside it; resuming from it finishes the run."""
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch0001-batch000000", "latest"]
    kept = load_checkpoint(latest_checkpoint(run))[0]
    assert all(torch.equal(kept[k], weights[k]) for k in weights)
    summary = train(resume_config(run, ["epochs=2"]), resume=True, stream=None)
    assert summary["epochs"] == 2 and latest_checkpoint(run).name == "epoch0002-batch000000"


def _limit_file_size() -> None:  # runs in the child, between fork and exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_file_size_limit_while_saving_is_a_clear_error_and_keeps_the_checkpoint(data, tmp_path):
    """1 MiB per file: the log and config still fit, the 3.3 MB weights file does not."""
    run = tmp_path / "run"
    weights = _first_epoch(data, run)
    child = subprocess.run(
        [*TRAIN, "--resume", str(run), "epochs=2"],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
    )
    assert child.returncode == 2, child.stderr
    _assert_clear_error(child.stderr, f"{run}/checkpoints/epoch0002", "File too large (EFBIG)")
    _assert_kept_and_resumable(run, weights)


def _can_mount(tmp_path: Path) -> str | None:
    """Why mounts cannot be tried here (``None``: they can, in a private mount namespace that
    ends with its process, so no mount is ever left behind)."""
    if not sys.platform.startswith("linux"):
        return "mount namespaces are Linux only"
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("mount")):
        return "needs unshare, nsenter and mount (util-linux)"
    probe = tmp_path / "probe"
    probe.mkdir()
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" && mount --bind -o ro "$1" "$1"'
    tried = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(probe)],
        capture_output=True,
        text=True,
    )
    if tried.returncode != 0:
        return f"mount is not permitted here ({tried.stderr.strip() or tried.returncode})"
    return None


def test_a_full_disk_while_saving_is_a_clear_error_and_keeps_the_checkpoint(data, tmp_path):
    """A real ENOSPC: the run folder on a tmpfs with room for the checkpoint it holds plus
    4 MiB (the next checkpoint needs 10 MB), in a private mount namespace."""
    if why := _can_mount(tmp_path):
        pytest.skip(why)
    run, disk, out = tmp_path / "run", tmp_path / "disk", tmp_path / "after"
    weights = _first_epoch(data, run)
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in run.rglob("*") if p.is_file())
    disk.mkdir()
    script = (
        'mount -t tmpfs -o size="$4" tmpfs "$1" && cp -a "$2" "$1/run" || exit 99; '
        '"$5" -m deepmetric train --resume "$1/run" epochs=2 2> "$3.err"; echo $? > "$3.rc"; '
        'cp -a "$1/run" "$3"'  # what the full disk holds afterwards, copied out
    )
    subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(disk),
            str(run),
            str(out),
            str(used + (4 << 20) + (256 << 10)),
            sys.executable,
        ],
        env=ENV,
        check=True,
    )
    err = Path(f"{out}.err").read_text()
    assert Path(f"{out}.rc").read_text().strip() == "2", err
    _assert_clear_error(err, f"{disk}/run/checkpoints/epoch0002", "No space left on device")
    _assert_kept_and_resumable(out, weights)


def test_tensorboard_events_are_written_by_the_trainer_and_a_failure_is_its_error(tmp_path, capfd):
    """With ``tensorboard`` installed, each record's scalars are in the events file when
    ``RunLog.write`` returns, written by the calling thread from a file held open (torch's
    SummaryWriter wrote from a thread of its own that re-opened the file for every record: when
    the run folder turned read-only that thread died printing a traceback); a write that fails
    (here a real ENOSPC from /dev/full) is an OSError of ``RunLog.write`` naming the file."""
    pytest.importorskip("tensorboard")
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    from deepmetric.training.log import RunLog

    threads = threading.active_count()
    log = RunLog(tmp_path, None)
    try:
        assert threading.active_count() == threads  # no writer thread
        log.write({"kind": "step", "step": 1, "epoch": 0, "loss": 0.5, "lr": 0.25})
        nan = float("nan")
        log.write({"kind": "epoch", "epoch": 1, "step": 4, "val_loss": 0.75, "val_map_at_r": nan})
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()  # read back by TensorBoard's own reader, while the run goes on
        assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(1, 0.5)]
        assert [(e.step, e.value) for e in events.Scalars("epoch/val_loss")] == [(4, 0.75)]
        assert "epoch/val_map_at_r" not in events.Tags()["scalars"]  # not finite: left out
        events_file = log.tensorboard.path
        full = open("/dev/full", "ab")  # noqa: SIM115 - closed by the log
        log.tensorboard._file, log.tensorboard._records = full, RecordWriter(full)
        with pytest.raises(OSError, match=f"cannot write {events_file}: No space left"):
            log.write({"kind": "step", "step": 2, "epoch": 0, "loss": 0.4})
    finally:
        log.close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_run_folder_made_read_only_while_training_is_a_clear_error(data, tmp_path):
    """The run folder turns read-only after the first checkpoint: a read-only bind mount of it
    over itself, made from outside, in the trainer's own mount namespace. (A remount of the
    folder itself is refused by the kernel while ``log.jsonl`` is open for writing; over the
    mount every new open, mkdir and rename in the folder fails with EROFS.)"""
    if why := _can_mount(tmp_path):
        pytest.skip(why)
    run = tmp_path / "run"
    # 20 steps an epoch: the mount is in place long before the second save
    longer = write_learnable_idx(tmp_path / "data", n_classes=4, n_train=40)
    proc = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            *TRAIN,
            f"data=idx:{longer}",
            f"out={run}",
            *TINY,
            "epochs=3",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: (run / "checkpoints" / "latest").exists(), proc, "the first checkpoint")
        weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
        subprocess.run(
            ["nsenter", "-t", str(proc.pid), "-m", "mount", "--bind", "-o", "ro", run, run],
            check=True,
        )
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    _assert_clear_error(err, f"{run}/checkpoints/epoch0002", "Read-only file system (EROFS)")
    _assert_kept_and_resumable(run, weights)
