"""The trainer: one loop that runs unchanged on a CPU, a GPU, or many processes under `accelerate launch`.

Checkpoints are `accelerate` states (safetensors weights) written to a temporary folder and renamed into
place, so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, set_seed
from tqdm.auto import tqdm

from .config import ModelArguments, TrainArguments, text_forms
from .data import BatchBuilder, InterleavedJsonlData, ShapesWorldData, batch_loader, batch_seed
from .loading import build_model
from .model import (
    CONDITION_ORDER_PREFIX,
    PATCH_CLASSIFIER_PREFIX,
    PATCH_CONVS_PREFIX,
    PLAN_PREFIX,
    REFERENCE_PREFIX,
    RESAMPLER_PREFIX,
    UnifiedModel,
    cosine_with_warmup,
)
from .model_card import BENCH, EXTRAS, RESAMPLER_RECIPE, STATE, write_model_card
from .stream import TEXT, StreamCodec

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms, embeddings of positions and the queries keep their scale."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "queries" not in name else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def is_under(name: str, prefix: str) -> bool:
    """Whether parameter `name` belongs to the module named `prefix` (or is that parameter)."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def check_module_names(model: torch.nn.Module, setting: str, prefixes: list[str]) -> None:
    """A name that matches no parameter of the model is an error that lists its modules, not a no-op."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in prefixes if not any(is_under(name, prefix) for name in names)]
    if unknown:
        modules = sorted({".".join(name.split(".")[:2]) for name in names})
        raise ValueError(f"{setting}: {', '.join(map(repr, unknown))} names no part of the model; "
                         f"its modules are {', '.join(modules)}")


def freeze_all_but(model: torch.nn.Module, prefixes: list[str]) -> None:
    """Train only the parameters under the named modules."""
    check_module_names(model, "trainable_modules", prefixes)
    for name, param in model.named_parameters():
        param.requires_grad_(any(is_under(name, prefix) for prefix in prefixes))


def load_fitting(module: torch.nn.Module, weights: dict) -> tuple[list[str], list[str]]:
    """Load the weights that fit `module`; returns its missing names (with those of another shape, which are
    left out, not loaded into a torch error) and the unexpected ones."""
    own = module.state_dict()
    missing, unexpected = module.load_state_dict(
        {k: v for k, v in weights.items() if k not in own or own[k].shape == v.shape}, strict=False)
    return list(missing), list(unexpected)


def check_patch_labels(model: UnifiedModel, args: TrainArguments) -> None:
    """The per-patch shape loss needs ShapesWorld scenes and a classifier with a class for each shape."""
    from .shapesworld import SHAPES

    if args.patch_label_weight < 0 or args.patch_label_images < 1:
        raise ValueError(f"patch_label_weight must be >= 0 and patch_label_images >= 1, got "
                         f"{args.patch_label_weight} and {args.patch_label_images}")
    if args.data != "shapesworld":
        raise ValueError("patch_label_weight labels the patches of ShapesWorld scenes; it needs data: shapesworld")
    classifier = model.image_modules.patch_classifier
    if classifier is None or classifier.out_features != 1 + len(SHAPES):
        raise ValueError(f"patch_label_weight needs patch_classes: {1 + len(SHAPES)} (the background and each "
                         f"shape), got {0 if classifier is None else classifier.out_features}")


def repeat_kv_heads(weights: dict, saved_config, config) -> dict:
    """A saved backbone's weights, with its key and value heads repeated to fill a configuration with more.

    Grouped-query attention lets each key/value head serve a group of query heads; repeating a head for each
    of its query heads' new groups leaves every attention score and output as it was, so a stage can start
    from a model with fewer key/value heads and train them apart: one key shared by all query heads must
    carry everything any of them looks things up by.
    """
    saved = getattr(saved_config, "num_key_value_heads", None)
    wanted = getattr(config, "num_key_value_heads", None)
    if saved is None or wanted is None or saved == wanted:
        return weights
    heads = config.num_attention_heads
    if wanted < saved or wanted % saved or heads % wanted:
        raise ValueError(f"a stage can only repeat key/value heads: the saved backbone has {saved}, this "
                         f"configuration {wanted}; use a multiple of {saved} that divides num_heads={heads}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = dict(weights)
    for name, tensor in weights.items():
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            per_head = tensor.reshape(saved, head_dim, *tensor.shape[1:])
            out[name] = per_head.repeat_interleave(wanted // saved, dim=0).reshape(wanted * head_dim, *tensor.shape[1:])
    return out


def draw_like(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` vectors with the mean and covariance of `rows`, as added tokens are given embeddings.

    Mixing the centred rows with standard normal weights gives that covariance exactly, even when there are
    fewer rows than dimensions.
    """
    rows = rows.double()
    mean = rows.mean(0)
    weights = torch.randn(count, len(rows), generator=generator, dtype=torch.float64)
    return mean + weights @ (rows - mean) / (len(rows) - 1) ** 0.5


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The last complete checkpoint. A crash between the two renames of `save` leaves only `.old`."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        candidate = output_dir / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


class Trainer:
    def __init__(self, model_args: ModelArguments, args: TrainArguments):
        if args.max_steps < 1 or args.batch_size < 1 or args.gradient_accumulation_steps < 1:
            raise ValueError("max_steps, batch_size and gradient_accumulation_steps must be >= 1")
        if not 0 <= args.stage_start < args.max_steps:
            raise ValueError(f"stage_start must be in [0, max_steps), got {args.stage_start} with max_steps={args.max_steps}")
        if args.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {args.learning_rate}")
        if args.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {args.mixed_precision!r}")
        shifts = args.timestep_shift
        if len(shifts) not in (1, args.flow_repeats) or not all(shift > 0 for shift in shifts):
            raise ValueError(f"timestep_shift must be one shift > 0, or one per flow repeat ({args.flow_repeats}), "
                             f"got {shifts}")
        if args.text_loss_per not in ("token", "sample"):
            raise ValueError(f"text_loss_per must be token or sample, got {args.text_loss_per!r}")
        if not args.sampling_shift > 0:
            raise ValueError(f"sampling_shift must be > 0, got {args.sampling_shift}")
        self.model_args = model_args
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(args.seed)
        model, self.tokenizer = build_model(model_args)
        if args.patch_label_weight:
            check_patch_labels(model, args)
        if args.trainable_modules:
            freeze_all_but(model, args.trainable_modules)
        for setting, what in (("fresh_modules", "some modules"), ("fresh_tokens", "some token embeddings")):
            if getattr(args, setting) and not args.init_from:
                raise ValueError(f"{setting} starts {what} afresh beside the weights of init_from; set init_from, "
                                 f"or leave {setting} out")
        if args.fresh_modules:
            check_module_names(model, "fresh_modules", args.fresh_modules)
        self.codec = StreamCodec(self.tokenizer, model.num_queries)
        builder = BatchBuilder(self.codec, model.image_tokenizer, model.image_modules.compressor, args)
        rank = self.accelerator.process_index
        if args.data == "shapesworld":
            self.data = ShapesWorldData(builder, args, rank, image_size=model_args.image_size)
        else:
            self.data = InterleavedJsonlData(builder, args, rank)
        optimizer = torch.optim.AdamW(
            parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: cosine_with_warmup(s - args.stage_start, args.warmup_steps, args.max_steps - args.stage_start,
                                         args.min_lr_ratio),
        )
        self.model, self.optimizer, self.schedule = self.accelerator.prepare(model, optimizer, schedule)
        self.step = 0
        self._batches = None

    @property
    def unwrapped(self) -> UnifiedModel:
        return self.accelerator.unwrap_model(self.model)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Write the state to a temporary folder, then swap it in with renames."""
        self.accelerator.wait_for_everyone()
        tmp = self.output_dir / f"{CHECKPOINT}.tmp"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        final, old = self.output_dir / CHECKPOINT, self.output_dir / (CHECKPOINT + ".old")
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            if self.accelerator.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps({"step": self.step, "seed": self.args.seed}))
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last checkpoint is untouched
            reason = "the disk is full" if err.errno == errno.ENOSPC else f"writing failed ({err})"
            kept = f"the previous checkpoint {final} is intact" if final.exists() else "no earlier checkpoint exists"
            raise OSError(
                err.errno, f"could not write the checkpoint of step {self.step} to {tmp}: {reason}; {kept}"
            ) from err
        if self.accelerator.is_main_process:
            # `old` is deleted only while a complete `final` exists, so a kill at any instant leaves
            # `latest_checkpoint` a complete checkpoint (after a kill between the renames, that is `old`).
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def resume(self) -> bool:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            if self.args.init_from:
                self.init_from(self.args.init_from)
        else:
            self.accelerator.load_state(str(checkpoint))
            self.step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
            logger.info("resumed from %s at step %d", checkpoint, self.step)
        # Rows past the starting step were logged by a run killed before its next checkpoint (even its
        # first one): they are done again, so they go.
        log = self.output_dir / LOG_FILE
        if self.accelerator.is_main_process and log.is_file():
            kept = [row for row in read_log(log) if row["step"] <= self.step]
            tmp = log.with_name(LOG_FILE + ".tmp")  # a kill while rewriting leaves the old log whole
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, log)
        return checkpoint is not None

    def init_from(self, folder: str | os.PathLike) -> None:
        """Start from the weights of a saved pipeline, at the step it was exported at."""
        from .pipelines import MMGenPipeline

        source = MMGenPipeline.from_pretrained(folder)
        model = self.unwrapped
        fresh = self.args.fresh_modules or []

        def is_fresh(name: str) -> bool:
            return any(is_under(name, prefix) for prefix in fresh)

        weights = source.model.state_dict()
        if model.image_modules.compressor.resampler is None and any(k.startswith(RESAMPLER_PREFIX) for k in weights):
            # The resampler reads the image tokens this training changes, so it is retrained afterwards
            # (`python -m mmgen.train_resampler`) rather than carried along stale.
            weights = {k: v for k, v in weights.items() if not k.startswith(RESAMPLER_PREFIX)}
            logger.warning("the learned resampler of %s is left out: retrain it after this run", folder)
        # Patch convolutions, a patch classifier, a reference input, condition order and a plan input that a stage
        # adds start at zero (`PatchConvs`, `ImageModules`, `FlowHead`), and fresh modules start from their initial
        # weights; any other mismatch is an error.
        added = (PATCH_CONVS_PREFIX, PATCH_CLASSIFIER_PREFIX, REFERENCE_PREFIX, CONDITION_ORDER_PREFIX, PLAN_PREFIX)
        backbone = repeat_kv_heads(source.backbone.state_dict(), source.backbone.config, model.backbone.config)
        for part, label, saved, may_add in (("backbone", "backbone", backbone, ()),
                                            ("image_modules", "image-module", weights, added)):
            missing, unexpected = load_fitting(getattr(model, part), {
                k: v for k, v in saved.items() if not is_fresh(f"{part}.{k}")})
            others = [k for k in missing if not k.startswith(may_add) and not is_fresh(f"{part}.{k}")] + unexpected
            if others:
                raise ValueError(f"the {label} weights of {folder} do not fit this model's configuration: "
                                 f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}")
            new = [prefix.rstrip(".") for prefix in may_add if any(k.startswith(prefix) for k in missing)]
            if new:
                logger.info("%s has no %s: they start at zero", folder, ", ".join(new))
        if fresh:
            logger.info("%s start from their initial weights, not from %s", ", ".join(fresh), folder)
        if self.args.fresh_tokens:
            self.draw_fresh_tokens()
        state = Path(folder) / STATE
        self.step = json.loads(state.read_text())["step"] if state.is_file() else 0
        if self.step:
            # Move the schedule to the exported step in one go. Torch warns about a scheduler step before any
            # optimizer step, which is exactly the point here.
            schedule = self.schedule.scheduler
            schedule.last_epoch = self.step - 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                schedule.step()
        logger.info("initialised from %s at step %d", folder, self.step)

    def draw_fresh_tokens(self) -> None:
        """Draw the input and output embeddings of `fresh_tokens` like those of the tokens the data's first batch
        uses. A token no earlier stage saw has an input embedding shrunk by weight decay, and an LM-head row that
        every step pushed down alike: all such rows end up one vector, so the head cannot tell them apart."""
        fresh = set()
        for text in self.args.fresh_tokens:
            ids = self.codec.text_ids(text)
            if not ids:
                raise ValueError(f"fresh_tokens holds {text!r}, which has no tokens")
            fresh.update(ids)
        batch = self.data.batch(0)
        used = set(batch.input_ids[batch.modality == TEXT].tolist())
        reference = sorted(used - fresh - set(self.tokenizer.all_special_ids))
        if len(reference) < 2:
            raise ValueError("fresh_tokens needs at least two other text tokens in the data's first batch to draw "
                             f"their embeddings like; it has {len(reference)}")
        fresh = sorted(fresh)
        backbone = self.unwrapped.backbone
        tables = {id(w): w for w in (backbone.get_input_embeddings().weight, backbone.get_output_embeddings().weight)}
        generator = torch.Generator().manual_seed(self.args.seed)
        with torch.no_grad():
            for weight in tables.values():  # one table when the embeddings are tied
                drawn = draw_like(weight[reference], len(fresh), generator).to(weight)
                weight[fresh] = broadcast(drawn)  # each process saw its own batch; all take the main one's draw
        logger.info("drew the embeddings of %d fresh tokens like those of %d tokens in use", len(fresh),
                    len(reference))

    # -- loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        args, acc = self.args, self.accelerator
        self.model.train()
        totals = {"loss": 0.0, "text_loss": 0.0, "flow_loss": 0.0, "patch_loss": 0.0, "tokens": 0}
        if self._batches is None:
            self._batches = batch_loader(self.data, self.step, args.gradient_accumulation_steps, args.data_workers)
        for micro in range(args.gradient_accumulation_steps):
            step, got_micro, batch = next(self._batches)
            assert (step, got_micro) == (self.step, micro), "the batch stream is out of step with training"
            batch = batch.to(acc.device)
            generator = torch.Generator(device=acc.device).manual_seed(
                batch_seed(args.seed, self.step, micro, acc.process_index, 1)
            )
            with acc.accumulate(self.model), acc.autocast():
                out = self.model(
                    batch, flow_weight=args.flow_weight, flow_repeats=args.flow_repeats,
                    timestep_shift=args.timestep_shift, generator=generator,
                    patch_label_weight=args.patch_label_weight,
                )
                if not out.loss.requires_grad:
                    raise ValueError(f"step {self.step}: this batch has no loss on the trainable modules "
                                     f"({', '.join(args.trainable_modules or [])}); give the task mix samples "
                                     f"that train them")
                acc.backward(out.loss)
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
            totals["loss"] += out.loss.item() / args.gradient_accumulation_steps
            totals["text_loss"] += out.text_loss.item() / args.gradient_accumulation_steps
            totals["flow_loss"] += out.flow_loss.item() / args.gradient_accumulation_steps
            totals["patch_loss"] += out.patch_loss.item() / args.gradient_accumulation_steps
            totals["tokens"] += int(batch.input_ids.numel())
        self.step += 1
        return totals

    def train(self) -> list[dict]:
        """Run to `max_steps`, resuming from the last checkpoint if there is one. Returns the logged rows."""
        args, acc = self.args, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.resume()
        rows = []
        bar = tqdm(total=args.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < args.max_steps:
            stats = self.train_step()
            window_tokens += stats["tokens"]
            bar.update(1)
            if self.step % args.log_every == 0 or self.step == args.max_steps:
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": self.step,
                    "loss": _mean_over_processes(acc, stats["loss"]),
                    "text_loss": _mean_over_processes(acc, stats["text_loss"]),
                    "flow_loss": _mean_over_processes(acc, stats["flow_loss"]),
                    "patch_loss": _mean_over_processes(acc, stats["patch_loss"]),
                    "lr": self.schedule.get_last_lr()[0],
                    "tokens_per_s": window_tokens * acc.num_processes / max(elapsed, 1e-9),
                }
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", text=f"{row['text_loss']:.3f}",
                                flow=f"{row['flow_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if acc.is_main_process:
                    with open(self.output_dir / LOG_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % args.save_every == 0 or self.step == args.max_steps:
                self.save()
            if args.export_dir and args.export_every and self.step % args.export_every == 0 and acc.is_main_process:
                self.export(args.export_dir)
            if args.eval_every and self.step % args.eval_every == 0 and acc.is_main_process:
                self.quick_eval()
        bar.close()
        if args.export_dir and acc.is_main_process:
            self.export(args.export_dir)
        acc.wait_for_everyone()
        return rows

    def pipeline(self):
        """The current model as a generation pipeline (components shared, not copied)."""
        from .pipelines import MMGenPipeline

        model = self.unwrapped
        return MMGenPipeline.from_unified(model, self.tokenizer, sampling_shift=self.args.sampling_shift,
                                          stochastic_sampling=self.args.stochastic_sampling)

    def quick_eval(self) -> dict:
        from .evals.shapesbench import run_shapesbench

        summary = run_shapesbench(self.pipeline(), n=self.args.eval_samples, seed=self.args.seed, progress=False)
        logger.info("step %d ShapesBench: %s", self.step, json.dumps(summary))
        with open(self.output_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **summary}) + "\n")
        return summary

    def export(self, export_dir: str | os.PathLike) -> None:
        """Save the pipeline, replacing the folder's contents only once the new ones are complete."""
        final = Path(export_dir)
        tmp = final.with_name(final.name + ".export-tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.pipeline().save_pretrained(tmp)
        recipe = self.args.recipe or "CONFIG.yaml"
        (tmp / STATE).write_text(json.dumps({"step": self.step, "seed": self.args.seed, "recipe": recipe,
                                             "stage_start": self.args.stage_start,
                                             "text_forms": text_forms(self.args)}))
        if (final / BENCH).is_file():
            shutil.copy(final / BENCH, tmp / BENCH)
        write_model_card(tmp, read_log(self.output_dir / LOG_FILE), recipe, self.step,
                         self.args.stage_start, previous=self.args.init_from)
        # Drafters distilled from the weights this export replaces no longer match them, nor does the recipe
        # file of a resampler the new model/ lacks: they go, and the card (written without them) lists none
        # until their recipes run again.
        stale = [final / name for name, _, _ in EXTRAS if (final / name).is_dir()]
        swap_folder_contents(tmp, final)
        for path in stale:
            shutil.rmtree(path)
            logger.warning("removed %s: it was trained on the weights this export replaced; retrain it", path)
        (final / RESAMPLER_RECIPE).unlink(missing_ok=True)
        logger.info("saved the pipeline to %s at step %d", final, self.step)


def swap_folder_contents(tmp: Path, final: Path) -> None:
    """Move every item of the complete folder `tmp` into `final`, each replacing its namesake by renames,
    so a reader never finds a half-written component."""
    final.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target, old = final / item.name, final / (item.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(item, target)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    tmp.rmdir()


def read_log(path: Path) -> list[dict]:
    """The training log's rows; a line torn by a crash is dropped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            rows.append(row)
    return rows


def _mean_over_processes(acc: Accelerator, value: float) -> float:
    if acc.num_processes == 1:
        return value
    return acc.reduce(torch.tensor(value, device=acc.device), reduction="mean").item()
