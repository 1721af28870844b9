"""The model card of an exported model: its recipe, training curve (PNG) and ShapesBench table."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .drafting import DRAFT_LM_DIR, NO_ADAPTOR_DIR

CURVE = "training_curve.png"
RESAMPLER_RECIPE = "resampler_recipe.json"  # the settings the learned resampler in model/ was trained with
CARD = "README.md"
BENCH = "shapesbench.json"
STATE = "training_state.json"  # the export's step, seed, recipe, first step of its stage and text forms

logger = logging.getLogger(__name__)


STAGE_CURVE_PREFIX = "training_curve_from_step_"  # + the stage's first step + ".png"
STAGE_CURVE = re.compile(re.escape(STAGE_CURVE_PREFIX) + r"(\d+)\.png")


def curve_name(stage_start: int = 0) -> str:
    """The curve's file: one per training stage, so a later stage exported into the same folder keeps the
    curves of the stages before it."""
    return CURVE if stage_start == 0 else f"{STAGE_CURVE_PREFIX}{stage_start}.png"


def stage_curves(folder: Path) -> dict[int, Path]:
    """The training curves in `folder` by the step their stage starts at."""
    curves = {0: folder / CURVE} if (folder / CURVE).is_file() else {}
    for path in folder.glob(f"{STAGE_CURVE_PREFIX}*.png"):
        if match := STAGE_CURVE.fullmatch(path.name):
            curves[int(match.group(1))] = path
    return dict(sorted(curves.items()))


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


# Parts that later recipes add to a trained model folder, and the commands that make them.
EXTRAS = [
    ("drafter", "the vision-aware draft head", "mmgen train-drafter configs/drafter.yaml"),
    (NO_ADAPTOR_DIR, "the draft head without image adaptor (an ablation)",
     "mmgen train-drafter configs/drafter.yaml --image_adaptor false"),
    (DRAFT_LM_DIR, "a small draft LM", "mmgen train-drafter configs/drafter.yaml --kind draft-lm"),
]


def _extras(model_dir: Path) -> list[str]:
    """Card lines for the learned resampler and the drafters found in the folder, with their recipes."""
    found = []
    config = model_dir / "model" / "config.json"
    levels = json.loads(config.read_text()).get("resampler_queries") if config.is_file() else None
    if levels:
        recipe = "python -m mmgen.train_resampler configs/resampler.yaml"
        if (model_dir / RESAMPLER_RECIPE).is_file():  # the folder it was written to, as the recipe was run
            recipe += f" --output_dir {json.loads((model_dir / RESAMPLER_RECIPE).read_text())['output_dir']}"
        found.append(f"- `model/`: the learned resampler for {', '.join(f'resampler:{r}' for r in levels)} "
                     f"(`{recipe}`)")
    found += [f"- `{name}/`: {what} (`{command}`)" for name, what, command in EXTRAS if (model_dir / name).is_dir()]
    return ["## Added after training", "", *found, ""] if found else []


def _sampler(model_dir: Path) -> list[str]:
    """The card line naming the scheduler the folder keeps: its ShapesBench figures were drawn with it."""
    config = model_dir / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return []
    scheduler = json.loads(config.read_text())
    steps = "stochastic" if scheduler.get("stochastic_sampling") else "Euler"
    return [f"- sampler: `{scheduler['_class_name']}`, shift {scheduler.get('shift', 1.0)}, {steps} steps"]


def write_model_card(model_dir: str | Path, log_rows: list[dict], recipe: str, step: int, stage_start: int = 0,
                     previous: Path | None = None) -> Path:
    """Write README.md (and this stage's curve PNG) into `model_dir`. The curves of earlier stages found
    there or in `previous` (the folder this stage started from) are kept and shown, and a ShapesBench summary
    saved there as shapesbench.json is included as a table, with the step it was measured at."""
    model_dir = Path(model_dir)
    if previous is not None and Path(previous).resolve() != model_dir.resolve():
        for stage, curve in stage_curves(Path(previous)).items():
            if stage < stage_start:
                shutil.copy(curve, model_dir / curve.name)
    if log_rows:
        plot_training_curve(log_rows, model_dir / curve_name(stage_start))
    curves = stage_curves(model_dir)
    lines = [
        "# mmgen-shapes",
        "",
        "The embedded default model of mmgen: a Llama-style backbone and a DiT flow head trained from scratch on "
        "ShapesWorld, with the ShapesWorld VAE and BPE tokenizer (`tokenizers/`).",
        "",
        f"- recipe: `mmgen train {recipe}`"
        + (f", a stage that continues the export of step {stage_start} (see the config's header)" if stage_start else ""),
        f"- trained steps: {step}",
        *_sampler(model_dir),
        "",
        "## Training curve",
        "",
    ]
    for stage, curve in curves.items():
        lines += [f"![training curve{f' from step {stage}' if stage else ''}]({curve.name})", ""]
    if not curves:
        lines += ["(no log)", ""]
    lines += _extras(model_dir)
    bench = model_dir / BENCH
    if bench.is_file():
        summary = json.loads(bench.read_text())
        counts = summary.get("n", {})
        measured = f", measured at step {summary['step']}" if "step" in summary else ""
        measured += f" (seed {summary['seed']})" if "seed" in summary else ""
        lines += ["## ShapesBench", "", f"`mmgen eval shapesbench` with the default steps and guidance{measured}.",
                  "", "| category | accuracy | n |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {counts.get(k, '')} |" for k, v in summary.items()
                  if isinstance(v, (int, float)) and k not in ("step", "seed")]
        lines.append("")
    card = model_dir / CARD
    card.write_text("\n".join(lines))
    return card


def read_state(model_dir: str | Path) -> dict:
    """What the folder's export kept of its training (`STATE`); empty for a folder `mmgen train` did not export."""
    state_file = Path(model_dir) / STATE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def refresh_model_card(model_dir: str | Path) -> Path | None:
    """Write the card of an exported folder again from what the folder holds now, after a later recipe added
    a resampler or a drafter, or a ShapesBench table. Returns None, and changes nothing, for a folder without
    a card or one whose export did not keep its recipe (`STATE`)."""
    model_dir = Path(model_dir)
    if not (model_dir / CARD).is_file():
        return None
    state = read_state(model_dir)
    if "recipe" not in state:
        logger.warning("%s does not name the recipe it was exported by: its model card is left as it is", model_dir)
        return None
    return write_model_card(model_dir, [], state["recipe"], state["step"], state.get("stage_start", 0))


def exported_step(model_dir: str | Path) -> int:
    """The trained step of a folder `mmgen train` exported; a clear error for any other folder."""
    state = read_state(model_dir)
    if not state:
        raise ValueError(f"{model_dir} has no {STATE}: it is not a folder `mmgen train` exported")
    return state["step"]


def trained_text_forms(model_dir: str | Path) -> dict[str, float]:
    """The ShapesWorld text forms (`config.TEXT_FORMS`) the folder's model was trained to write; none (plain
    text) for a folder whose export did not keep them."""
    return read_state(model_dir).get("text_forms", {})


def record_shapesbench(model_dir: str | Path, summary: dict, seed: int) -> Path:
    """Keep a ShapesBench summary in the model folder, with the trained step it was measured at and the
    benchmark's seed, and show it in the card. Returns the card's path."""
    model_dir = Path(model_dir)
    record = {"step": exported_step(model_dir), "seed": seed, **summary}
    tmp = model_dir / (BENCH + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, model_dir / BENCH)
    return refresh_model_card(model_dir) or model_dir / CARD
