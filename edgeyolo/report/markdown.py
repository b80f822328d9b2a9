"""report.md: the table (best value per column in bold), the verdicts and the machine."""

from __future__ import annotations

COLUMNS = [  # (key, header, format)
    ("model", "model", "{}"), ("target", "target", "{}"), ("precision", "precision", "{}"), ("imgsz", "imgsz", "{}"),
    ("params_m", "params (M)", "{:.2f}"), ("gflops", "GFLOPs", "{:.2f}"), ("size_mb", "file (MB)", "{:.2f}"),
    ("map50_95", "mAP50-95", "{:.2f}"), ("map50", "mAP50", "{:.2f}"), ("drop", "drop", "{:+.2f}"),
    ("drop_vs_reference", "drop vs ref", "{:+.2f}"), ("fps", "FPS", "{:.1f}"), ("p50_ms", "p50 (ms)", "{:.1f}"),
    ("p99_ms", "p99 (ms)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"), ("build_s", "build (s)", "{:.0f}"),
]


def cell_text(row: dict, key: str, fmt: str, best: dict) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    return f"**{text}**" if key in best and value == best[key] and key not in ("params_m", "gflops") else text


def table(report: dict) -> list[str]:
    best = report["best"]
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " | note |",
             "|" + "|".join("---" if k in ("model", "target", "precision") else "---:" for k, _, _ in COLUMNS) + "|---|"]
    for row in report["rows"]:
        note = f"failed: {row['error']}" if row["error"] else ("Pareto" if row["pareto"] else "")
        lines.append("| " + " | ".join(cell_text(row, k, f, best) for k, _, f in COLUMNS) + f" | {note} |")
    return lines


def render_markdown(report: dict) -> str:
    config, machine = report["config"], report["machine"]
    lines = [f"# edgeyolo report ({report['created']})", "",
             f"Accuracy: COCO mAP50-95 / mAP50 (%) on `{config['data']}`"
             + (f" (first {config['limit']} images)" if config.get("limit") else "")
             + f". Speed: end to end (letterbox, inference, decode + NMS), batch 1, median of {config['rounds']} "
               f"rounds of {config['iters']} frames, each in a fresh process, bundles taking turns.",
             "*drop*: points below cpu-fp32 of the same model and size; *drop vs ref*: points below the reference "
             f"({report['reference'] or 'none'}). **Bold**: best in its column. *Pareto*: no other row is both faster "
             "(p50) and more accurate.", ""]
    lines += table(report)
    lines += ["", f"## Verdict (fastest within {config['max_drop']} points of the reference)", ""]
    for v in report["verdicts"]:
        if v["pick"]:
            lines.append(f"- **{v['target']}**: {v['model']} at {v['imgsz']} — p50 {v['p50_ms']:.1f} ms "
                         f"({v['fps']:.1f} FPS), mAP50-95 {v['map50_95']:.2f} ({v['drop_vs_reference']:+.2f})")
        else:
            lines.append(f"- **{v['target']}**: none — {v['reason']}")
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    lines += ["", "## Machine", "",
              f"{machine['cpu']}; {machine['logical_cores']} logical / {machine['physical_cores']} physical cores; "
              f"{machine['memory_gb']} GB; {machine['system']}; Python {machine['python']}",
              f"CPU flags: {', '.join(machine['flags']) or 'none of note'}; "
              f"load average at start: {machine['load_average_1m_at_start']}",
              f"Packages: {packages}", "", "![pareto](pareto.png)", "", "![size vs mAP](size_vs_map.png)", ""]
    return "\n".join(lines)
