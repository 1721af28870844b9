"""Benchmark case `compression`: what each visual-token compression method saves and what it costs in quality.

For `none` and, per method, the levels with 4× and 8× fewer tokens per context image (pool:2 for 4×;
pool has no 8× level, so pool:4 at 16× is shown instead), on the same model in one process:

- tokens per context image, and KV-cache bytes per image: the bytes the image's vision tokens occupy in
  the pipeline's cache (`BatchCache.nbytes` after appending only them), so they fall exactly with the
  token count; the two `<|image_start|>`/`<|image_end|>` tokens every image also has are left out;
- prefill seconds of a context of 16 ShapesWorld images (latents ready) and a question: embedding and
  compression (prune-attn's scoring pass included) plus the backbone pass, median over repeats;
- decode tokens/s after that prefill: greedy single-token steps on the same cache;
- ShapesBench image→text accuracy (40 per category) and story consistency (32 per category) with that
  compression (given and generated images); retention = the smaller of the two shares of `none`'s score
  that the level keeps, since the bar asks each to hold.

With `quick`: a 4-image context, one repeat, 4 decode steps, 2 flow steps and one colour question per level
(no stories).

Ratios: `best_retention_at_4x` / `_8x` (the best method at that level), `kv_bytes_ratio_at_4x` (none / 4×)
and `prefill_speedup_at_4x` (none / pool:2, the 4× level the model was trained with). A plot of accuracy
against tokens per image goes to `out_dir/compression_accuracy.png`. A method the model cannot run (no
trained resampler, prune-attn on a backbone without q_proj/k_proj) gets a row saying why.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path

import torch

from mmgen.compression import CompressionSpec
from mmgen.pipelines.decoding import BatchCache, Chunk
from mmgen.segments import Image, Segment, Text
from mmgen.shapesworld import ShapesWorld

from .bench import BenchOptions, CaseResult, bench_case, median_seconds

logger = logging.getLogger(__name__)

LEARNED_OR_SCORED = ("merge", "prune-dup", "prune-attn", "dct", "resampler")
CONTEXT_IMAGES = 16
DECODE_TOKENS = 32
# ShapesBench samples per category and task: questions are cheap, stories draw several pictures each. Levels
# differ by a few story steps the detector scores the other way; at 16 stories per category one such step
# moved retention by 3%, too coarse for a 95% bar, hence 32.
SHAPESBENCH_N = {"i2t": 40, "story": 32}  # 5 image→text categories, 2 story categories
QUICK_SHAPESBENCH_N = {"color_qa": 1}  # a smoke test: one question per level, no stories


def compression_levels(pipe) -> list[tuple[str, int]]:
    """(spec, reduction factor) for none, the 4× and 8× levels of every method, and pool:4."""
    compressor = pipe.unified.image_modules.compressor
    grid = compressor.grid_size
    full = grid * grid
    levels = [("none", 1)]
    for factor in (4, 8):
        if full % factor:
            continue
        if factor == 4 and grid % 2 == 0:
            levels.append(("pool:2", 4))
        levels += [(f"{method}:{full // factor}", factor) for method in LEARNED_OR_SCORED]
    if grid % 4 == 0:
        levels.append(("pool:4", 16))
    return levels


def _context(pipe, n_images: int, seed: int) -> list[Segment]:
    """n ShapesWorld scenes with latents, then a question."""
    world = ShapesWorld(seed=seed, size=pipe.unified.image_modules.config.image_size)
    images = []
    while len(images) < n_images:
        sample = world.sample(task="i2t")
        images += [Image(image=s.image) for s in sample.prompt if isinstance(s, Image)]
    segments: list[Segment] = []
    for k, image in enumerate(images[:n_images]):
        segments += [Text(f" picture {k + 1}:" if k else f"picture {k + 1}:"), image]
    segments.append(Text(" what colour is the circle in the last picture?"))
    return pipe.encode_images(segments)


def _prefill(pipe, segments: list[Segment], spec: str) -> tuple[BatchCache, torch.Tensor, int]:
    """Prefill a fresh cache with the context as the pipeline does; returns it, the last hidden state, next position."""
    model, codec = pipe.unified, pipe.codec
    count = model.image_modules.compressor.num_tokens(spec)
    n_images = sum(isinstance(s, Image) for s in segments)
    encoded = codec.encode(segments, [count] * n_images, compressions=[spec] * n_images)
    embeds = model.embed(encoded.input_ids[None].to(model.device), [(0, s) for s in encoded.spans], encoded.latents)[0]
    cache = BatchCache(model, 1)
    keep = torch.ones(len(encoded), dtype=torch.bool, device=model.device)
    hidden = cache.forward([Chunk(embeds, encoded.position_ids.to(model.device), keep)])[0]
    return cache, hidden[-1], encoded.next_position


def _decode_seconds(pipe, cache: BatchCache, last: torch.Tensor, position: int, tokens: int) -> float:
    """Seconds for `tokens` greedy single-token steps on `cache`."""
    model = pipe.unified
    started = time.perf_counter()
    for step in range(tokens):
        token = model.logits(last[None]).argmax(-1)
        chunk = Chunk(model.text_embeddings(token), torch.tensor([position + step], device=model.device),
                      torch.ones(1, dtype=torch.bool, device=model.device))
        last = cache.forward([chunk])[0][-1]
    return time.perf_counter() - started


def kv_bytes_per_image(pipe, segments: list[Segment], spec: str) -> int:
    """Cache bytes of one image's vision tokens under `spec`."""
    model = pipe.unified
    latent = next(s.latent for s in segments if isinstance(s, Image))
    vision = model.image_embeddings(latent[None].to(model.device), spec)[0]
    cache = BatchCache(model, 1)
    n = vision.shape[0]
    cache.forward([Chunk(vision, torch.ones(n, dtype=torch.long, device=model.device),
                         torch.ones(n, dtype=torch.bool, device=model.device))])
    return cache.nbytes()


QUALITY = ("i2t_accuracy", "story_consistency")  # what a compression level must keep of `none`'s


def retention(row: dict, baseline: dict) -> float:
    """The smallest share of the baseline's scores that `row` keeps over `QUALITY` (scores a run did not
    measure, or that the baseline has at zero, are left out; none left: NaN)."""
    shares = [row[k] / baseline[k] for k in QUALITY
              if not math.isnan(row.get(k, math.nan)) and baseline.get(k, 0.0) > 0]
    return min(shares) if shares else math.nan


@bench_case("compression")
@torch.no_grad()
def compression_case(pipe, options: BenchOptions) -> CaseResult:
    """Tokens, KV bytes, prefill time, decode speed and ShapesBench quality per compression level."""
    from .shapesbench import run_shapesbench

    quick = options.quick
    repeats = 1 if quick else options.repeats
    context = _context(pipe, 4 if quick else CONTEXT_IMAGES, options.seed)
    generation = dict(num_inference_steps=2) if quick else {}  # else the pipeline's defaults
    decode_tokens = 4 if quick else DECODE_TOKENS
    rows: list[dict] = []
    for spec, factor in compression_levels(pipe):
        row: dict = {"compression": spec, "reduction": f"{factor}x"}
        try:
            tokens = pipe.unified.image_modules.compressor.num_tokens(spec)
            row["tokens_per_image"] = tokens
            row["kv_bytes_per_image"] = kv_bytes_per_image(pipe, context, spec)
        except ValueError as err:
            logger.info("compression bench: skipping %s: %s", spec, err)
            rows.append({**row, "note": str(err).split(";")[0]})
            continue
        row["prefill_s"] = median_seconds(lambda spec=spec: _prefill(pipe, context, spec), repeats)
        decode = [_decode_seconds(pipe, *_prefill(pipe, context, spec), decode_tokens) for _ in range(repeats + 1)]
        row["decode_tok_s"] = decode_tokens / statistics.median(decode[1:])  # the first run is a warm-up
        summary = {}
        for category, n in (QUICK_SHAPESBENCH_N if quick else SHAPESBENCH_N).items():
            summary.update(run_shapesbench(pipe, n=n, seed=options.seed, categories=[category], progress=False,
                                           compression=spec, **generation))
        row["i2t_accuracy"] = summary.get("image_to_text", float("nan"))
        row["story_consistency"] = summary.get("story_consistency", float("nan"))
        rows.append(row)

    measured = [r for r in rows if "i2t_accuracy" in r]
    baseline = next(r for r in measured if r["compression"] == "none")
    for r in measured:
        r["retention"] = retention(r, baseline)

    def best(factor: str) -> float:
        values = [r["retention"] for r in measured if r["reduction"] == factor and not math.isnan(r["retention"])]
        return max(values) if values else float("nan")

    at_4x = [r for r in measured if r["reduction"] == "4x"]
    pool2 = next((r for r in at_4x if r["compression"] == "pool:2"), None)
    ratios = {
        "best_retention_at_4x": best("4x"),
        "best_retention_at_8x": best("8x"),
        "kv_bytes_ratio_at_4x": baseline["kv_bytes_per_image"] / at_4x[0]["kv_bytes_per_image"] if at_4x else float("nan"),
        "prefill_speedup_at_4x": baseline["prefill_s"] / pool2["prefill_s"] if pool2 else float("nan"),
    }
    plot_accuracy(measured, Path(options.out_dir) / "compression_accuracy.png")
    return CaseResult("compression", rows, ratios)


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    """Image→text accuracy and story consistency against tokens per image, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    baseline = next(r for r in rows if r["compression"] == "none")
    methods = list(dict.fromkeys(CompressionSpec.parse(r["compression"]).method for r in rows if r is not baseline))
    for axis, key, title in zip(figure.subplots(1, 2), ("i2t_accuracy", "story_consistency"),
                                ("ShapesBench image→text accuracy", "ShapesBench story consistency")):
        axis.set_title(title)
        if all(math.isnan(r[key]) for r in rows):
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
            continue
        for method in methods:
            points = sorted((r["tokens_per_image"], r[key]) for r in rows
                            if CompressionSpec.parse(r["compression"]).method == method)
            points.append((baseline["tokens_per_image"], baseline[key]))
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        axis.scatter([baseline["tokens_per_image"]], [baseline[key]], color="black", zorder=3, label="none")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per context image")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    figure.axes[0].set_ylabel("score")
    figure.axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
