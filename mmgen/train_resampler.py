"""Train the learned resampler (compression `resampler:R`) of a finished model, everything else frozen.

    python -m mmgen.train_resampler configs/resampler.yaml [--max_steps 300 ...]

The model's image modules are rebuilt with one query set per level in `levels` (their other weights are
copied), then only the resampler learns, on ShapesWorld samples whose images all enter the context through
it (a level drawn per image, Matryoshka-style). The loss is the model's own text loss plus distillation
towards the same model reading the images uncompressed: KL between their next-token distributions at
every answer token, and MSE between the query states of every generated image (what conditions the flow
head, so story and edit pictures keep seeing what the full image showed). The finished pipeline is saved
to `output_dir`, written to a temporary folder first and swapped in, so a crash leaves the old one whole.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import DEFAULT_MODEL_DIR, parse_config
from .data import batch_seed
from .model import RESAMPLER_PREFIX, ImageModules, UnifiedModel, cosine_with_warmup
from .model_card import RESAMPLER_RECIPE, refresh_model_card, trained_text_forms
from .segments import Image
from .stream import IGNORE_INDEX, EncodedSequence, PackedBatch, StreamCodec, pack_sequences
from .training import swap_folder_contents

logger = logging.getLogger(__name__)


@dataclass
class ResamplerArguments:
    """The resampler recipe."""

    model: str = field(default=str(DEFAULT_MODEL_DIR), metadata={"help": "Pipeline folder of the model to extend."})
    output_dir: str = field(default="runs/resampler", metadata={"help": "Where the pipeline with its resampler goes."})
    levels: list[int] = field(default_factory=lambda: [16, 8], metadata={"help": "Token counts R of resampler:R."})
    resampler_layers: int = 2
    resampler_heads: int = 4
    seed: int = 0
    max_steps: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    distill_weight: float = field(default=1.0, metadata={"help": "KL to the uncompressed model's next tokens."})
    query_weight: float = field(default=1.0, metadata={"help": "MSE to its query states of generated images."})
    task_weights: dict | None = field(default=None, metadata={"help": "ShapesWorld task mix; tasks with images."})
    log_every: int = 20
    save_every: int = 200


DEFAULT_TASKS = {"i2t": 3.0, "story": 2.0, "edit": 1.0}


def with_resampler(pipe, levels: list[int], num_layers: int, num_heads: int) -> ImageModules:
    """Give `pipe` image modules with a resampler of `levels`, keeping every other weight (and a resampler
    of the same shape, if it has one). Returns the modules now registered in the pipeline."""
    old = pipe.model
    names = [p for p in inspect.signature(ImageModules.__init__).parameters if p != "self"]
    config = {k: old.config[k] for k in names if k in old.config}
    wanted = dict(resampler_queries=sorted(set(levels)), resampler_layers=num_layers, resampler_heads=num_heads)
    current = dict(resampler_queries=sorted(config.get("resampler_queries") or []),
                   resampler_layers=config.get("resampler_layers"), resampler_heads=config.get("resampler_heads"))
    if current == wanted:
        return old
    new = ImageModules(**{**config, **wanted}).to(old.device, old.dtype)
    old_state = old.state_dict()
    new_keys = new.state_dict()
    transferable = {k: v for k, v in old_state.items() if k in new_keys and new_keys[k].shape == v.shape}
    missing, _ = new.load_state_dict(transferable, strict=False)
    lost = [k for k in old_state if k not in transferable and not k.startswith(RESAMPLER_PREFIX)]
    if lost or any(not k.startswith(RESAMPLER_PREFIX) for k in missing):
        raise ValueError(f"could not carry the image modules over to a resampler model: {lost or missing}")
    pipe.register_modules(model=new)
    return new


def stack_rows(sequences: list[EncodedSequence], pad_id: int) -> PackedBatch:
    """One sequence per row, in the given order (`pack_sequences` reorders by length), so that two batches
    of the same samples compressed differently hold sample k in row k with its text tokens in order."""
    singles = [pack_sequences([seq], len(seq), pad_id) for seq in sequences]
    rows, length = len(singles), max(len(seq) for seq in sequences)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    modality = torch.zeros((rows, length), dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.full((rows, 1, length, length), torch.finfo(torch.float32).min)
    mask.diagonal(dim1=-2, dim2=-1).zero_()  # padding attends to itself only
    spans, latents = [], []
    for r, single in enumerate(singles):
        n = single.input_ids.shape[1]
        input_ids[r, :n], position_ids[r, :n] = single.input_ids[0], single.position_ids[0]
        modality[r, :n], labels[r, :n] = single.modality[0], single.labels[0]
        mask[r, :, :n, :n] = single.attention_mask[0]
        for _, span in single.spans:
            span.latent_index += len(latents)
            spans.append((r, span))
        latents.extend(single.latents)
    return PackedBatch(input_ids, position_ids, modality, labels, mask, spans, latents)


class ResamplerData:
    """Seeded ShapesWorld batches: the same samples twice, through the resampler and uncompressed. Their text
    takes the forms the model was trained to write (`text_forms`, e.g. a reading plan before each answer): the
    resampler learns to keep what the model reads from a picture in the text it writes about it."""

    def __init__(self, codec: StreamCodec, model: UnifiedModel, args: ResamplerArguments,
                 text_forms: dict[str, float] | None = None):
        from .shapesworld import ShapesWorld

        self.codec, self.model, self.args = codec, model, args
        self.text_forms = dict(text_forms or {})
        weights = args.task_weights or DEFAULT_TASKS
        self.tasks, self.weights = list(weights), [float(weights[t]) for t in weights]
        self.world_cls = ShapesWorld

    def batch(self, step: int) -> tuple[PackedBatch, PackedBatch]:
        seed = batch_seed(self.args.seed, step)
        world = self.world_cls(seed=seed, size=self.model.image_modules.config.image_size, **self.text_forms)
        rng = random.Random(seed)
        samples = [world.sample(task=rng.choices(self.tasks, self.weights)[0]) for _ in range(self.args.batch_size)]
        images = [s for sample in samples for s in sample.prompt + sample.answer if isinstance(s, Image)]
        with torch.no_grad():
            latents = self.model.image_tokenizer.encode([s.image for s in images]).float().cpu()
        for seg, latent in zip(images, latents):
            seg.latent = latent
        compressor = self.model.image_modules.compressor
        student, teacher = [], []
        for sample in samples:
            segments = sample.prompt + sample.answer
            n_images = sum(isinstance(s, Image) for s in segments)
            levels = [f"resampler:{rng.choice(self.args.levels)}" for _ in range(n_images)]
            counts = [compressor.num_tokens(level) for level in levels]
            student.append(self.codec.encode(segments, counts, answer_start=len(sample.prompt), compressions=levels))
            teacher.append(self.codec.encode(segments, [compressor.num_tokens("none")] * n_images,
                                             answer_start=len(sample.prompt)))
        pad = self.codec.ids.pad
        return stack_rows(student, pad), stack_rows(teacher, pad)


def _states(model: UnifiedModel, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (B, L, d) and the query states (n_generated, Q, d) of a batch."""
    emb = model.embed(batch.input_ids, batch.spans, batch.latents)
    hidden, _ = model.run_backbone(emb, batch.position_ids, batch.attention_mask.to(emb.dtype))
    queries = [hidden[row, span.query_slice] for row, span in batch.spans if span.num_queries]
    return hidden, torch.stack(queries) if queries else hidden.new_zeros(0, model.num_queries, hidden.shape[-1])


def resampler_loss(model: UnifiedModel, student: PackedBatch, teacher: PackedBatch, args: ResamplerArguments) -> dict:
    """Text cross-entropy + distill_weight·KL(uncompressed ‖ resampled) + query_weight·MSE(query states)."""
    with torch.no_grad():
        t_hidden, t_queries = _states(model, teacher)
    s_hidden, s_queries = _states(model, student)
    s_picked, t_picked = student.labels != IGNORE_INDEX, teacher.labels != IGNORE_INDEX
    if int(s_picked.sum()) != int(t_picked.sum()) or s_queries.shape != t_queries.shape:
        raise AssertionError("the resampled and the uncompressed batch do not hold the same samples")
    s_logp = model.logits(s_hidden[s_picked]).log_softmax(-1)
    t_logp = model.logits(t_hidden[t_picked]).log_softmax(-1)
    text = F.nll_loss(s_logp, student.labels[s_picked])
    distill = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    query = F.mse_loss(s_queries, t_queries) if s_queries.numel() else s_hidden.sum() * 0.0
    loss = text + args.distill_weight * distill + args.query_weight * query
    return {"loss": loss, "text_loss": text.detach(), "distill": distill.detach(), "query_mse": query.detach()}


def save_pipeline(pipe, folder: str | os.PathLike) -> None:
    """Save to a temporary sibling folder, then swap each item into `folder`."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    swap_folder_contents(tmp, final)


def train_resampler(args: ResamplerArguments, pipe=None) -> list[dict]:
    """Run the recipe; `pipe` defaults to the pipeline in `args.model`. Returns the logged rows."""
    from .pipelines import MMGenPipeline

    if args.max_steps < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        raise ValueError("max_steps and batch_size must be >= 1 and learning_rate > 0")
    if not args.levels:
        raise ValueError("levels is empty: name at least one resampler size, e.g. [16, 8]")
    torch.manual_seed(args.seed)
    if pipe is None:
        pipe = MMGenPipeline.from_pretrained(args.model)
    modules = with_resampler(pipe, list(args.levels), args.resampler_layers, args.resampler_heads)
    model = pipe.unified
    model.requires_grad_(False)
    model.eval()  # frozen parts keep inference behaviour; the resampler has no dropout
    params = list(modules.compressor.resampler.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    forms = trained_text_forms(args.model)
    logger.info("training on ShapesWorld text in the model's forms: %s", json.dumps(forms) if forms else "plain")
    data = ResamplerData(pipe.codec, model, args, forms)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").unlink(missing_ok=True)  # the log of this run only: the recipe always starts at step 1
    rows, window = [], []
    for step in tqdm(range(1, args.max_steps + 1), desc="resampler", disable=not logger.isEnabledFor(logging.INFO)):
        student, teacher = data.batch(step)
        losses = resampler_loss(model, student.to(model.device), teacher.to(model.device), args)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        window.append({k: float(v.detach()) for k, v in losses.items()})
        if step % args.log_every == 0 or step == args.max_steps:
            row = {"step": step, **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
            row["lr"] = schedule.get_last_lr()[0]
            rows.append(row)
            window = []
            logger.info("resampler step %d: %s", step, json.dumps(row))
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % args.save_every == 0 or step == args.max_steps:
            save_pipeline(pipe, out)
            (out / RESAMPLER_RECIPE).write_text(json.dumps({"step": step, **asdict(args)}, indent=2))
    refresh_model_card(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m mmgen.train_resampler CONFIG.yaml [--option value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (args,) = parse_config((ResamplerArguments,), argv[0], argv[1:])
        rows = train_resampler(args)
    except ValueError as err:
        print(f"train_resampler: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
