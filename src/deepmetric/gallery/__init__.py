"""The one-shot identification gallery: enroll identities, identify new images (open set).

Modules: ``gallery`` (:class:`~deepmetric.gallery.gallery.Gallery`: enroll / identify /
remove over one model, with the open-set threshold and the model identity check), ``store``
(:class:`~deepmetric.gallery.store.GalleryStore`, SQLite, the source of truth), ``index``
(:class:`~deepmetric.gallery.index.ExactIndex`, :class:`~deepmetric.gallery.index.FaissIndex`,
:func:`~deepmetric.gallery.index.make_index`, :func:`~deepmetric.gallery.index.top_identities`):
derived, rebuilt from the store whenever the store's ``generation`` has moved on;
``milvus_index`` (:class:`~deepmetric.gallery.milvus_index.MilvusIndex`: the same contract over
a Milvus collection, Milvus Lite or a server, kept in step with the store); ``check``
(:func:`~deepmetric.gallery.check.check_gallery`: does the saved index agree with the store?
``deepmetric gallery check [--repair]``); ``shared``
(:class:`~deepmetric.gallery.shared.IndexSlot`: one index for the Gallery objects of one
process, under a readers-writer lock).

``from deepmetric.gallery import Gallery`` works; the names below are imported on first use,
so importing this package alone imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckReport": "check",
    "check_gallery": "check",
    "Candidate": "gallery",
    "Gallery": "gallery",
    "Identification": "gallery",
    "ModelMismatchError": "gallery",
    "GalleryError": "store",
    "GalleryStore": "store",
    "IdentityInfo": "store",
    "IndexSlot": "shared",
    "UnknownIdentityError": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepmetric.gallery' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deepmetric.gallery.{_EXPORTS[name]}"), name)
