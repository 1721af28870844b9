"""The bad-input corpus: inputs a user, a client or a damaged disk may hand mmgen, and what must happen.

A case is one input: prompt text, an image file (built by a function of `IMAGES`), generation
arguments, a damaged model folder (`MODELS`), a damaged data or config file (`FILES`), or a chat
history and attachments only the demo receives. It expects either an error whose message matches
`error`, or a sane result (`error=None`). A surface that words the problem its own way (argparse on the
command line, the upload checks of the demo) has an entry in `overrides`. Each test file runs every case
on the surfaces it reaches: the Python API, the `mmgen` command and the demo's chat handler.
"""

from __future__ import annotations

import inspect
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from mmgen import Image
from mmgen.app.chat import GenerationSettings
from mmgen.pipelines import MMGenPipeline

from ..conftest import png_declaring

NAN, INF = float("nan"), float("inf")
ASK = "what is in the image?"
# Pipeline argument → `mmgen generate` flag.
CLI_FLAGS = {
    "max_new_tokens": "--max-new-tokens", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "image_guidance_scale": "--image-guidance-scale", "max_images": "--max-images", "compression": "--compression",
    "drafter": "--drafter", "temperature": "--temperature", "seed": "--seed",
}
API_PARAMS = set(inspect.signature(MMGenPipeline.__call__).parameters) - {"self", "prompt"}
DEMO_FIELDS = set(GenerationSettings.__dataclass_fields__)


# -- image files: each builds its file in `folder` and returns the path to hand over ---------------------
def _noise(size=(64, 64), mode="RGB") -> PIL.Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def _encoded(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _save(folder: Path, name: str, image: PIL.Image.Image, **kwargs) -> Path:
    path = folder / name
    image.save(path, **kwargs)
    return path


def _animated(folder: Path, name: str) -> Path:
    frames = [PIL.Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    return _save(folder, name, frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_with_transparency(folder: Path) -> Path:
    image = PIL.Image.new("P", (16, 16), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return _save(folder, "palette.png", image, transparency=0)


def _symlink_out(folder: Path) -> Path:
    """A link inside `folder` to a real picture outside it."""
    outside = _save(folder.parent, "outside.png", PIL.Image.new("RGB", (16, 16), "red"))
    link = folder / "link.png"
    link.symlink_to(outside)
    return link


def _folder_named_png(folder: Path) -> Path:
    path = folder / "folder.png"
    path.mkdir()
    return path


IMAGES: dict[str, Callable[[Path], Path]] = {
    "truncated_png": lambda d: _write(d, "truncated.png", _encoded(_noise(), "PNG")[:2000]),
    "truncated_jpeg": lambda d: _write(d, "truncated.jpg", _encoded(_noise(), "JPEG")[:1000]),
    "zero_byte": lambda d: _write(d, "empty.png", b""),
    "one_pixel": lambda d: _save(d, "one.png", PIL.Image.new("RGB", (1, 1), "red")),
    "bomb_20000": lambda d: _write(d, "bomb.png", png_declaring(20_000, 20_000)),
    "over_limit_5000": lambda d: _write(d, "large.png", png_declaring(5_000, 5_000)),
    "cmyk_jpeg": lambda d: _save(d, "cmyk.jpg", PIL.Image.new("CMYK", (32, 32), (0, 255, 255, 0))),
    "sixteen_bit_png": lambda d: _save(d, "deep.png", PIL.Image.fromarray(np.full((16, 16), 40_000, np.uint16))),
    "palette_transparency_png": _palette_with_transparency,
    "grey_alpha_png": lambda d: _save(d, "la.png", PIL.Image.new("LA", (16, 16), (90, 128))),
    "animated_gif": lambda d: _animated(d, "anim.gif"),
    "animated_png": lambda d: _animated(d, "anim.png"),
    "thin_1x4000_png": lambda d: _save(d, "thin.png", PIL.Image.new("RGB", (1, 4000), "blue")),
    "text_named_png": lambda d: _write(d, "notes.png", b"this is text, not a picture"),
    "jpeg_named_png": lambda d: _write(d, "photo.png", _encoded(_noise((16, 16)), "JPEG")),
    "missing_file": lambda d: d / "never-uploaded.png",
    "folder_named_png": _folder_named_png,
    "traversal_relative": lambda d: Path("../../etc/passwd"),
    "traversal_from_folder": lambda d: d / ".." / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd",
    "absolute_outside": lambda d: Path("/etc/passwd"),
    "symlink_out_of_folder": _symlink_out,
}


# -- model folders: each derives a damaged copy of the good folder `source` at `dest` ---------------------
def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _changed(change: Callable[[Path], Any]) -> Callable[[Path, Path], Path]:
    def build(source: Path, dest: Path) -> Path:
        change(_copy(source, dest))
        return dest

    return build


def _to_pickle(component: str, weights: str, pickle_name: str) -> Callable[[Path], None]:
    """Replace a component's safetensors weights by the same tensors in torch's pickle format."""

    def change(folder: Path) -> None:
        safetensors = folder / component / weights
        torch.save(load_file(safetensors), folder / component / pickle_name)
        safetensors.unlink()

    return change


def _truncate(path_in_folder: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / path_in_folder
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return change


def _foreign_library(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["backbone"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _empty_folder(source: Path, dest: Path) -> Path:
    dest.mkdir()
    return dest


def _file_not_folder(source: Path, dest: Path) -> Path:
    dest.write_text("{}")
    return dest


MODELS: dict[str, Callable[[Path, Path], Path]] = {
    "missing": lambda source, dest: dest,
    "empty_folder": _empty_folder,
    "file_not_folder": _file_not_folder,
    "no_backbone_folder": _changed(lambda f: shutil.rmtree(f / "backbone")),
    "no_tokenizer_folder": _changed(lambda f: shutil.rmtree(f / "tokenizer")),
    "no_backbone_weights": _changed(lambda f: (f / "backbone" / "model.safetensors").unlink()),
    "pickle_backbone": _changed(_to_pickle("backbone", "model.safetensors", "pytorch_model.bin")),
    "pickle_image_modules": _changed(
        _to_pickle("model", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    ),
    "torn_weights": _changed(_truncate("backbone/model.safetensors")),
    "index_not_json": _changed(lambda f: (f / "model_index.json").write_text("{not json")),
    "index_invalid_utf8": _changed(lambda f: (f / "model_index.json").write_bytes(b'{"_class_name": "\xff\xfe"}')),
    "tokenizer_invalid_utf8": _changed(lambda f: (f / "tokenizer" / "tokenizer.json").write_bytes(b"\xff\xfe{}")),
    "foreign_library": _changed(_foreign_library),
}


# -- data and config files: (reader, builder) -------------------------------------------------------------
def _isg_asking_about(folder: Path, image: str) -> Path:
    """An ISG-Bench file with one sample whose query shows `image` (relative to the file)."""
    path = folder / "data.jsonl"
    query = [{"type": "image", "content": image}, {"type": "text", "content": "describe it."}]
    path.write_text(json.dumps({"id": "0", "Category": "Story", "Query": query, "Golden": []}) + "\n")
    return path


def _isg_with_a_bomb(folder: Path) -> Path:
    _write(folder, "bomb.png", png_declaring(20_000, 20_000))
    return _isg_asking_about(folder, "bomb.png")


FILES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "eval_data_invalid_utf8": ("eval", lambda d: _write(
        d, "data.jsonl", b'{"id": "0", "Query": [{"type": "text", "content": "\xff\xfe"}], "Golden": []}\n')),
    "eval_data_not_json": ("eval", lambda d: _write(d, "data.jsonl", b"this is not json\n")),
    "eval_data_bomb_image": ("eval", _isg_with_a_bomb),
    "eval_data_missing_image": ("eval", lambda d: _isg_asking_about(d, "gone.png")),
    "train_config_invalid_utf8": ("train", lambda d: _write(d, "config.yaml", b"max_steps: 3\noutput_dir: \xff\n")),
    "train_config_not_a_mapping": ("train", lambda d: _write(d, "config.yaml", b"- max_steps\n- 3\n")),
    "train_config_unknown_option": ("train", lambda d: _write(d, "config.yaml", b"learning_rat: 0.1\n")),
}


@dataclass(frozen=True)
class Case:
    name: str
    text: Any = "draw a red circle."
    image: str | None = None
    params: dict = field(default_factory=dict)
    model: str | None = None
    file: str | None = None
    history: Any = None
    files: Any = None
    error: str | None = None
    overrides: dict = field(default_factory=dict)  # surface → its own regex, or None for a sane result there
    only: tuple[str, ...] = ()

    def expected(self, surface: str) -> str | None:
        """The regex for `surface`; "http" (the demo's server) defaults to the demo's."""
        default = self.expected("demo") if surface == "http" else self.error
        return self.overrides.get(surface, default)

    @property
    def surfaces(self) -> tuple[str, ...]:
        """Where the case can be fed in. A model case reaches the demo through `launch`, which must refuse
        the folder before it serves anything."""
        if self.only:
            return self.only
        if self.model:
            return ("api", "cli", "demo") if self.error else ("api", "cli")
        if self.file:
            return ("api", "cli")
        if self.history is not None or self.files is not None:
            return ("demo",)
        keys = set(self.params)
        return tuple(surface for surface, reachable in (
            ("api", keys <= API_PARAMS),
            ("cli", isinstance(self.text, str) and keys <= CLI_FLAGS.keys()),
            ("demo", keys <= DEMO_FIELDS),
        ) if reachable)


EMPTY_DEMO = "Type a message or attach an image first"
NOT_A_STRING_DEMO = "the message text must be a string"
NOT_UPLOADED = "not an uploaded file"
CANNOT_READ = "cannot read image|image file not found"
INVALID_INT = "invalid int value: '{}'"
NOT_UPLOADED_HTTP = "it was not uploaded by a user"  # Gradio's refusal, before the handler runs

CASES: list[Case] = [
    # -- prompt text ----------------------------------------------------------------------------------------
    Case("empty_prompt", text="", error="prompt (0 )?is empty", overrides={"demo": EMPTY_DEMO}),
    Case("whitespace_prompt", text="  \n\t \r ", error="prompt (0 )?is empty", overrides={"demo": EMPTY_DEMO}),
    Case("prompt_beyond_context", text="a red circle left of a blue square. " * 2000,
         error=r"prompt 0 is \d+ tokens; .* exceeds the model's context"),
    Case("control_characters", text="\x00\x01\x07 draw\x1b[31m a red\x7f circle\x08\x0c"),
    Case("only_nul_bytes", text="\x00\x00\x00"),
    Case("lone_surrogate", text="draw a \udcff circle", error="not valid Unicode"),
    Case("special_token_text", text="<|image_start|> a red circle <|image_end|> <|pad|>"),
    Case("eos_token_text", text="<|endoftext|> draw a red circle <|endoftext|>"),
    Case("bidi_and_zero_width", text="\u202edraw\u200b a \ufeffred circle \U0001f7e5 \u0301"),
    Case("zero_width_only", text="\u200b\u200c\u200d"),
    Case("batch_with_an_empty_prompt", text=["draw a circle.", "   "], error="prompt 1 is empty", only=("api",)),
    Case("prompt_none", text=None, error="prompt items must be str", overrides={"demo": EMPTY_DEMO}),
    Case("prompt_number", text=42, error="prompt items must be str", overrides={"demo": NOT_A_STRING_DEMO}),
    Case("prompt_bytes", text=b"draw a circle", error="prompt items must be str",
         overrides={"demo": NOT_A_STRING_DEMO}),
    Case("image_with_no_pixels", text=[PIL.Image.new("RGB", (0, 0)), "describe it."],
         error=r"prompt 0 holds an image with no pixels \(0x0\)", only=("api",)),
    Case("latent_with_nan", text=[Image(latent=torch.full((4, 8, 8), NAN)), "describe it."],
         error="image latent with NaN or infinite values", only=("api",)),
    Case("prompt_nested_lists", text=[["draw", ["a circle"]]], error="prompt items must be str", only=("api",)),
    # -- image files ----------------------------------------------------------------------------------------
    Case("truncated_png", text=ASK, image="truncated_png", error="cannot read image .*truncated",
         overrides={"demo": "truncated.png: not a readable PNG image"}),
    Case("truncated_jpeg", text=ASK, image="truncated_jpeg", error="cannot read image .*truncated.jpg",
         overrides={"demo": "truncated.jpg: not a readable JPEG image"}),
    Case("zero_byte_image", text=ASK, image="zero_byte", error=r"image file is empty \(0 bytes\)",
         overrides={"demo": r"empty.png: the file is empty \(0 bytes\)"}),
    Case("one_pixel_image", text=ASK, image="one_pixel"),
    Case("decompression_bomb_20000", text=ASK, image="bomb_20000", error="decompression bomb",
         overrides={"demo": "bomb.png: the image declares more than the pixel limit"}),
    Case("over_pixel_limit_5000", text=ASK, image="over_limit_5000",
         error="is 5000x5000, over the limit of .* pixels; refused before decoding",
         overrides={"demo": "large.png: 5000×5000 is over the pixel limit"}),
    Case("cmyk_jpeg", text=ASK, image="cmyk_jpeg"),
    Case("sixteen_bit_png", text=ASK, image="sixteen_bit_png"),
    Case("palette_png_with_transparency", text=ASK, image="palette_transparency_png"),
    Case("grey_with_alpha_png", text=ASK, image="grey_alpha_png"),
    Case("animated_gif", text=ASK, image="animated_gif"),
    Case("animated_png", text=ASK, image="animated_png"),
    Case("thin_1x4000_image", text=ASK, image="thin_1x4000_png"),
    Case("text_file_named_png", text=ASK, image="text_named_png", error="cannot read image .*notes.png",
         overrides={"demo": "notes.png: not a readable PNG image"}),
    Case("jpeg_named_png", text=ASK, image="jpeg_named_png",
         overrides={"demo": r"photo.png: not a readable PNG image \(the extension must match"}),
    Case("missing_image_file", text=ASK, image="missing_file", error="image file not found: .*never-uploaded.png",
         overrides={"demo": "never-uploaded.png: the file is gone"}),
    Case("folder_named_png", text=ASK, image="folder_named_png", error="is a folder, not an image file",
         overrides={"demo": "folder.png: the file is gone"}),
    Case("image_only_no_text", text="", image="one_pixel"),
    # -- paths that leave the upload folder (the demo must not open them; locally they are just files) ------
    Case("path_traversal_relative", text=ASK, image="traversal_relative", error=CANNOT_READ,
         overrides={"demo": f"passwd: {NOT_UPLOADED}"}),
    Case("path_traversal_from_upload_folder", text=ASK, image="traversal_from_folder", error=CANNOT_READ,
         overrides={"demo": f"passwd: {NOT_UPLOADED}", "http": NOT_UPLOADED_HTTP}),
    Case("absolute_path_outside", text=ASK, image="absolute_outside", error=CANNOT_READ,
         overrides={"demo": f"passwd: {NOT_UPLOADED}", "http": NOT_UPLOADED_HTTP}),
    Case("symlink_out_of_upload_folder", text=ASK, image="symlink_out_of_folder",
         overrides={"demo": f"link.png: {NOT_UPLOADED}"}),
    # -- generation arguments -------------------------------------------------------------------------------
    Case("max_new_tokens_zero", params={"max_new_tokens": 0}, error="max_new_tokens must be >= 1, got 0"),
    Case("max_new_tokens_negative", params={"max_new_tokens": -5}, error="max_new_tokens must be >= 1, got -5"),
    Case("max_new_tokens_fraction", params={"max_new_tokens": 2.5}, error="max_new_tokens must be an integer",
         overrides={"cli": INVALID_INT.format("2.5")}),
    Case("max_new_tokens_text", params={"max_new_tokens": "ten"}, error="max_new_tokens must be an integer",
         overrides={"cli": INVALID_INT.format("ten")}),
    Case("max_new_tokens_bool", params={"max_new_tokens": True}, error="max_new_tokens must be an integer",
         overrides={"cli": INVALID_INT.format("True")}),
    Case("max_new_tokens_beyond_context", params={"max_new_tokens": 10**6},
         error="max_new_tokens=1000000 it exceeds the model's context"),
    Case("max_new_tokens_numpy_integer", params={"max_new_tokens": np.int64(3)}),
    Case("steps_zero", params={"num_inference_steps": 0}, error="num_inference_steps must be >= 1, got 0"),
    Case("steps_nan", params={"num_inference_steps": NAN}, error="num_inference_steps must be an integer",
         overrides={"cli": INVALID_INT.format("nan")}),
    Case("steps_huge", params={"num_inference_steps": 10**7}, error="num_inference_steps must be <= 1000",
         overrides={"http": "Value 10000000 is greater than maximum value 100"}),  # the slider's own check
    Case("guidance_nan", params={"guidance_scale": NAN}, error="guidance_scale must be >= 0, got nan"),
    Case("guidance_inf", params={"guidance_scale": INF}, error="guidance_scale must be >= 0, got inf"),
    Case("guidance_negative", params={"guidance_scale": -1.0}, error="guidance_scale must be >= 0, got -1.0"),
    Case("guidance_text", params={"guidance_scale": "high"}, error="guidance_scale must be a number",
         overrides={"cli": "invalid float value: 'high'"}),
    Case("image_guidance_nan", params={"image_guidance_scale": NAN}, error="image_guidance_scale must be >= 0"),
    Case("temperature_negative", params={"temperature": -1.0}, error="temperature must be >= 0, got -1.0"),
    Case("temperature_nan", params={"temperature": NAN}, error="temperature must be >= 0, got nan"),
    Case("temperature_inf", params={"temperature": INF}, error="temperature must be >= 0, got inf"),
    Case("top_p_zero", params={"top_p": 0.0}, error="top_p must be > 0"),
    Case("top_p_above_one", params={"top_p": 1.5}, error=r"top_p must be in \(0, 1\]"),
    Case("top_k_zero", params={"top_k": 0}, error="top_k must be >= 1"),
    Case("max_images_negative", params={"max_images": -1}, error="max_images must be >= 0, got -1"),
    Case("cfg_interval_reversed", params={"cfg_interval": (0.8, 0.2)}, error="cfg_interval must be"),
    Case("cfg_renorm_text", params={"cfg_renorm": "yes"}, error="cfg_renorm must be True or False"),
    Case("output_type_unknown", params={"output_type": "jpeg"}, error="output_type must be"),
    Case("compression_unknown", params={"compression": "zip:3"}, error="unknown compression method 'zip'"),
    Case("compression_bad_amount", params={"compression": "pool:3"}, error="pool factor must divide"),
    Case("compression_negative_amount", params={"compression": "pool:-2"}, error="needs a positive integer amount"),
    Case("compression_not_text", params={"compression": 5}, error="compression must be a string",
         overrides={"cli": "unknown compression method '5'"}),
    Case("drafter_unknown", params={"drafter": "warp"}, error="unknown drafter 'warp'"),
    Case("drafter_without_a_head", params={"drafter": "vision-head"}, error="needs a trained VisionDraftHead"),
    Case("drafter_missing_folder", params={"drafter": "draft-lm:no/such/folder"}, error="no folder no/such/folder"),
    Case("drafter_not_text", params={"drafter": 5}, error="drafter must be a name",
         overrides={"cli": "unknown drafter '5'"}),
    Case("generator_not_a_generator", params={"generator": "seed"}, error="generator must be a torch.Generator"),
    Case("callback_not_callable", params={"callback_on_step_end": 5}, error="callback_on_step_end must be callable"),
    Case("seed_nan", params={"seed": NAN}, error="seed must be a whole number",
         overrides={"cli": INVALID_INT.format("nan")}),
    Case("seed_negative", params={"seed": -1}, error="seed must be a whole number", overrides={"cli": None}),
    # -- model folders --------------------------------------------------------------------------------------
    Case("model_folder_missing", model="missing", error="model folder not found"),
    Case("model_folder_empty", model="empty_folder", error=r"incomplete \(no model_index.json\)"),
    Case("model_path_is_a_file", model="file_not_folder", error="model folder not found or incomplete"),
    Case("model_without_backbone", model="no_backbone_folder", error="component 'backbone' has no folder"),
    Case("model_without_tokenizer", model="no_tokenizer_folder", error="component 'tokenizer' has no folder"),
    Case("model_without_weights", model="no_backbone_weights", error="backbone folder .* has no .safetensors"),
    Case("model_backbone_in_pickle", model="pickle_backbone",
         error=r"holds only pickle-format weights \(pytorch_model.bin\); mmgen loads safetensors only"),
    Case("model_image_modules_in_pickle", model="pickle_image_modules",
         error=r"image modules folder .* holds only pickle-format weights"),
    Case("model_torn_weights", model="torn_weights", error="model.safetensors is damaged or incomplete"),
    Case("model_index_not_json", model="index_not_json", error="model_index.json is not valid JSON"),
    Case("model_index_invalid_utf8", model="index_invalid_utf8", error="model_index.json is not valid UTF-8"),
    Case("model_tokenizer_invalid_utf8", model="tokenizer_invalid_utf8", error="tokenizer.json is not valid UTF-8"),
    Case("model_from_a_foreign_library", model="foreign_library", error="comes from library 'os'"),
    # -- data and config files ------------------------------------------------------------------------------
    Case("eval_data_invalid_utf8", file="eval_data_invalid_utf8", error=r"data.jsonl: not valid UTF-8 \(byte \d+\)"),
    Case("eval_data_not_json", file="eval_data_not_json", error="data.jsonl:1: not valid JSON"),
    Case("eval_data_bomb_image", file="eval_data_bomb_image", error="sample '0': image .*bomb.png .*decompression bomb"),
    Case("eval_data_missing_image", file="eval_data_missing_image", error="sample '0': image not found: .*gone.png"),
    Case("train_config_invalid_utf8", file="train_config_invalid_utf8", error="config.yaml is not valid UTF-8"),
    Case("train_config_not_a_mapping", file="train_config_not_a_mapping", error="must hold a mapping"),
    Case("train_config_unknown_option", file="train_config_unknown_option", error="unknown option.*learning_rat"),
    # -- what only the demo receives: chat histories and attachments from API clients -----------------------
    Case("history_not_a_list", history="a string", error="the chat history must be a list of messages"),
    Case("history_item_not_a_message", history=["hello"], error="chat history item 0 is not a message"),
    Case("history_text_not_a_string", history=[{"role": "user", "content": [{"type": "text", "text": None}]}],
         error="a text item of the chat history must hold a string"),
    Case("history_file_outside_uploads",
         history=[{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}],
         error=f"passwd: {NOT_UPLOADED}", overrides={"http": NOT_UPLOADED_HTTP}),
    Case("attachments_not_a_list", files="/etc/passwd", error="the message's files must be a list"),
    Case("attachment_not_a_path", files=[5], error="an attached file must be given by the path of an upload"),
    Case("attachment_without_path", files=[{"url": "http://example.com/a.png"}],
         error="an attached file must be given by the path of an upload"),
]

BY_NAME = {case.name: case for case in CASES}


def cases_for(surface: str, *, kind: str | None = None) -> list:
    """The cases a surface can run, as pytest params with readable ids. `kind` picks generation cases
    ("generate"), or those with a model folder ("model") or a data file ("file")."""
    import pytest

    def kind_of(case: Case) -> str:
        return "model" if case.model else "file" if case.file else "generate"

    return [pytest.param(case, id=case.name) for case in CASES
            if surface in case.surfaces and (kind is None or kind_of(case) == kind)]
