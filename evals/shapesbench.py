"""ShapesBench through the pipeline: draw the fixed benchmark set, generate answers in batches, score them.

    pipe = MMGenPipeline.from_pretrained(None)
    summary = run_shapesbench(pipe, n=200, out_dir="runs/shapesbench")

The samples come from `mmgen.shapesworld.bench_samples` with a fixed seed and the verdicts from its
scorers, so two models run with the same seed answer the same prompts and are judged the same way.
Each task gets its own generation limits (one image for text-to-image and editing, none for questions,
one per step for stories). With `out_dir` the run is resumable like every other evaluation here:

    out_dir/results.jsonl   one row per sample, appended as it finishes (`ResultsLog`)
    out_dir/images/         prompt and answer images the rows refer to
    out_dir/settings.json   seed, image size, generation settings and dtype; a rerun must match them
    out_dir/summary.json    the ShapesBench summary (written atomically)
    out_dir/report.md       the summary table, a bar chart per category, grids of successes and failures
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmgen.cli import add_guidance_options, guidance_options
from mmgen.config import DEFAULT_MODEL_DIR
from mmgen.model_card import exported_step, record_shapesbench
from mmgen.segments import Image, Segment, Text, as_segments
from mmgen.shapesworld import TASKS, Sample, bench_samples, score
from mmgen.shapesworld.bench import ANSWER_TYPES
from mmgen.shapesworld.tasks import MAX_STEPS

from .format import atomic_write_text, safe_name, segments_to_json
from .runner import RESULTS_FILE, SUMMARY_FILE, ResultsLog
from .runner import summarize as summarize_rows

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATION_LIMITS",
    "format_summary",
    "main",
    "resolve_categories",
    "run_shapesbench",
    "shapesbench_summary",
]

SETTINGS_FILE = "settings.json"
# (max_new_tokens, max_images) per task; a story's image limit is its number of pictures (see `_limits`).
GENERATION_LIMITS: dict[str, tuple[int, int | None]] = {
    "t2i": (24, 1),
    # room for a plan of the picture, with its tallies or the entries a worked answer copies (ShapesWorld,
    # reading_plans, tallied_answers, worked_answers), before the answer
    "i2t": (56, 0),
    "edit": (24, 1),
    "story": (160, None),
}
# Arguments ShapesBench sets itself, per sample or per task.
_RESERVED = ("prompt", "generator", "output_type", "return_dict", "max_images", "max_new_tokens")
_DEFAULT_IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


def resolve_categories(categories: Iterable[str] | None) -> list[str]:
    """Category names in benchmark order; a task name ("t2i") stands for all of its categories."""
    every = [c for cats in TASKS.values() for c in cats]
    if categories is None:
        return every
    if isinstance(categories, str):
        categories = [categories]
    wanted: set[str] = set()
    for name in categories:
        if name in TASKS:
            wanted.update(TASKS[name])
        elif name in every:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown ShapesBench category {name!r}; expected a task ({', '.join(TASKS)}) "
                f"or a category ({', '.join(every)})"
            )
    if not wanted:
        raise ValueError("categories is empty: name at least one task or category")
    return [c for c in every if c in wanted]


def _select(seed: int, n: int, size: int, categories: list[str]) -> list[tuple[str, int, Sample]]:
    """(sample id, global index, sample) of the wanted categories. Ids are `task.category.NNNN`."""
    chosen, counts = [], {c: 0 for c in categories}
    for index, sample in enumerate(bench_samples(seed=seed, per_category=n, size=size)):
        if sample.category in counts:
            k = counts[sample.category]
            counts[sample.category] += 1
            chosen.append((f"{sample.task}.{sample.category}.{k:04d}", index, sample))
    return chosen


def _limits(sample: Sample) -> tuple[int, int]:
    """(max_new_tokens, max_images) for one sample: a story may draw as many pictures as it asks for
    (or the most any story has, when the prompt leaves the number open)."""
    max_new_tokens, max_images = GENERATION_LIMITS[sample.task]
    if max_images is None:
        max_images = sample.spec.get("n_steps") or MAX_STEPS
    return max_new_tokens, max_images


def _image_size(pipe: Any) -> int:
    """The picture size the model works at, so prompt images need no resizing; 64 if it cannot tell."""
    try:
        size = int(pipe.model.config.image_size)
    except (AttributeError, TypeError, ValueError):
        return _DEFAULT_IMAGE_SIZE
    return max(size, 16)  # ShapesWorld renders at 16 px or more


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


def _as_text(segments: Sequence[Segment], items: Sequence[Mapping[str, str]] | None = None) -> str:
    """Segments as one string; images as `![image](path)` when saved, else `<image>`."""
    if items is not None:
        return "".join(i["content"] if i["type"] == "text" else f"![image]({i['content']})" for i in items)
    return "".join(s.text if isinstance(s, Text) else "<image>" for s in segments)


def _score(sample: Sample, answer: list[Segment], sample_id: str) -> dict[str, Any]:
    """The scorer's verdict without its task/category labels. A scorer crash counts as a wrong answer
    and is kept in the row, so one odd output cannot stop a long run."""
    try:
        result = score(sample.spec, answer)
    except Exception as err:
        logger.warning("scoring %s failed: %s", sample_id, err)
        result = {"correct": 0.0, "score_error": f"{type(err).__name__}: {err}"}
        if sample.task == "story":
            result.update(structure=False, consistency=0.0)
    return {k: v for k, v in result.items() if k not in ("task", "category")}


def _row(
    sample_id: str,
    sample: Sample,
    answer: list[Segment],
    seconds: float,
    out_dir: Path | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"id": sample_id, "task": sample.task, "category": sample.category, "status": "ok"}
    scores = _score(sample, answer, sample_id)  # before saving: scoring reads the images in memory
    if out_dir is not None:
        stem = safe_name(sample_id)
        prompt_items = segments_to_json(sample.prompt, out_dir, f"images/{stem}_p")
        output = segments_to_json(answer, out_dir, f"images/{stem}_o")
        row["prompt"] = _as_text(sample.prompt, prompt_items)
        row["answer"] = _as_text(answer, output)
        row["output"] = output
    else:
        row["prompt"] = _as_text(sample.prompt)
        row["answer"] = _as_text(answer)
    row["reference"] = _as_text(sample.answer)
    row["scores"] = scores
    row["seconds"] = round(seconds, 4)
    return row


def _answers(output: Any, expected: int) -> list[list[Segment]]:
    """The per-prompt segment lists of a pipeline output (or of a plain list of them)."""
    rows = output.segments if hasattr(output, "segments") else output
    if not isinstance(rows, (list, tuple)) or len(rows) != expected:
        raise ValueError(f"the pipeline returned {len(rows) if isinstance(rows, (list, tuple)) else rows!r} "
                         f"answers for {expected} prompts")
    answers = [as_segments(list(r)) for r in rows]
    for answer in answers:
        if any(isinstance(s, Image) and s.image is None for s in answer):
            raise ValueError("the pipeline returned latent-only images; ShapesBench needs output_type='pil'")
    return answers


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def shapesbench_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Headline accuracies (all in [0, 1]) from result rows, plus `n` per score.

    Keys: each text-to-image category by name and `t2i_overall` (mean over those categories); each
    image-to-text category by name, `image_to_text`, and the questions by answer type across categories
    (`answers_yes_no`, `answers_number`, `answers_other`); `story_given`, `story_free` (structure times
    consistency), `story_structure`, `story_consistency`; `edit_<kind>` and `edit`; `position_direction`, of
    the position images that show both objects once on the relation's axis, the share that point the way the
    prompt asks (0.5 for a model blind to it; see `relation_reading`). Tasks and categories with no rows are
    left out.
    """
    by_category: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_category.setdefault((row["task"], row["category"]), []).append(row)
    summary: dict[str, Any] = {}
    n: dict[str, int] = {}

    def put(name: str, value: float, count: int) -> None:
        summary[name] = value
        n[name] = count

    def correct(rs: Sequence[Mapping[str, Any]]) -> float:
        return _mean([float(r["scores"]["correct"]) for r in rs])

    for task, aggregate, prefix in (("t2i", "t2i_overall", ""), ("i2t", "image_to_text", ""),
                                    ("story", None, "story_"), ("edit", "edit", "edit_")):
        present = [c for c in TASKS[task] if (task, c) in by_category]
        if not present:
            continue
        for c in present:
            put(prefix + c, correct(by_category[task, c]), len(by_category[task, c]))
        task_rows = [r for c in present for r in by_category[task, c]]
        if task == "story":
            put("story_structure", _mean([float(bool(r["scores"]["structure"])) for r in task_rows]), len(task_rows))
            put("story_consistency", _mean([float(r["scores"]["consistency"]) for r in task_rows]), len(task_rows))
        else:
            # The mean over categories, so a category counts the same however many samples it has.
            put(aggregate, _mean([summary[prefix + c] for c in present]), len(task_rows))
        if task == "i2t":
            for kind in ANSWER_TYPES:
                typed = [r for r in task_rows if r["scores"].get("answer_type") == kind]
                if typed:
                    put(f"answers_{kind.replace('/', '_')}", correct(typed), len(typed))
    readings = [r["scores"].get("relation") for r in by_category.get(("t2i", "position"), [])]
    placed = [reading for reading in readings if reading in ("held", "reversed")]
    if placed:
        put("position_direction", _mean([float(reading == "held") for reading in placed]), len(placed))
    summary["n"] = n
    return summary


_HEADLINE = ("t2i_overall", "image_to_text", "story_structure", "story_consistency", "edit")


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown table: the headline scores first, then every category."""
    names = [k for k in _HEADLINE if k in summary]
    names += [k for k in summary if k not in names and isinstance(summary[k], float)]
    counts = summary.get("n") or {}
    lines = ["| score | accuracy | n |", "|---|---|---|"]
    lines += [f"| {name} | {summary[name]:.3f} | {counts.get(name, '')} |" for name in names]
    return "\n".join(lines)


def _write_outputs(out_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """summary.json, then report.md: the ShapesBench table above the generic report of the rows."""
    from .report import write_report

    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    # The generic report groups by `category`; "add" or "free" alone would be ambiguous, so prefix the task.
    labelled = [{**r, "category": f"{r['task']}/{r['category']}"} for r in rows]
    path = write_report(out_dir, summarize_rows(labelled), labelled, title="ShapesBench", key_metric="correct")
    title, _, rest = path.read_text(encoding="utf-8").partition("\n")
    table = f"## ShapesBench summary\n\n{format_summary(summary)}\n"
    atomic_write_text(path, f"{title}\n\n{table}{rest}")
    return path


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix rows made with different seeds or generation settings in one folder."""
    settings = json.loads(json.dumps(settings, default=str))  # the form it takes on disk
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            raise ValueError(
                f"{out_dir} holds a ShapesBench run with other settings ({before}); this run has {settings}. "
                "Use a new folder, or the same settings to resume."
            )
        return
    atomic_write_text(path, json.dumps(settings, indent=2))


def effective_generation(pipe, generation_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The generation settings a run uses: the pipeline's defaults for its call arguments, overridden by the
    ones given. Recording these rather than the given ones alone keeps a folder from resuming silently
    under a default that has changed since it was started."""
    try:
        parameters = inspect.signature(pipe).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: only what was given is known
        parameters = []
    defaults = {
        p.name: p.default for p in parameters
        if p.default is not inspect.Parameter.empty and p.name not in _RESERVED
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    settings = {**defaults, **generation_kwargs}
    scheduler = getattr(getattr(pipe, "scheduler", None), "config", None)
    if scheduler is not None:  # its shift and sampler shape the pictures as much as the call's arguments
        settings["scheduler"] = {key: value for key, value in scheduler.items() if not key.startswith("_")}
    return settings


def run_shapesbench(
    pipe: Any,
    n: int = 200,
    seed: int = 0,
    categories: list[str] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    image_size: int | None = None,
    **generation_kwargs: Any,
) -> dict:
    """Run ShapesBench on `pipe` (an `MMGenPipeline`, or anything called the same way) and return the
    summary of `shapesbench_summary`.

    `n` samples per category are drawn from the world of `seed`; `categories` takes category or task
    names (default: all). `generation_kwargs` go to every pipeline call (`num_inference_steps`,
    `guidance_scale`, ...); token and image limits are set per task (`GENERATION_LIMITS`). Each prompt
    gets its own generator seeded from `seed` and the sample, so an answer does not depend on its batch.
    With `out_dir`, rows are logged as they finish and a rerun resumes (see the module docstring).
    `image_size` is the size prompts are drawn at (default: the model's).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (samples per category), got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    reserved = sorted(set(generation_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(f"ShapesBench sets {', '.join(reserved)} itself; do not pass them")
    if not callable(pipe):
        raise ValueError(f"pipe must be callable like MMGenPipeline, got {type(pipe).__name__}")
    wanted = resolve_categories(categories)
    size = image_size if image_size is not None else _image_size(pipe)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar over samples instead of one per image

    selected = _select(seed, n, size, wanted)
    log: ResultsLog | None = None
    done: dict[str, dict[str, Any]] = {}
    folder = None if out_dir is None else Path(out_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        dtype = str(getattr(pipe, "dtype", torch.float32)).removeprefix("torch.")
        _check_settings(folder, {"seed": seed, "image_size": size, "dtype": dtype,
                                 "generation": effective_generation(pipe, generation_kwargs)})
        log = ResultsLog(folder / RESULTS_FILE)
    todo = [item for item in selected if log is None or item[0] not in log]
    if len(todo) < len(selected):
        logger.info("resuming in %s: %d of %d samples already done", folder, len(selected) - len(todo), len(selected))

    # Batch samples that share their limits, since the limits are arguments of the whole call.
    groups: dict[tuple[int, int], list[tuple[str, int, Sample]]] = {}
    for item in todo:
        groups.setdefault(_limits(item[2]), []).append(item)
    device = getattr(pipe, "device", None) or "cpu"
    with tqdm(total=len(todo), desc="ShapesBench", unit="sample", disable=not progress) as bar:
        for (max_new_tokens, max_images), items in groups.items():
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                generators = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for _, i, _ in batch]
                began = time.perf_counter()
                output = pipe(
                    [list(sample.prompt) for _, _, sample in batch],
                    max_new_tokens=max_new_tokens,
                    max_images=max_images,
                    generator=generators,
                    output_type="pil",
                    **generation_kwargs,
                )
                seconds = (time.perf_counter() - began) / len(batch)
                for (sample_id, _, sample), answer in zip(batch, _answers(output, len(batch))):
                    row = _row(sample_id, sample, answer, seconds, folder)
                    done[sample_id] = log.append(row) if log is not None else row
                bar.update(len(batch))

    rows = [log.get(sid) if log is not None else done[sid] for sid, _, _ in selected]
    summary = shapesbench_summary(rows)
    if folder is not None:
        report = _write_outputs(folder, summary, rows)
        logger.info("ShapesBench report written to %s", report)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of `mmgen eval shapesbench`."""
    parser = argparse.ArgumentParser(
        prog="mmgen eval shapesbench", description="Run ShapesBench on a model and write a report."
    )
    parser.add_argument("--model", default="default", help="a pipeline folder, or 'default' for the embedded model")
    parser.add_argument("-o", "--output", required=True, help="run folder; rerunning on it resumes")
    parser.add_argument("--categories", nargs="+", default=None,
                        help="tasks or categories, space- or comma-separated (default: all)")
    parser.add_argument("--n", type=int, default=200,
                        help="samples per category; the set depends on n: a smaller n is not the start of a larger one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the benchmark set and of generation")
    parser.add_argument("--batch-size", type=int, default=8)
    add_guidance_options(parser)
    parser.add_argument("--compression", default=None, help="compression of context images (default: none)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--save-to-model", action="store_true",
                        help="keep the summary in the model folder (shapesbench.json) and show it in its model card; "
                             "for a run of every category with the default generation settings in float32")
    return parser


def _check_card_run(model_dir: Path, categories: list[str] | None, generation: Mapping[str, Any], dtype: str) -> None:
    """A model card's table claims every category with the default steps and guidance: refuse, before the
    run, to put anything else there."""
    exported_step(model_dir)
    if categories is not None and resolve_categories(categories) != resolve_categories(None):
        raise ValueError("--save-to-model needs every category: leave out --categories")
    if generation or dtype != "float32":
        raise ValueError("--save-to-model needs the default generation settings in float32: leave out "
                         "--steps, the guidance options, --image-candidates, --compression and --dtype")


def main(argv: list[str] | None = None) -> int:
    """`mmgen eval shapesbench ...`: run, print the summary table and where the report went."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help, or a usage error already printed by argparse
        return int(stop.code or 0)
    categories = None
    if args.categories:
        categories = [c.strip() for item in args.categories for c in item.split(",") if c.strip()]
    generation = guidance_options(args)
    if args.compression is not None:
        generation["compression"] = args.compression
    try:
        resolve_categories(categories)  # a typo fails before the model loads
        model_dir = DEFAULT_MODEL_DIR if args.model == "default" else Path(args.model)
        if args.save_to_model:
            _check_card_run(model_dir, categories, generation, args.dtype)
        from mmgen.pipelines import MMGenPipeline

        pipe = MMGenPipeline.from_pretrained(None if args.model == "default" else args.model, dtype=args.dtype)
        summary = run_shapesbench(
            pipe, n=args.n, seed=args.seed, categories=categories, out_dir=args.output,
            batch_size=args.batch_size, progress=not args.no_progress, **generation,
        )
        if args.save_to_model:
            print(f"model card: {record_shapesbench(model_dir, summary, args.seed)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"mmgen eval shapesbench: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"report: {Path(args.output) / 'report.md'}")
    print(f"summary: {Path(args.output) / SUMMARY_FILE}")
    return 0
