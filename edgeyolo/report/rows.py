"""From measurements to report rows: medians, drops against the FP32 baselines, best values, verdicts."""

from __future__ import annotations

import statistics

from .pareto import pareto_front
from .plan import BASELINE_TARGET

# Column → True where higher is better (for marking the best value of each column).
BEST = {"map50_95": True, "map50": True, "drop": False, "drop_vs_reference": False, "fps": True, "p50_ms": False,
        "p99_ms": False, "peak_rss_mb": False, "size_mb": False, "params_m": False, "gflops": False,
        "build_s": False}


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def make_row(cell, entry: dict) -> dict:
    cost = entry.get("cost")
    bench = entry.get("bench", [])
    accuracy = entry.get("eval") or {}
    return {
        "id": cell.id, "model": cell.model, "target": cell.target, "backend": entry.get("backend"),
        "precision": entry.get("precision"), "imgsz": cell.imgsz,
        "params_m": (cost or {}).get("params_m"), "gflops": (cost or {}).get("gflops"),
        "size_mb": entry.get("size_mb"),
        "map50_95": accuracy.get("map50_95"), "map50": accuracy.get("map50"),
        "drop": None, "drop_vs_reference": None,
        "fps": median([b["fps"] for b in bench]), "p50_ms": median([b["p50_ms"] for b in bench]),
        "p99_ms": median([b["p99_ms"] for b in bench]), "peak_rss_mb": median([b["peak_rss_mb"] for b in bench]),
        "rounds": len(bench), "build_s": entry.get("build_s"), "cached": entry.get("cached", False),
        "bundle": entry.get("bundle"), "error": entry.get("error"), "pareto": False,
    }


def add_drops(rows: list[dict]) -> dict | None:
    """Fill ``drop`` (points below cpu-fp32 of the same model and size) and ``drop_vs_reference``
    (points below the reference: the first model on cpu-fp32 at its largest size). Returns the reference row."""
    baselines = {(r["model"], r["imgsz"]): r for r in rows if r["target"] == BASELINE_TARGET and r["map50_95"] is not None}
    reference = None
    if rows:
        first = rows[0]["model"]
        candidates = [r for r in baselines.values() if r["model"] == first]
        reference = max(candidates, key=lambda r: r["imgsz"]) if candidates else None
    for row in rows:
        if row["map50_95"] is None:
            continue
        base = baselines.get((row["model"], row["imgsz"]))
        if base is not None:
            row["drop"] = round(base["map50_95"] - row["map50_95"], 2)
        if reference is not None:
            row["drop_vs_reference"] = round(reference["map50_95"] - row["map50_95"], 2)
    return reference


def mark_pareto(rows: list[dict]) -> None:
    measured = [r for r in rows if r["map50_95"] is not None and r["p50_ms"] is not None]
    for i in pareto_front([(r["p50_ms"], r["map50_95"]) for r in measured]):
        measured[i]["pareto"] = True


def best_values(rows: list[dict]) -> dict:
    """Column → its best value over the rows that have one."""
    best = {}
    for column, higher in BEST.items():
        pool = [r for r in rows if r["target"] != BASELINE_TARGET] if column.startswith("drop") else rows
        values = [r[column] for r in pool if r.get(column) is not None]
        if values:
            best[column] = max(values) if higher else min(values)
    return best


def verdicts(rows: list[dict], max_drop: float) -> list[dict]:
    """Per target: the fastest (lowest p50) row whose drop against the reference stays within ``max_drop``."""
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        fit = [r for r in mine if r["drop_vs_reference"] is not None and r["drop_vs_reference"] <= max_drop
               and r["p50_ms"] is not None]
        if fit:
            pick = min(fit, key=lambda r: r["p50_ms"])
            out.append({"target": target, "pick": pick["id"], "model": pick["model"], "imgsz": pick["imgsz"],
                        "p50_ms": pick["p50_ms"], "fps": pick["fps"], "map50_95": pick["map50_95"],
                        "drop_vs_reference": pick["drop_vs_reference"]})
        else:
            errors = [r["error"] for r in mine if r["error"]]
            reason = errors[0] if errors else f"no row within {max_drop} points of the reference"
            out.append({"target": target, "pick": None, "reason": reason})
    return out


def finish_rows(rows: list[dict], max_drop: float) -> dict:
    reference = add_drops(rows)
    mark_pareto(rows)
    return {"rows": rows, "reference": reference["id"] if reference else None, "best": best_values(rows),
            "verdicts": verdicts(rows, max_drop)}
