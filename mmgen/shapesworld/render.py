"""Rendering of ShapesWorld scenes.

Every shape is defined once, as an inside-test on the unit box [-1, 1]^2 that its bounding box fills
exactly. Pixel coverage is measured by supersampling (the mean over a k x k grid of sub-pixel points),
and each object is alpha-blended onto the neutral background with that coverage. The result is
anti-aliased, deterministic, and its hue is constant across an object's soft edge. The parser relies
on that last property. The same coverage function gives the parser its shape templates.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from .scene import BACKGROUND, PALETTE, SHAPES, Scene

SUPERSAMPLE = 6


def _polygon(points: list[tuple[float, float]]) -> np.ndarray:
    """Scale a polygon so that its bounding box is exactly [-1, 1]^2."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return 2.0 * (p - lo) / (hi - lo) - 1.0


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    """A five-pointed star, point up. The fairly fat inner radius keeps its arms visible at 64 px."""
    pts = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        pts.append((r * math.cos(a), r * math.sin(a)))
    return _polygon(pts)


POLYGONS: dict[str, np.ndarray] = {
    "square": _polygon([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _polygon([(0, -1), (1, 1), (-1, 1)]),  # point up, base down (y points down)
    "diamond": _polygon([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "star": _star(),
}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (u, v), in unit-box coordinates, that lie inside `shape`."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    poly = POLYGONS[shape]
    inside = np.zeros(u.shape, dtype=bool)
    # Crossing-number test, vectorised over points (exact for the star, which is not convex).
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (v >= min(y1, y2)) & (v < max(y1, y2))
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def coverage(
    shape: str,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    box: tuple[int, int, int, int],
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Fraction of each pixel in `box` = (x0, y0, x1, y1) covered by `shape`.

    The shape's bounding box is [cx - rx, cx + rx] x [cy - ry, cy + ry] in pixel units, and pixel (i, j)
    spans [j, j+1] x [i, i+1]. Returns a float array of shape (y1 - y0, x1 - x0).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    x0, y0, x1, y1 = box
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    u = (xs[None, :] - cx) / rx
    v = (ys[:, None] - cy) / ry
    u, v = np.broadcast_arrays(u, v)
    hit = _inside(shape, u, v).astype(np.float64)
    h, w = y1 - y0, x1 - x0
    return hit.reshape(h, supersample, w, supersample).mean(axis=(1, 3))


def _footprint(obj, size: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The pixel box (x0, y0, x1, y1) an object may cover in a `size` px image, and its coverage there."""
    cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
    x0, y0 = max(int(math.floor(cx - r)), 0), max(int(math.floor(cy - r)), 0)
    x1, y1 = min(int(math.ceil(cx + r)), size), min(int(math.ceil(cy + r)), size)
    return (x0, y0, x1, y1), coverage(obj.shape, cx, cy, r, r, (x0, y0, x1, y1))


def patch_shapes(scene: Scene, grid: int, size: int = 64, min_cover: float = 0.15) -> np.ndarray:
    """The shape in each cell of a `grid` x `grid` partition of the rendered image, row-major: 0 for the
    background, 1 + its index in SHAPES for the object that shows most in the cell, if it covers at least
    `min_cover` of it. Later objects are painted over earlier ones, as `render` paints them."""
    if size % grid:
        raise ValueError(f"a {size} px image does not split into a {grid} x {grid} grid")
    shown = np.zeros((len(scene.objects), size, size))
    for k, obj in enumerate(scene.objects):
        (x0, y0, x1, y1), alpha = _footprint(obj, size)
        shown[:k, y0:y1, x0:x1] *= 1.0 - alpha
        shown[k, y0:y1, x0:x1] = alpha
    cell = size // grid
    per_cell = shown.reshape(len(scene.objects), grid, cell, grid, cell).mean(axis=(2, 4)).reshape(len(scene.objects), -1)
    classes = np.array([1 + SHAPES.index(obj.shape) for obj in scene.objects])
    best = per_cell.argmax(axis=0)
    return np.where(per_cell.max(axis=0) >= min_cover, classes[best], 0)


def render(scene: Scene, size: int = 64) -> PIL.Image.Image:
    """Draw `scene` as a `size` x `size` RGB image: deterministic and anti-aliased."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render needs a Scene, got {type(scene).__name__}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        (x0, y0, x1, y1), alpha = _footprint(obj, size)
        alpha = alpha[..., None]
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = region * (1.0 - alpha) + np.asarray(PALETTE[obj.color], dtype=np.float64) * alpha
    return PIL.Image.fromarray(np.round(canvas).astype(np.uint8))
