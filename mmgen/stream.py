"""The interleaved stream: segments ⇄ model inputs (DESIGN.md §3).

One image in the stream is laid out as::

    <|image_start|> q_1 .. q_Q  v_1 .. v_M <|image_end|>

`q` are learned query tokens whose hidden states condition the flow head, `v` the image's
(compressed) latent tokens. Queries are read-out tokens: nothing after them attends to them (see
`build_attention_mask`), so once an image is generated its queries leave the KV cache and every image in
the context, generated or given, occupies exactly `<|image_start|> v.. <|image_end|>`. That keeps the
per-image cache cost equal to M + 2 tokens and lets compression shrink it exactly.

Positions: text counts up; `<|image_start|>` takes p, every q and v token of the image shares p + 1
(a 2D position embedding in the model tells them apart), `<|image_end|>` takes p + 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .layout import PlanEntry, plan_entries
from .segments import Image, Segment, Text

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"

# Modality of each position in the stream.
TEXT, QUERY, VISION = 0, 1, 2
IGNORE_INDEX = -100


def add_special_tokens(tokenizer) -> int:
    """Give any Hugging Face tokenizer the image tokens, plus EOS and PAD when it lacks them.

    Returns how many tokens were added, so the caller can resize the backbone's embeddings.
    """
    specials: dict = {}
    if tokenizer.eos_token is None:
        specials["eos_token"] = DEFAULT_EOS
    if tokenizer.pad_token is None:
        specials["pad_token"] = DEFAULT_PAD
    missing = [t for t in (IMAGE_START, IMAGE_END, IMAGE_PAD) if t not in tokenizer.get_vocab()]
    if missing:
        specials["additional_special_tokens"] = missing
    return tokenizer.add_special_tokens(specials, replace_extra_special_tokens=False) if specials else 0


@dataclass(frozen=True)
class SpecialIds:
    image_start: int
    image_end: int
    image_pad: int
    eos: int
    pad: int
    bos: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        vocab = tokenizer.get_vocab()
        for token in (IMAGE_START, IMAGE_END, IMAGE_PAD):
            if token not in vocab:
                raise ValueError(f"tokenizer lacks the special token {token!r}: call add_special_tokens first")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs an EOS and a PAD token: call add_special_tokens first")
        return cls(
            image_start=vocab[IMAGE_START],
            image_end=vocab[IMAGE_END],
            image_pad=vocab[IMAGE_PAD],
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            bos=tokenizer.bos_token_id,
        )


@dataclass
class ImageSpan:
    """Where one image sits in an encoded sequence.

    `num_queries` is Q for an image the model is trained to generate and 0 for a context image.
    `drop_text` marks a training image whose `<|image_start|>` and queries see nothing before it: the
    unconditional branch of classifier-free guidance, as the pipeline forwards it on its own. `plan` holds the
    layout-plan entries of a generated image's text since the previous image, through its `<|image_start|>`.
    """

    start: int
    num_queries: int
    num_vision: int
    latent_index: int
    compression: str = "none"
    drop_text: bool = False
    plan: tuple[PlanEntry, ...] = ()

    @property
    def query_slice(self) -> slice:
        return slice(self.start + 1, self.start + 1 + self.num_queries)

    @property
    def vision_slice(self) -> slice:
        begin = self.start + 1 + self.num_queries
        return slice(begin, begin + self.num_vision)

    @property
    def end(self) -> int:
        """Index of the span's `<|image_end|>`."""
        return self.start + 1 + self.num_queries + self.num_vision


@dataclass
class EncodedSequence:
    """One sequence as model inputs. `labels[i]` is the target for the token after position i."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    modality: torch.Tensor
    labels: torch.Tensor
    spans: list[ImageSpan] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def next_position(self) -> int:
        return int(self.position_ids[-1]) + 1 if len(self) else 0


def canonical(segments: Sequence[Segment]) -> list[Segment]:
    """Merge adjacent text and drop empty text: the form `decode(encode(x))` returns."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Text):
            if not seg.text:
                continue
            if out and isinstance(out[-1], Text):
                out[-1] = Text(out[-1].text + seg.text)
                continue
        out.append(seg)
    return out


class StreamCodec:
    """Encodes segment lists into token ids, positions, modalities and labels, and decodes them back.

    Images must already carry a latent (the image tokenizer fills it in). How many vision tokens each
    image gets depends on its compression, so the caller passes those counts.
    """

    def __init__(self, tokenizer, num_queries: int):
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.tokenizer = tokenizer
        self.num_queries = num_queries
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self._pieces: dict[int, str] = {}

    # -- text -----------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Token ids of user text. Special-token look-alikes are split into ordinary tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def plan_entries(self, ids: Sequence[int]) -> list[PlanEntry]:
        """The layout-plan entries of a run of token ids (`layout.plan_entries`), each token decoded alone."""
        return plan_entries([self._piece(token) for token in ids])

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.decode_text([token])
        return self._pieces[token]

    # -- sequences ------------------------------------------------------------------------------
    def encode(
        self,
        segments: Sequence[Segment],
        vision_counts: Sequence[int],
        answer_start: int | None = None,
        add_bos: bool = True,
        add_eos: bool | None = None,
        compressions: Sequence[str] | None = None,
    ) -> EncodedSequence:
        """Encode segments; `vision_counts[k]` is the number of v tokens of the k-th image, compressed
        by `compressions[k]` (default "none").

        With `answer_start` set, segments from that index on are the answer: its text gets labels,
        its images get query tokens (they are generated), and EOS closes it. Without it the sequence is
        a prompt: no labels, no queries.
        """
        images = [s for s in segments if isinstance(s, Image)]
        if len(vision_counts) != len(images):
            raise ValueError(f"got {len(vision_counts)} vision counts for {len(images)} images")
        if add_eos is None:
            add_eos = answer_start is not None
        ids: list[int] = []
        pos: list[int] = []
        mod: list[int] = []
        in_answer: list[bool] = []
        spans: list[ImageSpan] = []
        latents: list[torch.Tensor] = []
        p = 0
        text_begin = 0  # where the text since the latest image starts

        def push(tok: int, position: int, modality: int, answer: bool):
            ids.append(tok)
            pos.append(position)
            mod.append(modality)
            in_answer.append(answer)

        if add_bos and self.ids.bos is not None:
            push(self.ids.bos, 0, TEXT, False)
            p = 1
        for index, seg in enumerate(segments):
            answer = answer_start is not None and index >= answer_start
            if isinstance(seg, Text):
                for tok in self.text_ids(seg.text):
                    push(tok, p, TEXT, answer)
                    p += 1
                continue
            if seg.latent is None:
                raise ValueError("image segments must be encoded to latents before entering the stream")
            k = len(latents)
            n_vis = int(vision_counts[k])
            n_q = self.num_queries if answer else 0
            spans.append(
                ImageSpan(
                    start=len(ids),
                    num_queries=n_q,
                    num_vision=n_vis,
                    latent_index=k,
                    compression=compressions[k] if compressions is not None else "none",
                )
            )
            latents.append(seg.latent)
            push(self.ids.image_start, p, TEXT, answer)
            if n_q:
                spans[-1].plan = tuple(self.plan_entries(ids[text_begin:]))
            for _ in range(n_q):
                push(self.ids.image_pad, p + 1, QUERY, answer)
            for _ in range(n_vis):
                push(self.ids.image_pad, p + 1, VISION, answer)
            push(self.ids.image_end, p + 2, TEXT, answer)
            text_begin = len(ids)
            p += 3
        if add_eos:
            push(self.ids.eos, p, TEXT, True)

        input_ids = torch.tensor(ids, dtype=torch.long)
        modality = torch.tensor(mod, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if answer_start is not None and len(ids) > 1:
            predictable = self._predictable(input_ids, modality) & torch.tensor(in_answer)
            labels[:-1] = torch.where(predictable[1:], input_ids[1:], IGNORE_INDEX)
        return EncodedSequence(
            input_ids=input_ids,
            position_ids=torch.tensor(pos, dtype=torch.long),
            modality=modality,
            labels=labels,
            spans=spans,
            latents=latents,
        )

    def _predictable(self, input_ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Tokens the model emits itself: text, EOS and `<|image_start|>`; not what the stream forces."""
        return (modality == TEXT) & (input_ids != self.ids.image_end)

    def decode(self, encoded: EncodedSequence) -> list[Segment]:
        """Turn an encoded sequence back into canonical segments (images as latents)."""
        ids = encoded.input_ids.tolist()
        out: list[Segment] = []
        text_run: list[int] = []
        span_at = {span.start: span for span in encoded.spans}
        i = 0
        if ids and self.ids.bos is not None and ids[0] == self.ids.bos:
            i = 1
        while i < len(ids):
            if i in span_at:
                if text_run:
                    out.append(Text(self.decode_text(text_run)))
                    text_run = []
                span = span_at[i]
                out.append(Image(latent=encoded.latents[span.latent_index]))
                i = span.end + 1
                continue
            if ids[i] == self.ids.eos and i == len(ids) - 1:
                break
            text_run.append(ids[i])
            i += 1
        if text_run:
            out.append(Text(self.decode_text(text_run)))
        return canonical(out)


def build_attention_mask(
    doc_ids: torch.Tensor,
    modality: torch.Tensor,
    image_ids: torch.Tensor,
    query_sees_only_own_image: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask (L, L) for one packed row: 0 where position i may attend to j, else -inf.

    - causal, and block-diagonal over `doc_ids`, so packed sequences never see each other;
    - query tokens are read-out only: a query is seen by the queries of its own image and nobody else;
    - a position with `query_sees_only_own_image` (text-condition dropout: an image's `<|image_start|>` and
      its queries) sees only its own image span.
    `image_ids[i]` numbers the image span that position i belongs to (-1 for text).
    """
    length = doc_ids.numel()
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    allowed = causal & (doc_ids[:, None] == doc_ids[None, :])
    is_query = modality == QUERY
    same_image = (image_ids[:, None] == image_ids[None, :]) & (image_ids[:, None] >= 0)
    allowed &= ~is_query[None, :] | (is_query[:, None] & same_image)
    allowed &= ~query_sees_only_own_image[:, None] | same_image
    mask = torch.zeros(length, length, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def image_ids_of(encoded: EncodedSequence) -> torch.Tensor:
    """For each position, the index of the image span it belongs to (start..end inclusive), else -1."""
    out = torch.full((len(encoded),), -1, dtype=torch.long)
    for k, span in enumerate(encoded.spans):
        out[span.start : span.end + 1] = k
    return out


@dataclass
class PackedBatch:
    """Several encoded sequences packed into rows, ready for one teacher-forced forward pass."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    modality: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L), additive
    spans: list[tuple[int, ImageSpan]]  # (row, span with row-relative indices)
    latents: list[torch.Tensor]  # indexed by span.latent_index
    # Images outside the sequences, with a class per patch token (TrainArguments.patch_label_weight).
    patch_latents: torch.Tensor | None = None  # (K, C, h, w)
    patch_labels: torch.Tensor | None = None  # (K, N)
    # Weight of each label in the text loss; None weighs every label alike.
    label_weights: torch.Tensor | None = None  # (B, L)

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            modality=self.modality.to(device),
            labels=self.labels.to(device),
            attention_mask=self.attention_mask.to(device),
            spans=self.spans,
            latents=[lat.to(device) for lat in self.latents],
            patch_latents=None if self.patch_latents is None else self.patch_latents.to(device),
            patch_labels=None if self.patch_labels is None else self.patch_labels.to(device),
            label_weights=None if self.label_weights is None else self.label_weights.to(device),
        )


def pack_sequences(sequences: Sequence[EncodedSequence], max_length: int, pad_id: int,
                   weigh_samples_equally: bool = False) -> PackedBatch:
    """Pack sequences first-fit into rows of at most `max_length` tokens, with no attention across them.
    With `weigh_samples_equally`, each sequence's labels share one unit of weight in the text loss."""
    rows: list[list[EncodedSequence]] = []
    fill: list[int] = []
    for seq in sorted(sequences, key=len, reverse=True):
        if len(seq) > max_length:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit max_length={max_length}")
        for r, used in enumerate(fill):
            if used + len(seq) <= max_length:
                rows[r].append(seq)
                fill[r] += len(seq)
                break
        else:
            rows.append([seq])
            fill.append(len(seq))
    length = max(fill)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    modality = torch.full((n, length), TEXT, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    label_weights = torch.zeros((n, length)) if weigh_samples_equally else None
    masks = []
    spans: list[tuple[int, ImageSpan]] = []
    latents: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        doc_ids = torch.full((length,), -1, dtype=torch.long)
        image_ids = torch.full((length,), -1, dtype=torch.long)
        blind = torch.zeros(length, dtype=torch.bool)
        offset = 0
        for d, seq in enumerate(row):
            sl = slice(offset, offset + len(seq))
            input_ids[r, sl] = seq.input_ids
            position_ids[r, sl] = seq.position_ids
            modality[r, sl] = seq.modality
            labels[r, sl] = seq.labels
            if label_weights is not None:
                targets = seq.labels != IGNORE_INDEX
                label_weights[r, sl] = targets / max(1, int(targets.sum()))
            doc_ids[sl] = d
            local_ids = image_ids_of(seq)
            image_ids[sl] = torch.where(local_ids >= 0, local_ids + len(latents), -1)
            for span in seq.spans:
                shifted = replace(span, start=span.start + offset, latent_index=span.latent_index + len(latents))
                if span.drop_text:
                    # `<|image_start|>` too: the queries read its keys and values, and in every layer past
                    # the first those carry the text before it.
                    blind[shifted.start : shifted.query_slice.stop] = True
                spans.append((r, shifted))
            latents.extend(seq.latents)
            offset += len(seq)
        # Padding attends to itself only, so no row of the mask is empty.
        pad = doc_ids < 0
        doc_ids[pad] = -2 - torch.arange(int(pad.sum()))
        masks.append(build_attention_mask(doc_ids, modality[r], image_ids, blind))
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        modality=modality,
        labels=labels,
        attention_mask=torch.stack(masks)[:, None],
        spans=spans,
        latents=latents,
        label_weights=label_weights,
    )
