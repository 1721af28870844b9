"""Building the unified model from local folders or fresh configs. Weights load from safetensors only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import ModelArguments
from .image_tokenizer import ImageTokenizer
from .model import ImageModules, UnifiedModel
from .stream import add_special_tokens

logger = logging.getLogger(__name__)

VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def check_model_folder(path: str | Path, what: str) -> Path:
    """A local folder with a config and safetensors weights; pickled weights are refused, never loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what} folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{what} folder {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickled:
            raise ValueError(
                f"{what} folder {folder} holds only pickle-format weights ({', '.join(pickled)}); "
                "mmgen loads safetensors only: convert them first"
            )
        raise ValueError(f"{what} folder {folder} has no .safetensors weights")
    for file in folder.glob("*.safetensors"):
        try:  # reads the header only: a torn or foreign file fails here, not deep inside a loader
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is damaged or incomplete ({err}); copy or export the model again") from None
    return folder


# Libraries a pipeline folder's model_index.json may name for its components. Anything else would make
# diffusers import a module the folder chose, which is remote code by another door.
PIPELINE_LIBRARIES = ("transformers", "diffusers", "mmgen")
WEIGHTED_COMPONENTS = {"backbone": "backbone", "vae": "VAE", "model": "image modules", "drafter": "drafter"}


def check_pipeline_folder(path: str | Path) -> Path:
    """A pipeline folder whose `model_index.json` and components are all there, readable and safe to load.

    Every fault is named before any weight is read: a missing component folder, JSON that is not valid
    UTF-8 JSON, a component from an unexpected library, or weights in pickle format instead of safetensors.
    """
    folder = Path(path)
    index_file = folder / "model_index.json"
    if not folder.is_dir() or not index_file.is_file():
        raise ValueError(f"model folder not found or incomplete (no model_index.json): {folder}")
    index = _read_json(index_file)
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} must hold a JSON object")
    for name, entry in index.items():
        if name.startswith("_") or entry in (None, [None, None]):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"{index_file}: component {name!r} must be [library, class], got {entry!r}")
        library = entry[0]
        if library.split(".")[0] not in PIPELINE_LIBRARIES:
            raise ValueError(
                f"{index_file}: component {name!r} comes from library {library!r}; mmgen loads components "
                f"from {', '.join(PIPELINE_LIBRARIES)} only"
            )
        component = folder / name
        if not component.is_dir():
            raise ValueError(f"model folder {folder} is incomplete: component {name!r} has no folder {component}")
        for file in component.glob("*.json"):
            _read_json(file)
        if name in WEIGHTED_COMPONENTS:
            check_model_folder(component, WEIGHTED_COMPONENTS[name])
    return folder


def _read_json(file: Path):
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not valid UTF-8 (byte {err.start}): is the file damaged?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None


def load_tokenizer(path: str | Path):
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder not found: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    add_special_tokens(tokenizer)
    return tokenizer


def load_vae(path: str | Path) -> AutoencoderKL | AutoencoderTiny:
    folder = check_model_folder(path, "VAE")
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if class_name not in VAE_CLASSES:
        raise ValueError(f"VAE class {class_name!r} in {folder} is not supported; use {' or '.join(VAE_CLASSES)}")
    vae = VAE_CLASSES[class_name].from_pretrained(str(folder), use_safetensors=True)
    return vae.eval().requires_grad_(False)


def load_backbone(path: str | Path, torch_dtype: torch.dtype = torch.float32):
    folder = check_model_folder(path, "backbone")
    return AutoModelForCausalLM.from_pretrained(
        str(folder), use_safetensors=True, trust_remote_code=False, dtype=torch_dtype
    )


def fresh_backbone(args: ModelArguments, vocab_size: int, special_ids: dict):
    """A randomly initialised causal LM of `args.backbone_type` with the requested size."""
    common = dict(vocab_size=vocab_size, tie_word_embeddings=False, **special_ids)
    if args.backbone_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_embd=args.hidden_size, n_layer=args.num_layers, n_head=args.num_heads,
            n_inner=args.intermediate_size, n_positions=args.max_position_embeddings, **common,
        )
    else:
        config = AutoConfig.for_model(
            args.backbone_type,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            head_dim=args.hidden_size // args.num_heads,
            max_position_embeddings=args.max_position_embeddings,
            **common,
        )
    return AutoModelForCausalLM.from_config(config)


def build_model(args: ModelArguments) -> tuple[UnifiedModel, object]:
    """The unified model and its tokenizer, from pretrained local parts where given."""
    tokenizer_path = args.tokenizer
    if args.backbone and not Path(tokenizer_path).is_dir():
        tokenizer_path = args.backbone
    tokenizer = load_tokenizer(tokenizer_path)
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if args.backbone:
        backbone = load_backbone(args.backbone)
        if backbone.get_input_embeddings().weight.shape[0] < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer))
        backbone.config.update({k: v for k, v in special_ids.items() if v is not None})
    else:
        backbone = fresh_backbone(args, len(tokenizer), special_ids)
    vae = load_vae(args.vae)
    image_tokenizer = ImageTokenizer(vae, image_size=args.image_size, patch_size=args.patch_size)
    embeddings = backbone.get_input_embeddings().weight.detach().float()
    image_modules = ImageModules(
        backbone_hidden_size=embeddings.shape[1],
        embed_scale=embeddings.pow(2).mean().sqrt().item(),
        token_dim=image_tokenizer.token_dim,
        grid_size=image_tokenizer.grid_size,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_queries=args.num_queries,
        head_hidden_size=args.head_hidden_size,
        head_layers=args.head_layers,
        head_heads=args.head_heads,
        head_mlp_ratio=args.head_mlp_ratio,
        head_text_tokens=args.head_text_tokens,
        head_image_tokens=args.head_image_tokens,
        head_reference=args.head_reference,
        head_condition_order=args.head_condition_order,
        head_plan=args.head_plan,
        image_in_convs=args.image_in_convs,
        patch_classes=args.patch_classes,
    )
    return UnifiedModel(backbone, image_modules, image_tokenizer), tokenizer
