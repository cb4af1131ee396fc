"""A self-contained HTML report: the metrics, the per-class table and the figures embedded as
base64 PNG, so the one file opens offline in any browser."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
.big { font-size: 1.3em; font-weight: 600; } .note { color: #666; font-size: 0.9em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """An HTML table: ``header`` cells, then one row per entry of ``rows`` (values formatted
    as the report formats numbers), every text escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_figure(path: Path, caption: str) -> str:
    """The PNG file ``path`` inlined as a base64 ``<figure>`` with its escaped ``caption``."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _headline(metrics: dict[str, Any]) -> str:
    v = metrics["verification"]
    rows = [
        ("precision@1", metrics["precision_at_1"]),
        ("R-precision", metrics["r_precision"]),
        ("MAP@R", metrics["map_at_r"]),
        *((f"recall@{k}", r) for k, r in metrics["recall_at_k"].items()),
        *((f"precision@{k}", r) for k, r in metrics.get("precision_at_k", {}).items() if k != "1"),
        *((f"MAP@{k}", r) for k, r in metrics.get("map_at_k", {}).items()),
        ("NMI (k-means)", metrics["nmi"]),
        ("verification accuracy", v["accuracy"]),
        *(
            (("verification accuracy, 10-fold cross-validated", v["accuracy_cross_validated"]),)
            if "accuracy_cross_validated" in v
            else ()
        ),
        ("ROC AUC", v["roc_auc"]),
        ("EER", v["eer"]),
        *((f"TAR @ FAR {k}", t) for k, t in v["tar_at_far"].items()),
        ("threshold (distance)", v["threshold"]),
    ]
    return html_table(rows, ["metric", "value"])


def _versus_raw(metrics: dict[str, Any]) -> str:
    """The network's retrieval metrics beside the same metrics on the raw inputs (and, when
    evaluated, of the same architecture untrained)."""
    raw = metrics.get("raw_input_baseline")
    if raw is None:
        return ""
    untrained = metrics.get("untrained_network_baseline")  # absent in older metrics.json
    keys = [
        ("precision@1", "precision_at_1"),
        ("R-precision", "r_precision"),
        ("MAP@R", "map_at_r"),
        *((f"recall@{k}", k) for k in metrics["recall_at_k"]),
    ]

    def value(m: dict[str, Any], key: str) -> float:
        return m[key] if key in m else m["recall_at_k"][key]

    rows = [
        (
            name,
            value(metrics, key),
            value(raw, key),
            value(metrics, key) - value(raw, key),
            *((value(untrained, key),) if untrained else ()),
        )
        for name, key in keys
    ]
    header = ["metric", "network", "raw inputs", "difference"]
    notes = [raw["note"]]
    if untrained:
        header.append("untrained network")
        notes.append(f"untrained network: {untrained['note']}")
    return (
        "<h3>The network against the raw inputs</h3>"
        + html_table(rows, header)
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    )


def _few_shot(metrics: dict[str, Any]) -> str:
    """N-way K-shot accuracies with their 95 % intervals, the network beside the raw inputs."""
    raw = metrics.get("raw_input_baseline", {})
    rows = []
    for key in [k for k in metrics if k.endswith("_shot")]:
        for way, r in metrics[key].items():
            if way == "skipped":
                continue
            other = raw.get(key, {}).get(way)
            name = f"all-way ({r['ways']} classes)" if way == "all-way" else way
            rows.append(
                (
                    f"{name} {key.replace('_', '-')}",
                    r["accuracy"],
                    f"± {r['ci95']:.4f}",
                    "" if other is None else other["accuracy"],
                    r["episodes"],
                    r["queries"],
                )
            )
    if not rows:
        return ""
    skipped = [
        f"{way} {key.replace('_', '-')}: {why}"
        for key in metrics
        if key.endswith("_shot")
        for way, why in metrics[key].get("skipped", {}).items()
    ]
    return (
        "<h3>Few-shot episodes (N-way K-shot)</h3>"
        + html_table(
            rows, ["episodes of", "accuracy", "95 % interval", "raw inputs", "episodes", "queries"]
        )
        + "<p class='note'>Each episode draws N classes, K items of each as the support (their "
        "mean is the class prototype) and queries among the others; a query is right when its "
        "own class's prototype is the nearest. Same episodes for the network and the raw "
        "inputs.</p>" + "".join(f"<p class='note'>skipped: {html.escape(s)}</p>" for s in skipped)
    )


def _thresholds(metrics: dict[str, Any]) -> str:
    """The validation threshold at each FAR on these classes, and open-set identification."""
    out = ""
    transfer = metrics.get("threshold_transfer")
    if transfer:
        rows = [
            (
                f"{t['far_asked']:g}",
                t["threshold"],
                f"{t['far_validation']:.2e}",
                f"{t['far_reached']:.2e}",
                "" if t["far_ratio"] is None else f"{t['far_ratio']:.2f}x",
                t["tar_reached"],
                f"{t['resolution']:.1e}",
            )
            for t in transfer.values()
        ]
        header = [
            "FAR asked",
            "threshold",
            "FAR on validation",
            "FAR here",
            "ratio",
            "TAR here",
            "resolution",
        ]
        out += "<h3>Thresholds chosen on the validation classes, measured here</h3>" + html_table(
            rows, header
        )
    open_set = metrics.get("open_set")
    if open_set:
        rows = []
        for o in open_set["at_far"].values():
            v = o.get("validation")
            z = o.get("validation_sized")
            rows.append(
                (
                    f"{o['far_asked']:g}",
                    o["oracle"]["dir"],
                    f"{o['oracle']['far_reached']:.2e}",
                    "" if v is None else v["dir"],
                    "" if v is None else f"{v['far_reached']:.2e}",
                    "" if z is None else z["dir"],
                    "" if z is None else f"{z['far_reached']:.2e}",
                )
            )
        header = [
            "FAR asked",
            "DIR (threshold on these strangers)",
            "FAR reached",
            "DIR (validation threshold)",
            "FAR reached",
            "DIR (validation pairs, sized for this gallery)",
            "FAR reached",
        ]
        out += (
            f"<h3>Open-set identification: {open_set['enrolled']} classes enrolled with one "
            f"item each, {open_set['strangers']} classes of strangers</h3>"
            + html_table(rows, header)
            + f"<p class='note'>closed-set rank-1 {open_set['rank1']:.4f}. "
            f"{html.escape(open_set['protocol'])}</p>"
        )
    return out


def _misses(row: dict[str, Any], class_names: Sequence[str]) -> str:
    other = row.get("confused_with")
    if other is None:
        return "none"
    return f"{_name(other, class_names)} ({100 * row['confused_share']:.0f} %)"


def _name(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def _query_gallery(metrics: dict[str, Any]) -> str:
    """In-Shop's protocol (each query against the gallery), the network beside the raw
    inputs; empty when the evaluation had no query / gallery split."""
    qg = metrics.get("query_gallery")
    if qg is None:
        return ""
    raw = qg["raw_input_baseline"]
    keys = [
        ("precision@1", "precision_at_1"),
        ("R-precision", "r_precision"),
        ("MAP@R", "map_at_r"),
    ]
    rows = [(name, qg[key], raw[key]) for name, key in keys]
    for block, label in (
        ("recall_at_k", "recall"),
        ("precision_at_k", "precision"),
        ("map_at_k", "MAP"),
    ):
        rows += [(f"{label}@{k}", v, raw[block][k]) for k, v in qg[block].items()]
    return (
        f"<h3>Queries against the gallery ({qg['queries_given']:,} queries, "
        f"{qg['gallery']:,} gallery images)</h3>"
        + html_table(rows, ["metric", "network", "raw inputs"])
        + f"<p class='note'>{html.escape(qg['note'])}</p>"
    )


def _by_class_versus_raw(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per class: MAP@R and precision@1 of the network and of the raw inputs, and the class
    that takes most of the R nearest places of the class's queries (empty for older
    metrics.json, which have no per-class retrieval)."""
    raw = metrics.get("raw_input_baseline", {})
    if "by_class" not in metrics or "by_class" not in raw:
        return ""
    rows = [
        (
            _name(n["class"], class_names),
            n["queries"],
            n["map_at_r"],
            r["map_at_r"],
            n["precision_at_1"],
            r["precision_at_1"],
            _misses(n, class_names),
            _misses(r, class_names),
        )
        for n, r in zip(metrics["by_class"], raw["by_class"])
    ]
    header = [
        "class",
        "queries",
        "MAP@R",
        "MAP@R raw",
        "precision@1",
        "precision@1 raw",
        "most confused with (share of the R nearest)",
        "raw: most confused with",
    ]
    return (
        "<h3>Retrieval per class, the network against the raw inputs</h3>"
        + html_table(rows, header)
        + "<p class='note'>A class's R nearest places: for each of its items, the R nearest "
        "other items (R = the class's other items); the share is of all those places.</p>"
    )


def write_report(
    path: str | Path,
    *,
    title: str,
    metrics: dict[str, Any],
    class_names: Sequence[str],
    figures: Sequence[tuple[Path, str]],
    facts: Sequence[tuple[str, str]],
) -> Path:
    """Write ``report.html``: headline metrics, verification protocol, per-class table,
    triplet categories, the unseen-class metrics if any, the figures and the run's facts."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    parts.append(
        f"<p class='big'>precision@1 {metrics['precision_at_1']:.4f} &middot; MAP@R "
        f"{metrics['map_at_r']:.4f} &middot; verification accuracy "
        f"{metrics['verification']['accuracy']:.4f}</p>"
    )
    seen = metrics.get("data", {}).get("classes_seen_in_training")
    classes = metrics.get("data", {}).get("classes")
    if classes is not None:
        parts.append(
            f"<p>{classes} classes scored; "
            + (
                "whether training saw them is unknown (another data set)"
                if seen is None
                else "none of them seen in training"
                if seen == 0
                else f"{seen} of them seen in training"
            )
            + ".</p>"
        )
    parts.append(html_table(facts, ["", ""]))
    parts.append(
        "<h2>Metrics</h2>"
        + _headline(metrics)
        + _versus_raw(metrics)
        + _query_gallery(metrics)
        + _few_shot(metrics)
        + _thresholds(metrics)
        + _by_class_versus_raw(metrics, class_names)
    )
    parts.append(f"<p class='note'>{html.escape(metrics['verification']['protocol'])}</p>")
    if "unseen_classes" in metrics:
        parts.append(
            "<h2>Classes never seen in training</h2>"
            + _headline(metrics["unseen_classes"])
            + _versus_raw(metrics["unseen_classes"])
            + _few_shot(metrics["unseen_classes"])
            + _thresholds(metrics["unseen_classes"])
            + _by_class_versus_raw(metrics["unseen_classes"], class_names)
        )
    cats = metrics["triplet_categories"]
    parts.append(
        "<h2>Triplets of the test set, by difficulty</h2>"
        + html_table(
            [
                ("easy (d_an ≥ d_ap + margin)", cats["easy"]),
                ("semi-hard (d_ap < d_an < d_ap + margin)", cats["semi_hard"]),
                ("hard (d_an ≤ d_ap)", cats["hard"]),
            ],
            ["share of valid triplets", f"margin {cats['margin']}"],
        )
    )
    rows = [
        (
            class_names[r["class"]] if r["class"] < len(class_names) else r["class"],
            r["n"],
            r["triplet_accuracy"],
            r["margin_min"],
            r["margin_max"],
            r["margin_mean"],
            r["verification_accuracy"],
            r["precision_at_1"],
        )
        for r in metrics["per_class"]
    ]
    parts.append(
        "<h2>Per class</h2>"
        + html_table(
            rows,
            [
                "class",
                "items",
                "triplet acc.",
                "min d_ap−d_an",
                "max d_ap−d_an",
                "mean d_ap−d_an",
                "verif. acc.",
                "precision@1",
            ],
        )
    )
    parts.append("<h2>Figures</h2>" + "".join(html_figure(p, c) for p, c in figures))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path
