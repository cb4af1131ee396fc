"""The gallery over HTTP: ``deepmetric serve RUN_DIR --gallery G``.

Modules: ``app`` (:func:`~deepmetric.service.app.create_app`: the FastAPI endpoints and the
page; :class:`~deepmetric.service.app.GalleryService`: one model, one gallery, thread-safe),
``workers`` (a Gallery per worker thread, one writer at a time; the embedding micro-batcher),
``uploads`` (the API key, size and content-type gate; image decoding), ``server``
(:func:`~deepmetric.service.server.serve`: load, open, run uvicorn), ``static/`` (the page:
HTML, CSS and a little JavaScript, no build step, nothing fetched from outside).

Needs the ``serve`` extra (``pip install deepmetric[serve]``: fastapi, uvicorn,
python-multipart). Importing this package alone imports none of them.
"""

from __future__ import annotations

__all__ = ["serve"]


def serve(*args: object, **kwargs: object) -> None:
    """:func:`deepmetric.service.server.serve` (imported on first use)."""
    from deepmetric.service.server import serve as run

    run(*args, **kwargs)  # type: ignore[arg-type]
