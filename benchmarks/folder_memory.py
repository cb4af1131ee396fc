"""Peak memory and time of loading a folder data set (``load_image_folder``).

    python benchmarks/folder_memory.py                        # 100,000 RGB images, 32 x 32
    python benchmarks/folder_memory.py --images 20000 --size 64
    python benchmarks/folder_memory.py --src /path/to/other/checkout/src   # another revision

Writes ``--images`` PNG files (random pixels, ``--classes`` class folders) into a temporary
folder, then loads it in a fresh Python process (``PYTHONPATH=--src``) and reports:

- *peak growth*: ``ru_maxrss`` after ``load_image_folder`` minus ``ru_maxrss`` after the
  imports (numpy, torch, PIL, deepmetric), i.e. how much the loading itself added at its peak;
- the size of the pixels as uint8 (N x C x H x W bytes) and as float32 (4x that), the two
  ways a loader can hold them;
- the wall time of the loading (the files are in the page cache: no disk reads).

Linux only (``ru_maxrss`` in KiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, resource, sys, time
import numpy, torch, PIL.Image
from deepmetric.data import load_image_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ds = load_image_folder(sys.argv[1], size=int(sys.argv[2]))
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_kib": after - before, "seconds": seconds,
                  "repr": repr(ds)}))
"""


def write_images(root: Path, n: int, classes: int, size: int, seed: int = 0) -> None:
    """``n`` random RGB PNGs of ``size`` x ``size`` in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:04d}").mkdir()
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % classes:04d}" / f"{i:06d}.png")


def measure(root: Path, size: int, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--src", help="PYTHONPATH of the loading process (another revision)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_images(root, args.images, args.classes, args.size)
        print(
            f"wrote {args.images:,} PNGs {args.size}x{args.size} RGB in "
            f"{time.perf_counter() - start:.0f} s"
        )
        result = measure(root, args.size, args.src)
    uint8_mb = args.images * 3 * args.size**2 / 2**20
    print(result["repr"])
    print(
        f"loading: peak growth {result['peak_growth_kib'] / 1024:.0f} MiB, "
        f"{result['seconds']:.1f} s ({args.images / result['seconds']:,.0f} images/s); "
        f"pixels as uint8 {uint8_mb:.0f} MiB, as float32 {4 * uint8_mb:.0f} MiB"
    )


if __name__ == "__main__":
    main()
