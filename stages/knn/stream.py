"""Read-ahead for streamed base shards: the next shard loads from disk while this one is searched."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield `items` in order, producing up to `depth` of them ahead in a background thread.

    Memory grows by at most `depth` items. If the consumer stops early, the thread is told to
    stop and drops what it holds; an exception in the producer is raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(q, item, stop):
                    return
            _put(q, _END, stop)
        except BaseException as e:  # handed to the consumer, raised there
            _put(q, _Failure(e), stop)

    thread = threading.Thread(target=produce, daemon=True, name="knn-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
