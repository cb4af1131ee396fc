"""Fuzzing the three readers of untrusted input: the IDX parser, the image loading path
(``decode_image``, the folder loader, ``Preprocessing.apply``) and the config loader (YAML files
and ``key=value`` overrides).

Each test mutates valid input (magic numbers, dims, chunk fields, truncations, random bytes,
random YAML trees) and checks that the reader either succeeds (with a consistent result) or
raises the project's own error (``DatasetError``, the ``ValueError`` naming the image,
``ConfigError``), one line, and nothing else. The normal run tries the conftest profile's
number of examples (derandomized: the same every run); ``make fuzz`` loads the ``fuzz`` profile
(``HYPOTHESIS_PROFILE=fuzz``, ``FUZZ_EXAMPLES`` examples per test) and runs the atheris
harness (``tests/fuzz_atheris.py``) too. The regression tests at the end hold the crashes the
fuzzing found, each as it was found.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepmetric.config import Config, ConfigError, config_to_yaml, load_config, valid_keys
from deepmetric.data import DatasetError, Preprocessing, load_idx, load_idx_dir, load_image_folder
from deepmetric.data.preprocess import MAX_PIXELS, decode_image

# Hypothesis runs every example in one test call: a temporary folder per test, not tmp_path.
# 200 examples per property in the normal run (a few seconds in all); `make fuzz` sets the
# conftest's fuzz profile, whose FUZZ_EXAMPLES then apply.
FUZZ = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    **({} if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else {"max_examples": 200}),
)


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, repr(text)
    return text


# --------------------------------------------------------------------------- IDX files

IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@st.composite
def valid_idx(draw) -> bytes:
    """A valid IDX file: any element type, 1 to 4 dims of 0 to 5 items."""
    type_code = draw(st.sampled_from(sorted(IDX_TYPES)))
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    size = math.prod(shape) * np.dtype(IDX_TYPES[type_code]).itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    header = struct.pack(">HBB", 0, type_code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return header + data


# One mutation: (kind, position or value, bytes); applied in order by _mutate.
FLIP = st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255))
TRUNCATE = st.tuples(st.just("truncate"), st.integers(0, 64), st.just(0))
INSERT = st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
MUTATIONS = st.one_of(
    st.tuples(st.just("magic"), st.integers(0, 3), st.integers(0, 255)),
    st.tuples(st.just("ndim"), st.just(3), st.integers(0, 255)),
    # a consistent file of another rank: ``n`` dims of 1 and one element
    st.tuples(st.just("rank"), st.integers(0, 255), st.just(0)),
    st.tuples(
        st.just("dim"),
        st.integers(0, 7),
        st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)),
    ),
    # the dims (0, n, n): no data, and a huge shape
    st.tuples(st.just("zero-huge"), st.integers(2**31, 2**32 - 1), st.just(0)),
    TRUNCATE,
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16), st.just(0)),
    FLIP,
    INSERT,
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, where, what in mutations:
        if kind in ("magic", "ndim") and where < len(buf):
            buf[where] = what
        elif kind == "dim" and 8 + 4 * where <= len(buf):
            buf[4 + 4 * where : 8 + 4 * where] = struct.pack(">I", what)
        elif kind == "rank" and len(buf) >= 4:
            itemsize = np.dtype(IDX_TYPES.get(buf[2], "u1")).itemsize
            buf[3:] = bytes([where]) + struct.pack(f">{where}I", *[1] * where) + b"\1" * itemsize
        elif kind == "zero-huge" and len(buf) >= 4:
            buf[3:] = b"\3" + struct.pack(">3I", 0, where, where)
        elif kind == "truncate":
            del buf[min(where, len(buf)) :]
        elif kind == "append":
            buf += where
        elif kind == "flip" and buf:
            buf[where % len(buf)] ^= what
        elif kind == "insert":
            buf[where % (len(buf) + 1) : where % (len(buf) + 1)] = what
    return bytes(buf)


def _check_idx(path: Path) -> None:
    """``load_idx`` gives an array consistent with its header, or a ``DatasetError`` naming
    the file."""
    try:
        array = load_idx(path)
    except DatasetError as error:
        assert str(path) in _one_line(error)
        return
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    assert raw[:2] == b"\0\0" and array.ndim == raw[3]
    assert tuple(array.shape) == struct.unpack(f">{raw[3]}I", raw[4 : 4 + 4 * raw[3]])
    assert array.nbytes == len(raw) - 4 - 4 * raw[3]


@FUZZ
@given(
    data=st.one_of(valid_idx(), st.binary(max_size=64)),
    mutations=st.lists(MUTATIONS, max_size=3),
    gz=st.booleans(),
    gz_damage=st.lists(TRUNCATE | FLIP, max_size=1),
)
def test_idx_parser_on_mutated_files(data, mutations, gz, gz_damage):
    content = _mutate(data, mutations)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
        path.write_bytes(_mutate(gzip.compress(content), gz_damage) if gz else content)
        _check_idx(path)
        # the same file as the images of an IDX folder with valid labels
        labels = struct.pack(">HBBI", 0, 0x08, 1, 2) + b"\x00\x01"
        (Path(folder) / "train-labels-idx1-ubyte").write_bytes(labels)
        try:
            ds = load_idx_dir(folder, "train")
        except DatasetError as error:
            _one_line(error)
        else:
            assert ds.x.shape[1:] == (1, *ds.x.shape[2:]) and len(ds) == 2


def test_unmutated_idx_files_load_exactly():
    """The fuzzer's starting points are valid: each loads as the array it holds."""
    with tempfile.TemporaryDirectory() as folder:
        for type_code, dtype in IDX_TYPES.items():
            array = (np.arange(24) % 100).astype(dtype).reshape(2, 3, 4)
            header = struct.pack(">HBB3I", 0, type_code, 3, 2, 3, 4)
            path = Path(folder) / f"t{type_code}"
            path.write_bytes(header + array.tobytes())
            np.testing.assert_array_equal(load_idx(path), array)


# --------------------------------------------------------------------------- images


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode(mode: str, fmt: str, orientation: int | None = None) -> bytes:
    """A 6 x 5 image; with ``orientation``, an EXIF block holding it (the folder loader and
    inference turn images upright by it: damaged EXIF is parsed too)."""
    rng = np.random.default_rng(len(mode) + len(fmt))
    pixels = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA").convert(mode)
    out = io.BytesIO()
    if orientation is None:
        img.save(out, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(out, format=fmt, exif=exif)
    return out.getvalue()


SOURCES = {
    "png-L": _encode("L", "PNG"),
    "png-RGB": _encode("RGB", "PNG"),
    "png-RGBA": _encode("RGBA", "PNG"),
    "png-P": _encode("P", "PNG"),
    "png-I16": _encode("I;16", "PNG"),
    "jpeg-L": _encode("L", "JPEG"),
    "jpeg-RGB": _encode("RGB", "JPEG"),
    "gif": _encode("P", "GIF"),
    "bmp": _encode("RGB", "BMP"),
    "jpeg-exif": _encode("RGB", "JPEG", orientation=6),
    "png-exif": _encode("L", "PNG", orientation=3),
}


def _set_size(data: bytes, width: int, height: int) -> bytes:
    """Declare another size: the PNG IHDR (with its CRC made right again, so the parser gets
    past it) or the JPEG SOF0 marker; other formats unchanged."""
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        body = struct.pack(">II", width, height) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", body) + data[33:]
    sof = data.find(b"\xff\xc0")
    if data.startswith(b"\xff\xd8") and sof > 0:
        size = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
        return data[: sof + 5] + size + data[sof + 9 :]
    return data


IMAGE_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(
        st.just("size"),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    ),
)


def _fix_png_crcs(data: bytes) -> bytes:
    """Make every whole PNG chunk's CRC right again, so that damage inside a chunk (a header
    field, the compressed pixels) reaches the decoder instead of failing the CRC check."""
    if not data.startswith(b"\x89PNG"):
        return data
    buf, at = bytearray(data), 8
    while at + 12 <= len(buf):
        (length,) = struct.unpack(">I", buf[at : at + 4])
        if at + 12 + length > len(buf):
            break
        buf[at + 8 + length : at + 12 + length] = struct.pack(
            ">I", zlib.crc32(buf[at + 4 : at + 8 + length])
        )
        at += 12 + length
    return bytes(buf)


def _mutate_image(data: bytes, mutations: list[tuple], fix_crcs: bool = False) -> bytes:
    data = _mutate_image_bytes(data, mutations)
    return _fix_png_crcs(data) if fix_crcs else data


def _mutate_image_bytes(data: bytes, mutations: list[tuple]) -> bytes:
    for kind, a, b in mutations:
        if kind == "size":
            # Sizes that would decode for seconds (millions of pixels) are tried by the
            # decompression-bomb tests; here the declared size stays small or is refused.
            if 0 < a * b <= MAX_PIXELS and a * b > 4_000_000:
                a, b = a % 1000, b % 1000
            data = _set_size(data, a, b)
        else:
            data = _mutate(data, [(kind, a, b)])
    return data


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's, on damaged EXIF or palettes
@FUZZ
@given(
    source=st.sampled_from(sorted(SOURCES)),
    mutations=st.lists(IMAGE_MUTATIONS, min_size=1, max_size=3),
    fix_crcs=st.booleans(),
)
def test_image_loading_on_mutated_files(source, mutations, fix_crcs):
    data = _mutate_image(SOURCES[source], mutations, fix_crcs)
    try:  # an upload: bytes in memory
        img = decode_image(io.BytesIO(data), "upload.bin")
    except ValueError as error:
        assert _one_line(error).startswith("upload.bin: "), error
    else:
        assert img.size[0] * img.size[1] <= MAX_PIXELS
        img.close()
    suffix = ".jpg" if source.startswith("jpeg") else f".{source.split('-')[0]}"
    with tempfile.TemporaryDirectory() as folder:
        for name in ("a", "b"):
            (Path(folder) / name).mkdir()
            (Path(folder) / name / f"0{suffix}").write_bytes(SOURCES[source])
        bad = Path(folder) / "b" / f"1{suffix}"
        bad.write_bytes(data)
        try:  # the folder loader
            ds = load_image_folder(folder, size=8)
        except DatasetError as error:
            assert str(bad) in _one_line(error)
        else:
            assert ds.x.shape[0] == 3 and ds.x.shape[2:] == (8, 8)
            assert float(ds.x.min()) >= 0 and float(ds.x.max()) <= 1
        try:  # inference on a file
            x = Preprocessing(channels=3, height=8, width=8).apply(bad)
        except ValueError as error:
            assert _one_line(error).startswith(f"{bad}: "), error
        else:
            assert x.shape == (1, 3, 8, 8)


def test_unmutated_images_decode():
    for name, data in SOURCES.items():
        img = decode_image(io.BytesIO(data), name)
        assert img.size == (6, 5), name
        assert ("exif" in name) == (img.getexif().get(0x0112) is not None), name


# --------------------------------------------------------------------------- config

KEYS = valid_keys(Config)
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        ["batch", "joint", "triplet", "adam", "cosine", "euclidean", "mlp", "1e-3", "nan", "auto"]
    ),
)
TREES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
KEY_NAMES = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.text(max_size=10))


def _nest(flat: dict) -> dict:
    """``{"train.lr": 1}`` -> ``{"train": {"lr": 1}}`` (a clash keeps the first value)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node.setdefault(last, value)
    return tree


def _check_loaded(config: Config) -> None:
    """A config that loads is valid and survives its own YAML."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "again.yaml"
        path.write_text(config_to_yaml(config))
        assert config_to_yaml(load_config(path)) == config_to_yaml(config)


@FUZZ
@given(
    values=st.dictionaries(KEY_NAMES, TREES, max_size=6),
    damage=st.lists(FLIP | INSERT | TRUNCATE, max_size=2),
)
def test_config_files_from_random_trees(values, damage):
    text = yaml.safe_dump(_nest(values), allow_unicode=True)
    if damage:
        text = _mutate(text.encode(), damage).decode("utf-8", errors="replace")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            config = load_config(path)
        except ConfigError as error:
            _one_line(error)
        else:
            _check_loaded(config)


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(KEY_NAMES, TREES).map(
                lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1], default_flow_style=True).strip()}"
            ),
            st.tuples(KEY_NAMES, st.text(max_size=12)).map(lambda kv: f"{kv[0]}={kv[1]}"),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
def test_config_overrides_from_random_text(overrides):
    try:
        config = load_config(None, overrides)
    except ConfigError as error:
        _one_line(error)
    else:
        _check_loaded(config)


# --------------------------------------------------------------------------- regressions


def test_idx_with_more_dims_than_numpy_allows(tmp_path):
    """Found by the fuzzer: 65 dims of 1 and one byte made numpy's reshape raise a bare
    ``ValueError`` ("maximum supported dimension for an ndarray is currently 64")."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_mutate(struct.pack(">HBBI", 0, 0x08, 1, 1) + b"\1", [("rank", 65, 0)]))
    with pytest.raises(DatasetError, match=r"65 dimensions, more than the 32 supported"):
        load_idx(path)


def test_idx_with_a_zero_dim_beside_huge_ones(tmp_path):
    """Found by atheris (tests/fuzz_atheris.py idx): dims (0, 2**32 - 1, 2**32 - 1) declare no
    data, which is there, but no numpy array has that shape: numpy's reshape raised a bare
    ``ValueError("array is too big ...")``."""
    path = tmp_path / "crash-81a86f95"
    path.write_bytes(bytes.fromhex("0000080300000000ffffffffffffffff"))
    with pytest.raises(DatasetError, match=r"dims \(0, 4294967295, 4294967295\) are not an array"):
        load_idx(path)


def test_a_gzip_bomb_idx_file_is_refused_without_inflating_it(tmp_path):
    """32 MiB of zeros behind a header declaring 3 bytes, gzipped to 32 KiB: refused after
    reading the declared size and one byte more (the parser used to inflate it all first)."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    header = struct.pack(">HBBI", 0, 0x08, 1, 3)
    path.write_bytes(gzip.compress(header + bytes(32 << 20), compresslevel=1))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"trailing bytes: dims \(3,\) need 3 data bytes"):
            load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"


def test_a_png_with_a_damaged_header_names_the_file(tmp_path):
    """Found by the fuzzer: one flipped bit made PIL raise ``ValueError("Truncated IHDR
    chunk")``, which ``decode_image`` let through without the file's name."""
    data = _mutate_image(SOURCES["png-RGBA"], [("flip", 204, 1)])
    with pytest.raises(ValueError, match=r"^upload\.png: cannot decode image \(Truncated IHDR"):
        decode_image(io.BytesIO(data), "upload.png")


def test_a_damaged_exif_block_names_the_file(tmp_path):
    """Found by the fuzzer: a flipped bit in the EXIF block of a PNG (CRCs made right) made
    ``ImageOps.exif_transpose`` raise ``SyntaxError("not a TIFF file ...")`` through the folder
    loader and ``Preprocessing.apply``."""
    data = _mutate_image(SOURCES["png-exif"], [("flip", 41, 1)], fix_crcs=True)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(SOURCES["png-L"])
    bad = tmp_path / "b" / "1.png"
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match=rf"^{bad}: cannot convert image \(damaged EXIF"):
        load_image_folder(tmp_path, size=8)
    with pytest.raises(ValueError, match=rf"^{bad}: cannot convert image \(damaged EXIF"):
        Preprocessing(channels=1, height=8, width=8).apply(bad)


def test_yaml_errors_are_one_line(tmp_path):
    """Found by the fuzzer: PyYAML's messages span several lines (with a caret drawing), so
    ``deepmetric: error: ...`` did too."""
    path = tmp_path / "cut.yaml"
    path.write_text("{")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert _one_line(error.value) == (
        f"config {path} is not valid YAML: while parsing a flow node; expected the node "
        "content, but found '<stream end>' (line 1, column 2)"
    )
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.lr=\t"])
    assert _one_line(error.value).startswith("the value of override 'train.lr=\\t' is not valid")


# 9 ** 9 = 387 million leaves behind 9 aliases of 9 aliases ...: a few hundred bytes of YAML
BOMB = (
    "["
    + ", ".join(
        ["&a0 [x, x, x, x, x, x, x, x, x]"]
        + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    )
    + "]"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # 9**9 leaves behind aliases: the error message used to repr them all (hours, GBs)
        (f"model: {BOMB}\n", "model: expected a mapping, got [['x', "),
        (f"model:\n  builder_args: {{x: {BOMB}}}\n", ": too large or too deeply nested"),
        # a mapping that holds itself: accepted, then dataclasses.asdict recursed for ever
        ("model:\n  builder_args: &s {self: *s}\n", "model.builder_args.self.self.self"),
        # a float setting given an integer too large for a float: OverflowError
        (f"train:\n  lr: 1{'0' * 400}\n", "train.lr: 1000"),
        # an integer of more than 4300 digits: Python's int() limit, a bare ValueError
        (f"epochs: {'9' * 5000}\n", "Exceeds the limit (4300 digits)"),
        # found by the fuzzer: a \U escape beyond any character, OverflowError from PyYAML
        ('name: "\\UFFFFFFFF"\n', "Python int too large to convert to C int"),
        # nesting deeper than the recursion limit: RecursionError from PyYAML
        ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("model:\n  builder_args: {1: x}\n", "model.builder_args: keys must be strings"),
    ],
    ids=[
        "alias-bomb",
        "alias-bomb-mapping",
        "self-reference",
        "float-overflow",
        "int-digits",
        "unicode-escape",
        "deep-nesting",
        "int-key",
    ],
)
def test_hostile_yaml_gets_a_config_error_at_once(tmp_path, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in _one_line(error.value) and len(str(error.value)) < 1000


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text: invalid"):
        load_config(path)
