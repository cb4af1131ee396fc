"""Each batch loss once, forward + backward, at one large B on the CPU: seconds, peak memory
above the inputs, and that the value and gradient are finite. Shows that the tiled losses
(deepmetric.tiles) run where a (B, B) matrix would not fit (B = 50,000: 10 GB a matrix).

    python benchmarks/loss_memory.py 50000

Peak: /proc/self/status VmHWM after the call minus VmRSS before it (reset through
/proc/self/clear_refs, Linux only), after ``malloc_trim`` has returned what the previous loss
freed; what glibc's heap keeps during the call counts, as it does for a user. D = 128, K = 4,
2 threads.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch

from deepmetric import losses


def status(key: str) -> float:
    """A /proc/self/status figure in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def main(b: int) -> None:
    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    torch.manual_seed(0)
    labels = torch.arange(b // 4).repeat_interleave(4)
    labels = labels[torch.randperm(len(labels))]
    x = torch.nn.functional.normalize(torch.randn(len(labels), 128), dim=1).requires_grad_(True)
    made = [losses.TripletLoss(mining=m) for m in ("batch_all", "batch_hard", "semi_hard")]
    made += [losses.ContrastiveLoss(), losses.LiftedStructuredLoss(), losses.MultiSimilarityLoss()]
    for loss in made:  # warm every code path on a small batch
        loss(x[:256], labels[:256]).backward()
    for loss in made:
        x.grad = None
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        start = time.perf_counter()
        value = loss(x, labels)
        value.backward()
        seconds = time.perf_counter() - start
        assert x.grad is not None
        print(
            f"{type(loss).__name__} {getattr(loss, 'mining', '')} B={len(x)}: {seconds:.1f} s, "
            f"peak +{status('VmHWM') - before:.0f} MiB, value {value.item():.6g}, "
            f"finite gradient {bool(torch.isfinite(x.grad).all())}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
