"""In-memory datasets and their loaders: IDX (the MNIST family), image folders, ``.npz``.

Every loader returns an :class:`ArrayDataset` holding all samples as tensors: inputs
``(N, C, H, W)`` for images (kept as uint8 pixels, 1 byte per value, read as floats
``v / 255`` in ``[0, 1]`` batch by batch) or float32 ``(N, D)`` for vectors, labels ``y``
int64 ``(N,)``. Files that are missing, truncated or corrupt raise
:class:`DatasetError` naming the file; nothing is ever skipped silently.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

Split = Literal["train", "test"]
Fetch = Callable[[str], IO[bytes]]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPEC_FORMS = (
    "mnist",
    "fashion-mnist",
    "kmnist",
    "omniglot",
    "idx:DIR",
    "folder:DIR",
    "npz:FILE",
    "cub200[:DIR]",
    "cars196[:DIR]",
    "sop[:DIR]",
    "inshop[:DIR]",
    "pairs:FILE",
    "triplets:FILE",
)

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class DatasetError(ValueError):
    """A dataset file is missing, truncated, corrupt or inconsistent."""


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``v`` -> float32 ``v / 255`` in [0, 1], computed as every loader computes it
    (so inputs made from stored pixels equal, bit for bit, inputs decoded straight to float)."""
    return pixels.to(torch.float32).div_(255.0)


class Inputs:
    """Read-only float32 view of a dataset's stored inputs: indexing it (an int, a slice, an
    index tensor or array) returns float32 model inputs of only the items asked for, so uint8
    pixels are converted batch by batch, never all at once. ``len()`` and ``shape`` as a
    tensor's."""

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data

    def __len__(self) -> int:
        return self._data.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self._data.shape

    def __getitem__(self, index: object) -> torch.Tensor:
        part = self._data[index]  # type: ignore[index]
        return pixels_to_float(part) if part.dtype == torch.uint8 else part


class ArrayDataset(Dataset):
    """All samples in memory: inputs ``data`` ``(N, ...)``, labels ``y`` int64 ``(N,)``.

    ``data`` is float32, or uint8 pixels (image loaders keep those: 1 byte per value instead
    of 4); a uint8 value ``v`` stands for the model input ``v / 255``. ``inputs[idx]`` gives
    float32 inputs of the items asked for (training and evaluation read batches this way);
    ``x`` is the whole set as float32 (made on first use and kept, 4 bytes per value: for
    large image sets index ``inputs`` instead). ``classes[c]`` is the name of class id ``c``
    (``None`` when the source has no names). Labels keep their original ids in
    :meth:`subset`, so splits stay comparable.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[str] | None = None) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if not (x.is_floating_point() or x.dtype == torch.uint8):
            raise ValueError(f"x must be a float tensor or uint8 pixels, got {x.dtype}")
        if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}")
        if x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} disagree on N")
        self.data = x if x.dtype == torch.uint8 else x.to(torch.float32)
        self.y = y.to(torch.int64)
        self.classes = list(classes) if classes is not None else None
        self._x: torch.Tensor | None = None

    @property
    def inputs(self) -> Inputs:
        """float32 inputs, converted only for the items indexed: ``ds.inputs[idx]``."""
        return Inputs(self.data)

    @property
    def x(self) -> torch.Tensor:
        """float32 ``(N, ...)``: ``data`` itself when float, else made from the pixels once."""
        if self.data.dtype != torch.uint8:
            return self.data
        if self._x is None:
            self._x = pixels_to_float(self.data)
        return self._x

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.y[index]

    def __repr__(self) -> str:
        n_cls = len(self.classes) if self.classes is not None else "?"
        shape, dtype = tuple(self.data.shape), str(self.data.dtype).removeprefix("torch.")
        return f"ArrayDataset(x={shape} {dtype}, y={tuple(self.y.shape)}, classes={n_cls})"

    @property
    def num_classes(self) -> int:
        """``len(classes)``, else ``max(y) + 1`` (0 when empty)."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.y.max()) + 1 if len(self) else 0

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ArrayDataset:
        """A new dataset with the samples at ``indices`` (same class list, same label ids, the
        same storage type)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.data[idx], self.y[idx], self.classes)


# --------------------------------------------------------------------------- IDX files


#: More dimensions than numpy arrays can have (32 in numpy 1.x); real IDX files have 1 to 4.
IDX_MAX_DIMS = 32


def _read_exactly(fh: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes (fewer at the end of the file), read in chunks: a gzip stream that
    inflates to far more than its header declares is never held in memory beyond ``size``."""
    chunks, left = [], size
    while left > 0 and (chunk := fh.read(min(left, 1 << 24))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _parse_idx(path: Path, fh: IO[bytes]) -> np.ndarray:
    head = _read_exactly(fh, 4)
    if len(head) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(head)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    magic = int.from_bytes(head, "big")
    if zero != 0 or ndim == 0:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x} (not an IDX file)")
    if type_code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type byte 0x{type_code:02x}")
    if ndim > IDX_MAX_DIMS:
        raise DatasetError(f"{path}: {ndim} dimensions, more than the {IDX_MAX_DIMS} supported")
    header_len = 4 + 4 * ndim
    raw_dims = _read_exactly(fh, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header: {ndim} dims need {header_len} bytes")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow, however large
    size = os.fstat(fh.fileno()).st_size - header_len if path.suffix != ".gz" else None
    if size is not None and size != expected:  # a plain file: its size says it at once
        problem = "truncated" if size < expected else "trailing bytes"
        raise DatasetError(
            f"{path}: {problem}: dims {dims} need {expected} data bytes, found {size}"
        )
    data = _read_exactly(fh, expected + 1)  # one byte more: are there trailing bytes?
    if len(data) < expected:
        raise DatasetError(
            f"{path}: truncated: dims {dims} need {expected} data bytes, found {len(data)}"
        )
    if len(data) > expected:  # only the gzip stream's first extra byte was read
        raise DatasetError(f"{path}: trailing bytes: dims {dims} need {expected} data bytes")
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(dims)
    except ValueError as e:  # a zero dim beside huge ones: no data, but no numpy shape either
        raise DatasetError(f"{path}: dims {dims} are not an array shape ({e})") from None
    return array.astype(dtype.newbyteorder("="), copy=True)


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into an array of its declared shape.

    Magic ``0x00000803`` gives uint8 images ``(N, H, W)``, ``0x00000801`` uint8 labels
    ``(N,)``; the other IDX element types are read too (as native-endian arrays). The header is
    checked before the data are read, and no more data are read than it declares: a corrupt
    header, a truncated file, trailing bytes or a gzip stream that inflates beyond the declared
    size (a gzip bomb) is a :class:`DatasetError` naming the file, and memory stays within the
    declared size.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            return _parse_idx(path, fh)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e


def save_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as one IDX file (the inverse of :func:`load_idx`): uint8 (type 0x08)
    or int32 (0x0C, big-endian; labels beyond 255). Written to a temporary file, then renamed."""
    path = Path(path)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    if array.dtype not in codes or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX arrays here are uint8 or int32, 1-D or more, got {array.dtype}")
    header = struct.pack(">HBB", 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(
        header + np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes()
    )
    tmp.replace(path)
    return path


def _find_file(directory: Path, name: str) -> Path:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory}: neither {name} nor {name}.gz found")


def load_idx_dir(
    directory: str | os.PathLike[str], split: Split = "train", classes: list[str] | None = None
) -> ArrayDataset:
    """Load ``split`` from the four standard MNIST-style IDX files in ``directory``.

    Returns inputs ``(N, 1, H, W)`` (uint8 pixels, read as ``v / 255``) and y int64 ``(N,)``.
    """
    directory = Path(directory)
    image_name, label_name = IDX_FILES[_check_split(split)]
    image_path = _find_file(directory, image_name)
    label_path = _find_file(directory, label_name)
    images = load_idx(image_path)
    labels = load_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{image_path}: expected uint8 (N, H, W) images, got {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{label_path}: expected 1-D integer labels (IDX type 0x08 bytes, or 0x0C int32 "
            f"beyond 255), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{label_path}: negative labels ({int(labels.min())})")
    if len(images) != len(labels):
        raise DatasetError(
            f"{directory}: {image_path.name} has {len(images)} images but "
            f"{label_path.name} has {len(labels)} labels"
        )
    x = torch.from_numpy(images).unsqueeze(1)  # uint8 pixels: v / 255 when read
    return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)), classes)


# ---------------------------------------------------------------- the MNIST family


@dataclass(frozen=True)
class Family:
    """Where one MNIST-style dataset is downloaded from, and what its files must hash to."""

    mirrors: tuple[str, ...]
    md5: dict[str, str]
    classes: tuple[str, ...]
    search_dirs: tuple[str, ...] = ()
    hint: str = ""


MNIST_FAMILY: dict[str, Family] = {
    "mnist": Family(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": Family(
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        # Debian's dataset-fashion-mnist ships the four .gz files here (recompressed, so
        # their md5 differs from upstream's; the IDX checks still apply).
        search_dirs=("/usr/share/datasets/fashion-mnist",),
        hint="or install Debian's copy: apt-get install dataset-fashion-mnist "
        "(files in /usr/share/datasets/fashion-mnist)",
    ),
    "kmnist": Family(
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def data_home(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``root``, else ``$DEEPMETRIC_DATA``, else ``~/.cache/deepmetric``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("DEEPMETRIC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepmetric"


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=60)


def download_file(
    url: str, dest: str | os.PathLike[str], md5: str, *, fetch: Fetch | None = None
) -> Path:
    """Download ``url`` to ``dest``: a temporary file in the same folder, md5 checked, renamed.

    ``fetch(url)`` returns a readable binary stream (default: ``urllib.request.urlopen``).
    A checksum mismatch raises :class:`DatasetError`; ``dest`` is then left untouched.
    Network errors propagate as ``OSError`` (``urllib.error.URLError`` is one).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, contextlib.closing((fetch or _urlopen)(url)) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5.lower():
            raise DatasetError(
                f"{url}: checksum mismatch for {dest.name}: "
                f"md5 {digest.hexdigest()}, expected {md5.lower()}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _has_split(directory: Path, split: Split) -> bool:
    return all(
        (directory / n).is_file() or (directory / f"{n}.gz").is_file() for n in IDX_FILES[split]
    )


def download_first(
    urls: Sequence[str], dest: str | os.PathLike[str], md5: str, *, fetch: Fetch | None = None
) -> Path:
    """:func:`download_file` from the first of ``urls`` that works (mirrors, in order); a
    :class:`DatasetError` "the download failed (...)" naming every failure otherwise."""
    failures: list[str] = []
    for url in urls:
        try:
            return download_file(url, dest, md5, fetch=fetch)
        except DatasetError as e:
            failures.append(str(e))
        except OSError as e:
            failures.append(f"{url}: {e}")
    raise DatasetError(f"the download failed ({'; '.join(failures)})")


def _download_split(
    family: Family, target: Path, split: Split, mirrors: Sequence[str], fetch: Fetch | None
) -> str | None:
    """Download the split's two ``.gz`` files into ``target``; the failure, or None."""
    for name in IDX_FILES[split]:
        gz = f"{name}.gz"
        if (target / name).is_file() or (target / gz).is_file():
            continue
        urls = [mirror.rstrip("/") + "/" + gz for mirror in mirrors]
        try:
            download_first(urls, target / gz, family.md5[gz], fetch=fetch)
        except DatasetError as e:
            return str(e)
    return None


def fetch_mnist_family(
    name: str,
    split: Split = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    fetch: Fetch | None = None,
) -> Path:
    """The folder holding ``split`` of ``name`` (``mnist``, ``fashion-mnist``, ``kmnist``).

    Precedence, first match wins:

    1. ``data_home(root)/name`` (``root``, else ``$DEEPMETRIC_DATA``, else
       ``~/.cache/deepmetric``) when it already holds the split's two files, so a data set
       you put there (or set ``DEEPMETRIC_DATA`` to) is always the one read;
    2. ``search_dirs`` (default: the family's system folders, e.g. Debian's
       ``/usr/share/datasets/fashion-mnist``);
    3. a download of the two ``.gz`` files from ``mirrors`` (md5-checked) into
       ``data_home(root)/name``.

    Files already present (``.gz`` or not) are trusted as they are; their IDX structure is
    checked on load.
    """
    if name not in MNIST_FAMILY:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(MNIST_FAMILY)}")
    family = MNIST_FAMILY[name]
    split = _check_split(split)
    target = data_home(root) / name
    if _has_split(target, split):
        return target
    dirs = family.search_dirs if search_dirs is None else search_dirs
    for directory in map(Path, dirs):
        if _has_split(directory, split):
            return directory
    reason = "downloading is off (download=False)"
    if download:
        failure = _download_split(family, target, split, mirrors or family.mirrors, fetch)
        if failure is None:
            return target
        reason = failure
    files = ", ".join(f"{n}.gz" for n in IDX_FILES[split])
    hint = f"; {family.hint}" if family.hint else ""
    raise DatasetError(
        f"{name} ({split}): no local copy, and {reason}. Put {files} (gzipped or not) "
        f"into {target} (the cache folder; set DEEPMETRIC_DATA or root= to move it){hint}"
    )


def load_mnist_family(name: str, split: Split = "train", **kwargs: object) -> ArrayDataset:
    """``mnist``/``fashion-mnist``/``kmnist`` as x ``(N, 1, 28, 28)`` in [0, 1], y ``(N,)``.

    Keyword arguments go to :func:`fetch_mnist_family` (``root``, ``download``, ...).
    """
    directory = fetch_mnist_family(name, split, **kwargs)  # type: ignore[arg-type]
    return load_idx_dir(directory, split, list(MNIST_FAMILY[name].classes))


# ------------------------------------------------------------------------ image folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DatasetError(
            f"{class_dir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _decode_image(
    path: Path, mode: str | None, size: tuple[int, int], resample: str = "bilinear"
) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 array (``mode`` None: ``(H, W)`` when the source is
    grayscale). Decoded, turned upright and brought to 8 bits exactly as inference does it
    (:func:`~deepmetric.data.preprocess.decode_image`, :func:`~.preprocess.upright_8bit`),
    resized with PIL's ``resample`` filter."""
    from PIL import Image

    from deepmetric.data.preprocess import decode_image, upright_8bit

    try:
        img = decode_image(path, str(path), size=size)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    try:
        upright, gray = upright_8bit(img)
        target = mode or ("L" if gray else "RGB")
        filter_ = getattr(Image.Resampling, resample.upper())
        out = upright.convert(target).resize((size[1], size[0]), filter_)
        return np.asarray(out, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot convert image ({e})") from None
    finally:
        img.close()


class _PixelBuffer:
    """uint8 ``(N, C, H, W)`` filled image by image, so that loading holds the pixels once
    (no list of decoded arrays to stack, no float32 copy). Grayscale until the first colour
    image when the mode is automatic: then the images so far are repeated into 3 channels."""

    def __init__(self, n: int, size: tuple[int, int], rgb: bool) -> None:
        self.pixels = np.empty((n, 3 if rgb else 1, *size), dtype=np.uint8)

    def put(self, i: int, array: np.ndarray) -> None:
        if array.ndim == 3 and self.pixels.shape[1] == 1:  # first colour image: go RGB
            rgb = np.empty((len(self.pixels), 3, *self.pixels.shape[2:]), dtype=np.uint8)
            rgb[:i] = self.pixels[:i]  # broadcast the gray channel to all three
            self.pixels = rgb
        self.pixels[i] = array.transpose(2, 0, 1) if array.ndim == 3 else array


def load_image_folder(
    directory: str | os.PathLike[str],
    split: Split = "train",
    *,
    mode: Literal["L", "RGB"] | None = None,
    size: int | tuple[int, int] = 64,
    resample: str = "bilinear",
) -> ArrayDataset:
    """One subfolder per class (sorted names give ids ``0..C-1``), images resized to ``size``.

    ``size`` is ``(H, W)`` or one int for both. ``mode`` ``"L"`` or ``"RGB"``; by default
    RGB unless every image is grayscale. ``resample``: PIL's filter (a name of
    :data:`~deepmetric.data.preprocess.RESAMPLE`). Returns inputs ``(N, C, H, W)``, kept as
    uint8 pixels (read as floats ``v / 255`` in [0, 1]): memory N x C x H x W bytes, filled as
    the images are decoded.
    Hidden files and non-image files are ignored; only the class folders' direct children
    are read. ``split="test"`` needs ``directory/train`` and ``directory/test``: class ids
    then come from the union of both splits' class folders, so they agree across splits.
    Without those two subfolders the folder is the train split and ``"test"`` is an error.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if mode not in (None, "L", "RGB"):
        raise ValueError(f"mode must be 'L', 'RGB' or None, got {mode!r}")
    from deepmetric.data.preprocess import RESAMPLE

    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    split = _check_split(split)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(set(_class_dirs(root / "train")) | set(_class_dirs(root / "test")))
        root = root / split
    elif split == "test":
        raise DatasetError(f"{root}: no train/ and test/ subfolders, so there is no test split")
    else:
        classes = _class_dirs(root)
    present = _class_dirs(root)
    if not present:
        raise DatasetError(f"{root}: no class folders")
    class_id = {name: i for i, name in enumerate(classes)}  # O(1) per image, not O(classes)
    files = [(path, class_id[name]) for name in present for path in _image_files(root / name)]
    buffer = _PixelBuffer(len(files), hw, rgb=mode == "RGB")
    for i, (path, _) in enumerate(files):
        buffer.put(i, _decode_image(path, mode, hw, resample))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ArrayDataset(torch.from_numpy(buffer.pixels), labels, classes)


# ------------------------------------------------------------------------------- .npz


#: Deflate expands at most about 1032-fold: a member declaring more than that per stored byte
#: cannot be real, so it is refused before numpy allocates what its header asks for.
_DEFLATE_MAX_RATIO = 1032


def _check_npz_member(zf: zipfile.ZipFile, key: str, path: Path, disk_size: int) -> None:
    """Refuse member ``key`` unless its ``.npy`` header's shape x itemsize is exactly the bytes
    the member holds, and the member's declared size could come from a file this large: so no
    array is allocated larger than the file can fill. Reads only the header."""
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        bound = disk_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        bound = disk_size * _DEFLATE_MAX_RATIO
    else:
        raise DatasetError(f"{path}: {key} uses an unsupported zip compression (stored or deflate)")
    if info.file_size > bound:
        raise DatasetError(
            f"{path}: {key} declares {info.file_size:,} bytes, more than a {disk_size:,}-byte "
            "file can hold"
        )
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:  # 2.0 and 3.0 differ only in the header's text encoding
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        header = fh.tell()
    if dtype.hasobject:
        raise DatasetError(f"{path}: {key} holds Python objects, not numbers or strings")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header:
        raise DatasetError(
            f"{path}: {key} declares shape {tuple(shape)} {dtype} ({declared:,} bytes) but holds "
            f"{info.file_size - header:,} bytes"
        )


def _npz_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` at ``path`` that it has, each checked against the
    file (:func:`_check_npz_member`) before it is read."""
    disk_size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        members = {n.removesuffix(".npy") for n in zf.namelist()}
        present = [k for k in keys if k in members]
        for key in present:
            _check_npz_member(zf, key, path, disk_size)
    with np.load(path, allow_pickle=False) as arrays:
        return {k: arrays[k] for k in present}


def load_npz(file: str | os.PathLike[str], split: Split = "train") -> ArrayDataset:
    """Arrays ``x`` (N, D), (N, H, W) or (N, C, H, W) and ``y`` (N,) integer from a ``.npz``.

    uint8 ``x`` is scaled by 1/255, float ``x`` kept (as float32); ``(N, H, W)`` gains a
    channel axis. Optional ``classes`` (strings) names the ids: ``y`` then indexes it.
    Without ``classes``, labels that are not already ``0..C-1`` are label values, remapped
    to ``0..C-1`` in sorted order over ``y`` and ``y_test`` together (so both splits agree),
    the values kept as the class names (``"1000000007"``): a label is never used as a size.
    ``split="test"`` reads ``x_test``/``y_test`` from the same file. Each array's declared
    size is checked against the file before it is read.
    """
    path = Path(file)
    xkey, ykey = ("x", "y") if _check_split(split) == "train" else ("x_test", "y_test")
    other = "y_test" if ykey == "y" else "y"
    try:
        if not zipfile.is_zipfile(path):
            with path.open("rb") as fh:
                single = fh.read(6) == b"\x93NUMPY"
            raise DatasetError(
                f"{path}: a single .npy array, not an .npz archive"
                if single
                else f"{path}: not a readable .npz file (not a zip archive)"
            )
        arrays = _npz_arrays(path, (xkey, ykey, other, "classes"))
        x = _npz_key(arrays, xkey, path)
        y = _npz_key(arrays, ykey, path)
        names = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e})") from e
    _check_npz_y(y, len(x), path, ykey)
    labels, classes = _npz_labels(y, arrays.get(other), names, path, ykey)
    return ArrayDataset(_npz_x(x, path, xkey), labels, classes)


def _npz_key(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        raise DatasetError(f"{path}: missing array {key!r}")
    return arrays[key]


def _npz_x(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim not in (2, 3, 4):
        raise DatasetError(
            f"{path}: {key} must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}"
        )
    if x.dtype == np.uint8:
        t = torch.from_numpy(x)  # pixels, read as v / 255
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # beyond float32: inf, counted just below
            t = torch.from_numpy(x.astype(np.float32))
        bad = int(t.numel() - torch.isfinite(t).sum())
        if bad:
            items = int((~torch.isfinite(t.reshape(len(t), -1))).any(1).sum())
            raise DatasetError(
                f"{path}: {key} holds {bad:,} non-finite values (NaN or inf, after conversion "
                f"to float32) in {items:,} of its {len(t):,} items: fix or drop those items"
            )
    else:
        raise DatasetError(f"{path}: {key} must be uint8 or float, got {x.dtype}")
    return t.unsqueeze(1) if t.ndim == 3 else t


def _check_npz_y(y: np.ndarray, n: int, path: Path, key: str) -> None:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: {key} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DatasetError(f"{path}: {key} has {len(y)} labels for {n} samples")


def _npz_labels(
    y: np.ndarray, other: np.ndarray | None, names: list[str] | None, path: Path, key: str
) -> tuple[torch.Tensor, list[str] | None]:
    """``(labels int64, classes)``: ``y`` as ids ``0..C-1``. With ``names``, ``y`` must index
    them; else values already ``0..C-1`` (over both splits) are kept as they are (``classes``
    None), and any others are ranked among the sorted values, which become the names."""
    if names is not None:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(names)):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DatasetError(
                f"{path}: {key} has label {bad}, but classes names ids 0..{len(names) - 1}"
            )
        return torch.from_numpy(y.astype(np.int64)), names
    values = {int(v) for v in np.unique(y)}  # Python ints: exact for int64 and uint64 alike
    if other is not None and other.ndim == 1 and np.issubdtype(other.dtype, np.integer):
        values |= {int(v) for v in np.unique(other)}
    ordered = sorted(values)
    if not ordered or (ordered[0] == 0 and ordered[-1] == len(ordered) - 1):
        return torch.from_numpy(y.astype(np.int64)), None
    rank = {v: i for i, v in enumerate(ordered)}
    seen, inverse = np.unique(y, return_inverse=True)
    ids = np.array([rank[int(v)] for v in seen], dtype=np.int64)[inverse.reshape(-1)]
    return torch.from_numpy(ids), [str(v) for v in ordered]


# ------------------------------------------------------------------------- dispatch


def _check_split(split: str) -> Split:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split  # type: ignore[return-value]


# --------------------------------------------------------------------------- splits


def train_val_split(
    ds: ArrayDataset, val_fraction: float, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Stratified split: about ``val_fraction`` of each class goes to validation, and at
    least 2 items of a class of 4 or more (so that even a small data set has validation pairs
    of every class: a verification threshold needs them).

    Every class keeps at least one training sample (two when it gives two to validation).
    Deterministic for ``seed``; both parts keep the original sample order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = ds.y.numpy()
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(round(val_fraction * len(idx)), len(idx) - 1)
        if val_fraction > 0 and len(idx) >= 4:
            n_val = max(n_val, 2)
        val.append(idx[:n_val])
    val_mask = np.zeros(len(labels), dtype=bool)
    if val:
        val_mask[np.concatenate(val)] = True
    return ds.subset(np.flatnonzero(~val_mask)), ds.subset(np.flatnonzero(val_mask))


def val_class_count(n_classes: int, spec: int | float) -> int:
    """How many of ``n_classes`` training classes ``spec`` holds out for validation: an int is
    the count itself, a float in (0, 1) the fraction ``round(spec * n_classes)`` (halves up).

    ``ValueError`` (one line, naming the numbers) unless the count is at least 2 (validation
    compares classes) and leaves at least 2 classes to train on.
    """
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise ValueError(f"expected a count or a fraction, got {spec!r}")
    if isinstance(spec, float):
        if not (math.isfinite(spec) and 0.0 < spec < 1.0):
            raise ValueError(
                f"a fraction of the training classes must be in (0, 1), got {spec} "
                "(a count is an integer)"
            )
        count = math.floor(spec * n_classes + 0.5)
        what = f"{spec} of {n_classes} training classes is {count}"
    else:
        count = spec
        what = f"{count} of {n_classes} training classes"
    if count < 2:
        raise ValueError(f"{what}: at least 2 validation classes are needed (to compare them)")
    if n_classes - count < 2:
        raise ValueError(f"{what}: leaves {n_classes - count} to train on, at least 2 are needed")
    return count


def draw_val_classes(
    class_ids: Iterable[int], spec: Sequence[int] | int | float, seed: int
) -> list[int]:
    """The class-disjoint validation classes ``spec`` names among the training classes
    ``class_ids`` (``train.val_classes``), as sorted ids.

    - a list (or tuple) of ids: those ids themselves, sorted, without repeats (they are not
      checked against ``class_ids``: the caller says whether they have items);
    - an int ``n``: ``n`` classes drawn at random (a count, so ``1`` means one class, not the
      list ``[1]``);
    - a float in (0, 1): that fraction of the classes, ``round(spec * len(class_ids))``
      (see :func:`val_class_count`).

    A draw is a pure function of the *set* of ``class_ids`` (their order and repeats do not
    matter), ``spec`` and ``seed``: the first ``n`` of a seeded permutation of the sorted ids,
    so a larger count with the same seed holds out a superset of a smaller one. Training and
    evaluation both call this, so they agree on the classes. ``ValueError`` when the count is
    under 2 or leaves under 2 classes to train on.

    Example::

        draw_val_classes(range(10), 3, seed=0)    # three of the ten ids, e.g. [1, 4, 8]
        draw_val_classes(range(1000), 0.1, seed=0)  # 100 ids
    """
    if isinstance(spec, list | tuple):
        return sorted({int(c) for c in spec})
    ids = np.unique(np.fromiter((int(c) for c in class_ids), dtype=np.int64))
    count = val_class_count(len(ids), spec)
    drawn = np.random.default_rng(seed).permutation(ids)[:count]
    return sorted(int(c) for c in drawn)


def class_split(
    ds: ArrayDataset, classes: Iterable[int | str]
) -> tuple[ArrayDataset, ArrayDataset]:
    """``(seen, unseen)``: samples whose label is in ``classes``, and all the others.

    For the open-set protocol (train on some classes, test on classes never seen).
    ``classes`` holds ids or names from ``ds.classes``; labels keep their ids.
    """
    ids = [_class_id(ds, c) for c in classes]
    mask = np.isin(ds.y.numpy(), np.asarray(ids, dtype=np.int64))
    return ds.subset(np.flatnonzero(mask)), ds.subset(np.flatnonzero(~mask))


def _class_id(ds: ArrayDataset, c: int | str) -> int:
    if isinstance(c, str):
        if ds.classes is None or c not in ds.classes:
            raise ValueError(f"unknown class name {c!r}")
        return ds.classes.index(c)
    if not 0 <= int(c) < ds.num_classes:
        raise ValueError(f"class id {c} out of range 0..{ds.num_classes - 1}")
    return int(c)
