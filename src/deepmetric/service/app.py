"""The HTTP API and the page: a FastAPI app over one :class:`GalleryService`.

Endpoints (JSON shapes as the command line's ``--json``; every error is ``{"error": "..."}``
with a 4xx status, and the service keeps serving):

- ``GET /health``: ``{"status": "ok", "identities", "examples", "model" (the model identity),
  "metric", "threshold", "auth": {"writes", "reads"}, "batching": {"batches", "items"}}``
- ``POST /embed`` (multipart ``files``): ``{"inputs", "shape", "embeddings", "model"}``
- ``POST /verify`` (multipart ``a``, ``b``): ``{"a", "b", "distance", "threshold", "same",
  "metric"}``, decided at the gallery's threshold
- ``POST /identify`` (multipart ``files``, optional ``k``): a list with one ``{"input",
  "identity", "distance", "threshold", "candidates"}`` per file (``identity`` null: unknown)
- ``GET /identities``: a list of ``{"identity", "examples", "metadata", "created"}``
- ``POST /identities`` (multipart ``identity`` + ``files``): enroll, 201 ``{"identity",
  "examples" (the new example ids), "files"}``
- ``DELETE /identities/{identity}``: ``{"identity", "examples" (the removed ids),
  "identities" (how many are left)}``
- ``GET /identities/{identity}/thumbnail``: the PNG of its first example
- ``GET /``: the page (``static/``); ``/docs``: the OpenAPI docs (Swagger UI loads its own
  script from a CDN; the page itself loads nothing from outside the server)

Writes (enroll, remove) need the ``X-API-Key`` header when a key is set, reads too with
``protect_reads`` (checked by :class:`~deepmetric.service.uploads.Gate` before the body is
read). Identity names are data: they go into SQL only as bound parameters and into no path.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, NamedTuple

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepmetric.distances import paired
from deepmetric.gallery import Gallery, UnknownIdentityError
from deepmetric.gallery.store import GalleryBusyError, GalleryReadOnlyError, check_name
from deepmetric.inference import Embedder, Verification
from deepmetric.service.uploads import (
    API_KEY_HEADER,
    BadUploadError,
    Gate,
    PixelBudget,
    check_pixels,
    decode_upload,
    open_upload,
)
from deepmetric.service.workers import GalleryWorkers, MicroBatcher

__all__ = ["GalleryService", "create_app"]

#: the most candidates one identify request may ask for
MAX_K = 100
#: the page's Content-Security-Policy: nothing from outside this server
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class GalleryService:
    """One model, one gallery file: the work behind the endpoints, thread-safe.

    Holds the :class:`~deepmetric.inference.Embedder`, a
    :class:`~deepmetric.service.workers.MicroBatcher` running it, and
    :class:`~deepmetric.service.workers.GalleryWorkers` (a Gallery per thread). :meth:`start`
    opens the gallery (raising ``ModelMismatchError`` etc.), :meth:`close` closes it.
    """

    def __init__(
        self,
        gallery: str,
        embedder: Embedder,
        *,
        threads: int = 4,
        max_batch: int = 64,
        busy_timeout: float = 30.0,
    ) -> None:
        if embedder.preprocessing is None:
            raise ValueError(
                f"{embedder.source or 'the model'} has no image preprocessing (not trained on "
                "images), so it cannot embed uploaded images"
            )
        self.embedder = embedder
        self.workers = GalleryWorkers(gallery, embedder, threads=threads, timeout=busy_timeout)
        self.max_batch = max_batch
        self.batcher: MicroBatcher | None = None
        self.pixels = PixelBudget()
        self.threshold = math.nan
        self.metric = embedder.metric

    def start(self) -> None:
        """Open the gallery in every worker and start the embedding thread."""
        self.workers.start()
        self.threshold = float(self.workers.read(lambda g: g.threshold.value).result())
        self.batcher = MicroBatcher(self.embedder.embed, max_batch=self.max_batch)

    def close(self) -> None:
        """Stop the embedding thread and close the gallery (saving its index)."""
        if self.batcher is not None:
            self.batcher.close()
        self.workers.close()

    # ------------------------------------------------------------------ work

    async def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (n, D) of model inputs ``x`` (n, C, H, W), by the micro-batcher."""
        if self.batcher is None:
            raise RuntimeError("the service is not started")
        return await asyncio.wrap_future(self.batcher.submit(x))

    async def read(self, job: Any) -> Any:
        return await asyncio.wrap_future(self.workers.read(job))

    async def write(self, job: Any) -> Any:
        return await asyncio.wrap_future(self.workers.write(job))


class Uploads(NamedTuple):
    """A request's images: ``names`` as the client gave them (only ever echoed back), model
    inputs ``x`` (n, C, H, W), and the decoded PIL ``images`` when kept (for thumbnails)."""

    names: list[str | None]
    x: torch.Tensor
    images: list[Any]


def _decode(
    service: GalleryService, names: list[str | None], opened: list[tuple[str, Any]], keep: bool
) -> Uploads:
    """Decode and convert the opened images one at a time (each dropped once converted unless
    ``keep``); a :class:`BadUploadError` naming the first that fails."""
    pre = service.embedder.preprocessing
    assert pre is not None  # checked by GalleryService
    rows: list[torch.Tensor] = []
    kept: list[Any] = []
    try:
        for name, img in opened:
            decode_upload(img, name)
            try:
                rows.append(pre.image_input(img, name))
            except ValueError as error:
                raise BadUploadError(str(error)) from None
            if keep:
                kept.append(img)
            else:
                img.close()
    except BaseException:
        for _, img in opened:
            img.close()
        raise
    x = torch.cat(rows) if rows else torch.zeros((0, *pre.shape), dtype=torch.float32)
    return Uploads(names, x, kept)


@asynccontextmanager
async def _uploads(
    service: GalleryService, files: list[UploadFile], *, keep: bool = False
) -> AsyncIterator[Uploads]:
    """The uploaded ``files`` checked, decoded and converted, their pixels held in the
    service's in-flight budget until the ``async with`` ends. Every image is opened (its
    header only) and the request's pixels counted before any is decoded: 415 for a format
    that is not opened, 413 for too many pixels, 422 for anything else wrong with a file, 503
    when other requests hold the budget for too long."""
    pre = service.embedder.preprocessing
    size = None if pre is None else (pre.height, pre.width)
    names: list[str | None] = []
    blobs: list[tuple[bytes, str]] = []
    for i, upload in enumerate(files):
        names.append(upload.filename)
        blobs.append((await upload.read(), upload.filename or f"file {i + 1}"))

    def open_all() -> tuple[list[tuple[str, Any]], int]:
        opened: list[tuple[str, Any]] = []
        try:
            for data, name in blobs:
                opened.append((name, open_upload(data, name, size)))
            return opened, check_pixels(opened)
        except BaseException:
            for _, img in opened:
                img.close()
            raise

    try:
        opened, pixels = await run_in_threadpool(open_all)
    except BadUploadError as error:
        raise HTTPException(error.status, str(error)) from None
    try:
        taken = await service.pixels.acquire(pixels)
    except TimeoutError:
        for _, img in opened:
            img.close()
        raise HTTPException(
            503,
            "busy: other requests are decoding as many pixels as this server allows at once; "
            "retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    try:
        try:
            done = await run_in_threadpool(_decode, service, names, opened, keep)
        except BadUploadError as error:
            raise HTTPException(error.status, str(error)) from None
        try:
            yield done
        finally:
            for img in done.images:
                img.close()
    finally:
        await service.pixels.release(taken)


def _name(identity: str) -> str:
    try:
        return check_name(identity)
    except (TypeError, ValueError) as error:
        raise HTTPException(422, str(error)) from None


def _static(name: str) -> bytes:
    return resources.files("deepmetric.service").joinpath("static", name).read_bytes()


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", ""))
    return "; ".join(parts) or "invalid request"


def create_app(
    service: GalleryService,
    *,
    api_key: str | None = None,
    protect_reads: bool = False,
    max_upload_bytes: int = 10 << 20,
) -> Gate:
    """The ASGI app: FastAPI routes behind a :class:`~deepmetric.service.uploads.Gate`.

    ``service`` must be started (:meth:`GalleryService.start`); the app closes it when the
    server shuts down. ``api_key`` (``None``: writes open), ``protect_reads`` and
    ``max_upload_bytes`` (the largest request body) are enforced before the body is read.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="deepmetric gallery",
        summary="Identify, verify and enroll images against a one-shot gallery.",
        description=f"Writes need the `{API_KEY_HEADER}` header when the server has a key "
        '(and reads too with --protect-reads). Errors are `{"error": "..."}`.',
        lifespan=lifespan,
    )
    gate = Gate(app, api_key=api_key, protect_reads=protect_reads, max_body_bytes=max_upload_bytes)

    _add_error_handlers(app)
    _add_page(app)
    _add_reads(app, service, gate)
    _add_writes(app, service)
    return gate


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "..."}`` with its status: HTTP errors, invalid requests
    (422), a busy or read-only gallery (503, Retry-After), anything else (500, no trace)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 400 and "parsing the body" in detail:
            detail = "malformed request body (expected multipart/form-data with the image files)"
        headers = getattr(error, "headers", None)
        return JSONResponse({"error": detail}, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(error)}, status_code=422)

    @app.exception_handler(GalleryBusyError)
    @app.exception_handler(GalleryReadOnlyError)
    async def unavailable(_: Request, error: Exception) -> JSONResponse:
        # another process holds the write lock, or the gallery cannot be written: the
        # request did nothing; try again later (a read-only gallery still answers reads)
        return JSONResponse(
            {"error": str(error)},
            status_code=503,
            headers={"Retry-After": "5" if isinstance(error, GalleryBusyError) else "60"},
        )

    @app.exception_handler(Exception)
    async def crashed(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": f"internal error ({type(error).__name__}): see the server log"},
            status_code=500,
        )


def _add_page(app: FastAPI) -> None:
    """The page: index.html, app.js and style.css, read once, under the page's CSP."""
    page = {name: _static(name) for name in ("index.html", "app.js", "style.css")}

    def _page_file(name: str, media: str) -> Response:
        return Response(
            page[name],
            media_type=media,
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _page_file("index.html", "text/html; charset=utf-8")

    @app.get("/static/app.js", include_in_schema=False)
    async def script() -> Response:
        return _page_file("app.js", "text/javascript; charset=utf-8")

    @app.get("/static/style.css", include_in_schema=False)
    async def style() -> Response:
        return _page_file("style.css", "text/css; charset=utf-8")


def _add_reads(app: FastAPI, service: GalleryService, gate: Gate) -> None:
    """GET /health, POST /embed, /verify, /identify, GET /identities and thumbnails."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is served: identities, examples, model, threshold, auth."""
        counts = await service.read(lambda g: (len(g), g.num_examples))
        batcher = service.batcher
        return {
            "status": "ok",
            "identities": counts[0],
            "examples": counts[1],
            "model": service.embedder.identity(),
            "metric": service.metric,
            "threshold": service.threshold,
            "auth": gate.needs_key,
            "batching": {
                "batches": batcher.batches if batcher else 0,
                "items": batcher.items if batcher else 0,
            },
        }

    @app.post("/embed")
    async def embed(files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        """Embeddings of the uploaded images, in order."""
        async with _uploads(service, files) as up:
            names = up.names
            emb = await service.embed(up.x)
        return {
            "inputs": names,
            "shape": list(emb.shape),
            "embeddings": emb.tolist(),
            "model": service.embedder.identity(),
        }

    @app.post("/verify")
    async def verify(
        a: Annotated[UploadFile, File()], b: Annotated[UploadFile, File()]
    ) -> dict[str, Any]:
        """Same or different: the distance of the two images at the gallery's threshold."""
        async with _uploads(service, [a, b]) as up:
            names = up.names
            emb = await service.embed(up.x)
        distance = float(paired(emb[:1], emb[1:], service.metric)[0])
        decision = Verification(distance, service.threshold, distance <= service.threshold)
        return decision.to_json(names[0], names[1], service.metric)

    @app.post("/identify")
    async def identify(
        files: Annotated[list[UploadFile], File()],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 5,
    ) -> list[dict[str, Any]]:
        """Per image: the nearest identity within the threshold (or null: unknown) and the k
        nearest identities."""
        async with _uploads(service, files) as up:
            names = up.names
            queries = (await service.embed(up.x)).numpy()
        results = await service.read(lambda g: g.identify_embeddings(queries, k=k))
        return [r.to_json(name) for name, r in zip(names, results)]

    @app.get("/identities")
    async def identities() -> list[dict[str, Any]]:
        """Every enrolled identity, ordered by name."""
        infos = await service.read(lambda g: g.identities())
        return [info.to_json() for info in infos]

    @app.get(
        "/identities/{identity:path}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def thumbnail(identity: str) -> Response:
        """The PNG thumbnail of the identity's first example."""

        def job(g: Gallery) -> bytes | None:
            return g.thumbnail(identity)

        try:
            png = await service.read(job)
        except UnknownIdentityError as error:
            raise HTTPException(404, str(error)) from None
        if png is None:
            raise HTTPException(404, f"{identity!r} has no thumbnail")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


def _add_writes(app: FastAPI, service: GalleryService) -> None:
    """POST /identities (enroll) and DELETE /identities/NAME (remove)."""

    @app.post("/identities", status_code=201)
    async def enroll(
        request: Request,
        identity: Annotated[str, Form()],
        files: Annotated[list[UploadFile], File()],
    ) -> dict[str, Any]:
        """Enroll the images as examples of ``identity`` (new, or more of an enrolled one)."""
        given = len((await request.form()).getlist("identity"))  # parsed once, cached
        if given != 1:  # else the last would win, unseen
            raise HTTPException(422, f"identity: one per request, the form has {given}")
        name = _name(identity)
        async with _uploads(service, files, keep=True) as up:
            names, images = up.names, up.images
            ids = await service.write(lambda g: g.enroll(name, images))
        return {"identity": name, "examples": ids, "files": names}

    @app.delete("/identities/{identity:path}")
    async def remove(identity: str) -> dict[str, Any]:
        """Remove the identity and all its examples."""

        def job(g: Gallery) -> tuple[list[int], int]:
            ids = g.remove(identity)
            return ids, len(g)

        try:
            ids, left = await service.write(job)
        except UnknownIdentityError as error:
            raise HTTPException(404, str(error)) from None
        return {"identity": identity, "examples": ids, "identities": left}
