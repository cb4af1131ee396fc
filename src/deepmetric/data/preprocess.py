"""From images as users hold them (files, PIL images, arrays) to the model's input tensor.

:class:`Preprocessing` records how a run's training images became tensors, so the same
pipeline can turn any new image into an input the network has seen the like of:

    decode (EXIF orientation applied) -> L or RGB -> resize to (height, width) -> * scale

giving float32 ``(N, C, H, W)``. With ``scale = 1/255`` (every built-in loader) a pixel value
``v`` in 0..255 becomes ``v / 255`` in [0, 1], computed as the loaders compute it (a float32
division by 255), so a training image written to a PNG file comes back bit for bit.

Conversions follow the folder loader (:func:`deepmetric.data.load_image_folder`): a grayscale
source (modes ``1``, ``L``, ``LA``, ``I``, ``I;16*``, ``F``) is converted to ``L`` and, for a
3-channel model, resized and then repeated into three channels; any other source is converted
to ``L`` (ITU-R 601-2 luma) or ``RGB``. Alpha is dropped, not composited (as in training);
palette images go through their palette. 16-bit grayscale (``I;16``) is scaled to 8 bits as
``round(v / 257)`` (so 65535 -> 255) rather than clipped at 255 as PIL's ``convert("L")`` does.
Resizing uses PIL's ``resample`` filter (bilinear, as the folder loader); an image already of
the target size is not resampled.

Files are checked before they are decoded (:func:`open_image`, the one gate every image file
and upload passes): only the raster formats of :data:`IMAGE_FORMATS` are opened (anything else,
EPS / PS / PDF above all, which PIL would hand to Ghostscript, is an :class:`ImageFormatError`);
more than :data:`MAX_PIXELS` pixels (a decompression bomb) is an :class:`ImageTooLargeError`,
whatever ``PIL.Image.MAX_IMAGE_PIXELS`` is set to; a missing, unreadable, truncated or non-image
file, or one that decodes but cannot be converted (a CIELAB TIFF, a damaged EXIF block), is an
:class:`ImageError`. All are ``ValueError``s naming the file. Given the target size, a JPEG of
more than :data:`DRAFT_PIXELS` pixels is decoded at reduced scale (1/2, 1/4 or 1/8, PIL's
``draft``), still at least that size.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from deepmetric.checks import positive_int
from deepmetric.config import MAX_IMAGE_SIDE

#: The most pixels (width x height) an image file may declare: PIL's own default limit.
#: Larger files are refused before decoding (a decompression bomb is a ValueError).
MAX_PIXELS = 89_478_485

#: The image formats that are opened (PIL's names; PPM also reads PGM / PBM): raster formats
#: PIL decodes by itself. Never EPS / PS / PDF or any other format that runs an external program.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

#: A JPEG of more pixels than this is decoded at reduced scale when the target size is known.
DRAFT_PIXELS = 1 << 22

#: PIL resampling filters by name.
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_KEYS = ("channels", "height", "width", "scale", "resample")

#: What :meth:`Preprocessing.apply` takes: a path, a PIL image, a list of them, a numpy array
#: or a tensor (see there).
Inputs = Any


def _positive_int(name: str, value: Any) -> int:
    positive_int(f"preprocessing {name}", value)
    if value > MAX_IMAGE_SIDE:  # as the config's image_size: refused before any allocation
        raise ValueError(f"preprocessing {name} must be <= {MAX_IMAGE_SIDE}, got {value!r}")
    return value


#: What PIL's format parsers raise on corrupt files besides ``OSError``: found by fuzzing
#: (tests/test_fuzz.py), e.g. ``ValueError("Truncated IHDR chunk")`` from a damaged PNG.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, IndexError)
#: ... and what conversions raise besides (a mode PIL has no conversion for, a damaged EXIF).
_CONVERT_ERRORS = (*_DECODE_ERRORS, KeyError, TypeError)


class ImageError(ValueError):
    """An image file that cannot be used: not an image, corrupt, or not convertible to the
    model's input (the message names the file and says why)."""


class ImageFormatError(ImageError):
    """A file in a format that is not opened (not one of :data:`IMAGE_FORMATS`)."""


class ImageTooLargeError(ImageError):
    """A file declaring more than :data:`MAX_PIXELS` pixels (a decompression bomb)."""


def _accepted() -> str:
    return ", ".join(f.replace("PPM", "PPM/PGM") for f in IMAGE_FORMATS)


def _prefix(source: str | Path | IO[bytes]) -> bytes:
    """The first bytes of ``source`` (``b""`` if unreadable), its position left at the start."""
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as file:
                return file.read(16)
        source.seek(0)
        head = source.read(16)
        source.seek(0)
        return head
    except (OSError, ValueError):
        return b""


def _unaccepted(source: str | Path | IO[bytes], name: str) -> ImageError:
    """Why PIL, limited to :data:`IMAGE_FORMATS`, did not open ``source``: a format it knows
    but does not open here (found from the first bytes only: no other parser runs), or none."""
    from PIL import Image

    head = _prefix(source)
    known = "PDF" if head.startswith(b"%PDF") else None
    for fmt, (_, accept) in Image.OPEN.items():
        if known is None and fmt not in IMAGE_FORMATS and accept is not None and head:
            with contextlib.suppress(Exception):
                known = fmt if accept(head) else None
    if known is not None:
        return ImageFormatError(
            f"{name}: {known} files are not accepted (images only: {_accepted()})"
        )
    return ImageError(f"{name}: not an image file (or not one of {_accepted()})")


def open_image(
    source: str | Path | IO[bytes], name: str, *, size: tuple[int, int] | None = None
) -> Any:
    """The image ``source`` (a path or a binary file object, called ``name`` in messages)
    opened but not decoded: its header read, its format one of :data:`IMAGE_FORMATS`, its size
    at most :data:`MAX_PIXELS` pixels. ``size`` (height, width): the size it will be resized
    to, so that a JPEG of more than :data:`DRAFT_PIXELS` pixels is decoded at reduced scale
    (``img.size`` is then the reduced size: what decoding will cost).

    Raises :class:`ImageFormatError`, :class:`ImageTooLargeError` or :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLargeError(
            f"{name}: too many pixels, refused (a decompression bomb?): {error}"
        ) from None
    except UnidentifiedImageError:
        raise _unaccepted(source, name) from None
    except _DECODE_ERRORS as error:
        raise ImageError(f"{name}: cannot decode image ({error})") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise ImageTooLargeError(
            f"{name}: {width} x {height} pixels is more than {MAX_PIXELS:,} (a decompression bomb?)"
        )
    if size is not None and img.format in ("JPEG", "MPO") and width * height > DRAFT_PIXELS:
        side = max(size)  # either orientation (EXIF may turn it)
        with contextlib.suppress(*_DECODE_ERRORS):
            img.draft(img.mode, (side, side))
    return img


def decode_image(
    source: str | Path | IO[bytes], name: str, *, size: tuple[int, int] | None = None
) -> Any:
    """:func:`open_image`, then decoded: a loaded PIL image, or an :class:`ImageError` naming
    ``name`` (truncated, corrupt). The one image-opening path of files and uploads."""
    return load_image(open_image(source, name, size=size), name)


def load_image(img: Any, name: str) -> Any:
    """Decode the image ``img`` opened by :func:`open_image` (called ``name`` in messages):
    ``img`` loaded, or an :class:`ImageError` (truncated, corrupt; ``img`` is closed then)."""
    try:
        img.load()  # reads the data; PIL closes a file it opened itself
    except _DECODE_ERRORS as error:
        img.close()
        raise ImageError(f"{name}: cannot decode image ({error})") from None
    return img


def upright_8bit(img: Any) -> tuple[Any, bool]:
    """A decoded PIL image as training and inference both see it: its EXIF orientation applied,
    16-bit grayscale scaled to 8 bits (v / 257, where PIL's ``convert`` would clip at 255);
    and whether it is grayscale. Both the folder loader and :meth:`Preprocessing.apply` go
    through it, so a training image and the same file at inference give the same tensor.
    A damaged EXIF block is a ``ValueError`` (the callers name the file)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img) or img
    except _DECODE_ERRORS as error:  # e.g. SyntaxError("not a TIFF file ...") from PIL
        raise ValueError(f"damaged EXIF block, cannot read its orientation ({error})") from None
    gray = img.mode in _GRAY_MODES
    if img.mode.startswith("I;16"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.round(wide / 257.0).astype(np.uint8), "L")
    return img, gray


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs: ``channels`` (1: L, 3: RGB), ``height`` x ``width``,
    ``scale`` (pixel value 0..255 -> input value), PIL ``resample`` filter name.

    Example::

        pre = Preprocessing(channels=1, height=28, width=28)
        x = pre.apply(["a.png", "b.jpg"])  # float32 (2, 1, 28, 28) in [0, 1]
    """

    channels: int
    height: int
    width: int
    scale: float = 1 / 255
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(
                f"preprocessing channels must be 1 (L) or 3 (RGB), got {self.channels!r}"
            )
        _positive_int("height", self.height)
        _positive_int("width", self.width)
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise ValueError(f"preprocessing scale must be a positive number, got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"preprocessing scale must be finite, got {scale!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(
                f"preprocessing resample must be one of {', '.join(RESAMPLE)}, "
                f"got {self.resample!r}"
            )

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``{"channels", "height", "width", "scale", "resample"}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; a missing or unknown key is a ``ValueError``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"preprocessing must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(_KEYS))
        missing = [k for k in ("channels", "height", "width") if k not in values]
        if unknown or missing:
            raise ValueError(
                f"preprocessing: unknown keys {unknown}, missing keys {missing} "
                f"(valid: {', '.join(_KEYS)})"
            )
        return cls(**dict(values))

    @classmethod
    def from_images(cls, x: torch.Tensor) -> Preprocessing | None:
        """The preprocessing of training images ``x`` (N, C, H, W) with C = 1 or 3: uint8 pixels
        (what the image loaders keep, read as ``v / 255``) or floats in [0, 1] (a float
        ``.npz`` is read as such); ``None`` for anything else (vectors, other channel counts
        or value ranges), whose inputs cannot be made from image files."""
        if x.dim() != 4 or x.shape[1] not in (1, 3) or not len(x):
            return None
        if x.dtype != torch.uint8 and (
            not x.is_floating_point() or float(x.min()) < 0.0 or float(x.max()) > 1.0
        ):
            return None
        return cls(channels=int(x.shape[1]), height=int(x.shape[2]), width=int(x.shape[3]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return (self.channels, self.height, self.width)

    # ------------------------------------------------------------------ apply

    def apply(self, inputs: Inputs) -> torch.Tensor:
        """float32 ``(N, C, H, W)`` model inputs from any of:

        - a path (``str`` / ``Path``) of an image file, or a list of them (any size and mode);
        - a PIL image, or a list of PIL images (lists may mix paths and images);
        - a numpy array, channels last: uint8 ``(H, W)`` (one image), ``(N, H, W)`` or
          ``(N, H, W, C)`` with C in 1, 3, 4 (pixel values 0..255, decoded as images are), or
          the same shapes as floats in [0, 1] (= pixel / 255: resized per channel in
          float, channels converted with the same luma weights as PIL);
        - a torch tensor ``(N, C, H, W)``: already model inputs; checked, returned as float32.

        Raises ``ValueError`` naming the file or the problem.
        """
        if isinstance(inputs, torch.Tensor):
            return self._check_tensor(inputs)
        if isinstance(inputs, np.ndarray):
            return self._from_array(inputs)
        items = [inputs] if _is_single(inputs) else list(inputs)  # type: ignore[arg-type]
        if not items:
            return torch.zeros((0, *self.shape), dtype=torch.float32)
        return self._to_float(np.stack([self._image_array(item) for item in items]))

    def image_input(self, img: Any, name: str) -> torch.Tensor:
        """One decoded PIL image as model inputs float32 ``(1, C, H, W)``, as :meth:`apply`
        makes them; an :class:`ImageError` naming ``name`` when it cannot be converted."""
        return self._to_float(np.stack([self._pil_to_array(img, name)]))

    def from_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 pixels ``(N, C, H, W)`` of this shape (what the image loaders keep) as
        model inputs float32, scaled exactly as :meth:`apply` scales decoded files."""
        batch = np.asarray(pixels)
        if batch.dtype != np.uint8 or batch.shape[1:] != self.shape:
            raise ValueError(
                f"pixels must be uint8 (N, {self.channels}, {self.height}, {self.width}), "
                f"got {batch.dtype} {batch.shape}"
            )
        return self._to_float(batch)

    # one PIL image or file -> (C, H, W) uint8
    def _image_array(self, item: Any) -> np.ndarray:
        from PIL import Image

        if isinstance(item, Image.Image):
            return self._pil_to_array(item, "image")
        if isinstance(item, str | os.PathLike):
            return self._file_to_array(Path(item))
        raise ValueError(
            f"cannot preprocess a {type(item).__name__}: give image paths, PIL images, "
            "a numpy array or a (N, C, H, W) tensor"
        )

    def _file_to_array(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(
                f"{path}: no such file" if not path.exists() else f"{path}: not a file"
            )
        img = decode_image(path, str(path), size=(self.height, self.width))
        try:
            return self._pil_to_array(img, str(path))
        finally:
            img.close()

    def _pil_to_array(self, img: Any, name: str) -> np.ndarray:
        """(C, H, W) uint8: EXIF orientation, L / RGB, resize (as the folder loader); an
        :class:`ImageError` naming ``name`` when PIL cannot convert it (a CIELAB TIFF, a
        damaged EXIF block)."""
        from PIL import Image

        try:
            img, gray = upright_8bit(img)
            img = img.convert("L" if gray or self.channels == 1 else "RGB")
            filter_ = getattr(Image.Resampling, self.resample.upper())
            img = img.resize((self.width, self.height), filter_)
            array = np.asarray(img, dtype=np.uint8)
        except _CONVERT_ERRORS as error:
            raise ImageError(f"{name}: cannot convert image ({error})") from None
        if array.ndim == 2:
            array = array[None] if self.channels == 1 else np.repeat(array[None], 3, axis=0)
        else:
            array = array.transpose(2, 0, 1)
        return array

    def _to_float(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 times ``scale`` (a division by 1 / scale when that is
        an integer, as the loaders divide by 255, so the values match them bit for bit)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(torch.float32)
        divisor = 1.0 / self.scale
        return x.div_(divisor) if divisor.is_integer() else x.mul_(self.scale)

    # arrays
    def _from_array(self, array: np.ndarray) -> torch.Tensor:
        """Channels-last arrays: uint8 through PIL, floats in [0, 1] resized in float."""
        if array.ndim == 2:
            array = array[None]
        if array.ndim == 4 and array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"a 4-D array must be (N, H, W, C) with C in 1, 3, 4 (channels last), "
                f"got {array.shape}"
            )
        if array.ndim not in (3, 4):
            raise ValueError(
                f"an image array must be (H, W), (N, H, W) or (N, H, W, C), got {array.shape}"
            )
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype == np.uint8:
            from PIL import Image

            return self._to_float(
                np.stack([self._pil_to_array(Image.fromarray(a), "array") for a in array])
                if len(array)
                else np.zeros((0, *self.shape), np.uint8)
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"image arrays must be uint8 (0..255) or float in [0, 1], got {array.dtype}"
            )
        return self._from_float_array(array)

    def _from_float_array(self, array: np.ndarray) -> torch.Tensor:
        """Float (N, H, W[, C]) in [0, 1] (= pixel / 255) -> (N, C, H, W) inputs."""
        if not np.isfinite(array).all() or (array.size and (array.min() < 0 or array.max() > 1)):
            raise ValueError("float image arrays must hold finite values in [0, 1] (pixel / 255)")
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)[:, :3]
        if x.shape[1] != self.channels:
            x = (
                x.expand(-1, 3, -1, -1)
                if self.channels == 3
                else (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            )
        if tuple(x.shape[2:]) != (self.height, self.width):
            x = self._resize_float(x)
        x = x.contiguous()
        return x if self.scale == 1 / 255 else x.mul_(self.scale * 255.0)

    def _resize_float(self, x: torch.Tensor) -> torch.Tensor:
        """Resize every channel with PIL's filter in float (mode ``F``)."""
        from PIL import Image

        filter_ = getattr(Image.Resampling, self.resample.upper())
        out = np.empty((*x.shape[:2], self.height, self.width), dtype=np.float32)
        for i, image in enumerate(x.numpy()):
            for c, band in enumerate(image):
                img = Image.fromarray(band, "F").resize((self.width, self.height), filter_)
                out[i, c] = np.asarray(img, dtype=np.float32)
        return torch.from_numpy(out).clamp_(0.0, 1.0)

    def _check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"a tensor input must be model inputs (N, {self.channels}, {self.height}, "
                f"{self.width}), got {tuple(x.shape)}: pass images or arrays to be resized"
            )
        if not x.is_floating_point():
            raise ValueError(f"a tensor input must be floating point, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("a tensor input holds NaN or inf")
        return x


def _is_single(inputs: Any) -> bool:
    """One path or one PIL image (as opposed to a list of them)."""
    if isinstance(inputs, str | os.PathLike):
        return True
    from PIL import Image

    return isinstance(inputs, Image.Image)


__all__ = [
    "DRAFT_PIXELS",
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "RESAMPLE",
    "ImageError",
    "ImageFormatError",
    "ImageTooLargeError",
    "Inputs",
    "Preprocessing",
    "decode_image",
    "load_image",
    "open_image",
]
