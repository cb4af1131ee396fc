"""Inference speed of a trained run: embedding, verification, identification at scale.

    python benchmarks/inference.py                               # runs/fashion_mnist_demo, N = 1M
    python benchmarks/inference.py runs/mine --n 20000 --repeats 3   # a quick run
    python benchmarks/inference.py --hnsw-max-n 200000           # HNSW on 200,000 of the N rows
    python benchmarks/inference.py --skip embed store --n 500000 # identification only

Everything runs on ``--threads`` threads (default 2): ``torch.set_num_threads``,
``faiss.omp_set_num_threads`` and, for the onnxruntime session this script builds,
``SessionOptions.intra_op_num_threads`` (``inter_op_num_threads = 1``).
``Embedder.from_onnx`` takes no thread setting (onnxruntime's defaults: ``intra_op_num_threads
= 0``, i.e. onnxruntime's own choice), so it is timed as it is, in a row of its own.

Every figure is ``time.perf_counter`` around exactly the work named, one warm-up call, then
the median of ``--repeats`` runs; each row prints the items per run, the median seconds of a
run and items / seconds.

1. **Embedding** (images/s), the run's model and its ONNX export (``export_onnx`` to a
   temporary file), on ``--images`` Fashion-MNIST test images (random images when the test
   split is not on this machine), batch 1 and batch 256:

   - *model only*: ``Embedder.embed(x, batch_size=B)`` on the already preprocessed float32
     tensor ``x`` (N, 1, 28, 28): the tensor check (shape, ``isfinite``) plus the forward
     (torch: ``inference_mode``; onnxruntime: ``session.run``), nothing else;
   - *PNG end to end*: ``Embedder.embed(paths, batch_size=B)`` on PNG files written to a
     temporary folder beforehand (so they are in the page cache: no disk reads): file open,
     PNG decode, preprocessing (convert, resize, scale) and the forward.

2. **Verification** (pairs/s): ``Embedder.verify(a, b)`` on two PNG files per call (two
   embeddings of batch 1 and one distance), on ``--pairs-e2e`` lists of pairs per call
   (batched: embeds both lists in batches of 256); and *from cached embeddings*:
   ``deepmetric.distances.paired(ea, eb, metric) <= threshold`` over ``--pairs`` pairs of
   precomputed embeddings in one call, and one pair per call.

3. **Identification** against N random L2-normalised D-dim enrolled embeddings (one identity
   each; metric = the run's): ``index.search(queries, k)`` with k = ``--k`` (default 20: the
   example hits ``Gallery.identify(k=5)`` fetches first, see ``top_identities``), batch q/s
   on a batch of queries in one call, and 1-query latency (median over ``--single`` queries).
   *probe* queries are enrolled embeddings + Gaussian noise (sigma 0.5 / sqrt(D) per
   coordinate, renormalised: cosine ~0.89 to their source; a new photo of an enrolled
   person); *strangers* are fresh random vectors (nobody enrolled). recall@1: the HNSW top
   hit is the exact top hit (faiss flat on the same rows). HNSW uses the defaults of
   ``deepmetric.gallery.index`` (``HNSW_M``, ``HNSW_EF_CONSTRUCTION``) and sweeps efSearch;
   its build (``index.add`` of all rows in one call) is timed once. Above ``--hnsw-max-n``
   rows, HNSW is built on the first ``--hnsw-max-n`` rows only (the table says so: a 1M
   build takes > 10 min on 2 cores) and its probes come from those rows.

4. **Enroll** into a ``GalleryStore`` (SQLite, WAL, synchronous=FULL): N rows in calls of
   ``--batch`` rows (one transaction and one identity per call: ``GalleryStore.add`` adds
   the rows of one identity), then ``--single`` single-row enrolls (one new identity each)
   into the full store; ``all_embeddings()`` of every row (what an index rebuild reads);
   file size (db + WAL); RSS.

The machine facts (CPU model, torch / onnxruntime / faiss versions, threads) and the load
average at the start and end are printed with the tables: on a shared machine the numbers
mean little without them.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.distances import paired
from deepmetric.gallery.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    ExactIndex,
    FaissIndex,
    GalleryIndex,
    faiss_available,
)
from deepmetric.gallery.store import GalleryStore
from deepmetric.inference import Embedder, export_onnx
from deepmetric.inference.export import INPUT, OUTPUT


def _log(text: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    """One warm-up call, then the median seconds of ``repeats`` calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(label: str, items: int, seconds: float, unit_extra: str = "") -> str:
    extra = f" | {unit_extra}" if unit_extra else ""
    return f"| {label} | {items:,} | {seconds:.4f} | {items / seconds:,.0f}{extra} |"


# --------------------------------------------------------------------------- 1. embedding


def _test_images(count: int) -> tuple[np.ndarray, str]:
    """``count`` uint8 (H, W) images: the Fashion-MNIST test split, else random pixels."""
    try:
        from deepmetric.data import load_dataset

        ds = load_dataset("fashion-mnist", "test", download=False)
        x = (ds.x[:count, 0] * 255).round().to(torch.uint8).numpy()
        if x.shape[0] == count:
            return x, f"the first {count:,} Fashion-MNIST test images"
    except (OSError, ValueError) as error:
        _log(f"Fashion-MNIST test split not available ({error}): random images instead")
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), f"{count:,} random images"


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_embedder(base: Embedder, path: Path, threads: int) -> Embedder:
    """``Embedder.from_onnx(path)`` as built by ``load_onnx`` (same forward, metadata from
    the export), but over a session with ``threads`` intra-op threads."""
    session = _ort_session(path, threads)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.numpy(), np.float32)})
        return torch.from_numpy(out[0])

    ident = base.identity()
    return Embedder(
        forward=forward,
        preprocessing=base.preprocessing,
        metric=base.metric,
        dim=base.dim,
        weights_sha256=ident["weights_sha256"],
        threshold=base.threshold,
        source=str(path),
    )


def run_embedding(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Embedder], list[str]]:
    _log(f"loading {args.run_dir}")
    model = Embedder.from_run(args.run_dir, device="cpu")
    onnx_path = tmp / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, onnx_path)
    export_s = time.perf_counter() - start
    engines = {
        "torch": model,
        f"onnxruntime, intra_op={args.threads}": _ort_embedder(model, onnx_path, args.threads),
        "onnxruntime, Embedder.from_onnx (default threads)": Embedder.from_onnx(onnx_path),
    }
    pixels, what = _test_images(args.images)
    png_dir = tmp / "png"
    png_dir.mkdir()
    from PIL import Image

    paths = []
    for i, image in enumerate(pixels):
        path = png_dir / f"{i:05d}.png"
        Image.fromarray(image, "L").save(path)
        paths.append(str(path))
    x = model.preprocess(paths)
    ref = model.embed(x)
    diffs = {name: float((e.embed(x) - ref).abs().max()) for name, e in engines.items()}
    print(
        f"## Embedding: {what} as {x.shape[2]}x{x.shape[3]} PNG files "
        f"({sum(os.path.getsize(p) for p in paths) / len(paths):.0f} bytes each); model "
        f"{model.source} ({model.dim}-d, {model.metric}); ONNX export took {export_s:.1f} s; "
        "max |onnxruntime - torch| "
        + ", ".join(f"{v:.1e}" for k, v in diffs.items() if k != "torch")
        + "\n"
    )
    print("| engine | input | batch | images per run | median s | images/s |")
    print("|---|---|---|---|---|---|")
    n1 = min(args.batch1_images, len(paths))
    for name, emb in engines.items():
        for label, inputs in (("preprocessed tensor (model only)", x), ("PNG end to end", paths)):
            for batch in (1, 256):
                _log(f"embed: {name}, {label}, batch {batch}")
                if batch == 1:
                    items = inputs[:n1]

                    def work(emb=emb, items=items) -> None:
                        for i in range(len(items)):
                            emb.embed(items[i : i + 1], batch_size=1)

                    count = n1
                else:

                    def work(emb=emb, inputs=inputs, batch=batch) -> None:
                        emb.embed(inputs, batch_size=batch)

                    count = len(inputs)
                seconds = _median_s(work, args.repeats)
                print(f"| {name} | {label} | {_row(str(batch), count, seconds)[2:]}")
    print(f"\nload average (1 / 5 / 15 min) after this table: {_load()}\n")
    return engines, paths


# --------------------------------------------------------------------------- 2. verification


def run_verification(
    args: argparse.Namespace, engines: dict[str, Embedder], paths: list[str]
) -> None:
    model = engines["torch"]
    t = model.threshold.value
    half = min(args.pairs_e2e, len(paths) // 2)
    a_list, b_list = paths[:half], paths[half : 2 * half]
    print(
        f"## Verification: threshold {t:.4f} ({model.metric}); end to end = "
        "Embedder.verify on PNG paths (decode + preprocess + 2 embeddings + distance + "
        "compare); cached = paired(ea, eb) <= threshold on precomputed embeddings\n"
    )
    print("| what | engine | pairs per run | median s | pairs/s |")
    print("|---|---|---|---|---|")
    n_single = min(args.single_pairs, half)
    for name, emb in engines.items():
        _log(f"verify: {name}, one pair per call")

        def one_by_one(emb=emb) -> None:
            for i in range(n_single):
                emb.verify(a_list[i], b_list[i])

        seconds = _median_s(one_by_one, args.repeats)
        print(_row(f"end to end, verify(a, b): 1 pair per call | {name}", n_single, seconds))
        _log(f"verify: {name}, {half} pairs per call")

        def batched(emb=emb) -> None:
            emb.verify(a_list, b_list)

        seconds = _median_s(batched, args.repeats)
        label = f"end to end, verify(list a, list b): {half:,} pairs per call | {name}"
        print(_row(label, half, seconds))

    cached = model.embed(paths)
    rng = np.random.default_rng(2)
    i = torch.from_numpy(rng.integers(0, len(paths), args.pairs))
    j = torch.from_numpy(rng.integers(0, len(paths), args.pairs))
    ea, eb = cached[i].contiguous(), cached[j].contiguous()
    metric = model.metric
    _log(f"verify: cached, {args.pairs} pairs in one call")

    def vectorised() -> None:
        (paired(ea, eb, metric) <= t).sum()

    seconds = _median_s(vectorised, args.repeats)
    print(_row(f"cached embeddings, {args.pairs:,} pairs in one call | torch", args.pairs, seconds))
    n_one = min(args.pairs, args.single_cached)
    rows_a = [ea[k : k + 1] for k in range(n_one)]
    rows_b = [eb[k : k + 1] for k in range(n_one)]

    def per_pair() -> None:
        for a, b in zip(rows_a, rows_b):
            bool(paired(a, b, metric)[0] <= t)

    seconds = _median_s(per_pair, args.repeats)
    print(_row("cached embeddings, 1 pair per call | torch", n_one, seconds))
    print(f"\nload average (1 / 5 / 15 min) after this table: {_load()}\n")


# --------------------------------------------------------------------------- 3. identification


def _normalised(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _single_ms(index: GalleryIndex, queries: np.ndarray, count: int, k: int) -> float:
    index.search(queries[:1], k)  # warm-up
    times = []
    for i in range(min(count, queries.shape[0])):
        start = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _build(index: GalleryIndex, x: np.ndarray) -> tuple[float, float]:
    rss = _rss_mb()
    start = time.perf_counter()
    index.add(x, np.arange(x.shape[0], dtype=np.int64))
    return time.perf_counter() - start, _rss_mb() - rss


def _top1(index: GalleryIndex, q: np.ndarray) -> np.ndarray:
    return index.search(q, 1).ids[:, 0]


def run_identification(args: argparse.Namespace, metric: str) -> np.ndarray:
    n, dim, k = args.n, args.dim, args.k
    hnsw_n = n if args.hnsw_max_n is None else min(n, args.hnsw_max_n)
    _log(f"identify: drawing {n:,} x {dim} vectors")
    rng = np.random.default_rng(0)
    x = _normalised(rng, n, dim)
    src = rng.choice(max(hnsw_n, 1), args.queries, replace=args.queries > hnsw_n)
    noise = rng.standard_normal((args.queries, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
    probes = x[src] + noise
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    strangers = _normalised(rng, args.queries, dim)
    cos = float(np.mean(np.sum(probes * x[src], axis=1)))
    print(
        f"## Identification: N = {n:,} enrolled, D = {dim}, {metric}, k = {k}; "
        f"{args.queries:,} probe queries (mean cosine to their source {cos:.3f}) and "
        f"{args.queries:,} strangers; batch q/s = index.search of a batch in one call "
        f"({args.exact_queries} probes for the exact indexes, {args.queries:,} for HNSW); "
        f"1-query ms = median over {args.single} single searches\n"
    )
    print(
        "| index | N | build s | RSS MB (build) | batch q/s | 1-query ms | recall@1 probe "
        "| recall@1 stranger |"
    )
    print("|---|---|---|---|---|---|---|---|")
    flat = FaissIndex(dim=dim, metric=metric, kind="flat")
    _log("identify: faiss flat")
    build_s, rss = _build(flat, x)
    truth_p = _top1(flat, probes)
    truth_s = _top1(flat, strangers)
    source_hit = float(np.mean(truth_p == src))
    indexes: list[tuple[str, Callable[[], GalleryIndex]]] = [("faiss flat (exact)", lambda: flat)]
    if not args.skip_torch:
        indexes.append(("torch ExactIndex", lambda: ExactIndex(dim=dim, metric=metric)))
    q = probes[: args.exact_queries]
    for name, make in indexes:
        index = make()
        if index is not flat:
            _log(f"identify: {name}")
            build_s, rss = _build(index, x)
        qps = q.shape[0] / _median_s(lambda index=index: index.search(q, k), args.repeats)
        ms = _single_ms(index, probes, args.single, k)
        print(
            f"| {name} | {n:,} | {build_s:.1f} | {rss:,.0f} | {qps:,.0f} | {ms:.2f} "
            "| 1 (exact) | 1 (exact) |"
        )
        del index
    if hnsw_n and not args.no_hnsw:
        sub = x[:hnsw_n]
        if hnsw_n < n:
            flat = FaissIndex(dim=dim, metric=metric, kind="flat")
            flat.add(sub, np.arange(hnsw_n, dtype=np.int64))
            truth_p, truth_s = _top1(flat, probes), _top1(flat, strangers)
        del flat
        hnsw = FaissIndex(
            dim=dim, metric=metric, kind="hnsw", m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION
        )
        _log(f"identify: HNSW build of {hnsw_n:,} rows (M={HNSW_M}, efC={HNSW_EF_CONSTRUCTION})")
        build_s, rss = _build(hnsw, sub)
        _log(f"identify: HNSW built in {build_s:.1f} s")
        first = True
        for ef in args.ef_search:
            hnsw.ef_search = ef
            qps = probes.shape[0] / _median_s(lambda: hnsw.search(probes, k), args.repeats)
            ms = _single_ms(hnsw, probes, args.single, k)
            rec_p = float(np.mean(_top1(hnsw, probes) == truth_p))
            rec_s = float(np.mean(_top1(hnsw, strangers) == truth_s))
            label = f"HNSW M={HNSW_M} efC={HNSW_EF_CONSTRUCTION} efSearch={ef}"
            cells = f"{build_s:.1f} | {rss:,.0f}" if first else "(same) | (same)"
            print(
                f"| {label} | {hnsw_n:,} | {cells} | {qps:,.0f} | {ms:.2f} | {rec_p:.3f} "
                f"| {rec_s:.3f} |"
            )
            first = False
        del hnsw
    note = (
        f"HNSW built on the first {hnsw_n:,} of the {n:,} rows (--hnsw-max-n), recall against "
        "exact search on those rows; "
        if hnsw_n < n and not args.no_hnsw
        else ""
    )
    print(
        f"\n{note}exact top-1 of a probe = its source vector for {source_hit:.3f} of the probes; "
        f"k = {k} hits per query (recall@1 compares the first). load average (1 / 5 / 15 min) "
        f"after this table: {_load()}\n"
    )
    return x


# --------------------------------------------------------------------------- 4. enroll


def run_store(args: argparse.Namespace, x: np.ndarray, metric: str, tmp: Path) -> None:
    n, dim = x.shape
    folder = tmp / "store"
    folder.mkdir()
    path = folder / "gallery.db"
    rss = _rss_mb()
    _log(f"store: {n:,} rows in calls of {args.batch:,}")
    with GalleryStore.create(path, meta={"dim": dim, "metric": metric}) as store:
        start = time.perf_counter()
        for b, lo in enumerate(range(0, n, args.batch)):
            store.add(f"identity {b}", x[lo : lo + args.batch])
        bulk = time.perf_counter() - start
        one = _normalised(np.random.default_rng(1), args.single, dim)
        _log(f"store: {args.single} single enrolls")
        start = time.perf_counter()
        for i in range(args.single):
            store.add(f"single {i}", one[i : i + 1])
        singles = time.perf_counter() - start
        _log("store: all_embeddings()")
        start = time.perf_counter()
        rows = store.all_embeddings()
        load = time.perf_counter() - start
        loaded = rows.embeddings.shape[0]
        del rows
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        after = _rss_mb()
    print(
        f"## Enroll: GalleryStore (SQLite, WAL, synchronous=FULL) in {tmp}, {n:,} rows x {dim} "
        "float32, no thumbnails; each timed once (one loop)\n"
    )
    print("| operation | items | seconds | rate |")
    print("|---|---|---|---|")
    print(
        f"| add, {args.batch:,} rows per call (1 transaction, 1 identity) | {n:,} rows | "
        f"{bulk:.1f} | {n / bulk:,.0f} rows/s |"
    )
    print(
        f"| add, 1 row per call (a new identity) into the full store | {args.single:,} enrolls "
        f"| {singles:.2f} | {args.single / singles:,.0f} enrolls/s "
        f"({1000 * singles / args.single:.1f} ms each) |"
    )
    print(f"| all_embeddings() | {loaded:,} rows | {load:.2f} | {loaded / load:,.0f} rows/s |")
    print(
        f"\nfile size (db + wal + shm, open): {size:,.0f} MB ({size * 2**20 / loaded:.0f} bytes "
        f"per row); process RSS after the store work {after:,.0f} MB ({after - rss:+,.0f} MB "
        f"against before it; the all_embeddings() result already freed); peak RSS of the run "
        f"so far {_peak_rss_mb():,.0f} MB. load average (1 / 5 / 15 min): {_load()}\n"
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/fashion_mnist_demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    parser.add_argument("--images", type=int, default=2048, help="PNG files / tensor rows")
    parser.add_argument("--batch1-images", type=int, default=256, help="images per batch-1 run")
    parser.add_argument("--pairs-e2e", type=int, default=1024, help="pairs per batched verify")
    parser.add_argument("--single-pairs", type=int, default=200, help="pairs per 1-pair run")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="cached pairs, one call")
    parser.add_argument("--single-cached", type=int, default=10_000, help="cached, 1 per call")
    parser.add_argument("--n", type=int, default=1_000_000, help="enrolled embeddings")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=20, help="hits per identification search")
    parser.add_argument("--queries", type=int, default=1000, help="probes / strangers (HNSW)")
    parser.add_argument("--exact-queries", type=int, default=200, help="batch for exact q/s")
    parser.add_argument("--single", type=int, default=100, help="1-query searches / enrolls")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument(
        "--hnsw-max-n",
        "--skip-hnsw-build-over",
        type=int,
        default=None,
        help="build HNSW on at most this many of the N rows (default: all N; a 1M build "
        "takes > 10 min on 2 cores)",
    )
    parser.add_argument("--no-hnsw", action="store_true")
    parser.add_argument("--skip-torch", action="store_true", help="no torch ExactIndex")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per store add")
    parser.add_argument("--skip", nargs="*", default=[], choices=["embed", "identify", "store"])
    parser.add_argument("--tmp", default=None, help="folder for the temporary files")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not faiss_available():
        raise SystemExit("this benchmark compares against faiss: pip install faiss-cpu")
    import faiss
    import onnxruntime

    faiss.omp_set_num_threads(args.threads)
    start_load, start = _load(), time.perf_counter()
    print(f"command: python benchmarks/inference.py {shlex.join(sys.argv[1:])}".rstrip())
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs (usable: "
        f"{len(os.sched_getaffinity(0))}), {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), onnxruntime {onnxruntime.__version__}, faiss {faiss.__version__} "
        f"({args.threads} OpenMP threads); median of {args.repeats} runs after a warm-up"
    )
    print(f"load average (1 / 5 / 15 min) at start: {start_load}\n")
    metric = "euclidean"
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        if "embed" not in args.skip:
            engines, paths = run_embedding(args, tmp)
            metric = engines["torch"].metric
            run_verification(args, engines, paths)
            del engines
        else:
            from deepmetric.training import load_trained

            metric = load_trained(Path(args.run_dir))[0].loss.metric
        x = None
        if "identify" not in args.skip:
            x = run_identification(args, metric)
        if "store" not in args.skip:
            if x is None:
                x = _normalised(np.random.default_rng(0), args.n, args.dim)
            run_store(args, x, metric, tmp)
    print(
        f"load average (1 / 5 / 15 min) at end: {_load()} (at start: {start_load}); "
        f"total {time.perf_counter() - start:.0f} s; peak RSS {_peak_rss_mb():,.0f} MB"
    )


if __name__ == "__main__":
    main()
