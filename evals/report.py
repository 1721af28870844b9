"""The human-readable side of a run: `report.md` with the summary tables, a bar chart of the scores, and
image grids of the best and worst samples by one key metric.

Plots use matplotlib's object API with the Agg canvas, so no global backend is switched and no display
is needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .format import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["LOWER_IS_BETTER", "choose_key_metric", "write_report"]

# metrics where a smaller value is the better one
LOWER_IS_BETTER = {"image_count_error", "order_edit_distance", "n_images", "n_images_golden"}
_PREFERRED = ("structure_match", "clip_score", "ssim", "rouge_l")
_MAX_IMAGES_PER_ROW = 4


def choose_key_metric(summary: Mapping[str, Any]) -> str | None:
    """The metric that ranks samples: a judge mean if there is one, else the first of
    structure_match, clip_score, ssim, rouge_l, else the first metric at all."""
    metrics = list((summary.get("metrics") or {}).keys())
    judged = [m for m in metrics if m.startswith("judge.") and m.endswith(".mean")]
    if judged:
        return judged[0]
    for name in _PREFERRED:
        if name in metrics:
            return name
    candidates = [m for m in metrics if m not in LOWER_IS_BETTER]
    return candidates[0] if candidates else (metrics[0] if metrics else None)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _score_charts(path: Path, summary: Mapping[str, Any], names: Sequence[str]) -> None:
    """One small bar chart per metric, each on its own scale (PSNR in dB and rates in [0, 1] do not
    share an axis): the overall mean, then the mean of each category."""
    metrics = summary.get("metrics") or {}
    by_category = summary.get("by_category") or {}
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    height = 0.35 * (1 + len(by_category)) + 1.0
    fig = Figure(figsize=(4.2 * cols, height * rows))
    FigureCanvasAgg(fig)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        labels = ["all"] + [c for c, v in by_category.items() if name in v]
        values = [metrics[name]["mean"]] + [by_category[c][name] for c in labels[1:]]
        ax.barh(range(len(labels)), values, color=["tab:gray"] + ["tab:blue"] * (len(labels) - 1))
        ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _row_images(row: Mapping[str, Any], out_dir: Path) -> list[PIL.Image.Image]:
    images = []
    for item in row.get("output") or []:
        if item.get("type") == "image" and len(images) < _MAX_IMAGES_PER_ROW:
            path = out_dir / item["content"]
            if path.is_file():
                with PIL.Image.open(path) as im:
                    images.append(im.convert("RGB"))
    return images


def _image_grid(
    path: Path, rows: Sequence[Mapping[str, Any]], out_dir: Path, metric: str, title: str
) -> bool:
    entries = [(r, _row_images(r, out_dir)) for r in rows]
    entries = [(r, ims) for r, ims in entries if ims]
    if not entries:
        return False
    cols = max(len(ims) for _, ims in entries)
    fig = Figure(figsize=(2.2 * cols, 2.4 * len(entries) + 0.4))
    FigureCanvasAgg(fig)
    for i, (row, images) in enumerate(entries):
        for j in range(cols):
            ax = fig.add_subplot(len(entries), cols, i * cols + j + 1)
            ax.axis("off")
            if j < len(images):
                ax.imshow(images[j])
            if j == 0:
                ax.set_title(
                    f"{row['id']}  {metric}={_fmt(row['scores'].get(metric))}", fontsize=8, loc="left"
                )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write_report(
    out_dir: str | os.PathLike,
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    title: str = "Interleaved evaluation",
    key_metric: str | None = None,
    n_examples: int = 4,
) -> Path:
    """Write `report.md` (and its PNG plots) into `out_dir`; returns the path of `report.md`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: Mapping[str, Mapping[str, float]] = summary.get("metrics") or {}
    key_metric = key_metric or choose_key_metric(summary)
    lines = [f"# {title}", ""]
    lines.append(
        f"Samples: {summary.get('n_samples', len(rows))}, done: {summary.get('n_done', len(rows))}, "
        f"errors: {summary.get('n_errors', 0)}."
    )
    if summary.get("mean_seconds") is not None:
        lines.append(f"Mean generation time: {summary['mean_seconds']:.3g} s per sample.")
    lines.append("")

    by_category: Mapping[str, Mapping[str, Any]] = summary.get("by_category") or {}
    if metrics:
        lines += ["## Scores", "", "| metric | mean | n |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(m['mean'])} | {m['n']} |" for name, m in metrics.items()]
        lines.append("")
    if by_category:
        shown = [m for m in metrics if m != "n_images_golden"][:6]
        lines += ["## By category", ""]
        lines.append("| category | n | " + " | ".join(shown) + " |")
        lines.append("|---|---|" + "---|" * len(shown))
        for cat, values in by_category.items():
            lines.append(
                f"| {cat} | {values.get('n', '')} | "
                + " | ".join(_fmt(values.get(m, "")) for m in shown)
                + " |"
            )
        lines.append("")
    charted = [m for m in metrics if m != "n_images_golden"]
    if charted:
        _score_charts(out_dir / "scores.png", summary, charted)
        lines += ["![scores per metric and category](scores.png)", ""]

    if summary.get("scoring_failures"):
        lines += ["## Scoring failures", "", "| scorer | samples |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["scoring_failures"].items()]
        lines.append("")

    ranked = [
        r
        for r in rows
        if r.get("status") == "ok" and isinstance((r.get("scores") or {}).get(key_metric), (int, float))
    ]
    if key_metric and ranked and n_examples > 0:
        best_first = key_metric not in LOWER_IS_BETTER
        ranked.sort(key=lambda r: float(r["scores"][key_metric]), reverse=best_first)
        best = ranked[: min(n_examples, (len(ranked) + 1) // 2)]  # best and worst never overlap
        worst = ranked[len(best) :][::-1][:n_examples]
        lines += [f"## Examples by {key_metric}", ""]
        for name, picked, label in (("successes", best, "Best"), ("failures", worst, "Worst")):
            if not picked:
                continue
            lines.append(
                f"{label}: " + ", ".join(f"`{r['id']}` ({_fmt(r['scores'][key_metric])})" for r in picked)
            )
            lines.append("")
            if _image_grid(
                out_dir / f"{name}.png", picked, out_dir, key_metric, f"{label} samples by {key_metric}"
            ):
                lines += [f"![{name}]({name}.png)", ""]

    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    logger.info("wrote %s", path)
    return path
