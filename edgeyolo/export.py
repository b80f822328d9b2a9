"""PyTorch ``Model`` → one ONNX file: BN folded, simplified, tagged with what a runtime needs.

The ONNX written here is the single IR every backend starts from.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._optional import require
from ._version import __version__
from .errors import EdgeYoloError
from .log import log
from .model import HEAD_DECODED, HEAD_MODES, Model

onnx = require("onnx", extra="export", purpose="exporting ONNX")
torch = require("torch", extra="export", purpose="exporting ONNX")

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "output0"


@dataclass(frozen=True)
class ExportOptions:
    imgsz: tuple[int, int] = (640, 640)
    opset: int = DEFAULT_OPSET
    head: str = HEAD_DECODED
    batch: int = 1
    dynamic_batch: bool = False
    dynamic_shape: bool = False
    simplify: bool = True


def check_imgsz(imgsz, stride: int) -> tuple[int, int]:
    """``imgsz`` as (h, w), each rounded up to a multiple of ``stride`` (with a warning, as YOLOv5 does)."""
    if isinstance(imgsz, int):
        imgsz = (imgsz, imgsz)
    imgsz = tuple(int(x) for x in imgsz)
    if len(imgsz) != 2 or min(imgsz) <= 0:
        raise EdgeYoloError(f"image size must be one or two positive integers, not {imgsz}")
    rounded = tuple(max(stride, math.ceil(x / stride) * stride) for x in imgsz)
    if rounded != imgsz:
        log.warning("--imgsz %s is not a multiple of the max stride %d, updated to %s", list(imgsz), stride, list(rounded))
    return rounded


def export_onnx(model: Model, out: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """Fold BN, export ``model`` to ONNX at ``out`` (atomically), simplify and tag it. Returns ``out``."""
    if options.head not in HEAD_MODES:
        raise EdgeYoloError(f"unknown head layout {options.head!r} (known: {', '.join(HEAD_MODES)})")
    out = Path(out)
    imgsz = check_imgsz(options.imgsz, model.imgsz_multiple)
    net = copy.deepcopy(model).float().eval().fuse()
    net.head_mode = options.head
    sample = torch.zeros(options.batch, 3, *imgsz)
    axes = {}
    if options.dynamic_batch:
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if options.dynamic_shape:
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (sample,), str(raw), dynamo=False, opset_version=options.opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes or None,
                do_constant_folding=True,
            )
        graph = onnx.load(str(raw))
        if options.simplify:
            graph = simplify(graph)
        tag_metadata(graph, model, imgsz, options)
        onnx.checker.check_model(graph)
        final = Path(tmp) / "model.onnx"
        onnx.save(graph, str(final))
        final.replace(out)
    return out


def simplify(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and clean the graph with onnxslim (onnxsim where onnxslim is absent)."""
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
    if onnxslim is not None:
        return onnxslim.slim(graph)
    try:
        import onnxsim
    except ImportError:
        log.warning("neither onnxslim nor onnxsim is installed; the ONNX graph is left unsimplified")
        return graph
    simplified, ok = onnxsim.simplify(graph)
    return simplified if ok else graph


def tag_metadata(graph: onnx.ModelProto, model: Model, imgsz: tuple[int, int], options: ExportOptions) -> None:
    head = model.describe()
    meta = {
        "edgeyolo_version": __version__,
        "names": json.dumps(head["names"]),
        "nc": str(head["nc"]),
        "stride": str(max(head["strides"])),
        "strides": json.dumps(head["strides"]),
        "anchors": json.dumps(head["anchors"]),
        "imgsz": json.dumps(list(imgsz)),
        "head": options.head,
        "dynamic_batch": str(options.dynamic_batch or options.dynamic_shape).lower(),
        "dynamic_shape": str(options.dynamic_shape).lower(),
    }
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)


def read_metadata(path: str | Path) -> dict:
    """The edgeyolo metadata stored in an exported ONNX file (JSON values decoded)."""
    graph = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    for key in ("names", "strides", "anchors", "imgsz"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta
