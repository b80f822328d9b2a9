"""An ordered, bounded thread-pool map: the pipelining under ``Detector.stream`` and ``detect`` on folders.

Each item's work (decode, letterbox, inference, NMS) runs in one of ``depth`` worker threads,
so one frame's decode and NMS (numpy and OpenCV release the GIL for most of it) overlap
another's inference (every backend's ``infer`` releases the GIL and is thread-safe; see
``Detector``). Results come back in input order; never more than ``depth`` items are in
flight, so a fast source (a camera) cannot grow memory; the source is read lazily, in the
consumer's thread. Closing the generator early, or the source or a work item raising,
cancels what has not started and joins every worker before control returns.

``ordered_async`` is the same contract for engines with their own asynchronous queue
(OpenVINO's ``AsyncInferQueue``): host work runs in the consumer's thread while up to
``depth`` frames infer in the engine's threads.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from ..errors import EdgeYoloError

T = TypeVar("T")
R = TypeVar("R")
MAX_DEPTH = 64


def check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise EdgeYoloError(f"depth must be an integer from 1 to {MAX_DEPTH}, not {depth!r}")
    return depth


def ordered_map(work: Callable[[T], R], items: Iterable[T], depth: int = 3) -> Iterator[R]:
    """``work(item)`` for every item, ``depth`` at a time in worker threads, yielded in input order."""
    depth = check_depth(depth)
    executor = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="edgeyolo-stream")
    pending: deque = deque()
    try:
        for item in items:  # the next item is read only once fewer than depth are in flight
            pending.append(executor.submit(work, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True)


def ordered_async(prepare: Callable, open_queue: Callable, finish: Callable, items: Iterable, depth: int = 3) -> Iterator:
    """``finish(output, context)`` for every item, in input order, inference running asynchronously.

    ``prepare(item, slot) -> (batch, context)`` and ``finish`` run in the consumer's thread;
    ``open_queue()`` gives an object with ``submit(batch, slot) -> result`` (``result.result()``
    waits for the output) and ``close()`` (waits for every request). Items take slots
    ``0 .. depth-1`` in turn, and an item's slot is reused only after its output went through
    ``finish``, so a slot's input buffer and output may be the engine's own, without copies.
    The queue is opened at the first ``next()``, so a generator never started holds nothing.
    At most ``depth`` items are read and not yet yielded; closing early, or an error anywhere,
    waits for the requests in flight before control returns.
    """
    depth = check_depth(depth)
    engine_queue = open_queue()
    pending: deque = deque()
    try:
        for count, item in enumerate(items):
            slot = count % depth
            batch, context = prepare(item, slot)
            pending.append((engine_queue.submit(batch, slot), context))
            if len(pending) >= depth:  # the oldest, whose slot the next item takes
                result, context = pending.popleft()
                yield finish(result.result(), context)
        while pending:
            result, context = pending.popleft()
            yield finish(result.result(), context)
    finally:
        engine_queue.close()
