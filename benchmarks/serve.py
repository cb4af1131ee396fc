"""Load on ``deepmetric serve`` from a second process, over loopback.

Trains a tiny run (or takes ``--run``), starts the real server in a subprocess on a free port,
enrolls ``--identities`` identities, then sends ``--requests`` identify requests from
``--concurrency`` threads with ``--writes`` enrolls and removes mixed in (alternating, from one
more thread), and prints a markdown table: requests/s, latency p50 / p95 / p99, 5xx count,
and whether every acknowledged write is in the gallery afterwards (every enroll that got a 201
and was not removed is listed, every removed one is gone).

Besides the identify latencies, the table gives the enroll / remove latencies during the load
(write p50 / max) and the seconds the ``--identities`` enrolls took before it (first enrolls).

``--prefill N`` writes N more identities (one example each: the embedding of a test image plus
Gaussian noise, so no two are equal) straight into the gallery file before the server starts,
for a large gallery without N HTTP enrolls (at 100,000 the local index is HNSW); the table
then says how long the server took to start (the index built or loaded).

    python benchmarks/serve.py --requests 2000 --concurrency 16 --writes 200
    python benchmarks/serve.py --prefill 100000 --requests 2000 --writes 200
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_run(root: Path) -> tuple[Path, list[Path]]:
    from PIL import Image
    from synthetic import write_learnable_idx

    from deepmetric.config import load_config
    from deepmetric.data import load_dataset
    from deepmetric.training import train

    data = write_learnable_idx(root / "toy", n_classes=10, n_train=30, n_test=10)
    overrides = [f"data=idx:{data}", f"out={root / 'run'}", "model.dim=32", "epochs=2"]
    overrides += ["mode=batch", "train.p=4", "train.k=4", "train.val_fraction=0.25"]
    train(load_config(None, overrides), stream=None)
    test = load_dataset(f"idx:{data}", "test")
    images = []
    for i in range(len(test)):
        path = root / "pngs" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((test.x[i, 0].numpy() * 255).round().astype(np.uint8)).save(path)
        images.append(path)
    return root / "run", images


def _run_images(run: Path, root: Path, n: int = 200) -> list[Path]:
    """The first ``n`` test images of the run's own data set, as PNG files."""
    from PIL import Image

    from deepmetric.data import load_dataset
    from deepmetric.training import resume_config

    test = load_dataset(resume_config(run).data, "test")
    images = []
    for i in range(min(n, len(test))):
        path = root / "pngs" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((test.x[i, 0].numpy() * 255).round().astype(np.uint8)).save(path)
        images.append(path)
    return images


def _prefill(run: Path, gallery: Path, images: list[Path], n: int, seed: int = 0) -> None:
    """Create ``gallery`` for ``run`` and add ``n`` identities ``prefill I`` of one example
    each (an image's embedding plus Gaussian noise of a tenth of its scale), one store
    transaction per identity, as enrolls would write them."""
    from deepmetric.gallery import Gallery, GalleryStore
    from deepmetric.inference import Embedder

    embedder = Embedder.from_run(run, device="cpu", progress=lambda _: None)
    Gallery.create(gallery, embedder, source=run).close()
    base = embedder.embed(images).numpy()
    rng = np.random.default_rng(seed)
    scale = 0.1 * float(np.abs(base).mean())
    start = time.perf_counter()
    with GalleryStore.open(gallery) as store:
        for i in range(n):
            row = base[i % len(base)] + rng.normal(0.0, scale, base.shape[1]).astype(np.float32)
            store.add(f"prefill {i}", row[None, :])
            if (i + 1) % 20_000 == 0:
                print(f"prefill: {i + 1:,} / {n:,} identities", file=sys.stderr)
    took = time.perf_counter() - start
    print(f"prefill: {n:,} identities in {took:.0f} s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--writes",
        type=int,
        default=200,
        help="WRITES / 2 enrolls mixed in, every other one removed",
    )
    parser.add_argument("--identities", type=int, default=50, help="enrolled over HTTP first")
    parser.add_argument(
        "--prefill", type=int, default=0, help="identities written to the file before the start"
    )
    parser.add_argument(
        "--run", type=Path, help="a trained run to serve (default: train a tiny one first)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.run is not None:
        run, images = args.run, _run_images(args.run, work)
    else:
        run, images = _tiny_run(work)
    if args.prefill:
        _prefill(run, work / "g.db", images, args.prefill)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")  # noqa: SIM115
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "deepmetric", "serve", str(run), "--gallery", str(work / "g.db"),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(3000):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()}")
        startup = time.perf_counter() - started
        blobs = [p.read_bytes() for p in images]
        first = time.perf_counter()
        with httpx.Client(base_url=url, timeout=600) as client:
            for i in range(args.identities):
                files = {"files": (f"{i}.png", blobs[i % len(blobs)], "image/png")}
                client.post("/identities", data={"identity": f"id {i}"}, files=files)
        first_s = time.perf_counter() - first

        latencies: list[float] = []
        statuses: list[int] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))

        def searcher() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                for i in counter:
                    blob = blobs[i % len(blobs)]
                    start = time.perf_counter()
                    r = client.post("/identify", files={"files": ("q.png", blob, "image/png")})
                    took = time.perf_counter() - start
                    with lock:
                        latencies.append(took)
                        statuses.append(r.status_code)

        kept: set[str] = set()
        removed: set[str] = set()
        write_errors: list[int] = []
        write_ms: list[float] = []

        def writer() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                for i in range(args.writes // 2):
                    name = f"written {i}"
                    files = {"files": ("w.png", blobs[i % len(blobs)], "image/png")}
                    start = time.perf_counter()
                    r = client.post("/identities", data={"identity": name}, files=files)
                    write_ms.append(1000 * (time.perf_counter() - start))
                    if r.status_code != 201:
                        write_errors.append(r.status_code)
                        continue
                    kept.add(name)
                    if i % 2:
                        start = time.perf_counter()
                        r = client.delete(f"/identities/{name}")
                        write_ms.append(1000 * (time.perf_counter() - start))
                        if r.status_code == 200:
                            kept.discard(name)
                            removed.add(name)
                        else:
                            write_errors.append(r.status_code)

        threads = [threading.Thread(target=searcher) for _ in range(args.concurrency)]
        threads.append(threading.Thread(target=writer))
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=60) as client:
            listed = {x["identity"] for x in client.get("/identities").json()}
            health = client.get("/health").json()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        log.close()

    ms = np.array(latencies) * 1000
    errors_5xx = sum(s >= 500 for s in statuses)
    lost = len(kept - listed) + len(removed & listed)
    batching = health["batching"]
    print(
        f"{args.requests} identify requests, {args.concurrency} concurrent, "
        f"{args.writes // 2} enrolls ({len(removed)} removed again) mixed in; "
        f"{args.identities} identities enrolled first, {args.prefill:,} prefilled; server "
        f"up in {startup:.1f} s; model {run}; {os.cpu_count()} CPUs; "
        f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print()
    print("| requests/s | p50 ms | p95 ms | p99 ms | write p50 ms | write max ms | first "
          "enrolls s | 5xx | other errors | lost writes | inputs per forward pass |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    writes = np.array(write_ms) if write_ms else np.array([np.nan])
    print(
        f"| {len(ms) / wall:.0f} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | "
        f"{np.percentile(ms, 99):.1f} | {np.median(writes):.1f} | {np.max(writes):.1f} | "
        f"{first_s:.1f} | {errors_5xx} | "
        f"{sum(400 <= s < 500 for s in statuses) + len(write_errors)} | {lost} | "
        f"{batching['items'] / max(batching['batches'], 1):.1f} |"
    )


if __name__ == "__main__":
    main()
