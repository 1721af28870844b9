"""Weight-free metrics of interleaved outputs against a golden answer.

- Structure: ISG-style structural match, i.e. equality of the modality sequence `[text, image, ...]`.
- Images: count and count error; order, by matching predicted to golden images (one-to-one, maximum
  total SSIM, Hungarian algorithm) and comparing the matched order with the golden order by edit
  distance and Kendall's tau; SSIM and PSNR of the matched pairs.
- Text: ROUGE-L, the LCS-based F-measure of Lin (2004).

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
dynamic range 255, computed per RGB channel on the valid region (no padding) and averaged. Both images
are first resized to one common size (256x256 by default), so images of any size can be compared.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment

from mmgen.segments import Segment, Text

from .format import EvalSample, image_segments, text_segments, type_sequence

logger = logging.getLogger(__name__)

__all__ = [
    "ImageOrder",
    "ReferenceScorer",
    "image_count",
    "image_count_error",
    "image_order",
    "kendall_tau",
    "levenshtein",
    "match_images",
    "psnr",
    "rouge_l",
    "ssim",
    "structure",
    "structure_match",
]

Size = int | tuple[int, int]


# ----------------------------------------------------------------------------------------------
# structure and counts


def structure(segments: Sequence[Segment], normalize: bool = True) -> list[str]:
    """The modality sequence of a segment list.

    With `normalize`, whitespace-only texts are dropped and adjacent texts merged, since how a model
    splits a run of text into segments says nothing about the interleaved structure.
    """
    if not normalize:
        return type_sequence(segments)
    out: list[str] = []
    for seg in segments:
        if isinstance(seg, Text):
            if not seg.text.strip() or (out and out[-1] == "text"):
                continue
            out.append("text")
        else:
            out.append("image")
    return out


def structure_match(prediction: Sequence[Segment], golden: Sequence[Segment], normalize: bool = True) -> bool:
    """ISG structural match: the prediction's modality sequence equals the golden one exactly."""
    return structure(prediction, normalize) == structure(golden, normalize)


def image_count(segments: Sequence[Segment]) -> int:
    """Number of image segments."""
    return sum(1 for t in type_sequence(segments) if t == "image")


def image_count_error(prediction: Sequence[Segment], golden: Sequence[Segment]) -> int:
    """Absolute difference between the predicted and golden image counts."""
    return abs(image_count(prediction) - image_count(golden))


# ----------------------------------------------------------------------------------------------
# SSIM and PSNR


def _as_size(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or a (width, height) pair, got {size!r}")
    return size


def _pixels(image: PIL.Image.Image, size: Size) -> torch.Tensor:
    """An image as a float64 tensor (1, 3, H, W) in [0, 255], resized to `size` = (width, height)."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    width, height = _as_size(size)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), PIL.Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float64).copy())
    return rearrange(array, "h w c -> 1 c h w")


def _gaussian_kernel(window_size: int, sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian; the 2-D window is its outer product, applied separably."""
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_pixels(
    x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, k1: float, k2: float
) -> float:
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of one size, got {tuple(x.shape)} and {tuple(y.shape)}")
    channels, height, width = x.shape[1:]
    if min(height, width) < window_size:
        raise ValueError(
            f"SSIM needs images of at least {window_size}x{window_size} pixels, got {width}x{height}"
        )
    g = _gaussian_kernel(window_size, sigma)
    rows = g.view(1, 1, window_size, 1).expand(channels, 1, window_size, 1)
    cols = g.view(1, 1, 1, window_size).expand(channels, 1, 1, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid-region Gaussian filter, per channel
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    mu_x, mu_y, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y])).unbind(0)  # one batched filter pass
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def ssim(
    a: PIL.Image.Image,
    b: PIL.Image.Image,
    size: Size = 256,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity of two images after resizing both to `size`; 1.0 for identical images."""
    return _ssim_pixels(_pixels(a, size), _pixels(b, size), window_size, sigma, k1, k2)


def psnr(a: PIL.Image.Image, b: PIL.Image.Image, size: Size = 256) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) after resizing both to `size`; inf for identical images."""
    mse = float(((_pixels(a, size) - _pixels(b, size)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------------------------
# image order


def match_images(
    predicted: Sequence[PIL.Image.Image],
    golden: Sequence[PIL.Image.Image],
    similarity: Callable[[PIL.Image.Image, PIL.Image.Image], float] | None = None,
    min_similarity: float | None = None,
    size: Size = 256,
) -> list[tuple[int, int, float]]:
    """Match predicted to golden images one-to-one, maximising the total similarity (SSIM by default).

    Returns `(predicted index, golden index, similarity)` triples sorted by predicted index. With
    different counts, the surplus images stay unmatched; pairs below `min_similarity` are dropped.
    """
    if not predicted or not golden:
        return []
    if similarity is None:
        pred_px = [_pixels(im, size) for im in predicted]
        gold_px = [_pixels(im, size) for im in golden]
        sim = np.array([[_ssim_pixels(p, g, 11, 1.5, 0.01, 0.03) for g in gold_px] for p in pred_px])
    else:
        sim = np.array([[float(similarity(p, g)) for g in golden] for p in predicted])
    rows, cols = linear_sum_assignment(sim, maximize=True)
    pairs = [(int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols)]
    if min_similarity is not None:
        pairs = [p for p in pairs if p[2] >= min_similarity]
    return sorted(pairs)


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def kendall_tau(order: Sequence[float]) -> float | None:
    """Kendall's tau between positions 0..n-1 and `order` (no ties in either): +1 same order, -1
    reversed. None when fewer than two items, where the order is undefined."""
    n = len(order)
    if n < 2:
        return None
    score = 0
    for i in range(n):
        for j in range(i + 1, n):
            score += 1 if order[j] > order[i] else -1 if order[j] < order[i] else 0
    return score / (n * (n - 1) / 2)


@dataclass
class ImageOrder:
    """How the predicted images line up with the golden ones.

    `sequence` gives, for each predicted image in output order, the golden index it was matched to
    (None when unmatched). `edit_distance` is the Levenshtein distance between that sequence and the
    golden order 0..m-1, where every unmatched predicted image counts as a wrong symbol; it is 0 exactly
    when the counts agree and every image sits in its golden position. `kendall_tau` ranks the matched
    pairs only (None below two matches).
    """

    matches: list[tuple[int, int, float]] = field(default_factory=list)
    sequence: list[int | None] = field(default_factory=list)
    edit_distance: int = 0
    kendall_tau: float | None = None

    @property
    def mean_similarity(self) -> float | None:
        """Mean similarity of the matched pairs."""
        return float(np.mean([m[2] for m in self.matches])) if self.matches else None


def image_order(
    predicted: Sequence[PIL.Image.Image],
    golden: Sequence[PIL.Image.Image],
    similarity: Callable[[PIL.Image.Image, PIL.Image.Image], float] | None = None,
    min_similarity: float | None = None,
    size: Size = 256,
) -> ImageOrder:
    """Order agreement between predicted and golden images (see `ImageOrder` and `match_images`)."""
    matches = match_images(predicted, golden, similarity, min_similarity, size)
    to_golden = {p: g for p, g, _ in matches}
    sequence = [to_golden.get(i) for i in range(len(predicted))]
    # an unmatched predicted image gets a symbol that equals no golden index
    symbols = [g if g is not None else -(i + 1) for i, g in enumerate(sequence)]
    return ImageOrder(
        matches=matches,
        sequence=sequence,
        edit_distance=levenshtein(symbols, list(range(len(golden)))),
        kendall_tau=kendall_tau([g for _, g, _ in matches]),
    )


# ----------------------------------------------------------------------------------------------
# text

_WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure: with LCS the longest common word subsequence, P = LCS/|candidate|,
    R = LCS/|reference| and F = (1 + beta^2) P R / (R + beta^2 P). Words are lower-cased `\\w+` runs;
    0.0 when either side has no words."""
    if not isinstance(candidate, str) or not isinstance(reference, str):
        raise TypeError("rouge_l compares two strings")
    cand, ref = _tokens(candidate), _tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


# ----------------------------------------------------------------------------------------------
# the scorer the runner uses


@dataclass
class ReferenceScorer:
    """All weight-free metrics of one output against the sample's golden answer, as a flat dict.

    Without a golden answer only `n_images` is reported. PSNR of identical images is infinite; rows
    store `min(psnr, psnr_cap)` so that means stay finite and the JSON stays standard.
    """

    image_size: Size = 256
    psnr_cap: float = 100.0
    name: str = "reference"

    def __call__(self, sample: EvalSample, output: list[Segment]) -> dict[str, Any]:
        scores: dict[str, Any] = {"n_images": image_count(output)}
        if sample.golden is None:
            return scores
        golden = sample.golden
        scores["n_images_golden"] = image_count(golden)
        scores["image_count_error"] = image_count_error(output, golden)
        scores["structure_match"] = structure_match(output, golden)
        scores["rouge_l"] = rouge_l("\n".join(text_segments(output)), "\n".join(text_segments(golden)))
        pred_images, gold_images = image_segments(output), image_segments(golden)
        if gold_images:
            order = image_order(pred_images, gold_images, size=self.image_size)
            scores["order_edit_distance"] = order.edit_distance
            scores["kendall_tau"] = order.kendall_tau
            scores["ssim"] = order.mean_similarity
            if order.matches:
                values = [psnr(pred_images[p], gold_images[g], self.image_size) for p, g, _ in order.matches]
                scores["psnr"] = float(np.mean([min(v, self.psnr_cap) for v in values]))
            else:
                scores["psnr"] = None
        return scores
