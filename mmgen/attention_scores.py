"""Attention that an image's tokens receive at one backbone layer, for FastV-style pruning (prune-attn).

FastV ranks image tokens by the attention they receive at layer K and drops the rest. Here the ranking is
made before the image enters the context: the backbone runs over a short probe sequence,

    v_1 .. v_M   r_1 .. r_T

(the image's full-resolution tokens, all at one rotary position as in the stream, then the reader
tokens), and a hook on layer K's attention module captures its input and rotary embedding and stops the
forward there. Layers after K never run, and nothing asks the backbone for `output_attentions`. The
scores are recomputed from that layer's own `q_proj`/`k_proj` (plus `q_norm`/`k_norm` when it has them):
for every reader, the softmax over everything it sees, averaged over heads and readers, read off at the
M image tokens. Readers see all M image tokens; the image tokens themselves are not readers, since under
the causal mask the early ones would be read more just for coming first.

Which tokens are the readers is the caller's choice (see `UnifiedModel.vision_attention`): the learned
query tokens, which exist in every model and are trained to read context images, and, when the caller
knows it, the text that follows the image.

Llama-, Qwen2- and Gemma-style backbones (decoder layers at `base_model.layers`, attention at
`.self_attn` with `q_proj`/`k_proj`) are supported; others fail with a ValueError that says so.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange, repeat


class _StopForward(Exception):
    """Raised by the hook once layer K's attention input is captured: the rest of the backbone is not needed."""


def decoder_layers(backbone) -> torch.nn.ModuleList:
    """The decoder layers of a Llama/Qwen2/Gemma-style causal LM, or a ValueError naming the backbone."""
    layers = getattr(backbone.base_model, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    if attn is None or not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim")):
        raise ValueError(
            f"prune-attn needs a backbone whose decoder layers (base_model.layers[i].self_attn) have q_proj and "
            f"k_proj, as Llama, Qwen2 and Gemma do; {type(backbone).__name__} has not: use another compression"
        )
    return layers


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split convention of Llama-style models: x·cos + rotate_half(x)·sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def received_attention(
    backbone,
    vision: torch.Tensor,
    readers: torch.Tensor,
    reader_positions: torch.Tensor,
    layer: int,
    vision_position: int = 0,
) -> torch.Tensor:
    """Attention each image token receives at decoder layer `layer` (clamped to the last), shape (B, M).

    vision (B, M, d): the image's tokens as they would enter the context; readers (B, T, d) with their
    rotary positions `reader_positions` (T,); the image tokens share `vision_position`. Each reader's
    attention is a softmax over the M image tokens and the readers up to itself; the scores are that
    attention averaged over heads and readers, so each row sums to at most one.
    """
    if vision.ndim != 3 or readers.ndim != 3 or vision.shape[0] != readers.shape[0]:
        raise ValueError(f"vision (B, M, d) and readers (B, T, d) must share B, got {tuple(vision.shape)} and "
                         f"{tuple(readers.shape)}")
    if readers.shape[1] < 1:
        raise ValueError("received_attention needs at least one reader token")
    layers = decoder_layers(backbone)
    attn = layers[min(layer, len(layers) - 1)].self_attn
    batch, m, _ = vision.shape
    t = readers.shape[1]
    length = m + t
    device = vision.device
    embeds = torch.cat([vision, readers.to(vision.dtype)], dim=1)
    positions = torch.cat([torch.full((m,), vision_position, device=device), reader_positions.to(device)])
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()
    mask = torch.zeros(length, length, dtype=vision.dtype, device=device).masked_fill_(~causal, torch.finfo(vision.dtype).min)

    captured: dict = {}

    def capture(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["rope"] = kwargs.get("position_embeddings")
        raise _StopForward

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        backbone.base_model(
            inputs_embeds=embeds,
            position_ids=repeat(positions, "l -> b l", b=batch),
            attention_mask=repeat(mask, "i j -> b 1 i j", b=batch),
            use_cache=False,
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured or captured["rope"] is None:
        raise ValueError(f"prune-attn could not capture the attention input of {type(backbone).__name__}: its "
                         "attention layers take no rotary `position_embeddings`")

    hidden = captured["hidden"]
    cos, sin = captured["rope"]
    head_dim = attn.head_dim
    q = rearrange(attn.q_proj(hidden[:, m:]), "b t (h d) -> b t h d", d=head_dim)
    k = rearrange(attn.k_proj(hidden), "b l (h d) -> b l h d", d=head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rotary(q, cos[:, m:, None], sin[:, m:, None])
    k = apply_rotary(k, cos[:, :, None], sin[:, :, None])
    k = repeat(k, "b l h d -> b l (h g) d", g=q.shape[2] // k.shape[2])  # grouped-query attention
    scale = getattr(attn, "scaling", head_dim**-0.5)
    logits = einsum(q.float(), k.float(), "b t h d, b l h d -> b h t l") * scale
    logits = logits + mask[m:].float()  # reader t sees the image and readers up to itself
    weights = logits.softmax(dim=-1)
    return weights[..., :m].mean(dim=(1, 2))
