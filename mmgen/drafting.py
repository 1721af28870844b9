"""Speculative drafting (DESIGN.md §6): drafters propose tokens, the target verifies them in one pass.

A TEXT row's chunk becomes `[pending, d_1..d_k]`. One target forward gives the target's distribution after
every one of those tokens, and `verify_drafts` keeps the longest prefix that plain decoding would have
produced, plus the target's own next token: exactly so for greedy decoding, in distribution for sampling
(speculative rejection sampling; Leviathan et al. 2023, Chen et al. 2023).

Every drafter sees the context the way the target's cache holds it, through `extend` (the kept positions
of each chunk, in order, with the target's last hidden states), and proposes the tokens after the pending
one through `propose`. Three drafters, selected by name:

- `ngram`: prompt lookup over the row's own context plus a suffix index over earlier outputs, with a
  draft length that follows recent acceptance (training-free);
- `draft-lm`: any small causal LM sharing the tokenizer, with its own KV cache;
- `vision-head`: `VisionDraftHead`, one decoder layer over the target's hidden states in the manner of
  EAGLE, with ViSpec's image adaptor (each context image compressed to a few drafter tokens, and a
  global image vector fused into every later text position).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import DynamicCache

from .attention_scores import apply_rotary
from .model import with_cache
from .pipelines.decoding import sampling_probs
from .stream import TEXT, VISION

logger = logging.getLogger(__name__)

DRAFTER_NAMES = ("ngram", "draft-lm", "vision-head")
DRAFT_LM_DIR = "draft_lm"  # where `train-drafter` puts a draft LM inside a model folder
NO_ADAPTOR_DIR = "drafter_no_adaptor"  # the ablation head, beside the pipeline's `drafter/`


# -- verification ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How the target picks tokens: greedy at temperature 0, else temperature / top-k / top-p; never one of
    `banned` (the tokens the stream forces and the target never emits)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    banned: tuple[int, ...] = ()
    stops: tuple[int, ...] = ()  # tokens after which a draft goes no further (EOS, <|image_start|>)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.banned:
            return logits
        return logits.index_fill(-1, torch.tensor(self.banned, device=logits.device), float("-inf"))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(self.mask(logits), self.temperature, self.top_k, self.top_p)


def verify_drafts(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    lengths: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check each row's drafted tokens against the target; return (accepted count, next token) per row.

    logits (B, K+1, V): the target's logits after the pending token and after each draft token (already
    masked the way plain decoding masks them). drafts (B, K), of which the first `lengths[b]` count.
    draft_probs (B, K, V): the drafter's distribution q for each drafted token; None means the drafts
    were picked deterministically (q one-hot).

    Greedy: accept while the target's argmax equals the draft, then take the target's argmax.
    Sampling: accept d_i with probability min(1, p(d_i)/q(d_i)); at the first rejection draw from
    norm(max(p - q, 0)), after a full acceptance from p. Either way the emitted tokens are distributed
    exactly as plain decoding's. `generator` is one generator for all rows (vectorised) or one per row.
    """
    batch, width = drafts.shape
    if logits.shape[:2] != (batch, width + 1):
        raise ValueError(f"logits {tuple(logits.shape)} do not fit drafts {tuple(drafts.shape)}")
    valid = torch.arange(width, device=drafts.device)[None] < lengths[:, None]
    rows = torch.arange(batch, device=drafts.device)
    if sampling.greedy:
        target = logits.argmax(-1)
        accepted = ((target[:, :width] == drafts) & valid).long().cumprod(1).sum(1)
        return accepted, target[rows, accepted]
    p = sampling.probs(logits)
    vocab = p.shape[-1]
    q = draft_probs.to(p.dtype) if draft_probs is not None else F.one_hot(drafts, vocab).to(p.dtype)
    p_draft = p[:, :width].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    u = _uniform(batch, width, generator, p.device)
    accepted = ((u * q_draft < p_draft) & valid).long().cumprod(1).sum(1)
    p_next = p[rows, accepted]
    q_next = torch.cat([q, q.new_zeros(batch, 1, vocab)], 1)[rows, accepted]
    q_next = q_next * (accepted < lengths)[:, None]  # after a full acceptance the next token comes from p
    residual = (p_next - q_next).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_next)
    return accepted, _multinomial(residual, generator)


def _uniform(batch: int, width: int, generator, device) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(width, generator=g, device=device) for g in generator])
    return torch.rand(batch, width, generator=generator, device=device)


def _multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- the drafter interface ---------------------------------------------------------------------------
@dataclass
class ContextUpdate:
    """Positions a row just added to the target's cache (kept ones only, in order)."""

    ids: list[int]  # the token of each position (`<|image_pad|>` for vision tokens)
    positions: list[int]
    modality: list[int]  # stream.TEXT or stream.VISION
    hidden: torch.Tensor | None = None  # (n, d) the target's last hidden states there


@dataclass
class DraftRequest:
    """Draft after `pending`, the row's newest token, which enters the cache at `position` next."""

    row: int
    pending: int
    position: int
    max_tokens: int


@dataclass
class Draft:
    """Drafted tokens: a chain, and optionally a tree around it.

    `alternatives[k]` lists other tokens for depth k, each following `tokens[:k]` as `tokens[k]` does: when
    greedy verification rejects `tokens[k]` for one of them, that one is accepted too (`draft_tree`).
    Sampled drafts are chains: their verification compares one q per depth."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # (len(tokens), V): q of each token; None: picked deterministically
    alternatives: list[list[int]] = field(default_factory=list)

    def truncated(self, n: int) -> Draft:
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n], self.alternatives[:n])


def draft_tree(draft: Draft) -> tuple[list[int], list[int], torch.Tensor]:
    """How a draft is verified in one target pass after the pending token: the tokens (the chain, then each
    depth's alternatives), their depths (1 for the token right after the pending one), and which of
    [pending, *tokens] each of [pending, *tokens] attends to: its ancestors and itself."""
    chain = len(draft.tokens)
    tokens, depths, parents = list(draft.tokens), list(range(1, chain + 1)), list(range(chain))
    for depth, others in enumerate(draft.alternatives[:chain]):
        tokens += others
        depths += [depth + 1] * len(others)
        parents += [depth] * len(others)  # the chain's token before it (0: the pending token)
    sees = torch.eye(len(tokens) + 1, dtype=torch.bool)
    for k, parent in enumerate(parents, start=1):
        sees[k] |= sees[parent]
    return tokens, depths, sees


def accepted_alternative(draft: Draft, accepted: int, target_token: int) -> int | None:
    """Where in `draft_tree`'s tokens the alternative sits that the target chose where it rejected the chain
    (after `accepted` chain tokens), or None when it chose none of them."""
    if accepted >= len(draft.tokens) or accepted >= len(draft.alternatives):
        return None
    others = draft.alternatives[accepted]
    if target_token not in others:
        return None
    return len(draft.tokens) + sum(len(a) for a in draft.alternatives[:accepted]) + others.index(target_token)


class Drafter:
    """Proposes tokens for TEXT rows. One instance serves one generation call at a time; `start` resets it."""

    name = "drafter"

    def start(self, batch_size: int, sampling: Sampling) -> None:
        """A new call with `batch_size` rows begins."""
        self.batch_size = batch_size
        self.sampling = sampling

    def extend(self, row: int, update: ContextUpdate) -> None:
        """`row`'s context grew by `update` (called in cache order, before the next `propose`)."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """Draft tokens for each request: up to `max_tokens`, ordinary tokens only."""
        raise NotImplementedError

    def feedback(self, row: int, drafted: int, accepted: int) -> None:
        """How many of `row`'s last drafted tokens the target accepted."""

    def finish(self) -> None:
        """The call is over."""


def build_drafter(spec: str, pipe, shared: dict) -> Drafter:
    """A fresh drafter called `spec` for one call of `pipe`: "ngram", "vision-head", "draft-lm" (the model
    folder's draft_lm/) or "draft-lm:PATH". `shared` keeps what outlives a call: the n-gram memory of
    earlier outputs and loaded draft LMs."""
    name, _, argument = spec.partition(":")
    if name not in DRAFTER_NAMES:
        raise ValueError(f"unknown drafter {spec!r}; known: {', '.join(DRAFTER_NAMES)}")
    if name == "ngram":
        return NgramDrafter(memory=shared.setdefault("ngram", NgramIndex(NgramDrafter.max_order)))
    if name == "vision-head":
        if not isinstance(pipe.drafter, VisionDraftHead):
            raise ValueError(
                "drafter 'vision-head' needs a trained VisionDraftHead as the pipeline's `drafter` component; "
                "train one with `mmgen train-drafter configs/drafter.yaml`"
            )
        return VisionHeadDrafter(pipe.drafter, pipe.unified)
    folder = Path(argument) if argument else _model_folder(pipe) / DRAFT_LM_DIR
    if spec not in shared:
        if not folder.is_dir():
            raise ValueError(
                f"drafter 'draft-lm' needs a small causal LM sharing the tokenizer: no folder {folder}; pass "
                "drafter='draft-lm:PATH' or a DraftLMDrafter(model)"
            )
        shared[spec] = DraftLMDrafter.from_folder(folder, pipe.tokenizer).model
    return DraftLMDrafter(shared[spec])


def _model_folder(pipe) -> Path:
    return Path(getattr(pipe.config, "_name_or_path", "") or ".")


def clip_draft(draft: Draft, max_tokens: int, stop_ids: set[int], vocab_size: int) -> Draft:
    """At most `max_tokens` tokens, ending before the first special or unknown token (a draft never runs
    past `<|image_start|>` or EOS: the target's own token decides those), with q over the target's vocabulary.

    Cutting a sampled draft short keeps verification exact: the token after the cut comes from p alone."""

    def ordinary(token: int) -> bool:
        return token not in stop_ids and 0 <= token < vocab_size

    n = 0
    while n < min(max_tokens, len(draft.tokens)) and ordinary(draft.tokens[n]):
        n += 1
    draft = draft.truncated(n)
    draft.alternatives = [[t for t in others if ordinary(t)] for others in draft.alternatives]
    if draft.probs is not None and draft.probs.shape[-1] != vocab_size:
        width = min(vocab_size, draft.probs.shape[-1])
        probs = draft.probs.new_zeros(len(draft.tokens), vocab_size)
        probs[:, :width] = draft.probs[:, :width]
        draft = Draft(draft.tokens, probs)
    return draft


# -- ngram -------------------------------------------------------------------------------------------
class NgramIndex:
    """The continuations of every n-gram (n = 1..max_order) of some token sequences, with counts and recency."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self.table: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.clock = 0
        self.size = 0

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Index the continuations tokens[i] for i >= start (earlier tokens serve as keys only)."""
        for i in range(max(start, 1), len(tokens)):
            self.clock += 1
            self.size += 1
            nxt = tokens[i]
            for n in range(1, min(self.max_order, i) + 1):
                entry = self.table.setdefault(tuple(tokens[i - n : i]), {})
                seen = entry.setdefault(nxt, [0, 0])
                seen[0] += 1
                seen[1] = self.clock

    def lookup(self, context: Sequence[int], order: int, prefer_recent: bool) -> int | None:
        """The continuation of the last `order` tokens of `context`: the latest seen, or the most frequent."""
        if order > len(context):
            return None
        entry = self.table.get(tuple(context[len(context) - order :]))
        if not entry:
            return None
        rank = (lambda kv: kv[1][1]) if prefer_recent else (lambda kv: (kv[1][0], kv[1][1]))
        return max(entry.items(), key=rank)[0]

    def clear(self) -> None:
        self.table.clear()
        self.size = 0


class NgramDrafter(Drafter):
    """Prompt lookup plus a suffix index of earlier outputs; training-free.

    Each draft token continues the longest suffix (up to `max_order` tokens) of the context that occurred
    before: first in the row's own context (the most recent occurrence: prompt lookup), else in the outputs
    of earlier rows and calls (the most frequent continuation, as SuffixDecoding does). The draft length of
    a row grows by 2 after a fully accepted draft and shrinks by 1 after a rejection.
    """

    name = "ngram"
    max_order = 4

    def __init__(self, min_order: int = 1, memory_min_order: int = 2, initial_tokens: int = 4, max_tokens: int = 12,
                 memory: NgramIndex | None = None, memory_tokens: int = 200_000):
        self.min_order, self.memory_min_order = min_order, memory_min_order
        self.initial_tokens, self.max_tokens = initial_tokens, max_tokens
        self.memory = memory if memory is not None else NgramIndex(self.max_order)
        self.memory_tokens = memory_tokens

    def start(self, batch_size: int, sampling: Sampling) -> None:
        super().start(batch_size, sampling)
        self.history: list[list[int]] = [[] for _ in range(batch_size)]
        self.prompt_length: list[int | None] = [None] * batch_size
        self.index = [NgramIndex(self.max_order) for _ in range(batch_size)]
        self.budget = [self.initial_tokens] * batch_size

    def extend(self, row: int, update: ContextUpdate) -> None:
        history = self.history[row]
        before = len(history)
        history.extend(t for t, m in zip(update.ids, update.modality) if m == TEXT)
        if self.prompt_length[row] is None:
            self.prompt_length[row] = len(history)
        self.index[row].add(history, start=before)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for req in requests:
            context = self.history[req.row] + [req.pending]
            tokens: list[int] = []
            for _ in range(min(req.max_tokens, self.budget[req.row])):
                token = self._continue(req.row, context)
                if token is None or token in self.sampling.stops or token in self.sampling.banned:
                    break
                tokens.append(token)
                context.append(token)
            drafts.append(Draft(tokens))
        return drafts

    def _continue(self, row: int, context: list[int]) -> int | None:
        for order in range(self.max_order, self.min_order - 1, -1):
            token = self.index[row].lookup(context, order, prefer_recent=True)
            if token is None and order >= self.memory_min_order:
                token = self.memory.lookup(context, order, prefer_recent=False)
            if token is not None:
                return token
        return None

    def feedback(self, row: int, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.budget[row] = min(self.max_tokens, self.budget[row] + 2)
        else:
            self.budget[row] = max(1, self.budget[row] - 1)

    def finish(self) -> None:
        if self.memory.size > self.memory_tokens:
            self.memory.clear()
        for history, prompt_length in zip(self.history, self.prompt_length):
            # The output, keyed also by the prompt's last tokens.
            prompt_length = prompt_length or 0
            start = max(0, prompt_length - self.max_order)
            self.memory.add(history[start:], start=prompt_length - start)


# -- draft LM ----------------------------------------------------------------------------------------
class DraftLMDrafter(Drafter):
    """A small causal LM that shares the tokenizer drafts greedily (or samples, when the target samples).

    It reads the text of the stream (images left out, their `<|image_start|>`/`<|image_end|>` kept) and
    keeps one KV cache per row, cropped back to the longest prefix the target accepted. Drafting stops
    when the product of its top probabilities falls below `stop_below`.
    """

    name = "draft-lm"

    def __init__(self, model, max_tokens: int = 6, stop_below: float = 0.05, seed: int = 0):
        self.model = model.eval()
        self.max_tokens, self.stop_below, self.seed = max_tokens, stop_below, seed
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or config.n_positions)

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer=None, **kwargs) -> DraftLMDrafter:
        """Load a draft LM from a local folder (safetensors only); with `tokenizer`, check that they match."""
        from .loading import load_backbone, load_tokenizer

        folder = Path(folder)
        model = load_backbone(folder)
        if tokenizer is not None:
            if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
                if load_tokenizer(folder).get_vocab() != tokenizer.get_vocab():
                    raise ValueError(f"the draft LM in {folder} does not share the pipeline's tokenizer")
            if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
                raise ValueError(f"the draft LM in {folder} has fewer token embeddings than the tokenizer has tokens")
        logger.debug("loaded the draft LM in %s", folder)
        return cls(model, **kwargs)

    def start(self, batch_size: int, sampling: Sampling) -> None:
        super().start(batch_size, sampling)
        self.history: list[list[int]] = [[] for _ in range(batch_size)]
        self.cached: list[list[int]] = [[] for _ in range(batch_size)]
        self.caches = [DynamicCache(config=self.model.config) for _ in range(batch_size)]
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.seed)

    def extend(self, row: int, update: ContextUpdate) -> None:
        self.history[row].extend(t for t, m in zip(update.ids, update.modality) if m == TEXT)

    @torch.no_grad()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._draft(req) for req in requests]

    def _draft(self, req: DraftRequest) -> Draft:
        sequence = self.history[req.row] + [req.pending]
        limit = min(req.max_tokens, self.max_tokens, self.context_length - len(sequence) - 1)
        if limit <= 0 or max(sequence) >= self.vocab_size:
            return Draft()
        cached = self.cached[req.row]
        common = 0
        while common < min(len(cached), len(sequence) - 1) and cached[common] == sequence[common]:
            common += 1
        cache = self.caches[req.row]
        if len(cached) > common:
            cache.crop(common - len(cached))
        logits = self._feed(cache, sequence[common:])
        self.cached[req.row] = cached = sequence[:]
        tokens, probs, confidence = [], [], 1.0
        for step in range(limit):
            logits = self.sampling.mask(logits)
            if self.sampling.greedy:
                top = logits.softmax(-1).max()
                token = int(logits.argmax())
                confidence *= float(top)
            else:
                q = self.sampling.probs(logits[None])[0]
                token = int(torch.multinomial(q, 1, generator=self.generator))
                probs.append(q)
                confidence *= float(q[token])
            tokens.append(token)
            if confidence < self.stop_below or step == limit - 1 or token in self.sampling.stops:
                break
            logits = self._feed(cache, [token])
            cached.append(token)
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _feed(self, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the draft LM on top of `cache`; the logits after the last one."""
        input_ids = torch.tensor([ids], device=self.model.device)
        out = self.model(input_ids=input_ids, use_cache=True, **with_cache(self.model, cache))
        return out.logits[0, -1].float()


# -- vision-aware draft head -------------------------------------------------------------------------
def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., T, head_dim) of the rotary embedding at positions (..., T), for `apply_rotary`."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass
class PairItem:
    """A drafter input built from the target's state at stream index `source` and the token after it."""

    feature: torch.Tensor  # (d,) the target's hidden state at `source`
    token: int  # the token at source + 1
    position: int  # the stream position of `source`
    image: int  # the latest context image before it (-1: none)
    source: int = -1


@dataclass
class ImageItem:
    """A context image, to be compressed into the drafter's few image tokens."""

    hidden: torch.Tensor  # (M, d) the target's hidden states over the image's vision tokens
    position: int
    image: int


class ItemWalker:
    """Turns the stream of one row, as the target's cache receives it, into drafter items.

    Text positions pair with the token that follows them (EAGLE: feature_i + token_{i+1} predicts
    feature_{i+1}); a run of vision tokens becomes one `ImageItem`; `<|image_start|>` pairs with nothing.
    The last text position waits for its next token, which arrives with `pending`. Training and decoding
    both walk streams through this class, so the drafter sees the same items in both.
    """

    def __init__(self, use_images: bool):
        self.use_images = use_images
        self.prev: tuple[torch.Tensor, int, int] | None = None  # (feature, position, source) awaiting its token
        self.images = 0
        self.offset = 0  # stream index of the next position fed

    def feed(self, update: ContextUpdate) -> list[PairItem | ImageItem]:
        items: list[PairItem | ImageItem] = []
        vision: list[int] = []
        for m, (token, position, modality) in enumerate(zip(update.ids, update.positions, update.modality)):
            if modality == VISION:
                vision.append(m)
                self.prev = None
                continue
            if vision:
                items += self._image(update, vision)
                vision = []
            if self.prev is not None:
                items.append(self._pair(token))
            self.prev = (update.hidden[m], position, self.offset + m)
        if vision:
            items += self._image(update, vision)
        self.offset += len(update.ids)
        return items

    def pending(self, token: int) -> PairItem | None:
        """The item of the newest token (not in the cache yet): the last text position paired with it."""
        return self._pair(token) if self.prev is not None else None

    def _pair(self, token: int) -> PairItem:
        feature, position, source = self.prev
        self.prev = None
        return PairItem(feature, token, position, self.images - 1 if self.use_images else -1, source)

    def _image(self, update: ContextUpdate, index: list[int]) -> list[ImageItem]:
        self.images += 1
        if not self.use_images:
            return []
        return [ImageItem(update.hidden[index], update.positions[index[0]], self.images - 1)]


class VisionDraftHead(ModelMixin, ConfigMixin):
    """EAGLE/ViSpec-style draft head: one decoder layer over the target's last hidden state and the token.

    Input of a text position: fuse([h_i ; e(t_{i+1})]) plus, after a context image, that image's global
    vector. The layer (RMSNorm, rotary self-attention, SwiGLU MLP) predicts h_{i+1}, which the target's own
    LM head turns into the draft token; drafting continues on its own predictions. The image adaptor
    compresses each context image's hidden states to `adaptor_tokens` tokens (learned queries
    cross-attending to them) that the drafter attends to in place of the image; the target keeps the full
    image. With `image_adaptor=False` images are skipped (the ablation). The embeddings and LM head are the
    target's and are not stored here.
    """

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 192,
        num_heads: int = 4,
        intermediate_size: int = 512,
        image_adaptor: bool = True,
        adaptor_tokens: int = 4,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        max_draft: int = 8,
        stop_below: float = 0.1,
        siblings: int = 0,
        siblings_below: float | None = None,
    ):
        super().__init__()
        d = hidden_size
        if d % num_heads or (d // num_heads) % 2:
            raise ValueError(f"hidden_size {d} must split into {num_heads} heads of even size")
        self.fuse = nn.Linear(2 * d, d)
        self.attn_norm = nn.RMSNorm(d, eps=norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=norm_eps)
        self.gate_up = nn.Linear(d, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, d, bias=False)
        self.final_norm = nn.RMSNorm(d, eps=norm_eps)
        if image_adaptor:
            self.adaptor_queries = nn.Parameter(torch.randn(adaptor_tokens, d) * 0.02)
            self.adaptor_norm = nn.RMSNorm(d, eps=norm_eps)
            self.adaptor_attn = nn.MultiheadAttention(d, num_heads, batch_first=True)
            self.image_global = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            nn.init.zeros_(self.image_global[2].weight)  # starts as the head without images
            nn.init.zeros_(self.image_global[2].bias)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._decoding: DecodingLayer | None = None

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def decoding_layer(self, embed: nn.Embedding, lm_head: nn.Module) -> DecodingLayer:
        """The layer in the form drafting runs it, with the target's token embedding and LM head; built again
        only when a weight has changed (trained, loaded or moved) since the last call."""
        weights = (*self.parameters(), embed.weight, lm_head.weight)
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if self._decoding is None or self._decoding.key != key:
            self._decoding = DecodingLayer(self, embed, lm_head, key)
        return self._decoding

    # -- inputs ---------------------------------------------------------------------------------------
    def embed_items(self, items: Sequence[PairItem | ImageItem], embed,
                    globals_: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        """Input vectors (T, d) and positions (T,) of `items`; `globals_` maps image numbers to their
        (drafter tokens, global vector) and is filled in by the images met here. `embed` is the target's
        token embedding."""
        if not items:
            return None, None
        images = [it for it in items if isinstance(it, ImageItem)]
        for item in images:  # first: the pairs after an image read its global vector
            globals_[item.image] = self.image_tokens(item.hidden.to(self.fuse.weight.dtype))
        pair_rows, image_rows, positions = [], [], []
        for item in items:
            if isinstance(item, ImageItem):
                count = self.config.adaptor_tokens
                image_rows += range(len(positions), len(positions) + count)
                positions += [item.position] * count
            else:
                pair_rows.append(len(positions))
                positions.append(item.position)
        device, dtype = self.fuse.weight.device, self.fuse.weight.dtype
        x = torch.zeros(len(positions), self.config.hidden_size, device=device, dtype=dtype)
        if images:
            x = x.index_put((torch.tensor(image_rows, device=device),),
                            torch.cat([globals_[it.image][0] for it in images]))
        pairs = [it for it in items if isinstance(it, PairItem)]
        if pairs:
            features = torch.stack([it.feature for it in pairs]).to(device, dtype)
            tokens = embed(torch.tensor([it.token for it in pairs], device=device)).to(dtype)
            zero = features.new_zeros(features.shape[-1])
            image = torch.stack([globals_[it.image][1] if it.image >= 0 else zero for it in pairs])
            x = x.index_put((torch.tensor(pair_rows, device=device),), self.pair_inputs(features, tokens, image))
        return x, torch.tensor(positions, device=device)

    def pair_inputs(self, features: torch.Tensor, token_embeds: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """fuse([h ; e(token)]) + the global vector of the latest context image (zeros: none)."""
        return self.fuse(torch.cat([features, token_embeds], dim=-1)) + image

    def image_tokens(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's hidden states (M, d) → a few drafter tokens (K, d) and its global vector (d,)."""
        keys = self.adaptor_norm(hidden)[None]
        tokens, _ = self.adaptor_attn(self.adaptor_queries[None].to(keys.dtype), keys, keys, need_weights=False)
        return tokens[0], self.image_global(hidden.mean(0))

    # -- the layer ------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) at positions (B, T) → predicted next features (B, T, d), and this step's keys and
        values (B, H, T, Dh). `mask` (B, T, P + T) says which of the P past and T new items each item sees
        (None: all of them)."""
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        cos, sin = (table[:, None].to(q.dtype) for table in self.rotary(positions))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # one table for both
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if mask is None else mask[:, None])
        x = x + self.out(attended.transpose(1, 2).reshape(x.shape))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.final_norm(x), k, v

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (..., T, Dh) at positions (..., T), read from a table built once and grown when a
        position passes its end: a draft step then costs one lookup instead of the table's six ops."""
        needed = int(positions.max()) + 1
        table = self._rotary
        if table is None or table[0].shape[0] < needed or table[0].device != positions.device:
            size = max(needed, 1024, 0 if table is None else 2 * table[0].shape[0])
            dim = self.config.hidden_size // self.num_heads
            table = rotary_tables(torch.arange(size, device=positions.device), dim, self.config.rope_theta)
            self._rotary = table
        return table[0][positions], table[1][positions]


def _rotated_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a projection whose outputs are `rotate_half` of the original's, head by head."""
    first, second = weight.view(heads, -1, weight.shape[-1]).chunk(2, dim=1)
    return torch.cat([-second, first], dim=1).reshape_as(weight)


class DecodingLayer:
    """A `VisionDraftHead`'s layer as drafting runs it: the same weights, refolded so that one draft step
    costs about twenty tensor ops instead of about forty-five. At this size an op costs more than its
    arithmetic, so the op count is a step's time.

    Folded in: the norms' scales into the matrices after them; `rotate_half` of q and k as extra rows of
    the qkv projection, so rotary is one multiply-add; the token half of `fuse`, applied to every
    embedding once, as a table; the banned tokens as a bias of the LM head. The rows of a batch share
    every matrix product and attend each to its own cache, so they need no padding.
    """

    def __init__(self, head: VisionDraftHead, embed: nn.Embedding, lm_head: nn.Module, key: tuple):
        config = head.config
        d, heads = config.hidden_size, head.num_heads
        self.key, self.heads, self.eps, self.rotary = key, heads, config.norm_eps, head.rotary
        with torch.no_grad():
            feature_half, token_half = head.fuse.weight.split(d, dim=1)
            self.token_table = F.linear(embed.weight.to(token_half.dtype), token_half, head.fuse.bias)
            self.feature_in = feature_half.t().contiguous()
            q, k, v = head.qkv.weight.chunk(3)
            rows = torch.cat([q, k, _rotated_rows(q, heads), _rotated_rows(k, heads), v])
            self.qkv = (rows * head.attn_norm.weight).t().contiguous()
            self.out = head.out.weight.t().contiguous()
            self.gate_up = (head.gate_up.weight * head.mlp_norm.weight).t().contiguous()
            self.down = head.down.weight.t().contiguous()
            self.final_norm = head.final_norm.weight.detach()
            self.lm_head = lm_head.weight.t().to(token_half.dtype).contiguous()
            bias = getattr(lm_head, "bias", None)
            self.lm_bias = torch.zeros(self.lm_head.shape[1], dtype=token_half.dtype, device=token_half.device) \
                if bias is None else bias.detach().to(token_half.dtype)

    def inputs(self, features: torch.Tensor, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`VisionDraftHead.pair_inputs` of features (B, d), token ids (B,) and global vectors (B, d)."""
        return torch.addmm(self.token_table[tokens] + image, features, self.feature_in)

    def logit_bias(self, banned: Sequence[int]) -> torch.Tensor:
        """The LM head's bias with -inf at the banned tokens, for `logits`."""
        if not banned:
            return self.lm_bias
        return self.lm_bias.index_fill(0, torch.tensor(banned, device=self.lm_bias.device), float("-inf"))

    def logits(self, features: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, features, self.lm_head).float()

    def run(self, x: torch.Tensor, positions: torch.Tensor, caches: list[RowCache], counts: list[int],
            true: bool) -> torch.Tensor:
        """The layer over new items x (N, d) at positions (N,): the first counts[0] belong to the row whose
        cache is caches[0], and so on. Their keys and values go into the caches (`true`: to stay), each item
        attends to its row's cache up to itself, and the predicted features (N, d) come back."""
        total, d = x.shape
        heads, dim = self.heads, d // self.heads
        projected = torch.mm(F.rms_norm(x, (d,), eps=self.eps), self.qkv)
        cos, sin = (table[:, None].to(x.dtype) for table in self.rotary(positions))
        qk = torch.addcmul(projected[:, : 2 * d].view(total, 2 * heads, dim) * cos,
                           projected[:, 2 * d : 4 * d].view(total, 2 * heads, dim), sin)
        q, k = qk[:, :heads].transpose(0, 1), qk[:, heads:].transpose(0, 1)
        v = projected[:, 4 * d :].view(total, heads, dim).transpose(0, 1)
        attended, start = [], 0
        for cache, n in zip(caches, counts):
            depth, end = cache.length, start + n
            cache.append(k[:, start:end], v[:, start:end], true)
            keys, values = cache.view()
            mask = None if n == 1 else torch.ones(n, depth + n, dtype=torch.bool, device=x.device).tril(depth)
            attended.append(F.scaled_dot_product_attention(q[:, start:end], keys, values, attn_mask=mask))
            start = end
        attended = (attended[0] if len(attended) == 1 else torch.cat(attended, dim=1)).transpose(0, 1)
        x = torch.addmm(x, attended.reshape(total, d), self.out)
        gate, up = torch.mm(F.rms_norm(x, (d,), eps=self.eps), self.gate_up).chunk(2, dim=-1)
        x = torch.addmm(x, F.silu(gate) * up, self.down)
        return F.rms_norm(x, (d,), self.final_norm, self.eps)


class RowCache:
    """One row's keys and values (H, T, Dh) in the draft head's layer, in buffers that double when full, so
    a draft step writes only its own keys. Items past `true_length` are drafted ones, dropped at the next
    ingest."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.true_length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, true: bool) -> None:
        n = k.shape[1]
        if self.keys is None or self.length + n > self.keys.shape[1]:
            capacity = max(64, 2 * (self.length + n))
            keys, values = (t.new_empty(t.shape[0], capacity, t.shape[2]) for t in (k, v))
            if self.length:
                keys[:, : self.length], values[:, : self.length] = self.view()
            self.keys, self.values = keys, values
        self.keys[:, self.length : self.length + n], self.values[:, self.length : self.length + n] = k, v
        self.length += n
        if true:
            self.true_length = self.length

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, : self.length], self.values[:, : self.length]

    def drop_drafted(self) -> None:
        self.length = self.true_length


class VisionHeadDrafter(Drafter):
    """Runs a `VisionDraftHead` beside the target: its own one-layer KV cache per row, fed with the target's
    hidden states as they arrive, batched over the rows that draft together.

    Drafting stops at `max_draft` tokens or when the product of the head's top probabilities falls below
    `stop_below` (a cheap stand-in for EAGLE-2's confidence-shaped drafts). Greedy drafts also carry the
    head's next `siblings` choices (`Draft.alternatives`): the target verifies them in the same pass, and where
    it rejects the head's first choice it often picks its second. With `siblings_below`, only at the depths
    where the first choice's probability is below it: every token verified costs target time, and where the
    head is sure, the target rarely picks another. The head's layer runs as its `DecodingLayer`.
    """

    name = "vision-head"

    def __init__(self, head: VisionDraftHead, model, max_draft: int | None = None, stop_below: float | None = None,
                 siblings: int | None = None, siblings_below: float | None = None, seed: int = 0):
        self.head = head.eval()
        self.model = model  # the UnifiedModel: token embeddings and LM head of the target
        self.max_draft = max_draft if max_draft is not None else head.config.max_draft
        self.stop_below = stop_below if stop_below is not None else head.config.stop_below
        self.siblings = siblings if siblings is not None else head.config.siblings
        if siblings_below is None:  # the head's setting; None there: at every depth
            siblings_below = head.config.get("siblings_below")
        self.siblings_below = math.inf if siblings_below is None else siblings_below
        self.seed = seed

    def start(self, batch_size: int, sampling: Sampling) -> None:
        super().start(batch_size, sampling)
        self.walkers = [ItemWalker(self.head.config.image_adaptor) for _ in range(batch_size)]
        self.queued: list[list] = [[] for _ in range(batch_size)]
        self.caches = [RowCache() for _ in range(batch_size)]
        self.globals: list[dict[int, torch.Tensor]] = [{} for _ in range(batch_size)]
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        backbone = self.model.backbone
        self.layer = self.head.decoding_layer(backbone.get_input_embeddings(), backbone.get_output_embeddings())
        self.logit_bias = self.layer.logit_bias(sampling.banned)

    def extend(self, row: int, update: ContextUpdate) -> None:
        self.queued[row] += self.walkers[row].feed(update)

    @torch.no_grad()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft() for _ in requests]
        fed, inputs, positions = [], [], []
        for k, req in enumerate(requests):
            item = self.walkers[req.row].pending(req.pending)
            if item is not None:
                self.queued[req.row].append(item)
            x, pos = self.head.embed_items(self.queued[req.row], self.model.text_embeddings, self.globals[req.row])
            self.queued[req.row] = []
            self.caches[req.row].drop_drafted()
            if x is not None:
                fed.append((k, item is not None))
                inputs.append(x)
                positions.append(pos)
        if not fed:
            return drafts
        counts = [len(x) for x in inputs]
        out = self.layer.run(torch.cat(inputs), torch.cat(positions), [self.caches[requests[k].row] for k, _ in fed],
                             counts, true=True)
        # Rows whose newest item is the pending token's draft from its prediction.
        ready = [j for j, (_, is_ready) in enumerate(fed) if is_ready]
        if not ready:
            return drafts
        live = [fed[j][0] for j in ready]
        ends = torch.tensor(counts, device=out.device).cumsum(0) - 1
        features = out[ends[ready]]
        positions = [int(positions[j][-1]) for j in ready]
        rows = [requests[k].row for k in live]
        zero = features.new_zeros(features.shape[-1])
        image = torch.stack([self._global(r, zero) for r in rows])
        limits = [min(requests[k].max_tokens, self.max_draft) for k in live]
        confidence = [1.0] * len(live)
        active = list(range(len(live)))  # the rows still drafting; features and image hold theirs only
        # The per-row bookkeeping runs on Python numbers: a draft step costs a few tensor ops, not dozens.
        for step in range(max(limits)):
            logits = self.layer.logits(features, self.logit_bias)
            if self.sampling.greedy:
                best, ranked = logits.softmax(-1).topk(1 + self.siblings, dim=-1)
                top, choices = best[:, 0].tolist(), ranked.tolist()
                tokens, q = [c[0] for c in choices], None
            else:
                q = sampling_probs(logits, self.sampling.temperature, self.sampling.top_k,  # banned: in the bias
                                   self.sampling.top_p)
                picked = torch.multinomial(q, 1, generator=self.generator)
                tokens, top = picked[:, 0].tolist(), q.gather(-1, picked)[:, 0].tolist()
            going = []
            for j, a in enumerate(active):
                draft = drafts[live[a]]
                draft.tokens.append(tokens[j])
                if q is None and self.siblings:
                    draft.alternatives.append(choices[j][1:] if top[j] < self.siblings_below else [])
                if q is not None:
                    draft.probs = q[j : j + 1] if draft.probs is None else torch.cat([draft.probs, q[j : j + 1]])
                confidence[a] *= top[j]
                # A row stops at its limit, when unsure, or after a token that ends drafting (EOS, <|image_start|>).
                if step + 1 < limits[a] and confidence[a] >= self.stop_below and tokens[j] not in self.sampling.stops:
                    going.append(j)
            if not going:
                break
            if len(going) < len(active):
                keep = torch.tensor(going, device=features.device)
                features, image = features[keep], image[keep]
            active = [active[j] for j in going]
            x = self.layer.inputs(features, torch.tensor([tokens[j] for j in going], device=features.device), image)
            step_positions = torch.tensor([positions[a] + step + 1 for a in active], device=x.device)
            features = self.layer.run(x, step_positions, [self.caches[rows[a]] for a in active], [1] * len(active),
                                      true=False)
        return drafts

    def _global(self, row: int, zero: torch.Tensor) -> torch.Tensor:
        """The global vector of the row's latest context image (zeros: none, or no adaptor)."""
        latest = self.walkers[row].images - 1
        if not self.head.config.image_adaptor or latest < 0:
            return zero
        return self.globals[row][latest][1]
