"""A deserialized engine run with TensorRT's tensor-address API (``execute_async_v3``).

Inputs and outputs live in pinned host memory and GPU buffers allocated once (again only
when a dynamic batch grows); every call is copy in → enqueue → copy out on the runner's
own CUDA stream, then one synchronisation.
"""

from __future__ import annotations

import numpy as np

from ...errors import EdgeYoloError
from .builder import check_version, trt_logger
from .device import DeviceBuffer, PinnedArray, Stream


class _Binding:
    def __init__(self, name: str, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.host = PinnedArray(self.shape, self.dtype)
        self.device = DeviceBuffer(self.host.array.nbytes)

    @property
    def nbytes(self) -> int:
        return self.host.array.nbytes

    def close(self) -> None:
        self.host.close()
        self.device.close()


class TrtRunner:
    def __init__(self, trt, engine_bytes: bytes, dla_core: int = -1):
        check_version(trt)
        self.trt = trt
        self.runtime = trt.Runtime(trt_logger(trt))
        set_dla_core(self.runtime, dla_core)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EdgeYoloError("TensorRT could not load the engine (built by another TensorRT or for another GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgeYoloError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        if len(self.input_names) != 1 or len(self.output_names) != 1:
            raise EdgeYoloError(f"expected one input and one output, the engine has {self.input_names} / "
                                f"{self.output_names}")
        self.bindings: dict[str, _Binding] = {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        name = self.input_names[0]
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        batch = np.ascontiguousarray(batch, dtype=dtype)
        self._prepare(batch.shape)
        inp = self.bindings[name]
        inp.host.array[...] = batch
        inp.device.upload(inp.host.array, self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise EdgeYoloError("TensorRT failed to run the engine")
        out = self.bindings[self.output_names[0]]
        out.device.download(out.host.array, self.stream)
        self.stream.synchronize()
        return np.array(out.host.array, dtype=np.float32)

    def _prepare(self, shape) -> None:
        """(Re)allocate buffers for this input shape and point the context at them."""
        name = self.input_names[0]
        bound = self.bindings.get(name)
        if bound is not None and bound.shape == tuple(shape):
            return
        if -1 in tuple(self.engine.get_tensor_shape(name)):
            if not self.context.set_input_shape(name, tuple(shape)):
                raise EdgeYoloError(f"the engine takes batches of {self._batch_range(name)}, not {tuple(shape)}")
        elif tuple(self.engine.get_tensor_shape(name)) != tuple(shape):
            raise EdgeYoloError(f"the engine takes {tuple(self.engine.get_tensor_shape(name))}, not {tuple(shape)}")
        for tensor in (name, *self.output_names):
            tensor_shape = tuple(self.context.get_tensor_shape(tensor))
            old = self.bindings.pop(tensor, None)
            if old is not None:
                old.close()
            binding = _Binding(tensor, tensor_shape, self.trt.nptype(self.engine.get_tensor_dtype(tensor)))
            self.bindings[tensor] = binding
            self.context.set_tensor_address(tensor, int(binding.device))

    def _batch_range(self, name: str) -> str:
        """The optimisation profile's batch range, for the error message."""
        try:
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            return f"{low[0]} to {high[0]} (shape {tuple(high)} at most)"
        except Exception:  # noqa: BLE001 - only the message is at stake
            return "the sizes of its optimisation profile"

    def memory(self) -> dict:
        """GPU memory this engine holds: activations (the execution context) and I/O buffers."""
        engine = self.engine
        activations = getattr(engine, "device_memory_size_v2", None)
        if activations is None:
            activations = engine.device_memory_size
        return {"engine_activation_mb": round(int(activations) / 2**20, 1),
                "io_buffers_mb": round(sum(b.nbytes for b in self.bindings.values()) / 2**20, 2)}

    def close(self) -> None:
        for binding in self.bindings.values():
            binding.close()
        self.bindings.clear()
        if getattr(self, "stream", None) is not None:
            self.stream.close()
        self.context = None
        self.engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn CUDA down already
            pass


def set_dla_core(runtime, core: int) -> None:
    """Point the runtime at the DLA core the engine was built for, before deserialising it.

    An engine built for a DLA core otherwise runs on whichever core the runtime defaults to (0).
    """
    if core < 0:
        return
    available = int(getattr(runtime, "num_DLA_cores", 0))
    if core >= available:
        raise EdgeYoloError(f"the engine was built for DLA core {core}, but this device has {available} DLA core(s)")
    runtime.DLA_core = core
