"""Tests for deepmetric.data.datasets on small files made in tmp_path (no network)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import idx_bytes, write_idx

from deepmetric.data import (
    ArrayDataset,
    DatasetError,
    class_split,
    data_home,
    download_file,
    fetch_mnist_family,
    load_dataset,
    load_idx,
    load_idx_dir,
    load_image_folder,
    load_npz,
    train_val_split,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_idx_dir(directory: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 3, gz)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1, 200], dtype=np.uint8)
    got_images = load_idx(write_idx(tmp_path / "img", images, gz))
    got_labels = load_idx(write_idx(tmp_path / "lbl", labels, gz))
    assert got_images.shape == (2, 3, 4) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DatasetError, match=r"bad-magic.*magic number 0x12340801"):
        load_idx(path)


def test_load_idx_unknown_type_byte(tmp_path: Path) -> None:
    path = tmp_path / "bad-type"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(DatasetError, match=r"bad-type.*type byte 0x07"):
        load_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_truncated_data(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))[:-3]
    path = tmp_path / ("short.gz" if gz else "short")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DatasetError, match=r"short.*truncated.*need 100 data bytes, found 97"):
        load_idx(path)


def test_load_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DatasetError, match=r"tiny.*truncated IDX header"):
        load_idx(path)


def test_load_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DatasetError, match=r"long.*trailing bytes"):
        load_idx(path)


@pytest.mark.parametrize("damage", ["garbage", "cut", "flipped"])
def test_load_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    good = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    if damage == "garbage":
        content = b"this is not gzip data at all"
    elif damage == "cut":
        content = good[: len(good) // 2]
    else:  # a flipped byte in the deflate stream or the CRC
        content = good[:-6] + bytes([good[-6] ^ 0xFF]) + good[-5:]
    path = tmp_path / "broken-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"broken-images-idx3-ubyte\.gz.*gzip"):
        load_idx(path)


def test_load_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere.*not found"):
        load_idx(tmp_path / "nothere")


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir(tmp_path: Path, gz: bool) -> None:
    make_idx_dir(tmp_path, n_train=12, n_test=6, gz=gz)
    train = load_idx_dir(tmp_path, "train")
    test = load_dataset(f"idx:{tmp_path}", "test")
    assert train.x.shape == (12, 1, 28, 28) and train.x.dtype == torch.float32
    assert test.x.shape == (6, 1, 28, 28)
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == [i % 3 for i in range(12)]
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0
    raw = load_idx(next(tmp_path.glob("train-images-idx3-ubyte*")))
    torch.testing.assert_close(train.x[5, 0], torch.from_numpy(raw[5]).float() / 255)


def test_load_idx_dir_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DatasetError, match="12 images but train-labels-idx1-ubyte has 11"):
        load_idx_dir(tmp_path, "train")


def test_load_idx_dir_missing_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path, "test")


# ------------------------------------------------------------------- downloading


def test_download_file_ok(tmp_path: Path) -> None:
    src = tmp_path / "mirror" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(b"payload" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = download_file(src.as_uri(), tmp_path / "cache" / "a.bin", md5)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.bin"]  # no temp file left


def test_download_checksum_mismatch(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    make_idx_dir(mirror, gz=True)  # valid files, but not the official ones
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        fetch_mnist_family("kmnist", "train", root=cache, mirrors=[mirror.as_uri() + "/"])
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert str(cache / "kmnist") in str(info.value)
    assert not any((cache / "kmnist").iterdir())  # nothing half-written is kept


def test_download_with_injected_fetch(tmp_path: Path) -> None:
    calls: list[str] = []

    def fetch(url: str):
        calls.append(url)
        raise OSError("offline")

    with pytest.raises(DatasetError, match="offline"):
        fetch_mnist_family("mnist", "test", root=tmp_path, fetch=fetch)
    assert calls and all(u.endswith("t10k-images-idx3-ubyte.gz") for u in calls)


def test_offline_message_names_cache_and_apt(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", "train", root=tmp_path, download=False, search_dirs=[])
    msg = str(info.value)
    assert str(tmp_path / "fashion-mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    mirror = (tmp_path / "no-such-mirror").as_uri()
    with pytest.raises(DatasetError, match=r"mnist \(test\).*DEEPMETRIC_DATA"):
        load_dataset("mnist", "test", root=tmp_path, mirrors=[mirror])


def test_cached_copy_is_used(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "kmnist", n_test=5)
    ds = load_dataset("kmnist", "test", root=tmp_path, download=False)
    assert ds.x.shape == (5, 1, 28, 28)
    assert ds.classes is not None and len(ds.classes) == 10


def test_data_home_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPMETRIC_DATA", str(tmp_path))
    assert data_home() == tmp_path
    assert data_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("DEEPMETRIC_DATA")
    assert data_home() == Path.home() / ".cache" / "deepmetric"


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", "test", root=tmp_path, download=False)
    assert ds.x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and sorted(ds.y.unique().tolist()) == list(range(10))


# -------------------------------------------------------------------- image folders


def make_image_folder(root: Path, rgb: bool = True, per_class: int = 3) -> None:
    rng = np.random.default_rng(1)
    for c in ("cat", "ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (10 + i, 12, 3) if rgb else (10 + i, 12)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / c / f"{i}.png")
        (root / c / "notes.txt").write_text("not an image")
        (root / c / ".hidden.png").write_bytes(b"junk")


def test_image_folder_rgb(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / ".git").mkdir()
    ds = load_dataset(f"folder:{tmp_path}", size=(8, 6))
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.x.shape == (9, 3, 8, 6)
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0


def test_image_folder_gray_default_and_forced_modes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, rgb=False)
    assert load_image_folder(tmp_path).x.shape == (9, 1, 64, 64)
    rgb = load_image_folder(tmp_path, mode="RGB", size=16)
    assert rgb.x.shape == (9, 3, 16, 16)
    torch.testing.assert_close(rgb.x[:, 0], rgb.x[:, 2])
    Image.new("RGB", (5, 5), (255, 0, 0)).save(tmp_path / "ant" / "red.jpg")
    assert load_image_folder(tmp_path, size=4).x.shape == (10, 3, 4, 4)  # one colour image
    assert load_image_folder(tmp_path, mode="L", size=4).x.shape == (10, 1, 4, 4)


def test_image_folder_mixed_modes_match_the_single_mode_loads(tmp_path: Path) -> None:
    """Gray images decoded before the first colour one are repeated into 3 channels, equal to
    what mode="RGB" gives; the pixels are kept as uint8 and read as v / 255."""
    make_image_folder(tmp_path, rgb=False)
    Image.new("RGB", (5, 5), (255, 0, 0)).save(tmp_path / "bee" / "red.jpg")  # 4th of 10
    auto = load_image_folder(tmp_path, size=4)
    forced = load_image_folder(tmp_path, mode="RGB", size=4)
    gray = load_image_folder(tmp_path, mode="L", size=4)
    assert auto.data.dtype == forced.data.dtype == gray.data.dtype == torch.uint8
    assert torch.equal(auto.data, forced.data)
    first = auto.data[:3]  # the three ant images, read before the colour image
    assert torch.equal(first[:, 0], first[:, 2]) and torch.equal(first[:, :1], gray.data[:3])
    assert torch.equal(auto.x, auto.data.float() / 255)


def test_pixels_kept_as_uint8_and_read_as_floats_batch_by_batch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    ds = load_idx_dir(tmp_path)
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (12, 1, 28, 28)
    idx = torch.tensor([5, 0, 5])
    want = ds.data[idx].to(torch.float32) / 255
    assert ds.inputs[idx].dtype == torch.float32 and torch.equal(ds.inputs[idx], want)
    assert torch.equal(ds[5][0], want[0]) and torch.equal(ds.x[idx], want)
    part = ds.subset([1, 2])
    assert part.data.dtype == torch.uint8 and torch.equal(part.x, ds.x[1:3])
    assert len(ds.inputs) == 12 and ds.inputs.shape == ds.data.shape
    floats = ArrayDataset(ds.x, ds.y)  # the same values stored as float32: kept as they are
    assert floats.data.dtype == torch.float32 and floats.x is floats.data
    with pytest.raises(ValueError, match="float tensor or uint8 pixels"):
        ArrayDataset(ds.data.to(torch.int16), ds.y)


PEAK_CHILD = """
import resource, sys
import numpy, torch, PIL.Image
from deepmetric.data import load_image_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = load_image_folder(sys.argv[1], size=48)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, len(ds))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="ru_maxrss in KiB: Linux")
def test_loading_a_folder_holds_the_pixels_once_as_uint8(tmp_path: Path) -> None:
    """2,000 RGB images of 48 x 48: 13.2 MiB as uint8, 52.7 MiB as float32. Loading them (in a
    fresh process) must add less than 1.5x the uint8 size plus 6 MiB to the peak memory (the
    old loader, decoded arrays stacked then converted to float32, added 68 MiB; this one adds
    7 MiB over the peak of the imports, part of which was freed and is reused; measured on
    the 2-core machine)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for c in range(20):
        (tmp_path / f"c{c:02d}").mkdir()
    for i in range(2000):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{i % 20:02d}" / f"{i:04d}.png")
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    growth_kib, n = out.stdout.split()
    assert n == "2000"
    uint8_kib = 2000 * 3 * 48 * 48 / 1024
    assert int(growth_kib) < 1.5 * uint8_kib + 6 * 1024, f"peak grew {int(growth_kib)} KiB"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_image_folder_corrupt_image(tmp_path: Path, damage: str) -> None:
    make_image_folder(tmp_path)
    bad = tmp_path / "bee" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"bee/1\.png"):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path)
    make_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty: class folder has no images"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="no test split"):
        load_image_folder(tmp_path, "test")


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", per_class=2)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "test" / "dog" / "0.bmp")
    train = load_dataset(f"folder:{tmp_path}", "train", size=4)
    test = load_dataset(f"folder:{tmp_path}", "test", size=4)
    assert train.classes == test.classes == ["ant", "bee", "cat", "dog"]
    assert len(train) == 6 and test.y.tolist() == [3]


# ----------------------------------------------------------------------------- npz


def test_npz_uint8_and_float(tmp_path: Path) -> None:
    x8 = np.full((4, 5, 5), 255, dtype=np.uint8)
    y = np.array([0, 1, 1, 0])
    np.savez(tmp_path / "img.npz", x=x8, y=y, x_test=x8[:2], y_test=y[:2])
    ds = load_dataset(f"npz:{tmp_path / 'img.npz'}")
    assert ds.x.shape == (4, 1, 5, 5) and float(ds.x.max()) == 1.0
    assert load_npz(tmp_path / "img.npz", "test").x.shape == (2, 1, 5, 5)
    xf = np.linspace(-3, 3, 12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "vec.npz", x=xf, y=y.astype(np.int32), classes=np.array(["a", "b"]))
    vec = load_npz(tmp_path / "vec.npz")
    assert vec.x.dtype == torch.float32 and vec.x.shape == (4, 3)
    torch.testing.assert_close(vec.x, torch.from_numpy(xf).float())
    assert vec.y.dtype == torch.int64 and vec.classes == ["a", "b"]


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", y=np.zeros(3, dtype=np.int64))
    with pytest.raises(DatasetError, match=r"nox\.npz.*missing array 'x'"):
        load_npz(tmp_path / "nox.npz")
    np.savez(tmp_path / "fy.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(DatasetError, match="integer"):
        load_npz(tmp_path / "fy.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 2)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DatasetError, match="4 labels for 3 samples"):
        load_npz(tmp_path / "len.npz")
    np.savez(tmp_path / "y2.npz", x=np.zeros((3, 2)), y=np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(DatasetError, match="1-D"):
        load_npz(tmp_path / "y2.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DatasetError, match=r"single\.npy.*not an \.npz"):
        load_npz(tmp_path / "single.npy")
    with pytest.raises(DatasetError, match="missing array 'x_test'"):
        load_npz(tmp_path / "len.npz", "test")


def test_unknown_spec_lists_forms() -> None:
    for spec in ("cifar10", "zip:foo", "folder:", "idx"):
        with pytest.raises(ValueError, match=r"idx:DIR.*folder:DIR.*npz:FILE"):
            load_dataset(spec)
    with pytest.raises(ValueError, match="split"):
        load_dataset("idx:/nowhere", "val")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- splits


def toy_dataset(counts: tuple[int, ...] = (10, 20, 5, 1)) -> ArrayDataset:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.arange(len(y), dtype=torch.float32)[:, None].repeat(1, 2)
    return ArrayDataset(x, y, [f"c{c}" for c in range(len(counts))])


def test_array_dataset_basics() -> None:
    ds = toy_dataset()
    assert len(ds) == 36 and ds.num_classes == 4
    x, y = ds[12]
    assert x.tolist() == [12.0, 12.0] and int(y) == 1
    sub = ds.subset([35, 0])
    assert sub.y.tolist() == [3, 0] and sub.classes == ds.classes
    with pytest.raises(ValueError, match="disagree"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))


def test_train_val_split_stratified_disjoint_deterministic() -> None:
    ds = toy_dataset()
    train, val = train_val_split(ds, 0.2, seed=3)
    ids_t, ids_v = set(train.x[:, 0].int().tolist()), set(val.x[:, 0].int().tolist())
    assert not ids_t & ids_v and len(ids_t | ids_v) == len(ds)
    # classes of 10, 20, 5 and 1: a fifth each, but 2 at least from a class of 4 or more
    assert torch.bincount(val.y, minlength=4).tolist() == [2, 4, 2, 0]
    assert torch.bincount(train.y, minlength=4).tolist() == [8, 16, 3, 1]
    _, small = train_val_split(ds, 0.05, seed=3)  # 0.5, 1.0, 0.25 items: 2 each
    assert torch.bincount(small.y, minlength=4).tolist() == [2, 2, 2, 0]
    _, none = train_val_split(ds, 0.0, seed=3)
    assert len(none) == 0
    again_t, _ = train_val_split(ds, 0.2, seed=3)
    assert torch.equal(again_t.x, train.x)
    other_t, _ = train_val_split(ds, 0.2, seed=4)
    assert not torch.equal(other_t.x, train.x)
    with pytest.raises(ValueError):
        train_val_split(ds, 1.0, seed=0)


def test_class_split() -> None:
    ds = toy_dataset()
    seen, unseen = class_split(ds, [0, "c2"])
    assert set(seen.y.tolist()) == {0, 2} and set(unseen.y.tolist()) == {1, 3}
    assert len(seen) + len(unseen) == len(ds)
    with pytest.raises(ValueError, match="out of range"):
        class_split(ds, [7])


@pytest.mark.parametrize(
    ("type_byte", "dtype"),
    [(0x09, ">i1"), (0x0D, ">f4"), (0x0C, ">i4")],
    ids=["int8", "float", "int32"],
)
def test_idx_labels_must_be_non_negative_integers(
    tmp_path: Path, type_byte: int, dtype: str
) -> None:
    """-1 as int8 or int32, or 1.7 as float, must not become a class: the label file is refused."""
    make_idx_dir(tmp_path)
    labels = np.array([-1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1.7][:12]).astype(dtype)
    header = struct.pack(">HBB", 0, type_byte, 1) + struct.pack(">I", 12)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    with pytest.raises(DatasetError, match=r"negative labels|expected 1-D integer labels"):
        load_idx_dir(tmp_path, "train")


def test_idx_dims_whose_product_overflows(tmp_path: Path) -> None:
    """Four dims of 2**32 - 1: the product (about 2**128) is computed exactly, no wrap-around."""
    header = struct.pack(">HBB", 0, 0x08, 4) + struct.pack(">4I", *[2**32 - 1] * 4)
    (tmp_path / "big").write_bytes(header + b"\0" * 16)
    with pytest.raises(DatasetError, match="truncated: dims"):
        load_idx(tmp_path / "big")
