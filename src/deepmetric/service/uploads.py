"""What comes in over HTTP, checked before anything else touches it.

- :class:`Gate`, an ASGI wrapper in front of the whole app, decides from the method and path
  alone (before a byte of the body is read): the API key (401), the body size (413: a declared
  ``Content-Length`` over the limit is refused at once, and a body without one is counted as it
  arrives), the content type of uploads (415: ``multipart/form-data`` only).
- :func:`decode_image` turns uploaded bytes into a loaded PIL image, or a :class:`BadUploadError`
  saying why not in words (empty, not an image, truncated, too many pixels), the same checks
  :class:`~deepmetric.data.Preprocessing` makes for files.

Uploads are only ever bytes in memory: no file name, path or URL from a request is opened.
"""

from __future__ import annotations

import hmac
import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

from starlette.exceptions import HTTPException

from deepmetric.data import preprocess

__all__ = [
    "API_KEY_HEADER",
    "OPEN_PATHS",
    "UPLOAD_PATHS",
    "BadUploadError",
    "Gate",
    "access",
    "decode_image",
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


class BadUploadError(ValueError):
    """An uploaded file that is not a usable image (the message says why, naming it)."""


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


def decode_image(data: bytes, name: str) -> Any:
    """The uploaded file ``data`` (called ``name`` in messages) as a loaded PIL image.

    Raises :class:`BadUploadError` for an empty file, a file PIL cannot identify, one that declares
    more than :data:`~deepmetric.data.preprocess.MAX_PIXELS` pixels (a decompression bomb,
    refused before decoding), or one that fails to decode (truncated, corrupt).
    """
    if not data:
        raise BadUploadError(f"{name}: the file is empty")
    try:
        return preprocess.decode_image(io.BytesIO(data), name)
    except ValueError as error:
        raise BadUploadError(str(error)) from None
