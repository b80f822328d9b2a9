"""Least-squares weight re-fit of the Q/DQ graph (YOLOv5n at 160x160, a few coco128 images)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from conftest import small_calibration
from edgeyolo.errors import EdgeYoloError
from edgeyolo.quantize import QuantizeSettings, calibrate_ranges, correct_biases, quantize_onnx, write_qdq

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fitting_images(yolov5n_pt, coco128):
    return small_calibration(yolov5n_pt, coco128, 16)


@pytest.fixture(scope="module")
def unseen_inputs(yolov5n_pt, coco128, fitting_images):
    """coco128 images the re-fit never saw (a different seeded draw, minus the fitting ones)."""
    other = small_calibration(yolov5n_pt, coco128, 48, seed=1)
    seen = set(fitting_images.image_hashes)
    inputs = [x for x, h in zip(other.batches("NCHW", 1), other.image_hashes) if h not in seen]
    assert len(inputs) >= 16
    return inputs[:16]


def _head_error(model, reference, inputs) -> float:
    """Mean squared difference of every head output between ``model`` and the FP32 ``reference``."""
    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return [session.run(None, {"images": x}) for x in inputs]

    return float(np.mean([np.mean((a - b) ** 2) for got, want in zip(run(model), run(reference))
                          for a, b in zip(got, want)]))


def test_refit_brings_the_int8_graph_closer_to_fp32_on_unseen_images(small_onnx, fitting_images, unseen_inputs,
                                                                      tmp_path):
    settings = QuantizeSettings(method="mean-minmax", float_from_stride=0, bias_correction=True)
    reference = onnx.load(str(small_onnx))
    ranges = calibrate_ranges(small_onnx, fitting_images, settings)
    corrected, _ = write_qdq(small_onnx, ranges, settings)
    correct_biases(corrected, small_onnx, fitting_images)
    refit_dst = tmp_path / "refit.qdq.onnx"
    facts = quantize_onnx(small_onnx, refit_dst, fitting_images, dataclasses.replace(settings, refit=True))
    refit = onnx.load(str(refit_dst))
    assert facts["refit"]["convs"] == sum(1 for n in reference.graph.node if n.op_type == "Conv")
    before, after = facts["refit"]["mean_relative_error"]
    assert after < before
    assert facts["bias_corrected_convs"] == 0  # the re-fit solves the biases itself
    # the written graph is the fitted one (same placement, new weights), and it generalises
    assert [n.op_type for n in refit.graph.node] == [n.op_type for n in corrected.graph.node]
    error_corrected = _head_error(corrected, reference, unseen_inputs)
    error_refit = _head_error(refit, reference, unseen_inputs)
    assert error_refit < 0.95 * error_corrected, (error_corrected, error_refit)


def test_refit_recovers_perturbed_float_weights_exactly(small_onnx, fitting_images):
    """On the float graph (nothing quantised) the solve has an exact answer: the teacher's own weights.
    A student with every convolution perturbed comes back to the teacher's outputs; this checks the
    plumbing (sampled positions of teacher and student aligned, im2col geometry, the bias solve)."""
    from edgeyolo.optimize.qat.graph import QdqGraph
    from edgeyolo.optimize.qat.refit import CHUNK, refit

    model = onnx.load(str(small_onnx))
    teacher = QdqGraph(model, model, trainable=False)
    student = QdqGraph(model, model, trainable=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in student.weights.values():
            weight.mul_(1 + 0.2 * torch.randn(weight.shape, generator=generator))
    chunks = [torch.from_numpy(b) for b in fitting_images.batches("NCHW", CHUNK)]
    x = chunks[0][:2]
    with torch.no_grad():
        want = teacher(x)
        wrong = student(x)
    report = refit(student, teacher, chunks, ridge=1e-7)
    with torch.no_grad():
        got = student(x)
    for name in want:
        scale = float(want[name].abs().mean())
        assert float((wrong[name] - want[name]).abs().mean()) > 1e-2 * scale
        assert float((got[name] - want[name]).abs().mean()) < 1e-3 * scale, name
    assert max(after for _, after in report.errors.values()) < 1e-4


def test_refit_settings_and_target_keys(tmp_path):
    from edgeyolo.targets import load_target

    assert "weight re-fit (ridge 1)" in QuantizeSettings(refit=True).describe()
    assert QuantizeSettings().refit is False  # a target without the key keeps its graph
    with pytest.raises(EdgeYoloError, match="refit_ridge"):
        QuantizeSettings(refit=True, refit_ridge=-1.0)
    with pytest.raises(EdgeYoloError, match="refit must be"):
        QuantizeSettings(refit="yes")
    path = tmp_path / "own-int8.toml"
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nrefit = true\nrefit_ridge = 0.1\n')
    assert QuantizeSettings.from_target(load_target(str(path))).refit_ridge == 0.1
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n[calibration]\nrefit = "on"\n')
    with pytest.raises(EdgeYoloError, match="refit"):
        load_target(str(path))


def test_sensitivity_ranks_on_the_refit_graph(small_onnx, fitting_images, unseen_inputs):
    """With ``refit`` in the settings, the sweep measures the re-fit graph (re-fit once, every variant from it)."""
    from edgeyolo.sensitivity import qdq_sensitivity

    settings = QuantizeSettings(method="mean-minmax", float_from_stride=0)
    inputs, candidates = unseen_inputs[:4], ["model.0", "model.9"]
    plain = qdq_sensitivity(small_onnx, fitting_images, inputs, settings, candidates)
    refit = qdq_sensitivity(small_onnx, fitting_images, inputs, dataclasses.replace(settings, refit=True), candidates)
    assert "re-fit" in refit.settings["method"]
    assert sorted(s.layer for s in refit.scores) == candidates
    assert refit.baseline_error != plain.baseline_error


def test_a_second_identical_build_reuses_the_refit(small_onnx, fitting_images, tmp_path, monkeypatch):
    """cpu-int8 then jetson-int8 from one model in one process: the re-fit is solved once."""
    import edgeyolo.optimize.qat.refit as refit_module

    settings = QuantizeSettings(method="mean-minmax", float_from_stride=0, refit=True)
    first = quantize_onnx(small_onnx, tmp_path / "a.onnx", fitting_images, settings)

    def fail(*args, **kwargs):
        raise AssertionError("the re-fit ran again")

    monkeypatch.setattr(refit_module, "refit_onnx", fail)
    second = quantize_onnx(small_onnx, tmp_path / "b.onnx", fitting_images, settings)
    assert second["refit"] == first["refit"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    with pytest.raises(AssertionError, match="ran again"):  # another ridge is another re-fit
        quantize_onnx(small_onnx, tmp_path / "c.onnx", fitting_images, dataclasses.replace(settings, refit_ridge=2.0))


def test_weighted_solve_matches_a_direct_solve_per_channel():
    """The conjugate-gradient solve of the activation-weighted re-fit against each channel's own
    weighted normal equations, solved directly."""
    from edgeyolo.optimize.qat.refit import weighted_solve
    from edgeyolo.optimize.reconstruct import _solve

    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(500, 7, generator=generator), torch.ones(500, 1)], 1)
    y = rows @ torch.randn(8, 3, generator=generator) + 0.3 * torch.randn(500, 3, generator=generator)
    v = torch.rand(500, 3, generator=generator) ** 4  # far from uniform: most rows nearly ignored
    gram, prior, ridge = (rows.T @ rows).double(), torch.randn(8, 3, generator=generator).double(), 0.05
    start = _solve(gram, (rows.T @ y).double(), prior, ridge)
    got = weighted_solve(rows, y, v, gram, prior, start, ridge, iterations=12)
    lam = ridge * float(torch.diagonal(gram).mean())
    for c in range(3):
        a, w = rows.double(), v[:, c].double()
        mass = float(w.mean())
        want = torch.linalg.solve(a.T @ (w[:, None] * a) + lam * mass * torch.eye(8, dtype=torch.float64),
                                  a.T @ (w * y[:, c].double()) + lam * mass * prior[:, c])
        assert torch.allclose(got[:, c], want, rtol=1e-4, atol=1e-4), c
        assert not torch.allclose(start[:, c], want, rtol=1e-2, atol=1e-2)  # the weighting changed the answer


def test_activation_weighted_refit(small_onnx, fitting_images, tmp_path):
    """``refit_weighting = "activation"``: SiLU and the head's sigmoid are found behind their
    convolutions, the weighted fit lowers the weighted error, and the manifest facts say which fit ran."""
    from edgeyolo.optimize.qat.graph import QdqGraph
    from edgeyolo.optimize.qat.refit import _activations
    from edgeyolo.targets import load_target

    model = onnx.load(str(small_onnx))
    found = _activations(QdqGraph(model, model, trainable=False))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert sorted(set(found.values())) == ["sigmoid", "silu"]
    assert [name for name in convs if found[name] == "sigmoid"] == [name for name in convs if "model.24" in name]
    assert len(found) == len(convs)
    settings = QuantizeSettings(method="mean-minmax", float_from_stride=0, refit=True, refit_weighting="activation")
    facts = quantize_onnx(small_onnx, tmp_path / "w.onnx", fitting_images, settings)
    before, after = facts["refit"]["mean_relative_error"]
    assert after < before and facts["refit"]["weighting"] == "activation"
    assert "activation-weighted" in settings.describe()
    with pytest.raises(EdgeYoloError, match="refit_weighting"):
        QuantizeSettings(refit=True, refit_weighting="output")
    path = tmp_path / "own-int8.toml"
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nrefit = true\nrefit_weighting = "activation"\n')
    assert QuantizeSettings.from_target(load_target(str(path))).refit_weighting == "activation"
    path.write_text('backend = "onnxruntime"\nprecision = "int8"\nhead = "sigmoid"\n'
                    '[calibration]\nrefit = true\nrefit_weighting = "post"\n')
    with pytest.raises(EdgeYoloError, match="refit_weighting"):
        load_target(str(path))
