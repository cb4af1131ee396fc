"""One index shared by the Gallery objects of one process: a readers-writer lock and a slot.

SQLite connections belong to the thread that opened them, so a service opens one
:class:`~deepmetric.gallery.Gallery` per worker thread. Their indexes need not be copies:
given the same :class:`IndexSlot`, every Gallery searches the one index in the slot.

- **Readers** (identify) hold :meth:`ReadWriteLock.reading`: any number at once, each
  searching the index while no writer changes it.
- **Writers** (enroll, remove, reindex, check, close, a rebuild after another process wrote)
  hold :meth:`ReadWriteLock.writing`: alone, and the change is made in place (an index add,
  tombstones) where the index allows; no other copy needs rebuilding.
- A writer that is waiting goes before readers that arrive after it, so a stream of identify
  requests cannot starve an enroll; the thread that holds the write lock may take either lock
  again (a write that reads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepmetric.gallery.index import GalleryIndex

__all__ = ["IndexSlot", "ReadWriteLock"]


class ReadWriteLock:
    """Many readers or one writer (writer-preferring; the writer may re-enter)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None  # the thread id holding the write lock
        self._depth = 0  # the writer's nested holds
        self._waiting = 0  # writers waiting for the readers to leave

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the lock shared (the writer thread passes through)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            self._release(me)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the lock alone: waits for the readers inside to leave."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            self._release(me)

    def _release(self, me: int) -> None:
        with self._cond:
            if self._writer == me:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._cond.notify_all()
            else:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()


class IndexSlot:
    """The index one process's Gallery objects on one gallery file share, with its lock.

    Attributes:
        index: the index (``None`` until the first Gallery opened with the slot loads it).
        saved_generation: the store generation of the index last saved (``None``: unknown).
        lock: the :class:`ReadWriteLock` every read and change of the index holds.
        gallery_id: the gallery the index belongs to (a slot serves one gallery file).
        users: the open Gallery objects using it; the last one to close closes the index.
    """

    def __init__(self) -> None:
        self.index: GalleryIndex | None = None
        self.saved_generation: int | None = None
        self.lock = ReadWriteLock()
        self.gallery_id: str | None = None
        self.users = 0
