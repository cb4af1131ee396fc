"""A many-class image set made offline from fonts: characters as classes, font faces as examples.

Why: a metric transfers to classes it never saw only when it learned from many classes (four
Fashion-MNIST classes teach nothing that transfers). Omniglot has 1,623 characters drawn by
20 people each; this module makes the same kind of set from the fonts Debian packages, with
no download: every character of a set is a class, and each font face that draws it gives one
example, as each drawer gives one Omniglot example. Faces differ in weight (thin to black),
style (sans, serif / Song-Ming, Kai brush, handwriting) and regional forms, so telling two
characters apart across faces needs the shape of the strokes, not the pixels of one face.

What is drawn, per face and character: the glyph is rendered at 4x the output size in white
on black, cropped to its ink, centred on the canvas by its ink box, and reduced to
``size x size`` (28 by default, as MNIST and the few-shot Omniglot literature use) by area
averaging. The font size of a face is chosen so that its reference character (``国`` for
the CJK preset) spans 80 % of the canvas height, so faces with small or large design sizes
draw alike; characters keep their size relative to each other (``一`` stays a thin line).
A character a face lacks (no glyph, or the face's ``.notdef`` box) or draws empty is left out
of the whole set, so every class has one image per face.

Presets (faces and their Debian packages in :data:`PRESETS`):

* ``cjk``: the 3,755 level-1 hanzi of GB 2312 (the common simplified Chinese characters) in
  31 faces of 13 font packages (Noto Sans / Serif CJK at every weight and in Japanese forms, the
  Arphic Song and Kai faces, WenQuanYi Zen Hei, LXGW WenKai, BabelStone Han, TW-Kai / TW-Sung,
  Droid Sans Fallback, HanaMin). Left out as near copies at 28 x 28 of a face already in (mean
  absolute pixel difference under 1 of 255): WenQuanYi Micro Hei (Droid Sans Fallback), Zen Hei
  Sharp, the TW / HK members of the Arphic collections, Noto's KR forms; left out for lacking
  454 of the characters: Seto handwriting.
* ``latin``: 62 ASCII letters and digits and 22 Greek small letters in 22 faces of
  ``fonts-dejavu-core`` and ``fonts-liberation``: small, for tests and quick checks.

Splits are class-disjoint: the characters are shuffled with ``seed`` and the last
``test_fraction`` of them are the test classes (never trained on); validation classes are
drawn from the others when training (``train.val_classes``, a count or a fraction), so they are
never trained on either. Labels are one id space over all characters (the npz ``classes``
array names them ``U+XXXX``), so ids go far beyond 255.

Written under ``out``: ``glyphs.npz`` (``x``/``y`` the training classes, ``x_test``/``y_test``
the test classes, uint8 ``(N, size, size)`` and int32 labels, ``classes``, ``face`` /
``face_test`` the face index of each item, ``faces`` their names), the same as the four
MNIST-style files in ``idx/`` (``idx:`` data; int32 labels, IDX type 0x0C),
``folder/train/U+XXXX/FACE.png`` and ``folder/test/...`` (``folder:`` data), and
``manifest.json``: the preset, the faces with the
SHA-256 of their font files, the Pillow and FreeType versions, the characters left out and the
SHA-256 of the arrays, so a set can be re-made and checked. ``python -m deepmetric.data.glyphs
--help``; ``make data-glyphs`` installs the preset's font packages first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FONT_ROOT = Path("/usr/share/fonts")
SCALE = 4  # render at SCALE x the output size, then area-average down
FILL = 0.8  # the reference character spans this share of the canvas height


class GlyphError(ValueError):
    """A glyph set cannot be made as asked (a missing font package, too few faces or classes)."""


@dataclass(frozen=True)
class Face:
    """One font face: a file under :data:`FONT_ROOT` (``index`` within a .ttc collection)."""

    name: str
    package: str
    file: str
    index: int = 0


@dataclass(frozen=True)
class Preset:
    """Characters (the classes, in a fixed order) and faces (the examples)."""

    chars: str
    faces: tuple[Face, ...]
    reference: str  # sets each face's font size: it spans FILL of the canvas height


def _gb2312_level1() -> str:
    """The 3,755 level-1 hanzi of GB 2312, rows 16-55 (0xB0A1 ... 0xD7F9), in code order."""
    out = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            if hi == 0xD7 and lo > 0xF9:
                break
            out.append(bytes((hi, lo)).decode("gb2312"))
    return "".join(out)


def _noto(family: str, weight: str, region: int = 2) -> Face:
    package = "fonts-noto-cjk" if weight in ("Regular", "Bold") else "fonts-noto-cjk-extra"
    name = f"noto-{family.lower()}-{['jp', 'kr', 'sc', 'tc', 'hk'][region]}-{weight.lower()}"
    return Face(name, package, f"opentype/noto/Noto{family}CJK-{weight}.ttc", region)


_CJK_FACES = (
    *(
        _noto("Sans", w)
        for w in ("Thin", "Light", "DemiLight", "Regular", "Medium", "Bold", "Black")
    ),
    *(
        _noto("Serif", w)
        for w in ("ExtraLight", "Light", "Regular", "Medium", "SemiBold", "Bold", "Black")
    ),
    *(_noto(f, w, 0) for f in ("Sans", "Serif") for w in ("Regular", "Bold")),  # JP forms
    Face("arphic-sungti-gb", "fonts-arphic-gbsn00lp", "truetype/arphic-gbsn00lp/gbsn00lp.ttf"),
    Face("arphic-kaiti-gb", "fonts-arphic-gkai00mp", "truetype/arphic-gkai00mp/gkai00mp.ttf"),
    Face("arphic-ukai-cn", "fonts-arphic-ukai", "truetype/arphic/ukai.ttc", 0),
    Face("arphic-uming-cn", "fonts-arphic-uming", "truetype/arphic/uming.ttc", 0),
    Face("babelstone-han", "fonts-babelstone-han", "truetype/babelstone/BabelStoneHan.ttf"),
    Face("tw-kai", "fonts-cns11643-kai", "truetype/cns11643/TW-Kai-98_1.ttf"),
    Face("tw-sung", "fonts-cns11643-sung", "truetype/cns11643/TW-Sung-98_1.ttf"),
    Face("droid-sans-fallback", "fonts-droid-fallback", "truetype/droid/DroidSansFallbackFull.ttf"),
    Face("hanamin-a", "fonts-hanazono", "truetype/hanazono/HanaMinA.ttf"),
    *(
        Face(f"lxgw-wenkai-{w.lower()}", "fonts-lxgw-wenkai", f"truetype/lxgw-wenkai/{f}.ttf")
        for w, f in (
            ("Light", "LXGWWenKai-Light"),
            ("Regular", "LXGWWenKai-Regular"),
            ("Bold", "LXGWWenKai-Bold"),
        )
    ),
    Face("wqy-zenhei", "fonts-wqy-zenhei", "truetype/wqy/wqy-zenhei.ttc", 0),
)

_LATIN_FACES = (
    *(
        Face(f"dejavu-{f.lower()}", "fonts-dejavu-core", f"truetype/dejavu/DejaVu{f}.ttf")
        for f in ("Sans", "Sans-Bold", "Serif", "Serif-Bold", "SansMono", "SansMono-Bold")
    ),
    *(
        Face(
            f"liberation-{f.lower()}", "fonts-liberation", f"truetype/liberation/Liberation{f}.ttf"
        )
        for family in ("Sans", "Serif", "Mono", "SansNarrow")
        for f in (f"{family}-{s}" for s in ("Regular", "Bold", "Italic", "BoldItalic"))
    ),
)

PRESETS: dict[str, Preset] = {
    "cjk": Preset(_gb2312_level1(), _CJK_FACES, "国"),
    "latin": Preset(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        "αβγδεζηθικλμξπρστυφχψω",  # no omicron / nu / the final sigma: Latin look-alikes
        _LATIN_FACES,
        "H",
    ),
}


def packages(preset: str) -> list[str]:
    """The Debian font packages of ``preset``, sorted."""
    return sorted({f.package for f in _preset(preset).faces})


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise GlyphError(f"unknown glyph preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def class_name(char: str) -> str:
    """``U+554A``: the class name of a character (ASCII, safe as a folder name)."""
    return f"U+{ord(char):04X}"


def _font(face: Face, px: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT_ROOT / face.file), px, index=face.index)


def _ink(font: Any, char: str, canvas: int) -> Any:
    """The glyph drawn white on black, cropped to its ink (None when it has no ink)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text((canvas // 4, canvas // 4), char, fill=255, font=font)
    box = img.getbbox()
    return None if box is None else img.crop(box)


def _font_size(face: Face, reference: str, size: int) -> int:
    """The pixel size at which ``reference`` spans :data:`FILL` of the canvas height."""
    canvas = size * SCALE
    probe = 100
    ink = _ink(_font(face, probe), reference, 4 * probe)
    if ink is None:
        raise GlyphError(f"face {face.name} ({face.file}) draws no reference glyph {reference!r}")
    return max(4, round(probe * FILL * canvas / ink.height))


def render_face(face: Face, chars: str, *, size: int = 28, reference: str) -> np.ndarray:
    """uint8 ``(len(chars), size, size)`` glyphs of ``face``; an all-zero image where the face
    lacks the character (no glyph: its ``.notdef`` box, or no ink)."""
    from PIL import Image

    canvas = size * SCALE
    font = _font(face, _font_size(face, reference, size))
    notdef = _ink(font, "\U0010fffd", 2 * canvas)  # a private-use code point: the missing box
    notdef_bytes = None if notdef is None else (notdef.size, notdef.tobytes())
    out = np.zeros((len(chars), size, size), dtype=np.uint8)
    for i, ch in enumerate(chars):
        ink = _ink(font, ch, 2 * canvas)
        if ink is None or (ink.size, ink.tobytes()) == notdef_bytes:
            continue
        if ink.width > canvas or ink.height > canvas:  # larger than the canvas: shrink it
            k = canvas / max(ink.width, ink.height)
            ink = ink.resize((max(1, round(ink.width * k)), max(1, round(ink.height * k))))
        img = Image.new("L", (canvas, canvas), 0)
        img.paste(ink, ((canvas - ink.width) // 2, (canvas - ink.height) // 2))
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _choose_faces(preset_name: str, faces: int | None) -> list[Face]:
    preset = _preset(preset_name)
    missing = [f for f in preset.faces if not (FONT_ROOT / f.file).is_file()]
    want = len(preset.faces) if faces is None else faces
    if want < 2:
        raise GlyphError(f"faces must be at least 2 (examples per class), got {want}")
    if want > len(preset.faces):
        raise GlyphError(f"preset {preset_name} has {len(preset.faces)} faces; {want} were asked")
    present = [f for f in preset.faces if f not in missing]
    if len(present) < want:
        pkgs = sorted({f.package for f in missing})
        raise GlyphError(
            f"preset {preset_name}: {len(present)} of the {want} faces asked are installed; "
            f"missing font packages: {' '.join(pkgs)} (make data-glyphs installs them)"
        )
    return present[:want]


def make_glyph_set(
    out: str | os.PathLike[str],
    *,
    preset: str = "cjk",
    classes: int | None = None,
    faces: int | None = None,
    test_fraction: float = 0.2,
    size: int = 28,
    seed: int = 0,
    folder: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Render ``preset`` into ``out`` (see the module docstring) and return the manifest.

    ``classes``: how many characters (default all the faces share), drawn in the seeded
    order; ``faces``: the first this many faces of the preset (default all). Raises
    :class:`GlyphError` (one line) for a missing font package, more faces or classes than the
    preset gives, or a split without classes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise GlyphError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if size < 8:
        raise GlyphError(f"size must be at least 8 pixels, got {size}")
    spec = _preset(preset)
    chosen = _choose_faces(preset, faces)
    order = np.random.default_rng(seed).permutation(len(spec.chars))
    chars = "".join(spec.chars[i] for i in order)
    if classes is not None and classes > len(chars):
        raise GlyphError(
            f"preset {preset} has {len(chars)} characters; {classes} classes were asked"
        )
    images = []
    for i, face in enumerate(chosen):
        progress(f"face {i + 1}/{len(chosen)}: {face.name}")
        images.append(render_face(face, chars, size=size, reference=spec.reference))
    stack = np.stack(images, axis=1)  # (chars, faces, size, size)
    drawn = stack.reshape(len(chars), len(chosen), -1).max(axis=2) > 0
    keep = drawn.all(axis=1)
    dropped = [
        {
            "char": c,
            "name": class_name(c),
            "missing_in": [f.name for f, d in zip(chosen, row) if not d],
        }
        for c, row, k in zip(chars, drawn, keep)
        if not k
    ]
    chars = "".join(c for c, k in zip(chars, keep) if k)
    stack = stack[keep]
    if classes is not None:
        if classes > len(chars):
            raise GlyphError(
                f"the {len(chosen)} faces share {len(chars)} characters of preset {preset}; "
                f"{classes} classes were asked"
            )
        chars, stack = chars[:classes], stack[:classes]
    n_test = round(test_fraction * len(chars))
    n_train = len(chars) - n_test
    if n_test < 2 or n_train < 2:
        raise GlyphError(
            f"{len(chars)} classes with test_fraction {test_fraction}: {n_train} training and "
            f"{n_test} test classes (each needs at least 2)"
        )
    n_faces = len(chosen)
    labels = np.repeat(np.arange(len(chars), dtype=np.int32), n_faces)
    face_ids = np.tile(np.arange(n_faces, dtype=np.int16), len(chars))
    flat = stack.reshape(-1, size, size)
    cut = n_train * n_faces
    arrays = {
        "x": flat[:cut],
        "y": labels[:cut],
        "face": face_ids[:cut],
        "x_test": flat[cut:],
        "y_test": labels[cut:],
        "face_test": face_ids[cut:],
        "classes": np.array([class_name(c) for c in chars]),
        "faces": np.array([f.name for f in chosen]),
    }
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    progress(f"writing {root / 'glyphs.npz'}")
    tmp = root / "glyphs.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(root / "glyphs.npz")
    _write_idx(root / "idx", arrays)
    if folder:
        progress(f"writing {root / 'folder'}")
        _write_folder(root / "folder", chars, stack, chosen, n_train)
    manifest = _manifest(preset, chosen, chars, n_train, size, seed, test_fraction, dropped)
    manifest["arrays_sha256"] = _sha256_arrays(arrays)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    progress(
        f"{len(chars):,} classes ({n_train:,} train, {n_test:,} test) x {n_faces} faces -> {root}"
    )
    return manifest


def _write_idx(root: Path, arrays: dict[str, np.ndarray]) -> None:
    """The four MNIST-style IDX files (``idx:`` data); labels as int32 (IDX type 0x0C)."""
    from deepmetric.data.datasets import IDX_FILES, save_idx

    root.mkdir(parents=True, exist_ok=True)
    for split, suffix in (("train", ""), ("test", "_test")):
        images, labels = IDX_FILES[split]
        save_idx(root / images, arrays["x" + suffix])
        save_idx(root / labels, arrays["y" + suffix])


def _write_folder(
    root: Path, chars: str, stack: np.ndarray, faces: Sequence[Face], n_train: int
) -> None:
    from PIL import Image

    for i, ch in enumerate(chars):
        d = root / ("train" if i < n_train else "test") / class_name(ch)
        d.mkdir(parents=True, exist_ok=True)
        for j, face in enumerate(faces):
            Image.fromarray(stack[i, j]).save(d / f"{face.name}.png", optimize=False)


def _manifest(
    preset: str,
    faces: Sequence[Face],
    chars: str,
    n_train: int,
    size: int,
    seed: int,
    test_fraction: float,
    dropped: list[dict[str, Any]],
) -> dict[str, Any]:
    import PIL
    from PIL import features

    return {
        "preset": preset,
        "size": size,
        "seed": seed,
        "test_fraction": test_fraction,
        "classes": {"train": n_train, "test": len(chars) - n_train},
        "test_characters": chars[n_train:],
        "train_characters": chars[:n_train],
        "faces": [
            {
                "name": f.name,
                "package": f.package,
                "file": str(FONT_ROOT / f.file),
                "index": f.index,
                "sha256": _sha256_file(FONT_ROOT / f.file),
            }
            for f in faces
        ],
        "dropped_characters": dropped,
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepmetric.data.glyphs``: make a glyph set, or list a preset's packages."""
    p = argparse.ArgumentParser(
        prog="python -m deepmetric.data.glyphs",
        description="Render a many-class glyph set (characters as classes, font faces as "
        "examples) into OUT: glyphs.npz, folder/ and manifest.json.",
    )
    p.add_argument("--preset", default="cjk", help=f"one of {', '.join(PRESETS)} (default cjk)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--classes", type=int, help="how many characters (default: all)")
    p.add_argument("--faces", type=int, help="the first N faces of the preset (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of test classes")
    p.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    p.add_argument("--seed", type=int, default=0, help="seed of the class order (default 0)")
    p.add_argument("--no-folder", action="store_true", help="write glyphs.npz only")
    p.add_argument(
        "--packages", action="store_true", help="print the preset's Debian font packages"
    )
    args = p.parse_args(argv)
    try:
        if args.packages:
            print(" ".join(packages(args.preset)))
            return 0
        if not args.out:
            raise GlyphError("--out is required")
        make_glyph_set(
            args.out,
            preset=args.preset,
            classes=args.classes,
            faces=args.faces,
            test_fraction=args.test_fraction,
            size=args.size,
            seed=args.seed,
            folder=not args.no_folder,
        )
    except GlyphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
