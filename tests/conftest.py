"""Shared tiny fixtures: the committed ShapesWorld tokenizer, tiny random backbones, VAEs and pipelines, and the
helpers of the demo tests (a free port, Gradio's upload folder, a decompression bomb)."""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import AutoConfig, AutoModelForCausalLM

from mmgen.loading import load_tokenizer
from mmgen.model import ImageModules
from mmgen.pipelines import MMGenPipeline

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "mmgen" / "default_model" / "tokenizer"
BACKBONE_TYPES = ("llama", "qwen2", "gemma", "gpt2")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def grad_mode_is_left_as_found():
    """Library calls must scope `no_grad` themselves; a leaked global switch breaks later training silently."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's grad mode disabled"


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny matrix products gain nothing from more, and a child process
    started with OMP_NUM_THREADS=1 then computes the same floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def tiny_backbone(kind: str, tokenizer, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
               tie_word_embeddings=False)
    if kind == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=hidden, n_layer=2, n_head=4,
                                      n_positions=1024, **ids)
    else:
        config = AutoConfig.for_model(kind, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=hidden // 4, max_position_embeddings=1024, **ids)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def tiny_image_modules(hidden: int = 32, seed: int = 0, **head_settings) -> ImageModules:
    """Tiny random image modules; `head_settings` are `ImageModules`' settings of what the flow head reads
    (`head_text_tokens`, `head_image_tokens`, `head_reference`, `head_plan`)."""
    torch.manual_seed(seed)
    modules = ImageModules(backbone_hidden_size=hidden, token_dim=16, grid_size=4, image_size=16, patch_size=2,
                           num_queries=4, head_hidden_size=32, head_layers=2, head_heads=2, **head_settings)
    # The head's adaLN gates, output projection, reference and plan inputs start at zero, which would make a random
    # head's velocity zero whatever it reads: small random weights make every input of the head count.
    head = modules.flow_head
    with torch.no_grad():
        for layer in [block.ada for block in head.blocks] + [head.ada_out, head.out, head.reference_in,
                                                             head.plan_in]:
            if layer is not None:
                for weight in layer.parameters():
                    weight.normal_(std=0.05)
    return modules


def tiny_pipeline(tokenizer, kind: str = "llama", image_scale: float = 1.0, seed: int = 0,
                  **head_settings) -> MMGenPipeline:
    """A random pipeline. `image_scale` multiplies the output row of <|image_start|>, so that a random
    model picks it wherever its hidden state leans that way: a deterministic mix of text and images.
    `head_settings` go to `tiny_image_modules`."""
    backbone = tiny_backbone(kind, tokenizer, seed=seed)
    if image_scale != 1.0:
        with torch.no_grad():
            backbone.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids("<|image_start|>")] *= image_scale
    modules = tiny_image_modules(seed=seed, **head_settings)
    pipe = MMGenPipeline(backbone, tokenizer, tiny_vae(seed), modules, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny pipeline saved as a model folder, for the command line and `from_pretrained`."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_pipeline(tokenizer, "llama", image_scale=6.0).save_pretrained(path)
    return path


@pytest.fixture
def make_pipeline(tokenizer):
    def make(kind: str = "llama", image_scale: float = 1.0, seed: int = 0, **head_settings) -> MMGenPipeline:
        return tiny_pipeline(tokenizer, kind, image_scale, seed, **head_settings)

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_demo(pipe, **kwargs) -> Iterator:
    """The demo of `pipe` served on 127.0.0.1 from this process (`.local_url`), closed afterwards."""
    from mmgen.app import build_demo, serve

    demo = serve(build_demo(pipe, **kwargs), port=free_port(), block=False)
    try:
        yield demo
    finally:
        demo.close()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose header claims `width`×`height` pixels: a decompression bomb's signature."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.fixture
def upload_dir(tmp_path, monkeypatch):
    """Gradio's upload folder, moved into the test's tmp dir."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder
