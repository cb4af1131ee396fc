"""Every command README.md shows runs as written, so the README cannot drift from the code.

The ``deepmetric ...`` and ``make ...`` lines of README.md's ```sh blocks (trailing ``# comments``
stripped, ``\\`` continuations joined) are read at test time and run in README order, in one temp
folder holding a link to ``configs/``, so ``configs/...`` and ``runs/...`` work as written and
later commands find the runs made by earlier ones. Each command is its own test. Only these
changes are made, to keep the runs small:

- ``$DEEPMETRIC_DATA`` points at tiny IDX copies of the MNIST family (they win over Debian's
  copy; a proxy that refuses every connection keeps the network out);
- placeholder paths (``/my/mnist``, ...) become tiny data sets, from :data:`PLACEHOLDERS`;
  an unknown placeholder fails its test, naming it;
- the folder holds ``photo1.png`` and ``photo2.png``, the images the ``verify`` examples name
  (:func:`tiny_data.make_photos`);
- ``deepmetric train`` gets ``epochs=1`` appended, ``train --resume`` ``epochs=2``;
- ``make`` runs with ``-C`` the repo, the running venv (not reinstalled) and the arguments of
  :data:`MAKE_ARGS`; an unknown target fails its test;
- the commands of :data:`SKIP` are not run (each with its reason);
- ``deepmetric serve ...`` lines are not run: a server runs until stopped, so it would only
  time out here (``tests/test_service.py`` starts the real server and talks to it).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import tiny_data

from deepmetric.data import load_dataset
from deepmetric.data.datasets import MNIST_FAMILY, fetch_mnist_family

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV = Path(sys.prefix)  # the environment running the tests: its `deepmetric` is tested
TIMEOUT_S = 180  # per command

SKIP = {
    "make test": "it is the command running this test",
    "make bench": "long benchmarks, not tests",
}

# Placeholder path in a README command -> the tiny data set made for it (the spec's format).
PLACEHOLDERS: dict[str, Callable[[Path], Path]] = {
    "/my/mnist": tiny_data.make_idx_dir,  # data=idx:DIR: the four IDX files
    "/photos": tiny_data.make_image_folder,  # --data folder:DIR: train/ and test/ class folders
    "/photos/enroll": tiny_data.make_identity_folders,  # gallery enroll --from-dir: NAME/*.png
    "/my/pairs.csv": tiny_data.make_pairs_csv,  # data=pairs:FILE: a,b,same over images/*.png
    "/my/test_pairs.csv": lambda d: tiny_data.make_pairs_csv(d, pairs=40, seed=7),
    "/my/triplets.csv": tiny_data.make_triplets_csv,  # data=triplets:FILE
}

# `make TARGET` -> the extra make arguments that keep its run small (and its runs in the temp
# folder, given as WORK).
MAKE_ARGS: dict[str, list[str]] = {
    "demo": ["DEMO_RUN=WORK/runs/fashion_mnist_demo", "ARGS=epochs=1"],
    "demo-synthetic": ["ARGS=--steps 5"],
    "data-glyphs": [  # a small latin set where configs/glyphs.yaml looks (its fonts: .ci/run)
        "GLYPH_PRESET=latin",
        "GLYPHS=WORK/data/glyphs-cjk",
        "GLYPH_ARGS=--classes 40 --faces 6 --no-folder",
    ],
    "demo-oneshot": [  # on a small glyph set of the latin preset (its fonts: .ci/run)
        "GLYPH_PRESET=latin",
        "GLYPHS=WORK/glyphs",
        "ONESHOT_RUN=WORK/runs/oneshot_glyphs",
        "ONESHOT_ENROLL=5",
        "ONESHOT_STRANGERS=5",
        "ONESHOT_FACE=dejavu-sans",
        "ARGS=epochs=1",
    ],
}

# A path or an all-capitals word (DIR, FILE) in a command: a placeholder to substitute.
_PLACEHOLDER = re.compile(r"^[/~]|^[A-Z][A-Z0-9_]*$")
_FENCE = re.compile(r"^```(?:sh|bash|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


class Command(NamedTuple):
    text: str  # as written in the README, comment stripped, whitespace normalised
    words: list[str]


class Result(NamedTuple):
    argv: list[str] | None
    returncode: int | None  # None: not run (see output)
    output: str


class NoRuleError(Exception):
    """The README command needs a rule this test does not have yet."""


def readme_commands(text: str) -> list[Command]:
    """The ``deepmetric`` and ``make`` lines of the ```sh blocks of ``text``, in order."""
    commands = []
    for block in _FENCE.finditer(text):
        for line in block.group(1).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("deepmetric", "make"):
                commands.append(Command(" ".join(words), words))
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _substitute(word: str, paths: dict[str, Path], data_root: Path) -> str:
    """``word`` with its placeholder parts (split at ``=`` and ``:``) replaced by tiny data."""
    parts = re.split(r"([=:])", word)
    for i, part in enumerate(parts):
        is_key = i + 1 < len(parts) and parts[i + 1] == "="
        if is_key or not _PLACEHOLDER.search(part):
            continue
        if part not in PLACEHOLDERS:
            raise NoRuleError(
                f"unknown placeholder {part!r} in {word!r}: add it to PLACEHOLDERS in "
                f"{Path(__file__).name} with a tiny data set of the right format"
            )
        if part not in paths:
            slug = re.sub(r"\W+", "_", part).strip("_")
            paths[part] = PLACEHOLDERS[part](data_root / slug)
        parts[i] = str(paths[part])
    return "".join(parts)


def runnable(command: Command, work: Path, paths: dict[str, Path], data_root: Path) -> list[str]:
    """The argv that runs ``command`` small: placeholders substituted, epochs and make args."""
    words = [command.words[0]] + [_substitute(w, paths, data_root) for w in command.words[1:]]
    if words[0] == "deepmetric":
        if words[1:2] == ["train"]:
            words.append("epochs=2" if "--resume" in words else "epochs=1")
        return words
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if len(targets) != 1 or targets[0] not in MAKE_ARGS:
        raise NoRuleError(f"no rule for `{command.text}`: add its target to MAKE_ARGS")
    extra = [arg.replace("WORK", str(work)) for arg in MAKE_ARGS[targets[0]]]
    # The running venv is the installed one: never reinstall it from inside a test.
    venv = [f"VENV={VENV}", "-o", f"{VENV}/.installed"]
    return ["make", "-C", str(ROOT), *venv, *words[1:], *extra]


def _environment(data_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "NO_PROXY")}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["DEEPMETRIC_DATA"] = str(data_home)
    env["MPLBACKEND"] = "Agg"
    refuse = "http://127.0.0.1:9"  # the discard port: any download fails at once
    env.update(http_proxy=refuse, https_proxy=refuse, HTTP_PROXY=refuse, HTTPS_PROXY=refuse)
    env["no_proxy"] = ""
    return env


def _is_server(command: Command) -> bool:
    """``deepmetric serve ...``: runs until stopped, so never run here (see the docstring)."""
    return command.words[:2] == ["deepmetric", "serve"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Result]:
    """Run every README command once, in README order, in one shared temp folder."""
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    tiny_data.make_photos(work)
    data_home = tmp / "deepmetric_data"
    for name in MNIST_FAMILY:
        tiny_data.make_idx_dir(data_home / name)
    env = _environment(data_home)
    paths: dict[str, Path] = {}
    out: dict[int, Result] = {}
    for i, command in enumerate(COMMANDS):
        if command.text in SKIP or _is_server(command):
            continue
        try:
            argv = runnable(command, work, paths, tmp / "placeholders")
        except NoRuleError as error:
            out[i] = Result(None, None, str(error))
            continue
        try:
            done = subprocess.run(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=TIMEOUT_S,
            )
            out[i] = Result(argv, done.returncode, done.stdout)
        except subprocess.TimeoutExpired as error:
            output = error.output or ""
            output = output.decode(errors="replace") if isinstance(output, bytes) else output
            out[i] = Result(argv, None, f"{output}\n[timed out after {TIMEOUT_S} s]")
    return out


def test_readme_has_commands() -> None:
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("deepmetric train") for t in texts), texts
    assert any(t.startswith("deepmetric evaluate") for t in texts), texts


def test_skip_list_names_only_readme_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    fenced = {c.text for c in COMMANDS}
    inline = set(re.findall(r"`([^`\n]+)`", readme))
    stale = [c for c in SKIP if c not in fenced | inline]
    assert not stale, f"SKIP names commands README.md no longer shows: {stale}"


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c.text for c in COMMANDS])
def test_readme_command(index: int, results: dict[int, Result]) -> None:
    command = COMMANDS[index]
    if command.text in SKIP:
        pytest.skip(SKIP[command.text])
    if _is_server(command):
        pytest.skip("a server runs until stopped; tests/test_service.py runs the real one")
    result = results[index]
    if result.argv is None:
        pytest.fail(f"`{command.text}`: {result.output}", pytrace=False)
    if result.returncode != 0:
        tail = "\n".join(result.output.splitlines()[-40:])
        pytest.fail(
            f"`{command.text}` failed\nran: {shlex.join(result.argv)}\n"
            f"exit code: {result.returncode}\nlast 40 lines of output:\n{tail}",
            pytrace=False,
        )


def test_extraction_and_rules(tmp_path: Path) -> None:
    text = (
        "```sh\nmake demo    # comment\ndeepmetric train a.yaml \\\n    epochs=3  # x\n"
        "python other.py\n```\n```python\ndeepmetric = 1\n```\n"
        "```sh\ndeepmetric evaluate runs/x --data idx:/nowhere\nmake clean\n```\n"
    )
    commands = readme_commands(text)
    assert [c.text for c in commands] == [
        "make demo",
        "deepmetric train a.yaml epochs=3",
        "deepmetric evaluate runs/x --data idx:/nowhere",
        "make clean",
    ]
    paths: dict[str, Path] = {}
    assert runnable(commands[1], tmp_path, paths, tmp_path)[-2:] == ["epochs=3", "epochs=1"]
    with pytest.raises(NoRuleError, match="'/nowhere'"):
        runnable(commands[2], tmp_path, paths, tmp_path)
    with pytest.raises(NoRuleError, match="make clean"):
        runnable(commands[3], tmp_path, paths, tmp_path)
    argv = runnable(commands[0], tmp_path, paths, tmp_path)
    assert f"DEMO_RUN={tmp_path}/runs/fashion_mnist_demo" in argv


def test_tiny_data_is_what_the_commands_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $DEEPMETRIC_DATA holding the data set wins over Debian's copy; the files load."""
    tiny_data.make_idx_dir(tmp_path / "fashion-mnist")
    monkeypatch.setenv("DEEPMETRIC_DATA", str(tmp_path))
    assert fetch_mnist_family("fashion-mnist", download=False) == tmp_path / "fashion-mnist"
    test = load_dataset("fashion-mnist", "test", download=False)
    assert tuple(test.x.shape) == (80, 1, 28, 28)
    assert test.y.bincount().tolist() == [8] * 10
