"""CLIP-based metrics of interleaved outputs, with an open_clip model loaded from a local checkpoint.

- CLIPScore (Hessel et al., 2021): `2.5 * max(cos(text, image), 0)` for each image and the text that
  leads into it (the closest non-blank text segment before the image, so a text followed by several
  images is paired with each of them), averaged over the pairs of one output.
- Image consistency: the mean cosine similarity between consecutive images of one output, a proxy for
  keeping entities and style stable across an interleaved story.

Nothing here downloads: the checkpoint must be a local file, and architectures whose text tower would
be fetched from the Hugging Face hub are refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

from mmgen.segments import Image, Segment, Text

from .format import EvalSample

logger = logging.getLogger(__name__)

__all__ = ["CLIPSCORE_WEIGHT", "ClipScorer", "load_clip_scorer", "text_image_pairs"]

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. (2021) rescale cosines so CLIPScore spans roughly [0, 1]


def text_image_pairs(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """`(text index, image index)` pairs into `segments`: each image with the closest non-blank text
    before it. Images with no text before them are not paired."""
    pairs = []
    last_text: int | None = None
    for i, seg in enumerate(segments):
        if isinstance(seg, Text):
            if seg.text.strip():
                last_text = i
        elif isinstance(seg, Image) and last_text is not None:
            pairs.append((last_text, i))
    return pairs


def _pil(seg: Segment) -> PIL.Image.Image:
    if not isinstance(seg, Image) or seg.image is None:
        raise ValueError("CLIP metrics need pixel images; decode latent-only images first")
    return seg.image


@dataclass
class ClipScorer:
    """CLIPScore and image consistency with one open_clip model (see the module docstring)."""

    model: torch.nn.Module
    preprocess: Callable[[PIL.Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: str = "cpu"
    weight: float = CLIPSCORE_WEIGHT
    batch_size: int = 16
    name: str = field(default="clip")

    @torch.no_grad()
    def embed_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, shape (n, d)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]]
            )
            out.append(self.model.encode_image(batch.to(self.device)).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings, shape (n, d); texts longer than the context are truncated."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
            out.append(self.model.encode_text(tokens.to(self.device)).float())
        return F.normalize(torch.cat(out), dim=-1)

    def clip_scores(self, segments: Sequence[Segment]) -> list[float]:
        """CLIPScore of every text-image pair of one output, in pair order."""
        pairs = text_image_pairs(segments)
        if not pairs:
            return []
        texts = self.embed_texts([segments[t].text for t, _ in pairs])
        images = self.embed_images([_pil(segments[i]) for _, i in pairs])
        cosines = (texts * images).sum(-1)
        return [self.weight * max(float(c), 0.0) for c in cosines]

    def clip_score(self, segments: Sequence[Segment]) -> float | None:
        """Mean CLIPScore over the text-image pairs of one output; None if it has no pair."""
        scores = self.clip_scores(segments)
        return sum(scores) / len(scores) if scores else None

    def image_consistency(self, segments: Sequence[Segment]) -> float | None:
        """Mean cosine between consecutive images of one output; None with fewer than two images."""
        images = [_pil(s) for s in segments if isinstance(s, Image)]
        if len(images) < 2:
            return None
        emb = self.embed_images(images)
        return float((emb[:-1] * emb[1:]).sum(-1).mean())

    def __call__(self, sample: EvalSample, output: list[Segment]) -> dict[str, Any]:
        return {
            "clip_score": self.clip_score(output),
            "clip_image_consistency": self.image_consistency(output),
        }


def _register_config(arch: str, model_config: dict[str, Any]) -> None:
    """Make a model config dict known to open_clip under the name `arch`."""
    import open_clip

    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_config]
    if missing:
        raise ValueError(f"open_clip model_config for {arch!r} lacks {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.json"
        path.write_text(json.dumps(model_config), encoding="utf-8")
        open_clip.add_model_config(path)  # read now; the registry keeps the config after the file is gone


def _check_offline(arch: str, config: dict[str, Any]) -> None:
    text_cfg = config.get("text_cfg") or {}
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not Path(name).is_dir():
            raise ValueError(
                f"open_clip architecture {arch!r} takes its text tower from the hub ({key}={name!r}); "
                "only architectures that build locally are supported, since nothing may be downloaded"
            )


def load_clip_scorer(
    checkpoint: str | os.PathLike,
    arch: str,
    model_config: dict[str, Any] | None = None,
    device: str = "cpu",
) -> ClipScorer:
    """Load an open_clip model of architecture `arch` with weights from the local file `checkpoint`.

    `model_config` registers a custom architecture (an open_clip config dict with `embed_dim`,
    `vision_cfg`, `text_cfg`) under the name `arch` first.
    """
    import open_clip

    if not isinstance(arch, str) or not arch:
        raise TypeError(f"arch must be an open_clip architecture name, got {arch!r}")
    if ":" in arch:
        raise ValueError(
            f"arch {arch!r} names a remote or directory source; give an architecture name and a local checkpoint"
        )
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        # open_clip would take an unknown string for a pretrained tag and try to download it
        raise ValueError(
            f"CLIP checkpoint not found: {checkpoint} (must be a local file; nothing is downloaded)"
        )
    if model_config is not None:
        _register_config(arch, model_config)
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; pass model_config to register a custom one"
        )
    _check_offline(arch, config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(checkpoint), device=device, pretrained_image=False, pretrained_text=False
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    logger.info("loaded open_clip %s from %s", arch, checkpoint)
    return ClipScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device)
