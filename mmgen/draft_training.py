"""`mmgen train-drafter`: distil a drafter from the target's own outputs on ShapesWorld (DESIGN.md §6).

1. Generate: the target answers ShapesWorld prompts (captions, QA, stories, edits) greedily, drawing its
   own images, as it would at inference; a recording drafter keeps the stream exactly as the target's
   cache received it, with the target's last hidden state at every position.
2. Train: the vision head learns to predict the target's next hidden state and next-token distribution
   from (hidden state, next token), unrolled over its own predictions for a few steps the way it drafts
   (EAGLE-3's training-time test); or a small draft LM learns the target's distributions over the text.

The head is saved into the model folder's `drafter/` and registered in its `model_index.json`, so it ships
with the pipeline; the ablation head (`image_adaptor: false`) goes to `drafter_no_adaptor/`, a draft LM to
`draft_lm/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from .config import DEFAULT_MODEL_DIR
from .drafting import (
    DRAFT_LM_DIR,
    NO_ADAPTOR_DIR,
    ContextUpdate,
    Draft,
    Drafter,
    DraftRequest,
    ImageItem,
    ItemWalker,
    PairItem,
    Sampling,
    VisionDraftHead,
)
from .model import RESAMPLER_PREFIX, cosine_with_warmup
from .model_card import refresh_model_card
from .segments import Segment
from .stream import TEXT, VISION

logger = logging.getLogger(__name__)

KINDS = ("vision-head", "draft-lm")


@dataclass
class DrafterTrainArguments:
    """The recipe of a drafter: what it is, what data the target makes for it, and how it trains."""

    model: str | None = field(default=None, metadata={"help": "Pipeline folder of the target; default: the embedded model."})
    kind: str = field(default="vision-head", metadata={"help": "vision-head | draft-lm"})
    output_dir: str | None = field(
        default=None, metadata={"help": "Default: the model folder's drafter/, drafter_no_adaptor/ or draft_lm/."}
    )
    image_adaptor: bool = field(default=True, metadata={"help": "false: the ablation head that skips images."})
    adaptor_tokens: int = 4
    num_heads: int = 4
    intermediate_size: int | None = field(default=None, metadata={"help": "Default: the backbone's."})
    max_draft: int = 8
    stop_below: float = 0.1
    siblings: int = field(default=0, metadata={"help": "Greedy drafts also offer the head's next N choices at each "
                                                       "depth, verified in the same pass (a draft tree)."})
    siblings_below: float | None = field(
        default=None, metadata={"help": "Siblings only where the head's first choice has a probability below this; "
                                        "default: at every depth."})
    draft_lm_layers: int = 2
    draft_lm_hidden_size: int = 128
    draft_lm_heads: int = 4
    init_from: str | None = field(
        default=None, metadata={"help": "A drafter folder of the same shape to start from instead of random weights, e.g. "
                                 "the model's own drafter/ after a training stage changed the target: the old "
                                 "drafter relearns the new target in fewer steps than a new one needs."}
    )
    seed: int = 0
    samples: int = 1024
    task_weights: dict = field(default_factory=lambda: {"i2t": 3.0, "story": 3.0, "edit": 1.0, "t2i": 1.0})
    max_new_tokens: int = 96
    max_images: int = 4
    num_inference_steps: int = 10
    generation_batch_size: int = 8
    data_cache: str | None = field(
        default=None, metadata={"help": "A .safetensors file of generated samples, reused while the target and the "
                                 "generation settings stay the same. While they are generated, finished ones are "
                                 "saved beside it in `<file>.parts/`, so an interrupted run resumes after them."}
    )
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    unroll: int = field(default=3, metadata={"help": "Drafting steps simulated in training (1: plain EAGLE)."})
    feature_weight: float = 0.1
    argmax_weight: float = field(default=0.5, metadata={"help": "Weight of cross-entropy on the target's argmax."})
    feature_noise: float = 0.05
    log_every: int = 50
    save_every: int = field(default=500, metadata={"help": "Steps between checkpoints of the training, kept beside "
                                                           "the drafter's folder in `<folder>.checkpoint/` until it "
                                                           "is saved, so an interrupted run resumes from the last."})
    eval_samples: int = 32


# -- 1. generate and record -------------------------------------------------------------------------------------
def sample_prompts(args: DrafterTrainArguments, count: int, seed: int, image_size: int) -> list[list[Segment]]:
    """ShapesWorld prompts of the tasks in `task_weights`."""
    from .shapesworld import ShapesWorld

    world = ShapesWorld(seed=seed, size=image_size)
    rng = random.Random(seed)
    tasks = list(args.task_weights)
    weights = [float(args.task_weights[t]) for t in tasks]
    return [list(world.sample(task=rng.choices(tasks, weights)[0]).prompt) for _ in range(count)]


class TraceRecorder(Drafter):
    """Drafts nothing; records each row's stream as the target's cache receives it, with the target's hidden
    states. The exact tokens and hidden states of generation, not a re-tokenised replay."""

    def start(self, batch_size: int, sampling: Sampling) -> None:
        super().start(batch_size, sampling)
        self.parts: list[list[ContextUpdate]] = [[] for _ in range(batch_size)]

    def extend(self, row: int, update: ContextUpdate) -> None:
        self.parts[row].append(replace(update, hidden=update.hidden.half().cpu()))

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft() for _ in requests]

    def traces(self) -> list[TargetTrace]:
        return [
            TargetTrace(
                ids=[t for u in parts for t in u.ids],
                positions=[p for u in parts for p in u.positions],
                modality=[m for u in parts for m in u.modality],
                hidden=torch.cat([u.hidden for u in parts]),
                prompt_length=len(parts[0].ids),
            )
            for parts in self.parts
        ]


@dataclass
class TargetTrace:
    """One prompt and the target's greedy answer as its cache holds them (queries left out, as the loop
    leaves them), and the target's last hidden state at each position."""

    ids: list[int]
    positions: list[int]
    modality: list[int]
    hidden: torch.Tensor  # (L, d), stored in half precision
    prompt_length: int = 0

    def drawn_before(self) -> list[int]:
        """For each position, how many images the target had drawn by then (the loop bans `<|image_start|>`
        once a row reaches `max_images`)."""
        counts, drawn = [], 0
        for k, modality in enumerate(self.modality):
            if k >= self.prompt_length and modality == VISION and self.modality[k - 1] != VISION:
                drawn += 1
            counts.append(drawn)
        return counts

    def update(self) -> ContextUpdate:
        return ContextUpdate(self.ids, self.positions, self.modality, self.hidden.float())


SHARD_SAMPLES = 256  # traces per saved part of an unfinished generation


@torch.no_grad()
def generate_traces(pipe, prompts: list[list[Segment]], args: DrafterTrainArguments, parts: Path | None = None,
                    key: str = "") -> list[TargetTrace]:
    """Let the target answer every prompt greedily, drawing its own images, and record what it saw.

    With `parts` (a folder), finished traces are saved there every SHARD_SAMPLES or so, under `key`, and a
    run that finds parts of the same key starts after them: prompt i is always generated with seed
    `args.seed + i`, so a resumed run records what an unbroken one would."""
    traces = load_parts(parts, key) if parts is not None else []
    if traces:
        logger.info("resuming generation after %d of %d traces saved in %s", len(traces), len(prompts), parts)
    batch = args.generation_batch_size
    saved = len(traces)
    for start in tqdm(range(len(traces), len(prompts), batch), desc="generate", unit="batch"):
        chunk = prompts[start : start + batch]
        recorder = TraceRecorder()
        pipe(
            chunk, max_new_tokens=args.max_new_tokens, num_inference_steps=args.num_inference_steps,
            max_images=args.max_images, compression="none", output_type="latent", drafter=recorder,
            generator=[torch.Generator().manual_seed(args.seed + start + k) for k in range(len(chunk))],
        )
        traces += recorder.traces()
        if parts is not None and (len(traces) - saved >= SHARD_SAMPLES or len(traces) == len(prompts)):
            save_traces(traces[saved:], parts / f"{saved:07d}.safetensors", key)
            saved = len(traces)
    return traces


def load_parts(folder: Path, key: str) -> list[TargetTrace]:
    """The traces saved in `folder` under `key`, from the first on without a gap; parts of another key or
    after a gap are deleted, as no run will use them."""
    traces: list[TargetTrace] = []
    for part in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if part.stem == f"{len(traces):07d}" and cached_key(part) == key:
            traces += load_traces(part)
        else:
            part.unlink()
    return traces


TRACE_FIELDS = ("samples", "seed", "task_weights", "max_new_tokens", "max_images", "num_inference_steps")


def trace_key(pipe, args: DrafterTrainArguments) -> str:
    """What the traces depend on: the target's weights and the generation settings of the recipe. A cache made
    under another key (an earlier target, another sample count) is generated afresh, not reused. The learned
    resampler's weights are left out: traces are generated with the context images uncompressed, so the
    resampler recipe may run before, after or beside the drafters' without making their traces stale."""
    digest = hashlib.sha256(json.dumps({f: getattr(args, f) for f in TRACE_FIELDS}, sort_keys=True).encode())
    for component in (pipe.backbone, pipe.model, pipe.vae):
        for name, tensor in sorted(component.state_dict().items()):
            if component is pipe.model and name.startswith(RESAMPLER_PREFIX):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


NOT_TRAINING_FIELDS = ("model", "output_dir", "data_cache", "log_every", "save_every", "eval_samples")


def fit_key(trace_key: str, args: DrafterTrainArguments) -> str:
    """What a drafter's training depends on: its traces and every setting of the recipe that shapes it."""
    fields = {f: v for f, v in vars(args).items() if f not in NOT_TRAINING_FIELDS}
    return hashlib.sha256((trace_key + json.dumps(fields, sort_keys=True)).encode()).hexdigest()


def cached_key(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


def save_traces(traces: list[TargetTrace], path: Path, key: str) -> None:
    """Traces as one safetensors file under `key` (written to a temporary name, then renamed)."""
    tensors = {}
    for k, trace in enumerate(traces):
        tensors[f"{k}.ids"] = torch.tensor(trace.ids)
        tensors[f"{k}.positions"] = torch.tensor(trace.positions)
        tensors[f"{k}.modality"] = torch.tensor(trace.modality)
        tensors[f"{k}.hidden"] = trace.hidden.contiguous()
        tensors[f"{k}.prompt_length"] = torch.tensor(trace.prompt_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"traces": str(len(traces)), "key": key})
    os.replace(tmp, path)


def load_traces(path: Path) -> list[TargetTrace]:
    tensors = load_file(str(path))
    count = len({name.split(".")[0] for name in tensors})
    return [
        TargetTrace(tensors[f"{k}.ids"].tolist(), tensors[f"{k}.positions"].tolist(), tensors[f"{k}.modality"].tolist(),
                    tensors[f"{k}.hidden"], int(tensors[f"{k}.prompt_length"]))
        for k in range(count)
    ]


# -- 2. the training loop both drafters share --------------------------------------------------------
def fit(module: torch.nn.Module, batch_loss, traces: list[TargetTrace], args: DrafterTrainArguments, desc: str,
        checkpoint: Path | None, key: str) -> torch.nn.Module:
    """The optimisation loop of both drafters. With `checkpoint` (a folder), its whole state (weights,
    optimizer, schedule, and the random streams that draw batches and noise) is saved every `save_every`
    steps under `key`, and a run that finds a checkpoint of the same key goes on from it as an unbroken
    run would."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, args.warmup_steps, args.steps, 0.1)
    )
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    first = load_fit_state(checkpoint, key, module, optimizer, schedule, rng, generator) if checkpoint else 0
    bar = tqdm(range(first, args.steps), desc=desc, unit="step", initial=first, total=args.steps)
    for step in bar:
        batch = rng.sample(traces, min(args.batch_size, len(traces)))
        loss, postfix = batch_loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", **postfix)
            logger.info("%s step %d loss %.4f %s", desc, step, loss.item(), json.dumps(postfix))
        if checkpoint is not None and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_atomically(lambda tmp, done=step + 1: save_fit_state(tmp, key, done, module, optimizer, schedule,
                                                                      rng, generator), checkpoint)
    return module.eval().requires_grad_(False)


def save_fit_state(folder: Path, key: str, step: int, module, optimizer, schedule, rng: random.Random,
                   generator: torch.Generator) -> None:
    folder.mkdir(parents=True)
    save_model(module, str(folder / "module.safetensors"))
    save_file({"generator": generator.get_state()}, str(folder / "generator.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    version, state, gauss = rng.getstate()
    (folder / "state.json").write_text(json.dumps({"key": key, "step": step, "schedule": schedule.state_dict(),
                                                   "rng": [version, list(state), gauss]}))


def load_fit_state(folder: Path, key: str, module, optimizer, schedule, rng: random.Random,
                   generator: torch.Generator) -> int:
    """Restore a checkpoint of `key` from `folder` and return its step; 0 if there is none of this key."""
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state is None or state["key"] != key:
        if folder.exists():
            logger.info("%s was saved by another target or recipe: training afresh", folder)
        return 0
    load_model(module, str(folder / "module.safetensors"))
    generator.set_state(load_file(str(folder / "generator.safetensors"))["generator"])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    schedule.load_state_dict(state["schedule"])
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    logger.info("resuming training from %s at step %d", folder, state["step"])
    return state["step"]


# -- 2a. the vision head -----------------------------------------------------------------------------
def head_batch_loss(head: VisionDraftHead, traces: list[TargetTrace], embed, lm_head, args: DrafterTrainArguments,
                    image_start: int, banned: Sequence[int] = (),
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Distillation loss of the head on a batch of traces, over `args.unroll` drafting steps.

    Step 1 reads the target's true hidden states. Step s > 1 reads the head's own prediction from step s-1
    at the previous position and attends to the true items up to s-1 positions back plus its own earlier
    drafted items, exactly what the s-th drafted token sees when drafting.
    """
    device = next(head.parameters()).device
    banned = torch.tensor(list(banned), dtype=torch.long, device=device)
    rows = [_head_inputs(head, trace, embed, args, image_start, generator) for trace in traces]
    width = max(len(r["x"]) for r in rows)
    batch = len(rows)
    d = head.config.hidden_size

    def pad(key, fill, dtype=None):
        first = rows[0][key]
        shape = (batch, width) + tuple(first.shape[1:])
        out = torch.full(shape, fill, dtype=dtype or first.dtype, device=device)
        for b, r in enumerate(rows):
            out[b, : len(r[key])] = r[key]
        return out

    x, positions = pad("x", 0.0), pad("positions", 0)
    tokens, globals_ = pad("tokens", 0), pad("globals", 0.0)
    target, valid, chain = pad("target", 0.0), pad("valid", False), pad("chain", False)
    real, no_image = pad("real", False), pad("no_image", False)
    with torch.no_grad():  # the target's distribution as the generation loop sees it: forced tokens banned
        target_logits = lm_head(target).float().index_fill(-1, banned, float("-inf"))
        target_logits[..., image_start] = target_logits[..., image_start].masked_fill(no_image, float("-inf"))
        target_logp = F.log_softmax(target_logits, dim=-1)
    eye = torch.eye(width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = causal[None] & (real[:, None, :] | eye[None])
    keys, values, losses = [], [], []
    metrics: dict[str, float] = {}
    features, step_valid = None, valid
    token_embeds = embed(tokens).to(x.dtype)
    for step in range(1, args.unroll + 1):
        if step == 1:
            inputs, step_mask, past = x, mask, None
        else:
            previous = torch.cat([features.new_zeros(batch, 1, d), features[:, :-1]], 1)
            inputs = head.pair_inputs(previous, token_embeds, globals_)
            step_valid = torch.cat([step_valid.new_zeros(batch, 1), step_valid[:, :-1]], 1) & chain & valid
            # Pass-1 keys up to s-1 positions back, pass-r keys on the same diagonal, and its own key.
            idx = torch.arange(width, device=device)
            first = (idx[None, :] <= idx[:, None] - step + 1)[None] & real[:, None, :]
            blocks = [first] + [
                (idx[None, :] == idx[:, None] - step + r)[None].expand(batch, -1, -1) for r in range(2, step)
            ] + [eye[None].expand(batch, -1, -1)]
            step_mask = torch.cat(blocks, dim=-1)
            past = (torch.cat(keys, 2), torch.cat(values, 2))
        features, k, v = head(inputs, positions, step_mask, past)
        keys.append(k)
        values.append(v)
        if not step_valid.any():
            break
        logq = F.log_softmax(lm_head(features[step_valid]).float(), dim=-1)
        logp = target_logp[step_valid]
        kl = F.kl_div(logq, logp.clamp_min(-1e4), log_target=True, reduction="batchmean")
        top = F.nll_loss(logq, logp.argmax(-1))  # greedy decoding accepts exactly the target's argmax
        regression = F.smooth_l1_loss(features[step_valid].float(), target[step_valid].float())
        losses.append(kl + args.argmax_weight * top + args.feature_weight * regression)
        metrics[f"kl_{step}"] = kl.item()
        metrics[f"acc_{step}"] = (logq.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return torch.stack(losses).mean(), metrics


def _head_inputs(head: VisionDraftHead, trace: TargetTrace, embed, args, image_start: int, generator) -> dict:
    """The head's pass-1 inputs for one trace, with per-item targets (the next position's hidden state)."""
    update = trace.update()
    device = next(head.parameters()).device
    hidden = update.hidden.to(device)
    update.hidden = hidden
    items = ItemWalker(head.config.image_adaptor).feed(update)
    if args.feature_noise > 0:  # EAGLE: noisy features make the head robust to its own errors
        scale = args.feature_noise * hidden.pow(2).mean().sqrt()
        items = [
            replace(it, feature=it.feature + scale * torch.randn(it.feature.shape, generator=generator).to(device))
            if isinstance(it, PairItem) else it
            for it in items
        ]
    globals_: dict[int, torch.Tensor] = {}
    x, positions = head.embed_items(items, embed, globals_)
    n, d = len(x), head.config.hidden_size
    tokens, images, targets, valid, chain = [0] * n, [-1] * n, [0] * n, [False] * n, [False] * n
    no_image = [False] * n
    drawn = trace.drawn_before()
    row, last_source = 0, None
    length = len(trace.ids)
    for item in items:
        if isinstance(item, ImageItem):
            row += head.config.adaptor_tokens
            last_source = None
            continue
        tokens[row], images[row] = item.token, item.image
        nxt = item.source + 1
        if nxt < length and trace.ids[nxt] != image_start:
            targets[row], valid[row] = nxt, True
            no_image[row] = drawn[nxt] >= args.max_images
        chain[row] = last_source is not None and item.source == last_source + 1
        last_source = item.source
        row += 1
    # Row i of `stacked` is the global vector of image i; the last row is zeros (no image yet).
    stacked = torch.stack([globals_[k][1] for k in sorted(globals_)] + [x.new_zeros(d)])
    valid_t = torch.tensor(valid, device=device)
    return {
        "x": x, "positions": positions, "tokens": torch.tensor(tokens, device=device),
        "globals": stacked[torch.tensor(images, device=device)],
        "target": hidden[torch.tensor(targets, device=device)] * valid_t[:, None],
        "valid": valid_t, "chain": torch.tensor(chain, device=device),
        "no_image": torch.tensor(no_image, device=device),
        "real": torch.ones(n, dtype=torch.bool, device=device),
    }


def banned_tokens(pipe) -> list[int]:
    """The tokens the generation loop never lets the target emit (the stream forces them)."""
    ids = pipe.codec.ids
    return [t for t in (ids.image_end, ids.image_pad, ids.pad) if t != ids.eos]


def build_head(pipe, args: DrafterTrainArguments) -> VisionDraftHead:
    config = pipe.backbone.config
    hidden = pipe.backbone.get_input_embeddings().weight.shape[1]
    intermediate = args.intermediate_size or getattr(config, "intermediate_size", None) or 4 * hidden
    torch.manual_seed(args.seed)  # the same start whether the traces were generated or read from the cache
    head = VisionDraftHead(
        hidden_size=hidden, num_heads=args.num_heads, intermediate_size=intermediate,
        image_adaptor=args.image_adaptor, adaptor_tokens=args.adaptor_tokens, rope_theta=10000.0,
        max_draft=args.max_draft, stop_below=args.stop_below, siblings=args.siblings,
        siblings_below=args.siblings_below,
    )
    if args.init_from:
        load_start(head, VisionDraftHead.from_pretrained(args.init_from), args.init_from)
    return head


def load_start(module: torch.nn.Module, source: torch.nn.Module, folder: str) -> None:
    """Copy the weights of `source`, the drafter saved in `folder`, into the recipe's freshly built `module`.
    The recipe keeps its own drafting settings (`max_draft`, `stop_below`, `siblings`, `siblings_below`); the
    shapes must agree."""
    ours, theirs = module.state_dict(), source.state_dict()
    differ = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k].shape != theirs[k].shape]
    if differ:
        name = differ[0]
        recipe, saved = (str(tuple(d[name].shape)) if name in d else "missing" for d in (ours, theirs))
        raise ValueError(f"init_from {folder} holds a drafter of another shape ({name}: {recipe} in the recipe, "
                         f"{saved} in the folder); the recipe's kind, image_adaptor and sizes must match its")
    module.load_state_dict(theirs)


def train_head(pipe, traces: list[TargetTrace], args: DrafterTrainArguments, head: VisionDraftHead | None = None,
               checkpoint: Path | None = None, key: str = "") -> VisionDraftHead:
    """Fit a vision head to the target's traces; the target itself stays frozen."""
    model = pipe.unified
    head = head or build_head(pipe, args)
    embed = model.backbone.get_input_embeddings()
    lm_head = model.backbone.get_output_embeddings()
    image_start, banned = pipe.codec.ids.image_start, banned_tokens(pipe)

    def batch_loss(batch: list[TargetTrace], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss, metrics = head_batch_loss(head, batch, embed, lm_head, args, image_start, banned, generator)
        return loss, {"acc1": f"{metrics.get('acc_1', 0):.2f}"}

    return fit(head.to(model.device), batch_loss, traces, args, "train head", checkpoint, key)


# -- 2b. a draft LM ----------------------------------------------------------------------------------
def build_draft_lm(pipe, args: DrafterTrainArguments):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = pipe.tokenizer
    config = AutoConfig.for_model(
        "llama", vocab_size=pipe.backbone.get_output_embeddings().weight.shape[0],
        hidden_size=args.draft_lm_hidden_size, intermediate_size=3 * args.draft_lm_hidden_size,
        num_hidden_layers=args.draft_lm_layers, num_attention_heads=args.draft_lm_heads,
        num_key_value_heads=args.draft_lm_heads, head_dim=args.draft_lm_hidden_size // args.draft_lm_heads,
        max_position_embeddings=pipe.context_length, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    draft = AutoModelForCausalLM.from_config(config)
    if args.init_from:
        load_start(draft, AutoModelForCausalLM.from_pretrained(args.init_from), args.init_from)
    return draft


def train_draft_lm(pipe, traces: list[TargetTrace], args: DrafterTrainArguments, checkpoint: Path | None = None,
                   key: str = ""):
    """Fit a small causal LM to the target's next-token distributions over the text of each trace (images
    left out; where the stream skips an image the next text token is the target)."""
    model = pipe.unified
    lm_head = model.backbone.get_output_embeddings()
    draft = build_draft_lm(pipe, args).to(model.device)
    pad = pipe.codec.ids.pad
    banned = torch.tensor(banned_tokens(pipe), dtype=torch.long, device=model.device)

    def batch_loss(batch: list[TargetTrace], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        texts = [[i for i, m in enumerate(t.modality) if m == TEXT] for t in batch]
        width = max(len(t) for t in texts)
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=model.device)
        real = torch.zeros(len(batch), width, dtype=torch.bool, device=model.device)
        targets, picked = [], []
        for b, (trace, index) in enumerate(zip(batch, texts)):
            ids[b, : len(index)] = torch.tensor([trace.ids[i] for i in index])
            real[b, : len(index)] = True
            for j in range(len(index) - 1):
                if index[j + 1] == index[j] + 1:
                    targets.append(trace.hidden[index[j]].float())
                    picked.append((b, j, None))
                else:
                    picked.append((b, j, trace.ids[index[j + 1]]))
        logits = draft(input_ids=ids, attention_mask=real.long()).logits.float()
        logq = F.log_softmax(logits[[b for b, _, _ in picked], [j for _, j, _ in picked]], dim=-1)
        with torch.no_grad():
            soft = lm_head(torch.stack(targets).to(model.device)).float()
            soft = F.log_softmax(soft.index_fill(-1, banned, -1e4), dim=-1)
        logp = torch.full_like(logq, -1e4)
        soft_rows = [k for k, (_, _, hard) in enumerate(picked) if hard is None]
        logp[soft_rows] = soft
        for k, (_, _, hard) in enumerate(picked):
            if hard is not None:
                logp[k, hard] = 0.0
        return F.kl_div(logq, logp, log_target=True, reduction="batchmean"), {}

    return fit(draft, batch_loss, traces, args, "train draft LM", checkpoint, key)


# -- saving and checking -----------------------------------------------------------------------------
def output_folder(model_dir: Path, args: DrafterTrainArguments) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if args.kind == "draft-lm":
        return model_dir / DRAFT_LM_DIR
    return model_dir / ("drafter" if args.image_adaptor else NO_ADAPTOR_DIR)


def save_atomically(save, folder: Path) -> None:
    """`save(tmp)` into a temporary folder, then swap it in, so a crash never leaves a torn drafter."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def register_drafter(model_dir: Path) -> None:
    """Name the saved head as the pipeline's `drafter` component in `model_index.json`."""
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["drafter"] = [VisionDraftHead.__module__, VisionDraftHead.__name__]
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index_path)


@torch.no_grad()
def measure_tau(pipe, prompts: list[list[Segment]], drafter, args: DrafterTrainArguments) -> dict:
    """τ and acceptance of `drafter` on `prompts` (greedy, one prompt at a time)."""
    tokens = passes = drafted = accepted = 0
    for prompt in prompts:
        pipe(list(prompt), max_new_tokens=args.max_new_tokens, num_inference_steps=2, max_images=args.max_images,
             output_type="latent", drafter=drafter, generator=torch.Generator().manual_seed(args.seed))
        stats = pipe.last_stats
        tokens += stats.text_tokens
        passes += stats.text_forwards
        drafted += stats.drafted_tokens
        accepted += stats.accepted_tokens
    return {"tau": tokens / max(passes, 1), "acceptance": accepted / max(drafted, 1)}


def train_drafter(args: DrafterTrainArguments) -> Path:
    """The whole recipe; returns the folder the drafter was saved to."""
    from .pipelines import MMGenPipeline

    if args.kind not in KINDS:
        raise ValueError(f"unknown drafter kind {args.kind!r}; known: {', '.join(KINDS)}")
    if min(args.samples, args.steps, args.batch_size, args.unroll, args.save_every) < 1:
        raise ValueError("samples, steps, batch_size, unroll and save_every must be >= 1")
    if args.init_from and not Path(args.init_from).is_dir():
        raise ValueError(f"init_from: no drafter folder at {args.init_from}")
    torch.manual_seed(args.seed)
    model_dir = Path(args.model) if args.model not in (None, "default") else DEFAULT_MODEL_DIR
    pipe = MMGenPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    image_size = pipe.model.config.image_size
    cache = Path(args.data_cache) if args.data_cache else None
    key = trace_key(pipe, args)
    if cache is not None and cache.is_file() and cached_key(cache) == key:
        traces = load_traces(cache)
        logger.info("read %d generated traces from %s", len(traces), cache)
    else:
        if cache is not None and cache.is_file():
            logger.info("%s was generated by another target or recipe: generating afresh", cache)
        parts = cache.with_name(cache.name + ".parts") if cache is not None else None
        traces = generate_traces(pipe, sample_prompts(args, args.samples, args.seed, image_size), args, parts, key)
        if cache is not None:
            save_traces(traces, cache, key)
            shutil.rmtree(parts)
    folder = output_folder(model_dir, args)
    checkpoint = folder.with_name(folder.name + ".checkpoint")
    checkpoint_key = fit_key(key, args)
    held_out = sample_prompts(args, args.eval_samples, args.seed + 1, image_size)
    if args.kind == "vision-head":
        with torch.enable_grad():
            head = train_head(pipe, traces, args, checkpoint=checkpoint, key=checkpoint_key)
        save_atomically(lambda tmp: head.save_pretrained(tmp, safe_serialization=True), folder)
        if folder == model_dir / "drafter":
            register_drafter(model_dir)
        from .drafting import VisionHeadDrafter

        drafter = VisionHeadDrafter(head, pipe.unified)
    else:
        with torch.enable_grad():
            draft_lm = train_draft_lm(pipe, traces, args, checkpoint=checkpoint, key=checkpoint_key)

        def save(tmp: Path) -> None:
            draft_lm.save_pretrained(tmp, safe_serialization=True)
            pipe.tokenizer.save_pretrained(tmp)

        save_atomically(save, folder)
        from .drafting import DraftLMDrafter

        drafter = DraftLMDrafter(draft_lm)
    # The summary sits in the drafter's folder, so it names no path: the folder may be copied anywhere.
    summary = {**measure_tau(pipe, held_out, drafter, args), "samples": len(traces), "steps": args.steps}
    logger.info("drafter saved to %s: %s", folder, json.dumps(summary))
    (folder / "train_summary.json").write_text(json.dumps(summary))
    shutil.rmtree(checkpoint)
    if folder.resolve().parent == model_dir.resolve():  # the card lists what the folder holds
        refresh_model_card(model_dir)
    return folder


def main(config: str | None, argv: list[str]) -> int:
    from .config import parse_config

    (args,) = parse_config((DrafterTrainArguments,), config, argv)
    folder = train_drafter(args)
    print(json.dumps({"folder": str(folder), **json.loads((folder / "train_summary.json").read_text())}))
    return 0
