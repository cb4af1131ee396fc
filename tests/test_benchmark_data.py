"""``data=cub200|cars196|sop|inshop[:DIR]``: the benchmark loaders, on tiny archives made here in
each set's real layout (a few classes, 8 x 8 JPEGs of one colour per class), served through the
real download path from a local ``file://`` mirror with the checksums computed here. Nothing
is downloaded."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.data import DatasetError, load_dataset
from deepmetric.data import benchmarks as bm
from deepmetric.data.preprocess import Preprocessing

IMAGES_PER_CLASS = 3


def colour(c: int) -> tuple[int, int, int]:
    """One solid colour per class number, far apart (JPEG keeps a flat colour nearly exact)."""
    return ((c * 67) % 256, (c * 151) % 256, (c * 29 + 40) % 256)


def jpeg(c: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour(c)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tgz(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def assert_colours(ds, numbers: list[int]) -> None:
    """Item i's pixels are the colour of class number ``numbers[ds.y[i]]``."""
    pixels = ds.data[:]
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(ds), 3, 8, 8)
    for i, label in enumerate(ds.y.tolist()):
        mean = pixels[i].float().mean(dim=(1, 2)).numpy()
        assert np.abs(mean - np.array(colour(numbers[label]))).max() < 4, (i, label)


# ----------------------------------------------------------------------------- CUB

CUB = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross"}
CUB |= {101: "101.White_Pelican", 102: "102.Western_Wood_Pewee"}


def cub_files() -> dict[str, bytes]:
    top = "CUB_200_2011"
    # attributes.txt lies beside the top folder, as in the real archive
    files = {"attributes.txt": b"1 has_bill_shape::curved\n"}
    classes, images, labels = [], [], []
    image_id = 1
    for number, name in CUB.items():
        classes.append(f"{number} {name}")
        for k in range(IMAGES_PER_CLASS):
            rel = f"{name}/{name.split('.')[1]}_{k:04d}_{number}.jpg"
            files[f"{top}/images/{rel}"] = jpeg(number)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {number}")
            image_id += 1
    files[f"{top}/classes.txt"] = "\n".join(classes).encode() + b"\n"
    files[f"{top}/images.txt"] = "\n".join(images).encode() + b"\n"
    files[f"{top}/image_class_labels.txt"] = "\n".join(labels).encode() + b"\n"
    files[f"{top}/train_test_split.txt"] = b""  # the other (not class-disjoint) split: unused
    return files


@pytest.fixture(scope="module")
def cub_mirror(tmp_path_factory) -> tuple[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("cub_mirror")
    archive = write_tgz(folder / "CUB_200_2011.tgz", cub_files())
    return folder.as_uri() + "/", {archive.name: md5(archive)}


def test_cub_download_split_labels_and_lazy_reading(cub_mirror, tmp_path, monkeypatch):
    mirror, sums = cub_mirror
    decoded: list[Path] = []
    real_decode = bm._decode_image
    monkeypatch.setattr(bm, "_decode_image", lambda p, *a: decoded.append(p) or real_decode(p, *a))
    train = load_dataset("cub200", "train", root=tmp_path, size=8, mirrors=[mirror], md5=sums)
    assert decoded == []  # nothing read until indexed
    assert isinstance(train, bm.ImageFiles) and "read when indexed" in repr(train)
    assert train.classes == [CUB[1], CUB[2], CUB[3]] and train.num_classes == 3
    assert train.y.tolist() == [c for c in range(3) for _ in range(IMAGES_PER_CLASS)]
    one, label = train[4]
    assert one.dtype == torch.float32 and one.shape == (3, 8, 8) and int(label) == 1
    assert decoded == [train.paths[4]]
    assert_colours(train, [1, 2, 3])
    # the archive kept in the cache, unpacked beside it; the test split needs no download
    folder = tmp_path / "cub200"
    assert sorted(p.name for p in folder.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]
    test = load_dataset("cub200:" + str(folder), "test", size=8, download=False)
    assert test.classes == [CUB[101], CUB[102]] and len(test) == 2 * IMAGES_PER_CLASS
    assert not set(train.classes) & set(test.classes)
    assert_colours(test, [101, 102])
    # the ArrayDataset attributes batch code reads, and a subset that stays lazy
    assert Preprocessing.from_images(train.data).shape == (3, 8, 8)
    part = train.subset(torch.tensor([0, 8]))
    assert part.y.tolist() == [0, 2] and part.classes == train.classes
    loaded = part.load()
    assert loaded.data.shape == (2, 3, 8, 8) and torch.equal(loaded.inputs[:], part.inputs[:])


def test_damaged_image_fails_only_when_read_naming_it(cub_mirror, tmp_path):
    mirror, sums = cub_mirror
    ds = load_dataset("cub200", "train", root=tmp_path, size=8, mirrors=[mirror], md5=sums)
    ds.paths[1].write_bytes(b"not a jpeg")
    ds.inputs[[0, 2]]  # the others still read
    with pytest.raises(DatasetError, match=ds.paths[1].name):
        ds.inputs[0:2]
    ds.paths[2].unlink()
    with pytest.raises(DatasetError) as missing:  # listed but gone: one line naming the file
        load_dataset("cub200", "train", root=tmp_path, download=False)
    assert str(ds.paths[2]) in str(missing.value) and "\n" not in str(missing.value)


def test_damaged_archive_is_refused_with_both_checksums(tmp_path):
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(b"\x1f\x8b truncated download")
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cub200:{tmp_path}", "train")
    message = str(info.value)
    assert "\n" not in message and str(archive) in message
    assert md5(archive) in message and bm.BENCHMARKS["cub200"].archives[0].md5 in message
    assert not (tmp_path / "CUB_200_2011").exists()


def test_download_with_a_wrong_checksum_keeps_nothing(cub_mirror, tmp_path):
    mirror, sums = cub_mirror
    with pytest.raises(DatasetError) as info:
        load_dataset("cub200", root=tmp_path, mirrors=[mirror], md5={"CUB_200_2011.tgz": "0" * 32})
    message = str(info.value)
    assert "\n" not in message and sums["CUB_200_2011.tgz"] in message and "0" * 32 in message
    assert [p.name for p in (tmp_path / "cub200").iterdir()] == []


def test_missing_archive_offline_is_one_line(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cub200:{tmp_path}", "train", download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "CUB_200_2011.tgz") in message
    assert "data.caltech.edu" in message


def test_archive_climbing_out_is_refused(tmp_path):
    files = cub_files()
    files["../evil.txt"] = b"x"
    archive = write_tgz(tmp_path / "CUB_200_2011.tgz", files)
    with pytest.raises(DatasetError, match="climbs out"):
        load_dataset(f"cub200:{tmp_path}", md5={archive.name: md5(archive)})
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "CUB_200_2011").exists()


# -------------------------------------------------------------------------- Cars196

CAR_NAMES = [f"Make{i} Model {2000 + i % 13}" for i in range(1, 101)]
CAR_CLASSES = [1, 2, 3, 99, 100]  # 1-98 train, 99-196 test


def write_cars(folder: Path) -> None:
    from scipy.io import savemat

    files, annos = {}, []
    for c in CAR_CLASSES:
        for _ in range(IMAGES_PER_CLASS):
            rel = f"car_ims/{len(annos) + 1:06d}.jpg"
            files[rel] = jpeg(c)
            annos.append((rel, 10, 20, 30, 40, c, int(c > 98)))
    write_tgz(folder / "car_ims.tgz", files)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = np.zeros((1, len(annos)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(annos):
        records[0, i] = row
    names = np.array(CAR_NAMES, dtype=object).reshape(1, -1)
    savemat(folder / "cars_annos.mat", {"annotations": records, "class_names": names})


def test_cars196_split_names_and_labels(tmp_path):
    mirror = tmp_path / "mirror"
    write_cars(mirror)
    sums = {n: md5(mirror / n) for n in ("car_ims.tgz", "cars_annos.mat")}
    options = {"root": tmp_path / "cache", "size": 8, "mirrors": [mirror.as_uri()], "md5": sums}
    train = load_dataset("cars196", "train", **options)
    test = load_dataset("cars196", "test", **options)
    assert train.classes == CAR_NAMES[:3] and test.classes == [CAR_NAMES[98], CAR_NAMES[99]]
    assert len(train) == 3 * IMAGES_PER_CLASS and len(test) == 2 * IMAGES_PER_CLASS
    assert_colours(train, [1, 2, 3])
    assert_colours(test, [99, 100])
    # the small annotation file is checked on every load: a damaged one is refused
    mat = tmp_path / "cache" / "cars196" / "cars_annos.mat"
    mat.write_bytes(mat.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        load_dataset("cars196", "train", **options)
    assert sums["cars_annos.mat"] in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- SOP

SOP = {  # class_id -> (super class id, category folder, product id)
    1: (1, "bicycle_final", "111085122871"),
    2: (1, "bicycle_final", "111265328556"),
    3: (3, "chair_final", "111182689872"),
    4: (1, "bicycle_final", "121017384916"),
    5: (11, "table_final", "140895384513"),
}


def sop_files() -> dict[str, bytes]:
    top = "Stanford_Online_Products"
    files: dict[str, bytes] = {}
    lists = {"train": ["image_id class_id super_class_id path"], "test": []}
    lists["test"].append(lists["train"][0])
    image_id = 1
    for class_id, (super_id, folder, product) in SOP.items():
        for k in range(IMAGES_PER_CLASS):
            rel = f"{folder}/{product}_{k}.JPG"
            files[f"{top}/{rel}"] = jpeg(class_id)
            split = "train" if class_id <= 3 else "test"
            lists[split].append(f"{image_id} {class_id} {super_id} {rel}")
            image_id += 1
    for split, lines in lists.items():
        files[f"{top}/Ebay_{split}.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def test_sop_lists_give_the_split(tmp_path):
    mirror = write_zip(tmp_path / "mirror" / "Stanford_Online_Products.zip", sop_files())
    options = {"size": 8, "mirrors": [mirror.parent.as_uri()], "md5": {mirror.name: md5(mirror)}}
    train = load_dataset(f"sop:{tmp_path / 'sop'}", "train", **options)
    test = load_dataset(f"sop:{tmp_path / 'sop'}", "test", **options)
    assert train.classes == [f"{f}/{p}" for _, f, p in (SOP[1], SOP[2], SOP[3])]
    assert test.classes == ["bicycle_final/121017384916", "table_final/140895384513"]
    assert train.y.tolist() == [c for c in range(3) for _ in range(IMAGES_PER_CLASS)]
    assert_colours(train, [1, 2, 3])
    assert_colours(test, [4, 5])
    grey = load_dataset(f"sop:{tmp_path / 'sop'}", "test", size=(8, 6), mode="L")
    assert grey.data[[0, -1]].shape == (2, 1, 8, 6) and grey.inputs[0].shape == (1, 8, 6)
    listing = tmp_path / "sop" / "Stanford_Online_Products" / "Ebay_test.txt"
    listing.write_text(listing.read_text() + "99 7 1\n")
    with pytest.raises(DatasetError, match=r"Ebay_test\.txt: line"):
        load_dataset(f"sop:{tmp_path / 'sop'}", "test")


# ----------------------------------------------------------------------- In-Shop

INSHOP = {  # item id -> (path folder, how many images per status)
    "id_00000001": ("WOMEN/Dresses", {"train": 3}),
    "id_00000002": ("MEN/Denim", {"train": 2}),
    "id_00000007": ("WOMEN/Blouses_Shirts", {"query": 2, "gallery": 1}),
    "id_00000009": ("MEN/Tees_Tanks", {"query": 1, "gallery": 2}),
    "id_00000012": ("WOMEN/Skirts", {"query": 1, "gallery": 1}),
}


def write_inshop(folder: Path, eval_folder: bool = False) -> None:
    files: dict[str, bytes] = {}
    rows = []
    for item, (where, counts) in INSHOP.items():
        number = int(item[3:])
        k = 0
        for status, count in counts.items():
            for _ in range(count):
                rel = f"img/{where}/{item}/{k:02d}_{k + 1}_front.jpg"
                files[rel] = jpeg(number)
                rows.append(f"{rel} {item} {status}")
                k += 1
    write_zip(folder / "img.zip", files)
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    listing = folder / ("Eval" if eval_folder else "") / "list_eval_partition.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(text)


def test_inshop_train_and_query_against_gallery(tmp_path):
    write_inshop(tmp_path, eval_folder=True)
    train = load_dataset(f"inshop:{tmp_path}", "train", size=8)
    assert train.classes == ["id_00000001", "id_00000002"] and train.y.tolist() == [0] * 3 + [1] * 2
    assert_colours(train, [1, 2])
    query, gallery = bm.inshop_query_gallery(tmp_path, size=8)
    test_items = ["id_00000007", "id_00000009", "id_00000012"]
    assert query.classes == gallery.classes == test_items
    assert query.y.tolist() == [0, 0, 1, 2] and gallery.y.tolist() == [0, 1, 1, 2]
    assert_colours(query, [7, 9, 12])
    assert_colours(gallery, [7, 9, 12])
    assert not set(query.paths) & set(gallery.paths)
    assert not set(train.classes) & set(query.classes)
    both = load_dataset(f"inshop:{tmp_path}", "test", size=8)
    assert both.paths == query.paths + gallery.paths and both.classes == test_items


def test_inshop_needs_its_files_placed_by_hand(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(f"inshop:{tmp_path}", "train")
    message = str(info.value)
    assert "\n" not in message and "img.zip" in message and "InShopRetrieval" in message
    write_inshop(tmp_path)
    listing = tmp_path / "list_eval_partition.txt"
    count, rest = listing.read_text().split("\n", 1)
    listing.write_text(f"{int(count) + 1}\n{rest}")  # a row lost
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(f"inshop:{tmp_path}", "train")


def test_bad_options_fail_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_dataset(f"sop:{tmp_path}", "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        load_dataset(f"sop:{tmp_path}", mode="CMYK")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_on_inshop_searches_queries_against_the_gallery(tmp_path, capsys):
    """A run trained on In-Shop's train items (image_size reaches the benchmark loader) is
    evaluated with In-Shop's protocol: each query against the gallery only, equal to the
    retrieval metrics of the network's embeddings of the two parts, beside the raw pixels."""
    from deepmetric.config import load_config
    from deepmetric.evaluate import evaluate_run, retrieval_metrics
    from deepmetric.evaluate.fewshot import raw_pixels
    from deepmetric.models import embed
    from deepmetric.runs import Run
    from deepmetric.training import train

    write_inshop(tmp_path / "inshop", eval_folder=True)
    spec = f"inshop:{tmp_path / 'inshop'}"
    overrides = [f"data={spec}", f"out={tmp_path / 'run'}", "image_size=12", "mode=batch"]
    overrides += ["model.backbone=small_cnn", "model.dim=8", "epochs=1", "train.p=2"]
    overrides += ["train.k=2", "train.val_fraction=0", "train.device=cpu", "train.augment=false"]
    train(load_config(None, overrides), stream=None)
    run = Run.open(tmp_path / "run")
    assert run.preprocessing() == Preprocessing(3, 12, 12)
    metrics = evaluate_run(
        run.path, embedding_map=False, device="cpu", fars=(), progress=lambda _: None
    )
    block = metrics["query_gallery"]
    query, gallery = bm.inshop_query_gallery(tmp_path / "inshop", size=12)
    net = run.network().net
    want = retrieval_metrics(
        embed(net, query.inputs[:]),
        query.y,
        ref_embeddings=embed(net, gallery.inputs[:]),
        ref_labels=gallery.y,
    )
    assert block["queries"] == want["queries"] == 4
    for name in ("precision_at_1", "r_precision", "map_at_r"):
        assert block[name] == pytest.approx(want[name], abs=1e-6)
    assert block["precision_at_k"] == pytest.approx(want["precision_at_k"], abs=1e-6)
    assert (block["queries_given"], block["gallery"]) == (4, 4)
    raw = retrieval_metrics(
        raw_pixels(query.inputs[:]),
        query.y,
        ref_embeddings=raw_pixels(gallery.inputs[:]),
        ref_labels=gallery.y,
    )
    assert block["raw_input_baseline"]["map_at_r"] == pytest.approx(raw["map_at_r"], abs=1e-6)
    report = (run.eval_dir / "report.html").read_text()
    assert "Queries against the gallery (4 queries, 4 gallery images)" in report
    from deepmetric.cli import main as cli_main

    capsys.readouterr()
    out = tmp_path / "cli_eval"
    assert (
        cli_main(["evaluate", str(run.path), "--device", "cpu", "--no-map", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "queries against the gallery (4 queries, 4 gallery images): precision@1" in printed


def test_the_benchmarks_take_image_size_from_the_config(tmp_path):
    """image_size reaches the benchmark loaders as it reaches image folders."""
    from deepmetric.config import load_config
    from deepmetric.data.training_data import load_options

    config = load_config(None, ["data=cub200:/x", "image_size=40"])
    assert load_options(config) == {"size": (40, 40)}
    assert load_options(load_config(None, ["data=fashion-mnist"])) == {}
