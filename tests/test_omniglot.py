"""``data=omniglot``: the loader, on small archives made here in Omniglot's exact layout
(``images_background/Alphabet/characterNN/CCCC_DD.png``, 105 x 105 1-bit PNGs), served through
the real download path from a local ``file://`` mirror with the checksums computed here."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmetric.cli import main as cli_main
from deepmetric.config import load_config
from deepmetric.data import DatasetError, load_dataset
from deepmetric.data import omniglot as omniglot_module

#: alphabet -> number of characters; drawers per character
BACKGROUND = {"Alphabet_of_the_Magi": 3, "Greek": 2, "Latin": 3}
EVALUATION = {"Angelic": 2, "Tengwar": 3}
DRAWERS = 5


def drawing(char: int, drawer: int) -> np.ndarray:
    """``(105, 105)`` bool, True = white paper: character ``char`` is a black bar whose place
    and shape depend on it, shifted a little by each drawer."""
    paper = np.ones((105, 105), dtype=bool)
    row, col = 10 + (char % 4) * 20 + drawer, 10 + (char // 4) * 20 + drawer
    paper[row : row + 12, col : col + 6 + 3 * (char % 3)] = False
    return paper


def png_bytes(paper: np.ndarray) -> bytes:
    import io

    image = Image.fromarray(paper).convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_archive(path: Path, top: str, alphabets: dict[str, int], first: int = 1) -> list[str]:
    """An Omniglot archive; returns the class names in sorted order. Characters are numbered
    across alphabets from ``first`` (as Omniglot's file names number them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = []
    char = first
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                folder = f"{top}/{alphabet}/character{c:02d}"
                zf.writestr(f"{folder}/", b"")
                for d in range(1, DRAWERS + 1):
                    zf.writestr(f"{folder}/{char:04d}_{d:02d}.png", png_bytes(drawing(char, d)))
                names.append(f"{alphabet}/character{c:02d}")
                char += 1
    return sorted(names)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder serving both archives, and their md5 by file name."""
    folder = tmp_path_factory.mktemp("mirror")
    make_archive(folder / "images_background.zip", "images_background", BACKGROUND)
    make_archive(folder / "images_evaluation.zip", "images_evaluation", EVALUATION, first=100)
    return folder, {n: md5(folder / n) for n in ("images_background.zip", "images_evaluation.zip")}


def _options(mirror: tuple[Path, dict[str, str]]) -> dict[str, object]:
    folder, sums = mirror
    return {"mirrors": [folder.as_uri() + "/"], "md5": sums}


def test_download_classes_labels_pixels_and_cache(mirror, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_dataset("omniglot", "train", root=cache, **_options(mirror))
    names = sorted(f"{a}/character{c:02d}" for a, n in BACKGROUND.items() for c in range(1, n + 1))
    assert ds.classes == names and names[0] == "Alphabet_of_the_Magi/character01"
    n = sum(BACKGROUND.values()) * DRAWERS
    assert ds.data.shape == (n, 1, 28, 28) and ds.data.dtype.is_floating_point is False
    assert ds.y.dtype.is_floating_point is False and str(ds.y.dtype) == "torch.int64"
    assert ds.y.tolist() == [c for c in range(len(names)) for _ in range(DRAWERS)]
    # pixels: Greek/character02 is the 5th character of the archive (Magi 1-3, Greek 4-5);
    # its 3rd drawer's image, resized as PIL's bilinear filter resizes it
    greek2 = names.index("Greek/character02")
    expected = Image.fromarray(drawing(5, 3)).convert("L").resize((28, 28), Image.BILINEAR)
    got = ds.data[greek2 * DRAWERS + 2, 0].numpy()
    assert np.array_equal(got, np.asarray(expected))
    assert got.min() == 0 and got.max() == 255 and (got == 255).mean() > 0.8  # white paper
    assert float(ds.inputs[0].max()) == 1.0  # read as v / 255
    # the archives are kept, and the decoded pixels cached next to them
    files = sorted(p.name for p in (cache / "omniglot").iterdir())
    assert files == ["images_background.28x28.npz", "images_background.zip"]
    assert md5(cache / "omniglot" / "images_background.zip") == mirror[1]["images_background.zip"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(omniglot_module, "read_archive", no_decoding)
    again = load_dataset("omniglot", "train", root=cache, download=False)
    assert again.classes == ds.classes
    assert np.array_equal(again.data.numpy(), ds.data.numpy())
    assert np.array_equal(again.y.numpy(), ds.y.numpy())


def test_evaluation_set_and_native_size(mirror, tmp_path):
    ds = load_dataset("omniglot", "test", root=tmp_path, size=105, **_options(mirror))
    assert ds.classes == sorted(
        f"{a}/character{c:02d}" for a, n in EVALUATION.items() for c in range(1, n + 1)
    )
    assert len(ds) == sum(EVALUATION.values()) * DRAWERS and ds.data.shape[1:] == (1, 105, 105)
    first = drawing(100, 1)  # Angelic/character01, drawer 1: the drawn bits, exactly
    assert np.array_equal(ds.data[0, 0].numpy(), first.astype(np.uint8) * 255)
    assert (tmp_path / "omniglot" / "images_evaluation.105x105.npz").is_file()
    small = load_dataset("omniglot", "test", root=tmp_path, size=(14, 7), download=False)
    assert small.data.shape[1:] == (1, 14, 7)


def test_bad_checksum_keeps_nothing(mirror, tmp_path):
    folder, sums = mirror
    wrong = {**sums, "images_background.zip": "0" * 32}
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        load_dataset("omniglot", "train", root=tmp_path, mirrors=[folder.as_uri()], md5=wrong)
    message = str(info.value)
    assert "\n" not in message and "images_background.zip" in message
    assert str(tmp_path / "omniglot") in message  # where to put the file instead
    assert not list((tmp_path / "omniglot").iterdir())  # no archive, no half-written file


def test_missing_archive_without_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("omniglot", "test", root=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and "download=False" in message
    assert "images_evaluation.zip" in message and str(tmp_path / "omniglot") in message


def test_official_checksums_and_mirrors():
    assert omniglot_module.MD5 == {
        "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    }
    assert (
        omniglot_module.MIRRORS[0] == "https://github.com/brendenlake/omniglot/raw/master/python/"
    )


@pytest.mark.parametrize(
    "member",
    ["images_background/../../evil.png", "/images_background/A/character01/x.png", "C:/x.png"],
)
def test_unsafe_member_names_refuse_the_archive(tmp_path, member):
    archive = tmp_path / "omniglot" / "images_background.zip"
    make_archive(archive, "images_background", {"Latin": 2})
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo(member), png_bytes(drawing(0, 1)))
    with pytest.raises(DatasetError, match="refused") as info:
        load_dataset("omniglot", "train", root=tmp_path, download=False)
    assert repr(member) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert not list((tmp_path / "omniglot").glob("*.npz"))


def test_zip_bomb_and_layout_refused(tmp_path, monkeypatch):
    archive = tmp_path / "omniglot" / "images_background.zip"
    make_archive(archive, "images_background", {"Latin": 2})
    monkeypatch.setattr(omniglot_module, "MAX_UNCOMPRESSED_BYTES", 100)
    with pytest.raises(DatasetError, match="zip bomb"):
        load_dataset("omniglot", "train", root=tmp_path, download=False)
    monkeypatch.undo()
    other = tmp_path / "other" / "omniglot" / "images_background.zip"
    make_archive(other, "images_evaluation", {"Latin": 2})  # the wrong set's folder
    with pytest.raises(DatasetError, match="not in Omniglot's layout"):
        load_dataset("omniglot", "train", root=tmp_path / "other", download=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad image"])
def test_corrupt_archive_is_one_line(tmp_path, damage):
    archive = tmp_path / "omniglot" / "images_background.zip"
    make_archive(archive, "images_background", {"Latin": 2})
    if damage == "garbage":
        archive.write_bytes(b"not a zip at all" * 100)
    elif damage == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    else:
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr("images_background/Latin/character03/0003_01.png", b"\x89PNG broken")
    with pytest.raises(DatasetError) as info:
        load_dataset("omniglot", "train", root=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(archive) in message


def test_a_replaced_archive_is_decoded_again(tmp_path):
    archive = tmp_path / "omniglot" / "images_background.zip"
    make_archive(archive, "images_background", {"Latin": 2})
    assert len(load_dataset("omniglot", "train", root=tmp_path)) == 2 * DRAWERS
    make_archive(archive, "images_background", {"Latin": 3, "Greek": 1})
    ds = load_dataset("omniglot", "train", root=tmp_path, download=False)
    assert len(ds) == 4 * DRAWERS and len(ds.classes or []) == 4


def test_train_command_on_omniglot(mirror, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for split in ("train", "test"):  # through the download path, into the cache folder
        load_dataset("omniglot", split, root=cache, **_options(mirror))
    monkeypatch.setenv("DEEPMETRIC_DATA", str(cache))
    assert load_config(None, ["data=omniglot"]).data == "omniglot"
    run = tmp_path / "run"
    argv = [
        "train",
        "data=omniglot",
        f"out={run}",
        "mode=batch",
        "epochs=1",
        "model.dim=8",
        "train.p=4",
        "train.k=2",
        "train.val_classes=2",  # a count, drawn with the seed
        "train.augment=false",
        "train.device=cpu",
        "train.amp=false",
    ]
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary"
    assert summary["test_items"] == sum(EVALUATION.values()) * DRAWERS
    assert 0 <= summary["test_precision_at_1"] <= 1
    preprocess = json.loads((run / "preprocess.json").read_text())
    assert (preprocess["height"], preprocess["width"], preprocess["channels"]) == (28, 28, 1)
