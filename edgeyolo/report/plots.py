"""pareto.png and size_vs_map.png (matplotlib, Agg: no display needed).

Colour = target, marker = model, marker size = image size; legends sit outside the axes so
nothing covers a point.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeYoloError

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def require_matplotlib() -> None:
    """Fail before hours of measuring, not after, where the plotting library is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EdgeYoloError("edgeyolo report draws with matplotlib: pip install 'edgeyolo[report]'") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(rows: list[dict]):
    plt = _pyplot()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["imgsz"] for r in rows})
    cmap = plt.get_cmap("tab10" if len(targets) <= 10 else "tab20")
    colour = {t: cmap(i % cmap.N) for i, t in enumerate(targets)}
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    area = {s: 30 + 90 * i / max(1, len(sizes) - 1) for i, s in enumerate(sizes)}
    return colour, marker, area


def _legend(ax, rows, colour, marker, area) -> None:
    from matplotlib.lines import Line2D

    handles, title = [Line2D([], [], color=c, marker="o", linestyle="", label=t) for t, c in colour.items()], ["target"]
    if len(marker) > 1:
        handles += [Line2D([], [], color="grey", marker=m, linestyle="", label=name) for name, m in marker.items()]
        title.append("model")
    if len(area) > 1:
        handles += [Line2D([], [], color="grey", marker="o", linestyle="", markersize=a ** 0.5, label=f"{s} px")
                    for s, a in area.items()]
        title.append("input size")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=9,
              title=" / ".join(title), title_fontsize=9)


def plot_pareto(report: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in report["rows"] if r["map50_95"] is not None and r["p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colour, marker, area = _styles(rows or report["rows"])
    for r in rows:
        ax.scatter(r["p50_ms"], r["map50_95"], color=colour[r["target"]], marker=marker[r["model"]],
                   s=area[r["imgsz"]], edgecolors="black" if r["pareto"] else "none", linewidths=0.8, zorder=3)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["p50_ms"])
    if front:
        ax.step([r["p50_ms"] for r in front], [r["map50_95"] for r in front], where="post", color="black",
                linestyle="--", linewidth=1, zorder=2, label="Pareto front")
    if rows and max(r["p50_ms"] for r in rows) / max(1e-9, min(r["p50_ms"] for r in rows)) > 10:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("latency p50, end to end (ms, batch 1)  — lower is better")
    ax.set_ylabel("COCO mAP50-95 (%)  — higher is better")
    ax.set_title("Accuracy vs latency (black edge and dashed line: Pareto front)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=0)
    if rows:
        _legend(ax, rows, colour, marker, area)
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_size_vs_map(report: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in report["rows"] if r["map50_95"] is not None]
    panels = [("params_m", "parameters (millions)"), ("gflops", "GFLOPs per image"), ("size_mb", "bundle file size (MB)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), sharey=True)
    colour, marker, area = _styles(rows or report["rows"])
    for ax, (key, label) in zip(axes, panels):
        for r in rows:
            if r.get(key) is not None:
                ax.scatter(r[key], r["map50_95"], color=colour[r["target"]], marker=marker[r["model"]],
                           s=area[r["imgsz"]], alpha=0.85, zorder=3)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("COCO mAP50-95 (%)")
    fig.suptitle("Accuracy vs model size and compute", fontsize=11)
    if rows:
        _legend(axes[-1], rows, colour, marker, area)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
