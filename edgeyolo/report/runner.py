"""``edgeyolo report``: build every missing cell, evaluate each, benchmark them taking turns, write the report."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..bundle import load_bundle
from ..compare import bench_in_turns
from ..errors import EdgeYoloError
from .builder import ensure_bundle
from .plan import CalibSpec, Cell, plan_cells
from .rows import add_drops, finish_rows, make_row
from .state import ReportState


@dataclass
class ReportConfig:
    models: list[str]
    targets: list[str]
    data: str
    out: str
    sizes: list[int] = field(default_factory=lambda: [640])
    calib: str | None = None
    calib_size: int | None = None
    max_drop: float = 1.0
    rounds: int = 3
    iters: int = 50
    warmup: int = 5
    limit: int | None = None
    resume: bool = False

    def measured_with(self) -> dict:
        """What the saved state depends on (a resumed run must match it)."""
        data = Path(self.data)
        return {"models": self.models, "targets": self.targets, "sizes": self.sizes, "calib": self.calib,
                "calib_size": self.calib_size, "data": str(data.resolve()) if data.exists() else self.data,
                "limit": self.limit, "rounds": self.rounds, "iters": self.iters, "warmup": self.warmup}


def run_report(config: ReportConfig, on_update: Callable[[list[dict], str], None] | None = None,
               eval_progress=None) -> dict:
    """Measure every cell and write report.json, report.md, pareto.png and size_vs_map.png under ``config.out``.

    ``on_update(rows, message)`` is called after every step (for a live table); ``eval_progress(label, total)``
    may return a context manager yielding ``advance(n)``.
    """
    from ..datasets import load_dataset
    from .plots import require_matplotlib

    require_matplotlib()
    root = Path(config.out)
    dataset = load_dataset(config.data)
    cells = plan_cells(config.models, config.targets, config.sizes)
    calib = CalibSpec(config.calib, config.calib_size)
    state = ReportState.open(root, config.measured_with(), config.resume)

    def update(message: str) -> None:
        if on_update:
            on_update(current_rows(cells, state), message)

    for cell in cells:
        entry = state.cell(cell.id)
        if not entry.get("bundle") and not cell.target_error and not cell.bundle_dir(root, calib).is_dir():
            update(f"building {cell.id}")
        _build_cell(cell, entry, root, calib)
        if "cost" not in entry:
            entry["cost"] = _cost(cell)
        state.save()
        update(f"{'cached' if entry.get('cached') else 'built'} {cell.id}" if entry.get("bundle")
               else f"{cell.id}: {entry.get('error')}")

    eval_key = f"{config.measured_with()['data']}#{config.limit}"
    for cell in cells:
        entry = state.cell(cell.id)
        if entry.get("bundle") and not entry.get("eval") and not entry.get("error"):
            update(f"evaluating {cell.id}")
            _evaluate_cell(entry, dataset, eval_key, config.limit, eval_progress, cell.id)
            state.save()
            update(f"evaluated {cell.id}")

    by_bundle = {state.cell(c.id)["bundle"]: state.cell(c.id) for c in cells
                 if state.cell(c.id).get("bundle") and not state.cell(c.id).get("error")}

    def record(bundle: str, result: dict) -> None:
        entry = by_bundle[bundle]
        entry.setdefault("bench", []).append({"fps": result["fps"], "p50_ms": result["latency_ms"]["p50"],
                                              "p99_ms": result["latency_ms"]["p99"],
                                              "peak_rss_mb": result["peak_rss_mb"]})
        state.save()
        update(f"benchmarked {Path(bundle).name} (round {len(entry['bench'])}/{config.rounds})")

    def failed(bundle: str, exc: EdgeYoloError) -> None:
        by_bundle[bundle]["error"] = f"benchmark failed: {exc}"
        state.save()

    bench_in_turns(list(by_bundle), config.rounds, config.iters, config.warmup, record,
                   done={b: len(e.get("bench", [])) for b, e in by_bundle.items()}, on_error=failed)

    report = finish_rows(current_rows(cells, state), config.max_drop)
    report.update(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  config=asdict(config), machine=_machine())
    _write(root, report)
    update("done")
    return report


def current_rows(cells: list[Cell], state: ReportState) -> list[dict]:
    rows = [make_row(c, state.cell(c.id)) for c in cells]
    add_drops(rows)
    return rows


def _build_cell(cell: Cell, entry: dict, root: Path, calib: CalibSpec) -> None:
    if entry.get("bundle") and Path(entry["bundle"]).is_dir():
        entry["cached"] = True
        return
    outcome = ensure_bundle(cell, root, calib)
    entry.update(bundle=outcome.bundle, build_s=outcome.build_s, cached=outcome.cached, error=outcome.error)
    if outcome.bundle:
        bundle = load_bundle(outcome.bundle, verify=False)
        entry.update(backend=bundle.backend, precision=bundle.target["precision"],
                     size_mb=round(sum((bundle.path / n).stat().st_size for n in bundle.manifest["checksums"]) / 1e6, 2))


def _evaluate_cell(entry: dict, dataset, key: str, limit, eval_progress, label: str) -> None:
    """Accuracy of a bundle, kept in its manifest: a rerun over the same data reads it instead of measuring again."""
    from ..evaluate import evaluate
    from ..gate import load_for_eval

    bundle = load_bundle(entry["bundle"])
    cached = bundle.manifest.get("evaluations", {}).get(key)
    if cached is None:
        try:
            detector = load_for_eval(bundle)
            total = min(len(dataset), limit) if limit else len(dataset)
            if eval_progress:
                with eval_progress(f"eval {label}", total) as advance:
                    result = evaluate(detector, dataset, limit=limit, progress=advance)
            else:
                result = evaluate(detector, dataset, limit=limit)
        except EdgeYoloError as exc:
            entry["error"] = f"evaluation failed: {exc}"
            return
        cached = {"map50_95": result.map50_95, "map50": result.map50, "images": result.images}
        bundle.update_manifest(evaluations={**bundle.manifest.get("evaluations", {}), key: cached})
    entry["eval"] = {"map50_95": round(cached["map50_95"] * 100, 2), "map50": round(cached["map50"] * 100, 2),
                     "images": cached["images"]}


def _cost(cell: Cell) -> dict | None:
    """Params and GFLOPs of the cell's model (shared by every target at that size)."""
    from .counting import model_cost

    try:
        return model_cost(cell.weights, cell.imgsz)
    except EdgeYoloError:
        return None


def _machine() -> dict:
    from .machine import machine_facts

    return machine_facts()


def _write(root: Path, report: dict) -> None:
    import json

    from .markdown import render_markdown
    from .plots import plot_pareto, plot_size_vs_map

    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    plot_pareto(report, root / "pareto.png")
    plot_size_vs_map(report, root / "size_vs_map.png")
    (root / "report.md").write_text(render_markdown(report))
