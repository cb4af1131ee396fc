"""The unseen-class figures of several seeds of one recipe, as a markdown table: mean and spread.

``python benchmarks/glyphs_table.py RUN [RUN ...]`` reads each run's ``eval/metrics.json`` (written
by ``deepmetric evaluate RUN``) and prints one row per figure: the mean over the runs, the
standard deviation (n - 1) and every run's value, the raw-pixel and untrained-network rows too
(their episodes and initial weights are drawn with each run's seed). README.md's glyph table
was made from it; it only reads, it never evaluates.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Getter = Callable[[dict[str, Any]], float]


def _at(*keys: str) -> Getter:
    def get(m: dict[str, Any]) -> float:
        for k in keys:
            m = m[k]
        return float(m)  # type: ignore[arg-type]

    return get


ROWS: list[tuple[str, Getter]] = [
    ("precision@1", _at("precision_at_1")),
    ("MAP@R", _at("map_at_r")),
    ("5-way 1-shot", _at("one_shot", "5-way", "accuracy")),
    ("20-way 1-shot", _at("one_shot", "20-way", "accuracy")),
    ("all-way 1-shot", _at("one_shot", "all-way", "accuracy")),
    ("5-way 5-shot", _at("five_shot", "5-way", "accuracy")),
    (
        "FAR reached at 1e-2 (validation threshold)",
        _at("threshold_transfer", "1e-02", "far_reached"),
    ),
    ("TAR there", _at("threshold_transfer", "1e-02", "tar_reached")),
    (
        "FAR reached at 1e-3 (validation threshold)",
        _at("threshold_transfer", "1e-03", "far_reached"),
    ),
    ("TAR there", _at("threshold_transfer", "1e-03", "tar_reached")),
    (
        "open-set DIR at FAR 1e-2 (oracle threshold)",
        _at("open_set", "at_far", "1e-02", "oracle", "dir"),
    ),
    (
        "open-set DIR at FAR 1e-3 (oracle threshold)",
        _at("open_set", "at_far", "1e-03", "oracle", "dir"),
    ),
    (
        "open-set FAR reached at 1e-2 (validation threshold)",
        _at("open_set", "at_far", "1e-02", "validation", "far_reached"),
    ),
    (
        "open-set FAR reached at 1e-3 (validation threshold)",
        _at("open_set", "at_far", "1e-03", "validation", "far_reached"),
    ),
    (
        "open-set FAR reached at 1e-2 (validation pairs, sized for the gallery)",
        _at("open_set", "at_far", "1e-02", "validation_sized", "far_reached"),
    ),
    (
        "open-set DIR there",
        _at("open_set", "at_far", "1e-02", "validation_sized", "dir"),
    ),
    (
        "open-set FAR reached at 1e-3 (validation pairs, sized for the gallery)",
        _at("open_set", "at_far", "1e-03", "validation_sized", "far_reached"),
    ),
    (
        "open-set DIR there",
        _at("open_set", "at_far", "1e-03", "validation_sized", "dir"),
    ),
]

BASELINES: list[tuple[str, Getter]] = [
    ("raw pixels: precision@1", _at("raw_input_baseline", "precision_at_1")),
    ("raw pixels: MAP@R", _at("raw_input_baseline", "map_at_r")),
    ("raw pixels: 20-way 1-shot", _at("raw_input_baseline", "one_shot", "20-way", "accuracy")),
    ("raw pixels: all-way 1-shot", _at("raw_input_baseline", "one_shot", "all-way", "accuracy")),
    ("untrained network: precision@1", _at("untrained_network_baseline", "precision_at_1")),
    ("untrained network: MAP@R", _at("untrained_network_baseline", "map_at_r")),
]


def _fmt(x: float) -> str:
    return f"{x:.2e}" if 0 < abs(x) < 0.05 else f"{x:.4f}"


def table(runs: list[Path]) -> str:
    """The markdown table of ``runs`` (each with ``eval/metrics.json``)."""
    metrics = []
    for run in runs:
        path = run / "eval" / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (run `deepmetric evaluate {run}` first)")
        metrics.append(json.loads(path.read_text()))
    first = metrics[0]["data"]
    lines = [
        f"{first['classes']} test classes, {first['classes_seen_in_training']} seen in training; "
        f"{len(runs)} seeds",
        "",
        "| on the unseen test classes | mean | sd | " + " | ".join(r.name for r in runs) + " |",
        "|---|---|---|" + "---|" * len(runs),
    ]
    for name, get in ROWS + BASELINES:
        values = [get(m) for m in metrics]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " | ".join(_fmt(v) for v in values)
        lines.append(f"| {name} | {_fmt(statistics.fmean(values))} | {_fmt(sd)} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
