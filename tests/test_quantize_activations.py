"""How activations are quantised: ``[calibration] activations`` and ``placement``.

YOLOv5n at 160x160, a few coco128 images. SiLU outputs lie in [-0.28, max]: a symmetric scale
spends half its steps on negatives that never come, an asymmetric one (each tensor's own uint8
zero point) spends all 256 on the range. ``placement = "tensorrt"`` leaves no Q/DQ between a
convolution and its SiLU (TensorRT fuses them into one INT8 layer).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import small_calibration
from edgeyolo.errors import EdgeYoloError
from edgeyolo.quantize import QuantizeSettings, calibrate_ranges, quantize_onnx, write_qdq

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def graphs(small_onnx, yolov5n_pt, coco128):
    """(float model, symmetric, asymmetric Q/DQ, 12 unseen inputs, inputs-only Q/DQ): one calibration."""
    fitting = small_calibration(yolov5n_pt, coco128, 12)
    other = small_calibration(yolov5n_pt, coco128, 28, seed=1)
    seen = set(fitting.image_hashes)
    unseen = [x for x, h in zip(other.batches("NCHW", 1), other.image_hashes) if h not in seen][:12]
    assert len(unseen) == 12
    symmetric = QuantizeSettings(float_from_stride=0)
    ranges = calibrate_ranges(small_onnx, fitting, symmetric)
    sym, _ = write_qdq(small_onnx, ranges, symmetric)
    asym, _ = write_qdq(small_onnx, ranges, dataclasses.replace(symmetric, activations="asymmetric"))
    trt, _ = write_qdq(small_onnx, ranges, dataclasses.replace(symmetric, placement="tensorrt"))
    return onnx.load(str(small_onnx)), sym, asym, unseen, trt


def _zero_points(model) -> dict:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _outputs(model, inputs, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, {"images": x}) for x in inputs]


def test_asymmetric_graph_has_each_tensors_zero_point_and_less_error(graphs):
    reference, sym, asym, unseen, _ = graphs
    assert [n.op_type for n in asym.graph.node] == [n.op_type for n in sym.graph.node]  # same placement
    sym_zero, asym_zero = _zero_points(sym), _zero_points(asym)
    assert set(sym_zero) == set(asym_zero)
    assert all(z.dtype == np.uint8 and int(z) == 128 for z in sym_zero.values())
    assert all(z.dtype == np.uint8 for z in asym_zero.values())
    producers = {o: n.op_type for n in asym.graph.node for o in n.output}
    silu_outputs = [t for t in asym_zero if producers.get(t) == "Mul"]
    assert len(silu_outputs) > 20
    # a SiLU output's range is [-0.28, max]: its zero point sits near the bottom of uint8
    assert all(int(asym_zero[t]) < 64 for t in silu_outputs)
    want = _outputs(reference, unseen)
    error = {name: float(np.mean([np.mean((a - b) ** 2) for got, ref in zip(_outputs(m, unseen), want)
                                  for a, b in zip(got, ref)])) for name, m in (("sym", sym), ("asym", asym))}
    assert error["asym"] < 0.7 * error["sym"], error


def test_fake_quantiser_computes_onnxruntimes_qdq_for_each_zero_point(graphs):
    """The torch quantiser (re-fit, QAT) rounds as ONNX Runtime's QuantizeLinear→DequantizeLinear does, for
    every asymmetric pair, fed ONNX Runtime's own float input (a whole-graph comparison would mostly
    measure where float accumulation order tips a value across a rounding boundary)."""
    from edgeyolo.optimize.qat.fakequant import ActivationQuantizer
    from edgeyolo.quantize import onnx_with_outputs

    _, _, asym, unseen, _ = graphs
    inits = {i.name: numpy_helper.to_array(i) for i in asym.graph.initializer}
    dq_of = {n.input[0]: n.output[0] for n in asym.graph.node if n.op_type == "DequantizeLinear"}
    pairs = [(n.input[0], dq_of[n.output[0]], float(inits[n.input[1]]), int(inits[n.input[2]]))
             for n in asym.graph.node if n.op_type == "QuantizeLinear"]
    names = sorted({x for x, _, _, _ in pairs} | {d for _, d, _, _ in pairs} - {"images"})
    values = dict(zip(names, _outputs(onnx_with_outputs(asym, names), unseen[:1], optimize=False)[0][1:]))
    values["images"] = unseen[0]
    checked = 0
    for x, dq, scale, zero in pairs:
        mine = ActivationQuantizer(scale, learnable=False, zero_point=zero)(torch.from_numpy(values[x])).numpy()
        assert np.abs(mine - values[dq]).max() <= 1e-3 * scale, (x, zero)
        checked += zero != 128
    assert checked > 20


def test_asymmetric_build_records_it_and_refits(small_onnx, yolov5n_pt, coco128, tmp_path):
    fitting = small_calibration(yolov5n_pt, coco128, 4)
    settings = QuantizeSettings(float_from_stride=0, refit=True, activations="asymmetric")
    facts = quantize_onnx(small_onnx, tmp_path / "asym.qdq.onnx", fitting, settings)
    assert "asymmetric" in facts["activations"] and "asymmetric" in settings.describe()
    before, after = facts["refit"]["mean_relative_error"]
    assert after < before
    assert any(int(z) != 128 for z in _zero_points(onnx.load(str(tmp_path / "asym.qdq.onnx"))).values())


def test_tensorrt_refuses_asymmetric_activations(graphs, tmp_path):
    from edgeyolo.backends.trt.encoding import to_tensorrt_encoding
    from edgeyolo.targets import load_target

    _, sym, asym, _, _ = graphs
    assert to_tensorrt_encoding(onnx.ModelProto.FromString(sym.SerializeToString()))["int8_zero_points"] > 0
    with pytest.raises(EdgeYoloError, match="asymmetric"):
        to_tensorrt_encoding(onnx.ModelProto.FromString(asym.SerializeToString()))
    path = tmp_path / "own-trt-int8.toml"
    path.write_text('backend = "tensorrt"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nactivations = "asymmetric"\n')
    with pytest.raises(EdgeYoloError, match="symmetric"):
        load_target(str(path))
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nactivations = "asymmetric"\n')
    assert QuantizeSettings.from_target(load_target(str(path))).activations == "asymmetric"
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nactivations = "affine"\n')
    with pytest.raises(EdgeYoloError, match="activations"):
        load_target(str(path))
    with pytest.raises(EdgeYoloError, match="activations"):
        QuantizeSettings(activations="unsigned")


def test_tensorrt_placement_quantises_layer_inputs_only(graphs):
    from edgeyolo.backends.trt.encoding import to_tensorrt_encoding
    from edgeyolo.optimize.qat.graph import QdqGraph

    reference, sym, _, unseen, trt = graphs
    readers: dict = {}
    for node in reference.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    silus = [n for n in reference.graph.node if n.op_type == "Conv"
             and sorted(r.op_type for r in readers.get(n.output[0], ())) == ["Mul", "Sigmoid"]]
    assert len(silus) > 50
    inside = {n.output[0] for n in silus} | {r.output[0] for n in silus for r in readers[n.output[0]]
                                             if r.op_type == "Sigmoid"}
    quantised = {n.input[0] for n in trt.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantised & inside
    assert quantised == {n.input[0] for n in sym.graph.node if n.op_type == "QuantizeLinear"} - inside
    assert {r.output[0] for n in silus for r in readers[n.output[0]] if r.op_type == "Mul"} <= quantised
    assert "layer inputs only" in QuantizeSettings(placement="tensorrt").describe()
    with pytest.raises(EdgeYoloError, match="placement"):
        QuantizeSettings(placement="everywhere")
    # the torch graph the re-fit and QAT train runs it; TensorRT's encoding takes it
    with torch.no_grad():
        out = QdqGraph(trt, reference, trainable=False)(torch.from_numpy(unseen[0]))["output0"].numpy()
    want = _outputs(reference, unseen[:1])[0][0]
    deployed = _outputs(trt, unseen[:1], optimize=False)[0][0]
    assert 0 < np.abs(out - want).mean() < 2 * np.abs(deployed - want).mean()
    assert to_tensorrt_encoding(onnx.ModelProto.FromString(trt.SerializeToString()))["int8_zero_points"] > 0
