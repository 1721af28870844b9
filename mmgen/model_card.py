"""The model card of an exported model: its recipe, training curve (PNG) and ShapesBench table."""

from __future__ import annotations

import json
from pathlib import Path

CURVE = "training_curve.png"
CARD = "README.md"
BENCH = "shapesbench.json"


def plot_training_curve(log_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log_rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "total"), ("text_loss", "text cross-entropy"), ("flow_loss", "flow MSE")):
        ax.plot(steps, [r[key] for r in log_rows], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(model_dir: str | Path, log_rows: list[dict], recipe: str, step: int) -> Path:
    """Write README.md (and the curve PNG) into `model_dir`; a ShapesBench summary saved there as
    shapesbench.json is included as a table."""
    model_dir = Path(model_dir)
    if log_rows:
        plot_training_curve(log_rows, model_dir / CURVE)
    has_curve = (model_dir / CURVE).is_file()  # rewriting the card later (a new table) keeps the curve
    lines = [
        "# mmgen-shapes",
        "",
        "The embedded default model of mmgen: a Llama-style backbone and a DiT flow head trained from scratch on "
        "ShapesWorld, with the ShapesWorld VAE and BPE tokenizer (`tokenizers/`).",
        "",
        f"- recipe: `mmgen train {recipe}`",
        f"- trained steps: {step}",
        "",
        "## Training curve",
        "",
        f"![training curve]({CURVE})" if has_curve else "(no log)",
        "",
    ]
    bench = model_dir / BENCH
    if bench.is_file():
        summary = json.loads(bench.read_text())
        counts = summary.get("n", {})
        lines += ["## ShapesBench", "", "`mmgen eval shapesbench --model default` with the default steps and guidance.",
                  "", "| category | accuracy | n |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {counts.get(k, '')} |" for k, v in summary.items() if isinstance(v, (int, float))]
        lines.append("")
    card = model_dir / CARD
    card.write_text("\n".join(lines))
    return card
