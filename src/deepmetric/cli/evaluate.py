"""``deepmetric evaluate``: metrics, figures and an HTML report of a trained run, and the
lines that sum them up on stdout."""

from __future__ import annotations

import argparse
from typing import Any

from deepmetric.cli.common import import_option
from deepmetric.files import print_stderr


def add_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="metrics, figures and an HTML report of a trained run",
        description="Writes metrics.json, report.html and the figures to RUN_DIR/eval (or "
        "--out, and nothing outside it). The verification threshold is chosen on the run's "
        "validation split and then saved as RUN_DIR/threshold.json (not with --out); with "
        "--data or no validation split, the pairs are scored by 10-fold cross-validation and "
        "no threshold is saved.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", help="another data set spec (default: the run's own)")
    evaluate.add_argument(
        "--split",
        default="test",
        choices=["train", "test"],
        help="split to score (train: without the run's validation items)",
    )
    evaluate.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    evaluate.add_argument("--no-map", action="store_true", help="skip the 2-D embedding map")
    evaluate.add_argument(
        "--ways",
        help="N-way few-shot episodes on the scored classes, e.g. 5,20,all (default 5,20,all; "
        "all-way is 1-shot only); a way the classes cannot give is an error",
    )
    evaluate.add_argument("--shots", help="K-shot of the episodes, e.g. 1,5 (default 1,5)")
    evaluate.add_argument(
        "--episodes", help="episodes of each numbered N-way K-shot (default 1000)"
    )
    evaluate.add_argument(
        "--far",
        default="1e-2,1e-3",
        help="false accept rates at which the validation threshold's transfer and the open-set "
        "identification rate (DIR@FAR) are reported (default 1e-2,1e-3)",
    )
    evaluate.add_argument(
        "--device",
        default="auto",
        help="where the network runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:1 "
        "(the run's train.device is not used)",
    )
    import_option(evaluate)
    evaluate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from deepmetric.evaluate.run import evaluate_run

    m = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        out=args.out,
        embedding_map=not args.no_map,
        device=args.device,
        few_shot=_few_shot_plan(args),
        fars=_fars(args.far),
        progress=print_stderr,
    )
    if "tuples" in m:  # fixed pairs / triplets: no classes
        print(_tuples_line(m))
        return 0
    _print_scores(m)
    if "unseen_classes" in m:
        _print_unseen(m, m["unseen_classes"])
    return 0


def _print_scores(m: dict[str, Any]) -> None:
    """The classes scored, the retrieval and verification scores, the baselines, the
    few-shot accuracies and the threshold transfer."""
    d = m["data"]
    seen = d.get("classes_seen_in_training")
    print(
        f"{d['classes']} classes scored, "
        + (
            "seen in training: unknown (another data set)"
            if seen is None
            else "none seen in training"
            if seen == 0
            else f"{seen} of them seen in training"
        )
    )
    v = m["verification"]
    print(
        f"precision@1 {m['precision_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  "
        f"R-precision {m['r_precision']:.4f}  NMI {m['nmi']:.4f}  verification accuracy "
        f"{v['accuracy']:.4f} (threshold {v['threshold']:.4f}, {v['threshold_source']})  "
        f"ROC AUC {v['roc_auc']:.4f}  EER {v['eer']:.4f}  [{m['seconds']} s]"
    )
    raw, rand = m["raw_input_baseline"], m["untrained_network_baseline"]
    print(
        f"raw inputs (no network): precision@1 {raw['precision_at_1']:.4f}  "
        f"MAP@R {raw['map_at_r']:.4f}; untrained network: precision@1 "
        f"{rand['precision_at_1']:.4f}  MAP@R {rand['map_at_r']:.4f}"
    )
    if "query_gallery" in m:
        print(_query_gallery_line(m["query_gallery"]))
    print(_few_shot_line(m))
    print("\n".join(_transfer_lines(m)))


def _query_gallery_line(qg: dict[str, Any]) -> str:
    """In-Shop's protocol: each query against the gallery, with the raw inputs beside."""
    raw = qg["raw_input_baseline"]
    recall = " ".join(f"R@{k} {v:.4f}" for k, v in qg["recall_at_k"].items())
    return (
        f"queries against the gallery ({qg['queries_given']:,} queries, {qg['gallery']:,} "
        f"gallery images): precision@1 {qg['precision_at_1']:.4f}  MAP@R {qg['map_at_r']:.4f}"
        f"  {recall}  (raw inputs: precision@1 {raw['precision_at_1']:.4f}  MAP@R "
        f"{raw['map_at_r']:.4f})"
    )


def _tuples_line(m: dict[str, Any]) -> str:
    """The scores on fixed pairs or triplets, the raw pixels' beside."""
    t, raw = m["tuples"], m["raw_input_baseline"]
    if t["kind"] == "triplets":
        return (
            f"{t['count']:,} triplets: d(a,p) < d(a,n) for {m['triplets']['accuracy']:.4f} of them "
            f"(raw pixels {raw['accuracy']:.4f})  [{m['seconds']} s]"
        )
    v = m["verification"]
    tar = "".join(f"  TAR@FAR {k} {x:.4f}" for k, x in v["tar_at_far"].items())
    return (
        f"{t['count']:,} pairs ({t['positive']:,} same): verification accuracy {v['accuracy']:.4f} "
        f"(threshold {v['threshold']:.4f}, {v['threshold_source']})  ROC AUC {v['roc_auc']:.4f}  "
        f"EER {v['eer']:.4f}{tar}  (raw pixels: accuracy {raw['accuracy']:.4f}  ROC AUC "
        f"{raw['roc_auc']:.4f})  [{m['seconds']} s]"
    )


def _print_unseen(m: dict[str, Any], u: dict[str, Any]) -> None:
    """The same for the classes never trained on (``u``), and per class with ``by_class``."""
    ur, uu = u["raw_input_baseline"], u["untrained_network_baseline"]
    print(
        f"unseen classes: precision@1 {u['precision_at_1']:.4f}  MAP@R {u['map_at_r']:.4f}"
        f"  (raw inputs: precision@1 {ur['precision_at_1']:.4f}  MAP@R {ur['map_at_r']:.4f}"
        f"; untrained network: precision@1 {uu['precision_at_1']:.4f}  MAP@R "
        f"{uu['map_at_r']:.4f})"
    )
    uv = u["verification"]
    cv = uv.get("accuracy_cross_validated")
    print(
        f"  verification accuracy {uv['accuracy']:.4f} (threshold {uv['threshold']:.4f}, "
        f"{uv['threshold_source']})"
        + (f", 10-fold cross-validated on these pairs {cv:.4f}" if cv is not None else "")
        + f"  ROC AUC {uv['roc_auc']:.4f}  EER {uv['eer']:.4f}"
    )
    print("  " + _few_shot_line(u))
    print("\n".join(_transfer_lines(u)))
    if "by_class" in u:
        print("  per class, MAP@R (raw inputs): " + _by_class_line(m, u))


def _few_shot_plan(args: argparse.Namespace) -> Any:
    """The ``--ways/--shots/--episodes`` of ``deepmetric evaluate`` as a FewShotPlan (the
    defaults when none is given; ways that are given must be possible on the data)."""
    from deepmetric.evaluate.fewshot import FewShotPlan, parse_counts, parse_ways

    plan = FewShotPlan()
    if args.ways is not None:
        plan = plan._replace(ways=parse_ways(args.ways), explicit=True)
    if args.shots is not None:
        plan = plan._replace(shots=parse_counts(args.shots, "--shots"))
    if args.episodes is not None:
        (episodes,) = parse_counts(args.episodes, "--episodes")
        plan = plan._replace(episodes=episodes)
    return plan


def _fars(text: str) -> tuple[float, ...]:
    """``"1e-2,1e-3"`` -> ``(0.01, 0.001)``; a one-line ValueError otherwise."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--far takes rates in (0, 1), got {part.strip()!r}") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"--far takes rates in (0, 1), got {part.strip()}")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _few_shot_line(block: dict[str, Any]) -> str:
    """``one-shot: 5-way 0.998 ± 0.001 (raw 0.912), 20-way ...; five-shot: ...`` of a metrics
    block (the network's few-shot accuracies, the raw inputs' in brackets)."""
    from deepmetric.evaluate.fewshot import shot_key

    raw = block.get("raw_input_baseline", {})
    parts = []
    for shots in range(1, 11):
        key = shot_key(shots)
        if key not in block:
            continue
        runs = [k for k in block[key] if k != "skipped"]
        if not runs:
            continue
        cells = []
        for way in runs:
            r = block[key][way]
            name = f"all-way ({r['ways']})" if way == "all-way" else way
            cell = f"{name} {r['accuracy']:.3f} ± {r['ci95']:.3f}"
            if way in raw.get(key, {}):
                cell += f" (raw {raw[key][way]['accuracy']:.3f})"
            cells.append(cell)
        parts.append(f"{key.replace('_', '-')}: " + ", ".join(cells))
    return "; ".join(parts)


def _transfer_lines(block: dict[str, Any]) -> list[str]:
    """One line per FAR: the validation threshold's FAR and TAR on these classes, and the
    open-set identification rate (DIR) at that FAR."""
    lines = []
    transfer = block.get("threshold_transfer", {})
    open_set = block.get("open_set", {})
    for key in dict.fromkeys([*transfer, *open_set.get("at_far", {})]):
        text = f"FAR {float(key):g}:"
        if key in transfer:
            t = transfer[key]
            ratio = t["far_ratio"]
            text += (
                f" validation threshold {t['threshold']:.4f} reaches FAR {t['far_reached']:.2e}"
                f" here ({ratio:.2f}x the asked) at TAR {t['tar_reached']:.4f};"
            )
        if key in open_set.get("at_far", {}):
            o = open_set["at_far"][key]
            text += f" open-set DIR {o['oracle']['dir']:.4f}"
            if "validation" in o:
                v = o["validation"]
                text += f" (validation threshold: DIR {v['dir']:.4f} at FAR {v['far_reached']:.2e}"
                if "validation_sized" in o:
                    z = o["validation_sized"]
                    text += (
                        f"; sized for {z['enrolled']} enrolled: DIR {z['dir']:.4f}"
                        f" at FAR {z['far_reached']:.2e}"
                    )
                text += ")"
            text += f", {open_set['enrolled']} enrolled, {open_set['strangers']} strangers"
        lines.append("  " + text)
    return lines


def _by_class_line(m: dict[str, Any], block: dict[str, Any]) -> str:
    """``Shirt 0.487 (0.709), most confused with Bag 39 %; ...`` for a metrics block."""
    names = m.get("data", {}).get("class_names", [])

    def name(label: int) -> str:
        return str(names[label]) if 0 <= label < len(names) else str(label)

    parts = []
    for n, r in zip(block["by_class"], block["raw_input_baseline"]["by_class"]):
        text = f"{name(n['class'])} {n['map_at_r']:.3f} ({r['map_at_r']:.3f})"
        if n["confused_with"] is not None:
            text += f", most confused with {name(n['confused_with'])}"
            text += f" {100 * n['confused_share']:.0f} %"
        parts.append(text)
    return "; ".join(parts)
