"""The ShapesBench parser: it reads an image back into ShapesWorld objects.

1. Colour. The background is neutral, and blending a colour with a neutral one keeps its hue while it
   scales its chroma (max - min of RGB). Pixels whose chroma reaches a fraction of the nearest palette
   colour's chroma are foreground.
2. Objects. Each connected foreground blob is one object. Its colour is the palette colour nearest
   its chroma-weighted mean hue, which is robust to noise and to a global hue drift. A blob is split
   by colour only when two colours each hold a large share of it (touching objects).
3. Soft mask. alpha = (chroma - background noise floor) / (the object's own saturation - floor). So
   pale or noisy generated images give the same mask as clean renders.
4. Shape and size. Blur keeps an object's mass and centroid and adds sigma^2 to its variance. So each
   shape hypothesis gets its box (centre, half-side r) and blur from the mask's moments. The
   hypothesis whose blurred template best matches the mask (soft IoU) wins. Size comes from r.
5. Credibility. A blob counts as an object only if it looks like one of the world's objects: its best
   template fits (soft IoU >= MIN_FIT), its box side is near one of the two sizes, and its colour is
   not washed out. Noise, smooth colour fields and solid fills make blobs too, so the rest are
   reported as rejected, with the foreground they leave unexplained (`clutter`), never as objects.

Measured on random scenes of 1-4 objects: 100% on clean renders and under a 0.8-1.5 px Gaussian
blur, pixel noise (sigma 15), a 40% desaturation or a 10 degree hue drift. JPEG's chroma subsampling
is the known weak spot: it blurs colour at half resolution and loses small stars.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
from scipy import ndimage

from .render import coverage
from .scene import COLORS, PALETTE, RADIUS, SHAPES, SIZES, ObjSpec, Scene, SceneSpec, relation

DETECT_THRESHOLD = 0.35  # foreground when the chroma is at least this fraction of the palette colour's
SPLIT_SHARE = 0.25  # a blob holding two colours with at least this share each is two touching objects
HUE_WINDOW = 35.0  # degrees: pixels this close in hue to an object's colour belong to its soft mask
MIN_AREA_FRACTION = 0.003  # specks smaller than this fraction of the image (12 px at 64x64) are noise
# A box side above the midpoint between the small and large diameters reads as large.
SIZE_THRESHOLD = RADIUS["small"] + RADIUS["large"]
DEFAULT_TOL = 0.08  # position tolerance (fraction of the image side) when comparing with a scene
# Credibility of a blob as an object (calibrated in tests/test_shapes_parser.py). Real objects fit at
# 0.94-1.0 clean, 0.65 at worst under a 1.5 px blur with noise (sigma 15); blobs of noise images stay
# below 0.45 with a few near 0.63, and smooth colour fields that fit better are rarely object-sized.
MIN_FIT = 0.6  # soft IoU of the best template below which a blob is not any of the world's shapes
SIZE_SLACK = 1.6  # a box side may be this factor below the small side or above the large one
MIN_SATURATION = 0.45  # an object's core chroma is at least this fraction of its palette colour's


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of an (..., 3) float RGB array."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return (h * 60.0) % 360.0, chroma


_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float64)
_PALETTE_HUE, _PALETTE_CHROMA = _hue(_PALETTE_RGB)


@dataclass(frozen=True)
class Detected:
    """An object read from an image. x, y: box centre in [0, 1]; area: fraction of the image's pixels;
    fit: soft IoU of the chosen shape template (1.0 = perfect); side: box side as a fraction of the
    image side; saturation: core chroma as a fraction of the palette colour's (1.0 = as rendered)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    area: float
    fit: float = 1.0
    side: float = 0.0
    saturation: float = 1.0

    def to_dict(self) -> dict:
        return {
            "shape": self.shape, "color": self.color, "size": self.size, "x": self.x, "y": self.y,
            "area": self.area, "fit": self.fit, "side": self.side, "saturation": self.saturation,
        }


@dataclass(frozen=True)
class ImageReading:
    """Everything the parser finds in an image. objects: the credible objects, sorted left to right;
    rejected: blobs that are not credibly one of the world's objects; clutter: the fraction of the
    image's pixels that are foreground (saturated) but belong to no accepted object."""

    objects: list[Detected]
    rejected: list[Detected]
    clutter: float


def is_credible(d: Detected) -> bool:
    """True if a detected blob is plausibly one of the world's objects: a good shape fit, a box side
    near one of the two sizes, and a colour that is not washed out."""
    sides = [2.0 * RADIUS[s] for s in SIZES]
    return (
        d.fit >= MIN_FIT
        and min(sides) / SIZE_SLACK <= d.side <= max(sides) * SIZE_SLACK
        and d.saturation >= MIN_SATURATION
    )


def _as_array(img: Any) -> np.ndarray:
    if hasattr(img, "image") and not isinstance(img, PIL.Image.Image):  # an Image segment
        img = img.image
    if not isinstance(img, PIL.Image.Image):
        raise TypeError(f"parse_image needs a PIL.Image (or an Image segment with pixels), got {type(img).__name__}")
    return np.asarray(img.convert("RGB"), dtype=np.float64)


@dataclass(frozen=True)
class _Moments:
    """Area, centroid offset and variances of a shape whose box is [-1, 1]^2 (units of r and r^2)."""

    area: float
    mx: float
    my: float
    vx: float
    vy: float


def _shape_moments(shape: str, n: int = 256) -> _Moments:
    cov = coverage(shape, n / 2, n / 2, n / 2, n / 2, (0, 0, n, n), supersample=2)
    u = (np.arange(n) + 0.5 - n / 2) / (n / 2)
    mass = cov.sum()
    mx = float((cov.sum(0) * u).sum() / mass)
    my = float((cov.sum(1) * u).sum() / mass)
    vx = float((cov.sum(0) * (u - mx) ** 2).sum() / mass)
    vy = float((cov.sum(1) * (u - my) ** 2).sum() / mass)
    return _Moments(float(mass / (n / 2) ** 2), mx, my, vx, vy)


_MOMENTS: dict[str, _Moments] = {s: _shape_moments(s) for s in SHAPES}
MAX_BLUR = 0.3  # largest blur (Gaussian sigma, as a fraction of the object radius) a fit may assume
TEMPLATE_SUPERSAMPLE = 3  # sub-pixel grid of the templates: 3x3 is enough for a soft IoU


def _fit(alpha: np.ndarray) -> tuple[str, float, float, float, float]:
    """Fit every shape to the soft mask `alpha` and keep the best: (shape, soft IoU, cx, cy, r).

    Blur preserves an object's mass (sum of alpha) and centroid and adds sigma^2 to its variance.
    So for a shape hypothesis, the moments give r, the box centre and the blur. The blurred template
    is then compared with alpha. The fit therefore does not depend on how soft the edges are.
    """
    h, w = alpha.shape
    mass = float(alpha.sum())
    if mass <= 1e-9:  # nothing of the object's hue inside its window
        return SHAPES[0], 0.0, w / 2, h / 2, 0.0
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    px, py = alpha.sum(0), alpha.sum(1)
    mean_x, mean_y = float((px * xs).sum() / mass), float((py * ys).sum() / mass)
    var_x = float((px * (xs - mean_x) ** 2).sum() / mass)
    var_y = float((py * (ys - mean_y) ** 2).sum() / mass)
    best = (SHAPES[0], -1.0, mean_x, mean_y, 1.0)
    for shape in SHAPES:
        m = _MOMENTS[shape]
        r = (mass / m.area) ** 0.5
        cx, cy = mean_x - m.mx * r, mean_y - m.my * r
        blur2 = 0.5 * ((var_x - m.vx * r * r) + (var_y - m.vy * r * r))
        sigma = min(max(blur2, 0.0) ** 0.5, MAX_BLUR * r)
        t = coverage(shape, cx, cy, r, r, (0, 0, w, h), supersample=TEMPLATE_SUPERSAMPLE)
        if sigma > 0.05:
            t = ndimage.gaussian_filter(t, sigma, mode="constant")
        iou = float(np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9))
        if iou > best[1]:
            best = (shape, iou, cx, cy, r)
    return best


def _hue_gap(h: np.ndarray | float, ref: float) -> np.ndarray | float:
    d = np.abs(np.asarray(h) - ref) % 360.0
    return np.minimum(d, 360.0 - d)


def _mean_hue(hue: np.ndarray, weight: np.ndarray) -> float:
    """Circular weighted mean of hues in degrees."""
    rad = np.deg2rad(hue)
    return float(np.rad2deg(np.arctan2((weight * np.sin(rad)).sum(), (weight * np.cos(rad)).sum())) % 360.0)


def _nearest_color(h: float) -> int:
    return int(np.argmin(_hue_gap(_PALETTE_HUE, h)))


def _regions(fg: np.ndarray, hue: np.ndarray, chroma: np.ndarray, label: np.ndarray, min_pixels: int):
    """Yield (mask, colour index) per object. One connected foreground blob is one object, coloured by
    its mean hue. A blob is split by colour only when two colours each hold a large share of it, as
    when two objects of different colours touch."""
    comps, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    for k, sl in enumerate(ndimage.find_objects(comps), start=1):
        comp = comps[sl] == k
        if comp.sum() < min_pixels:
            continue
        w = chroma[sl][comp]
        ci = _nearest_color(_mean_hue(hue[sl][comp], w))
        shares = np.bincount(label[sl][comp], weights=w, minlength=len(COLORS)) / w.sum()
        big = [c for c in range(len(COLORS)) if shares[c] >= SPLIT_SHARE]
        if len(big) < 2:
            yield sl, comp, ci
            continue
        for c in big:
            parts, _ = ndimage.label(comp & (label[sl] == c), structure=np.ones((3, 3), dtype=bool))
            for j, psl in enumerate(ndimage.find_objects(parts), start=1):
                part = parts[psl] == j
                if part.sum() >= min_pixels:
                    outer = tuple(slice(a.start + p.start, a.start + p.stop) for a, p in zip(sl, psl))
                    yield outer, part, c


def parse_image(img: PIL.Image.Image, min_area: float = MIN_AREA_FRACTION) -> list[Detected]:
    """Read the objects of a ShapesWorld-style image (any resolution), sorted left to right."""
    return read_image(img, min_area).objects


def read_image(img: PIL.Image.Image, min_area: float = MIN_AREA_FRACTION) -> ImageReading:
    """Read an image (any resolution) into its credible objects, the rejected blobs and the clutter."""
    rgb = _as_array(img)
    h, w = rgb.shape[:2]
    hue, chroma = _hue(rgb)
    label = _hue_gap(hue[..., None], _PALETTE_HUE).argmin(-1)
    fg = chroma >= DETECT_THRESHOLD * _PALETTE_CHROMA[label]
    min_pixels = max(4, int(round(min_area * h * w)))
    background = ~ndimage.binary_dilation(fg, iterations=3)
    # Chroma of the background: zero for clean renders, the noise level for generated images.
    floor = float(np.median(chroma[background])) if background.any() else 0.0
    floor = min(floor, 0.25 * float(_PALETTE_CHROMA.min()))
    pad = 3  # the soft edge of a blurred object reaches a few pixels beyond its foreground
    objects: list[Detected] = []
    rejected: list[Detected] = []
    explained = np.zeros((h, w), dtype=bool)  # the pixels of accepted objects
    for sl, comp, ci in _regions(fg, hue, chroma, label, min_pixels):
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        own = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        own[sl[0].start - y0 : sl[0].stop - y0, sl[1].start - x0 : sl[1].stop - x0] = comp
        own = ndimage.binary_dilation(own, structure=np.ones((3, 3), dtype=bool), iterations=pad)
        # alpha = 1 at the object's own saturation (generated images are often paler than the palette),
        # measured inside the object, and alpha = 0 at the background's noise floor.
        measured = float(np.percentile(chroma[sl][comp], 95))
        core = min(max(measured, 0.3 * _PALETTE_CHROMA[ci]), _PALETTE_CHROMA[ci])
        win_hue, win_chroma = hue[y0:y1, x0:x1], chroma[y0:y1, x0:x1]
        same_hue = _hue_gap(win_hue, _PALETTE_HUE[ci]) <= HUE_WINDOW
        a = np.where(own & same_hue, np.clip((win_chroma - floor) / (core - floor), 0.0, 1.0), 0.0)
        shape, fit, cx, cy, r = _fit(a)
        side = 2.0 * r / max(h, w)
        d = Detected(
            shape=shape,
            color=COLORS[ci],
            size="large" if side >= SIZE_THRESHOLD else "small",
            x=(cx + x0) / w,
            y=(cy + y0) / h,
            area=float(comp.sum()) / (h * w),
            fit=fit,
            side=side,
            saturation=measured / float(_PALETTE_CHROMA[ci]),
        )
        if is_credible(d):
            objects.append(d)
            explained[y0:y1, x0:x1] |= own
        else:
            rejected.append(d)
    objects.sort(key=lambda d: (d.x, d.y))
    rejected.sort(key=lambda d: (d.x, d.y))
    return ImageReading(objects, rejected, clutter=float((fg & ~explained).sum()) / (h * w))


# ----------------------------------------------------------------------------------------------
# Comparing detections with scenes and specs
# ----------------------------------------------------------------------------------------------


def find(objects: Sequence[Any], spec: ObjSpec) -> list[int]:
    """Indices of the objects that fit `spec` (shape, and colour/size when given)."""
    return [i for i, o in enumerate(objects) if spec.matches(o)]


def same_object(a: Any, b: Any, check_position: bool = True, tol: float = DEFAULT_TOL, check_size: bool = True) -> bool:
    """True if a and b agree on shape and colour (and size, and position within `tol`)."""
    if a.shape != b.shape or a.color != b.color:
        return False
    if check_size and a.size != b.size:
        return False
    return not check_position or (abs(a.x - b.x) <= tol and abs(a.y - b.y) <= tol)


def match_all(
    expected: Sequence[Any], found: Sequence[Any], pair_ok: Callable[[Any, Any], bool]
) -> list[tuple[int, ...]]:
    """All one-to-one assignments of `expected` items to distinct `found` items that satisfy `pair_ok`.

    Each assignment is a tuple: position i holds the index in `found` of expected item i. Scenes have
    at most a handful of objects, so plain enumeration is fast enough and keeps the logic obvious.
    """
    if len(expected) > len(found):
        return []
    ok = [[pair_ok(e, f) for f in found] for e in expected]
    return [
        perm
        for perm in itertools.permutations(range(len(found)), len(expected))
        if all(ok[i][j] for i, j in enumerate(perm))
    ]


def scene_matches(
    detected: Sequence[Any],
    scene: Scene | Sequence[Any],
    check_position: bool = True,
    tol: float = DEFAULT_TOL,
    check_size: bool = True,
) -> bool:
    """True if `detected` holds exactly the scene's objects (no extras), each at its place within `tol`."""
    objects = scene.objects if isinstance(scene, Scene) else tuple(scene)
    if len(detected) != len(objects):
        return False
    return bool(
        match_all(objects, detected, lambda e, f: same_object(e, f, check_position, tol, check_size))
    )


def spec_matches(detected: Sequence[Any], spec: SceneSpec, exact: bool = True) -> bool:
    """True if `detected` shows what `spec` states: its objects (exactly, unless `exact` is False, in
    which case extra objects are allowed) and every stated relation between them."""
    if exact and len(detected) != len(spec.objects):
        return False
    for perm in match_all(spec.objects, detected, lambda s, d: s.matches(d)):
        if all(relation(detected[perm[i]], detected[perm[j]]) == rel for i, rel, j in spec.relations):
            return True
    return False
