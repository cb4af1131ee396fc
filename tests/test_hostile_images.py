"""Hostile images against the one gate that opens them (``deepmetric.data.preprocess``), for
real: ``deepmetric serve`` in a subprocess on loopback and the command line in a subprocess
(issue 24, D1-D3).

- D1: images that open but cannot be converted (a CIELAB TIFF, a PNG with a damaged ``eXIf``
  block) are a 422 naming the file and the reason on every upload route, one line in the CLI.
- D2: decoded pixels are budgeted before decoding: a 34-byte lossless WebP declaring 9459 x 9459
  pixels, or parts that together declare too many, are a 413 in well under a second, and the
  server answers normally afterwards; a large JPEG is decoded at reduced scale (``draft``).
- D3: only raster formats PIL decodes itself are opened (PNG, JPEG, WebP, BMP, GIF, TIFF,
  PPM / PGM): an EPS file is a 415 (one line, exit 2, in the CLI) and never reaches Ghostscript
  (a fake ``gs`` on the server's PATH records any call).
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from test_service import KEY, Server, new_gallery, shared_run

from deepmetric.data.preprocess import (
    IMAGE_FORMATS,
    ImageError,
    ImageFormatError,
    Preprocessing,
    decode_image,
    open_image,
)
from deepmetric.service.uploads import MAX_REQUEST_PIXELS, PixelBudget

WRITE = {"X-API-Key": KEY}
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


# ------------------------------------------------------------------------------ hostile files


def _digit() -> Image.Image:
    return Image.fromarray((np.arange(28 * 28).reshape(28, 28) * 7 % 256).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def lab_tiff() -> bytes:
    """A CIELAB TIFF: opens and decodes, but PIL converts LAB to neither L nor RGB here."""
    return _encode(_digit().convert("RGB").convert("LAB"), "TIFF")


def damaged_exif_png() -> bytes:
    """A PNG whose ``eXIf`` chunk (CRC right) is not a TIFF block: its orientation unreadable."""
    data = _encode(_digit(), "PNG")
    body = b"garbage!"
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return data[:33] + chunk + data[33:]  # right after IHDR


def webp_bomb(side: int = 9459) -> bytes:
    """A 34-byte lossless WebP (one black colour) whose VP8L header declares side x side pixels
    (it decodes: every pixel costs no bits)."""
    data = bytearray(_encode(Image.new("RGB", (64, 64)), "WEBP", lossless=True, method=0))
    at = data.index(b"VP8L") + 8 + 1  # after the chunk header and the 0x2f signature
    bits = int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1)
    bits |= (side - 1) | ((side - 1) << 14)
    data[at : at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose IHDR (CRC made right) declares width x height."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def big_jpeg(width: int = 8000, height: int = 5000) -> bytes:
    return _encode(Image.new("L", (width, height), 90), "JPEG", quality=50)


def allowed_files() -> dict[str, bytes]:
    """The digit in every accepted format."""
    img = _digit()
    rgb = img.convert("RGB")
    return {
        "d.png": _encode(img, "PNG"),
        "d.jpg": _encode(rgb, "JPEG"),
        "d.webp": _encode(rgb, "WEBP"),
        "d.bmp": _encode(rgb, "BMP"),
        "d.gif": _encode(img, "GIF"),
        "d.tif": _encode(img, "TIFF"),
        "d.ppm": _encode(rgb, "PPM"),
        "d.pgm": _encode(img, "PPM"),
    }


def fake_gs(folder: Path) -> tuple[Path, Path]:
    """A ``gs`` on PATH that only records that it ran: (its folder, the record it writes)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = folder / "gs-ran"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho ran >> '{record}'\nexit 1\n")
    gs.chmod(0o755)
    return bin_dir, record


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny run, a gallery with one identity, and a server on it whose PATH starts with a fake
    Ghostscript."""
    root = tmp_path_factory.mktemp("hostile")
    run, files = shared_run(tmp_path_factory)
    bin_dir, record = fake_gs(root)
    gallery = new_gallery(run, root / "g.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        server = Server(run, gallery, key=KEY)
    good = files[0][0].read_bytes()
    r = server.client.post(
        "/identities",
        data={"identity": "zero"},
        files={"files": ("0.png", good, "image/png")},
        headers=WRITE,
    )
    assert r.status_code == 201, r.text
    yield {
        "root": root,
        "run": run,
        "good": good,
        "bin": bin_dir,
        "gs_record": record,
        "http": server.client,
    }
    code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output


def _post(http: httpx.Client, route: str, name: str, data: bytes, good: bytes) -> httpx.Response:
    """``route`` with the file ``name`` (and a good image where the route takes two)."""
    if route == "/verify":
        files: Any = {"a": ("good.png", good, "image/png"), "b": (name, data, "image/png")}
        return http.post(route, files=files)
    files = [("files", (name, data, "application/octet-stream"))]
    if route == "/identities":
        return http.post(route, data={"identity": "hostile"}, files=files, headers=WRITE)
    return http.post(route, files=files)


def _answers_normally(env: dict[str, Any]) -> None:
    r = env["http"].post("/identify", files={"files": ("g.png", env["good"], "image/png")})
    assert r.status_code == 200 and r.json()[0]["identity"] == "zero", r.text


def _cli(env: dict[str, Any], *args: str | Path) -> subprocess.CompletedProcess[str]:
    path = f"{env['bin']}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": path},
    )


# ------------------------------------------------------------------------------ D1


@pytest.mark.parametrize("route", ["/identify", "/embed", "/verify", "/identities"])
def test_unconvertible_images_are_422_with_the_reason(env: dict[str, Any], route: str) -> None:
    for name, data, reason in (
        ("lab.tif", lab_tiff(), "LAB"),
        ("exif.png", damaged_exif_png(), "EXIF"),
    ):
        r = _post(env["http"], route, name, data, env["good"])
        assert r.status_code == 422, (route, name, r.status_code, r.text)
        error = r.json()["error"]
        assert error.startswith(f"{name}: cannot convert image") and reason in error, error
    assert "hostile" not in {i["identity"] for i in env["http"].get("/identities").json()}
    _answers_normally(env)


def test_unconvertible_image_is_one_line_in_the_cli(env: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "lab.tif"
    bad.write_bytes(lab_tiff())
    good = tmp_path / "good.png"
    good.write_bytes(env["good"])
    done = _cli(env, "verify", env["run"], good, bad, "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{bad}: cannot convert image" in done.stderr, done.stderr
    with pytest.raises(ImageError, match="cannot convert image"):
        Preprocessing(channels=1, height=28, width=28).apply(bad)


# ------------------------------------------------------------------------------ D2


def test_pixel_budget_refuses_before_decoding(env: dict[str, Any]) -> None:
    http = env["http"]
    bomb = webp_bomb()
    assert len(bomb) == 34 and open_image(io.BytesIO(bomb), "bomb").size == (9459, 9459)
    for route in ("/identify", "/embed", "/verify", "/identities"):
        start = time.monotonic()
        r = _post(http, route, "bomb.webp", bomb, env["good"])
        took = time.monotonic() - start
        assert r.status_code == 413, (route, r.status_code, r.text)
        assert "pixels" in r.json()["error"] and took < 2.0, (route, took, r.text)
        _answers_normally(env)
    # four parts, each under the budget, together over it: refused before any is decoded
    side = int((MAX_REQUEST_PIXELS / 3.5) ** 0.5)
    parts = [("files", (f"{i}.png", png_declaring(side, side), "image/png")) for i in range(4)]
    r = http.post("/embed", files=parts)
    assert r.status_code == 413 and "4 images" in r.json()["error"], r.text
    _answers_normally(env)
    # a JPEG declaring more than the budget is decoded at 1/8 scale (draft), so it is taken
    jpeg = big_jpeg()
    r = http.post("/embed", files={"files": ("photo.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200 and r.json()["shape"][0] == 1, r.text
    img = decode_image(io.BytesIO(jpeg), "photo.jpg", size=(28, 28))
    assert img.size == (1000, 625)
    assert decode_image(io.BytesIO(jpeg), "photo.jpg").size == (8000, 5000)  # no target: full


def test_pixels_in_flight_are_bounded() -> None:
    """Requests hold their pixels while decoding: one that would pass the budget waits for
    others to finish (or is refused after ``wait_s``); none ever exceeds it."""

    async def scenario() -> tuple[list[int], bool]:
        budget = PixelBudget(100, wait_s=5.0)
        peaks: list[int] = []

        async def request(pixels: int) -> None:
            async with budget.hold(pixels):
                peaks.append(budget.in_flight)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(request(40) for _ in range(6)))
        short = PixelBudget(100, wait_s=0.05)
        refused = False
        async with short.hold(80):
            try:
                async with short.hold(30):
                    pass
            except TimeoutError:
                refused = True
        assert short.in_flight == 0
        return peaks, refused

    peaks, refused = asyncio.run(scenario())
    assert len(peaks) == 6 and max(peaks) <= 100 and refused
    with pytest.raises(ValueError):
        PixelBudget(0)


# ------------------------------------------------------------------------------ D3


def test_only_raster_formats_are_opened(env: dict[str, Any]) -> None:
    http = env["http"]
    for name, data, kind in (
        ("x.eps", EPS, "EPS"),
        ("x.pdf", PDF, "PDF"),
        ("x.ico", _encode(_digit(), "ICO"), "ICO"),
    ):
        for route in ("/identify", "/embed", "/verify", "/identities"):
            r = _post(http, route, name, data, env["good"])
            assert r.status_code == 415, (route, name, r.status_code, r.text)
            error = r.json()["error"]
            assert error.startswith(f"{name}: ") and kind in error and "PNG" in error, error
    assert not env["gs_record"].exists(), "Ghostscript ran on an upload"
    files = allowed_files()
    assert len(IMAGE_FORMATS) == 7
    r = http.post("/embed", files=[("files", (n, d, "image/png")) for n, d in files.items()])
    assert r.status_code == 200 and r.json()["shape"][0] == len(files), r.text
    _answers_normally(env)


def test_cli_refuses_eps_without_running_ghostscript(env: dict[str, Any], tmp_path: Path) -> None:
    eps = tmp_path / "x.eps"
    eps.write_bytes(EPS)
    good = tmp_path / "good.png"
    good.write_bytes(env["good"])
    done = _cli(env, "verify", env["run"], good, eps, "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(eps) in done.stderr and "EPS" in done.stderr, done.stderr
    assert not env["gs_record"].exists(), "Ghostscript ran on a file given to the CLI"
    with pytest.raises(ImageFormatError, match="EPS"):
        decode_image(eps, str(eps))
