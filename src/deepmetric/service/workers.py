"""The service's two kinds of worker threads: gallery workers and the embedding micro-batcher.

**Gallery workers.** SQLite connections (and so :class:`~deepmetric.gallery.Gallery` objects)
belong to the thread that opened them. :class:`GalleryWorkers` therefore runs ``threads``
worker threads, each opening its own :class:`~deepmetric.gallery.Gallery` on the same file
(with the one shared :class:`~deepmetric.inference.Embedder`: one model in the process) and
using it only from that thread. Jobs (``job(gallery) -> result``) go into one queue and come
back as :class:`concurrent.futures.Future` objects:

- reads (:meth:`GalleryWorkers.read`: identify, list, thumbnail) run on any free worker, so up
  to ``threads`` run at once, each on its own connection (SQLite WAL: a reader sees the state
  before or after each write, never a part of one);
- writes (:meth:`GalleryWorkers.write`: enroll, remove) also run on a free worker, but one at a
  time (a process-wide lock), so this process's writes never wait on each other inside SQLite;
  other processes (``deepmetric gallery enroll``) are serialised by SQLite itself.

The workers share one index (an :class:`~deepmetric.gallery.shared.IndexSlot`): searches
hold its lock shared and run side by side; a write holds it alone while its rows go into the
database and then into the index in place (an add, tombstones for a remove), so no copy is
rebuilt after a write of this process. An enroll by another process (``deepmetric gallery
enroll``) moves the store's ``generation`` on; the next search notices and one worker rebuilds
the index (or catches a Milvus collection up) for all.

**Micro-batching.** :class:`MicroBatcher` owns one thread that runs the model. Requests hand
it preprocessed inputs ``(n, C, H, W)``; it takes every request waiting in its queue (up to
``max_batch`` inputs), runs one forward pass over them all and hands each request its rows.
Nothing waits on purpose: alone, a request is embedded at once; under load, requests queue
while a forward pass runs and the next pass takes them together.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

from deepmetric.checks import positive_int
from deepmetric.gallery import Gallery
from deepmetric.gallery.shared import IndexSlot
from deepmetric.inference import Embedder

__all__ = ["GalleryWorkers", "MicroBatcher"]

T = TypeVar("T")
Job = Callable[[Gallery], Any]


class GalleryWorkers:
    """``threads`` threads, each with its own :class:`Gallery` on ``path``, all sharing one
    index (see the module docstring). :meth:`start` opens them (one after another, raising the
    first error, e.g. a :class:`~deepmetric.gallery.ModelMismatchError`); :meth:`close` closes
    each in its own thread (the last one closes the index)."""

    def __init__(
        self, path: str | Path, embedder: Embedder, *, threads: int = 4, timeout: float = 30.0
    ) -> None:
        positive_int("threads", threads)
        self.path = Path(path)
        self.embedder = embedder
        self.threads = threads
        #: seconds a write waits for another process's write lock (GalleryBusyError after)
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[tuple[Job, Future[Any], bool] | None] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        #: the one index every worker's Gallery searches
        self.slot = IndexSlot()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open one Gallery per worker thread, one after another; the first failure closes
        the ones already open and is raised."""
        for i in range(self.threads):
            opened: Future[None] = Future()
            worker = threading.Thread(
                target=self._run, args=(opened,), name=f"gallery-{i}", daemon=True
            )
            worker.start()
            try:
                opened.result()
            except BaseException:
                self.close()
                worker.join()
                raise
            self._workers.append(worker)

    def close(self) -> None:
        """Stop every worker after the jobs already queued; each closes its Gallery (saving
        its index when it changed)."""
        workers, self._workers = self._workers, []
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            worker.join()

    def _run(self, opened: Future[None]) -> None:
        try:
            gallery = Gallery.open(self.path, self.embedder, timeout=self.timeout, slot=self.slot)
        except BaseException as error:
            opened.set_exception(error)
            return
        opened.set_result(None)
        try:
            while (item := self._jobs.get()) is not None:
                job, future, exclusive = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    if exclusive:
                        with self._write_lock:
                            result = job(gallery)
                    else:
                        result = job(gallery)
                except BaseException as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
        finally:
            with self._close_lock:
                gallery.close()

    # ------------------------------------------------------------------ jobs

    def read(self, job: Callable[[Gallery], T]) -> Future[T]:
        """Run ``job(gallery)`` on a free worker, alongside other reads and a write."""
        return self._submit(job, exclusive=False)

    def write(self, job: Callable[[Gallery], T]) -> Future[T]:
        """Run ``job(gallery)`` on a free worker, one write at a time."""
        return self._submit(job, exclusive=True)

    def _submit(self, job: Callable[[Gallery], T], *, exclusive: bool) -> Future[T]:
        if not self._workers:
            raise RuntimeError("the gallery workers are not running (start() them first)")
        future: Future[T] = Future()
        self._jobs.put((job, future, exclusive))
        return future


class MicroBatcher:
    """One thread runs ``forward`` (model inputs ``(N, ...)`` -> embeddings ``(N, D)``) over
    the inputs of every request waiting, up to ``max_batch`` at a time (see the module
    docstring). :attr:`batches` and :attr:`items` count forward passes and inputs embedded.

    Example::

        batcher = MicroBatcher(embedder.embed)
        embeddings = batcher.submit(x).result()  # x: (n, C, H, W) float32
        batcher.close()
    """

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 64
    ) -> None:
        positive_int("max_batch", max_batch)
        self._forward = forward
        self.max_batch = max_batch
        self.batches = 0
        self.items = 0
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, Future[torch.Tensor]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, x: torch.Tensor) -> Future[torch.Tensor]:
        """Embed ``x`` (n >= 1 model inputs); the future gives ``(n, D)`` float32."""
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        if x.dim() < 2 or len(x) == 0:
            raise ValueError(f"submit needs a batch of at least one input, got {tuple(x.shape)}")
        future: Future[torch.Tensor] = Future()
        self._queue.put((x, future))
        return future

    def close(self) -> None:
        """Finish the requests already queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first[0])
            while size < self.max_batch:  # take what is waiting; never wait for more
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += len(item[0])
            self._embed(batch)

    def _embed(self, batch: list[tuple[torch.Tensor, Future[torch.Tensor]]]) -> None:
        live = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            out = self._forward(torch.cat([x for x, _ in live]))
        except BaseException as error:
            for _, future in live:
                future.set_exception(error)
            return
        self.batches += 1
        self.items += len(out)
        start = 0
        for x, future in live:
            future.set_result(out[start : start + len(x)])
            start += len(x)
