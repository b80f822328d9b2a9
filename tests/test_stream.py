"""``Detector.stream``: pipelined results equal ``detect()`` in order, bounded, and stop cleanly."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from edgeyolo.errors import EdgeYoloError
from edgeyolo.runtime import load, read_image
from edgeyolo.runtime.pipeline import ordered_async, ordered_map

BUNDLES = ["cpu_fp32_bundle", "ov_fp32_bundle", "ov_int8_bundle"]


def stream_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("edgeyolo-stream")]


def same(a, b) -> bool:
    return (np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.confidence, b.confidence)
            and np.array_equal(a.class_id, b.class_id))


@pytest.fixture(scope="module")
def frames(sample_images, coco128) -> list:
    """Paths and arrays of different sizes (different letterbox paddings)."""
    paths = sorted((coco128 / "images").glob("*.jpg"))[:6]
    return list(sample_images) + paths[:3] + [read_image(p) for p in paths[3:]]


@pytest.mark.parametrize("bundle_fixture", BUNDLES)
def test_stream_equals_detect_in_order(bundle_fixture, frames, request):
    if bundle_fixture.startswith("ov"):
        pytest.importorskip("nncf")
    detector = load(request.getfixturevalue(bundle_fixture))
    serial = [detector.detect(frame) for frame in frames]
    assert sum(len(d) for d in serial) > 0
    for depth in (1, 3):
        streamed = list(detector.stream(iter(frames), depth=depth))
        assert len(streamed) == len(frames)
        assert [i for i, (a, b) in enumerate(zip(serial, streamed)) if not same(a, b)] == []
    assert stream_threads() == []


class SpyQueues:
    """Wraps an OpenVINO engine's ``async_queue`` to see every request submitted and every queue closed."""

    def __init__(self, engine):
        self.opened, self.futures, self.closed = 0, [], 0
        make = engine.async_queue

        def spy(depth):
            queue = make(depth)
            submit, close = queue.submit, queue.close
            self.opened += 1
            queue.submit = lambda batch, slot: self.futures.append(submit(batch, slot)) or self.futures[-1]
            queue.close = lambda: (close(), setattr(self, "closed", self.closed + 1))
            return queue

        engine.async_queue = spy


def test_openvino_streams_on_its_async_queue_and_stops_cleanly(ov_fp32_bundle, frames):
    detector = load(ov_fp32_bundle)
    spy = SpyQueues(detector.engine)
    detector.engine.infer = None  # the stream path must not fall back to the thread pool's infer()
    results = detector.stream(iter(frames * 3), depth=3)
    for _ in range(4):
        next(results)
    assert spy.opened == 1 and len(spy.futures) == 6  # 4 yielded, 2 in flight (depth - 1 while suspended)
    assert list(detector.engine._compiled) == ["THROUGHPUT"]  # detect()'s LATENCY model never compiled
    assert [f.slot for f in spy.futures] == [0, 1, 2, 0, 1, 2]  # the ring's requests in turn
    results.close()
    assert spy.closed == 1 and all(f.done() for f in spy.futures)  # every request waited for
    assert stream_threads() == []

    def frames_then_garbage():
        yield from frames[:4]
        yield np.zeros((0, 0, 3), np.uint8)  # not an image: raises in the consumer's prepare step

    with pytest.raises(EdgeYoloError):
        list(detector.stream(frames_then_garbage(), depth=3))
    assert spy.closed == 2 and all(f.done() for f in spy.futures)


def test_openvino_holds_one_compiled_model_across_detect_and_stream(ov_int8_bundle, frames):
    pytest.importorskip("nncf")
    from edgeyolo.backends.openvino import STREAM_HINT

    detector = load(ov_int8_bundle)
    serial = [detector.detect(frame) for frame in frames]
    assert list(detector.engine._compiled) == [detector.engine.hint]
    streamed = list(detector.stream(frames, depth=2))
    assert list(detector.engine._compiled) == [STREAM_HINT]  # detect()'s model dropped, not kept beside it
    assert all(same(a, b) for a, b in zip(serial, streamed)) and len(streamed) == len(frames)
    again = [detector.detect(frame) for frame in frames]  # recompiled on demand, same results
    assert list(detector.engine._compiled) == [detector.engine.hint]
    assert all(same(a, b) for a, b in zip(serial, again))
    one_at_a_time = list(detector.stream(frames, depth=1))  # nothing to overlap: detect()'s model, kept
    assert list(detector.engine._compiled) == [detector.engine.hint]
    assert all(same(a, b) for a, b in zip(serial, one_at_a_time))


def test_early_stop_leaves_no_thread(cpu_fp32_bundle, frames):
    detector = load(cpu_fp32_bundle)

    def endless():
        while True:
            yield from frames

    results = detector.stream(endless(), depth=3)
    for _ in range(4):
        next(results)
    assert stream_threads()
    results.close()
    assert stream_threads() == []


def test_bad_depth_is_refused_at_once(cpu_fp32_bundle):
    with pytest.raises(EdgeYoloError, match="depth"):
        load(cpu_fp32_bundle).stream([], depth=0)


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    depth, pulled, done, lock = 3, [0], [0], threading.Lock()
    running, most = [0], [0]

    def source():
        for i in range(40):
            pulled[0] += 1
            assert pulled[0] - done[0] <= depth, "read a frame while depth were already in flight"
            yield i

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(random.Random(i).uniform(0, 0.004))
        with lock:
            running[0] -= 1
        return i * i

    out = []
    for value in ordered_map(work, source(), depth):
        done[0] += 1
        out.append(value)
    assert out == [i * i for i in range(40)]
    assert 1 < most[0] <= depth
    assert stream_threads() == []


class FakeQueue:
    """``submit``/``close`` like the OpenVINO queue, finishing requests out of order in a thread pool."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.closed = ThreadPoolExecutor(3, thread_name_prefix="fake-engine"), False

    def submit(self, batch, slot):
        return self.pool.submit(lambda: (time.sleep(random.Random(batch).uniform(0, 0.004)), batch * 10)[1])

    def close(self):
        self.pool.shutdown(wait=True)
        self.closed = True


def test_ordered_async_keeps_order_and_bounds_what_is_in_flight():
    depth, pulled, done, queues = 3, [0], [0], []

    def source():
        for i in range(40):
            pulled[0] += 1
            assert pulled[0] - done[0] <= depth, "read a frame while depth were already in flight"
            yield i

    def open_queue():
        queues.append(FakeQueue())
        return queues[-1]

    slot_owner = {}  # slot -> the item using it, until that item is finished

    def prepare(i, slot):
        assert 0 <= slot < depth and slot not in slot_owner, f"item {i} took slot {slot} still in use"
        slot_owner[slot] = i
        return i, (f"ctx{i}", slot)

    def finish(raw, ctx):
        name, slot = ctx
        del slot_owner[slot]
        return raw, name

    out = []
    for value in ordered_async(prepare, open_queue, finish, source(), depth):
        done[0] += 1
        out.append(value)
    assert out == [(i * 10, f"ctx{i}") for i in range(40)]
    assert len(queues) == 1 and queues[0].closed

    unstarted = ordered_async(lambda i, slot: (i, None), open_queue, lambda raw, ctx: raw, range(3), depth)
    unstarted.close()
    assert len(queues) == 1  # a generator never started opens no queue


def test_a_failing_source_or_frame_stops_cleanly():
    def source():
        yield from range(5)
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError, match="unplugged"):
        list(ordered_map(lambda i: i, source(), 2))
    assert stream_threads() == []

    def work(i):
        if i == 3:
            raise EdgeYoloError("frame 3: not an image")
        return i

    got = []
    with pytest.raises(EdgeYoloError, match="frame 3"):
        for value in ordered_map(work, range(100), 4):
            got.append(value)
    assert got == [0, 1, 2]  # everything before the bad frame, in order
    assert stream_threads() == []


@pytest.mark.parametrize("bundle_fixture", ["cpu_fp32_bundle", "ov_fp32_bundle"])
def test_cli_detect_on_a_folder_is_pipelined_and_identical(bundle_fixture, coco128, tmp_path, request):
    import json
    import shutil

    from click.testing import CliRunner

    from edgeyolo.cli import cli

    cpu_fp32_bundle = request.getfixturevalue(bundle_fixture)

    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((coco128 / "images").glob("*.jpg"))[:7]:
        shutil.copy(path, folder)
    (folder / "000000000026.jpg").write_bytes(b"not a jpeg")  # skipped with a warning, order kept
    runs = {}
    for depth in (1, 4):
        result = CliRunner().invoke(cli, ["detect", str(cpu_fp32_bundle), str(folder), "--json", "--depth", str(depth)])
        assert result.exit_code == 0, result.output
        runs[depth] = json.loads(result.stdout[result.stdout.index("["):])
    names = [r["source"].rsplit("/", 1)[-1] for r in runs[4]]
    assert names == sorted(p.name for p in folder.iterdir() if p.name != "000000000026.jpg")
    assert runs[1] == runs[4] and any(r["detections"] for r in runs[4])
    detector = load(cpu_fp32_bundle)
    expected = [json.loads(json.dumps(detector.detect(r["source"]).to_list())) for r in runs[4]]
    assert [r["detections"] for r in runs[4]] == expected  # what detect() gives, image by image
    assert stream_threads() == []


@pytest.mark.parametrize("bundle_fixture", ["cpu_fp32_bundle", "ov_fp32_bundle"])
def test_bench_throughput_mode_runs_the_stream(bundle_fixture, request, coco128):
    import json

    from click.testing import CliRunner

    from edgeyolo.cli import cli

    bundle = request.getfixturevalue(bundle_fixture)
    args = ["bench", str(bundle), "--iters", "5", "--warmup", "1", "--images", str(coco128 / "images"), "--json"]
    runs = {}
    for mode in ("latency", "throughput"):
        result = CliRunner().invoke(cli, args + ["--mode", mode, "--depth", "2"])
        assert result.exit_code == 0, result.output
        runs[mode] = json.loads(result.stdout[result.stdout.index("{"):])
    assert runs["latency"]["mode"] == "latency" and runs["latency"]["depth"] is None
    assert runs["latency"]["stages_ms"]["inference"]["p50"] > 0
    got = runs["throughput"]
    assert (got["mode"], got["depth"], got["iters"]) == ("throughput", 2, 5) and got["fps"] > 0
    assert got["latency_ms"]["p50"] > 0
    assert stream_threads() == []


def test_benchmark_throughput_counts_every_streamed_frame(cpu_fp32_bundle, images):
    from edgeyolo.bench import benchmark_throughput

    detector = load(cpu_fp32_bundle)
    streamed, stream = [], detector.stream

    def counting(frames, depth):
        for dets in stream(frames, depth=depth):
            streamed.append(depth)
            yield dets

    detector.stream = counting
    result = benchmark_throughput(detector, images, iters=4, warmup=2, depth=3)
    assert streamed == [3] * 6 and result.iters == 4 and result.to_dict()["mode"] == "throughput"


def test_cli_detect_on_a_video_is_pipelined_and_identical(ov_fp32_bundle, images, tmp_path):
    import json

    import cv2
    from click.testing import CliRunner

    from edgeyolo.cli import cli

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 180))
    for i in range(6):
        writer.write(cv2.resize(images[i % 2], (320, 180)))
    writer.release()
    runs = {}
    for depth in (1, 3):
        result = CliRunner().invoke(cli, ["detect", str(ov_fp32_bundle), str(clip), "--json", "--depth", str(depth)])
        assert result.exit_code == 0, result.output
        runs[depth] = json.loads(result.stdout[result.stdout.index("["):])[0]["frames"]
    assert [f["frame"] for f in runs[3]] == list(range(6)) and runs[1] == runs[3]
    assert any(f["detections"] for f in runs[3])
    assert stream_threads() == []


def test_onnxruntime_runs_without_the_memory_pattern(cpu_fp32_bundle, frames):
    """Concurrent runs would each take a whole memory-pattern block from the arena (see session_options)."""
    detector = load(cpu_fp32_bundle)
    assert detector.engine.session.get_session_options().enable_mem_pattern is False
    assert len(list(detector.stream(frames[:4], depth=3))) == 4
