"""The TensorRT backend's parts, one concern each.

- ``device``: the GPU through cuda-python (facts, memory, streams, buffers);
- ``cache``: compiled engines and calibration caches, keyed by TensorRT version, GPU and source;
- ``options``: the target's ``[tensorrt]`` table and what follows from it (workspace, INT8 mode);
- ``calibrator``: calibration batches for TensorRT's implicit INT8 calibrators (TensorRT < 10.1);
- ``typed``: the graph typed in FP16, for strongly typed networks (TensorRT >= 10.12; written at build time);
- ``builder``: ONNX → serialized engine (needs TensorRT and a GPU), the network flags per TensorRT version;
- ``runner``: a deserialized engine run with the TensorRT 10 tensor-address API (on the engine's DLA core);
- ``selfcheck``: one real CUDA round trip (``python3 -m edgeyolo.backends.trt.selfcheck``).

Only ``builder``, ``runner`` and ``calibrator.make_calibrator`` touch TensorRT, and only
inside functions, so everything else imports and is tested on machines without it.
"""
