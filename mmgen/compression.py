"""Visual-token compression of context images (DESIGN.md §4).

Every image in the context costs the backbone M tokens in every later forward pass and in the KV cache.
A `VisualCompressor` takes an image's N tokens in backbone space with their 2D grid coordinates and
returns exactly `num_tokens(spec)` tokens, each with the (row, col) coordinate its 2D position embedding
is computed from. A method is named by a spec string, "method" or "method:amount":

    none           the N tokens as they are.
    pool:k         k×k average pooling; a pooled token sits at the centre of its block. k must divide the grid.
    merge:n        ToMe bipartite soft matching on the cosine similarity of the tokens, repeated until n
                   tokens remain. Token sizes are tracked, so every output is the size-weighted mean of the
                   tokens it absorbed and sits at the size-weighted mean of their coordinates.
    prune-dup:n    DART-style duplication pruning: the ceil(n/8) tokens of largest norm are pivots; then the
                   token least similar (cosine) to everything kept so far is kept, until n remain. A subset of
                   the input at its original coordinates.
    prune-attn:n   FastV-style: keep the n tokens that receive the most attention at a backbone layer from the
                   tokens that read the image. The scores come from the backbone, so this method needs
                   `importance` (see `mmgen.attention_scores` and `UnifiedModel.image_embeddings`).
    dct:n          Fourier-VLM-style 2D DCT low-pass: n = a×b (see `coarse_shape`); each channel keeps its
                   a×b lowest-frequency DCT coefficients, which an a×b inverse DCT maps back to an a×b grid of
                   tokens. That is an ideal low-pass resampling onto a coarse grid, so the tokens sit at the
                   cell centres of an a×b grid laid over the original one.
    resampler:r    a learned Perceiver-style resampler: r learned queries cross-attend to the N tokens. It
                   starts from area pooling onto the a×b coarse grid of r (its output projection starts at
                   zero) and learns a correction; outputs sit at the coarse grid's cell centres. Only the
                   levels the model was built with exist (`ImageModules(resampler_queries=...)`).

For merge, prune-dup, prune-attn, dct and resampler the amount is the number of tokens kept (1..N); for
pool it is the pooling factor, so pool:2 keeps N/4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce, repeat
from torch import nn

from .flow_head import grid_sincos

# Known methods and an example amount for each, used in error messages.
METHODS: dict[str, int | None] = {
    "none": None,
    "pool": 2,
    "merge": 16,
    "prune-dup": 16,
    "prune-attn": 16,
    "dct": 16,
    "resampler": 16,
}
# Methods whose amount is a token count in 1..N.
COUNT_METHODS = ("merge", "prune-dup", "prune-attn", "dct", "resampler")
# Methods whose tokens lie on a coarse a×b grid, so their count must be a rectangle that fits the grid.
RECTANGLE_METHODS = ("dct", "resampler")


@dataclass(frozen=True)
class CompressionSpec:
    method: str
    amount: int | None = None

    @classmethod
    def parse(cls, spec: str | CompressionSpec | None, grid_size: int | None = None) -> CompressionSpec:
        """Parse "method[:amount]"; with `grid_size`, also check that the amount suits a grid of that side."""
        if spec is None:
            parsed = cls("none")
        elif isinstance(spec, CompressionSpec):
            parsed = spec
        elif not isinstance(spec, str):
            raise TypeError(f"compression must be a string like 'pool:2', got {type(spec).__name__}")
        else:
            parsed = cls._parse_string(spec)
        if grid_size is not None:
            parsed.check(grid_size)
        return parsed

    @classmethod
    def _parse_string(cls, spec: str) -> CompressionSpec:
        method, _, amount = spec.strip().partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown compression method {method!r}; known: {', '.join(METHODS)}")
        if method == "none":
            if amount:
                raise ValueError("compression 'none' takes no amount")
            return cls("none")
        if not amount.isdigit() or int(amount) < 1:
            raise ValueError(f"compression {spec!r} needs a positive integer amount, e.g. '{method}:{METHODS[method]}'")
        return cls(method, int(amount))

    def check(self, grid_size: int) -> CompressionSpec:
        """Raise a ValueError naming the method when the amount does not suit a grid_size×grid_size grid."""
        g, n = grid_size, grid_size * grid_size
        if self.method not in METHODS:
            raise ValueError(f"unknown compression method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method == "none":
            if self.amount is not None:
                raise ValueError("compression 'none' takes no amount")
            return self
        if self.amount is None or self.amount < 1:
            raise ValueError(f"compression {self.method!r} needs a positive integer amount")
        if self.method == "pool" and g % self.amount:
            raise ValueError(f"{self}: the pool factor must divide the token grid, got {g}×{g}")
        if self.method in COUNT_METHODS and self.amount > n:
            raise ValueError(f"{self}: keeps at most the {n} tokens of a {g}×{g} grid, got {self.amount}")
        if self.method in RECTANGLE_METHODS and coarse_shape(self.amount, g) is None:
            fitting = [k for k in range(1, n + 1) if coarse_shape(k, g) is not None]
            raise ValueError(
                f"{self}: {self.method} lays its tokens on an a×b grid with a, b <= {g}, so the count must be such "
                f"a product; {self.amount} is not (nearby: {', '.join(map(str, _nearest(fitting, self.amount)))})"
            )
        return self

    def num_tokens(self, grid_size: int) -> int:
        """How many tokens an image of a grid_size×grid_size token grid keeps."""
        self.check(grid_size)
        if self.method == "none":
            return grid_size * grid_size
        if self.method == "pool":
            return (grid_size // self.amount) ** 2
        return self.amount

    def __str__(self) -> str:
        return self.method if self.amount is None else f"{self.method}:{self.amount}"


def _nearest(values: Sequence[int], target: int, k: int = 3) -> list[int]:
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:k])


# ---------------------------------------------------------------------------------------------------
# Coarse grids (dct, resampler)
# ---------------------------------------------------------------------------------------------------


def coarse_shape(count: int, grid_size: int) -> tuple[int, int] | None:
    """The most nearly square a×b = count with a <= b <= grid_size (rows × cols), or None if there is none.

    E.g. on an 8×8 grid: 16 → 4×4, 8 → 2×4, 2 → 1×2, 64 → 8×8.
    """
    best = None
    for a in range(1, math.isqrt(count) + 1):
        if count % a == 0 and count // a <= grid_size:
            best = (a, count // a)
    return best


def coarse_coords(rows: int, cols: int, grid_size: int, device=None) -> torch.Tensor:
    """Cell centres of a rows×cols grid laid over a grid_size×grid_size one, in its (row, col) units, (rows·cols, 2).

    Cell i of an a-cell axis spans original cells [i·g/a, (i+1)·g/a), so its centre is (i + ½)·g/a − ½. When a
    divides g this is the mean coordinate of the block, as for pooling.
    """
    r = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * grid_size / rows - 0.5
    c = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * grid_size / cols - 0.5
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr.flatten(), cc.flatten()], -1)


def area_weights(cells: int, grid_size: int, device=None) -> torch.Tensor:
    """(cells, grid_size) weights of area averaging onto `cells` equal intervals: each row sums to one."""
    step = grid_size / cells
    lo = torch.arange(cells, device=device, dtype=torch.float32)[:, None] * step
    left = torch.arange(grid_size, device=device, dtype=torch.float32)[None]
    overlap = (torch.minimum(left + 1, lo + step) - torch.maximum(left, lo)).clamp_min(0)
    return overlap / step


def dct_matrix(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (size, size): coefficients = C @ signal, signal = Cᵀ @ coefficients."""
    k = torch.arange(size, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(size, device=device, dtype=torch.float64)[None]
    c = torch.cos(math.pi * (i + 0.5) * k / size) * math.sqrt(2.0 / size)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def dct_lowpass(tokens: torch.Tensor, grid_size: int, rows: int, cols: int) -> torch.Tensor:
    """Keep the rows×cols lowest DCT frequencies of a token grid and resample them onto a rows×cols grid.

    tokens (B, g·g, D) → (B, rows·cols, D). The factor sqrt(rows·cols)/g makes the smaller inverse transform
    preserve the mean, so a constant grid stays constant; with rows = cols = g this is the identity.
    """
    g = grid_size
    x = rearrange(tokens, "b (h w) d -> b h w d", h=g, w=g)
    dtype = torch.promote_types(x.dtype, torch.float32)
    c_g = dct_matrix(g, x.device, dtype)
    coef = einsum(c_g[:rows], x.to(dtype), c_g[:cols], "k h, b h w d, l w -> b k l d")
    out = einsum(dct_matrix(rows, x.device, dtype), coef, dct_matrix(cols, x.device, dtype), "k i, b k l d, l j -> b i j d")
    out = out * math.sqrt(rows * cols) / g
    return rearrange(out, "b i j d -> b (i j) d").to(tokens.dtype)


# ---------------------------------------------------------------------------------------------------
# Merging and pruning
# ---------------------------------------------------------------------------------------------------


def merge_tokens(
    tokens: torch.Tensor, coords: torch.Tensor, count: int, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching, repeated until `count` tokens remain.

    tokens (B, N, D), coords (B, N, 2), sizes (B, N) (default ones) → the same with `count` tokens. Each
    round splits the tokens alternately into sets A and B (in raster order of their representatives), matches
    every A token to its most similar B token (cosine), and merges the best-matched r of them into their
    partners, r = min(what is left to remove, a quarter of the tokens), so later rounds see the merged
    tokens. A merge is the size-weighted mean of tokens and of coordinates, and sizes add up, so
    Σ size·token and Σ size·coord are preserved exactly.
    """
    batch, n, dim = tokens.shape
    if not 1 <= count <= n:
        raise ValueError(f"merge: cannot merge {n} tokens down to {count}")
    sizes = torch.ones(batch, n, device=tokens.device, dtype=torch.float32) if sizes is None else sizes.float()
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    # Carry sums weighted by size; divide once at the end.
    mass = tokens.to(dtype) * sizes[..., None]
    where = coords.to(dtype) * sizes[..., None]
    order = repeat(torch.arange(n, device=tokens.device), "n -> b n", b=batch)  # raster index of representatives
    while mass.shape[1] > count:
        current = mass.shape[1]
        r = min(current - count, max(1, current // 4))
        mean = mass / sizes[..., None]
        a_mass, b_mass = mass[:, ::2], mass[:, 1::2]
        a_where, b_where = where[:, ::2], where[:, 1::2]
        a_size, b_size = sizes[:, ::2], sizes[:, 1::2]
        similarity = einsum(F.normalize(mean[:, ::2], dim=-1), F.normalize(mean[:, 1::2], dim=-1), "b i d, b j d -> b i j")
        best, partner = similarity.max(dim=-1)  # (B, |A|)
        ranked = best.argsort(dim=-1, descending=True, stable=True)
        merged, kept = ranked[:, :r], ranked[:, r:]
        target = partner.gather(1, merged)  # (B, r) index into B
        b_mass = b_mass.scatter_add(1, repeat(target, "b r -> b r d", d=dim), a_mass.gather(1, repeat(merged, "b r -> b r d", d=dim)))
        b_where = b_where.scatter_add(1, repeat(target, "b r -> b r two", two=2), a_where.gather(1, repeat(merged, "b r -> b r two", two=2)))
        b_size = b_size.scatter_add(1, target, a_size.gather(1, merged))
        mass = torch.cat([a_mass.gather(1, repeat(kept, "b k -> b k d", d=dim)), b_mass], 1)
        where = torch.cat([a_where.gather(1, repeat(kept, "b k -> b k two", two=2)), b_where], 1)
        sizes = torch.cat([a_size.gather(1, kept), b_size], 1)
        order = torch.cat([order[:, ::2].gather(1, kept), order[:, 1::2]], 1)
        # Back to raster order of the representatives, so the next A/B split alternates in space again.
        perm = order.argsort(dim=-1, stable=True)
        order = order.gather(1, perm)
        mass = mass.gather(1, repeat(perm, "b k -> b k d", d=dim))
        where = where.gather(1, repeat(perm, "b k -> b k two", two=2))
        sizes = sizes.gather(1, perm)
    return (mass / sizes[..., None]).to(tokens.dtype), (where / sizes[..., None]).to(coords.dtype), sizes


def duplicate_prune_indices(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """DART-style duplication pruning: indices (B, count), ascending, of the tokens to keep.

    Pivots are the ceil(count/8) tokens of largest L2 norm. Then, greedily, the token whose largest cosine
    similarity to the tokens kept so far is smallest is kept, so near-duplicates of anything already kept
    (a flat background, say) are the ones dropped.
    """
    batch, n, _ = tokens.shape
    if not 1 <= count <= n:
        raise ValueError(f"prune-dup: cannot keep {count} of {n} tokens")
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = einsum(unit, unit, "b i d, b j d -> b i j")
    pivots = min(count, math.ceil(count / 8))
    chosen = tokens.float().norm(dim=-1).topk(pivots, dim=-1).indices  # (B, p)
    kept = torch.zeros(batch, n, dtype=torch.bool, device=tokens.device)
    kept.scatter_(1, chosen, True)
    # closeness[b, j]: the largest similarity of token j to any kept token.
    closeness = similarity.gather(1, repeat(chosen, "b p -> b p n", n=n)).amax(dim=1)
    for _ in range(count - pivots):
        pick = closeness.masked_fill(kept, float("inf")).argmin(dim=-1)  # (B,)
        kept[torch.arange(batch, device=tokens.device), pick] = True
        closeness = torch.maximum(closeness, similarity[torch.arange(batch, device=tokens.device), pick])
    return kept.nonzero()[:, 1].view(batch, count)


def top_indices(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count), ascending, of the `count` largest scores of `importance` (B, N)."""
    return importance.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values


def gather_tokens(tokens: torch.Tensor, grid: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens (B, k, D) of `tokens` (B, N, D) and their original coordinates (B, k, 2)."""
    picked = tokens.gather(1, repeat(keep, "b k -> b k d", d=tokens.shape[-1]))
    return picked, grid[keep]


# ---------------------------------------------------------------------------------------------------
# The learned resampler
# ---------------------------------------------------------------------------------------------------


class ResamplerBlock(nn.Module):
    """Pre-norm block: the latents attend to [tokens, latents] (as in Flamingo's Perceiver resampler), then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """latents (B, R, D), tokens (B, N, D) → latents (B, R, D)."""
        h = self.norm_latents(latents)
        context = torch.cat([self.norm_tokens(tokens), h], dim=1)
        q = rearrange(self.q(h), "b r (h d) -> b h r d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b h r d -> b r (h d)")
        latents = latents + self.proj(attended)
        return latents + self.mlp(self.norm_mlp(latents))


class Resampler(nn.Module):
    """Perceiver-style resampler with one set of learned queries per level, sharing its attention blocks.

    Level r lays its outputs on the a×b coarse grid of `coarse_shape(r, g)`. Each output starts as the area
    average of the input over its coarse cell, plus its learned query; the blocks read all input tokens
    (with a 2D position feature) and the zero-initialised output projection adds their correction. An untrained
    resampler is therefore area pooling, which the Matryoshka-trained model already reads well.
    """

    def __init__(self, dim: int, grid_size: int, levels: Sequence[int], num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        self.grid_size = grid_size
        self.levels = tuple(sorted({int(r) for r in levels}))
        for r in self.levels:
            CompressionSpec("resampler", r).check(grid_size)
        self.queries = nn.ParameterDict({str(r): nn.Parameter(torch.randn(r, dim) * 0.02) for r in self.levels})
        self.token_pos = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ResamplerBlock(dim, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, D), grid (N, 2) → tokens (B, count, D), coords (count, 2)."""
        if count not in self.levels:
            raise ValueError(f"resampler:{count} is not a trained level; this model has {list(self.levels)}")
        g = self.grid_size
        rows, cols = coarse_shape(count, g)
        weights = einsum(area_weights(rows, g, tokens.device), area_weights(cols, g, tokens.device), "i h, j w -> i j h w")
        weights = rearrange(weights, "i j h w -> (i j) (h w)").to(tokens.dtype)
        pooled = einsum(weights, tokens, "r n, b n d -> b r d")
        keys = tokens + self.token_pos(grid_sincos(grid, tokens.shape[-1]).to(tokens.dtype))
        latents = pooled + self.queries[str(count)].to(tokens.dtype)
        for block in self.blocks:
            latents = block(latents, keys)
        return pooled + self.out(self.norm_out(latents)), coarse_coords(rows, cols, g, tokens.device)


# ---------------------------------------------------------------------------------------------------
# The compressor
# ---------------------------------------------------------------------------------------------------


class VisualCompressor(nn.Module):
    """Shrinks an image's N tokens to M before they enter the context (methods: see the module docstring).

    `dim` and `resampler_queries` build the learned resampler (one query set per level); without them the
    compressor has no parameters. `attention_layer` is the backbone layer whose attention scores prune-attn
    (the caller computes them, see `mmgen.attention_scores`).
    """

    def __init__(
        self,
        grid_size: int,
        dim: int | None = None,
        resampler_queries: Sequence[int] | None = None,
        resampler_layers: int = 2,
        resampler_heads: int = 4,
        attention_layer: int = 2,
    ):
        super().__init__()
        self.grid_size = grid_size
        self.attention_layer = attention_layer
        self.resampler: Resampler | None = None
        if resampler_queries:
            if dim is None:
                raise ValueError("resampler: the compressor needs the token width `dim` to build a resampler")
            self.resampler = Resampler(dim, grid_size, resampler_queries, resampler_layers, resampler_heads)

    def parse(self, spec: str | CompressionSpec | None) -> CompressionSpec:
        """The parsed spec, checked against this grid and, for the resampler, against the trained levels."""
        spec = CompressionSpec.parse(spec, self.grid_size)
        if spec.method == "resampler":
            levels = list(self.resampler.levels) if self.resampler is not None else []
            if spec.amount not in levels:
                have = f"its levels are {levels}" if levels else "it has no resampler"
                raise ValueError(
                    f"{spec}: this model has no trained resampler with {spec.amount} queries ({have}); "
                    "train one with `python -m mmgen.train_resampler configs/resampler.yaml`"
                )
        return spec

    def num_tokens(self, spec: str | CompressionSpec) -> int:
        """How many tokens an image keeps under `spec`."""
        return self.parse(spec).num_tokens(self.grid_size)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: torch.Tensor,
        spec: str | CompressionSpec,
        importance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, D), grid (N, 2) → tokens (B, M, D), coords (B, M, 2).

        `importance` (B, N) is the attention each token receives, which only prune-attn uses.
        """
        spec = self.parse(spec)
        batch, n, _ = tokens.shape
        g = self.grid_size
        if n != g * g or grid.shape != (n, 2):
            raise ValueError(f"compressor expects {g * g} tokens with (row, col) coordinates, got {n} and {tuple(grid.shape)}")
        method, amount = spec.method, spec.amount
        if method == "none":
            return tokens, grid.expand(batch, -1, -1)
        if method == "pool":
            k = amount
            pooled = reduce(tokens, "b (gh k1 gw k2) d -> b (gh gw) d", "mean", k1=k, k2=k, gh=g // k, gw=g // k)
            coords = reduce(grid, "(gh k1 gw k2) two -> (gh gw) two", "mean", k1=k, k2=k, gh=g // k, gw=g // k)
            return pooled, coords.expand(batch, -1, -1)
        if method == "merge":
            merged, coords, _ = merge_tokens(tokens, grid.expand(batch, -1, -1), amount)
            return merged, coords
        if method == "prune-dup":
            return gather_tokens(tokens, grid, duplicate_prune_indices(tokens, amount))
        if method == "prune-attn":
            if importance is None:
                raise ValueError(
                    f"{spec} needs attention scores from the backbone: embed images through "
                    "UnifiedModel.image_embeddings, which computes them, not through the compressor alone"
                )
            if importance.shape != (batch, n):
                raise ValueError(f"{spec}: importance must have shape {(batch, n)}, got {tuple(importance.shape)}")
            return gather_tokens(tokens, grid, top_indices(importance, amount))
        if method == "dct":
            rows, cols = coarse_shape(amount, g)
            coords = coarse_coords(rows, cols, g, tokens.device).to(grid.dtype)
            return dct_lowpass(tokens, g, rows, cols), coords.expand(batch, -1, -1)
        if method == "resampler":
            resampled, coords = self.resampler(tokens, grid, amount)
            return resampled, coords.to(grid.dtype).expand(batch, -1, -1)
        raise AssertionError(spec)
