"""One ``Detector`` shared by several threads gives exactly the serial results, on every CPU backend."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeyolo.runtime import load, read_image

THREADS, ROUNDS = 4, 2
BUNDLES = ["cpu_fp32_bundle", "cpu_int8_bundle", "ov_fp32_bundle", "ov_int8_bundle", "arm_fp32_bundle",
           "arm_int8_bundle"]
NEEDS = {"ov": "openvino", "arm": "ai_edge_litert"}


@pytest.fixture(scope="module")
def frames(images, coco128) -> list:
    """The two sample images and two coco128 images of other sizes (different letterbox paddings)."""
    extra = sorted((coco128 / "images").glob("*.jpg"))[:2]
    return list(images) + [read_image(p) for p in extra]


def same(a, b) -> bool:
    return (np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.confidence, b.confidence)
            and np.array_equal(a.class_id, b.class_id))


@pytest.mark.parametrize("bundle_fixture", BUNDLES)
def test_threads_share_one_detector(bundle_fixture, frames, request):
    module = NEEDS.get(bundle_fixture.split("_")[0])
    if module:
        pytest.importorskip(module)
    detector = load(request.getfixturevalue(bundle_fixture))
    serial = [detector.detect(frame) for frame in frames]
    assert sum(len(d) for d in serial) > 0
    jobs = [i for _ in range(THREADS * ROUNDS) for i in range(len(frames))]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda i: (i, detector.detect(frames[i])), jobs))
    wrong = [i for i, dets in results if not same(dets, serial[i])]
    assert wrong == [], f"{len(wrong)} of {len(results)} threaded calls differ from the serial result"


def test_stage_times_are_per_thread(cpu_fp32_bundle, frames):
    detector = load(cpu_fp32_bundle)
    detector.detect(frames[0])
    main = detector.last_times

    def other():
        before = detector.last_times.inference  # nothing yet in this thread
        detector.detect(frames[1])
        return before, detector.last_times

    with ThreadPoolExecutor(1) as pool:
        before, times = pool.submit(other).result()
    assert before == 0.0 and times.inference > 0 and detector.last_times is main
