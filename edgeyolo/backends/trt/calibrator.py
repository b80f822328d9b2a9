"""TensorRT's implicit INT8 calibrators (TensorRT < 10.1, e.g. JetPack 5), fed by our calibration set.

TensorRT deprecated these in 10.1 in favour of the explicit Q/DQ ONNX; they remain the
fallback where the explicit path is not the default. ``CalibrationBatches`` is plain numpy
(tested anywhere); ``make_calibrator`` builds the TensorRT subclass on the device.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from ...errors import EdgeYoloError
from ...log import log

# our calibration methods → TensorRT's calibrators (TensorRT has no percentile calibrator:
# its entropy calibrator is the one that clips outliers)
ALGORITHMS = {"entropy": "entropy", "percentile": "entropy", "minmax": "minmax", "mean-minmax": "minmax"}


def algorithm_for(method: str) -> str:
    base = (method or "entropy").replace(",", " ").split()[0]  # "mean-minmax, bias correction" → mean-minmax
    if base not in ALGORITHMS:
        raise EdgeYoloError(f"no TensorRT calibrator for the method {method!r} (known: {', '.join(ALGORITHMS)})")
    if base == "percentile":
        log.warning("TensorRT has no percentile calibrator; calibrating with its entropy calibrator instead")
    return ALGORITHMS[base]


class CalibrationBatches:
    """Full, C-contiguous float32 NCHW batches of the network's input shape, from a ``CalibrationSet``.

    TensorRT's calibrator wants every batch full, so images that do not fill a last batch are left out.
    """

    def __init__(self, calibration, input_shape):
        batch, channels, height, width = (int(d) for d in input_shape)
        if not len(calibration):
            raise EdgeYoloError("the calibration set is empty")
        image_h, image_w = calibration.letterbox.imgsz
        if (image_h, image_w) != (height, width):
            raise EdgeYoloError(f"calibration images are letterboxed to {image_h}x{image_w}, "
                                f"but the network takes {height}x{width}")
        if len(calibration) < batch:
            raise EdgeYoloError(f"{len(calibration)} calibration images cannot fill one batch of {batch}")
        self.calibration = calibration
        self.shape = (batch, channels, height, width)
        self.batch_size = batch
        self.dropped = len(calibration) % batch

    def __len__(self) -> int:
        return len(self.calibration) // self.batch_size

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __iter__(self) -> Iterator[np.ndarray]:
        for index, batch in enumerate(self.calibration.batches("NCHW", self.batch_size)):
            if index == len(self):
                break
            yield np.ascontiguousarray(batch, dtype=np.float32).reshape(self.shape)


class CalibrationFeed:
    """What TensorRT's calibrator callbacks do, in plain Python (tested without TensorRT).

    Two things TensorRT would otherwise hide: it swallows an exception raised in
    ``get_batch`` (logs it, takes it as the end of the data, and builds on a shortened
    calibration), so the first one is kept and re-raised after the build; and when it
    rejects a cached table (another TensorRT, a damaged file) it asks for batches after all,
    so they are loaded then and the table is rewritten, rather than building on none.
    """

    def __init__(self, shape, load_batches: Callable[[], Iterable[np.ndarray]], cache):
        self.shape = tuple(int(d) for d in shape)
        self.batch_size = self.shape[0]
        self.nbytes = int(np.prod(self.shape)) * 4
        self.load_batches, self.cache = load_batches, cache
        self.error: BaseException | None = None
        self.cache_read = False  # TensorRT was handed a cached table
        self.asked = False  # TensorRT asked for batches (no table, or it rejected the table)
        self.seen = 0
        self._batches: Iterator[np.ndarray] | None = None

    def next_batch(self) -> np.ndarray | None:
        """The next batch, or None at the end of the data or after a failure (kept for ``raise_if_failed``)."""
        if self.error is not None:
            return None
        try:
            if self._batches is None:
                self.asked = True
                if self.cache_read:
                    log.warning("TensorRT rejected the calibration cache %s; calibrating again", self.cache.path)
                self._batches = iter(self.load_batches())
            batch = next(self._batches, None)
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if batch.shape != self.shape:
                raise EdgeYoloError(f"calibration batch {self.seen} has shape {batch.shape}, not {self.shape}")
            self.seen += 1
            return batch
        except BaseException as exc:  # noqa: BLE001 - TensorRT would swallow it; re-raised after the build
            self.error = exc
            return None

    def fail(self, exc: BaseException) -> None:
        """Keep an exception raised while handing a batch to TensorRT (the upload)."""
        if self.error is None:
            self.error = exc

    def read_cache(self):
        data = self.cache.read()
        self.cache_read = data is not None
        return data

    def write_cache(self, data) -> None:
        self.cache.write(bytes(data))

    def raise_if_failed(self) -> None:
        """After the build: the calibration's own failure, or a calibration on no data at all, as one line."""
        if isinstance(self.error, (KeyboardInterrupt, SystemExit)):
            raise self.error
        if self.error is not None:
            detail = str(self.error) if isinstance(self.error, EdgeYoloError) else f"{type(self.error).__name__}: {self.error}"
            raise EdgeYoloError(f"INT8 calibration failed after {self.seen} batch(es): {detail}") from self.error
        if self.asked and self.seen == 0:
            raise EdgeYoloError("INT8 calibration got no batches: the calibration set is empty")


def make_calibrator(trt, algorithm: str, feed: CalibrationFeed):
    """A TensorRT ``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator`` over ``feed``.

    ``feed.cache`` (a ``FileCache``) holds TensorRT's calibration table: when TensorRT accepts
    it, calibration is skipped; after calibrating, TensorRT writes it there.
    """
    from .device import DeviceBuffer

    base = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}[algorithm]

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            self.feed = feed
            self._device = DeviceBuffer(feed.nbytes)

        def get_batch_size(self):
            return feed.batch_size

        def get_batch(self, names, *_):
            batch = feed.next_batch()
            if batch is None:
                return None
            try:
                self._device.upload(batch)
            except BaseException as exc:  # noqa: BLE001 - see CalibrationFeed
                feed.fail(exc)
                return None
            return [int(self._device)] * len(names)

        def read_calibration_cache(self, *_):
            return feed.read_cache()

        def write_calibration_cache(self, data, *_):
            feed.write_cache(data)

        def close(self):
            self._device.close()

    return Calibrator()
