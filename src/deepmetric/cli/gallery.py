"""``deepmetric gallery``: create a gallery for a trained model, enroll identities, identify
images (one-shot, open set), list, remove, back up, rebuild and check its index. Each action's
parser is built beside its handler; every action takes GALLERY, ``--device``,
``--busy-timeout`` and ``--import``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepmetric.cli.common import (
    DEVICE_HELP,
    GALLERY_HELP,
    MODEL_HELP,
    image_files,
    import_option,
    load_embedder,
    plural,
    shown,
)
from deepmetric.files import print_stderr

RUN_HELP = (
    "use this model (a run folder or .onnx file) instead of the one the gallery records; "
    "it must be the same model (same weights hash, preprocessing, dim, metric)"
)


def add_parser(commands: Any) -> None:
    gallery = commands.add_parser(
        "gallery",
        help="enroll identities and identify images (one-shot, open set)",
        description="A gallery file holds enrolled identities (their example embeddings and "
        "thumbnails), the model identity and the open-set threshold; identify answers the "
        "nearest identity when its distance <= the threshold, else unknown.",
    )
    gallery.set_defaults(handler=run)
    actions = gallery.add_subparsers(dest="gallery_command", required=True)
    for add in (_add_create, _add_enroll, _add_identify, _add_list, _add_remove, _add_backup):
        add(actions)
    _add_reindex(actions)
    _add_check(actions)


def run(args: argparse.Namespace) -> int:
    """The checks every action shares, then the action."""
    if not 0 <= args.busy_timeout <= 3600:  # NaN too
        raise ValueError(f"--busy-timeout must be in [0, 3600] seconds, got {args.busy_timeout}")
    return args.gallery_handler(args)


def _action(actions: Any, name: str, help_text: str, description: str, handler: Any) -> Any:
    """The parser of one action, with the options every action takes."""
    sub = actions.add_parser(name, help=help_text, description=description)
    sub.add_argument("gallery", metavar="GALLERY", help=GALLERY_HELP)
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
    sub.add_argument(
        "--busy-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a write waits for another process's write lock (default 30)",
    )
    import_option(sub)
    sub.set_defaults(gallery_handler=handler)
    return sub


def _open_gallery(args: argparse.Namespace) -> Any:
    from deepmetric.gallery import Gallery

    embedder = load_embedder(args.run, args.device, calibrate=False) if args.run else None
    return Gallery.open(
        args.gallery,
        embedder,
        device=args.device,
        progress=print_stderr,
        timeout=args.busy_timeout,
    )


# ------------------------------------------------------------------------------ create


def _add_create(actions: Any) -> None:
    sub = _action(
        actions,
        "create",
        "a new gallery for a trained model",
        "The threshold is the run's (RUN_DIR/threshold.json, chosen on its validation "
        "split), or with --far the largest threshold whose false accept rate on the run's "
        "validation pairs is <= FAR. Never overwrites an existing file.",
        create,
    )
    sub.add_argument("--run", required=True, metavar="RUN_DIR_OR_ONNX", help=MODEL_HELP)
    sub.add_argument("--far", type=float, help="false accept rate target, e.g. 1e-3")
    sub.add_argument(
        "--index",
        default="local",
        metavar="SPEC",
        help="where the vectors are searched: local (default: the folder GALLERY.index, "
        "rebuilt from the database when needed), milvus-lite:PATH.db[#COLLECTION] (Milvus "
        "Lite, a local file; the collection named after GALLERY by default) or "
        "milvus://HOST:PORT/COLLECTION (a Milvus server or cluster; its token from the "
        "environment variable DEEPMETRIC_MILVUS_TOKEN). Recorded in the gallery.",
    )


def create(args: argparse.Namespace) -> int:
    from deepmetric.gallery import Gallery
    from deepmetric.gallery.milvus_index import parse_index_spec

    if Path(args.gallery).exists():
        raise ValueError(f"{args.gallery} already exists; not overwriting it")
    external = parse_index_spec(args.index, args.gallery) is not None  # checked before any work
    embedder = load_embedder(args.run, args.device, calibrate=args.far is None)
    with Gallery.create(
        args.gallery,
        embedder,
        far=args.far,
        source=args.run,
        progress=print_stderr,
        index=args.index,
    ) as gallery:
        t = gallery.threshold
        rule = "best accuracy" if t.far is None else f"false accept rate <= {t.far:g}"
        where = gallery.index_location if external else f"{gallery.index_path}/"
        print(
            f"created {gallery.path} (and {where}): model {gallery.source} "
            f"({embedder.dim}-d, {embedder.metric}), threshold {t.value:.4f} ({rule}, "
            f"chosen on {t.validation_items or '?'} validation items, not on gallery data)"
        )
    return 0


# ------------------------------------------------------------------------------ enroll


def _add_enroll(actions: Any) -> None:
    sub = _action(
        actions,
        "enroll",
        "enroll images of an identity (or a folder of identities)",
        "Enroll FILE... (files or folders of images) as examples of IDENTITY, or with "
        "--from-dir one identity per subfolder of DIR (named after it): run again (after a "
        "kill), it skips the identities already enrolled with the same images, and refuses, "
        "before writing anything, a name already enrolled with other images.",
        enroll,
    )
    sub.add_argument("identity", metavar="IDENTITY", nargs="?")
    sub.add_argument("files", metavar="FILE", nargs="*")
    sub.add_argument("--from-dir", metavar="DIR", help="one subfolder per identity")
    sub.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=RUN_HELP)
    sub.add_argument("--json", action="store_true", help="one JSON object per identity")


def enroll(args: argparse.Namespace) -> int:
    todo = _to_enroll(args)  # checked before any work
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
                print(f"enrolled {name!r}: {plural(len(ids), 'example')}")
            if args.from_dir is not None:
                print_stderr(f"[{i}/{len(todo)}] enrolled {name!r}: {len(ids)} examples")
        if not args.json:
            done = f" ({skipped} already enrolled with the same images, skipped)" if skipped else ""
            print(
                f"{gallery.path}: {len(gallery)} identities, {gallery.num_examples} examples{done}"
            )
    return 0


def _to_enroll(args: argparse.Namespace) -> list[tuple[str, list[Path]]]:
    """``(name, image files)`` of ``IDENTITY FILE...`` or of each subfolder of
    ``--from-dir``, the names checked (and in NFC)."""
    if args.from_dir is not None:
        if args.identity is not None:
            raise ValueError("give either IDENTITY FILE... or --from-dir DIR, not both")
        return _identity_folders(Path(args.from_dir))
    if args.identity is None or not args.files:
        raise ValueError("give IDENTITY FILE... (one or more images) or --from-dir DIR")
    from deepmetric.gallery.store import check_name

    return [(check_name(args.identity), image_files(args.files))]


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
        out.append((name, image_files([str(sub)])))
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
            print_stderr(f"{name!r}: already enrolled with these {len(files)} images, skipped")
        else:
            clash.append(f"{name!r} ({gallery.identity(name).examples} examples)")
    if clash:
        listed = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise ValueError(
            f"--from-dir {folder}: already enrolled with other images than its folder's: "
            f"{listed}; nothing was enrolled: remove them first (deepmetric gallery remove), "
            "or add images to one by name (deepmetric gallery enroll G IDENTITY FILE...)"
        )
    return left, skipped


# ------------------------------------------------------------------------------ identify


def _add_identify(actions: Any) -> None:
    sub = _action(
        actions,
        "identify",
        "who is in each image? (or unknown)",
        "For each FILE: the nearest enrolled identity when its distance <= the gallery's "
        "threshold, else unknown; and the K nearest identities.",
        identify,
    )
    sub.add_argument("files", metavar="FILE", nargs="+")
    sub.add_argument("--k", type=int, default=5, help="candidate identities per file (1 to 100)")
    sub.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=RUN_HELP)
    sub.add_argument("--json", action="store_true", help="one JSON object per file")


def identify(args: argparse.Namespace) -> int:
    from deepmetric.gallery.gallery import MAX_CANDIDATES

    if not 1 <= args.k <= MAX_CANDIDATES:
        raise ValueError(
            f"--k must be between 1 and {MAX_CANDIDATES} (as the service), got {args.k}"
        )
    files = image_files(args.files)
    with _open_gallery(args) as gallery:
        results = gallery.identify(files, k=args.k)
    for file, result in zip(files, results):
        if args.json:
            print(json.dumps(result.to_json(str(file))))
        else:
            print(_identification_line(str(file), result))
    return 0


def _identification_line(file: str, result: Any) -> str:
    """``FILE: NAME (distance D <= threshold T); next: ...`` or ``FILE: unknown (...)``."""
    others = ", ".join(f"{shown(c.identity)} {c.distance:.4f}" for c in result.candidates[1:])
    rest = f"; next: {others}" if others else ""
    if result.identity is not None:
        return (
            f"{shown(file)}: {shown(result.identity)} (distance {result.distance:.4f} <= "
            f"threshold {result.threshold:.4f}){rest}"
        )
    if not result.candidates:
        return f"{shown(file)}: unknown (the gallery is empty)"
    nearest = shown(result.candidates[0].identity)
    return (
        f"{shown(file)}: unknown (nearest {nearest} at {result.distance:.4f} > threshold "
        f"{result.threshold:.4f}){rest}"
    )


# ------------------------------------------------------------------------------ list, remove


def _add_list(actions: Any) -> None:
    sub = _action(actions, "list", "the enrolled identities", "Names and example counts.", listing)
    sub.add_argument("--json", action="store_true", help="one JSON object per identity")


def listing(args: argparse.Namespace) -> int:
    from deepmetric.gallery.store import GalleryStore

    with GalleryStore.open(args.gallery, timeout=args.busy_timeout) as store:  # no model needed
        infos = store.identities()
        meta = store.meta
    if args.json:
        for info in infos:
            print(json.dumps(info.to_json()))
        return 0
    for info in infos:
        print(f"{shown(info.name)}\t{plural(info.examples, 'example')}")
    threshold = (meta.get("threshold") or {}).get("threshold")
    print(
        f"{args.gallery}: {len(infos)} identities, {sum(i.examples for i in infos)} examples; "
        f"model {meta.get('source')}; {meta.get('dim')}-d {meta.get('metric')}, threshold "
        f"{threshold}"
    )
    return 0


def _add_remove(actions: Any) -> None:
    sub = _action(actions, "remove", "remove an identity", "Removes it and its examples.", remove)
    sub.add_argument("identity", metavar="IDENTITY")
    sub.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=RUN_HELP)


def remove(args: argparse.Namespace) -> int:
    with _open_gallery(args) as gallery:
        ids = gallery.remove(args.identity)
        print(
            f"removed {args.identity!r} ({plural(len(ids), 'example')}); "
            f"{len(gallery)} identities left"
        )
    return 0


# ------------------------------------------------------------------------------ backup


def _add_backup(actions: Any) -> None:
    sub = _action(
        actions,
        "backup",
        "copy the gallery, safely, even while it is in use",
        "Copies GALLERY to the new file COPY with SQLite's online backup: one consistent "
        "snapshot holding every acknowledged enroll and remove, even while the service or "
        "another command writes. Never overwrites COPY. The index is not copied (the copy "
        "rebuilds it when first opened).",
        backup,
    )
    sub.add_argument("copy", metavar="COPY", help="the new file to write")


def backup(args: argparse.Namespace) -> int:
    from deepmetric.gallery.store import GalleryStore

    with GalleryStore.open(args.gallery, timeout=args.busy_timeout) as store:
        copy = store.backup(args.copy)
        print(
            f"backed up {args.gallery} to {copy} ({store.num_identities} identities, "
            f"{store.num_examples} examples; SQLite online backup, one consistent snapshot)"
        )
    return 0


# ------------------------------------------------------------------------------ index


def _add_reindex(actions: Any) -> None:
    sub = _action(
        actions,
        "reindex",
        "rebuild the index",
        "Rebuilds GALLERY.index from the database.",
        reindex,
    )
    sub.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=RUN_HELP)


def reindex(args: argparse.Namespace) -> int:
    with _open_gallery(args) as gallery:
        n = gallery.reindex()
        print(
            f"reindexed {gallery.path}: {n} examples of {len(gallery)} identities "
            f"({gallery.index.kind} index) -> {gallery.index_location}"
        )
    return 0


def _add_check(actions: Any) -> None:
    sub = _action(
        actions,
        "check",
        "does the saved index agree with the database?",
        "Checks the database (SQLite integrity), the model record (and the model itself: "
        "--run, or the recorded source when it loads) and the index GALLERY.index against "
        "the database (ids, count, vectors, tombstones, generation). One line per problem; "
        "exit 0 when consistent, 1 when problems remain. --repair rebuilds the index from "
        "the database, the source of truth.",
        check,
    )
    sub.add_argument(
        "--repair", action="store_true", help="rebuild the index from the database if needed"
    )
    sub.add_argument("--run", metavar="RUN_DIR_OR_ONNX", help=RUN_HELP)


def check(args: argparse.Namespace) -> int:
    """Exit 0: consistent (after the repair, with --repair); 1: problems remain."""
    from deepmetric.gallery.check import Problem, check_gallery

    embedder = load_embedder(args.run, args.device, calibrate=False) if args.run else None
    report = check_gallery(args.gallery, repair=args.repair, embedder=embedder, device=args.device)

    def say(problem: Problem, still: str = "") -> None:
        fix = "" if problem.repairable else " (--repair cannot fix this)"
        print(f"{args.gallery}: {still}{problem.kind}: {shown(problem.message)}{fix}")

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
