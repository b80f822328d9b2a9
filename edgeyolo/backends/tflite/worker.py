"""The converter process: onnx2tf (ONNX → SavedModel → float TFLite), then full-integer quantisation.

``convert.build`` runs ``python -m edgeyolo.backends.tflite.worker job.json`` inside its work folder,
so tensorflow never loads into the caller (nor next to torch), its output is captured whole
as the converter log, and nothing onnx2tf writes lands outside that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np

FAILURE_MARK = "edgeyolo-tflite-failed:"
SAVED_MODEL = "saved_model"
STRUCTURE_BATCHES = 4
FLOAT_SUFFIXES = {"fp32": "float32", "fp16": "float16"}  # onnx2tf writes <stem>_float32.tflite and _float16


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import onnx2tf

    onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=SAVED_MODEL, not_use_onnxsim=True,
                    verbosity="info")
    stem = Path(job["onnx"]).stem
    if job["precision"] == "int8":
        Path(job["engine"]).write_bytes(quantize_full_integer(SAVED_MODEL, job))
        return
    shutil.copyfile(Path(SAVED_MODEL) / f"{stem}_{FLOAT_SUFFIXES[job['precision']]}.tflite", job["engine"])
    for precision, path in job.get("float_engines", {}).items():  # one conversion writes both float models
        shutil.copyfile(Path(SAVED_MODEL) / f"{stem}_{FLOAT_SUFFIXES[precision]}.tflite", path)


def quantize_full_integer(saved_model: str, job: dict) -> bytes:
    """Int8 weights (per channel) and activations everywhere, calibrated on the job's letterboxed images.

    TFLite's own calibrator keeps each activation's min and max over the whole set, so one outlier
    image sets the int8 step for every image; we use the mean over images of each image's min and
    max instead (a robust range, as OpenVINO's default), which halves the accuracy lost to int8 here.
    """
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # The calibrator's pass only lays out which tensors get ranges; all of them are measured again below.
    converter.representative_dataset = lambda: calibration_inputs(job, limit=STRUCTURE_BATCHES)
    converter._experimental_calibrate_only = True
    calibrated = set_mean_ranges(converter.convert(), calibration_inputs(job))
    io_dtype = {"int8": tf.int8, "float32": tf.float32}[job["io_dtype"]]
    return mlir_quantize(calibrated, fully_quantize=True, input_data_type=io_dtype, output_data_type=io_dtype)


def calibration_inputs(job: dict, limit: int | None = None):
    """The calibration batches as float32 NHWC; ``/ 255`` restores exactly the runtime's inputs."""
    images = np.load(job["calibration"], mmap_mode="r")
    batch = int(job["batch"])
    for count, start in enumerate(range(0, len(images) - batch + 1, batch)):
        if limit is not None and count == limit:
            return
        yield [np.asarray(images[start:start + batch], dtype=np.float32) / np.float32(255.0)]


def set_mean_ranges(calibrated: bytes, inputs) -> bytes:
    """Replace each activation range of a calibrated model by the mean of its per-batch min and max."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    tensors = model.subgraphs[0].tensors
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                              num_threads=os.cpu_count() or 1)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    ranged = [i for i, t in enumerate(tensors)
              if i != input_index and t.quantization is not None and t.quantization.min is not None
              and len(t.quantization.min) == 1]
    lows, highs = np.zeros(len(ranged)), np.zeros(len(ranged))
    batches = 0
    for (batch,) in inputs:
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        for k, i in enumerate(ranged):
            values = interpreter.get_tensor(i)
            lows[k] += values.min()
            highs[k] += values.max()
        batches += 1
    print(f"edgeyolo: mean ranges of {len(ranged)} activations over {batches} calibration batches", flush=True)
    for k, i in enumerate(ranged):
        tensors[i].quantization.min = np.array([min(lows[k] / batches, 0.0)], dtype=np.float32)
        tensors[i].quantization.max = np.array([max(highs[k] / batches, 0.0)], dtype=np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def run(job_path: str) -> int:
    """``main`` with every failure turned into a marked last line that the parent reads as the reason."""
    try:
        main(job_path)
    except SystemExit as exc:  # onnx2tf prints an ERROR line, then exits
        if exc.code not in (0, None):
            print(f"{FAILURE_MARK} onnx2tf stopped (exit status {exc.code})", flush=True)
            return 1
    except BaseException as exc:  # noqa: BLE001 - any converter failure becomes one reported line
        traceback.print_exc(file=sys.stdout)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{FAILURE_MARK} {type(exc).__name__}: {message}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
