"""A tiny random pipeline for the demo's tests: it runs in well under a second and draws images.

The weights are random, so the answers are noise; what matters is that text and images flow through the
same code as with the trained default model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import LlamaConfig, LlamaForCausalLM

from mmgen.config import DEFAULT_MODEL_DIR
from mmgen.loading import load_tokenizer
from mmgen.model import ImageModules
from mmgen.pipelines import MMGenPipeline


def tiny_random_pipeline(seed: int = 0) -> MMGenPipeline:
    """A 2-layer Llama, a 2-block VAE and a small flow head on 16×16 images, biased to open images."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer")
    vae = AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    backbone = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    model = ImageModules(
        backbone_hidden_size=32, token_dim=16, grid_size=4, image_size=16, patch_size=2, num_queries=4,
        head_hidden_size=32, head_layers=2, head_heads=2,
    )
    with torch.no_grad():  # a random model rarely opens an image by itself: make <|image_start|> likely
        backbone.lm_head.weight[tokenizer.convert_tokens_to_ids("<|image_start|>")] += 1.0
    pipe = MMGenPipeline(backbone, tokenizer, vae.eval(), model.eval(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
