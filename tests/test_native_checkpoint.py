"""Our safetensors checkpoint: exact round trips (pruned widths, swapped activations), training state
for resume, every weights-taking command accepting it, and hostile files refused in one line."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_model, save_model
from edgeyolo.model.native import NativeCheckpoint
from edgeyolo.train.checkpoint import (
    load_training_state,
    paths_for,
    save_training_state,
)


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_model(yolov5n_pt).model


@pytest.fixture(scope="module")
def saved(yolov5n, tmp_path_factory):
    return save_model(yolov5n, tmp_path_factory.mktemp("native") / "yolov5n.safetensors", epoch=7,
                      metrics={"mAP50-95": 0.2448}, hyp={"lr0": 0.01}, data={"train": "ab" * 32},
                      meta={"note": "test"})


def _outputs(model, seed=0):
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_is_bit_exact(yolov5n, saved):
    loaded = load_model(saved)
    assert isinstance(loaded, NativeCheckpoint)
    assert torch.equal(_outputs(loaded.model), _outputs(yolov5n))
    assert loaded.names == yolov5n.names and loaded.original_dtype == "float32"
    d = loaded.description
    assert (d["epoch"], d["metrics"], d["hyp"], d["meta"]) == (7, {"mAP50-95": 0.2448}, {"lr0": 0.01}, {"note": "test"})
    assert d["strides"] == [8, 16, 32] and d["activation"] == "SiLU"
    assert all(abs(m.eps - 1e-3) < 1e-12 for m in loaded.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_detected_by_content_without_the_suffix(saved, tmp_path):
    plain = tmp_path / "weights.bin"
    plain.write_bytes(saved.read_bytes())
    assert isinstance(load_model(plain), NativeCheckpoint)


def _narrow_out(conv_block, keep: int) -> None:
    """Keep the first ``keep`` output channels of a Conv block (conv + BatchNorm)."""
    conv, bn = conv_block.conv, conv_block.bn
    new = nn.Conv2d(conv.in_channels, keep, conv.kernel_size, conv.stride, conv.padding, bias=False)
    new.weight.data = conv.weight.data[:keep].clone()
    conv_block.conv = new
    new_bn = nn.BatchNorm2d(keep, eps=bn.eps, momentum=bn.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new_bn, name).data = getattr(bn, name).data[:keep].clone()
    conv_block.bn = new_bn


def _narrow_in(conv: nn.Conv2d, keep_index: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(len(keep_index), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    new.weight.data = conv.weight.data[:, keep_index].clone()
    if conv.bias is not None:
        new.bias.data = conv.bias.data.clone()
    return new


@pytest.fixture(scope="module")
def pruned(yolov5n):
    """yolov5n narrowed by hand in three places, as a channel pruner would (widths differ from the yaml)."""
    model = copy.deepcopy(yolov5n)
    c3 = model.model[2]  # a bottleneck's hidden width 16 -> 10
    _narrow_out(c3.m[0].cv1, 10)
    c3.m[0].cv2.conv = _narrow_in(c3.m[0].cv2.conv, torch.arange(10))
    _narrow_out(c3.cv2, 12)  # the C3 shortcut branch 16 -> 12: cv3 reads cat(16, 12)
    c3.cv3.conv = _narrow_in(c3.cv3.conv, torch.arange(28))
    last = model.model[23]  # the P5 output 64 -> 48, read by Detect
    _narrow_out(last.cv3, 48)
    model.detect.m[2] = _narrow_in(model.detect.m[2], torch.arange(48))
    return model


def test_pruned_widths_round_trip(pruned, yolov5n, tmp_path):
    assert not torch.equal(_outputs(pruned), _outputs(yolov5n))
    loaded = load_model(save_model(pruned, tmp_path / "pruned")).model
    assert loaded.model[2].m[0].cv1.conv.out_channels == 10 and loaded.detect.m[2].in_channels == 48
    assert loaded.model[2].cv3.conv.in_channels == 28
    assert torch.equal(_outputs(loaded), _outputs(pruned))


def test_activations_and_batchnorm_settings_round_trip(yolov5n, tmp_path):
    model = copy.deepcopy(yolov5n)
    for module in model.modules():
        if hasattr(module, "act"):
            module.act = nn.ReLU()
    model.model[4].cv1.act = nn.LeakyReLU(0.1)
    model.model[5].bn.eps = 1e-5
    loaded = load_model(save_model(model, tmp_path / "relu.safetensors"))
    assert loaded.description["activation"] == "ReLU"
    assert loaded.description["activation_overrides"] == {"model.4.cv1": "LeakyReLU(0.1)"}
    got = loaded.model
    assert isinstance(got.model[0].act, nn.ReLU) and got.model[4].cv1.act.negative_slope == 0.1
    assert got.model[5].bn.eps == 1e-5
    assert torch.equal(_outputs(got), _outputs(model))
    assert not torch.equal(_outputs(got), _outputs(yolov5n))


# ---------------------------------------------------------------- training state (resume)

@pytest.mark.parametrize("optim", ["SGD", "AdamW"])
def test_training_state_round_trip(yolov5n, tmp_path, optim):
    model = copy.deepcopy(yolov5n).train()
    ema = copy.deepcopy(yolov5n).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True) \
        if optim == "SGD" else torch.optim.AdamW(model.parameters(), lr=0.001, betas=(0.937, 0.999))
    sum(p.sum() for p in model(torch.rand(1, 3, 64, 64))).backward()
    opt.step()
    model_file, state_file = save_training_state(
        tmp_path / "last", model=model, ema=ema, optimizer=opt, epoch=4, best_fitness=0.31, ema_updates=99,
        hyp={"lr0": 0.01}, metrics={"mAP50": 0.4}, extra={"scheduler": {"last_epoch": 4}})
    assert (model_file, state_file) == paths_for(tmp_path / "last")
    assert isinstance(load_model(model_file), NativeCheckpoint)  # the deployable half is a plain checkpoint

    state = load_training_state(state_file)
    assert (state.epoch, state.best_fitness, state.ema_updates, state.extra, state.hyp) == (
        4, 0.31, 99, {"scheduler": {"last_epoch": 4}}, {"lr0": 0.01})
    model2, ema2 = copy.deepcopy(state.checkpoint.model), copy.deepcopy(state.checkpoint.model)
    opt2 = type(opt)(model2.parameters(), lr=0.5)
    state.apply(model2, ema=ema2, optimizer=opt2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(_outputs(ema2), _outputs(ema))
    saved_opt, restored = opt.state_dict(), opt2.state_dict()
    assert saved_opt["param_groups"] == restored["param_groups"]
    for index, values in saved_opt["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][index][key]))


def test_training_state_refuses_other_runs_and_models(yolov5n, pruned, tmp_path):
    opt = torch.optim.SGD(yolov5n.parameters(), lr=0.01, momentum=0.9)
    save_training_state(tmp_path / "a", model=yolov5n, optimizer=opt, epoch=1)
    save_training_state(tmp_path / "b", model=yolov5n, optimizer=opt, epoch=2)
    (tmp_path / "a.state.safetensors").write_bytes((tmp_path / "b.state.safetensors").read_bytes())
    with pytest.raises(EdgeYoloError, match="belongs to another"):
        load_training_state(tmp_path / "a")
    state = load_training_state(tmp_path / "b")
    with pytest.raises(EdgeYoloError, match="another model"):
        state.apply(copy.deepcopy(pruned))


# ---------------------------------------------------------------- hostile files

def _rewrite(src, dst, edit_header=None, data=None):
    """Copy a safetensors file, letting ``edit_header`` change its JSON header (data kept or replaced)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + (raw[8 + n:] if data is None else data))
    return dst


def _drop(name):
    def edit(h):
        info = h.pop(name)
        size = info["data_offsets"][1] - info["data_offsets"][0]
        for other in h.values():  # close the gap the dropped tensor leaves
            if isinstance(other, dict) and "data_offsets" in other and other["data_offsets"][0] >= info["data_offsets"][1]:
                other["data_offsets"] = [o - size for o in other["data_offsets"]]
    return edit


class _Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/edgeyolo-pwned-native",)


@pytest.fixture(scope="module")
def hostile(saved, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    meta = lambda h, f: h["__metadata__"].update(edgeyolo=f(h["__metadata__"]["edgeyolo"]))  # noqa: E731
    files = {
        "bad-json": (_rewrite(saved, d / "bad-json.safetensors", lambda h: meta(h, lambda s: s[:-5])), "not valid JSON"),
        "100gb": (_rewrite(saved, d / "100gb.safetensors", lambda h: h.__setitem__(
            "huge", {"dtype": "F32", "shape": [25_000, 1_000_000], "data_offsets": [0, 100_000_000_000]})), "GB of tensors"),
        "dtype": (_rewrite(saved, d / "dtype.safetensors", lambda h: h["model.0.conv.weight"].update(dtype="F8_E4M3")),
                  "unsupported dtype"),
        "int-weights": (_rewrite(saved, d / "int-weights.safetensors", lambda h: h["model.0.conv.weight"].update(
            dtype="I32")), "the model needs torch.float32"),
        "missing": (_rewrite(saved, d / "missing.safetensors", _drop("model.24.anchors"), data=None), "missing"),
        "extra": (_rewrite(saved, d / "extra.safetensors", lambda h: h.__setitem__(
            "evil.weight", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})), "unexpected tensor"),
        "layer": (_rewrite(saved, d / "layer.safetensors", lambda h: meta(
            h, lambda s: s.replace('"SPPF"', '"os.system"'))), "unsupported module"),
        "truncated": (d / "truncated.safetensors", "truncated"),
        "pickle": (d / "pickle.safetensors", "not a safetensors file"),
    }
    files["truncated"][0].write_bytes(saved.read_bytes()[:-100])
    torch.save({"model": _Evil()}, files["pickle"][0])
    return files


CASES = ["bad-json", "100gb", "dtype", "int-weights", "missing", "extra", "layer", "truncated", "pickle"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_is_one_line_exit_2(hostile, case):
    from edgeyolo.cli import cli

    path, message = hostile[case]
    result = CliRunner().invoke(cli, ["export", str(path), "-o", str(path.with_suffix(".onnx"))])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(path.name) in lines[0], result.output
    assert not path.with_suffix(".onnx").exists()


def test_disguised_pickle_runs_nothing_in_a_real_process(hostile):
    path = hostile["pickle"][0]
    result = subprocess.run([sys.executable, "-m", "edgeyolo.cli", "export", str(path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr
    assert not os.path.exists("/tmp/edgeyolo-pwned-native")


# ---------------------------------------------------------------- every weights-taking command

@pytest.mark.slow
def test_commands_accept_a_native_checkpoint(saved, cpu_fp32_bundle, coco128, tmp_path):
    """export, build and eval (weights → cached bundle) through the real CLI, mAP equal to the .pt's."""
    env = {**os.environ, "COLUMNS": "200", "EDGEYOLO_CACHE": str(tmp_path / "cache")}

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "edgeyolo.cli", *map(str, args)], capture_output=True,
                                text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("export", saved, "--imgsz", 320, "-o", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000
    run("build", saved, "--target", "cpu-fp32", "--imgsz", 320, "-o", tmp_path / "bundle")
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    ours = json.loads(run("eval", saved, "--data", coco128, "--limit", 8, "--json"))
    reference = json.loads(run("eval", cpu_fp32_bundle, "--data", coco128, "--limit", 8, "--json"))
    assert ours["map50_95"] == pytest.approx(reference["map50_95"], abs=1e-6) and ours["map50_95"] > 0.1
