"""The image tokenizer: pixels ⇄ normalised VAE latents ⇄ patch tokens.

It wraps any diffusers `AutoencoderKL` or `AutoencoderTiny`, so a ShapesWorld VAE trained here and an SD
or FLUX VAE loaded from a local folder go through the same code.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from einops import rearrange


def _downsample_factor(vae) -> int:
    if isinstance(vae, AutoencoderKL):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    if isinstance(vae, AutoencoderTiny):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    raise TypeError(f"unsupported VAE class {type(vae).__name__}; use AutoencoderKL or AutoencoderTiny")


def to_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    """Flatten any PIL mode (palette, alpha, CMYK, 16-bit) onto RGB; transparency goes to white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return PIL.Image.fromarray((arr / top * 255).round().astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTokenizer:
    """Encode images to normalised latents `(z - shift) * scale`, cut them into p×p patch tokens, and back."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny, image_size: int, patch_size: int = 1):
        self.vae = vae
        self.factor = _downsample_factor(vae)
        if image_size % (self.factor * patch_size):
            raise ValueError(
                f"image_size {image_size} must be a multiple of the VAE factor {self.factor} x patch {patch_size}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor

    @property
    def grid_size(self) -> int:
        """Side of the square grid of patch tokens."""
        return self.latent_size // self.patch_size

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def preprocess(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """PIL images → (B, 3, S, S) in [-1, 1] at the tokenizer's resolution."""
        arrays = []
        for image in images:
            image = to_pil(image)
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = torch.from_numpy(np.stack(arrays))
        return rearrange(pixels, "b h w c -> b c h w").to(self.device, self.dtype)

    @staticmethod
    def postprocess(pixels: torch.Tensor) -> list[PIL.Image.Image]:
        arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arr = rearrange(arr, "b c h w -> b h w c").cpu().numpy()
        return [PIL.Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def encode(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """Images → normalised latents (B, C, h, w). Uses the posterior mode, so encoding is deterministic."""
        pixels = self.preprocess(images)
        if isinstance(self.vae, AutoencoderTiny):
            z = self.vae.encode(pixels).latents
        else:
            z = self.vae.encode(pixels).latent_dist.mode()
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → pixels in [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample

    def decode_pil(self, latents: torch.Tensor) -> list[PIL.Image.Image]:
        return self.postprocess(self.decode(latents))

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, N, C·p·p), row-major over the token grid."""
        p = self.patch_size
        return rearrange(latents, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=p, p2=p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p, g = self.patch_size, self.grid_size
        return rearrange(tokens, "b (gh gw) (c p1 p2) -> b c (gh p1) (gw p2)", gh=g, gw=g, p1=p, p2=p)


MAX_IMAGE_PIXELS = 4096 * 4096


def open_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open an image file safely: the size is checked from the header before any pixel is decoded, so a
    decompression bomb is refused; truncated, empty and unreadable files give a ValueError naming them.
    Animated images give their first frame."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image path is a folder, not an image file: {path}")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image {path} is {width}x{height}, over the limit of {max_pixels} pixels; refused before decoding"
                )
            image.seek(0)
            image.load()
            return to_pil(image.copy())
    except PIL.Image.DecompressionBombError:
        raise ValueError(f"image {path} is too large to decode safely (decompression bomb)") from None
    except (OSError, SyntaxError, PIL.UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
