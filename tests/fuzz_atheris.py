"""Coverage-guided fuzzing with atheris (libFuzzer for Python) of the readers of untrusted input:
the IDX parser, image decoding and the config loader. The property is the one of
tests/test_fuzz.py: each input is read, or refused with the project's own one-line error
(``DatasetError``, the ``ValueError`` naming the image, ``ConfigError``); any other exception,
a hang (libFuzzer's ``-timeout``) or memory beyond ``-rss_limit_mb`` is a crash, and libFuzzer
writes the input that caused it to ``crash-*`` in the current folder.

    python tests/fuzz_atheris.py idx|image|config [libFuzzer options, e.g. -max_total_time=60]

``make fuzz`` runs each target for ``FUZZ_SECONDS`` (needs ``pip install -e '.[fuzz]'``). The
corpus starts from valid files (written to ``build/fuzz-corpus/TARGET``) and grows there.
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["deepmetric.config", "deepmetric.data", "yaml", "PIL"]):
    import yaml
    from PIL import Image

    from deepmetric.config import ConfigError, load_config
    from deepmetric.data import DatasetError, Preprocessing, load_idx
    from deepmetric.data.preprocess import decode_image

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = Path(tempfile.mkdtemp(prefix="deepmetric-fuzz-"))


def _one_line(error: BaseException, prefix: str = "") -> None:
    text = str(error)
    if "\n" in text or not text.startswith(prefix):
        raise AssertionError(f"not a one-line error starting with {prefix!r}: {text!r}")


def fuzz_idx(data: bytes) -> None:
    """The first byte chooses plain or gzipped; the rest is the file."""
    gz, content = bool(data[:1]) and data[0] & 1, data[1:]
    path = SCRATCH / ("fuzz-idx-ubyte.gz" if gz else "fuzz-idx-ubyte")
    path.write_bytes(content)
    try:
        array = load_idx(path)
    except DatasetError as error:
        _one_line(error, f"{path}: ")
    else:
        if array.nbytes > len(gzip.decompress(content) if gz else content):
            raise AssertionError("an array larger than its file")


def fuzz_image(data: bytes) -> None:
    try:
        img = decode_image(io.BytesIO(data), "upload")
    except ValueError as error:
        _one_line(error, "upload: ")
        return
    try:
        Preprocessing(channels=3, height=8, width=8).apply(img)
    except ValueError as error:
        _one_line(error, "image: ")
    finally:
        img.close()


def fuzz_config(data: bytes) -> None:
    """The bytes as a YAML file, and each of their lines as a ``key=value`` override."""
    text = data.decode("utf-8", errors="replace")
    path = SCRATCH / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    for attempt in (lambda: load_config(path), lambda: load_config(None, text.splitlines())):
        try:
            attempt()
        except ConfigError as error:
            _one_line(error)


def _seeds(target: str) -> list[bytes]:
    if target == "idx":
        images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
        idx = struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + images.tobytes()
        return [b"\0" + idx, b"\1" + gzip.compress(idx)]
    if target == "image":
        seeds = []
        for mode, fmt in [("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "JPEG")]:
            out = io.BytesIO()
            Image.new(mode, (6, 5)).save(out, format=fmt)
            seeds.append(out.getvalue())
        return seeds
    texts = [p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))]
    return [t.encode() for t in texts] + [yaml.safe_dump({"train": {"lr": 0.1, "p": 4}}).encode()]


TARGETS = {"idx": fuzz_idx, "image": fuzz_image, "config": fuzz_config}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = sys.argv[1]
    corpus = ROOT / "build" / "fuzz-corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(target)):
        (corpus / f"seed{i}").write_bytes(seed)
    args = [sys.argv[0], *sys.argv[2:], "-rss_limit_mb=2048", "-timeout=20", str(corpus)]
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
