"""The flow head: a small DiT that predicts rectified-flow velocity on the image latent.

It sits beside the backbone (DESIGN.md §1): the backbone runs once over the query tokens, and every
flow step runs only this head, conditioned on the backbone's states by concatenation (joint self-attention
over [condition tokens, latent tokens]) and on the timestep by adaLN-Zero. The condition tokens are the
query states, optionally followed by the states of the text before the image (`ImageModules`
`head_text_tokens`) and of the latest context image (`head_image_tokens`); conditions of different lengths
share a batch through a padding mask. A head with a reference input also sees that image's clean latent patch by
patch, added to the noisy latent's embedding (channel concatenation, as InstructPix2Pix conditions edits).
A head with condition order adds each condition token's place in the condition to it, so that attention can
tell the words apart by where they stand ("a circle left of a square" from "a square left of a circle").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn


def sincos_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a float tensor (...,) → (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def grid_sincos(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sinusoidal features of (row, col) coordinates (..., 2) → (..., dim); coordinates may be fractional."""
    return torch.cat([sincos_embedding(coords[..., 0], dim // 2), sincos_embedding(coords[..., 1], dim // 2)], -1)


def square_grid(side: int, device=None) -> torch.Tensor:
    """Row-major (row, col) coordinates of a side×side grid, shape (side², 2)."""
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], -1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class HeadBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the conditioning vector."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, 1, N) bool says which tokens may be attended to (None: all)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        q, k, v = rearrange(self.qkv(modulate(self.norm1(x), shift1, scale1)), "b n (three h d) -> three b h n d",
                            three=3, h=self.num_heads)
        attn = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h n d -> b n (h d)")
        x = x + gate1[:, None] * self.proj(attn)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FlowHead(ModelMixin, ConfigMixin):
    """Velocity predictor v(x_t, t | query states) on patch tokens of the latent.

    Convention (rectified flow): x_t = t·noise + (1 − t)·x_0 and the target velocity is noise − x_0, so
    t = 1 is pure noise. This matches diffusers' FlowMatchEulerDiscreteScheduler with sigma = t.

    `reference_input` adds `reference_in`: a reference latent's patch tokens (zeros: no reference) projected
    and added to the noisy tokens at the same grid cells. A story step or an edit keeps most of the scene
    before it where it was, and the pooled states the condition carries place objects too coarsely for that.
    The projection starts at zero and has no bias, so a stage can add it to a trained head.

    `condition_order` adds `cond_order`: sinusoidal features of each condition token's index, projected and
    added to the token. Without it the joint attention sees the condition as a set, and which noun a relation
    or a colour belongs to is only as clear as the backbone's states make it. It starts at zero too.

    `plan_input` adds `plan_in`: the backbone's states of each layout-plan entry, spread over the patches around
    its cell (`UnifiedModel.plan_map`), projected and added to the noisy tokens there, the way GLIGEN grounds a
    phrase in a box. Each object's colour and shape then reach the head together at its place, instead of the
    head having to match them up among the text tokens. It starts at zero, with no bias.
    """

    @register_to_config
    def __init__(
        self,
        token_dim: int = 16,
        grid_size: int = 8,
        cond_dim: int = 256,
        hidden_size: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        reference_input: bool = False,
        condition_order: bool = False,
        plan_input: bool = False,
    ):
        super().__init__()
        self.x_in = nn.Linear(token_dim, hidden_size)
        self.reference_in = nn.Linear(token_dim, hidden_size, bias=False) if reference_input else None
        if self.reference_in is not None:
            nn.init.zeros_(self.reference_in.weight)
        self.plan_in = nn.Linear(cond_dim, hidden_size, bias=False) if plan_input else None
        if self.plan_in is not None:
            nn.init.zeros_(self.plan_in.weight)
        self.pos = nn.Linear(hidden_size, hidden_size)
        self.cond_order = nn.Linear(hidden_size, hidden_size, bias=False) if condition_order else None
        if self.cond_order is not None:
            nn.init.zeros_(self.cond_order.weight)
        self.cond_in = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, hidden_size))
        self.cond_pool = nn.Linear(hidden_size, hidden_size)
        self.t_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList(HeadBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, token_dim)
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("grid", square_grid(grid_size), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                plan: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, N, token_dim), t (B,) in [0, 1], cond (B, C, cond_dim) → velocity (B, N, token_dim).

        `cond_mask` (B, C) bool marks the real condition tokens of a padded batch (None: all are real).
        `reference` (B, N, token_dim) holds reference latents for a head with a reference input, and `plan`
        (B, N, cond_dim) plan maps for a head with a plan input (None: none; zeros: none for that image)."""
        hidden = self.config.hidden_size
        x = self.x_in(x_t) + self.pos(grid_sincos(self.grid, hidden).to(x_t.dtype))
        if reference is not None:
            if self.reference_in is None:
                raise ValueError("this flow head has no reference input (reference_input=False)")
            x = x + self.reference_in(reference.to(x_t.dtype))
        if plan is not None:
            if self.plan_in is None:
                raise ValueError("this flow head has no plan input (plan_input=False)")
            x = x + self.plan_in(plan.to(x_t.dtype))
        c_tokens = self.cond_in(cond)
        if cond_mask is None:
            pooled, mask = c_tokens.mean(1), None
        else:
            weights = cond_mask.to(c_tokens.dtype)[..., None]
            pooled = (c_tokens * weights).sum(1) / weights.sum(1)
            mask = torch.cat([cond_mask, cond_mask.new_ones(x.shape[:2])], dim=1)[:, None, None]
        c = self.t_mlp(sincos_embedding(t * 1000.0, hidden).to(x_t.dtype)) + self.cond_pool(pooled)
        if self.cond_order is not None:
            index = torch.arange(cond.shape[1], device=cond.device)
            c_tokens = c_tokens + self.cond_order(sincos_embedding(index, hidden).to(c_tokens.dtype))
        h = torch.cat([c_tokens, x], dim=1)
        for block in self.blocks:
            h = block(h, c, mask)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(h[:, cond.shape[1]:]), shift, scale))


def stack_with_zeros(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-image inputs of one shape stacked into a batch, zeros for an image without one; None when no image
    has one (the head then skips that input)."""
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.stack([like.new_zeros(like.shape) if t is None else t for t in tensors])


def pad_conditions(conditions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditions (C_i, d) of several images → one batch (B, C, d) and its mask (B, C) of real tokens, or
    None when all have the same length (then nothing is padded)."""
    longest = max(c.shape[0] for c in conditions)
    if all(c.shape[0] == longest for c in conditions):
        return torch.stack(conditions), None
    batch = conditions[0].new_zeros(len(conditions), longest, conditions[0].shape[-1])
    mask = torch.zeros(len(conditions), longest, dtype=torch.bool, device=batch.device)
    for k, c in enumerate(conditions):
        batch[k, : c.shape[0]], mask[k, : c.shape[0]] = c, True
    return batch, mask
