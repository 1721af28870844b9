"""Decoding machinery shared by the generation loop and the drafters: one KV cache for a batch whose rows
advance by different numbers of tokens per step, and token sampling.

Rows append chunks of different lengths to one `DynamicCache`. Shorter chunks are padded; a per-row
visibility mask over the cache says which positions later tokens may attend to. Padding, rejected draft
tokens and query tokens (read-out only) are simply made invisible, so no row ever has to be cut out of
the shared cache. Trailing positions that are invisible to every row are cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Chunk:
    """Tokens one row appends in one forward pass.

    `ids` and `modality` say what each position holds (the token, or `<|image_pad|>` for image tokens);
    drafters read the context from them.
    """

    embeds: torch.Tensor  # (n, d)
    positions: torch.Tensor  # (n,)
    keep: torch.Tensor  # (n,) bool: may later tokens attend to this position?
    ids: list[int] | None = None
    modality: list[int] | None = None
    sees: torch.Tensor | None = None  # (n, n) bool: which of its own positions each one attends to (None: causal)

    def __len__(self) -> int:
        return self.embeds.shape[0]


class BatchCache:
    """A KV cache shared by a batch of rows, with per-row visibility of every cached position."""

    def __init__(self, model, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.cache = DynamicCache(config=model.backbone.config)
        self.visible = torch.zeros(batch_size, 0, dtype=torch.bool, device=model.device)

    def __len__(self) -> int:
        return self.visible.shape[1]

    def forward(self, chunks: list[Chunk | None]) -> list[torch.Tensor | None]:
        """Append each row's chunk (None: nothing) and return each row's hidden states (n_i, d)."""
        assert len(chunks) == self.batch_size
        width = max((len(c) for c in chunks if c is not None), default=0)
        if width == 0:
            return [None] * self.batch_size
        device = self.model.device
        dim = next(c for c in chunks if c is not None).embeds.shape[-1]
        dtype = next(c for c in chunks if c is not None).embeds.dtype
        embeds = torch.zeros(self.batch_size, width, dim, dtype=dtype, device=device)
        positions = torch.zeros(self.batch_size, width, dtype=torch.long, device=device)
        real = torch.zeros(self.batch_size, width, dtype=torch.bool, device=device)
        keep = torch.zeros(self.batch_size, width, dtype=torch.bool, device=device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
        inside = causal.repeat(self.batch_size, 1, 1)
        for row, chunk in enumerate(chunks):
            if chunk is None or len(chunk) == 0:
                continue
            n = len(chunk)
            embeds[row, :n] = chunk.embeds
            positions[row, :n] = chunk.positions
            positions[row, n:] = chunk.positions[-1]
            real[row, :n] = True
            keep[row, :n] = chunk.keep
            if chunk.sees is not None:
                inside[row, :n, :n] = chunk.sees
        eye = torch.eye(width, dtype=torch.bool, device=device)
        # A new token sees visible cached positions and the real tokens of its own chunk before it (those its
        # `sees` allows); padding sees only itself, so no query row of the mask is empty.
        new_part = inside & (real[:, None, :] | eye[None])
        new_part &= real[:, :, None] | eye[None]
        past_part = self.visible[:, None, :].expand(-1, width, -1) & real[:, :, None]
        allowed = torch.cat([past_part, new_part], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden, self.cache = self.model.run_backbone(
            embeds, positions, mask[:, None], cache=self.cache, use_cache=True
        )
        self.visible = torch.cat([self.visible, keep & real], dim=1)
        self.trim()
        return [None if c is None or len(c) == 0 else hidden[row, : len(c)] for row, c in enumerate(chunks)]

    def hide(self, row: int, positions: slice | list[int]) -> None:
        """Make cached positions (a slice or a list of indices) of `row` invisible to later tokens."""
        self.visible[row, positions] = False

    def trim(self) -> None:
        """Crop trailing positions that no row can see."""
        seen = self.visible.any(0)
        if seen.all():
            return
        last = int(seen.nonzero().max()) + 1 if seen.any() else 0
        drop = len(self) - last
        if drop > 0:
            self.cache.crop(-drop)
            self.visible = self.visible[:, :last]

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        total = 0
        for layer in self.cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total


def fresh_forward(model, chunks: list[Chunk]) -> list[torch.Tensor]:
    """Run chunks as independent sequences with no cache (the CFG branches); returns hidden states per chunk."""
    scratch = BatchCache(model, len(chunks))
    return scratch.forward(list(chunks))


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row of `logits` (B, V): greedy when temperature is 0, else temperature/top-k/top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.stack(
        [torch.multinomial(p, 1, generator=g).squeeze(0) for p, g in zip(probs, generators)]
    )


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution that `sample_tokens` draws from (also what speculative verification compares)."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)
