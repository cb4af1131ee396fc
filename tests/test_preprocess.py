"""Preprocessing: the training tensors of the training data's own images, every input kind, and
a clear error for every bad file."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import write_learnable_idx
from tiny_data import make_image_folder

from deepmetric.data import Preprocessing, load_dataset, load_idx, load_image_folder
from deepmetric.data.preprocess import MAX_PIXELS

GRAY = Preprocessing(channels=1, height=28, width=28)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("pre") / "toy", n_classes=3, n_train=4)


def _gradient(h: int, w: int, c: int | None = None) -> np.ndarray:
    """uint8 (h, w) or (h, w, c) with distinct values, deterministic."""
    rng = np.random.default_rng(h * 1000 + w)
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------- the training tensors


def test_idx_images_as_png_files_give_the_training_tensors_bit_for_bit(idx_dir, tmp_path):
    data = load_dataset(f"idx:{idx_dir}", "train")
    raw = load_idx(idx_dir / "train-images-idx3-ubyte")  # the uint8 pixels the loader read
    files = []
    for i in range(len(raw)):
        Image.fromarray(raw[i]).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    x = GRAY.apply(files)
    assert x.dtype == torch.float32 and x.shape == data.x.shape
    assert torch.equal(x, data.x)
    assert Preprocessing.from_images(data.x) == GRAY


def test_folder_images_give_the_training_tensors_bit_for_bit(tmp_path):
    gray_root = make_image_folder(tmp_path / "gray", classes=2, n_train=3, n_test=1)
    gray = load_image_folder(gray_root, size=(20, 24))
    files = sorted((gray_root / "train").rglob("*.png"))  # class folders, then files, sorted
    assert torch.equal(Preprocessing(1, 20, 24).apply(files), gray.x)
    assert Preprocessing.from_images(gray.x) == Preprocessing(1, 20, 24)

    # RGB of other sizes, a palette image, an RGBA image and a grayscale one: RGB tensors
    root = tmp_path / "rgb"
    images = [
        Image.fromarray(_gradient(40, 30, 3)),
        Image.fromarray(_gradient(17, 23, 3)).convert("P"),
        Image.fromarray(_gradient(31, 31, 4), "RGBA"),
        Image.fromarray(_gradient(25, 19)),
    ]
    for i, img in enumerate(images):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{i % 2}" / f"{i}.png")
    rgb = load_image_folder(root, size=(16, 12))
    files = sorted(root.rglob("*.png"))
    assert torch.equal(Preprocessing(3, 16, 12).apply(files), rgb.x)


def test_from_images_only_for_images_in_the_unit_range():
    assert Preprocessing.from_images(torch.rand(4, 3, 8, 9)) == Preprocessing(3, 8, 9)
    assert Preprocessing.from_images(torch.rand(4, 10)) is None  # vectors
    assert Preprocessing.from_images(torch.rand(4, 2, 8, 8)) is None  # not L / RGB
    assert Preprocessing.from_images(torch.rand(4, 1, 8, 8) * 3) is None  # not in [0, 1]


# ------------------------------------------------------------------------- the record


def test_dict_round_trip_and_validation():
    pre = Preprocessing(channels=3, height=64, width=48, resample="bicubic")
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert pre.to_dict() == {
        "channels": 3,
        "height": 64,
        "width": 48,
        "scale": 1 / 255,
        "resample": "bicubic",
    }
    with pytest.raises(ValueError, match="missing keys \\['width'\\]"):
        Preprocessing.from_dict({"channels": 1, "height": 2})
    with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
        Preprocessing.from_dict({"channels": 1, "height": 2, "width": 2, "size": 3})
    with pytest.raises(ValueError, match="channels must be 1"):
        Preprocessing(channels=2, height=4, width=4)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        Preprocessing(channels=1, height=0, width=4)
    with pytest.raises(ValueError, match="scale must be a positive"):
        Preprocessing(channels=1, height=4, width=4, scale=-1.0)
    with pytest.raises(ValueError, match="resample must be one of"):
        Preprocessing(channels=1, height=4, width=4, resample="cubic")
    with pytest.raises(ValueError, match="JSON object"):
        Preprocessing.from_dict([1, 28, 28])  # type: ignore[arg-type]


# ------------------------------------------------------------------------ input kinds


def test_every_input_kind_gives_the_same_tensor(tmp_path):
    pixels = _gradient(28, 28)
    want = torch.from_numpy(pixels).float().div(255.0)[None, None]
    Image.fromarray(pixels).save(tmp_path / "a.png")
    kinds = {
        "str path": str(tmp_path / "a.png"),
        "Path": tmp_path / "a.png",
        "list of paths": [tmp_path / "a.png"],
        "PIL image": Image.fromarray(pixels),
        "list of PIL images": [Image.fromarray(pixels)],
        "uint8 (H, W)": pixels,
        "uint8 (N, H, W)": pixels[None],
        "uint8 (N, H, W, 1)": pixels[None, ..., None],
        "float32 (N, H, W) in [0, 1]": pixels[None].astype(np.float32) / np.float32(255),
        "tensor (N, C, H, W)": want.clone(),
    }
    for name, value in kinds.items():
        x = GRAY.apply(value)
        assert x.dtype == torch.float32 and torch.equal(x, want), name
    assert GRAY.apply([]).shape == (0, 1, 28, 28)


def test_color_inputs_become_gray_or_rgb_as_training_did():
    rgb = _gradient(10, 12, 3)
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 7, np.uint8)], axis=2)
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    pre1, pre3 = Preprocessing(1, 10, 12), Preprocessing(3, 10, 12)
    assert torch.equal(pre1.apply(rgb[None])[0, 0], torch.from_numpy(luma))
    assert torch.equal(pre3.apply(rgba[None]), pre3.apply(rgb[None]))  # alpha dropped
    assert torch.equal(pre3.apply(rgb[None])[0], torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    gray = _gradient(10, 12)
    three = pre3.apply(gray)  # a gray image for an RGB model: the same plane three times
    assert three.shape == (1, 3, 10, 12) and torch.equal(three[0, 0], three[0, 2])
    la = Image.fromarray(np.stack([gray, gray], axis=2), "LA")
    assert torch.equal(pre1.apply(la), pre1.apply(gray))
    # float RGB: converted with PIL's luma weights, in float
    f = pre1.apply(rgb[None].astype(np.float32) / 255)
    assert torch.allclose(f[0, 0], torch.from_numpy(luma), atol=1 / 255)


def test_resize_uses_pil_bilinear_and_floats_follow_it_closely():
    big = _gradient(56, 40)
    x = GRAY.apply(big)
    want = np.array(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    assert torch.equal(x[0, 0], torch.from_numpy(want).float() / 255.0)
    f = GRAY.apply(big[None].astype(np.float32) / 255)  # resized in float, not rounded
    assert f.shape == (1, 1, 28, 28) and (f - x).abs().max() <= 1 / 255


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    pixels = _gradient(28, 28)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    x = GRAY.apply(tmp_path / "wide.png")
    assert torch.equal(x, GRAY.apply(pixels))  # v * 257 -> v, where PIL's convert clips
    assert 0.2 < float(x.mean()) < 0.8


def test_exif_orientation_is_applied(tmp_path):
    pixels = _gradient(10, 20)  # 10 rows, 20 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif.tobytes())
    x = Preprocessing(1, 20, 10).apply(tmp_path / "turned.png")
    want = np.ascontiguousarray(np.rot90(pixels, k=-1))
    assert torch.equal(x[0, 0], torch.from_numpy(want).float() / 255.0)


def test_tensors_and_arrays_are_checked():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        GRAY.apply(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="floating point"):
        GRAY.apply(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        GRAY.apply(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="channels last"):
        GRAY.apply(np.zeros((2, 3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        GRAY.apply(np.zeros((2, 28, 28), np.int16))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        GRAY.apply(np.full((1, 28, 28), 2.0, np.float32))
    with pytest.raises(ValueError, match="cannot preprocess a int"):
        GRAY.apply([3])


# -------------------------------------------------------------------------- bad files


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` 8-bit gray pixels and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_files_are_value_errors_naming_the_file(tmp_path):
    Image.fromarray(_gradient(28, 28)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    cases = {
        "missing.png": "no such file",
        "truncated.png": "cannot decode image",
        "text.png": "not an image file",
        "empty.jpg": "not an image file",
        "folder.png": "not a file",
    }
    for name, problem in cases.items():
        with pytest.raises(ValueError, match=f"{name}: {problem}"):
            GRAY.apply([tmp_path / "good.png", tmp_path / name])


@pytest.mark.parametrize("pil_limit", ["default", None])
def test_a_decompression_bomb_is_a_value_error_not_a_warning(tmp_path, monkeypatch, pil_limit):
    if pil_limit is None:  # PIL's own guard switched off: ours still holds
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    just_over = (MAX_PIXELS // 10_000 + 1, 10_000)  # over the limit, under PIL's error at 2x
    far_over = (40_000, 40_000)
    for i, (w, h) in enumerate([just_over, far_over]):
        path = tmp_path / f"bomb{i}.png"
        path.write_bytes(_png_header(w, h))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would fail the test
            with pytest.raises(ValueError, match=f"bomb{i}.png: .*decompression bomb"):
                GRAY.apply(path)


def test_folder_loader_decodes_as_inference_does(tmp_path):
    """A 16-bit PNG (scaled, not clipped) and an EXIF-rotated image: the folder data set
    (training) and Preprocessing.apply (inference) give the same tensors."""
    pixels = _gradient(28, 28)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "a" / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(_gradient(28, 20)).save(tmp_path / "b" / "turned.png", exif=exif.tobytes())
    train = load_image_folder(tmp_path, size=28)
    files = [tmp_path / "a" / "wide.png", tmp_path / "b" / "turned.png"]
    assert torch.equal(train.x, GRAY.apply(files))
    assert torch.equal(train.x[0], GRAY.apply(pixels)[0])  # v * 257 -> v, not 255
    assert train.x.shape == (2, 1, 28, 28)
