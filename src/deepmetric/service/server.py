"""``deepmetric serve``: load the model once, open (or create) the gallery, run uvicorn.

The settings are checked before torch, the model or FastAPI are imported, so a mistake on the
command line is reported at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from deepmetric.files import print_stderr

if TYPE_CHECKING:
    from deepmetric.inference import Embedder

__all__ = ["load_model", "serve"]


def load_model(source: str | Path, *, device: str = "auto", calibrate: bool) -> Embedder:
    """The Embedder of a run folder or an ``.onnx`` file (``calibrate``: choose and save the
    run's threshold when it has none, as ``deepmetric gallery create`` does)."""
    from deepmetric.inference import Embedder

    return Embedder.load(source, device=device, calibrate=calibrate, progress=print_stderr)


def api_key_from_env(name: str | None) -> str | None:
    """The API key held by the environment variable ``name`` (``None``: no key)."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise ValueError(f"--api-key-env {name}: the environment variable {name} is unset or empty")
    # Refused, not stripped: a key is a secret compared byte for byte, and clients that read
    # the same variable or file would keep the newline the server dropped. HTTP strips it from
    # header values, and cannot carry control characters, so no client could authenticate.
    if key != key.strip():
        raise ValueError(
            f"--api-key-env {name}: the key starts or ends with whitespace (a newline?); no "
            "HTTP client can send that: remove it"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"--api-key-env {name}: the key holds a control character: remove it")
    return key


def connection_cap() -> int:
    """The default ``--max-connections``: 1000, or fewer when the process may open fewer files
    (64 descriptors kept for the gallery, the model and the log)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(8, min(1000, soft - 64))


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (not listening yet: connections are refused until
    the server runs), or ``ValueError`` in one line (port in use, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise ValueError(f"cannot listen on {shown}:{port}: {error.strerror or error}") from None
    return sock


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
    busy_timeout: float = 10.0,
    header_timeout: float = 10.0,
    body_timeout: float = 60.0,
    max_connections: int | None = None,
    index: str | None = None,
) -> None:
    """Serve ``gallery`` (created for ``model`` when the file does not exist) over HTTP until
    interrupted (Ctrl-C / SIGTERM: the gallery is closed and its index saved).

    ``index`` says where a gallery created here keeps its vectors (as ``deepmetric gallery
    create --index``: ``local``, ``milvus-lite:PATH.db``, ``milvus://HOST:PORT/COLLECTION``);
    an existing gallery keeps its own, and an ``index`` naming another place is refused.

    Raises ``ValueError`` for bad settings, :class:`~deepmetric.gallery.ModelMismatchError`
    when the gallery was made with another model.

    Slow clients: a request's headers must arrive within ``header_timeout`` seconds and its
    body within ``body_timeout`` seconds after them (else 408, connection closed); at most
    ``max_connections`` (default :func:`connection_cap`) are open at once, more are closed at
    accept. The port is bound before the model is loaded or the gallery created, so a port in
    use is said at once and leaves no new gallery behind.
    """
    if not 0 < max_upload_mb <= 1024:
        raise ValueError(f"--max-upload-mb must be in (0, 1024], got {max_upload_mb:g}")
    if not 0 <= busy_timeout <= 3600:  # NaN too
        raise ValueError(f"--busy-timeout must be in [0, 3600] seconds, got {busy_timeout}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    key = api_key_from_env(api_key_env)
    if protect_reads and key is None:
        raise ValueError("--protect-reads needs an API key: give --api-key-env NAME")
    check_index_option(index, Path(gallery))
    from deepmetric.service.limits import http_protocol

    protocol = http_protocol(
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=connection_cap() if max_connections is None else max_connections,
    )
    sock = bind(host, port)  # before anything is loaded or created
    try:
        _run(
            sock,
            model,
            Path(gallery),
            host=host,
            key=key,
            protect_reads=protect_reads,
            max_upload_mb=max_upload_mb,
            device=device,
            threads=threads,
            busy_timeout=busy_timeout,
            protocol=protocol,
            index=index,
        )
    finally:
        sock.close()


def check_index_option(index: str | None, gallery: Path) -> None:
    """``index`` is a valid spec and, for an existing ``gallery``, the place it already uses
    (a restart with the same command line passes); otherwise a ``ValueError`` naming both."""
    from deepmetric.gallery.milvus_index import parse_index_spec, target_of
    from deepmetric.gallery.store import GalleryStore

    wanted = parse_index_spec(index, gallery)
    if index is None or not gallery.exists():
        return
    with GalleryStore.open(gallery) as store:
        own = target_of(store.meta, gallery)
    if own != wanted:
        where = "its index folder (local)" if own is None else str(own)
        raise ValueError(
            f"--index {index}: {gallery} exists and keeps its vectors in {where}; --index "
            "applies when serve creates the gallery (to move an existing one: create a new "
            "gallery with --index and enroll again)"
        )


def _run(
    sock: socket.socket,
    model: str | Path,
    gallery: Path,
    *,
    host: str,
    key: str | None,
    protect_reads: bool,
    max_upload_mb: float,
    device: str,
    threads: int,
    busy_timeout: float,
    protocol: type,
    index: str | None,
) -> None:
    """Load the model, open (or create) ``gallery`` and serve it on the bound ``sock``."""
    from deepmetric.service.limits import quiet_accept_errors

    port = sock.getsockname()[1]  # the one chosen for --port 0
    from deepmetric.gallery import Gallery
    from deepmetric.service.app import GalleryService, create_app

    embedder = load_model(model, device=device, calibrate=not gallery.exists())
    if not gallery.exists():
        with Gallery.create(
            gallery, embedder, source=model, progress=print_stderr, index=index
        ) as created:
            print_stderr(
                f"created {created.path} (threshold {created.threshold.value:.4f}; vectors in "
                f"{created.index_location})"
            )
    service = GalleryService(str(gallery), embedder, threads=threads, busy_timeout=busy_timeout)
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
            print_stderr(
                f"warning: serving on {host} without an API key: anyone who can reach it can "
                "enroll and remove identities (give --api-key-env NAME)"
            )
        shown = f"[{host}]" if ":" in host else host
        print_stderr(
            f"serving {gallery} with {model} on http://{shown}:{port}/ (the page; API docs at "
            f"/docs); writes {'need the API key' if key else 'are open'}, reads "
            f"{'need the API key' if protect_reads else 'are open'}"
        )
        quiet_accept_errors()
        config = uvicorn.Config(
            app, http=protocol, log_level="warning", access_log=False, timeout_keep_alive=5
        )
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: re-raised after the shutdown
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()  # idempotent: the app's shutdown already closed it


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
