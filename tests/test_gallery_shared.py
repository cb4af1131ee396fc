"""One index for the Gallery objects of one process (a service's worker threads): the
readers-writer lock (readers together, a writer alone, a waiting writer first, the writer may
re-enter), Gallery objects on one slot (one index object, writes in place, no rebuild, another
process's write rebuilt once for all), the service's workers on one slot, and concurrent
identify + enroll + remove threads against brute force on what was acknowledged."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability_gallery import EXAMPLES, _gallery, inputs, make_embedder

from deepmetric.distances import pairwise
from deepmetric.gallery import Gallery, GalleryError, IndexSlot
from deepmetric.gallery.shared import ReadWriteLock
from deepmetric.service.workers import GalleryWorkers

WAIT = 5.0  # seconds a test waits for a thread to reach a point it must reach


# ------------------------------------------------------------------------------ the lock


def test_readers_hold_the_lock_together():
    lock = ReadWriteLock()
    inside = threading.Barrier(4, timeout=WAIT)  # broken unless all 4 are inside at once

    def reader() -> None:
        with lock.reading():
            inside.wait()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not inside.broken and not any(t.is_alive() for t in threads)


def test_a_writer_waits_for_readers_and_excludes_them():
    lock = ReadWriteLock()
    order: list[str] = []
    reading, release = threading.Event(), threading.Event()

    def reader() -> None:
        with lock.reading():
            reading.set()
            release.wait(WAIT)
            order.append("reader out")

    def writer() -> None:
        with lock.writing():
            order.append("writer in")
            time.sleep(0.05)
            order.append("writer out")

    r = threading.Thread(target=reader)
    r.start()
    assert reading.wait(WAIT)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    assert order == []  # the writer waits for the reader inside

    def late_reader() -> None:
        with lock.reading():
            order.append("late")

    late = threading.Thread(target=late_reader)
    late.start()  # a reader arriving after the waiting writer goes after it
    time.sleep(0.05)
    assert order == []
    release.set()
    for t in (r, w, late):
        t.join(WAIT)
    assert order == ["reader out", "writer in", "writer out", "late"]


def test_the_writer_may_take_the_lock_again():
    lock = ReadWriteLock()

    def nested() -> None:  # a lock that is not re-entrant hangs here: the thread stays alive
        with lock.writing(), lock.reading(), lock.writing():
            pass

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()

    def other() -> None:
        with lock.writing():
            pass

    free = threading.Thread(target=other, daemon=True)
    free.start()  # released whole: another thread gets it at once
    free.join(WAIT)
    assert not free.is_alive()


# ------------------------------------------------------------------------------ Gallery on a slot


class InThread:
    """A Gallery opened, used and closed in a thread of its own (a SQLite connection belongs
    to its thread): ``call(job)`` runs ``job(gallery)`` there and returns its result."""

    def __init__(self, path: Path, slot: IndexSlot) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        opened: Future[Gallery] = Future()
        self._thread = threading.Thread(target=self._run, args=(path, slot, opened))
        self._thread.start()
        self.gallery = opened.result(WAIT)

    def _run(self, path: Path, slot: IndexSlot, opened: Future) -> None:
        gallery = Gallery.open(path, make_embedder(), slot=slot)
        opened.set_result(gallery)
        try:
            while (item := self._jobs.get()) is not None:
                job, done = item
                try:
                    done.set_result(job(gallery))
                except BaseException as error:
                    done.set_exception(error)
        finally:
            gallery.close()

    def call(self, job):
        done: Future = Future()
        self._jobs.put((job, done))
        return done.result(WAIT)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(WAIT)


def test_gallery_objects_on_one_slot_share_one_index(tmp_path):
    path = _gallery(tmp_path / "g.db", 6)
    slot = IndexSlot()
    with Gallery.open(path, make_embedder(), slot=slot) as first:
        other = InThread(path, slot)
        second = other.gallery
        # the second Gallery loaded nothing: it found the index in the slot
        assert second.index is first.index and slot.users == 2
        first.enroll("person 6", inputs(6))
        first.remove("person 0")
        # the other thread's Gallery sees both writes, and neither Gallery rebuilt anything
        assert other.call(lambda g: g.identify(inputs(6)[:1])[0].identity) == "person 6"
        names = other.call(
            lambda g: [c.identity for c in g.identify(inputs(0)[:1], k=10)[0].candidates]
        )
        assert "person 0" not in names and len(names) == 6
        other.call(lambda g: g.enroll("person 7", inputs(7)))
        assert first.identify(inputs(7)[:1])[0].identity == "person 7"
        assert first.index_builds == 0 and second.index_builds == 0
        assert second.index is first.index and len(first.index) == 7 * EXAMPLES
        other.close()
        assert slot.users == 1 and len(first.index) == 7 * EXAMPLES  # still open: in use
    assert slot.users == 0


def test_a_slot_serves_one_gallery(tmp_path):
    one, two = _gallery(tmp_path / "one.db", 2), _gallery(tmp_path / "two.db", 2)
    slot = IndexSlot()
    with Gallery.open(one, make_embedder(), slot=slot):
        with pytest.raises(GalleryError, match="another gallery's index"):
            Gallery.open(two, make_embedder(), slot=slot)
        assert slot.users == 1


def test_another_process_write_is_rebuilt_once_for_every_sharer(tmp_path):
    path = _gallery(tmp_path / "g.db", 4)
    slot = IndexSlot()
    with Gallery.open(path, make_embedder(), slot=slot) as a:
        with Gallery.open(path, make_embedder()) as other:  # no slot: "another process"
            other.enroll("person 9", inputs(9))
        index = a.index
        assert a.identify(inputs(9)[:1])[0].identity == "person 9"
        assert a.index_builds == 1 and a.index is not index and slot.index is a.index


def _brute_nearest(gallery_inputs: dict[str, torch.Tensor], queries: torch.Tensor) -> list[str]:
    embedder = make_embedder()
    names = list(gallery_inputs)
    refs = torch.cat([embedder.embed(gallery_inputs[n]) for n in names])
    owner = np.repeat(names, [len(gallery_inputs[n]) for n in names])
    d = pairwise(embedder.embed(queries), refs, "euclidean")
    return [str(owner[i]) for i in d.argmin(dim=1).tolist()]


def test_service_workers_search_one_index_while_writes_go_in_place(tmp_path):
    path = _gallery(tmp_path / "g.db", 8)
    workers = GalleryWorkers(path, make_embedder(), threads=4)
    workers.start()
    try:
        index = workers.slot.index
        assert workers.slot.users == 4
        wrong: list[str] = []
        stop = threading.Event()

        def searcher(i: int) -> None:  # person 0..3 are never removed: always found
            while not stop.is_set():
                found = workers.read(lambda g: g.identify(inputs(i)[:1])[0].identity).result()
                if found != f"person {i}":
                    wrong.append(f"person {i} identified as {found}")

        threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for i in range(8, 20):
            workers.write(lambda g, i=i: g.enroll(f"person {i}", inputs(i))).result(WAIT)
            if i % 3 == 0:
                workers.write(lambda g, i=i: g.remove(f"person {i}")).result(WAIT)
        workers.write(lambda g: g.remove("person 5")).result(WAIT)
        stop.set()
        for t in threads:
            t.join(WAIT)
        assert wrong == []
        kept = {
            f"person {i}": inputs(i) for i in range(20) if i != 5 and not (i >= 8 and i % 3 == 0)
        }
        queries = torch.cat([inputs(i)[:1] for i in range(20)])
        got = workers.read(lambda g: [a.candidates[0].identity for a in g.identify(queries)])
        assert got.result(WAIT) == _brute_nearest(kept, queries)
        builds = [workers.read(lambda g: g.index_builds).result(WAIT) for _ in range(8)]
        assert workers.slot.index is index and set(builds) == {0}  # in place, never rebuilt
    finally:
        workers.close()
    assert workers.slot.users == 0
    with Gallery.open(path, make_embedder()) as reopened:  # the saved index is current
        assert reopened.index_builds == 0 and len(reopened) == len(kept)
