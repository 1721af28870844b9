"""The unified model: a causal-LM backbone plus the image modules beside it (DESIGN.md §4).

`ImageModules` holds everything image-side (image_in with its 2D position embedding, the learned
queries, the compressor and the flow head) as one diffusers `ModelMixin`, so it saves and loads like
any pipeline component. `UnifiedModel` drives any transformers causal LM through `inputs_embeds`,
`position_ids`, explicit attention masks and the Cache API, and never forks it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention_scores import received_attention
from .compression import CompressionSpec, VisualCompressor
from .flow_head import FlowHead, grid_sincos, pad_conditions, square_grid, stack_with_zeros
from .layout import PlanEntry
from .stream import IGNORE_INDEX, ImageSpan, PackedBatch

RESAMPLER_PREFIX = "compressor.resampler."  # names of the learned resampler's weights in ImageModules
PATCH_CONVS_PREFIX = "patch_convs."  # names of the weights `image_in_convs` adds
PATCH_CLASSIFIER_PREFIX = "patch_classifier."  # and `patch_classes`
REFERENCE_PREFIX = "flow_head.reference_in."  # names of the weights `head_reference` adds
CONDITION_ORDER_PREFIX = "flow_head.cond_order."  # names of the weights `head_condition_order` adds
PLAN_PREFIX = "flow_head.plan_in."  # names of the weights `head_plan` adds
PLAN_SPREAD = 0.6  # how far a plan entry reaches around its cell: the σ of its Gaussian weights, in patches


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """The KV cache as a keyword of `model.forward`: transformers 5 renamed `past_key_values` to `cache`
    (the old name warns, and goes in a later release); the oldest supported versions know only the old one."""
    return {_cache_argument(type(model)): cache}


def returned_cache(output):
    """The updated KV cache of a transformers output, under either name."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


class PatchConvs(nn.Module):
    """3×3 convolutions over the grid of patch tokens, added to `image_in`'s per-patch embedding.

    A shape spans several patches, and a small backbone does not learn to put them together: on the stage-5
    default model a linear probe decodes a lone object's shape from its image states at 0.60 at best (its
    colour at 1.00), where a three-layer conv net reads it off the same latents at 0.99. The output
    projection starts at zero, so a model trained without them draws and reads exactly as before until
    training moves it.
    """

    def __init__(self, token_dim: int, width: int, out_dim: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(token_dim if k == 0 else width, width, kernel_size=3, padding=1) for k in range(layers)
        )
        self.out = nn.Linear(width, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, token_dim) of a square grid → (B, N, out_dim)."""
        side = math.isqrt(tokens.shape[1])
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        for conv in self.convs:
            x = F.gelu(conv(x), approximate="tanh")
        return self.out(x.flatten(2).transpose(1, 2))


class ImageModules(ModelMixin, ConfigMixin):
    """image_in + 2D positions + learned queries + compressor + flow head.

    `image_size` and `patch_size` record how the VAE's latents were cut into tokens, so a saved model
    rebuilds its image tokenizer from the VAE alone. `head_text_tokens` is how many states of the text
    before an image (since the previous image, ending at its `<|image_start|>`) the flow head reads beside
    the query states: the words themselves, where the queries carry only what 16 tokens summarise of them.
    0 conditions the head on the queries alone. `head_image_tokens` lets the head also read the states of the
    latest context image before the one it draws, average-pooled to at most that many tokens: the scene a
    story step or an edit changes, which otherwise reaches the head only through the queries.
    `head_reference` gives the flow head a reference input (`FlowHead`): the clean latent of that same image,
    patch by patch, so a picture can keep what the one before it showed, where it showed it. `head_plan` gives
    it a plan input (`FlowHead`, `UnifiedModel.plan_map`): the states of each layout-plan entry in the text it
    reads, at the entry's cell.
    `image_in_convs` adds that many `PatchConvs` layers beside `image_in` (0: none). `patch_classes` adds a linear
    classifier on each context-image token (`patch_logits`), which only training reads. `embed_scale` is the RMS
    of the backbone's token embeddings: context-image tokens and queries start at that scale, so that the
    backbone's first norm neither drowns the text beside them nor shrinks the gradient that reaches
    `image_in`.
    """

    @register_to_config
    def __init__(
        self,
        backbone_hidden_size: int = 256,
        token_dim: int = 16,
        grid_size: int = 8,
        image_size: int = 64,
        patch_size: int = 2,
        num_queries: int = 16,
        head_hidden_size: int = 256,
        head_layers: int = 6,
        head_heads: int = 4,
        head_mlp_ratio: float = 4.0,
        resampler_queries: list[int] | None = None,
        resampler_layers: int = 2,
        resampler_heads: int = 4,
        embed_scale: float = 0.02,
        head_text_tokens: int = 0,
        image_in_convs: int = 0,
        head_image_tokens: int = 0,
        head_reference: bool = False,
        head_condition_order: bool = False,
        patch_classes: int = 0,
        head_plan: bool = False,
    ):
        super().__init__()
        for name, value in (("head_text_tokens", head_text_tokens), ("image_in_convs", image_in_convs),
                            ("head_image_tokens", head_image_tokens), ("patch_classes", patch_classes)):
            if value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}")
        if head_plan and not head_text_tokens:
            raise ValueError("head_plan needs head_text_tokens > 0: the plan is read from the text states the head reads")
        d = backbone_hidden_size
        self.image_in = nn.Sequential(nn.Linear(token_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.patch_convs = PatchConvs(token_dim, d, d, image_in_convs) if image_in_convs else None
        self.patch_classifier = nn.Linear(d, patch_classes) if patch_classes else None
        if self.patch_classifier is not None:  # zero, like every module a stage may add
            nn.init.zeros_(self.patch_classifier.weight)
            nn.init.zeros_(self.patch_classifier.bias)
        self.image_pos = nn.Linear(d, d)
        self.image_norm = nn.RMSNorm(d, eps=1e-6)
        nn.init.constant_(self.image_norm.weight, embed_scale)
        self.queries = nn.Parameter(torch.randn(num_queries, d) * embed_scale)
        # `resampler_queries` lists the levels of the learned resampler (resampler:R); none by default.
        self.compressor = VisualCompressor(
            grid_size, dim=d, resampler_queries=resampler_queries, resampler_layers=resampler_layers,
            resampler_heads=resampler_heads,
        )
        self.flow_head = FlowHead(
            token_dim=token_dim,
            grid_size=grid_size,
            cond_dim=d,
            hidden_size=head_hidden_size,
            num_layers=head_layers,
            num_heads=head_heads,
            mlp_ratio=head_mlp_ratio,
            reference_input=head_reference,
            condition_order=head_condition_order,
            plan_input=head_plan,
        )
        self.register_buffer("grid", square_grid(grid_size), persistent=False)

    def embed_image_tokens(
        self, tokens: torch.Tensor, compression: str | CompressionSpec = "none", importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens (B, N, token_dim) → context embeddings (B, M, d): project, compress, add 2D position,
        and normalise to the scale of the text embeddings (the same at every compression level).

        `importance` (B, N) is the attention each token receives, used by prune-attn only."""
        x = self.image_in(tokens)
        if self.patch_convs is not None:
            x = x + self.patch_convs(tokens)
        x, coords = self.compressor(x, self.grid, compression, importance=importance)
        return self.image_norm(x + self.image_pos(grid_sincos(coords, x.shape[-1]).to(x.dtype)))

    def patch_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, token_dim) → class logits (B, N, patch_classes) of each token as the backbone
        reads it, uncompressed; divided by `embed_scale`, so the classifier sees unit-scale features."""
        if self.patch_classifier is None:
            raise ValueError("these image modules have no patch classifier; build them with patch_classes > 0")
        return self.patch_classifier(self.embed_image_tokens(tokens, "none") / self.config.embed_scale)


@dataclass
class LossOutput:
    loss: torch.Tensor
    text_loss: torch.Tensor
    flow_loss: torch.Tensor
    patch_loss: torch.Tensor
    text_tokens: int
    flow_images: int


class UnifiedModel(nn.Module):
    """Backbone + image modules, with the operations the trainer and the pipeline need."""

    def __init__(self, backbone, image_modules: ImageModules, image_tokenizer):
        super().__init__()
        self.backbone = backbone
        self.image_modules = image_modules
        self.image_tokenizer = image_tokenizer
        hidden = backbone.get_input_embeddings().weight.shape[1]
        if hidden != image_modules.config.backbone_hidden_size:
            raise ValueError(
                f"image modules expect a backbone of hidden size {image_modules.config.backbone_hidden_size}, "
                f"the backbone has {hidden}"
            )
        if image_tokenizer.token_dim != image_modules.config.token_dim:
            raise ValueError(
                f"image modules expect {image_modules.config.token_dim}-dim patch tokens, "
                f"the image tokenizer makes {image_tokenizer.token_dim}"
            )

    @property
    def num_queries(self) -> int:
        return self.image_modules.config.num_queries

    @property
    def head_text_tokens(self) -> int:
        return self.image_modules.config.head_text_tokens

    @property
    def head_image_tokens(self) -> int:
        return self.image_modules.config.head_image_tokens

    @property
    def head_reference(self) -> bool:
        return self.image_modules.config.head_reference

    @property
    def head_plan(self) -> bool:
        return self.image_modules.config.head_plan

    @property
    def device(self) -> torch.device:
        return self.image_modules.queries.device

    # -- embeddings -----------------------------------------------------------------------------
    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(input_ids)

    def image_embeddings(
        self, latents: torch.Tensor, compression: str | CompressionSpec = "none", readers: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised latents (B, C, h, w) → context embeddings (B, M, d).

        prune-attn scores the image's tokens with the backbone first (`vision_attention`); `readers` (B, T, d),
        e.g. the embeddings of the text that follows the image, join the learned queries as its readers."""
        tok = self.image_tokenizer
        expected = (tok.latent_channels, tok.latent_size, tok.latent_size)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"image latents must have shape {expected}, got {tuple(latents.shape[1:])}")
        # A latent may come cached on an Image segment from a pipeline in another dtype.
        patches = self.image_tokenizer.patchify(latents).to(self.image_modules.queries.dtype)
        importance = None
        if self.image_modules.compressor.parse(compression).method == "prune-attn":
            importance = self.vision_attention(patches, readers)
        return self.image_modules.embed_image_tokens(patches, compression, importance)

    def vision_attention(self, patches: torch.Tensor, readers: torch.Tensor | None = None) -> torch.Tensor:
        """Attention (B, N) each full-resolution image token receives at the compressor's `attention_layer`.

        Readers: `readers` (text following the image, at the positions after its `<|image_end|>`) if given,
        then the learned queries of a next image, which are trained to read the context images. With no text
        after an image (it enters the cache first, or the model drew it), the queries alone read it.
        """
        full = self.image_modules.embed_image_tokens(patches, "none")
        batch = full.shape[0]
        # Stream positions relative to the image: v at 0, <|image_end|> at 1, text from 2, then
        # <|image_start|> and the queries one position further each.
        text = readers.shape[1] if readers is not None else 0
        parts = ([readers.to(full.dtype)] if readers is not None else []) + [self.query_embeddings(batch).to(full.dtype)]
        positions = torch.cat([
            torch.arange(2, 2 + text, device=full.device),
            torch.full((self.num_queries,), 3 + text, device=full.device),
        ])
        layer = self.image_modules.compressor.attention_layer
        return received_attention(self.backbone, full, torch.cat(parts, dim=1), positions, layer)

    def query_embeddings(self, batch: int = 1) -> torch.Tensor:
        return self.image_modules.queries.expand(batch, -1, -1)

    def embed(self, input_ids: torch.Tensor, spans: list[tuple[int, ImageSpan]], latents: list[torch.Tensor]):
        """Input embeddings (B, L, d) for a batch whose image spans are listed as (row, span)."""
        emb = self.text_embeddings(input_ids)
        groups: dict[tuple[str, tuple], list[tuple[int, ImageSpan]]] = {}
        for row, span in spans:
            groups.setdefault((span.compression, tuple(latents[span.latent_index].shape)), []).append((row, span))
            if span.num_queries:
                emb[row, span.query_slice] = self.image_modules.queries.to(emb.dtype)
        for (compression, _), members in groups.items():
            if self.image_modules.compressor.parse(compression).method == "prune-attn":
                # Question-aware pruning: each image is read by the text that follows it, one image at a time.
                vision = [
                    self.image_embeddings(latents[span.latent_index][None], compression,
                                          readers=self._reading_text(input_ids, row, span, spans))[0].to(emb.dtype)
                    for row, span in members
                ]
            else:
                stacked = torch.stack([latents[span.latent_index] for _, span in members])
                vision = self.image_embeddings(stacked, compression).to(emb.dtype)
            for (row, span), tokens in zip(members, vision):
                if tokens.shape[0] != span.num_vision:
                    raise ValueError(f"image span expects {span.num_vision} tokens, {compression} gives {tokens.shape[0]}")
                emb[row, span.vision_slice] = tokens
        return emb

    def _reading_text(self, input_ids: torch.Tensor, row: int, span: ImageSpan,
                      spans: list[tuple[int, ImageSpan]], limit: int = 64) -> torch.Tensor | None:
        """Embeddings (1, T, d) of the text right after an image's `<|image_end|>`, up to the row's next image
        or `limit` tokens: the question that prune-attn asks the image. None if no text follows."""
        begin = span.end + 1
        next_images = [other.start for r, other in spans if r == row and other.start >= begin]
        stop = min([begin + limit, input_ids.shape[1]] + next_images)
        follows = input_ids[row, begin:stop]
        return self.text_embeddings(follows)[None] if len(follows) else None

    # -- backbone -------------------------------------------------------------------------------
    def run_backbone(self, inputs_embeds, position_ids, attention_mask=None, cache=None, use_cache=False):
        """Hidden states of the last layer (after the final norm) and the updated cache."""
        out = self.backbone.base_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **with_cache(self.backbone.base_model, cache),
        )
        return out.last_hidden_state, returned_cache(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_output_embeddings()(hidden).float()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 cond_mask: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                 plan: torch.Tensor | None = None) -> torch.Tensor:
        return self.image_modules.flow_head(x_t, t, cond, cond_mask, reference, plan)

    def reference_patches(self, latents: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The flow head's reference input for a batch of images, from each one's reference latent (C, H, W)
        (None: it has none, given as zeros); None when the head has no reference input or no image has one."""
        stacked = stack_with_zeros(latents) if self.head_reference else None
        if stacked is None:
            return None
        return self.image_tokenizer.patchify(stacked.to(self.device)).to(self.image_modules.queries.dtype)

    def plan_map(self, text_states: torch.Tensor | None, entries: Sequence[PlanEntry]) -> torch.Tensor | None:
        """One image's plan input (N, d): the states of each layout-plan entry, averaged and normalised, spread
        over the patches around its cell with Gaussian weights (`PLAN_SPREAD`).

        `text_states` end at the image's `<|image_start|>`, and `entries` are counted back from there
        (`StreamCodec.plan_entries`). Only entries within the last `head_text_tokens` states count, the text the
        head reads. None: the head has no plan input, or no entry counts."""
        if not self.head_plan or text_states is None:
            return None
        n = len(text_states)
        kept = [e for e in entries if -e.first <= min(n, self.head_text_tokens)]
        if not kept:
            return None
        vectors = torch.stack([text_states[n + e.first: n + e.last + 1].float().mean(0) for e in kept])
        vectors = F.layer_norm(vectors, vectors.shape[-1:])
        side = self.image_modules.config.grid_size
        centres = torch.tensor([[e.y * side - 0.5, e.x * side - 0.5] for e in kept], device=vectors.device)
        distances = (self.image_modules.grid[None] - centres[:, None]).pow(2).sum(-1)  # (entries, N), in patches²
        weights = torch.exp(-distances / (2 * PLAN_SPREAD**2))
        return (weights.T @ vectors).to(text_states.dtype)

    def head_condition(self, query_states: torch.Tensor, text_states: torch.Tensor | None,
                       image_states: torch.Tensor | None = None) -> torch.Tensor:
        """One image's flow-head condition (C, d): its query states, then the last `head_text_tokens` states
        of the text before it (ending at its `<|image_start|>`), then the states of the latest context image
        before it (None: there is none), pooled to at most `head_image_tokens`."""
        parts = [query_states]
        if self.head_text_tokens and text_states is not None:
            parts.append(text_states[-self.head_text_tokens:])
        if self.head_image_tokens and image_states is not None:
            parts.append(pool_states(image_states, self.head_image_tokens))
        return torch.cat([p.to(query_states.dtype) for p in parts]) if len(parts) > 1 else query_states

    def previous_image(self, batch: PackedBatch, row: int, span: ImageSpan) -> ImageSpan | None:
        """The latest image before `span` in its own sequence of a packed row."""
        begin = _sequence_start(batch, row, span.start)
        before = [other for other_row, other in batch.spans if other_row == row and begin <= other.end < span.start]
        return max(before, key=lambda other: other.end, default=None)

    def training_head_inputs(self, hidden: torch.Tensor, batch: PackedBatch, row: int, span: ImageSpan
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The flow-head condition, reference latent and plan map (None: none) of a generated image in a
        teacher-forced pass, as the pipeline builds them.

        The text it reads runs from its sequence's start or the previous image's `<|image_end|>`, whichever is
        later, through its `<|image_start|>`; that previous image is also its reference. A text-dropout image
        sees nothing before it (as the pipeline's null branch): it reads its `<|image_start|>` alone, and has
        no earlier image, no reference and no plan."""
        queries = hidden[row, span.query_slice]
        if span.drop_text:
            return self.head_condition(queries, hidden[row, span.start: span.start + 1]), None, None
        previous = self.previous_image(batch, row, span)
        begin = _sequence_start(batch, row, span.start) if previous is None else previous.end + 1
        text = hidden[row, begin: span.start + 1]
        plan = self.plan_map(text, span.plan)
        if previous is None:
            return self.head_condition(queries, text), None, plan
        condition = self.head_condition(queries, text, hidden[row, previous.vision_slice])
        return condition, batch.latents[previous.latent_index], plan

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        batch: PackedBatch,
        flow_weight: float = 1.0,
        flow_repeats: int = 1,
        generator: torch.Generator | None = None,
        timestep_shift: float | Sequence[float] = 1.0,
        patch_label_weight: float = 0.0,
    ) -> LossOutput:
        """Text cross-entropy + flow_weight · rectified-flow MSE, in one teacher-forced pass, + patch_label_weight ·
        the cross-entropy of the batch's labelled patches (`PackedBatch.patch_labels`), if it has any.

        Each generated image's flow loss is averaged over `flow_repeats` draws of (t, noise): the head
        is small next to the backbone, so extra draws per backbone pass are nearly free. t is logit-normal,
        shifted toward noise by `timestep_shift` (see TrainArguments): one shift, or one per repeat.
        """
        emb = self.embed(batch.input_ids, batch.spans, batch.latents)
        hidden, _ = self.run_backbone(emb, batch.position_ids, batch.attention_mask.to(emb.dtype))
        targets = batch.labels
        picked = targets != IGNORE_INDEX
        n_text = int(picked.sum())
        if n_text:
            losses = F.cross_entropy(self.logits(hidden[picked]), targets[picked], reduction="none")
            if batch.label_weights is None:
                text_loss = losses.mean()
            else:
                weights = batch.label_weights[picked].to(losses.dtype)
                text_loss = (losses * weights).sum() / weights.sum()
        else:
            text_loss = hidden.sum() * 0.0
        generated = [(row, span) for row, span in batch.spans if span.num_queries]
        if generated:
            inputs = [self.training_head_inputs(hidden, batch, row, span) for row, span in generated]
            cond, cond_mask = pad_conditions([condition for condition, _, _ in inputs])
            x0 = self.image_tokenizer.patchify(torch.stack([batch.latents[s.latent_index] for _, s in generated]))
            x0 = x0.to(cond.dtype).repeat(flow_repeats, 1, 1)
            reference = self.reference_patches([latent for _, latent, _ in inputs])
            if reference is not None:
                reference = reference.repeat(flow_repeats, 1, 1)
            plan = stack_with_zeros([plan for _, _, plan in inputs])
            if plan is not None:
                plan = plan.repeat(flow_repeats, 1, 1)
            cond = cond.repeat(flow_repeats, 1, 1)
            cond_mask = None if cond_mask is None else cond_mask.repeat(flow_repeats, 1)
            t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, generator=generator))  # logit-normal
            shift = torch.tensor(timestep_shift, dtype=t.dtype, device=t.device).reshape(-1)
            if len(shift) not in (1, flow_repeats):
                raise ValueError(f"timestep_shift needs one shift or one per flow repeat ({flow_repeats}), "
                                 f"got {len(shift)}")
            shift = shift.repeat_interleave(len(generated)) if len(shift) > 1 else shift  # repeats are blocks
            t = shift * t / (1 + (shift - 1) * t)
            noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
            x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
            flow_loss = F.mse_loss(self.velocity(x_t, t, cond, cond_mask, reference, plan).float(), (noise - x0).float())
        else:
            flow_loss = hidden.sum() * 0.0
        loss = text_loss + flow_weight * flow_loss
        patch_loss = torch.zeros((), device=hidden.device)
        if patch_label_weight and batch.patch_labels is not None:
            tokens = self.image_tokenizer.patchify(batch.patch_latents).to(self.image_modules.queries.dtype)
            logits = self.image_modules.patch_logits(tokens)
            patch_loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.patch_labels.flatten())
            loss = loss + patch_label_weight * patch_loss
        return LossOutput(
            loss=loss,
            text_loss=text_loss.detach(),
            flow_loss=flow_loss.detach(),
            patch_loss=patch_loss.detach(),
            text_tokens=n_text,
            flow_images=len(generated),
        )


def pool_states(states: torch.Tensor, count: int) -> torch.Tensor:
    """An image's states (N, d) averaged down to at most `count` tokens: over the patch grid when both N and
    `count` are squares (row-major grids, as `none` and `pool` leave them), else over runs of neighbours."""
    n = states.shape[0]
    if n <= count:
        return states
    side, target = math.isqrt(n), math.isqrt(count)
    if side * side == n and target * target == count:
        grid = states.T.reshape(1, -1, side, side)
        return F.adaptive_avg_pool2d(grid, target).reshape(-1, count).T
    return F.adaptive_avg_pool1d(states.T[None], count)[0].T


def _sequence_start(batch: PackedBatch, row: int, index: int) -> int:
    """Where the sequence holding position `index` of a packed row begins."""
    starts = (batch.position_ids[row, : index + 1] == 0).nonzero()
    return int(starts[-1]) if len(starts) else 0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
