"""The TensorRT backend's parts, one concern each.

- ``device``: the GPU through cuda-python (facts, memory, streams, buffers);
- ``cache``: compiled engines and calibration caches, keyed by TensorRT version, GPU and source;
- ``options``: the target's ``[tensorrt]`` table and what follows from it (workspace, INT8 mode);
- ``calibrator``: calibration batches for TensorRT's implicit INT8 calibrators (TensorRT < 10.1);
- ``builder``: ONNX → serialized engine (needs TensorRT and a GPU);
- ``runner``: a deserialized engine run with the TensorRT 10 tensor-address API.

Only ``builder``, ``runner`` and ``calibrator.make_calibrator`` touch TensorRT, and only
inside functions, so everything else imports and is tested on machines without it.
"""
