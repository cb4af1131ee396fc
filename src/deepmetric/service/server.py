"""``deepmetric serve``: load the model once, open (or create) the gallery, run uvicorn.

The settings are checked before torch, the model or FastAPI are imported, so a mistake on the
command line is reported at once.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepmetric.inference import Embedder

__all__ = ["load_model", "serve"]

Progress = Callable[[str], None]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_model(source: str | Path, *, device: str = "auto", calibrate: bool) -> Embedder:
    """The Embedder of a run folder or an ``.onnx`` file (``calibrate``: choose and save the
    run's threshold when it has none, as ``deepmetric gallery create`` does)."""
    from deepmetric.inference import Embedder

    path = Path(source)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return Embedder.from_onnx(path)
    if not path.is_dir():
        raise ValueError(f"{path}: neither a run folder nor an .onnx file")
    return Embedder.from_run(path, device=device, calibrate=calibrate, progress=_say)


def api_key_from_env(name: str | None) -> str | None:
    """The API key held by the environment variable ``name`` (``None``: no key)."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise ValueError(f"--api-key-env {name}: the environment variable {name} is unset or empty")
    return key


def serve(
    model: str | Path,
    gallery: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    protect_reads: bool = False,
    max_upload_mb: float = 10.0,
    device: str = "auto",
    threads: int = 4,
) -> None:
    """Serve ``gallery`` (created for ``model`` when the file does not exist) over HTTP until
    interrupted (Ctrl-C / SIGTERM: the gallery is closed and its index saved).

    Raises ``ValueError`` for bad settings, :class:`~deepmetric.gallery.ModelMismatchError`
    when the gallery was made with another model.
    """
    if not 0 < max_upload_mb <= 1024:
        raise ValueError(f"--max-upload-mb must be in (0, 1024], got {max_upload_mb:g}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    key = api_key_from_env(api_key_env)
    if protect_reads and key is None:
        raise ValueError("--protect-reads needs an API key: give --api-key-env NAME")
    gallery = Path(gallery)
    from deepmetric.gallery import Gallery
    from deepmetric.service.app import GalleryService, create_app

    embedder = load_model(model, device=device, calibrate=not gallery.exists())
    if not gallery.exists():
        with Gallery.create(gallery, embedder, source=model, progress=_say) as created:
            _say(f"created {created.path} (threshold {created.threshold.value:.4f})")
    service = GalleryService(str(gallery), embedder, threads=threads)
    service.start()
    import uvicorn

    try:
        app = create_app(
            service,
            api_key=key,
            protect_reads=protect_reads,
            max_upload_bytes=int(max_upload_mb * (1 << 20)),
        )
        loopback = host == "localhost" or _is_loopback(host)
        if not loopback and key is None:
            _say(
                f"warning: serving on {host} without an API key: anyone who can reach it can "
                "enroll and remove identities (give --api-key-env NAME)"
            )
        shown = f"[{host}]" if ":" in host else host
        _say(
            f"serving {gallery} with {model} on http://{shown}:{port}/ (the page; API docs at "
            f"/docs); writes {'need the API key' if key else 'are open'}, reads "
            f"{'need the API key' if protect_reads else 'are open'}"
        )
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()  # idempotent: the app's shutdown already closed it


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
