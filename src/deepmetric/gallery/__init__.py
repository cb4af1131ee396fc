"""The one-shot identification gallery: a persistent store of enrolled embeddings and the
search index derived from it.

Modules: ``store`` (:class:`~deepmetric.gallery.store.GalleryStore`, SQLite, the source of
truth), ``index`` (:class:`~deepmetric.gallery.index.ExactIndex`,
:class:`~deepmetric.gallery.index.FaissIndex`, :func:`~deepmetric.gallery.index.make_index`,
:func:`~deepmetric.gallery.index.top_identities`): derived, rebuilt from the store whenever the
store's ``generation`` has moved on.

Importing this package imports nothing heavy: import the submodules.
"""
