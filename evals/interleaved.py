"""One call for a whole interleaved-benchmark evaluation, as `mmgen eval interleaved` runs it.

    config = InterleavedEvalConfig(benchmark="isg", data="ISG-Bench.jsonl", out_dir="runs/isg")
    run = evaluate_interleaved(config, generate_fn=lambda query: pipeline(query).segments)

It reads the benchmark through its adapter, builds the scorers the config asks for (weight-free
reference metrics, CLIP from a local checkpoint, an HTTP judge), runs or resumes the evaluation in
`out_dir`, and writes the outputs again in the benchmark's own layout under `out_dir/predictions/`
so its official scripts can score them too.

From the command line (`main`), a pipeline folder (or the embedded default model) provides
`generate_fn`; it is loaded only when some sample still needs an output:

    mmgen eval interleaved --benchmark isg --data ISG-Bench.jsonl --model default -o runs/isg
    mmgen eval interleaved --benchmark isg --data ISG-Bench.jsonl --predictions other/predictions -o runs/other
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mmgen.segments import Segment

from .adapters import ADAPTERS, get_adapter
from .judge import JudgeClient, JudgeScorer, get_rubric
from .metrics import ReferenceScorer
from .runner import EvalRun, Scorer, outputs_from_rows, run_eval, score_predictions

logger = logging.getLogger(__name__)

__all__ = ["InterleavedEvalConfig", "PipelineGenerator", "build_scorers", "evaluate_interleaved", "main"]


@dataclass
class InterleavedEvalConfig:
    """Settings of one interleaved-benchmark evaluation (parsable with transformers' HfArgumentParser)."""

    benchmark: str = field(metadata={"help": f"benchmark adapter: one of {sorted(ADAPTERS)}"})
    data: str = field(metadata={"help": "the benchmark's data file (json or jsonl)"})
    out_dir: str = field(metadata={"help": "run folder; rerunning on it resumes"})
    images_dir: str | None = field(
        default=None,
        metadata={"help": "folder image paths are relative to (default: the data file's folder)"},
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})
    predictions_dir: str | None = field(
        default=None,
        metadata={"help": "score existing outputs in the benchmark's layout instead of generating"},
    )
    reference_metrics: bool = field(
        default=True, metadata={"help": "structure, image count/order, SSIM, PSNR, ROUGE-L"}
    )
    image_size: int = field(default=256, metadata={"help": "common size images are resized to for SSIM/PSNR"})
    clip_checkpoint: str | None = field(
        default=None, metadata={"help": "local open_clip checkpoint file for CLIPScore"}
    )
    clip_arch: str | None = field(
        default=None, metadata={"help": "open_clip architecture name of the checkpoint, e.g. ViT-B-32"}
    )
    judge_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"}
    )
    judge_model: str | None = field(
        default=None, metadata={"help": "model name to send to the judge endpoint"}
    )
    judge_rubric: str = field(
        default="interleaved_eval", metadata={"help": "interleaved_eval, opening or llm_i"}
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "environment variable holding the judge's API key, if any"},
    )
    judge_timeout: float = field(default=120.0, metadata={"help": "seconds per judge request"})
    judge_retries: int = field(
        default=3, metadata={"help": "retries per sample after the first judge attempt"}
    )
    on_error: str = field(
        default="raise", metadata={"help": "raise: stop at a failing sample; record: log it and go on"}
    )
    write_benchmark_predictions: bool = field(
        default=True, metadata={"help": "also write outputs in the benchmark's layout"}
    )
    title: str | None = field(default=None, metadata={"help": "report title"})

    def __post_init__(self):
        get_adapter(self.benchmark)  # fails early with the list of known names
        if (self.judge_url is None) != (self.judge_model is None):
            raise ValueError("judge_url and judge_model go together: give both or neither")
        if (self.clip_checkpoint is None) != (self.clip_arch is None):
            raise ValueError("clip_checkpoint and clip_arch go together: give both or neither")
        if self.on_error not in ("raise", "record"):
            raise ValueError(f"on_error must be 'raise' or 'record', got {self.on_error!r}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be non-negative, got {self.limit}")
        if self.judge_url is not None:
            get_rubric(self.judge_rubric)


def build_scorers(config: InterleavedEvalConfig) -> list[Scorer]:
    """The scorers `config` asks for, in the order reference, CLIP, judge."""
    scorers: list[Scorer] = []
    if config.reference_metrics:
        scorers.append(ReferenceScorer(image_size=config.image_size))
    if config.clip_checkpoint is not None:
        from .clip_score import load_clip_scorer

        scorers.append(load_clip_scorer(config.clip_checkpoint, config.clip_arch))
    if config.judge_url is not None:
        client = JudgeClient(
            url=config.judge_url,
            model=config.judge_model,
            api_key=os.environ.get(config.judge_api_key_env) or None,
            timeout=config.judge_timeout,
            max_retries=config.judge_retries,
        )
        scorers.append(JudgeScorer(client, get_rubric(config.judge_rubric)))
    return scorers


def evaluate_interleaved(
    config: InterleavedEvalConfig, generate_fn: Callable[[list[Segment]], Any] | None = None
) -> EvalRun:
    """Run (or resume) one benchmark evaluation; see the module docstring."""
    adapter = get_adapter(config.benchmark)
    samples = adapter.read(config.data, config.images_dir, config.limit)
    scorers = build_scorers(config)
    title = config.title or f"{config.benchmark} evaluation"
    if config.predictions_dir is not None:
        predictions = adapter.read_predictions(config.predictions_dir)
        wanted = {s.id for s in samples}
        predictions = [p for p in predictions if p.id in wanted]  # --limit may have cut the samples
        run = score_predictions(samples, predictions, config.out_dir, scorers, on_error="record", title=title)
    else:
        if generate_fn is None:
            raise ValueError("generate_fn is required unless predictions_dir is given")
        run = run_eval(samples, generate_fn, config.out_dir, scorers, on_error=config.on_error, title=title)
    if config.write_benchmark_predictions and config.predictions_dir is None:
        target = Path(config.out_dir) / "predictions"
        written = adapter.write_predictions(samples, outputs_from_rows(run.rows, config.out_dir), target)
        logger.info("wrote %s predictions for the official scripts to %s", config.benchmark, written)
    return run


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _model_dir(model: str | None) -> Path:
    """The pipeline folder `model` names ('default' or None: the embedded model); it must be complete."""
    from mmgen.config import DEFAULT_MODEL_DIR

    path = DEFAULT_MODEL_DIR if model in (None, "default") else Path(model)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model folder not found or incomplete (no model_index.json): {path}")
    return path


class PipelineGenerator:
    """A `generate_fn` backed by an `MMGenPipeline` that is loaded on the first call, so a run whose
    samples are all done (or that only scores predictions) never pays for loading the model.

    Every sample gets a generator seeded with `seed`, so an output does not depend on the order of the
    samples or on where an interrupted run resumed.
    """

    def __init__(self, model: str | None, seed: int = 0, **generation_kwargs: Any):
        self.model_dir = _model_dir(model)
        self.seed = seed
        self.generation_kwargs = generation_kwargs
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            from mmgen.pipelines import MMGenPipeline

            logger.info("loading the pipeline from %s", self.model_dir)
            self._pipe = MMGenPipeline.from_pretrained(self.model_dir)
            self._pipe.set_progress_bar_config(disable=True)  # the runner shows one bar over samples
        return self._pipe

    def __call__(self, query: list[Segment]) -> list[Segment]:
        import torch

        pipe = self.pipe
        generator = torch.Generator(device=pipe.device).manual_seed(self.seed)
        out = pipe([list(query)], generator=[generator], output_type="pil", **self.generation_kwargs)
        return out.segments[0]


def _help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(InterleavedEvalConfig) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    """The options of `mmgen eval interleaved`."""
    parser = argparse.ArgumentParser(
        prog="mmgen eval interleaved",
        description="Evaluate interleaved generation on a public benchmark (or score existing outputs).",
    )
    parser.add_argument("--benchmark", required=True, help=_help("benchmark"))
    parser.add_argument("--data", required=True, help=_help("data"))
    parser.add_argument("-o", "--output", required=True, help=_help("out_dir"))
    parser.add_argument("--images", default=None, help=_help("images_dir"))
    parser.add_argument("--limit", type=int, default=None, help=_help("limit"))
    parser.add_argument("--predictions", default=None, help=_help("predictions_dir"))
    parser.add_argument("--title", default=None, help=_help("title"))
    parser.add_argument("--on-error", default="raise", choices=["raise", "record"], help=_help("on_error"))
    parser.add_argument("--no-reference-metrics", action="store_true", help="skip: " + _help("reference_metrics"))
    parser.add_argument("--image-size", type=int, default=256, help=_help("image_size"))
    parser.add_argument("--no-benchmark-predictions", action="store_true",
                        help="do not " + _help("write_benchmark_predictions"))

    clip = parser.add_argument_group("CLIPScore")
    clip.add_argument("--clip-checkpoint", default=None, help=_help("clip_checkpoint"))
    clip.add_argument("--clip-arch", default=None, help=_help("clip_arch"))

    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge-url", default=None, help=_help("judge_url"))
    judge.add_argument("--judge-model", default=None, help=_help("judge_model"))
    judge.add_argument("--judge-rubric", default="interleaved_eval", help=_help("judge_rubric"))
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help=_help("judge_api_key_env"))
    judge.add_argument("--judge-timeout", type=float, default=120.0, help=_help("judge_timeout"))
    judge.add_argument("--judge-retries", type=int, default=3, help=_help("judge_retries"))

    gen = parser.add_argument_group("generation (defaults: the pipeline's)")
    gen.add_argument("--model", default="default", help="a pipeline folder, or 'default' for the embedded model")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="flow steps per image")
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--image-guidance-scale", type=float, default=None)
    gen.add_argument("--max-images", type=int, default=None)
    gen.add_argument("--compression", default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`mmgen eval interleaved ...`: run or resume an evaluation, print the scores and the report path."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help, or a usage error already printed by argparse
        return int(stop.code or 0)
    generation = {
        key: value
        for key, value in (
            ("max_new_tokens", args.max_new_tokens),
            ("num_inference_steps", args.steps),
            ("guidance_scale", args.guidance_scale),
            ("image_guidance_scale", args.image_guidance_scale),
            ("max_images", args.max_images),
            ("compression", args.compression),
            ("temperature", args.temperature),
        )
        if value is not None
    }
    try:
        config = InterleavedEvalConfig(
            benchmark=args.benchmark,
            data=args.data,
            out_dir=args.output,
            images_dir=args.images,
            limit=args.limit,
            predictions_dir=args.predictions,
            reference_metrics=not args.no_reference_metrics,
            image_size=args.image_size,
            clip_checkpoint=args.clip_checkpoint,
            clip_arch=args.clip_arch,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            judge_rubric=args.judge_rubric,
            judge_api_key_env=args.judge_api_key_env,
            judge_timeout=args.judge_timeout,
            judge_retries=args.judge_retries,
            on_error=args.on_error,
            write_benchmark_predictions=not args.no_benchmark_predictions,
            title=args.title,
        )
        generate_fn = None
        if config.predictions_dir is None:
            generate_fn = PipelineGenerator(args.model, seed=args.seed, **generation)
        run = evaluate_interleaved(config, generate_fn)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmgen eval interleaved: error: {err}", file=sys.stderr)
        return 2
    summary = run.summary
    print(f"samples: {summary['n_samples']}, done: {summary['n_done']}, errors: {summary['n_errors']}")
    for name, metric in (summary.get("metrics") or {}).items():
        print(f"{name}: {metric['mean']:.4g} (n={metric['n']})")
    print(f"report: {Path(config.out_dir) / 'report.md'}")
    return 0
