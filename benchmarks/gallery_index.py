"""Gallery search and storage at scale: N random L2-normalised embeddings (default 1,000,000 x
128), cosine metric.

    python benchmarks/gallery_index.py                       # N = 1,000,000 (minutes)
    python benchmarks/gallery_index.py --n 20000 --repeats 2 # a quick run
    python benchmarks/gallery_index.py --crossover           # make_index's size crossovers
    python benchmarks/gallery_index.py --ef-search 32 64 128 256 --m 32
    python benchmarks/gallery_index.py --n 100000 --index milvus-lite  # + Milvus Lite rows

What is timed (``time.perf_counter``, torch and faiss limited to ``--threads`` threads):

- **build**: ``index.add(embeddings, ids)`` of all N rows in one call (one run: an HNSW build
  takes minutes).
- **batch q/s**: ``index.search(queries, k=10)`` on ``--queries`` queries in one call;
  one warm-up call, then the median of ``--repeats`` calls; q/s = queries / median seconds.
- **1-query ms**: ``index.search(one_query, k=10)``, median over ``--single`` queries one by
  one (latency of an interactive identification).
- **recall@1**: the fraction of queries whose first hit is the exact nearest neighbour
  (faiss flat, which the tests check against brute force), for two kinds of query:
  *probe* = an enrolled embedding plus Gaussian noise, renormalised (cosine ~0.9 to its
  source: a new photo of an enrolled person), and *stranger* = a fresh random vector (no
  enrolled match: all N distances are nearly equal, the hardest case for HNSW and the one
  that matters least, since an open-set threshold rejects it whatever its nearest).
- **size MB**: the index's own arrays (vectors, HNSW links); **RSS MB**: resident memory
  after the build minus before (the allocator may reuse freed memory: a lower bound).
- **store**: ``GalleryStore.add`` of ``--batch`` rows per call (one transaction each, FULL
  sync) until N rows are stored: rows/s of the whole loop; single-example enrolls into the
  full store (one transaction each): enrolls/s; ``all_embeddings()`` of all N rows (what an
  index rebuild reads); the file size (database + WAL).

With ``--index milvus-lite`` the table gets rows for a gallery's vectors in Milvus Lite
(:class:`~deepmetric.gallery.milvus_index.MilvusIndex`, in process, a temporary file): its FLAT
collection and an HNSW one (``?index=hnsw``, the same M, efConstruction and efSearch values),
searched through the same ``search`` a gallery calls (ties by id, distances recomputed from the
returned vectors); **build** = the upserts, the flush that seals the segments and a reload of
the collection (Milvus Lite builds a sealed segment's HNSW graph in the background; the reload
builds it at once; a reload while its background compaction still writes fails and is tried
again every 2 s, the wait counted in build); single enrolls and removes are timed into the full
collection (ms each, median of ``--single``). Milvus Lite decides its own threads.

Queries and data are drawn from a seeded generator, so runs are repeatable; timings on a
machine that other jobs share are noisy (the table says how many threads and runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.gallery.index import ExactIndex, FaissIndex, GalleryIndex, faiss_available
from deepmetric.gallery.store import GalleryStore

K = 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _normalised(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _data(n: int, dim: int, n_q: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = _normalised(rng, n, dim)
    src = rng.choice(n, n_q, replace=n_q > n)
    noise = rng.standard_normal((n_q, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
    probes = x[src] + noise
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    return x, probes.astype(np.float32), _normalised(rng, n_q, dim)


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _single_ms(index: GalleryIndex, queries: np.ndarray, count: int) -> float:
    index.search(queries[:1], K)
    times = []
    for i in range(min(count, queries.shape[0])):
        start = time.perf_counter()
        index.search(queries[i : i + 1], K)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _make(name: str, dim: int, args: argparse.Namespace, ef: int | None = None) -> GalleryIndex:
    if name == "exact (torch)":
        return ExactIndex(dim=dim, metric="cosine")
    if name == "faiss flat":
        return FaissIndex(dim=dim, metric="cosine", kind="flat")
    return FaissIndex(
        dim=dim,
        metric="cosine",
        kind="hnsw",
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=ef or args.ef_search[0],
    )


def _size_mb(index: GalleryIndex) -> float:
    """The index's own arrays: vectors (+ HNSW links and levels), not the id map."""
    if isinstance(index, ExactIndex):
        return index._vectors.numel() * 4 / 2**20  # capacity, as allocated
    assert isinstance(index, FaissIndex)
    inner = index._index
    size = inner.ntotal * inner.d * 4
    if index.kind == "hnsw":
        hnsw = inner.hnsw
        size += hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
    return size / 2**20


def _build(index: GalleryIndex, x: np.ndarray) -> tuple[float, float]:
    rss = _rss_mb()
    start = time.perf_counter()
    index.add(x, np.arange(x.shape[0], dtype=np.int64))
    return time.perf_counter() - start, _rss_mb() - rss


def run_search(args: argparse.Namespace) -> None:
    x, probes, strangers = _data(args.n, args.dim, args.queries)
    n, dim = x.shape
    print(
        f"N = {n:,}, D = {dim}, cosine, k = {K}, {args.queries} queries, "
        f"{args.threads} threads, median of {args.repeats} after a warm-up\n"
    )
    print(
        "| index | build s | size MB | RSS MB | batch q/s | 1-query ms | recall@1 probe "
        "| recall@1 stranger |"
    )
    print("|---|---|---|---|---|---|---|---|")
    exact = _make("faiss flat", dim, args)
    build_s, rss = _build(exact, x)
    truth_p = exact.search(probes, 1).ids[:, 0]
    truth_s = exact.search(strangers, 1).ids[:, 0]
    names = ["faiss flat"] + (["exact (torch)"] if not args.skip_torch else [])
    for name in names:
        index = exact if name == "faiss flat" else _make(name, dim, args)
        if index is not exact:
            build_s, rss = _build(index, x)
        q = probes[: args.exact_queries]
        qps = q.shape[0] / _median_s(lambda index=index, q=q: index.search(q, K), args.repeats)
        ms = _single_ms(index, probes, args.single)
        cells = f"{build_s:.1f} | {_size_mb(index):.0f} | {rss:.0f} | {qps:,.0f} | {ms:.2f}"
        print(f"| {name} | {cells} | 1 (exact) | 1 (exact) |")
        if index is not exact:
            del index
    del exact
    hnsw = _make("hnsw", dim, args)
    assert isinstance(hnsw, FaissIndex)
    build_s, rss = _build(hnsw, x)
    size = _size_mb(hnsw)
    for ef in args.ef_search:
        hnsw.ef_search = ef
        qps = probes.shape[0] / _median_s(lambda h=hnsw: h.search(probes, K), args.repeats)
        ms = _single_ms(hnsw, probes, args.single)
        rec_p = float(np.mean(hnsw.search(probes, 1).ids[:, 0] == truth_p))
        rec_s = float(np.mean(hnsw.search(strangers, 1).ids[:, 0] == truth_s))
        label = f"HNSW M={args.m} efC={args.ef_construction} efS={ef}"
        cells = f"{build_s:.1f} | {size:.0f} | {rss:.0f} | {qps:,.0f} | {ms:.2f}"
        print(f"| {label} | {cells} | {rec_p:.3f} | {rec_s:.3f} |")
        build_s = rss = float("nan")  # one build serves every efSearch
    del hnsw
    if args.index == "milvus-lite":
        run_milvus_lite(args, x, probes, strangers, truth_p, truth_s)
    if not args.skip_store:
        run_store(args, x)


def run_milvus_lite(
    args: argparse.Namespace,
    x: np.ndarray,
    probes: np.ndarray,
    strangers: np.ndarray,
    truth_p: np.ndarray,
    truth_s: np.ndarray,
) -> None:
    """The Milvus Lite rows of the search table, then its single enroll / remove times."""
    from deepmetric.gallery.milvus_index import MilvusIndex, parse_index_spec

    n, dim = x.shape
    singles: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        specs = [("Milvus Lite FLAT", "", None)]
        specs += [
            (
                f"Milvus Lite HNSW M={args.m} efC={args.ef_construction} efS={ef}",
                f"?index=hnsw&m={args.m}&ef_construction={args.ef_construction}&ef_search={ef}",
                ef,
            )
            for ef in args.ef_search
        ]
        for label, query, ef in specs:
            kind = "flat" if ef is None else "hnsw"
            target = parse_index_spec(f"milvus-lite:{tmp}/vectors.db#{kind}_{ef}{query}", "g")
            assert target is not None
            index = MilvusIndex(target, dim=dim, metric="cosine", gallery_id="bench", create=True)
            start = time.perf_counter()
            index.add(x, np.arange(n, dtype=np.int64))
            index._client.flush(target.collection)
            _reload(index._client, target.collection)
            build_s = time.perf_counter() - start
            q = probes if ef is not None else probes[: args.exact_queries]
            qps = q.shape[0] / _median_s(lambda index=index, q=q: index.search(q, K), args.repeats)
            ms = _single_ms(index, probes, args.single)
            rec_p = float(np.mean(index.search(probes, 1).ids[:, 0] == truth_p))
            rec_s = float(np.mean(index.search(strangers, 1).ids[:, 0] == truth_s))
            cells = f"{build_s:.1f} | - | - | {qps:,.0f} | {ms:.2f}"
            print(f"| {label} | {cells} | {rec_p:.3f} | {rec_s:.3f} |")
            if ef is None or ef == args.ef_search[0]:
                singles.append(_enroll_remove_ms(label.split(" efS")[0], index, args.single))
            index.close()
    print("\nMilvus Lite, into the full collection (median of single calls):\n")
    print("| collection | enroll 1 vector ms | remove 1 vector ms |")
    print("|---|---|---|")
    for line in singles:
        print(line)


def _reload(client: Any, collection: str, patience_s: float = 600.0) -> None:
    """Release and load ``collection``: Milvus Lite builds a sealed segment's HNSW graph in
    a background thread, and a load builds what is missing at once. A load while its
    background compaction still writes the merged segment fails ("file seems not fully
    written"): tried again every 2 s until it loads."""
    from pymilvus.exceptions import MilvusException

    deadline = time.monotonic() + patience_s
    while True:
        client.release_collection(collection)
        try:
            client.load_collection(collection)
            return
        except MilvusException as error:
            if "not fully written" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _enroll_remove_ms(label: str, index: GalleryIndex, count: int) -> str:
    rng = np.random.default_rng(2)
    new = _normalised(rng, count, index.dim)
    base = 10**9
    add, remove = [], []
    for i in range(count):
        start = time.perf_counter()
        index.add(new[i : i + 1], [base + i])
        add.append(time.perf_counter() - start)
    for i in range(count):
        start = time.perf_counter()
        index.remove([base + i])
        remove.append(time.perf_counter() - start)
    return (
        f"| {label} | {1000 * statistics.median(add):.2f} | "
        f"{1000 * statistics.median(remove):.2f} |"
    )


def run_store(args: argparse.Namespace, x: np.ndarray) -> None:
    n, dim = x.shape
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "gallery.db"
        rss = _rss_mb()
        with GalleryStore.create(path, meta={"dim": dim, "metric": "cosine"}) as store:
            start = time.perf_counter()
            for b, lo in enumerate(range(0, n, args.batch)):
                store.add(f"identity {b}", x[lo : lo + args.batch])
            bulk = time.perf_counter() - start
            rng = np.random.default_rng(1)
            one = _normalised(rng, args.single, dim)
            start = time.perf_counter()
            for i in range(args.single):
                store.add(f"single {i}", one[i : i + 1])
            singles = time.perf_counter() - start
            load = _median_s(store.all_embeddings, max(1, args.repeats - 1))
        size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        print(f"\nStore: {n:,} rows x {dim} float32 (no thumbnails), synchronous=FULL\n")
        print("| operation | result |")
        print("|---|---|")
        print(f"| add, {args.batch:,} rows per call | {n / bulk:,.0f} rows/s ({bulk:.1f} s) |")
        print(
            f"| add, 1 row per call (new identity, into the full store) | "
            f"{args.single / singles:,.0f} enrolls/s ({1000 * singles / args.single:.1f} ms each) |"
        )
        print(f"| all_embeddings() of {n + args.single:,} rows (median) | {load:.2f} s |")
        print(f"| file size (db + wal) | {size:,.0f} MB |")
        print(f"| RSS after (process, MB above start) | {_rss_mb() - rss:,.0f} |")


def run_crossover(args: argparse.Namespace) -> None:
    print(
        f"Crossover: D = {args.dim}, cosine, k = {K}, {args.threads} threads; batch = "
        f"{args.queries} queries per call (q/s), single = 1-query latency (ms)\n"
    )
    print("| N | torch q/s | flat q/s | hnsw q/s | torch ms | flat ms | hnsw ms | hnsw build s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        x, probes, _ = _data(n, args.dim, args.queries)
        row = []
        singles = []
        build = 0.0
        for name in ("exact (torch)", "faiss flat", "hnsw"):
            index = _make(name, args.dim, args)
            build, _ = _build(index, x)
            q = probes[: args.exact_queries] if name != "hnsw" else probes
            row.append(q.shape[0] / _median_s(lambda index=index, q=q: index.search(q, K), 2))
            singles.append(_single_ms(index, probes, args.single))
        cells = [f"{v:,.0f}" for v in row] + [f"{v:.2f}" for v in singles] + [f"{build:.1f}"]
        print(f"| {n:,} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000, help="batch for q/s and recall")
    parser.add_argument("--exact-queries", type=int, default=200, help="batch for exact q/s")
    parser.add_argument("--single", type=int, default=100, help="1-query searches / enrolls")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=10_000, help="rows per store add")
    parser.add_argument("--skip-torch", action="store_true", help="no torch exact at this N")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the temporary store")
    parser.add_argument("--crossover", action="store_true", help="time sizes, not N")
    parser.add_argument(
        "--index",
        choices=["embedded", "milvus-lite"],
        default="embedded",
        help="milvus-lite: add Milvus Lite rows (FLAT, HNSW) beside the embedded indexes",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 5000, 20_000, 50_000, 200_000]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not faiss_available():
        raise SystemExit("this benchmark compares against faiss: pip install faiss-cpu")
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.crossover:
        run_crossover(args)
    else:
        run_search(args)


if __name__ == "__main__":
    main()
