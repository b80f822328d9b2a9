"""edgeyolo train: data, augmentation, the loop (learns, resumes, survives Ctrl-C), run folder, CLI, DDP."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeyolo.cli import cli
from edgeyolo.errors import EdgeYoloError

ROOT = Path(__file__).resolve().parents[1]
TINY = 128  # training size of the shared tiny run


def _link_subset(src: Path, dest: Path, count: int, offset: int = 0) -> Path:
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for image in sorted((src / "images").glob("*.jpg"))[offset:offset + count]:
        (dest / "images" / image.name).symlink_to(image)
        label = src / "labels" / f"{image.stem}.txt"
        if label.exists():
            (dest / "labels" / label.name).symlink_to(label)
    return dest


@pytest.fixture(scope="session")
def tiny_set(coco128, tmp_path_factory) -> Path:
    """8 coco128 images in YOLO layout (symlinks, nothing copied)."""
    return _link_subset(coco128, tmp_path_factory.mktemp("data") / "tiny8", 8)


def _train(*args) -> "object":
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="session")
def tiny_run(yolov5n_pt, tiny_set, tmp_path_factory) -> Path:
    """One epoch on the 8 images at 128 px, validated on the same 8: shared by several tests."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = _train(yolov5n_pt, "--data", tiny_set, "--val-data", tiny_set, "-o", run, "--epochs", 1, "--imgsz", TINY,
                    "--batch", 4, "--workers", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return run


def _rows(run: Path) -> list[dict]:
    with (run / "results.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- data and augmentation

def test_batches_have_yolov5_layout(tiny_set):
    from edgeyolo.train.augment import Augmenter
    from edgeyolo.train.data import TrainSet, load_train_data, make_loader
    from edgeyolo.train.hyp import load_hyp

    data = load_train_data(tiny_set, val_split=0.25)
    assert len(data.train) == 6 and len(data.val) == 2 and data.held_out
    assert not {s.image for s in data.train.samples} & {s.image for s in data.val.samples}
    train_set = TrainSet(data.train, 96, Augmenter(load_hyp(), 96), nc=80)
    images, targets = next(iter(make_loader(train_set, 3, 0, seed=0)))
    assert images.shape == (3, 3, 96, 96) and images.dtype == torch.uint8
    assert targets.shape[1] == 6 and len(targets)
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2}
    assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()


def test_data_yaml_train_and_val_splits(coco128, tmp_path):
    from edgeyolo.train.data import load_train_data

    root = _link_subset(coco128, tmp_path / "a", 5)
    _link_subset(coco128, tmp_path / "b", 3, offset=5)
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path}\ntrain: a/images\nval: b/images\nnames: {{0: person}}\n")
    data = load_train_data(tmp_path / "data.yaml")
    assert (len(data.train), len(data.val), data.held_out) == (5, 3, None) and "'val' split" in data.val_source
    assert data.train.names == ["person"]
    (tmp_path / "train-only.yaml").write_text(f"path: {root}\ntrain: images\n")
    data = load_train_data(tmp_path / "train-only.yaml", val_split=0.2)
    assert (len(data.train), len(data.val)) == (4, 1) and "held-out" in data.val_source


def test_augment_none_is_the_eval_letterbox(tiny_set):
    """Augmentation off: exactly the runtime's letterbox, boxes mapped to it."""
    from edgeyolo.datasets import load_dataset
    from edgeyolo.runtime.images import read_image
    from edgeyolo.runtime.preprocess import LetterboxSettings, letterbox
    from edgeyolo.train.augment import Augmenter
    from edgeyolo.train.data import TrainSet
    from edgeyolo.train.hyp import load_hyp

    dataset = load_dataset(tiny_set)
    image, labels = TrainSet(dataset, 160, Augmenter(load_hyp(), 160, "none"), nc=80)[0]
    expected, info = letterbox(read_image(dataset.samples[0].image), LetterboxSettings(imgsz=(160, 160)))
    np.testing.assert_array_equal(image.numpy(), expected[:, :, ::-1].transpose(2, 0, 1))
    sample = dataset.samples[0]
    h, w = info.orig_hw
    cx = sample.normalised[:, 0] * w * info.ratio + info.pad[0]
    np.testing.assert_allclose(labels[:, 1].numpy() * 160, cx, atol=1e-3)


def test_augmented_samples_keep_boxes_inside(tiny_set):
    from edgeyolo.datasets import load_dataset
    from edgeyolo.train.augment import Augmenter
    from edgeyolo.train.data import TrainSet
    from edgeyolo.train.hyp import load_hyp

    hyp = load_hyp(None, {"degrees": 10, "shear": 2, "flipud": 0.5, "rotate90": 0.5, "blur": 0.5, "clahe": 0.5})
    train_set = TrainSet(load_dataset(tiny_set), 128, Augmenter(hyp, 128, seed=3), nc=80)
    boxes = 0
    for k in range(12):
        image, labels = train_set[k % len(train_set)]
        assert image.shape == (3, 128, 128)
        cx, cy, w, h = labels[:, 1:].T
        assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
        assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
        assert (w * 128 >= 2 - 1e-3).all() and (h * 128 >= 2 - 1e-3).all()
        boxes += len(labels)
    assert boxes > 12  # mosaics of 4 labelled images keep most of their boxes


def test_show_augment_writes_drawn_samples(yolov5n_pt, tiny_set, tmp_path):
    import cv2

    result = _train(yolov5n_pt, "--data", tiny_set, "-o", tmp_path / "run", "--imgsz", 128, "--show-augment", 3)
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "run" / "augment").glob("*.jpg"))
    assert len(written) == 3
    assert all(cv2.imread(str(p)).shape == (128, 128, 3) for p in written)
    assert not (tmp_path / "run" / "last.safetensors").exists()


# ---------------------------------------------------------------- optimiser pieces

def test_parameter_groups_and_schedule():
    from edgeyolo.model import build_from_cfg
    from edgeyolo.train.hyp import load_hyp
    from edgeyolo.train.optim import apply_schedule, build_optimizer, lr_factor

    model, _ = build_from_cfg("yolov5n")
    opt = build_optimizer(model, "sgd", 0.01, 0.937, 5e-4)
    biases, decayed, norm = opt.param_groups
    assert all(p.dim() == 1 for p in biases["params"]) and biases["weight_decay"] == 0
    assert all(p.dim() == 4 for p in decayed["params"]) and decayed["weight_decay"] == 5e-4
    assert norm["weight_decay"] == 0 and len(norm["params"]) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert opt.defaults["nesterov"]
    adamw = build_optimizer(model, "adamw", 0.001, 0.937, 5e-4)
    assert isinstance(adamw, torch.optim.AdamW) and [g["weight_decay"] for g in adamw.param_groups] == [0, 5e-4, 0]
    hyp = load_hyp()
    apply_schedule(opt, hyp, epoch=0, epochs=10, iteration=0, warmup_iters=100, cosine=False)
    assert biases["lr"] == pytest.approx(0.1) and decayed["lr"] == 0 and decayed["momentum"] == pytest.approx(0.8)
    apply_schedule(opt, hyp, epoch=5, epochs=10, iteration=1000, warmup_iters=100, cosine=True)
    assert decayed["lr"] == pytest.approx(0.01 * lr_factor(5, 10, 0.01, True)) and decayed["momentum"] == 0.937
    assert lr_factor(10, 10, 0.01, False) == pytest.approx(0.01) and lr_factor(0, 10, 0.01, True) == 1


def test_ema_follows_the_model_with_ramped_decay():
    from edgeyolo.train.ema import ModelEMA

    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, tau=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = 0.9999 * (1 - np.exp(-1))
    expected = model.weight.detach() - 1.0 * d  # d·old + (1−d)·new, new = old + 1
    torch.testing.assert_close(ema.ema.weight, expected)


# ---------------------------------------------------------------- the run folder

def test_run_folder_holds_checkpoints_results_and_command(tiny_run):
    for name in ("last.safetensors", "last.state.safetensors", "best.safetensors", "results.csv", "results.png",
                 "command.txt", "hyp.yaml", "val_split.json"):
        assert (tiny_run / name).is_file(), name
    rows = _rows(tiny_run)
    assert len(rows) == 1 and set(rows[0]) >= {"epoch", "box_loss", "obj_loss", "cls_loss", "lr", "mAP50-95",
                                                "mAP50", "epoch_seconds"}
    assert 0 < float(rows[0]["mAP50-95"]) < 1
    assert "train" in (tiny_run / "command.txt").read_text()


def test_val_map_equals_eval_of_a_bundle_built_from_the_checkpoint(tiny_run, tiny_set, tmp_path):
    """The per-epoch validation (torch) and `eval` of the exported cpu-fp32 bundle agree (±0.1 mAP)."""
    from edgeyolo.build import BuildOptions, build_bundle
    from edgeyolo.datasets import load_dataset
    from edgeyolo.evaluate import evaluate
    from edgeyolo.runtime import load

    bundle = build_bundle(tiny_run / "best.safetensors", "cpu-fp32", tmp_path / "b", BuildOptions(imgsz=(TINY, TINY)))
    result = evaluate(load(bundle.path if hasattr(bundle, "path") else tmp_path / "b", conf=0.001, iou=0.6),
                      load_dataset(tiny_set))
    val = float(_rows(tiny_run)[0]["mAP50-95"])
    assert abs(result.map50_95 - val) * 100 <= 0.1, (result.map50_95, val)


# ---------------------------------------------------------------- Ctrl-C and resume

def test_ctrl_c_saves_last_and_resume_restores_everything(yolov5n_pt, tiny_set, tmp_path, monkeypatch):
    from edgeyolo.train.checkpoint import load_training_state
    from edgeyolo.train.hyp import load_hyp
    from edgeyolo.train.trainer import TrainConfig, Trainer

    run = tmp_path / "run"
    config = TrainConfig(weights=str(yolov5n_pt), data=str(tiny_set), val_data=str(tiny_set), out=str(run), epochs=2,
                         imgsz=64, batch=4, hyp=load_hyp(), device="cpu", workers=0, augment="none")
    original = Trainer.before_epoch

    def interrupt_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(Trainer, "before_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, show_progress=False).train()
    monkeypatch.setattr(Trainer, "before_epoch", original)
    saved = load_training_state(run / "last")
    assert saved.epoch == 1 and saved.ema_updates > 0 and len(_rows(run)) == 1

    resumed = Trainer(TrainConfig(weights=None, data="", out=""), resume=run, show_progress=False)
    resumed.before_train()
    assert resumed.start_epoch == 1 and resumed.config.epochs == 2 and resumed.config.imgsz == 64
    assert resumed.ema.updates == saved.ema_updates
    for name, value in saved.checkpoint.model.state_dict().items():
        torch.testing.assert_close(resumed.ema.ema.state_dict()[name], value)
    for name, value in saved.model_state.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value.to(resumed.model.state_dict()[name].dtype))
    buffers = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert buffers and any(b.abs().sum() > 0 for b in buffers)
    resumed.after_train()
    Trainer(TrainConfig(weights=None, data="", out=""), resume=run, show_progress=False).train()
    assert [int(r["epoch"]) for r in _rows(run)] == [0, 1]
    assert load_training_state(run / "last").epoch == 2


def test_ctrl_c_in_the_cli_exits_130_with_last_saved(yolov5n_pt, tiny_set, tmp_path, monkeypatch):
    from edgeyolo.train.trainer import Trainer

    def interrupt(self, images, targets):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_iteration", interrupt)
    result = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(tiny_set), "-o", str(tmp_path / "r"),
                                      "--imgsz", "64", "--batch", "4", "--workers", "0", "--epochs", "1"])
    assert result.exit_code == 130
    assert (tmp_path / "r" / "last.safetensors").is_file() and (tmp_path / "r" / "last.state.safetensors").is_file()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _bad_data(tmp_path: Path, coco128: Path, kind: str) -> Path:
    if kind == "yaml-without-train":
        path = tmp_path / "data.yaml"
        path.write_text(f"path: {coco128}\nval: images\nnames: [a]\n")
        return path
    root = _link_subset(coco128, tmp_path / kind, 4)
    for label in (root / "labels").iterdir():
        label.unlink()
        if kind == "empty-labels":
            label.write_text("")
        elif kind == "malformed-label":
            label.write_text("0 0.5 0.5 0.2\n")
    return root


@pytest.mark.parametrize("kind, message", [
    ("yaml-without-train", "'train'"), ("no-labels", "no label files"), ("empty-labels", "no labelled boxes"),
    ("malformed-label", "malformed label line"),
])
def test_bad_training_data_is_one_line_exit_2(yolov5n_pt, coco128, tmp_path, kind, message):
    data = _bad_data(tmp_path, coco128, kind)
    result = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(data), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_set_and_unknown_hyp_key(yolov5n_pt, tiny_set, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(tiny_set), "-o", str(tmp_path / "a"),
                                      "--batch", "64"])
    assert result.exit_code == 2 and "larger than the train set" in result.output
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: 0.01\nwarmup: 3\n")
    result = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(tiny_set), "-o", str(tmp_path / "b"),
                                      "--hyp", str(hyp)])
    assert result.exit_code == 2 and "unknown key 'warmup'" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_with_another_model_is_refused(tiny_run, tmp_path):
    from edgeyolo.model import build_from_cfg, save_model

    other, _ = build_from_cfg("yolov5s")
    save_model(other, tmp_path / "other.safetensors")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "other.safetensors"), "--resume", str(run)])
    assert result.exit_code == 2 and "another model" in result.output, result.output
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_an_existing_run_is_not_overwritten(yolov5n_pt, tiny_run, tiny_set):
    result = CliRunner().invoke(cli, ["train", str(yolov5n_pt), "--data", str(tiny_set), "-o", str(tiny_run),
                                      "--batch", "4"])
    assert result.exit_code == 2 and "--resume" in result.output


# ---------------------------------------------------------------- it learns

@pytest.mark.slow
def test_overfits_eight_images(yolov5n_pt, tiny_set, tmp_path):
    """From yolov5n.pt, a few dozen iterations on 8 images (augment off) raise their mAP50-95 by >= 10 points."""
    from edgeyolo.datasets import load_dataset
    from edgeyolo.model import load_model
    from edgeyolo.train.validate import validate

    imgsz = 256
    before = validate(load_model(yolov5n_pt).model, load_dataset(tiny_set), imgsz, torch.device("cpu")).map50_95
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("warmup_epochs: 0\nlr0: 0.005\n")
    run = tmp_path / "run"
    result = _train(yolov5n_pt, "--data", tiny_set, "--val-data", tiny_set, "-o", run, "--epochs", OVERFIT_EPOCHS,
                    "--imgsz", imgsz, "--batch", 8, "--nominal-batch", 8, "--workers", 0, "--augment", "none",
                    "--hyp", hyp, "--device", "cpu")
    assert result.exit_code == 0, result.output
    after = validate(load_model(run / "best.safetensors").model, load_dataset(tiny_set), imgsz,
                     torch.device("cpu")).map50_95
    assert (after - before) * 100 >= 10, (before, after)


OVERFIT_EPOCHS = 20  # one iteration each: 8 images, batch 8, nominal batch 8


# ---------------------------------------------------------------- more than one process

@pytest.mark.slow
def test_two_process_gloo_run_gives_a_checkpoint_every_command_accepts(yolov5n_pt, tiny_set, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgeyolo.cli", "train", str(yolov5n_pt), "--data", str(tiny_set),
                           "--val-data", str(tiny_set), "-o", str(run), "--epochs", "1", "--imgsz", "128", "--batch",
                           "4", "--workers", "0", "--device", "cpu", "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_rows(run)) == 1  # only rank 0 wrote
    result = CliRunner().invoke(cli, ["eval", str(run / "best.safetensors"), "--data", str(tiny_set), "--limit", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    bad = subprocess.run([sys.executable, "-m", "edgeyolo.cli", "train", str(yolov5n_pt), "--data", str(tiny_set), "-o",
                          str(tmp_path / "bad"), "--batch", "64", "--device", "cpu", "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "larger than the train set" in bad.stderr and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(cli, ["build", str(run / "last.safetensors"), "--target", "cpu-fp32",
                                      "-o", str(tmp_path / "b"), "--imgsz", "128"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- trained checkpoints deploy as INT8

@pytest.mark.slow
@pytest.mark.parametrize("target", ["intel-cpu-int8", "arm-int8"])
def test_trained_checkpoint_builds_int8_bundles_that_evaluate(tiny_run, coco128, tiny_set, tmp_path, target):
    pytest.importorskip("openvino" if target.startswith("intel") else "onnx2tf")
    out = tmp_path / target
    result = CliRunner().invoke(cli, ["build", str(tiny_run / "best.safetensors"), "--target", target, "-o", str(out),
                                      "--imgsz", str(TINY), "--calib", str(coco128 / "images"), "--calib-size", "8"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["eval", str(out), "--data", str(tiny_set), "--json"])
    assert result.exit_code == 0, result.output
    assert '"map50_95"' in result.output


def test_training_state_errors_are_edgeyolo_errors(tmp_path):
    from edgeyolo.train.trainer import TrainConfig, Trainer

    with pytest.raises(EdgeYoloError):
        Trainer(TrainConfig(weights=None, data="", out=""), resume=tmp_path, show_progress=False).before_train()
