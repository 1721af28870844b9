"""The two kinds of segment an interleaved sequence is made of."""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch


@dataclass(frozen=True)
class Text:
    """A run of text. User text is data: special-token look-alikes in it are escaped when encoded."""

    text: str

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Text segment needs a str, got {type(self.text).__name__}")


@dataclass(eq=False)
class Image:
    """An image, as pixels (PIL) or as a VAE latent of shape (C, H, W).

    `latent` is filled in once the image has been encoded, so a stream can carry both views.
    """

    image: PIL.Image.Image | None = None
    latent: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.image is None and self.latent is None:
            raise ValueError("Image segment needs a PIL image or a latent tensor")
        if self.image is not None and not isinstance(self.image, PIL.Image.Image):
            raise TypeError(f"Image segment needs a PIL.Image, got {type(self.image).__name__}")
        if self.latent is not None and (not isinstance(self.latent, torch.Tensor) or self.latent.ndim != 3):
            raise ValueError("Image latent must be a tensor of shape (C, H, W)")

    def __eq__(self, other):
        if not isinstance(other, Image):
            return NotImplemented
        if self.latent is not None and other.latent is not None:
            return self.latent.shape == other.latent.shape and torch.equal(self.latent, other.latent)
        if self.image is not None and other.image is not None:
            return self.image.size == other.image.size and self.image.tobytes() == other.image.tobytes()
        return False


Segment = Text | Image


def as_segments(prompt: str | Segment | list) -> list[Segment]:
    """Normalise a prompt given as a string, a PIL image, a segment, or a list of those."""
    items = prompt if isinstance(prompt, (list, tuple)) else [prompt]
    out: list[Segment] = []
    for item in items:
        if isinstance(item, (Text, Image)):
            out.append(item)
        elif isinstance(item, str):
            out.append(Text(item))
        elif isinstance(item, PIL.Image.Image):
            out.append(Image(item))
        else:
            raise TypeError(f"prompt items must be str, PIL.Image, Text or Image, got {type(item).__name__}")
    return out
