"""TensorRT's implicit INT8 calibrators (TensorRT < 10.1, e.g. JetPack 5), fed by our calibration set.

TensorRT deprecated these in 10.1 in favour of the explicit Q/DQ ONNX; they remain the
fallback where the explicit path is not the default. ``CalibrationBatches`` is plain numpy
(tested anywhere); ``make_calibrator`` builds the TensorRT subclass on the device.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ...errors import EdgeYoloError
from ...log import log

# our calibration methods → TensorRT's calibrators (TensorRT has no percentile calibrator:
# its entropy calibrator is the one that clips outliers)
ALGORITHMS = {"entropy": "entropy", "percentile": "entropy", "minmax": "minmax", "mean-minmax": "minmax"}


def algorithm_for(method: str) -> str:
    base = (method or "entropy").split()[0]
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


def make_calibrator(trt, algorithm: str, batches: CalibrationBatches, cache):
    """A TensorRT ``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator`` over ``batches``.

    ``cache`` (a ``FileCache``) holds TensorRT's calibration table: when present, TensorRT
    reads it and skips calibration; after calibrating, TensorRT writes it there.
    """
    from .device import DeviceBuffer

    base = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}[algorithm]

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            self._batches = iter(batches)
            self._device = DeviceBuffer(batches.nbytes)
            self.seen = 0

        def get_batch_size(self):
            return batches.batch_size

        def get_batch(self, names, *_):
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._device.upload(batch)
            self.seen += 1
            return [int(self._device)] * len(names)

        def read_calibration_cache(self, *_):
            return cache.read()

        def write_calibration_cache(self, data, *_):
            cache.write(bytes(data))

        def close(self):
            self._device.close()

    return Calibrator()
