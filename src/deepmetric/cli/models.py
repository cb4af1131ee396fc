"""The commands on one trained model: ``embed`` (image files to a .npy), ``verify`` (two
images: same or different) and ``export`` (to ONNX)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepmetric.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    image_files,
    import_option,
    load_embedder,
    plural,
)
from deepmetric.files import print_stderr, write_bytes_atomically, write_json_atomically


def add_parser(commands: Any) -> None:
    _add_embed(commands)
    _add_verify(commands)
    _add_export(commands)


# ------------------------------------------------------------------------------ embed


def _add_embed(commands: Any) -> None:
    embed = commands.add_parser(
        "embed",
        help="embed image files with a trained model",
        description="Writes the embeddings (N, D) float32 to --out (.npy, no pickle) and, next "
        "to it, a .json of the same name listing the inputs in row order and the model "
        "identity. Folders give their image files, recursively, sorted by path.",
    )
    embed.add_argument("run_dir", metavar="RUN_DIR", help=MODEL_HELP)
    embed.add_argument("inputs", metavar="FILE_OR_DIR", nargs="+")
    embed.add_argument("--out", required=True, help="the .npy file to write")
    embed.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    embed.add_argument("--device", default="auto", help=DEVICE_HELP)
    import_option(embed)
    embed.set_defaults(handler=embed_files)


def embed_files(args: argparse.Namespace) -> int:
    import numpy as np

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: the embeddings are a .npy file (e.g. emb.npy)")
    files = image_files(args.inputs)
    embedder = load_embedder(args.run_dir, args.device, calibrate=False)
    emb = embedder.embed(files, batch_size=args.batch_size).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out, lambda fh: np.save(fh, emb, allow_pickle=False))
    listing = out.with_suffix(".json")
    record = {
        "embeddings": out.name,
        "inputs": [str(f) for f in files],
        "shape": list(emb.shape),
        "model": embedder.identity(),
    }
    write_json_atomically(listing, record)
    print(
        f"embedded {plural(len(files), 'image')}: {out} ({len(files)} x {embedder.dim} "
        f"float32, {embedder.metric}); {listing} lists the inputs in row order"
    )
    return 0


# ------------------------------------------------------------------------------ verify


def _add_verify(commands: Any) -> None:
    verify = commands.add_parser(
        "verify",
        help="are two images of the same kind?",
        description="Same when the distance of their embeddings is <= the run's threshold "
        "(RUN_DIR/threshold.json; when missing, chosen on the run's validation split and "
        "saved). Exit code 0 either way.",
    )
    verify.add_argument("run_dir", metavar="RUN_DIR", help=MODEL_HELP)
    verify.add_argument("a", metavar="A", help="an image file")
    verify.add_argument("b", metavar="B", help="an image file")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument("--device", default="auto", help=DEVICE_HELP)
    import_option(verify)
    verify.set_defaults(handler=verify_pair)


def verify_pair(args: argparse.Namespace) -> int:
    for name in (args.a, args.b):
        if not Path(name).is_file():
            raise ValueError(f"{name}: no such file")
    embedder = load_embedder(args.run_dir, args.device, calibrate=True)
    result = embedder.verify(args.a, args.b)[0]
    if args.json:
        print(json.dumps(result.to_json(args.a, args.b, embedder.metric)))
    else:
        verdict, sign = ("same", "<=") if result.same else ("different", ">")
        print(
            f"{verdict}: {embedder.metric} distance {result.distance:.4f} {sign} threshold "
            f"{result.threshold:.4f}"
        )
    return 0


# ------------------------------------------------------------------------------ export


def _add_export(commands: Any) -> None:
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
    import_option(export)
    export.set_defaults(handler=export_model)


def export_model(args: argparse.Namespace) -> int:
    from deepmetric.inference import Embedder, export_onnx

    embedder = Embedder.from_run(args.run_dir, device=args.device, progress=print_stderr)
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
