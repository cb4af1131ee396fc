"""What comes in over HTTP, checked before anything else touches it.

- :class:`Gate`, an ASGI wrapper in front of the whole app, decides from the method and path
  alone (before a byte of the body is read): the API key (401), the body size (413: a declared
  ``Content-Length`` over the limit is refused at once, and a body without one is counted as it
  arrives), the content type of uploads (415: ``multipart/form-data`` only).
- :func:`open_upload` opens uploaded bytes through the gate files pass too
  (:func:`deepmetric.data.preprocess.open_image`: raster formats only, at most
  :data:`~deepmetric.data.preprocess.MAX_PIXELS` pixels, a large JPEG reduced while decoding),
  reading only the header; :func:`check_pixels` refuses a request whose images would decode to
  more than :data:`MAX_REQUEST_PIXELS` pixels together, and :class:`PixelBudget` bounds the
  pixels all requests decode at once (:data:`MAX_PIXELS_IN_FLIGHT`), all before a pixel is
  decoded; :func:`decode_upload` decodes. A refusal is a :class:`BadUploadError` whose
  ``status`` is the HTTP answer: 415 (not an accepted format), 413 (too many pixels), else 422.

Uploads are only ever bytes in memory: no file name, path or URL from a request is opened.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from starlette.exceptions import HTTPException

from deepmetric.checks import positive_int
from deepmetric.data import preprocess

__all__ = [
    "API_KEY_HEADER",
    "MAX_PIXELS_IN_FLIGHT",
    "MAX_REQUEST_PIXELS",
    "OPEN_PATHS",
    "UPLOAD_PATHS",
    "BadUploadError",
    "Gate",
    "PixelBudget",
    "access",
    "check_pixels",
    "decode_upload",
    "open_upload",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the request header that carries the API key
API_KEY_HEADER = "X-API-Key"
#: GET paths anyone may read, key or not: the page, its files, the health check, the API docs
OPEN_PATHS = frozenset(
    {
        "/",
        "/health",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/static/app.js",
        "/static/style.css",
    }
)
#: POST paths that take images (multipart/form-data) and only read the gallery
READ_UPLOADS = frozenset({"/embed", "/verify", "/identify"})
#: POST paths whose body must be multipart/form-data
UPLOAD_PATHS = READ_UPLOADS | {"/identities"}


#: the most pixels the images of one request may decode to, all together (after a JPEG's
#: reduction): 32 million, e.g. four 12-megapixel PNGs are refused
MAX_REQUEST_PIXELS = 32_000_000
#: the most pixels all requests together may hold decoded at once (others wait)
MAX_PIXELS_IN_FLIGHT = 2 * MAX_REQUEST_PIXELS
#: how long a request waits for the pixels in flight to fall under the budget (then a 503)
PIXEL_WAIT_S = 30.0


class BadUploadError(ValueError):
    """An uploaded file that is not a usable image (the message says why, naming it);
    ``status``: the HTTP status that answers it (422, or 415 / 413 in the subclasses)."""

    status = 422


class UnsupportedImageError(BadUploadError):
    """An upload in a format that is not opened (EPS, PDF, ICO, ...)."""

    status = 415


class TooManyPixelsError(BadUploadError):
    """Uploads that would decode to more pixels than one request may."""

    status = 413


def access(method: str, path: str) -> Literal["open", "read", "write"]:
    """What a request needs: ``open`` (nothing), ``read`` (the key with ``--protect-reads``)
    or ``write`` (the key whenever one is set). Anything not known to read is a write."""
    if method in ("GET", "HEAD"):
        return "open" if path in OPEN_PATHS else "read"
    if method == "POST" and path in READ_UPLOADS:
        return "read"
    return "write"


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", API_KEY_HEADER.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadTooLargeError(HTTPException):
    """The request body grew past the limit while it was being read (an HTTP 413, so the
    app's error handler answers it when the body is read inside a route)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class Gate:
    """The checks every HTTP request passes before the app sees it (see the module docstring).

    Args:
        app: the ASGI app behind the gate.
        api_key: the key writes (and with ``protect_reads`` reads) need; ``None``: none.
        protect_reads: reads need the key too.
        max_body_bytes: the largest request body accepted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        protect_reads: bool,
        max_body_bytes: int,
    ) -> None:
        if protect_reads and api_key is None:
            raise ValueError("protect_reads needs an API key")
        if api_key is not None and not api_key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self._key = None if api_key is None else api_key.encode()
        self.protect_reads = protect_reads
        self.max_body_bytes = max_body_bytes

    @property
    def needs_key(self) -> dict[str, bool]:
        """``{"writes": bool, "reads": bool}``: which requests need the API key."""
        return {"writes": self._key is not None, "reads": self.protect_reads}

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.lower(), value)
        need = access(scope["method"], scope["path"])
        if self._key is not None and (need == "write" or (need == "read" and self.protect_reads)):
            given = headers.get(API_KEY_HEADER.lower().encode())
            if given is None:
                return 401, f"an API key is needed: send it in the {API_KEY_HEADER} header"
            if not hmac.compare_digest(given, self._key):
                return 401, "wrong API key"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "the Content-Length header is not a number"
            if int(length) > self.max_body_bytes:
                return 413, self._too_large()
        if scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS:
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"multipart/form-data":
                shown = kind.decode("latin-1") or "no content type"
                return 415, f"send the images as multipart/form-data, not {shown}"
        return None

    def _too_large(self) -> str:
        mib = self.max_body_bytes / (1 << 20)
        return f"the upload is larger than the {mib:g} MiB this server accepts (--max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise UploadTooLargeError(self._too_large())
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except UploadTooLargeError as error:
            if started:
                raise
            await _send_error(send, 413, str(error.detail))


def open_upload(data: bytes, name: str, size: tuple[int, int] | None = None) -> Any:
    """The uploaded file ``data`` (called ``name`` in messages) as a PIL image opened but not
    decoded (``size``: the model's input height and width, see
    :func:`~deepmetric.data.preprocess.open_image`).

    Raises :class:`BadUploadError` for an empty file, a file that is not an image, one that
    declares more than :data:`~deepmetric.data.preprocess.MAX_PIXELS` pixels (a decompression
    bomb), or whose header is corrupt; :class:`UnsupportedImageError` for a format that is not
    opened (:data:`~deepmetric.data.preprocess.IMAGE_FORMATS` only).
    """
    if not data:
        raise BadUploadError(f"{name}: the file is empty")
    try:
        return preprocess.open_image(io.BytesIO(data), name, size=size)
    except preprocess.ImageFormatError as error:
        raise UnsupportedImageError(str(error)) from None
    except ValueError as error:
        raise BadUploadError(str(error)) from None


def check_pixels(images: list[tuple[str, Any]], limit: int = MAX_REQUEST_PIXELS) -> int:
    """The pixels the opened ``images`` (name, PIL image) will decode to, together; a
    :class:`TooManyPixelsError` when that is more than ``limit``."""
    total = sum(img.size[0] * img.size[1] for _, img in images)
    if total > limit:
        if len(images) == 1:
            name, img = images[0]
            what = f"{name}: {img.size[0]} x {img.size[1]} pixels"
        else:
            what = f"{len(images)} images of {total:,} pixels together"
        raise TooManyPixelsError(
            f"{what} to decode, more than the {limit:,} this server decodes per request: "
            "send fewer or smaller images"
        )
    return total


def decode_upload(img: Any, name: str) -> Any:
    """Decode the opened upload ``img``: the loaded image, or a :class:`BadUploadError`
    (truncated, corrupt)."""
    try:
        return preprocess.load_image(img, name)
    except ValueError as error:
        raise BadUploadError(str(error)) from None


class PixelBudget:
    """The decoded pixels all requests hold at once, at most ``limit``: :meth:`acquire` waits
    (up to ``wait_s``, then ``TimeoutError``) until a request's pixels fit. One event loop."""

    def __init__(self, limit: int = MAX_PIXELS_IN_FLIGHT, *, wait_s: float = PIXEL_WAIT_S) -> None:
        positive_int("the pixel budget", limit)
        self.limit = limit
        self.wait_s = wait_s
        self.in_flight = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # made in the event loop that uses it
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, pixels: int) -> int:
        """Wait until ``pixels`` (at most ``limit``) fit, take them and return how many were
        taken (for :meth:`release`); ``TimeoutError`` after ``wait_s``."""
        pixels = min(pixels, self.limit)
        changed = self._condition()
        async with changed:
            await asyncio.wait_for(
                changed.wait_for(lambda: self.in_flight + pixels <= self.limit), self.wait_s
            )
            self.in_flight += pixels
        return pixels

    async def release(self, pixels: int) -> None:
        """Give back what :meth:`acquire` returned."""
        changed = self._condition()
        async with changed:
            self.in_flight -= pixels
            changed.notify_all()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """:meth:`acquire` ``pixels`` for the body of the ``async with``."""
        taken = await self.acquire(pixels)
        try:
            yield
        finally:
            await self.release(taken)
