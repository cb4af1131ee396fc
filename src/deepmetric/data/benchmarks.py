"""The four standard benchmarks of deep metric learning, with their class-disjoint splits.

- ``cub200[:DIR]``: CUB-200-2011 (Wah et al. 2011), 11,788 photos of 200 bird species, in
  ``CUB_200_2011.tgz`` (about 1.1 GB). Split: classes 1-100 train (5,864 images), classes
  101-200 test (5,924 images).
- ``cars196[:DIR]``: Cars196 (Krause et al. 2013), 16,185 photos of 196 car models, in
  ``car_ims.tgz`` (about 1.9 GB) and ``cars_annos.mat``. Split: classes 1-98 train (8,054
  images), classes 99-196 test (8,131 images).
- ``sop[:DIR]``: Stanford Online Products (Song et al. 2016), 120,053 photos of 22,634 eBay
  products, in ``Stanford_Online_Products.zip`` (about 2.9 GB). Split: the archive's own
  ``Ebay_train.txt`` (11,318 products, 59,551 images) and ``Ebay_test.txt`` (11,316
  products, 60,502 images).
- ``inshop[:DIR]``: DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016), 52,712 photos of
  7,982 clothing items, in ``img.zip`` and ``list_eval_partition.txt``. Split: that list's
  ``train`` (3,997 items, 25,882 images), and its ``query`` (14,218 images) and ``gallery``
  (12,612 images) of the same 3,985 test items: :func:`inshop_query_gallery` returns those
  two, and ``split="test"`` both, queries first.

(Archive sizes are approximate; the image counts are those the literature reports.)

Sources (:data:`BENCHMARKS` holds the URLs and md5s): CUB from Caltech DATA
(``https://data.caltech.edu/records/65de6-vp158``, md5 ``97eceeb1...``); Cars196 from
``http://imagenet.stanford.edu/internal/car196/`` (md5s ``d5c8f0aa...`` and ``b407c608...``);
SOP from ``ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip`` (md5 ``7f73d41a...``).
These md5s are the values that public loaders (pytorch-metric-learning, torchvision-based
metric-learning code) check for the same files. **In-Shop has no download**: its files are
on Google Drive behind a confirmation page
(``https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html``), and no checksum
or exact size of them is published anywhere we could find, so they are not verified: put
``img.zip`` (or its ``img/`` folder) and ``list_eval_partition.txt`` (or ``Eval/``) into DIR
by hand; the list's first line (its row count) and every listed image are checked instead.
The Stanford hosts have been unreliable for years: when a download fails, the error says
which file to put where.

``DIR`` (default ``data_home()/NAME``, e.g. ``~/.cache/deepmetric/cub200``) holds the
archives, downloaded there (md5-checked, atomically renamed) unless already present. An
archive found there is md5-checked too before it is unpacked (a damaged one is refused in one
line naming the file and both checksums); it is unpacked into a temporary folder and renamed
into place, so an interrupted extraction is never taken for a finished one; member names are
checked first (no absolute path, no ``..``, no links). After that the archive may be deleted.

Images are **read lazily**: the loaders return an :class:`ImageFiles`, which holds the paths,
labels and class names only, and decodes (with the folder loader's code: upright, 8-bit,
resized with PIL's bilinear filter to ``size``, RGB) just the images indexed. Label ids are
the positions of the classes *within the split*, in the data set's own class order (CUB's and
Cars196's class numbers, SOP's ``class_id``, In-Shop's item ids); ``classes`` names them
(``001.Black_footed_Albatross``, ``AM General Hummer SUV 2000``, ``bicycle_final/111085122871``,
``id_00000001``). ``ds.load()`` decodes a (small) set into an in-memory
:class:`~deepmetric.data.datasets.ArrayDataset`.

Nothing here has been run on the real archives (no network where it was written): the tests
build tiny archives in each set's layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from deepmetric.data.datasets import (
    ArrayDataset,
    DatasetError,
    Fetch,
    _decode_image,
    data_home,
    download_first,
    pixels_to_float,
)
from deepmetric.data.preprocess import RESAMPLE

# ------------------------------------------------------------------- the archives


@dataclass(frozen=True)
class Archive:
    """One file of a benchmark: ``name`` in DIR, fetched from ``url`` (``None``: by hand only),
    checked against ``md5`` (``None``: no published checksum). ``top``: the folder it unpacks
    to (``None``: a plain file, not unpacked)."""

    name: str
    url: str | None
    md5: str | None
    top: str | None


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's spec name, title, home page (where to get its files by hand) and files."""

    name: str
    title: str
    page: str
    archives: tuple[Archive, ...]


BENCHMARKS: dict[str, Benchmark] = {
    "cub200": Benchmark(
        "cub200",
        "CUB-200-2011",
        "https://data.caltech.edu/records/65de6-vp158",
        (
            Archive(
                "CUB_200_2011.tgz",
                "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                "97eceeb196236b17998738112f37df78",
                "CUB_200_2011",
            ),
        ),
    ),
    "cars196": Benchmark(
        "cars196",
        "Cars196",
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        (
            Archive(
                "car_ims.tgz",
                "http://imagenet.stanford.edu/internal/car196/car_ims.tgz",
                "d5c8f0aa497503f355e17dc7886c3f14",
                "car_ims",
            ),
            Archive(
                "cars_annos.mat",
                "http://imagenet.stanford.edu/internal/car196/cars_annos.mat",
                "b407c6086d669747186bd1d764ff9dbc",
                None,
            ),
        ),
    ),
    "sop": Benchmark(
        "sop",
        "Stanford Online Products",
        "https://cvgl.stanford.edu/projects/lifted_struct/",
        (
            Archive(
                "Stanford_Online_Products.zip",
                "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                "7f73d41a2f44250d4779881525aea32e",
                "Stanford_Online_Products",
            ),
        ),
    ),
    "inshop": Benchmark(
        "inshop",
        "DeepFashion In-Shop",
        "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        (
            Archive("img.zip", None, None, "img"),
            Archive("list_eval_partition.txt", None, None, None),
        ),
    ),
}

#: CUB-200-2011 and Cars196: the classes numbered up to this are the training split.
TRAIN_CLASSES = {"cub200": 100, "cars196": 98}

Split = Literal["train", "test"]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _ready(directory: Path, archive: Archive) -> bool:
    if archive.top is not None:
        return (directory / archive.top).is_dir()
    if archive.name == "list_eval_partition.txt":  # In-Shop's list may sit in Eval/
        return (directory / archive.name).is_file() or (directory / "Eval" / archive.name).is_file()
    return (directory / archive.name).is_file()


def fetch_benchmark(
    name: str,
    directory: str | os.PathLike[str] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    md5: Mapping[str, str] | None = None,
    fetch: Fetch | None = None,
) -> Path:
    """The folder of benchmark ``name`` with every file present and every archive unpacked.

    ``directory`` defaults to ``data_home(root)/name``. A file missing there is downloaded
    from its official URL, or from ``mirrors`` (base URLs, the file name appended) when
    given; ``md5`` overrides the published checksums by file name. Raises
    :class:`~deepmetric.data.datasets.DatasetError` (one line) when a file is missing and
    cannot be downloaded, or its checksum is not the published one.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    folder = Path(directory) if directory is not None else data_home(root) / name
    for archive in bench.archives:
        if archive.top is not None and _ready(folder, archive):
            continue  # unpacked before (a plain file is checked each time: they are small)
        expected = (md5 or {}).get(archive.name, archive.md5)
        path = folder / archive.name
        if not path.is_file() and _ready(folder, archive):
            continue  # In-Shop's Eval/list_eval_partition.txt
        if path.is_file():
            if expected is not None and (got := _md5(path)) != expected.lower():
                raise DatasetError(
                    f"{path}: checksum mismatch: md5 {got}, expected {expected.lower()} "
                    f"(damaged, or not the official {bench.title} file); delete it and fetch "
                    "it again"
                )
        else:
            _download(bench, archive, path, expected, download, mirrors, fetch)
        if archive.top is not None:
            _unpack(path, folder, archive.top)
    return folder


def _download(
    bench: Benchmark,
    archive: Archive,
    path: Path,
    expected: str | None,
    download: bool,
    mirrors: Sequence[str] | None,
    fetch: Fetch | None,
) -> None:
    urls = [m.rstrip("/") + "/" + archive.name for m in mirrors] if mirrors else []
    if not urls and archive.url is not None:
        urls = [archive.url]
    if not download:
        reason = "downloading is off (download=False)"
    elif not urls or expected is None:
        reason = "it has no download URL with a published checksum"
    else:
        try:
            download_first(urls, path, expected, fetch=fetch)
            return
        except DatasetError as e:
            reason = str(e)
    raise DatasetError(
        f"{bench.name}: {path} is missing, and {reason}. Get {archive.name} from {bench.page} "
        f"and put it into {path.parent} (set DEEPMETRIC_DATA, root= or {bench.name}:DIR to move it)"
    )


def _check_member(archive: Path, name: str, is_link: bool = False) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
        raise DatasetError(
            f"{archive}: member {name!r} is an absolute path, climbs out with '..' or is a "
            "link: refused; delete the archive and fetch it again"
        )


def _unpack(archive: Path, folder: Path, top: str) -> None:
    """Unpack ``archive`` into a temporary folder inside ``folder``, then rename its ``top``
    folder into place (other top-level entries, such as CUB's ``attributes.txt``, are
    dropped)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", dir=folder))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        _check_member(archive, info.filename)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    members = tf.getmembers()
                    for m in members:
                        _check_member(archive, m.name, m.issym() or m.islnk())
                    # the "data" filter (Python 3.10.12+) refuses what the checks above
                    # missed: devices, odd permissions
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tf.extractall(tmp, members=members, **safe)  # type: ignore[arg-type]
        except DatasetError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise DatasetError(
                f"{archive}: cannot unpack ({e}); delete it and fetch it again"
            ) from None
        if not (tmp / top).is_dir():
            raise DatasetError(f"{archive}: holds no {top}/ folder: not the expected archive")
        os.replace(tmp / top, folder / top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ lazy images


def _positions(index: object, n: int) -> tuple[list[int], bool]:
    """``(positions, scalar)`` of an int, a slice, or a 1-D int / bool tensor, array or list."""
    if isinstance(index, (int, np.integer)) or (
        isinstance(index, torch.Tensor) and index.ndim == 0
    ):
        i = int(index)  # type: ignore[arg-type]
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return [i % n], True
    if isinstance(index, slice):
        return list(range(n))[index], False
    idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    positions = [int(i) for i in idx.reshape(-1)]
    if any(not -n <= i < n for i in positions):
        raise IndexError(f"index out of range for {n} items")
    return [i % n for i in positions], False


class _View:
    """Index a view to decode only those images: ``uint8`` pixels or float32 inputs."""

    def __init__(self, owner: ImageFiles, as_float: bool) -> None:
        self._owner, self._float = owner, as_float

    def __len__(self) -> int:
        return len(self._owner)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._owner), *self._owner.item_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self._float else torch.uint8

    def dim(self) -> int:
        return 4

    def __getitem__(self, index: object) -> torch.Tensor:
        pixels = self._owner.pixels(index)
        return pixels_to_float(pixels) if self._float else pixels


class ImageFiles(Dataset):
    """A labelled set of image files, decoded only when indexed.

    ``paths[i]`` is item i's file, ``y`` int64 ``(N,)`` its label, ``classes[c]`` the name of
    label c. ``ds[i]`` is ``(float32 (C, H, W) in [0, 1], label)``; ``ds.inputs[idx]`` float32
    ``(n, C, H, W)`` and ``ds.data[idx]`` uint8 pixels of only the items asked for (the
    attributes an :class:`~deepmetric.data.datasets.ArrayDataset` has, so batch code reads
    both alike). ``size`` ``(H, W)``, ``mode`` ``"RGB"`` (C = 3) or ``"L"`` (C = 1).
    A file that is missing or does not decode raises
    :class:`~deepmetric.data.datasets.DatasetError` naming it when it is read.

    Nothing is cached: index it in batches (a ``DataLoader`` with workers over ``ds``, or
    ``ds.inputs[batch]``). ``ds.inputs[:]`` decodes the whole set at once, 4 x N x C x H x W
    bytes (about 3.5 GB for CUB's test split at 224 x 224): code written for in-memory sets
    that does so needs batching first.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        y: torch.Tensor,
        classes: list[str],
        *,
        size: tuple[int, int] = (224, 224),
        mode: Literal["L", "RGB"] = "RGB",
        resample: str = "bilinear",
    ) -> None:
        if len(paths) != len(y):
            raise ValueError(f"{len(paths)} paths and {len(y)} labels")
        self.paths = list(paths)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.classes = list(classes)
        self.size, self.mode, self.resample = size, mode, resample

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return (3 if self.mode == "RGB" else 1, *self.size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def inputs(self) -> _View:
        return _View(self, as_float=True)

    @property
    def data(self) -> _View:
        return _View(self, as_float=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.y[index]

    def __repr__(self) -> str:
        return (
            f"ImageFiles({len(self)} images, {self.num_classes} classes, "
            f"{self.mode} {self.size[0]}x{self.size[1]}, read when indexed)"
        )

    def pixels(self, index: object) -> torch.Tensor:
        """uint8 ``(C, H, W)`` for an int, else ``(n, C, H, W)``: decoded now, not kept."""
        positions, scalar = _positions(index, len(self))
        out = np.empty((len(positions), *self.item_shape), dtype=np.uint8)
        for k, i in enumerate(positions):
            path = self.paths[i]
            if not path.is_file():
                raise DatasetError(f"{path}: image file missing")
            array = _decode_image(path, self.mode, self.size, self.resample)
            out[k] = array.transpose(2, 0, 1) if array.ndim == 3 else array
        tensor = torch.from_numpy(out)
        return tensor[0] if scalar else tensor

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageFiles:
        """The items at ``indices`` (same classes, same label ids, still lazy)."""
        positions, _ = _positions(indices, len(self))
        return ImageFiles(
            [self.paths[i] for i in positions],
            self.y[torch.as_tensor(positions, dtype=torch.int64)],
            self.classes,
            size=self.size,
            mode=self.mode,
            resample=self.resample,
        )

    def load(self) -> ArrayDataset:
        """Every image decoded into memory (N x C x H x W bytes): for small sets or subsets."""
        return ArrayDataset(self.pixels(slice(None)), self.y, self.classes)


def _files(
    directory: Path,
    what: str,
    rows: Sequence[tuple[str, str]],
    class_names: Mapping[str, str],
    opts: dict[str, object],
) -> ImageFiles:
    """An :class:`ImageFiles` of ``rows`` (relative path, class key), the classes in the order
    of ``class_names`` (key -> name); every file must exist."""
    if not rows:
        raise DatasetError(f"{directory}: {what}: no images listed")
    paths = [directory / rel for rel, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: image file missing ({len(missing)} of the {len(paths)} images of "
            f"{what} are missing)"
        )
    keys = list(class_names)
    ids = {key: i for i, key in enumerate(keys)}
    y = torch.tensor([ids[key] for _, key in rows], dtype=torch.int64)
    return ImageFiles(paths, y, [class_names[k] for k in keys], **opts)  # type: ignore[arg-type]


def _image_options(opts: dict[str, object]) -> dict[str, object]:
    """``size`` (an int or ``(H, W)``), ``mode``, ``resample`` checked and normalised."""
    size = opts.get("size", 224)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    mode = opts.get("mode") or "RGB"
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    resample = opts.get("resample", "bilinear")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    return {"size": hw, "mode": mode, "resample": resample}


def _read_table(path: Path, columns: int, header_lines: int) -> list[list[str]]:
    """Whitespace-separated rows of ``path`` (at least ``columns`` fields each)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    rows = []
    for number, line in enumerate(lines[header_lines:], start=header_lines + 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < columns:
            raise DatasetError(f"{path}: line {number} has {len(fields)} fields, not {columns}")
        rows.append(fields)
    return rows


def _int(path: Path, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}: {value!r} is not an integer id") from None


# --------------------------------------------------------------------- the sets


def _by_number(
    name: str, split: Split, numbered: Mapping[int, str], rows: list[tuple[str, int]]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """CUB / Cars196: the split's rows, and the names of its classes that have images, in
    class-number order (train: numbers up to :data:`TRAIN_CLASSES`, test: the others)."""
    first = split == "train"
    keep = sorted({c for _, c in rows if (c <= TRAIN_CLASSES[name]) == first})
    chosen = {str(c): numbered[c] for c in keep}
    return [(rel, str(c)) for rel, c in rows if str(c) in chosen], chosen


def load_cub200(directory: Path, split: Split, opts: dict[str, object]) -> ImageFiles:
    """CUB-200-2011 from its unpacked folder ``CUB_200_2011/`` (``classes.txt``,
    ``images.txt``, ``image_class_labels.txt``, ``images/``)."""
    top = directory / "CUB_200_2011"
    classes = {
        _int(top / "classes.txt", f[0]): f[1] for f in _read_table(top / "classes.txt", 2, 0)
    }
    images = {f[0]: f[1] for f in _read_table(top / "images.txt", 2, 0)}
    labels_file = top / "image_class_labels.txt"
    rows = []
    for image_id, class_id in _read_table(labels_file, 2, 0):
        if image_id not in images:
            raise DatasetError(f"{labels_file}: image {image_id} is not in images.txt")
        if (c := _int(labels_file, class_id)) not in classes:
            raise DatasetError(f"{labels_file}: class {class_id} is not in classes.txt")
        rows.append((f"images/{images[image_id]}", c))
    chosen, names = _by_number("cub200", split, classes, rows)
    return _files(top, f"cub200 ({split})", chosen, names, opts)


def load_cars196(directory: Path, split: Split, opts: dict[str, object]) -> ImageFiles:
    """Cars196 from ``cars_annos.mat`` (``annotations``: ``relative_im_path``, ``class``;
    ``class_names``) and the unpacked ``car_ims/``. Reading the MATLAB file needs scipy
    (installed with scikit-learn)."""
    from scipy.io import loadmat

    mat_path = directory / "cars_annos.mat"
    try:
        mat = loadmat(mat_path, squeeze_me=True)
        annos = np.atleast_1d(mat["annotations"])
        names = [str(n) for n in np.atleast_1d(mat["class_names"])]
        rows = [(str(a["relative_im_path"]), int(np.asarray(a["class"]).item())) for a in annos]
    except FileNotFoundError:
        raise DatasetError(f"{mat_path}: file missing") from None
    except (KeyError, ValueError, TypeError, IndexError, OSError, NotImplementedError) as e:
        raise DatasetError(f"{mat_path}: not Cars196's annotation file ({e})") from None
    numbered = {i + 1: n for i, n in enumerate(names)}
    bad = [c for _, c in rows if c not in numbered]
    if bad:
        raise DatasetError(f"{mat_path}: class {bad[0]} out of range 1..{len(names)}")
    chosen, classes = _by_number("cars196", split, numbered, rows)
    return _files(directory, f"cars196 ({split})", chosen, classes, opts)


def load_sop(directory: Path, split: Split, opts: dict[str, object]) -> ImageFiles:
    """Stanford Online Products from ``Stanford_Online_Products/Ebay_{train,test}.txt``
    (header, then ``image_id class_id super_class_id path``). A class is one product, named
    ``<category folder>/<product id>`` after its first image (``bicycle_final/111085122871``)."""
    top = directory / "Stanford_Online_Products"
    listing = top / f"Ebay_{split}.txt"
    rows, names = [], {}
    for fields in _read_table(listing, 4, 1):
        key, rel = str(_int(listing, fields[1])), fields[3]
        p = PurePosixPath(rel)
        names.setdefault(key, f"{p.parent}/{p.stem.rsplit('_', 1)[0]}")
        rows.append((rel, key))
    ordered = {k: names[k] for k in sorted(names, key=int)}
    return _files(top, f"sop ({split})", rows, ordered, opts)


def _inshop_rows(directory: Path) -> tuple[Path, list[list[str]]]:
    listing = directory / "list_eval_partition.txt"
    if not listing.is_file() and (directory / "Eval" / listing.name).is_file():
        listing = directory / "Eval" / listing.name
    rows = _read_table(listing, 3, 2)
    with listing.open(encoding="utf-8", errors="replace") as fh:
        count = fh.readline().strip()
    if not count.isdigit() or int(count) != len(rows):
        raise DatasetError(
            f"{listing}: its first line should count its {len(rows)} rows: truncated?"
        )
    statuses = {r[2] for r in rows} - {"train", "query", "gallery"}
    if statuses:
        raise DatasetError(f"{listing}: unknown evaluation status {sorted(statuses)[0]!r}")
    return listing, rows


def load_inshop(directory: Path, split: Split, opts: dict[str, object]) -> ImageFiles:
    """In-Shop's ``train`` items, or for ``"test"`` its query images followed by its gallery
    images (one label space: the test items). Retrieval in the paper's protocol searches the
    gallery for each query: :func:`inshop_query_gallery`."""
    if split == "test":
        query, gallery = _inshop_test(directory, opts)
        both = query.paths + gallery.paths
        return ImageFiles(both, torch.cat([query.y, gallery.y]), query.classes, **opts)  # type: ignore[arg-type]
    _, rows = _inshop_rows(directory)
    train = [(r[0], r[1]) for r in rows if r[2] == "train"]
    items = {k: k for k in sorted({item for _, item in train})}
    return _files(directory, "inshop (train)", train, items, opts)


def _inshop_test(directory: Path, opts: dict[str, object]) -> tuple[ImageFiles, ImageFiles]:
    _, rows = _inshop_rows(directory)
    test = [r for r in rows if r[2] != "train"]
    items = {k: k for k in sorted({r[1] for r in test})}  # one label space for both parts
    query, gallery = (
        _files(
            directory, f"inshop ({part})", [(r[0], r[1]) for r in test if r[2] == part], items, opts
        )
        for part in ("query", "gallery")
    )
    return query, gallery


def inshop_query_gallery(
    directory: str | os.PathLike[str] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = 224,
    mode: Literal["L", "RGB"] = "RGB",
    resample: str = "bilinear",
    **fetch_options: object,
) -> tuple[ImageFiles, ImageFiles]:
    """``(query, gallery)`` of DeepFashion In-Shop: 14,218 query and 12,612 gallery images of
    the same 3,985 test items, with the same ``classes`` (the items' ids, sorted) and label
    ids, so that each query is searched for among the gallery (a query's relevant items are
    the gallery images of its label). Options as :func:`load_benchmark`'s."""
    opts = _image_options({"size": size, "mode": mode, "resample": resample})
    folder = fetch_benchmark("inshop", directory, root=root, **fetch_options)  # type: ignore[arg-type]
    return _inshop_test(folder, opts)


_LOADERS = {"cub200": load_cub200, "cars196": load_cars196, "sop": load_sop, "inshop": load_inshop}
#: the benchmarks by name (``data=NAME[:DIR]``)
BENCHMARK_NAMES = tuple(_LOADERS)


def load_benchmark(
    name: str,
    directory: str | os.PathLike[str] | None = None,
    split: Split = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = 224,
    mode: Literal["L", "RGB"] = "RGB",
    resample: str = "bilinear",
    **fetch_options: object,
) -> ImageFiles:
    """``data=NAME[:DIR]``: benchmark ``name``'s ``split`` as a lazy :class:`ImageFiles`.

    The files are fetched (downloaded, checked, unpacked: :func:`fetch_benchmark`, which takes
    ``fetch_options``) into ``directory``, default ``data_home(root)/name``. Images are
    resized to ``size`` (``(H, W)`` or one int; 224, the usual input of pretrained backbones)
    in ``mode`` when read.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(_LOADERS)}")
    # bad options fail before anything is downloaded
    opts = _image_options({"size": size, "mode": mode, "resample": resample})
    folder = fetch_benchmark(name, directory, root=root, **fetch_options)  # type: ignore[arg-type]
    return _LOADERS[name](folder, split, opts)
