"""Configuration dataclasses, parsed by transformers' HfArgumentParser from YAML files and the command line."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
# The TrainArguments shares that decide how ShapesWorld writes its text (plans before pictures and answers, layouts
# in prompt order). An export keeps them, so recipes that later train on the model's text (the learned
# resampler) write it in the form the model learnt.
TEXT_FORMS = ("ordered_layouts", "layout_plans", "story_plans", "named_story_plans", "reading_plans",
              "worked_answers", "tallied_answers")


def text_forms(args) -> dict[str, float]:
    """The ShapesWorld text forms of a TrainArguments, as ShapesWorld's keyword arguments."""
    return {name: float(getattr(args, name)) for name in TEXT_FORMS}


class ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so `mixed_precision: no` stays the string
    "no" (YAML 1.1 reads no/yes/on/off as booleans; a bool option still parses them from the string)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class ModelArguments:
    """What the unified model is built from: pretrained parts from local folders, or fresh configs."""

    backbone: str | None = field(
        default=None, metadata={"help": "Local folder of a pretrained causal LM; built from the fields below if unset."}
    )
    backbone_type: str = field(default="llama", metadata={"help": "transformers model_type of a fresh backbone."})
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 4096
    tokenizer: str = field(
        default=str(DEFAULT_MODEL_DIR / "tokenizer"),
        metadata={"help": "Local folder of a tokenizer; defaults to the backbone's, else the ShapesWorld BPE."},
    )
    vae: str = field(default=str(DEFAULT_MODEL_DIR / "vae"), metadata={"help": "Local folder of a diffusers VAE."})
    image_size: int = 64
    patch_size: int = 2
    num_queries: int = 16
    head_hidden_size: int = 256
    head_layers: int = 6
    head_heads: int = 4
    head_mlp_ratio: float = 4.0
    head_text_tokens: int = field(
        default=0,
        metadata={"help": "How many states of the text before an image the flow head reads beside the queries "
                          "(0: the queries alone)."},
    )
    head_image_tokens: int = field(
        default=0,
        metadata={"help": "How many tokens of the latest context image's states the flow head reads (average-"
                          "pooled), so a story's next picture or an edit keeps what it shows (0: none)."},
    )
    head_reference: bool = field(
        default=False,
        metadata={"help": "Give the flow head the latest context image's latent patch by patch beside the noisy "
                          "one, so a story's next picture or an edit keeps the scene in place."},
    )
    head_condition_order: bool = field(
        default=False,
        metadata={"help": "Tell the flow head where each condition token stands, so it can bind a relation or a "
                          "colour to the noun it belongs to."},
    )
    head_plan: bool = field(
        default=False,
        metadata={"help": "Give the flow head the states of each layout-plan entry ('red circle b4,') at its cell, "
                          "so colour, shape and place reach the head together (needs head_text_tokens > 0)."},
    )
    image_in_convs: int = field(
        default=0,
        metadata={"help": "3x3 convolution layers over the patch grid beside image_in, so context images "
                          "enter the backbone with features of each patch's neighbourhood (0: none)."},
    )
    patch_classes: int = field(
        default=0,
        metadata={"help": "Classes of a linear classifier on each context-image token as the backbone reads it, "
                          "which patch_label_weight trains (ShapesWorld: 1 + the number of shapes; 0: none)."},
    )


@dataclass
class TrainArguments:
    """The training recipe."""

    output_dir: str = "runs/shapes"
    seed: int = 0
    max_steps: int = 20000
    batch_size: int = 32
    max_length: int = 512
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 500
    stage_start: int = field(
        default=0,
        metadata={"help": "The step this training stage starts at: warm-up and cosine decay run from it to max_steps. "
                          "A stage that continues an exported model (init_from) at step N sets N here."},
    )
    min_lr_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (fp16 only on CUDA)."})
    flow_weight: float = 1.0
    flow_repeats: int = 4
    patch_label_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the per-patch shape loss (ShapesWorld only, needs patch_classes): each step "
                          "also renders patch_label_images scenes and classifies every token of them as "
                          "background or the shape that covers it, so that a shape is written into the tokens a "
                          "question looks it up by, as a colour already is."},
    )
    patch_label_images: int = field(
        default=8,
        metadata={"help": "Scenes per step for patch_label_weight. The classifier fits within a few hundred steps "
                          "at 8; each scene is one more render and VAE encode in the batch worker."},
    )
    timestep_shift: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Shift of the flow loss's logit-normal t toward noise, t -> s·t / (1 + (s-1)·t), as SD3 "
                          "shifts its sampling: one value for every draw, or one per flow repeat. Where objects go "
                          "and which colour each one gets are decided at high t, and t > 0.8 is drawn 8% of the "
                          "time at 1, 25% at 2."},
    )
    sampling_shift: float = field(
        default=1.0,
        metadata={"help": "The `shift` of the exported pipeline's flow-matching scheduler, which spreads the "
                          "sampling steps toward noise as timestep_shift spreads training's t. A model trained at "
                          "a high timestep_shift samples best with a shift of its own: at 1 its sampler blends "
                          "colours it has not yet chosen between."},
    )
    stochastic_sampling: bool = field(
        default=False,
        metadata={"help": "Whether the exported scheduler samples stochastically: each step predicts the clean "
                          "latent and noises it afresh to the next level, instead of an Euler step along the "
                          "predicted velocity. Measure both on your model: on mmgen-shapes it drew two-object "
                          "and counting prompts right more often, and on an earlier stage single objects less "
                          "often."},
    )
    text_loss_per: str = field(
        default="token",
        metadata={"help": "token | sample. 'token' averages the text loss over every target token of the batch, so "
                          "a sample weighs as much as it has targets; 'sample' averages each sample over its own "
                          "targets first, so that a two-token answer counts as much as a long story."},
    )
    drop_text_prob: float = 0.1
    drop_image_prob: float = 0.1
    compression_levels: list[str] = field(
        default_factory=lambda: ["none", "pool:2", "pool:4"],
        metadata={"help": "Each context image's level is drawn uniformly from this list; repeat a level to weight it."},
    )
    data: str = field(default="shapesworld", metadata={"help": "'shapesworld', or a local interleaved jsonl file."})
    images_dir: str | None = field(default=None, metadata={"help": "Image folder of a jsonl dataset."})
    task_weights: dict | None = field(default=None, metadata={"help": "ShapesWorld task mix, e.g. {t2i: 4, i2t: 2}."})
    category_weights: dict | None = field(
        default=None,
        metadata={"help": "Weights of ShapesWorld categories within their task (others 1), e.g. {position: 3}."},
    )
    ordered_layouts: float = field(
        default=0.0,
        metadata={"help": "Share of two-object ShapesWorld text-to-image scenes laid out as their prompt reads "
                          "(see ShapesWorld)."},
    )
    layout_plans: float = field(
        default=0.0,
        metadata={"help": "Share of ShapesWorld text-to-image answers that write a layout plan (each object with its "
                          "colour and cell) before the picture (see ShapesWorld)."},
    )
    story_plans: float = field(
        default=0.0,
        metadata={"help": "Share of ShapesWorld stories that write a layout plan of the whole scene after each step's "
                          "sentence, before its picture (see ShapesWorld)."},
    )
    named_story_plans: float = field(
        default=0.0,
        metadata={"help": "Share of those planned stories whose plans list the objects in the order the first "
                          "sentence names them, as a text-to-image plan does (see ShapesWorld)."},
    )
    reading_plans: float = field(
        default=0.0,
        metadata={"help": "Share of ShapesWorld image-to-text answers that first write the plan of the picture they "
                          "read (each object with its colour and cell), then answer (see ShapesWorld)."},
    )
    worked_answers: float = field(
        default=0.0,
        metadata={"help": "Share of planned ShapesWorld answers to count, 'is there' and 'where' questions that "
                          "copy the plan entries they need before answering (see ShapesWorld)."},
    )
    tallied_answers: float = field(
        default=0.0,
        metadata={"help": "Share of planned ShapesWorld answers to 'how many circles / red shapes' and 'is there' "
                          "questions whose plan writes the running count after each matching entry, in place of a "
                          "worked answer's copies (see ShapesWorld)."},
    )
    plan_lookups: float = field(
        default=0.0,
        metadata={"help": "Share of those planned answers given the plan in the prompt and no picture, so that the "
                          "answer is learnt as a lookup in the plan (see ShapesWorld). Not a form the model writes: "
                          "recipes that train on the model's text leave it out."},
    )
    story_plan_lookups: float = field(
        default=0.0,
        metadata={"help": "Share of planned ShapesWorld stories given as text without pictures up to one step's "
                          "sentence, so that only that step's plan is learnt, as an edit of the plan before it (see "
                          "ShapesWorld). Not a form the model writes."},
    )
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Name prefixes of the parameters this stage trains, e.g. [image_modules.flow_head]; the "
                          "rest stay frozen. Unset: all. A flow head fine-tuned alone keeps what the backbone "
                          "reads, and costs a fraction of a full stage."},
    )
    fresh_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Name prefixes of the modules that start from their initial weights rather than from "
                          "init_from, e.g. [image_modules.flow_head] for a new flow head, of another size too, on "
                          "an exported backbone."},
    )
    fresh_tokens: list[str] | None = field(
        default=None,
        metadata={"help": "Texts whose tokens' input and output embeddings start this stage drawn afresh, from the "
                          "mean and covariance of those of the other tokens in the data's first batch, as added "
                          "tokens are initialised; e.g. the cell names a layout plan brings in. A token no earlier "
                          "stage saw has its embeddings shrunk or pushed together, which is slow to undo. Needs "
                          "init_from."},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "A saved pipeline folder whose weights (and step) a run starts from when it has no "
                          "checkpoint of its own; the optimizer state starts fresh."},
    )
    data_workers: int = field(default=1, metadata={"help": "Processes that build batches ahead (0: inline)."})
    log_every: int = 20
    save_every: int = 250
    eval_every: int = 0
    eval_samples: int = 24
    export_dir: str | None = field(default=None, metadata={"help": "Where the finished pipeline is saved."})
    recipe: str | None = field(default=None, metadata={"help": "The config file, named in the model card."})
    export_every: int = field(default=0, metadata={"help": "Also export every N steps (0: only at the end)."})

    def __post_init__(self):
        if isinstance(self.timestep_shift, (int, float)):  # a single shift, written as a number
            self.timestep_shift = [float(self.timestep_shift)]


def parse_config(
    dataclass_types: tuple, config_file: str | os.PathLike | None, args: list[str] | None = None
) -> tuple:
    """Dataclasses from a YAML/JSON file, with command-line flags overriding the file."""
    parser = HfArgumentParser(dataclass_types)
    defaults: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            defaults = yaml.load(path.read_bytes().decode("utf-8"), Loader=ConfigLoader) or {}
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path} is not valid UTF-8 (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML/JSON: {err}") from None
        if not isinstance(defaults, dict):
            raise ValueError(f"config file {path} must hold a mapping of option names to values")
        known = {f for dc in dataclass_types for f in dc.__dataclass_fields__}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    # Dict- and list-valued options go straight from the file, as argparse cannot take them as defaults,
    # unless a flag names them.
    flagged = {arg[2:].split("=")[0].replace("-", "_") for arg in args or [] if arg.startswith("--")}
    structured = {k: v for k, v in defaults.items() if isinstance(v, (dict, list)) and k not in flagged}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k not in structured})
    parsed = parser.parse_args_into_dataclasses(args=args or [])
    for obj in parsed:
        for key, value in structured.items():
            if hasattr(obj, key):
                setattr(obj, key, value)
    return parsed
