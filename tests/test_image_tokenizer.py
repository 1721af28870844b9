"""The image tokenizer wraps any diffusers VAE: encode → normalise → patchify, and back."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from mmgen.image_tokenizer import ImageTokenizer, open_image, to_pil
from mmgen.loading import load_vae

from .conftest import tiny_vae


def picture(color=(220, 30, 30), size=16) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (size, size), (240, 240, 240))
    image.paste(color, (4, 4, 12, 12))
    return image


def test_patchify_round_trip_and_shapes():
    tok = ImageTokenizer(tiny_vae(), image_size=16, patch_size=2)
    assert (tok.factor, tok.latent_size, tok.grid_size, tok.token_dim) == (2, 8, 4, 16)
    latents = tok.encode([picture(), picture((30, 30, 220))])
    assert latents.shape == (2, 4, 8, 8)
    tokens = tok.patchify(latents)
    assert tokens.shape == (2, 16, 16)
    torch.testing.assert_close(tok.unpatchify(tokens), latents)
    # token k covers latent rows 2*(k // 4) .. +1, cols 2*(k % 4) .. +1
    torch.testing.assert_close(tokens[0, 5].reshape(4, 2, 2), latents[0, :, 2:4, 2:4])


def test_scale_and_shift_from_the_vae_config_are_applied():
    vae = tiny_vae()
    tok = ImageTokenizer(vae, image_size=16)
    with torch.no_grad():
        raw = vae.encode(tok.preprocess([picture()])).latent_dist.mode()
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.5)
    tok = ImageTokenizer(vae, image_size=16)
    scaled = tok.encode([picture()])
    torch.testing.assert_close(scaled, (raw - 0.5) * 2.0)
    with torch.no_grad():
        torch.testing.assert_close(tok.decode(scaled), vae.decode(raw).sample)


def test_saved_vae_loads_from_a_local_folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, AutoencoderKL)
    a = ImageTokenizer(vae, image_size=16).encode([picture()])
    b = ImageTokenizer(loaded, image_size=16).encode([picture()])
    torch.testing.assert_close(a, b)


def test_autoencoder_tiny_is_supported():
    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    tok = ImageTokenizer(vae, image_size=16, patch_size=1)
    latents = tok.encode([picture()])
    assert latents.shape == (1, 4, 8, 8)
    assert tok.decode_pil(latents)[0].size == (16, 16)


def test_image_size_must_fit_the_vae():
    with pytest.raises(ValueError, match="multiple"):
        ImageTokenizer(tiny_vae(), image_size=15, patch_size=2)


def test_any_pil_mode_becomes_rgb():
    rgba = PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_pil(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    assert to_pil(PIL.Image.new("CMYK", (4, 4))).mode == "RGB"
    deep = PIL.Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_pil(deep).getpixel((0, 0)) == (255, 255, 255)
    palette = PIL.Image.new("P", (4, 4))
    assert to_pil(palette).mode == "RGB"


def test_open_image_refuses_bombs_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        open_image(empty)
    big = tmp_path / "big.png"
    PIL.Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ValueError, match="over the limit"):
        open_image(big, max_pixels=1000 * 1000)
    good = tmp_path / "good.png"
    picture().save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        open_image(truncated)
    assert open_image(good).size == (16, 16)
