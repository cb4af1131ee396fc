"""The examples and the demo run and learn something (they are what a new user runs first)."""

import importlib.util
from pathlib import Path

from deepmetric.cli import main as cli_main
from deepmetric.demo import main as demo_main

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_siamese_ranking_example_learns_the_order():
    before, after = _load(ROOT / "examples" / "siamese_ranking.py").main(steps=300)
    assert before < 0.7 < 0.9 < after


def test_demo_beats_raw_inputs_on_unseen_classes(capsys):
    results = demo_main(steps=150)
    raw = float(capsys.readouterr().out.split("raw 32-d inputs: ")[1].split()[0])
    assert raw < 0.5
    assert all(p1 > raw + 0.3 for p1 in results.values()), results


def test_cli_runs_the_demo(capsys):
    assert cli_main(["demo", "--steps", "5"]) == 0
    assert "lifted structured" in capsys.readouterr().out
