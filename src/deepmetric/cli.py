"""The ``deepmetric`` command line: ``train``, ``evaluate``, ``embed``, ``verify``, ``export``,
``gallery`` (create / enroll / identify / list / remove / reindex / check / backup),
``serve``, ``demo``, ``demo-oneshot``. Thin: parse, call the API, print; an error is one line
and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _launch(nproc: int, argv: list[str]) -> int:
    """Run ``deepmetric train`` (``argv`` without ``--nproc``) in ``nproc`` local processes
    through ``torch.distributed.run`` (torchrun's engine, a free port on loopback); the exit
    code is the first failed process's (each printed its own error line)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "deepmetric", *argv])
    except ChildFailedError as failed:
        return int(failed.get_first_failure()[1].exitcode) or 1
    except SignalException as stop:  # SIGTERM to this process: passed on to the workers,
        return 128 + int(stop.sigval)  # which stopped at the same batch and saved a checkpoint
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _train(args: argparse.Namespace) -> int:
    from deepmetric import distributed
    from deepmetric.config import load_config
    from deepmetric.training import resume_config, train
    from deepmetric.training.fit import has_checkpoint

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.resume:
        if args.config:
            args.overrides.insert(0, args.config)  # `train --resume DIR epochs=5`
        config = resume_config(args.resume, args.overrides)
    else:
        config_path = args.config
        if config_path is not None and "=" in config_path:  # no file, only overrides
            args.overrides.insert(0, config_path)
            config_path = None
        config = load_config(config_path, args.overrides)
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        if not args.resume and has_checkpoint(config.run_dir):
            raise ValueError(
                f"{config.run_dir} already holds a run: resume it (--resume {config.run_dir}) "
                "or set out=ANOTHER_DIR"
            )
        distributed.on_cuda(config.train.device, args.nproc)  # too few GPUs: one line, here
        return _launch(args.nproc, _without_nproc(args.argv))  # the config was checked above
    if distributed.launched_by_torchrun():
        distributed.init_from_env(config.train.device)
    try:
        main = distributed.is_main()
        summary = train(config, resume=bool(args.resume))
    finally:
        distributed.shutdown()
    if not main:
        return 0
    test = ""
    if "test_precision_at_1" in summary:
        test = f", test precision@1 {summary['test_precision_at_1']:.3f}"
    if "unseen_classes_precision_at_1" in summary:
        test += f" (unseen classes {summary['unseen_classes_precision_at_1']:.3f})"
    print(
        f"done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']} s; "
        f"train loss {summary['train_loss']:.4f}, val precision@1 "
        f"{summary['val_precision_at_1']:.3f} MAP@R {summary['val_map_at_r']:.3f}{test}; "
        f"run in {summary['run_dir']}"
    )
    print(json.dumps(summary))
    return 0


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


def _evaluate(args: argparse.Namespace) -> int:
    from deepmetric.evaluate.run import evaluate_run

    def progress(text: str) -> None:
        print(text, file=sys.stderr)

    m = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        out=args.out,
        embedding_map=not args.no_map,
        device=args.device,
        few_shot=_few_shot_plan(args),
        fars=_fars(args.far),
        progress=progress,
    )
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
    print(_few_shot_line(m))
    print("\n".join(_transfer_lines(m)))
    if "unseen_classes" in m:
        u = m["unseen_classes"]
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
    return 0


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


def _progress(text: str) -> None:
    print(text, file=sys.stderr)


def _embedder(source: str, device: str, *, calibrate: bool) -> Any:
    """An Embedder of a run folder, or of an exported ``.onnx`` file."""
    from deepmetric.inference import Embedder

    path = Path(source)
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        return Embedder.from_onnx(path)
    if not path.is_dir():
        raise ValueError(f"{path}: neither a run folder nor an .onnx file")
    return Embedder.from_run(path, device=device, calibrate=calibrate, progress=_progress)


def _image_files(paths: list[str]) -> list[Path]:
    """Files as given; folders: their image files (by extension), recursively, sorted, hidden
    files and folders left out."""
    from deepmetric.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def _write_atomically(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it to ``path``."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as fh:
            write(fh)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: the embeddings are a .npy file (e.g. emb.npy)")
    files = _image_files(args.inputs)
    embedder = _embedder(args.run_dir, args.device, calibrate=False)
    emb = embedder.embed(files, batch_size=args.batch_size).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, lambda fh: np.save(fh, emb, allow_pickle=False))
    listing = out.with_suffix(".json")
    record = {
        "embeddings": out.name,
        "inputs": [str(f) for f in files],
        "shape": list(emb.shape),
        "model": embedder.identity(),
    }
    _write_atomically(listing, lambda fh: fh.write(json.dumps(record, indent=2).encode()))
    print(
        f"embedded {len(files)} image{'s' * (len(files) != 1)}: {out} ({len(files)} x "
        f"{embedder.dim} float32, "
        f"{embedder.metric}); {listing} lists the inputs in row order"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    for name in (args.a, args.b):
        if not Path(name).is_file():
            raise ValueError(f"{name}: no such file")
    embedder = _embedder(args.run_dir, args.device, calibrate=True)
    result = embedder.verify(args.a, args.b)[0]
    if args.json:
        record = {"a": args.a, "b": args.b, **result._asdict(), "metric": embedder.metric}
        print(json.dumps(record))
    else:
        verdict, sign = ("same", "<=") if result.same else ("different", ">")
        print(
            f"{verdict}: {embedder.metric} distance {result.distance:.4f} {sign} threshold "
            f"{result.threshold:.4f}"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from deepmetric.inference import Embedder, export_onnx

    embedder = Embedder.from_run(args.run_dir, device=args.device, progress=_progress)
    path = export_onnx(embedder, args.out)  # traced on the CPU: the file runs anywhere
    pre = embedder.preprocessing
    shape = f"(N, {', '.join(map(str, pre.shape))})" if pre is not None else "(N, ...)"
    try:
        threshold = f"threshold {embedder.threshold.value:.4f}"
    except ValueError as why:
        threshold = f"no threshold, so the file embeds but cannot verify ({why})"
    print(
        f"wrote {path}: input {shape} float32 -> embedding (N, {embedder.dim}), "
        f"{embedder.metric} distance, {threshold}"
    )
    return 0


# ------------------------------------------------------------------------------ gallery


def _finite(value: float) -> float | None:
    """A distance for JSON: ``None`` for inf (an empty gallery)."""
    return value if value != float("inf") else None


def _shown(text: str) -> str:
    """``text`` for a terminal: characters that are not printable (escape sequences,
    direction overrides, zero-width characters) as Python escapes, never raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _open_gallery(args: argparse.Namespace) -> Any:
    from deepmetric.gallery import Gallery

    embedder = _embedder(args.run, args.device, calibrate=False) if args.run else None
    return Gallery.open(
        args.gallery,
        embedder,
        device=args.device,
        progress=_progress,
        timeout=args.busy_timeout,
    )


def _gallery_create(args: argparse.Namespace) -> int:
    from deepmetric.gallery import Gallery

    if Path(args.gallery).exists():
        raise ValueError(f"{args.gallery} already exists; not overwriting it")
    embedder = _embedder(args.run, args.device, calibrate=args.far is None)
    with Gallery.create(
        args.gallery, embedder, far=args.far, source=args.run, progress=_progress
    ) as gallery:
        t = gallery.threshold
        rule = "best accuracy" if t.far is None else f"false accept rate <= {t.far:g}"
        print(
            f"created {gallery.path} (and {gallery.index_path}/): model {gallery.source} "
            f"({embedder.dim}-d, {embedder.metric}), threshold {t.value:.4f} ({rule}, "
            f"chosen on {t.validation_items or '?'} validation items, not on gallery data)"
        )
    return 0


def _identity_folders(folder: Path) -> list[tuple[str, list[Path]]]:
    """``(name, image files)`` per subfolder of ``folder`` (sorted, hidden ones left out)."""
    from deepmetric.gallery.store import check_name

    if not folder.is_dir():
        raise ValueError(f"--from-dir {folder}: no such folder")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise ValueError(f"--from-dir {folder}: no subfolders (one subfolder per identity)")
    out: list[tuple[str, list[Path]]] = []
    seen: dict[str, Path] = {}
    for sub in subfolders:
        try:
            name = check_name(sub.name)  # in NFC: macOS spells folder names decomposed
        except ValueError as error:
            raise ValueError(f"{sub}: not a valid identity name: {error}") from None
        if name in seen:
            raise ValueError(f"{seen[name]} and {sub} are the same identity name {name!r} (NFC)")
        seen[name] = sub
        out.append((name, _image_files([str(sub)])))
    return out


def _still_to_enroll(
    gallery: Any, todo: list[tuple[str, list[Path]]], folder: str
) -> tuple[list[tuple[str, list[Path]]], int]:
    """``(identities still to enroll, how many were skipped)`` of ``--from-dir``: a name
    already enrolled with exactly the images of its folder (a re-run after a killed enroll)
    is skipped; a name enrolled with other or fewer images is refused, naming it, before
    anything is written (never merged unseen)."""
    left, skipped, clash = [], 0, []
    for name, files in todo:
        if name not in gallery:
            left.append((name, files))
        elif gallery.holds(name, files):
            skipped += 1
            _progress(f"{name!r}: already enrolled with these {len(files)} images, skipped")
        else:
            clash.append(f"{name!r} ({gallery.identity(name).examples} examples)")
    if clash:
        shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise ValueError(
            f"--from-dir {folder}: already enrolled with other images than its folder's: "
            f"{shown}; nothing was enrolled: remove them first (deepmetric gallery remove), "
            "or add images to one by name (deepmetric gallery enroll G IDENTITY FILE...)"
        )
    return left, skipped


def _gallery_enroll(args: argparse.Namespace) -> int:
    if args.from_dir is not None:
        if args.identity is not None:
            raise ValueError("give either IDENTITY FILE... or --from-dir DIR, not both")
        todo = _identity_folders(Path(args.from_dir))  # checked before any work
    else:
        if args.identity is None or not args.files:
            raise ValueError("give IDENTITY FILE... (one or more images) or --from-dir DIR")
        from deepmetric.gallery.store import check_name

        todo = [(check_name(args.identity), _image_files(args.files))]  # NFC, checked first
    with _open_gallery(args) as gallery:
        skipped = 0
        if args.from_dir is not None:  # a re-run after a kill: what is done is not done again
            todo, skipped = _still_to_enroll(gallery, todo, args.from_dir)
        for i, (name, files) in enumerate(todo, 1):
            ids = gallery.enroll(name, files)
            if args.json:
                record = {"identity": name, "examples": ids, "files": [str(f) for f in files]}
                print(json.dumps(record), flush=True)
            elif args.from_dir is None:
                print(f"enrolled {name!r}: {len(ids)} example{'s' * (len(ids) != 1)}")
            if args.from_dir is not None:
                _progress(f"[{i}/{len(todo)}] enrolled {name!r}: {len(ids)} examples")
        if not args.json:
            done = f" ({skipped} already enrolled with the same images, skipped)" if skipped else ""
            print(
                f"{gallery.path}: {len(gallery)} identities, {gallery.num_examples} examples{done}"
            )
    return 0


def _gallery_identify(args: argparse.Namespace) -> int:
    from deepmetric.gallery.gallery import MAX_CANDIDATES

    if not 1 <= args.k <= MAX_CANDIDATES:
        raise ValueError(
            f"--k must be between 1 and {MAX_CANDIDATES} (as the service), got {args.k}"
        )
    files = _image_files(args.files)
    with _open_gallery(args) as gallery:
        results = gallery.identify(files, k=args.k)
    for file, result in zip(files, results):
        candidates = [{"identity": c.identity, "distance": c.distance} for c in result.candidates]
        if args.json:
            record = {
                "input": str(file),
                "identity": result.identity,
                "distance": _finite(result.distance),
                "threshold": result.threshold,
                "candidates": candidates,
            }
            print(json.dumps(record))
            continue
        shown = _shown(str(file))
        others = ", ".join(f"{_shown(c.identity)} {c.distance:.4f}" for c in result.candidates[1:])
        rest = f"; next: {others}" if others else ""
        if result.identity is not None:
            print(
                f"{shown}: {_shown(result.identity)} (distance {result.distance:.4f} <= "
                f"threshold {result.threshold:.4f}){rest}"
            )
        elif not result.candidates:
            print(f"{shown}: unknown (the gallery is empty)")
        else:
            nearest = _shown(result.candidates[0].identity)
            print(
                f"{shown}: unknown (nearest {nearest} at {result.distance:.4f} > threshold "
                f"{result.threshold:.4f}){rest}"
            )
    return 0


def _gallery_list(args: argparse.Namespace) -> int:
    from deepmetric.gallery.store import GalleryStore

    with GalleryStore.open(args.gallery, timeout=args.busy_timeout) as store:  # no model needed
        infos = store.identities()
        meta = store.meta
    if args.json:
        for info in infos:
            record = {
                "identity": info.name,
                "examples": info.examples,
                "metadata": info.metadata,
                "created": info.created,
            }
            print(json.dumps(record))
        return 0
    for info in infos:
        print(f"{_shown(info.name)}\t{info.examples} example{'s' * (info.examples != 1)}")
    threshold = (meta.get("threshold") or {}).get("threshold")
    print(
        f"{args.gallery}: {len(infos)} identities, {sum(i.examples for i in infos)} examples; "
        f"model {meta.get('source')}; {meta.get('dim')}-d {meta.get('metric')}, threshold "
        f"{threshold}"
    )
    return 0


def _gallery_remove(args: argparse.Namespace) -> int:
    with _open_gallery(args) as gallery:
        ids = gallery.remove(args.identity)
        print(
            f"removed {args.identity!r} ({len(ids)} example{'s' * (len(ids) != 1)}); "
            f"{len(gallery)} identities left"
        )
    return 0


def _gallery_reindex(args: argparse.Namespace) -> int:
    with _open_gallery(args) as gallery:
        n = gallery.reindex()
        print(
            f"reindexed {gallery.path}: {n} examples of {len(gallery)} identities "
            f"({gallery.index.kind} index) -> {gallery.index_path}"
        )
    return 0


def _gallery_check(args: argparse.Namespace) -> int:
    """Exit 0: consistent (after the repair, with --repair); 1: problems remain."""
    from deepmetric.gallery.check import Problem, check_gallery

    embedder = _embedder(args.run, args.device, calibrate=False) if args.run else None
    report = check_gallery(args.gallery, repair=args.repair, embedder=embedder, device=args.device)

    def say(problem: Problem, still: str = "") -> None:
        fix = "" if problem.repairable else " (--repair cannot fix this)"
        print(f"{args.gallery}: {still}{problem.kind}: {_shown(problem.message)}{fix}")

    for problem in report.problems:
        say(problem)
    for line in report.repaired:
        print(f"{args.gallery}: repaired: {line}")
    summary = (
        f"{report.identities} identities, {report.examples} examples, generation "
        f"{report.generation}"
    )
    if report.ok:
        after = " after the repair" if report.repaired else ""
        print(f"{args.gallery}: consistent{after} ({summary})")
        return 0
    for problem in report.remaining:
        if problem not in report.problems:  # found by the repair (it could not proceed)
            say(problem)
        elif report.repaired:
            say(problem, "still: ")
    hint = ""
    if not args.repair and any(p.repairable for p in report.problems):
        hint = "; --repair rebuilds the index from the database (the source of truth)"
    print(f"{args.gallery}: {len(report.remaining)} problem(s) ({summary}){hint}")
    return 1


def _gallery_backup(args: argparse.Namespace) -> int:
    from deepmetric.gallery.store import GalleryStore

    with GalleryStore.open(args.gallery, timeout=args.busy_timeout) as store:
        copy = store.backup(args.copy)
        print(
            f"backed up {args.gallery} to {copy} ({store.num_identities} identities, "
            f"{store.num_examples} examples; SQLite online backup, one consistent snapshot)"
        )
    return 0


def _gallery(args: argparse.Namespace) -> int:
    if not 0 <= args.busy_timeout <= 3600:  # NaN too
        raise ValueError(f"--busy-timeout must be in [0, 3600] seconds, got {args.busy_timeout}")
    handlers = {
        "backup": _gallery_backup,
        "check": _gallery_check,
        "create": _gallery_create,
        "enroll": _gallery_enroll,
        "identify": _gallery_identify,
        "list": _gallery_list,
        "remove": _gallery_remove,
        "reindex": _gallery_reindex,
    }
    return handlers[args.gallery_command](args)


def _serve(args: argparse.Namespace) -> int:
    from deepmetric.service.server import serve

    try:
        serve(
            args.run_dir,
            args.gallery,
            host=args.host,
            port=args.port,
            api_key_env=args.api_key_env,
            protect_reads=args.protect_reads,
            max_upload_mb=args.max_upload_mb,
            busy_timeout=args.busy_timeout,
            device=args.device,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
        )
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart"):
            raise
        raise ValueError(
            f"serve needs the serve extra ({error}): pip install 'deepmetric[serve]'"
        ) from None
    return 0


def _demo_oneshot(args: argparse.Namespace) -> int:
    from deepmetric.demo_oneshot import main as oneshot

    oneshot(
        args.overrides,
        run=args.run,
        strangers=args.strangers,
        config=args.config,
        device=args.device,
        enroll=args.enroll,
        stranger_classes=args.stranger_classes,
        enroll_face=args.enroll_face,
        far=args.far,
    )
    return 0


def _import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=[],
        help="import a Python module first (repeatable): the one that registers a run's model "
        "builder with deepmetric.models.register_model (runs trained by deepmetric.fit)",
    )


def _import_modules(names: list[str]) -> None:
    """Import each module named by ``--import`` (from the current folder too), or say why not."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"--import {name}: {error}") from None


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (a damaged latest checkpoint, collapsed embeddings, ...) as one line each on
    stderr, ``deepmetric: warning: MESSAGE``, not Python's ``FILE:LINE: Category: ...`` and
    the source line."""

    def show(message: Any, category: Any, filename: str, lineno: int, file=None, line=None):
        print(f"deepmetric: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepmetric", description="Train, evaluate and try metric-learning models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train an embedding model",
        description="Train from a YAML config plus key=value overrides, e.g. "
        "`deepmetric train configs/fashion_mnist.yaml epochs=2 data=idx:DIR out=runs/x`.",
    )
    train.add_argument("config", nargs="?", help="a YAML file from configs/ (optional)")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=0.01")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train in N local processes (torch.distributed): nccl with one GPU per process "
        "(train.device=cuda, or auto with a GPU for each), else gloo on the CPU; each takes a "
        "slice of every global P x K batch; the result does not depend on N",
    )
    _import_option(train)

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
    _import_option(evaluate)

    device_help = (
        "where a run's network runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N"
    )
    model_help = "a run folder, or an .onnx file written by `deepmetric export`"
    embed = commands.add_parser(
        "embed",
        help="embed image files with a trained model",
        description="Writes the embeddings (N, D) float32 to --out (.npy, no pickle) and, next "
        "to it, a .json of the same name listing the inputs in row order and the model "
        "identity. Folders give their image files, recursively, sorted by path.",
    )
    embed.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    embed.add_argument("inputs", metavar="FILE_OR_DIR", nargs="+")
    embed.add_argument("--out", required=True, help="the .npy file to write")
    embed.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    embed.add_argument("--device", default="auto", help=device_help)
    _import_option(embed)

    verify = commands.add_parser(
        "verify",
        help="are two images of the same kind?",
        description="Same when the distance of their embeddings is <= the run's threshold "
        "(RUN_DIR/threshold.json; when missing, chosen on the run's validation split and "
        "saved). Exit code 0 either way.",
    )
    verify.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    verify.add_argument("a", metavar="A", help="an image file")
    verify.add_argument("b", metavar="B", help="an image file")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument("--device", default="auto", help=device_help)
    _import_option(verify)

    export = commands.add_parser(
        "export",
        help="export a trained model to ONNX",
        description="A self-contained ONNX file: input (N, C, H, W) float32 as preprocessed, "
        "output the embeddings (N, D); the preprocessing, metric, threshold and weights hash "
        "in its metadata. `deepmetric embed` and `verify` take it in place of RUN_DIR.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    export.add_argument(
        "--device",
        default="auto",
        help="where the network chooses a missing threshold on the validation split: auto, "
        "cpu, cuda, cuda:N (the file itself is traced on the CPU and runs anywhere)",
    )
    _import_option(export)

    gallery_help = "the gallery file (SQLite; its index is the folder GALLERY.index)"
    gallery = commands.add_parser(
        "gallery",
        help="enroll identities and identify images (one-shot, open set)",
        description="A gallery file holds enrolled identities (their example embeddings and "
        "thumbnails), the model identity and the open-set threshold; identify answers the "
        "nearest identity when its distance <= the threshold, else unknown.",
    )
    actions = gallery.add_subparsers(dest="gallery_command", required=True)
    run_help = (
        "use this model (a run folder or .onnx file) instead of the one the gallery records; "
        "it must be the same model (same weights hash, preprocessing, dim, metric)"
    )

    def gallery_parser(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=description)
        sub.add_argument("gallery", metavar="GALLERY", help=gallery_help)
        sub.add_argument("--device", default="auto", help=device_help)
        sub.add_argument(
            "--busy-timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="how long a write waits for another process's write lock (default 30)",
        )
        _import_option(sub)
        return sub

    g_create = gallery_parser(
        "create",
        "a new gallery for a trained model",
        "The threshold is the run's (RUN_DIR/threshold.json, chosen on its validation "
        "split), or with --far the largest threshold whose false accept rate on the run's "
        "validation pairs is <= FAR. Never overwrites an existing file.",
    )
    g_create.add_argument("--run", required=True, metavar="RUN_DIR_OR_ONNX", help=model_help)
    g_create.add_argument("--far", type=float, help="false accept rate target, e.g. 1e-3")

    g_enroll = gallery_parser(
        "enroll",
        "enroll images of an identity (or a folder of identities)",
        "Enroll FILE... (files or folders of images) as examples of IDENTITY, or with "
        "--from-dir one identity per subfolder of DIR (named after it): run again (after a "
        "kill), it skips the identities already enrolled with the same images, and refuses, "
        "before writing anything, a name already enrolled with other images.",
    )
    g_enroll.add_argument("identity", metavar="IDENTITY", nargs="?")
    g_enroll.add_argument("files", metavar="FILE", nargs="*")
    g_enroll.add_argument("--from-dir", metavar="DIR", help="one subfolder per identity")
    g_enroll.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=run_help)
    g_enroll.add_argument("--json", action="store_true", help="one JSON object per identity")

    g_identify = gallery_parser(
        "identify",
        "who is in each image? (or unknown)",
        "For each FILE: the nearest enrolled identity when its distance <= the gallery's "
        "threshold, else unknown; and the K nearest identities.",
    )
    g_identify.add_argument("files", metavar="FILE", nargs="+")
    g_identify.add_argument(
        "--k", type=int, default=5, help="candidate identities per file (1 to 100)"
    )
    g_identify.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=run_help)
    g_identify.add_argument("--json", action="store_true", help="one JSON object per file")

    g_list = gallery_parser("list", "the enrolled identities", "Names and example counts.")
    g_list.add_argument("--json", action="store_true", help="one JSON object per identity")

    g_remove = gallery_parser("remove", "remove an identity", "Removes it and its examples.")
    g_remove.add_argument("identity", metavar="IDENTITY")
    g_remove.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=run_help)

    g_backup = gallery_parser(
        "backup",
        "copy the gallery, safely, even while it is in use",
        "Copies GALLERY to the new file COPY with SQLite's online backup: one consistent "
        "snapshot holding every acknowledged enroll and remove, even while the service or "
        "another command writes. Never overwrites COPY. The index is not copied (the copy "
        "rebuilds it when first opened).",
    )
    g_backup.add_argument("copy", metavar="COPY", help="the new file to write")

    g_reindex = gallery_parser(
        "reindex", "rebuild the index", "Rebuilds GALLERY.index from the database."
    )
    g_reindex.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=run_help)

    g_check = gallery_parser(
        "check",
        "does the saved index agree with the database?",
        "Checks the database (SQLite integrity), the model record (and the model itself: "
        "--run, or the recorded source when it loads) and the index GALLERY.index against "
        "the database (ids, count, vectors, tombstones, generation). One line per problem; "
        "exit 0 when consistent, 1 when problems remain. --repair rebuilds the index from "
        "the database, the source of truth.",
    )
    g_check.add_argument(
        "--repair", action="store_true", help="rebuild the index from the database if needed"
    )
    g_check.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=run_help)

    serve = commands.add_parser(
        "serve",
        help="the gallery over HTTP: an API and a web page",
        description="Serve GALLERY (created for RUN_DIR when it does not exist) with one model "
        "in the process: the page at /, the API (JSON, as the CLI's --json) and its docs at "
        "/docs. Binds to loopback unless --host says otherwise. Writes (enroll, remove) need "
        "the X-API-Key header when --api-key-env names a variable holding the key; reads too "
        "with --protect-reads. Ctrl-C stops it (the gallery is closed and its index saved).",
    )
    serve.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    serve.add_argument("--gallery", required=True, metavar="GALLERY", help=gallery_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--busy-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a write waits for another process's write lock before answering 503 "
        "(default 10)",
    )
    serve.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the environment variable holding the API key (the key itself never goes on "
        "the command line)",
    )
    serve.add_argument("--protect-reads", action="store_true", help="reads need the API key too")
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a request's headers must arrive within this, else 408 and the connection is "
        "closed (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a request's whole body must arrive within this after its headers, else 408 and "
        "the connection is closed (default 60)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections at most; more are closed at once (default 1000, fewer when the "
        "process may open fewer files)",
    )
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        default=10.0,
        metavar="MB",
        help="the largest request body, in MiB (default 10); larger uploads get 413",
    )
    serve.add_argument("--device", default="auto", help=device_help)
    _import_option(serve)

    oneshot = commands.add_parser(
        "demo-oneshot",
        help="one-shot identification of classes never trained on",
        description="Train on Fashion-MNIST classes 0-5 (or reuse --run), enroll one test "
        "image of each unseen class, identify the other test images of those classes and "
        "strangers of the seen classes; print the accuracy and acceptance rates and write a "
        "figure into the run folder. key=value overrides go to the training config (e.g. "
        "data=idx:DIR epochs=1).",
    )
    oneshot.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=4")
    oneshot.add_argument("--run", default="runs/oneshot_0to5", help="the run folder")
    oneshot.add_argument(
        "--config",
        help="a YAML config setting train.classes (make demo-oneshot: configs/openset.yaml); "
        "default: the built-in defaults on classes 0-5",
    )
    oneshot.add_argument(
        "--strangers", type=int, default=1000, help="test images of the seen classes to query"
    )
    oneshot.add_argument(
        "--enroll", type=int, help="enroll this many unseen test classes (default: all)"
    )
    oneshot.add_argument(
        "--stranger-classes",
        type=int,
        help="strangers: every image of this many other unseen test classes (for data whose "
        "test classes are all unseen, e.g. the glyph set) instead of --strangers",
    )
    oneshot.add_argument(
        "--enroll-face", help="enroll the image of this face of each class (npz glyph sets)"
    )
    oneshot.add_argument(
        "--far",
        type=float,
        help="the gallery's threshold: the largest whose false accept rate on the run's "
        "validation pairs is at most this (default: the run's threshold)",
    )
    oneshot.add_argument(
        "--device",
        default="auto",
        help="where the network trains (train.device, unless an override sets it) and runs: "
        "auto (CUDA when available, else CPU), cpu, cuda, cuda:N",
    )
    _import_option(oneshot)

    demo = commands.add_parser("demo", help="train a small net with each loss on synthetic data")
    demo.add_argument("--steps", type=int, default=300, help="training steps per loss")
    demo.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # key=value overrides after an option: `train C --nproc 2 a=b`
        args.overrides += [word for word in extra if "=" in word and not word.startswith("-")]
        extra = [word for word in extra if word not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv

    if args.command == "demo":
        from deepmetric.demo import main as demo_main

        demo_main(steps=args.steps, seed=args.seed)
        return 0
    from deepmetric.checkpoints import CheckpointError
    from deepmetric.data import DatasetError
    from deepmetric.gallery.store import GalleryError

    try:
        _import_modules(args.imports)
        if getattr(args, "device", None) is not None:  # every command but train (train.device)
            from deepmetric.training import resolve_device

            resolve_device(args.device)  # CUDA absent, a GPU not here, a typo: one line, now
        handlers = {
            "train": _train,
            "evaluate": _evaluate,
            "embed": _embed,
            "verify": _verify,
            "export": _export,
            "gallery": _gallery,
            "serve": _serve,
            "demo-oneshot": _demo_oneshot,
        }
        with _one_line_warnings():
            return handlers[args.command](args)
    except KeyboardInterrupt as stop:  # Ctrl-C: 130; SIGTERM (a checkpoint was saved): 143
        return 128 + getattr(stop, "signum", 2)
    except (
        ValueError,
        CheckpointError,
        DatasetError,
        FloatingPointError,
        OSError,
        GalleryError,
    ) as error:
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
