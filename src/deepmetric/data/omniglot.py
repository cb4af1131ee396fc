"""Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015): 1,623 handwritten characters of
50 alphabets, each drawn once by 20 people, the classic many-class one-shot benchmark.

``load_omniglot("train")`` (``data=omniglot``) is the *background* set, 964 characters of 30
alphabets; ``"test"`` is the *evaluation* set, 659 characters of 20 other alphabets (Lake et
al.'s split: the test characters, and their alphabets, are never seen in training). A class
is one character, named ``Alphabet/characterNN`` (``Greek/character05``); its 20 images are
its drawers' renderings, 105 x 105 1-bit PNGs read as grey (white paper 255, black strokes 0,
as stored: no inversion), resized to 28 x 28 with the bilinear filter of the folder loader and
of inference: the standard size of the few-shot literature (Vinyals et al. 2016, Snell et al.
2017). Label ids are the sorted class names' positions *within the split*: the two sets share
no character, so id 0 of ``"test"`` is another character than id 0 of ``"train"``
(``classes`` names them).

The two archives, ``images_background.zip`` and ``images_evaluation.zip`` of the authors'
repository, are downloaded as the MNIST family is (:func:`~deepmetric.data.datasets.
download_file`: md5-checked, atomically renamed) into ``data_home()/omniglot``, unless already
there or in ``search_dirs``. They are read without being unpacked: every member name is
checked first (an absolute path or a ``..`` part refuses the archive), the uncompressed sizes
are capped (a zip bomb is refused before anything is inflated), and each PNG is decoded from
memory by the same code as image files (:func:`~deepmetric.data.preprocess.decode_image`, with
its pixel cap). The decoded pixels are cached next to the archive as
``images_background.28x28.npz`` (tied to the archive's md5), so the next load reads one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from deepmetric.data.datasets import (
    ArrayDataset,
    DatasetError,
    Fetch,
    Split,
    _check_split,
    data_home,
    download_first,
)

#: split -> the archive holding it; its top folder is the archive's name without ``.zip``
ARCHIVES: dict[str, str] = {"train": "images_background.zip", "test": "images_evaluation.zip"}

#: The authors' repository (github.com/brendenlake/omniglot, folder python/), two spellings.
MIRRORS = (
    "https://github.com/brendenlake/omniglot/raw/master/python/",
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",
)

#: md5 of the official archives: the values torchvision's ``datasets.Omniglot`` checks
#: (``zips_md5``), which other public loaders (learn2learn, paddlefsl) repeat.
MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}

#: Caps that refuse a zip bomb before anything is inflated. The real archives hold 19,280 and
#: 13,180 PNGs of about 10 MB in all; these leave a wide margin.
MAX_MEMBERS = 100_000
MAX_UNCOMPRESSED_BYTES = 512 * 2**20
MAX_MEMBER_BYTES = 4 * 2**20

LAYOUT = "TOP/ALPHABET/CHARACTER/IMAGE.png"


def fetch_omniglot(
    split: Split = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    md5: Mapping[str, str] | None = None,
    search_dirs: Sequence[str | os.PathLike[str]] = (),
    fetch: Fetch | None = None,
) -> Path:
    """The path of ``split``'s archive (``images_background.zip`` or ``images_evaluation.zip``).

    First match wins, as for :func:`~deepmetric.data.datasets.fetch_mnist_family`:
    ``data_home(root)/omniglot`` when it holds the archive; a folder of ``search_dirs``
    holding it; a download from ``mirrors`` (default :data:`MIRRORS`), checked against
    ``md5[name]`` (default :data:`MD5`), into ``data_home(root)/omniglot``. An archive already
    present is trusted as it is (its layout is checked when read).
    """
    name = ARCHIVES[_check_split(split)]
    target = data_home(root) / "omniglot"
    if (target / name).is_file():
        return target / name
    for directory in map(Path, search_dirs):
        if (directory / name).is_file():
            return directory / name
    reason = "downloading is off (download=False)"
    if download:
        expected = (MD5 if md5 is None else md5)[name]
        urls = [mirror.rstrip("/") + "/" + name for mirror in mirrors or MIRRORS]
        try:
            return download_first(urls, target / name, expected, fetch=fetch)
        except DatasetError as e:
            reason = str(e)
    raise DatasetError(
        f"omniglot ({split}): no local copy, and {reason}. Put {name} (from {MIRRORS[0]}) "
        f"into {target} (the cache folder; set DEEPMETRIC_DATA or root= to move it)"
    )


def load_omniglot(
    split: Split = "train",
    *,
    size: int | tuple[int, int] = 28,
    root: str | os.PathLike[str] | None = None,
    **fetch_options: object,
) -> ArrayDataset:
    """Omniglot's background set (``"train"``) or evaluation set (``"test"``) as inputs
    ``(N, 1, H, W)`` (uint8 pixels, read as ``v / 255``), labels int64 ``(N,)`` in sorted
    class-name order, ``classes`` the names ``Alphabet/characterNN``.

    ``size`` is ``(H, W)`` or one int for both (default 28, the few-shot literature's; 105
    keeps the drawings as they are). Other keywords go to :func:`fetch_omniglot`
    (``download``, ``mirrors``, ``md5``, ``search_dirs``, ``fetch``). The pixels are cached as
    ``data_home(root)/omniglot/<archive>.<H>x<W>.npz``, valid while the archive's md5 is the
    one it was made from. Problems (no archive, a bad checksum, a corrupt or unsafe zip, an
    image that does not decode) raise :class:`~deepmetric.data.datasets.DatasetError`, one
    line naming the file.
    """
    split = _check_split(split)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    cache = data_home(root) / "omniglot" / f"{ARCHIVES[split][:-4]}.{hw[0]}x{hw[1]}.npz"
    archive_here = data_home(root) / "omniglot" / ARCHIVES[split]
    digest = _md5(archive_here) if archive_here.is_file() else None
    cached = _read_cache(cache, digest)
    if cached is not None:
        return cached
    archive = fetch_omniglot(split, root=root, **fetch_options)  # type: ignore[arg-type]
    digest = _md5(archive)
    pixels, labels, classes = read_archive(archive, ARCHIVES[split][:-4], hw)
    _write_cache(cache, pixels, labels, classes, digest)
    return ArrayDataset(torch.from_numpy(pixels), torch.from_numpy(labels), classes)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _members(zf: zipfile.ZipFile, archive: Path, top: str) -> list[tuple[str, zipfile.ZipInfo]]:
    """``(class name, member)`` of every image in Omniglot's layout, sorted by member name;
    the archive is refused (``DatasetError``) for an unsafe name, a zip bomb or another
    layout. Folders, hidden files, ``__MACOSX/`` and files that are no PNG are skipped."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise DatasetError(f"{archive}: {len(infos):,} members, more than {MAX_MEMBERS:,}: refused")
    total = sum(info.file_size for info in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise DatasetError(
            f"{archive}: {total:,} bytes uncompressed, more than {MAX_UNCOMPRESSED_BYTES:,} "
            "(a zip bomb?): refused; delete it and download it again"
        )
    images: list[tuple[str, zipfile.ZipInfo]] = []
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DatasetError(
                f"{archive}: member {name!r} is an absolute path or climbs out with '..': "
                "refused (not an Omniglot archive); delete it and download it again"
            )
        if info.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        if not name.lower().endswith(".png"):
            continue
        if len(parts) != 4 or parts[0] != top:
            raise DatasetError(
                f"{archive}: member {name!r} is not in Omniglot's layout "
                f"({LAYOUT.replace('TOP', top)})"
            )
        if info.file_size > MAX_MEMBER_BYTES:
            raise DatasetError(
                f"{archive}: member {name!r} is {info.file_size:,} bytes uncompressed, more "
                f"than {MAX_MEMBER_BYTES:,}: refused"
            )
        images.append((f"{parts[1]}/{parts[2]}", info))
    if not images:
        raise DatasetError(
            f"{archive}: no images in Omniglot's layout ({LAYOUT.replace('TOP', top)})"
        )
    return sorted(images, key=lambda item: item[1].filename)


def read_archive(
    archive: str | os.PathLike[str], top: str, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode the images of ``archive`` (in memory, nothing unpacked to disk): uint8 pixels
    ``(N, 1, H, W)``, int64 labels ``(N,)`` (sorted class-name order), the class names."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _members(zf, archive, top)
            classes = sorted({name for name, _ in members})
            class_id = {name: i for i, name in enumerate(classes)}
            pixels = np.empty((len(members), 1, *size), dtype=np.uint8)
            labels = np.empty(len(members), dtype=np.int64)
            for i, (name, info) in enumerate(members):
                pixels[i, 0] = _decode(_read_member(zf, info, archive), archive, info, size)
                labels[i] = class_id[name]
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{archive}: file not found") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise DatasetError(
            f"{archive}: not a readable zip archive ({e}); delete it and download it again"
        ) from None
    return pixels, labels, classes


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> bytes:
    """The member's bytes: at most its declared size (which the caps bounded), CRC-checked."""
    try:
        with zf.open(info) as fh:
            data = fh.read(info.file_size + 1)
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as e:
        raise DatasetError(f"{archive}: member {info.filename!r} is corrupt ({e})") from None
    if len(data) != info.file_size:
        raise DatasetError(
            f"{archive}: member {info.filename!r} holds {len(data):,} bytes, "
            f"not the {info.file_size:,} it declares"
        )
    return data


def _decode(data: bytes, archive: Path, info: zipfile.ZipInfo, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint8 grey, decoded and resized as the folder loader and inference do."""
    from PIL import Image

    from deepmetric.data.preprocess import decode_image, upright_8bit

    where = f"{archive}: {info.filename}"
    try:
        img = decode_image(io.BytesIO(data), where)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    try:
        upright, _ = upright_8bit(img)
        out = upright.convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{where}: cannot convert image ({e})") from None
    finally:
        img.close()


def _read_cache(path: Path, archive_md5: str | None) -> ArrayDataset | None:
    """The cached pixels, or None when there is no cache, it is unreadable, or it was made
    from another archive than the one now in the cache folder (``archive_md5``)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if archive_md5 is not None and str(arrays["archive_md5"]) != archive_md5:
                return None
            x, y, classes = arrays["x"], arrays["y"], [str(c) for c in arrays["classes"]]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # a derived file: made again from the archive
    if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (len(x),) or y.dtype != np.int64:
        return None
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), classes)


def _write_cache(
    path: Path, x: np.ndarray, y: np.ndarray, classes: list[str], archive_md5: str
) -> None:
    """Write the cache atomically; a folder that cannot be written only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        warnings.warn(f"{path}: cannot cache the decoded images ({e})", stacklevel=3)
        return
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(
                out,
                x=x,
                y=y,
                classes=np.asarray(classes, dtype=str),
                archive_md5=np.asarray(archive_md5),
            )
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"{path}: cannot cache the decoded images ({e})", stacklevel=3)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
